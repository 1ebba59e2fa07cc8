"""An independent float64 reference for DataInf, built from explicit inverses.

Per-sample gradients come from `loss.backward()` one sample at a time, and
R_l = mean_i inv(g_il g_ilᵀ + λ_l I) is formed densely with `torch.linalg.inv`.
Nothing here uses the library's formula, engines or Sherman–Morrison.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import torch
from torch import nn


def per_sample_grads(
    model: nn.Module,
    loss,
    x: torch.Tensor,
    y: torch.Tensor,
    blocks: Mapping[str, Sequence[str]],
) -> Dict[str, torch.Tensor]:
    """(n, d_l) per block, by backward on each sample alone."""
    params = dict(model.named_parameters())
    was = model.training
    model.eval()
    rows: Dict[str, List[torch.Tensor]] = {k: [] for k in blocks}
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, names in blocks.items():
            rows[k].append(
                torch.cat(
                    [
                        (
                            params[p].grad
                            if params[p].grad is not None
                            else torch.zeros_like(params[p])
                        )
                        .reshape(-1)
                        .clone()
                        for p in names
                    ]
                )
            )
    model.zero_grad(set_to_none=True)
    model.train(was)
    return {k: torch.stack(v).double() for k, v in rows.items()}


def dense_R(grads: torch.Tensor, lam: float) -> torch.Tensor:
    """mean_i inv(g_i g_iᵀ + λ I), explicitly."""
    n, d = grads.shape
    eye = torch.eye(d, dtype=torch.float64)
    return sum(torch.linalg.inv(torch.outer(g, g) + lam * eye) for g in grads) / n


def auto_lambda(grads: torch.Tensor, scale: float = 0.1) -> float:
    return float(scale * (grads**2).sum(dim=1).mean() / grads.shape[1])


class DenseDataInf:
    """Reference DataInf: dense R per block from the full training set."""

    def __init__(self, model, loss, x_train, y_train, blocks, lambdas=None):
        self.model, self.loss, self.blocks = model, loss, blocks
        g = per_sample_grads(model, loss, x_train, y_train, blocks)
        self.lambdas = (
            {k: auto_lambda(v) for k, v in g.items()} if lambdas is None else lambdas
        )
        self.R = {k: dense_R(v, self.lambdas[k]) for k, v in g.items()}
        self.train_grads = g

    def grads(self, x, y):
        return per_sample_grads(self.model, self.loss, x, y, self.blocks)

    def factors_by_block(self, x, y):
        g = self.grads(x, y)
        return {k: g[k] @ self.R[k] for k in self.blocks}  # R symmetric

    def factors(self, x, y):
        return torch.cat(list(self.factors_by_block(x, y).values()), dim=1)

    def influences_by_block(self, xt, yt, x, y):
        ft, g = self.factors_by_block(xt, yt), self.grads(x, y)
        return {k: ft[k] @ g[k].T for k in self.blocks}

    def influences(self, xt, yt, x, y):
        return sum(self.influences_by_block(xt, yt, x, y).values())

    def perturbation(self, xt, yt, x, y):
        """(m, n, *x.shape[1:]) by double backward, one (test, train) pair a time."""
        f = self.factors(xt, yt)
        params = dict(self.model.named_parameters())
        names = [p for ps in self.blocks.values() for p in ps]
        self.model.eval()
        out = torch.zeros(len(xt), len(x), *x.shape[1:], dtype=torch.float64)
        for i in range(len(x)):
            xi = x[i : i + 1].clone().requires_grad_(True)
            gs = torch.autograd.grad(
                self.loss(self.model(xi), y[i : i + 1]),
                [params[p] for p in names],
                create_graph=True,
            )
            flat = torch.cat([g.reshape(-1) for g in gs])
            for j in range(len(xt)):
                (gx,) = torch.autograd.grad(f[j] @ flat, xi, retain_graph=True)
                out[j, i] = gx[0]
        return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in the max norm."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def dense_exact_inverse(grads: torch.Tensor, lam: float) -> torch.Tensor:
    """inv(mean_i g_i g_iᵀ + λ I): the damped Gauss–Newton block, explicitly."""
    n, d = grads.shape
    g = grads.double()
    return torch.linalg.inv(g.T @ g / n + lam * torch.eye(d, dtype=torch.float64))
