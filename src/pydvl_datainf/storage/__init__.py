r"""Gradient stores: where `fit` keeps the per-sample training gradients.

A store holds, for each block $l$, the $(n, d_l)$ matrix of per-sample training
gradients, written once during `fit` in row order and read in chunks of rows by
queries. Every query reads gradients through the
[GradientStore][pydvl_datainf.storage.GradientStore] interface only, so results
do not depend on where (or in how many chunks) they are kept.

| store | memory | queries read | reopen without refit |
| --- | --- | --- | --- |
| [MemoryGradientStore][pydvl_datainf.storage.MemoryGradientStore] | $n \sum_l d_l$ floats | RAM | no |
| [ZarrGradientStore][pydvl_datainf.storage.ZarrGradientStore] | one chunk of rows | disk / object storage | yes |
| [RecomputeGradientStore][pydvl_datainf.storage.RecomputeGradientStore] | nothing per row | the training loader, again | no |
| [AutoGradientStore][pydvl_datainf.storage.AutoGradientStore] | memory below a budget, then Zarr | either | when spilled |

The per-block squared norms and $\lambda_l$ ($O(nL)$ numbers) live in the
fitted state, and a Zarr store also records them (see
[FitState][pydvl_datainf.storage.FitState]) so that a fitted model can be
reopened from disk.

Modules: `base` (the interface), `memory`, `zarr`, `recompute`, `auto` (one
per backend), `policy` (which store `fit` uses, temporary directories),
`format` (Zarr helpers: ownership, existence), `integrity` (checksums,
manifest, checked reads) and
`dtypes`.

Example:
    ```python
    import torch
    from pydvl_datainf.storage import MemoryGradientStore

    store = MemoryGradientStore(["a", "b"])
    store.append({"a": torch.ones(2, 3), "b": torch.zeros(2, 1)})
    store.finalize()
    store.n  # 2
    ```
"""

from .auto import AutoGradientStore
from .base import DEFAULT_CHUNK_BYTES, FitState, GradientStore, default_chunk_rows
from .dtypes import STORE_DTYPES, read_dtype, resolve_store_dtype
from .format import (
    FORMATS,
    GRADIENT_STORE,
    INFLUENCE_MATRIX,
    PathState,
    PathStatus,
    check_claimable,
    checksum_codecs,
    claim_path,
    create_checked_array,
    inspect_path,
    library_version,
    open_checked_array,
    open_zarr_group,
    read_checked,
    read_manifest,
    remove_owned,
    verify_array,
    write_manifest,
    zarr_group_exists,
)
from .memory import MemoryGradientStore
from .policy import STORE_KINDS, check_store_spec, new_store, temporary_zarr_store
from .recompute import GradientFn, RecomputeGradientStore
from .zarr import ZarrGradientStore

__all__ = [
    "GradientStore",
    "MemoryGradientStore",
    "ZarrGradientStore",
    "RecomputeGradientStore",
    "AutoGradientStore",
    "FitState",
    "GradientFn",
    "STORE_DTYPES",
    "STORE_KINDS",
    "DEFAULT_CHUNK_BYTES",
    "default_chunk_rows",
    "resolve_store_dtype",
    "read_dtype",
    "library_version",
    "new_store",
    "check_store_spec",
    "temporary_zarr_store",
    "open_zarr_group",
    "zarr_group_exists",
    "inspect_path",
    "PathState",
    "PathStatus",
    "claim_path",
    "check_claimable",
    "remove_owned",
    "checksum_codecs",
    "create_checked_array",
    "write_manifest",
    "read_manifest",
    "open_checked_array",
    "read_checked",
    "verify_array",
    "FORMATS",
    "GRADIENT_STORE",
    "INFLUENCE_MATRIX",
]
