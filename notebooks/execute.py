"""Execute the tutorial notebooks in full or reduced mode.

    python notebooks/execute.py --mode full --inplace          # refresh outputs
    python notebooks/execute.py --mode reduced --out /tmp/nb   # what CI runs
    python notebooks/execute.py --mode full --inplace --timeout 14400 3_influential_data

The mode reaches the notebooks through the environment variable
`DATAINF_NOTEBOOK_MODE` (`full` is the default when a notebook is opened by
hand). `--inplace` overwrites the notebooks with their new outputs (the docs
render these); otherwise executed copies go to `--out`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def notebooks(names: list[str] | None = None) -> list[Path]:
    """The tutorial notebooks, in order (or those named)."""
    found = sorted(HERE.glob("[0-9]*.ipynb"))
    if names:
        found = [p for p in found if p.name in names or p.stem in names]
    return found


def execute(path: Path, mode: str, out: Path, timeout: int = 10800) -> float:
    """Run one notebook with `DATAINF_NOTEBOOK_MODE=mode`; write it to `out`.

    Returns:
        The wall time in seconds.
    """
    import nbformat
    from nbclient import NotebookClient

    os.environ["DATAINF_NOTEBOOK_MODE"] = mode
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    book = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        book,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(book, out)
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    ap.add_argument("--mode", choices=["full", "reduced"], default="reduced")
    ap.add_argument(
        "--timeout", type=int, default=10800, help="seconds allowed to one cell"
    )
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--inplace", action="store_true", help="overwrite the notebooks")
    where.add_argument("--out", type=Path, default=Path("out/notebooks"))
    args = ap.parse_args(argv)
    for path in notebooks(args.names):
        target = path if args.inplace else args.out / path.name
        seconds = execute(path, args.mode, target, args.timeout)
        print(
            f"{path.name}: {args.mode} mode in {seconds:.0f} s -> {target}", flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
