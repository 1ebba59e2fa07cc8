r"""Top-k by maximum inner product over stored rows, in a saved and checked index.

A DataInf score is an inner product, $(R\,g_{t}) \cdot g_j$: the operator $R$
acts on the query side only. So the $k$ most helpful training rows for a test
point are the rows $g_j$ with the largest inner product with the query
$q_t = R\,g_t$ (summed over blocks: concatenate the blocks of the query and of
the rows). A maximum-inner-product (MIPS) index over the stored rows answers
it, and a new $\lambda$ changes the queries, never the index: it is rebuilt
only when the rows change. The most harmful rows are those with the largest
inner product with $-q_t$ (`largest=False`).

[MipsIndex][pydvl_datainf.storage.index.MipsIndex] wraps a FAISS index
(`pip install pydvl-datainf[scale]`):

| kind | search | memory per row | build |
| --- | --- | --- | --- |
| `"flat"` (default) | exact | $4k$ bytes ($2k$ with `storage="float16"`) | one copy of the rows |
| `"hnsw"` | approximate (graph) | $4k + 8M$ bytes | slow: $O(n \log n)$ graph insertions |
| `"ivf"` | approximate (inverted lists) | $4k$ bytes | a k-means on a sample, then one pass |

The approximate kinds search a Euclidean index of the rows augmented by one
coordinate, $x \mapsto (x, \sqrt{B^2 - \lVert x\rVert^2})$ with $B$ the largest
row norm, and the queries by a zero: the nearest neighbours in that space are
exactly the rows of largest inner product (Bachrach et al., 2014), which
graph and cluster indexes find far better than a raw inner-product search.
Their recall against the exact search is measured in
`benchmarks/bench_index.py`.

**On disk.** [save][pydvl_datainf.storage.index.MipsIndex.save] writes a
directory with the FAISS file and `index.json`: the format marker (the
directory is recognised as ours from its first write; anything else at the
path is never replaced), the SHA-256 and size of the file, the options, and
the digest of the rows it was built from
([rows_digest][pydvl_datainf.storage.index.rows_digest]).
[open][pydvl_datainf.storage.index.MipsIndex.open] refuses a damaged file
([StoreCorruptError][pydvl_datainf.errors.StoreCorruptError]) and, given the
digest of the current rows, a stale index
([StoreMismatchError][pydvl_datainf.errors.StoreMismatchError]);
[open_or_build][pydvl_datainf.storage.index.open_or_build] rebuilds it in
those cases. Local paths only.

Example:
    ```python
    import torch
    from pydvl_datainf.storage.index import MipsIndex, open_or_build, rows_digest

    rows = torch.randn(1000, 64)                 # stored (projected) training rows
    index = open_or_build("rows.index", rows)    # built and saved
    queries = torch.randn(3, 64)                 # R g_test, one per test point
    scores, ids = index.search(queries, k=10)    # the 10 most helpful rows each
    exact = (queries @ rows.T).topk(10).indices
    assert torch.equal(ids, exact)
    again = open_or_build("rows.index", rows)    # same rows: read back, not rebuilt
    assert again.rows_digest == rows_digest(rows)
    ```
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import StoreCorruptError, StoreExistsError, StoreMismatchError
from .format import PathState, inspect_path, library_version

__all__ = [
    "INDEX_FORMAT",
    "INDEX_FORMAT_VERSION",
    "INDEX_KINDS",
    "IndexOptions",
    "MipsIndex",
    "RowSource",
    "open_or_build",
    "recall_at_k",
    "rows_digest",
]

logger = logging.getLogger(__name__)

INDEX_FORMAT = "pydvl_datainf.mips_index"
"""The format marker in `index.json`."""
INDEX_FORMAT_VERSION = 1
INDEX_KINDS = ("flat", "hnsw", "ivf")
"""`"flat"`: exact; `"hnsw"`, `"ivf"`: approximate."""

MARKER = "index.json"
INDEX_FILE = "index.faiss"
_BLOCK = 1 << 20

RowSource = Union[torch.Tensor, np.ndarray, Callable[[], Iterable[Any]]]
"""The rows: a 2-D tensor or array (a memory map is read chunk by chunk), or a
function returning a fresh iterator over 2-D chunks of rows, in order (called
once per pass)."""


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - the extra is installed in tests
        raise ImportError(
            "the MIPS index needs FAISS: pip install 'pydvl-datainf[scale]'"
        ) from e
    return faiss


def _chunks(rows: RowSource, chunk_rows: int = 65536) -> Iterator[np.ndarray]:
    """The rows as C-contiguous 2-D float32 numpy chunks, in order."""
    if callable(rows):
        source: Iterable[Any] = rows()
    else:
        source = (rows[i : i + chunk_rows] for i in range(0, len(rows), chunk_rows))
    for chunk in source:
        if isinstance(chunk, torch.Tensor):
            chunk = chunk.detach().to("cpu", torch.float32).numpy()
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if chunk.ndim != 2:
            raise ValueError(f"rows must be 2-D chunks, got shape {chunk.shape}")
        yield chunk


def rows_digest(rows: RowSource) -> str:
    """SHA-256 over the rows as float32, in order, with their number and width.

    The same for any chunking of the same rows.

    Example:
        >>> x = torch.arange(12.0).reshape(4, 3)
        >>> rows_digest(x) == rows_digest(lambda: [x[:1], x[1:]])
        True
        >>> rows_digest(x) == rows_digest(x[:3])
        False
    """
    h = hashlib.sha256(b"float32 rows|")
    n, width = 0, None
    for chunk in _chunks(rows):
        if width is None:
            width = chunk.shape[1]
        elif chunk.shape[1] != width:
            raise ValueError(f"chunks of {chunk.shape[1]} and {width} columns")
        h.update(chunk.astype("<f4", copy=False).tobytes())
        n += len(chunk)
    h.update(f"|{n}x{width}".encode())
    return h.hexdigest()


def recall_at_k(found: torch.Tensor, exact: torch.Tensor) -> float:
    """The mean fraction of the exact top-k ids that were found, per query.

    Example:
        >>> recall_at_k(torch.tensor([[1, 2, 3]]), torch.tensor([[3, 2, 9]]))
        0.6666666666666666
    """
    hits = [
        len(set(a.tolist()) & set(b.tolist())) / max(1, len(b))
        for a, b in zip(found, exact)
    ]
    return float(sum(hits) / max(1, len(hits)))


@dataclass(frozen=True)
class IndexOptions:
    """How an index is built and searched.

    Attributes:
        kind: `"flat"` (exact), `"hnsw"` or `"ivf"` (approximate).
        storage: `"float32"` or `"float16"` (half the memory; the search is
            then exact for the rows rounded to float16).
        hnsw_m: HNSW: the graph degree $M$.
        ef_construction: HNSW: the candidate list while building.
        ef_search: HNSW: the candidate list while searching (more: higher
            recall, slower; changed without a rebuild).
        nlist: IVF: the number of clusters (default $4\\sqrt n$).
        nprobe: IVF: the clusters searched per query (changed without a
            rebuild).
        train_rows: IVF: rows sampled (evenly spaced) to train the clusters.
        seed: IVF: the k-means seed.
    """

    kind: str = "flat"
    storage: str = "float32"
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    nlist: Optional[int] = None
    nprobe: int = 32
    train_rows: int = 100_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"kind must be one of {INDEX_KINDS}, got {self.kind!r}")
        if self.storage not in ("float32", "float16"):
            raise ValueError(
                f"storage must be float32 or float16, not {self.storage!r}"
            )

    def build_key(self) -> Dict[str, Any]:
        """The options that change the built index (search options excluded)."""
        d = asdict(self)
        for search_only in ("ef_search", "nprobe"):
            d.pop(search_only)
        if self.kind != "hnsw":
            d.pop("hnsw_m")
            d.pop("ef_construction")
        if self.kind != "ivf":
            for k in ("nlist", "train_rows", "seed"):
                d.pop(k)
        return d


def _augment(chunk: np.ndarray, bound: float) -> np.ndarray:
    """Rows $(x, \\sqrt{B^2 - \\lVert x\\rVert^2})$: MIPS as a Euclidean search."""
    sq = np.einsum("ij,ij->i", chunk, chunk, dtype=np.float64)
    extra = np.sqrt(np.maximum(bound * bound - sq, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([chunk, extra[:, None]], axis=1))


def _stats(rows: RowSource) -> Tuple[int, int, float]:
    """(rows, columns, largest row norm) in one pass."""
    n, width, bound = 0, 0, 0.0
    for chunk in _chunks(rows):
        width = chunk.shape[1]
        n += len(chunk)
        if len(chunk):
            bound = max(
                bound, float(np.sqrt(np.einsum("ij,ij->i", chunk, chunk).max()))
            )
    return n, width, bound


class MipsIndex:
    """A maximum-inner-product index over stored rows (see the module docs).

    Build with [build][pydvl_datainf.storage.index.MipsIndex.build], read one
    back with [open][pydvl_datainf.storage.index.MipsIndex.open].

    Attributes:
        options: how it was built.
        n: the number of rows.
        dim: the width of the rows.
        rows_digest: [rows_digest][pydvl_datainf.storage.index.rows_digest] of
            the rows it was built from.
        norm_bound: the largest row norm (the approximate kinds' augmentation).
    """

    def __init__(
        self,
        index: Any,
        options: IndexOptions,
        n: int,
        dim: int,
        digest: str,
        norm_bound: float,
    ):
        self.index = index
        self.options = options
        self.n = n
        self.dim = dim
        self.rows_digest = digest
        self.norm_bound = norm_bound
        self.set_search(options.ef_search, options.nprobe)

    def __repr__(self) -> str:
        return (
            f"MipsIndex({self.options.kind}, {self.n} x {self.dim}, "
            f"{self.options.storage})"
        )

    def set_search(
        self, ef_search: Optional[int] = None, nprobe: Optional[int] = None
    ) -> None:
        """Changes the search options of an approximate index (no rebuild)."""
        faiss = _faiss()
        if ef_search is not None and self.options.kind == "hnsw":
            faiss.downcast_index(self.index).hnsw.efSearch = int(ef_search)
            self.options = _replace(self.options, ef_search=int(ef_search))
        if nprobe is not None and self.options.kind == "ivf":
            faiss.extract_index_ivf(self.index).nprobe = int(nprobe)
            self.options = _replace(self.options, nprobe=int(nprobe))

    # ------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        rows: RowSource,
        options: Optional[IndexOptions] = None,
        digest: Optional[str] = None,
        progress: bool = False,
    ) -> MipsIndex:
        """An index over `rows`.

        Args:
            rows: the stored rows (see [RowSource][pydvl_datainf.storage.index.RowSource]).
            options: how to build it (default: exact flat search, float32).
            digest: the rows' [rows_digest][pydvl_datainf.storage.index.rows_digest],
                if already known (else computed in the first pass).
            progress: show a progress bar over the rows added.

        Returns:
            The index, in memory ([save][pydvl_datainf.storage.index.MipsIndex.save]
            writes it).
        """
        faiss = _faiss()
        opts = options or IndexOptions()
        n, dim, bound = _stats(rows)
        if n == 0:
            raise ValueError("no rows to index")
        digest = digest or rows_digest(rows)
        quant = faiss.ScalarQuantizer.QT_fp16 if opts.storage == "float16" else None
        augmented = opts.kind != "flat"
        width = dim + 1 if augmented else dim
        if opts.kind == "flat":
            index = (
                faiss.IndexFlatIP(dim)
                if quant is None
                else faiss.IndexScalarQuantizer(dim, quant, faiss.METRIC_INNER_PRODUCT)
            )
        elif opts.kind == "hnsw":
            index = (
                faiss.IndexHNSWFlat(width, opts.hnsw_m)
                if quant is None
                else faiss.IndexHNSWSQ(width, quant, opts.hnsw_m)
            )
            index.hnsw.efConstruction = opts.ef_construction
        else:
            nlist = opts.nlist or max(1, min(n, int(4 * math.sqrt(n))))
            coarse = faiss.IndexFlatL2(width)
            index = (
                faiss.IndexIVFFlat(coarse, width, nlist)
                if quant is None
                else faiss.IndexIVFScalarQuantizer(coarse, width, nlist, quant)
            )
            index.cp.seed = opts.seed
            index.train(_sample(rows, n, min(n, max(opts.train_rows, nlist)), bound))
            opts = _replace(opts, nlist=nlist)
        if not index.is_trained:  # the float16 scalar quantizer has nothing to learn
            index.train(np.zeros((1, width), dtype=np.float32))
        with tqdm(total=n, desc=f"{opts.kind} index", disable=not progress) as bar:
            for chunk in _chunks(rows):
                index.add(_augment(chunk, bound) if augmented else chunk)
                bar.update(len(chunk))
        logger.info("built a %s index over %d x %d rows", opts.kind, n, dim)
        return cls(index, opts, n, dim, digest, bound)

    # ------------------------------------------------------------- searching
    def search(
        self, queries: torch.Tensor, k: int, largest: bool = True
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The `k` rows of largest (or smallest) inner product with each query.

        Args:
            queries: $(m, \\text{dim})$, e.g. $R\\,g_t$ concatenated over blocks.
            k: how many rows per query (at most `n`).
            largest: `True` for the largest inner products (most helpful),
                `False` for the smallest (most harmful).

        Returns:
            `(scores, ids)`, both $(m, k)$, best first: float32 inner products
            (recomputed from distances for the approximate kinds, to float32
            rounding) and int64 row ids. An approximate index may return fewer
            than `k` hits for a query; missing ids are $-1$.
        """
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"queries of shape {tuple(queries.shape)} for an index of "
                f"{self.dim} columns"
            )
        if not 0 < k <= self.n:
            raise ValueError(f"k must be in 1..{self.n}, got {k}")
        sign = 1.0 if largest else -1.0
        q = np.ascontiguousarray(
            sign * queries.detach().to("cpu", torch.float32).numpy(), dtype=np.float32
        )
        if self.options.kind == "flat":
            scores, ids = self.index.search(q, k)
        else:
            padded = np.concatenate([q, np.zeros((len(q), 1), np.float32)], axis=1)
            dist, ids = self.index.search(padded, k)
            qq = np.einsum("ij,ij->i", q, q)[:, None]
            scores = (qq + self.norm_bound**2 - dist) / 2
            scores[ids < 0] = -np.inf
        return sign * torch.from_numpy(np.ascontiguousarray(scores)), torch.from_numpy(
            ids
        )

    # ------------------------------------------------------------- disk
    def _marker(self, complete: bool, files: Dict[str, Any]) -> Dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "library_version": library_version(),
            "faiss_version": _faiss().__version__,
            "complete": complete,
            "options": asdict(self.options),
            "n": self.n,
            "dim": self.dim,
            "rows_digest": self.rows_digest,
            "norm_bound": self.norm_bound,
            "files": files,
        }

    def save(self, path: Union[str, os.PathLike], overwrite: bool = False) -> None:
        """Writes the index to the directory `path`.

        The marker is written first (the directory is ours from then on),
        then the FAISS file, then the marker with the file's checksum: a
        writer that dies leaves an index that
        [open][pydvl_datainf.storage.index.MipsIndex.open] refuses as
        incomplete and that `overwrite=True` replaces.

        Raises:
            StoreExistsError: an index is there and `overwrite` is false, or
                something else is there (never replaced).
        """
        root = Path(path)
        status = _claim(root, overwrite)
        root.mkdir(parents=True, exist_ok=True)
        if status != "owned":  # fresh: recognisable as ours before any data
            _write_json(root / MARKER, self._marker(False, {}))
        target = root / INDEX_FILE
        tmp = root / (INDEX_FILE + ".tmp")
        _faiss().write_index(self.index, str(tmp))
        os.replace(tmp, target)
        files = {
            INDEX_FILE: {"sha256": _file_sha256(target), "bytes": target.stat().st_size}
        }
        _write_json(root / MARKER, self._marker(True, files))

    @classmethod
    def open(
        cls,
        path: Union[str, os.PathLike],
        digest: Optional[str] = None,
        options: Optional[IndexOptions] = None,
    ) -> MipsIndex:
        """Reads back a saved index, after checking it.

        Args:
            path: the directory.
            digest: the [rows_digest][pydvl_datainf.storage.index.rows_digest]
                of the current rows: an index built from other rows is
                refused.
            options: refuse an index built with other build options (search
                options are applied).

        Raises:
            FileNotFoundError: nothing at `path`.
            StoreMismatchError: not an index of this library or version, stale
                (built from other rows), or built with other options.
            StoreCorruptError: incomplete (its writer died), or its file is
                missing or damaged (failed checksum).
        """
        root = Path(path)
        marker = _read_marker(root)
        where = f"the index at {str(root)!r}"
        if marker.get("format_version") != INDEX_FORMAT_VERSION:
            raise StoreMismatchError(
                f"{where} has format version {marker.get('format_version')!r}, this "
                f"library reads {INDEX_FORMAT_VERSION}; rebuild it (open_or_build)"
            )
        if not marker.get("complete"):
            raise StoreCorruptError(
                f"{where} is incomplete (its writer stopped before the end); rebuild "
                "it with open_or_build or save(..., overwrite=True)"
            )
        if digest is not None and marker["rows_digest"] != digest:
            raise StoreMismatchError(
                f"{where} is stale: it was built from other rows than the current "
                "ones (the store was rewritten or refitted); rebuild it with "
                "open_or_build or save(..., overwrite=True)"
            )
        built = IndexOptions(**marker["options"])
        if options is not None and options.build_key() != built.build_key():
            raise StoreMismatchError(
                f"{where} was built with {built.build_key()}, not "
                f"{options.build_key()}; rebuild it with open_or_build"
            )
        for name, info in marker["files"].items():
            file = root / name
            if not file.is_file():
                raise StoreCorruptError(
                    f"{where}: its file {name!r} is missing; rebuild it with "
                    "open_or_build or save(..., overwrite=True)"
                )
            if (
                file.stat().st_size != info["bytes"]
                or _file_sha256(file) != info["sha256"]
            ):
                raise StoreCorruptError(
                    f"{where}: its file {name!r} is damaged (checksum mismatch); "
                    "rebuild it with open_or_build or save(..., overwrite=True)"
                )
        index = _faiss().read_index(str(root / INDEX_FILE))
        opened = cls(
            index,
            built,
            int(marker["n"]),
            int(marker["dim"]),
            str(marker["rows_digest"]),
            float(marker["norm_bound"]),
        )
        if options is not None:
            opened.set_search(options.ef_search, options.nprobe)
        return opened


def _replace(opts: IndexOptions, **changes: Any) -> IndexOptions:
    return IndexOptions(**{**asdict(opts), **changes})


def _sample(rows: RowSource, n: int, size: int, bound: float) -> np.ndarray:
    """`size` evenly spaced rows, augmented, to train the clusters."""
    step = n / size
    wanted = np.unique((np.arange(size) * step).astype(np.int64))
    out, start = [], 0
    for chunk in _chunks(rows):
        stop = start + len(chunk)
        sel = wanted[(wanted >= start) & (wanted < stop)] - start
        if len(sel):
            out.append(chunk[sel])
        start = stop
    return _augment(np.concatenate(out), bound)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_marker(root: Path) -> Dict[str, Any]:
    if not root.exists():
        raise FileNotFoundError(f"no index at {str(root)!r}")
    try:
        marker = json.loads((root / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError) as e:
        raise StoreMismatchError(
            f"{str(root)!r} is not an index of pydvl-datainf (no {MARKER})"
        ) from e
    except json.JSONDecodeError as e:
        raise StoreCorruptError(
            f"the marker of the index at {str(root)!r} is damaged ({e}); delete the "
            "directory yourself and rebuild the index"
        ) from e
    if not isinstance(marker, dict) or marker.get("format") != INDEX_FORMAT:
        raise StoreMismatchError(
            f"{str(root)!r} is not an index of pydvl-datainf (no "
            f"{INDEX_FORMAT!r} marker)"
        )
    return marker


def _claim(root: Path, overwrite: bool) -> str:
    """`"free"` or `"owned"` (replaceable); raises for anything else."""
    status = inspect_path(str(root))
    if status.is_free:
        return "free"
    if status.state == PathState.FOREIGN:
        try:
            _read_marker(root)
        except (StoreMismatchError, StoreCorruptError, FileNotFoundError):
            pass
        else:
            if overwrite:
                return "owned"
            raise StoreExistsError(
                f"An index already exists at {str(root)!r}. Pass overwrite=True to "
                "replace it, or use open_or_build."
            )
    raise StoreExistsError(
        f"{str(root)!r} is not empty and is not an index of pydvl-datainf; it is "
        "never emptied or replaced, even with overwrite. Choose another path."
    )


def open_or_build(
    path: Union[str, os.PathLike],
    rows: RowSource,
    options: Optional[IndexOptions] = None,
    digest: Optional[str] = None,
) -> MipsIndex:
    """The index of `rows` at `path`: read back if it is current, else (re)built
    and saved.

    An index of ours that is stale (other rows), built with other build
    options, incomplete or damaged is rebuilt in place; anything that is not
    an index of ours is refused and left untouched. A changed $\\lambda$ never
    causes a rebuild: it only changes the queries.

    Args:
        path: the index directory (e.g. beside the gradient store).
        rows: the rows (see [RowSource][pydvl_datainf.storage.index.RowSource]).
        options: build and search options.
        digest: the rows' digest if known (else one pass computes it).

    Raises:
        StoreExistsError: something that is not our index is at `path`.
    """
    opts = options or IndexOptions()
    digest = digest or rows_digest(rows)
    try:
        return MipsIndex.open(path, digest=digest, options=opts)
    except FileNotFoundError:
        pass
    except (StoreMismatchError, StoreCorruptError) as e:
        _claim(Path(path), overwrite=True)  # raises unless ours (or free)
        logger.info("rebuilding the index at %s: %s", path, e)
    index = MipsIndex.build(rows, opts, digest)
    index.save(path, overwrite=True)
    return index
