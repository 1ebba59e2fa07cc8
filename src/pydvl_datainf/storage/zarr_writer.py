r"""Writing a Zarr gradient store during `fit`: one writer, rows in order.

[ZarrStoreWriter][pydvl_datainf.storage.zarr_writer.ZarrStoreWriter] claims a
new store (beside its path on a local disk), buffers appended rows until a
chunk is full, writes whole chunks in a background thread while the next
gradients are computed, records every chunk's digest by its place, and, once
the fit's state is saved, publishes the store at its path with one atomic
rename. Before every write it checks that the store it writes to is still its
own. [ZarrGradientStore][pydvl_datainf.storage.zarr.ZarrGradientStore] holds
one while it is being written.
"""

from __future__ import annotations

import logging
import threading
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from .base import FitState, default_chunk_rows, trim_heap
from .digests import DigestTable
from .dtypes import STORE_DTYPES, dtype_name
from .format import (
    GRADIENT_STORE,
    open_zarr_group,
    publish_path,
    write_checked_array,
    write_manifest,
)
from .zarr_layout import (
    claim_store,
    create_grad_arrays,
    grad_names,
    remove_directory,
    replaced_error,
    store_id_at,
    stored_rows,
    write_fit_state,
)

__all__ = ["ZarrStoreWriter"]

logger = logging.getLogger(__name__)


class ZarrStoreWriter:
    """Writes one gradient store, rows in order, and publishes it.

    Args:
        path: where the store is published (local path or fsspec URL).
        block_names: block names, in order.
        dtype: stored dtype; `None` keeps the dtype of the first rows.
        chunk_rows: rows per chunk; `None` picks about 64 MiB per chunk.
        overwrite: replace a store of ours at `path` when publishing.
        storage_options: fsspec options for URLs.
        compressors: Zarr compressors (a CRC-32C is always added).

    Attributes:
        location: where the store is written until published (its path once
            published, or on object stores from the start).
        store_id: the new store's id.
        digests: the digest table of every array written, by name.

    Example:
        ```python
        import torch
        from pydvl_datainf.storage import ZarrGradientStore
        from pydvl_datainf.storage.zarr_writer import ZarrStoreWriter

        writer = ZarrStoreWriter("w.zarr", ["w"], chunk_rows=4)
        writer.append({"w": torch.randn(10, 3)})
        writer.finalize()
        writer.publish()
        assert ZarrGradientStore.open("w.zarr").n == 10
        ```
    """

    def __init__(
        self,
        path: str,
        block_names: Sequence[str],
        *,
        dtype: Optional[torch.dtype] = None,
        chunk_rows: Optional[int] = None,
        overwrite: bool = False,
        storage_options: Optional[Mapping[str, Any]] = None,
        compressors: Any = None,
    ):
        self.path = path
        self.block_names = list(block_names)
        self.storage_options = dict(storage_options or {})
        self.dtype = dtype
        self.chunk_rows = chunk_rows
        self.overwrite = bool(overwrite)
        self.compressors = compressors
        self.store_id = uuid.uuid4().hex
        self.sizes: List[int] = []
        self.n = 0
        self.finalized = False
        self.digests: Dict[str, DigestTable] = {}
        self._lock = threading.RLock()
        self._arrays: Optional[List[Any]] = None
        self._buffer: Dict[str, List[np.ndarray]] = {k: [] for k in self.block_names}
        self._buffered = 0
        self._thread: Optional[ThreadPoolExecutor] = None
        self._pending: List[Future] = []
        self.location, self._group = claim_store(
            path,
            {"block_names": self.block_names, "store_id": self.store_id},
            overwrite=overwrite,
            storage_options=self.storage_options,
        )
        self._staging: Optional[weakref.finalize] = None
        if self.location != path:  # removed if never published
            self._staging = weakref.finalize(self, remove_directory, self.location)

    @classmethod
    def adopt(
        cls,
        path: str,
        location: str,
        store_id: str,
        block_names: Sequence[str],
        *,
        sizes: Sequence[int],
        n: int,
        dtype: torch.dtype,
        chunk_rows: int,
        digests: Mapping[str, DigestTable],
        overwrite: bool,
        storage_options: Optional[Mapping[str, Any]] = None,
    ) -> ZarrStoreWriter:
        """The writer of a store that another writer finished at `location`
        (e.g. [PartitionedStore][pydvl_datainf.storage.partitioned.PartitionedStore]):
        its fit state can be saved and it can be published."""
        self = cls.__new__(cls)
        self.path = path
        self.block_names = list(block_names)
        self.storage_options = dict(storage_options or {})
        self.dtype, self.chunk_rows = dtype, int(chunk_rows)
        self.overwrite = bool(overwrite)
        self.compressors = None
        self.store_id = store_id
        self.sizes, self.n = [int(d) for d in sizes], int(n)
        self.finalized = True
        self.digests = dict(digests)
        self._lock = threading.RLock()
        self._arrays = None
        self._buffer = {k: [] for k in self.block_names}
        self._buffered = 0
        self._thread, self._pending = None, []
        self.location = location
        self._group = open_zarr_group(location, "r", self.storage_options)
        self._staging = None  # kept if not published: the fit may resume
        self.check_owner("finishing")
        return self

    @property
    def published(self) -> bool:
        """Whether the store is at its path."""
        return self.location == self.path

    def check_owner(self, doing: str) -> None:
        """Raise [StoreReplacedError][pydvl_datainf.errors.StoreReplacedError]
        unless the store being written is still this writer's."""
        now = store_id_at(self.location, self.storage_options)
        if now != self.store_id:
            raise replaced_error(self.path, self.store_id, now, doing)

    def group(self, doing: str) -> Any:
        """The store's group, open for writing, after checking it is ours."""
        self.check_owner(doing)
        if self._group is None or self._group.read_only:
            self._group = open_zarr_group(self.location, "r+", self.storage_options)
        return self._group

    def _create_arrays(self, first: Mapping[str, torch.Tensor]) -> None:
        if self.dtype is None:
            dt = next(iter(first.values())).dtype
            self.dtype = dt if dt in STORE_DTYPES.values() else torch.float32
        self.sizes = [int(first[k].shape[1]) for k in self.block_names]
        item = torch.empty(0, dtype=self.dtype).element_size()
        if self.chunk_rows is None:
            self.chunk_rows = default_chunk_rows(sum(self.sizes) * item)
        self._arrays = create_grad_arrays(
            self._group, self.sizes, self.chunk_rows, self.dtype, self.compressors
        )
        for name in grad_names(len(self.block_names)):
            self.digests[name] = DigestTable((0, 1))

    def append(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Append dense rows `{block: (b, d_l)}` (written when a chunk is full)."""
        with self._lock:
            if self._arrays is None:
                self._create_arrays(grads)
            assert self.dtype is not None and self.chunk_rows is not None
            for k, g in grads.items():
                self._buffer[k].append(stored_rows(k, g, self.dtype))
            rows = len(next(iter(grads.values())))
            self._buffered += rows
            self.n += rows
            while self._buffered >= self.chunk_rows:
                self._flush(self.chunk_rows)

    def _flush(self, rows: int) -> None:
        """Write the first `rows` buffered rows at the end of every array, in a
        background thread (at most one write pending)."""
        start = self.n - self._buffered
        heads = []
        for k in self.block_names:
            parts = self._buffer[k]
            data = parts[0] if len(parts) == 1 else np.concatenate(parts)
            heads.append(data[:rows])
            tail = data[rows:]
            self._buffer[k] = [tail] if len(tail) else []
        self._buffered -= rows
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="datainf-write")
        self._pending.append(self._thread.submit(self._write, start, rows, heads))
        while len(self._pending) > 1:
            self._pending.pop(0).result()
            trim_heap()

    def _write(self, start: int, rows: int, heads: List[np.ndarray]) -> None:
        assert self._arrays is not None
        self.check_owner("writing")
        names = grad_names(len(self.block_names))
        for arr, name, head in zip(self._arrays, names, heads):
            arr.resize((start + rows, arr.shape[1]))
            arr[start : start + rows] = head
            table = self.digests[name]
            table.grow(arr.shape, arr.chunks)
            table.record_region((start, 0), head, arr.chunks)

    def drain(self) -> None:
        """Wait for pending writes (re-raising their errors) and stop the thread."""
        try:
            while self._pending:
                self._pending.pop(0).result()
        finally:
            if self._thread is not None:
                self._thread.shutdown(wait=True)
                self._thread = None

    def finalize(self) -> None:
        """Write what is buffered, then the manifest: no more rows."""
        with self._lock:
            if self.finalized:
                return
            if self._arrays is None:
                raise RuntimeError("Cannot finalize an empty Zarr gradient store")
            if self._buffered:
                self._flush(self._buffered)
            self.drain()
            group = self.group("finishing")
            names = grad_names(len(self.block_names))
            write_manifest(group, names, {k: self.digests[k] for k in names})
            group.attrs.update({"n": self.n, "finalized": True})
            self.finalized = True
        logger.info(
            "Wrote %d gradient rows (%s) to %s",
            self.n,
            dtype_name(self.dtype) if self.dtype else "?",
            self.path,
        )

    def save_fit_state(self, state: FitState) -> None:
        """Write the norms and the fit's identity, then mark the store complete."""
        if not self.finalized:
            raise RuntimeError("Finalize the store before saving the fit state")
        group = self.group("saving the fit state of")
        self.digests.update(write_fit_state(group, self.block_names, state))
        self.check_owner("saving the fit state of")
        group.attrs["complete"] = True

    def save_array(self, name: str, values: np.ndarray, chunk_rows: int) -> None:
        """Write an extra array of the fit, bound to its places, into the manifest."""
        group = self.group("saving the fit state of")
        table = write_checked_array(
            group, name, values, (chunk_rows, *values.shape[1:])
        )
        write_manifest(group, [name], {name: table})
        self.digests[name] = table

    def publish(self) -> None:
        """Rename the finished store to its path (see
        [ZarrGradientStore.publish][pydvl_datainf.storage.zarr.ZarrGradientStore.publish])."""
        with self._lock:
            if self.published:
                return
            if not self.finalized:
                raise RuntimeError("Finalize the store before publishing it")
            self.drain()
            self.check_owner("publishing")
            publish_path(
                self.location, self.path, GRADIENT_STORE, overwrite=self.overwrite
            )
            if self._staging is not None:
                self._staging.detach()
                self._staging = None
            self.location = self.path
            self._group = None  # reopened if needed: it may be replaced already

    def close(self) -> None:
        """Stop writing; a store that was never published is removed."""
        with self._lock:
            try:
                self.drain()
            finally:
                if self._staging is not None and self._staging.alive:
                    self._staging()
