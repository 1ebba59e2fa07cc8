"""Deprecated location of [pydvl_datainf.storage][]; re-exports its names."""

from .storage import *  # noqa: F401,F403
from .storage import (  # noqa: F401
    DEFAULT_CHUNK_BYTES,
    STORE_DTYPES,
    AutoGradientStore,
    FitState,
    GradientStore,
    MemoryGradientStore,
    RecomputeGradientStore,
    ZarrGradientStore,
    default_chunk_rows,
    library_version,
    open_zarr_group,
    read_dtype,
    resolve_store_dtype,
    zarr_group_exists,
)
from .storage.base import trim_heap  # noqa: F401
