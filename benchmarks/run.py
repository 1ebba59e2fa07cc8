"""Side-by-side benchmarks of DataInf against its peers, one run.

Every tool runs every job on this machine in this run, each in its own
subprocess (own peak memory, failures and time-outs isolated), and the table
compares them: wall time of fit and of the full (test × train) influence
matrix, peak memory, correlation with the exact per-block inverse, and
mislabel-detection AUC where the job has flipped labels.

    python benchmarks/run.py                 # jobs a, b, c -> docs/benchmarks.md
    python benchmarks/run.py --quick         # tiny jobs, smoke test (CI)
    python benchmarks/run.py --jobs a --tools ours,pydvl-ihm
    bash benchmarks/install_peers.sh         # dattri and kronfluence, optional

Peers that are not installed, or cannot run a job, get a row that says why.
Results: `<out>/peers.csv`, `<out>/peers.md`, one JSON (and matrix) per run in
`<out>/runs/` (default out: `benchmarks/results`, or `benchmarks/results/quick`
with --quick); a full run also rewrites the table in `docs/benchmarks.md`
between its markers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from peer_bench import report  # noqa: E402
from peer_bench.jobs import JOBS, JobUnavailable, cache_path, prepare  # noqa: E402
from peer_bench.tools import TOOLS, Tool  # noqa: E402

DEFAULT_PEERS = HERE / ".peers"
DISTRIBUTIONS = {
    "pydvl-datainf": "pydvl-datainf",
    "pydvl": "pyDVL",
    "dattri": "dattri",
    "kronfluence": "kronfluence",
}


def _installed(module: str, peers_dir: Optional[Path]) -> bool:
    paths = [str(peers_dir)] if peers_dir and peers_dir.is_dir() else []
    sys.path[:0] = paths
    try:
        return importlib.util.find_spec(module) is not None
    finally:
        del sys.path[: len(paths)]


def _version(dist: str, peers_dir: Optional[Path]) -> str:
    if peers_dir and peers_dir.is_dir():
        for d in md.distributions(path=[str(peers_dir)]):
            if d.metadata["Name"].lower() == dist.lower():
                return d.version
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return ""


def machine(peers_dir: Optional[Path]) -> Dict[str, str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": _memory(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for dist in (
        "pydvl-datainf",
        "pyDVL",
        "transformers",
        "peft",
        "dattri",
        "kronfluence",
    ):
        info[dist] = _version(dist, peers_dir) or "not installed"
    return info


def _memory() -> str:
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        return f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        return "?"


def _row(job: str, tool: Tool, version: str, **kw: Any) -> Dict[str, Any]:
    row: Dict[str, Any] = {
        "job": job,
        "tool": tool.key,
        "label": tool.label,
        "library": tool.library,
        "version": version,
        "method": tool.method,
    }
    row.update(kw)
    return row


def run_tool(
    job: str,
    tool: Tool,
    cache: Path,
    runs: Path,
    timeout: float,
    quick: bool,
    device: Optional[str],
    peers_dir: Optional[Path],
) -> Dict[str, Any]:
    """Runs one worker subprocess; returns its JSON record (or why it has none)."""
    stem = runs / f"{job}__{tool.key}"
    for suffix in (".json", ".npy", ".log"):
        Path(f"{stem}{suffix}").unlink(missing_ok=True)
    env = dict(os.environ)
    path = [str(HERE)]
    if peers_dir and peers_dir.is_dir():
        path.append(str(peers_dir))
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env.update(
        PYTHONPATH=os.pathsep.join(path),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(JOBS[job].threads),
    )
    cmd = [sys.executable, "-m", "peer_bench.worker", "--job", job]
    cmd += ["--tool", tool.key, "--cache", str(cache), "--out", str(runs)]
    if quick:
        cmd.append("--quick")
    if device:
        cmd += ["--device", device]
    t0 = time.perf_counter()
    with open(f"{stem}.stdout", "w") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"status": "timeout", "message": f"no result within {timeout:.0f} s"}
    elapsed = time.perf_counter() - t0
    record_path = Path(f"{stem}.json")
    if not record_path.exists():
        tail = Path(f"{stem}.stdout").read_text()[-300:].strip().splitlines()
        return {
            "status": "error",
            "message": f"worker exited with {rc} after {elapsed:.0f} s"
            + (f": {tail[-1]}" if tail else ""),
        }
    return dict(json.loads(record_path.read_text()))


def evaluate(
    rows: List[Dict[str, Any]], runs: Path, job: str, flipped: Optional[np.ndarray]
) -> None:
    """Adds correlations, AUC, relative errors and speed ratios in place."""

    def matrix(tool: str) -> Optional[np.ndarray]:
        p = runs / f"{job}__{tool}.npy"
        return np.load(p) if p.exists() else None

    exact, same_lambda = matrix("exact"), matrix("ours-scalar")
    ours = next((r for r in rows if r["tool"] == "ours" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok":
            continue
        m = matrix(r["tool"])
        if m is None:
            continue
        if not np.isfinite(m).all():
            r["message"] = "non-finite values in the matrix"
            continue
        if exact is not None:
            r["pearson"] = report.pearson(m, exact)
            r["spearman"] = report.spearman(m, exact)
        if flipped is not None:
            r["auc"] = report.mislabel_auc(m, flipped)
        if same_lambda is not None and r["tool"] in (
            "pydvl-ihm",
            "pydvl-ihm-calc",
            "dattri",
        ):
            r["rel_err_same_lambda"] = report.rel_error(m, same_lambda)
        if ours is not None and ours.get("total_s"):
            r["x_ours"] = r["total_s"] / ours["total_s"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    ap.add_argument("--quick", action="store_true", help="tiny jobs (smoke test)")
    ap.add_argument("--jobs", help="comma-separated job keys (default: a,b,c)")
    ap.add_argument("--tools", help="comma-separated tool keys (default: all)")
    ap.add_argument("--out", type=Path, help="results folder")
    ap.add_argument(
        "--docs",
        type=Path,
        help="markdown file whose peers table to rewrite (default for a full run: "
        "docs/benchmarks.md; none with --quick)",
    )
    ap.add_argument("--no-docs", action="store_true", help="do not touch the docs")
    ap.add_argument(
        "--peers-dir",
        type=Path,
        default=Path(os.environ.get("DATAINF_PEERS_DIR", DEFAULT_PEERS)),
        help="folder with the peers from install_peers.sh (default: %(default)s)",
    )
    ap.add_argument("--timeout", type=float, help="per-tool limit in seconds")
    ap.add_argument(
        "--parallel",
        type=int,
        help="tools run at once (default 1; 2 with --quick, where timings do not "
        "matter)",
    )
    ap.add_argument("--device", help="override the jobs' device (cpu, cuda)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force-prepare", action="store_true", help="rebuild job caches")
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=HERE / "results" / "cache",
        help="where prepared jobs are cached (default: %(default)s)",
    )
    args = ap.parse_args(argv)

    jobs = (
        args.jobs.split(",") if args.jobs else [k for k, j in JOBS.items() if j.default]
    )
    tools = (
        args.tools.split(",")
        if args.tools
        else [k for k, t in TOOLS.items() if t.quick or not args.quick]
    )
    for k in jobs:
        if k not in JOBS:
            ap.error(f"unknown job {k!r}; known: {list(JOBS)}")
    for k in tools:
        if k not in TOOLS:
            ap.error(f"unknown tool {k!r}; known: {list(TOOLS)}")
    out = args.out or (HERE / "results" / "quick" if args.quick else HERE / "results")
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    cache_dir = args.cache_dir
    peers_dir = args.peers_dir if args.peers_dir.is_dir() else None
    versions = {dist: _version(name, peers_dir) for dist, name in DISTRIBUTIONS.items()}
    info = machine(peers_dir)
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(ROOT):
        script = script.relative_to(ROOT)
    command = "python " + " ".join(
        shlex.quote(a)
        for a in [str(script), *(argv if argv is not None else sys.argv[1:])]
    )
    parallel = args.parallel or (2 if args.quick else 1)
    started = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    descriptions: Dict[str, str] = {}
    for job in jobs:
        spec = JOBS[job]
        device = args.device or spec.device
        timeout = args.timeout or (
            spec.quick_timeout_s if args.quick else spec.timeout_s
        )
        job_rows: List[Dict[str, Any]] = []
        flipped: Optional[np.ndarray] = None
        try:
            if device == "cuda":
                import torch

                if not torch.cuda.is_available():
                    raise JobUnavailable("no CUDA device on this machine")
            print(f"[job {job}] preparing ...", flush=True)
            t0 = time.perf_counter()
            cache = prepare(
                job, cache_dir, args.quick, args.seed, args.force_prepare, device
            )
            blob_meta = _meta(job, cache_dir, args.quick, args.seed)
            descriptions[job] = _describe(blob_meta)
            flipped = blob_meta.get("_flipped")
            print(
                f"[job {job}] ready in {time.perf_counter() - t0:.0f} s: {descriptions[job]}",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001 - a job that cannot be built: rows say why
            status = "skipped" if isinstance(e, JobUnavailable) else "error"
            text = (
                f"job unavailable: {e}" if status == "skipped" else f"job failed: {e!r}"
            )
            print(f"[job {job}] {text}", flush=True)
            for key in tools:
                t = TOOLS[key]
                rows.append(
                    _row(
                        job,
                        t,
                        versions[t.library],
                        status=status,
                        message=text[:300],
                    )
                )
            continue
        planned: List[Any] = []  # a finished row, or a tool to run
        for key in tools:
            tool = TOOLS[key]
            version = versions[tool.library]
            if tool.only_jobs is not None and job not in tool.only_jobs:
                continue
            if (
                args.quick
                and tool.quick_jobs is not None
                and job not in tool.quick_jobs
            ):
                continue
            if job in tool.not_on:
                msg = tool.not_on[job]
                planned.append(_row(job, tool, version, status="n/a", message=msg))
                continue
            missing = [m for m in tool.requires if not _installed(m, peers_dir)]
            if missing:
                msg = f"{', '.join(missing)} not installed (bash benchmarks/install_peers.sh)"
                planned.append(_row(job, tool, "", status="skipped", message=msg))
                continue
            planned.append(tool)

        def measure(
            tool: Tool, job: str = job, timeout: float = timeout, cache: Path = cache
        ) -> Dict[str, Any]:
            rec = run_tool(
                job, tool, cache, runs, timeout, args.quick, args.device, peers_dir
            )
            row = _row(
                job,
                tool,
                versions[tool.library],
                **{k: v for k, v in rec.items() if k not in ("job", "tool")},
            )
            if row.get("status") == "ok":
                row["total_s"] = row["fit_s"] + row["matrix_s"]
                gpu = rec.get("peak_gpu_mb")
                row["peak_mb"] = gpu if gpu is not None else rec.get("peak_rss_mb")
                if gpu is None and rec.get("peak_reset"):
                    row["delta_mb"] = rec["peak_rss_mb"] - rec["rss_setup_mb"]
                print(f"[job {job}] {tool.key}: ok {row['total_s']:.2f} s", flush=True)
            else:
                print(
                    f"[job {job}] {tool.key}: {row.get('status')}: {row.get('message')}",
                    flush=True,
                )
            return row

        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            futures = [
                p if isinstance(p, dict) else pool.submit(measure, p) for p in planned
            ]
            job_rows = [f if isinstance(f, dict) else f.result() for f in futures]
        evaluate(job_rows, runs, job, flipped)
        rows.extend(job_rows)

    report.write_csv(rows, out / "peers.csv")
    gpu = (
        any(JOBS[j].device == "cuda" for j in jobs)
        and (args.device or "cuda") == "cuda"
    )
    body = _markdown(
        rows, info, command, descriptions, time.perf_counter() - started, gpu
    )
    (out / "peers.md").write_text(body + "\n")
    (out / "machine.json").write_text(json.dumps(info, indent=1))
    docs = (
        None
        if args.no_docs
        else (args.docs or (None if args.quick else ROOT / "docs" / "benchmarks.md"))
    )
    if docs is not None:
        report.write_docs(docs, body)
        print(f"table written to {docs}")
    print(body)
    bad = [
        r
        for r in rows
        if r["tool"] in ("ours", "exact") and r.get("status") not in ("ok", "skipped")
    ]
    return 1 if bad else 0


def _meta(job: str, cache_dir: Path, quick: bool, seed: int) -> Dict[str, Any]:
    import torch

    blob = torch.load(cache_path(cache_dir, job, quick, seed), weights_only=False)
    meta = dict(blob["meta"])
    meta["_flipped"] = blob["flipped"]
    meta["_n_train"] = len(blob["x_train"])
    meta["_n_test"] = len(blob["x_test"])
    return meta


def _describe(meta: Dict[str, Any]) -> str:
    text = str(meta.get("description", ""))
    text += f"; {meta['n_trainable']:,} trainable parameters in {len(meta['blocks'])} blocks"
    if "test_accuracy" in meta:
        text += f"; clean test accuracy {meta['test_accuracy']:.3f}"
    text += f"; one-block λ = {meta['lam_scalar']:.3g}"
    return text


def _markdown(
    rows: List[Dict[str, Any]],
    info: Dict[str, str],
    command: str,
    descriptions: Dict[str, str],
    seconds: float,
    gpu: bool,
) -> str:
    lines = [
        f"Measured on {info['date']} by `{command}` ({seconds / 60:.1f} min in all).",
        "",
        f"Machine: {info['cpu']}, {info['memory']}, GPU: {info['gpu']}. "
        f"Versions: Python {info['python']}, torch {info['torch']}, "
        f"pydvl-datainf {info['pydvl-datainf']}, pyDVL {info['pyDVL']}, "
        f"transformers {info['transformers']}, peft {info['peft']}, "
        f"dattri {info['dattri']}, kronfluence {info['kronfluence']}.",
        "",
        "Jobs:",
        "",
    ]
    for job, text in descriptions.items():
        lines.append(f"* **{job}** — {text} ({JOBS[job].threads} torch thread(s)).")
    lines += ["", report.markdown_table(rows, gpu=gpu), ""]
    configs = [
        f"* {r['job']} / {r['tool']}: {r['config']}"
        for r in rows
        if r.get("status") == "ok" and r.get("config")
    ]
    same = [
        f"{r['job']}/{r['tool']} {r['rel_err_same_lambda']:.2g}"
        for r in rows
        if r.get("rel_err_same_lambda") is not None
    ]
    if same:
        lines += [
            "Relative error against ours with the same one λ (identical maths): "
            + ", ".join(same)
            + ".",
            "",
        ]
    lines += ["<details><summary>Configuration of every run</summary>", ""]
    lines += configs + ["", "</details>"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
