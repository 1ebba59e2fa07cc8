r"""A gradient store written by fixed partitions of rows, by any number of processes.

The fit on Dask ([dask_fit][pydvl_datainf.dask_fit]) splits the training rows
into fixed partitions, aligned with the store's chunks and with the loader's
batches. Each task writes the chunks of its own rows (no two tasks share a
chunk), then a small record of the partition (its rows' squared norms, their
digests, the digests of its chunks) and, last, the partition's mark: a digest
of the store's id, the partition and that record. When every partition is
marked, the client assembles the store: it reads the records back (each one
checked against its mark), writes the manifest with the digest tables, and
adopts the store as an ordinary finished
[ZarrGradientStore][pydvl_datainf.storage.zarr.ZarrGradientStore], which
`fit` then publishes.

The unfinished store is kept beside its path, as `.<name>.partial` (at the
path itself for fsspec URLs), and records the identity of the fit it belongs
to: a fit interrupted for any reason resumes with the partitions that are not
marked, and a fit of anything else (other weights, loss, blocks, rows, batch
size, chunks or partitions) refuses to resume it.

Example:
    ```python
    import torch
    from pydvl_datainf.storage import ZarrGradientStore
    from pydvl_datainf.storage.partitioned import PartitionedStore
    from pydvl_datainf.rows import row_digests

    g = {"w": torch.randn(10, 3)}
    x, y = torch.randn(10, 2), torch.arange(10)
    parts = PartitionedStore.create("p.zarr", ["w"], [3], 10, dtype=torch.float32,
                                    chunk_rows=2, partition_rows=4,
                                    identity={"fit": "example"})
    for pid in parts.pending():                  # any order, any process
        lo, hi = parts.partitions[pid]
        rows = ({"w": g["w"][lo:hi]}, {"w": (g["w"][lo:hi] ** 2).sum(1)},
                row_digests(x[lo:hi], y[lo:hi]))
        parts.write_partition(pid, [rows])
    writer, norms, digests = parts.finish()
    writer.publish()
    assert torch.equal(ZarrGradientStore.open("p.zarr").read(0, 10)["w"], g["w"])
    ```
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import (
    Any,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import numpy as np
import torch

from ..errors import StoreCorruptError, StoreExistsError, StoreMismatchError
from ..rows import DIGEST_BYTES
from .digests import DigestTable, chunk_digest, place_mark
from .format import (
    GRADIENT_STORE,
    PathState,
    check_path,
    create_checked_array,
    inspect_path,
    is_url,
    open_zarr_group,
    read_checked,
    remove_owned,
    write_checked_array,
    write_manifest,
)
from .zarr_layout import (
    WHAT,
    claim_store,
    create_grad_arrays,
    grad_names,
    replaced_error,
    store_id_at,
    stored_rows,
)
from .zarr_writer import ZarrStoreWriter

__all__ = ["PartitionedStore", "partial_path"]

logger = logging.getLogger(__name__)

RowBatch = Tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], List[bytes]]
"""`(gradients, squared norms, row digests)` of consecutive rows, per block."""

_RECOVER = (
    "Fit again with resume=True to recompute the damaged partitions' records, or "
    "with overwrite=True to start again."
)


def partial_path(path: str) -> str:
    """Where an unfinished partitioned fit for `path` is kept.

    Example:
        >>> partial_path("/data/grads.zarr")
        '/data/.grads.zarr.partial'
    """
    if is_url(path):
        return path
    a = os.path.abspath(path)
    return os.path.join(os.path.dirname(a), f".{os.path.basename(a)}.partial")


class PartitionedStore:
    """A gradient store of `n` rows written by fixed partitions (see module docs).

    Create or resume one with [create][pydvl_datainf.storage.partitioned.PartitionedStore.create];
    it pickles small, so tasks on other processes receive it.

    Attributes:
        path: where the finished store is published.
        location: where it is written until then.
        store_id: its id (the owner of every write).
        partitions: `(lo, hi)` rows of each partition.
    """

    def __init__(
        self,
        path: str,
        location: str,
        store_id: str,
        block_names: Sequence[str],
        sizes: Sequence[int],
        n: int,
        *,
        dtype: torch.dtype,
        chunk_rows: int,
        partition_rows: int,
        overwrite: bool,
        storage_options: Optional[Mapping[str, Any]] = None,
    ):
        self.path = path
        self.location = location
        self.store_id = store_id
        self.block_names = list(block_names)
        self.sizes = [int(d) for d in sizes]
        self.n = int(n)
        self.dtype = dtype
        self.chunk_rows = int(chunk_rows)
        self.partition_rows = int(partition_rows)
        self.overwrite = bool(overwrite)
        self.storage_options = dict(storage_options or {})
        self.partitions: List[Tuple[int, int]] = [
            (lo, min(self.n, lo + self.partition_rows))
            for lo in range(0, self.n, self.partition_rows)
        ]

    # ------------------------------------------------------------ create
    @classmethod
    def create(
        cls,
        path: str,
        block_names: Sequence[str],
        sizes: Sequence[int],
        n: int,
        *,
        dtype: torch.dtype,
        chunk_rows: int,
        partition_rows: int,
        identity: Mapping[str, Any],
        overwrite: bool = False,
        resume: bool = False,
        storage_options: Optional[Mapping[str, Any]] = None,
        compressors: Any = None,
    ) -> PartitionedStore:
        """A new partitioned store for `path`, or the unfinished one to resume.

        Args:
            path: where the finished store is published.
            block_names: block names, in order.
            sizes: $d_l$ per block.
            n: number of rows.
            dtype: stored dtype.
            chunk_rows: rows per chunk.
            partition_rows: rows per partition, a multiple of `chunk_rows`.
            identity: what the fit depends on (JSON values); resuming with
                anything else is refused.
            overwrite: replace a store of ours at `path` when publishing, and
                an unfinished one.
            resume: go on with an unfinished store of the same fit.
            storage_options: fsspec options for URLs.
            compressors: Zarr compressors.

        Raises:
            StoreExistsError: an unfinished store is there and neither
                `resume` nor `overwrite`; `path` holds a store and not
                `overwrite`; something there is not ours.
            StoreMismatchError: resuming an unfinished store of another fit.
            ValueError: partitions not aligned with the chunks; an empty path.
        """
        path = check_path(path)
        if n <= 0:
            raise ValueError(f"A partitioned store needs rows, got n={n}")
        if chunk_rows <= 0 or partition_rows <= 0 or partition_rows % chunk_rows:
            raise ValueError(
                f"partition_rows ({partition_rows}) must be a positive multiple of "
                f"chunk_rows ({chunk_rows})"
            )
        location = partial_path(path)
        layout = {
            "n": int(n),
            "block_names": list(block_names),
            "block_sizes": [int(d) for d in sizes],
            "chunk_rows": int(chunk_rows),
            "partition_rows": int(partition_rows),
            "dtype": str(dtype).replace("torch.", ""),
        }
        want = {**dict(identity), **layout}

        def make(store_id: str) -> PartitionedStore:
            return cls(
                path,
                location,
                store_id,
                block_names,
                sizes,
                n,
                dtype=dtype,
                chunk_rows=chunk_rows,
                partition_rows=partition_rows,
                overwrite=overwrite,
                storage_options=storage_options,
            )

        found = inspect_path(location, storage_options, GRADIENT_STORE)
        unfinished = found.state == PathState.OWNED
        if unfinished and resume:
            have = dict(found.attrs.get("partition_identity") or {})
            differ = sorted(
                k for k in set(want) | set(have) if have.get(k) != want.get(k)
            )
            if differ:
                raise StoreMismatchError(
                    f"The unfinished fit at {location!r} was started for another fit "
                    f"(differing: {differ}); it cannot be resumed with this one. "
                    f"Pass overwrite=True to start again."
                )
            logger.info("Resuming the unfinished fit at %s", location)
            return make(str(found.attrs["store_id"]))
        if unfinished and not overwrite:
            raise StoreExistsError(
                f"An unfinished fit of a gradient store for {path!r} is at "
                f"{location!r}. Pass resume=True to finish it, or overwrite=True to "
                f"start again."
            )
        if found.state != PathState.ABSENT and location != path:
            remove_owned(location, GRADIENT_STORE, storage_options)  # ours: checked
        store_id = uuid.uuid4().hex
        _, group = claim_store(
            path,
            {
                "block_names": list(block_names),
                "store_id": store_id,
                "partition_identity": want,
            },
            overwrite=overwrite,
            storage_options=storage_options,
            staging=location,
        )
        create_grad_arrays(group, sizes, chunk_rows, dtype, compressors, n=n)
        out = make(store_id)
        create_checked_array(
            group,
            "partitions_done",
            shape=(len(out.partitions),),
            chunks=(1,),
            dtype="int64",
        )
        return out

    # ------------------------------------------------------------ state
    def _group(self, mode: str = "r") -> Any:
        self.check_owner("writing" if mode != "r" else "reading")
        return open_zarr_group(self.location, mode, self.storage_options)  # type: ignore[arg-type]

    def check_owner(self, doing: str) -> None:
        """Raise unless the store being written is still this one."""
        now = store_id_at(self.location, self.storage_options)
        if now != self.store_id:
            raise replaced_error(self.path, self.store_id, now, doing)

    def marks(self) -> np.ndarray:
        """The partitions' marks (`0`: not done, or unreadable)."""
        arr = self._group()["partitions_done"]
        out = np.zeros(arr.shape, dtype=np.int64)
        for i in range(len(out)):
            try:
                out[i] = int(arr[i])
            except Exception:  # a torn or damaged mark: not done
                out[i] = 0
        return out

    def pending(self) -> List[int]:
        """Partitions not marked as done, in order."""
        return [int(i) for i in np.flatnonzero(self.marks() == 0)]

    def _chunk_range(self, pid: int) -> range:
        lo, hi = self.partitions[pid]
        return range(lo // self.chunk_rows, -(-hi // self.chunk_rows))

    # ------------------------------------------------------------ a task
    def write_partition(self, pid: int, batches: Iterable[RowBatch]) -> None:
        """Write partition `pid` from its rows in order, then mark it done.

        Args:
            pid: the partition.
            batches: `(gradients, squared norms, row digests)` of consecutive
                rows from the partition's first row to its last, dense, per
                block.

        Raises:
            StoreReplacedError: the store was replaced while being written.
            ValueError: other rows than the partition's.
        """
        lo, hi = self.partitions[pid]
        group = self._group("r+")
        arrays = [group[name] for name in grad_names(len(self.block_names))]
        digests = np.zeros((len(self._chunk_range(pid)), len(arrays)), dtype=np.int64)
        buffers: Dict[str, List[np.ndarray]] = {k: [] for k in self.block_names}
        norms: Dict[str, List[torch.Tensor]] = {k: [] for k in self.block_names}
        rows: List[bytes] = []
        start = lo  # the first row not yet written

        def flush(stop: int) -> None:
            nonlocal start
            self.check_owner("writing")
            c = start // self.chunk_rows
            for j, (k, arr) in enumerate(zip(self.block_names, arrays)):
                data = (
                    np.concatenate(buffers[k]) if len(buffers[k]) > 1 else buffers[k][0]
                )
                arr[start:stop] = data[: stop - start]
                digests[c - lo // self.chunk_rows, j] = chunk_digest(
                    data[: stop - start]
                )
                rest = data[stop - start :]
                buffers[k] = [rest] if len(rest) else []
            start = stop

        seen = lo
        for grads, sq, ds in batches:
            b = len(ds)
            for k in self.block_names:
                buffers[k].append(stored_rows(k, grads[k], self.dtype))
                norms[k].append(sq[k].detach().to("cpu"))
            rows.extend(ds)
            seen += b
            while seen - start >= self.chunk_rows and start + self.chunk_rows <= hi:
                flush(start + self.chunk_rows)
        if seen != hi:
            raise ValueError(
                f"Partition {pid} holds rows {lo}..{hi - 1}, but {seen - lo} rows "
                f"were given"
            )
        if start < hi:
            flush(hi)
        record = {
            "norms": np.stack(
                [torch.cat(norms[k]).numpy() for k in self.block_names], axis=1
            ),
            "rows": np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(
                -1, DIGEST_BYTES
            ),
            "digests": digests,
        }
        crcs = []
        for name, values in record.items():
            write_checked_array(group, f"partials/{pid}/{name}", values, values.shape)
            crcs.append(chunk_digest(values))
        self.check_owner("writing")
        group["partitions_done"][pid] = place_mark(
            self.store_id, "partition", (pid,), crcs
        )

    def _read_record(self, group: Any, pid: int, mark: int) -> Dict[str, np.ndarray]:
        out: Dict[str, np.ndarray] = {}
        crcs = []
        for name in ("norms", "rows", "digests"):
            key = f"partials/{pid}/{name}"
            arr = group[key]
            values = np.asarray(
                read_checked(
                    arr,
                    key,
                    self.path,
                    tuple(slice(0, s) for s in arr.shape),
                    what=WHAT,
                    recover=_RECOVER,
                )
            )
            out[name] = values
            crcs.append(chunk_digest(values))
        if mark != place_mark(self.store_id, "partition", (pid,), crcs):
            raise StoreCorruptError(
                f"The unfinished {WHAT} at {self.location!r} is damaged: the record "
                f"of partition {pid} is not the one its mark was written for. "
                f"{_RECOVER}"
            )
        return out

    def records(self) -> Dict[int, Dict[str, np.ndarray]]:
        """The records of the partitions marked done, each checked."""
        group = self._group()
        marks = self.marks()
        return {
            pid: self._read_record(group, pid, int(marks[pid]))
            for pid in np.flatnonzero(marks)
        }

    def unmark(self, pids: Iterable[int]) -> None:
        """Forget these partitions, so that they are written again."""
        arr = self._group("r+")["partitions_done"]
        for pid in pids:
            arr[int(pid)] = 0

    # ------------------------------------------------------------ assemble
    def finish(
        self,
    ) -> Tuple[ZarrStoreWriter, Dict[str, torch.Tensor], np.ndarray]:
        """Assemble the store once every partition is done.

        Returns:
            The finished store's writer (to save the fit's state and publish
            it), the squared norms `{block: (n,)}`, and the rows' digests
            `(n, 16)`, in row order.

        Raises:
            RuntimeError: partitions are not done.
            StoreCorruptError: a damaged record.
        """
        pending = self.pending()
        if pending:
            raise RuntimeError(f"Partitions {pending[:10]} are not done")
        records = self.records()
        order = range(len(self.partitions))
        norms_all = np.concatenate([records[p]["norms"] for p in order])
        rows = np.concatenate([records[p]["rows"] for p in order])
        digests = np.concatenate([records[p]["digests"] for p in order])
        n_chunks = -(-self.n // self.chunk_rows)
        if digests.shape[0] != n_chunks or len(rows) != self.n:
            raise StoreCorruptError(
                f"The unfinished {WHAT} at {self.location!r} has records for "
                f"{len(rows)} rows in {digests.shape[0]} chunks, not {self.n} rows "
                f"in {n_chunks}. {_RECOVER}"
            )
        names = grad_names(len(self.block_names))
        tables = {
            name: DigestTable((n_chunks, 1), digests[:, j : j + 1].copy())
            for j, name in enumerate(names)
        }
        self.check_owner("finishing")
        group = self._group("r+")
        write_manifest(group, names, tables)
        group.attrs.update({"finalized": True})
        norms = {
            k: torch.from_numpy(np.ascontiguousarray(norms_all[:, j]))
            for j, k in enumerate(self.block_names)
        }
        writer = ZarrStoreWriter.adopt(
            self.path,
            self.location,
            self.store_id,
            self.block_names,
            sizes=self.sizes,
            n=self.n,
            dtype=self.dtype,
            chunk_rows=self.chunk_rows,
            digests=tables,
            overwrite=self.overwrite,
            storage_options=self.storage_options,
        )
        return writer, norms, rows
