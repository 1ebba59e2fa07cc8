"""Test data for scoring: batches in a fixed order, their digest, their gradients.

Scoring functions take test data as `(x_test, y_test)` tensors or as an
iterable of `(x, y)` batches (a DataLoader). The data are read twice: once to
count and digest the rows, once to compute their gradients. A loader must
therefore yield the same rows in the same order every time: a DataLoader with
a shuffling sampler is refused up front, and any other change of order
between the two passes raises an error naming the first row that moved.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Set,
    Tuple,
    Union,
    cast,
)

import torch
from torch.utils.data import DataLoader, SequentialSampler

from ..rows import row_digests

__all__ = [
    "TestData",
    "ScannedTestData",
    "GradientFn",
    "ShuffledTestDataError",
    "check_test_order",
    "iter_test_batches",
    "mean_test_gradient",
    "scan_test_data",
    "group_test_grads",
]

TestData = Union[
    Tuple[torch.Tensor, torch.Tensor], Iterable[Tuple[torch.Tensor, torch.Tensor]]
]
"""`(x_test, y_test)` tensors, or an iterable of `(x, y)` batches (a DataLoader).
A loader must yield the same data in the same order every time it is iterated:
shuffling loaders are refused."""

Blockwise = Dict[str, torch.Tensor]
GradientFn = Callable[[torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]]
"""`(x, y) -> {block: (b, d_l)}` per-sample gradients (the model's
`per_sample_gradients`)."""


class ShuffledTestDataError(ValueError):
    """Test data that do not come in a fixed order."""


def _is_tensor_pair(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
        and data[0].ndim >= 1
        and len(data[0]) == len(data[1])
    )


def check_test_order(data: Any) -> None:
    """Refuse a DataLoader whose sampler is not sequential (e.g. `shuffle=True`).

    Rows of the influence matrix follow the order of the test data, so it must
    be the same on every pass.

    Raises:
        ShuffledTestDataError: naming the sampler and the fix.

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf.scoring.inputs import ShuffledTestDataError, check_test_order

        ds = TensorDataset(torch.randn(8, 2), torch.zeros(8))
        check_test_order(DataLoader(ds, batch_size=4))  # fine
        try:
            check_test_order(DataLoader(ds, shuffle=True))
        except ShuffledTestDataError as e:
            print(e)  # names the sampler and the fix
        else:
            raise AssertionError("a shuffling loader was accepted")
        ```
    """
    if isinstance(data, DataLoader):
        sampler = data.sampler
        batch_sampler = data.batch_sampler
        inner = getattr(batch_sampler, "sampler", None)
        if not isinstance(sampler, SequentialSampler) or (
            batch_sampler is not None and not isinstance(inner, SequentialSampler)
        ):
            raise ShuffledTestDataError(
                f"The test DataLoader uses a {type(sampler).__name__}, which may "
                f"change the order of the test points between passes; rows of the "
                f"result follow that order. Pass a loader with shuffle=False (a "
                f"SequentialSampler)."
            )


def iter_test_batches(
    data: TestData, batch_size: int
) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
    """`(offset, x, y)` over the test data, skipping empty batches."""
    if _is_tensor_pair(data):
        xs, ys = cast(Tuple[torch.Tensor, torch.Tensor], data)
        for i in range(0, len(xs), batch_size):
            yield i, xs[i : i + batch_size], ys[i : i + batch_size]
        return
    check_test_order(data)
    offset = 0
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                "Test data must be (x_test, y_test) tensors or an iterable of (x, y) "
                f"batches, got an item of type {type(batch).__name__}"
            )
        x, y = batch
        if len(x) != len(y):
            raise ValueError(
                f"A test batch has {len(x)} inputs but {len(y)} labels; they must match"
            )
        if len(x) == 0:
            continue
        yield offset, x, y
        offset += len(x)


@dataclass
class ScannedTestData:
    """What a first pass over the test data found.

    Attributes:
        n: number of test rows.
        digest: SHA-256 over the rows' digests (independent of batching).
        rows: the digest of each row, in order (to check the second pass).
    """

    n: int
    digest: str
    rows: List[bytes] = field(repr=False, default_factory=list)


def scan_test_data(data: TestData, batch_size: int) -> ScannedTestData:
    """Count and digest the test rows (batching-independent)."""
    h = hashlib.sha256()
    rows: List[bytes] = []
    for _, x, y in iter_test_batches(data, batch_size):
        for d in row_digests(x, y):
            h.update(d)
            rows.append(d)
    return ScannedTestData(len(rows), h.hexdigest(), rows)


def _check_same_rows(scan: ScannedTestData, offset: int, x: Any, y: Any) -> None:
    got = row_digests(x, y)
    want = scan.rows[offset : offset + len(got)]
    if got != want:
        moved = next(
            (offset + i for i, (a, b) in enumerate(zip(got, want)) if a != b),
            offset + len(want),
        )
        raise ShuffledTestDataError(
            f"The test data changed order (or content) between two passes: row "
            f"{moved} differs. Pass tensors or a loader that yields the same rows "
            f"in the same order every time (shuffle=False)."
        )


def group_test_grads(
    gradients: GradientFn,
    data: TestData,
    batch_size: int,
    test_rows: int,
    scan: ScannedTestData,
    pending: Set[int],
) -> Iterator[Tuple[int, Blockwise]]:
    """Test gradients of each pending group of `test_rows` rows, in order.

    Every batch read is checked against the first pass (`scan`), so a loader
    that changes order raises instead of scoring the wrong rows.
    """
    parts: Dict[int, List[Blockwise]] = {}
    n_test = scan.n
    for offset, x, y in iter_test_batches(data, batch_size):
        first, last = offset // test_rows, (offset + len(x) - 1) // test_rows
        groups = [g for g in range(first, last + 1) if g in pending]
        if not groups:
            continue
        _check_same_rows(scan, offset, x, y)
        grads = gradients(x, y)
        for g in groups:
            lo = max(offset, g * test_rows)
            hi = min(offset + len(x), (g + 1) * test_rows)
            parts.setdefault(g, []).append(
                {k: v[lo - offset : hi - offset] for k, v in grads.items()}
            )
            if hi == min(n_test, (g + 1) * test_rows):
                chunks = parts.pop(g)
                yield g, {k: torch.cat([c[k] for c in chunks]) for k in grads}


def mean_test_gradient(
    gradients: GradientFn, data: TestData, batch_size: int, dtype: torch.dtype
) -> Tuple[int, Blockwise]:
    """`(n_test, {block: (1, d_l)})`: the mean test gradient, in `dtype`."""
    total: Dict[str, torch.Tensor] = {}
    n = 0
    for _, x, y in iter_test_batches(data, batch_size):
        for k, g in gradients(x, y).items():
            part = g.to(dtype).sum(0, keepdim=True)
            total[k] = total[k] + part if k in total else part
        n += len(x)
    return n, {k: t / max(n, 1) for k, t in total.items()}
