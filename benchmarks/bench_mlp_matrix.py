"""The 200 test x 2000 train influence matrix of an MLP (32->64->10, cross-entropy).

Both models run through pyDVL's SequentialInfluenceCalculator with chunks of 100,
one thread, with the same blocks (one per Linear layer):

* pyDVL 0.10's `InverseHarmonicMeanInfluence` (BlockMode.LAYER_WISE),
* `DataInfInfluence` (fit once, then matrix products over the cache),

and `DataInfInfluence.fit` against one plain forward+backward epoch over the same
loader. Prints times and ratios measured side by side in this run.

    python benchmarks/bench_mlp_matrix.py [--engine auto] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from pydvl.influence import SequentialInfluenceCalculator
from pydvl.influence.torch import InverseHarmonicMeanInfluence
from pydvl.influence.torch.util import BlockMode, NestedTorchCatAggregator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common import machine, plain_epoch, timeit
from pydvl_datainf import DataInfInfluence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--skip-pydvl", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(args.n_train, 32)
    y = torch.randint(0, 10, (args.n_train,))
    xt = torch.randn(args.n_test, 32)
    yt = torch.randint(0, 10, (args.n_test,))
    train = DataLoader(TensorDataset(x, y), batch_size=args.chunk)
    test = DataLoader(TensorDataset(xt, yt), batch_size=args.chunk)
    loss = F.cross_entropy

    def ours() -> torch.Tensor:
        infl = DataInfInfluence(model, loss, engine=args.engine, progress=False)
        infl.fit(train)
        calc = SequentialInfluenceCalculator(infl)
        return calc.influences(test, train).compute(NestedTorchCatAggregator())

    def ours_fit() -> None:
        DataInfInfluence(model, loss, engine=args.engine, progress=False).fit(train)

    def pydvl_ihm() -> torch.Tensor:
        ihm = InverseHarmonicMeanInfluence(
            model, loss, regularization=0.01, block_structure=BlockMode.LAYER_WISE
        )
        ihm.fit(train)
        calc = SequentialInfluenceCalculator(ihm)
        return calc.influences(test, train).compute(NestedTorchCatAggregator())

    results = {"machine": machine(), "args": vars(args)}
    results["floor_epoch_s"] = timeit(
        lambda: plain_epoch(model, loss, train), args.repeats
    )
    results["ours_fit_s"] = timeit(ours_fit, args.repeats)
    results["ours_matrix_s"] = timeit(ours, args.repeats)
    if not args.skip_pydvl:
        t0 = time.perf_counter()
        pydvl_ihm()
        results["pydvl_ihm_matrix_s"] = time.perf_counter() - t0
        results["speedup_vs_pydvl"] = (
            results["pydvl_ihm_matrix_s"] / results["ours_matrix_s"]
        )
    results["fit_over_floor"] = results["ours_fit_s"] / results["floor_epoch_s"]
    print(json.dumps(results, indent=2))
    print(
        f"matrix {args.n_test}x{args.n_train}: ours {results['ours_matrix_s']:.3f} s"
        + (
            f", pyDVL IHM {results['pydvl_ihm_matrix_s']:.2f} s, "
            f"speed-up {results['speedup_vs_pydvl']:.1f}x"
            if not args.skip_pydvl
            else ""
        )
    )
    print(
        f"fit {results['ours_fit_s']:.3f} s vs plain epoch "
        f"{results['floor_epoch_s']:.3f} s: ratio {results['fit_over_floor']:.2f}"
    )


if __name__ == "__main__":
    main()
