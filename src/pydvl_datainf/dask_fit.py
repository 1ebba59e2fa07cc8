r"""The fit pass on a Dask cluster: fixed partitions of rows, written by workers.

`fit` is a forward and backward pass over the whole training set: at the scale
of an LLM fine-tune it is the most expensive stage. [fit_on_dask][pydvl_datainf.dask_fit.fit_on_dask]
splits the training rows into fixed partitions, aligned with the loader's
batches and with the store's chunks. Each Dask task computes one partition's
per-sample gradients, in the same batches as a one-process fit, and writes its
own rows of a shared Zarr store
([PartitionedStore][pydvl_datainf.storage.partitioned.PartitionedStore]);
the client then combines $n$, the squared norms and $\lambda_l$, saves the
fit's state and publishes the store.

- **The same bits.** Every row is computed in the same batch as by a
  one-process `fit`, so the store, the norms and $\lambda_l$ are bit-identical
  to it given the same arithmetic (device, torch build, torch threads),
  whatever the number of workers; partitions never depend on it.
- **Resumable.** A task whose worker dies is run again by Dask (`retries`). A
  fit interrupted for any other reason keeps its finished partitions:
  `resume=True` computes only the others, after checking that they are the
  same fit (weights, frozen weights, loss, blocks, batch size, chunks) and that
  the rows already written are the rows the loader gives now.
- **GPU workers.** Each task computes on its worker's GPU if it has one
  (`torch.cuda.is_available()` there), so one worker per GPU (e.g.
  `dask_cuda.LocalCUDACluster`, or `dask-worker --nworkers 1` per GPU with
  `CUDA_VISIBLE_DEVICES` set) spreads the fit over the GPUs of one or many
  machines. The store's path must be reachable by every worker (a shared file
  system or an object store).

The training data must be a map-style dataset behind a DataLoader with a
sequential sampler, so that a worker can read the rows of its partition
(e.g. a tokenized `datasets.Dataset` or a `TensorDataset`). The model and the
dataset are sent to every worker once.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, SequentialSampler
from tqdm.auto import tqdm

from .config import RegularizationSpec, validate_regularization
from .errors import EmptyDataError, StoreMismatchError
from .factored import densify
from .fit import GradientFunction, check_metadata
from .persistence import save_state
from .projection import projections_digest
from .rows import RowIndex, RowOrder, row_digests
from .state import FittedState
from .storage import STORE_DTYPES, ZarrGradientStore, default_chunk_rows
from .storage.partitioned import PartitionedStore, RowBatch

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

__all__ = ["fit_on_dask", "fit_partition", "partition_rows_for", "map_style_loader"]

logger = logging.getLogger(__name__)

_TARGET_PARTITIONS = 16


def map_style_loader(data: Any) -> tuple:
    """`(dataset, batch_size, collate_fn)` of a loader that a partitioned fit
    can split: a DataLoader over a map-style dataset, in order, whole batches.

    Raises:
        TypeError: not a DataLoader over a dataset with `__len__` and
            `__getitem__`.
        ValueError: a shuffling sampler, no batch size, or `drop_last`.
    """
    if not isinstance(data, DataLoader):
        raise TypeError(
            "A fit on Dask needs a torch DataLoader over a map-style dataset (one "
            "that has __len__ and __getitem__), so that workers can read their "
            f"rows; got {type(data).__name__}"
        )
    ds = data.dataset
    if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise TypeError(
            f"A fit on Dask needs a map-style dataset; {type(ds).__name__} has no "
            f"__len__ or __getitem__"
        )
    if not isinstance(data.sampler, SequentialSampler):
        raise ValueError(
            f"A fit on Dask reads the rows in order; the loader uses a "
            f"{type(data.sampler).__name__}. Pass a loader with shuffle=False."
        )
    if data.batch_size is None or data.drop_last:
        raise ValueError(
            "A fit on Dask needs a loader with a batch_size and drop_last=False"
        )
    return ds, int(data.batch_size), data.collate_fn


def partition_rows_for(
    n: int, batch_size: int, chunk_rows: int, partition_rows: Optional[int] = None
) -> int:
    """Rows per partition: a multiple of both the batch size and the chunk rows.

    By default about a sixteenth of the rows (never depending on the number of
    workers, so that results do not either).

    Raises:
        ValueError: a given value that is not such a multiple.

    Example:
        >>> partition_rows_for(1000, batch_size=32, chunk_rows=64)
        64
        >>> partition_rows_for(10_000, batch_size=32, chunk_rows=64)
        640
    """
    unit = math.lcm(int(batch_size), int(chunk_rows))
    if partition_rows is not None:
        if partition_rows <= 0 or partition_rows % unit:
            raise ValueError(
                f"partition_rows ({partition_rows}) must be a positive multiple of "
                f"both the batch size ({batch_size}) and the chunk rows "
                f"({chunk_rows}): {unit}, {2 * unit}, ..."
            )
        return int(partition_rows)
    target = -(-n // _TARGET_PARTITIONS)
    return unit * max(1, -(-target // unit))


def _rows(
    gradients: GradientFunction,
    dataset: Any,
    collate_fn: Callable[[List[Any]], Any],
    batch_size: int,
    lo: int,
    hi: int,
) -> Iterator[RowBatch]:
    """The partition's rows, in the batches of a one-process fit."""
    for b0 in range(lo, hi, batch_size):
        x, y = collate_fn([dataset[i] for i in range(b0, min(hi, b0 + batch_size))])
        grads, norms = gradients.with_norms(x, y, offset=b0)
        yield (
            {k: densify(g) for k, g in grads.items()},
            norms,
            row_digests(x, y),
        )


def _worker_keys(dask_worker: Any) -> List[Any]:
    """The keys a worker still holds in any state (queued, running, cancelled)."""
    return list(dask_worker.state.tasks)


def _wait_for_running(client: Client, keys: set, timeout: float = 300.0) -> None:
    """Wait until no worker holds a task of `keys` any more: a running task
    cannot be stopped, and a queued one may start before its cancellation
    arrives, so a failed fit returns only once its tasks are gone (and none of
    them writes after it, e.g. into a resumed fit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = {k for ks in client.run(_worker_keys).values() for k in ks}
        if not held & keys:
            return
        time.sleep(0.05)
    logger.warning("Tasks of the failed fit are still held after %.0f s", timeout)


def _worker_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fit_partition(
    gradients: GradientFunction,
    dataset: Any,
    collate_fn: Callable[[List[Any]], Any],
    batch_size: int,
    store: PartitionedStore,
    pid: int,
) -> int:
    """One task: compute partition `pid`'s gradients and write them.

    Returns:
        `pid`.
    """
    gradients.model.to(_worker_device())
    lo, hi = store.partitions[pid]
    with gradients.eval_mode():
        store.write_partition(
            pid, _rows(gradients, dataset, collate_fn, batch_size, lo, hi)
        )
    return pid


def _check_rows(
    store: PartitionedStore,
    dataset: Any,
    collate_fn: Callable[[List[Any]], Any],
    batch_size: int,
) -> None:
    """On resume: the rows already written are the rows the loader gives now."""
    for pid, record in store.records().items():
        lo, hi = store.partitions[pid]
        got: List[bytes] = []
        for b0 in range(lo, hi, batch_size):
            x, y = collate_fn([dataset[i] for i in range(b0, min(hi, b0 + batch_size))])
            got.extend(row_digests(x, y))
        want = record["rows"]
        if np.frombuffer(b"".join(got), dtype=np.uint8).reshape(
            want.shape
        ).tobytes() != (want.tobytes()):
            raise StoreMismatchError(
                f"The unfinished fit at {store.location!r} wrote other training rows "
                f"in partition {pid} (rows {lo}..{hi - 1}) than the loader gives "
                f"now. Pass overwrite=True to start again."
            )


def fit_on_dask(
    gradients: GradientFunction,
    data: DataLoader,
    client: Client,
    path: str,
    *,
    regularization: RegularizationSpec = "auto",
    regularization_scale: float = 0.1,
    dtype: Optional[torch.dtype] = None,
    chunk_rows: Optional[int] = None,
    partition_rows: Optional[int] = None,
    overwrite: bool = False,
    resume: bool = False,
    storage_options: Optional[Mapping[str, Any]] = None,
    compressors: Any = None,
    metadata: Optional[Mapping[str, Any]] = None,
    retries: int = 2,
    progress: bool = True,
) -> FittedState:
    r"""One pass over `data` on a Dask cluster into a Zarr gradient store.

    Args:
        gradients: the model's per-sample gradients.
        data: a DataLoader over a map-style dataset, in order.
        client: a `distributed.Client`.
        path: where the store is published (reachable by every worker).
        regularization: as for [fit][pydvl_datainf.fit.fit].
        regularization_scale: $c$ in the `"auto"` rule.
        dtype: stored dtype (default: the accumulation dtype).
        chunk_rows: rows per chunk (default about 64 MiB per chunk).
        partition_rows: rows per partition (default about $n/16$, a multiple
            of the batch size and the chunk rows).
        overwrite: replace a store of ours at `path`, and an unfinished fit.
        resume: finish an unfinished fit of the same model, loss and data.
        storage_options: fsspec options for URLs.
        compressors: Zarr compressors.
        metadata: JSON-serialisable facts to record with the fit.
        retries: how many times Dask reruns a task whose worker died.
        progress: show a progress bar.

    Returns:
        The fitted state over the published store.

    Raises:
        EmptyDataError: no rows.
        StoreExistsError: `path` holds a store (and not `overwrite`), or an
            unfinished fit is there and neither `resume` nor `overwrite`.
        StoreMismatchError: resuming an unfinished fit of something else.

    Example:
        ```python
        import torch
        from distributed import Client, LocalCluster
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import DataInfInfluence

        torch.manual_seed(0)
        model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
        x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        loader = DataLoader(TensorDataset(x, y), batch_size=8)
        infl = DataInfInfluence(model, loss, store="zarr", store_path="grads.zarr",
                                store_options={"chunk_rows": 16}, progress=False)
        with LocalCluster(n_workers=2, processes=False) as cluster:
            with Client(cluster) as client:
                infl.fit(loader, client=client)    # 4 partitions of 16 rows
        assert infl.n_train == 64
        ```
    """
    from distributed import as_completed

    dataset, batch_size, collate_fn = map_style_loader(data)
    n = len(dataset)
    if n == 0:
        raise EmptyDataError("The training loader has no samples; DataInf needs n > 0")
    spec = validate_regularization(regularization, gradients.blocks.names)
    recorded = check_metadata(metadata)
    blocks = gradients.blocks
    stored = dtype or gradients.dtype
    if stored not in STORE_DTYPES.values():
        stored = torch.float32
    item = torch.empty(0, dtype=stored).element_size()
    widths = gradients.widths
    rows_per_chunk = int(chunk_rows or default_chunk_rows(sum(widths) * item))
    per_partition = partition_rows_for(n, batch_size, rows_per_chunk, partition_rows)
    identity: Dict[str, Any] = {
        "weights_digest": gradients.fingerprint(),
        "frozen_digest": gradients.frozen_fingerprint(),
        "loss": gradients.loss_identity(),
        "projections": projections_digest(gradients.projections),
        "batch_size": batch_size,
    }
    store = PartitionedStore.create(
        path,
        blocks.names,
        widths,
        n,
        dtype=stored,
        chunk_rows=rows_per_chunk,
        partition_rows=per_partition,
        identity=identity,
        overwrite=overwrite,
        resume=resume,
        storage_options=storage_options,
        compressors=compressors,
    )
    if resume:
        _check_rows(store, dataset, collate_fn, batch_size)
    pending = store.pending()
    logger.info(
        "Fit on Dask: %d rows in %d partitions of %d (%d to compute) into %s",
        n,
        len(store.partitions),
        per_partition,
        len(pending),
        path,
    )
    if pending:
        grads_f = client.scatter(gradients, broadcast=True, hash=False)
        data_f = client.scatter(dataset, broadcast=True, hash=False)
        futures = [
            client.submit(
                fit_partition,
                grads_f,
                data_f,
                collate_fn,
                batch_size,
                store,
                pid,
                pure=False,
                retries=retries,
            )
            for pid in pending
        ]
        try:
            with tqdm(
                total=len(futures), desc="DataInf fit", disable=not progress
            ) as bar:
                for fut in as_completed(futures):
                    fut.result()
                    bar.update()
        except BaseException:
            client.cancel(futures)  # no task of a failed fit starts after it
            _wait_for_running(client, {f.key for f in futures})
            raise
    writer, norms, digests = store.finish()
    zs = ZarrGradientStore.from_writer(writer)
    order = RowOrder()
    order.add(digests.view(np.dtype((np.void, digests.shape[1]))).ravel().tolist())
    state = FittedState(
        blocks=blocks,
        n=n,
        squared_norms=OrderedDict((k, norms[k]) for k in blocks.names),
        regularization=OrderedDict(),
        store=zs,
        fingerprint=identity["weights_digest"],
        frozen_fingerprint=identity["frozen_digest"],
        rows=RowIndex.from_digests(digests),
        rows_digest=order.hexdigest(),
        projections=gradients.projections,
        regularization_spec=spec,
        regularization_scale=float(regularization_scale),
        loss=identity["loss"],
        dtype=gradients.dtype,
        metadata=recorded,
    ).with_regularization(spec)
    save_state(state)
    return state
