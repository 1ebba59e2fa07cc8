"""Shared helpers for the benchmark scripts: timing, machine info, models."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

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


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-r update `B A x`.

    Args:
        n_in: input features.
        n_out: output features.
        rank: r.
        b_std: if given, `B` is drawn from N(0, b_std²) (as after fine-tuning);
            otherwise `nn.Linear`'s default initialisation.
    """

    def __init__(self, n_in: int, n_out: int, rank: int, b_std: Optional[float] = None):
        super().__init__()
        self.base = nn.Linear(n_in, n_out)
        self.lora_A = nn.Linear(n_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, n_out, bias=False)
        self.base.requires_grad_(False)
        if b_std is not None:
            nn.init.normal_(self.lora_B.weight, std=b_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


class BareLoRALinear(nn.Module):
    """`LoRALinear` with its adapters as bare parameters, as in loralib.

    The frozen base weight and bias and the trainable `lora_A` (r, n_in) and
    `lora_B` (n_out, r) are `nn.Parameter`s of this module itself, so that no
    per-layer rule applies: the hook engine computes them with its
    module-local fallback.
    """

    def __init__(self, n_in: int, n_out: int, rank: int, b_std: Optional[float] = None):
        super().__init__()
        base = nn.Linear(n_in, n_out)
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.lora_A = nn.Parameter(nn.Linear(n_in, rank, bias=False).weight.detach())
        b = nn.Linear(rank, n_out, bias=False).weight.detach()
        if b_std is not None:
            nn.init.normal_(b, std=b_std)
        self.lora_B = nn.Parameter(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight, self.bias)
        return out + nn.functional.linear(
            nn.functional.linear(x, self.lora_A), self.lora_B
        )


def plain_epoch(model: nn.Module, loss, loader) -> None:
    """One plain batched forward+backward epoch: the physical floor."""
    for x, y in loader:
        model.zero_grad(set_to_none=True)
        loss(model(x), y).backward()
    model.zero_grad(set_to_none=True)
