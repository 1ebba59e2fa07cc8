r"""The DataInf operator: $R$ applied chunk by chunk, scores streamed over chunks.

[DataInfOperator][pydvl_datainf.operator.DataInfOperator] holds a fitted state
(training gradients in a store, their per-block squared norms and
$\lambda_l$) and is the only code that loops over chunks of training
gradients. Everything that needs $R\,v$ or $F G^\top$ goes through it: the
pyDVL model, the influence matrix, top-k, self-influence and the executors.

With $c_l(v) = \sum_i \frac{g_{il}^\top v}{\lambda_l + \lVert g_{il}\rVert^2}
g_{il}$,

$$
R_l v = \frac{1}{\lambda_l}\Big(v - \frac{1}{n} c_l(v)\Big).
$$

The sum $c_l$ is additive over chunks of training rows, which is the seam
executors use:

* **map**: [corrections][pydvl_datainf.operator.DataInfOperator.corrections]
  sums $c_l$ over some chunks (one partition);
* **reduce**: partial sums are added in a fixed binary tree
  ([tree_reduce][pydvl_datainf.operator.tree_reduce]) over fixed
  partitions ([partitions][pydvl_datainf.operator.DataInfOperator.partitions]),
  so the result does not depend on how many workers ran the map steps;
* **finish**: [finish][pydvl_datainf.operator.DataInfOperator.finish] turns
  the total into $R_l v$.

[apply][pydvl_datainf.operator.DataInfOperator.apply] runs all three locally
with the same partitions and tree, so a local run and a Dask run give the
same bits.

Store reads overlap with computation: a background thread reads chunk $k+1$
while chunk $k$ is multiplied ([prefetch][pydvl_datainf.operator.prefetch]).

Example:
    ```python
    import torch
    from pydvl_datainf.operator import DataInfOperator
    from pydvl_datainf.state import FittedState

    state = FittedState.from_gradients({"w": torch.randn(100, 8)})
    op = DataInfOperator(state, chunk_rows=32)
    factors = op.apply({"w": torch.randn(3, 8)})   # R v, (3, 8)
    scores = op.scores(factors)                     # (3, 100) influences
    ```
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections import OrderedDict
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import torch
from tqdm.auto import tqdm

from . import formula
from .state import FittedState
from .storage import default_chunk_rows

__all__ = [
    "DataInfOperator",
    "DEFAULT_PARTITIONS",
    "DEFAULT_SELF_BUDGET",
    "chunk_partitions",
    "prefetch",
    "tree_reduce",
    "tile_product",
    "aligned",
]

logger = logging.getLogger(__name__)


Blockwise = Dict[str, torch.Tensor]
T = TypeVar("T")

# M_l per store, for the λ it was built with (see DataInfOperator.curvature)
_CURVATURE: weakref.WeakKeyDictionary[Any, Tuple[Any, Blockwise]] = (
    weakref.WeakKeyDictionary()
)
_CURVATURE_LOCK = threading.Lock()

DEFAULT_PARTITIONS = 8
"""Training chunks are split into at most this many contiguous partitions,
whatever the number of workers; partial sums over partitions are added in a
fixed binary tree. Fixing both makes results bit-identical across executors and
worker counts."""

DEFAULT_SELF_BUDGET = 2**30
"""Bytes of $d_l \\times d_l$ matrices `self_scores(method="auto")` may hold."""

# ----------------------------------------------------------------- helpers
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate `items` with the next `depth` items produced in a background thread.

    Reading a chunk from a store (disk, object storage, decompression) then
    overlaps with the computation on the previous chunk. Exceptions raised by
    the producer are re-raised in the consumer; closing the iterator early
    stops the thread after at most `depth` more items.

    Args:
        items: any iterable (e.g. a store's `iter_chunks`).
        depth: how many items may be read ahead (`0` disables the thread).

    Example:
        >>> list(prefetch(range(4)))
        [0, 1, 2, 3]
    """
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((True, _DONE))
        except BaseException as e:  # handed to the consumer
            q.put((False, e))

    thread = threading.Thread(target=produce, name="datainf-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
            del item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def tree_reduce(
    leaves: Union[Sequence[T], Iterable[T]], n: int, add: Callable[[T, T], T]
) -> T:
    """Sum `n` leaves, consumed in order, in a fixed balanced binary tree.

    The tree only depends on `n`: leaves `[lo, hi)` are split at
    `(lo + hi) // 2`. Leaves are consumed lazily, so at most about
    `log2(n)` partial sums are held at once. The Dask executor builds the
    same tree out of tasks.

    Args:
        leaves: the partial sums, in partition order.
        n: how many leaves.
        add: how to add two partial sums.

    Example:
        >>> tree_reduce([1, 2, 3], 3, lambda a, b: a + b)
        6
    """
    if n <= 0:
        raise ValueError("tree_reduce needs at least one leaf")
    it = iter(leaves)

    def rec(lo: int, hi: int) -> T:
        if hi - lo == 1:
            return next(it)
        mid = (lo + hi) // 2
        left = rec(lo, mid)
        return add(left, rec(mid, hi))

    return rec(0, n)


def chunk_partitions(
    n_chunks: int, partitions: Optional[int] = None
) -> List[List[int]]:
    """Contiguous, near-equal partitions of `range(n_chunks)`; none empty.

    Example:
        >>> chunk_partitions(5, 2)
        [[0, 1], [2, 3, 4]]
    """
    p = DEFAULT_PARTITIONS if partitions is None else int(partitions)
    if p <= 0:
        raise ValueError(f"partitions must be positive, got {partitions}")
    p = max(1, min(p, n_chunks))
    bounds = [(i * n_chunks) // p for i in range(p + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(p)]


def add_blockwise(a: Blockwise, b: Blockwise) -> Blockwise:
    """`{k: a[k] + b[k]}`, in `a`'s block order (adds into `a`)."""
    for k in a:
        a[k] += b[k]
    return a


_ALIGN = 16


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied only if its data are not 16-byte aligned (or not contiguous).

    BLAS kernels (MKL in particular) take other code paths for unaligned
    operands and round differently, so the same numbers at another address
    could give other bits. Buffers deserialized on a Dask worker are often
    8-byte aligned; torch and numpy allocate 16-byte aligned memory, so on
    the hot path this is a pointer check, not a copy.

    Example:
        >>> aligned(torch.ones(3)).data_ptr() % 16
        0
    """
    if t.device.type == "cpu" and (t.data_ptr() % _ALIGN or not t.is_contiguous()):
        return t.contiguous().clone()
    return t


def tile_product(
    factors: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """$\\sum_l F_l G_l^\\top$: one tile of scores, in the factors' dtype.

    Gradients already in the factors' dtype and device are used as they are
    (no copy); the transposes are views that BLAS reads directly.

    Args:
        factors: `{block: (m, d_l)}` test factors.
        grads: `{block: (k, d_l)}` training gradients.

    Returns:
        `(m, k)` tensor.

    Example:
        >>> f = {"w": torch.ones(2, 3)}
        >>> tile_product(f, {"w": torch.eye(3)})
        tensor([[1., 1., 1.],
                [1., 1., 1.]])
    """
    out: Optional[torch.Tensor] = None
    for k, f in factors.items():
        f = aligned(f)
        g = aligned(grads[k].to(device=f.device, dtype=f.dtype))
        if out is None:
            out = f @ g.T
        else:
            out.addmm_(f, g.T)
    if out is None:
        raise ValueError("tile_product needs at least one block")
    return out


# ----------------------------------------------------------------- operator
class DataInfOperator:
    r"""$R = \mathrm{diag}_l(R_l)$ of a fitted state, and scores against its rows.

    Args:
        state: a [FittedState][pydvl_datainf.state.FittedState].
        chunk_rows: training rows per chunk; default the store's own chunk
            rows (aligned reads), else about 64 MiB of gradients.
        partitions: number of fixed partitions of the training chunks for the
            map/reduce seam (default
            [DEFAULT_PARTITIONS][pydvl_datainf.operator.DEFAULT_PARTITIONS]).
        prefetch: chunks read ahead in a background thread (`0`: none).

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import DataInfInfluence
        from pydvl_datainf.operator import DataInfOperator

        model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
        x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
        infl = DataInfInfluence(model, loss).fit(DataLoader(TensorDataset(x, y), 10))
        op = DataInfOperator(infl.state)
        test_grads = infl.per_sample_gradients(x[:2], y[:2])
        f = op.apply(test_grads)        # {block: (m, d_l)}, R g_test
        scores = op.scores(f)           # (m, n), pyDVL sign
        s = op.self_scores()            # (n,), g_i^T R g_i
        assert scores.shape == (2, 30) and s.shape == (30,)
        assert torch.allclose(scores, infl.train_influences(x[:2], y[:2]))
        assert torch.allclose(scores.diagonal(), s[:2], rtol=1e-4)
        assert (s > 0).all()            # self-influence is positive
        ```
    """

    def __init__(
        self,
        state: FittedState,
        *,
        chunk_rows: Optional[int] = None,
        partitions: Optional[int] = None,
        prefetch: int = 1,
    ):
        self.state = state
        self.block_names: List[str] = list(state.regularization)
        for k, lam in state.regularization.items():
            if not float(lam) > 0:
                raise ValueError(
                    f"The regularization of block {k!r} must be positive, got {lam}"
                )
        if state.n <= 0:
            raise ValueError("The fitted state has no training rows")
        if chunk_rows is None:
            chunk_rows = state.store.chunk_rows
        if chunk_rows is None:
            item = torch.empty(0, dtype=state.dtype).element_size()
            chunk_rows = default_chunk_rows(item * int(sum(state.widths)))
        if int(chunk_rows) <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        self.chunk_rows = int(min(int(chunk_rows), state.n))
        self._partitions = partitions
        self.prefetch = int(prefetch)

    # ------------------------------------------------------------ layout
    @property
    def n(self) -> int:
        """Number of training rows."""
        return int(self.state.n)

    @property
    def n_chunks(self) -> int:
        """Number of training chunks of `chunk_rows` rows."""
        return -(-self.n // self.chunk_rows)

    def partitions(self) -> List[List[int]]:
        """The fixed partitions of training chunk ids used by the map/reduce seam.

        They depend only on the number of chunks and the `partitions` setting,
        never on the number of workers.
        """
        return chunk_partitions(self.n_chunks, self._partitions)

    def chunk_range(self, chunk_id: int) -> Tuple[int, int]:
        """Training rows `[start, stop)` of chunk `chunk_id`."""
        start = chunk_id * self.chunk_rows
        return start, min(self.n, start + self.chunk_rows)

    def iter_chunks(
        self, chunk_ids: Optional[Iterable[int]] = None, *, reuse_buffers: bool = True
    ) -> Iterator[Tuple[int, int, Dict[str, torch.Tensor]]]:
        """`(chunk_id, start, {block: (k, d_l)})` over the wanted chunks, read ahead.

        Args:
            chunk_ids: the chunks (all if `None`).
            reuse_buffers: let the store read into buffers used in rotation
                (a local, uncompressed Zarr store does): a yielded chunk is
                then valid only until the next one is requested; copy it to
                keep it. `False`: fresh memory for every chunk.
        """
        buffers = self.prefetch + 2 if reuse_buffers else 0
        return prefetch(
            self.state.store.iter_chunks(self.chunk_rows, chunk_ids, buffers),
            self.prefetch,
        )

    def _norms(self, k: str, start: int, like: torch.Tensor) -> torch.Tensor:
        s = self.state.squared_norms[k][start : start + len(like)]
        return aligned(s.to(device=like.device, dtype=like.dtype))

    # ------------------------------------------------------------ map / reduce
    def corrections(
        self,
        v: Mapping[str, torch.Tensor],
        chunk_ids: Optional[Iterable[int]] = None,
        *,
        progress: bool = False,
    ) -> Blockwise:
        r"""MAP step: $\sum_i \frac{g_{il}^\top v}{\lambda_l + \lVert g_{il}\rVert^2}\, g_{il}$.

        Summed, in chunk order, over the training chunks `chunk_ids` (all if
        `None`), in `v`'s dtype and on its device.

        Args:
            v: `{block: (m, d_l)}` vectors (e.g. test gradients).
            chunk_ids: training chunks to sum over.
            progress: show a progress bar.

        Returns:
            `{block: (m, d_l)}` partial corrections.
        """
        ids = None if chunk_ids is None else [sorted(set(chunk_ids))]
        return self._partial_corrections(v, ids, progress)[0]

    def _partial_corrections(
        self,
        v: Mapping[str, torch.Tensor],
        groups: Optional[List[List[int]]],
        progress: bool = False,
        desc: str = "DataInf corrections",
    ) -> List[Blockwise]:
        """One partial sum per group of chunks (`None`: one group of all)."""
        if groups is None:
            groups = [list(range(self.n_chunks))]
        return list(self._iter_partials(v, groups, progress, desc))

    def _iter_partials(
        self,
        v: Mapping[str, torch.Tensor],
        groups: Sequence[Sequence[int]],
        progress: bool = False,
        desc: str = "DataInf corrections",
    ) -> Iterator[Blockwise]:
        """One pass over the chunks of all `groups`, yielding each group's
        partial sum as soon as it is complete.

        Groups must be disjoint and in ascending chunk order (as the fixed
        partitions are), so only one partial sum is being filled at a time.
        """
        names = [k for k in self.block_names if k in v]
        if set(v) - set(names):
            raise KeyError(f"Unknown blocks {sorted(set(v) - set(names))}")
        owner = {c: i for i, g in enumerate(groups) for c in g}
        wanted = sorted(owner)
        if [owner[c] for c in wanted] != sorted(owner[c] for c in wanted):
            raise ValueError("groups of chunks must be in ascending chunk order")
        lam = self.state.regularization
        vs = {k: aligned(v[k]) for k in names}

        def fresh() -> Blockwise:
            return {k: torch.zeros_like(vs[k]) for k in names}

        idx, acc = 0, fresh()
        with tqdm(
            total=len(wanted), desc=desc, disable=not progress, leave=False
        ) as bar:
            for c, start, chunk in self.iter_chunks(wanted):
                while idx < owner[c]:
                    yield acc
                    idx, acc = idx + 1, fresh()
                for k in names:
                    vk = vs[k]
                    g = aligned(chunk[k].to(device=vk.device, dtype=vk.dtype))
                    acc[k] += formula.inverse_harmonic_mean_correction(
                        vk, g, self._norms(k, start, g), float(lam[k])
                    )
                bar.update()
        while idx < len(groups):
            yield acc
            idx += 1
            if idx < len(groups):
                acc = fresh()

    def reduce(self, parts: Sequence[Blockwise]) -> Blockwise:
        """REDUCE step: add partial corrections (in partition order) in the fixed tree."""
        return tree_reduce(list(parts), len(parts), add_blockwise)

    def finish(
        self, v: Mapping[str, torch.Tensor], corrections: Mapping[str, torch.Tensor]
    ) -> Blockwise:
        r"""$R_l v = (v - c_l / n) / \lambda_l$ from the total corrections."""
        lam = self.state.regularization
        return OrderedDict(
            (
                k,
                formula.finish_inverse_harmonic_mean(
                    v[k], corrections[k], self.n, float(lam[k])
                ),
            )
            for k in self.block_names
            if k in v
        )

    def apply(self, v: Mapping[str, torch.Tensor], progress: bool = False) -> Blockwise:
        r"""$R_l v_l$ per block, one pass over the training gradients.

        Corrections are summed per fixed partition and added in the fixed tree,
        exactly as an executor does, so this gives the same bits as a Dask run.

        Args:
            v: `{block: (m, d_l)}`; the result has `v`'s dtype and device.
            progress: show a progress bar.

        Returns:
            `{block: (m, d_l)}`, in block order.

        Example:
            ```python
            import torch
            from pydvl_datainf.operator import DataInfOperator
            from pydvl_datainf.state import FittedState

            g_train = torch.randn(50, 6, dtype=torch.float64)
            op = DataInfOperator(FittedState.from_gradients({"w": g_train}, 0.5))
            g_test = torch.randn(2, 6, dtype=torch.float64)
            factors = op.apply({"w": g_test})  # R g_test
            # R_l is a mean of inverses of rank-one updates of lambda * I
            r = sum(torch.linalg.inv(0.5 * torch.eye(6) + torch.outer(g, g))
                    for g in g_train.double()) / 50
            assert torch.allclose(factors["w"], g_test @ r)
            ```
        """
        parts = self.partitions()
        partials = self._iter_partials(v, parts, progress)
        total: Blockwise = tree_reduce(partials, len(parts), add_blockwise)
        return self.finish(v, total)

    # ------------------------------------------------------------ curvature
    def curvature(self, progress: bool = False) -> Blockwise:
        r"""$M_l = \frac1n\sum_i g_{il} g_{il}^\top / (\lambda_l + \lVert g_{il}\rVert^2)$
        per block, $(w_l, w_l)$ for rows of width $w_l$: one pass over the rows,
        then kept for this store and these $\lambda_l$.

        Worth it where the rows are narrow (compressed stores: $w_l = k_l$):
        with $M_l$, $R_l v = (v - M_l v)/\lambda_l$ needs no pass over the
        rows ([apply_curvature][pydvl_datainf.operator.DataInfOperator.apply_curvature]).
        It adds in another order than [apply][pydvl_datainf.operator.DataInfOperator.apply],
        so the factors agree with it to rounding, not bit for bit.

        Example:
            ```python
            import torch
            from pydvl_datainf.operator import DataInfOperator
            from pydvl_datainf.state import FittedState

            g = torch.randn(40, 5, dtype=torch.float64)
            op = DataInfOperator(FittedState.from_gradients({"w": g}, 0.3))
            v = {"w": torch.randn(3, 5, dtype=torch.float64)}
            fast = op.apply_curvature(v)
            assert torch.allclose(fast["w"], op.apply(v)["w"], rtol=1e-10)
            ```
        """
        lam = tuple(float(self.state.regularization[k]) for k in self.block_names)
        key = (lam, self.state.dtype, self.state.n)
        store = self.state.store
        with _CURVATURE_LOCK:
            kept = _CURVATURE.get(store)
            if kept is not None and kept[0] == key:
                return kept[1]
        acc = self.state.dtype
        sums: Dict[str, torch.Tensor] = {}
        norms = self.state.squared_norms
        for _, start, chunk in tqdm(
            self.iter_chunks(),
            total=self.n_chunks,
            desc="DataInf curvature",
            disable=not progress,
        ):
            for k, g in chunk.items():
                g = g.to(acc)
                w = 1.0 / (
                    float(self.state.regularization[k])
                    + norms[k][start : start + len(g)].to(g)
                )
                part = (g * w[:, None]).T @ g
                sums[k] = sums[k] + part if k in sums else part
        out = OrderedDict((k, sums[k] / self.n) for k in self.block_names)
        with _CURVATURE_LOCK:
            _CURVATURE[store] = (key, out)
        return out

    def apply_curvature(self, v: Mapping[str, torch.Tensor]) -> Blockwise:
        r"""$R_l v_l = (v_l - v_l M_l)/\lambda_l$ per block, from
        [curvature][pydvl_datainf.operator.DataInfOperator.curvature] ($M_l$ is
        symmetric)."""
        m = self.curvature()
        lam = self.state.regularization
        return OrderedDict(
            (
                k,
                formula.finish_inverse_harmonic_mean(
                    v[k], v[k] @ m[k].to(v[k]), 1, float(lam[k])
                ),
            )
            for k in self.block_names
            if k in v
        )

    # ------------------------------------------------------------ scores
    def tiles(
        self,
        factors: Mapping[str, torch.Tensor],
        chunk_ids: Optional[Iterable[int]] = None,
    ) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """`(chunk_id, start, F G_chunk^T)` over the wanted training chunks, in order.

        Args:
            factors: `{block: (m, d_l)}` test factors ($R\\,g_{test}$).
            chunk_ids: training chunks (all if `None`).

        Yields:
            the chunk id, its first training row, and the `(m, k)` scores.
        """
        for c, start, chunk in self.iter_chunks(chunk_ids):
            yield c, start, self.tile(factors, chunk)

    def tile(
        self, factors: Mapping[str, torch.Tensor], chunk: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Scores of the factors against one chunk of training gradients."""
        return tile_product(factors, chunk)

    def scores(
        self, factors: Mapping[str, torch.Tensor], progress: bool = False
    ) -> torch.Tensor:
        """`(m, n)`: all tiles, in memory (pyDVL sign)."""
        first = next(iter(factors.values()))
        out = torch.empty(len(first), self.n, dtype=first.dtype, device=first.device)
        with tqdm(
            total=self.n_chunks, desc="DataInf scores", disable=not progress
        ) as bar:
            for _, start, tile in self.tiles(factors):
                out[:, start : start + tile.shape[1]] = tile
                bar.update()
        return out

    def influences(
        self, test_grads: Mapping[str, torch.Tensor], progress: bool = False
    ) -> torch.Tensor:
        """`(m, n)` influences $g_{test}^\\top R\\, g_{train}$ (pyDVL sign)."""
        return self.scores(self.apply(test_grads, progress), progress)

    # ------------------------------------------------------------ self scores
    def self_scores(
        self,
        method: str = "auto",
        memory_budget: Optional[int] = None,
        progress: bool = False,
        dtype: Optional[torch.dtype] = None,
        device: Union[None, str, torch.device] = None,
    ) -> torch.Tensor:
        r"""Self-influences $g_i^\top R\, g_i$ of all training rows, without $n \times n$.

        With $w_j = 1/(\lambda_l + \lVert g_{jl}\rVert^2)$ and
        $M_l = \sum_j w_j\, g_{jl} g_{jl}^\top$,
        $g_{il}^\top R_l g_{il} = (\lVert g_{il}\rVert^2 - g_{il}^\top M_l
        g_{il} / n) / \lambda_l$.

        Args:
            method: `"gram"` builds each $d_l \times d_l$ matrix $M_l$ in one
                pass and evaluates the quadratic forms in a second;
                `"pairs"` sums $w_j (g_j^\top g_i)^2$ over pairs of chunks
                ($O(n^2 d_l)$, memory of two chunks); `"auto"` picks `gram`
                when all $M_l$ fit `memory_budget`.
            memory_budget: bytes for the $M_l$ (default 1 GiB).
            progress: show progress bars.
            dtype: compute dtype (default: the squared norms' dtype).
            device: compute device (default: the squared norms' device).

        Returns:
            `(n,)` self-influences (positive).
        """
        first = next(iter(self.state.squared_norms.values()))
        acc = dtype or first.dtype
        dev = torch.device(device) if device is not None else first.device
        item = torch.empty(0, dtype=acc).element_size()
        sizes = self._block_sizes()
        if method == "auto":
            budget = DEFAULT_SELF_BUDGET if memory_budget is None else memory_budget
            method = (
                "gram"
                if sum(d * d for d in sizes.values()) * item <= int(budget)
                else "pairs"
            )
        if method not in ("gram", "pairs"):
            raise ValueError(
                f"method must be 'auto', 'gram' or 'pairs', got {method!r}"
            )
        n, lam = self.n, self.state.regularization
        norms = {
            k: self.state.squared_norms[k].to(device=dev, dtype=acc)
            for k in self.block_names
        }
        quad = {k: torch.zeros(n, dtype=acc, device=dev) for k in self.block_names}

        def cast(chunk: Mapping[str, torch.Tensor], k: str) -> torch.Tensor:
            return chunk[k].to(device=dev, dtype=acc)

        if method == "gram":
            M = {k: torch.zeros(d, d, dtype=acc, device=dev) for k, d in sizes.items()}
            for _, start, chunk in tqdm(
                self.iter_chunks(),
                total=self.n_chunks,
                desc="self-influence (1/2)",
                disable=not progress,
            ):
                for k in self.block_names:
                    g = cast(chunk, k)
                    w = 1.0 / (float(lam[k]) + norms[k][start : start + len(g)])
                    M[k].addmm_((g * w[:, None]).T, g)
            for _, start, chunk in tqdm(
                self.iter_chunks(),
                total=self.n_chunks,
                desc="self-influence (2/2)",
                disable=not progress,
            ):
                for k in self.block_names:
                    g = cast(chunk, k)
                    quad[k][start : start + len(g)] = ((g @ M[k]) * g).sum(1)
        else:
            if not self.state.store.random_access:
                logger.warning(
                    "self-influence with method='pairs' on a %s replays the training "
                    "data once per chunk: %d passes",
                    type(self.state.store).__name__,
                    self.n_chunks,
                )
            for _, si, ci in tqdm(
                self.iter_chunks(),
                total=self.n_chunks,
                desc="self-influence",
                disable=not progress,
            ):
                for _, sj, cj in self.iter_chunks():
                    for k in self.block_names:
                        gi, gj = cast(ci, k), cast(cj, k)
                        w = 1.0 / (float(lam[k]) + norms[k][sj : sj + len(gj)])
                        quad[k][si : si + len(gi)] += ((gi @ gj.T) ** 2 * w).sum(1)
        out = torch.zeros(n, dtype=acc, device=dev)
        for k in self.block_names:
            out += (norms[k] - quad[k] / n) / float(lam[k])
        return out

    def _block_sizes(self) -> Dict[str, int]:
        return dict(zip(self.state.blocks.names, self.state.widths))
