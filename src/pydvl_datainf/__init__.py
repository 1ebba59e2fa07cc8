"""pydvl-datainf: DataInf influence functions for pyDVL, exact and fit once.

```python
from pydvl.influence import SequentialInfluenceCalculator
from pydvl_datainf import DataInfInfluence
```

Scores follow pyDVL's sign: `influences` is $g_{test}^\\top R\\, g_{train}$, positive
for helpful training points; the paper's $\\mathcal{I}_{DataInf}$ is its negative.
"""

from importlib.metadata import PackageNotFoundError, version

from .blocks import Block, BlockStructure, build_blocks, freeze_all_but_lora
from .errors import (
    BlockStructureError,
    EmptyDataError,
    NonFiniteGradientError,
    NotFittedError,
    RegularizationError,
    StaleModelError,
    StoreExistsError,
    StoreMismatchError,
)
from .gradients import (
    FuncGradientEngine,
    GradientEngine,
    HookGradientEngine,
    LoopGradientEngine,
    get_engine,
)
from .influence import DataInfInfluence
from .scoring import (
    MatrixResult,
    TopK,
    influence_matrix,
    mean_test_influence,
    self_influence,
    top_k,
)
from .storage import (
    AutoGradientStore,
    GradientStore,
    MemoryGradientStore,
    RecomputeGradientStore,
    ZarrGradientStore,
)

try:
    __version__ = version("pydvl-datainf")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "DataInfInfluence",
    "Block",
    "BlockStructure",
    "build_blocks",
    "freeze_all_but_lora",
    "GradientEngine",
    "FuncGradientEngine",
    "HookGradientEngine",
    "LoopGradientEngine",
    "get_engine",
    "GradientStore",
    "MemoryGradientStore",
    "ZarrGradientStore",
    "RecomputeGradientStore",
    "AutoGradientStore",
    "influence_matrix",
    "MatrixResult",
    "top_k",
    "TopK",
    "self_influence",
    "mean_test_influence",
    "StoreExistsError",
    "StoreMismatchError",
    "NotFittedError",
    "StaleModelError",
    "NonFiniteGradientError",
    "EmptyDataError",
    "RegularizationError",
    "BlockStructureError",
    "__version__",
]
