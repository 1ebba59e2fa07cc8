"""Deprecated location of [pydvl_datainf.scoring][]; re-exports its names."""

from .operator import tile_product  # noqa: F401
from .scoring import *  # noqa: F401,F403
from .scoring import (  # noqa: F401
    DEFAULT_FACTOR_BUDGET,
    MatrixResult,
    TestData,
    TopK,
    influence_matrix,
    mean_test_influence,
    self_influence,
    top_k,
)
from .scoring.tiles import done_mask, mark_done  # noqa: F401
