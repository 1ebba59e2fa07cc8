r"""Top-k from a maximum-inner-product index over the stored training rows.

A DataInf score is $(R\,g_{test}) \cdot g_j$: $R$ acts on the query only. So
the most helpful training rows of a test point are the stored rows of largest
inner product with its factor $q = R\,g_{test}$ (blocks concatenated), which a
[MipsIndex][pydvl_datainf.storage.index.MipsIndex] over the rows answers
without a pass over the training rows. A new $\lambda$ changes the queries,
never the index. With compressed rows (see
[Compression][pydvl_datainf.projection.Compression]) the queries themselves
need no pass over the rows either: $R_l$ is applied through the $k_l \times
k_l$ matrix $M_l$, computed once per $\lambda$
([curvature][pydvl_datainf.operator.DataInfOperator.curvature]).

The index of a Zarr store is saved beside it (`<store>.index`), with a
marker, a checksum and the digest of the rows it indexes: it is reused while
the store is the same and rebuilt when the rows change. An in-memory store's
index lives in memory.

Example:
    ```python
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from pydvl_datainf import DataInfInfluence, top_k

    model, loss = torch.nn.Linear(8, 3), torch.nn.functional.cross_entropy
    x, y = torch.randn(200, 8), torch.randint(0, 3, (200,))
    infl = DataInfInfluence(model, loss, compression={"side": 2, "dense_k": 3},
                            progress=False).fit(DataLoader(TensorDataset(x, y), 50))
    fast = top_k(infl, 5, (x[:4], y[:4]), index=True, progress=False)
    exact = top_k(infl, 5, (x[:4], y[:4]), progress=False)
    assert torch.equal(fast.indices, exact.indices)
    ```
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..influence import DataInfInfluence
from ..operator import DataInfOperator
from ..state import FittedState
from ..storage import ZarrGradientStore
from ..storage.index import IndexOptions, MipsIndex, open_or_build, rows_digest
from .inputs import TestData, group_test_grads, scan_test_data

__all__ = ["IndexChoice", "top_k_indexed", "index_path", "DEFAULT_CURVATURE_BUDGET"]

IndexChoice = Union[bool, str, "os.PathLike[str]", IndexOptions]
"""`True` (an exact index, saved beside a Zarr store), a directory, or
[IndexOptions][pydvl_datainf.storage.index.IndexOptions] (saved beside a Zarr
store)."""

DEFAULT_CURVATURE_BUDGET = 256 * 2**20
"""Bytes of $M_l$ over all blocks below which queries go through them."""


def index_path(state: FittedState) -> Optional[str]:
    """Where the index of the state's rows is saved by default: beside its
    Zarr store (`None` for other stores)."""
    store = getattr(state.store, "resolved", state.store)
    if isinstance(store, ZarrGradientStore):
        return store.path.rstrip("/") + ".index"
    return None


def _rows(op: DataInfOperator, names: List[str]) -> Iterator[np.ndarray]:
    for _, _, chunk in op.iter_chunks(reuse_buffers=False):
        yield torch.cat([chunk[k].float() for k in names], dim=1).cpu().numpy()


def _digest(state: FittedState, op: DataInfOperator, names: List[str]) -> str:
    """What identifies the rows: the store's content digest where it has one."""
    store = getattr(state.store, "resolved", state.store)
    if isinstance(store, ZarrGradientStore):
        h = hashlib.sha256(store.content_digest().encode())
        h.update(repr(state.widths).encode())
        return h.hexdigest()
    return rows_digest(lambda: _rows(op, names))


def top_k_indexed(
    infl: DataInfInfluence,
    k: int,
    test_data: TestData,
    *,
    largest: bool = True,
    index: IndexChoice = True,
    test_rows: Optional[int] = None,
    batch_size: int = 256,
    curvature_budget: int = DEFAULT_CURVATURE_BUDGET,
    progress: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(values, indices)` of the top-k by an index (see module docs).

    Args:
        infl: a fitted model.
        k: how many training rows per test point.
        test_data: the test data.
        largest: the most helpful (`True`) or the most harmful.
        index: `True`, a directory, or index options.
        test_rows: test points per group of factors.
        batch_size: batch size for tensor test data.
        curvature_budget: bytes of $M_l$ below which queries use them
            (compressed stores only).
        progress: show a progress bar.

    Returns:
        `(n_test, min(k, n_train))` scores (the index's float32 inner
        products, in the state's dtype) and training row indices.
    """
    state = infl.verified_state()
    op = DataInfOperator(state)
    names = list(state.blocks.names)
    options = index if isinstance(index, IndexOptions) else IndexOptions()
    path: Optional[str]
    if isinstance(index, (str, os.PathLike)):
        path = os.fspath(index)
    else:
        path = index_path(state)
    digest = _digest(state, op, names)
    source: Any = lambda: _rows(op, names)  # noqa: E731 - a fresh pass each call
    mips = (
        open_or_build(path, source, options, digest)
        if path is not None
        else MipsIndex.build(source, options, digest)
    )
    item = torch.empty(0, dtype=state.dtype).element_size()
    small = sum(w * w for w in state.widths) * item <= curvature_budget
    use_curvature = state.projections is not None and small
    scan = scan_test_data(test_data, batch_size)
    row_bytes = int(sum(state.widths)) * item
    t_rows = test_rows or max(1, min(scan.n, (1 << 30) // max(1, 6 * row_bytes)))
    groups = set(range(-(-scan.n // t_rows)))
    kk = min(k, state.n)
    values, indices = [], []
    for _, v in tqdm(
        group_test_grads(infl.gradients, test_data, batch_size, t_rows, scan, groups),
        total=len(groups),
        desc="top-k (index)",
        disable=not progress,
    ):
        v = {key: t.to(state.dtype) for key, t in v.items()}
        f = op.apply_curvature(v) if use_curvature else op.apply(v)
        q = torch.cat([f[key] for key in names], dim=1)
        s, i = mips.search(q, kk, largest=largest)
        values.append(s.to(state.dtype))
        indices.append(i)
    return torch.cat(values), torch.cat(indices)
