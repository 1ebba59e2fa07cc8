"""Fault injection for gradient stores: nothing lost, nothing silent.

Each test damages or hides something (a user's files, a chunk, a shape, the
manifest, the storage itself) and checks that the library refuses with a clear
error, deletes nothing it did not create, and never returns wrong numbers.
"""

import gc
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zarr

from models import loader, make_case
from pydvl_datainf import DataInfInfluence
from pydvl_datainf.errors import (
    StoreCorruptError,
    StoreExistsError,
    StoreMismatchError,
)
from pydvl_datainf.storage import (
    FitState,
    MemoryGradientStore,
    PathState,
    ZarrGradientStore,
    claim_path,
    inspect_path,
    new_store,
    open_zarr_group,
    remove_owned,
    zarr_group_exists,
)

N, CHUNK = 10, 4  # chunks of rows: 0-3, 4-7, 8-9


def write_store(path, dtype="float32", n=N, chunk_rows=CHUNK):
    """A finished two-block store and the float32 gradients written to it."""
    g = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(n, 3, generator=g), "b": torch.randn(n, 2, generator=g)}
    store = ZarrGradientStore(path, ["a", "b"], dtype=dtype, chunk_rows=chunk_rows)
    for i in range(0, n, 3):
        store.append({k: v[i : i + 3] for k, v in grads.items()})
    store.finalize()
    store.save_fit_state(
        FitState(
            n_train=n,
            regularization={"a": 0.1, "b": 0.2},
            regularization_spec={"a": "auto", "b": "auto"},
            regularization_scale=0.1,
            squared_norms={k: (v.double() ** 2).sum(1) for k, v in grads.items()},
            weights_digest="0" * 64,
            block_structure={"a": ["a"], "b": ["b"]},
            extra={"loss": "mse"},
        )
    )
    return grads


def chunk_file(path, array, row_chunk):
    coords = [str(row_chunk)] + (["0"] if array.startswith("grads") else [])
    return os.path.join(path, *array.split("/"), "c", *coords)


def user_dir(tmp_path):
    d = tmp_path / "my-thesis"
    d.mkdir()
    (d / "chapter1.tex").write_text("three years of work")
    return d


# ------------------------------------------------------------------ ownership
@pytest.mark.parametrize("overwrite", [False, True])
def test_user_directory_is_never_emptied(overwrite, tmp_path):
    d = user_dir(tmp_path)
    with pytest.raises(StoreExistsError, match="not created by pydvl-datainf"):
        ZarrGradientStore(d, ["w"], overwrite=overwrite)
    with pytest.raises(StoreExistsError, match="never emptied"):
        open_zarr_group(d, "w")
    with pytest.raises(StoreExistsError):
        remove_owned(d, "gradient_store")
    assert (d / "chapter1.tex").read_text() == "three years of work"
    assert inspect_path(d).state == PathState.FOREIGN


@pytest.mark.parametrize("kind", ["zarr", "auto"])
def test_fit_into_a_user_directory_is_refused(kind, tmp_path):
    model, loss, x, y, *_ = make_case("mlp", n=12)
    d = user_dir(tmp_path)
    infl = DataInfInfluence(
        model,
        loss,
        progress=False,
        store=kind,
        store_path=d,
        memory_budget=1,
        store_options={"overwrite": True},
    )
    with pytest.raises(StoreExistsError, match="not created by pydvl-datainf"):
        infl.fit(loader(x, y))
    assert os.listdir(d) == ["chapter1.tex"]


def test_groups_not_ours_or_of_another_kind_are_refused(tmp_path):
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w").create_array(
        "data", shape=(3,), dtype="f8"
    )[:] = [1.0, 2.0, 3.0]
    matrix = tmp_path / "matrix.zarr"
    claim_path(matrix, "influence_matrix", attributes={"format_version": 1})
    for path, why in ((foreign, "not created by"), (matrix, "influence matrix")):
        with pytest.raises(StoreExistsError, match=why):
            ZarrGradientStore(path, ["w"], overwrite=True)
        with pytest.raises(StoreExistsError, match=why):
            new_store("auto", ["w"], path=path, options={"overwrite": True})
    np.testing.assert_array_equal(
        zarr.open_group(str(foreign), mode="r")["data"][:], [1.0, 2.0, 3.0]
    )
    assert inspect_path(matrix, kind="influence_matrix").state == PathState.OWNED
    # an output of the other kind is not taken for a gradient store either
    claim_path(tmp_path / "g.zarr", "gradient_store")
    with pytest.raises(StoreExistsError, match="holds a pydvl-datainf gradient store"):
        claim_path(tmp_path / "g.zarr", "influence_matrix", overwrite=True)


def test_own_store_is_replaced_only_with_overwrite(tmp_path):
    path = tmp_path / "g.zarr"
    write_store(path)
    with pytest.raises(StoreExistsError, match="overwrite=True"):
        ZarrGradientStore(path, ["w"])
    assert ZarrGradientStore.open(path).n == N  # untouched
    ZarrGradientStore(path, ["w"], overwrite=True)  # ours: replaced
    assert inspect_path(path, kind="gradient_store").state == PathState.OWNED
    assert remove_owned(path, "gradient_store") and not path.exists()
    assert not remove_owned(path, "gradient_store")


def test_an_empty_directory_may_be_used(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    assert inspect_path(d).state == PathState.EMPTY
    write_store(d)
    assert ZarrGradientStore.open(d).n == N


def test_concurrent_starters_get_store_exists(tmp_path):
    path = tmp_path / "g.zarr"
    claim_path(path, "gradient_store")  # the first starter
    with pytest.raises(StoreExistsError):  # the second one
        open_zarr_group(path, "w-")


def test_errors_are_not_taken_for_absence(monkeypatch, tmp_path):
    path = tmp_path / "g.zarr"
    grads = write_store(path)
    real_open = zarr.open_group

    def flaky_open(*args, **kwargs):  # reads fail, as with lost credentials
        if kwargs.get("mode") == "r":
            raise PermissionError("Access denied (injected)")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(zarr, "open_group", flaky_open)
    with pytest.raises(PermissionError, match="injected"):
        zarr_group_exists(path)
    with pytest.raises(PermissionError, match="injected"):
        ZarrGradientStore(path, ["a", "b"])  # must not open in overwrite mode
    with pytest.raises(PermissionError, match="injected"):
        new_store("auto", ["a", "b"], path=path)
    monkeypatch.setattr(zarr, "open_group", real_open)
    store = ZarrGradientStore.open(path)  # still there, unchanged
    assert torch.equal(store.read(0, N)["a"], grads["a"])


def test_url_errors_are_not_taken_for_absence(monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    url = f"memory://faults-{os.getpid()}/g.zarr"
    write_store(url)

    def broken(self, path, **kwargs):
        raise ConnectionError("network down (injected)")

    monkeypatch.setattr(MemoryFileSystem, "exists", broken)
    with pytest.raises(ConnectionError, match="injected"):
        ZarrGradientStore(url, ["a", "b"], overwrite=True)
    monkeypatch.undo()
    assert ZarrGradientStore.open(url).n == N


# ------------------------------------------------------------------ integrity
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_deleted_chunk_raises_and_never_reads_as_zeros(dtype, tmp_path):
    path = str(tmp_path / "g.zarr")
    write_store(path, dtype)
    os.remove(chunk_file(path, "grads/1", 1))
    store = ZarrGradientStore.open(path)  # cheap checks pass
    assert store.read(0, 4)["a"].shape == (4, 3)  # other chunks still read
    msg = r"grads/1.*chunk \(1, 0\) is missing.*overwrite=True"
    with pytest.raises(StoreCorruptError, match=msg):
        store.read(0, N)
    with pytest.raises(StoreCorruptError, match=msg):
        store.take(torch.tensor([9, 0, 5]))
    with pytest.raises(StoreCorruptError, match=msg):
        list(store.iter_chunks(CHUNK))
    with pytest.raises(StoreCorruptError, match=msg):
        store.verify()


def test_deleted_norms_chunk_raises(tmp_path):
    path = str(tmp_path / "g.zarr")
    write_store(path, chunk_rows=16)
    os.remove(chunk_file(path, "norms/0", 0))
    store = ZarrGradientStore.open(path)
    with pytest.raises(StoreCorruptError, match=r"norms/0.*chunk \(0,\) is missing"):
        store.load_fit_state()
    with pytest.raises(StoreCorruptError, match="norms/0"):
        store.verify()


@pytest.mark.parametrize("damage", ["random", "one-bit"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_corrupt_chunk_raises(damage, dtype, tmp_path):
    path = str(tmp_path / "g.zarr")
    write_store(path, dtype)
    f = chunk_file(path, "grads/0", 2)
    raw = bytearray(open(f, "rb").read())
    if damage == "random":
        raw = bytearray(np.random.default_rng(0).bytes(len(raw)))
    else:
        raw[3] ^= 0x10
    open(f, "wb").write(bytes(raw))
    store = ZarrGradientStore.open(path)
    msg = r"grads/0.*chunk \(2, 0\) is corrupt.*overwrite=True"
    with pytest.raises(StoreCorruptError, match=msg):
        store.read(0, N)
    with pytest.raises(StoreCorruptError, match=msg):
        store.take(torch.tensor([9, 0]))
    with pytest.raises(StoreCorruptError, match=msg):
        store.verify()


@pytest.mark.parametrize("damage", ["deleted", "one-bit", "truncated", "extended"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_raw_chunk_reads_refuse_damage(damage, dtype, tmp_path):
    """The direct file reads (reused buffers) check as much as Zarr's reads."""
    path = str(tmp_path / "g.zarr")
    write_store(path, dtype)
    f = chunk_file(path, "grads/1", 1)
    raw = bytearray(open(f, "rb").read())
    if damage == "deleted":
        os.remove(f)
    else:
        if damage == "one-bit":
            raw[5] ^= 0x01
        elif damage == "truncated":
            raw = raw[:-6]
        else:
            raw += b"\0\0"
        open(f, "wb").write(bytes(raw))
    store = ZarrGradientStore.open(path)
    expected = CHUNK * 2 * (4 if dtype == "float32" else 2) + 4  # block b: 2 columns
    problem = {
        "deleted": "is missing",
        "one-bit": "is corrupt",
        "truncated": f"has {expected - 6} bytes, {expected} expected",
        "extended": f"has {expected + 2} bytes, {expected} expected",
    }[damage]
    msg = rf"grads/1.*chunk \(1, 0\) {problem}.*overwrite=True"
    chunks = store.iter_chunks(CHUNK, buffers=3)
    c, start, first = next(chunks)  # chunk 0 is sound
    assert (c, start) == (0, 0)
    with pytest.raises(StoreCorruptError, match=msg):
        next(chunks)


@pytest.mark.parametrize("array", ["grads/1", "norms/0"])
def test_shrunken_shape_raises(array, tmp_path):
    path = str(tmp_path / "g.zarr")
    write_store(path)
    meta = os.path.join(path, *array.split("/"), "zarr.json")
    doc = json.load(open(meta))
    doc["shape"][0] -= 3
    json.dump(doc, open(meta, "w"))
    with pytest.raises(StoreCorruptError, match=rf"{array}.*shape.*\(7"):
        ZarrGradientStore.open(path)


def test_missing_array_raises(tmp_path):
    import shutil

    path = str(tmp_path / "g.zarr")
    write_store(path)
    shutil.rmtree(os.path.join(path, "grads", "1"))
    with pytest.raises(StoreCorruptError, match="grads/1.*missing"):
        ZarrGradientStore.open(path)


def test_missing_manifest_raises(tmp_path):
    path = str(tmp_path / "g.zarr")
    write_store(path)
    group = zarr.open_group(path, mode="r+")
    del group.attrs["manifest"]
    with pytest.raises(StoreCorruptError, match="no manifest"):
        ZarrGradientStore.open(path)


def test_older_format_is_refused(tmp_path):
    path = str(tmp_path / "g.zarr")
    write_store(path)
    zarr.open_group(path, mode="r+").attrs["format_version"] = 1
    with pytest.raises(StoreMismatchError, match="older format"):
        ZarrGradientStore.open(path)


def test_zero_chunks_are_written_and_verify(tmp_path):
    """A chunk of zeros equals the fill value; it must still be written, or it
    would look deleted."""
    path = str(tmp_path / "g.zarr")
    store = ZarrGradientStore(path, ["w"], chunk_rows=4)
    store.append({"w": torch.cat([torch.zeros(4, 2), torch.ones(4, 2)])})
    store.finalize()
    reopened = ZarrGradientStore.open(path)
    assert reopened.verify() == 2
    assert torch.equal(reopened.read(0, 8)["w"][:4], torch.zeros(4, 2))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_verify_and_fit_state_of_a_sound_store(dtype, tmp_path):
    path = str(tmp_path / "g.zarr")
    grads = write_store(path, dtype)
    store = ZarrGradientStore.open(path)
    assert store.verify() == 2 * 3 + 2  # 3 row chunks per block, 1 norm chunk each
    state = store.load_fit_state()
    assert state.extra == {"loss": "mse"}
    tol = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
    got = store.read(0, N)
    for k, v in grads.items():
        assert got[k].dtype == torch.float32
        assert torch.allclose(got[k], v, rtol=tol, atol=tol)


def test_fitted_store_with_a_deleted_chunk_is_refused(tmp_path):
    model, loss, x, y, xt, yt = make_case("mlp", n=20)
    path = str(tmp_path / "g.zarr")
    DataInfInfluence(
        model,
        loss,
        progress=False,
        store="zarr",
        store_path=path,
        store_options={"chunk_rows": 8},
    ).fit(loader(x, y))
    os.remove(chunk_file(path, "grads/0", 1))
    infl = DataInfInfluence.from_store(model, loss, path)
    with pytest.raises(StoreCorruptError, match=r"grads/0.*chunk \(1, 0\)"):
        infl.train_influences(xt, yt)


# ------------------------------------------------------- temporary directories
def spilled(**kw):
    store = new_store("auto", ["w"], memory_budget=1, **kw)
    store.append({"w": torch.randn(5, 3)})
    inner = store.resolved
    assert isinstance(inner, ZarrGradientStore)
    d = inner.temporary_directory
    assert d is not None and os.path.isdir(d) and "datainf-" in d
    return store, d


def test_temporary_directory_removed_on_close():
    store, d = spilled()
    store.finalize()
    assert store.read(0, 5)["w"].shape == (5, 3)
    store.close()
    assert not os.path.exists(d)
    store.close()  # twice is fine


def test_temporary_directory_removed_on_exception():
    with pytest.raises(RuntimeError, match="fit failed"):
        with new_store("auto", ["w"], memory_budget=1) as store:
            store.append({"w": torch.randn(5, 3)})
            d = store.resolved.temporary_directory
            raise RuntimeError("fit failed")
    assert d is not None and not os.path.exists(d)


def test_temporary_directory_removed_when_dropped():
    store, d = spilled()
    del store
    gc.collect()
    assert not os.path.exists(d)


def test_temporary_directory_removed_at_interpreter_exit(tmp_path):
    code = textwrap.dedent(
        """
        import torch
        from pydvl_datainf.storage import new_store
        store = new_store("auto", ["w"], memory_budget=1)
        store.append({"w": torch.randn(5, 3)})
        print(store.resolved.temporary_directory, flush=True)
        KEEP = store  # alive until the interpreter exits
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    d = out.stdout.strip().splitlines()[-1]
    assert "datainf-" in d and not os.path.exists(d)


def test_no_temporary_directory_while_in_memory(monkeypatch):
    import tempfile

    made = []
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(kw) or "x")
    store = new_store("auto", ["w"], memory_budget="1GB")
    store.append({"w": torch.randn(5, 3)})
    store.finalize()
    assert isinstance(store.resolved, MemoryGradientStore) and made == []


def test_pickled_copy_does_not_own_the_temporary_directory():
    import pickle

    store, d = spilled()
    store.finalize()
    copy = pickle.loads(pickle.dumps(store.resolved))
    assert copy.temporary_directory is None
    del copy
    gc.collect()
    assert os.path.isdir(d)  # still the original's
    store.close()
    assert not os.path.exists(d)


def test_fit_into_a_temporary_directory_cleans_up_on_failure(monkeypatch):
    import tempfile

    made = []
    real = tempfile.mkdtemp

    def spy(**kw):
        made.append(real(**kw))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    model, loss, x, y, *_ = make_case("mlp", n=20)

    def dying():  # spills at the first batch, then the fit dies
        yield x[:10], y[:10]
        raise KeyboardInterrupt

    infl = DataInfInfluence(model, loss, progress=False, store="auto", memory_budget=1)
    with pytest.raises(KeyboardInterrupt):
        infl.fit(dying())
    assert len(made) == 1 and not os.path.exists(made[0])
    infl.fit(loader(x, y))  # a fitted model keeps its directory until closed
    d = infl.store.temporary_directory
    assert d is not None and os.path.isdir(d)
    infl.store.close()
    assert not os.path.exists(d)
