r"""The layout of a Zarr gradient store, and what its writers share.

```
<path>/             attrs: format, format_version, store_id, block_names,
                           block_sizes, dtype, chunk_rows, n, finalized,
                           complete, manifest, and the fit's identity
<path>/grads/<i>    (n, d_i), chunks (chunk_rows, d_i)
<path>/norms/<i>    (n,), squared norms of block i
<path>/rows/digests (n, 16), the training rows' digests
<path>/digests/...  the digest of every chunk of each array above, by place
```

A store is claimed under a new id, built (beside its path on a local disk),
finalized with a manifest, given the fit's state, then published. The
sequential writer ([ZarrStoreWriter][pydvl_datainf.storage.zarr_writer.ZarrStoreWriter])
and the partitioned one used by the fit on Dask
([PartitionedStore][pydvl_datainf.storage.partitioned.PartitionedStore]) share
the pieces here.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import NonFiniteGradientError, StoreReplacedError
from .base import FitState
from .digests import DigestTable
from .dtypes import dtype_name, numpy_dtype, torch_to_numpy
from .format import (
    GRADIENT_STORE,
    check_claimable,
    claim_path,
    create_checked_array,
    is_url,
    open_zarr_group,
    staging_path,
    write_checked_array,
    write_manifest,
)

__all__ = [
    "FORMAT_VERSION",
    "WHAT",
    "EXISTS_HINT",
    "grad_names",
    "norm_names",
    "stored_rows",
    "create_grad_arrays",
    "write_fit_state",
    "store_id_at",
    "replaced_error",
    "claim_store",
    "remove_directory",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3
"""Version of the gradient store format (3: checksummed chunks bound to their
places by digest tables, an owner id, the identity of the fit)."""

WHAT = "gradient store"
"""How errors name a gradient store."""

EXISTS_HINT = (
    "Pass overwrite=True (store_options={'overwrite': True} to DataInfInfluence) "
    "to replace it, or reopen it with DataInfInfluence.from_store."
)


def grad_names(n_blocks: int) -> List[str]:
    """The names of the gradient arrays, one per block."""
    return [f"grads/{i}" for i in range(n_blocks)]


def norm_names(n_blocks: int) -> List[str]:
    """The names of the squared-norm arrays, one per block."""
    return [f"norms/{i}" for i in range(n_blocks)]


def stored_rows(block: str, rows: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """`rows` as the store keeps them (in `dtype`, on the CPU, as numpy).

    Raises:
        NonFiniteGradientError: values that overflow a half-precision `dtype`.
    """
    t = rows.detach().to(device="cpu", dtype=dtype)
    if t.dtype in (torch.float16, torch.bfloat16) and not bool(torch.isfinite(t).all()):
        raise NonFiniteGradientError(
            f"Gradients of block {block!r} overflow {dtype_name(dtype)} "
            f"(|g| > {torch.finfo(dtype).max:.4g}); store them in bfloat16 or "
            f"float32 instead."
        )
    return torch_to_numpy(t, dtype)


def create_grad_arrays(
    group: Any,
    sizes: Sequence[int],
    chunk_rows: int,
    dtype: torch.dtype,
    compressors: Any = None,
    n: int = 0,
) -> List[Any]:
    """The gradient arrays of a new store, `(n, d_l)` each, and their layout
    in the group's attributes."""
    arrays = [
        create_checked_array(
            group,
            name,
            shape=(n, d),
            chunks=(chunk_rows, d),
            dtype=numpy_dtype(dtype),
            compressors=compressors,
        )
        for name, d in zip(grad_names(len(sizes)), sizes)
    ]
    group.attrs.update(
        {
            "block_sizes": list(sizes),
            "dtype": dtype_name(dtype),
            "chunk_rows": chunk_rows,
            "n": n,
        }
    )
    return arrays


def write_fit_state(
    group: Any, block_names: Sequence[str], state: FitState
) -> Dict[str, DigestTable]:
    """Write the norms and the identity of a fit (not yet `complete`).

    Returns:
        The digest tables of the norm arrays (already in the manifest).
    """
    tables = {}
    for name, k in zip(norm_names(len(block_names)), block_names):
        s = state.squared_norms[k].detach().to("cpu").numpy()
        tables[name] = write_checked_array(
            group, name, s, (max(1, min(len(s), 2**20)),)
        )
    write_manifest(group, list(tables), tables)
    group.attrs.update(
        {
            "n_train": state.n_train,
            "regularization": dict(state.regularization),
            "regularization_spec": dict(state.regularization_spec),
            "regularization_scale": state.regularization_scale,
            "weights_digest": state.weights_digest,
            "frozen_digest": state.frozen_digest,
            "rows_digest": state.rows_digest,
            "block_structure": {k: list(v) for k, v in state.block_structure.items()},
            "block_shapes": {
                k: [list(s) for s in v] for k, v in state.block_shapes.items()
            },
            "fit_extra": dict(state.extra),
        }
    )
    return tables


def store_id_at(
    location: str, storage_options: Optional[Mapping[str, Any]] = None
) -> Optional[str]:
    """The id of the store at `location` (`None` if there is none)."""
    import zarr.errors

    try:
        group = open_zarr_group(location, "r", storage_options)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        return None
    return str(group.attrs.get("store_id", ""))


def replaced_error(
    path: str, ours: str, now: Optional[str], doing: str
) -> StoreReplacedError:
    """The error for a store at `path` that is no longer the one with id `ours`."""
    found = "nothing" if now is None else f"a store with id {now[:12]}"
    return StoreReplacedError(
        f"The gradient store at {path!r} was replaced while {doing} it: it had id "
        f"{ours[:12]}, and {found} is there now (another fit or process wrote to "
        f"this path). Nothing was read from, or written to, the other store. "
        f"Reopen it with DataInfInfluence.from_store, or fit again."
    )


def claim_store(
    path: str,
    attributes: Mapping[str, Any],
    *,
    overwrite: bool,
    storage_options: Optional[Mapping[str, Any]] = None,
    staging: Optional[str] = None,
) -> Tuple[str, Any]:
    """Claim a new store for `path`: `(location, group)`.

    What publishing would refuse is refused now. On a local disk the store is
    built at `staging` (default a new name beside `path`) and renamed into
    place by [publish_path][pydvl_datainf.storage.format.publish_path] once
    complete; on object stores it is built in place.

    Raises:
        StoreExistsError: as [claim_path][pydvl_datainf.storage.format.claim_path].
    """
    check_claimable(
        path,
        GRADIENT_STORE,
        overwrite=overwrite,
        storage_options=storage_options,
        exists_hint=EXISTS_HINT,
    )
    location = path if is_url(path) else (staging or staging_path(path))
    group = claim_path(
        location,
        GRADIENT_STORE,
        overwrite=overwrite,
        storage_options=storage_options,
        attributes={
            "format_version": FORMAT_VERSION,
            "finalized": False,
            "complete": False,
            **dict(attributes),
        },
        exists_hint=EXISTS_HINT,
    )
    return location, group


def remove_directory(path: str) -> None:
    """Remove a directory the library created (a finalizer)."""
    try:
        shutil.rmtree(path)
        logger.debug("Removed the directory %s", path)
    except FileNotFoundError:
        pass
    except OSError as e:  # pragma: no cover - e.g. a file still open on Windows
        logger.warning("Could not remove the directory %s: %s", path, e)
