"""Reproducible check: pyDVL 0.10's InverseHarmonicMeanInfluence against the formula.

On one small float64 model, computes the DataInf influences three ways:

* the formula, densely: R_l = mean_i inv(g_il g_ilᵀ + λ I), per block;
* `pydvl_datainf.DataInfInfluence`;
* pyDVL's `InverseHarmonicMeanInfluence` with the same blocks and λ, for several
  fit batch sizes and query chunk sizes.

and prints the relative error of each against the dense formula.

    python benchmarks/compare_pydvl_ihm.py
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from pydvl.influence import SequentialInfluenceCalculator
from pydvl.influence.torch import InverseHarmonicMeanInfluence
from pydvl.influence.torch.util import BlockMode, NestedTorchCatAggregator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pydvl_datainf import DataInfInfluence

warnings.filterwarnings("ignore")
LAMBDA = 0.1


def dense_formula(model, x, y, xt, yt):
    params = dict(model.named_parameters())
    blocks = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}

    def grads(a, b):
        out = {k: [] for k in blocks}
        for i in range(len(a)):
            model.zero_grad()
            F.cross_entropy(model(a[i : i + 1]), b[i : i + 1]).backward()
            for k, names in blocks.items():
                out[k].append(torch.cat([params[p].grad.reshape(-1) for p in names]))
        return {k: torch.stack(v) for k, v in out.items()}

    g, gt = grads(x, y), grads(xt, yt)
    total = 0
    for k in blocks:
        d = g[k].shape[1]
        eye = torch.eye(d, dtype=torch.float64)
        R = sum(torch.linalg.inv(torch.outer(v, v) + LAMBDA * eye) for v in g[k]) / len(
            x
        )
        total = total + gt[k] @ R @ g[k].T
    return total


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(50, 4, dtype=torch.float64), torch.randint(0, 3, (50,))
    xt, yt = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    truth = dense_formula(model, x, y, xt, yt)

    ours = DataInfInfluence(model, F.cross_entropy, LAMBDA, progress=False)
    ours.fit(DataLoader(TensorDataset(x, y), batch_size=7))
    print(
        f"pydvl-datainf (any batch size): rel. error {rel(ours.influences(xt, yt, x, y), truth):.1e}"
    )

    for fit_bs in (50, 10, 1):
        ihm = InverseHarmonicMeanInfluence(
            model, F.cross_entropy, LAMBDA, block_structure=BlockMode.LAYER_WISE
        )
        ihm.fit(DataLoader(TensorDataset(x, y), batch_size=fit_bs))
        for test_bs, train_bs in ((4, 50), (1, 10)):
            calc = SequentialInfluenceCalculator(ihm)
            got = calc.influences(
                DataLoader(TensorDataset(xt, yt), batch_size=test_bs),
                DataLoader(TensorDataset(x, y), batch_size=train_bs),
            ).compute(NestedTorchCatAggregator())
            ratio = float((got / truth).median())
            print(
                f"pyDVL IHM fit batch {fit_bs:>2}, chunks test {test_bs} x train "
                f"{train_bs:>2}: rel. error {rel(got, truth):.2f}, median ratio "
                f"to the formula {ratio:.3f}"
            )


if __name__ == "__main__":
    main()
