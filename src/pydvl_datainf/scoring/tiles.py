r"""The on-disk layout of an influence matrix: tiles, factors, done marks, manifest.

An output is a Zarr group that carries the format marker of kind
`"influence_matrix"`:

```
<path>/              attrs: format, format_version, identity, layout, run_id,
                            complete, manifest
<path>/matrix        (n_test, n_train), chunks (test_rows, train_rows)
<path>/done          (n_groups, n_chunks) int64, one chunk per tile
<path>/factors/<i>   (n_test, d_i), the test factors of block i
<path>/factors_done  (n_groups,) int64
```

Every chunk carries a CRC-32C checksum. A tile (one chunk of `matrix`) is
written whole, then marked in `done`; a factor group likewise in
`factors_done`. A mark is not a flag: it is a digest of the run's id, the
tile's place and the CRC-32C of its values, so a tile read back is accepted
only if it is the tile this run wrote at that place (tiles or marks swapped,
copied, or left by another run are refused). When every tile is done the
manifest of the arrays is written, and `complete` is set last. Every write
first checks that the output at the path is still this run's (its `run_id`):
a run whose output was replaced by another stops with
[StoreReplacedError][pydvl_datainf.errors.StoreReplacedError].

[TileOutput][pydvl_datainf.scoring.tiles.TileOutput] creates such an output
atomically (a local output is built under a temporary name and renamed into
place, so a concurrent starter gets
[StoreExistsError][pydvl_datainf.errors.StoreExistsError]), replaces only an
output of the same kind, never anything else, and reads tiles back refusing
missing or corrupt chunks with an error that names them and says how to
recover.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import (
    StoreCorruptError,
    StoreExistsError,
    StoreMismatchError,
    StoreReplacedError,
)
from ..storage.digests import chunk_digest, place_mark
from ..storage.format import (
    INFLUENCE_MATRIX,
    PathState,
    RawChunkWriter,
    check_path,
    claim_path,
    create_checked_array,
    inspect_path,
    is_url,
    missing_chunks,
    open_checked_array,
    open_zarr_group,
    read_checked,
    read_manifest,
    read_or_replaced,
    remove_owned,
    write_manifest,
)

__all__ = [
    "FORMAT_VERSION",
    "RECOVER",
    "Layout",
    "TileOutput",
    "done_mask",
    "mark_done",
    "read_marks",
    "check_range",
]

logger = logging.getLogger(__name__)

Blockwise = Dict[str, torch.Tensor]

FORMAT_VERSION = 3
"""Version of the influence-matrix layout (3: checksummed chunks, marks bound to
the run, the place and the values of each tile and factor group)."""

RECOVER = (
    "Run influence_matrix(..., resume=True, verify=True) with the same model and "
    "test data to recompute the damaged tiles, or overwrite=True to start again."
)
_WHAT = "influence matrix"


@dataclass(frozen=True)
class Layout:
    """Shape and tiling of an output.

    Attributes:
        n_test: rows of the matrix.
        n_train: columns of the matrix.
        test_rows: rows per tile (one factor group).
        train_rows: columns per tile (one chunk of training gradients).
        block_sizes: $d_l$ per block (one factor array each).
        dtype: dtype of the stored matrix.
        factor_dtype: dtype of the stored factors.
    """

    n_test: int
    n_train: int
    test_rows: int
    train_rows: int
    block_sizes: Tuple[int, ...]
    dtype: str
    factor_dtype: str

    @property
    def n_groups(self) -> int:
        """Number of factor groups (tile rows)."""
        return -(-self.n_test // self.test_rows)

    @property
    def n_chunks(self) -> int:
        """Number of training chunks (tile columns)."""
        return -(-self.n_train // self.train_rows)

    @property
    def n_tiles(self) -> int:
        """Number of tiles."""
        return self.n_groups * self.n_chunks

    def attrs(self) -> Dict[str, Any]:
        """The layout as group attributes."""
        return {
            "n_test": self.n_test,
            "n_train": self.n_train,
            "test_rows": self.test_rows,
            "train_rows": self.train_rows,
            "block_sizes": list(self.block_sizes),
            "dtype": self.dtype,
            "factor_dtype": self.factor_dtype,
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> Layout:
        """The layout recorded in a group's attributes."""
        return cls(
            int(attrs["n_test"]),
            int(attrs["n_train"]),
            int(attrs["test_rows"]),
            int(attrs["train_rows"]),
            tuple(int(d) for d in attrs["block_sizes"]),
            str(attrs["dtype"]),
            str(attrs["factor_dtype"]),
        )


def mark_done(done: Any, index: Tuple[int, ...], mark: int) -> None:
    """Write the mark of the tile or factor group at `index` (after its data)."""
    done[index] = mark


def done_mask(done: Any) -> np.ndarray:
    """Which entries of a `done` array are marked (nonzero).

    An unreadable mark (a write torn by a crash, a failed checksum) counts as
    not done: its tile or factor group is computed again.
    """
    return read_marks(done) != 0


def read_marks(done: Any) -> np.ndarray:
    """The marks of a `done` array; `0` where a mark is missing or unreadable."""
    try:
        return np.asarray(done[...], dtype=np.int64)
    except Exception:  # read the marks one by one
        out = np.zeros(done.shape, dtype=np.int64)
        for index in np.ndindex(*done.shape):
            try:
                out[index] = int(done[index])
            except Exception:
                out[index] = 0
        return out


def check_range(values: np.ndarray, dtype: Any, what: str) -> np.ndarray:
    """`values` cast to `dtype`, refusing values that overflow it.

    Raises:
        OverflowError: a finite value that `dtype` cannot hold, naming the
            largest value, the dtype and the way out.

    Example:
        >>> import numpy as np
        >>> check_range(np.array([1.0, 70000.0]), "float32", "x").dtype
        dtype('float32')
    """
    dtype = np.dtype(dtype)
    out = values.astype(dtype, copy=False)
    if dtype.kind == "f" and out.dtype.itemsize < values.dtype.itemsize:
        bad = np.isfinite(values) & ~np.isfinite(out)
        if bad.any():
            biggest = float(np.abs(values[np.isfinite(values)]).max())
            raise OverflowError(
                f"The {what} holds values up to {biggest:.4g}, which overflow its "
                f"dtype {dtype.name} (largest finite value "
                f"{float(np.finfo(dtype).max):.6g}). Start it again with "
                f"overwrite=True and dtype='float32' (or 'float64')."
            )
    return out


def _same_path(a: str, b: str) -> bool:
    if is_url(a) or is_url(b):
        return a.rstrip("/") == b.rstrip("/")
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    return ra == rb or ra.startswith(rb + os.sep) or rb.startswith(ra + os.sep)


class TileOutput:
    """An influence-matrix output group: its layout, tiles, factors and marks.

    Create one with [create][pydvl_datainf.scoring.tiles.TileOutput.create] or
    open one with [open][pydvl_datainf.scoring.tiles.TileOutput.open].

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import DataInfInfluence, influence_matrix
        from pydvl_datainf.scoring.tiles import TileOutput

        model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
        x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
        infl = DataInfInfluence(model, loss).fit(DataLoader(TensorDataset(x, y), 10))
        influence_matrix(infl, (x[:4], y[:4]), "infl.zarr", test_rows=2)

        out = TileOutput.open("infl.zarr")
        assert out.layout.n_tiles == 2 and out.is_complete
        block = out.read(0, 0)     # tile (0, 0), checked
        assert block.shape == (2, 30)
        ```
    """

    def __init__(
        self,
        group: Any,
        path: str,
        storage_options: Optional[Mapping[str, Any]] = None,
        writable: bool = False,
    ):
        self.group = group
        self.path = path
        self.storage_options = dict(storage_options or {})
        self.writable = writable
        self.layout = Layout.from_attrs(group.attrs)
        self.run_id = str(group.attrs["run_id"])
        self._tile_writer: Optional[Tuple[Any, Optional[RawChunkWriter]]] = None

    # ------------------------------------------------------------ create/open
    @classmethod
    def create(
        cls,
        path: str,
        layout: Layout,
        attributes: Mapping[str, Any],
        *,
        overwrite: bool = False,
        storage_options: Optional[Mapping[str, Any]] = None,
        protected: Sequence[str] = (),
    ) -> TileOutput:
        """Create a new output at `path`, atomically for local paths.

        Args:
            path: local path or fsspec URL.
            layout: shape and tiling.
            attributes: more attributes (the identity of the computation).
            overwrite: replace an existing influence matrix at `path`
                (never anything else).
            storage_options: fsspec options for URLs.
            protected: paths that must never be replaced (the live gradient
                store).

        Raises:
            StoreExistsError: an output exists and not `overwrite`; `path` is
                not ours (a user's directory, a gradient store); another
                process created it at the same time; `path` is protected.
        """
        check_path(path)
        for p in protected:
            if p and _same_path(path, p):
                raise StoreExistsError(
                    f"{path!r} is the gradient store of the fitted model (or "
                    f"inside it, or contains it); an influence matrix is never "
                    f"written there, even with overwrite. Choose another path."
                )
        attrs = {
            "format_version": FORMAT_VERSION,
            "run_id": uuid.uuid4().hex,
            "complete": False,
            **layout.attrs(),
            **dict(attributes),
        }
        claim_path(
            path,
            INFLUENCE_MATRIX,
            overwrite=overwrite,
            storage_options=storage_options,
            attributes=attrs,
            exists_hint="Pass resume=True to finish it or overwrite=True to start "
            "again.",
            prepare=lambda group: cls._create_arrays(group, layout),
        )
        return cls.open(path, "r+", storage_options, run_id=attrs["run_id"])

    @staticmethod
    def _create_arrays(group: Any, layout: Layout) -> None:
        create_checked_array(
            group,
            "matrix",
            shape=(layout.n_test, layout.n_train),
            chunks=(layout.test_rows, layout.train_rows),
            dtype=layout.dtype,
        )
        create_checked_array(
            group,
            "done",
            shape=(layout.n_groups, layout.n_chunks),
            chunks=(1, 1),
            dtype="int64",
        )
        create_checked_array(
            group,
            "factors_done",
            shape=(layout.n_groups,),
            chunks=(1,),
            dtype="int64",
        )
        for i, d in enumerate(layout.block_sizes):
            create_checked_array(
                group,
                f"factors/{i}",
                shape=(layout.n_test, d),
                chunks=(layout.test_rows, d),
                dtype=layout.factor_dtype,
            )

    @classmethod
    def open(
        cls,
        path: str,
        mode: str = "r",
        storage_options: Optional[Mapping[str, Any]] = None,
        run_id: Optional[str] = None,
    ) -> TileOutput:
        """Open an existing output (`mode` `"r"` or `"r+"`).

        Args:
            path: local path or fsspec URL.
            mode: `"r"` or `"r+"`.
            storage_options: fsspec options for URLs.
            run_id: the run the output must belong to (e.g. on a Dask worker).

        Raises:
            FileNotFoundError: nothing at `path`.
            StoreMismatchError: something that is not an influence matrix, or
                one of an older layout.
            StoreReplacedError: the output at `path` belongs to another run
                than `run_id`.
        """
        status = inspect_path(path, storage_options, INFLUENCE_MATRIX)
        if status.is_free:
            raise FileNotFoundError(f"No influence matrix at {path!r}")
        if status.state != PathState.OWNED:
            held = (
                f"it holds a pydvl-datainf {str(status.kind).replace('_', ' ')}"
                if status.kind
                else "it was not written by pydvl-datainf"
            )
            raise StoreMismatchError(
                f"{path!r} is not a pydvl-datainf influence matrix ({held}); it is "
                f"neither read nor replaced as one. Choose another path."
            )
        version = status.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreMismatchError(
                f"The influence matrix at {path!r} has layout version {version!r}, "
                f"this library writes {FORMAT_VERSION} (with checksums); start it "
                f"again with overwrite=True."
            )
        group = open_zarr_group(path, mode, storage_options)  # type: ignore[arg-type]
        out = cls(group, path, storage_options, writable=mode != "r")
        if run_id is not None and out.run_id != run_id:
            raise out._replaced(run_id, out.run_id, "opening")
        return out

    def reopen(self, mode: str) -> TileOutput:
        """The same output opened in another mode (the same run)."""
        return TileOutput.open(self.path, mode, self.storage_options, self.run_id)

    def _replaced(
        self, ours: str, now: Optional[str], doing: str
    ) -> StoreReplacedError:
        found = "nothing" if now is None else f"run {now[:12]}"
        return StoreReplacedError(
            f"The influence matrix at {self.path!r} was replaced while {doing} it: "
            f"it belonged to run {ours[:12]}, and {found} is there now (another "
            f"call started it again with overwrite=True). This run stops; nothing "
            f"of it is written into the other run's output. Run it again."
        )

    def disk_run_id(self) -> Optional[str]:
        """The run id of the output now at this path (`None` if there is none)."""
        status = inspect_path(self.path, self.storage_options, INFLUENCE_MATRIX)
        if status.state != PathState.OWNED:
            return None
        return str(status.attrs.get("run_id", ""))

    def check_run(self, doing: str = "writing") -> None:
        """Raise [StoreReplacedError][pydvl_datainf.errors.StoreReplacedError]
        unless the output at this path is still this run's."""
        replaced = self._replaced_now(doing)
        if replaced is not None:
            raise replaced

    # ------------------------------------------------------------ state
    @property
    def attrs(self) -> Dict[str, Any]:
        """The group's attributes (a copy)."""
        return dict(self.group.attrs)

    @property
    def is_complete(self) -> bool:
        """Every tile written, the manifest recorded."""
        return bool(self.group.attrs.get("complete", False))

    @property
    def array(self) -> Any:
        """The `(n_test, n_train)` Zarr array."""
        return self.group["matrix"]

    def factors_done(self) -> np.ndarray:
        """`(n_groups,)` bool: factor groups written."""
        return done_mask(self.group["factors_done"])

    def tiles_done(self) -> np.ndarray:
        """`(n_groups, n_chunks)` bool: tiles written."""
        return done_mask(self.group["done"])

    def pending_tiles(self) -> List[Tuple[int, int]]:
        """`(group, chunk)` of the tiles not written yet, in row-major order."""
        done = self.tiles_done()
        lay = self.layout
        return [
            (g, c)
            for g in range(lay.n_groups)
            for c in range(lay.n_chunks)
            if not done[g, c]
        ]

    def has_work(self) -> bool:
        """Whether any tile or factor group has been written."""
        return bool(self.tiles_done().any() or self.factors_done().any())

    # ------------------------------------------------------------ factors
    def group_rows(self, g: int) -> Tuple[int, int]:
        """Test rows `[lo, hi)` of factor group `g`."""
        lo = g * self.layout.test_rows
        return lo, min(self.layout.n_test, lo + self.layout.test_rows)

    def write_factors(self, g: int, factors: Mapping[str, torch.Tensor]) -> None:
        """Write the factors of group `g` (blocks in order), then mark them."""
        self.check_run()
        lo, hi = self.group_rows(g)
        crcs = []
        for i, f in enumerate(factors.values()):
            arr = self.group[f"factors/{i}"]
            data = check_range(f.detach().cpu().numpy(), arr.dtype, "factor array")
            arr[lo:hi] = data
            crcs.append(chunk_digest(data))
        mark_done(
            self.group["factors_done"],
            (g,),
            place_mark(self.run_id, "factors", (g,), crcs),
        )

    def read_factors(self, g: int, names: Sequence[str]) -> Blockwise:
        """The stored factors of group `g`, checked, as `{block: (rows, d_l)}`.

        Raises:
            StoreCorruptError: a missing, corrupt or misplaced chunk, or no
                mark of this run for the group.
        """
        lo, hi = self.group_rows(g)
        out, crcs = {}, []
        for i, k in enumerate(names):
            arr = self.group[f"factors/{i}"]
            data = np.asarray(
                read_checked(
                    arr,
                    f"factors/{i}",
                    self.path,
                    (slice(lo, hi),),
                    what=_WHAT,
                    recover=RECOVER,
                )
            )
            crcs.append(chunk_digest(data))
            out[k] = torch.from_numpy(data)
        mark = int(read_marks(self.group["factors_done"])[g])
        if mark != place_mark(self.run_id, "factors", (g,), crcs):
            self._raise_misplaced("factors", (g,), mark)
        return out

    def _replaced_now(self, doing: str) -> Optional[StoreReplacedError]:
        """The error to raise if the output at this path is another run's now."""
        now = self.disk_run_id()
        return None if now == self.run_id else self._replaced(self.run_id, now, doing)

    def _raise_misplaced(self, name: str, index: Tuple[int, ...], mark: int) -> None:
        replaced = self._replaced_now("reading")
        if replaced is not None:
            raise replaced
        problem = (
            "is not marked as written"
            if mark == 0
            else "is not what this run wrote at this place (moved, swapped, or "
            "left by another run)"
        )
        raise StoreCorruptError(
            f"The influence matrix at {self.path!r} is damaged: array {name!r}, "
            f"chunk {tuple(index)} {problem}. {RECOVER}"
        )

    # ------------------------------------------------------------ tiles
    def write_tile(self, g: int, c: int, tile: torch.Tensor) -> None:
        """Write tile `(g, c)` (one Zarr chunk) whole, then mark it done.

        A whole tile of a local, uncompressed output is written straight from
        its memory ([RawChunkWriter][pydvl_datainf.storage.rawio.RawChunkWriter]);
        others (edge tiles, compressed or remote outputs) through Zarr.

        Raises:
            StoreReplacedError: the output at this path is another run's now.
            OverflowError: the tile has values that the matrix's dtype cannot
                hold (e.g. above 65504 in float16).
        """
        self.check_run()
        lay = self.layout
        if self._tile_writer is None:
            arr = self.group["matrix"]
            self._tile_writer = (arr, RawChunkWriter.for_array(arr))
        arr, raw = self._tile_writer
        data = check_range(tile.detach().cpu().numpy(), arr.dtype, "influence matrix")
        if raw is not None and data.shape == raw.chunk_shape:
            raw.write((g, c), data)
        else:
            r0, c0 = g * lay.test_rows, c * lay.train_rows
            arr[r0 : r0 + data.shape[0], c0 : c0 + data.shape[1]] = data
        mark_done(
            self.group["done"],
            (g, c),
            place_mark(self.run_id, "matrix", (g, c), [chunk_digest(data)]),
        )

    def read(self, g: int, c: int, marks: Optional[np.ndarray] = None) -> np.ndarray:
        """Tile `(g, c)`, refusing a missing, corrupt or misplaced chunk.

        Args:
            g: the tile's row of tiles (factor group).
            c: the tile's column of tiles (training chunk).
            marks: the output's marks if already read (`read_marks(done)`).

        Raises:
            StoreCorruptError: naming the array and chunk, and how to recover.
            StoreReplacedError: another run's output is at this path now.
        """
        lay = self.layout
        r0, c0 = g * lay.test_rows, c * lay.train_rows
        data = read_or_replaced(
            lambda: np.asarray(
                read_checked(
                    self.group["matrix"],
                    "matrix",
                    self.path,
                    (
                        slice(r0, min(lay.n_test, r0 + lay.test_rows)),
                        slice(c0, min(lay.n_train, c0 + lay.train_rows)),
                    ),
                    what=_WHAT,
                    recover=RECOVER,
                )
            ),
            lambda: self._replaced_now("reading"),
        )
        if marks is None:
            mark = int(read_marks(self.group["done"])[g, c])
        else:
            mark = int(marks[g, c])
        if mark != place_mark(self.run_id, "matrix", (g, c), [chunk_digest(data)]):
            self._raise_misplaced("matrix", (g, c), mark)
        return data

    # ------------------------------------------------------------ integrity
    def _arrays(self) -> List[str]:
        return ["matrix", "done", "factors_done"] + [
            f"factors/{i}" for i in range(len(self.layout.block_sizes))
        ]

    def finish(self) -> None:
        """Write the manifest (after every tile), then mark the output complete."""
        write_manifest(self.group, self._arrays())
        self.group.attrs["complete"] = True

    def check_complete(self) -> None:
        """Cheap checks of a complete output: manifest, shapes, every tile stored.

        Raises:
            StoreCorruptError: a damaged or missing array or tile.
        """
        manifest = read_manifest(self.group, self.path, _WHAT)
        lay = self.layout
        for name in self._arrays():
            open_checked_array(
                self.group,
                name,
                self.path,
                manifest=manifest,
                what=_WHAT,
                recover=RECOVER,
            )
        missing = [t for t in self.pending_tiles()]
        if missing:
            self._raise_misplaced("matrix", missing[0], 0)
        self.damaged_tiles(full=False, raise_first=True)
        if self.group["matrix"].shape != (lay.n_test, lay.n_train):
            raise StoreCorruptError(f"The matrix at {self.path!r} has another shape")

    def damaged_tiles(
        self, full: bool = False, raise_first: bool = False
    ) -> List[Tuple[int, int]]:
        """Tiles marked done whose chunk is missing (or, if `full`, corrupt).

        Args:
            full: also read every tile to check its checksum.
            raise_first: raise on the first damaged tile instead of listing.
        """
        arr = self.group["matrix"]
        marks = read_marks(self.group["done"])
        marked = [tuple(int(i) for i in t) for t in np.argwhere(marks != 0)]
        bad = set(missing_chunks(arr, marked))
        if full:
            for g, c in marked:
                if (g, c) in bad:
                    continue
                try:
                    self.read(g, c, marks)
                except StoreReplacedError:
                    raise
                except StoreCorruptError:
                    bad.add((g, c))
        if bad and raise_first:
            g, c = min(bad)
            self.read(g, c, marks)  # raises, naming the chunk
        return sorted(bad)  # type: ignore[arg-type]

    def damaged_factor_groups(self, names: Sequence[str]) -> List[int]:
        """Factor groups marked done whose chunks are missing or corrupt."""
        done = self.factors_done()
        bad = []
        for g in np.flatnonzero(done):
            try:
                self.read_factors(int(g), names)
            except StoreReplacedError:
                raise
            except StoreCorruptError:
                bad.append(int(g))
        return bad

    def unmark(self, tiles: Iterable[Tuple[int, int]], groups: Iterable[int]) -> None:
        """Clear done marks so these tiles and factor groups are computed again."""
        for g, c in tiles:
            self.group["done"][g, c] = 0
        for g in groups:
            self.group["factors_done"][g] = 0
        if self.group.attrs.get("complete"):
            self.group.attrs["complete"] = False

    def remove(self) -> None:
        """Delete this output (only if it carries the influence-matrix marker)."""
        remove_owned(self.path, INFLUENCE_MATRIX, self.storage_options)
