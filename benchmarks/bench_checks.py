"""What the data-safety checks cost on a small job, against its physical floor.

The job: an MLP 32→64→10 (cross-entropy), 2,000 training and 200 test points,
`DataInfInfluence.fit`, then the whole 200 × 2,000 influence matrix through
pyDVL's `SequentialInfluenceCalculator` (chunks of 100: 40 calls of
`influences`), one thread.

The floor, measured in the same run: one plain forward and backward pass over
the training data and one over the test data, plus DataInf's three matrix
products on the same shapes (test gradients times training gradients, the
weighted correction, factors times training gradients: 6·m·n·p flops).

The checks run inside the job: the weights check before every query (a
SHA-256 of the trainable weights, and the frozen tensors' cheap check), the
row lookup that recognises training rows passed back by the calculator (a
digest of each row), and the digest of each test batch that keys the cache
of test factors. Each is timed where it runs (its total time over the job and
its number of calls), by wrapping it for this measurement.

    python benchmarks/bench_checks.py --out benchmarks/results/bench_checks.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F
from pydvl.influence import SequentialInfluenceCalculator
from pydvl.influence.torch.util import NestedTorchCatAggregator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pydvl_datainf.fingerprint as fingerprint
import pydvl_datainf.influence as influence
import pydvl_datainf.rows as rows
from common import machine, plain_epoch
from pydvl_datainf import DataInfInfluence


class Timed:
    """Wraps functions to add up the time spent in them (and count the calls)."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + (
                    time.perf_counter() - t0
                )
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed

    def reset(self) -> None:
        self.seconds, self.calls = {}, {}


def gemm_floor(m: int, n: int, p: int, repeats: int) -> float:
    """The three products of DataInf on these shapes, fastest of `repeats`."""
    g = torch.randn(n, p)
    v = torch.randn(m, p)
    w = torch.randn(m, n)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        c = v @ g.T  # (m, n)
        f = (c * w) @ g  # (m, p)
        _ = f @ g.T  # (m, n)
        best = min(best, time.perf_counter() - t0)
    return best


def median(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm up
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.randn(args.n_train, 32), torch.randint(0, 10, (args.n_train,))
    xt, yt = torch.randn(args.n_test, 32), torch.randint(0, 10, (args.n_test,))
    train = DataLoader(TensorDataset(x, y), batch_size=args.chunk)
    test = DataLoader(TensorDataset(xt, yt), batch_size=args.chunk)
    p = sum(q.numel() for q in model.parameters())

    def job() -> torch.Tensor:
        infl = DataInfInfluence(model, F.cross_entropy, progress=False)
        infl.fit(train)
        calc = SequentialInfluenceCalculator(infl)
        return calc.influences(test, train).compute(NestedTorchCatAggregator())

    epoch_train = median(lambda: plain_epoch(model, F.cross_entropy, train), 11)
    epoch_test = median(lambda: plain_epoch(model, F.cross_entropy, test), 11)
    gemms = gemm_floor(args.n_test, args.n_train, p, args.repeats)
    floor = epoch_train + epoch_test + gemms

    timer = Timed()
    patches = [
        (fingerprint.WeightWatch, "changed"),
        (rows.RowIndex, "locate"),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name in patches]
    digest = influence.batch_digest
    for owner, name, fn in originals:
        setattr(owner, name, timer.wrap(f"{owner.__name__}.{name}", fn))
    influence.batch_digest = timer.wrap("batch_digest", digest)
    try:
        job()  # warm up
        runs = []
        for _ in range(args.repeats):
            timer.reset()
            t0 = time.perf_counter()
            job()
            runs.append((time.perf_counter() - t0, dict(timer.seconds)))
        calls = dict(timer.calls)
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
        influence.batch_digest = digest
    runs.sort(key=lambda r: r[0])
    job_s, check_s = runs[len(runs) // 2]
    checks = {
        "weights check (trainable SHA-256, frozen tensors)": "WeightWatch.changed",
        "row lookup (a digest per training row passed back)": "RowIndex.locate",
        "test batch digest (key of the factor cache)": "batch_digest",
    }
    rows_out = [
        {
            "check": label,
            "calls": calls.get(key, 0),
            "seconds": check_s.get(key, 0.0),
            "share_of_job": check_s.get(key, 0.0) / job_s,
            "share_of_floor": check_s.get(key, 0.0) / floor,
        }
        for label, key in checks.items()
    ]
    total = sum(r["seconds"] for r in rows_out)
    results = {
        "machine": machine(),
        "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
        },
        "parameters": p,
        "floor": {
            "train_epoch_s": epoch_train,
            "test_epoch_s": epoch_test,
            "gemms_s": gemms,
            "total_s": floor,
        },
        "job_s": job_s,
        "job_over_floor": job_s / floor,
        "checks": rows_out,
        "checks_s": total,
        "checks_share_of_job": total / job_s,
        "job_without_checks_over_floor": (job_s - total) / floor,
    }
    text = json.dumps(results, indent=2)
    print(text)
    print(
        f"job {job_s:.3f} s, floor {floor:.3f} s: {job_s / floor:.2f}x; checks "
        f"{total * 1e3:.1f} ms ({100 * total / job_s:.1f}% of the job)"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
