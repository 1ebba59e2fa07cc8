"""[CheckedMatrix][pydvl_datainf.scoring.checked_matrix.CheckedMatrix]: an influence
matrix on disk, read only through checked tiles.

This is what [MatrixResult.array][pydvl_datainf.scoring.matrix.MatrixResult]
hands out. Indexing it reads the tiles that the selection touches, each one
checked (it exists, passes its checksum, and is the tile this run wrote at
that place), so a missing or misplaced tile raises instead of reading as
zeros or as another tile.

Example:
    ```python
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from pydvl_datainf import DataInfInfluence, influence_matrix

    model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    infl = DataInfInfluence(model, loss).fit(DataLoader(TensorDataset(x, y), 10))
    result = influence_matrix(infl, (x[:6], y[:6]), "checked.zarr", test_rows=4,
                              train_rows=8, overwrite=True)
    block = result.array[1:5, 10:20]       # numpy, read from checked tiles
    assert block.shape == (4, 10)
    assert result.array.shape == (6, 30)
    ```
"""

from __future__ import annotations

from typing import Any, Iterator, Tuple, Union

import numpy as np

from .tiles import TileOutput, read_marks

__all__ = ["CheckedMatrix"]

Index = Union[int, slice, Tuple[Union[int, slice], ...]]


def _bounds(index: Union[int, slice], size: int) -> Tuple[int, int, bool]:
    """`(start, stop, squeeze)` of a basic index along one axis (step 1)."""
    if isinstance(index, (int, np.integer)):
        i = int(index) + (size if index < 0 else 0)
        if not 0 <= i < size:
            raise IndexError(f"index {index} is out of range for size {size}")
        return i, i + 1, True
    if isinstance(index, slice):
        start, stop, step = index.indices(size)
        if step != 1:
            raise IndexError("only slices with step 1 are supported")
        return start, max(start, stop), False
    raise IndexError(f"unsupported index {index!r}: use integers and slices")


class CheckedMatrix:
    """A read-only `(n_test, n_train)` array over an influence-matrix output.

    Supports `shape`, `dtype`, `chunks`, `ndim`, `len()`, basic indexing
    (integers and step-1 slices, returning numpy arrays) and
    [iter_tiles][pydvl_datainf.scoring.checked_matrix.CheckedMatrix.iter_tiles].
    The underlying Zarr array, which does *not* check tiles (Zarr reads a
    missing tile as zeros), is
    [unchecked_zarr][pydvl_datainf.scoring.checked_matrix.CheckedMatrix.unchecked_zarr]:
    do not read scores through it.

    Args:
        output: the output, opened for reading.
    """

    def __init__(self, output: TileOutput):
        self.output = output
        lay = output.layout
        self.shape: Tuple[int, int] = (lay.n_test, lay.n_train)
        self.chunks: Tuple[int, int] = (lay.test_rows, lay.train_rows)
        self.dtype = np.dtype(lay.dtype)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (
            f"CheckedMatrix({self.output.path!r}, shape={self.shape}, "
            f"dtype={self.dtype.name})"
        )

    @property
    def unchecked_zarr(self) -> Any:
        """The Zarr array itself. Its reads are **not** checked: a missing
        tile reads as zeros, a misplaced one as its values. For inspection
        only; read scores through this object."""
        return self.output.array

    def __getitem__(self, index: Index) -> np.ndarray:
        rows, cols = index if isinstance(index, tuple) else (index, slice(None))
        r0, r1, squeeze_r = _bounds(rows, self.shape[0])
        c0, c1, squeeze_c = _bounds(cols, self.shape[1])
        out = np.empty((r1 - r0, c1 - c0), dtype=self.dtype)
        tr, tc = self.chunks
        marks = read_marks(self.output.group["done"])
        for g in range(r0 // tr, -(-r1 // tr)):
            for c in range(c0 // tc, -(-c1 // tc)):
                tile = self.output.read(g, c, marks)
                gr0, gc0 = g * tr, c * tc
                lo_r, hi_r = max(r0, gr0), min(r1, gr0 + tile.shape[0])
                lo_c, hi_c = max(c0, gc0), min(c1, gc0 + tile.shape[1])
                out[lo_r - r0 : hi_r - r0, lo_c - c0 : hi_c - c0] = tile[
                    lo_r - gr0 : hi_r - gr0, lo_c - gc0 : hi_c - gc0
                ]
        if squeeze_r and squeeze_c:
            return out[0, 0]
        if squeeze_r:
            return out[0]
        if squeeze_c:
            return out[:, 0]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        full = self[:, :]
        return full if dtype is None else full.astype(dtype)

    def iter_tiles(self) -> Iterator[Tuple[int, int, np.ndarray]]:
        """`(first_row, first_column, tile)` for every tile, row by row, checked."""
        marks = read_marks(self.output.group["done"])
        lay = self.output.layout
        for g in range(lay.n_groups):
            for c in range(lay.n_chunks):
                yield (
                    g * lay.test_rows,
                    c * lay.train_rows,
                    self.output.read(g, c, marks),
                )
