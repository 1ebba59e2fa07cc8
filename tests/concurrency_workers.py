"""What the processes of tests/test_concurrency.py run: each call waits for a
start time shared with the other process, then fits, writes a matrix or
resumes one, and reports what happened (never raises)."""

from __future__ import annotations

import time
from typing import Any, Dict

import torch

from models import loader, make_case

N, M = 24, 6


def _wait(start: float) -> None:
    while time.time() < start:  # both processes leave this loop together
        pass


def _case(seed: int):
    model, loss, x, y, xt, yt = make_case("lora", n=N, m=M)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(N, generator=g)  # each process fits its own order
    return model, loss, x[order], y[order], xt, yt


def fit(path: str, seed: int, overwrite: bool, start: float) -> Dict[str, Any]:
    """Fit into `path`; report the outcome and, if it worked, a query on it."""
    from pydvl_datainf import DataInfInfluence

    torch.set_num_threads(1)
    model, loss, x, y, xt, yt = _case(seed)
    infl = DataInfInfluence(
        model,
        loss,
        progress=False,
        store="zarr",
        store_path=path,
        store_options={"overwrite": overwrite, "chunk_rows": 4},
    )
    _wait(start)
    try:
        infl.fit(loader(x, y, bs=5))
    except Exception as e:  # reported to the parent
        return {"seed": seed, "fit": type(e).__name__, "message": str(e)}
    try:
        scores = infl.train_influences(xt, yt)
    except Exception as e:
        return {"seed": seed, "fit": "ok", "query": type(e).__name__}
    return {"seed": seed, "fit": "ok", "query": "ok", "scores": scores}


def matrix(
    store: str, out: str, seed: int, resume: bool, start: float
) -> Dict[str, Any]:
    """Write (or resume) an influence matrix at `out` from the store's model."""
    from pydvl_datainf import DataInfInfluence, influence_matrix

    torch.set_num_threads(1)
    model, loss, *_, xt, yt = _case(0)
    infl = DataInfInfluence.from_store(model, loss, store, progress=False)
    _wait(start)
    try:
        result = influence_matrix(
            infl,
            (xt, yt),
            out,
            resume=resume,
            test_rows=2,
            train_rows=4,
            dtype="float64",
            progress=False,
        )
    except Exception as e:
        return {"seed": seed, "matrix": type(e).__name__, "message": str(e)}
    return {"seed": seed, "matrix": "ok", "computed": result.tiles_computed}
