"""bfloat16 and float16 models: per-sample gradients and norms in float32.

The model runs (forward and backward) in half precision; the per-sample
products, their sums over tokens and the squared norms are accumulated in
float32. The error against a float64 reference of the same weights is bounded
by the half-precision rounding of the forward and backward, not by the
accumulation.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pydvl_datainf import DataInfInfluence
from pydvl_datainf.gradients import (
    GradientFallbackWarning,
    HookGradientEngine,
    LoopGradientEngine,
)

# relative Frobenius error of the per-sample gradients against float64: a few
# units of the format's rounding error (bf16: 2^-8, fp16: 2^-11)
BOUNDS = {torch.bfloat16: 0.05, torch.float16: 0.01, torch.float32: 1e-5}


class Adapter(nn.Module):
    """Frozen base plus bare-parameter adapters (module-local fallback)."""

    def __init__(self, n_in: int, n_out: int, rank: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(n_in, n_out).requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(rank, n_in) / math.sqrt(n_in))
        self.lora_B = nn.Parameter(torch.randn(n_out, rank) / math.sqrt(rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B)


class Model(nn.Module):
    """Rules (linear, layer norm) and a module without a rule, over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.adapter = Adapter(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.inp(x)))
        return self.head(torch.tanh(self.adapter(h)).mean(1))


def _data(n: int = 24):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


def _reference() -> tuple:
    torch.manual_seed(0)
    model = Model().eval()
    x, y = _data()
    ref_model = copy.deepcopy(model).double()
    params = {k: p for k, p in ref_model.named_parameters() if p.requires_grad}
    ref = LoopGradientEngine().per_sample_grads(
        ref_model, F.cross_entropy, x.double(), y, params
    )
    return model, x, y, ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_precision_gradients_accumulate_in_float32(dtype: torch.dtype) -> None:
    model, x, y, ref = _reference()
    model = model.to(dtype)
    params: Dict[str, nn.Parameter] = {
        k: p for k, p in model.named_parameters() if p.requires_grad
    }
    engine = HookGradientEngine(fallback=None)
    assert {h.name for h in engine.plan(model, params).local} == {"adapter"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientFallbackWarning)
        got = engine.per_sample_grads(model, F.cross_entropy, x.to(dtype), y, params)
    errors = {}
    for k in params:
        assert got[k].dtype == torch.float32, k
        errors[k] = _rel(got[k], ref[k])
        assert errors[k] < BOUNDS[dtype], (k, errors)
    if dtype != torch.float32:  # the bound is not vacuous: rounding is visible
        assert max(errors.values()) > 10 * BOUNDS[torch.float32]
    # squared norms from the float32 gradients, to the same relative accuracy
    for k in params:
        norms = got[k].pow(2).sum(1)
        want = ref[k].pow(2).sum(1)
        assert float(((norms.double() - want) / want).abs().max()) < 4 * BOUNDS[dtype]


def test_bf16_fit_norms_and_influences_against_float32() -> None:
    torch.manual_seed(0)
    model = Model().eval()
    x, y = _data(32)
    loader32 = DataLoader(TensorDataset(x, y), batch_size=16)
    loader16 = DataLoader(TensorDataset(x.bfloat16(), y), batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback and head-block warnings
        full = DataInfInfluence(model, F.cross_entropy, progress=False).fit(loader32)
        half_model = copy.deepcopy(model).bfloat16()
        half = DataInfInfluence(half_model, F.cross_entropy, progress=False)
        half.fit(loader16)
        s_full = full.influences(x[:4], y[:4], x, y)
        s_half = half.influences(x[:4].bfloat16(), y[:4], x.bfloat16(), y)
    for k, v in half.squared_norms.items():
        assert v.dtype == torch.float32
        rel = ((v - full.squared_norms[k]) / full.squared_norms[k]).abs().max()
        assert float(rel) < 0.2, k
    assert s_half.dtype == torch.float32
    assert _rel(s_half, s_full.double()) < 0.1
    corr = torch.corrcoef(torch.stack([s_half.flatten(), s_full.flatten()]))[0, 1]
    assert float(corr) > 0.99
