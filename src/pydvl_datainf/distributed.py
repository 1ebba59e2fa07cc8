"""Deprecated location of [pydvl_datainf.scoring.executors.dask][]; re-exports its names."""

from .scoring.executors.dask import *  # noqa: F401,F403
from .scoring.executors.dask import DaskExecutor, require_zarr, worker_device  # noqa: F401
