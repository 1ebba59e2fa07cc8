"""Smoke test of the peers benchmark (issue 6): `benchmarks/run.py --quick`.

No timing is asserted. The peers that are not installed (CI installs neither
dattri nor kronfluence) must appear as skipped rows, not silently vanish.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"


def _run_script(script: Path, *args: str, timeout: float = 600) -> str:
    """Runs a benchmark script offline; returns its stdout, failing on errors."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bench")
    docs = tmp / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Core model (issue 2)\n\nkept\n")
    _run_script(
        RUN,
        "--quick",
        "--out",
        str(tmp / "out"),
        "--cache-dir",
        str(tmp / "cache"),
        "--docs",
        str(docs),
        # an empty folder: peers installed by install_peers.sh are not seen
        "--peers-dir",
        str(tmp / "no-peers"),
    )
    return tmp


def _rows(tmp: Path) -> dict:
    with open(tmp / "out" / "peers.csv") as f:
        return {(r["job"], r["tool"]): r for r in csv.DictReader(f)}


def test_every_job_and_tool_has_a_row(quick_run: Path) -> None:
    rows = _rows(quick_run)
    for job in ("a", "b", "c"):
        for tool in ("exact", "ours", "dattri", "kronfluence"):
            assert (job, tool) in rows, f"no row for job {job}, tool {tool}"
        if rows[(job, "ours")]["status"] == "skipped":  # job data not installed
            assert "job unavailable" in rows[(job, "ours")]["message"]
            continue
        for tool in ("exact", "ours"):
            assert rows[(job, tool)]["status"] == "ok", rows[(job, tool)]
        for peer in ("dattri", "kronfluence"):
            row = rows[(job, peer)]
            assert row["status"] in ("ok", "skipped"), row
            if row["status"] == "skipped":
                assert "not installed" in row["message"]


def test_metrics_against_the_exact_inverse(quick_run: Path) -> None:
    rows = _rows(quick_run)
    assert float(rows[("a", "exact")]["pearson"]) == pytest.approx(1.0)
    for job in ("a", "b", "c"):
        ours = rows[(job, "ours")]
        if ours["status"] != "ok":
            continue
        assert -1.0 <= float(ours["pearson"]) <= 1.0
        assert float(ours["total_s"]) > 0 and float(ours["peak_mb"]) > 0
    # jobs b and c have flipped labels: an AUC is reported
    for job in ("b", "c"):
        if rows[(job, "ours")]["status"] == "ok":
            assert 0.0 <= float(rows[(job, "ours")]["auc"]) <= 1.0
    # pyDVL's DataInf runs the same maths as ours with one λ
    same = rows[("a", "pydvl-ihm")]
    assert same["status"] == "ok" and same["rel_err_same_lambda"] != ""


def test_docs_table_is_written_between_markers(quick_run: Path) -> None:
    text = (quick_run / "benchmarks.md").read_text()
    assert "## Core model (issue 2)\n\nkept" in text
    assert "## Peers (issue 6)" in text
    assert "<!-- peers-table:begin" in text and "<!-- peers-table:end -->" in text
    assert "| job | tool | method |" in text
    assert "skipped" in text


def test_gpu_fit_benchmark_runs_on_a_cpu_in_quick_mode() -> None:
    """The GPU bar's script (issue 4), with a tiny model on the CPU."""
    out = _run_script(
        ROOT / "benchmarks" / "bench_gpu_fit.py",
        *("--quick", "--device", "cpu", "--repeats", "1"),
        timeout=300,
    )
    result = json.loads(out[out.index("{") :])
    assert result["matrix_shape"] == [4, 32] and result["matrix_finite"]
    assert result["floor_s"] > 0 and result["ours_s"] > 0
