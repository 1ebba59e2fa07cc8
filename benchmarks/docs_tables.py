"""Render the tables of docs/benchmarks.md from the results files.

Every table on the benchmarks page sits between two markers,

    <!-- table: NAME -->
    ... generated ...
    <!-- /table -->

and is rendered by the function registered under NAME below from files in
`benchmarks/results/` only. The peers table keeps the markers that
`benchmarks/run.py` writes, and is the file `benchmarks/results/peers.md` as
that script wrote it. Figures quoted in the prose are listed in `CLAIMS`, each
with the results file it comes from and how it is computed.

    python benchmarks/docs_tables.py --write   # rewrite the tables in the page
    python benchmarks/docs_tables.py --check   # exit 1 if a table or a quoted figure is stale

After a benchmark is rerun and its results file replaced, `--write` updates
the page; `tests/test_docs_tables.py` fails while the page is out of date.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from scipy.stats import t as student_t

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NOTEBOOK_RESULTS = ROOT / "notebooks" / "results"
#: names starting with this prefix are read from NOTEBOOK_RESULTS
NB = "notebooks/results/"
PAGE = ROOT / "docs" / "benchmarks.md"

REGION = re.compile(
    r"(?P<open><!-- table: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(?P<close><!-- /table -->)",
    re.S,
)
PEERS_BEGIN = "<!-- peers-table:begin (written by benchmarks/run.py) -->"
PEERS_END = "<!-- peers-table:end -->"
PEERS = re.compile(
    "(?P<open>"
    + re.escape(PEERS_BEGIN)
    + "\n)(?P<body>.*?)(?P<close>"
    + re.escape(PEERS_END)
    + ")",
    re.S,
)

__all__ = [
    "CLAIMS",
    "Claim",
    "Results",
    "TABLES",
    "check",
    "check_page",
    "main",
    "regions",
    "render",
    "update",
]


class Results:
    """Read-only access to the results files, with the names used in errors.

    Example:
        ```python
        from docs_tables import Results
        res = Results()
        res.json("bench_fit.json")["lora_mlp_hooks"]["ratio"]
        ```
    """

    def __init__(
        self, root: Path = RESULTS, notebooks: Path = NOTEBOOK_RESULTS
    ) -> None:
        self.root = Path(root)
        self.notebooks = Path(notebooks)

    def path(self, name: str) -> Path:
        """`name` in `benchmarks/results/`, or in `notebooks/results/` if it starts with `NB`."""
        if name.startswith(NB):
            return self.notebooks / name[len(NB) :]
        return self.root / name

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def text(self, name: str) -> str:
        path = self.path(name)
        if not path.is_file():
            raise FileNotFoundError(f"results file {path} is missing")
        return path.read_text(encoding="utf-8")

    def json(self, name: str) -> Any:
        """A JSON file, or the JSON object that starts a text file (a captured stdout)."""
        obj, _ = json.JSONDecoder().raw_decode(self.text(name).lstrip())
        return obj

    def csv(self, name: str) -> List[Dict[str, str]]:
        return list(csv.DictReader(self.text(name).splitlines()))

    def peer(self, name: str, job: str, tool: str) -> Dict[str, str]:
        """The row of `tool` on `job` in a peers CSV."""
        for row in self.csv(name):
            if row["job"] == job and row["tool"] == tool:
                return row
        raise KeyError(f"{self.path(name)} has no row for job {job!r}, tool {tool!r}")


# --- number formats ----------------------------------------------------------


def sec(v: float) -> str:
    """Seconds as the peers table prints them (3 significant digits or so)."""
    if v < 0.1:
        return f"{v:.3f}"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def ratio(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}×"


def f3(v: float) -> str:
    return f"{v:.3f}"


def mean_std(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def bold(text: str, on: bool) -> str:
    """`text` in bold if `on` (best values: equal to the best as printed, ties included)."""
    return f"**{text}**" if on else text


def table(
    header: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[str] = None
) -> str:
    """A markdown table; `align` is one character per column, `l` or `r`."""
    align = align or "l" * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def source(*names: str, command: Optional[str] = None) -> str:
    files = ", ".join(
        f"`{n}`" if n.startswith(NB) else f"`benchmarks/results/{n}`" for n in names
    )
    made = f", written by `{command}`" if command else ""
    return f"*Source: {files}{made}.*"


def not_stored(name: str, command: str, what: str) -> str:
    return (
        f"*Not in the repository yet, so not shown: {what}. To measure it, run "
        f"`{command}`, save its JSON as `benchmarks/results/{name}` and run "
        "`python benchmarks/docs_tables.py --write`.*"
    )


# --- tables ------------------------------------------------------------------

TABLES: Dict[str, Callable[[Results], str]] = {}


def register(
    name: str,
) -> Callable[[Callable[[Results], str]], Callable[[Results], str]]:
    def deco(fn: Callable[[Results], str]) -> Callable[[Results], str]:
        TABLES[name] = fn
        return fn

    return deco


@register("mlp-matrix")
def _mlp_matrix(res: Results) -> str:
    r = res.json("bench_mlp_matrix.txt")
    repeats = r.get("args", {}).get("repeats", 1)
    rows = [
        ["plain forward+backward epoch (the floor)", f"{r['floor_epoch_s']:.3f} s"],
        [
            "`DataInfInfluence.fit`",
            f"{r['ours_fit_s']:.3f} s ({ratio(r['ours_fit_s'] / r['floor_epoch_s'])} the floor)",
        ],
        ["whole matrix, pydvl-datainf (fit + queries)", f"{r['ours_matrix_s']:.3f} s"],
        [
            "whole matrix, pyDVL 0.10 `InverseHarmonicMeanInfluence` (fit + queries; one run)",
            f"{r['pydvl_ihm_matrix_s']:.2f} s",
        ],
        [
            "**pyDVL time / ours**",
            f"**{ratio(r['pydvl_ihm_matrix_s'] / r['ours_matrix_s'], 1)}**",
        ],
    ]
    return "\n\n".join(
        [
            table(["measurement", f"time (median of {repeats} runs)"], rows, "lr"),
            source(
                "bench_mlp_matrix.txt",
                command="python benchmarks/bench_mlp_matrix.py > benchmarks/results/bench_mlp_matrix.txt",
            ),
        ]
    )


@register("safety-checks")
def _safety_checks(res: Results) -> str:
    r = res.json("bench_checks.json")
    floor = r["floor"]
    rows = [
        [
            "plain forward+backward epoch over the training data",
            f"{floor['train_epoch_s'] * 1e3:.1f} ms",
            "",
        ],
        [
            "plain forward+backward epoch over the test data",
            f"{floor['test_epoch_s'] * 1e3:.1f} ms",
            "",
        ],
        [
            "DataInf's three matrix products on these shapes",
            f"{floor['gemms_s'] * 1e3:.1f} ms",
            "",
        ],
        ["**the floor**", f"**{floor['total_s'] * 1e3:.1f} ms**", "1.00×"],
        [
            "**the job**: `fit`, then the whole matrix through `SequentialInfluenceCalculator`",
            f"**{r['job_s'] * 1e3:.1f} ms**",
            f"**{ratio(r['job_over_floor'])}**",
        ],
    ]
    for c in r["checks"]:
        rows.append(
            [
                f"in the job: {c['check']}, {c['calls']} calls",
                f"{c['seconds'] * 1e3:.2f} ms",
                f"{100 * c['share_of_floor']:.1f}% of the floor",
            ]
        )
    rows.append(
        [
            "the job without the time of these checks",
            f"{(r['job_s'] - r['checks_s']) * 1e3:.1f} ms",
            ratio(r["job_without_checks_over_floor"]),
        ]
    )
    return "\n\n".join(
        [
            table(["measurement", "time (median run)", "× the floor"], rows, "lrr"),
            source(
                "bench_checks.json",
                command="python benchmarks/bench_checks.py --out "
                "benchmarks/results/bench_checks.json",
            ),
        ]
    )


FIT_JOBS = {
    "lora_mlp_hooks": "LoRA-MLP (frozen 256→512→512→10, r=8, n=4096, batch 256), hooks engine, factored cache (default)",
    "lora_mlp_hooks_dense_cache": "the same, dense cache (`factorize=False`)",
    "lora_mlp_func": "the same, `torch.func` engine (dense cache)",
    "minilm_lora_hooks": "MiniLM + PEFT LoRA r=8 (query, value) + head, BBC News, n=256, batch 32, 64 tokens, hooks engine",
}
FIT_MEMORY = {
    "lora_mlp_peak_mib": "LoRA-MLP, batch 256",
    "minilm_peak_mib": "MiniLM LoRA, batch 32",
}


@register("fit-time")
def _fit_time(res: Results) -> str:
    r = res.json("bench_fit.json")
    rows = []
    for key, v in r.items():  # the custom LoRA jobs have their own table
        if key not in FIT_JOBS or "fit_s" not in v:
            continue
        rounds = len(v.get("ratios", [])) or 1
        rows.append(
            [
                FIT_JOBS.get(key, key),
                f"{v['floor_s']:.3g} s",
                f"{v['fit_s']:.3g} s",
                f"{ratio(v['ratio'])} (median of {rounds})",
                ratio(v["ratio_of_min"]) if "ratio_of_min" in v else "—",
            ]
        )
    return "\n\n".join(
        [
            table(
                [
                    "job",
                    "floor epoch",
                    "`fit`",
                    "`fit` / floor",
                    "fastest `fit` / fastest floor",
                ],
                rows,
                "lrrrr",
            ),
            source(
                "bench_fit.json",
                command="python benchmarks/bench_fit.py --repeats 11 --out benchmarks/results/bench_fit.json",
            ),
        ]
    )


@register("fit-memory")
def _fit_memory(res: Results) -> str:
    r = res.json("bench_fit.json")
    rows = []
    for key, label in FIT_MEMORY.items():
        if key not in r:
            continue
        v = r[key]
        rows.append(
            [
                label,
                f"{v['train_step']:.1f} MiB",
                f"{v['fit_one_batch']:.1f} MiB",
                ratio(v["fit_one_batch"] / v["train_step"]),
            ]
        )
    return "\n\n".join(
        [
            table(
                [
                    "peak memory (RSS growth)",
                    "plain training step",
                    "`fit`, one batch",
                    "ratio",
                ],
                rows,
                "lrrr",
            ),
            source(
                "bench_fit.json",
                command="python benchmarks/bench_fit.py --repeats 11 --out benchmarks/results/bench_fit.json",
            ),
        ]
    )


PEER_LABELS = {
    "exact": "exact per-block inverse",
    "ours": "**pydvl-datainf**",
    "ours-scalar": "pydvl-datainf, one λ",
    "ours-calc": "pydvl-datainf via calculator",
    "pydvl-ihm": "pyDVL IHM (factors once)",
    "pydvl-ihm-calc": "pyDVL IHM via calculator",
    "pydvl-ekfac": "pyDVL EK-FAC",
    "pydvl-lissa": "pyDVL LiSSA",
    "pydvl-arnoldi": "pyDVL Arnoldi",
    "dattri": "dattri",
    "kronfluence": "kronfluence EK-FAC",
}


def _opt(row: Dict[str, str], key: str, fmt: Callable[[float], str]) -> str:
    v = row.get(key, "")
    return fmt(float(v)) if v not in ("", None) else "—"


@register("peers-ab")
def _peers_ab(res: Results) -> str:
    rows = []
    for r in res.csv("peers_ab/peers.csv"):
        if r["status"] != "ok":
            continue
        rows.append(
            [
                r["job"],
                PEER_LABELS.get(r["tool"], r["label"]),
                _opt(r, "fit_s", sec),
                _opt(r, "matrix_s", sec),
                _opt(r, "total_s", sec),
                _opt(r, "x_ours", lambda v: ratio(v, 1)),
                _opt(r, "delta_mb", lambda v: f"{v:.0f}"),
                _opt(r, "pearson", f3),
                _opt(r, "auc", f3),
            ]
        )
    return "\n\n".join(
        [
            table(
                [
                    "job",
                    "tool",
                    "fit s",
                    "matrix s",
                    "total s",
                    "× ours",
                    "Δ RSS MiB",
                    "r exact",
                    "AUC",
                ],
                rows,
                "llrrrrrrr",
            ),
            source("peers_ab/peers.csv", "peers_ab/peers.md"),
        ]
    )


@register("scale-ours")
def _scale_ours(res: Results) -> str:
    name = "scale/ours.json"
    command = "/usr/bin/time -v python benchmarks/bench_scale.py ours --out /tmp/scale"
    if not res.exists(name):
        return not_stored(
            name, command, "the time and peak memory of the 100,000 × 1,000 job"
        )
    r = res.json(name)
    rows = [
        [
            f"`fit` (per-sample gradients + {r['store_gb_on_disk']:.2f} GB written to Zarr)",
            f"{r['fit_s']:.1f} s ({r['fit_rows_per_s']:,.0f} training rows/s)",
        ],
        [
            "`influence_matrix` (factors pass + tile pass)",
            f"{r['matrix_s']:.1f} s ({r['matrix_influences_per_s']:,.0f} influences/s)",
        ],
        ["total", f"{r['total_s']:.1f} s"],
        [
            "peak RSS (`ru_maxrss`)",
            f"{r['peak_rss_gb']:.2f} GB ({r['peak_rss_after_fit_gb']:.2f} GB after `fit`)",
        ],
        ["matrix on disk", f"{r['matrix_gb_on_disk']:.2f} GB"],
        [
            "spot check against `DataInfInfluence.influences`",
            f"relative error {r['spot_check_rel_err']:.1e}",
        ],
    ]
    return "\n\n".join(
        [
            table(["measurement", "pydvl-datainf"], rows, "lr"),
            source(name, command=command),
        ]
    )


@register("scale-pydvl")
def _scale_pydvl(res: Results) -> str:
    name = "scale/pydvl.json"
    command = "python benchmarks/bench_scale.py pydvl --out /tmp/scale --ours-json /tmp/scale/ours.json"
    if not res.exists(name):
        return not_stored(name, command, "pyDVL's time on the same job")
    r = res.json(name)
    rows = [
        [f"block pair {i + 1} of {r['pydvl_pairs_total']}", f"{t:,.1f} s"]
        for i, t in enumerate(r["pydvl_pair_s"])
    ]
    rows.append(
        [
            f"all {r['pydvl_pairs_total']} pairs, **extrapolated** from {r['pydvl_pairs_measured']}",
            f"{r['pydvl_extrapolated_s']:,.0f} s",
        ]
    )
    rows.append(["peak RSS", f"{r['peak_rss_gb']:.2f} GB"])
    if "ratio_pydvl_over_ours" in r:
        rows.append(
            ["pyDVL (extrapolated) / ours", ratio(r["ratio_pydvl_over_ours"], 1)]
        )
    return "\n\n".join(
        [
            table(["measurement", "pyDVL 0.10"], rows, "lr"),
            source(name, command=command),
        ]
    )


SCALE_FLOOR = {
    "scale/floor-60k.json": "python benchmarks/bench_scale.py floor --n-train 60000 "
    "--n-test 1000 --out /tmp/scale --save benchmarks/results/scale/floor-60k.json",
    "scale/floor-1m.json": "python benchmarks/bench_scale.py floor --n-train 1000000 "
    "--n-test 1000 --out /tmp/scale --save benchmarks/results/scale/floor-1m.json",
}


@register("scale-floor")
def _scale_floor(res: Results) -> str:
    stored = [name for name in SCALE_FLOOR if res.exists(name)]
    if not stored:
        name, command = next(iter(SCALE_FLOOR.items()))
        return not_stored(
            name, command, "the out-of-core matrix against its GEMM floor"
        )
    rows = []
    for name in stored:
        r = res.json(name)
        n, m = r["args"]["n_train"], r["args"]["n_test"]
        rows.append(
            [
                f"{m:,} × {n:,}",
                f"{r['store_gb_on_disk']:.2f} GB",
                f"{r['fit_s']:.1f} s",
                f"{r['gemm_floor_s']:.1f} s",
                f"{r['store_read_s']:.1f} s",
                (
                    f"{r['store_read_reused_buffers_s']:.1f} s"
                    if "store_read_reused_buffers_s" in r
                    else "—"
                ),
                f"{r['matrix_s']:.1f} s",
                f"**{ratio(r['matrix_over_gemm_floor'])}**",
                f"{r['peak_rss_gb']:.2f} GB",
                f"{r['spot_check_rel_err']:.1e}",
            ]
        )
    return "\n\n".join(
        [
            table(
                [
                    "matrix (test × training)",
                    "store on disk",
                    "`fit`",
                    "GEMM floor",
                    "one read of the store, through Zarr",
                    "one read, reused buffers",
                    "`influence_matrix`",
                    "matrix / floor",
                    "peak RSS",
                    "spot check, rel. error",
                ],
                rows,
                "lrrrrrrrrr",
            ),
            source(*stored, command="; ".join(SCALE_FLOOR[n] for n in stored)),
        ]
    )


PRECISION = "scale/precision.json"
PRECISION_COMMAND = (
    "python benchmarks/bench_scale.py precision --threads 1 --out /tmp/scale"
)


@register("precision")
def _precision(res: Results) -> str:
    if not res.exists(PRECISION):
        return not_stored(
            PRECISION, PRECISION_COMMAND, "the error of half-precision gradient stores"
        )
    r = res.json(PRECISION)["result"]
    f32 = r["float32_disk_gb"]
    rows = [["float32", f"{f32:.3f} GB", "1", "—", "—", "—", "—", "—"]]
    for dtype in ("float16", "bfloat16"):
        v = r[dtype]
        rows.append(
            [
                dtype,
                f"{v['disk_gb']:.3f} GB",
                f"{v['disk_gb'] / f32:.2f}",
                f"{v['max_abs_err_over_max_abs']:.1e}",
                f"{v['rms_err_over_rms']:.1e}",
                f"{v['median_rel_err']:.1e}",
                f"{100 * v['top10_overlap']:.0f} %",
                f"1 − {1 - v['spearman_rows']:.1e}",
            ]
        )
    return "\n\n".join(
        [
            table(
                [
                    "store dtype",
                    "store on disk",
                    "disk / float32",
                    "max abs error / max abs",
                    "RMS error / RMS",
                    "median relative error",
                    "top-10 overlap",
                    "Spearman, per row",
                ],
                rows,
                "lrrrrrrr",
            ),
            source(PRECISION, command=PRECISION_COMMAND),
        ]
    )


# --- the tutorials (notebooks/results/, written by their full runs) ----------

MISLABEL = NB + "mislabel.json"
APPROX = NB + "approximation.json"
INFLUENTIAL = NB + "influential_data.json"
EXECUTE = "python notebooks/execute.py --mode full --inplace {}"
DATASET_LABELS = {"sms": "SMS spam", "bbc": "BBC News"}
INFLUENCE_METHODS = ["DataInf", "Exact inverse", "LiSSA", "Hessian-free", "EK-FAC"]
BASELINES = ["Training loss", "EL2N", "Gradient norm", "Self-influence"]
APPROX_METHODS = ["DataInf", "LiSSA (paper)", "LiSSA (stable)", "Hessian-free"]
INFLUENTIAL_LABELS = {
    "datainf": "DataInf",
    "exact": "Exact inverse",
    "lissa": "LiSSA",
    "ekfac": "EK-FAC",
    "hessian_free": "Hessian-free",
    "cosine": "Gradient cosine",
}


def _stats(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), as pandas gives them."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def _grouped(
    rows: Sequence[Dict[str, Any]], keys: Sequence[str], value: str
) -> Dict[Tuple[Any, ...], Tuple[float, float]]:
    groups: Dict[Tuple[Any, ...], List[float]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(float(r[value]))
    return {k: _stats(v) for k, v in groups.items()}


def _listing(items: Sequence[str]) -> str:
    if len(items) < 2:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _mislabel_main(doc: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The main runs: 20% flipped, the configured number of epochs."""
    epochs = doc["config"]["epochs"]
    return [r for r in doc["runs"] if r["flip"] == 0.2 and r["epochs"] == epochs]


@register("mislabeled")
def _mislabeled(res: Results) -> str:
    doc = res.json(MISLABEL)
    runs = _mislabel_main(doc)
    auc = _grouped(runs, ["dataset", "method"], "auc")
    recall = _grouped(runs, ["dataset", "method"], "recall_top")
    accuracy = _grouped(
        [r for r in runs if r["method"] == "DataInf"], ["dataset"], "test_accuracy"
    )
    rows, lines = [], []
    for ds in doc["config"]["datasets"]:
        methods = [m for m in INFLUENCE_METHODS + BASELINES if (ds, m) in auc]
        best_auc = max(auc[ds, m][0] for m in methods)
        best_recall = max(recall[ds, m][0] for m in methods)
        size = doc["config"]["datasets"][ds]
        for i, m in enumerate(methods):
            rows.append(
                [
                    f"{DATASET_LABELS.get(ds, ds)} (n = {size['n_train']})"
                    if i == 0
                    else "",
                    m,
                    "influence" if m in INFLUENCE_METHODS else "no test set",
                    bold(mean_std(*auc[ds, m]), f3(auc[ds, m][0]) == f3(best_auc)),
                    bold(
                        mean_std(*recall[ds, m]),
                        f3(recall[ds, m][0]) == f3(best_recall),
                    ),
                ]
            )
        ours = auc[ds, "DataInf"][0]
        ahead = sorted(
            (m for m in methods if auc[ds, m][0] > ours), key=lambda m: -auc[ds, m][0]
        )
        best = max(methods, key=lambda m: auc[ds, m][0])
        lines.append(
            f"* {DATASET_LABELS.get(ds, ds)} (mean test accuracy of the fine-tuned models "
            f"{f3(accuracy[(ds,)][0])}): the best AUC is {best} ({f3(auc[ds, best][0])}); "
            f"DataInf's {f3(ours)} ranks {len(ahead) + 1} of {len(methods)}"
            + (
                f", behind {_listing([f'{m} ({f3(auc[ds, m][0])})' for m in ahead])}."
                if ahead
                else "."
            )
        )
    cfg = doc["config"]
    seeds = cfg["seeds"]
    return "\n\n".join(
        [
            f"Mean ± standard deviation over seeds {_listing([str(s) for s in seeds])}; "
            f"20% of the training labels flipped, {cfg['epochs']} epochs; best per "
            "data set in bold. *No test set*: scores that need neither a test set "
            "nor an inverse.",
            table(
                ["data set", "score", "kind", "AUC", "flipped in top 20%"],
                rows,
                "lllrr",
            ),
            "\n".join(lines),
            source(MISLABEL, command=EXECUTE.format("1_mislabeled_data")),
        ]
    )


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


@register("approximation")
def _approximation(res: Results) -> str:
    doc = res.json(APPROX)
    rows_in = [
        dict(
            r,
            aggregate=_num(r.get("aggregate")),
            per_test_point=_num(r.get("per_test_point")),
        )
        for r in doc["correlations"]
    ]
    ranks = sorted({int(r["rank"]) for r in rows_in})
    methods = [m for m in APPROX_METHODS if any(r["method"] == m for r in rows_in)]
    out = []
    cells: Dict[str, Dict[Tuple[str, int], Tuple[float, float]]] = {}
    for metric, title in (
        ("aggregate", "influence on the mean test loss (the paper's quantity)"),
        ("per_test_point", "per test point, mean over test points"),
    ):
        got = _grouped(rows_in, ["method", "rank"], metric)
        cells[metric] = got
        best = {
            k: max(
                (got[m, k][0] for m in methods if not math.isnan(got[m, k][0])),
                default=float("nan"),
            )
            for k in ranks
        }
        rows = []
        for m in methods:
            line = [m]
            for k in ranks:
                mean, std = got[m, k]
                if math.isnan(mean):
                    line.append("diverged")
                    continue
                text = mean_std(mean, std) if metric == "aggregate" else f3(mean)
                line.append(bold(text, f3(mean) == f3(best[k])))
            rows.append(line)
        out.append(
            f"Pearson correlation with the exact per-block inverse, {title}:\n\n"
            + table(
                ["method"] + [f"rank {k}" for k in ranks], rows, "l" + "r" * len(ranks)
            )
        )
    agg = cells["aggregate"]
    lines = [
        f"* DataInf's correlation falls from {f3(agg['DataInf', ranks[0]][0])} at "
        f"rank {ranks[0]} to {f3(agg['DataInf', ranks[-1]][0])} at rank {ranks[-1]}."
    ]
    for m in methods[1:]:
        valid = [k for k in ranks if not math.isnan(agg[m, k][0])]
        above = [k for k in valid if agg[m, k][0] > agg["DataInf", k][0]]
        diverged = [k for k in ranks if k not in valid]
        if not above:
            text = f"DataInf is closer to the exact inverse than {m} at every rank"
        elif len(above) == len(valid):
            text = f"{m} is closer to the exact inverse than DataInf at every rank"
        else:
            text = (
                f"{m} is closer to the exact inverse than DataInf at "
                f"rank{'s' if len(above) > 1 else ''} {_listing([str(k) for k in above])}"
            )
        if diverged:
            text += f" ({m} diverged at rank{'s' if len(diverged) > 1 else ''} {_listing([str(k) for k in diverged])})"
        lines.append(f"* {text}.")
    cfg = doc["config"]
    out.insert(
        0,
        f"SMS spam, {cfg['sizes']['n_train']} training and {cfg['sizes']['n_test']} "
        f"test texts, {round(100 * cfg['flip'])}% of the training labels flipped, LoRA on "
        f"the value projections; mean (± standard deviation) over seeds "
        f"{_listing([str(s) for s in cfg['seeds']])}; best per rank in bold.",
    )
    out.append("\n".join(lines))
    out.append(source(APPROX, command=EXECUTE.format("2_approximation_quality")))
    return "\n\n".join(out)


INFLUENTIAL_EARLIER = NB + "influential_data_full_finetune.json"
PAPER_SIZES = (90, 10)
"""The paper's training and test examples per class."""
#: (fine-tune, scope) -> (fine-tune label, gradients label), in table order
INFLUENTIAL_SETTINGS = {
    ("paper", "prompt"): ("paper's", "prompt (the paper's)"),
    ("paper", "prompt_padded"): ("paper's", "prompt + padding"),
    ("paper", "answer"): ("paper's", "answer"),
    ("paper", "text"): ("paper's", "whole text"),
    ("full", "target"): ("full, on the answer (earlier tasks)", "answer"),
    ("full", "sequence"): ("full, on the whole text (earlier tasks)", "whole text"),
}


def _influential_runs(res: Results) -> List[Dict[str, Any]]:
    """The paper's protocol runs, then the earlier full fine-tunes, in one form.

    Raises:
        KeyError: a run of a scope that the tables have no row for.
    """
    runs = [dict(r, setting="paper") for r in res.json(INFLUENTIAL)["runs"]]
    for t in res.json(INFLUENTIAL_EARLIER)["tasks"]:
        runs.append(
            dict(
                setting="full",
                task=t["task"],
                config=t["config"],
                scopes={t["config"]["loss_on"]: {"methods": t["methods"]}},
            )
        )
    for r in runs:
        for scope in r["scopes"]:
            if (r["setting"], scope) not in INFLUENTIAL_SETTINGS:
                raise KeyError(f"no row for the gradients' scope {scope!r}")
    return runs


def _influential_cell(v: Dict[str, Any], metric: str) -> str:
    std = v.get(metric + "_std")
    return f3(v[metric]) if std is None else mean_std(v[metric], std)


def _influential_table(
    runs: List[Dict[str, Any]], tasks: List[str], metric: str
) -> str:
    rows = []
    for (setting, scope), (tune, grads) in INFLUENTIAL_SETTINGS.items():
        by_task = {
            r["task"]: r["scopes"][scope]["methods"]
            for r in runs
            if r["setting"] == setting and scope in r["scopes"]
        }
        if not by_task:
            continue
        methods = [
            m for m in INFLUENTIAL_LABELS if any(m in ms for ms in by_task.values())
        ]
        best = {t: max(v[metric] for v in ms.values()) for t, ms in by_task.items()}
        for i, m in enumerate(methods):
            cells = []
            for t in tasks:
                v = by_task.get(t, {}).get(m)
                cells.append(
                    "—"
                    if v is None
                    else bold(
                        _influential_cell(v, metric), f3(v[metric]) == f3(best[t])
                    )
                )
            rows.append(
                [tune if i == 0 else "", grads if i == 0 else "", INFLUENTIAL_LABELS[m]]
                + cells
            )
    return table(
        ["fine-tune", "gradients on", "method", *tasks], rows, "lll" + "r" * len(tasks)
    )


def _ranked(methods: Dict[str, Dict[str, Any]], metric: str = "auc") -> List[str]:
    return sorted(methods, key=lambda m: -methods[m][metric])


@register("influential")
def _influential(res: Results) -> str:
    runs = _influential_runs(res)
    paper = [r for r in runs if r["setting"] == "paper"]
    tasks = [r["task"] for r in paper]
    cfg = paper[0]["config"]
    lines = []
    for r in paper:
        prompt = r["scopes"]["prompt"]["methods"]
        answer = r["scopes"]["answer"]["methods"]
        d, a = prompt["datainf"], answer["datainf"]
        met = d["auc"] >= 0.99 and d["recall"] >= 0.95
        ahead = [
            f"{INFLUENTIAL_LABELS[m]} ({f3(answer[m]['auc'])})"
            for m in _ranked(answer)
            if float(f3(answer[m]["auc"])) > float(f3(a["auc"]))
        ]
        padded = r["scopes"].get("prompt_padded", {}).get("methods", {})
        lines.append(
            f"* {r['task']}: in the paper's scope DataInf has AUC {f3(d['auc'])} and "
            f"recall {f3(d['recall'])} ({'at' if met else 'below'} the paper's level, "
            "AUC ≥ 0.99 and recall ≥ 0.95)"
            + (
                f"; with the end-of-sequence padding scored as well, AUC "
                f"{f3(padded['datainf']['auc'])} and recall "
                f"{f3(padded['datainf']['recall'])}"
                if "datainf" in padded
                else ""
            )
            + f"; on the same adapter with the gradients on the answer, AUC "
            f"{f3(a['auc'])} and recall {f3(a['recall'])}, "
            + (f"below {_listing(ahead)}." if ahead else "with no method ahead in AUC.")
        )
    earlier = next(r["config"] for r in runs if r["setting"] == "full")
    recipe = paper[0]["recipe"]
    note = (
        f"SmolLM2-135M-Instruct with LoRA (rank {recipe['rank']}, query and value). "
        f"*Paper's* fine-tune: the paper's design and recipe at a smaller size, "
        f"{cfg['classes']} classes, {cfg['n_train_per_class']} training and "
        f"{cfg['n_test_per_class']} test examples per class (the paper has "
        f"{PAPER_SIZES[0]} and {PAPER_SIZES[1]}), {recipe['updates']} updates of "
        f"{recipe['batch_size']} rows at {recipe['lr']:g} on the whole text, seed "
        f"{cfg['seed']}; mean ± standard deviation over its "
        f"{cfg['classes'] * cfg['n_test_per_class']} test prompts. *Full*: the "
        f"earlier runs of the tutorial ({earlier['n_train_per_class']} training and "
        f"{earlier['n_test_per_class']} test examples per class of the earlier tasks, "
        f"{earlier['epochs']} epochs at {earlier['lr']:g}), which recorded means "
        "only. Best per fine-tune, scope and task in bold."
    )
    return "\n\n".join(
        [
            note,
            "Class-match AUC:\n\n" + _influential_table(runs, tasks, "auc"),
            f"Class-match recall among the top $k$ training examples, $k$ the size "
            f"of a class ({cfg['n_train_per_class']} for the paper's fine-tune, "
            f"{earlier['n_train_per_class']} for the full one):\n\n"
            + _influential_table(runs, tasks, "recall"),
            "\n".join(lines),
            source(INFLUENTIAL, command=EXECUTE.format("3_influential_data"))
            + f" *Full fine-tune rows: `{INFLUENTIAL_EARLIER}`, the tutorial's earlier "
            "runs (read, not rerun).*",
        ]
    )


# --- layers without a rule, half precision ------------------------------------

CUSTOM_LORA = "bench_fit_custom_lora.json"
CUSTOM_LORA_COMMAND = (
    "python benchmarks/bench_fit.py --only-custom --repeats 9 "
    "--out benchmarks/results/bench_fit_custom_lora.json"
)
CUSTOM_JOBS = {
    "custom_lora_mlp_hooks": "custom LoRA module, hooks engine, the default blocks: one per `lora_A` and one per `lora_B` (as for the LoRA-MLP above)",
    "custom_lora_mlp_hooks_layer_blocks": 'the same, `block_structure="module"`: one block per custom layer (`lora_A` and `lora_B` together)',
    "custom_lora_mlp_hooks_engine": "the same, per-sample gradients only (the engine without the cache)",
    "custom_lora_mlp_func": "the same, `torch.func` over the whole model, the default blocks",
}


@register("fit-custom-lora")
def _fit_custom_lora(res: Results) -> str:
    r = res.json(CUSTOM_LORA)
    rounds = max(len(v.get("ratios", [])) for k, v in r.items() if k in CUSTOM_JOBS)
    rows = []
    for key, label in CUSTOM_JOBS.items():
        if key not in r:
            continue
        v = r[key]
        rows.append(
            [
                label,
                f"{bold(ratio(v['ratio']), key == 'custom_lora_mlp_hooks')}; "
                f"{ratio(v['ratio_of_min'])}",
                f"{v['cache_mib']:.1f} MiB" if "cache_mib" in v else "—",
            ]
        )
    return "\n\n".join(
        [
            table(
                [
                    "job",
                    f"`fit` / floor epoch (median of {rounds}; fastest rounds)",
                    "gradient cache",
                ],
                rows,
            ),
            source(CUSTOM_LORA, command=CUSTOM_LORA_COMMAND),
        ]
    )


# --- the classification head (a table of docs/own-models.md) ---------------------

HEAD = "head_blocks.json"
HEAD_COMMAND = (
    "python benchmarks/head_blocks.py --out benchmarks/results/head_blocks.json"
)
HEAD_CHOICES = {
    "lora_only": "LoRA only (`include_head=False`)",
    "head_only": "head only",
    "both": "both (default)",
}


def _head_runs(res: Results, dataset: str) -> List[Dict[str, Any]]:
    return [r for r in res.json(HEAD)["runs"] if r["dataset"] == dataset]


def _head_stat(res: Results, dataset: str, key: str, choice: str = "") -> str:
    """`mean ± std` over the seeds of a run's value (an AUC when `choice`)."""
    runs = _head_runs(res, dataset)
    values = [r["auc"][choice] if choice else r[key] for r in runs]
    mean, std = _stats(values)
    if key == "relative_change":
        return f"{100 * mean:.1f}% ± {100 * std:.1f}%"
    return mean_std(mean, std)


@register("head-blocks")
def _head_blocks(res: Results) -> str:
    doc = res.json(HEAD)
    datasets = list(dict.fromkeys(r["dataset"] for r in doc["runs"]))
    rows = []
    for ds in datasets:
        runs = _head_runs(res, ds)
        means = {c: _stats([r["auc"][c] for r in runs])[0] for c in HEAD_CHOICES}
        best = max(round(v, 3) for v in means.values())
        rows.append(
            [
                DATASET_LABELS.get(ds, ds),
                *(
                    bold(_head_stat(res, ds, "auc", c), round(means[c], 3) == best)
                    for c in HEAD_CHOICES
                ),
                _head_stat(res, ds, "relative_change"),
                _head_stat(res, ds, "harm_spearman"),
            ]
        )
    seeds = len(_head_runs(res, datasets[0]))
    first = doc["runs"][0]
    heads = _listing(
        [
            f"{_head_runs(res, ds)[0]['head_parameters']:,} on "
            f"{DATASET_LABELS.get(ds, ds)}"
            for ds in datasets
        ]
    )
    return "\n\n".join(
        [
            table(
                [
                    "data set",
                    *(f"AUC, {label}" for label in HEAD_CHOICES.values()),
                    "change of the scores",
                    "rank correlation",
                ],
                rows,
                "lrrrrr",
            ),
            f"Mean ± standard deviation over {seeds} seed{'s' * (seeds != 1)}; per run, "
            f"{first['n_train']} training texts (20% of the labels flipped) and "
            f"{first['n_test']} clean test texts. AUC: the ROC AUC of the "
            "mislabel scores at finding the flipped labels, with the blocks "
            "named. Change of the scores: the relative Frobenius norm of the "
            "difference of the score matrices with and without the head block, "
            "‖S_both − S_LoRA‖ / ‖S_LoRA‖. Rank correlation: Spearman's, of "
            "the mislabel scores with and without the head block. The adapters "
            f"have {first['lora_parameters']:,} parameters in "
            f"{first['n_blocks']['lora_only']} blocks, the head {heads}.",
            source(HEAD, command=HEAD_COMMAND),
        ]
    )


TABLE_PAGES: Dict[str, str] = {"head-blocks": "own-models.md"}
"""Tables shown on another page of `docs/` than the benchmarks page:
`{table: page}` (more entries are added below, next to their tables)."""


DTYPES = ("float32", "bfloat16", "float16")
ENGINE_COMMAND = (
    "python benchmarks/bench_engine.py --threads 1 --dtype DTYPE "
    "--out benchmarks/results/bench_engine_DTYPE.json"
)


@register("engine-precision")
def _engine_precision(res: Results) -> str:
    rows, names = [], []
    for dtype in DTYPES:
        name = f"bench_engine_{dtype}.json"
        if not res.exists(name):
            rows.append([dtype, "not stored", "not stored"])
            continue
        names.append(name)
        r = res.json(name)
        rows.append([dtype, f"{r['grads_rel_err']:.1e}", f"{r['norms_rel_err']:.1e}"])
    return "\n\n".join(
        [
            table(
                [
                    "dtype",
                    "per-sample gradients, relative error",
                    "squared norms, relative error",
                ],
                rows,
                "lrr",
            ),
            source(*names, command=ENGINE_COMMAND),
        ]
    )


FIT_PRECISION = "bench_fit_precision.json"
FIT_PRECISION_COMMAND = (
    "python benchmarks/bench_fit.py --only-precision --repeats 3 "
    "--out benchmarks/results/bench_fit_precision.json"
)


@register("fit-precision")
def _fit_precision(res: Results) -> str:
    r = res.json(FIT_PRECISION)
    rows = []
    for dtype in DTYPES:
        v = r[f"lora_mlp_hooks_{dtype}"]
        rows.append(
            [
                dtype,
                f"{v['floor_s']:.3f} s",
                f"{v['fit_s']:.3f} s",
                ratio(v["ratio"]),
                f"{v['cache_mib']:.1f} MiB",
            ]
        )
    return "\n\n".join(
        [
            table(
                ["model dtype", "floor epoch", "`fit`", "ratio", "gradient cache"],
                rows,
                "lrrrr",
            ),
            source(FIT_PRECISION, command=FIT_PRECISION_COMMAND),
        ]
    )


GPU = "bench_gpu.json"
GPU_COMMAND = "python benchmarks/bench_gpu.py --device cuda --out benchmarks/results/bench_gpu.json"


def _peer_cell(v: Any) -> str:
    if not isinstance(v, dict):
        return "—"
    if "total_s" in v:
        return f"{sec(float(v['total_s']))} s"
    return str(v.get("status", "—"))


@register("gpu-anchor")
def _gpu_anchor(res: Results) -> str:
    if not res.exists(GPU):
        return not_stored(GPU, GPU_COMMAND, "the figures of the GPU job")
    r = res.json(GPU)
    rows = [
        ["device", str(r.get("gpu", r["device"]))],
        [
            "plain forward+backward over the n + m samples (the floor)",
            f"{sec(r['floor_s'])} s",
        ],
        ["`fit`", f"{sec(r['ours_fit_s'])} s"],
        [f"the {r['m']} × {r['n']} matrix", f"{sec(r['ours_matrix_s'])} s"],
        ["`fit` + matrix / floor", ratio(r["ratio_to_floor"])],
        ["GEMM throughput at the job's shapes", f"{r['gemm']['gflops']:.0f} GFLOPS"],
    ]
    if "ours_peak_mib" in r:
        rows.append(
            ["peak GPU memory of `fit` + matrix", f"{r['ours_peak_mib']:.0f} MiB"]
        )
    rows.append(
        [
            "pyDVL `InverseHarmonicMeanInfluence` (extrapolated)",
            _peer_cell(r.get("pydvl_ihm")),
        ]
    )
    rows.append(["kronfluence EK-FAC", _peer_cell(r.get("kronfluence_ekfac"))])
    return "\n\n".join(
        [
            table(["measurement", "median of the runs"], rows, "lr"),
            source(GPU, command=GPU_COMMAND),
        ]
    )


def _peers_full(res: Results) -> str:
    """`peers.md` as `benchmarks/run.py` wrote it, made readable on the page.

    The one wide table is split into one table per job (without the job
    column), and statuses longer than `ok` (why a tool cannot run) become
    numbered notes under the table of their job. Every other line is kept.
    """
    lines = res.text("peers.md").rstrip().splitlines()
    start = next(
        (i for i, ln in enumerate(lines) if ln.startswith("| job | tool |")), None
    )
    if start is None:
        return "\n".join(lines)
    end = start + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    header = _cells(lines[start])
    status = header.index("status")
    align = _cells(lines[start + 1])
    notes: Dict[str, int] = {}
    by_job: Dict[str, List[List[str]]] = {}
    for ln in lines[start + 2 : end]:
        cells = _cells(ln)
        by_job.setdefault(cells[0], []).append(cells)
    out: List[str] = []
    for job, rows in by_job.items():
        used: List[str] = []
        body = []
        for cells in rows:
            text = cells[status]
            if text != "ok":
                kind, _, why = text.partition(": ")
                if why:
                    if why not in notes:
                        notes[why] = len(notes) + 1
                    if why not in used:
                        used.append(why)
                    text = f"{kind.strip('*')} ({notes[why]})"
            body.append(cells[1:status] + [text] + cells[status + 1 :])
        out.append(f"Job **{job}**:")
        out.append("")
        out.append("| " + " | ".join(header[1:]) + " |")
        out.append("| " + " | ".join(align[1:]) + " |")
        out.extend("| " + " | ".join(c) + " |" for c in body)
        if used:
            out.append("")
            out.extend(f"* ({notes[w]}) {w}" for w in used)
        out.append("")
    return "\n".join([*lines[:start], *out[:-1], *lines[end:]])


def _cells(line: str) -> List[str]:
    """The cells of a markdown table row (escaped pipes kept in their cell)."""
    inner = line.strip()[1:-1]
    return [c.strip() for c in re.split(r"(?<!\\)\|", inner)]


# --- which method, when: the LDS and the verdicts (docs/which-method.md) ------

LDS = NB + "lds.json"
LDS_COMMAND = (
    "python -m pydvl_datainf.experiments.lds --mode full --setup {} "
    "--out notebooks/results/lds.json"
)
LDS_SETUPS = ("classifier", "causal_lm")
LDS_LABELS = {**INFLUENTIAL_LABELS, "tracin": "TracIn"}
LDS_SCOPES = {"answer": "answer", "text": "whole text", "prompt": "prompt"}


def _lds_setup_label(r: Dict[str, Any]) -> str:
    c = r["config"]
    if r["setup"] == "classifier":
        data = DATASET_LABELS.get(c["dataset"], c["dataset"])
        return (
            f"{c['model']} + LoRA r={c['rank']}, {data} ({c['n_train']} training "
            f"and {c['n_test']} test texts)"
        )
    return (
        f"{c['model']} + LoRA r={c['rank']}, {c['task']} ({c['classes']} classes, "
        f"{c['n_train']} training and {c['n_test']} test examples, training "
        f"loss on the {LDS_SCOPES.get(c['train_scope'], c['train_scope'])}, test "
        f"loss on the {LDS_SCOPES.get(c['test_scope'], c['test_scope'])})"
    )


def _ci(lo: float, hi: float) -> str:
    return f"[{lo:.3f}, {hi:.3f}]"


def _lds_groups(methods: Dict[str, Any]) -> Tuple[List[str], List[str], List[str]]:
    """Methods above, level with, and below DataInf (paired 95% intervals)."""
    above, level, below = [], [], []
    for m, v in methods.items():
        if m == "datainf":
            continue
        lo, hi = v["difference_ci"]
        (above if lo > 0 else below if hi < 0 else level).append(m)
    return above, level, below


def _lds_setup(res: Results, setup: str) -> Optional[Dict[str, Any]]:
    if not res.exists(LDS):
        return None
    return res.json(LDS).get("setups", {}).get(setup)


def _lds_table(res: Results) -> str:
    out = []
    for setup in LDS_SETUPS:
        r = _lds_setup(res, setup)
        if r is None:
            out.append(
                f"*Not in the repository yet, so not shown: the {setup} setup. To "
                f"measure it, run `{LDS_COMMAND.format(setup)}` and "
                "`python benchmarks/docs_tables.py --write`.*"
            )
            continue
        ms = r["methods"]
        best = max(v["lds"] for v in ms.values())
        rows = []
        for m, v in ms.items():
            diff = (
                "—"
                if m == "datainf"
                else f"{v['difference']:+.3f} {_ci(*v['difference_ci'])}"
            )
            rows.append(
                [
                    LDS_LABELS.get(m, m),
                    bold(f3(v["lds"]), f3(v["lds"]) == f3(best)),
                    _ci(*v["ci"]),
                    diff,
                ]
            )
        above, level, below = _lds_groups(ms)
        d = ms["datainf"]
        rank = 1 + sum(v["lds"] > d["lds"] for v in ms.values())
        names = {
            k: [LDS_LABELS.get(m, m) for m in g]
            for k, g in (("above", above), ("level", level), ("below", below))
        }
        parts = [f"DataInf's LDS {f3(d['lds'])} ranks {rank} of {len(ms)}"]
        if names["above"]:
            parts.append(f"clearly below {_listing(names['above'])}")
        if names["level"]:
            parts.append(f"level with {_listing(names['level'])}")
        if names["below"]:
            parts.append(f"clearly above {_listing(names['below'])}")
        c, metric, q = r["config"], r["metric"], r["quality"]
        quality = (
            f"test accuracy {f3(q['test_accuracy'])}, "
            if "test_accuracy" in q
            else f"exact match on the test prompts {f3(q['test_exact'])}, "
        ) + (
            f"mean test loss {f3(q['test_loss'])}, against "
            f"{f3(q['subset_test_loss'])} for the models retrained on the subsets"
        )
        out.append(
            f"**{_lds_setup_label(r)}**: {metric['n_subsets']} subsets of "
            f"{metric['subset_size']}, {c['epochs']} epochs (batch {c['batch_size']}, "
            f"learning rate {c['lr']:g}) on each; the model fine-tuned on the whole "
            f"set ({quality}) gives the scores; TracIn over "
            f"{len(c['checkpoints'])} checkpoints. The whole run took "
            f"{r['seconds']['total']['cpu'] / 60:.0f} minutes of CPU time."
        )
        out.append(
            table(
                [
                    "method",
                    "LDS",
                    "95% interval",
                    "minus DataInf (95% interval)",
                ],
                rows,
                "lrrr",
            )
        )
        out.append("* " + "; ".join(parts) + ".")
    boot = None
    for setup in LDS_SETUPS:
        r = _lds_setup(res, setup)
        if r is not None:
            boot = r["metric"]["bootstrap"]
    if boot is not None:
        out.insert(
            0,
            "LDS: the Spearman correlation, across the retrained subsets, between "
            "each test point's predicted loss (minus the sum of its scores over "
            "the subset) and its actual loss, averaged over the test points; "
            f"best per setup in bold. Intervals: percentile bootstrap over "
            f"{boot['over']} ({boot['resamples']} resamples), paired for the "
            "difference to DataInf.",
        )
        out.append(source(LDS, command=LDS_COMMAND.format("SETUP")))
    return "\n\n".join(out)


register("lds")(_lds_table)
TABLE_PAGES["lds"] = "which-method.md"


def _mislabel_standing(
    doc: Dict[str, Any], dataset: str
) -> Tuple[Dict[str, float], List[str], List[str], List[str]]:
    """Mean AUC per method; methods above, level with, below DataInf.

    Paired over seeds: a method is above (below) DataInf when the 95%
    t-interval of the mean of its per-seed AUC differences lies above
    (below) 0.
    """
    runs = [r for r in _mislabel_main(doc) if r["dataset"] == dataset]
    by: Dict[str, Dict[int, float]] = {}
    for r in runs:
        by.setdefault(r["method"], {})[r["seed"]] = float(r["auc"])
    ours = by["DataInf"]
    means = {m: statistics.fmean(v.values()) for m, v in by.items()}
    above, level, below = [], [], []
    for m, v in by.items():
        if m == "DataInf":
            continue
        diffs = [v[s] - ours[s] for s in ours]
        mean, std = _stats(diffs)
        half = student_t.ppf(0.975, len(diffs) - 1) * std / math.sqrt(len(diffs))
        (above if mean - half > 0 else below if mean + half < 0 else level).append(m)
    return means, above, level, below


def _standing(above: Sequence[str], level: Sequence[str], below: Sequence[str]) -> str:
    """The verdict, in bold, then who is ahead of, level with and behind DataInf."""
    verdict = "loses" if above else "ties" if level else "wins"
    parts = [
        f"{what} {_listing(list(names))}"
        for what, names in (
            ("behind", above),
            ("level with", level),
            ("ahead of", below),
        )
        if names
    ]
    return f"**{verdict}**: " + "; ".join(parts)


CLASS_SCOPES = {
    "prompt": "gradients on the prompt, the paper's scope",
    "answer": "gradients on the answer",
    "target": "loss on the completion",
    "sequence": "loss on the whole text",
}
"""The class-detection runs the summary shows, by gradient scope or loss."""

CLASS_FILES = (INFLUENTIAL, NB + "influential_data_full_finetune.json")
"""The class-detection results the summary reads, those that exist."""


def _class_detection(
    res: Results,
) -> List[Tuple[str, Dict[str, Dict[str, Any]], Optional[int]]]:
    """`(label, {method: metrics}, test prompts)` of every class-detection run.

    Reads both forms of the tutorial's results: runs of the paper's
    fine-tune with several gradient scopes on one adapter (`runs`), and runs
    of a full fine-tune, one per task and loss (`tasks`).
    """
    out: List[Tuple[str, Dict[str, Dict[str, Any]], Optional[int]]] = []
    for name in CLASS_FILES:
        if not res.exists(name):
            continue
        doc = res.json(name)
        for r in doc.get("runs", []):
            cfg = r.get("config", {})
            n = cfg.get("classes", 0) * cfg.get("n_test_per_class", 0) or None
            for scope, what in CLASS_SCOPES.items():
                if scope in r.get("scopes", {}):
                    label = f"{r['task']} (paper's fine-tune, {what})"
                    out.append((label, r["scopes"][scope]["methods"], n))
        for t in doc.get("tasks", []):
            what = CLASS_SCOPES[t["config"]["loss_on"]]
            out.append((f"{t['task']} (full fine-tune, {what})", t["methods"], None))
    return out


def _class_standing(
    ms: Dict[str, Dict[str, Any]], n_test: Optional[int]
) -> Tuple[List[str], List[str], List[str]]:
    """Methods above, level with and below DataInf in class-match AUC."""
    ours = ms["datainf"]
    above, level, below = [], [], []
    for m in sorted(ms, key=lambda m: -ms[m]["auc"]):
        if m == "datainf":
            continue
        v = ms[m]
        if n_test and "auc_std" in v and "auc_std" in ours:
            diff = v["auc"] - ours["auc"]
            half = 2 * math.hypot(v["auc_std"], ours["auc_std"]) / math.sqrt(n_test)
        else:
            diff, half = float(f3(v["auc"])) - float(f3(ours["auc"])), 0.0
        (above if diff > half else below if diff < -half else level).append(m)
    return above, level, below


@dataclass(frozen=True)
class Standing:
    """DataInf on one benchmark: its value, the best method's, who is ahead."""

    benchmark: str
    measures: str
    datainf: float
    best: str
    best_value: float
    above: Tuple[str, ...]
    level: Tuple[str, ...]
    below: Tuple[str, ...]

    @property
    def verdict(self) -> str:
        """`loses`, `ties` or `wins`."""
        return "loses" if self.above else "ties" if self.level else "wins"


def standings(res: Results) -> List[Standing]:
    """DataInf's standing on every benchmark of the summary, in table order."""
    out: List[Standing] = []
    for setup in LDS_SETUPS:
        r = _lds_setup(res, setup)
        if r is None:
            continue
        ms = r["methods"]
        best = max(ms, key=lambda m: ms[m]["lds"])
        groups = [tuple(LDS_LABELS[m] for m in g) for g in _lds_groups(ms)]
        out.append(
            Standing(
                f"LDS, {_lds_setup_label(r)}",
                "predicts the test losses of retrained models",
                ms["datainf"]["lds"],
                LDS_LABELS[best],
                ms[best]["lds"],
                *groups,
            )
        )
    doc = res.json(MISLABEL)
    for ds in doc["config"]["datasets"]:
        means, above, level, below = _mislabel_standing(doc, ds)
        best = max(means, key=lambda m: means[m])
        out.append(
            Standing(
                f"Mislabel detection, {DATASET_LABELS.get(ds, ds)}",
                "finds flipped labels (AUC)",
                means["DataInf"],
                best,
                means[best],
                tuple(above),
                tuple(level),
                tuple(below),
            )
        )
    for label, ms, n_test in _class_detection(res):
        best = max(ms, key=lambda m: ms[m]["auc"])
        groups = [
            tuple(INFLUENTIAL_LABELS.get(m, m) for m in g)
            for g in _class_standing(ms, n_test)
        ]
        out.append(
            Standing(
                f"Class detection, {label}",
                "ranks same-class examples first (AUC)",
                ms["datainf"]["auc"],
                INFLUENTIAL_LABELS.get(best, best),
                ms[best]["auc"],
                *groups,
            )
        )
    return out


def _which_method(res: Results) -> str:
    found = standings(res)
    rows = [
        [
            s.benchmark,
            s.measures,
            f3(s.datainf),
            f"{s.best} ({f3(s.best_value)})",
            _standing(s.above, s.level, s.below),
        ]
        for s in found
    ]
    verdicts = [
        f"* DataInf **{verdict}** on "
        + (
            f"{len(hits)} of the {len(found)} benchmarks: "
            + "; ".join(s.benchmark for s in hits)
            + "."
            if hits
            else f"none of the {len(found)} benchmarks."
        )
        for verdict in ("wins", "ties", "loses")
        for hits in [[s for s in found if s.verdict == verdict]]
    ]
    note = (
        "DataInf against the other methods of each benchmark. **loses**: some "
        "method is clearly ahead of DataInf; **ties**: none is clearly ahead, "
        "some are level with it (their difference to DataInf is within the "
        "noise); **wins**: every other method is clearly behind. Clearly means: for the LDS, the paired 95% "
        "bootstrap interval of the difference excludes 0; for mislabel "
        "detection, the 95% t-interval of the mean per-seed AUC difference "
        "excludes 0; for class detection, the difference of the mean "
        "AUCs over the test prompts is more than two standard errors from 0 "
        "(unpaired; where a run recorded no spread, only values equal to three "
        "decimals count as ties)."
    )
    return "\n\n".join(
        [
            note,
            table(
                [
                    "benchmark",
                    "what it measures",
                    "DataInf",
                    "best",
                    "DataInf's standing",
                ],
                rows,
                "llrll",
            ),
            "\n".join(verdicts),
            source(LDS, MISLABEL, *(n for n in CLASS_FILES if res.exists(n))),
        ]
    )


register("which-method")(_which_method)
TABLE_PAGES["which-method"] = "which-method.md"


# --- figures quoted in the prose ----------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A figure quoted in the page's prose and how a results file gives it.

    `quote` must appear in the page verbatim, and `value(results)` must be a
    substring of `quote`.
    """

    quote: str
    file: str
    value: Callable[[Results], str]


def _total(name: str, job: str, tool: str) -> Callable[[Results], float]:
    return lambda res: float(res.peer(name, job, tool)["total_s"])


def _peer(name: str, job: str, tool: str, key: str) -> Callable[[Results], float]:
    return lambda res: float(res.peer(name, job, tool)[key])


def _speedup_ab(res: Results) -> float:
    return _total("peers_ab/peers.csv", "a", "pydvl-ihm-calc")(res) / _total(
        "peers_ab/peers.csv", "a", "ours-calc"
    )(res)


def _one_lambda_spread(res: Results) -> float:
    """The largest ratio of the run times of "ours" and "ours, one λ" (same code)."""
    out = 0.0
    for job in ("a", "b", "c"):
        a = _total("peers.csv", job, "ours")(res)
        b = _total("peers.csv", job, "ours-scalar")(res)
        out = max(out, a / b, b / a)
    return out


def _auc_standard_error(res: Results) -> float:
    """Hanley and McNeil's standard error of kronfluence's AUC on job (c)."""
    area = float(res.peer("peers.csv", "c", "kronfluence")["auc"])
    flipped, clean = 128, 512  # 20% of the 640 training texts of job (c)
    q1, q2 = area / (2 - area), 2 * area**2 / (1 + area)
    var = (
        area * (1 - area)
        + (flipped - 1) * (q1 - area**2)
        + (clean - 1) * (q2 - area**2)
    ) / (flipped * clean)
    return math.sqrt(var)


def _fit(key: str, field: str) -> Callable[[Results], float]:
    return lambda res: float(res.json("bench_fit.json")[key][field])


def _precision_ratio(res: Results, dtype: str, key: str) -> float:
    """`key` of the LoRA-MLP in `dtype` over the same in float32."""
    r = res.json(FIT_PRECISION)
    return float(r[f"lora_mlp_hooks_{dtype}"][key]) / float(
        r["lora_mlp_hooks_float32"][key]
    )


GEMM = "gemm_cpu.json"
MINILM_N = 256  # the training samples of the MiniLM job of bench_fit.py
SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")


def _gemm(res: Results, key: str) -> Any:
    return res.json(GEMM)["gemm"][key]


def _matrix_flops(res: Results) -> float:
    """The GEMM flops of a 10,000 × 1,000,000 matrix for the model of gemm_cpu.json."""
    return 6 * 1e4 * 1e6 * float(_gemm(res, "p"))


def _matrix_seconds(res: Results) -> float:
    return _matrix_flops(res) / (float(_gemm(res, "gflops")) * 1e9)


def _split_e(v: float) -> Tuple[float, int]:
    exp = math.floor(math.log10(v))
    mant = round(v / 10**exp, 1)
    if mant >= 10:
        mant, exp = mant / 10, exp + 1
    return mant, exp


def _latex_e(v: float) -> str:
    mant, exp = _split_e(v)
    return f"{mant:.1f} \\cdot 10^{{{exp}}}"


def _unicode_e(v: float) -> str:
    mant, exp = _split_e(v)
    return f"{mant:.1f} · 10{str(exp).translate(SUPERSCRIPT)}"


def _fmt(
    get: Callable[[Results], float], fmt: Callable[[float], str]
) -> Callable[[Results], str]:
    return lambda res: fmt(get(res))


def _div(
    a: Callable[[Results], float], b: Callable[[Results], float]
) -> Callable[[Results], float]:
    return lambda res: a(res) / b(res)


def _sub(
    a: Callable[[Results], float], b: Callable[[Results], float]
) -> Callable[[Results], float]:
    return lambda res: a(res) - b(res)


P, PAB, FIT = "peers.csv", "peers_ab/peers.csv", "bench_fit.json"

CLAIMS: List[Claim] = [
    # core model
    Claim(
        "fit` takes 2.78× a plain epoch",
        "bench_mlp_matrix.txt",
        lambda r: ratio(r.json("bench_mlp_matrix.txt")["fit_over_floor"]),
    ),
    # per-sample gradients and fit
    Claim(
        "from 1.50× to 1.73×",
        FIT,
        lambda r: f"to {max(r.json(FIT)['lora_mlp_hooks']['ratios']):.2f}×",
    ),
    Claim(
        "from 1.50× to 1.73×",
        FIT,
        lambda r: f"from {min(r.json(FIT)['lora_mlp_hooks']['ratios']):.2f}×",
    ),
    Claim(
        "36.9 MiB for",
        FIT,
        _fmt(_fit("lora_mlp_hooks", "cache_mib"), lambda v: f"{v:.1f} MiB"),
    ),
    Claim(
        "(289 MiB dense)",
        FIT,
        _fmt(_fit("lora_mlp_hooks_dense_cache", "cache_mib"), lambda v: f"{v:.0f} MiB"),
    ),
    Claim(
        "72.4 MiB for MiniLM",
        FIT,
        _fmt(_fit("minilm_lora_hooks", "cache_mib"), lambda v: f"{v:.1f} MiB"),
    ),
    Claim(
        "`fit` takes 0.98× the floor",
        FIT,
        _fmt(_fit("minilm_lora_hooks", "ratio"), lambda v: f"takes {ratio(v)} the"),
    ),
    # peers, after the factored cache
    Claim(
        "takes **45×** as long as ours on (a)",
        PAB,
        _fmt(_speedup_ab, lambda v: f"**{v:.0f}×**"),
    ),
    Claim(
        "(11.0 s against 0.24 s)",
        PAB,
        _fmt(_total(PAB, "a", "pydvl-ihm-calc"), lambda v: f"({sec(v)} s"),
    ),
    Claim(
        "(11.0 s against 0.24 s)",
        PAB,
        _fmt(_total(PAB, "a", "ours-calc"), lambda v: f"{sec(v)} s)"),
    ),
    Claim(
        "3.3× (a) and 4.1× (b) slower",
        PAB,
        _fmt(_peer(PAB, "a", "pydvl-ihm", "x_ours"), lambda v: f"{v:.1f}× (a)"),
    ),
    Claim(
        "3.3× (a) and 4.1× (b) slower",
        PAB,
        _fmt(_peer(PAB, "b", "pydvl-ihm", "x_ours"), lambda v: f"{v:.1f}× (b)"),
    ),
    Claim(
        "from 8.75 s in the full run",
        P,
        _fmt(_total(P, "b", "ours"), lambda v: f"{sec(v)} s"),
    ),
    Claim(
        "to 0.82 s (`fit` 0.19 s)",
        PAB,
        _fmt(_total(PAB, "b", "ours"), lambda v: f"to {sec(v)} s"),
    ),
    Claim(
        "to 0.82 s (`fit` 0.19 s)",
        PAB,
        _fmt(_peer(PAB, "b", "ours", "fit_s"), lambda v: f"`fit` {sec(v)} s"),
    ),
    # the full run
    Claim("differ by up to 2.85×", P, _fmt(_one_lambda_spread, lambda v: f"{v:.2f}×")),
    Claim(
        "(a) 0.60 s against", P, _fmt(_total(P, "a", "ours"), lambda v: f"{sec(v)} s")
    ),
    Claim(
        "pyDVL's IHM 0.78 s",
        P,
        _fmt(_total(P, "a", "pydvl-ihm"), lambda v: f"{sec(v)} s"),
    ),
    Claim(
        "and dattri 20.3 s;", P, _fmt(_total(P, "a", "dattri"), lambda v: f"{sec(v)} s")
    ),
    Claim(
        "(b) 8.75 s (3.07 s with one λ)",
        P,
        _fmt(_total(P, "b", "ours-scalar"), lambda v: f"{sec(v)} s with"),
    ),
    Claim(
        "against pyDVL's 19.2 s and dattri's 59.8 s",
        P,
        _fmt(_total(P, "b", "pydvl-ihm"), lambda v: f"{sec(v)} s and"),
    ),
    Claim(
        "against pyDVL's 19.2 s and dattri's 59.8 s",
        P,
        _fmt(_total(P, "b", "dattri"), lambda v: f"{sec(v)} s"),
    ),
    Claim(
        "kronfluence's EK-FAC took 4.39 s",
        P,
        _fmt(_total(P, "b", "kronfluence"), lambda v: f"{sec(v)} s"),
    ),
    Claim(
        "4.39 s, half of ours",
        P,
        lambda r: (
            "half"
            if abs(_total(P, "b", "kronfluence")(r) / _total(P, "b", "ours")(r) - 0.5)
            < 0.05
            else "not half"
        ),
    ),
    Claim(
        "dattri's agree with ours to within 4e-7",
        P,
        lambda r: (
            "4e-7"
            if max(
                float(r.peer(P, j, "dattri")["rel_err_same_lambda"]) for j in ("a", "b")
            )
            < 4e-7
            else "more than 4e-7"
        ),
    ),
    Claim(
        "21.6 s / 0.85 s = 25×",
        P,
        _fmt(
            _div(_total(P, "a", "pydvl-ihm-calc"), _total(P, "a", "ours-calc")),
            lambda v: f"= {v:.0f}×",
        ),
    ),
    Claim(
        "21.6 s / 0.85 s = 25×",
        P,
        _fmt(_total(P, "a", "pydvl-ihm-calc"), lambda v: f"{sec(v)} s /"),
    ),
    Claim(
        "21.6 s / 0.85 s = 25×",
        P,
        _fmt(_total(P, "a", "ours-calc"), lambda v: f"/ {sec(v)} s"),
    ),
    Claim(
        "25× in this run (45× in the rerun above)",
        PAB,
        _fmt(_speedup_ab, lambda v: f"({v:.0f}×"),
    ),
    Claim("pyDVL's EK-FAC (0.940)", P, _fmt(_peer(P, "b", "pydvl-ekfac", "auc"), f3)),
    Claim(
        "pyDVL's LiSSA on (a) (0.706)",
        P,
        _fmt(_peer(P, "a", "pydvl-lissa", "pearson"), f3),
    ),
    Claim(
        "0.767–0.799 on (c)",
        P,
        _fmt(_peer(P, "c", "ours", "auc"), lambda v: f"{f3(v)}–"),
    ),
    Claim(
        "0.767–0.799 on (c)",
        P,
        _fmt(_peer(P, "c", "ours-scalar", "auc"), lambda v: f"–{f3(v)}"),
    ),
    Claim(
        "is 36× faster than",
        P,
        _fmt(
            _div(_total(P, "a", "pydvl-ihm-calc"), _total(P, "a", "ours")),
            lambda v: f"{v:.0f}×",
        ),
    ),
    Claim(
        "ours is only 1.3× faster",
        P,
        _fmt(
            _div(_total(P, "a", "pydvl-ihm"), _total(P, "a", "ours")),
            lambda v: f"{v:.1f}×",
        ),
    ),
    Claim(
        "5–6% off the formula",
        P,
        _fmt(
            _peer(P, "a", "pydvl-ihm", "rel_err_same_lambda"),
            lambda v: f"{100 * v:.0f}–",
        ),
    ),
    Claim(
        "5–6% off the formula",
        P,
        _fmt(
            _peer(P, "b", "pydvl-ihm", "rel_err_same_lambda"),
            lambda v: f"–{100 * v:.0f}%",
        ),
    ),
    Claim(
        "best AUC on (c) is kronfluence's 0.803",
        P,
        _fmt(_peer(P, "c", "kronfluence", "auc"), f3),
    ),
    Claim(
        "ours scores 0.767 with the paper's", P, _fmt(_peer(P, "c", "ours", "auc"), f3)
    ),
    Claim(
        "and 0.799 with the one-block λ",
        P,
        _fmt(_peer(P, "c", "ours-scalar", "auc"), f3),
    ),
    Claim("about 0.025 (Hanley", P, _fmt(_auc_standard_error, lambda v: f"{v:.3f}")),
    Claim(
        "the exact inverse itself scores 0.709",
        P,
        _fmt(_peer(P, "c", "exact", "auc"), f3),
    ),
    Claim(
        "(r = 0.43–0.79)",
        P,
        _fmt(_peer(P, "c", "kronfluence", "pearson"), lambda v: f"{v:.2f}–"),
    ),
    Claim(
        "(r = 0.43–0.79)",
        P,
        _fmt(_peer(P, "a", "kronfluence", "pearson"), lambda v: f"–{v:.2f}"),
    ),
    Claim(
        "(r = 0.20–0.52)",
        P,
        _fmt(_peer(P, "b", "ours", "pearson"), lambda v: f"{v:.2f}–"),
    ),
    Claim(
        "(r = 0.20–0.52)",
        P,
        _fmt(_peer(P, "a", "ours", "pearson"), lambda v: f"–{v:.2f}"),
    ),
    Claim(
        "(AUC 0.929–0.967 on (b)",
        P,
        _fmt(_peer(P, "b", "ours", "auc"), lambda v: f"{f3(v)}–"),
    ),
    Claim(
        "(AUC 0.929–0.967 on (b)",
        P,
        _fmt(_peer(P, "b", "ours-scalar", "auc"), lambda v: f"–{f3(v)}"),
    ),
    Claim(
        "the exact inverse (0.755 and 0.709)",
        P,
        _fmt(_peer(P, "b", "exact", "auc"), f3),
    ),
    Claim(
        "Arnoldi takes 49.1 s and has the best AUC there, 0.979",
        P,
        _fmt(_total(P, "b", "pydvl-arnoldi"), lambda v: f"{sec(v)} s"),
    ),
    Claim(
        "Arnoldi takes 49.1 s and has the best AUC there, 0.979",
        P,
        _fmt(_peer(P, "b", "pydvl-arnoldi", "auc"), f3),
    ),
    Claim(
        "(it caches nothing, and is 1.3–2.2× slower)",
        P,
        _fmt(_peer(P, "a", "pydvl-ihm", "x_ours"), lambda v: f"{v:.1f}–"),
    ),
    Claim(
        "(it caches nothing, and is 1.3–2.2× slower)",
        P,
        _fmt(_peer(P, "b", "pydvl-ihm", "x_ours"), lambda v: f"–{v:.1f}×"),
    ),
    Claim(
        "Δ = 345 MiB on (b) in the full run",
        P,
        _fmt(_peer(P, "b", "ours", "delta_mb"), lambda v: f"{v:.0f} MiB"),
    ),
    Claim(
        "172 MiB with the factored cache",
        PAB,
        _fmt(_peer(PAB, "b", "ours", "delta_mb"), lambda v: f"{v:.0f} MiB"),
    ),
    Claim(
        "(Δ 1,178–1,351 MiB",
        P,
        _fmt(_peer(P, "a", "dattri", "delta_mb"), lambda v: f"{v:,.0f}–"),
    ),
    Claim(
        "(Δ 1,178–1,351 MiB",
        P,
        _fmt(_peer(P, "b", "dattri", "delta_mb"), lambda v: f"–{v:,.0f} MiB"),
    ),
    Claim(
        "20–81× slower than ours on (a)",
        P,
        _fmt(_peer(P, "a", "pydvl-arnoldi", "x_ours"), lambda v: f"{v:.0f}–"),
    ),
    Claim(
        "20–81× slower than ours on (a)",
        P,
        _fmt(_peer(P, "a", "pydvl-lissa", "x_ours"), lambda v: f"–{v:.0f}×"),
    ),
    # out of core
    Claim(
        "takes 0.60 of the float32 store's disk",
        PRECISION,
        lambda r: (
            f"{r.json(PRECISION)['result']['float16']['disk_gb'] / r.json(PRECISION)['result']['float32_disk_gb']:.2f}"
        ),
    ),
    # layers without a rule
    Claim(
        "LoRA-MLP (1.58× above)",
        FIT,
        _fmt(_fit("lora_mlp_hooks", "ratio"), lambda v: f"({ratio(v)} above)"),
    ),
    Claim(
        "its `fit` takes 1.66× a plain epoch",
        CUSTOM_LORA,
        lambda r: ratio(r.json(CUSTOM_LORA)["custom_lora_mlp_hooks"]["ratio"]),
    ),
    # half precision
    Claim(
        "(median of 3 per-round ratios",
        FIT_PRECISION,
        lambda r: (
            f"median of {len(r.json(FIT_PRECISION)['lora_mlp_hooks_float32']['ratios'])}"
        ),
    ),
    Claim(
        "a bfloat16 epoch takes half the float32 time",
        FIT_PRECISION,
        lambda r: (
            "half"
            if 0.45 <= _precision_ratio(r, "bfloat16", "floor_s") < 0.55
            else f"{_precision_ratio(r, 'bfloat16', 'floor_s'):.2f} of"
        ),
    ),
    Claim(
        "`fit` keeps most of that gain",
        FIT_PRECISION,
        lambda r: (
            "most of that gain"
            if 1 - _precision_ratio(r, "bfloat16", "fit_s")
            > 0.5 * (1 - _precision_ratio(r, "bfloat16", "floor_s"))
            else "less than half of that gain"
        ),
    ),
    Claim(
        "(an epoch takes 5× the float32 one)",
        FIT_PRECISION,
        lambda r: f"{_precision_ratio(r, 'float16', 'floor_s'):.0f}×",
    ),
    # cost model
    Claim(
        "1.58× for the LoRA-MLP and 0.98× for MiniLM above",
        FIT,
        _fmt(_fit("lora_mlp_hooks", "ratio"), lambda v: f"{ratio(v)} for the LoRA-MLP"),
    ),
    Claim(
        "1.58× for the LoRA-MLP and 0.98× for MiniLM above",
        FIT,
        _fmt(_fit("minilm_lora_hooks", "ratio"), lambda v: f"{ratio(v)} for MiniLM"),
    ),
    Claim(
        "gemm_cpu.json`, 2 threads)",
        GEMM,
        lambda r: f"{r.json(GEMM)['machine']['threads']} threads",
    ),
    Claim("(m = 64 test gradients", GEMM, lambda r: f"m = {_gemm(r, 'm')} test"),
    Claim(
        "a chunk of 4,096 rows, p = 296,450) run at 23.1 GFLOPS",
        GEMM,
        lambda r: f"a chunk of {_gemm(r, 'rows'):,} rows",
    ),
    Claim(
        "a chunk of 4,096 rows, p = 296,450) run at 23.1 GFLOPS",
        GEMM,
        lambda r: f"p = {_gemm(r, 'p'):,})",
    ),
    Claim(
        "a chunk of 4,096 rows, p = 296,450) run at 23.1 GFLOPS",
        GEMM,
        lambda r: f"{_gemm(r, 'gflops'):.1f} GFLOPS",
    ),
    Claim(
        "\\cdot 296{,}450 = 1.8 \\cdot 10^{16}$ flops",
        GEMM,
        lambda r: f"{_gemm(r, 'p'):,}".replace(",", "{,}") + " = ",
    ),
    Claim(
        "\\cdot 296{,}450 = 1.8 \\cdot 10^{16}$ flops",
        GEMM,
        lambda r: f"= {_latex_e(_matrix_flops(r))}$ flops",
    ),
    Claim(
        "at 23.1 GFLOPS that is 7.7 · 10⁵ s (214 hours)",
        GEMM,
        lambda r: f"at {_gemm(r, 'gflops'):.1f} GFLOPS",
    ),
    Claim(
        "at 23.1 GFLOPS that is 7.7 · 10⁵ s (214 hours)",
        GEMM,
        lambda r: (
            f"{_unicode_e(_matrix_seconds(r))} s ({_matrix_seconds(r) / 3600:.0f} hours)"
        ),
    ),
    Claim(
        "$10^6 \\times 296{,}450 \\times 4$ bytes = 1.19 TB (0.59 TB in bfloat16)",
        GEMM,
        lambda r: (
            f"{_gemm(r, 'p'):,}".replace(",", "{,}")
            + f" \\times 4$ bytes = {1e6 * _gemm(r, 'p') * 4 / 1e12:.2f} TB "
            f"({1e6 * _gemm(r, 'p') * 2 / 1e12:.2f} TB in bfloat16)"
        ),
    ),
    Claim(
        "256 / 5.13 s = 50 samples per second",
        FIT,
        lambda r: (
            f"{MINILM_N} / {_fit('minilm_lora_hooks', 'fit_s')(r):.2f} s = "
            f"{MINILM_N / _fit('minilm_lora_hooks', 'fit_s')(r):.0f} samples"
        ),
    ),
]


# --- the tables of the "Scaling to LLMs" page (docs/scaling-llms.md) ----------

TABLE_PAGES.update(
    dict.fromkeys(
        [
            "jl-measured",
            "jl-dimension",
            "token-projection",
            "mips-index",
            "llm-cost",
            "llm-cost-inputs",
        ],
        "scaling-llms.md",
    )
)
JL = "index/jl.json"
JL_COMMAND = "python benchmarks/bench_jl.py --out benchmarks/results/index/jl.json"
INDEX_1M = "index/index-1m.json"
INDEX_COMMAND = (
    "python benchmarks/bench_index.py --out benchmarks/results/index/index-1m.json"
)
PROJ = {
    "index/projection-lora.json": "python benchmarks/bench_projection.py --threads 1 "
    "--out benchmarks/results/index/projection-lora.json",
    "index/projection-full.json": "python benchmarks/bench_projection.py --threads 1 "
    "--full --out benchmarks/results/index/projection-full.json",
}
LLM_COST = "index/llm-cost.json"
LLM_COST_COMMAND = (
    "python benchmarks/cost_llm.py --out benchmarks/results/index/llm-cost.json"
)


def _ms(v: float) -> str:
    return f"{1000 * v:.1f} ms" if v < 1 else f"{v:.2f} s"


def _duration(v: float) -> str:
    if v < 120:
        return f"{v:.1f} s"
    if v < 7200:
        return f"{v / 60:.1f} min"
    return f"{v / 3600:.1f} h"


@register("jl-measured")
def _jl_measured(res: Results) -> str:
    r = res.json(JL)
    rows = [
        [
            str(x["k"]),
            x["kind"],
            f"{x['median_error']:.3f}",
            f"{x['p99_error']:.3f}",
            f"{x['max_error']:.3f}",
            "—" if x["bound_epsilon"] is None else f"{x['bound_epsilon']:.3f}",
        ]
        for x in r["measured"]
    ]
    return "\n\n".join(
        [
            f"Relative inner-product error $|Pu\\cdot Pv - u\\cdot v| / "
            f"(\\lVert u\\rVert\\lVert v\\rVert)$ over {r['pairs']:,} pairs in "
            f"dimension {r['dim']:,}; the bound's $\\varepsilon$ for the same $k$, "
            f"{r['pairs']:,} pairs and $\\delta = {r['delta']}$ (— where it gives "
            "none below 1, and for the Kronecker kind, which it does not cover).",
            table(
                ["k", "projection", "median", "99th percentile", "largest", "bound ε"],
                rows,
                "rlrrrr",
            ),
            source(JL, command=JL_COMMAND),
        ]
    )


@register("jl-dimension")
def _jl_dimension(res: Results) -> str:
    r = res.json(JL)
    pairs = sorted({x["pairs"] for x in r["dimension_table"]})
    eps = sorted({x["epsilon"] for x in r["dimension_table"]})
    k = {(x["epsilon"], x["pairs"]): x["k"] for x in r["dimension_table"]}
    rows = [[f"{e:g}"] + [f"{k[e, m]:,}" for m in pairs] for e in eps]
    return "\n\n".join(
        [
            table(
                ["ε"] + [f"{m:,} pair{'s' if m != 1 else ''}" for m in pairs],
                rows,
                "l" + "r" * len(pairs),
            ),
            source(JL, command=JL_COMMAND),
        ]
    )


@register("token-projection")
def _token_projection(res: Results) -> str:
    rows = []
    stored = [n for n in PROJ if res.exists(n)]
    for name in stored:
        r = res.json(name)
        cpu = r["cpu_seconds"]
        rows.append(
            [
                r["model"],
                f"{r['trainable_parameters']:,} → {r['projected_floats_per_sample']:,}",
                f"{cpu['floor']:.2f} s",
                f"{cpu['dense']:.2f} s ({ratio(r['cpu_ratio_to_floor']['dense'])})",
                f"{cpu['projected']:.2f} s ({ratio(r['cpu_ratio_to_floor']['projected'])})",
            ]
        )
    if not rows:
        name, command = next(iter(PROJ.items()))
        return not_stored(name, command, "the cost of projected per-sample gradients")
    r0 = res.json(stored[0])
    return "\n\n".join(
        [
            f"{r0['samples']} samples, one thread, CPU time (the machine was shared); "
            "in brackets: the ratio to the plain forward+backward.",
            table(
                [
                    "model",
                    "numbers per sample",
                    "plain forward+backward",
                    "dense per-sample gradients",
                    "projected, from per-token factors",
                ],
                rows,
                "lrrrr",
            ),
            source(*stored, command="; ".join(PROJ[n] for n in stored)),
        ]
    )


@register("mips-index")
def _mips_index(res: Results) -> str:
    if not res.exists(INDEX_1M):
        return not_stored(INDEX_1M, INDEX_COMMAND, "the index over 1,000,000 rows")
    r = res.json(INDEX_1M)
    k = r["k"]
    rows = []
    for x in r["runs"]:
        name = x["index"] + (f", nprobe {x['nprobe']}" if x["nprobe"] else "")
        rows.append(
            [
                str(x["dim"]),
                name,
                f"{x['bytes_per_row']:,} B",
                f"{x['build_s']:.0f} s",
                f"{x[f'recall_at_{k}']:.3f}",
                _ms(x["single_query_cpu_s"]),
                _ms(x["batched_per_query_cpu_s"]),
            ]
        )
    load = max(x["load_average"] for x in r["runs"])
    return "\n\n".join(
        [
            f"{r['n']:,} rows, {r['queries']} queries, top-{k}, faiss {r['faiss']}. "
            f"Rows: {r['data']}. Latency per query on one thread, as CPU time "
            f"(the machine was shared: load average up to {load:.0f} on "
            f"{r['machine']['threads']} cores, so wall times were longer); build "
            f"on {r['runs'][0]['build_threads']} threads.",
            table(
                [
                    "dimension",
                    "index",
                    "memory per row",
                    "build",
                    f"recall@{k}",
                    "one query alone",
                    f"in a batch of {r['queries']}",
                ],
                rows,
                "rlrrrrr",
            ),
            source(INDEX_1M, command=INDEX_COMMAND),
        ]
    )


def _fit_basis(r: Dict[str, Any]) -> str:
    """How the cost model's `fit` was estimated."""
    m = r["measured"].get("fit_overhead_measured")
    if m is None:
        return ""
    flops = r["measured"]["fit_overhead_from_flops"]["value"]
    return (
        f" `fit` is the plain forward and backward pass times {1 + m['value']:.2f}: "
        "the ratio measured for the whole of `fit` on SmolLM2-135M on the CPU, "
        f"where the FLOPs predict {1 + flops:.3f} (the projection's share, from "
        "FLOPs, in its own column)."
    )


@register("llm-cost")
def _llm_cost(res: Results) -> str:
    r = res.json(LLM_COST)
    a = r["architecture"]
    rows = [
        [
            f"{x['side']}",
            f"{x['projected_floats_per_sample']:,}",
            f"{x['compression']:,.0f}×",
            f"{x['store_float16_gb']:.2f} GB",
            _duration(x["fit_1gpu_s"]),
            _duration(x["fit_8gpu_s"]),
            f"{100 * x['projection_share_flops']:.2f} %",
            _ms(x["test_gradient_per_sequence_s"]),
            _ms(x["scores_per_query_batch_gpu_s"]),
            _ms(x["scores_per_query_cpu_s"]),
        ]
        for x in r["estimated"]
    ]
    e0 = r["estimated"][0]
    return "\n\n".join(
        [
            f"{r['job']}: {a['trainable']:,} trainable parameters in {a['blocks']} "
            f"blocks; the dense float32 store would hold "
            f"{a['dense_store_float32_gb']:,.0f} GB, and one pass over it from a disk "
            f"reading {r['published']['nvme_read_gb_s']['value']:g} GB/s takes "
            f"{_duration(e0['dense_store_pass_s'])}. All figures below are "
            f"**estimated**.{_fit_basis(r)}",
            table(
                [
                    "side",
                    "numbers per sample",
                    "compression",
                    "store (float16)",
                    "`fit`, 1 H100",
                    "`fit`, 8 H100",
                    "projection's share of `fit` (FLOPs)",
                    "test gradient, per sequence (1 H100)",
                    "scores of a batch of queries, 1 H100",
                    "scores of one query, exact, one CPU thread",
                ],
                rows,
                "rrrrrrrrrr",
            ),
            source(LLM_COST, command=LLM_COST_COMMAND),
        ]
    )


@register("llm-cost-inputs")
def _llm_cost_inputs(res: Results) -> str:
    r = res.json(LLM_COST)
    rows = [
        [
            m["kind"],
            m["what"],
            f"{m['value']:.3g}",
            f"`benchmarks/results/{m['file']}`",
        ]
        for m in r["measured"].values()
    ]
    rows += [
        ["published", p["source"], f"{p['value']:g}", "—"]
        for p in r["published"].values()
    ]
    return "\n\n".join(
        [
            table(["kind", "figure", "value", "file"], rows, "llrl"),
            source(LLM_COST, command=LLM_COST_COMMAND),
        ]
    )


# --- measured error and scale on real models (docs/scaling-llms.md) -------------

ERROR_FILES = {
    "minilm": "compression/minilm.json",
    "smollm2": "compression/smollm2.json",
}
ERROR_COMMAND = (
    "python benchmarks/bench_compression_error.py --model {model} "
    "--out benchmarks/results/compression/{model}.json"
)
LLM_SCALE = "compression/smollm2-scale.json"
LLM_SCALE_COMMAND = (
    "python benchmarks/bench_llm_scale.py --n-train {n} --family {family} "
    "--size {size} --profile-rows {rows} "
    "--out benchmarks/results/compression/smollm2-scale.json"
)
FAMILY_NAMES = {
    "gaussian": "dense Gaussian, k_l per block",
    "kronecker": "Kronecker, `side`",
}
TARGETS = (0.8, 0.9, 0.95)
TABLE_PAGES.update(
    dict.fromkeys(
        [
            "compression-error-minilm",
            "compression-error-smollm2",
            "compression-choice",
            "llm-scale",
            "llm-scale-latency",
            "llm-scale-profile",
        ],
        "scaling-llms.md",
    )
)


def _error_source(model: str) -> str:
    return source(ERROR_FILES[model], command=ERROR_COMMAND.format(model=model))


def _overlap_key(r: Dict[str, Any]) -> str:
    return f"top{r['top']}_overlap"


def _error_table(model: str) -> Callable[[Results], str]:
    def render_table(res: Results) -> str:
        name = ERROR_FILES[model]
        if not res.exists(name):
            return not_stored(
                name, ERROR_COMMAND.format(model=model), f"the error curves of {model}"
            )
        r = res.json(name)
        key = _overlap_key(r)
        rows = []
        for p in sorted(r["points"], key=lambda p: (p["family"], p["k"])):
            bound = p["jl"] and p["jl"]["relative_error_bound"]
            rows.append(
                [
                    f"{p['family']}, {p['size']}",
                    f"{p['k']:,}",
                    f"{r['trainable'] / p['k']:,.0f}×",
                    f"{p['spearman']['mean']:.3f}",
                    f"{p[key]['mean']:.3f} ({p[key]['min']:.2f})",
                    f"{p['relative_error']['mean']:.3f}",
                    "—" if bound is None else f"{bound:,.0f}",
                ]
            )
        check = max(v["relative_difference"] for v in r["verification"])
        rec = r["recipe"]
        return "\n\n".join(
            [
                f"{rec['model']}, LoRA {rec['lora']}; {rec['data']}; fine-tuned: "
                f"{rec['fine_tuning']}. {r['blocks']} blocks, "
                f"{r['trainable']:,} trainable parameters; the uncompressed scores "
                f"({r['n_test']} × {r['n_train']:,}) are the reference. Mean over "
                f"{len(r['seeds'])} seeds of the projection (in brackets: the worst "
                "seed's overlap). Projection: `gaussian, k_l` is one dense Gaussian "
                "matrix of k_l rows per block; `kronecker, side` is "
                "`Compression(side=side)` (a side of at most `side`, such as the "
                "rank side, kept). Bound: the relative error that the "
                "Johnson–Lindenstrauss bound guarantees with probability 0.99 "
                "(dense Gaussian only; — where it guarantees nothing). The same "
                "scores through `DataInfInfluence(compression=...)` (a Zarr store, "
                f"the first {r['verification'][0]['n_train']} rows) differ from these "
                f"by at most {check:.0e} (relative).",
                table(
                    [
                        "projection",
                        "k",
                        "compression",
                        "Spearman",
                        f"top-{r['top']} overlap",
                        "relative error",
                        "bound on the relative error",
                    ],
                    rows,
                    "lrrrrrr",
                ),
                _error_source(model),
            ]
        )

    return render_table


register("compression-error-minilm")(_error_table("minilm"))
register("compression-error-smollm2")(_error_table("smollm2"))


def smallest_k(
    r: Dict[str, Any], family: str, target: float
) -> Optional[Dict[str, Any]]:
    """The point of `family` with the smallest k whose worst seed reaches a
    top-k overlap of `target` (`None` if none in the sweep does)."""
    key = _overlap_key(r)
    ok = [p for p in r["points"] if p["family"] == family and p[key]["min"] >= target]
    return min(ok, key=lambda p: p["k"]) if ok else None


def _choice_cell(r: Dict[str, Any], family: str, target: float) -> str:
    p = smallest_k(r, family, target)
    if p is None:
        return "—"
    return f"{p['k']:,} ({r['trainable'] / p['k']:,.0f}×)"


@register("compression-choice")
def _compression_choice(res: Results) -> str:
    stored = [m for m, n in ERROR_FILES.items() if res.exists(n)]
    if not stored:
        return not_stored(
            ERROR_FILES["smollm2"],
            ERROR_COMMAND.format(model="smollm2"),
            "the error curves",
        )
    rows = []
    top = 100
    for model in stored:
        r = res.json(ERROR_FILES[model])
        top = r["top"]
        for family in FAMILIES_ORDER:
            rows.append(
                [model_name(r), FAMILY_NAMES[family]]
                + [_choice_cell(r, family, t) for t in TARGETS]
            )
    return "\n\n".join(
        [
            f"The smallest measured k whose worst seed reaches the top-{top} "
            "overlap of each column (in brackets: how many times fewer numbers "
            "than the dense gradients; — where no k of the sweep reaches it).",
            table(
                ["model", "projection"] + [f"overlap ≥ {t:g}" for t in TARGETS],
                rows,
                "ll" + "r" * len(TARGETS),
            ),
            source(*(ERROR_FILES[m] for m in stored)),
        ]
    )


FAMILIES_ORDER = ("gaussian", "kronecker")


def model_name(r: Dict[str, Any]) -> str:
    return "MiniLM" if r["model"] == "minilm" else "SmolLM2-135M"


def _scale_command(r: Dict[str, Any]) -> str:
    c = r["compression"]
    return LLM_SCALE_COMMAND.format(
        n=r["n_train"], family=c["family"], size=c["size"], rows=r["profile"]["rows"]
    )


def _scale_intro(r: Dict[str, Any]) -> str:
    c = r["compression"]
    load = r["load_average"][0]
    return (
        f"SmolLM2-135M, LoRA r=8 on q and v ({r['trainable']:,} parameters, "
        f"{r['blocks']} blocks), {r['n_train']:,} sequences of {r['tokens']} tokens, "
        f"batches of {r['batch_size']}; compression: {c['family']}, "
        f"{c['size']} (k = {c['k']:,}); rows stored in {r['store']['dtype']}. "
        f"One process on {r['threads']} CPU thread(s) of a shared machine "
        f"(load average {load:.0f} on {r['cpus']} cores at the end)."
    )


def _fmt_s(t: Dict[str, float]) -> str:
    return f"{_duration(t['wall_s'])} ({_duration(t['cpu_s'])} CPU)"


def _scale_table(
    what: str,
) -> Callable[[Callable[[Dict[str, Any]], str]], Callable[[Results], str]]:
    """A table of the scale results, or a note to run the benchmark."""

    def deco(fn: Callable[[Dict[str, Any]], str]) -> Callable[[Results], str]:
        def render_table(res: Results) -> str:
            if not res.exists(LLM_SCALE):
                command = LLM_SCALE_COMMAND.format(
                    n=1000, family="gaussian", size=17, rows=32
                )
                return not_stored(LLM_SCALE, command, what)
            return fn(res.json(LLM_SCALE))

        return render_table

    return deco


@register("llm-scale")
@_scale_table("the SmolLM2 scale benchmark")
def _llm_scale(r: Dict[str, Any]) -> str:
    s, f, ref = r["store"], r["fit"], r["reference"]
    same = ref["same_rows"]
    key = next(k for k in same if k.endswith("_overlap"))
    rows = [
        [
            "dense float32 store (computed, not written)",
            f"{s['dense_float32_bytes_computed'] / 1e9:.2f} GB",
        ],
        [
            f"compressed store on disk ({s['dtype']}, measured)",
            f"{s['measured_bytes'] / 1e6:.1f} MB: {s['compression']:,.0f}× smaller",
        ],
        ["plain forward+backward epoch", _fmt_s(f["plain_epoch"])],
        [
            "`fit` with compression into the Zarr store",
            f"{_fmt_s(f['fit'])}: {ratio(f['ratio_wall'])} the plain epoch "
            f"({ratio(f['ratio_cpu'])} in CPU time)",
        ],
        [
            f"against the uncompressed scores, first {ref['n']:,} rows, "
            f"{ref['n_test']} test sequences",
            f"Spearman {same['spearman']:.3f}, top-{key[3:-8]} overlap "
            f"{same[key]:.3f}, relative error {same['relative_error']:.3f}",
        ],
    ]
    return "\n\n".join(
        [
            _scale_intro(r),
            table(["figure", "measured"], rows, "lr"),
            source(LLM_SCALE, command=_scale_command(r)),
        ]
    )


@register("llm-scale-latency")
@_scale_table("the SmolLM2 top-k latency")
def _llm_scale_latency(r: Dict[str, Any]) -> str:
    lat = r["latency"]
    top = lat["top"]

    def per(key: str) -> List[str]:
        return [_ms(lat[key]["wall_s"]), _ms(lat[key]["cpu_s"])]

    rows = [
        [
            "test gradient (forward and backward, projected)",
            *per("test_gradients_per_query"),
            "",
        ],
        [
            "search: exact, a pass over the stored rows",
            *per("search_streaming_per_query"),
            "1.000",
        ],
        [
            "search: the k_l × k_l matrices, then an exact flat index",
            _ms(
                lat["curvature_apply_per_query"]["wall_s"]
                + lat["flat_search_per_query"]["wall_s"]
            ),
            _ms(
                lat["curvature_apply_per_query"]["cpu_s"]
                + lat["flat_search_per_query"]["cpu_s"]
            ),
            f"{lat[f'flat_recall_at_{top}']:.3f}",
        ],
    ]
    apply = lat["curvature_apply_per_query"]
    for e in lat["approximate"]:
        what = (
            f"efSearch {e['setting']}"
            if e["kind"] == "hnsw"
            else f"nprobe {e['setting']} of {lat['ivf_nlist']} clusters"
        )
        rows.append(
            [
                f"search: the same, then an {e['kind'].upper()} index, {what}",
                _ms(apply["wall_s"] + e["search_per_query"]["wall_s"]),
                _ms(apply["cpu_s"] + e["search_per_query"]["cpu_s"]),
                f"{e[f'recall_at_{top}']:.3f}",
            ]
        )
    rows += [
        [
            "`top_k(infl, ...)`, end to end (exact, streaming)",
            *per("top_k_streaming_per_query"),
            "",
        ],
        [
            "`top_k(infl, ..., index=True)`, end to end",
            *per("top_k_flat_per_query"),
            "",
        ],
        [
            '`top_k(..., index=IndexOptions(kind="hnsw"))`, end to end',
            *per("top_k_hnsw_per_query"),
            "",
        ],
    ]
    once = [
        [what, _ms(lat[key]["wall_s"]), _ms(lat[key]["cpu_s"])]
        for what, key in (
            ("the k_l × k_l matrices (once per λ)", "curvature_precompute"),
            ("exact flat index build", "flat_build"),
            ("HNSW index build", "hnsw_build"),
            ("IVF index build (k-means)", "ivf_build"),
        )
    ]
    return "\n\n".join(
        [
            f"Top-{top} over the {r['n_train']:,} stored rows, a batch of "
            f"{lat['queries']} test sequences; per query, wall time and CPU time. "
            f"Recall: of the exact top-{top}.",
            table(["step", "per query", "CPU", f"recall@{top}"], rows, "lrrr"),
            table(["done once", "time", "CPU"], once, "lrr"),
            source(LLM_SCALE, command=_scale_command(r)),
        ]
    )


@register("llm-scale-profile")
@_scale_table("where the time of fit goes")
def _llm_scale_profile(r: Dict[str, Any]) -> str:
    p = r["profile"]
    cpu = p["cpu_s"]
    floor = cpu["plain forward+backward"]
    rows = [[name, f"{v:.1f} s", ratio(v / floor)] for name, v in cpu.items()]
    return "\n\n".join(
        [
            f"The pieces of `fit` timed apart on {p['rows']} sequences (CPU time, "
            f"the best of {p['repeats']}); in the last column, the ratio to the "
            "plain forward+backward pass.",
            table(["piece", "CPU time", "ratio"], rows, "lrr"),
            source(LLM_SCALE, command=_scale_command(r)),
        ]
    )


# --- the page ------------------------------------------------------------------


def render(name: str, res: Optional[Results] = None) -> str:
    """The generated text of table `name` (without its markers)."""
    res = res or Results()
    if name == "peers":
        return _peers_full(res)
    if name not in TABLES:
        raise KeyError(
            f"no table named {name!r}; known: {', '.join(sorted(TABLES))}, peers"
        )
    return TABLES[name](res)


def regions(text: str) -> Iterator[re.Match[str]]:
    """The generated regions of a page, the peers table included (named `peers`)."""
    yield from REGION.finditer(text)
    yield from PEERS.finditer(text)


def _name(m: re.Match[str]) -> str:
    return m.groupdict().get("name") or "peers"


def update(text: str, res: Optional[Results] = None) -> str:
    """`text` with every generated region rendered afresh."""
    res = res or Results()

    def sub(m: re.Match[str]) -> str:
        return m.group("open") + render(_name(m), res) + "\n" + m.group("close")

    return PEERS.sub(sub, REGION.sub(sub, text))


# --- figures quoted on other pages ------------------------------------------


def _mislabel_auc(dataset: str, method: str) -> Callable[[Results], str]:
    """`mean ± std` of a method's mislabel AUC over seeds (the main runs)."""

    def get(res: Results) -> str:
        runs = _mislabel_main(res.json(MISLABEL))
        mean, std = _grouped(runs, ["dataset", "method"], "auc")[dataset, method]
        return f"{mean:.3f} ± {std:.3f}"

    return get


def _influential_size(key: str) -> Callable[[Results], str]:
    """A size of the paper's protocol runs of the influential-data tutorial."""
    return lambda res: str(res.json(INFLUENTIAL)["runs"][0]["config"][key])


def _influential_metric(
    task: str, setting: str, scope: str, method: str, metric: str = "recall"
) -> Callable[[Results], str]:
    """A method's class-match metric in one run of the influential-data tutorial."""

    def get(res: Results) -> str:
        for r in _influential_runs(res):
            if r["task"] == task and r["setting"] == setting and scope in r["scopes"]:
                return f3(r["scopes"][scope]["methods"][method][metric])
        raise KeyError(f"no {setting} run of {task!r} with the gradients on {scope!r}")

    return get


def _two(
    template: str, a: Tuple[str, str, str, str], b: Tuple[str, str, str, str]
) -> Callable[[Results], str]:
    """Two figures of the peers results (`(file, job, tool, key)` each), to
    three decimals, in `template`."""
    return lambda res: template.format(f3(_peer(*a)(res)), f3(_peer(*b)(res)))


def _head_mean_auc(res: Results, dataset: str, choice: str) -> float:
    return statistics.fmean(r["auc"][choice] for r in _head_runs(res, dataset))


def _head_datasets(res: Results) -> List[str]:
    return list(dict.fromkeys(r["dataset"] for r in res.json(HEAD)["runs"]))


ST = "sentence transformations"

PAGE_CLAIMS: Dict[str, List[Claim]] = {
    "own-models.md": [
        Claim(
            "The head block changes the scores by less than 4%",
            HEAD,
            lambda r: (
                "less than "
                f"{math.ceil(100 * max(x['relative_change'] for x in r.json(HEAD)['runs']))}%"
            ),
        ),
        Claim(
            "finds them better than the LoRA blocks",
            HEAD,
            lambda r: (
                "better"
                if all(
                    _head_mean_auc(r, ds, "head_only")
                    > _head_mean_auc(r, ds, "lora_only")
                    for ds in _head_datasets(r)
                )
                else "not always better"
            ),
        ),
        Claim(
            "(AUC 0.984 against 0.817)",
            HEAD,
            lambda r: (
                f"{_head_mean_auc(r, 'bbc', 'head_only'):.3f} against "
                f"{_head_mean_auc(r, 'bbc', 'lora_only'):.3f}"
            ),
        ),
    ],
    "faq.md": [
        Claim(
            "DataInf's AUC is 0.979 ± 0.013 over 3 seeds",
            MISLABEL,
            _mislabel_auc("sms", "DataInf"),
        ),
        Claim("LiSSA (0.988 ± 0.013)", MISLABEL, _mislabel_auc("sms", "LiSSA")),
        Claim("EK-FAC (0.984 ± 0.015)", MISLABEL, _mislabel_auc("sms", "EK-FAC")),
        Claim(
            "DataInf's 0.817 ± 0.049 ranks", MISLABEL, _mislabel_auc("bbc", "DataInf")
        ),
        Claim(
            "The training loss (0.989 ± 0.005)",
            MISLABEL,
            _mislabel_auc("bbc", "Training loss"),
        ),
        Claim("LiSSA (0.874 ± 0.032)", MISLABEL, _mislabel_auc("bbc", "LiSSA")),
        Claim(
            "16 training and 4 test examples",
            INFLUENTIAL,
            _influential_size("n_train_per_class"),
        ),
        Claim(
            "16 training and 4 test examples",
            INFLUENTIAL,
            _influential_size("n_test_per_class"),
        ),
        Claim(
            "sentence transformations (AUC 1.000",
            INFLUENTIAL,
            _influential_metric(ST, "paper", "prompt", "datainf", "auc"),
        ),
        Claim(
            "recall 0.995)",
            INFLUENTIAL,
            _influential_metric(ST, "paper", "prompt", "datainf"),
        ),
        Claim(
            "DataInf's AUC is 0.830",
            INFLUENTIAL,
            _influential_metric(ST, "paper", "answer", "datainf", "auc"),
        ),
        Claim(
            "EK-FAC (0.984)",
            INFLUENTIAL,
            _influential_metric(ST, "paper", "answer", "ekfac", "auc"),
        ),
        Claim(
            "LiSSA (0.937)",
            INFLUENTIAL,
            _influential_metric(ST, "paper", "answer", "lissa", "auc"),
        ),
        Claim(
            "(0.928)",
            INFLUENTIAL,
            _influential_metric(ST, "paper", "answer", "cosine", "auc"),
        ),
        Claim(
            "inverse (0.899)",
            INFLUENTIAL,
            _influential_metric(ST, "paper", "answer", "exact", "auc"),
        ),
        Claim(
            "Hessian-free (0.861)",
            INFLUENTIAL,
            _influential_metric(ST, "paper", "answer", "hessian_free", "auc"),
        ),
    ],
    "index.md": [
        Claim(
            "relative errors up to 0.98 against the formula",
            "compare_pydvl_ihm.txt",
            lambda r: max(
                re.findall(
                    r"pyDVL IHM .*rel\. error ([0-9.]+)",
                    r.text("compare_pydvl_ihm.txt"),
                ),
                key=float,
            ),
        ),
        Claim(
            "takes 45× as long as this package",
            PAB,
            _fmt(_speedup_ab, lambda v: f"{v:.0f}×"),
        ),
        Claim("(AUC) is 0.817 ± 0.049", MISLABEL, _mislabel_auc("bbc", "DataInf")),
        Claim("reaches 0.989 ± 0.005", MISLABEL, _mislabel_auc("bbc", "Training loss")),
        Claim(
            "DataInf's 0.979 ± 0.013 is behind",
            MISLABEL,
            _mislabel_auc("sms", "DataInf"),
        ),
        Claim("LiSSA's 0.988 ± 0.013", MISLABEL, _mislabel_auc("sms", "LiSSA")),
        *[
            Claim(quote, P, _two(template, (P, *first, key), (P, *second, key)))
            for quote, template, first, second, key in (
                (
                    "correlate 0.525 on the MLP and 0.196 on a LoRA-MLP",
                    "{} on the MLP and {}",
                    ("a", "ours"),
                    ("b", "ours"),
                    "pearson",
                ),
                (
                    "against 0.788 and 0.700 for kronfluence's EK-FAC",
                    "{} and {}",
                    ("a", "kronfluence"),
                    ("b", "kronfluence"),
                    "pearson",
                ),
                (
                    "pyDVL's Arnoldi has the best AUC, 0.979, against DataInf's 0.929",
                    "{}, against DataInf's {}",
                    ("b", "pydvl-arnoldi"),
                    ("b", "ours"),
                    "auc",
                ),
            )
        ],
    ],
}
"""Figures quoted in other pages of `docs/`, by page: checked by the tests."""


def _standing_of(res: Results, prefix: str) -> Standing:
    """The first benchmark of the summary whose name starts with `prefix`."""
    for s in standings(res):
        if s.benchmark.startswith(prefix):
            return s
    raise KeyError(f"no benchmark of the summary starts with {prefix!r}")


def _verdict(prefix: str) -> Callable[[Results], str]:
    """`DataInf loses` (or ties, wins) on the first benchmark named `prefix...`."""
    return lambda res: f"DataInf {_standing_of(res, prefix).verdict}"


def _best(prefix: str) -> Callable[[Results], str]:
    """`best: X` on the first benchmark named `prefix...`."""
    return lambda res: f"best: {_standing_of(res, prefix).best}"


def _lds_of(res: Results, setup: str) -> Dict[str, Any]:
    r = _lds_setup(res, setup)
    if r is None:
        raise KeyError(f"no LDS results for the {setup} setup")
    return r


def _lds_end(setup: str, first: bool) -> Callable[[Results], str]:
    """`X ranks first` or `X ranks last` in the LDS of a setup."""

    def get(res: Results) -> str:
        ms = _lds_of(res, setup)["methods"]
        m = (max if first else min)(ms, key=lambda k: ms[k]["lds"])
        return f"{LDS_LABELS[m]} ranks {'first' if first else 'last'}"

    return get


def _relation(setup: str, method: str) -> Callable[[Results], str]:
    """`X is clearly above DataInf` (or level with, clearly below) in an LDS."""

    def get(res: Results) -> str:
        above, level, _ = _lds_groups(_lds_of(res, setup)["methods"])
        where = (
            "clearly above"
            if method in above
            else "level with"
            if method in level
            else "clearly below"
        )
        return f"{LDS_LABELS[method]} is {where} DataInf"

    return get


def _answers(setup: str) -> Callable[[Results], str]:
    """How many test prompts the fine-tuned language model answers exactly."""

    def get(res: Results) -> str:
        exact = float(_lds_of(res, setup)["quality"]["test_exact"])
        return "none of" if exact == 0 else "all of" if exact == 1 else "some of"

    return get


PAGE_CLAIMS["which-method.md"] = [
    Claim(
        "On the MiniLM classifier's LDS, DataInf loses",
        LDS,
        _verdict("LDS, MiniLM"),
    ),
    Claim("TracIn ranks first", LDS, _lds_end("classifier", first=True)),
    Claim("Exact inverse ranks last", LDS, _lds_end("classifier", first=False)),
    Claim(
        "On the SmolLM2 language model's LDS, DataInf ties",
        LDS,
        _verdict("LDS, SmolLM2"),
    ),
    Claim(
        "LiSSA ranks first and Exact inverse ranks last",
        LDS,
        _lds_end("causal_lm", first=True),
    ),
    Claim(
        "LiSSA ranks first and Exact inverse ranks last",
        LDS,
        _lds_end("causal_lm", first=False),
    ),
    Claim(
        "on the classifier, Hessian-free is clearly above DataInf",
        LDS,
        _relation("classifier", "hessian_free"),
    ),
    Claim(
        "on the language model, Hessian-free is clearly below DataInf",
        LDS,
        _relation("causal_lm", "hessian_free"),
    ),
    Claim(
        "and EK-FAC is level with DataInf",
        LDS,
        _relation("causal_lm", "ekfac"),
    ),
    Claim(
        "on the language model, LiSSA is level with DataInf",
        LDS,
        _relation("causal_lm", "lissa"),
    ),
    Claim(
        "it answers none of the test prompts exactly",
        LDS,
        _answers("causal_lm"),
    ),
    Claim(
        "On BBC News DataInf loses",
        MISLABEL,
        _verdict("Mislabel detection, BBC News"),
    ),
    Claim("best: Training loss", MISLABEL, _best("Mislabel detection, BBC News")),
    Claim(
        "on sentence transformations DataInf ties",
        INFLUENTIAL,
        _verdict(f"Class detection, {ST} (paper's fine-tune, gradients on the prompt"),
    ),
    Claim(
        "transformations DataInf loses",
        INFLUENTIAL,
        _verdict(f"Class detection, {ST} (paper's fine-tune, gradients on the answer"),
    ),
    Claim(
        "on math without reasoning DataInf loses",
        INFLUENTIAL,
        _verdict(
            "Class detection, math without reasoning (paper's fine-tune, "
            "gradients on the answer"
        ),
    ),
    Claim(
        "and DataInf ties again",
        INFLUENTIAL,
        _verdict(
            "Class detection, math with reasoning (paper's fine-tune, "
            "gradients on the answer"
        ),
    ),
]
"""The statements of the guidance on docs/which-method.md."""


def other_pages() -> List[str]:
    """The pages of `docs/` other than the benchmarks page with generated
    tables or quoted figures."""
    return sorted(set(TABLE_PAGES.values()) | set(PAGE_CLAIMS))


def check(
    text: str,
    res: Optional[Results] = None,
    claims: Optional[Sequence[Claim]] = None,
) -> List[str]:
    """Problems of a page: stale tables, unknown tables, figures not backed by a
    results file (`claims`: the page's quoted figures, default `CLAIMS`)."""
    res = res or Results()
    return stale_tables(text, res) + check_claims(
        text, CLAIMS if claims is None else claims, res
    )


def check_page(name: str, text: str, res: Optional[Results] = None) -> List[str]:
    """Problems of another page of `docs/`: its tables and its quoted figures."""
    return check(text, res, PAGE_CLAIMS.get(name, []))


def stale_tables(text: str, res: Optional[Results] = None) -> List[str]:
    """The generated tables of a page that are stale or unknown."""
    res = res or Results()
    problems = []
    for m in regions(text):
        name = _name(m)
        try:
            fresh = render(name, res)
        except (KeyError, FileNotFoundError, ValueError) as e:
            problems.append(f"table {name!r}: {e}")
            continue
        if m.group("body").rstrip("\n") != fresh:
            problems.append(
                f"table {name!r} differs from its results (run docs_tables.py --write)"
            )
    return problems


def check_claims(
    text: str, claims: Sequence[Claim], res: Optional[Results] = None
) -> List[str]:
    """Problems of the figures `claims` quote in `text` (any page of the docs)."""
    res = res or Results()
    problems = []
    flat = " ".join(text.split())
    for claim in claims:
        if claim.quote not in flat:
            problems.append(f"quoted figure not found in the page: {claim.quote!r}")
            continue
        try:
            value = claim.value(res)
        except (KeyError, FileNotFoundError, ValueError) as e:
            problems.append(f"{claim.quote!r}: cannot compute from {claim.file}: {e}")
            continue
        if value not in claim.quote:
            problems.append(f"{claim.quote!r}: {claim.file} gives {value!r}")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--write", action="store_true", help="rewrite the tables in the page"
    )
    mode.add_argument(
        "--check", action="store_true", help="exit 1 if the page is stale"
    )
    mode.add_argument("--show", metavar="NAME", help="print one table")
    ap.add_argument("--page", type=Path, help="one page (default: all pages)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    res = Results(args.results)
    if args.show:
        print(render(args.show, res))
        return 0
    pages = (
        [args.page]
        if args.page
        else [PAGE, *(ROOT / "docs" / p for p in other_pages())]
    )
    problems = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        if args.write:
            new = update(text, res)
            if new != text:
                page.write_text(new, encoding="utf-8")
                print(f"updated {page}")
            else:
                print(f"{page} is up to date")
            text = new
        claims = None if page.name == PAGE.name else PAGE_CLAIMS.get(page.name, [])
        problems += [f"{page.name}: {p}" for p in check(text, res, claims)]
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
