"""Cost of the weights fingerprint checked before every query.

`DataInfInfluence` refuses queries when the trainable weights changed since
`fit`, by recomputing a SHA-256 over their bytes (a content hash: permutations
and one-ulp edits are detected). This measures that cost per check for 1M and
100M float32 parameters, with BLAKE2b over the same bytes for comparison.

    python benchmarks/bench_fingerprint.py   # writes results/bench_fingerprint.json
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import time
from pathlib import Path

import torch

from pydvl_datainf.fingerprint import WeightWatch, weights_digest


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _blake2b(params) -> str:
    h = hashlib.blake2b()
    for p in params.values():
        h.update(
            memoryview(p.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        )
    return h.hexdigest()


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for n in (10**6, 10**8):
        # a LoRA-like layout: many parameters of moderate size
        sizes = [n // 100] * 100
        params = {
            f"p{i}": torch.nn.Parameter(torch.randn(s)) for i, s in enumerate(sizes)
        }
        watch = WeightWatch(params)
        repeat = 5 if n <= 10**6 else 2
        sha = _best(functools.partial(weights_digest, params), repeat)
        check = _best(watch.changed, repeat)
        blake = _best(functools.partial(_blake2b, params), repeat)
        rows.append(
            {
                "parameters": n,
                "bytes": 4 * n,
                "sha256_digest_s": sha,
                "weight_watch_check_s": check,
                "blake2b_s": blake,
                "sha256_GB_per_s": 4 * n / sha / 1e9,
            }
        )
        print(rows[-1], flush=True)
        del params, watch
    out = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": 1,
        "results": rows,
    }
    path = Path(__file__).parent / "results" / "bench_fingerprint.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
