"""Scoring: the influence matrix, its reductions, and the executors that run them.

Layout: [tiles][pydvl_datainf.scoring.tiles] (the output format),
[matrix][pydvl_datainf.scoring.matrix] (`influence_matrix`),
[reductions][pydvl_datainf.scoring.reductions] (`top_k`, `self_influence`,
`mean_test_influence`), [executors][pydvl_datainf.scoring.executors] (local,
Dask). Every path goes through the [DataInfOperator][pydvl_datainf.operator.DataInfOperator].
"""

from .inputs import TestData
from .matrix import DEFAULT_FACTOR_BUDGET, MatrixResult, influence_matrix
from .reductions import TopK, mean_test_influence, self_influence, top_k

__all__ = [
    "TestData",
    "MatrixResult",
    "TopK",
    "DEFAULT_FACTOR_BUDGET",
    "influence_matrix",
    "top_k",
    "self_influence",
    "mean_test_influence",
]
