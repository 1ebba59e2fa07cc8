"""The GPU anchor job in one call: ours, the floor and two peers, as JSON.

RoBERTa-base sizes (12 layers, hidden 768, vocabulary 50265) built from a
config with random weights (nothing is downloaded), PEFT LoRA r=8 on query and
value (random adapters), masked mean pooling and a linear head; sequences of
128 tokens, n = 1024 training and m = 64 test points, float32, batches of 32.
In one run, after a warm-up:

* **floor**: one plain forward+backward over the n + m samples (medians of
  `--repeats`), and over the n training samples alone;
* **ours**: `DataInfInfluence.fit` on the n training points, then the whole
  `(m, n)` matrix (`train_influences`), timed separately (medians);
* **pyDVL IHM**: pyDVL's `InverseHarmonicMeanInfluence` (one block per layer,
  one λ) through `SequentialInfluenceCalculator`-sized chunks: `fit`, then 2
  (test chunk, train chunk) block pairs timed, extrapolated to all pairs. Its
  `torch.func` gradients cannot trace the attention-mask code of
  `transformers`; the job's masks are all ones, so pyDVL gets the same model
  without them;
* **kronfluence EK-FAC**: factors and pairwise scores, if kronfluence imports
  (`--peers-dir` puts `benchmarks/.peers` on the path); otherwise recorded as
  skipped.

The whole run stays within `--budget-s` (default 420 s): a peer is skipped
(and recorded as such) when too little time is left. `--tiny --device cpu` is
the smoke test that CI runs: a 2-layer model, n = 32, m = 4, 16 tokens; it also
checks our matrix against the autograd-loop engine.

    python benchmarks/bench_gpu.py --device cuda --out benchmarks/results/bench_gpu.json
    python benchmarks/bench_gpu.py --tiny --device cpu --out /tmp/bench_gpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine  # noqa: E402
from peer_bench.jobs import _build_roberta  # noqa: E402
from pydvl_datainf import DataInfInfluence  # noqa: E402

LAMBDA = 0.1  # pyDVL's one λ: the timing does not depend on its value


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _floor(model: torch.nn.Module, loader: DataLoader) -> None:
    for x, y in loader:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def _ours(model, train: DataLoader, xte, yte, device, engine: str = "hooks"):
    t0 = time.perf_counter()
    infl = DataInfInfluence(model, F.cross_entropy, engine=engine, progress=False)
    infl.fit(train)
    _sync(device)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    matrix = infl.train_influences(xte, yte)
    _sync(device)
    return fit_s, time.perf_counter() - t0, matrix


class _Unmasked(torch.nn.Module):
    """The job's model without its attention mask, for pyDVL's `torch.func`.

    The job's masks are all ones, so dropping them changes no number, but
    `torch.func` cannot trace the mask handling of `transformers` (a
    data-dependent branch).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model.encoder(input_ids=x[:, 0]).last_hidden_state
        return self.model.head(h.mean(1))


def _pydvl_ihm(model, xtr, ytr, xte, yte, batch: int, device) -> Dict[str, Any]:
    """pyDVL's IHM: fit, then 2 block pairs timed and extrapolated."""
    from pydvl.influence.torch import InverseHarmonicMeanInfluence
    from pydvl.influence.torch.util import BlockMode

    if not bool((xtr[:, 1] == 1).all() and (xte[:, 1] == 1).all()):
        raise ValueError("pyDVL's run needs all-ones attention masks")
    ihm = InverseHarmonicMeanInfluence(
        _Unmasked(model), F.cross_entropy, LAMBDA, block_structure=BlockMode.LAYER_WISE
    )
    fit_s = _timed(
        lambda: ihm.fit(DataLoader(TensorDataset(xtr, ytr), batch_size=batch)),
        device,
    )
    pairs = math.ceil(len(xte) / batch) * math.ceil(len(xtr) / batch)
    ihm.influences(xte[:1], yte[:1], xtr[:1], ytr[:1])  # warm-up
    times = []
    for j in range(2):  # what the calculator does per (test, train) chunk pair
        first = (j * batch) % len(xtr)  # the first chunk again if only one
        tr = slice(first, first + batch)
        times.append(
            _timed(
                lambda tr=tr: ihm.influences(
                    xte[:batch], yte[:batch], xtr[tr], ytr[tr]
                ),
                device,
            )
        )
    per_pair = statistics.mean(times)
    return {
        "status": "ok",
        "fit_s": fit_s,
        "pair_s": times,
        "pairs": pairs,
        "total_s": fit_s + pairs * per_pair,
        "extrapolated": True,
        "config": f"LAYER_WISE blocks, one λ = {LAMBDA}, chunks of {batch}, "
        "attention mask dropped (all ones)",
    }


def _kronfluence(model, xtr, ytr, xte, yte, batch: int, device) -> Dict[str, Any]:
    """kronfluence's EK-FAC (empirical Fisher), factors and pairwise scores."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    tracked = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
        and any(p.requires_grad for p in mod.parameters(recurse=False))
    ]

    class Classify(Task):
        def compute_train_loss(self, batch, model, sample=False):  # type: ignore[no-untyped-def]
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

        def compute_measurement(self, batch, model):  # type: ignore[no-untyped-def]
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

        def get_influence_tracked_modules(self) -> Optional[List[str]]:
            return tracked

        def get_attention_mask(self, batch):  # type: ignore[no-untyped-def]
            return batch[0][:, 1]

    task = Classify()
    model = prepare_model(model, task)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer(
            analysis_name="bench_gpu",
            model=model,
            task=task,
            cpu=device.type == "cpu",
            log_level=logging.WARNING,
            disable_tqdm=True,
            output_dir=out,
        )
        t0 = time.perf_counter()
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=TensorDataset(xtr, ytr),
            per_device_batch_size=batch,
            factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
            overwrite_output_dir=True,
        )
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name="scores",
            factors_name="ekfac",
            query_dataset=TensorDataset(xte, yte),
            train_dataset=TensorDataset(xtr, ytr),
            per_device_query_batch_size=len(xte),
            per_device_train_batch_size=batch,
            score_args=ScoreArguments(damping_factor=None),
            overwrite_output_dir=True,
        )
        scores_s = time.perf_counter() - t0
    return {
        "status": "ok",
        "fit_s": fit_s,
        "scores_s": scores_s,
        "total_s": fit_s + scores_s,
        "config": "strategy=ekfac, use_empirical_fisher=True, damping_factor=None",
    }


def gemm_gflops(
    m: int, rows: int, p: int, device: torch.device, repeats: int = 3
) -> Dict[str, Any]:
    """Throughput of the matrix step's three GEMMs on one chunk of `rows`.

    For one chunk of training gradients `G` (rows × p) and test gradients `V`
    (m × p): `V Gᵀ`, then the coefficients times `G` and the factors times
    `Gᵀ`: 3 m rows p multiply-adds (6 m rows p flops), float32.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    g = torch.randn(rows, p, device=device, generator=gen)
    v = torch.randn(m, p, device=device, generator=gen)

    def step() -> None:
        c = v @ g.T  # (m, rows)
        w = c @ g  # (m, p): the correction
        (w @ g.T).sum()  # (m, rows): the scores of the corrected factors

    step()
    best = min(_timed(step, device) for _ in range(repeats))
    flops = 2 * 3 * m * rows * p
    return {"m": m, "rows": rows, "p": p, "seconds": best, "gflops": flops / best / 1e9}


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peer(
    name: str, fn: Callable[[], Dict[str, Any]], start: float, args: Any
) -> Dict[str, Any]:
    left = args.budget_s - (time.perf_counter() - start)
    if left < args.peer_reserve_s:
        return {"status": f"skipped: {left:.0f} s left of the budget"}
    try:
        return fn()
    except ImportError as e:
        return {"status": f"skipped: not installed ({e})"}
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        return {"status": f"failed: {type(e).__name__}: {e}"[:300]}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CI smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--peer-reserve-s", type=float, default=60.0)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--peers-dir", type=Path, help="extra path with kronfluence")
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    ap.add_argument(
        "--gemm-only",
        action="store_true",
        help="only the GEMM throughput at the job's shapes (m, p; 4096 rows)",
    )
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if args.peers_dir:
        sys.path.insert(0, str(args.peers_dir))
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    model, data, meta = _build_roberta(args.tiny, seed=0)
    model = model.to(device).eval()
    p = _trainable(model)
    if args.gemm_only:
        res = {"machine": machine(), "device": str(device), "job": meta["description"]}
        res["gemm"] = gemm_gflops(len(data["x_test"]), 4096, p, device)
        text = json.dumps(res, indent=2)
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        return res
    xtr, ytr = data["x_train"].to(device), data["y_train"].to(device)
    xte, yte = data["x_test"].to(device), data["y_test"].to(device)
    bs = args.batch_size
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=bs)
    every = DataLoader(
        TensorDataset(torch.cat([xtr, xte]), torch.cat([ytr, yte])), batch_size=bs
    )
    res: Dict[str, Any] = {
        "machine": machine(),
        "device": str(device),
        "job": meta["description"],
        "n": len(xtr),
        "m": len(xte),
        "seq_len": int(xtr.shape[-1]),
        "dtype": "float32",
        "trainable_parameters": p,
    }
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
    _floor(model, every), _ours(model, train, xte, yte, device)  # warm-up
    floors, floors_train, fits, mats = [], [], [], []
    matrix = torch.empty(0)
    for _ in range(args.repeats):  # interleaved: both see the same conditions
        floors.append(_timed(lambda: _floor(model, every), device))
        floors_train.append(_timed(lambda: _floor(model, train), device))
        fit_s, mat_s, matrix = _ours(model, train, xte, yte, device)
        fits.append(fit_s)
        mats.append(mat_s)
    res.update(
        floor_s=statistics.median(floors),
        floor_train_s=statistics.median(floors_train),
        ours_fit_s=statistics.median(fits),
        ours_matrix_s=statistics.median(mats),
    )
    res["ours_total_s"] = res["ours_fit_s"] + res["ours_matrix_s"]
    res["ratio_to_floor"] = res["ours_total_s"] / res["floor_s"]
    res["matrix_shape"] = list(matrix.shape)
    res["matrix_finite"] = bool(torch.isfinite(matrix).all())
    if args.tiny:  # the same matrix from the one-sample-at-a-time engine
        ref = _ours(model, train, xte, yte, device, engine="loop")[2]
        res["matrix_rel_err_vs_loop"] = float((matrix - ref).norm() / ref.norm())
    res["gemm"] = gemm_gflops(len(xte), min(len(xtr), 4096), p, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _ours(model, train, xte, yte, device)
        res["ours_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if not args.skip_peers:
        res["pydvl_ihm"] = _peer(
            "pydvl_ihm",
            lambda: _pydvl_ihm(model, xtr, ytr, xte, yte, bs, device),
            start,
            args,
        )
        res["kronfluence_ekfac"] = _peer(
            "kronfluence",
            lambda: _kronfluence(model, xtr, ytr, xte, yte, bs, device),
            start,
            args,
        )
    res["wall_s"] = time.perf_counter() - start
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
