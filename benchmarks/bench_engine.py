"""Per-sample gradient engines against the cost of plain training.

Measures, in one run and on the same batches, the time of one epoch of

* **floor**: one plain forward + backward per batch (what training costs; no
  per-sample gradient can be cheaper than this),
* **hooks**: `HookGradientEngine` (one forward, one backward, per-layer rules),
* **func**: `FuncGradientEngine` (`torch.func.vmap(grad(...))`),

on a LoRA MLP: a frozen base `Linear 256 -> 512 -> 512 -> 10` with ReLU, and
rank-8 adapters `lora_A` / `lora_B` (plain `nn.Linear` submodules) on each of
the three layers, cross-entropy loss. Reports the median over repeats, the
ratio of each engine to the floor, and the minor page faults per epoch.

On CPU, writing the per-sample gradients (here 4096 x 18512 floats, 300 MB per
epoch) into freshly allocated memory can cost more than computing them: with
glibc's default heuristics, memory freed between batches may be returned to
the system and faulted back in. The page-fault column shows when this happens;
`THP_MEM_ALLOC_ENABLE=1` (PyTorch's huge pages for large CPU tensors) or
`MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` reduce it.

Usage:
    python benchmarks/bench_engine.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

try:
    from pydvl_datainf.gradients import FuncGradientEngine, GradientEngine
    from pydvl_datainf.hooks import HookGradientEngine
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from pydvl_datainf.gradients import FuncGradientEngine, GradientEngine
    from pydvl_datainf.hooks import HookGradientEngine

from common import LoRALinear  # noqa: E402  (benchmarks/ is on sys.path)


def lora_mlp(rank: int) -> nn.Module:
    return nn.Sequential(
        LoRALinear(256, 512, rank),
        nn.ReLU(),
        LoRALinear(512, 512, rank),
        nn.ReLU(),
        LoRALinear(512, 10, rank),
    )


Batches = List[Tuple[torch.Tensor, torch.Tensor]]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor_epoch(
    model: nn.Module, params: Dict[str, nn.Parameter], batches: Batches
) -> None:
    tensors = list(params.values())
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        torch.autograd.grad(loss, tensors)


def engine_epoch(
    engine: GradientEngine,
    model: nn.Module,
    params: Dict[str, nn.Parameter],
    batches: Batches,
) -> None:
    for x, y in batches:
        engine.per_sample_grads(model, F.cross_entropy, x, y, params)


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where unsupported)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, AttributeError):
        return 0


def timed(
    fn: Callable[[], None], device: torch.device, repeats: int
) -> Tuple[float, float]:
    """Median seconds per call of `fn`, and minor page faults per call."""
    fn()  # warm-up
    sync(device)
    times = []
    faults = minor_faults()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), (minor_faults() - faults) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--n", type=int, default=4096, help="samples per epoch")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = lora_mlp(args.rank).to(device).eval()
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(args.n, 256, device=device)
    y = torch.randint(0, 10, (args.n,), device=device)
    batches = list(zip(x.split(args.batch_size), y.split(args.batch_size), strict=True))
    n_params = sum(p.numel() for p in params.values())
    print(
        f"LoRA MLP 256-512-512-10, rank {args.rank}: {n_params} trainable "
        f"parameters in {len(params)} tensors; n={args.n}, batch "
        f"{args.batch_size}, {args.threads} thread(s), {device}, torch "
        f"{torch.__version__}, median of {args.repeats}"
    )

    results = {
        "floor (fwd+bwd)": timed(
            lambda: floor_epoch(model, params, batches), device, args.repeats
        ),
        "hooks": timed(
            lambda: engine_epoch(HookGradientEngine(), model, params, batches),
            device,
            args.repeats,
        ),
        "func": timed(
            lambda: engine_epoch(FuncGradientEngine(), model, params, batches),
            device,
            args.repeats,
        ),
    }
    floor = results["floor (fwd+bwd)"][0]
    print(
        f"{'':<18}{'epoch [s]':>12}{'samples/s':>12}{'x floor':>10}{'page faults':>14}"
    )
    for name, (t, faults) in results.items():
        print(
            f"{name:<18}{t:>12.4f}{args.n / t:>12.0f}{t / floor:>10.2f}{faults:>14.0f}"
        )


if __name__ == "__main__":
    main()
