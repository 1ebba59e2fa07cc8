import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", category=FutureWarning)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that sets torch's thread count does not change it for the next
    ones (Dask's worker threads keep the default count, so a leaked count
    would make tile products differ in their last bits from local ones)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
