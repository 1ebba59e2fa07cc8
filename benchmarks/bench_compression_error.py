"""Error of compressed DataInf against the uncompressed scores, on real models.

For one model (`--model minilm`: MiniLM LoRA r=8 on query and value, a BBC
News classifier; `--model smollm2`: SmolLM2-135M LoRA r=8 on q and v, causal
LM on 64-token sequences), the dense per-sample gradients of `--n-train`
training and `--n-test` test points are computed once (one `fit` pass), and
the uncompressed DataInf scores (train x test, float64) are the reference.
Then, for every projection family, size and seed, the gradients are projected
in memory, the scores recomputed in projected space (exact norms and lambda),
and compared with the reference: Spearman correlation per test point
(averaged), the overlap of the top-100 most helpful training points, and the
relative Frobenius error; beside them, what the Johnson-Lindenstrauss bound
guarantees (dense Gaussian projections only).

Families: `gaussian` (one dense Gaussian matrix of k_l rows per block) and
`kronecker` (`Compression(side=s)`: each LoRA matrix projected side by side,
a side of at most s kept).

Finally one configuration of each family goes through the real
`DataInfInfluence(compression=...)` path on the first `--verify-train` rows
(fit into a Zarr store) and its scores are checked against the in-memory
computation.

Usage (the figures on the "Scaling to LLMs" page):

    python benchmarks/bench_compression_error.py --model minilm \
        --out benchmarks/results/compression/minilm.json
    python benchmarks/bench_compression_error.py --model smollm2 \
        --out benchmarks/results/compression/smollm2.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

import compression_common as cc
from common import machine
from pydvl_datainf import DataInfInfluence

logger = logging.getLogger("bench_compression_error")

# k_l per block (gaussian) and side (kronecker), chosen so that the total k
# spans 256 to 16,384 for each model's number of blocks
SWEEPS = {
    "minilm": {
        "gaussian": [11, 21, 43, 85, 171, 341, 683],
        "kronecker": [4, 6, 8, 16, 32, 64, 85],
    },
    "smollm2": {
        "gaussian": [2, 4, 9, 17, 34, 68, 137],
        "kronecker": [2, 3, 4, 6, 8, 12, 16],
    },
}
VERIFY = {"gaussian": {"minilm": 43, "smollm2": 17}, "kronecker": 8}


def load(args: argparse.Namespace) -> Tuple[Any, Any, Tuple[torch.Tensor, ...], Dict]:
    cache = Path(args.cache)
    if args.model == "minilm":
        model, data, recipe = cc.minilm_bbc(cache, args.n_train, args.n_test)
        return model, torch.nn.functional.cross_entropy, data, recipe
    from pydvl_datainf.hf import causal_lm_loss

    model, tok, recipe = cc.smollm2(cache, steps=args.steps, batch_size=args.ft_batch)
    x, y, classes = cc.math_sequences(tok, args.n_train)
    xt, yt, _ = cc.math_sequences(tok, args.n_test, seed=1)
    recipe["data"] = (
        f"{args.n_train} training and {args.n_test} test sequences of "
        f"{cc.SEQ_TOKENS} tokens: generated math word problems with worked "
        "answers, one template per sequence, causal LM loss on every token"
    )
    return model, causal_lm_loss, (x, y, xt, yt), recipe


def dense_gradients(
    model: Any,
    loss: Any,
    data: Tuple[torch.Tensor, ...],
    batch: int,
    folder: Path,
    progress: bool,
) -> Tuple[DataInfInfluence, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """The per-sample gradients of every block, batch by batch; the training
    rows go to one float32 file per block in `folder` (memory-mapped: only the
    pages in use stay in memory), reused if complete."""
    x, y, xt, yt = data
    infl = DataInfInfluence(model, loss, progress=progress)
    sizes = {b.name: b.size for b in infl.blocks}
    done = folder / "complete.json"
    mode = "r" if done.is_file() else "w+"
    folder.mkdir(parents=True, exist_ok=True)
    train = {
        k: np.lib.format.open_memmap(
            folder / f"{i}.npy", mode=mode, dtype=np.float32, shape=(len(x), d)
        )
        for i, (k, d) in enumerate(sizes.items())
    }
    if mode == "w+":
        for s in tqdm(range(0, len(x), batch), desc="gradients", disable=not progress):
            g = infl.per_sample_gradients(x[s : s + batch], y[s : s + batch])
            for k, rows in train.items():
                rows[s : s + batch] = g[k].numpy()
        for rows in train.values():
            rows.flush()
        done.write_text(json.dumps(list(sizes)))
    parts: Dict[str, List[torch.Tensor]] = {k: [] for k in sizes}
    for s in range(0, len(xt), batch):
        g = infl.per_sample_gradients(xt[s : s + batch], yt[s : s + batch])
        for k in parts:
            parts[k].append(g[k])
    test = {k: torch.cat(v) for k, v in parts.items()}
    return infl, {k: torch.from_numpy(v) for k, v in train.items()}, test


def sweep(
    family: str,
    sizes: List[int],
    seeds: List[int],
    shapes: Dict[str, List[List[int]]],
    train: Dict[str, torch.Tensor],
    test: Dict[str, torch.Tensor],
    exact: torch.Tensor,
    norms: Dict[str, torch.Tensor],
    test_norms: Dict[str, torch.Tensor],
    lam: Dict[str, float],
    top: int,
) -> List[Dict[str, Any]]:
    points = []
    for size in sizes:
        runs = []
        for seed in seeds:
            t0 = time.perf_counter()
            specs = cc.projection_specs(family, size, shapes, seed)
            scores = cc.datainf_scores(
                cc.project(specs, test), cc.project(specs, train), norms, lam
            )
            runs.append(
                {"seed": seed, **cc.agreement(scores, exact, top)}
                | {"seconds": time.perf_counter() - t0}
            )
        k_blocks = {n: s.k for n, s in specs.items()}
        point: Dict[str, Any] = {
            "family": family,
            "size": size,
            "k": cc.width(specs),
            "k_per_block": sorted(set(k_blocks.values())),
            "runs": runs,
        }
        for key in ("spearman", f"top{top}_overlap", "relative_error"):
            vals = [r[key] for r in runs]
            point[key] = {
                "mean": statistics.fmean(vals),
                "min": min(vals),
                "max": max(vals),
            }
        point["jl"] = (
            cc.jl_prediction(k_blocks, test_norms, norms, lam, exact)
            if family == "gaussian"
            else None
        )
        logger.info(
            "%s size %d k %d: spearman %.4f overlap %.3f rel.err %.4f",
            family,
            size,
            point["k"],
            point["spearman"]["mean"],
            point[f"top{top}_overlap"]["mean"],
            point["relative_error"]["mean"],
        )
        points.append(point)
    return points


def verify(
    args: argparse.Namespace,
    model: Any,
    loss: Any,
    data: Tuple[torch.Tensor, ...],
    shapes: Dict[str, List[List[int]]],
    train: Dict[str, torch.Tensor],
    test: Dict[str, torch.Tensor],
) -> List[Dict[str, Any]]:
    """Scores through `DataInfInfluence(compression=...)` (a Zarr store) against
    the in-memory computation on the same rows."""
    x, y, xt, yt = data
    nv, mv = args.verify_train, args.verify_test
    sub = {k: g[:nv] for k, g in train.items()}
    sub_t = {k: g[:mv] for k, g in test.items()}
    norms = cc.squared_norms(sub)
    lam = cc.regularization(norms, {k: g.shape[1] for k, g in sub.items()})
    out = []
    for family, size in (
        ("kronecker", VERIFY["kronecker"]),
        ("gaussian", VERIFY["gaussian"][args.model]),
    ):
        specs = cc.projection_specs(family, size, shapes, seed=0)
        memory = cc.datainf_scores(
            cc.project(specs, sub_t), cc.project(specs, sub), norms, lam
        )
        with tempfile.TemporaryDirectory() as tmp:
            sizes = {}
            for dtype in (
                ("float32", "float16") if family == "kronecker" else ("float32",)
            ):
                path = os.path.join(tmp, f"{dtype}.zarr")
                infl = DataInfInfluence(
                    model,
                    loss,
                    compression=specs,
                    store="zarr",
                    store_path=path,
                    store_dtype=dtype,
                    store_options={"chunk_rows": nv},  # no padded edge chunk
                    progress=False,
                )
                infl.fit(
                    DataLoader(TensorDataset(x[:nv], y[:nv]), batch_size=args.batch)
                )
                sizes[dtype] = sum(
                    f.stat().st_size for f in Path(path).rglob("*") if f.is_file()
                )
                if dtype == "float32":
                    real = infl.train_influences(xt[:mv], yt[:mv]).double()
        err = float((real - memory).norm() / memory.norm())
        logger.info("verify %s size %d: relative difference %.2e", family, size, err)
        out.append(
            {
                "family": family,
                "size": size,
                "k": cc.width(specs),
                "n_train": nv,
                "n_test": mv,
                "relative_difference": err,
                "top10_overlap": cc.top_overlap(real, memory, 10),
                "store_bytes": sizes,
            }
        )
        if err > 1e-3:
            raise AssertionError(
                f"{family}: the library's compressed scores differ from the "
                f"in-memory ones by {err:.2e}"
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SWEEPS), required=True)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--top", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="SmolLM2 fine-tuning steps")
    ap.add_argument("--ft-batch", type=int, default=8)
    ap.add_argument("--verify-train", type=int, default=100)
    ap.add_argument("--verify-test", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=str(cc.CACHE))
    ap.add_argument("--quick", action="store_true", help="a tiny run (smoke test)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    sizes = SWEEPS[args.model]
    if args.quick:
        sizes = {f: s[:2] for f, s in sizes.items()}
    t0 = time.perf_counter()
    model, loss, data, recipe = load(args)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    folder = Path(args.cache) / (
        f"gradients-{args.model}-{cc.file_key(recipe)}-{args.n_train}x{args.n_test}"
    )
    infl, train, test = dense_gradients(
        model, loss, data, args.batch, folder, not args.no_progress
    )
    t_grads = time.perf_counter() - t0
    shapes = {b.name: [list(s) for s in b.shapes] for b in infl.blocks}
    dims = {k: g.shape[1] for k, g in train.items()}
    del infl
    norms = cc.squared_norms(train)
    test_norms = cc.squared_norms(test)
    lam = cc.regularization(norms, dims)
    exact = cc.datainf_scores(test, train, norms, lam)
    record: Dict[str, Any] = {
        "model": args.model,
        "recipe": recipe,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "top": args.top,
        "blocks": len(dims),
        "trainable": sum(dims.values()),
        "block_dims": sorted(set(dims.values())),
        "seeds": list(range(args.seeds)),
        "seconds": {"load_and_fine_tune": t_load, "dense_gradients": t_grads},
        "threads": args.threads,
        "machine": machine(),
        "points": [],
    }
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"exact": exact, "lambda": lam, "recipe": recipe, "n_train": args.n_train},
        cache / f"reference-{args.model}-{args.n_train}x{args.n_test}.pt",
    )
    for family, family_sizes in sizes.items():
        record["points"] += sweep(
            family,
            family_sizes,
            record["seeds"],
            shapes,
            train,
            test,
            exact,
            norms,
            test_norms,
            lam,
            args.top,
        )
    record["verification"] = verify(args, model, loss, data, shapes, train, test)
    text = json.dumps(record, indent=1)
    assert not math.isnan(record["points"][0]["spearman"]["mean"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text[:2000])


if __name__ == "__main__":
    main()
