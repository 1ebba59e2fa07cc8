r"""Chunk digests bound to their place: what each chunk of an array must hold.

Zarr's CRC-32C codec proves that a chunk's bytes are the bytes that were
written to *that file*; it does not prove that the file is at the right place.
Two chunks that swap places, a chunk copied over another, or a chunk moved
from one array to another of the same shape all pass it. A
[DigestTable][pydvl_datainf.storage.digests.DigestTable] records, when an array
is written, the digest of every chunk **by its position** (a CRC-32C of the
chunk's values within the array, in C order and the array's dtype). Every
checked read compares the chunk it got with the digest recorded for the
position it asked for, so a chunk in the wrong place is refused like a damaged
one.

A table is saved beside its array (`digests/<array>`, one int64 per chunk,
itself checksummed) and the SHA-256 of the table is written into the output's
manifest, which binds each table to its array's name (see
[write_manifest][pydvl_datainf.storage.integrity.write_manifest]).

Example:
    ```python
    import numpy as np
    from pydvl_datainf.storage.digests import DigestTable, chunk_digest

    values = np.arange(12, dtype="float32").reshape(6, 2)
    table = DigestTable.for_shape((6, 2), (4, 2))
    table.record((0, 0), values[:4])
    table.record((1, 0), values[4:])            # the edge chunk: its 2 rows
    assert table.matches((1, 0), values[4:])
    assert not table.matches((0, 0), values[[1, 0, 2, 3]])  # rows moved
    assert chunk_digest(values[:4]) == table.expected((0, 0))
    ```
"""

from __future__ import annotations

import hashlib
import itertools
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["DigestTable", "chunk_digest", "chunk_grid", "place_mark", "DIGESTS_GROUP"]

Coords = Tuple[int, ...]

DIGESTS_GROUP = "digests"
"""The subgroup that holds the digest table of each array."""

_UNSET = -1


def chunk_digest(values: np.ndarray) -> int:
    """CRC-32C of `values` in C order (the values of one chunk within the array).

    Example:
        >>> import numpy as np
        >>> chunk_digest(np.zeros(3, dtype="float32")) == chunk_digest(np.zeros(3, dtype="float32"))
        True
    """
    import google_crc32c

    data = np.ascontiguousarray(values)
    view = data.reshape(-1).view(np.uint8)
    view.flags.writeable = False  # google_crc32c reads read-only buffers
    return int(google_crc32c.value(view))


def chunk_grid(shape: Sequence[int], chunks: Sequence[int]) -> Tuple[int, ...]:
    """The number of chunks along each dimension.

    Example:
        >>> chunk_grid((10, 3), (4, 3))
        (3, 1)
    """
    return tuple(max(0, -(-int(s) // int(c))) for s, c in zip(shape, chunks))


class DigestTable:
    """The expected digest of every chunk of one array, by position.

    Args:
        grid: chunks along each dimension.
        values: the digests, an int64 array of shape `grid` (`-1`: not
            recorded).
    """

    def __init__(self, grid: Sequence[int], values: Optional[np.ndarray] = None):
        self.grid: Tuple[int, ...] = tuple(int(g) for g in grid)
        if values is None:
            values = np.full(self.grid, _UNSET, dtype=np.int64)
        if values.shape != self.grid:
            raise ValueError(f"digest table of shape {values.shape}, grid {self.grid}")
        self.values = values

    @classmethod
    def for_shape(cls, shape: Sequence[int], chunks: Sequence[int]) -> DigestTable:
        """An empty table for an array of `shape` and `chunks`."""
        return cls(chunk_grid(shape, chunks))

    def grow(self, shape: Sequence[int], chunks: Sequence[int]) -> None:
        """Extend the table to an array grown to `shape` (recorded digests kept)."""
        grid = chunk_grid(shape, chunks)
        if grid == self.grid:
            return
        values = np.full(grid, _UNSET, dtype=np.int64)
        keep = tuple(slice(0, min(a, b)) for a, b in zip(grid, self.grid))
        values[keep] = self.values[keep]
        self.grid, self.values = grid, values

    def record(self, coords: Coords, values: np.ndarray) -> None:
        """Record the digest of chunk `coords` from the values written there."""
        self.values[tuple(coords)] = chunk_digest(values)

    def record_region(
        self, start: Sequence[int], values: np.ndarray, chunks: Sequence[int]
    ) -> None:
        """Record every chunk of a chunk-aligned region written at `start`.

        Args:
            start: the region's first index in each dimension (chunk-aligned).
            values: the values written (whole chunks, and edge chunks cut at
                the array's end).
            chunks: the array's chunk shape.
        """
        ranges = []
        for s, n, c in zip(start, values.shape, chunks):
            if s % c:
                raise ValueError(f"region start {tuple(start)} is not chunk-aligned")
            ranges.append(range(0, n, c))
        for offsets in itertools.product(*ranges):
            sel = tuple(slice(o, o + c) for o, c in zip(offsets, chunks))
            coords = tuple((s + o) // c for s, o, c in zip(start, offsets, chunks))
            self.record(coords, values[sel])

    def expected(self, coords: Coords) -> Optional[int]:
        """The recorded digest of chunk `coords` (`None` if never recorded)."""
        value = int(self.values[tuple(coords)])
        return None if value == _UNSET else value

    def matches(self, coords: Coords, values: np.ndarray) -> bool:
        """Whether `values` are what was recorded for chunk `coords`."""
        want = self.expected(coords)
        return want is not None and want == chunk_digest(values)

    def missing(self) -> List[Coords]:
        """Chunks whose digest was never recorded."""
        return [tuple(int(i) for i in c) for c in np.argwhere(self.values == _UNSET)]

    def sha256(self) -> str:
        """SHA-256 of the table (what the manifest records)."""
        h = hashlib.sha256(repr(self.grid).encode())
        h.update(np.ascontiguousarray(self.values, dtype="<i8").tobytes())
        return h.hexdigest()


def place_mark(
    run_id: str, what: str, index: Tuple[int, ...], digests: Sequence[int]
) -> int:
    """The mark of a finished tile or factor group: a positive int64 digest of
    the run, the array, the place and the CRC-32C of the values written there.

    Example:
        >>> a = place_mark("run", "matrix", (0, 1), [123])
        >>> a > 0 and a != place_mark("run", "matrix", (1, 0), [123])
        True
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{run_id}|{what}|{tuple(int(i) for i in index)}|".encode())
    h.update(",".join(str(int(d)) for d in digests).encode())
    return int.from_bytes(h.digest(), "little") % (2**62) + 1
