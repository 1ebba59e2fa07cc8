"""Moved to [pydvl_datainf.gradients.hooks][]; this path re-exports it."""

from .gradients.hooks import *  # noqa: F401,F403
from .gradients.hooks import (  # noqa: F401
    GradientFallbackWarning,
    HookedModule,
    HookGradientEngine,
    HookPlan,
    per_sample_losses,
)
from .gradients.losses import closed_form_losses as _closed_form_losses  # noqa: F401
