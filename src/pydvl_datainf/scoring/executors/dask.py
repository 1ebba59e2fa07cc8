"""The Dask executor: map steps and tiles as tasks on a `distributed` cluster.

* **Factors.** The client computes the test gradients of a group (it holds
  the model) and scatters them once. One task per fixed partition of the
  training chunks (the operator's
  [partitions][pydvl_datainf.operator.DataInfOperator.partitions], never the
  number of workers) runs
  [corrections][pydvl_datainf.operator.DataInfOperator.corrections]; the
  partial sums are added by tasks in the operator's fixed tree
  ([tree_reduce][pydvl_datainf.operator.tree_reduce]); the client finishes
  the factors. The result is bit-identical to the local executor's, after a
  worker loss and whatever the number of workers, given the same arithmetic
  on client and workers (device, torch build, number of torch threads; see
  the Guarantees page).
* **Tiles.** One task per pending tile reads the group's factors from the
  output and one chunk of training gradients from the Zarr store, multiplies
  them with [tiles][pydvl_datainf.operator.DataInfOperator.tiles], writes the
  tile, then marks it done. Tiles are idempotent: a rerun after a worker loss
  writes the same bytes.

Workers receive the fitted state once (the Zarr store travels as its path,
never its gradients; the row index is left behind) and never the model.

Example:
    ```python
    import torch
    from distributed import Client, LocalCluster
    from torch.utils.data import DataLoader, TensorDataset
    from pydvl_datainf import DataInfInfluence, influence_matrix

    model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    infl = DataInfInfluence(model, loss, store="zarr", store_path="grads.zarr")
    infl.fit(DataLoader(TensorDataset(x, y), batch_size=16))
    test_loader = DataLoader(TensorDataset(x[:6], y[:6]), batch_size=4)
    # a real cluster: workers on other machines, paths on shared storage
    cluster = LocalCluster(n_workers=2, processes=False)
    with cluster, Client(cluster) as client:
        result = influence_matrix(infl, test_loader, "infl.zarr", client=client)
    local = influence_matrix(infl, test_loader, "infl-local.zarr")
    assert torch.equal(result.load(), local.load())  # the same bits
    ```
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ...operator import DataInfOperator, tree_reduce
from ...state import FittedState
from ...storage import ZarrGradientStore
from ..tiles import TileOutput
from .base import Executor

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client, Future

__all__ = ["DaskExecutor", "worker_device", "require_zarr"]

logger = logging.getLogger(__name__)

Blockwise = Dict[str, torch.Tensor]
NumpyBlocks = Dict[str, np.ndarray]

# per worker process: open outputs and recently used factors
_lock = threading.Lock()
_outputs: Dict[Tuple[str, str], TileOutput] = {}
_factors: OrderedDict[Tuple[str, int], Blockwise] = OrderedDict()
_FACTOR_CACHE = 2


def worker_device() -> torch.device:
    """The device tasks compute on: the worker's GPU if it has one, else CPU.

    Example:
        ```python
        import torch
        from distributed import Client, LocalCluster
        from pydvl_datainf.scoring.executors.dask import worker_device

        cluster = LocalCluster(n_workers=1, processes=False)
        with cluster, Client(cluster) as client:
            devices = client.run(worker_device)  # {worker address: device}
        assert len(devices) == 1
        ```
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require_zarr(state: FittedState) -> ZarrGradientStore:
    """The state's Zarr store, which workers can open; else a clear error."""
    store = getattr(state.store, "resolved", state.store)
    if not isinstance(store, ZarrGradientStore):
        raise TypeError(
            "A distributed influence matrix needs the training gradients in a Zarr "
            "store that the workers can read: fit with store='zarr' and a "
            f"store_path on shared storage (got {type(store).__name__})."
        )
    return store


def _operator(state: FittedState, chunk_rows: int, partitions: int) -> DataInfOperator:
    return DataInfOperator(state, chunk_rows=chunk_rows, partitions=partitions)


def _correction_task(
    state: FittedState,
    v: NumpyBlocks,
    chunk_rows: int,
    partitions: int,
    chunk_ids: List[int],
) -> NumpyBlocks:
    """Partial corrections of `v` over one partition of training chunks."""
    op = _operator(state, chunk_rows, partitions)
    vt = {k: torch.from_numpy(a).to(worker_device()) for k, a in v.items()}
    return {k: t.cpu().numpy() for k, t in op.corrections(vt, chunk_ids).items()}


def _sum_task(a: NumpyBlocks, b: NumpyBlocks) -> NumpyBlocks:
    return {k: a[k] + b[k] for k in a}


def _output(path: str, options: Mapping[str, Any], run_id: str) -> TileOutput:
    key = (path, run_id)
    with _lock:
        if key not in _outputs:
            _outputs[key] = TileOutput.open(path, "r+", options, run_id=run_id)
        return _outputs[key]


def _tile_task(
    state: FittedState,
    chunk_rows: int,
    partitions: int,
    out_path: str,
    out_options: Mapping[str, Any],
    run_id: str,
    g: int,
    c: int,
) -> Tuple[int, int]:
    """Compute tile `(g, c)`, write it into the output, then mark it done."""
    output = _output(out_path, out_options, run_id)
    key = (run_id, g)
    with _lock:
        factors = _factors.get(key)
        if factors is not None:
            _factors.move_to_end(key)
    if factors is None:
        device = worker_device()
        factors = {
            k: t.to(device)
            for k, t in output.read_factors(g, list(state.regularization)).items()
        }
        with _lock:
            _factors[key] = factors
            while len(_factors) > _FACTOR_CACHE:
                _factors.popitem(last=False)
    op = _operator(state, chunk_rows, partitions)
    for cc, _, tile in op.tiles(factors, [c]):
        output.write_tile(g, cc, tile)
    return g, c


class DaskExecutor(Executor):
    """Runs the operator's map steps and tiles as tasks on a Dask cluster.

    Args:
        client: a `distributed.Client`.
        state: the fitted state (its store must be a Zarr store on storage
            that every worker reaches).

    Example:
        ```python
        import torch
        from distributed import Client, LocalCluster
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import DataInfInfluence
        from pydvl_datainf.operator import DataInfOperator
        from pydvl_datainf.scoring.executors.dask import DaskExecutor

        model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
        x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
        infl = DataInfInfluence(model, loss, store="zarr", store_path="grads.zarr")
        infl.fit(DataLoader(TensorDataset(x, y), batch_size=16))
        op = DataInfOperator(infl.state)
        test_grads = infl.per_sample_gradients(x[:3], y[:3])
        cluster = LocalCluster(n_workers=2, processes=False)
        with cluster, Client(cluster) as client:
            ex = DaskExecutor(client, infl.state)
            f = ex.factors(op, test_grads)
        assert all(torch.equal(f[k], v) for k, v in op.apply(test_grads).items())
        ```
    """

    def __init__(self, client: Client, state: FittedState):
        require_zarr(state)
        self.client = client
        self._state = dataclasses.replace(state, rows=None).to("cpu")
        self._state_future: Optional[Future] = None
        self._token = uuid.uuid4().hex[:8]
        self._calls = 0

    def _state_on_cluster(self) -> Future:
        if self._state_future is None:
            [self._state_future] = self.client.scatter(
                [self._state], broadcast=True, hash=False
            )
        return self._state_future

    def _key(self, what: str) -> str:
        self._calls += 1
        return f"datainf-{what}-{self._token}-{self._calls}"

    def factors(
        self,
        op: DataInfOperator,
        v: Mapping[str, torch.Tensor],
        progress: bool = False,
    ) -> Blockwise:
        state = self._state_on_cluster()
        device = next(iter(v.values())).device
        v_np = {k: t.detach().cpu().numpy() for k, t in v.items()}
        [v_future] = self.client.scatter([v_np], hash=False)
        parts = [
            self.client.submit(
                _correction_task,
                state,
                v_future,
                op.chunk_rows,
                len(op.partitions()),
                ids,
                key=self._key("corrections"),
                retries=2,
            )
            for ids in op.partitions()
        ]

        def add(a: Future, b: Future) -> Future:
            return self.client.submit(_sum_task, a, b, key=self._key("sum"), retries=2)

        total = tree_reduce(parts, len(parts), add).result()
        del parts, v_future  # released by reference, never cancelled
        corr = {k: torch.from_numpy(a).to(device) for k, a in total.items()}
        return op.finish({k: t for k, t in v.items()}, corr)

    def write_tiles(
        self,
        op: DataInfOperator,
        output: TileOutput,
        pending: Sequence[Tuple[int, int]],
        names: List[str],
        progress: bool = False,
    ) -> None:
        from distributed import as_completed

        state = self._state_on_cluster()
        futures = [
            self.client.submit(
                _tile_task,
                state,
                op.chunk_rows,
                len(op.partitions()),
                output.path,
                dict(output.storage_options),
                output.run_id,
                g,
                c,
                key=self._key(f"tile-{g}-{c}"),
                retries=2,
            )
            for g, c in pending
        ]
        with tqdm(
            total=len(futures), desc="DataInf matrix", disable=not progress
        ) as bar:
            for fut in as_completed(futures):
                fut.result()
                bar.update()
        logger.info(
            "Computed %d tiles on the cluster into %s", len(futures), output.path
        )

    def close(self) -> None:
        """Release the scattered state."""
        self._state_future = None
