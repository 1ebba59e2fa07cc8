"""EK-FAC under a given loss, against a dense float64 reference built here."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pydvl_datainf.experiments import ekfac as E
from reference import per_sample_grads, rel_err


class TokenModel(nn.Module):
    """Per-token MLP: (B, T, 3) -> (B, T, 4); zero input rows are padding."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 5, bias=False)
        self.second = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def masked_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the scored positions (y != -100)."""
    return nn.functional.cross_entropy(
        out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=-100
    )


def padding_mask(x: torch.Tensor) -> torch.Tensor:
    return x.abs().sum(-1) > 0


def make_data(n: int = 12, t: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n, t), generator=g)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    for i, length in enumerate(lengths.tolist()):
        x[i, length:] = 0.0  # padding: no input, no loss
        y[i, length:] = -100
    y[:, 0] = -100  # the first position is a "prompt": not scored
    return x, y


def reference(model, x, y, x_test, y_test, scale):
    """Covariances by explicit per-sample autograd, the inverse as a dense matrix."""
    blocks = {"first": ["first.weight"], "second": ["second.weight", "second.bias"]}
    g_train = per_sample_grads(model, masked_loss, x, y, blocks)
    g_test = per_sample_grads(model, masked_loss, x_test, y_test, blocks)
    w1, w2, b2 = model.first.weight, model.second.weight, model.second.bias
    cov = {
        "first": (
            torch.zeros(3, 3, dtype=torch.float64),
            torch.zeros(5, 5, dtype=torch.float64),
        ),
        "second": (
            torch.zeros(6, 6, dtype=torch.float64),
            torch.zeros(4, 4, dtype=torch.float64),
        ),
    }
    for k in range(len(x)):
        xk = x[k]
        real = padding_mask(xk)
        z1 = xk @ w1.T  # (T, 5), the first layer's output
        z1.retain_grad()
        h = torch.tanh(z1)
        z2 = h @ w2.T + b2
        z2.retain_grad()
        masked_loss(z2[None], y[k : k + 1]).backward()
        a1 = xk[real]
        a2 = torch.cat(
            [h[real], torch.ones(int(real.sum()), 1, dtype=torch.float64)], 1
        )
        cov["first"][0].add_(a1.T @ a1)
        cov["first"][1].add_(z1.grad.T @ z1.grad)
        cov["second"][0].add_(a2.T.detach() @ a2.detach())
        cov["second"][1].add_(z2.grad.T @ z2.grad)
        model.zero_grad(set_to_none=True)
    want = torch.zeros(len(x_test), len(x), dtype=torch.float64)
    for name, (ca, cs) in cov.items():
        qa, qs = torch.linalg.eigh(ca)[1], torch.linalg.eigh(cs)[1]
        out_f, cols = qs.shape[0], qa.shape[0]
        # dense basis for vec(out, cols), row-major: kron(qs, qa)
        basis = torch.kron(qs, qa)
        # our flattening: weight (out, in) row-major, then the bias column
        perm = torch.arange(out_f * cols).reshape(out_f, cols)
        if name == "second":
            perm = torch.cat([perm[:, :-1].reshape(-1), perm[:, -1]])
        basis = basis[perm.reshape(-1)]
        lam = ((g_train[name] @ basis) ** 2).mean(0)
        inverse = basis @ torch.diag(1 / (lam + scale * lam.mean())) @ basis.T
        want += g_test[name] @ inverse @ g_train[name].T
    return want, g_train, g_test


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_fit_ekfac_matches_dense_reference(scale):
    torch.manual_seed(0)
    model = TokenModel().double()
    x, y = make_data()
    x_test, y_test = make_data(5, seed=1)
    want, g_train, g_test = reference(model, x, y, x_test, y_test, scale)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    factors = E.fit_ekfac(model, masked_loss, loader, g_train, token_mask=padding_mask)
    got = E.ekfac_influences(factors, g_test, g_train, regularization_scale=scale)
    assert rel_err(got, want) < 1e-8
    assert all(p.grad is None for p in model.parameters())


def test_fit_ekfac_counts_only_masked_positions():
    torch.manual_seed(0)
    model = TokenModel().double()
    x, y = make_data()
    x_test, y_test = make_data(5, seed=1)
    want, g_train, g_test = reference(model, x, y, x_test, y_test, 0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    # without the mask, padding rows (zeros) still count for the bias column of A
    factors = E.fit_ekfac(model, masked_loss, loader, g_train)
    got = E.ekfac_influences(factors, g_test, g_train)
    assert rel_err(got, want) > 1e-6


def test_damping_is_datainf_lambda():
    """mean(Λ) over an orthogonal eigenbasis = mean_k ‖g_k‖² / d_l."""
    torch.manual_seed(0)
    model = TokenModel().double()
    x, y = make_data()
    _, g_train, _ = reference(model, x, y, x[:2], y[:2], 0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    factors = E.fit_ekfac(model, masked_loss, loader, g_train, token_mask=padding_mask)
    for name, f in factors.items():
        datainf_lambda = (
            float((g_train[name] ** 2).sum(1).mean()) / g_train[name].shape[1]
        )
        assert float(f.eigenvalues.mean()) == pytest.approx(datainf_lambda, rel=1e-10)


def test_fit_ekfac_rejects_blocks_that_are_not_linear_layers():
    model = TokenModel().double()
    x, y = make_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    bad = {"first": torch.zeros(12, 15, dtype=torch.float64), "": torch.zeros(12, 2)}
    with pytest.raises(ValueError, match="not a linear module"):
        E.fit_ekfac(model, masked_loss, loader, bad)
    wrong_width = {"first": torch.zeros(12, 14, dtype=torch.float64)}
    with pytest.raises(ValueError, match="has 14 parameters"):
        E.fit_ekfac(model, masked_loss, loader, wrong_width)


def test_ekfac_influences_rejects_mismatched_blocks():
    basis = E.KroneckerEigenbasis(
        torch.eye(2, dtype=torch.float64),
        torch.eye(3, dtype=torch.float64),
        torch.ones(3, 2, dtype=torch.float64),
        False,
    )
    g = {"layer": torch.randn(4, 6, dtype=torch.float64)}
    with pytest.raises(ValueError, match="do not match"):
        E.ekfac_influences({"other": basis}, g, g)
    wide = {"layer": torch.randn(4, 7, dtype=torch.float64)}
    with pytest.raises(ValueError, match="single linear layers"):
        E.ekfac_influences({"layer": basis}, wide, wide)
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        E.KroneckerEigenbasis(basis.qa, basis.qs, torch.ones(2, 3), False)


def test_fit_ekfac_does_not_depend_on_the_batch_size():
    torch.manual_seed(0)
    model = TokenModel().double()
    x, y = make_data()
    x_test, y_test = make_data(5, seed=1)
    _, g_train, g_test = reference(model, x, y, x_test, y_test, 0.1)
    scores = []
    for batch_size in (1, 5, 12):
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
        factors = E.fit_ekfac(
            model, masked_loss, loader, g_train, token_mask=padding_mask
        )
        scores.append(E.ekfac_influences(factors, g_test, g_train))
    assert rel_err(scores[0], scores[1]) < 1e-10
    assert rel_err(scores[0], scores[2]) < 1e-10
