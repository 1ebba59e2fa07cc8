"""The streaming, resumable influence matrix and the helpers built on it."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

import pydvl_datainf.scoring.tiles as matrix_module
from models import TokenModel, fit_zarr, loader, make_case
from pydvl_datainf import (
    DataInfInfluence,
    StoreExistsError,
    StoreMismatchError,
    influence_matrix,
    mean_test_influence,
    self_influence,
    top_k,
)
from pydvl_datainf.storage.digests import place_mark
from reference import DenseDataInf, rel_err

TESTS = os.path.dirname(os.path.abspath(__file__))
N, M = 30, 9


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model, loss, x, y, xt, yt = make_case("lora", n=N, m=M)
    path = tmp_path_factory.mktemp("store") / "g.zarr"
    infl = fit_zarr(model, loss, x, y, path, chunk_rows=8)
    ref = DenseDataInf(model, loss, x, y, infl.blocks.to_dict())
    return infl, ref, x, y, xt, yt, path


def fitted(kind, model, loss, x, y, tmp_path):
    kw = {"memory": {}, "recompute": {"store": "recompute"}}.get(
        kind, {"store": "zarr", "store_path": tmp_path / f"{kind}.zarr"}
    )
    return DataInfInfluence(model, loss, progress=False, **kw).fit(loader(x, y))


@pytest.mark.parametrize("kind", ["memory", "zarr", "recompute"])
@pytest.mark.parametrize("tiles", [(None, None), (4, 8), (2, 5)])
def test_matrix_equals_reference(kind, tiles, case, tmp_path):
    infl0, ref, x, y, xt, yt, _ = case
    infl = fitted(kind, infl0.model, infl0.loss, x, y, tmp_path)
    res = influence_matrix(
        infl,
        (xt, yt),
        tmp_path / "m.zarr",
        test_rows=tiles[0],
        train_rows=tiles[1],
        dtype="float64",
        batch_size=4,
        progress=False,
    )
    expected = ref.influences(xt, yt, x, y)
    got = res.load()
    assert got.shape == (M, N) and got.dtype == torch.float64
    assert rel_err(got, expected) < 1e-8
    t_rows, c_rows = tiles[0] or M, tiles[1] or N
    assert res.array.chunks == (t_rows, c_rows)
    n_tiles = -(-M // t_rows) * -(-N // res.train_rows)
    assert res.tiles == res.tiles_computed == n_tiles and res.tiles_skipped == 0
    assert zarr.open_group(str(tmp_path / "m.zarr"), mode="r").attrs["complete"]


def test_float32_default_output_and_dtype_checks(case, tmp_path):
    infl, ref, x, y, xt, yt, _ = case
    res = influence_matrix(infl, (xt, yt), tmp_path / "a.zarr", progress=False)
    assert res.array.dtype == np.float32
    assert rel_err(res.load(), ref.influences(xt, yt, x, y)) < 1e-6
    with pytest.raises(ValueError, match="float type"):
        influence_matrix(infl, (xt, yt), tmp_path / "b.zarr", dtype="int64")
    with pytest.raises(ValueError, match="not both"):
        influence_matrix(
            infl, (xt, yt), tmp_path / "a.zarr", resume=True, overwrite=True
        )


def test_loader_test_data_and_factor_groups(case, tmp_path):
    infl, ref, x, y, xt, yt, _ = case
    res = influence_matrix(
        infl, loader(xt, yt, 2), tmp_path / "m.zarr", test_rows=3, progress=False
    )
    assert res.factor_groups_computed == 3
    assert rel_err(res.load(), ref.influences(xt, yt, x, y)) < 1e-6
    stored = zarr.open_group(str(tmp_path / "m.zarr"), mode="r")
    assert rel_err(
        torch.cat(
            [torch.from_numpy(stored[f"factors/{i}"][:]) for i in range(2)], dim=1
        ),
        ref.factors(xt, yt)[:, : sum(infl.blocks.sizes[:2])],
    ) < (1e-8)


class CountingLoader:
    """A loader that counts the passes over it (iterations that yield a batch)."""

    def __init__(self, x, y, bs):
        self.inner = loader(x, y, bs)
        self.passes = 0

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            self.passes += i == 0
            yield batch

    def __len__(self):
        return len(self.inner)


def test_recompute_matrix_costs_two_passes(case, tmp_path):
    infl0, ref, x, y, xt, yt, _ = case
    train = CountingLoader(x, y, 4)
    infl = DataInfInfluence(infl0.model, infl0.loss, progress=False, store="recompute")
    infl.fit(train)
    assert train.passes == 1
    res = influence_matrix(
        infl, (xt, yt), tmp_path / "m.zarr", train_rows=5, progress=False
    )
    assert train.passes == 3  # fit + exactly two for the matrix
    assert rel_err(res.load(), ref.influences(xt, yt, x, y)) < 1e-6


def test_existing_resume_overwrite(case, tmp_path):
    infl, ref, x, y, xt, yt, _ = case
    path = tmp_path / "m.zarr"
    first = influence_matrix(infl, (xt, yt), path, test_rows=4, progress=False)
    before = first.load()
    with pytest.raises(StoreExistsError, match="resume=True.*overwrite=True"):
        influence_matrix(infl, (xt, yt), path, progress=False)
    again = influence_matrix(infl, (xt, yt), path, resume=True, progress=False)
    assert again.tiles_computed == 0 and again.tiles_skipped == first.tiles
    assert again.factor_groups_computed == 0 and again.test_rows == 4
    over = influence_matrix(
        infl, (xt, yt), path, overwrite=True, test_rows=M, progress=False
    )
    assert over.tiles_computed == over.tiles and over.test_rows == M
    assert torch.equal(over.load(), before)


def test_resume_refuses_other_inputs(case, tmp_path):
    infl, ref, x, y, xt, yt, store_path = case
    path = tmp_path / "m.zarr"
    influence_matrix(infl, (xt, yt), path, test_rows=4, progress=False)
    with pytest.raises(StoreMismatchError, match="other test data"):
        influence_matrix(infl, (xt + 1, yt), path, resume=True, progress=False)
    with pytest.raises(StoreMismatchError, match="another dtype"):
        influence_matrix(
            infl, (xt, yt), path, resume=True, dtype="float64", progress=False
        )
    with pytest.raises(StoreMismatchError, match="another test_rows"):
        influence_matrix(infl, (xt, yt), path, resume=True, test_rows=2)
    model2, loss, *_ = make_case("lora", n=N, m=M, seed=3)  # other weights
    other = DataInfInfluence(model2, loss, progress=False).fit(loader(x, y))
    with pytest.raises(StoreMismatchError, match="other weights"):
        influence_matrix(other, (xt, yt), path, resume=True, progress=False)
    with pytest.raises(StoreMismatchError, match="not a pydvl-datainf"):
        influence_matrix(infl, (xt, yt), store_path, resume=True, progress=False)


def test_torn_done_mark_counts_as_not_done(case, tmp_path):
    infl, ref, x, y, xt, yt, _ = case
    path = tmp_path / "m.zarr"
    full = influence_matrix(
        infl, (xt, yt), path, test_rows=5, train_rows=8, progress=False
    )
    group = zarr.open_group(str(path), mode="r+")
    # a tile whose data were half written and never marked: garbage, unmarked
    group["matrix"][0:5, 8:16] = np.nan
    group["done"][0, 1] = 0
    # a mark whose own write was torn (an empty chunk file)
    with open(os.path.join(path, "done", "c", "1", "2"), "wb"):
        pass
    res = influence_matrix(infl, (xt, yt), path, resume=True, progress=False)
    assert res.tiles_computed == 2 and res.tiles_skipped == full.tiles - 2
    assert torch.equal(res.load(), full.load())


CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    import zarr
    from models import TokenModel, fit_zarr, loader, make_case
    import pydvl_datainf.scoring.tiles as M
    from pydvl_datainf import DataInfInfluence, influence_matrix

    model, loss, x, y, xt, yt = make_case("lora", n={n}, m={m})
    infl = DataInfInfluence.from_store(model, loss, {store!r}, progress=False)
    mode, at = {mode!r}, {at}
    original = M.mark_done
    calls = {{"tile": 0, "factor": 0}}

    def mark(done, index, value):
        kind = "tile" if len(index) == 2 else "factor"
        calls[kind] += 1
        if mode == "self" and kind == "tile" and calls[kind] == at:
            # the tile's data are written; scribble on half of it, then die
            # before the mark, as if killed in the middle of the write
            g, c = index
            arr = zarr.open_group({out!r}, mode="r+")["matrix"]
            arr[g * 3 : g * 3 + 1, c * 8 : c * 8 + 8] = float("nan")
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "slow":
            time.sleep(0.15)
        original(done, index, value)

    M.mark_done = mark
    influence_matrix(infl, (xt, yt), {out!r}, test_rows=3, train_rows=8,
                     dtype="float64", progress=False)
    print("finished")
    """
)


def run_child(mode, at, store, out, wait_for_tiles=None):
    code = CHILD.format(
        tests=TESTS, n=N, m=M, store=str(store), out=str(out), mode=mode, at=at
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    if wait_for_tiles is None:
        proc.wait(timeout=120)
        return proc, None
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline:
        try:
            done = int(np.sum(zarr.open_group(str(out), mode="r")["done"][:] != 0))
        except Exception:
            done = 0
        if done >= wait_for_tiles or proc.poll() is not None:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 from outside, mid-run
    proc.wait(timeout=30)
    return proc, done


def uninterrupted(infl, xt, yt, path):
    return influence_matrix(
        infl,
        (xt, yt),
        path,
        test_rows=3,
        train_rows=8,
        dtype="float64",
        progress=False,
    )


def test_kill_9_during_a_tile_write_then_resume(case, tmp_path):
    infl, ref, x, y, xt, yt, store = case
    torch.set_num_threads(1)
    full = uninterrupted(infl, xt, yt, tmp_path / "full.zarr")
    out = tmp_path / "killed.zarr"
    proc, _ = run_child("self", 5, store, out)
    assert proc.returncode == -signal.SIGKILL
    done = zarr.open_group(str(out), mode="r")["done"][:]
    assert (done != 0).sum() == 4  # four tiles finished; the fifth was torn
    res = influence_matrix(infl, (xt, yt), out, resume=True, progress=False)
    assert res.tiles_skipped == 4 and res.tiles_computed == full.tiles - 4
    assert res.factor_groups_computed == 0
    assert torch.equal(res.load(), full.load())
    assert rel_err(res.load(), ref.influences(xt, yt, x, y)) < 1e-8


def test_crash_during_factors_then_resume(case, tmp_path, monkeypatch):
    infl, ref, x, y, xt, yt, store = case
    full = uninterrupted(infl, xt, yt, tmp_path / "full.zarr")
    out = tmp_path / "crashed.zarr"
    original, calls = matrix_module.mark_done, []

    def mark(done, index, value):
        calls.append(index)
        if len(calls) == 2:  # group 1's factors are written, not yet marked
            raise KeyboardInterrupt
        original(done, index, value)

    monkeypatch.setattr(matrix_module, "mark_done", mark)
    with pytest.raises(KeyboardInterrupt):
        uninterrupted(infl, xt, yt, out)
    monkeypatch.setattr(matrix_module, "mark_done", original)
    res = influence_matrix(infl, (xt, yt), out, resume=True, progress=False)
    assert res.factor_groups_computed == 2  # groups 1 and 2; group 0 was done
    assert res.tiles_computed == full.tiles
    assert torch.equal(res.load(), full.load())


def test_kill_9_from_outside_then_resume(case, tmp_path):
    infl, ref, x, y, xt, yt, store = case
    torch.set_num_threads(1)
    full = uninterrupted(infl, xt, yt, tmp_path / "full.zarr")
    out = tmp_path / "killed.zarr"
    proc, _ = run_child("slow", 0, store, out, wait_for_tiles=3)
    assert proc.returncode == -signal.SIGKILL
    done = int((zarr.open_group(str(out), mode="r")["done"][:] != 0).sum())
    assert 3 <= done < full.tiles
    res = influence_matrix(infl, (xt, yt), out, resume=True, progress=False)
    assert res.tiles_computed == full.tiles - done and res.tiles_skipped == done
    assert torch.equal(res.load(), full.load())


def test_integer_token_inputs_give_float_results(tmp_path):
    torch.manual_seed(0)
    model = TokenModel().double()
    x = torch.randint(0, 50, (25, 6))
    y = torch.randint(0, 3, (25,))
    infl = DataInfInfluence(model, F.cross_entropy, progress=False)
    infl.fit(loader(x[:20], y[:20]))
    ref = DenseDataInf(model, F.cross_entropy, x[:20], y[:20], infl.blocks.to_dict())
    expected = ref.influences(x[20:], y[20:], x[:20], y[:20])
    assert expected.abs().max() > 1 and (expected != expected.round()).any()
    res = influence_matrix(infl, (x[20:], y[20:]), tmp_path / "m.zarr", progress=False)
    assert res.array.dtype == np.float32
    assert rel_err(res.load(), expected) < 1e-6
    r64 = influence_matrix(
        infl, (x[20:], y[20:]), tmp_path / "d.zarr", dtype=torch.float64, progress=False
    )
    assert rel_err(r64.load(), expected) < 1e-8


def test_top_k_most_and_least(case, tmp_path):
    infl, ref, x, y, xt, yt, _ = case
    expected = ref.influences(xt, yt, x, y)
    res = influence_matrix(
        infl,
        (xt, yt),
        tmp_path / "m.zarr",
        test_rows=4,
        dtype="float64",
        progress=False,
    )
    for largest in (True, False):
        want = torch.topk(expected, 5, dim=1, largest=largest)
        for source, data in (
            (res, None),
            (res.array, None),
            (str(tmp_path / "m.zarr"), None),
            (infl, (xt, yt)),
        ):
            got = top_k(source, 5, data, largest=largest, test_rows=4, progress=False)
            assert got.indices.shape == (M, 5)
            assert torch.equal(got.indices, want.indices)
            assert rel_err(got.values, want.values) < 1e-8
    assert top_k(res, 100, progress=False).indices.shape == (M, N)
    with pytest.raises(ValueError, match="test_data"):
        top_k(infl, 3)


@pytest.mark.parametrize("kind", ["memory", "zarr", "recompute"])
@pytest.mark.parametrize("method", ["gram", "pairs", "auto"])
def test_self_influence_is_the_diagonal(kind, method, case, tmp_path):
    infl0, ref, x, y, *_ = case
    infl = fitted(kind, infl0.model, infl0.loss, x, y, tmp_path)
    got = self_influence(infl, method=method, progress=False)
    expected = torch.diagonal(ref.influences(x, y, x, y))
    assert got.shape == (N,) and (got > 0).all()
    assert rel_err(got, expected) < 1e-8


def test_self_influence_auto_picks_pairs_for_wide_blocks(case, monkeypatch):
    infl, ref, x, y, *_ = case
    used = []
    original = torch.zeros

    def spy(*shape, **kw):
        used.append(shape)
        return original(*shape, **kw)

    monkeypatch.setattr(torch, "zeros", spy)
    self_influence(infl, memory_budget=1, progress=False)
    assert not any(len(s) == 2 and s[0] == s[1] > 1 for s in used)  # no d x d


def test_mean_test_influence_is_the_mean_row(case, tmp_path):
    infl0, ref, x, y, xt, yt, _ = case
    expected = ref.influences(xt, yt, x, y).mean(0)
    for kind in ("memory", "zarr", "recompute"):
        infl = fitted(kind, infl0.model, infl0.loss, x, y, tmp_path)
        got = mean_test_influence(infl, loader(xt, yt, 4), progress=False)
        assert got.shape == (N,)
        assert rel_err(got, expected) < 1e-8


def test_matrix_refuses_stale_model(tmp_path):
    model, loss, x, y, xt, yt = make_case("mlp", n=10, m=3)
    infl = DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    with torch.no_grad():
        next(model.parameters()).mul_(2)
    from pydvl_datainf import StaleModelError

    with pytest.raises(StaleModelError):
        influence_matrix(infl, (xt, yt), tmp_path / "m.zarr")


def test_done_mask_reads_marks(tmp_path):
    g = zarr.open_group(str(tmp_path / "d.zarr"), mode="w")
    d = g.create_array("done", shape=(2, 3), chunks=(1, 1), dtype="int64")
    matrix_module.mark_done(d, (1, 2), place_mark("r", "m", (1, 2), [7]))
    mask = matrix_module.done_mask(d)
    assert mask.tolist() == [[False] * 3, [False, False, True]]
