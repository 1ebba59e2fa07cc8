"""GPU job (d): every tool on a RoBERTa-base-sized LoRA model, in one call.

RoBERTa-base sizes (12 layers, hidden 768, vocabulary 50265) with random
weights, LoRA r=8 on query and value (random adapters, so that no gradient
vanishes), masked mean pooling and a linear head; sequences of 128 random
tokens, n = 1024 training and m = 64 test points. Every tool of
`benchmarks/run.py` runs in its own subprocess on the GPU, with a per-tool
limit of 100 s, so that the whole call stays under 10 minutes; peak memory is
the peak CUDA memory allocated.

    python benchmarks/gpu_peers.py [--out benchmarks/results/gpu] [--docs FILE]

This is a thin entry point to `run.py --jobs d --device cuda`; it writes
`<out>/peers.csv` and `<out>/peers.md`, and the docs only with `--docs`.
Smoke test of the same code on a CPU, with a tiny model:
`python benchmarks/run.py --quick --jobs d --device cpu --no-docs`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu")
    ap.add_argument("--docs", type=Path, help="also rewrite this file's peers table")
    ap.add_argument("--tools", help="comma-separated tool keys (default: all)")
    ap.add_argument("--timeout", type=float, default=100.0)
    args = ap.parse_args(argv)
    forwarded: List[str] = ["--jobs", "d", "--device", "cuda", "--out", str(args.out)]
    forwarded += ["--timeout", str(args.timeout)]
    forwarded += ["--docs", str(args.docs)] if args.docs else ["--no-docs"]
    if args.tools:
        forwarded += ["--tools", args.tools]
    return run.main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
