"""Moved to [pydvl_datainf.experiments.finetune][pydvl_datainf.experiments.finetune] (temporary re-export)."""

from .experiments.finetune import *  # noqa: F401,F403
