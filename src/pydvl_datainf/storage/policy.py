"""Which gradient store `fit` writes to, and the temporary directories it owns.

[new_store][pydvl_datainf.storage.policy.new_store] is the one place that turns
a store choice (`"memory"`, `"zarr"`, `"recompute"`, `"auto"` or a callable)
into a [GradientStore][pydvl_datainf.storage.GradientStore].

Temporary directories: `"auto"` without a path spills, if it has to, into a
directory it creates with `tempfile.mkdtemp(prefix="datainf-")`. The
[ZarrGradientStore][pydvl_datainf.storage.ZarrGradientStore] written there owns
the directory and removes it on `close()`, when the store is garbage-collected
(for example after an exception dropped it), and at interpreter exit. Only a
process killed outright (`kill -9`, power loss) leaves it behind. No directory
is created while the gradients stay in memory.

Example:
    ```python
    import os
    import torch
    from pydvl_datainf.storage.policy import new_store

    store = new_store("auto", ["w"], memory_budget="1KB")
    store.append({"w": torch.randn(100, 4)})  # 1600 bytes: spills to Zarr
    store.finalize()
    path = store.resolved.path                # in an owned temporary directory
    assert os.path.exists(path)
    store.close()
    assert not os.path.exists(path)           # removed
    ```
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from ..config import parse_bytes
from .auto import AutoGradientStore
from .base import GradientStore
from .format import GRADIENT_STORE, PathLike, check_claimable, check_path
from .memory import MemoryGradientStore
from .recompute import GradientFn, RecomputeGradientStore
from .zarr import ZarrGradientStore

__all__ = [
    "STORE_KINDS",
    "ZARR_OPTIONS",
    "StoreSpec",
    "check_store_spec",
    "default_memory_budget",
    "expected_rows",
    "new_store",
    "temporary_zarr_store",
]

logger = logging.getLogger(__name__)

STORE_KINDS = ("memory", "zarr", "recompute", "auto")
"""The store choices by name."""

ZARR_OPTIONS = frozenset({"overwrite", "chunk_rows", "storage_options", "compressors"})
"""The options passed on to [ZarrGradientStore][pydvl_datainf.storage.ZarrGradientStore]."""

StoreSpec = Union[str, Callable[[Sequence[str]], GradientStore]]
"""A store kind from [STORE_KINDS][pydvl_datainf.storage.policy.STORE_KINDS], or
a callable `block_names -> GradientStore`."""


def check_store_spec(
    spec: Any, path: Optional[PathLike], options: Optional[Mapping[str, Any]]
) -> None:
    """Check a store choice before any work (no I/O).

    Raises:
        ValueError: an unknown kind, `"zarr"` without a path, an empty path,
            unknown options.

    Example:
        >>> check_store_spec("auto", None, {"chunk_rows": 1024})
    """
    if not (callable(spec) or spec in STORE_KINDS):
        raise ValueError(
            f"store must be one of {list(STORE_KINDS)} or a callable returning "
            f"a GradientStore, got {spec!r}"
        )
    if spec == "zarr" and path is None:
        raise ValueError("store='zarr' needs store_path (a path or fsspec URL)")
    if path is not None:
        check_path(path)
    unknown = set(options or {}) - ZARR_OPTIONS
    if unknown:
        raise ValueError(
            f"Unknown store_options {sorted(unknown)}; use "
            f"{', '.join(sorted(ZARR_OPTIONS))}"
        )


def default_memory_budget() -> int:
    """A quarter of the available RAM, in bytes."""
    import psutil

    return int(psutil.virtual_memory().available // 4)


def expected_rows(data: Any) -> Optional[int]:
    """Number of samples a loader will yield, if it can tell (a hint only)."""
    from torch.utils.data import DataLoader

    if not isinstance(data, DataLoader):
        return None
    try:
        return len(data.sampler)  # type: ignore[arg-type]
    except TypeError:
        return None


def _dataset_rows(data: Any) -> Optional[int]:
    try:
        return len(data.dataset)
    except (AttributeError, TypeError):
        return None


def temporary_zarr_store(
    block_names: Sequence[str],
    *,
    dtype: Union[None, str, torch.dtype] = None,
    options: Optional[Mapping[str, Any]] = None,
) -> ZarrGradientStore:
    """A [ZarrGradientStore][pydvl_datainf.storage.ZarrGradientStore] in a new
    temporary directory that it owns: removed on `close()`, when the store is
    garbage-collected, and at interpreter exit.

    Example:
        ```python
        import os
        import torch
        from pydvl_datainf.storage.policy import temporary_zarr_store

        with temporary_zarr_store(["w"]) as store:
            store.append({"w": torch.randn(4, 3)})
            store.finalize()
            assert os.path.exists(store.path)
        assert not os.path.exists(store.path)  # the directory is gone
        ```
    """
    opts = {k: v for k, v in dict(options or {}).items() if k != "storage_options"}
    opts.pop("overwrite", None)
    directory = tempfile.mkdtemp(prefix="datainf-")
    try:
        store = ZarrGradientStore(
            os.path.join(directory, "grads.zarr"),
            block_names,
            dtype=dtype,
            temporary_directory=directory,
            **opts,
        )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    logger.info("Gradients go to the temporary directory %s", directory)
    return store


def new_store(
    kind_or_callable: StoreSpec,
    block_names: Sequence[str],
    *,
    data: Optional[Iterable[Any]] = None,
    gradients: Optional[GradientFn] = None,
    path: Optional[PathLike] = None,
    dtype: Union[None, str, torch.dtype] = None,
    memory_budget: Union[None, int, str] = None,
    bytes_per_row: Optional[int] = None,
    options: Optional[Mapping[str, Any]] = None,
) -> GradientStore:
    """A new, empty gradient store of the chosen kind.

    Args:
        kind_or_callable: `"memory"`, `"zarr"` (at `path`), `"recompute"`
            (replays `data` through `gradients` on reads), `"auto"` (memory
            while the gradients fit `memory_budget`, then Zarr at `path`, or
            in an owned temporary directory without a path), or a callable
            `block_names -> GradientStore`.
        block_names: the block names, in order.
        data: the training loader (a capacity hint for memory, replayed by
            recompute, a size estimate for auto).
        gradients: `gradients(x, y) -> {block: (b, d_l)}`, for `"recompute"`.
        path: local path or fsspec URL of the Zarr store.
        dtype: the dtype Zarr keeps gradients in (`None`: as computed).
        memory_budget: bytes or a string such as `"2GB"` for `"auto"`
            (default a quarter of the available RAM).
        bytes_per_row: bytes of one row of gradients over all blocks; lets
            `"auto"` go to Zarr at once when the loader's size says so.
        options: [ZarrGradientStore][pydvl_datainf.storage.ZarrGradientStore]
            options: `overwrite`, `chunk_rows`, `storage_options`,
            `compressors`.

    Returns:
        The store.

    Raises:
        ValueError: a bad choice or options (see
            [check_store_spec][pydvl_datainf.storage.policy.check_store_spec]).
        StoreExistsError: `path` holds a gradient store and `overwrite` is not
            set, or holds anything not created by pydvl-datainf (never
            emptied, whatever `overwrite`). Checked before any gradient is
            computed, also for `"auto"`.

    Example:
        ```python
        import torch
        from pydvl_datainf.storage import ZarrGradientStore
        from pydvl_datainf.storage.policy import new_store

        store = new_store("zarr", ["w"], path="grads.zarr", dtype="bfloat16",
                          options={"chunk_rows": 1024})
        assert isinstance(store, ZarrGradientStore)
        store.append({"w": torch.randn(3, 2)})
        store.finalize()
        ```
    """
    check_store_spec(kind_or_callable, path, options)
    opts = dict(options or {})
    if callable(kind_or_callable):
        return kind_or_callable(list(block_names))
    kind = str(kind_or_callable)
    if kind == "memory":
        return MemoryGradientStore(block_names, capacity=expected_rows(data))
    if kind == "recompute":
        if data is None or gradients is None:
            raise ValueError(
                "store='recompute' needs the loader and a gradient function"
            )
        return RecomputeGradientStore(block_names, data, gradients)
    if kind == "zarr":
        assert path is not None
        return ZarrGradientStore(path, block_names, dtype=dtype, **opts)
    # auto
    budget = parse_bytes(memory_budget, default_memory_budget)
    if path is not None:  # refuse before the fit, not when spilling
        check_claimable(
            path,
            GRADIENT_STORE,
            overwrite=bool(opts.get("overwrite", False)),
            storage_options=opts.get("storage_options"),
            exists_hint="Pass store_options={'overwrite': True} or another store_path.",
        )
    zpath = None if path is None else os.fspath(path)

    def spill() -> GradientStore:
        if zpath is None:
            return temporary_zarr_store(block_names, dtype=dtype, options=opts)
        return ZarrGradientStore(zpath, block_names, dtype=dtype, **opts)

    n_est = _dataset_rows(data)
    if n_est is not None and bytes_per_row is not None:
        if n_est * bytes_per_row > budget:
            logger.info(
                "Gradients (~%.3g GB) exceed the memory budget (%.3g GB): writing "
                "them to %s",
                n_est * bytes_per_row / 1e9,
                budget / 1e9,
                zpath or "a temporary directory",
            )
            return spill()
    return AutoGradientStore(block_names, budget, spill)
