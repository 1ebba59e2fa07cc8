r"""Zarr helpers shared by every on-disk output: ownership, existence, integrity.

Everything pydvl-datainf writes to Zarr (gradient stores, influence matrices)
goes through these functions, so the same guarantees hold for all of them:

- **Ownership.** A group we create carries a format marker of its kind in its
  attributes (`"format": "pydvl_datainf.gradient_store"` or
  `"pydvl_datainf.influence_matrix"`). [claim_path][pydvl_datainf.storage.format.claim_path]
  replaces only a group with the marker of the expected kind, and only when
  asked to; an empty or absent path is created; anything else (a directory
  with other files, a Zarr group of someone else, an output of the other
  kind) is refused with [StoreExistsError][pydvl_datainf.errors.StoreExistsError]
  and left untouched.
- **Existence.** [inspect_path][pydvl_datainf.storage.format.inspect_path] tells
  "nothing there" from "something there" and lets every other error (network,
  credentials, permissions) propagate: an error is never taken for absence.
- **Integrity.** Checksummed chunks, a manifest written last, and checked
  reads: see [integrity][pydvl_datainf.storage.integrity], whose functions
  this module re-exports.

Example:
    ```python
    from pydvl_datainf.storage.format import claim_path, inspect_path

    assert inspect_path("out.zarr").state == "absent"
    group = claim_path("out.zarr", "influence_matrix")
    assert inspect_path("out.zarr", kind="influence_matrix").state == "owned"
    ```
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from typing import (
    Any,
    Callable,
    Dict,
    Literal,
    Mapping,
    Optional,
    Tuple,
    Union,
)

from ..errors import StoreExistsError
from .integrity import (  # re-exported: one import for every Zarr helper
    checksum_codecs,
    chunk_exists,
    create_checked_array,
    load_digests,
    missing_chunks,
    open_checked_array,
    read_checked,
    read_manifest,
    read_or_replaced,
    verify_array,
    write_checked_array,
    write_manifest,
)
from .rawio import RawChunkReader, RawChunkWriter

__all__ = [
    "GRADIENT_STORE",
    "INFLUENCE_MATRIX",
    "FORMATS",
    "PathState",
    "PathStatus",
    "ZarrMode",
    "library_version",
    "is_url",
    "open_zarr_group",
    "inspect_path",
    "zarr_group_exists",
    "claim_path",
    "staging_path",
    "publish_path",
    "check_path",
    "check_claimable",
    "remove_owned",
    "checksum_codecs",
    "create_checked_array",
    "write_checked_array",
    "load_digests",
    "write_manifest",
    "read_manifest",
    "open_checked_array",
    "chunk_exists",
    "missing_chunks",
    "read_checked",
    "read_or_replaced",
    "verify_array",
    "RawChunkReader",
    "RawChunkWriter",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
ZarrMode = Literal["r", "r+", "a", "w", "w-"]
Coords = Tuple[int, ...]

GRADIENT_STORE = "gradient_store"
"""The kind of a [ZarrGradientStore][pydvl_datainf.storage.ZarrGradientStore]."""
INFLUENCE_MATRIX = "influence_matrix"
"""The kind of an influence matrix written by `influence_matrix`."""
FORMATS: Dict[str, str] = {
    GRADIENT_STORE: "pydvl_datainf.gradient_store",
    INFLUENCE_MATRIX: "pydvl_datainf.influence_matrix",
}
"""The format marker written in the attributes of each kind of output."""

_MARKER_KIND = {v: k for k, v in FORMATS.items()}


def library_version() -> str:
    """The installed version of pydvl-datainf (`"0.0.0"` from a source tree)."""
    try:
        return version("pydvl-datainf")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


def is_url(path: str) -> bool:
    """Whether `path` is an fsspec URL (other than `file://`)."""
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _check_kind(kind: str) -> str:
    if kind not in FORMATS:
        raise ValueError(f"kind must be one of {list(FORMATS)}, got {kind!r}")
    return kind


# ------------------------------------------------------------------ existence
class PathState(str, Enum):
    """What [inspect_path][pydvl_datainf.storage.format.inspect_path] found."""

    ABSENT = "absent"
    """Nothing at the path."""
    EMPTY = "empty"
    """An empty directory."""
    OWNED = "owned"
    """A group with the format marker of the expected kind."""
    OTHER_KIND = "other_kind"
    """A pydvl-datainf group of another kind (or of any kind, if none expected)."""
    FOREIGN = "foreign"
    """Something not created by pydvl-datainf: files, a file, another Zarr group."""


@dataclass
class PathStatus:
    """The result of [inspect_path][pydvl_datainf.storage.format.inspect_path].

    Attributes:
        state: what is there.
        kind: the pydvl-datainf kind found (`None` if not ours).
        is_group: whether a Zarr group is at the path.
        attrs: the group's attributes (empty if none).
    """

    state: PathState
    kind: Optional[str] = None
    is_group: bool = False
    attrs: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_free(self) -> bool:
        """Nothing there, or an empty directory: a new output may be created."""
        return self.state in (PathState.ABSENT, PathState.EMPTY)


def _listing(path: str, storage_options: Optional[Mapping[str, Any]]) -> PathState:
    """ABSENT, EMPTY or FOREIGN (non-empty) from a directory listing."""
    if is_url(path):
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(path, **dict(storage_options or {}))
        if not fs.exists(root):
            return PathState.ABSENT
        if fs.isdir(root) and not fs.ls(root, detail=False):
            return PathState.EMPTY
        return PathState.FOREIGN
    try:
        if not os.path.lexists(path):
            return PathState.ABSENT
        if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
            return PathState.EMPTY
    except FileNotFoundError:  # removed or renamed while we looked
        return PathState.ABSENT
    return PathState.FOREIGN


def inspect_path(
    path: PathLike,
    storage_options: Optional[Mapping[str, Any]] = None,
    kind: Optional[str] = None,
) -> PathStatus:
    """What is at `path`: nothing, an empty directory, our output, or else.

    Errors other than "not found" (permissions, network, credentials)
    propagate: they are never reported as absence.

    Args:
        path: a local path, `file://` path or fsspec URL.
        storage_options: fsspec options for URLs.
        kind: the expected kind ([GRADIENT_STORE][pydvl_datainf.storage.format.GRADIENT_STORE]
            or [INFLUENCE_MATRIX][pydvl_datainf.storage.format.INFLUENCE_MATRIX]);
            `None` reports any pydvl-datainf group as `OTHER_KIND`.

    Returns:
        A [PathStatus][pydvl_datainf.storage.format.PathStatus].

    Example:
        ```python
        from pathlib import Path
        from pydvl_datainf.storage.format import PathState, claim_path, inspect_path

        claim_path("grads.zarr", "gradient_store")
        status = inspect_path("grads.zarr", kind="gradient_store")
        assert status.state == PathState.OWNED and status.is_group
        Path("notes").mkdir()
        (Path("notes") / "todo.txt").write_text("mine")
        assert inspect_path("notes").state == PathState.FOREIGN  # never replaced
        ```
    """
    import zarr.errors

    if kind is not None:
        _check_kind(kind)
    p = _local(os.fspath(path))
    listed = _listing(p, storage_options)
    if listed != PathState.FOREIGN:
        return PathStatus(listed)
    try:
        group = open_zarr_group(p, "r", storage_options)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        # files but no group, or the path went away while we looked
        return PathStatus(_listing(p, storage_options))
    except (zarr.errors.ContainsArrayError, zarr.errors.NodeTypeValidationError):
        return PathStatus(PathState.FOREIGN)  # an array, not a group
    attrs = dict(group.attrs)
    found = _MARKER_KIND.get(str(attrs.get("format")))
    if found is None:
        state = PathState.FOREIGN
    elif kind is not None and found == kind:
        state = PathState.OWNED
    else:
        state = PathState.OTHER_KIND
    return PathStatus(state, found, True, attrs)


def zarr_group_exists(
    path: PathLike, storage_options: Optional[Mapping[str, Any]] = None
) -> bool:
    """Whether a Zarr group (of any content) exists at `path`.

    Only "not found" gives `False`; any other error propagates.
    """
    return inspect_path(path, storage_options).is_group


def open_zarr_group(
    path: PathLike,
    mode: ZarrMode,
    storage_options: Optional[Mapping[str, Any]] = None,
    *,
    kind: Optional[str] = None,
    attributes: Optional[Mapping[str, Any]] = None,
) -> Any:
    """Open a Zarr group at a local path or any fsspec URL (`s3://`, `gs://`, ...).

    Mode `"w"` deletes what is at the path, so it is only allowed where
    nothing is, or where a pydvl-datainf group is (of `kind`, if given);
    anything else raises [StoreExistsError][pydvl_datainf.errors.StoreExistsError]
    and is left untouched. Prefer [claim_path][pydvl_datainf.storage.format.claim_path]
    to create an output.

    Args:
        path: a local path, `file://` path, or fsspec URL.
        mode: Zarr's mode: `"r"`, `"r+"`, `"a"`, `"w"` or `"w-"`.
        storage_options: passed to fsspec for URLs.
        kind: for `"w"`: the only kind of pydvl-datainf group it may replace.
        attributes: attributes of a group created by `"w"` or `"w-"`.

    Returns:
        The `zarr.Group`.

    Raises:
        StoreExistsError: `"w"` over something not ours (or of another kind),
            or `"w-"` where a group exists.

    Example:
        ```python
        from pydvl_datainf.storage.format import claim_path, open_zarr_group

        # any fsspec URL: s3://, gs://, ... (memory:// needs no credentials)
        claim_path("memory://bucket/grads.zarr", "gradient_store", overwrite=True,
                   attributes={"n": 3})
        group = open_zarr_group("memory://bucket/grads.zarr", "r",
                                storage_options={})
        assert group.attrs["n"] == 3
        ```
    """
    import zarr

    p = _local(os.fspath(path))
    if mode == "w":
        status = inspect_path(p, storage_options, kind)
        if not status.is_free and not (
            status.state == PathState.OWNED
            or (kind is None and status.state == PathState.OTHER_KIND)
        ):
            raise StoreExistsError(_refusal(p, status, kind))
    extra: Dict[str, Any] = {}
    if attributes is not None and mode in ("w", "w-"):
        extra["attributes"] = dict(attributes)
    try:
        if is_url(p):
            return zarr.open_group(
                store=p,
                mode=mode,
                storage_options=dict(storage_options or {}),
                **extra,
            )
        return zarr.open_group(store=p, mode=mode, **extra)
    except (FileExistsError, zarr.errors.ContainsGroupError) as e:
        if mode != "w-" or isinstance(e, StoreExistsError):
            raise
        raise StoreExistsError(
            f"Something was created at {p!r} at the same time (another process "
            f"started the same output?): {e}"
        ) from e


def _refusal(path: str, status: PathStatus, kind: Optional[str]) -> str:
    what = (kind or "output").replace("_", " ")
    if status.state == PathState.OTHER_KIND:
        return (
            f"{path!r} holds a pydvl-datainf {str(status.kind).replace('_', ' ')}, "
            f"not a {what}; it is not replaced, even with overwrite. Choose "
            f"another path, or delete it yourself if it is no longer needed."
        )
    return (
        f"{path!r} is not empty and was not created by pydvl-datainf (no "
        f"{FORMATS.get(kind or '', 'pydvl_datainf')!r} marker); it is never "
        f"emptied or replaced, even with overwrite. Choose another path (a new "
        f"or empty directory)."
    )


def claim_path(
    path: PathLike,
    kind: str,
    *,
    overwrite: bool = False,
    storage_options: Optional[Mapping[str, Any]] = None,
    attributes: Optional[Mapping[str, Any]] = None,
    exists_hint: str = "Pass overwrite=True to replace it.",
    prepare: Optional[Callable[[Any], None]] = None,
) -> Any:
    """Create a new output group of `kind` at `path`, safely and atomically.

    - Nothing there (or an empty directory): the group is created.
    - Our group of the same kind: replaced if `overwrite`, else
      [StoreExistsError][pydvl_datainf.errors.StoreExistsError] (with
      `exists_hint`).
    - Anything else: `StoreExistsError`, whatever `overwrite`; nothing is
      deleted.

    On a local file system the new group is built under a temporary name
    beside `path` (its attributes, and whatever `prepare` creates in it) and
    renamed into place, which the operating system does atomically: of two
    processes that claim one path at the same moment, exactly one succeeds
    and the other gets `StoreExistsError`, and no reader ever sees a half-made
    group. Replacing our own output moves the old one aside first, and removes
    it only once the new one is in place. On object stores (fsspec URLs),
    which cannot rename atomically, the group is created in place; writers
    then check the output's id before they write (see the Guarantees page).

    The group carries its format marker (`format`, `format_version` 0 until
    the caller sets it, `library_version`) and `attributes` from the start,
    so it is recognisable as ours.

    Args:
        path: a local path, `file://` path or fsspec URL.
        kind: [GRADIENT_STORE][pydvl_datainf.storage.format.GRADIENT_STORE] or
            [INFLUENCE_MATRIX][pydvl_datainf.storage.format.INFLUENCE_MATRIX].
        overwrite: replace an existing output of the same kind.
        storage_options: fsspec options for URLs.
        attributes: more attributes of the new group.
        exists_hint: how to proceed when an output exists and `overwrite` is
            false (appended to the error message).
        prepare: called with the new group before it is published (e.g. to
            create its arrays).

    Returns:
        The new `zarr.Group`, open for writing.

    Raises:
        StoreExistsError: as above, or another process claimed the path at
            the same time.
        ValueError: an empty path.

    Example:
        ```python
        from pydvl_datainf.errors import StoreExistsError
        from pydvl_datainf.storage.format import claim_path

        group = claim_path("scores.zarr", "influence_matrix", overwrite=True,
                           attributes={"format_version": 1})
        assert group.attrs["format"] == "pydvl_datainf.influence_matrix"
        try:
            claim_path("scores.zarr", "gradient_store", overwrite=True)
        except StoreExistsError as e:
            print(e)  # another kind of output: not replaced, even with overwrite
        else:
            raise AssertionError("an output of another kind was replaced")
        ```
    """
    p = _local(check_path(path))
    status = check_claimable(
        p,
        kind,
        overwrite=overwrite,
        storage_options=storage_options,
        exists_hint=exists_hint,
    )
    attrs = {
        "format": FORMATS[kind],
        "format_version": 0,
        "library_version": library_version(),
        **dict(attributes or {}),
    }
    if is_url(p):
        if status.is_free:
            group = open_zarr_group(p, "w-", storage_options, attributes=attrs)
        else:
            logger.info("Replacing the %s at %s", kind.replace("_", " "), p)
            group = open_zarr_group(
                p, "w", storage_options, kind=kind, attributes=attrs
            )
        if prepare is not None:
            prepare(group)
        return group
    tmp = staging_path(p)
    try:
        group = open_zarr_group(tmp, "w-", None, attributes=attrs)
        if prepare is not None:
            prepare(group)
        publish_path(tmp, p, kind, overwrite=overwrite)
    finally:
        if os.path.lexists(tmp):  # only what this call created
            shutil.rmtree(tmp)
    return open_zarr_group(p, "r+")


def staging_path(path: str) -> str:
    """A new, unused path beside local `path`, where an output is built before
    [publish_path][pydvl_datainf.storage.format.publish_path] renames it into
    place (the parent directory is created if needed)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    name = f".{os.path.basename(os.path.abspath(path))}.{uuid.uuid4().hex[:12]}.tmp"
    return os.path.join(parent, name)


def publish_path(tmp: str, path: str, kind: str, *, overwrite: bool) -> None:
    """Rename the output of `kind` built at local `tmp` to `path`, atomically.

    Nothing at `path` (or an empty directory): one rename, which fails if
    another process put something there meanwhile. Our output of `kind` at
    `path` with `overwrite`: it is moved aside, the new one renamed into
    place, and only then the old one removed.

    Raises:
        StoreExistsError: `path` holds an output and not `overwrite`, holds
            something that is not ours, or another process created or replaced
            it at the same time (nothing of theirs is touched then).
    """
    raced = StoreExistsError(
        f"Another process created or replaced an output at {path!r} at the same "
        f"time; this one was not written there. Choose another path, or run "
        f"again to resume or replace it."
    )
    status = check_claimable(path, kind, overwrite=overwrite)
    if status.is_free:
        try:
            os.rename(tmp, path)  # fails if path is (now) a non-empty directory
        except OSError as e:
            raise raced from e
        return
    logger.info("Replacing the %s at %s", kind.replace("_", " "), path)
    trash = tmp + ".old"
    try:
        os.rename(path, trash)
    except FileNotFoundError as e:  # someone moved it meanwhile
        raise raced from e
    if inspect_path(trash, None, kind).state != PathState.OWNED:
        os.rename(trash, path)  # not what was checked: put it back untouched
        raise raced
    try:
        os.rename(tmp, path)
    except OSError as e:
        try:
            os.rename(trash, path)  # put the old one back
        except OSError:
            logger.warning("The replaced %s was kept at %s", kind, trash)
        raise raced from e
    remove_owned(trash, kind)


def check_path(path: PathLike) -> str:
    """`path` as a string, refusing an empty one with a clear error.

    Example:
        >>> check_path("grads.zarr")
        'grads.zarr'
    """
    p = os.fspath(path)
    if not isinstance(p, str) or not p.strip():
        raise ValueError(
            f"The output path is empty ({p!r}); give a file path or an fsspec URL."
        )
    return p


def check_claimable(
    path: PathLike,
    kind: str,
    *,
    overwrite: bool = False,
    storage_options: Optional[Mapping[str, Any]] = None,
    exists_hint: str = "Pass overwrite=True to replace it.",
) -> PathStatus:
    """Raise if [claim_path][pydvl_datainf.storage.format.claim_path] would
    refuse `path`; change nothing.

    Returns:
        What is at `path`: free, or our output of `kind` (with `overwrite`).

    Raises:
        StoreExistsError: as `claim_path`.

    Example:
        ```python
        from pydvl_datainf.errors import StoreExistsError
        from pydvl_datainf.storage.format import check_claimable, claim_path

        check_claimable("grads.zarr", "gradient_store")  # nothing there: fine
        claim_path("grads.zarr", "gradient_store")
        check_claimable("grads.zarr", "gradient_store", overwrite=True)  # ours: fine
        try:
            check_claimable("grads.zarr", "gradient_store", overwrite=False)
        except StoreExistsError as e:
            print(e)  # already exists: pass overwrite=True to replace it
        else:
            raise AssertionError("an existing output was claimable")
        ```
    """
    _check_kind(kind)
    p = _local(check_path(path))
    status = inspect_path(p, storage_options, kind)
    if status.is_free:
        return status
    if status.state == PathState.OWNED:
        if not overwrite:
            raise StoreExistsError(
                f"A pydvl-datainf {kind.replace('_', ' ')} already exists at "
                f"{p!r}. {exists_hint}"
            )
        return status
    raise StoreExistsError(_refusal(p, status, kind))


def remove_owned(
    path: PathLike,
    kind: str,
    storage_options: Optional[Mapping[str, Any]] = None,
) -> bool:
    """Delete the output of `kind` at `path`, only if it carries our marker.

    Returns:
        `True` if deleted, `False` if nothing was there.

    Raises:
        StoreExistsError: something is there that is not an output of `kind`
            (it is left untouched).

    Example:
        ```python
        import os
        from pydvl_datainf.storage.format import claim_path, remove_owned

        claim_path("old-grads.zarr", "gradient_store")
        assert remove_owned("old-grads.zarr", "gradient_store")
        assert not os.path.exists("old-grads.zarr")
        assert not remove_owned("old-grads.zarr", "gradient_store")  # nothing there
        ```
    """
    _check_kind(kind)
    p = _local(os.fspath(path))
    status = inspect_path(p, storage_options, kind)
    if status.state == PathState.ABSENT:
        return False
    if status.state not in (PathState.OWNED, PathState.EMPTY):
        raise StoreExistsError(_refusal(p, status, kind))
    if is_url(p):
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(p, **dict(storage_options or {}))
        fs.rm(root, recursive=True)
    else:
        shutil.rmtree(p)
    return True
