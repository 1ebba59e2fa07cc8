"""Runs one tool on one job in its own process and measures it.

    python -m peer_bench.worker --job a --tool ours --cache FILE --out DIR

Writes `DIR/<job>__<tool>.json` (times, memory, status) and, on success,
`DIR/<job>__<tool>.npy` (the `(n_test, n_train)` matrix, pyDVL sign). Peak
memory is the process's peak RSS *after* the job was loaded (the kernel's
high-water mark is reset then, via `/proc/self/clear_refs`), or the peak CUDA
memory allocated on a GPU job.

Before the measured run (except with `--quick`), every tool makes one untimed warm-up run on a slice
of the job (two training batches, four test points, quick settings), so that
one-off costs (lazy imports, kernel and `vmap` initialisation, allocator
growth) are paid by no tool in the table. A measured run shorter than 10 s is
repeated (three runs in all) and the run with the median total time is
reported; the peak memory covers all runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size in MiB."""
    kb = _status_kb("VmRSS")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def reset_peak() -> bool:
    """Resets the peak RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """Peak resident set size in MiB since the last reset."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


REPEATS = 3
"""Measured runs per tool when one run is short: the median is reported."""
REPEAT_BELOW_S = 10.0
"""A measured run longer than this is not repeated."""

KNOWN = [
    (
        ("vmap", "data-dependent control flow"),
        "cannot run",
        "torch.func (vmap) per-sample gradients cannot trace the Hugging Face "
        "attention-mask code (data-dependent control flow in transformers' masking)",
    ),
    (
        ("vmap", ".item()"),
        "cannot run",
        "torch.func (vmap) per-sample gradients cannot trace the Hugging Face "
        "attention-mask code (.item() / data-dependent control flow)",
    ),
    (
        ("derivative for", "scaled_dot_product", "not implemented"),
        "cannot run",
        "Hessian-vector products need a double backward through PyTorch's "
        "scaled-dot-product attention, which torch does not implement on CPU",
    ),
    (
        ("NaNs in h_estimate",),
        "diverged",
        "LiSSA diverged (NaN) with pyDVL's default scale=10; pyDVL says: "
        "increase scale or dampening",
    ),
    (("out of memory",), "out of memory", "out of memory"),
]


def classify(e: BaseException) -> tuple[str, str]:
    """Status and a one-line message for a failure; known limits are named."""
    text = " ".join(str(e).split())
    for needles, status, message in KNOWN:
        if all(n in text for n in needles):
            return status, f"{message} ({type(e).__name__})"
    return "error", f"{type(e).__name__}: {text[:300]}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", required=True)
    ap.add_argument("--tool", required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.job}__{args.tool}"
    record: Dict[str, Any] = {"job": args.job, "tool": args.tool}
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    import numpy as np
    import torch

    from .jobs import JOBS, load
    from .tools import TOOLS, get_runner

    spec, tool = JOBS[args.job], TOOLS[args.tool]
    torch.set_num_threads(spec.threads)
    cuda = False
    try:
        run = get_runner(tool)
        job = load(args.job, args.cache, args.device)
        cuda = job.device.type == "cuda"
        if not args.quick:  # --quick is a smoke test: no timing matters
            t0 = time.perf_counter()
            run(
                job.subset(min(job.n_train, 2 * job.batch_size), min(job.n_test, 4)),
                True,
            )
            record["warmup_s"] = time.perf_counter() - t0
        record["rss_setup_mb"] = rss_mb()
        record["peak_reset"] = reset_peak()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        outs = []
        while True:
            t0 = time.perf_counter()
            outs.append(run(job, args.quick))
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            if len(outs) >= REPEATS or wall > REPEAT_BELOW_S or args.quick:
                break
        # the run with the median total time (all runs when short, else one)
        outs.sort(key=lambda o: o.fit_s + o.matrix_s)
        out = outs[len(outs) // 2]
        record["runs"] = len(outs)
        matrix = out.matrix.detach().to("cpu", torch.float64).numpy()
        expected = (job.n_test, job.n_train)
        if matrix.shape != expected:
            raise RuntimeError(f"matrix shape {matrix.shape}, expected {expected}")
        np.save(f"{stem}.npy", matrix)
        record.update(
            status="ok",
            fit_s=out.fit_s,
            matrix_s=out.matrix_s,
            config=out.config,
            finite=bool(np.isfinite(matrix).all()),
        )
    except Exception as e:  # noqa: BLE001 - any failure becomes a row
        from .base import ToolUnsupported

        kind, message = classify(e)
        if isinstance(e, ToolUnsupported):
            kind = "n/a"
        record.update(status=kind, message=message)
        Path(f"{stem}.log").write_text(traceback.format_exc())
    record["peak_rss_mb"] = peak_mb()
    if cuda:
        record["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(f"{stem}.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
