import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", category=FutureWarning)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

#: the determinism and fault tests: CI runs them a second time with other CPU
#: kernels selected (see .ci/run), to catch results that depend on one kernel
KERNEL_SENSITIVE = {
    "test_concurrency.py",
    "test_dask_fit.py",
    "test_distributed.py",
    "test_faults_identity.py",
    "test_faults_matrix.py",
    "test_faults_model.py",
    "test_faults_storage.py",
    "test_matrix.py",
    "test_operator.py",
    "test_rows.py",
    "test_stores.py",
    "test_thread_safety.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in KERNEL_SENSITIVE:
            item.add_marker(pytest.mark.kernels)


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
