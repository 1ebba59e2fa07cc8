"""Fault injection for the influence matrix: ownership, atomicity, integrity,
test order. Each case is a way today's data could be lost or silently wrong."""

import os
import threading

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, TensorDataset

import pydvl_datainf.storage.format as format_module
from models import fit_zarr, make_case
from pydvl_datainf import influence_matrix, top_k
from pydvl_datainf.errors import StoreCorruptError, StoreExistsError
from pydvl_datainf.scoring.inputs import ShuffledTestDataError
from pydvl_datainf.scoring.tiles import TileOutput
from reference import DenseDataInf, rel_err

N, M = 30, 9


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model, loss, x, y, xt, yt = make_case("lora", n=N, m=M)
    path = tmp_path_factory.mktemp("store") / "g.zarr"
    infl = fit_zarr(model, loss, x, y, path, chunk_rows=8)
    ref = DenseDataInf(model, loss, x, y, infl.blocks.to_dict())
    return infl, ref, x, y, xt, yt, path


def run(infl, data, path, **kw):
    kw.setdefault("test_rows", 3)
    kw.setdefault("train_rows", 8)
    kw.setdefault("dtype", "float64")
    return influence_matrix(infl, data, path, progress=False, **kw)


def listing(path):
    return sorted(
        os.path.relpath(os.path.join(d, f), path)
        for d, _, fs in os.walk(path)
        for f in fs
    )


# ------------------------------------------------------------ ownership
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_users_directory_is_refused_and_kept(case, tmp_path, overwrite):
    infl, _, _, _, xt, yt, _ = case
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "sub").mkdir()
    (mine / "sub" / "data.csv").write_text("1,2,3")
    before = listing(mine)
    with pytest.raises(StoreExistsError, match="not created by pydvl-datainf"):
        run(infl, (xt, yt), mine, overwrite=overwrite)
    assert listing(mine) == before
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_a_foreign_zarr_group_is_refused_and_kept(case, tmp_path):
    infl, _, _, _, xt, yt, _ = case
    path = tmp_path / "other.zarr"
    g = zarr.open_group(str(path), mode="w")
    g.create_array("x", shape=(3,), dtype="float32")[:] = [1, 2, 3]
    with pytest.raises(StoreExistsError):
        run(infl, (xt, yt), path, overwrite=True)
    assert list(zarr.open_group(str(path), mode="r")["x"][:]) == [1, 2, 3]


def test_overwrite_never_touches_the_live_gradient_store(case, tmp_path):
    infl, ref, x, y, xt, yt, store_path = case
    before = listing(store_path)
    want = infl.influences(xt, yt, x, y)
    with pytest.raises(StoreExistsError, match="gradient store"):
        run(infl, (xt, yt), store_path, overwrite=True)
    with pytest.raises(StoreExistsError, match="gradient store"):
        run(infl, (xt, yt), store_path / "inside.zarr", overwrite=True)
    assert listing(store_path) == before
    assert torch.equal(infl.influences(xt, yt, x, y), want)


def test_overwrite_replaces_only_our_matrix(case, tmp_path):
    infl, ref, x, y, xt, yt, _ = case
    path = tmp_path / "m.zarr"
    first = run(infl, (xt, yt), path)
    with pytest.raises(StoreExistsError, match="resume=True"):
        run(infl, (xt, yt), path)
    again = run(infl, (xt[:4], yt[:4]), path, overwrite=True)
    assert again.n_test == 4 and first.n_test == M
    assert rel_err(again.load(), ref.influences(xt[:4], yt[:4], x, y)) < 1e-8
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


# ------------------------------------------------------------ existence errors
def test_an_error_is_never_taken_for_absence(case, tmp_path, monkeypatch):
    infl, _, _, _, xt, yt, _ = case
    path = tmp_path / "m.zarr"
    done = run(infl, (xt, yt), path)
    want = done.load()
    real = format_module._listing

    def flaky(p, options):
        if os.fspath(p) == os.fspath(path):
            raise ConnectionError("credentials expired")
        return real(p, options)

    monkeypatch.setattr(format_module, "_listing", flaky)
    for kw in ({"resume": True}, {"overwrite": True}, {}):
        with pytest.raises(ConnectionError, match="credentials"):
            run(infl, (xt, yt), path, **kw)
    monkeypatch.setattr(format_module, "_listing", real)
    assert torch.equal(done.load(), want)


# ------------------------------------------------------------ atomicity
def test_a_call_that_fails_early_leaves_nothing(case, tmp_path, monkeypatch):
    infl, ref, x, y, xt, yt, _ = case
    path = tmp_path / "m.zarr"

    def broken(x, y):
        raise RuntimeError("GPU fell off the bus")

    monkeypatch.setattr(infl, "gradients", broken)
    with pytest.raises(RuntimeError, match="bus"):
        run(infl, (xt, yt), path)
    monkeypatch.undo()
    assert not path.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    res = run(infl, (xt, yt), path)  # the retry needs no flag
    assert rel_err(res.load(), ref.influences(xt, yt, x, y)) < 1e-8


def test_a_call_that_fails_late_is_resumable(case, tmp_path, monkeypatch):
    infl, ref, x, y, xt, yt, _ = case
    path = tmp_path / "m.zarr"
    full = run(infl, (xt, yt), tmp_path / "full.zarr")
    real = infl.gradients
    calls = []

    def fails_on_second_group(x, y):
        calls.append(len(x))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(x, y)

    monkeypatch.setattr(infl, "gradients", fails_on_second_group)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(infl, (xt, yt), path, batch_size=3)
    monkeypatch.undo()
    assert path.exists()
    with pytest.raises(StoreExistsError, match="resume=True"):
        run(infl, (xt, yt), path)
    res = run(infl, (xt, yt), path, resume=True)
    assert res.factor_groups_computed == 2
    # group 0's test gradients were computed in batches of 3, the others in
    # one batch: equal up to rounding, not bit for bit
    assert rel_err(res.load(), full.load()) < 1e-12


def test_concurrent_starters_get_store_exists_error(case, tmp_path):
    infl, ref, x, y, xt, yt, _ = case
    path = tmp_path / "m.zarr"
    barrier = threading.Barrier(4)
    outcomes = []

    def start():
        barrier.wait()
        try:
            run(infl, (xt, yt), path)
            outcomes.append("ok")
        except Exception as e:  # noqa: BLE001 - the type is what we test
            outcomes.append(type(e).__name__)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["StoreExistsError"] * 3 + ["ok"]
    res = run(infl, (xt, yt), path, resume=True)
    assert res.tiles_computed == 0
    assert rel_err(res.load(), ref.influences(xt, yt, x, y)) < 1e-8


def test_resuming_a_complete_matrix_needs_no_write_access(case, tmp_path, monkeypatch):
    infl, ref, x, y, xt, yt, _ = case
    path = tmp_path / "m.zarr"
    full = run(infl, (xt, yt), path)
    real_open = TileOutput.open.__func__

    def read_only(cls, p, mode="r", storage_options=None):
        if mode != "r":
            raise PermissionError(f"read-only file system: {p}")
        return real_open(cls, p, mode, storage_options)

    monkeypatch.setattr(TileOutput, "open", classmethod(read_only))
    real_zarr_open = zarr.open_group

    def no_writes(*args, **kw):
        if kw.get("mode", "r") != "r":
            raise PermissionError("read-only file system")
        return real_zarr_open(*args, **kw)

    monkeypatch.setattr(zarr, "open_group", no_writes)
    res = run(infl, (xt, yt), path, resume=True)
    assert res.tiles_computed == 0 and res.tiles_skipped == res.tiles
    assert torch.equal(res.load(), full.load())


# ------------------------------------------------------------ test order
def test_a_shuffling_loader_is_refused(case, tmp_path):
    infl, _, _, _, xt, yt, _ = case
    loader = DataLoader(TensorDataset(xt, yt), batch_size=4, shuffle=True)
    with pytest.raises(ShuffledTestDataError, match="shuffle=False"):
        run(infl, loader, tmp_path / "m.zarr")
    assert not (tmp_path / "m.zarr").exists()


def test_test_data_that_change_order_between_passes_raise(case, tmp_path):
    infl, _, _, _, xt, yt, _ = case

    class Reorders:
        passes = 0

        def __iter__(self):
            self.passes += 1
            order = torch.arange(M) if self.passes == 1 else torch.arange(M).flip(0)
            for i in range(0, M, 3):
                idx = order[i : i + 3]
                yield xt[idx], yt[idx]

    with pytest.raises(ShuffledTestDataError, match="changed order"):
        run(infl, Reorders(), tmp_path / "m.zarr")


def test_a_sequential_loader_gives_rows_in_order(case, tmp_path):
    infl, ref, x, y, xt, yt, _ = case
    loader = DataLoader(TensorDataset(xt, yt), batch_size=4)
    res = run(infl, loader, tmp_path / "m.zarr")
    assert rel_err(res.load(), ref.influences(xt, yt, x, y)) < 1e-8


# ------------------------------------------------------------ integrity
def chunk_file(path, array, *coords):
    return os.path.join(path, *array.split("/"), "c", *map(str, coords))


def test_every_chunk_is_checksummed_and_a_manifest_is_written_last(case, tmp_path):
    infl, _, _, _, xt, yt, _ = case
    path = tmp_path / "m.zarr"
    run(infl, (xt, yt), path)
    group = zarr.open_group(str(path), mode="r")
    for name in ("matrix", "done", "factors_done", "factors/0"):
        codecs = [type(c).__name__ for c in group[name].metadata.codecs]
        assert "Crc32cCodec" in codecs, name
    assert set(group.attrs["manifest"]) >= {"matrix", "done", "factors_done"}
    assert group.attrs["complete"] is True
    assert group.attrs["format"] == "pydvl_datainf.influence_matrix"


def test_a_missing_tile_raises_naming_it_then_resume_recomputes(case, tmp_path):
    infl, _, _, _, xt, yt, _ = case
    path = tmp_path / "m.zarr"
    full = run(infl, (xt, yt), path)
    want = full.load()
    os.remove(chunk_file(path, "matrix", 1, 2))
    with pytest.raises(StoreCorruptError, match=r"'matrix', chunk \(1, 2\) is missing"):
        full.load()
    with pytest.raises(StoreCorruptError, match="resume=True"):
        top_k(full, 3, progress=False)
    res = run(infl, (xt, yt), path, resume=True)
    assert res.tiles_computed == 1
    assert torch.equal(res.load(), want)


def test_a_corrupt_tile_raises_naming_it_then_verify_repairs(case, tmp_path):
    infl, _, _, _, xt, yt, _ = case
    path = tmp_path / "m.zarr"
    full = run(infl, (xt, yt), path)
    want = full.load()
    f = chunk_file(path, "matrix", 2, 1)
    raw = bytearray(open(f, "rb").read())
    raw[5] ^= 0xFF
    open(f, "wb").write(bytes(raw))
    with pytest.raises(StoreCorruptError, match=r"'matrix', chunk \(2, 1\) is corrupt"):
        full.load()
    with pytest.raises(StoreCorruptError, match="verify=True"):
        full.verify()
    res = run(infl, (xt, yt), path, resume=True, verify=True)
    assert res.tiles_computed == 1
    assert torch.equal(res.load(), want)
    res.verify()


def test_corrupt_factors_are_recomputed_by_verify(case, tmp_path):
    infl, _, _, _, xt, yt, _ = case
    path = tmp_path / "m.zarr"
    full = run(infl, (xt, yt), path)
    want = full.load()
    f = chunk_file(path, "factors/0", 1, 0)
    raw = bytearray(open(f, "rb").read())
    raw[3] ^= 0x55
    open(f, "wb").write(bytes(raw))
    group = zarr.open_group(str(path), mode="r+")
    group["done"][1, 0] = 0  # that group's tile needs its factors again
    group.attrs["complete"] = False
    with pytest.raises(StoreCorruptError, match=r"factors/0', chunk \(1, 0\)"):
        run(infl, (xt, yt), path, resume=True)
    res = run(infl, (xt, yt), path, resume=True, verify=True)
    assert res.factor_groups_computed == 1
    assert torch.equal(res.load(), want)


def test_a_shrunken_matrix_is_refused(case, tmp_path):
    infl, _, _, _, xt, yt, _ = case
    path = tmp_path / "m.zarr"
    full = run(infl, (xt, yt), path)
    group = zarr.open_group(str(path), mode="r+")
    group["matrix"].resize((M, 16))
    with pytest.raises(StoreCorruptError):
        top_k(full, 3, progress=False)
    assert np.isfinite(np.asarray(group["done"][:])).all()
