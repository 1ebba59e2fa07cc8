"""Moved to [pydvl_datainf.experiments.datasets][pydvl_datainf.experiments.datasets] (temporary re-export)."""

from .experiments.datasets import *  # noqa: F401,F403
