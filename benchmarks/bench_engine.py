"""Per-sample gradient engines against the cost of plain training.

Measures, in one run and on the same batches, the time of one epoch of

* **floor**: one plain forward + backward per batch (what training costs; no
  per-sample gradient can be cheaper than this),
* **hooks**: `HookGradientEngine` (one forward, one backward, per-layer rules),
* **func**: `FuncGradientEngine` (`torch.func.vmap(grad(...))`),

on a LoRA MLP: a frozen base `Linear 256 -> 512 -> 512 -> 10` with ReLU, and
rank-8 adapters `lora_A` / `lora_B` (plain `nn.Linear` submodules) on each of
the three layers, cross-entropy loss. With `--bare`, the adapters are bare
`nn.Parameter`s of a custom module (as in loralib), which no rule covers: the
hook engine computes them with its module-local fallback. Reports the median over repeats, the
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
import copy
import json
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
    from pydvl_datainf.gradients import (
        FuncGradientEngine,
        GradientEngine,
        HookGradientEngine,
    )
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from pydvl_datainf.gradients import (
        FuncGradientEngine,
        GradientEngine,
        HookGradientEngine,
    )

from common import BareLoRALinear, LoRALinear, machine  # noqa: E402  (on sys.path)


def lora_mlp(rank: int, bare: bool = False) -> nn.Module:
    """The LoRA MLP; `bare=True`: adapters as bare parameters (no layer rule)."""
    layer = BareLoRALinear if bare else LoRALinear
    return nn.Sequential(
        layer(256, 512, rank),
        nn.ReLU(),
        layer(512, 512, rank),
        nn.ReLU(),
        layer(512, 10, rank),
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
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="model and input dtype (gradients are accumulated in float32)",
    )
    parser.add_argument(
        "--bare",
        action="store_true",
        help="adapters as bare parameters (no rule: the module-local fallback)",
    )
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    full = lora_mlp(args.rank, bare=args.bare).to(device).eval()
    model = copy.deepcopy(full).to(dtype)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(args.n, 256, device=device).to(dtype)
    y = torch.randint(0, 10, (args.n,), device=device)
    batches = list(zip(x.split(args.batch_size), y.split(args.batch_size), strict=True))
    n_params = sum(p.numel() for p in params.values())
    print(
        f"LoRA MLP 256-512-512-10{' (bare parameters)' if args.bare else ''}, "
        f"rank {args.rank}: {n_params} trainable "
        f"parameters in {len(params)} tensors; n={args.n}, batch "
        f"{args.batch_size}, {args.dtype}, {args.threads} thread(s), {device}, torch "
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
    error = precision_error(full, model, batches[0])
    print(
        f"error against float64 (first batch): per-sample gradients "
        f"{error['grads_rel_err']:.2e}, squared norms {error['norms_rel_err']:.2e}"
    )
    if args.out:
        record = {
            "machine": machine(),
            "model": "LoRA MLP 256-512-512-10" + (" (bare)" if args.bare else ""),
            "dtype": args.dtype,
            "n": args.n,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "seconds": {k: v[0] for k, v in results.items()},
            "ratio_to_floor": {k: v[0] / floor for k, v in results.items()},
            **error,
        }
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


def precision_error(
    full: nn.Module, model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]
) -> Dict[str, float]:
    """Relative errors of the hooks engine's per-sample gradients (and their
    squared norms) for `model` against float64 gradients of the same weights.

    `full` is the float32 model that `model` was converted from; the reference
    runs its float64 copy on the same (rounded) inputs.
    """
    x, y = batch
    ref_model = copy.deepcopy(full).double()
    ref_params = {k: p for k, p in ref_model.named_parameters() if p.requires_grad}
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = HookGradientEngine().per_sample_grads(
            ref_model, F.cross_entropy, x.double(), y, ref_params
        )
        got = HookGradientEngine().per_sample_grads(
            model, F.cross_entropy, x, y, params
        )
    grads = max(float((got[k].double() - ref[k]).norm() / ref[k].norm()) for k in ref)
    norms = max(
        float(
            (got[k].double().pow(2).sum(1) - ref[k].pow(2).sum(1)).abs().max()
            / ref[k].pow(2).sum(1).abs().max()
        )
        for k in ref
    )
    accumulation = {str(got[k].dtype) for k in got}
    return {
        "grads_rel_err": grads,
        "norms_rel_err": norms,
        "accumulation_dtype": ",".join(sorted(accumulation)),
    }


if __name__ == "__main__":
    main()
