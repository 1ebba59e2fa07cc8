r"""The full influence matrix, streamed to Zarr and resumable; top-k, self-influence
and the mean-test-loss score built on the same streams.

[influence_matrix][pydvl_datainf.matrix.influence_matrix] computes the
$(n_{test}, n_{train})$ matrix $I_{ji} = g_{test,j}^\top R\, g_{train,i}$ (pyDVL
sign) of a fitted [DataInfInfluence][pydvl_datainf.influence.DataInfInfluence]
in three steps:

1. **Factors.** Test gradients are computed once, in groups of `test_rows`
   rows that fit a memory budget, and each group's factors
   $f_j = R\, g_{test,j}$ are computed in one pass over the training gradients
   and written to the output group (`factors/<block>`).
2. **Stream.** The training gradients are read chunk by chunk
   (`train_rows` rows, aligned with the gradient store's chunks).
3. **Write.** Each tile $F_g G_c^\top$ (a test group against a training chunk)
   is one chunk of the output Zarr array, written whole, and only then
   marked done in a per-tile `done` array.

Peak memory is a few tiles, a group of factors and a chunk of gradients, not
$n$. With a Zarr or memory store a matrix costs one pass over the stored
gradients per factor group plus one to stream the tiles; with a
[RecomputeGradientStore][pydvl_datainf.stores.RecomputeGradientStore] it costs
exactly two passes of the training loader (one group of factors).

**Resume.** An existing output raises
[StoreExistsError][pydvl_datainf.errors.StoreExistsError] unless `resume=True`
(finish it) or `overwrite=True` (start again). On resume, done tiles and
factor groups are skipped; a tile whose process died while writing it has no
done mark and is recomputed, so the result is identical to an uninterrupted
run. The output records the weights, blocks, $\lambda_l$, $n$ and a digest of
the test data; resuming with anything else raises
[StoreMismatchError][pydvl_datainf.errors.StoreMismatchError].

Layout of the output group:

```
<path>/matrix        (n_test, n_train), chunks (test_rows, train_rows), `dtype`
<path>/done          (n_groups, n_chunks) uint8, one chunk per tile
<path>/factors/<i>   (n_test, d_i), the test factors of block i
<path>/factors_done  (n_groups,) uint8
```

Example:
    ```python
    from pydvl_datainf import DataInfInfluence, influence_matrix, top_k

    infl = DataInfInfluence(model, loss, store="zarr",
                            store_path="grads.zarr").fit(train_loader)
    result = influence_matrix(infl, test_loader, "influences.zarr")
    # killed? run the same line with resume=True
    best = top_k(result, k=10)          # most helpful training rows per test point
    ```
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
    cast,
)

import numpy as np
import torch
from tqdm.auto import tqdm

from . import formula
from .errors import StoreExistsError, StoreMismatchError
from .rows import row_digests
from .stores import (
    GradientStore,
    ZarrGradientStore,
    default_chunk_rows,
    library_version,
    open_zarr_group,
    zarr_group_exists,
)

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

    from .influence import DataInfInfluence

__all__ = [
    "TestData",
    "MatrixResult",
    "TopK",
    "influence_matrix",
    "top_k",
    "self_influence",
    "mean_test_influence",
]

logger = logging.getLogger(__name__)

TestData = Union[
    Tuple[torch.Tensor, torch.Tensor], Iterable[Tuple[torch.Tensor, torch.Tensor]]
]
"""`(x_test, y_test)` tensors, or an iterable of `(x, y)` batches (a DataLoader).
A loader must yield the same data in the same order every time it is iterated."""

Blockwise = Dict[str, torch.Tensor]

_FORMAT = "pydvl_datainf.influence_matrix"
_FORMAT_VERSION = 1
DEFAULT_FACTOR_BUDGET = 2**30
"""Default bytes of test gradients and factors held at once (1 GiB)."""
_MAX_TEST_ROWS = 8192
_OUT_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


# ----------------------------------------------------------------- results
@dataclass
class MatrixResult:
    """The output of [influence_matrix][pydvl_datainf.matrix.influence_matrix].

    Attributes:
        array: the `(n_test, n_train)` Zarr array.
        path: where the output group lives.
        n_test: number of test points (rows).
        n_train: number of training points (columns).
        test_rows: rows per tile (one factor group).
        train_rows: columns per tile (one chunk of training gradients).
        tiles: number of tiles.
        tiles_computed: tiles computed by this call.
        tiles_skipped: tiles found done (resume).
        factor_groups_computed: factor groups computed by this call.

    Example:
        ```python
        result = influence_matrix(infl, (x_test, y_test), "infl.zarr")
        row = result.array[0, :]     # influences on test point 0, numpy
        small = result.load()        # the whole matrix as a tensor
        ```
    """

    array: Any
    path: str
    n_test: int
    n_train: int
    test_rows: int
    train_rows: int
    tiles: int
    tiles_computed: int
    tiles_skipped: int
    factor_groups_computed: int

    def load(self) -> torch.Tensor:
        """The whole matrix as a tensor (only for matrices that fit in memory)."""
        return torch.from_numpy(np.asarray(self.array[:]))


@dataclass
class TopK:
    """The `k` largest (or smallest) influences per test point.

    Attributes:
        values: `(n_test, k)` influences, sorted (descending for the most
            influential, ascending for the least).
        indices: `(n_test, k)` training rows (in the order of the fit pass).

    Example:
        ```python
        best = top_k(result, 3)
        best.indices[0], best.values[0]  # 3 most helpful rows for test point 0
        ```
    """

    values: torch.Tensor
    indices: torch.Tensor


# ----------------------------------------------------------------- helpers
def _fitted(infl: DataInfInfluence) -> GradientStore:
    infl._check_ready()
    assert infl.store is not None
    return infl.store


def _acc_dtype(infl: DataInfInfluence) -> torch.dtype:
    from .gradients import accumulation_dtype

    return accumulation_dtype(next(iter(infl.params.values())).dtype)


def _out_dtype(dtype: Union[str, np.dtype, torch.dtype, type]) -> str:
    if isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    else:
        try:
            name = np.dtype(dtype).name  # type: ignore[arg-type]
        except TypeError:
            name = str(dtype)
    if name not in _OUT_DTYPES:
        raise ValueError(
            f"The matrix dtype must be a float type {list(_OUT_DTYPES)}, got {dtype!r}"
        )
    return name


def _is_tensor_pair(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
        and data[0].ndim >= 1
        and len(data[0]) == len(data[1])
        and not isinstance(data[0], (tuple, list))
    )


def _test_batches(
    data: TestData, batch_size: int
) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
    """`(offset, x, y)` over the test data."""
    offset = 0
    if _is_tensor_pair(data):
        xs, ys = cast(Tuple[torch.Tensor, torch.Tensor], data)
        for i in range(0, len(xs), batch_size):
            yield i, xs[i : i + batch_size], ys[i : i + batch_size]
        return
    for batch in data:  # type: ignore[union-attr]
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


def _scan_test_data(data: TestData, batch_size: int) -> Tuple[int, str]:
    """Number of test rows and a digest of their content (batching-independent)."""
    h = hashlib.sha256()
    n = 0
    for _, x, y in _test_batches(data, batch_size):
        for d in row_digests(x, y):
            h.update(d)
        n += len(x)
    return n, h.hexdigest()


def _group_test_grads(
    infl: DataInfInfluence,
    data: TestData,
    batch_size: int,
    test_rows: int,
    n_test: int,
    pending: Set[int],
) -> Iterator[Tuple[int, Blockwise]]:
    """Test gradients of each pending group of `test_rows` rows, in order."""
    parts: Dict[int, List[Blockwise]] = {}
    for offset, x, y in _test_batches(data, batch_size):
        first, last = offset // test_rows, (offset + len(x) - 1) // test_rows
        groups = [g for g in range(first, last + 1) if g in pending]
        if not groups:
            continue
        grads = infl._grads(x, y)
        for g in groups:
            lo, hi = (
                max(offset, g * test_rows),
                min(offset + len(x), (g + 1) * test_rows),
            )
            parts.setdefault(g, []).append(
                {k: v[lo - offset : hi - offset] for k, v in grads.items()}
            )
            if hi == min(n_test, (g + 1) * test_rows):
                chunks = parts.pop(g)
                yield g, {k: torch.cat([c[k] for c in chunks]) for k in grads}


def _corrections(
    infl: DataInfInfluence,
    store: GradientStore,
    v: Blockwise,
    train_rows: int,
    progress: bool,
    desc: str,
) -> Blockwise:
    """$\\sum_i \\frac{g_i^\\top v}{\\lambda + \\|g_i\\|^2} g_i$ per block, one pass."""
    corrections = {k: torch.zeros_like(t) for k, t in v.items()}
    n_chunks = -(-infl.n_train // train_rows)
    for _, start, chunk in tqdm(
        store.iter_chunks(train_rows),
        total=n_chunks,
        desc=desc,
        disable=not progress,
        leave=False,
    ):
        for k, vk in v.items():
            g = chunk[k].to(device=vk.device, dtype=vk.dtype)
            s = infl.squared_norms[k][start : start + len(g)].to(g)
            corrections[k] += formula.inverse_harmonic_mean_correction(
                vk, g, s, infl.block_regularization[k]
            )
    return corrections


def _finish(infl: DataInfInfluence, v: Blockwise, corrections: Blockwise) -> Blockwise:
    return {
        k: formula.finish_inverse_harmonic_mean(
            v[k], corrections[k], infl.n_train, infl.block_regularization[k]
        )
        for k in v
    }


def tile_product(factors: Blockwise, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """$\\sum_l F_l G_l^\\top$: one tile of the matrix, in the factors' dtype.

    Args:
        factors: `{block: (m, d_l)}` test factors.
        grads: `{block: (k, d_l)}` training gradients (any float dtype).

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
        g = grads[k].to(device=f.device, dtype=f.dtype)
        part = f @ g.T
        out = part if out is None else out + part
    assert out is not None
    return out


def mark_done(done: Any, index: Tuple[int, ...]) -> None:
    """Record that the chunk at `index` is complete (after its data is written)."""
    done[index] = 1


def done_mask(done: Any) -> np.ndarray:
    """Which entries of a `done` array are marked; unreadable marks count as not
    done (a mark whose write was interrupted)."""
    try:
        return np.asarray(done[...]) == 1
    except Exception:  # a torn chunk: read the marks one by one
        out = np.zeros(done.shape, dtype=bool)
        for index in np.ndindex(*done.shape):
            try:
                out[index] = int(done[index]) == 1
            except Exception:
                out[index] = False
        return out


def _identity(
    infl: DataInfInfluence,
    n_test: int,
    test_digest: str,
) -> Dict[str, Any]:
    assert infl._watch is not None
    return {
        "n_test": n_test,
        "n_train": infl.n_train,
        "block_names": list(infl.block_names),
        "block_sizes": list(infl.blocks.sizes),
        "weights_digest": infl._watch.digest,
        "regularization": {k: float(v) for k, v in infl.block_regularization.items()},
        "norm_sums": {k: float(v.sum()) for k, v in infl.squared_norms.items()},
        "test_digest": test_digest,
    }


def _check_identity(path: str, attrs: Mapping[str, Any], want: Mapping[str, Any]):
    bad = []
    for key, value in want.items():
        have = attrs.get(key)
        if isinstance(value, dict) and isinstance(have, dict):
            same = set(value) == set(have) and all(
                np.isclose(float(value[k]), float(have[k]), rtol=1e-6, atol=0)
                for k in value
            )
        else:
            same = have == value
        if not same:
            bad.append(key)
    if bad:
        what = {
            "weights_digest": "other weights",
            "test_digest": "other test data",
            "n_train": "another number of training points",
            "n_test": "another number of test points",
            "block_names": "other blocks",
            "block_sizes": "other blocks",
            "regularization": "other regularization",
            "norm_sums": "other training data",
            "dtype": "another dtype",
            "test_rows": "another test_rows",
            "train_rows": "another train_rows",
        }
        reasons = sorted({what.get(k, k) for k in bad})
        raise StoreMismatchError(
            f"The influence matrix at {path!r} was started with {', '.join(reasons)} "
            f"(differing: {bad}). Resume it with the same model, fit and test "
            f"data, or pass overwrite=True to start again."
        )


def _open_output(
    path: str,
    identity: Dict[str, Any],
    dtype: Optional[str],
    test_rows: Optional[int],
    train_rows: Optional[int],
    default_rows: Tuple[int, int],
    factor_dtype: torch.dtype,
    resume: bool,
    overwrite: bool,
    storage_options: Optional[Mapping[str, Any]],
) -> Any:
    exists = zarr_group_exists(path, storage_options)
    if exists and not (resume or overwrite):
        raise StoreExistsError(
            f"An influence matrix already exists at {path!r}. Pass resume=True to "
            f"finish it or overwrite=True to start again."
        )
    if exists and resume:
        group = open_zarr_group(path, "r+", storage_options)
        attrs = dict(group.attrs)
        if attrs.get("format") != _FORMAT:
            raise StoreMismatchError(
                f"The Zarr group at {path!r} is not a pydvl-datainf influence matrix "
                f"(format {attrs.get('format')!r}); pass overwrite=True to replace it"
            )
        want = dict(identity)
        if dtype is not None:
            want["dtype"] = dtype
        if test_rows is not None:
            want["test_rows"] = test_rows
        if train_rows is not None:
            want["train_rows"] = train_rows
        _check_identity(path, attrs, want)
        return group
    dtype = dtype or "float32"
    test_rows = test_rows or default_rows[0]
    train_rows = train_rows or default_rows[1]
    n_test, n_train = identity["n_test"], identity["n_train"]
    n_groups, n_chunks = -(-n_test // test_rows), -(-n_train // train_rows)
    group = open_zarr_group(path, "w", storage_options)
    group.attrs.update(
        {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "library_version": library_version(),
            "run_id": uuid.uuid4().hex,
            "complete": False,
            "dtype": dtype,
            "factor_dtype": str(factor_dtype).replace("torch.", ""),
            "test_rows": test_rows,
            "train_rows": train_rows,
            **identity,
        }
    )
    group.create_array(
        "matrix",
        shape=(n_test, n_train),
        chunks=(test_rows, train_rows),
        dtype=dtype,
        fill_value=0,
        compressors=None,
    )
    group.create_array(
        "done",
        shape=(n_groups, n_chunks),
        chunks=(1, 1),
        dtype="uint8",
        fill_value=0,
        compressors=None,
    )
    group.create_array(
        "factors_done",
        shape=(n_groups,),
        chunks=(1,),
        dtype="uint8",
        fill_value=0,
        compressors=None,
    )
    for i, d in enumerate(identity["block_sizes"]):
        group.create_array(
            f"factors/{i}",
            shape=(n_test, d),
            chunks=(test_rows, d),
            dtype=str(factor_dtype).replace("torch.", ""),
            fill_value=0,
            compressors=None,
        )
    return group


def read_factors(group: Any, block_names: Sequence[str], g: int) -> Blockwise:
    """The stored factors of test group `g`, per block."""
    rows = int(group.attrs["test_rows"])
    lo, hi = g * rows, min(int(group.attrs["n_test"]), (g + 1) * rows)
    return {
        k: torch.from_numpy(np.asarray(group[f"factors/{i}"][lo:hi]))
        for i, k in enumerate(block_names)
    }


def write_tile(group: Any, g: int, c: int, tile: torch.Tensor) -> None:
    """Write tile `(g, c)` (one Zarr chunk), then mark it done."""
    test_rows, train_rows = (
        int(group.attrs["test_rows"]),
        int(group.attrs["train_rows"]),
    )
    arr = group["matrix"]
    data = tile.detach().to("cpu").numpy().astype(arr.dtype, copy=False)
    arr[
        g * test_rows : g * test_rows + len(data),
        c * train_rows : c * train_rows + data.shape[1],
    ] = data
    mark_done(group["done"], (g, c))


def _parse_budget(budget: Union[None, int, str]) -> int:
    if budget is None:
        return DEFAULT_FACTOR_BUDGET
    if isinstance(budget, str):
        from dask.utils import parse_bytes

        return int(parse_bytes(budget))
    return int(budget)


def _default_test_rows(
    n_test: int, row_bytes: int, budget: Union[None, int, str]
) -> int:
    rows = max(1, _parse_budget(budget) // max(1, 3 * row_bytes))
    return int(max(1, min(n_test, rows, _MAX_TEST_ROWS)))


# ----------------------------------------------------------------- matrix
def influence_matrix(
    influence: DataInfInfluence,
    test_data: TestData,
    path: Union[str, os.PathLike],
    *,
    dtype: Union[None, str, np.dtype, torch.dtype, type] = None,
    resume: bool = False,
    overwrite: bool = False,
    test_rows: Optional[int] = None,
    train_rows: Optional[int] = None,
    factor_budget: Union[None, int, str] = None,
    batch_size: int = 256,
    client: Optional[Client] = None,
    storage_options: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
) -> MatrixResult:
    r"""Stream the $(n_{test}, n_{train})$ influence matrix into a Zarr array.

    Args:
        influence: a fitted [DataInfInfluence][pydvl_datainf.influence.DataInfInfluence].
        test_data: `(x_test, y_test)` tensors or an iterable of `(x, y)` batches
            (integer token ids are fine: the output dtype is `dtype`).
        path: local path or fsspec URL of the output Zarr group.
        dtype: float dtype of the stored matrix (`"float32"` by default, or
            the resumed matrix's; `"float64"`, `"float16"`), never the inputs'
            dtype. Products accumulate in the factors' dtype (float32, or
            float64 for float64 models).
        resume: finish an existing, interrupted matrix (the default layout and
            dtype are then taken from it).
        overwrite: replace an existing output.
        test_rows: rows per tile and per factor group; default: as many test
            points as fit `factor_budget` (at most 8192).
        train_rows: columns per tile; default the gradient store's chunk rows.
        factor_budget: bytes (or e.g. `"2GB"`) for one group of test
            gradients, corrections and factors (default 1 GiB).
        batch_size: batch size for test gradients when `test_data` are tensors.
        client: a `distributed.Client`: factor passes and tiles run as Dask
            tasks on its workers, which read the training gradients from the
            model's [ZarrGradientStore][pydvl_datainf.stores.ZarrGradientStore]
            and write tiles into `path` (both must be reachable by the workers).
        storage_options: fsspec options for `path`.
        progress: show progress bars.

    Returns:
        A [MatrixResult][pydvl_datainf.matrix.MatrixResult]; `result.array` is
        the matrix, pyDVL sign (positive = helpful).

    Raises:
        StoreExistsError: `path` exists and neither `resume` nor `overwrite`.
        StoreMismatchError: resuming a matrix started for other weights, blocks,
            $\lambda$, training or test data, dtype or tile sizes.
        StaleModelError: the model's weights changed since `fit`.

    Example:
        ```python
        result = influence_matrix(infl, (x_test, y_test), "infl.zarr")
        result.array.shape  # (len(x_test), infl.n_train)
        result = influence_matrix(infl, (x_test, y_test), "infl.zarr", resume=True)
        result.tiles_computed  # 0: nothing left to do
        ```
    """
    if resume and overwrite:
        raise ValueError("Pass resume=True or overwrite=True, not both")
    store = _fitted(influence)
    path = os.fspath(path)
    out_dtype = None if dtype is None else _out_dtype(dtype)
    n_test, test_digest = _scan_test_data(test_data, batch_size)
    if n_test == 0:
        raise ValueError("The test data are empty")
    acc = _acc_dtype(influence)
    row_bytes = influence.n_parameters * torch.empty(0, dtype=acc).element_size()
    default_train = min(
        influence.n_train, store.chunk_rows or default_chunk_rows(row_bytes)
    )
    default_test = _default_test_rows(n_test, row_bytes, factor_budget)
    identity = _identity(influence, n_test, test_digest)
    group = _open_output(
        path,
        identity,
        out_dtype,
        test_rows,
        train_rows,
        (default_test, default_train),
        acc,
        resume,
        overwrite,
        storage_options,
    )
    t_rows, c_rows = int(group.attrs["test_rows"]), int(group.attrs["train_rows"])
    n_groups, n_chunks = -(-n_test // t_rows), -(-influence.n_train // c_rows)
    names = list(influence.block_names)

    factors_done = done_mask(group["factors_done"])
    pending_groups = {g for g in range(n_groups) if not factors_done[g]}
    groups_computed = 0
    in_memory: Dict[int, Blockwise] = {}
    if pending_groups:
        if client is not None:
            from .distributed import distributed_corrections

            zstore = _require_zarr(store)
        for g, v in tqdm(
            _group_test_grads(
                influence, test_data, batch_size, t_rows, n_test, pending_groups
            ),
            total=len(pending_groups),
            desc="DataInf factors",
            disable=not progress,
        ):
            v = {k: t.to(acc) for k, t in v.items()}
            if client is not None:
                corr = distributed_corrections(
                    client,
                    zstore,
                    v,
                    dict(influence.block_regularization),
                    c_rows,
                )
            else:
                corr = _corrections(
                    influence, store, v, c_rows, progress, f"factors {g + 1}"
                )
            f = _finish(influence, v, corr)
            lo = g * t_rows
            for i, k in enumerate(names):
                group[f"factors/{i}"][lo : lo + len(f[k])] = f[k].detach().cpu().numpy()
            mark_done(group["factors_done"], (g,))
            groups_computed += 1
            if n_groups == 1:
                in_memory[g] = {k: t.detach().cpu() for k, t in f.items()}

    done = done_mask(group["done"])
    pending = [
        (g, c) for g in range(n_groups) for c in range(n_chunks) if not done[g, c]
    ]
    skipped = n_groups * n_chunks - len(pending)
    if skipped:
        logger.info(
            "Resuming %s: %d of %d tiles already done", path, skipped, done.size
        )
    if pending:
        if client is not None:
            from .distributed import distributed_tiles

            distributed_tiles(
                client, _require_zarr(store), path, storage_options, pending, progress
            )
        else:
            _local_tiles(influence, store, group, pending, in_memory, progress)
    group.attrs["complete"] = True
    return MatrixResult(
        array=group["matrix"],
        path=path,
        n_test=n_test,
        n_train=influence.n_train,
        test_rows=t_rows,
        train_rows=c_rows,
        tiles=n_groups * n_chunks,
        tiles_computed=len(pending),
        tiles_skipped=skipped,
        factor_groups_computed=groups_computed,
    )


def _require_zarr(store: GradientStore) -> ZarrGradientStore:
    if not isinstance(store, ZarrGradientStore):
        raise TypeError(
            "A distributed influence matrix needs the training gradients in a Zarr "
            "store that the workers can read: fit with store='zarr' and a "
            f"store_path on shared storage (got {type(store).__name__})."
        )
    return store


def _local_tiles(
    infl: DataInfInfluence,
    store: GradientStore,
    group: Any,
    pending: List[Tuple[int, int]],
    in_memory: Dict[int, Blockwise],
    progress: bool,
) -> None:
    names = list(infl.block_names)
    device = infl.device
    by_chunk: Dict[int, List[int]] = {}
    for g, c in pending:
        by_chunk.setdefault(c, []).append(g)
    c_rows = int(group.attrs["train_rows"])
    cached: Dict[int, Blockwise] = dict(in_memory)

    def factors(g: int) -> Blockwise:
        if g not in cached:
            if len(cached) >= 4:
                cached.pop(next(iter(cached)))
            cached[g] = read_factors(group, names, g)
        return {k: t.to(device) for k, t in cached[g].items()}

    bar = tqdm(total=len(pending), desc="DataInf matrix", disable=not progress)
    try:
        if store.random_access:
            by_group: Dict[int, List[int]] = {}
            for g, c in pending:
                by_group.setdefault(g, []).append(c)
            for g, cs in by_group.items():
                f = factors(g)
                for c, _, chunk in store.iter_chunks(c_rows, cs):
                    write_tile(group, g, c, tile_product(f, chunk))
                    bar.update()
                cached.pop(g, None)
        else:
            for c, _, chunk in store.iter_chunks(c_rows, by_chunk):
                for g in by_chunk[c]:
                    write_tile(group, g, c, tile_product(factors(g), chunk))
                    bar.update()
    finally:
        bar.close()


# ----------------------------------------------------------------- helpers
def _matrix_array(source: Any) -> Any:
    arr = source.array if isinstance(source, MatrixResult) else source
    if isinstance(arr, (str, os.PathLike)):
        group = open_zarr_group(arr, "r")
        if not group.attrs.get("complete"):
            raise StoreMismatchError(
                f"The influence matrix at {arr!r} is incomplete; finish it with "
                f"influence_matrix(..., resume=True)"
            )
        arr = group["matrix"]
    return arr


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


def top_k(
    source: Any,
    k: int,
    test_data: Optional[TestData] = None,
    *,
    largest: bool = True,
    test_rows: Optional[int] = None,
    train_rows: Optional[int] = None,
    batch_size: int = 256,
    progress: bool = True,
) -> TopK:
    """The `k` most (or least) influential training points of every test point.

    From a stored matrix (a [MatrixResult][pydvl_datainf.matrix.MatrixResult],
    its Zarr array, or its path), the matrix is read tile by tile. From a fitted
    [DataInfInfluence][pydvl_datainf.influence.DataInfInfluence] and
    `test_data`, tiles are computed on the fly and nothing $n_{test} \\times
    n_{train}$ is stored.

    Args:
        source: a matrix, or a fitted `DataInfInfluence`.
        k: how many training points per test point.
        test_data: required when `source` is a model.
        largest: `True` for the most helpful (largest pyDVL-sign influence),
            `False` for the most harmful.
        test_rows: test points per group (model source; default all that fit
            1 GiB of factors).
        train_rows: training rows per chunk (model source).
        batch_size: batch size for test gradients of tensor test data.
        progress: show a progress bar.

    Returns:
        [TopK][pydvl_datainf.matrix.TopK] with `(n_test, min(k, n_train))`
        values and training indices.

    Example:
        ```python
        helpful = top_k(result, 5)                  # from a stored matrix
        harmful = top_k(infl, 5, (x_test, y_test), largest=False)  # on the fly
        helpful.indices[0]  # training rows most helpful to test point 0
        ```
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    from .influence import DataInfInfluence

    if isinstance(source, DataInfInfluence):
        if test_data is None:
            raise ValueError("top_k on a model needs test_data")
        return _top_k_model(
            source, k, test_data, largest, test_rows, train_rows, batch_size, progress
        )
    arr = _matrix_array(source)
    n_test, n_train = arr.shape
    r_rows, c_rows = arr.chunks
    values, indices = [], []
    bar = tqdm(
        total=-(-n_test // r_rows) * -(-n_train // c_rows),
        desc="top-k",
        disable=not progress,
    )
    for r0 in range(0, n_test, r_rows):
        best = None
        for c0 in range(0, n_train, c_rows):
            block = torch.from_numpy(
                np.asarray(arr[r0 : r0 + r_rows, c0 : c0 + c_rows])
            )
            best = _merge_top(best, block, c0, k, largest)
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
    store = _fitted(infl)
    acc = _acc_dtype(infl)
    row_bytes = infl.n_parameters * torch.empty(0, dtype=acc).element_size()
    n_test, _ = _scan_test_data(test_data, batch_size)
    t_rows = test_rows or _default_test_rows(n_test, row_bytes, None)
    c_rows = train_rows or store.chunk_rows or default_chunk_rows(row_bytes)
    groups = set(range(-(-n_test // t_rows)))
    values, indices = [], []
    for _, v in tqdm(
        _group_test_grads(infl, test_data, batch_size, t_rows, n_test, groups),
        total=len(groups),
        desc="top-k",
        disable=not progress,
    ):
        v = {key: t.to(acc) for key, t in v.items()}
        f = _finish(infl, v, _corrections(infl, store, v, c_rows, False, "factors"))
        best = None
        for _, start, chunk in store.iter_chunks(c_rows):
            best = _merge_top(best, tile_product(f, chunk).cpu(), start, k, largest)
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
        memory_budget: bytes for the $M_l$ in `"auto"`.
        progress: show progress bars.

    Returns:
        `(n_train,)` self-influences (pyDVL sign: positive), in the
        accumulation dtype.

    Example:
        ```python
        s = self_influence(infl)
        suspicious = torch.topk(s, 20).indices  # unusually self-influential rows
        ```
    """
    store = _fitted(influence)
    acc = _acc_dtype(influence)
    item = torch.empty(0, dtype=acc).element_size()
    sizes = dict(zip(influence.block_names, influence.blocks.sizes))
    if method == "auto":
        budget = _parse_budget(memory_budget)
        method = (
            "gram" if sum(d * d for d in sizes.values()) * item <= budget else "pairs"
        )
    if method not in ("gram", "pairs"):
        raise ValueError(f"method must be 'auto', 'gram' or 'pairs', got {method!r}")
    row_bytes = influence.n_parameters * item
    rows = store.chunk_rows or default_chunk_rows(row_bytes)
    n, device = influence.n_train, influence.device
    lam = influence.block_regularization
    norms = {
        k: v.to(device=device, dtype=acc) for k, v in influence.squared_norms.items()
    }
    quad = {k: torch.zeros(n, dtype=acc, device=device) for k in sizes}
    n_chunks = -(-n // rows)
    if method == "gram":
        M = {k: torch.zeros(d, d, dtype=acc, device=device) for k, d in sizes.items()}
        for _, start, chunk in tqdm(
            store.iter_chunks(rows),
            total=n_chunks,
            desc="self-influence (1/2)",
            disable=not progress,
        ):
            for k in sizes:
                g = chunk[k].to(device=device, dtype=acc)
                w = 1.0 / (lam[k] + norms[k][start : start + len(g)])
                M[k] += (g * w[:, None]).T @ g
        for _, start, chunk in tqdm(
            store.iter_chunks(rows),
            total=n_chunks,
            desc="self-influence (2/2)",
            disable=not progress,
        ):
            for k in sizes:
                g = chunk[k].to(device=device, dtype=acc)
                quad[k][start : start + len(g)] = ((g @ M[k]) * g).sum(1)
    else:
        if not store.random_access:
            logger.warning(
                "self_influence(method='pairs') on a %s replays the training data "
                "once per chunk: %d passes",
                type(store).__name__,
                n_chunks,
            )
        for _, si, ci in tqdm(
            store.iter_chunks(rows),
            total=n_chunks,
            desc="self-influence",
            disable=not progress,
        ):
            for _, sj, cj in store.iter_chunks(rows):
                for k in sizes:
                    gi = ci[k].to(device=device, dtype=acc)
                    gj = cj[k].to(device=device, dtype=acc)
                    w = 1.0 / (lam[k] + norms[k][sj : sj + len(gj)])
                    quad[k][si : si + len(gi)] += ((gi @ gj.T) ** 2 * w).sum(1)
    out = torch.zeros(n, dtype=acc, device=device)
    for k in sizes:
        out += (norms[k] - quad[k] / n) / lam[k]
    return out


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
        scores = mean_test_influence(infl, val_loader)
        likely_mislabeled = torch.argsort(scores)[:50]  # most harmful first
        ```
    """
    store = _fitted(influence)
    acc = _acc_dtype(influence)
    total: Optional[Blockwise] = None
    n_test = 0
    for _, x, y in _test_batches(test_data, batch_size):
        grads = influence._grads(x, y)
        part = {k: g.to(acc).sum(0, keepdim=True) for k, g in grads.items()}
        total = part if total is None else {k: total[k] + part[k] for k in part}
        n_test += len(x)
    if total is None:
        raise ValueError("The test data are empty")
    v = {k: t / n_test for k, t in total.items()}
    row_bytes = influence.n_parameters * torch.empty(0, dtype=acc).element_size()
    rows = store.chunk_rows or default_chunk_rows(row_bytes)
    f = _finish(
        influence, v, _corrections(influence, store, v, rows, progress, "factors")
    )
    out = torch.zeros(influence.n_train, dtype=acc, device=influence.device)
    for _, start, chunk in tqdm(
        store.iter_chunks(rows),
        total=-(-influence.n_train // rows),
        desc="mean test influence",
        disable=not progress,
    ):
        out[start : start + len(next(iter(chunk.values())))] = tile_product(f, chunk)[0]
    return out
