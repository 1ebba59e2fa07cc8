"""Metrics against the exact per-block inverse, the CSV and the markdown table."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = [
    "COLUMNS",
    "auc",
    "markdown_table",
    "pearson",
    "rel_error",
    "spearman",
    "write_csv",
    "write_docs",
]

BEGIN = "<!-- peers-table:begin (written by benchmarks/run.py) -->"
END = "<!-- peers-table:end -->"
HEADING = "## Peers"

COLUMNS = [
    "job",
    "tool",
    "label",
    "library",
    "version",
    "method",
    "status",
    "fit_s",
    "matrix_s",
    "total_s",
    "x_ours",
    "peak_mb",
    "delta_mb",
    "pearson",
    "spearman",
    "auc",
    "rel_err_same_lambda",
    "config",
    "message",
]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of all entries."""
    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / denom) if denom > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of all entries."""
    from scipy.stats import rankdata

    return pearson(rankdata(a.ravel()), rankdata(b.ravel()))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of `scores` for binary `labels` (ties count one half)."""
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def rel_error(a: np.ndarray, reference: np.ndarray) -> float:
    """‖a − reference‖_F / ‖reference‖_F."""
    return float(np.linalg.norm(a - reference) / np.linalg.norm(reference))


def mislabel_auc(matrix: np.ndarray, flipped: np.ndarray) -> float:
    """AUC of harmfulness (minus the mean influence on the test set) for flips."""
    return auc(-matrix.mean(axis=0), flipped)


def write_csv(rows: Sequence[Dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in COLUMNS})


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def _num(v: Optional[float], digits: int = 2, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if abs(v) >= 100:
        return f"{v:.0f}{suffix}"
    return f"{v:.{digits}f}{suffix}"


def _time(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if v < 0.1:
        return f"{v:.3f}"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _status(r: Dict[str, Any]) -> str:
    status = r.get("status", "")
    if status == "ok":
        return "ok" if not r.get("message") else f"ok — {r['message']}"
    msg = str(r.get("message") or "").replace("|", "\\|")
    return f"**{status}**: {msg}" if msg else f"**{status}**"


def markdown_table(rows: Sequence[Dict[str, Any]], gpu: bool = False) -> str:
    mem = "peak GPU MiB" if gpu else "peak RSS MiB (Δ)"
    lines = [
        f"| job | tool | method | fit s | matrix s | total s | × ours | {mem} "
        "| r exact | ρ exact | AUC | status |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        memory = (
            _num(r.get("peak_mb"), 0)
            if gpu or r.get("delta_mb") is None
            else f"{_num(r.get('peak_mb'), 0)} ({_num(r.get('delta_mb'), 0)})"
        )
        label = r["label"]
        if r.get("version"):
            label = f"{label} {r['version']}"
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["job"]),
                    label,
                    str(r.get("method", "")),
                    _time(r.get("fit_s")),
                    _time(r.get("matrix_s")),
                    _time(r.get("total_s")),
                    _num(r.get("x_ours"), 1, "×"),
                    memory if r.get("status") == "ok" else "—",
                    _num(r.get("pearson"), 3),
                    _num(r.get("spearman"), 3),
                    _num(r.get("auc"), 3),
                    _status(r),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def write_docs(path: Path, body: str, intro: str = "") -> None:
    """Replaces the text between the markers under `HEADING` in `path`.

    Creates the heading (with `intro`) and the markers at the end of the file
    when they are missing; other sections are kept as they are.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
        text = pattern.sub(lambda _: block, text)
    elif HEADING in text:
        text = text.replace(HEADING, f"{HEADING}\n\n{block}\n", 1)
    else:
        text = text.rstrip() + f"\n\n{HEADING}\n\n{intro.strip()}\n\n{block}\n"
    path.write_text(text)


def rows_by_job(rows: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    out: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["job"], []).append(r)
    return out
