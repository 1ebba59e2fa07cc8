r"""Checked whole-chunk reads of one Zarr array: the one read path for stored data.

[CheckedChunks][pydvl_datainf.storage.chunks.CheckedChunks] reads an array
chunk by chunk and checks each chunk three ways before handing it out:

1. it exists (Zarr would return the fill value for a missing chunk);
2. its bytes pass their CRC-32C checksum;
3. it is the chunk recorded for its place, by the array's
   [DigestTable][pydvl_datainf.storage.digests.DigestTable]: a chunk swapped
   with another, copied over another, or moved from another array is refused.

On a local disk, uncompressed chunks are read straight from their files into
buffers that the caller may reuse
([RawChunkReader][pydvl_datainf.storage.rawio.RawChunkReader]); elsewhere
through Zarr. Both paths make the same checks.

Example:
    ```python
    import os
    import numpy as np
    import zarr
    from pydvl_datainf.errors import StoreCorruptError
    from pydvl_datainf.storage.chunks import CheckedChunks
    from pydvl_datainf.storage.digests import DigestTable
    from pydvl_datainf.storage.integrity import create_checked_array

    group = zarr.open_group("g.zarr", mode="w")
    arr = create_checked_array(group, "w", shape=(8, 2), chunks=(4, 2), dtype="f4")
    values = np.arange(16, dtype="float32").reshape(8, 2)
    arr[:] = values
    table = DigestTable.for_shape(arr.shape, arr.chunks)
    table.record_region((0, 0), values, arr.chunks)
    chunks = CheckedChunks(arr, "w", "g.zarr", table)
    assert (chunks.read_rows(2, 7) == values[2:7]).all()
    a, b = "g.zarr/w/c/0/0", "g.zarr/w/c/1/0"
    os.rename(a, "tmp"); os.rename(b, a); os.rename("tmp", b)  # swap two chunks
    try:
        chunks.read((0, 0))
    except StoreCorruptError as e:
        print(e)  # ... chunk (0, 0) is not the chunk written at this place ...
    else:
        raise AssertionError("a swapped chunk was read")
    ```
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np

from .digests import DigestTable, chunk_grid
from .integrity import (
    DEFAULT_RECOVER,
    MISPLACED,
    chunk_exists,
    corrupt_error,
    verify_array,
)
from .rawio import RawChunkReader

__all__ = ["CheckedChunks"]

Coords = Tuple[int, ...]


class CheckedChunks:
    """Whole-chunk reads of a Zarr array, each chunk checked (see module docs).

    Args:
        arr: the Zarr array.
        name: its name in its group (for messages).
        path: the output's path (for messages).
        digests: the digest table of the array.
        what: the kind of output (for messages).
        recover: how to recover (for messages).
        raw: read local, uncompressed chunks straight from their files.
    """

    def __init__(
        self,
        arr: Any,
        name: str,
        path: str,
        digests: DigestTable,
        *,
        what: str = "store",
        recover: str = DEFAULT_RECOVER,
        raw: bool = True,
    ):
        self.arr = arr
        self.name = name
        self.path = path
        self.digests = digests
        self.what = what
        self.recover = recover
        self.shape: Tuple[int, ...] = tuple(int(s) for s in arr.shape)
        self.chunks: Tuple[int, ...] = tuple(int(c) for c in arr.chunks)
        if chunk_grid(self.shape, self.chunks) != digests.grid:
            raise corrupt_error(
                what,
                path,
                name,
                (),
                f"has a chunk grid {chunk_grid(self.shape, self.chunks)} other than "
                f"its digests' {digests.grid}",
                recover,
            )
        self.raw: Optional[RawChunkReader] = (
            RawChunkReader.for_array(arr, name, path, what=what, recover=recover)
            if raw
            else None
        )

    def region(self, coords: Coords) -> Tuple[slice, ...]:
        """The part of the array that chunk `coords` holds."""
        return tuple(
            slice(c * k, min(s, (c + 1) * k))
            for c, k, s in zip(coords, self.chunks, self.shape)
        )

    def new_buffer(self) -> Optional[np.ndarray]:
        """A buffer for `read(..., buffer=)`, or `None` without the raw path."""
        return None if self.raw is None else self.raw.new_buffer()

    def _misplaced(self, coords: Coords) -> Exception:
        return corrupt_error(
            self.what, self.path, self.name, coords, MISPLACED, self.recover
        )

    def read(self, coords: Coords, buffer: Optional[np.ndarray] = None) -> np.ndarray:
        """The values of chunk `coords` (its part of the array), checked.

        Args:
            coords: the chunk's coordinates in the chunk grid.
            buffer: with the raw path, a buffer from `new_buffer()` to read
                into (the result is then a view of it, valid until it is
                reused); default fresh memory.

        Raises:
            StoreCorruptError: the chunk is missing, corrupt, or not the chunk
                recorded for its place; naming the array and the chunk.
        """
        coords = tuple(int(c) for c in coords)
        want = self.digests.expected(coords)
        if want is None:
            raise corrupt_error(
                self.what,
                self.path,
                self.name,
                coords,
                "has no recorded digest",
                self.recover,
            )
        sel = self.region(coords)
        if self.raw is not None:
            buf = self.raw.new_buffer() if buffer is None else buffer
            whole, crc = self.raw.read_with_crc(coords, buf)
            if tuple(s.stop - s.start for s in sel) == self.chunks:
                if crc != want:
                    raise self._misplaced(coords)
                return whole
            part = whole[tuple(slice(0, s.stop - s.start) for s in sel)]
            if not self.digests.matches(coords, part):
                raise self._misplaced(coords)
            return part
        if not chunk_exists(self.arr, coords):
            raise corrupt_error(
                self.what, self.path, self.name, coords, "is missing", self.recover
            )
        try:
            values = np.asarray(self.arr.blocks[coords])
        except ValueError as e:  # a failed checksum, or bytes that do not decode
            raise corrupt_error(
                self.what,
                self.path,
                self.name,
                coords,
                f"is corrupt ({e})",
                self.recover,
            ) from e
        if not self.digests.matches(coords, values):
            raise self._misplaced(coords)
        return values

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop` of an array chunked along its first axis only."""
        if any(g != 1 for g in self.digests.grid[1:]):
            raise ValueError(f"array {self.name!r} is chunked along more than rows")
        stop = min(int(stop), self.shape[0])
        start = min(int(start), stop)
        step = self.chunks[0]
        parts: List[np.ndarray] = []
        for c in range(start // step, -(-stop // step)):
            lo = c * step
            rest = (0,) * (len(self.shape) - 1)
            values = self.read((c, *rest))
            parts.append(values[max(start, lo) - lo : min(stop, lo + step) - lo])
        if not parts:
            return np.zeros((0, *self.shape[1:]), dtype=self.arr.dtype)
        if len(parts) == 1:
            return np.array(parts[0], copy=True) if self.raw is not None else parts[0]
        return np.concatenate(parts)

    def verify(self) -> int:
        """Read and check every chunk; return how many were checked."""
        return verify_array(
            self.arr,
            self.name,
            self.path,
            digests=self.digests,
            what=self.what,
            recover=self.recover,
        )
