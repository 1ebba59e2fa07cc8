"""Moved to [pydvl_datainf.gradients.rules][]; this path re-exports it."""

from .gradients.rules import *  # noqa: F401,F403
from .gradients.rules import (  # noqa: F401
    RULE_PARAMS,
    FactorRule,
    GradRule,
    accepts_out,
    conv1d_rule,
    conv2d_rule,
    embedding_rule,
    get_factor_rule,
    get_rule,
    layer_norm_rule,
    linear_factors,
    linear_rule,
    register_factor_rule,
    register_rule,
    rms_norm_rule,
    unregister_rule,
    wanted,
)
