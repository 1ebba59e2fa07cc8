"""Shared helpers for the benchmark scripts: timing, machine info, models."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch import nn


def timeit(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> Dict[str, str]:
    import pydvl

    import pydvl_datainf

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pydvl": pydvl.__version__,
        "pydvl_datainf": pydvl_datainf.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
    }


def plain_epoch(model: nn.Module, loss, loader) -> None:
    """One plain batched forward+backward epoch: the physical floor."""
    for x, y in loader:
        model.zero_grad(set_to_none=True)
        loss(model(x), y).backward()
    model.zero_grad(set_to_none=True)
