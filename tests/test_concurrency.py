"""Real concurrency: two processes started at the same moment, many times over,
on one path. Claims must be exclusive, and whatever the interleaving, no
process reads or returns another's data without an error.

The processes (a pool of two, started once) run tests/concurrency_workers.py;
each round gives them a start time a little in the future, so that they leave
a busy wait together.
"""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import time

import pytest
import torch

import concurrency_workers as W
from models import fit_zarr, loader
from pydvl_datainf import DataInfInfluence, influence_matrix
from pydvl_datainf.storage import ZarrGradientStore
from reference import rel_err

ROUNDS = 8
TESTS = str(pathlib.Path(__file__).resolve().parent)


@pytest.fixture(scope="module")
def pool():
    env = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([TESTS, *filter(None, [env])])
    try:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(2) as p:
            p.starmap(time.sleep, [(0.0,), (0.0,)])  # both started and idle
            yield p
    finally:
        os.environ["PYTHONPATH"] = env


def together(pool, fn, *args_per_process):
    start = time.time() + 0.5
    jobs = [pool.apply_async(fn, (*args, start)) for args in args_per_process]
    return [j.get(timeout=120) for j in jobs]


def expected_scores(seed):
    model, loss, x, y, xt, yt = W._case(seed)
    infl = DataInfInfluence(model, loss, progress=False).fit(loader(x, y, bs=5))
    return infl.train_influences(xt, yt)


@pytest.fixture(scope="module")
def expected():
    return {seed: expected_scores(seed) for seed in (1, 2)}


def reopened_scores(path):
    model, loss, *_, xt, yt = W._case(0)
    infl = DataInfInfluence.from_store(model, loss, path, progress=False)
    return infl.train_influences(xt, yt)


def test_two_fits_into_one_new_path_one_wins(pool, expected, tmp_path):
    for r in range(ROUNDS):
        path = str(tmp_path / f"g{r}.zarr")
        results = together(pool, W.fit, (path, 1, False), (path, 2, False))
        won = [res for res in results if res["fit"] == "ok"]
        lost = [res for res in results if res["fit"] != "ok"]
        assert len(won) == 1, results
        assert lost[0]["fit"] == "StoreExistsError", lost[0]
        winner = won[0]
        assert winner["query"] == "ok"
        assert rel_err(winner["scores"], expected[winner["seed"]]) < 1e-12
        assert ZarrGradientStore.open(path).verify() > 0
        assert rel_err(reopened_scores(path), expected[winner["seed"]]) < 1e-12


def test_two_overwriting_fits_never_mix(pool, expected, tmp_path):
    for r in range(ROUNDS):
        path = str(tmp_path / f"g{r}.zarr")
        model, loss, x, y, *_ = W._case(0)
        fit_zarr(model, loss, x, y, path, chunk_rows=4)  # an old store to replace
        results = together(pool, W.fit, (path, 1, True), (path, 2, True))
        allowed = {"ok", "StoreExistsError", "StoreReplacedError"}
        assert all(res["fit"] in allowed for res in results), results
        assert any(res["fit"] == "ok" for res in results), results
        for res in results:
            if res["fit"] == "ok" and res["query"] == "ok":  # right, or refused
                assert rel_err(res["scores"], expected[res["seed"]]) < 1e-12
            elif res["fit"] == "ok":
                assert res["query"] == "StoreReplacedError", res
        # what is left at the path is one whole store, of one of the fits
        ZarrGradientStore.open(path).verify()
        final = reopened_scores(path)
        assert min(rel_err(final, expected[s]) for s in (1, 2)) < 1e-12


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("store") / "g.zarr")
    model, loss, x, y, *_ = W._case(0)
    fit_zarr(model, loss, x, y, path, chunk_rows=4, bs=5)
    return path


def reference_matrix(store, path):
    model, loss, *_, xt, yt = W._case(0)
    infl = DataInfInfluence.from_store(model, loss, store, progress=False)
    return influence_matrix(
        infl,
        (xt, yt),
        path,
        test_rows=2,
        train_rows=4,
        dtype="float64",
        progress=False,
    ).load()


def test_two_matrices_into_one_path_one_wins(pool, store, tmp_path):
    want = reference_matrix(store, str(tmp_path / "ref.zarr"))
    for r in range(ROUNDS):
        out = str(tmp_path / f"m{r}.zarr")
        results = together(
            pool, W.matrix, (store, out, 1, False), (store, out, 2, False)
        )
        kinds = sorted(res["matrix"] for res in results)
        assert kinds == ["StoreExistsError", "ok"], results
        model, loss, *_, xt, yt = W._case(0)
        infl = DataInfInfluence.from_store(model, loss, store, progress=False)
        done = influence_matrix(infl, (xt, yt), out, resume=True, progress=False)
        assert done.tiles_computed == 0
        assert rel_err(done.load(), want) < 1e-12


def test_two_resumes_of_one_matrix_finish_it(pool, store, tmp_path, monkeypatch):
    from pydvl_datainf.scoring.tiles import TileOutput

    want = reference_matrix(store, str(tmp_path / "ref.zarr"))
    model, loss, *_, xt, yt = W._case(0)
    infl = DataInfInfluence.from_store(model, loss, store, progress=False)
    write = TileOutput.write_tile
    calls = {"n": 0}

    def stop_after_two(self, g, c, tile):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        write(self, g, c, tile)

    for r in range(ROUNDS):
        out = str(tmp_path / f"m{r}.zarr")
        calls["n"] = 0

        monkeypatch.setattr(TileOutput, "write_tile", stop_after_two)
        with pytest.raises(KeyboardInterrupt):
            influence_matrix(
                infl,
                (xt, yt),
                out,
                test_rows=2,
                train_rows=4,
                dtype="float64",
                progress=False,
            )
        monkeypatch.setattr(TileOutput, "write_tile", write)
        results = together(pool, W.matrix, (store, out, 1, True), (store, out, 2, True))
        assert all(res["matrix"] == "ok" for res in results), results
        done = influence_matrix(infl, (xt, yt), out, resume=True, progress=False)
        assert done.tiles_computed == 0
        assert rel_err(done.load(), want) < 1e-12
        assert torch.isfinite(done.load()).all()
