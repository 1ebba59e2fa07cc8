r"""The influence matrix on a Dask cluster: workers read gradients from Zarr.

[influence_matrix][pydvl_datainf.matrix.influence_matrix] with `client=` runs
both of its passes as Dask tasks:

* **Factors.** The client computes the test gradients of a group (it holds the
  model) and scatters them once; each task sums the Sherman–Morrison
  corrections over a contiguous range of training chunks, reading the
  gradients from the model's
  [ZarrGradientStore][pydvl_datainf.stores.ZarrGradientStore]; partial sums
  are added on the workers in a fixed binary tree, and the client finishes
  and stores the factors.
* **Tiles.** One task per pending tile reads the group's factors and one chunk
  of training gradients from Zarr, multiplies them, writes the tile into the
  output array and marks it done. Tasks receive paths, not data: neither the
  model nor any gradient is pickled to the workers.

Tile tasks are idempotent (write, then mark), so a worker that dies is
harmless: the scheduler reruns its tasks elsewhere, and a run that dies
altogether is finished with `resume=True`. The gradient store and the output
must be on storage that every worker reaches (a shared file system, or an
fsspec URL such as `s3://` with `storage_options`).

Workers run the products on their GPU when they have one (for instance under
`dask_cuda.LocalCUDACluster`), else on CPU.

Example:
    ```python
    from distributed import Client, LocalCluster
    from pydvl_datainf import DataInfInfluence, influence_matrix

    infl = DataInfInfluence(model, loss, store="zarr",
                            store_path="/shared/grads.zarr").fit(train_loader)
    with Client(LocalCluster(n_workers=4, threads_per_worker=1)) as client:
        result = influence_matrix(infl, test_loader, "/shared/infl.zarr",
                                  client=client)
    ```
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from . import formula
from .matrix import read_factors, tile_product, write_tile
from .stores import ZarrGradientStore, open_zarr_group

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

__all__ = ["distributed_corrections", "distributed_tiles", "worker_device"]

logger = logging.getLogger(__name__)

NumpyBlocks = Dict[str, np.ndarray]

# Per-process caches of open stores and recently used factors, on workers.
_lock = threading.Lock()
_stores: Dict[Tuple[str, str, str], ZarrGradientStore] = {}
_outputs: Dict[Tuple[str, str, str], Any] = {}
_factors: OrderedDict[Tuple[str, str, int], Dict[str, torch.Tensor]] = OrderedDict()
_FACTOR_CACHE = 2


def worker_device() -> torch.device:
    """The device tasks compute on: the worker's GPU if it has one, else CPU.

    Example:
        ```python
        client.run(worker_device)  # {worker address: device}
        ```
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _key(
    path: str, options: Optional[Mapping[str, Any]], ident: str
) -> Tuple[str, str, str]:
    return path, repr(sorted((options or {}).items())), ident


def _open_store(
    path: str, options: Optional[Mapping[str, Any]], ident: str
) -> ZarrGradientStore:
    key = _key(path, options, ident)
    with _lock:
        if key not in _stores:
            _stores[key] = ZarrGradientStore.open(path, options)
        return _stores[key]


def _open_output(path: str, options: Optional[Mapping[str, Any]], ident: str) -> Any:
    key = _key(path, options, ident)
    with _lock:
        if key not in _outputs:
            _outputs[key] = open_zarr_group(path, "r+", options)
        return _outputs[key]


def _correction_task(
    store_path: str,
    store_options: Optional[Mapping[str, Any]],
    store_id: str,
    v: NumpyBlocks,
    regularization: Mapping[str, float],
    train_rows: int,
    chunk_ids: List[int],
) -> NumpyBlocks:
    """Partial corrections of test gradients `v` over some training chunks."""
    store = _open_store(store_path, store_options, store_id)
    group = store._get_group()
    device = worker_device()
    vt = {k: torch.from_numpy(a).to(device) for k, a in v.items()}
    out = {k: torch.zeros_like(t) for k, t in vt.items()}
    for _, start, chunk in store.iter_chunks(train_rows, chunk_ids):
        for i, k in enumerate(store.block_names):
            g = chunk[k].to(device=device, dtype=vt[k].dtype)
            s = torch.from_numpy(
                np.asarray(group[f"norms/{i}"][start : start + len(g)])
            )
            out[k] += formula.inverse_harmonic_mean_correction(
                vt[k], g, s.to(g), regularization[k]
            )
    return {k: t.cpu().numpy() for k, t in out.items()}


def _sum_task(a: NumpyBlocks, b: NumpyBlocks) -> NumpyBlocks:
    return {k: a[k] + b[k] for k in a}


def _tile_task(
    store_path: str,
    store_options: Optional[Mapping[str, Any]],
    store_id: str,
    out_path: str,
    out_options: Optional[Mapping[str, Any]],
    run_id: str,
    g: int,
    c: int,
) -> Tuple[int, int]:
    """Compute tile `(g, c)`, write it into the output, then mark it done."""
    store = _open_store(store_path, store_options, store_id)
    group = _open_output(out_path, out_options, run_id)
    rows = int(group.attrs["train_rows"])
    device = worker_device()
    key = (out_path, run_id, g)
    with _lock:
        factors = _factors.get(key)
        if factors is not None:
            _factors.move_to_end(key)
    if factors is None:
        factors = {
            k: t.to(device)
            for k, t in read_factors(group, store.block_names, g).items()
        }
        with _lock:
            _factors[key] = factors
            while len(_factors) > _FACTOR_CACHE:
                _factors.popitem(last=False)
    grads = store.read(c * rows, (c + 1) * rows)
    write_tile(group, g, c, tile_product(factors, grads))
    return g, c


def _n_threads(client: Client) -> int:
    workers = client.scheduler_info().get("workers", {})
    return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))


def distributed_corrections(
    client: Client,
    store: ZarrGradientStore,
    v: Mapping[str, torch.Tensor],
    regularization: Mapping[str, float],
    train_rows: int,
    partitions: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    r"""$\sum_i \frac{g_i^\top v}{\lambda + \lVert g_i\rVert^2} g_i$ per block, on the workers.

    Args:
        client: the Dask client.
        store: the training gradients (a Zarr store the workers can open).
        v: `{block: (m, d_l)}` test gradients (scattered once).
        regularization: $\lambda_l$ per block.
        train_rows: rows per training chunk.
        partitions: number of tasks (default: the cluster's threads).

    Returns:
        The summed corrections, on `v`'s device.

    Example:
        ```python
        corr = distributed_corrections(client, infl.store, v, infl.block_regularization, 1024)
        factors = {k: (v[k] - corr[k] / infl.n_train) / lam[k] for k in v}
        ```
    """
    n_chunks = -(-store.n // train_rows)
    p = max(1, min(n_chunks, partitions or _n_threads(client)))
    bounds = np.linspace(0, n_chunks, p + 1).astype(int)
    ranges = [list(range(bounds[i], bounds[i + 1])) for i in range(p)]
    device = next(iter(v.values())).device
    v_np = {k: t.detach().cpu().numpy() for k, t in v.items()}
    [v_future] = client.scatter([v_np], hash=False)
    token = uuid.uuid4().hex[:8]
    parts = [
        client.submit(
            _correction_task,
            store.path,
            store.storage_options,
            store.store_id,
            v_future,
            dict(regularization),
            train_rows,
            r,
            key=f"datainf-corrections-{token}-{i}",
            retries=2,
        )
        for i, r in enumerate(ranges)
        if r
    ]
    level = 0
    while len(parts) > 1:  # fixed binary tree: deterministic for a given p
        nxt = [
            client.submit(
                _sum_task,
                parts[i],
                parts[i + 1],
                key=f"datainf-sum-{token}-{level}-{i}",
                retries=2,
            )
            for i in range(0, len(parts) - 1, 2)
        ]
        if len(parts) % 2:
            nxt.append(parts[-1])
        parts, level = nxt, level + 1
    result = parts[0].result()
    client.cancel([v_future])
    return {k: torch.from_numpy(a).to(device) for k, a in result.items()}


def distributed_tiles(
    client: Client,
    store: ZarrGradientStore,
    out_path: str,
    out_options: Optional[Mapping[str, Any]],
    pending: List[Tuple[int, int]],
    progress: bool = True,
) -> None:
    """Run one task per pending tile; returns when all are written and marked.

    Args:
        client: the Dask client.
        store: the training gradients (a Zarr store the workers can open).
        out_path: the output group (reachable by the workers).
        out_options: fsspec options for `out_path`.
        pending: `(group, chunk)` tiles to compute.
        progress: show a progress bar.

    Raises:
        Exception: the first task error, after retries.

    Example:
        ```python
        # what influence_matrix(..., client=client) runs for the pending tiles
        distributed_tiles(client, infl.store, "infl.zarr", None, [(0, 0), (0, 1)])
        ```
    """
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    run_id = str(open_zarr_group(out_path, "r", out_options).attrs["run_id"])
    futures = [
        client.submit(
            _tile_task,
            store.path,
            store.storage_options,
            store.store_id,
            out_path,
            dict(out_options or {}),
            run_id,
            g,
            c,
            key=f"datainf-tile-{token}-{g}-{c}",
            retries=2,
        )
        for g, c in pending
    ]
    with tqdm(total=len(futures), desc="DataInf matrix", disable=not progress) as bar:
        for fut in as_completed(futures):
            fut.result()
            bar.update()
    logger.info("Computed %d tiles on the cluster into %s", len(futures), out_path)
