"""SmolLM2-135M with LoRA at scale: store size, `fit` time, top-k latency.

SmolLM2-135M, LoRA r=8 on q and v (460,800 trainable parameters, 120 blocks),
the adapters of `bench_compression_error.py --model smollm2` (same cache),
`--n-train` generated sequences of 64 tokens (the first ones are those of the
error curves), `--n-test` test sequences. One process, one thread by default.

1. **fit against a plain epoch, side by side**: a plain forward+backward pass
   over the first half of the rows, then `fit` with the compression into a
   Zarr store (`--store-dtype`), then a plain pass over the second half; the
   two halves make one plain epoch, taken before and after `fit` so that a
   drift in the machine's load falls on both. Wall and CPU time.
2. **the store**: its size on disk (every file), against the dense float32
   store, n x 460,800 x 4 bytes (computed, not written). `chunk_rows` divides
   n, so no padded edge chunk is counted.
3. **top-k latency**: the test gradients, then the search alone for a batch
   of queries (the exact streaming pass over the rows; the k x k curvature
   matrices and an exact flat index; the same and an HNSW index), the index
   build times and HNSW's recall@100 against exact search; and each end to
   end through `top_k`.
4. **against the uncompressed reference**: the first `--reference-n` rows of
   the store (with their exact norms, lambda recomputed on them) against the
   uncompressed DataInf scores of the error curves on the same rows and test
   sequences: Spearman, top-100 overlap, relative error.
5. **where the time goes**: the pieces of `fit` timed apart on
   `--profile-rows` rows: the plain pass, the per-sample gradients of the
   hooked pass (dense and projected), a fit into memory and one into Zarr.

Usage (the figures on the "Scaling to LLMs" page):

    python benchmarks/bench_compression_error.py --model smollm2 \
        --out benchmarks/results/compression/smollm2.json
    python benchmarks/bench_llm_scale.py --n-train 1000 --family gaussian \
        --size 17 --profile-rows 32 \
        --out benchmarks/results/compression/smollm2-scale.json

(1,000 rows take about a quarter of an hour of one thread's CPU time; the
5,000 rows that show the scale better take about five times as long.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch.utils.data import DataLoader, TensorDataset

import compression_common as cc
from common import machine, plain_epoch
from pydvl_datainf import DataInfInfluence, top_k
from pydvl_datainf.blocks import build_blocks
from pydvl_datainf.gradients import HookGradientEngine
from pydvl_datainf.hf import causal_lm_loss
from pydvl_datainf.operator import DataInfOperator
from pydvl_datainf.projection import Projection
from pydvl_datainf.storage.index import IndexOptions, MipsIndex, recall_at_k

logger = logging.getLogger("bench_llm_scale")
DENSE_PARAMETERS = 460_800
HNSW_EF = [128, 512, 2048]  # efSearch: 128 is the default
IVF_NPROBE = [8, 32, 128]  # clusters searched: 32 is the default


def clock(
    fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> Tuple[Any, Dict[str, float]]:
    """`fn(*args, **kwargs)` and its wall and CPU seconds (this process)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c}


def add(a: Dict[str, float], b: Dict[str, float]) -> Dict[str, float]:
    return {k: a[k] + b[k] for k in a}


def disk_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def fit_vs_plain(
    args: argparse.Namespace,
    model: Any,
    specs: Dict,
    x: torch.Tensor,
    y: torch.Tensor,
    path: str,
) -> Tuple[DataInfInfluence, Dict[str, Any]]:
    n, half = len(x), len(x) // 2

    def loader(a: int, b: int) -> DataLoader:
        return DataLoader(TensorDataset(x[a:b], y[a:b]), batch_size=args.batch)

    infl = DataInfInfluence(
        model,
        causal_lm_loss,
        compression=specs,
        store="zarr",
        store_path=path,
        store_dtype=args.store_dtype,
        store_options={"chunk_rows": args.chunk_rows, "overwrite": True},
        progress=not args.no_progress,
    )
    model.eval()
    logger.info("plain pass over rows 0..%d", half)
    _, p1 = clock(lambda: plain_epoch(model, causal_lm_loss, loader(0, half)))
    logger.info("plain: %.1f s wall; fit over %d rows", p1["wall_s"], n)
    _, f = clock(lambda: infl.fit(loader(0, n)))
    logger.info("fit: %.1f s wall; plain pass over rows %d..%d", f["wall_s"], half, n)
    _, p2 = clock(lambda: plain_epoch(model, causal_lm_loss, loader(half, n)))
    plain = add(p1, p2)
    out = {
        "plain_epoch": plain,
        "plain_halves": [p1, p2],
        "fit": f,
        "ratio_wall": f["wall_s"] / plain["wall_s"],
        "ratio_cpu": f["cpu_s"] / plain["cpu_s"],
        "per_sequence_wall_s": {"plain": plain["wall_s"] / n, "fit": f["wall_s"] / n},
    }
    logger.info(
        "fit / plain epoch: %.2f (wall), %.2f (CPU)",
        out["ratio_wall"],
        out["ratio_cpu"],
    )
    return infl, out


def store_sizes(args: argparse.Namespace, path: str, n: int, k: int) -> Dict[str, Any]:
    measured = disk_bytes(path)
    dense = n * DENSE_PARAMETERS * 4
    rows = n * k * torch.empty(0, dtype=getattr(torch, args.store_dtype)).element_size()
    return {
        "dtype": args.store_dtype,
        "measured_bytes": measured,
        "rows_bytes": rows,
        "dense_float32_bytes_computed": dense,
        "compression": dense / measured,
        "bytes_per_sequence": measured / n,
    }


def latency(
    args: argparse.Namespace,
    infl: DataInfInfluence,
    xq: torch.Tensor,
    yq: torch.Tensor,
    tmp: str,
) -> Dict[str, Any]:
    q, top = len(xq), args.top
    out: Dict[str, Any] = {"queries": q, "top": top}
    v, t = clock(lambda: infl.per_sample_gradients(xq, yq))
    out["test_gradients_per_query"] = {k: s / q for k, s in t.items()}
    op = DataInfOperator(infl.state)
    names = list(infl.state.blocks.names)

    def streaming() -> torch.Tensor:
        return op.scores(op.apply(v)).topk(top, dim=1).indices

    exact, t = clock(streaming)
    out["search_streaming_per_query"] = {k: s / q for k, s in t.items()}
    _, t = clock(op.curvature)
    out["curvature_precompute"] = t
    queries, t = clock(
        lambda: torch.cat([f for f in op.apply_curvature(v).values()], 1)
    )
    out["curvature_apply_per_query"] = {k: s / q for k, s in t.items()}
    rows = torch.cat(
        [torch.cat([c[k].float() for k in names], 1) for _, c in infl.store.chunks()]
    )
    out["approximate"] = []
    for kind, settings in (("flat", [None]), ("hnsw", HNSW_EF), ("ivf", IVF_NPROBE)):
        index, t = clock(MipsIndex.build, rows, IndexOptions(kind=kind))
        out[f"{kind}_build"] = t
        for setting in settings:
            if kind == "hnsw":
                index.set_search(ef_search=setting)
            elif kind == "ivf":
                index.set_search(nprobe=setting)
            (_, found), t = clock(index.search, queries.float(), top)
            entry = {
                "kind": kind,
                "setting": setting,
                "search_per_query": {k: s / q for k, s in t.items()},
                f"recall_at_{top}": recall_at_k(found, exact),
            }
            if kind == "flat":
                out["flat_search_per_query"] = entry["search_per_query"]
                out[f"flat_recall_at_{top}"] = entry[f"recall_at_{top}"]
            else:
                out["approximate"].append(entry)
    out["ivf_nlist"] = index.options.nlist
    # end to end, through the library (test gradients included)
    _, t = clock(lambda: top_k(infl, top, (xq, yq), progress=False))
    out["top_k_streaming_per_query"] = {k: s / q for k, s in t.items()}
    for kind, choice in (("flat", True), ("hnsw", IndexOptions(kind="hnsw"))):
        where = os.path.join(tmp, f"{kind}.index") if choice is True else choice
        _, t = clock(top_k, infl, top, (xq[:1], yq[:1]), index=where, progress=False)
        out[f"top_k_{kind}_first_call"] = t
        _, t = clock(top_k, infl, top, (xq, yq), index=where, progress=False)
        out[f"top_k_{kind}_per_query"] = {k: s / q for k, s in t.items()}
    return out


def reference(
    args: argparse.Namespace, infl: DataInfInfluence, xt: torch.Tensor, yt: torch.Tensor
) -> Dict[str, Any]:
    path = Path(args.cache) / f"reference-smollm2-{args.reference_n}x{len(xt)}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: run bench_compression_error.py --model smollm2 first"
        )
    ref = torch.load(path)
    n = args.reference_n
    names = list(infl.state.blocks.names)
    parts: Dict[str, List[torch.Tensor]] = {k: [] for k in names}
    for _, chunk in infl.store.chunks():
        for k in names:
            parts[k].append(chunk[k])
    train = {k: torch.cat(v)[:n] for k, v in parts.items()}
    norms = {k: s[:n].double() for k, s in infl.squared_norms.items()}
    dims = {b.name: b.size for b in infl.blocks}
    lam = cc.regularization(norms, dims)
    test = infl.per_sample_gradients(xt, yt)
    scores = cc.datainf_scores(test, train, norms, lam)
    full = DataInfOperator(infl.state)
    all_rows = full.scores(
        full.apply({k: t.to(infl.state.dtype) for k, t in test.items()})
    )
    return {
        "n": n,
        "n_test": len(xt),
        "same_rows": cc.agreement(scores, ref["exact"], args.top),
        "whole_store_first_rows": cc.agreement(
            all_rows[:, :n].double(), ref["exact"], args.top
        ),
    }


def profile(
    args: argparse.Namespace,
    model: Any,
    specs: Dict,
    x: torch.Tensor,
    y: torch.Tensor,
    tmp: str,
) -> Dict[str, Any]:
    """The pieces of fit on a few rows, each timed apart (interleaved twice)."""
    x, y = x[: args.profile_rows], y[: args.profile_rows]
    batches = [
        (x[s : s + args.batch], y[s : s + args.batch])
        for s in range(0, len(x), args.batch)
    ]
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    blocks = build_blocks(model)
    projections: Dict[str, Projection] = {}
    for b in blocks:
        projections.update(zip(b.params, Projection(specs[b.name]).parts))
    engine = HookGradientEngine()

    def dense() -> None:
        for xb, yb in batches:
            engine.per_sample_grads(model, causal_lm_loss, xb, yb, params)

    def projected() -> None:
        for xb, yb in batches:
            engine.per_sample_grads_projected(
                model, causal_lm_loss, xb, yb, params, projections
            )

    def fit_to(store: str) -> Callable[[], None]:
        def run() -> None:
            kw: Dict[str, Any] = {"store": "memory"}
            if store == "zarr":
                path = os.path.join(tmp, "profile.zarr")
                shutil.rmtree(path, ignore_errors=True)
                kw = {
                    "store": "zarr",
                    "store_path": path,
                    "store_dtype": args.store_dtype,
                    "store_options": {"chunk_rows": args.profile_rows},
                }
            DataInfInfluence(
                model, causal_lm_loss, compression=specs, progress=False, **kw
            ).fit(loader)

        return run

    pieces = {
        "plain forward+backward": lambda: plain_epoch(model, causal_lm_loss, loader),
        "hooked pass, dense per-sample gradients": dense,
        "hooked pass, projected per-sample gradients and exact norms": projected,
        "fit into memory": fit_to("memory"),
        f"fit into Zarr ({args.store_dtype})": fit_to("zarr"),
    }
    times: Dict[str, List[Dict[str, float]]] = {k: [] for k in pieces}
    model.eval()
    for _ in range(args.profile_repeats):
        for name, fn in pieces.items():
            _, t = clock(fn)
            times[name].append(t)
            logger.info("profile %s: %.1f s", name, t["wall_s"])
    return {
        "rows": len(x),
        "repeats": args.profile_repeats,
        "cpu_s": {k: min(t["cpu_s"] for t in v) for k, v in times.items()},
        "wall_s": {k: min(t["wall_s"] for t in v) for k, v in times.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--family", choices=cc.FAMILIES, default="gaussian")
    ap.add_argument("--size", type=int, default=17)
    ap.add_argument("--store-dtype", default="float16")
    ap.add_argument("--chunk-rows", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--top", type=int, default=100)
    ap.add_argument("--reference-n", type=int, default=1000)
    ap.add_argument("--profile-rows", type=int, default=32)
    ap.add_argument("--profile-repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ft-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=str(cc.CACHE))
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.n_train % args.chunk_rows:
        raise ValueError("--chunk-rows must divide --n-train (no padded edge chunk)")
    model, tok, recipe = cc.smollm2(
        Path(args.cache), steps=args.steps, batch_size=args.ft_batch
    )
    x, y, _ = cc.math_sequences(tok, args.n_train)
    xt, yt, _ = cc.math_sequences(tok, args.n_test, seed=1)
    shapes = {b.name: [list(s) for s in b.shapes] for b in build_blocks(model)}
    specs = cc.projection_specs(args.family, args.size, shapes, seed=0)
    k = cc.width(specs)
    record: Dict[str, Any] = {
        "recipe": recipe,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "tokens": cc.SEQ_TOKENS,
        "trainable": DENSE_PARAMETERS,
        "blocks": len(shapes),
        "compression": {"family": args.family, "size": args.size, "k": k},
        "batch_size": args.batch,
        "threads": args.threads,
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "grads.zarr")
        infl, record["fit"] = fit_vs_plain(args, model, specs, x, y, path)
        record["store"] = store_sizes(args, path, args.n_train, k)
        logger.info("store: %s", record["store"])
        record["reference"] = reference(args, infl, xt, yt)
        logger.info("reference: %s", record["reference"])
        record["latency"] = latency(
            args, infl, xt[: args.queries], yt[: args.queries], tmp
        )
        logger.info("latency: %s", record["latency"])
        record["profile"] = profile(args, model, specs, x, y, tmp)
        record["load_average"] = os.getloadavg()
        record["cpus"] = os.cpu_count()
    text = json.dumps(record, indent=1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
