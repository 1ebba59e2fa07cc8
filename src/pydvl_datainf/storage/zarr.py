r"""Gradients in a Zarr group, on local disk or any fsspec URL, checksummed.

Example:
    ```python
    import torch
    from pydvl_datainf.storage import ZarrGradientStore

    store = ZarrGradientStore("grads.zarr", ["w"], dtype="bfloat16")
    store.append({"w": torch.randn(10, 4)})
    store.finalize()
    n_chunks = ZarrGradientStore.open("grads.zarr").verify()  # reads every chunk
    ```
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import weakref
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

import numpy as np
import torch

from ..errors import StoreMismatchError, StoreReplacedError
from ..factored import Rows, densify
from .base import FitState, GradientStore, trim_heap
from .chunks import CheckedChunks
from .digests import DigestTable
from .dtypes import STORE_DTYPES, dtype_name, numpy_to_torch, resolve_store_dtype
from .format import (
    FORMATS,
    GRADIENT_STORE,
    PathLike,
    check_path,
    load_digests,
    open_checked_array,
    open_zarr_group,
    read_manifest,
    read_or_replaced,
)
from .zarr_layout import (
    FORMAT_VERSION,
    WHAT,
    grad_names,
    norm_names,
    remove_directory,
    replaced_error,
    store_id_at,
)
from .zarr_writer import ZarrStoreWriter

__all__ = ["ZarrGradientStore", "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

_WHAT = WHAT
T = TypeVar("T")


class ZarrGradientStore(GradientStore):
    """Gradients in a Zarr group: one `(n, d_l)` array per block, chunked by rows.

    Written during `fit` in whole chunks of `chunk_rows` rows (rows are buffered
    until a chunk is full), so `fit` never holds more than one chunk. The group
    records, in its attributes: block names and sizes, dtype, chunk rows, $n$,
    $\\lambda_l$, the regularization spec, the SHA-256 of the fitted weights,
    the block structure and the library version; per-block squared norms are
    arrays. `complete` is set last, so an interrupted fit is recognisable.

    Safety (see the Guarantees page of the docs):

    - The store only replaces a directory that holds a gradient store written
      by this library (its `format` marker), and only with `overwrite=True`.
      A non-empty directory it did not create, or an influence matrix, is
      refused with [StoreExistsError][pydvl_datainf.errors.StoreExistsError]
      and never emptied.
    - Every chunk of gradients and norms carries a CRC-32C checksum, and the
      digest of every chunk is recorded by its place when it is written
      (see [digests][pydvl_datainf.storage.digests]); a manifest of the
      finished arrays and their digest tables is written last. Opening checks
      the metadata, the manifest, the array shapes and the digest tables;
      every read checks that each chunk exists, its checksum, and that it is
      the chunk written at that place;
      [verify][pydvl_datainf.storage.zarr.ZarrGradientStore.verify] reads
      everything. A missing, damaged, swapped or duplicated chunk raises
      [StoreCorruptError][pydvl_datainf.errors.StoreCorruptError], naming the
      array and the chunk; it never reads as zeros or as another chunk.
    - The store has an id, written when it is created. A writer checks it
      before every write, and a reader whose chunk check fails checks it
      too: a store replaced at the same path by another fit or process raises
      [StoreReplacedError][pydvl_datainf.errors.StoreReplacedError].
    - With `temporary_directory`, the store owns that directory and removes it
      on [close][pydvl_datainf.storage.zarr.ZarrGradientStore.close], when it is
      garbage-collected, and at interpreter exit.

    Gradients can be kept in `float16` or `bfloat16` to halve the disk; reads
    return float32, so all products accumulate in float32. `float16` overflows
    above 65504 (an error names the block); `bfloat16` keeps float32's range
    with 8 bits of mantissa.

    Layout:
        ```
        <path>/            attrs: format, version, block_names, block_sizes, dtype,
                                  chunk_rows, n, regularization, weights_digest, ...
        <path>/grads/<i>   (n, d_i), chunks (chunk_rows, d_i)
        <path>/norms/<i>   (n,), squared norms of block i
        <path>/digests/... the digest of every chunk of each array above
        ```
        `manifest` (in the attributes) lists every finished array with its
        shape, chunks and the SHA-256 of its digest table.

    Args:
        path: a local path or fsspec URL (`s3://bucket/grads.zarr`, ...).
        block_names: block names, in order.
        dtype: stored dtype (`"float16"`, `"bfloat16"`, `"float32"`,
            `"float64"`); `None` keeps the dtype of the gradients.
        chunk_rows: rows per chunk; `None` picks about 64 MiB per chunk.
        overwrite: replace an existing store; otherwise an existing store
            raises [StoreExistsError][pydvl_datainf.errors.StoreExistsError].
        storage_options: fsspec options for URLs (credentials, endpoints).
        compressors: Zarr compressors; default none (gradients compress
            badly). A CRC-32C checksum is always added after them.
        temporary_directory: a directory created for this store alone (the
            store's path is inside it); the store removes it on `close`, when
            garbage-collected, and at interpreter exit.

    Example:
        ```python
        import torch
        from pydvl_datainf.storage import ZarrGradientStore

        g = torch.randn(10, 4)
        store = ZarrGradientStore("grads.zarr", ["w"], dtype="bfloat16")
        store.append({"w": g})
        store.finalize()
        reopened = ZarrGradientStore.open("grads.zarr")
        rows = reopened.read(0, 3)["w"]
        assert rows.dtype == torch.float32  # kept in bfloat16, read as float32
        assert torch.equal(rows, g[:3].bfloat16().float())
        ```
    """

    _trim_heap = True

    def __init__(
        self,
        path: PathLike,
        block_names: Sequence[str],
        *,
        dtype: Union[None, str, torch.dtype] = None,
        chunk_rows: Optional[int] = None,
        overwrite: bool = False,
        storage_options: Optional[Mapping[str, Any]] = None,
        compressors: Any = None,
        temporary_directory: Optional[str] = None,
    ):
        super().__init__(block_names)
        self._cleanup: Optional[weakref.finalize] = None
        if temporary_directory is not None:
            self._cleanup = weakref.finalize(
                self, remove_directory, os.fspath(temporary_directory)
            )
        self.path = check_path(path)
        self.storage_options = dict(storage_options or {})
        if chunk_rows is not None and int(chunk_rows) <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        self._writer: Optional[ZarrStoreWriter] = ZarrStoreWriter(
            self.path,
            self.block_names,
            dtype=resolve_store_dtype(dtype),
            chunk_rows=None if chunk_rows is None else int(chunk_rows),
            overwrite=overwrite,
            storage_options=self.storage_options,
            compressors=compressors,
        )
        self._lock = threading.RLock()
        self._group: Any = None
        self._readers: Dict[str, CheckedChunks] = {}
        self._digests: Dict[str, DigestTable] = self._writer.digests
        self._store_id = self._writer.store_id
        self._location = self._writer.location
        self._dtype = self._writer.dtype
        self._chunk_rows = self._writer.chunk_rows
        self._sizes: List[int] = []
        self._n = 0

    @classmethod
    def from_writer(cls, writer: ZarrStoreWriter) -> ZarrGradientStore:
        """A finished store over what `writer` wrote (to save a fit's state
        into it and publish it), e.g. one assembled from partitions."""
        if not writer.finalized:
            raise RuntimeError("The writer has not finished its store")
        self = cls.__new__(cls)
        GradientStore.__init__(self, writer.block_names)
        self.path = writer.path
        self.storage_options = dict(writer.storage_options)
        self._cleanup = None
        self._writer = writer
        self._lock = threading.RLock()
        self._group = None
        self._readers = {}
        self._digests = writer.digests
        self._store_id = writer.store_id
        self._location = writer.location
        self._dtype, self._chunk_rows = writer.dtype, writer.chunk_rows
        self._n, self._sizes = writer.n, list(writer.sizes)
        self._finalized = True
        return self

    # --------------------------------------------------------------- reading
    @classmethod
    def open(
        cls,
        path: PathLike,
        storage_options: Optional[Mapping[str, Any]] = None,
    ) -> ZarrGradientStore:
        """Open a finalized store for reading.

        Checks the metadata: the format and its version, that the store was
        finalized, its manifest, the shapes and chunks of its arrays, and the
        digest tables that bind every chunk to its place. Reads check chunks;
        [verify][pydvl_datainf.storage.zarr.ZarrGradientStore.verify] checks
        all of them.

        Args:
            path: where it was written.
            storage_options: fsspec options for URLs.

        Raises:
            FileNotFoundError: nothing at `path`.
            StoreMismatchError: not a gradient store, written by an older
                format, or never finalized (the fit that wrote it was
                interrupted).
            StoreCorruptError: the manifest is missing, or an array or its
                digest table is missing, damaged or has another shape than
                was written.
        """
        import zarr.errors

        path = check_path(path)
        try:
            group = open_zarr_group(path, "r", storage_options)
        except zarr.errors.NodeNotFoundError as e:  # other errors propagate
            raise FileNotFoundError(f"No Zarr gradient store at {path!r}: {e}") from e
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMATS[GRADIENT_STORE]:
            raise StoreMismatchError(
                f"The Zarr group at {path!r} is not a pydvl-datainf gradient store "
                f"(format {attrs.get('format')!r})"
            )
        if int(attrs.get("format_version", 0)) < FORMAT_VERSION:
            raise StoreMismatchError(
                f"The gradient store at {path!r} was written in an older format "
                f"(version {attrs.get('format_version')}, this library writes "
                f"{FORMAT_VERSION}); fit again with overwrite=True to rewrite it."
            )
        if not attrs.get("finalized"):
            raise StoreMismatchError(
                f"The gradient store at {path!r} is incomplete: the fit that wrote "
                f"it did not finish. Fit again with overwrite."
            )
        self = cls.__new__(cls)
        GradientStore.__init__(self, attrs["block_names"])
        self.path = path
        self.storage_options = dict(storage_options or {})
        self._cleanup = None
        self._writer = None
        self._lock = threading.RLock()
        self._group = group
        self._readers = {}
        self._digests = {}
        self._store_id = str(attrs.get("store_id", ""))
        self._location = path
        self._dtype = STORE_DTYPES[attrs["dtype"]]
        self._chunk_rows = int(attrs["chunk_rows"])
        self._n = int(attrs["n"])
        self._sizes = [int(s) for s in attrs["block_sizes"]]
        self._finalized = True
        manifest = read_manifest(group, path, _WHAT)
        names = self._grad_names() + (
            self._norm_names() if attrs.get("complete") else []
        )
        for name in names:
            self._reader(name, manifest)
        return self

    @property
    def attrs(self) -> Dict[str, Any]:
        """The group's attributes (a copy)."""
        return dict(self._get_group().attrs)

    @property
    def n(self) -> int:
        return self._n

    @property
    def store_id(self) -> str:
        """A random id written when the store was created (another on overwrite)."""
        return self._store_id

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The stored dtype (`None` until the first append when not given)."""
        return self._dtype

    @property
    def block_sizes(self) -> List[int]:
        """$d_l$ per block (empty until the first append)."""
        return list(self._sizes)

    @property
    def chunk_rows(self) -> Optional[int]:
        return self._chunk_rows

    @property
    def nbytes(self) -> int:
        """Bytes of gradients on disk (uncompressed)."""
        if self._dtype is None:
            return 0
        item = torch.empty(0, dtype=self._dtype).element_size()
        return self._n * sum(self._sizes) * item

    @property
    def is_complete(self) -> bool:
        """Whether `fit` finished and saved its state in this store."""
        return bool(self._get_group().attrs.get("complete", False))

    def _get_group(self) -> Any:
        with self._lock:
            if self._group is None:
                self._group = open_zarr_group(self._location, "r", self.storage_options)
            return self._group

    def _grad_names(self) -> List[str]:
        return grad_names(len(self.block_names))

    def _norm_names(self) -> List[str]:
        return norm_names(len(self.block_names))

    def _reader(
        self, name: str, manifest: Optional[Mapping[str, Any]] = None
    ) -> CheckedChunks:
        """The checked chunk reader of array `name` (its digests: those recorded
        by this object when it wrote the array, else the store's, checked
        against the manifest)."""
        with self._lock:
            reader = self._readers.get(name)
            if reader is not None:
                return reader
            group = self._get_group()
            if manifest is None:
                manifest = read_manifest(group, self.path, _WHAT)
                self._check_owner("reading")
            arr = open_checked_array(
                group, name, self.path, manifest=manifest, what=_WHAT
            )
            table = self._digests.get(name)
            if table is None:
                table = load_digests(group, name, self.path, manifest, what=_WHAT)
                self._digests[name] = table
            reader = CheckedChunks(arr, name, self.path, table, what=_WHAT)
            self._readers[name] = reader
            return reader

    def disk_store_id(self) -> Optional[str]:
        """The id of the store now where this one is (`None` if there is none)."""
        return store_id_at(self._location, self.storage_options)

    def _replaced(self, doing: str) -> Optional[StoreReplacedError]:
        """The error to raise if the store at this path is no longer this one."""
        now = self.disk_store_id()
        if now == self._store_id:
            return None
        return replaced_error(self.path, self._store_id, now, doing)

    def _check_owner(self, doing: str) -> None:
        """Raise unless the store at this path is still this store."""
        error = self._replaced(doing)
        if error is not None:
            raise error

    def _checked(self, read: Callable[..., T], *args: Any) -> T:
        """`read(*args)`; any failed read of a store that was replaced (a
        chunk check, or a file that a rename took away) says so."""
        return read_or_replaced(lambda: read(*args), lambda: self._replaced("reading"))

    def read(self, start: int, stop: int) -> Dict[str, torch.Tensor]:
        assert self._dtype is not None
        dtype = self._dtype
        return self._checked(
            lambda: {
                k: numpy_to_torch(self._reader(name).read_rows(start, stop), dtype)
                for k, name in zip(self.block_names, self._grad_names())
            }
        )

    def verify(self, progress: bool = False) -> int:
        """Read every chunk of every array, checking that it exists, its
        checksum, and that it is the chunk written at its place, after the
        checks of [open][pydvl_datainf.storage.zarr.ZarrGradientStore.open].

        Costs one full read of the store.

        Args:
            progress: show a progress bar.

        Returns:
            The number of chunks checked.

        Raises:
            StoreCorruptError: the first missing, damaged or misplaced chunk,
                naming the array and the chunk.
            StoreReplacedError: another store is at this path now.

        Example:
            ```python
            import torch
            from pydvl_datainf.storage import ZarrGradientStore

            store = ZarrGradientStore("grads.zarr", ["a", "b"], chunk_rows=4)
            store.append({"a": torch.randn(10, 3), "b": torch.randn(10, 2)})
            store.finalize()
            print(ZarrGradientStore.open("grads.zarr").verify())  # chunks read
            ```
        """
        from tqdm.auto import tqdm

        if not self._finalized:
            raise RuntimeError("Finalize the store before verifying it")
        self._check_owner("verifying")
        manifest = read_manifest(self._get_group(), self.path, _WHAT)
        names = [k for k in manifest if k in self._digests or "digests" in manifest[k]]
        checked = 0
        for name in tqdm(names, desc="Verifying", disable=not progress):
            checked += self._checked(self._reader(name, manifest).verify)
        logger.info("Verified %d chunks of %s", checked, self.path)
        return checked

    def iter_chunks(
        self, rows: int, wanted: Optional[Iterable[int]] = None, buffers: int = 0
    ) -> Iterator[Tuple[int, int, Dict[str, torch.Tensor]]]:
        """Yield `(chunk_index, start_row, grads)` for chunks of exactly `rows` rows.

        With `rows` equal to the store's chunk rows, each stored chunk is read
        whole and checked ([CheckedChunks][pydvl_datainf.storage.chunks.CheckedChunks]);
        with `buffers > 0` and chunks stored raw on a local disk (no
        compressors), straight from their files into one of `buffers` sets of
        buffers used in rotation. Otherwise as
        [GradientStore.iter_chunks][pydvl_datainf.storage.base.GradientStore.iter_chunks].
        """
        if rows != self._chunk_rows or not self._finalized:
            yield from super().iter_chunks(rows, wanted, buffers)
            return
        assert self._dtype is not None
        readers = self._checked(
            lambda: [self._reader(name) for name in self._grad_names()]
        )
        ring = [[r.new_buffer() for r in readers] for _ in range(max(0, buffers))]
        dtype = self._dtype

        def read(
            c: int, bufs: Sequence[Optional[np.ndarray]]
        ) -> Dict[str, torch.Tensor]:
            return {
                name: numpy_to_torch(r.read((c, 0), buffer=b), dtype)
                for name, r, b in zip(self.block_names, readers, bufs)
            }

        for j, c in enumerate(self.wanted_chunks(rows, wanted)):
            bufs = ring[j % buffers] if ring else [None] * len(readers)
            data = self._checked(read, c, bufs)
            yield c, c * rows, data
            del data
            if not ring:
                trim_heap()

    def chunks(
        self, rows: Optional[int] = None
    ) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
        step = (self._chunk_rows or 1024) if rows is None else max(1, rows)
        for start in range(0, self._n, step):
            yield start, self.read(start, start + step)

    def take(self, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        assert self._dtype is not None and self._chunk_rows is not None
        idx = index.detach().to("cpu", torch.long).numpy()
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self._n):
            bad = int(idx.max()) if int(idx.max()) >= self._n else int(idx.min())
            raise IndexError(f"Row {bad} is out of range (n={self._n})")
        step = self._chunk_rows
        chunk_of = idx // step
        touched = np.unique(chunk_of)
        dtype = self._dtype

        def gather() -> Dict[str, torch.Tensor]:
            out: Dict[str, torch.Tensor] = {}
            for k, name in zip(self.block_names, self._grad_names()):
                reader = self._reader(name)
                rows = np.empty((len(idx), *reader.shape[1:]), dtype=reader.arr.dtype)
                for c in touched:
                    at = chunk_of == c
                    values = reader.read((int(c), 0))
                    rows[at] = values[idx[at] - int(c) * step]
                out[k] = numpy_to_torch(rows, dtype)
            return out

        return self._checked(gather)

    def load_fit_state(self) -> FitState:
        """The [FitState][pydvl_datainf.storage.FitState] saved by `fit`.

        Raises:
            StoreMismatchError: the fit that wrote the store did not finish.
        """
        attrs = self.attrs
        if not attrs.get("complete"):
            raise StoreMismatchError(
                f"The gradient store at {self.path!r} is incomplete: the fit that "
                f"wrote it did not finish. Fit again with overwrite."
            )
        if str(attrs.get("store_id", "")) != self._store_id:
            self._check_owner("reading")
        norms = self._checked(
            lambda: {
                k: torch.from_numpy(np.array(self._reader(name).read_rows(0, self._n)))
                for k, name in zip(self.block_names, self._norm_names())
            }
        )
        return FitState(
            n_train=int(attrs["n"]),
            regularization={k: float(v) for k, v in attrs["regularization"].items()},
            regularization_spec=dict(attrs["regularization_spec"]),
            regularization_scale=float(attrs["regularization_scale"]),
            squared_norms=norms,
            weights_digest=str(attrs["weights_digest"]),
            block_structure={k: list(v) for k, v in attrs["block_structure"].items()},
            block_shapes={
                k: [list(s) for s in v] for k, v in attrs["block_shapes"].items()
            },
            frozen_digest=str(attrs.get("frozen_digest", "")),
            rows_digest=str(attrs.get("rows_digest", "")),
            extra=dict(attrs.get("fit_extra") or {}),
        )

    def content_digest(self) -> str:
        """SHA-256 of the gradients' chunk digests, by place: the same for the
        same rows in the same chunks (e.g. to key an index of the rows
        without reading them).

        Example:
            ```python
            import torch
            from pydvl_datainf.storage import ZarrGradientStore

            g = torch.randn(10, 3)
            for path in ("a.zarr", "b.zarr"):
                s = ZarrGradientStore(path, ["w"], chunk_rows=4)
                s.append({"w": g})
                s.finalize()
            a, b = ZarrGradientStore.open("a.zarr"), ZarrGradientStore.open("b.zarr")
            assert a.content_digest() == b.content_digest()
            ```
        """
        h = hashlib.sha256(f"{self._n}|{self._sizes}|".encode())
        for name in self._grad_names():
            h.update(self._reader(name).digests.sha256().encode())
        return h.hexdigest()

    def load_array(self, name: str) -> Optional[np.ndarray]:
        """An extra array written by `save_array`, checked; `None` if the
        manifest does not list it."""
        manifest = read_manifest(self._get_group(), self.path, _WHAT)
        if name not in manifest:
            return None
        reader = self._reader(name, manifest)
        return np.array(self._checked(lambda: reader.read_rows(0, reader.shape[0])))

    # --------------------------------------------------------------- writing
    def _writing(self) -> ZarrStoreWriter:
        if self._writer is None:
            raise RuntimeError(
                f"The gradient store at {self.path!r} was opened for reading; "
                f"write a new one with ZarrGradientStore(path, ..., overwrite=True)"
            )
        return self._writer

    def append(self, grads: Mapping[str, Rows]) -> None:
        self._check_append(grads)
        writer = self._writing()
        writer.append({k: densify(g) for k, g in grads.items()})
        self._n = writer.n
        self._dtype, self._chunk_rows = writer.dtype, writer.chunk_rows
        self._sizes = list(writer.sizes)

    def finalize(self, publish: bool = True) -> None:
        """Write what is buffered, seal the store (no more appends) and, with
        `publish`, [publish][pydvl_datainf.storage.zarr.ZarrGradientStore.publish] it."""
        with self._lock:
            if not self._finalized:
                self._writing().finalize()
                super().finalize()
            if publish:
                self.publish()

    def publish(self) -> None:
        """Move the store, built aside, to its path (one atomic rename).

        A local store is written beside its path, under a temporary name, and
        renamed into place only when it is complete: a reader never sees a
        half-written store, an interrupted fit leaves the path as it was, and
        of two fits started at once into one new path, one publishes and the
        other gets [StoreExistsError][pydvl_datainf.errors.StoreExistsError].
        With `overwrite=True`, the store that was there is replaced only now.
        Stores on object stores (fsspec URLs) are written in place. Safe to
        call more than once.

        Raises:
            StoreExistsError: the path holds an output (and not `overwrite`),
                or another process published there at the same time.
        """
        with self._lock:
            writer = self._writer
            if writer is None or writer.published:
                return
            if not self._finalized:
                raise RuntimeError("Finalize the store before publishing it")
            writer.publish()
            self._location = self.path
            self._group, self._readers = None, {}

    def save_fit_state(self, state: FitState) -> None:
        if not self._finalized:
            raise RuntimeError("Finalize the store before saving the fit state")
        self._writing().save_fit_state(state)
        with self._lock:
            for name in self._norm_names():
                self._readers.pop(name, None)

    def save_array(self, name: str, values: np.ndarray, chunk_rows: int) -> None:
        """Write an extra array of this fit (e.g. the row index), bound to its
        place like the gradients, and list it in the manifest."""
        self._writing().save_array(name, values, chunk_rows)
        with self._lock:
            self._readers.pop(name, None)

    # ------------------------------------------------------------ pickling
    def __getstate__(self) -> Dict[str, Any]:
        if not self._finalized:
            raise RuntimeError("A Zarr gradient store can only be pickled after fit")
        state = self.__dict__.copy()
        for k in ("_lock", "_group", "_readers", "_writer"):
            state.pop(k, None)
        state["_cleanup"] = None  # a copy never owns the temporary directory
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._group = None
        self._readers = {}
        self._writer = None

    def close(self) -> None:
        """Stop the writer; remove a store that was never published, and, if
        the store owns a temporary directory, that directory (with the
        gradients). Safe to call more than once."""
        with self._lock:
            try:
                if self._writer is not None:
                    self._writer.close()
            finally:
                if self._cleanup is not None and self._cleanup.alive:
                    self._cleanup()
                    self._group, self._readers = None, {}

    @property
    def temporary_directory(self) -> Optional[str]:
        """The temporary directory the store owns and removes, if any."""
        if self._cleanup is None or not self._cleanup.alive:
            return None
        info = self._cleanup.peek()
        return None if info is None else str(info[2][0])

    def __repr__(self) -> str:
        dt = dtype_name(self._dtype) if self._dtype else "?"
        return f"ZarrGradientStore({self.path!r}, n={self._n}, dtype={dt})"
