"""Gradient stores: memory, Zarr, recompute and auto give the same results."""

import os
import pickle

import numpy as np
import pytest
import torch
import zarr

from models import fit_zarr, loader, make_case
from pydvl_datainf import (
    AutoGradientStore,
    DataInfInfluence,
    MemoryGradientStore,
    NonFiniteGradientError,
    RecomputeGradientStore,
    StaleModelError,
    StoreExistsError,
    StoreMismatchError,
    ZarrGradientStore,
    __version__,
)
from reference import DenseDataInf, rel_err

KINDS = ["memory", "zarr", "recompute", "auto-memory", "auto-spill"]


def make(kind, model, loss, tmp_path, **kw):
    opts = {}
    if kind == "zarr":
        opts = dict(store="zarr", store_path=tmp_path / "g.zarr")
        opts["store_options"] = {"chunk_rows": 5}  # not a multiple of the batch
    elif kind == "recompute":
        opts = dict(store="recompute")
    elif kind == "auto-memory":
        opts = dict(store="auto", memory_budget="1GB", store_path=tmp_path / "a.zarr")
    elif kind == "auto-spill":
        opts = dict(store="auto", memory_budget=1, store_path=tmp_path / "a.zarr")
    return DataInfInfluence(model, loss, progress=False, **opts, **kw)


@pytest.fixture(scope="module")
def lora64():
    model, loss, x, y, xt, yt = make_case("lora", n=23, m=5)
    ref = DenseDataInf(
        model, loss, x, y, DataInfInfluence(model, loss).blocks.to_dict()
    )
    return model, loss, x, y, xt, yt, ref


@pytest.mark.parametrize("kind", KINDS)
def test_stores_equal_reference_float64(kind, lora64, tmp_path):
    model, loss, x, y, xt, yt, ref = lora64
    mem = make("memory", model, loss, tmp_path).fit(loader(x, y))
    infl = make(kind, model, loss, tmp_path).fit(loader(x, y))
    expected = {
        "memory": MemoryGradientStore,
        "zarr": ZarrGradientStore,
        "recompute": RecomputeGradientStore,
        "auto-memory": MemoryGradientStore,
        "auto-spill": ZarrGradientStore,
    }[kind]
    assert type(infl.store) is expected
    got = infl.influences(xt, yt, x, y)
    assert got.dtype == torch.float64
    assert rel_err(got, ref.influences(xt, yt, x, y)) < 1e-8
    assert rel_err(got, mem.influences(xt, yt, x, y)) < 1e-12
    assert rel_err(infl.train_influences(xt, yt), mem.train_influences(xt, yt)) < 1e-12
    assert (
        rel_err(infl.influence_factors(xt, yt), mem.influence_factors(xt, yt)) < 1e-12
    )
    # the memory store's norms come from rank-one factors: equal to rounding
    assert infl.block_regularization.keys() == mem.block_regularization.keys()
    for k, v in mem.block_regularization.items():
        assert infl.block_regularization[k] == pytest.approx(v, rel=1e-13)


@pytest.mark.parametrize("kind", ["zarr", "recompute", "auto-spill"])
def test_stores_equal_memory_float32(kind, tmp_path):
    model, loss, x, y, xt, yt = make_case("mlp", n=40, m=6)
    model = model.float()
    x, xt = x.float(), xt.float()
    mem = make("memory", model, loss, tmp_path).fit(loader(x, y))
    infl = make(kind, model, loss, tmp_path).fit(loader(x, y))
    a, b = infl.influences(xt, yt, x, y), mem.influences(xt, yt, x, y)
    assert a.dtype == torch.float32
    assert rel_err(a, b) < 1e-6
    assert rel_err(infl.train_influences(xt, yt), b) < 1e-6


def test_zarr_layout_and_metadata(lora64, tmp_path):
    model, loss, x, y, *_ = lora64
    infl = fit_zarr(model, loss, x, y, tmp_path / "g.zarr", chunk_rows=4)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="r")
    attrs = dict(group.attrs)
    assert attrs["format"] == "pydvl_datainf.gradient_store"
    assert attrs["block_names"] == infl.block_names
    assert attrs["block_sizes"] == infl.blocks.sizes
    assert attrs["n"] == attrs["n_train"] == len(x)
    assert attrs["dtype"] == "float64"
    assert attrs["chunk_rows"] == 4
    assert attrs["complete"] and attrs["finalized"]
    assert attrs["library_version"] == __version__
    assert attrs["weights_digest"] == infl._watch.digest
    assert attrs["regularization"] == infl.block_regularization
    assert attrs["block_structure"] == dict(infl.blocks.to_dict())
    for i, (k, d) in enumerate(zip(infl.block_names, infl.blocks.sizes)):
        arr = group[f"grads/{i}"]
        assert arr.shape == (len(x), d) and arr.chunks == (4, d)
        np.testing.assert_array_equal(
            group[f"norms/{i}"][:], infl.squared_norms[k].numpy()
        )
        np.testing.assert_allclose(arr[:], ref_grads(lora64)[k].numpy(), rtol=1e-10)


def ref_grads(case):
    return case[-1].train_grads


def test_fit_writes_whole_chunks_and_buffers_at_most_one(monkeypatch, tmp_path):
    model, loss, x, y, *_ = make_case("mlp", n=30)
    from pydvl_datainf.storage.zarr_writer import ZarrStoreWriter

    flushed, buffered = [], []
    orig_flush, orig_append = ZarrStoreWriter._flush, ZarrStoreWriter.append

    def flush(self, rows):
        flushed.append((self.n - self._buffered, rows))
        return orig_flush(self, rows)

    def append(self, grads):
        orig_append(self, grads)
        buffered.append(self._buffered)

    monkeypatch.setattr(ZarrStoreWriter, "_flush", flush)
    monkeypatch.setattr(ZarrStoreWriter, "append", append)
    DataInfInfluence(
        model,
        loss,
        progress=False,
        store="zarr",
        store_path=tmp_path / "g.zarr",
        store_options={"chunk_rows": 8},
    ).fit(loader(x, y, 3))
    # aligned writes: every flush starts on a chunk boundary; only the last is short
    assert flushed == [(0, 8), (8, 8), (16, 8), (24, 6)]
    assert max(buffered) < 8


@pytest.mark.parametrize("dtype,bound", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_half_precision_storage(dtype, bound, tmp_path):
    model, loss, x, y, xt, yt = make_case("lora", n=60, m=8)
    model, x, xt = model.float(), x.float(), xt.float()
    f32 = DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    half = DataInfInfluence(
        model,
        loss,
        progress=False,
        store="zarr",
        store_path=tmp_path / "h.zarr",
        store_dtype=dtype,
    ).fit(loader(x, y))
    assert half.store.dtype == getattr(torch, dtype)
    assert half.store.read(0, 2)[half.block_names[0]].dtype == torch.float32
    assert half.store.nbytes == f32.n_train * f32.n_parameters * 2
    err = rel_err(half.train_influences(xt, yt), f32.train_influences(xt, yt))
    assert 0 < err < bound  # rounded, but close; documented in docs/scaling-out.md
    for k, v in half.squared_norms.items():  # norms from the exact gradients
        # (f32's come from rank-one factors: equal up to float32 rounding)
        assert torch.allclose(v, f32.squared_norms[k], rtol=1e-5, atol=0)


def test_float16_overflow_is_refused(tmp_path):
    model, loss, x, y, *_ = make_case("regression", n=10)
    model, x, y = model.float(), x.float() * 1e4, y.float() * 1e6
    infl = DataInfInfluence(
        model,
        loss,
        progress=False,
        store="zarr",
        store_path=tmp_path / "h.zarr",
        store_dtype="float16",
    )
    with pytest.raises(NonFiniteGradientError, match="overflow float16.*bfloat16"):
        infl.fit(loader(x, y))


def test_from_store_reopens_without_refit(lora64, tmp_path):
    model, loss, x, y, xt, yt, ref = lora64
    fitted = DataInfInfluence(
        model, loss, progress=False, store="zarr", store_path=tmp_path / "g.zarr"
    ).fit(loader(x, y))
    again = DataInfInfluence.from_store(model, loss, tmp_path / "g.zarr")
    assert again.is_fitted and again.n_train == len(x)
    assert again.block_regularization == fitted.block_regularization
    assert rel_err(again.train_influences(xt, yt), ref.influences(xt, yt, x, y)) < 1e-8
    assert rel_err(again.influences(xt, yt, x, y), fitted.influences(xt, yt, x, y)) < (
        1e-12
    )
    other = DataInfInfluence.from_store(
        model, loss, tmp_path / "g.zarr", regularization=0.5
    )
    assert set(other.block_regularization.values()) == {0.5}


def test_from_store_refuses_other_weights_and_other_blocks(lora64, tmp_path):
    model, loss, x, y, *_ = lora64
    DataInfInfluence(
        model, loss, progress=False, store="zarr", store_path=tmp_path / "g.zarr"
    ).fit(loader(x, y))
    changed, *_ = make_case("lora", seed=1)  # same architecture, other weights
    with pytest.raises(StoreMismatchError, match="other weights"):
        DataInfInfluence.from_store(changed, loss, tmp_path / "g.zarr")
    mlp, *_ = make_case("mlp")  # other parameters altogether
    with pytest.raises(StoreMismatchError, match="other blocks"):
        DataInfInfluence.from_store(mlp, loss, tmp_path / "g.zarr")
    wider, *_ = make_case("lora")
    wider.l1.lora_A = torch.nn.Linear(6, 3, bias=False).double()  # other shapes
    wider.l1.lora_B = torch.nn.Linear(3, 8, bias=False).double()
    with pytest.raises(StoreMismatchError, match="other shapes"):
        DataInfInfluence.from_store(wider, loss, tmp_path / "g.zarr")


def test_an_interrupted_fit_leaves_the_path_as_it_was(tmp_path):
    model, loss, x, y, *_ = make_case("mlp", n=20)
    path = tmp_path / "g.zarr"

    def dying():
        yield x[:10], y[:10]
        raise KeyboardInterrupt  # the fit is killed half way

    infl = DataInfInfluence(
        model,
        loss,
        progress=False,
        store="zarr",
        store_path=path,
        store_options={"chunk_rows": 4},
    )
    with pytest.raises(KeyboardInterrupt):
        infl.fit(dying())
    assert not path.exists()  # nothing published, and nothing left beside it
    assert os.listdir(tmp_path) == []
    infl.fit(loader(x, y))
    before = DataInfInfluence.from_store(model, loss, path).influences(x[:3], y[:3])
    # a refit that dies keeps the finished store that was there
    with pytest.raises(KeyboardInterrupt):
        infl.fit(dying())
    again = DataInfInfluence.from_store(model, loss, path, progress=False)
    assert again.n_train == 20
    assert torch.equal(again.influences(x[:3], y[:3]), before)
    assert os.listdir(tmp_path) == ["g.zarr"]


def test_an_unfinished_store_is_refused(tmp_path):
    store = ZarrGradientStore(tmp_path / "g.zarr", ["w"], chunk_rows=4)
    store.append({"w": torch.randn(6, 2)})
    store.finalize(publish=False)
    with pytest.raises(FileNotFoundError):
        ZarrGradientStore.open(tmp_path / "g.zarr")  # still beside its path
    store.publish()
    with pytest.raises(StoreMismatchError, match="incomplete"):
        ZarrGradientStore.open(tmp_path / "g.zarr").load_fit_state()


def test_existing_store_refused_unless_overwrite(tmp_path):
    model, loss, x, y, xt, yt = make_case("mlp", n=20)
    path = tmp_path / "g.zarr"
    DataInfInfluence(model, loss, progress=False, store="zarr", store_path=path).fit(
        loader(x, y)
    )
    for kind in ("zarr", "auto"):
        with pytest.raises(StoreExistsError, match="overwrite"):
            DataInfInfluence(
                model, loss, progress=False, store=kind, store_path=path
            ).fit(loader(x, y))
    DataInfInfluence(
        model,
        loss,
        progress=False,
        store="zarr",
        store_path=path,
        store_options={"overwrite": True},
    ).fit(loader(x[:10], y[:10]))
    assert ZarrGradientStore.open(path).n == 10
    with pytest.raises(StoreMismatchError, match="not a pydvl-datainf"):
        zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
        ZarrGradientStore.open(tmp_path / "other.zarr")


def test_bad_store_arguments():
    model, loss, *_ = make_case("mlp")
    with pytest.raises(ValueError, match="store_path"):
        DataInfInfluence(model, loss, store="zarr")
    with pytest.raises(ValueError, match="one of"):
        DataInfInfluence(model, loss, store="disk")
    with pytest.raises(ValueError, match="store dtype"):
        DataInfInfluence(model, loss, store_dtype="int8")
    with pytest.raises(ValueError, match="store_options"):
        DataInfInfluence(model, loss, store_options={"chunks": 3})


def test_recompute_replays_the_loader_and_checks_it(tmp_path):
    model, loss, x, y, xt, yt = make_case("mlp", n=20)
    infl = DataInfInfluence(model, loss, progress=False, store="recompute")
    infl.fit(loader(x, y))
    assert infl.store.passes == 0 and infl.state.rows is None
    infl.influence_factors(xt, yt)
    assert infl.store.passes == 1
    infl.store.loader = loader(x.flip(0), y.flip(0))  # the data changed
    with pytest.raises(StoreMismatchError, match="other data than at fit"):
        infl.train_influences(xt, yt)
    infl.store.loader = loader(x[:14], y[:14])  # batches equal, fewer rows
    with pytest.raises(StoreMismatchError, match="yielded 14 rows"):
        infl.train_influences(xt, yt)


def test_recompute_store_take_and_read():
    model, loss, x, y, *_ = make_case("mlp", n=20)
    mem = DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    rc = DataInfInfluence(model, loss, progress=False, store="recompute")
    rc.fit(loader(x, y))
    idx = torch.tensor([13, 2, 2, 19, 0])
    for a, b in ((rc.store.take(idx), mem.store.take(idx)),):
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-12, atol=0)
    part = rc.store.read(5, 12)
    for k, v in part.items():
        assert torch.allclose(v, mem.store.data[k][5:12], rtol=1e-12, atol=0)
    starts = [s for s, _ in rc.store.chunks(6)]
    assert starts == [0, 6, 12, 18]


def test_auto_spills_when_size_is_unknown(tmp_path):
    model, loss, x, y, xt, yt = make_case("mlp", n=21)
    per_row = 8 * DataInfInfluence(model, loss).n_parameters

    def batches():  # a generator: no len(dataset) to estimate from
        for i in range(0, 21, 7):
            yield x[i : i + 7], y[i : i + 7]

    infl = DataInfInfluence(
        model,
        loss,
        progress=False,
        store="auto",
        memory_budget=10 * per_row,
        store_path=tmp_path / "s.zarr",
    ).fit(batches())
    assert isinstance(infl.store, ZarrGradientStore) and infl.store.n == 21
    mem = DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    assert rel_err(infl.train_influences(xt, yt), mem.train_influences(xt, yt)) < 1e-12
    assert DataInfInfluence.from_store(model, loss, tmp_path / "s.zarr").n_train == 21
    store = AutoGradientStore(["w"], 10**6, lambda: None)
    store.append({"w": torch.ones(3, 2)})
    store.finalize()
    assert isinstance(store.resolved, MemoryGradientStore)


def test_auto_without_path_uses_a_temporary_directory():
    model, loss, x, y, xt, yt = make_case("mlp", n=10)
    infl = DataInfInfluence(
        model, loss, progress=False, store="auto", memory_budget="1kB"
    ).fit(loader(x, y))
    assert isinstance(infl.store, ZarrGradientStore)
    assert "datainf-" in infl.store.path


def test_pickled_zarr_model_carries_no_gradients(tmp_path):
    model, loss, x, y, xt, yt = make_case("mlp", n=200)
    mem = DataInfInfluence(model, loss, progress=False, factorize=False)
    mem.fit(loader(x, y))
    zs = DataInfInfluence(
        model, loss, progress=False, store="zarr", store_path=tmp_path / "g.zarr"
    ).fit(loader(x, y))
    blob_mem, blob_zarr = pickle.dumps(mem), pickle.dumps(zs)
    grad_bytes = 200 * mem.n_parameters * 8
    assert len(blob_mem) > grad_bytes > len(blob_zarr) + grad_bytes // 2
    clone = pickle.loads(blob_zarr)
    assert torch.equal(clone.influences(xt, yt, x, y), zs.influences(xt, yt, x, y))


def test_fsspec_url_store():
    model, loss, x, y, xt, yt = make_case("mlp", n=15)
    url = f"memory://datainf-test-{torch.randint(0, 10**9, ()).item()}/g.zarr"
    infl = DataInfInfluence(
        model, loss, progress=False, store="zarr", store_path=url
    ).fit(loader(x, y))
    mem = DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    assert rel_err(infl.train_influences(xt, yt), mem.train_influences(xt, yt)) < 1e-12
    assert DataInfInfluence.from_store(model, loss, url).n_train == 15


def test_zarr_store_queries_refuse_stale_weights(tmp_path):
    model, loss, x, y, xt, yt = make_case("mlp", n=15)
    infl = DataInfInfluence(
        model, loss, progress=False, store="zarr", store_path=tmp_path / "g.zarr"
    ).fit(loader(x, y))
    with torch.no_grad():
        next(model.parameters()).add_(0.1)
    with pytest.raises(StaleModelError):
        infl.train_influences(xt, yt)


def test_zarr_take_scattered_and_contiguous(tmp_path):
    store = ZarrGradientStore(tmp_path / "t.zarr", ["a", "b"], chunk_rows=4)
    a, b = torch.randn(50, 3), torch.randn(50, 2)
    for i in range(0, 50, 7):
        store.append({"a": a[i : i + 7], "b": b[i : i + 7]})
    store.finalize()
    for idx in ([3, 1, 2], [0, 49, 17, 17, 5], []):
        t = torch.tensor(idx, dtype=torch.long)
        got = store.take(t)
        assert torch.equal(got["a"], a[t]) and torch.equal(got["b"], b[t])
    with pytest.raises(RuntimeError, match="finalized"):
        store.append({"a": a[:1], "b": b[:1]})


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_raw_chunk_reads_equal_zarr_reads_and_reuse_buffers(dtype, tmp_path):
    g = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(11, 5, generator=g), "b": torch.randn(11, 3, generator=g)}
    store = ZarrGradientStore(
        tmp_path / "g.zarr", ["a", "b"], dtype=dtype, chunk_rows=4
    )
    store.append(grads)
    store.finalize()
    store = ZarrGradientStore.open(str(tmp_path / "g.zarr"))
    want = [
        (c, s, {k: v.clone() for k, v in ch.items()})
        for c, s, ch in store.iter_chunks(4)
    ]
    seen, pointers = [], []
    for c, s, ch in store.iter_chunks(4, buffers=2):
        seen.append((c, s, {k: v.clone() for k, v in ch.items()}))
        pointers.append(ch["a"].data_ptr())
    assert [(c, s) for c, s, _ in seen] == [(0, 0), (1, 4), (2, 8)]
    for (_, _, a), (_, _, b) in zip(want, seen):
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
    assert seen[2][2]["a"].shape == (3, 5)  # the last chunk: its rows only
    if dtype in ("float32", "float64"):  # read in place: two buffers in turn
        assert pointers[0] == pointers[2] != pointers[1]
    # only the wanted chunks, in order
    assert [c for c, _, _ in store.iter_chunks(4, [2, 0], buffers=2)] == [0, 2]


def test_raw_chunk_reads_fall_back_where_they_do_not_apply(tmp_path):
    from zarr.codecs import ZstdCodec

    from pydvl_datainf.storage.rawio import RawChunkReader

    g = torch.Generator().manual_seed(1)
    grads = {"a": torch.randn(9, 4, generator=g)}
    store = ZarrGradientStore(
        tmp_path / "z.zarr", ["a"], chunk_rows=4, compressors=ZstdCodec()
    )
    store.append(grads)
    store.finalize()
    arr = zarr.open_group(str(tmp_path / "z.zarr"), mode="r")["grads/0"]
    assert RawChunkReader.for_array(arr, "grads/0", "z.zarr") is None  # compressed
    got = torch.cat([ch["a"] for _, _, ch in store.iter_chunks(4, buffers=3)])
    assert torch.equal(got, grads["a"])
    # chunk sizes other than the store's: through Zarr, still equal
    got = torch.cat([ch["a"] for _, _, ch in store.iter_chunks(3, buffers=3)])
    assert torch.equal(got, grads["a"])


def test_raw_chunk_writer_writes_what_zarr_reads(tmp_path):
    from pydvl_datainf.storage.integrity import create_checked_array, verify_array
    from pydvl_datainf.storage.rawio import RawChunkReader, RawChunkWriter

    group = zarr.open_group(str(tmp_path / "m.zarr"), mode="w")
    arr = create_checked_array(group, "m", shape=(6, 5), chunks=(4, 5), dtype="float64")
    tile = np.arange(20, dtype="float64").reshape(4, 5)
    writer = RawChunkWriter.for_array(arr)
    writer.write((0, 0), tile)
    arr[4:] = np.full((2, 5), -1.0)  # the edge chunk through Zarr
    assert verify_array(arr, "m", "m.zarr") == 2  # checksums as Zarr's
    assert (arr[:4] == tile).all() and (arr[4:] == -1).all()
    reader = RawChunkReader.for_array(arr, "m", "m.zarr")
    assert (reader.read_into((0, 0), reader.new_buffer()) == tile).all()
    with pytest.raises(ValueError, match="whole chunk"):
        writer.write((1, 0), tile[:2])
    with pytest.raises(ValueError, match="whole chunk"):
        writer.write((0, 0), tile.astype("float32"))
