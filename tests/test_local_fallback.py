"""The hook engine's module-local fallback against the autograd loop.

Layers without a rule are computed by re-running only their own forward,
vmapped over the samples, from inputs and output gradients captured in the one
batched pass. Every case is compared with the one-sample-at-a-time loop in
float64, to 1e-10.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Iterator, Optional
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pydvl_datainf.factored import densify
from pydvl_datainf.gradients import (
    GradientFallbackWarning,
    HookGradientEngine,
    LoopGradientEngine,
)
from pydvl_datainf.gradients.hooks import dispatch as local

RTOL, ATOL = 1e-10, 1e-12


@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class BareLoRA(nn.Module):
    """A frozen base and adapters as bare parameters, as in loralib's layers."""

    def __init__(self, n_in: int, n_out: int, rank: int = 2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(n_out), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(rank, n_in) / math.sqrt(n_in))
        self.lora_B = nn.Parameter(0.1 * torch.randn(n_out, rank))
        self.scaling = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        return base + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


class LoraLibLinear(nn.Linear):
    """An `nn.Linear` subclass with `lora_A` / `lora_B`, as loralib's `Linear`."""

    def __init__(self, n_in: int, n_out: int, rank: int = 2) -> None:
        super().__init__(n_in, n_out)
        self.lora_A = nn.Parameter(torch.randn(rank, n_in) / math.sqrt(n_in))
        self.lora_B = nn.Parameter(0.1 * torch.randn(n_out, rank))
        self.weight.requires_grad_(False)
        self.scaling = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


class Gated(nn.Module):
    """A gated unit: sigmoid(x Wg + bg) * (x Wv), no rule registered."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.randn(n_in, n_out) / math.sqrt(n_in))
        self.b_gate = nn.Parameter(torch.randn(n_out))
        self.w_value = nn.Parameter(torch.randn(n_in, n_out) / math.sqrt(n_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x @ self.w_gate + self.b_gate) * (x @ self.w_value)


class Net(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module, twice: bool = False):
        super().__init__()
        self.first, self.second, self.twice = first, second, twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        if self.twice:  # the same module (shared weights) called again
            h = torch.tanh(self.first(h))
        return self.second(h)


def trainable(model: nn.Module) -> Dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def check(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss=F.cross_entropy,
    traced: Optional[bool] = None,
):
    """Hooks (traced linear uses, and vmap re-run) == loop; returns the plan.

    `traced`: whether the calls of the modules without a rule are expected to
    be traced (all uses linear), or re-run (`None`: not checked).
    """
    model.eval()
    params = trainable(model)
    ref = LoopGradientEngine().per_sample_grads(model, loss, x, y, params)
    for k in params:
        assert ref[k].abs().sum() > 0, f"degenerate test: zero gradient for {k}"
    for trace in (True, False):
        engine = HookGradientEngine(fallback=None, trace=trace)  # no whole model
        plan = engine.plan(model, params)
        assert plan.fallback == {} and plan.local, str(plan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradientFallbackWarning)
            got = engine.per_sample_grads(model, loss, x, y, params)
            factored = engine.per_sample_grads_factored(model, loss, x, y, params)
        for k in params:
            torch.testing.assert_close(got[k], ref[k], rtol=RTOL, atol=ATOL, msg=k)
            torch.testing.assert_close(
                densify(factored[k]), ref[k], rtol=RTOL, atol=ATOL, msg=k
            )
        assert all(p.grad is None for p in model.parameters())
    if traced is not None:
        with mock.patch.object(
            local, "local_per_sample_grads", side_effect=AssertionError("re-run")
        ) as rerun:
            try:
                HookGradientEngine(fallback=None).per_sample_grads(
                    model, loss, x, y, params
                )
            except ValueError:
                pass  # the re-run was refused: the fallback (None) raised
        assert rerun.called != traced
    return plan


@pytest.mark.parametrize("tokens", [False, True])
def test_bare_parameter_lora(tokens: bool) -> None:
    model = Net(BareLoRA(5, 6), BareLoRA(6, 3))
    shape = (7, 4, 5) if tokens else (7, 5)
    x = torch.randn(*shape)
    y = torch.randn(*shape[:-1], 3)
    plan = check(model, x, y, F.mse_loss, traced=True)
    assert sorted(h.name for h in plan.local) == ["first", "second"]


def test_loralib_linear_subclass() -> None:
    model = Net(LoraLibLinear(5, 6), nn.Linear(6, 3))
    plan = check(model, torch.randn(8, 5), torch.randint(0, 3, (8,)), traced=True)
    assert [h.name for h in plan.local] == ["first"]
    assert set(plan.local[0].params) == {"lora_A", "lora_B", "bias"}
    # the plain head keeps its rule
    assert [h.name for h in plan.hooked if h.rule is not None] == ["second"]


def test_custom_gated_layer() -> None:
    model = Net(Gated(5, 6), Gated(6, 3))
    # the bias is added outside a linear map: the module is re-run
    check(model, torch.randn(6, 5), torch.randint(0, 3, (6,)), traced=False)


def test_module_called_twice_shares_its_weights() -> None:
    model = Net(BareLoRA(5, 5), nn.Linear(5, 3), twice=True)
    check(model, torch.randn(6, 5), torch.randint(0, 3, (6,)), traced=True)
    gated = Net(Gated(4, 4), Gated(4, 2), twice=True)
    check(gated, torch.randn(6, 4), torch.randn(6, 2), F.mse_loss)


class KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gated = Gated(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gated(x=x)


def test_module_called_with_keywords() -> None:
    check(KeywordCall(), torch.randn(5, 4), torch.randn(5, 3), F.mse_loss)


class BranchyGated(Gated):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if bool((out.abs() < 1e6).all()):  # vmap cannot trace this
            out = out * 2
        return out


def test_untraceable_module_goes_to_the_whole_model_loop() -> None:
    model = Net(BranchyGated(4, 4), nn.Linear(4, 2)).eval()
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    params = trainable(model)
    with pytest.warns(GradientFallbackWarning, match=r"first \(BranchyGated\)"):
        got = HookGradientEngine().per_sample_grads(model, F.mse_loss, x, y, params)
    ref = LoopGradientEngine().per_sample_grads(model, F.mse_loss, x, y, params)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="first.w_gate.*BranchyGated"):
        HookGradientEngine(fallback=None).per_sample_grads(
            model, F.mse_loss, x, y, params
        )


def test_plan_is_printable_and_one_warning_per_model() -> None:
    model = Net(BareLoRA(4, 4), nn.Linear(4, 2)).eval()
    params = trainable(model)
    engine = HookGradientEngine()
    text = str(engine.plan(model, params))
    lines = text.splitlines()
    assert lines[0].split() == ["parameter", "module", "computed", "by"]
    assert any("first.lora_A" in ln and "module-local" in ln for ln in lines)
    assert any("second.weight" in ln and "rule linear_rule" in ln for ln in lines)
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            engine.per_sample_grads(model, F.mse_loss, x, y, params)
            HookGradientEngine().per_sample_grads(model, F.mse_loss, x, y, params)
    ours = [w for w in caught if issubclass(w.category, GradientFallbackWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "first (BareLoRA)" in message and "re-runs its own forward" in message
    other = Net(BareLoRA(4, 4), nn.Linear(4, 2)).eval()
    with pytest.warns(GradientFallbackWarning):
        engine.per_sample_grads(other, F.mse_loss, x, y, trainable(other))
