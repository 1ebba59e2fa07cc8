"""Projected per-sample gradients from the engines, against the explicit reference.

The reference is the per-sample gradient from one backward per sample
(tests/reference.py), multiplied by the explicit projection matrix, in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import LoRALinear
from pydvl_datainf.compressed import apply_compressed
from pydvl_datainf.formula import auto_regularization
from pydvl_datainf.gradients import HookGradientEngine, LoopGradientEngine
from pydvl_datainf.gradients.rules import (
    get_token_factor_rule,
    linear_rule,
    linear_token_factors,
    register_rule,
)
from pydvl_datainf.projection import (
    Projection,
    block_specs,
    dense_spec,
    kronecker_spec,
)
from reference import DenseDataInf, per_sample_grads, rel_err

F64 = "float64"


class TokenLoRA(nn.Module):
    """Two LoRA layers applied to every token, logits averaged over tokens."""

    def __init__(self):
        super().__init__()
        self.l1 = LoRALinear(6, 8, 2)
        self.l2 = LoRALinear(8, 3, 2)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.l2(torch.tanh(self.l1(x))).mean(1))


class Shared(nn.Module):
    """One linear layer called twice per forward (its weight is used twice)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x))).sum(1)


def projections_for(params, seed=0):
    out = {}
    for i, (name, p) in enumerate(params.items()):
        if p.dim() == 2:
            k = (max(1, p.shape[0] // 2), max(1, p.shape[1] // 2 + 1))
            spec = kronecker_spec(tuple(p.shape), k, seed=seed + i, dtype=F64)
        else:
            spec = dense_spec(
                p.numel(), max(1, p.numel() // 2), seed=seed + i, dtype=F64
            )
        out[name] = Projection(spec)
    return out


def reference(model, loss, x, y, params, projections):
    dense = per_sample_grads(model, loss, x, y, {k: [k] for k in params})
    return {
        k: (dense[k] @ projections[k].matrix().T, dense[k].square().sum(1))
        for k in params
    }


def check(out, expected):
    for k, (rows, norms) in expected.items():
        assert rel_err(out[k].dense(), rows) < 1e-8, k
        assert rel_err(out[k].squared_norms, norms) < 1e-8, k


def token_case(n=6, tokens=7):
    torch.manual_seed(0)
    model = TokenLoRA().double().eval()
    x = torch.randn(n, tokens, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    return model, F.cross_entropy, x, y, params


@pytest.mark.parametrize(
    "engine", [HookGradientEngine(), LoopGradientEngine()], ids=["hooks", "loop"]
)
def test_projected_gradients_of_token_layers_match_the_explicit_projection(engine):
    model, loss, x, y, params = token_case()
    projections = projections_for(params)
    out = engine.per_sample_grads_projected(model, loss, x, y, params, projections)
    assert list(out) == list(params)
    check(out, reference(model, loss, x, y, params, projections))


def test_token_layers_are_projected_without_their_dense_weight_gradients():
    """The dense linear rule is never asked for a weight: every weight comes
    from the per-token factors (the biases still use the rule)."""
    model, loss, x, y, params = token_case()
    asked = []

    def recording_rule(module, inputs, grad_output, names=None, out=None):
        asked.extend(names or [])
        return linear_rule(module, inputs, grad_output, names=names, out=out)

    register_rule(nn.Linear)(recording_rule)
    try:
        out = HookGradientEngine(fallback=None).per_sample_grads_projected(
            model, loss, x, y, params, projections_for(params)
        )
    finally:
        register_rule(nn.Linear)(linear_rule)
    assert "weight" not in asked and asked == ["bias"]
    assert out["l1.lora_A.weight"].dense().shape == (6, 1 * 4)


def test_a_weight_used_twice_is_projected_from_its_dense_rows():
    torch.manual_seed(1)
    model = Shared().double().eval()
    x = torch.randn(5, 4, 5, dtype=torch.float64)
    y = torch.randn(5, 5, dtype=torch.float64)
    params = dict(model.named_parameters())
    projections = projections_for(params, seed=3)
    out = HookGradientEngine().per_sample_grads_projected(
        model, F.mse_loss, x, y, params, projections
    )
    check(out, reference(model, F.mse_loss, x, y, params, projections))


def test_one_vector_per_sample_uses_the_same_path():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    params = dict(model.named_parameters())
    projections = projections_for(params, seed=5)
    out = HookGradientEngine().per_sample_grads_projected(
        model, F.cross_entropy, x, y, params, projections
    )
    check(out, reference(model, F.cross_entropy, x, y, params, projections))


def test_an_orthogonal_projection_keeps_the_dense_gradients():
    model, loss, x, y, params = token_case()
    projections = {
        k: Projection(
            kronecker_spec(tuple(p.shape), tuple(p.shape), "orthogonal", 7, F64)
            if p.dim() == 2
            else dense_spec(p.numel(), p.numel(), "orthogonal", 7, F64)
        )
        for k, p in params.items()
    }
    out = HookGradientEngine().per_sample_grads_projected(
        model, loss, x, y, params, projections
    )
    dense = HookGradientEngine().per_sample_grads(model, loss, x, y, params)
    for k in params:
        rows = out[k].dense()
        assert rel_err(rows @ rows.T, dense[k] @ dense[k].T) < 1e-8


def test_every_parameter_needs_a_projection_of_its_size():
    model, loss, x, y, params = token_case()
    projections = projections_for(params)
    engine = HookGradientEngine()
    missing = dict(projections)
    missing.pop("head.bias")
    with pytest.raises(ValueError, match="no projection"):
        engine.per_sample_grads_projected(model, loss, x, y, params, missing)
    wrong = {**projections, "head.bias": Projection(dense_spec(4, 2))}
    with pytest.raises(ValueError, match="wrong size"):
        engine.per_sample_grads_projected(model, loss, x, y, params, wrong)


def test_the_linear_token_factors_give_the_per_sample_weight_gradient():
    lin = nn.Linear(4, 3).double()
    a = torch.randn(5, 2, 6, 4, dtype=torch.float64)  # two middle dimensions
    g = torch.randn(5, 2, 6, 3, dtype=torch.float64)
    assert get_token_factor_rule(nn.Linear) is linear_token_factors
    left, right = linear_token_factors(lin, (a,), g)
    assert left.shape == (5, 12, 3) and right.shape == (5, 12, 4)
    dense = linear_rule(lin, (a,), g, names=["weight"])["weight"]
    assert rel_err(left.transpose(1, 2) @ right, dense) < 1e-12
    assert linear_token_factors(lin, (a[:4],), g) is None  # batch sizes differ


# ------------------------------------------------------------------ whole blocks


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x):
        return self.net(x).mean(1)


def block_rows(engine, model, loss, x, y, params, blocks, projections):
    """Projected rows and exact squared norms per block, from per-parameter parts."""
    per_param = {
        p: projections[b].parts[i]
        for b, names in blocks.items()
        for i, p in enumerate(names)
    }
    out = engine.per_sample_grads_projected(model, loss, x, y, params, per_param)
    return {
        b: (
            torch.cat([out[p].dense() for p in names], dim=1),
            sum(out[p].squared_norms for p in names),
        )
        for b, names in blocks.items()
    }


def block_case():
    torch.manual_seed(3)
    model = TokenMLP().double().eval()
    x = torch.randn(30, 5, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    params = dict(model.named_parameters())
    blocks = {
        "net.0": ["net.0.weight", "net.0.bias"],
        "net.2": ["net.2.weight", "net.2.bias"],
    }
    return model, F.cross_entropy, x, y, params, blocks


def test_block_projections_match_the_explicit_block_matrix():
    model, loss, x, y, params, blocks = block_case()
    shapes = {b: [tuple(params[p].shape) for p in names] for b, names in blocks.items()}
    specs = block_specs(shapes, side=2, dense_k=2, seed=1, dtype=F64)
    projections = {b: Projection(s) for b, s in specs.items()}
    got = block_rows(
        HookGradientEngine(), model, loss, x, y, params, blocks, projections
    )
    dense = per_sample_grads(model, loss, x, y, blocks)
    for b in blocks:
        rows, norms = got[b]
        assert rows.shape == (30, specs[b].k)
        assert rel_err(rows, dense[b] @ projections[b].matrix().T) < 1e-8
        assert rel_err(norms, dense[b].square().sum(1)) < 1e-8


def test_orthogonal_block_projections_give_the_reference_scores():
    """The whole path (projected rows from the engine, exact norms and lambda,
    DataInf in projected space) against the independent reference."""
    model, loss, x, y, params, blocks = block_case()
    x_train, y_train, x_test, y_test = x[:24], y[:24], x[24:], y[24:]
    shapes = {b: [tuple(params[p].shape) for p in names] for b, names in blocks.items()}
    specs = block_specs(shapes, side=8, kind="orthogonal", seed=2, dtype=F64)
    projections = {b: Projection(s) for b, s in specs.items()}
    engine = HookGradientEngine()
    train = block_rows(
        engine, model, loss, x_train, y_train, params, blocks, projections
    )
    test = block_rows(engine, model, loss, x_test, y_test, params, blocks, projections)
    scores = 0
    for b, (rows, norms) in train.items():
        d = sum(params[p].numel() for p in blocks[b])
        lam = auto_regularization(float(norms.sum()), len(rows), d)
        scores = scores + apply_compressed(test[b][0], rows, norms, lam) @ rows.T
    ref = DenseDataInf(model, loss, x_train, y_train, blocks)
    assert rel_err(scores, ref.influences(x_test, y_test, x_train, y_train)) < 1e-8
