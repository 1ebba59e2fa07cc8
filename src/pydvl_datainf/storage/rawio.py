r"""Whole chunks of a Zarr array read from, and written to, their files directly.

On a local disk, a chunk of an array created by
[create_checked_array][pydvl_datainf.storage.integrity.create_checked_array]
without compressors is a file holding the chunk's little-endian bytes in C
order, then their CRC-32C. [RawChunkReader][pydvl_datainf.storage.rawio.RawChunkReader]
reads such a file with one `readinto` into a buffer that the caller reuses and
checks its checksum there; [RawChunkWriter][pydvl_datainf.storage.rawio.RawChunkWriter]
writes one from the caller's memory. Both make the same files as Zarr, which
reads them back.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Tuple

import numpy as np

from .digests import chunk_digest
from .integrity import DEFAULT_RECOVER, chunk_key, corrupt_error

__all__ = ["raw_layout", "RawChunkReader", "RawChunkWriter"]

Coords = Tuple[int, ...]


def raw_layout(arr: Any) -> bool:
    """Whether `arr`'s chunks are raw little-endian bytes and a CRC-32C, on a local disk."""
    from zarr.codecs import BytesCodec, Crc32cCodec
    from zarr.storage import LocalStore

    if not isinstance(arr.store_path.store, LocalStore):
        return False
    codecs = list(getattr(arr.metadata, "codecs", ()))
    if len(codecs) != 2:
        return False
    raw, crc = codecs
    if not isinstance(raw, BytesCodec) or not isinstance(crc, Crc32cCodec):
        return False
    endian = getattr(raw.endian, "value", raw.endian)
    if np.dtype(arr.dtype).itemsize > 1 and not (
        endian == "little" and sys.byteorder == "little"
    ):
        return False
    return True


class RawChunkReader:
    """Reads whole chunks of a Zarr array from their files into given buffers.

    Applies to arrays on a local disk whose chunks are stored raw: the
    little-endian bytes of the chunk in C order, then a CRC-32C of them (the
    codecs of [create_checked_array][pydvl_datainf.storage.integrity.create_checked_array]
    without compressors). A chunk is read with one `readinto` into a buffer
    that the caller allocates once and reuses, and its checksum is checked
    there: no fresh memory per chunk (fresh memory is paged in, and zeroed
    by the kernel, on first touch) and no copy after the read. Chunks at the
    edge of the array are stored whole, as Zarr does, and read whole.

    Use [for_array][pydvl_datainf.storage.rawio.RawChunkReader.for_array],
    which returns `None` where the layout does not apply (another store,
    compression, big-endian data); then read through Zarr.

    Args:
        arr: the Zarr array.
        name: its name in the group (for messages).
        path: the output's path (for messages).
        what: the kind of output (for messages).
        recover: how to recover (for messages).

    Example:
        ```python
        import numpy as np
        import zarr
        from pydvl_datainf.storage.integrity import create_checked_array
        from pydvl_datainf.storage.rawio import RawChunkReader

        group = zarr.open_group("scores.zarr", mode="w")
        arr = create_checked_array(group, "m", shape=(10, 3), chunks=(4, 3),
                                   dtype="float32")
        arr[:] = np.arange(30, dtype="float32").reshape(10, 3)
        reader = RawChunkReader.for_array(arr, "m", "scores.zarr")
        buffer = reader.new_buffer()                # one chunk, reused
        last = reader.read_into((2, 0), buffer)     # rows 8..11, stored whole
        assert last.shape == (4, 3) and (last[:2] == arr[8:]).all()
        ```
    """

    def __init__(
        self,
        arr: Any,
        name: str,
        path: str,
        *,
        what: str = "store",
        recover: str = DEFAULT_RECOVER,
    ) -> None:
        self._arr = arr
        self._name = name
        self._path = path
        self._what = what
        self._recover = recover
        self._root = str(arr.store_path.store.root)
        self.dtype = np.dtype(arr.dtype)
        self.chunk_shape: Tuple[int, ...] = tuple(int(c) for c in arr.chunks)
        self.nbytes = int(np.prod(self.chunk_shape)) * self.dtype.itemsize
        """Bytes of one chunk's data (the file holds 4 more: the checksum)."""

    @classmethod
    def for_array(
        cls,
        arr: Any,
        name: str,
        path: str,
        *,
        what: str = "store",
        recover: str = DEFAULT_RECOVER,
    ) -> Optional[RawChunkReader]:
        """A reader for `arr`, or `None` where its chunks are not stored raw on a local disk."""
        if not raw_layout(arr):
            return None
        return cls(arr, name, path, what=what, recover=recover)

    def file(self, coords: Coords) -> str:
        """The path of chunk `coords`'s file."""
        return os.path.join(self._root, *chunk_key(self._arr, coords).split("/"))

    def new_buffer(self) -> np.ndarray:
        """A buffer for one chunk file (data and checksum), to pass to `read_into`."""
        return np.empty(self.nbytes + 4, dtype=np.uint8)

    def read_into(self, coords: Coords, buffer: np.ndarray) -> np.ndarray:
        """Read chunk `coords` into `buffer` and check it.

        Returns:
            The chunk, a view of `buffer` with the chunk's shape and the
            array's dtype; valid until `buffer` is reused.

        Raises:
            StoreCorruptError: the chunk is missing, has the wrong size, or
                fails its checksum.
            ValueError: `buffer` is not a `new_buffer()`.
        """
        return self.read_with_crc(coords, buffer)[0]

    def read_with_crc(
        self, coords: Coords, buffer: np.ndarray
    ) -> Tuple[np.ndarray, int]:
        """As [read_into][pydvl_datainf.storage.rawio.RawChunkReader.read_into],
        with the CRC-32C of the whole chunk (checked against its bytes)."""
        if buffer.dtype != np.uint8 or buffer.shape != (self.nbytes + 4,):
            raise ValueError("buffer must come from new_buffer()")
        try:
            with open(self.file(coords), "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                got = f.readinto(buffer.data) if size == len(buffer) else -1
        except FileNotFoundError:
            raise corrupt_error(
                self._what, self._path, self._name, coords, "is missing", self._recover
            ) from None
        if got != len(buffer):
            raise corrupt_error(
                self._what,
                self._path,
                self._name,
                coords,
                f"has {size} bytes, {len(buffer)} expected",
                self._recover,
            )
        data = buffer[: self.nbytes]
        stored = int.from_bytes(buffer[self.nbytes :].tobytes(), "little")
        if chunk_digest(data) != stored:
            raise corrupt_error(
                self._what,
                self._path,
                self._name,
                coords,
                "is corrupt (its checksum does not match its bytes)",
                self._recover,
            )
        return data.view(self.dtype).reshape(self.chunk_shape), stored


class RawChunkWriter:
    """Writes whole chunks of a Zarr array from the caller's memory.

    The file is what Zarr writes for the codecs of
    [create_checked_array][pydvl_datainf.storage.integrity.create_checked_array]
    without compressors (the chunk's bytes, then their CRC-32C), written
    from the data as it lies in memory: no encoded copy. Zarr and
    [RawChunkReader][pydvl_datainf.storage.rawio.RawChunkReader] read it
    back. Only whole chunks (the chunk's shape exactly) are written this way.

    Example:
        ```python
        import numpy as np
        import zarr
        from pydvl_datainf.storage.integrity import create_checked_array
        from pydvl_datainf.storage.rawio import RawChunkWriter

        group = zarr.open_group("scores.zarr", mode="w")
        arr = create_checked_array(group, "m", shape=(8, 3), chunks=(4, 3),
                                   dtype="float32")
        writer = RawChunkWriter.for_array(arr)
        tile = np.ones((4, 3), dtype="float32")
        writer.write((1, 0), tile)
        assert (arr[4:] == 1).all()  # read back by Zarr, checksum checked
        ```
    """

    def __init__(self, arr: Any) -> None:
        self._arr = arr
        self._root = str(arr.store_path.store.root)
        self.dtype = np.dtype(arr.dtype)
        self.chunk_shape: Tuple[int, ...] = tuple(int(c) for c in arr.chunks)

    @classmethod
    def for_array(cls, arr: Any) -> Optional[RawChunkWriter]:
        """A writer for `arr`, or `None` where its chunks are not stored raw on a local disk."""
        return cls(arr) if raw_layout(arr) else None

    def write(self, coords: Coords, data: np.ndarray) -> None:
        """Write chunk `coords` from `data` (the chunk's shape and the array's dtype).

        Raises:
            ValueError: `data` is not a whole chunk of the array's dtype.
        """
        if data.dtype != self.dtype or tuple(data.shape) != self.chunk_shape:
            raise ValueError(
                f"a whole chunk {self.chunk_shape} of {self.dtype} is needed, got "
                f"{tuple(data.shape)} of {data.dtype}"
            )
        data = np.ascontiguousarray(data)
        crc = chunk_digest(data).to_bytes(4, "little")
        file = os.path.join(self._root, *chunk_key(self._arr, coords).split("/"))
        os.makedirs(os.path.dirname(file), exist_ok=True)
        with open(file, "wb", buffering=0) as f:
            view = data.reshape(-1).view(np.uint8).data
            written = 0
            while written < len(view):
                written += f.write(view[written:])
            f.write(crc)
