"""On a GPU: the whole influence matrix against one plain forward+backward pass.

RoBERTa-base sizes (12 layers, hidden 768) with random weights, PEFT LoRA r=8
on query and value (random adapters), masked mean pooling and a linear head,
sequences of 128 tokens, n = 1024 training and m = 64 test points, float32,
batches of 32: the model of job (d) in `benchmarks/peer_bench/jobs.py`.
Side by side in one run, after a warm-up, medians of `--repeats`:

* **floor**: one plain forward+backward over the 1088 samples;
* **ours**: `DataInfInfluence.fit` on the 1024 training points plus the whole
  `(64, 1024)` matrix (`train_influences`).

The target: ours at most 1.3 times the floor. Peak memory is the peak CUDA memory
allocated by each (on a GPU).

    python benchmarks/bench_gpu_fit.py [--device cuda] [--repeats 3]
    python benchmarks/bench_gpu_fit.py --quick --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine  # noqa: E402
from peer_bench.jobs import _build_roberta  # noqa: E402
from pydvl_datainf import DataInfInfluence  # noqa: E402


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main(argv: List[str] | None = None) -> Dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny model, CPU smoke test")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    model, data, meta = _build_roberta(args.quick, seed=0)
    model = model.to(device).eval()
    xtr, ytr = data["x_train"].to(device), data["y_train"].to(device)
    xte, yte = data["x_test"].to(device), data["y_test"].to(device)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=args.batch_size)
    every = DataLoader(
        TensorDataset(torch.cat([xtr, xte]), torch.cat([ytr, yte])),
        batch_size=args.batch_size,
    )

    def floor() -> None:
        for x, y in every:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def ours() -> torch.Tensor:
        infl = DataInfInfluence(model, F.cross_entropy, progress=False).fit(train)
        return infl.train_influences(xte, yte)

    results: Dict[str, object] = {"machine": machine(), "job": meta["description"]}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    floor(), ours()  # warm-up
    floors, fits, peaks = [], [], {}
    for _ in range(args.repeats):  # interleaved: both see the same conditions
        floors.append(_timed(floor, device))
        fits.append(_timed(ours, device))
    for name, fn in (("floor", floor), ("ours", ours)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20
    matrix = ours()
    results.update(
        floor_s=statistics.median(floors),
        ours_s=statistics.median(fits),
        ratio=statistics.median(f / b for f, b in zip(fits, floors)),
        matrix_shape=list(matrix.shape),
        matrix_finite=bool(torch.isfinite(matrix).all()),
        peak_mib=peaks,
    )
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
