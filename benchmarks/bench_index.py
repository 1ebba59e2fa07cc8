"""Top-k from a maximum-inner-product index over 1,000,000 compressed rows.

Synthetic rows shaped like projected per-sample gradients: a low-rank part
with a decaying spectrum (64 latent directions, singular values falling as
1/sqrt(j)), 100 clusters of samples, isotropic noise, and row norms spread
over an order of magnitude (log-normal), as gradient norms are. The queries
(standing for R g_test, concatenated over blocks) come from the same model
with another seed. The rows are written to a float32 memory map in `--work`
and read in chunks.

For each index it measures the build time, the top-100 latency per query on
ONE CPU thread (wall time, and the process's CPU time, which is what one idle
core would take when other work shares the machine) (each query alone, and a batch of 64 queries divided by 64), and
the recall@100 against the exact top-100 (float64 products, chunk by chunk).
The build runs on `--build-threads` threads; its time includes one pass over
the rows for their largest norm.

Usage:
    python benchmarks/bench_index.py --out benchmarks/results/index/index-1m.json
    python benchmarks/bench_index.py --n 20000 --dims 64 --out /tmp/quick.json  # quick
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

try:
    from pydvl_datainf.storage.index import IndexOptions, MipsIndex, recall_at_k
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from pydvl_datainf.storage.index import IndexOptions, MipsIndex, recall_at_k

from common import machine  # noqa: E402  (on sys.path)

K = 100


def synthetic(
    path: Path, n: int, dim: int, seed: int, chunk: int = 50_000
) -> np.memmap:
    """Gradient-like rows (see the module docstring) in a float32 memory map."""
    g = torch.Generator().manual_seed(1234)  # the model: shared by rows and queries
    latent = 64
    basis = torch.randn(latent, dim, generator=g) / dim**0.5
    spectrum = 1 / torch.arange(1, latent + 1).float().sqrt()
    centers = torch.randn(100, latent, generator=g)
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        labels = torch.randint(0, 100, (m,), generator=g)
        z = (centers[labels] + torch.randn(m, latent, generator=g)) * spectrum
        x = z @ basis * 4 + 0.5 * torch.randn(m, dim, generator=g) / dim**0.5
        x *= torch.exp(0.6 * torch.randn(m, 1, generator=g))
        rows[start : start + m] = x.numpy()
    rows.flush()
    return rows


def exact_top(
    rows: np.ndarray, queries: torch.Tensor, chunk: int = 65536
) -> torch.Tensor:
    """The top-K row ids per query from float64 products, chunk by chunk."""
    q = queries.double()
    best_s = torch.full((len(q), K), -torch.inf, dtype=torch.float64)
    best_i = torch.zeros(len(q), K, dtype=torch.int64)
    for start in range(0, len(rows), chunk):
        block = torch.from_numpy(
            np.asarray(rows[start : start + chunk], dtype=np.float64)
        )
        s = torch.cat([best_s, q @ block.T], dim=1)
        i = torch.cat(
            [best_i, torch.arange(start, start + len(block)).expand(len(q), -1)], 1
        )
        best_s, pos = s.topk(K, dim=1)
        best_i = torch.gather(i, 1, pos)
    return best_i


def latency(index: MipsIndex, queries: torch.Tensor, single: int) -> Dict[str, float]:
    """Seconds per query on one thread: each of `single` queries alone
    (median), and a batch of all queries divided by their number; wall time
    and this process's CPU time (the latency on an idle core when the machine
    is shared)."""
    index.search(queries[:2], K)  # warm-up
    wall, cpu = [], []
    for q in queries[:single]:
        t0, c0 = time.perf_counter(), time.process_time()
        index.search(q[None], K)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    t0, c0 = time.perf_counter(), time.process_time()
    index.search(queries, K)
    m = len(queries)
    return {
        "single_query_s": statistics.median(wall),
        "single_query_cpu_s": statistics.median(cpu),
        "batched_per_query_s": (time.perf_counter() - t0) / m,
        "batched_per_query_cpu_s": (time.process_time() - c0) / m,
        "load_average": os.getloadavg()[0],
    }


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import faiss

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {
        "machine": machine(),
        "faiss": faiss.__version__,
        "n": args.n,
        "k": K,
        "threads": 1,
        "queries": args.queries,
        "data": "synthetic gradient-like rows: 64-dim latent with a 1/sqrt(j) "
        "spectrum, 100 clusters, isotropic noise, log-normal row norms",
        "runs": [],
    }
    for dim in args.dims:
        rows = synthetic(work / f"rows-{dim}.npy", args.n, dim, seed=0)
        queries = torch.from_numpy(
            np.asarray(
                synthetic(work / f"queries-{dim}.npy", args.queries, dim, seed=1)
            )
        )
        torch.set_num_threads(args.build_threads)
        faiss.omp_set_num_threads(args.build_threads)
        truth = exact_top(rows, queries)
        configs: List[Dict[str, Any]] = [
            {"name": "flat float32 (exact)", "options": IndexOptions()},
            {"name": "flat float16", "options": IndexOptions(storage="float16")},
        ]
        if dim <= args.ivf_max_dim:
            configs.append(
                {
                    "name": "IVF float32",
                    "options": IndexOptions(kind="ivf", nlist=args.nlist),
                    "probes": args.nprobe,
                }
            )
        for cfg in configs:
            torch.set_num_threads(args.build_threads)
            faiss.omp_set_num_threads(args.build_threads)
            gc.collect()
            t0 = time.perf_counter()
            index = MipsIndex.build(rows, cfg["options"], digest="-")
            build = time.perf_counter() - t0
            torch.set_num_threads(1)
            faiss.omp_set_num_threads(1)
            settings = cfg.get("probes", [None])
            for nprobe in settings:
                if nprobe is not None:
                    index.set_search(nprobe=nprobe)
                found = index.search(queries, K)[1]
                row = {
                    "dim": dim,
                    "index": cfg["name"],
                    "nprobe": nprobe,
                    "build_s": build,
                    "build_threads": args.build_threads,
                    "bytes_per_row": (2 if index.options.storage == "float16" else 4)
                    * (dim + (0 if index.options.kind == "flat" else 1)),
                    f"recall_at_{K}": recall_at_k(found, truth),
                    **latency(index, queries, args.single),
                }
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
            del index
            gc.collect()
        del rows
        gc.collect()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--single", type=int, default=16, help="queries timed alone")
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--ivf-max-dim", type=int, default=256)
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/bench_index")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
