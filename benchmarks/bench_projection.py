"""Projected per-sample gradients of token layers against a plain forward+backward.

A small attention-shaped model on token sequences: `--layers` blocks, each
with LoRA adapters (rank `--rank`) on a query and a value projection of width
`--width` (`h = h + tanh(q(h)) * v(h)`), a frozen mean-pooled head and a
cross-entropy loss; with `--full`, the full weights of the query and value
projections are trained instead of adapters (the case where a per-sample
gradient is `width x width`). Measured in one run, on the same batches:

* **floor**: one plain forward + backward per batch (`torch.autograd.grad`);
* **dense**: `HookGradientEngine.per_sample_grads_factored` (the dense
  per-sample gradients, as `fit` computes them today);
* **projected**: `HookGradientEngine.per_sample_grads_projected` with a
  Kronecker projection per weight, computed from the per-token factors with
  exact squared norms.

Also the projected bytes per sample against the dense ones, and the time per
token and weight of the projection step (projected minus floor).

Usage:
    python benchmarks/bench_projection.py --threads 1 --out benchmarks/results/index/projection-lora.json
    python benchmarks/bench_projection.py --threads 1 --full --out benchmarks/results/index/projection-full.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

try:
    from pydvl_datainf.gradients import HookGradientEngine
    from pydvl_datainf.projection import Projection, dense_spec, kronecker_spec
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from pydvl_datainf.gradients import HookGradientEngine
    from pydvl_datainf.projection import Projection, dense_spec, kronecker_spec

from common import LoRALinear, machine  # noqa: E402  (on sys.path)


class Block(nn.Module):
    def __init__(self, width: int, rank: int, full: bool):
        super().__init__()
        if full:
            self.q, self.v = nn.Linear(width, width), nn.Linear(width, width)
        else:
            self.q, self.v = (
                LoRALinear(width, width, rank),
                LoRALinear(width, width, rank),
            )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.q(h)) * self.v(h)


class TokenNet(nn.Module):
    def __init__(
        self, width: int, layers: int, rank: int, full: bool, classes: int = 10
    ):
        super().__init__()
        self.blocks = nn.Sequential(*(Block(width, rank, full) for _ in range(layers)))
        self.head = nn.Linear(width, classes)
        self.head.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(1))


def projections(params: Dict[str, nn.Parameter], side: int) -> Dict[str, Projection]:
    out = {}
    for i, (name, p) in enumerate(params.items()):
        if p.dim() == 2:
            spec = kronecker_spec(tuple(p.shape), (side, side), seed=i)
        else:
            spec = dense_spec(p.numel(), min(p.numel(), side * side), seed=i)
        out[name] = Projection(spec)
    return out


def floor_flops(args: argparse.Namespace) -> float:
    """Multiply-adds x 2 of one plain forward + backward over all samples: the
    frozen (or full) q and v GEMMs, twice in the backward (input gradients;
    plus weight gradients when the weights are trained), and the adapters."""
    tokens = args.batch_size * args.batches * args.tokens
    w = args.width
    base = 2 * 2 * w * w  # q and v, forward, per token
    lora = 2 * 2 * 2 * args.rank * w  # A and B of q and v, forward
    if args.full:
        return 2 * tokens * base * 3  # forward, input and weight gradients
    return 2 * tokens * (base * 2 + lora * 3)


def projection_flops(
    args: argparse.Namespace, params: Dict[str, nn.Parameter]
) -> float:
    """Multiply-adds x 2 of the per-token projections, the per-sample products
    and the exact norms (the cheaper of the two ways, as the library picks)."""
    n, t, s = args.batch_size * args.batches, args.tokens, args.side
    total = 0.0
    for p in params.values():
        if p.dim() != 2:
            continue
        d_out, d_in = p.shape
        k_out, k_in = min(s, d_out), min(s, d_in)
        side = (d_out * k_out if k_out < d_out else 0) + (
            d_in * k_in if k_in < d_in else 0
        )
        norms = min(t * t * (d_out + d_in), t * d_out * d_in)
        total += n * (t * side + t * k_out * k_in + norms)
    return 2 * total


def timed(fn: Callable[[], None], repeats: int) -> Tuple[float, float]:
    """Median wall and CPU seconds of `fn()` (CPU time: what an idle core
    would take when the machine is shared, for one thread)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--side", type=int, default=16, help="k_out = k_in")
    parser.add_argument("--full", action="store_true", help="full q, v weights")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TokenNet(args.width, args.layers, args.rank, args.full).eval()
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    proj = projections(params, args.side)
    batches: List[Tuple[torch.Tensor, torch.Tensor]] = [
        (
            torch.randn(args.batch_size, args.tokens, args.width),
            torch.randint(0, 10, (args.batch_size,)),
        )
        for _ in range(args.batches)
    ]
    engine = HookGradientEngine()
    tensors = list(params.values())

    def floor() -> None:
        for x, y in batches:
            torch.autograd.grad(F.cross_entropy(model(x), y), tensors)

    def dense() -> None:
        for x, y in batches:
            engine.per_sample_grads_factored(model, F.cross_entropy, x, y, params)

    def projected() -> None:
        for x, y in batches:
            engine.per_sample_grads_projected(
                model, F.cross_entropy, x, y, params, proj
            )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = {
            "floor": timed(floor, args.repeats),
            "dense": timed(dense, args.repeats),
            "projected": timed(projected, args.repeats),
        }
    seconds = {k: v[0] for k, v in measured.items()}
    cpu = {k: v[1] for k, v in measured.items()}
    n = args.batch_size * args.batches
    weights = sum(1 for p in params.values() if p.dim() == 2)
    dense_floats = sum(p.numel() for p in params.values())
    projected_floats = sum(p.k for p in proj.values())
    record = {
        "machine": machine(),
        "model": (
            f"{args.layers} blocks, width {args.width}, "
            + (
                "full q and v weights"
                if args.full
                else f"LoRA r={args.rank} on q and v"
            )
            + f", {args.tokens} tokens"
        ),
        "args": vars(args),
        "samples": n,
        "trainable_parameters": dense_floats,
        "projected_floats_per_sample": projected_floats,
        "compression": dense_floats / projected_floats,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "load_average": os.getloadavg()[0],
        "ratio_to_floor": {k: v / seconds["floor"] for k, v in seconds.items()},
        "cpu_ratio_to_floor": {k: v / cpu["floor"] for k, v in cpu.items()},
        "projection_cpu_s_per_token_weight": (cpu["projected"] - cpu["floor"])
        / (n * args.tokens * weights),
        "floor_flops": floor_flops(args),
        "projection_flops": projection_flops(args, params),
    }
    print(json.dumps(record, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
