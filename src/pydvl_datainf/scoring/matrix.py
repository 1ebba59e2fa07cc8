r"""The full influence matrix, streamed to Zarr, resumable and checked.

[influence_matrix][pydvl_datainf.scoring.matrix.influence_matrix] computes the
$(n_{test}, n_{train})$ matrix $I_{ji} = g_{test,j}^\top R\, g_{train,i}$ (pyDVL
sign) of a fitted [DataInfInfluence][pydvl_datainf.influence.DataInfInfluence]
in three steps:

1. **Factors.** Test gradients are computed once, in groups of `test_rows`
   rows that fit a memory budget; each group's factors $f_j = R\, g_{test,j}$
   come from one pass over the training gradients (through the
   [DataInfOperator][pydvl_datainf.operator.DataInfOperator]) and are written
   to the output (`factors/<block>`).
2. **Stream.** The training gradients are read chunk by chunk (`train_rows`
   rows, aligned with the gradient store's chunks), the next chunk read while
   the current one is multiplied.
3. **Write.** Each tile $F_g G_c^\top$ is one chunk of the output array,
   written whole and checksummed, and only then marked done.

Peak memory is a few tiles, a group of factors and a chunk of gradients, not
$n$.

**Safety.** An output path must be new, an empty directory, or an influence
matrix written by this library: anything else (a directory of yours, a
gradient store) is refused and never emptied, even with `overwrite=True`. A
new local output is built under a temporary name and renamed into place, so a
second process starting the same output gets
[StoreExistsError][pydvl_datainf.errors.StoreExistsError]. A call that fails
before any work is done leaves nothing behind; later, it leaves a state that
`resume=True` finishes.

**Resume.** An existing output raises `StoreExistsError` unless
`resume=True` (finish it) or `overwrite=True` (start again). On resume, done
tiles and factor groups are skipped, a tile whose writer died has no done
mark and is recomputed, and the result is identical to an uninterrupted run.
A complete matrix resumes without writing anything (read-only storage is
fine). The output records the weights, blocks, $\lambda_l$, loss, $n$ and a
digest of the test data; resuming with anything else raises
[StoreMismatchError][pydvl_datainf.errors.StoreMismatchError]. With
`verify=True`, every stored tile and factor is read and checked, and damaged
ones are recomputed.

Example:
    ```python
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from pydvl_datainf import DataInfInfluence, influence_matrix, top_k

    model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
    x, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    train_loader = DataLoader(TensorDataset(x, y), batch_size=16)
    test_loader = DataLoader(TensorDataset(x[:5], y[:5]), batch_size=5)
    infl = DataInfInfluence(model, loss, store="zarr",
                            store_path="grads.zarr").fit(train_loader)
    result = influence_matrix(infl, test_loader, "influences.zarr")
    # killed? run the same line with resume=True
    best = top_k(result, k=10)          # most helpful training rows per test point
    assert result.array.shape == (5, 60) and best.indices.shape == (5, 10)
    ```
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import parse_bytes
from ..influence import DataInfInfluence
from ..operator import DataInfOperator
from ..persistence import check_identity, identity
from ..state import FittedState
from ..storage.format import check_path
from .checked_matrix import CheckedMatrix
from .executors import Executor, LocalExecutor
from .executors.dask import DaskExecutor
from .inputs import TestData, group_test_grads, scan_test_data
from .tiles import Layout, TileOutput

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

__all__ = [
    "MatrixResult",
    "influence_matrix",
    "check_sizes",
    "DEFAULT_FACTOR_BUDGET",
]

logger = logging.getLogger(__name__)

Blockwise = Dict[str, torch.Tensor]

DEFAULT_FACTOR_BUDGET = 2**30
"""Default bytes of test gradients and factors held at once (1 GiB)."""
_MAX_TEST_ROWS = 8192
_OUT_DTYPES = ("float16", "float32", "float64")


@dataclass
class MatrixResult:
    """The output of [influence_matrix][pydvl_datainf.scoring.matrix.influence_matrix].

    Attributes:
        array: the `(n_test, n_train)` matrix, read through checked tiles
            (a [CheckedMatrix][pydvl_datainf.scoring.checked_matrix.CheckedMatrix]:
            index it like a numpy array).
        path: where the output group lives.
        n_test: number of test points (rows).
        n_train: number of training points (columns).
        test_rows: rows per tile (one factor group).
        train_rows: columns per tile (one chunk of training gradients).
        tiles: number of tiles.
        tiles_computed: tiles computed by this call.
        tiles_skipped: tiles found done (resume).
        factor_groups_computed: factor groups computed by this call.
        storage_options: fsspec options of `path`.

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import DataInfInfluence, influence_matrix

        model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
        x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
        infl = DataInfInfluence(model, loss).fit(DataLoader(TensorDataset(x, y), 10))
        x_test, y_test = x[:4], y[:4]
        result = influence_matrix(infl, (x_test, y_test), "infl.zarr")
        small = result.load()        # the whole matrix as a tensor, checked
        assert torch.allclose(small, infl.train_influences(x_test, y_test))
        ```
    """

    array: CheckedMatrix
    path: str
    n_test: int
    n_train: int
    test_rows: int
    train_rows: int
    tiles: int
    tiles_computed: int
    tiles_skipped: int
    factor_groups_computed: int
    storage_options: Optional[Dict[str, Any]] = None

    def output(self) -> TileOutput:
        """The output group, opened for reading."""
        return TileOutput.open(self.path, "r", self.storage_options)

    def load(self) -> torch.Tensor:
        """The whole matrix as a tensor (only for matrices that fit in memory).

        Raises:
            StoreCorruptError: a missing or corrupt tile, named.
        """
        return torch.from_numpy(CheckedMatrix(self.output())[:, :])

    def verify(self) -> None:
        """Read every tile and check its checksum.

        Raises:
            StoreCorruptError: the first missing or corrupt tile, named, with
                how to recover.
        """
        out = self.output()
        out.check_complete()
        out.damaged_tiles(full=True, raise_first=True)


def _out_dtype(dtype: Union[None, str, np.dtype, torch.dtype, type]) -> Optional[str]:
    if dtype is None:
        return None
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


def check_sizes(**sizes: Optional[int]) -> None:
    """Refuse sizes that are not positive integers (`None` means the default).

    Example:
        >>> check_sizes(batch_size=256, test_rows=None)
    """
    for name, value in sizes.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be a positive integer, got {value!r}")
        if value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def default_test_rows(
    n_test: int, row_bytes: int, budget: Union[None, int, str]
) -> int:
    """Test rows per factor group: gradients, partial sums and factors within
    `budget` (default 1 GiB), at most 8192."""
    b = parse_bytes(budget, DEFAULT_FACTOR_BUDGET)
    # v, the factors, and the partial sums of the reduction tree (about log2 P)
    rows = max(1, b // max(1, 6 * row_bytes))
    return int(max(1, min(n_test, rows, _MAX_TEST_ROWS)))


def _store_path(state: FittedState) -> str:
    store = getattr(state.store, "resolved", state.store)
    return str(getattr(store, "path", "") or "")


def _result(out: TileOutput, computed: int, skipped: int, groups: int) -> MatrixResult:
    lay = out.layout
    return MatrixResult(
        array=CheckedMatrix(out.reopen("r") if out.writable else out),
        path=out.path,
        n_test=lay.n_test,
        n_train=lay.n_train,
        test_rows=lay.test_rows,
        train_rows=lay.train_rows,
        tiles=lay.n_tiles,
        tiles_computed=computed,
        tiles_skipped=skipped,
        factor_groups_computed=groups,
        storage_options=dict(out.storage_options),
    )


def influence_matrix(
    influence: DataInfInfluence,
    test_data: TestData,
    path: Union[str, os.PathLike],
    *,
    dtype: Union[None, str, np.dtype, torch.dtype, type] = None,
    resume: bool = False,
    overwrite: bool = False,
    verify: bool = False,
    test_rows: Optional[int] = None,
    train_rows: Optional[int] = None,
    factor_budget: Union[None, int, str] = None,
    batch_size: int = 256,
    client: Optional[Client] = None,
    partitions: Optional[int] = None,
    storage_options: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
) -> MatrixResult:
    r"""Stream the $(n_{test}, n_{train})$ influence matrix into a Zarr array.

    Args:
        influence: a fitted [DataInfInfluence][pydvl_datainf.influence.DataInfInfluence].
        test_data: `(x_test, y_test)` tensors or an iterable of `(x, y)` batches
            in a fixed order (a shuffling DataLoader is refused; integer token
            ids are fine: the output dtype is `dtype`).
        path: local path or fsspec URL of the output Zarr group: new, an empty
            directory, or an influence matrix written by this library.
        dtype: float dtype of the stored matrix (`"float32"` by default, or
            the resumed matrix's; `"float64"`, `"float16"`). Products
            accumulate in the fitted state's dtype.
        resume: finish an existing, interrupted matrix (the default layout and
            dtype are then taken from it).
        overwrite: replace an existing influence matrix (never anything else).
        verify: with `resume`, read every stored tile and factor and recompute
            the damaged ones.
        test_rows: rows per tile and per factor group; default: as many test
            points as fit `factor_budget` (at most 8192).
        train_rows: columns per tile; default the gradient store's chunk rows.
        factor_budget: bytes (or e.g. `"2GB"`) for one group of test
            gradients, partial sums and factors (default 1 GiB).
        batch_size: batch size for test gradients when `test_data` are tensors.
        client: a `distributed.Client`: factor passes and tiles run as Dask
            tasks, which read the training gradients from the model's Zarr
            store and write tiles into `path` (both must be reachable by the
            workers). Results are bit-identical to a local run when client and
            workers compute alike (device, torch build, torch threads).
        partitions: fixed partitions of the training chunks for the factor
            pass (default 8; results depend on it at the level of rounding,
            never on the number of workers).
        storage_options: fsspec options for `path`.
        progress: show progress bars.

    Returns:
        A [MatrixResult][pydvl_datainf.scoring.matrix.MatrixResult];
        `result.array` is the matrix, pyDVL sign (positive = helpful).

    Raises:
        StoreExistsError: `path` holds an output and neither `resume` nor
            `overwrite`; `path` is not ours or is the model's gradient store;
            another process started the same output at the same time.
        StoreMismatchError: resuming a matrix started for other weights, blocks,
            $\lambda$, loss, training or test data, dtype or tile sizes.
        StoreCorruptError: resuming a damaged matrix without `verify=True`.
        StaleModelError: the model's weights changed since `fit`.
        ValueError: empty test data, or a shuffling test loader.

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import DataInfInfluence, influence_matrix

        model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
        x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
        infl = DataInfInfluence(model, loss).fit(DataLoader(TensorDataset(x, y), 10))
        x_test, y_test = x[:4], y[:4]
        result = influence_matrix(infl, (x_test, y_test), "infl.zarr")
        assert result.array.shape == (len(x_test), infl.n_train)
        result = influence_matrix(infl, (x_test, y_test), "infl.zarr", resume=True)
        assert result.tiles_computed == 0  # nothing left to do
        ```
    """
    if resume and overwrite:
        raise ValueError("Pass resume=True or overwrite=True, not both")
    if verify and not resume:
        raise ValueError("verify=True checks a resumed matrix: pass resume=True")
    check_sizes(batch_size=batch_size, test_rows=test_rows, train_rows=train_rows)
    path = check_path(path)
    state = influence.verified_state()
    out_dtype = _out_dtype(dtype)
    scan = scan_test_data(test_data, batch_size)
    if scan.n == 0:
        raise ValueError("The test data are empty")
    acc = state.dtype
    item = torch.empty(0, dtype=acc).element_size()
    row_bytes = int(sum(state.widths)) * item
    chunk_default = DataInfOperator(state).chunk_rows
    want = identity(state, n_test=scan.n, test_digest=scan.digest)

    output: Optional[TileOutput] = None
    if resume:
        try:
            output = TileOutput.open(path, "r", storage_options)
        except FileNotFoundError:
            output = None
    if output is not None:
        expect = dict(want)
        if out_dtype is not None:
            expect["dtype"] = out_dtype
        if test_rows is not None:
            expect["test_rows"] = int(test_rows)
        if train_rows is not None:
            expect["train_rows"] = int(train_rows)
        check_identity(
            path,
            output.attrs,
            expect,
            what="The influence matrix",
            recover="Resume it with the same model, fit and test data, or pass "
            "overwrite=True to start again.",
        )
        created = False
    else:
        layout = Layout(
            n_test=scan.n,
            n_train=state.n,
            test_rows=int(
                test_rows or default_test_rows(scan.n, row_bytes, factor_budget)
            ),
            train_rows=int(train_rows or chunk_default),
            block_sizes=tuple(int(d) for d in state.widths),
            dtype=out_dtype or "float32",
            factor_dtype=str(acc).replace("torch.", ""),
        )
        output = TileOutput.create(
            path,
            layout,
            want,
            overwrite=overwrite,
            storage_options=storage_options,
            protected=[_store_path(state)],
        )
        created = True
    try:
        return _run(
            influence,
            state,
            output,
            test_data,
            scan,
            batch_size,
            client,
            partitions,
            verify,
            progress,
        )
    except BaseException:
        if created and output.writable and not output.has_work():
            logger.info("Removing %s: the call failed before any work was done", path)
            output.remove()
        elif output.writable:
            logger.warning(
                "influence_matrix failed; the partial output at %s can be finished "
                "with resume=True",
                path,
            )
        raise


def _run(
    influence: DataInfInfluence,
    state: FittedState,
    output: TileOutput,
    test_data: TestData,
    scan: Any,
    batch_size: int,
    client: Optional[Client],
    partitions: Optional[int],
    verify: bool,
    progress: bool,
) -> MatrixResult:
    lay = output.layout
    names = list(state.blocks.names)
    # missing tiles are found cheaply (metadata); corrupt ones by reading all
    bad_tiles = output.damaged_tiles(full=verify)
    bad_groups = output.damaged_factor_groups(names) if verify else []
    if output.is_complete and not (bad_tiles or bad_groups or output.pending_tiles()):
        output.check_complete()
        return _result(output, 0, lay.n_tiles, 0)
    if not output.writable:
        output = output.reopen("r+")
    if bad_tiles or bad_groups:
        logger.warning(
            "Recomputing damaged tiles %s and factor groups %s of %s",
            bad_tiles[:20],
            bad_groups,
            output.path,
        )
        output.unmark(bad_tiles, bad_groups)
    elif output.is_complete:  # a done mark was lost: finish the missing tiles
        output.unmark([], [])
    op = DataInfOperator(state, chunk_rows=lay.train_rows, partitions=partitions)
    executor: Executor
    if client is not None:
        executor = DaskExecutor(client, state)
    else:
        device = next(iter(state.squared_norms.values())).device
        executor = LocalExecutor(device)

    pending_tiles = output.pending_tiles()
    tile_groups = {g for g, _ in pending_tiles}
    done_groups = output.factors_done()
    pending_groups = {g for g in tile_groups if not done_groups[g]}
    groups_computed = 0
    if pending_groups:
        for g, v in tqdm(
            group_test_grads(
                influence.gradients,
                test_data,
                batch_size,
                lay.test_rows,
                scan,
                pending_groups,
            ),
            total=len(pending_groups),
            desc="DataInf factors",
            disable=not progress,
        ):
            v = {k: t.to(state.dtype) for k, t in v.items()}
            output.write_factors(g, executor.factors(op, v))
            groups_computed += 1
    skipped = lay.n_tiles - len(pending_tiles)
    if skipped:
        logger.info(
            "Resuming %s: %d of %d tiles already done",
            output.path,
            skipped,
            lay.n_tiles,
        )
    if pending_tiles:
        executor.write_tiles(op, output, pending_tiles, names, progress)
    output.finish()
    return _result(output, len(pending_tiles), skipped, groups_computed)
