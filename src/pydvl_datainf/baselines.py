"""Moved to [pydvl_datainf.experiments.baselines][pydvl_datainf.experiments.baselines] (temporary re-export)."""

from .experiments.baselines import *  # noqa: F401,F403
