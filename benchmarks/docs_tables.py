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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
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

    def __init__(self, root: Path = RESULTS) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
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
    files = ", ".join(f"`benchmarks/results/{n}`" for n in names)
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
                "bench_mlp_matrix.txt", command="python benchmarks/bench_mlp_matrix.py"
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
    for key, v in r.items():
        if not isinstance(v, dict) or "floor_s" not in v or "fit_s" not in v:
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
                "bench_fit.json", command="python benchmarks/bench_fit.py --repeats 11"
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
                "bench_fit.json", command="python benchmarks/bench_fit.py --repeats 11"
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


MISLABEL = "tutorials/mislabeled_data.json"
APPROX = "tutorials/approximation_quality.json"
INFLUENTIAL = "tutorials/influential_data.json"
DATASET_LABELS = {"sms": "SMS spam", "bbc": "BBC News"}
METHOD_ORDER = ["DataInf", "Exact inverse", "LiSSA", "Hessian-free", "EK-FAC"]


def _by_method(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(rows, key=lambda r: order.get(r["method"], len(order)))


@register("demo")
def _demo(res: Results) -> str:
    doc = res.json(MISLABEL)
    seed0 = next(s for s in doc["per_seed"] if s["dataset"] == "sms" and s["seed"] == 0)
    aucs = seed0["auc"]
    best = max(aucs.values())
    rows = [[m, bold(f3(aucs[m]), aucs[m] == best)] for m in METHOD_ORDER if m in aucs]
    return "\n\n".join(
        [
            table(["method (SMS spam, seed 0)", "AUC"], rows, "lr"),
            source(MISLABEL, command=doc["command"]),
        ]
    )


@register("mislabeled")
def _mislabeled(res: Results) -> str:
    doc = res.json(MISLABEL)
    rows = []
    for ds in ("sms", "bbc"):
        group = _by_method([r for r in doc["summary"] if r["dataset"] == ds])
        best_auc = max(r["auc_mean"] for r in group)
        best_recall = max(r["recall_top_mean"] for r in group)
        n = doc["sizes"][ds]["n_train"]
        for i, r in enumerate(group):
            rows.append(
                [
                    f"{DATASET_LABELS[ds]} (n = {n})" if i == 0 else "",
                    r["method"],
                    bold(
                        mean_std(r["auc_mean"], r["auc_std"]), r["auc_mean"] == best_auc
                    ),
                    bold(
                        mean_std(r["recall_top_mean"], r["recall_top_std"]),
                        r["recall_top_mean"] == best_recall,
                    ),
                    f"{r['seconds_mean']:.1f}",
                ]
            )
    return "\n\n".join(
        [
            table(
                ["data set", "method", "AUC", "flipped in top 20%", "seconds"],
                rows,
                "llrrr",
            ),
            source(MISLABEL, command=doc["command"]),
        ]
    )


@register("approximation")
def _approximation(res: Results) -> str:
    doc = res.json(APPROX)
    ranks = sorted({r["rank"] for r in doc["rows"]})
    out = []
    for metric, title in (
        ("per_test_point", "per test point"),
        ("aggregate", "aggregate"),
    ):
        rows = []
        for blocks, label in (
            ("module", '`"module"` (A, B apart)'),
            ("lora", '`"lora"` (A, B together)'),
        ):
            group = [r for r in doc["rows"] if r["blocks"] == blocks]
            best = {k: max(r[metric] for r in group if r["rank"] == k) for k in ranks}
            methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in group)]
            for i, m in enumerate(methods):
                cells = {r["rank"]: r[metric] for r in group if r["method"] == m}
                rows.append(
                    [label if i == 0 else "", m]
                    + [bold(f3(cells[k]), cells[k] == best[k]) for k in ranks]
                )
        out.append(
            f"Pearson correlation with the exact per-block inverse, {title}:\n\n"
            + table(
                ["blocks", "method"] + [f"rank {k}" for k in ranks],
                rows,
                "ll" + "r" * len(ranks),
            )
        )
    out.append(source(APPROX, command=doc["command"]))
    return "\n\n".join(out)


@register("influential")
def _influential(res: Results) -> str:
    doc = res.json(INFLUENTIAL)
    rows = []
    for ranking, label in (
        ("magnitude", "by magnitude"),
        ("helpfulness", "by signed influence"),
    ):
        group = _by_method([r for r in doc["rows"] if r["ranking"] == ranking])
        best_auc = max(r["auc_mean"] for r in group)
        best_recall = max(r["recall_mean"] for r in group)
        for i, r in enumerate(group):
            rows.append(
                [
                    label if i == 0 else "",
                    r["method"],
                    bold(
                        mean_std(r["auc_mean"], r["auc_std"]), r["auc_mean"] == best_auc
                    ),
                    bold(
                        mean_std(r["recall_mean"], r["recall_std"]),
                        r["recall_mean"] == best_recall,
                    ),
                ]
            )
    return "\n\n".join(
        [
            table(
                ["ranking", "method", "class-match AUC", "class-match recall"],
                rows,
                "llrr",
            ),
            source(INFLUENTIAL, command=doc["command"]),
        ]
    )


def _peers_full(res: Results) -> str:
    return res.text("peers.md").rstrip()


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


def _mislabel(
    ds: str, method: str, key: str = "auc_mean"
) -> Callable[[Results], float]:
    def get(res: Results) -> float:
        for r in res.json(MISLABEL)["summary"]:
            if r["dataset"] == ds and r["method"] == method:
                return float(r[key])
        raise KeyError((ds, method))

    return get


def _seed_auc(ds: str, seed: int, method: str) -> Callable[[Results], float]:
    def get(res: Results) -> float:
        for s in res.json(MISLABEL)["per_seed"]:
            if s["dataset"] == ds and s["seed"] == seed:
                return float(s["auc"][method])
        raise KeyError((ds, seed))

    return get


def _gradient_seconds(ds: str) -> Callable[[Results], float]:
    def get(res: Results) -> float:
        vals = [
            float(s["gradient_seconds"])
            for s in res.json(MISLABEL)["per_seed"]
            if s["dataset"] == ds
        ]
        return sum(vals) / len(vals)

    return get


def _approx(
    blocks: str, method: str, rank: int, metric: str
) -> Callable[[Results], float]:
    def get(res: Results) -> float:
        for r in res.json(APPROX)["rows"]:
            if (r["blocks"], r["method"], r["rank"]) == (blocks, method, rank):
                return float(r[metric])
        raise KeyError((blocks, method, rank))

    return get


def _infl(
    ranking: str, method: str, key: str = "auc_mean"
) -> Callable[[Results], float]:
    def get(res: Results) -> float:
        for r in res.json(INFLUENTIAL)["rows"]:
            if r["ranking"] == ranking and r["method"] == method:
                return float(r[key])
        raise KeyError((ranking, method))

    return get


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
        "fit` takes 1.52× a plain epoch",
        "bench_mlp_matrix.txt",
        lambda r: ratio(r.json("bench_mlp_matrix.txt")["fit_over_floor"]),
    ),
    # per-sample gradients and fit
    Claim(
        "from 0.99× to 1.84×",
        FIT,
        lambda r: f"0.99× to {max(r.json(FIT)['lora_mlp_hooks']['ratios']):.2f}×",
    ),
    Claim(
        "from 0.99× to 1.84×",
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
        "within 6% of the floor",
        FIT,
        _fmt(_fit("minilm_lora_hooks", "ratio"), lambda v: f"{100 * (v - 1):.0f}%"),
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
    # the paper's experiments
    Claim(
        "gradients (about 51 s for SMS",
        MISLABEL,
        _fmt(_gradient_seconds("sms"), lambda v: f"{v:.0f} s"),
    ),
    Claim(
        "25 s for BBC News)",
        MISLABEL,
        _fmt(_gradient_seconds("bbc"), lambda v: f"{v:.0f} s"),
    ),
    Claim(
        "EK-FAC has the best AUC (0.974)",
        MISLABEL,
        _fmt(_mislabel("sms", "EK-FAC"), f3),
    ),
    Claim("DataInf (0.959) is second", MISLABEL, _fmt(_mislabel("sms", "DataInf"), f3)),
    Claim(
        "the exact inverse (0.913)",
        MISLABEL,
        _fmt(_mislabel("sms", "Exact inverse"), f3),
    ),
    Claim(
        "Hessian-free baseline (0.927)",
        MISLABEL,
        _fmt(_mislabel("sms", "Hessian-free"), f3),
    ),
    Claim(
        "on seed 0 by 0.094",
        MISLABEL,
        _fmt(
            _sub(_seed_auc("sms", 0, "DataInf"), _seed_auc("sms", 0, "Hessian-free")),
            f3,
        ),
    ),
    Claim(
        "on BBC News DataInf is the weakest of the five (0.688",
        MISLABEL,
        _fmt(_mislabel("bbc", "DataInf"), f3),
    ),
    Claim("LiSSA's 0.766)", MISLABEL, _fmt(_mislabel("bbc", "LiSSA"), f3)),
    Claim(
        "on seeds 1 and 2 the two are within 0.001",
        MISLABEL,
        lambda r: (
            f"{max(abs(_seed_auc('sms', k, 'DataInf')(r) - _seed_auc('sms', k, 'Hessian-free')(r)) for k in (1, 2)):.3f}"
        ),
    ),
    Claim(
        "at 11–18 times DataInf's time",
        MISLABEL,
        lambda r: "–".join(
            f"{_mislabel(d, 'LiSSA', 'seconds_mean')(r) / _mislabel(d, 'DataInf', 'seconds_mean')(r):.0f}"
            for d in ("sms", "bbc")
        ),
    ),
    Claim(
        "takes 0.60 of the float32 store's disk",
        PRECISION,
        lambda r: (
            f"{r.json(PRECISION)['result']['float16']['disk_gb'] / r.json(PRECISION)['result']['float32_disk_gb']:.2f}"
        ),
    ),
    Claim(
        "LiSSA (100 steps) is closer than DataInf in every cell",
        APPROX,
        lambda r: (
            "every cell"
            if all(
                _approx(b, "LiSSA", k, "per_test_point")(r)
                > _approx(b, "DataInf", k, "per_test_point")(r)
                and _approx(b, "LiSSA", k, "aggregate")(r)
                > _approx(b, "DataInf", k, "aggregate")(r)
                for b in ("module", "lora")
                for k in (1, 2, 4, 8)
            )
            else "NOT every cell"
        ),
    ),
    Claim(
        "0.398 against 0.360 per test point",
        APPROX,
        _fmt(_approx("module", "LiSSA", 1, "per_test_point"), f3),
    ),
    Claim(
        "0.398 against 0.360 per test point",
        APPROX,
        _fmt(_approx("module", "DataInf", 1, "per_test_point"), f3),
    ),
    Claim(
        "0.794 against 0.790 aggregate",
        APPROX,
        _fmt(_approx("module", "LiSSA", 1, "aggregate"), f3),
    ),
    Claim(
        "0.794 against 0.790 aggregate",
        APPROX,
        _fmt(_approx("module", "DataInf", 1, "aggregate"), f3),
    ),
    Claim(
        "0.333 against 0.329",
        APPROX,
        _fmt(_approx("lora", "Hessian-free", 8, "aggregate"), f3),
    ),
    Claim(
        "0.333 against 0.329",
        APPROX,
        _fmt(_approx("lora", "DataInf", 8, "aggregate"), f3),
    ),
    Claim(
        "exact inverse is far ahead (AUC 0.774",
        INFLUENTIAL,
        _fmt(_infl("magnitude", "Exact inverse"), f3),
    ),
    Claim(
        "against 0.598 for DataInf)",
        INFLUENTIAL,
        _fmt(_infl("magnitude", "DataInf"), f3),
    ),
    Claim("DataInf's 0.497", INFLUENTIAL, _fmt(_infl("helpfulness", "DataInf"), f3)),
]


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


def check(text: str, res: Optional[Results] = None) -> List[str]:
    """Problems of a page: stale tables, unknown tables, figures not backed by a results file."""
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
    flat = " ".join(text.split())
    for claim in CLAIMS:
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
    ap.add_argument("--page", type=Path, default=PAGE)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    res = Results(args.results)
    if args.show:
        print(render(args.show, res))
        return 0
    text = args.page.read_text(encoding="utf-8")
    if args.write:
        new = update(text, res)
        if new != text:
            args.page.write_text(new, encoding="utf-8")
            print(f"updated {args.page}")
        else:
            print(f"{args.page} is up to date")
    problems = check(args.page.read_text(encoding="utf-8") if args.write else text, res)
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
