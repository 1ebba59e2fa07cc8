r"""Reductions of the influence matrix that never hold it: top-k, self-influence,
and the influence on the mean test loss.

All three stream through the [DataInfOperator][pydvl_datainf.operator.DataInfOperator]
(or read a stored matrix tile by tile, checked), so memory stays at a few
tiles whatever $n_{train}$.

Example:
    ```python
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from pydvl_datainf import (
        DataInfInfluence, mean_test_influence, self_influence, top_k)

    model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    infl = DataInfInfluence(model, loss).fit(DataLoader(TensorDataset(x, y), 16))
    x_test, y_test = torch.randn(8, 4), torch.randint(0, 3, (8,))
    val_loader = DataLoader(TensorDataset(x_test, y_test), batch_size=4)

    best = top_k(infl, 10, (x_test, y_test))       # computed on the fly
    s = self_influence(infl)                       # g_i^T R g_i, (n,)
    scores = mean_test_influence(infl, val_loader) # rank by -scores
    full = infl.train_influences(x_test, y_test)   # (8, 50), for comparison
    assert torch.allclose(best.values, full.topk(10).values)
    # a mean cancels: compare relative to the size of what was averaged
    scale = full.abs().max().item()
    assert torch.allclose(scores, full.mean(0), rtol=0, atol=1e-5 * scale)
    ```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config import parse_bytes
from ..errors import StoreMismatchError
from ..influence import DataInfInfluence
from ..operator import DataInfOperator
from .checked_matrix import CheckedMatrix
from .frames import top_k_frame
from .indexed import IndexChoice, top_k_indexed
from .inputs import TestData, group_test_grads, mean_test_gradient, scan_test_data
from .matrix import MatrixResult, check_sizes, default_test_rows
from .tiles import TileOutput, read_marks

__all__ = ["TopK", "top_k", "self_influence", "mean_test_influence"]


@dataclass
class TopK:
    """The `k` largest (or smallest) influences per test point.

    Attributes:
        values: `(n_test, k)` influences, sorted (descending for the most
            influential, ascending for the least).
        indices: `(n_test, k)` training rows (in the order of the fit pass).

    Example:
        ```python
        import torch
        from pydvl_datainf.scoring.reductions import TopK

        best = TopK(values=torch.tensor([[3.0, 2.0]]), indices=torch.tensor([[7, 1]]))
        rows, values = best.indices[0], best.values[0]  # for test point 0
        assert rows.tolist() == [7, 1]                  # the most helpful first
        ```
    """

    values: torch.Tensor
    indices: torch.Tensor

    def to_frame(self, train: Any = None, test: Any = None) -> pd.DataFrame:
        """The result as a table, one row per test row and rank (see
        [top_k_frame][pydvl_datainf.scoring.frames.top_k_frame]).

        Args:
            train: who the training rows are: a
                [DatasetBatches][pydvl_datainf.batches.DatasetBatches] (ids and
                text), a [RowInfo][pydvl_datainf.batches.RowInfo], a list of
                ids, or `None` (positions).
            test: who the test rows are, likewise.

        Example:
            ```python
            import torch
            from pydvl_datainf.scoring.reductions import TopK

            best = TopK(values=torch.tensor([[3.0, 2.0]]), indices=torch.tensor([[7, 1]]))
            table = best.to_frame()
            assert table["train_row"].tolist() == [7, 1]
            ```
        """
        return top_k_frame(self, train, test)


def _merge_top(
    best: Optional[Tuple[torch.Tensor, torch.Tensor]],
    values: torch.Tensor,
    start: int,
    k: int,
    largest: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(start, start + values.shape[1]).expand(values.shape[0], -1)
    if best is not None:
        values = torch.cat([best[0], values], dim=1)
        idx = torch.cat([best[1], idx], dim=1)
    kk = min(k, values.shape[1])
    v, pos = torch.topk(values, kk, dim=1, largest=largest, sorted=True)
    return v, torch.gather(idx, 1, pos)


def _stored_output(source: Any) -> TileOutput:
    if isinstance(source, MatrixResult):
        out = source.output()
    elif isinstance(source, CheckedMatrix):
        out = source.output
    elif isinstance(source, (str, os.PathLike)):
        out = TileOutput.open(os.fspath(source), "r")
    else:
        raise TypeError(
            "top_k needs a MatrixResult (or its .array), the path of an influence "
            "matrix, or a fitted DataInfInfluence with test_data; got "
            f"{type(source).__name__}. A bare Zarr array is refused: its reads "
            "are not checked (a missing tile would read as zeros)."
        )
    if not out.is_complete:
        raise StoreMismatchError(
            f"The influence matrix at {out.path!r} is incomplete; finish it with "
            f"influence_matrix(..., resume=True)"
        )
    out.check_complete()
    return out


def top_k(
    source: Any,
    k: int,
    test_data: Optional[TestData] = None,
    *,
    largest: bool = True,
    test_rows: Optional[int] = None,
    train_rows: Optional[int] = None,
    batch_size: int = 256,
    index: Optional[IndexChoice] = None,
    progress: bool = True,
) -> TopK:
    """The `k` most (or least) influential training points of every test point.

    From a stored matrix (a [MatrixResult][pydvl_datainf.scoring.matrix.MatrixResult]
    or its path), the matrix is read tile by tile, each tile checked. From a
    fitted [DataInfInfluence][pydvl_datainf.influence.DataInfInfluence] and
    `test_data`, tiles are computed on the fly and nothing $n_{test} \\times
    n_{train}$ is stored.

    Args:
        source: a [MatrixResult][pydvl_datainf.scoring.matrix.MatrixResult],
            its `array`, its path, or a fitted `DataInfInfluence`.
        k: how many training points per test point.
        test_data: required when `source` is a model.
        largest: `True` for the most helpful (largest pyDVL-sign influence),
            `False` for the most harmful.
        test_rows: test points per group (model source; default all that fit
            1 GiB of factors).
        train_rows: training rows per chunk (model source).
        batch_size: batch size for test gradients of tensor test data.
        index: model source: answer from a maximum-inner-product index over
            the stored rows instead of a pass over them (see
            [indexed][pydvl_datainf.scoring.indexed]): `True` (exact, saved
            beside a Zarr store), a directory, or
            [IndexOptions][pydvl_datainf.storage.index.IndexOptions] (e.g.
            approximate search). Default: the exact streaming top-k.
        progress: show a progress bar.

    Returns:
        [TopK][pydvl_datainf.scoring.reductions.TopK] with
        `(n_test, min(k, n_train))` values and training indices.

    Raises:
        StoreCorruptError: a missing or corrupt tile of a stored matrix.

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import DataInfInfluence, influence_matrix, top_k

        model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
        x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
        infl = DataInfInfluence(model, loss).fit(DataLoader(TensorDataset(x, y), 16))
        x_test, y_test = x[:3], y[:3]
        result = influence_matrix(infl, (x_test, y_test), "infl.zarr")

        helpful = top_k(result, 5)                  # from a stored matrix
        harmful = top_k(infl, 5, (x_test, y_test), largest=False)  # on the fly
        print(helpful.indices[0])  # training rows most helpful to test point 0
        assert torch.equal(top_k(infl, 5, (x_test, y_test)).indices, helpful.indices)
        assert (harmful.values[:, :1] <= helpful.values[:, -1:]).all()
        ```
    """
    check_sizes(k=k, batch_size=batch_size, test_rows=test_rows, train_rows=train_rows)
    if isinstance(source, DataInfInfluence):
        if test_data is None:
            raise ValueError("top_k on a model needs test_data")
        if index is not None and index is not False:
            found, ids = top_k_indexed(
                source,
                k,
                test_data,
                largest=largest,
                index=index,
                test_rows=test_rows,
                batch_size=batch_size,
                progress=progress,
            )
            return TopK(found, ids)
        return _top_k_model(
            source, k, test_data, largest, test_rows, train_rows, batch_size, progress
        )
    out = _stored_output(source)
    lay = out.layout
    marks = read_marks(out.group["done"])
    values, indices = [], []
    bar = tqdm(total=lay.n_tiles, desc="top-k", disable=not progress)
    for g in range(lay.n_groups):
        best = None
        for c in range(lay.n_chunks):
            block = torch.from_numpy(out.read(g, c, marks))
            best = _merge_top(best, block, c * lay.train_rows, k, largest)
            bar.update()
        assert best is not None
        values.append(best[0])
        indices.append(best[1])
    bar.close()
    return TopK(torch.cat(values), torch.cat(indices))


def _top_k_model(
    infl: DataInfInfluence,
    k: int,
    test_data: TestData,
    largest: bool,
    test_rows: Optional[int],
    train_rows: Optional[int],
    batch_size: int,
    progress: bool,
) -> TopK:
    state = infl.verified_state()
    op = DataInfOperator(state, chunk_rows=train_rows)
    row_bytes = int(sum(state.widths)) * state.dtype.itemsize
    scan = scan_test_data(test_data, batch_size)
    t_rows = test_rows or default_test_rows(scan.n, row_bytes, None)
    groups = set(range(-(-scan.n // t_rows)))
    values, indices = [], []
    for _, v in tqdm(
        group_test_grads(infl.gradients, test_data, batch_size, t_rows, scan, groups),
        total=len(groups),
        desc="top-k",
        disable=not progress,
    ):
        f = op.apply({key: t.to(state.dtype) for key, t in v.items()})
        best = None
        for _, start, tile in op.tiles(f):
            best = _merge_top(best, tile.cpu(), start, k, largest)
        assert best is not None
        values.append(best[0])
        indices.append(best[1])
    return TopK(torch.cat(values), torch.cat(indices))


def self_influence(
    influence: DataInfInfluence,
    *,
    method: str = "auto",
    memory_budget: Union[None, int, str] = None,
    progress: bool = True,
) -> torch.Tensor:
    r"""Self-influences $g_i^\top R\, g_i$ of all training points, without $n \times n$.

    With $w_j = 1/(\lambda_l + \lVert g_{jl}\rVert^2)$,

    $$
    g_{il}^\top R_l\, g_{il} = \frac{1}{\lambda_l}\Big(\lVert g_{il}\rVert^2
      - \frac{1}{n} g_{il}^\top M_l\, g_{il}\Big),\qquad
    M_l = \sum_j w_j\, g_{jl} g_{jl}^\top .
    $$

    `method="gram"` builds each $d_l \times d_l$ matrix $M_l$ in one pass and
    evaluates the quadratic forms in a second ($O(n d_l^2)$ time, $O(d_l^2)$
    memory). `method="pairs"` sums $w_j (g_j^\top g_i)^2$ over pairs of chunks
    ($O(n^2 d_l)$ time, memory of two chunks) for blocks too wide for $M_l$.
    `"auto"` uses `gram` when all $M_l$ fit `memory_budget` (default 1 GiB).

    Args:
        influence: a fitted `DataInfInfluence`.
        method: `"auto"`, `"gram"` or `"pairs"`.
        memory_budget: bytes (or e.g. `"2GB"`) for the $M_l$ in `"auto"`.
        progress: show progress bars.

    Returns:
        `(n_train,)` self-influences (pyDVL sign: positive), in the
        accumulation dtype, on the model's device.

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import DataInfInfluence, self_influence

        model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
        x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
        infl = DataInfInfluence(model, loss).fit(DataLoader(TensorDataset(x, y), 16))
        s = self_influence(infl)
        suspicious = torch.topk(s, 5).indices  # unusually self-influential rows
        assert torch.allclose(s, infl.influences(x, y, x, y).diagonal(), rtol=1e-4)
        ```
    """
    state = influence.verified_state()
    budget = parse_bytes(memory_budget, 2**30)
    return DataInfOperator(state).self_scores(
        method=method,
        memory_budget=budget,
        progress=progress,
        dtype=state.dtype,
    )


def mean_test_influence(
    influence: DataInfInfluence,
    test_data: TestData,
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    r"""Influence of every training point on the mean test loss.

    $s_i = \bar g_{test}^\top R\, g_i$ with $\bar g_{test}$ the mean test
    gradient: the mean over test points of a row of the influence matrix,
    computed with one test-gradient pass and two passes over the training
    gradients, whatever $n_{test}$. This is the paper's mislabel-detection
    score up to sign: in pyDVL's sign a *negative* score marks a training point
    whose up-weighting raises the test loss; rank by `-scores` to list likely
    mislabeled points first.

    Args:
        influence: a fitted `DataInfInfluence`.
        test_data: `(x_test, y_test)` or an iterable of `(x, y)` batches.
        batch_size: batch size for tensor test data.
        progress: show progress bars.

    Returns:
        `(n_train,)` scores in the accumulation dtype.

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import DataInfInfluence, mean_test_influence

        model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
        x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
        infl = DataInfInfluence(model, loss).fit(DataLoader(TensorDataset(x, y), 16))
        x_val, y_val = torch.randn(10, 4), torch.randint(0, 3, (10,))
        val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=4)
        scores = mean_test_influence(infl, val_loader)
        likely_mislabeled = torch.argsort(scores)[:5]  # most harmful first
        full = infl.train_influences(x_val, y_val)
        scale = full.abs().max().item()  # a mean cancels: relative to the terms
        assert torch.allclose(scores, full.mean(0), rtol=0, atol=1e-5 * scale)
        ```
    """
    check_sizes(batch_size=batch_size)
    state = influence.verified_state()
    n_test, v = mean_test_gradient(
        influence.gradients, test_data, batch_size, state.dtype
    )
    if n_test == 0:
        raise ValueError("The test data are empty")
    op = DataInfOperator(state)
    return op.scores(op.apply(v, progress), progress)[0]
