r"""Integrity of Zarr outputs: checksummed chunks, a manifest, checked reads.

Arrays are created with a CRC-32C checksum on every chunk
([checksum_codecs][pydvl_datainf.storage.integrity.checksum_codecs]), and every
chunk is written, even one equal to the fill value. A manifest of finished
arrays (their shapes and chunk grids) is written last
([write_manifest][pydvl_datainf.storage.integrity.write_manifest]).
[open_checked_array][pydvl_datainf.storage.integrity.open_checked_array] checks
an array against the manifest when it is opened (cheap: metadata only);
[read_checked][pydvl_datainf.storage.integrity.read_checked] checks that the
chunks read exist (Zarr would return the fill value for a missing chunk) and
turns a checksum failure into
[StoreCorruptError][pydvl_datainf.errors.StoreCorruptError] naming the array
and the chunk; [verify_array][pydvl_datainf.storage.integrity.verify_array]
reads every chunk. On a local disk, uncompressed chunks can also be read
straight from their files into buffers that the caller reuses
([RawChunkReader][pydvl_datainf.storage.integrity.RawChunkReader]), with the
same checks: no fresh memory per chunk, and no copy after the read; and
whole chunks written from the caller's memory
([RawChunkWriter][pydvl_datainf.storage.integrity.RawChunkWriter]) in the
same format, without the copies of Zarr's encoding.

Example:
    ```python
    import numpy as np
    import zarr
    from pydvl_datainf.storage.integrity import (
        create_checked_array, open_checked_array, read_checked, write_manifest)

    group = zarr.open_group("scores.zarr", mode="w")
    values = np.arange(1000, dtype="float32").reshape(10, 100)
    arr = create_checked_array(group, "matrix", shape=(10, 100),
                               chunks=(10, 50), dtype="float32")
    arr[:] = values
    write_manifest(group, ["matrix"])
    arr = open_checked_array(group, "matrix", "scores.zarr")
    left = read_checked(arr, "matrix", "scores.zarr", (slice(0, 10), slice(0, 50)))
    assert (left == values[:, :50]).all()
    ```
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np

from ..errors import StoreCorruptError

__all__ = [
    "DEFAULT_RECOVER",
    "checksum_codecs",
    "create_checked_array",
    "write_manifest",
    "read_manifest",
    "open_checked_array",
    "chunk_exists",
    "missing_chunks",
    "read_checked",
    "verify_array",
    "RawChunkReader",
    "RawChunkWriter",
]

Coords = Tuple[int, ...]

DEFAULT_RECOVER = (
    "Recreate it: fit again with overwrite=True (or delete the store and fit again)."
)
"""How to recover, said by default in errors about a damaged output."""


def checksum_codecs(compressors: Any = None) -> List[Any]:
    """Zarr 3 bytes-to-bytes codecs: `compressors`, then a CRC-32C checksum.

    Pass the result as `compressors=` to `create_array`: every chunk is
    checksummed after compression, and a chunk whose bytes changed raises on
    read.

    Args:
        compressors: `None`, one codec or a sequence of codecs.

    Example:
        >>> type(checksum_codecs()[-1]).__name__
        'Crc32cCodec'
    """
    from zarr.codecs import Crc32cCodec

    if compressors is None:
        given: List[Any] = []
    elif isinstance(compressors, (list, tuple)):
        given = list(compressors)
    else:
        given = [compressors]
    given = [c for c in given if not isinstance(c, Crc32cCodec)]
    return [*given, Crc32cCodec()]


def create_checked_array(
    group: Any,
    name: str,
    *,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: Any,
    compressors: Any = None,
    fill_value: Any = 0,
) -> Any:
    """`group.create_array` with a checksum on every chunk and every chunk
    written (even one equal to `fill_value`, so that a missing chunk is
    always a fault). Replaces an array of the same name in `group`.

    Example:
        ```python
        import zarr
        from pydvl_datainf.storage.integrity import create_checked_array

        group = zarr.open_group("scores.zarr", mode="w")
        arr = create_checked_array(group, "matrix", shape=(10, 100),
                                   chunks=(10, 50), dtype="float32")
        assert arr.shape == (10, 100) and arr.chunks == (10, 50)
        ```
    """
    return group.create_array(
        name,
        shape=tuple(shape),
        chunks=tuple(chunks),
        dtype=dtype,
        fill_value=fill_value,
        compressors=checksum_codecs(compressors),
        config={"write_empty_chunks": True},
        overwrite=True,
    )


def write_manifest(group: Any, names: Iterable[str]) -> None:
    """Record arrays `names` of `group` as finished: their shapes and chunks.

    Call it after their data is written (and before marking the output
    complete); entries already there are kept.

    Example:
        ```python
        import numpy as np
        import zarr
        from pydvl_datainf.storage.integrity import create_checked_array, write_manifest

        group = zarr.open_group("scores.zarr", mode="w")
        arr = create_checked_array(group, "matrix", shape=(4, 6), chunks=(4, 3),
                                   dtype="float32")
        arr[:] = np.ones((4, 6), dtype="float32")
        write_manifest(group, ["matrix"])
        manifest = group.attrs["manifest"]
        assert manifest == {"matrix": {"shape": [4, 6], "chunks": [4, 3]}}
        ```
    """
    manifest = dict(group.attrs.get("manifest") or {})
    for name in names:
        arr = group[name]
        manifest[name] = {"shape": list(arr.shape), "chunks": list(arr.chunks)}
    group.attrs["manifest"] = manifest


def read_manifest(group: Any, path: str, what: str = "store") -> Dict[str, Any]:
    """The manifest of `group`.

    Raises:
        StoreCorruptError: there is none.

    Example:
        ```python
        import zarr
        from pydvl_datainf.errors import StoreCorruptError
        from pydvl_datainf.storage.integrity import (
            create_checked_array, read_manifest, write_manifest)

        group = zarr.open_group("scores.zarr", mode="w")
        try:
            read_manifest(group, "scores.zarr")  # not finished yet
        except StoreCorruptError as e:
            print(e)
        else:
            raise AssertionError("no manifest, no error")
        create_checked_array(group, "matrix", shape=(4, 6), chunks=(4, 3), dtype="f4")
        write_manifest(group, ["matrix"])
        assert read_manifest(group, "scores.zarr")["matrix"]["shape"] == [4, 6]
        ```
    """
    manifest = group.attrs.get("manifest")
    if not isinstance(manifest, dict):
        raise StoreCorruptError(
            f"The {what} at {path!r} has no manifest of finished chunks: it was "
            f"not finished, or its metadata is damaged. {DEFAULT_RECOVER}"
        )
    return manifest


def open_checked_array(
    group: Any,
    name: str,
    path: str,
    *,
    shape: Optional[Sequence[int]] = None,
    manifest: Optional[Mapping[str, Any]] = None,
    what: str = "store",
    recover: str = DEFAULT_RECOVER,
) -> Any:
    """Open array `name` of `group` and check it against the manifest.

    Cheap (metadata only): the array exists, is in the manifest, and its
    shape and chunks are the recorded ones (and `shape`, if given).

    Raises:
        StoreCorruptError: missing array, no manifest entry, or another
            shape or chunk grid, naming the array and how to recover.

    Example:
        ```python
        import zarr
        from pydvl_datainf.errors import StoreCorruptError
        from pydvl_datainf.storage.integrity import (
            create_checked_array, open_checked_array, write_manifest)

        group = zarr.open_group("scores.zarr", mode="w")
        create_checked_array(group, "matrix", shape=(4, 6), chunks=(4, 3), dtype="f4")
        write_manifest(group, ["matrix"])
        arr = open_checked_array(group, "matrix", "scores.zarr", shape=(4, 6))
        try:
            open_checked_array(group, "matrix", "scores.zarr", shape=(5, 6))
        except StoreCorruptError as e:
            print(e)  # has shape (4, 6), but (5, 6) was written
        else:
            raise AssertionError("another shape, no error")
        ```
    """
    import zarr.errors

    if manifest is None:
        manifest = read_manifest(group, path, what)
    entry = manifest.get(name)
    if entry is None:
        raise StoreCorruptError(
            f"The {what} at {path!r} does not list array {name!r} as finished. "
            f"{recover}"
        )
    try:
        arr = group[name]
    except (KeyError, FileNotFoundError, zarr.errors.NodeNotFoundError) as e:
        raise StoreCorruptError(
            f"Array {name!r} of the {what} at {path!r} is missing. {recover}"
        ) from e
    want_shape = list(entry["shape"]) if shape is None else list(shape)
    if list(arr.shape) != list(entry["shape"]) or list(arr.shape) != want_shape:
        raise StoreCorruptError(
            f"Array {name!r} of the {what} at {path!r} has shape "
            f"{tuple(arr.shape)}, but {tuple(want_shape)} was written. {recover}"
        )
    if list(arr.chunks) != list(entry["chunks"]):
        raise StoreCorruptError(
            f"Array {name!r} of the {what} at {path!r} has chunks "
            f"{tuple(arr.chunks)}, but {tuple(entry['chunks'])} were written. "
            f"{recover}"
        )
    return arr


def _chunk_key(arr: Any, coords: Coords) -> str:
    key = arr.metadata.encode_chunk_key(tuple(int(c) for c in coords))
    prefix = arr.store_path.path
    return f"{prefix}/{key}" if prefix else str(key)


def chunk_exists(arr: Any, coords: Coords) -> bool:
    """Whether chunk `coords` of Zarr array `arr` is stored (errors propagate).

    Example:
        ```python
        import numpy as np
        import zarr
        from pydvl_datainf.storage.integrity import chunk_exists, create_checked_array

        group = zarr.open_group("scores.zarr", mode="w")
        arr = create_checked_array(group, "matrix", shape=(4, 6), chunks=(4, 3),
                                   dtype="float32")
        arr[:, :3] = np.zeros((4, 3), dtype="float32")  # only the first chunk
        assert chunk_exists(arr, (0, 0)) and not chunk_exists(arr, (0, 1))
        ```
    """
    from zarr.core.sync import sync

    return bool(sync(arr.store_path.store.exists(_chunk_key(arr, coords))))


def _grid(arr: Any) -> List[int]:
    return [-(-s // c) for s, c in zip(arr.shape, arr.chunks)]


def _chunks_of(arr: Any, selection: Sequence[slice]) -> List[Coords]:
    """The chunk coordinates a basic selection (one slice per dimension) reads."""
    ranges = []
    for dim, sl in enumerate(selection):
        start, stop, _ = sl.indices(arr.shape[dim])
        if stop <= start:
            return []
        c = arr.chunks[dim]
        ranges.append(range(start // c, (stop - 1) // c + 1))
    ranges += [range(g) for g in _grid(arr)[len(selection) :]]
    return list(itertools.product(*ranges))


def missing_chunks(arr: Any, coords: Iterable[Coords]) -> List[Coords]:
    """The chunks among `coords` that are not stored.

    Example:
        ```python
        import numpy as np
        import zarr
        from pydvl_datainf.storage.integrity import create_checked_array, missing_chunks

        group = zarr.open_group("scores.zarr", mode="w")
        arr = create_checked_array(group, "matrix", shape=(4, 6), chunks=(4, 3),
                                   dtype="float32")
        arr[:, 3:] = np.ones((4, 3), dtype="float32")  # only the second chunk
        assert missing_chunks(arr, [(0, 0), (0, 1)]) == [(0, 0)]
        ```
    """
    return [tuple(c) for c in coords if not chunk_exists(arr, tuple(c))]


def _corrupt(
    what: str, path: str, name: str, coords: Coords, problem: str, recover: str
) -> StoreCorruptError:
    return StoreCorruptError(
        f"The {what} at {path!r} is damaged: array {name!r}, chunk "
        f"{tuple(int(c) for c in coords)} {problem}. {recover}"
    )


def _read_chunk(
    arr: Any, name: str, path: str, coords: Coords, what: str, recover: str
) -> Any:
    try:
        return arr.blocks[tuple(coords)]
    except ValueError as e:  # a failed checksum, or bytes that do not decode
        raise _corrupt(what, path, name, coords, f"is corrupt ({e})", recover) from e


def read_checked(
    arr: Any,
    name: str,
    path: str,
    selection: Union[slice, Tuple[slice, ...]],
    *,
    read: Optional[Callable[[], Any]] = None,
    chunks: Optional[Iterable[Coords]] = None,
    what: str = "store",
    recover: str = DEFAULT_RECOVER,
) -> Any:
    """Read `arr[selection]`, refusing missing or corrupt chunks.

    Checks that every chunk read is stored (Zarr returns the fill value for a
    missing chunk) and turns a checksum failure into an error naming the
    chunk.

    Args:
        arr: the Zarr array.
        name: its name in the group (for messages).
        path: the output's path (for messages).
        selection: slices, one per leading dimension, within the shape.
        read: the actual read (default `arr[selection]`), e.g. an orthogonal
            selection; then `chunks` must list the chunks it touches.
        chunks: the chunk coordinates read (default: those of `selection`).
        what: the kind of output (for messages).
        recover: how to recover (for messages).

    Raises:
        StoreCorruptError: a chunk is missing or corrupt; a selection beyond
            the shape.

    Example:
        ```python
        import numpy as np
        import zarr
        from pydvl_datainf.errors import StoreCorruptError
        from pydvl_datainf.storage.integrity import create_checked_array, read_checked

        group = zarr.open_group("grads.zarr", mode="w")
        arr = create_checked_array(group, "w", shape=(8, 2), chunks=(4, 2),
                                   dtype="float32")
        arr[:4] = np.ones((4, 2), dtype="float32")  # rows 4..7 never written
        rows = read_checked(arr, "w", "grads.zarr", (slice(0, 4),))
        assert rows.sum() == 8
        try:
            read_checked(arr, "w", "grads.zarr", (slice(0, 8),))  # zarr: zeros
        except StoreCorruptError as e:
            print(e)  # array 'w', chunk (1, 0) is missing
        else:
            raise AssertionError("a missing chunk, no error")
        ```
    """
    sel = selection if isinstance(selection, tuple) else (selection,)
    for dim, sl in enumerate(sel):
        if sl.stop is not None and sl.stop > arr.shape[dim]:
            raise StoreCorruptError(
                f"The {what} at {path!r} is damaged: array {name!r} has "
                f"{arr.shape[dim]} entries along axis {dim}, {sl.stop} were "
                f"written. {recover}"
            )
    coords = list(chunks) if chunks is not None else _chunks_of(arr, sel)
    for c in missing_chunks(arr, coords):
        raise _corrupt(what, path, name, c, "is missing", recover)
    try:
        return read() if read is not None else arr[sel]
    except ValueError as e:
        for c in coords:  # find the culprit to name it
            _read_chunk(arr, name, path, c, what, recover)
        raise _corrupt(
            what, path, name, coords[0] if coords else (), f"failed ({e})", recover
        ) from e


def verify_array(
    arr: Any,
    name: str,
    path: str,
    *,
    what: str = "store",
    recover: str = DEFAULT_RECOVER,
) -> int:
    """Read every chunk of `arr`, checking that it exists and its checksum.

    Returns:
        The number of chunks checked.

    Raises:
        StoreCorruptError: the first missing or corrupt chunk.

    Example:
        ```python
        import numpy as np
        import zarr
        from pydvl_datainf.storage.integrity import create_checked_array, verify_array

        group = zarr.open_group("scores.zarr", mode="w")
        arr = create_checked_array(group, "matrix", shape=(4, 6), chunks=(4, 3),
                                   dtype="float32")
        arr[:] = np.ones((4, 6), dtype="float32")
        assert verify_array(group["matrix"], "matrix", "scores.zarr") == 2  # chunks
        ```
    """
    n = 0
    for coords in itertools.product(*(range(g) for g in _grid(arr))):
        if not chunk_exists(arr, coords):
            raise _corrupt(what, path, name, coords, "is missing", recover)
        _read_chunk(arr, name, path, coords, what, recover)
        n += 1
    return n


def _raw_layout(arr: Any) -> bool:
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


def _crc32c(data: np.ndarray) -> int:
    import google_crc32c

    view = data.reshape(-1).view(np.uint8).view()
    view.flags.writeable = False  # the checksum reads read-only buffers
    return int(google_crc32c.value(view))


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

    Use [for_array][pydvl_datainf.storage.integrity.RawChunkReader.for_array],
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
        from pydvl_datainf.storage.integrity import RawChunkReader, create_checked_array

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
        if not _raw_layout(arr):
            return None
        return cls(arr, name, path, what=what, recover=recover)

    def file(self, coords: Coords) -> str:
        """The path of chunk `coords`'s file."""
        return os.path.join(self._root, *_chunk_key(self._arr, coords).split("/"))

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
        if buffer.dtype != np.uint8 or buffer.shape != (self.nbytes + 4,):
            raise ValueError("buffer must come from new_buffer()")
        try:
            with open(self.file(coords), "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                got = f.readinto(buffer.data) if size == len(buffer) else -1
        except FileNotFoundError:
            raise _corrupt(
                self._what, self._path, self._name, coords, "is missing", self._recover
            ) from None
        if got != len(buffer):
            raise _corrupt(
                self._what,
                self._path,
                self._name,
                coords,
                f"has {size} bytes, {len(buffer)} expected",
                self._recover,
            )
        data = buffer[: self.nbytes]
        stored = int.from_bytes(buffer[self.nbytes :].tobytes(), "little")
        if _crc32c(data) != stored:
            raise _corrupt(
                self._what,
                self._path,
                self._name,
                coords,
                "is corrupt (its checksum does not match its bytes)",
                self._recover,
            )
        return data.view(self.dtype).reshape(self.chunk_shape)


class RawChunkWriter:
    """Writes whole chunks of a Zarr array from the caller's memory.

    The file is what Zarr writes for the codecs of
    [create_checked_array][pydvl_datainf.storage.integrity.create_checked_array]
    without compressors (the chunk's bytes, then their CRC-32C), written
    from the data as it lies in memory: no encoded copy. Zarr and
    [RawChunkReader][pydvl_datainf.storage.integrity.RawChunkReader] read it
    back. Only whole chunks (the chunk's shape exactly) are written this way.

    Example:
        ```python
        import numpy as np
        import zarr
        from pydvl_datainf.storage.integrity import RawChunkWriter, create_checked_array

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
        return cls(arr) if _raw_layout(arr) else None

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
        crc = _crc32c(data).to_bytes(4, "little")
        file = os.path.join(self._root, *_chunk_key(self._arr, coords).split("/"))
        os.makedirs(os.path.dirname(file), exist_ok=True)
        with open(file, "wb", buffering=0) as f:
            view = data.reshape(-1).view(np.uint8).data
            written = 0
            while written < len(view):
                written += f.write(view[written:])
            f.write(crc)
