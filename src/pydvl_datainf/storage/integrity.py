r"""Integrity of Zarr outputs: checksummed chunks, a manifest, checked reads.

Arrays are created with a CRC-32C checksum on every chunk
([checksum_codecs][pydvl_datainf.storage.integrity.checksum_codecs]), and every
chunk is written, even one equal to the fill value. A manifest of finished
arrays (their shapes and chunk grids) is written last
([write_manifest][pydvl_datainf.storage.integrity.write_manifest]).
[open_checked_array][pydvl_datainf.storage.integrity.open_checked_array] checks
an array against the manifest when it is opened (cheap: metadata only);
[read_checked][pydvl_datainf.storage.integrity.read_checked] checks that the
chunks read exist (Zarr would return the fill value for a missing chunk) and
turns a checksum failure into
[StoreCorruptError][pydvl_datainf.errors.StoreCorruptError] naming the array
and the chunk; [verify_array][pydvl_datainf.storage.integrity.verify_array]
reads every chunk.

A checksum proves a chunk's bytes, not its place. So the manifest also binds
every chunk to its position: when a table of chunk digests
([DigestTable][pydvl_datainf.storage.digests.DigestTable]) is given for an
array, `write_manifest` saves it beside the array and records its SHA-256, and
[load_digests][pydvl_datainf.storage.integrity.load_digests] reads it back,
checked. Whole-chunk reads that use it are in
[chunks][pydvl_datainf.storage.chunks].

Example:
    ```python
    import numpy as np
    import zarr
    from pydvl_datainf.storage.integrity import (
        create_checked_array, open_checked_array, read_checked, write_manifest)

    group = zarr.open_group("scores.zarr", mode="w")
    values = np.arange(1000, dtype="float32").reshape(10, 100)
    arr = create_checked_array(group, "matrix", shape=(10, 100),
                               chunks=(10, 50), dtype="float32")
    arr[:] = values
    write_manifest(group, ["matrix"])
    arr = open_checked_array(group, "matrix", "scores.zarr")
    left = read_checked(arr, "matrix", "scores.zarr", (slice(0, 10), slice(0, 50)))
    assert (left == values[:, :50]).all()
    ```
"""

from __future__ import annotations

import itertools
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import numpy as np

from ..errors import StoreCorruptError, StoreReplacedError
from .digests import DIGESTS_GROUP, DigestTable

__all__ = [
    "DEFAULT_RECOVER",
    "MISPLACED",
    "checksum_codecs",
    "create_checked_array",
    "write_checked_array",
    "write_manifest",
    "save_digests",
    "read_manifest",
    "open_checked_array",
    "load_digests",
    "chunk_key",
    "chunk_exists",
    "missing_chunks",
    "corrupt_error",
    "read_or_replaced",
    "read_checked",
    "verify_array",
]

Coords = Tuple[int, ...]
T = TypeVar("T")

DEFAULT_RECOVER = (
    "Recreate it: fit again with overwrite=True (or delete the store and fit again)."
)
"""How to recover, said by default in errors about a damaged output."""

MISPLACED = (
    "is not the chunk written at this place (moved, swapped or copied from "
    "another place)"
)
"""What an error says of a chunk whose digest is not the one recorded for its place."""


def checksum_codecs(compressors: Any = None) -> List[Any]:
    """Zarr 3 bytes-to-bytes codecs: `compressors`, then a CRC-32C checksum.

    Pass the result as `compressors=` to `create_array`: every chunk is
    checksummed after compression, and a chunk whose bytes changed raises on
    read.

    Args:
        compressors: `None`, one codec or a sequence of codecs.

    Example:
        >>> type(checksum_codecs()[-1]).__name__
        'Crc32cCodec'
    """
    from zarr.codecs import Crc32cCodec

    if compressors is None:
        given: List[Any] = []
    elif isinstance(compressors, (list, tuple)):
        given = list(compressors)
    else:
        given = [compressors]
    given = [c for c in given if not isinstance(c, Crc32cCodec)]
    return [*given, Crc32cCodec()]


def create_checked_array(
    group: Any,
    name: str,
    *,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: Any,
    compressors: Any = None,
    fill_value: Any = 0,
) -> Any:
    """`group.create_array` with a checksum on every chunk and every chunk
    written (even one equal to `fill_value`, so that a missing chunk is
    always a fault). Replaces an array of the same name in `group`.

    Example:
        ```python
        import zarr
        from pydvl_datainf.storage.integrity import create_checked_array

        group = zarr.open_group("scores.zarr", mode="w")
        arr = create_checked_array(group, "matrix", shape=(10, 100),
                                   chunks=(10, 50), dtype="float32")
        assert arr.shape == (10, 100) and arr.chunks == (10, 50)
        ```
    """
    return group.create_array(
        name,
        shape=tuple(shape),
        chunks=tuple(chunks),
        dtype=dtype,
        fill_value=fill_value,
        compressors=checksum_codecs(compressors),
        config={"write_empty_chunks": True},
        overwrite=True,
    )


def write_checked_array(
    group: Any,
    name: str,
    values: np.ndarray,
    chunks: Sequence[int],
) -> DigestTable:
    """Create array `name` holding `values`, checksummed, and return the digest
    table of its chunks (to pass to
    [write_manifest][pydvl_datainf.storage.integrity.write_manifest]).

    Example:
        ```python
        import numpy as np
        import zarr
        from pydvl_datainf.storage.integrity import write_checked_array, write_manifest

        group = zarr.open_group("g.zarr", mode="w")
        table = write_checked_array(group, "norms", np.arange(5.0), chunks=(2,))
        write_manifest(group, ["norms"], {"norms": table})
        assert table.grid == (3,) and not table.missing()
        ```
    """
    values = np.ascontiguousarray(values)
    arr = create_checked_array(
        group, name, shape=values.shape, chunks=chunks, dtype=values.dtype
    )
    arr[...] = values
    table = DigestTable.for_shape(values.shape, arr.chunks)
    table.record_region((0,) * values.ndim, values, arr.chunks)
    return table


def write_manifest(
    group: Any,
    names: Iterable[str],
    digests: Optional[Mapping[str, DigestTable]] = None,
) -> None:
    """Record arrays `names` of `group` as finished: their shapes and chunks.

    Call it after their data is written (and before marking the output
    complete); entries already there are kept. An array with a table in
    `digests` has it saved beside it (`digests/<name>`), and the table's
    SHA-256 recorded in its entry: its chunks are then bound to their places.

    Example:
        ```python
        import numpy as np
        import zarr
        from pydvl_datainf.storage.digests import DigestTable
        from pydvl_datainf.storage.integrity import create_checked_array, write_manifest

        group = zarr.open_group("scores.zarr", mode="w")
        arr = create_checked_array(group, "matrix", shape=(4, 6), chunks=(4, 3),
                                   dtype="float32")
        values = np.ones((4, 6), dtype="float32")
        arr[:] = values
        table = DigestTable.for_shape(arr.shape, arr.chunks)
        table.record_region((0, 0), values, arr.chunks)
        write_manifest(group, ["matrix"], {"matrix": table})
        entry = group.attrs["manifest"]["matrix"]
        assert entry["shape"] == [4, 6] and entry["chunks"] == [4, 3]
        assert entry["digests"] == table.sha256()
        ```
    """
    manifest = dict(group.attrs.get("manifest") or {})
    for name in names:
        arr = group[name]
        entry: Dict[str, Any] = {"shape": list(arr.shape), "chunks": list(arr.chunks)}
        table = (digests or {}).get(name)
        if table is not None:
            entry["digests"] = save_digests(group, name, table)
        manifest[name] = entry
    group.attrs["manifest"] = manifest


def save_digests(group: Any, name: str, table: DigestTable) -> str:
    """Write the digest table of array `name` beside it; return its SHA-256.

    Raises:
        ValueError: a chunk's digest was never recorded.
    """
    missing = table.missing()
    if missing or not table.values.size:
        raise ValueError(f"no digest recorded for chunks {missing[:5]} of {name!r}")
    arr = create_checked_array(
        group,
        f"{DIGESTS_GROUP}/{name}",
        shape=table.grid,
        chunks=table.grid,
        dtype="int64",
    )
    arr[...] = table.values
    return table.sha256()


def load_digests(
    group: Any,
    name: str,
    path: str,
    manifest: Mapping[str, Any],
    *,
    what: str = "store",
    recover: str = DEFAULT_RECOVER,
) -> DigestTable:
    """The digest table of array `name`, checked against the manifest.

    Raises:
        StoreCorruptError: the manifest records no table for `name`, or the
            table is missing, damaged, or not the one recorded (edited, or
            moved from another array).
    """
    import zarr.errors

    sha = (manifest.get(name) or {}).get("digests")
    if not sha:
        raise StoreCorruptError(
            f"The {what} at {path!r} records no chunk digests for array {name!r}. "
            f"{recover}"
        )
    try:
        values = np.asarray(group[f"{DIGESTS_GROUP}/{name}"][...], dtype=np.int64)
    except (KeyError, FileNotFoundError, zarr.errors.NodeNotFoundError) as e:
        raise StoreCorruptError(
            f"The chunk digests of array {name!r} of the {what} at {path!r} are "
            f"missing. {recover}"
        ) from e
    except ValueError as e:  # a failed checksum
        raise StoreCorruptError(
            f"The chunk digests of array {name!r} of the {what} at {path!r} are "
            f"damaged ({e}). {recover}"
        ) from e
    table = DigestTable(values.shape, values)
    if table.sha256() != sha:
        raise StoreCorruptError(
            f"The chunk digests of array {name!r} of the {what} at {path!r} are not "
            f"the ones its manifest records (edited, or moved from another array). "
            f"{recover}"
        )
    return table


def read_manifest(group: Any, path: str, what: str = "store") -> Dict[str, Any]:
    """The manifest of `group`.

    Raises:
        StoreCorruptError: there is none.

    Example:
        ```python
        import zarr
        from pydvl_datainf.errors import StoreCorruptError
        from pydvl_datainf.storage.integrity import (
            create_checked_array, read_manifest, write_manifest)

        group = zarr.open_group("scores.zarr", mode="w")
        try:
            read_manifest(group, "scores.zarr")  # not finished yet
        except StoreCorruptError as e:
            print(e)
        else:
            raise AssertionError("no manifest, no error")
        create_checked_array(group, "matrix", shape=(4, 6), chunks=(4, 3), dtype="f4")
        write_manifest(group, ["matrix"])
        assert read_manifest(group, "scores.zarr")["matrix"]["shape"] == [4, 6]
        ```
    """
    manifest = group.attrs.get("manifest")
    if not isinstance(manifest, dict):
        raise StoreCorruptError(
            f"The {what} at {path!r} has no manifest of finished chunks: it was "
            f"not finished, or its metadata is damaged. {DEFAULT_RECOVER}"
        )
    return manifest


def open_checked_array(
    group: Any,
    name: str,
    path: str,
    *,
    shape: Optional[Sequence[int]] = None,
    manifest: Optional[Mapping[str, Any]] = None,
    what: str = "store",
    recover: str = DEFAULT_RECOVER,
) -> Any:
    """Open array `name` of `group` and check it against the manifest.

    Cheap (metadata only): the array exists, is in the manifest, and its
    shape and chunks are the recorded ones (and `shape`, if given).

    Raises:
        StoreCorruptError: missing array, no manifest entry, or another
            shape or chunk grid, naming the array and how to recover.

    Example:
        ```python
        import zarr
        from pydvl_datainf.errors import StoreCorruptError
        from pydvl_datainf.storage.integrity import (
            create_checked_array, open_checked_array, write_manifest)

        group = zarr.open_group("scores.zarr", mode="w")
        create_checked_array(group, "matrix", shape=(4, 6), chunks=(4, 3), dtype="f4")
        write_manifest(group, ["matrix"])
        arr = open_checked_array(group, "matrix", "scores.zarr", shape=(4, 6))
        try:
            open_checked_array(group, "matrix", "scores.zarr", shape=(5, 6))
        except StoreCorruptError as e:
            print(e)  # has shape (4, 6), but (5, 6) was written
        else:
            raise AssertionError("another shape, no error")
        ```
    """
    import zarr.errors

    if manifest is None:
        manifest = read_manifest(group, path, what)
    entry = manifest.get(name)
    if entry is None:
        raise StoreCorruptError(
            f"The {what} at {path!r} does not list array {name!r} as finished. "
            f"{recover}"
        )
    try:
        arr = group[name]
    except (KeyError, FileNotFoundError, zarr.errors.NodeNotFoundError) as e:
        raise StoreCorruptError(
            f"Array {name!r} of the {what} at {path!r} is missing. {recover}"
        ) from e
    want_shape = list(entry["shape"]) if shape is None else list(shape)
    if list(arr.shape) != list(entry["shape"]) or list(arr.shape) != want_shape:
        raise StoreCorruptError(
            f"Array {name!r} of the {what} at {path!r} has shape "
            f"{tuple(arr.shape)}, but {tuple(want_shape)} was written. {recover}"
        )
    if list(arr.chunks) != list(entry["chunks"]):
        raise StoreCorruptError(
            f"Array {name!r} of the {what} at {path!r} has chunks "
            f"{tuple(arr.chunks)}, but {tuple(entry['chunks'])} were written. "
            f"{recover}"
        )
    return arr


def chunk_key(arr: Any, coords: Coords) -> str:
    """The store key of chunk `coords` of `arr` (relative to the store's root)."""
    key = arr.metadata.encode_chunk_key(tuple(int(c) for c in coords))
    prefix = arr.store_path.path
    return f"{prefix}/{key}" if prefix else str(key)


def chunk_exists(arr: Any, coords: Coords) -> bool:
    """Whether chunk `coords` of Zarr array `arr` is stored (errors propagate).

    Example:
        ```python
        import numpy as np
        import zarr
        from pydvl_datainf.storage.integrity import chunk_exists, create_checked_array

        group = zarr.open_group("scores.zarr", mode="w")
        arr = create_checked_array(group, "matrix", shape=(4, 6), chunks=(4, 3),
                                   dtype="float32")
        arr[:, :3] = np.zeros((4, 3), dtype="float32")  # only the first chunk
        assert chunk_exists(arr, (0, 0)) and not chunk_exists(arr, (0, 1))
        ```
    """
    from zarr.core.sync import sync

    return bool(sync(arr.store_path.store.exists(chunk_key(arr, coords))))


def _grid(arr: Any) -> List[int]:
    return [-(-s // c) for s, c in zip(arr.shape, arr.chunks)]


def _chunks_of(arr: Any, selection: Sequence[slice]) -> List[Coords]:
    """The chunk coordinates a basic selection (one slice per dimension) reads."""
    ranges = []
    for dim, sl in enumerate(selection):
        start, stop, _ = sl.indices(arr.shape[dim])
        if stop <= start:
            return []
        c = arr.chunks[dim]
        ranges.append(range(start // c, (stop - 1) // c + 1))
    ranges += [range(g) for g in _grid(arr)[len(selection) :]]
    return list(itertools.product(*ranges))


def missing_chunks(arr: Any, coords: Iterable[Coords]) -> List[Coords]:
    """The chunks among `coords` that are not stored.

    Example:
        ```python
        import numpy as np
        import zarr
        from pydvl_datainf.storage.integrity import create_checked_array, missing_chunks

        group = zarr.open_group("scores.zarr", mode="w")
        arr = create_checked_array(group, "matrix", shape=(4, 6), chunks=(4, 3),
                                   dtype="float32")
        arr[:, 3:] = np.ones((4, 3), dtype="float32")  # only the second chunk
        assert missing_chunks(arr, [(0, 0), (0, 1)]) == [(0, 0)]
        ```
    """
    return [tuple(c) for c in coords if not chunk_exists(arr, tuple(c))]


def corrupt_error(
    what: str, path: str, name: str, coords: Coords, problem: str, recover: str
) -> StoreCorruptError:
    """The error for chunk `coords` of array `name`: `problem`, and how to recover."""
    return StoreCorruptError(
        f"The {what} at {path!r} is damaged: array {name!r}, chunk "
        f"{tuple(int(c) for c in coords)} {problem}. {recover}"
    )


def read_or_replaced(
    read: Callable[[], T], replaced: Callable[[], Optional[StoreReplacedError]]
) -> T:
    """`read()`; if it fails, the error of a replaced output instead, when
    `replaced()` finds one.

    A read of an output that another job replaced, or renamed away, fails in
    many ways (a chunk that is not the one recorded for its place, a missing
    file); the owner's check names the real cause.

    Args:
        read: the read.
        replaced: the error to raise if the output at the path is no longer
            the one being read, else `None` (called only after a failure).

    Example:
        >>> read_or_replaced(lambda: 1, lambda: None)
        1
    """
    try:
        return read()
    except StoreReplacedError:
        raise
    except Exception as e:
        error = replaced()
        if error is not None:
            raise error from e
        raise


def _read_chunk(
    arr: Any, name: str, path: str, coords: Coords, what: str, recover: str
) -> Any:
    try:
        return arr.blocks[tuple(coords)]
    except ValueError as e:  # a failed checksum, or bytes that do not decode
        raise corrupt_error(
            what, path, name, coords, f"is corrupt ({e})", recover
        ) from e


def read_checked(
    arr: Any,
    name: str,
    path: str,
    selection: Union[slice, Tuple[slice, ...]],
    *,
    read: Optional[Callable[[], Any]] = None,
    chunks: Optional[Iterable[Coords]] = None,
    what: str = "store",
    recover: str = DEFAULT_RECOVER,
) -> Any:
    """Read `arr[selection]`, refusing missing or corrupt chunks.

    Checks that every chunk read is stored (Zarr returns the fill value for a
    missing chunk) and turns a checksum failure into an error naming the
    chunk.

    Args:
        arr: the Zarr array.
        name: its name in the group (for messages).
        path: the output's path (for messages).
        selection: slices, one per leading dimension, within the shape.
        read: the actual read (default `arr[selection]`), e.g. an orthogonal
            selection; then `chunks` must list the chunks it touches.
        chunks: the chunk coordinates read (default: those of `selection`).
        what: the kind of output (for messages).
        recover: how to recover (for messages).

    Raises:
        StoreCorruptError: a chunk is missing or corrupt; a selection beyond
            the shape.

    Example:
        ```python
        import numpy as np
        import zarr
        from pydvl_datainf.errors import StoreCorruptError
        from pydvl_datainf.storage.integrity import create_checked_array, read_checked

        group = zarr.open_group("grads.zarr", mode="w")
        arr = create_checked_array(group, "w", shape=(8, 2), chunks=(4, 2),
                                   dtype="float32")
        arr[:4] = np.ones((4, 2), dtype="float32")  # rows 4..7 never written
        rows = read_checked(arr, "w", "grads.zarr", (slice(0, 4),))
        assert rows.sum() == 8
        try:
            read_checked(arr, "w", "grads.zarr", (slice(0, 8),))  # zarr: zeros
        except StoreCorruptError as e:
            print(e)  # array 'w', chunk (1, 0) is missing
        else:
            raise AssertionError("a missing chunk, no error")
        ```
    """
    sel = selection if isinstance(selection, tuple) else (selection,)
    for dim, sl in enumerate(sel):
        if sl.stop is not None and sl.stop > arr.shape[dim]:
            raise StoreCorruptError(
                f"The {what} at {path!r} is damaged: array {name!r} has "
                f"{arr.shape[dim]} entries along axis {dim}, {sl.stop} were "
                f"written. {recover}"
            )
    coords = list(chunks) if chunks is not None else _chunks_of(arr, sel)
    for c in missing_chunks(arr, coords):
        raise corrupt_error(what, path, name, c, "is missing", recover)
    try:
        return read() if read is not None else arr[sel]
    except ValueError as e:
        for c in coords:  # find the culprit to name it
            _read_chunk(arr, name, path, c, what, recover)
        raise corrupt_error(
            what, path, name, coords[0] if coords else (), f"failed ({e})", recover
        ) from e


def verify_array(
    arr: Any,
    name: str,
    path: str,
    *,
    digests: Optional[DigestTable] = None,
    what: str = "store",
    recover: str = DEFAULT_RECOVER,
) -> int:
    """Read every chunk of `arr`, checking that it exists, its checksum, and,
    with `digests`, that it is the chunk recorded for its place.

    Returns:
        The number of chunks checked.

    Raises:
        StoreCorruptError: the first missing, corrupt or misplaced chunk.

    Example:
        ```python
        import numpy as np
        import zarr
        from pydvl_datainf.storage.integrity import create_checked_array, verify_array

        group = zarr.open_group("scores.zarr", mode="w")
        arr = create_checked_array(group, "matrix", shape=(4, 6), chunks=(4, 3),
                                   dtype="float32")
        arr[:] = np.ones((4, 6), dtype="float32")
        assert verify_array(group["matrix"], "matrix", "scores.zarr") == 2  # chunks
        ```
    """
    n = 0
    for coords in itertools.product(*(range(g) for g in _grid(arr))):
        if not chunk_exists(arr, coords):
            raise corrupt_error(what, path, name, coords, "is missing", recover)
        values = _read_chunk(arr, name, path, coords, what, recover)
        if digests is not None and not digests.matches(coords, np.asarray(values)):
            raise corrupt_error(what, path, name, coords, MISPLACED, recover)
        n += 1
    return n
