"""Faults of the second kind: data whose bytes are sound but that is in the wrong
place, was replaced, or was computed for something else than what is asked.

Each test builds one such case and checks that the library refuses it with an
error that names the problem, never with numbers.
"""

from __future__ import annotations

import functools
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import LoRAMLP, fit_zarr, loader, make_case
from pydvl_datainf import (
    DataInfInfluence,
    RegularizationError,
    StaleModelError,
    StoreExistsError,
    StoreMismatchError,
    influence_matrix,
    top_k,
)
from pydvl_datainf.errors import StoreCorruptError, StoreReplacedError
from pydvl_datainf.storage import ZarrGradientStore, open_zarr_group
from reference import DenseDataInf, rel_err

N, M = 24, 6


def chunk_file(path, array, coords):
    return os.path.join(path, *array.split("/"), "c", *[str(c) for c in coords])


def swap(a, b):
    tmp = a + ".swap"
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


@pytest.fixture
def fitted(tmp_path):
    model, loss, x, y, xt, yt = make_case("lora", n=N, m=M)
    path = str(tmp_path / "g.zarr")
    infl = fit_zarr(model, loss, x, y, path, chunk_rows=4)
    return model, loss, x, y, xt, yt, path, infl


# ------------------------------------------- 1. a checksum binds a chunk's place
@pytest.mark.parametrize("how", ["swap", "duplicate"])
def test_gradient_chunks_in_the_wrong_place_are_refused(fitted, how):
    model, loss, x, y, xt, yt, path, infl = fitted
    a, b = chunk_file(path, "grads/0", (0, 0)), chunk_file(path, "grads/0", (2, 0))
    if how == "swap":
        swap(a, b)
    else:
        shutil.copyfile(a, b)
    with pytest.raises(StoreCorruptError, match=r"grads/0.*chunk \(\d, 0\).*place"):
        ZarrGradientStore.open(path).verify()
    with pytest.raises(StoreCorruptError, match="place"):
        DataInfInfluence.from_store(model, loss, path, progress=False).influences(
            xt, yt, x, y
        )
    with pytest.raises(StoreCorruptError, match="place"):
        infl.train_influences(xt, yt)  # the model that wrote it reads it too


def test_a_chunk_moved_between_arrays_is_refused(fitted):
    model, loss, x, y, xt, yt, path, infl = fitted
    # norms/0 and norms/1 have the same shape: the bytes decode fine
    shutil.copyfile(
        chunk_file(path, "norms/0", (0,)), chunk_file(path, "norms/1", (0,))
    )
    with pytest.raises(StoreCorruptError, match=r"norms/1.*place"):
        ZarrGradientStore.open(path).verify()
    with pytest.raises(StoreCorruptError, match=r"norms/1"):
        DataInfInfluence.from_store(model, loss, path, progress=False)


@pytest.mark.parametrize("with_marks", [False, True])
def test_swapped_tiles_are_refused_even_with_their_marks(fitted, tmp_path, with_marks):
    model, loss, x, y, xt, yt, path, infl = fitted
    out = str(tmp_path / "m.zarr")
    result = influence_matrix(
        infl, (xt, yt), out, test_rows=3, train_rows=4, dtype="float64", progress=False
    )
    expected = result.load()
    swap(chunk_file(out, "matrix", (0, 0)), chunk_file(out, "matrix", (0, 1)))
    if with_marks:
        swap(chunk_file(out, "done", (0, 0)), chunk_file(out, "done", (0, 1)))
    with pytest.raises(StoreCorruptError, match=r"matrix.*\(0, [01]\)"):
        result.load()
    with pytest.raises(StoreCorruptError, match=r"matrix.*\(0, [01]\)"):
        top_k(result, 3)
    with pytest.raises(StoreCorruptError):
        result.verify()
    again = influence_matrix(
        infl, (xt, yt), out, resume=True, verify=True, dtype="float64", progress=False
    )
    assert again.tiles_computed == 2
    assert torch.equal(again.load(), expected)


def test_swapped_factor_groups_are_recomputed(fitted, tmp_path):
    model, loss, x, y, xt, yt, path, infl = fitted
    out = str(tmp_path / "m.zarr")
    result = influence_matrix(
        infl, (xt, yt), out, test_rows=3, train_rows=4, dtype="float64", progress=False
    )
    expected = result.load()
    swap(chunk_file(out, "factors/0", (0, 0)), chunk_file(out, "factors/0", (1, 0)))
    for g in (0, 1):  # forget the tiles so that the factors are read again
        os.remove(chunk_file(out, "done", (g, 0)))
    again = influence_matrix(
        infl, (xt, yt), out, resume=True, verify=True, dtype="float64", progress=False
    )
    assert again.factor_groups_computed == 2
    assert torch.equal(again.load(), expected)


# ------------------------------------------ 2. identity is checked after open too
def test_a_store_replaced_after_open_is_refused(fitted):
    model, loss, x, y, xt, yt, path, infl = fitted
    infl.train_influences(xt, yt)
    other = DataInfInfluence(
        model,
        loss,
        progress=False,
        store="zarr",
        store_path=path,
        store_options={"overwrite": True, "chunk_rows": 4},
    )
    other.fit(loader(x.flip(0), y.flip(0)))  # the same rows, another order
    with pytest.raises(StoreMismatchError, match="replaced"):
        infl.train_influences(xt, yt)
    with pytest.raises(StoreMismatchError, match="replaced"):
        infl.influences(xt, yt, x, y)


@pytest.mark.parametrize(
    "then, found", [("nothing", "nothing"), ("a new store", "a store with id \\w+")]
)
def test_a_file_vanishing_under_a_read_is_named_replaced(
    fitted, monkeypatch, then, found
):
    """Another fit renames the store away while a chunk is being read: the
    read fails on a missing file, and the error names the replacement."""
    from pydvl_datainf.storage.chunks import CheckedChunks

    model, loss, x, y, xt, yt, path, _ = fitted
    infl = DataInfInfluence.from_store(model, loss, path, progress=False)
    read = CheckedChunks.read

    def vanishing(self, *args, **kwargs):
        monkeypatch.setattr(CheckedChunks, "read", read)
        os.rename(path, path + ".gone")
        if then == "a new store":
            fit_zarr(model, loss, x.flip(0), y.flip(0), path, chunk_rows=4)
        raise FileNotFoundError(os.path.join(path, "grads", "0", "c", "0", "0"))

    monkeypatch.setattr(CheckedChunks, "read", vanishing)
    with pytest.raises(StoreReplacedError, match=f"{found} is there now"):
        infl.train_influences(xt, yt)


def test_a_run_whose_output_is_replaced_stops_and_the_other_is_right(
    fitted, tmp_path, monkeypatch
):
    from pydvl_datainf.scoring.tiles import TileOutput

    model, loss, x, y, xt, yt, path, infl = fitted
    out = str(tmp_path / "m.zarr")
    xt2, yt2 = xt.flip(0), yt.flip(0)
    write = TileOutput.write_tile
    calls = {"n": 0}
    result2 = {}

    def write_then_replace(self, g, c, tile):
        write(self, g, c, tile)
        calls["n"] += 1
        if calls["n"] == 1:  # another job replaces the output meanwhile
            monkeypatch.setattr(TileOutput, "write_tile", write)
            result2["r"] = influence_matrix(
                infl,
                (xt2, yt2),
                out,
                overwrite=True,
                test_rows=3,
                train_rows=4,
                dtype="float64",
                progress=False,
            )
            monkeypatch.setattr(TileOutput, "write_tile", write_then_replace)

    monkeypatch.setattr(TileOutput, "write_tile", write_then_replace)
    with pytest.raises(StoreMismatchError, match="replaced"):
        influence_matrix(
            infl,
            (xt, yt),
            out,
            test_rows=3,
            train_rows=4,
            dtype="float64",
            progress=False,
        )
    monkeypatch.setattr(TileOutput, "write_tile", write)
    assert rel_err(result2["r"].load(), infl.train_influences(xt2, yt2)) < 1e-12


# ------------------------------------------------------- 4. the frozen weights
def lora_model():
    torch.manual_seed(0)
    return LoRAMLP().double()


def test_other_frozen_weights_are_refused_on_open(tmp_path):
    _, loss, x, y, xt, yt = make_case("lora", n=N, m=M)
    model = lora_model()
    path = str(tmp_path / "g.zarr")
    fit_zarr(model, loss, x, y, path)
    other_base = lora_model()
    with torch.no_grad():
        other_base.l1.base.weight.mul_(1.01)  # the same adapters on another base
    with pytest.raises(StoreMismatchError, match="frozen"):
        DataInfInfluence.from_store(other_base, loss, path, progress=False)
    again = DataInfInfluence.from_store(lora_model(), loss, path, progress=False)
    assert again.n_train == N


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.l1.base.weight.data.mul_(1.5),
        lambda m: m.l2.base.bias.data.add_(0.25),
        lambda m: torch.no_grad()(m.l1.base.weight.add_)(1.0),
        lambda m: setattr(m.l2.base, "weight", nn.Parameter(m.l2.base.weight * 2)),
    ],
    ids=["data-mul", "data-add", "no-grad-add", "replaced"],
)
def test_in_place_changes_of_frozen_weights_are_stale(edit):
    _, loss, x, y, xt, yt = make_case("lora", n=N, m=M)
    model = lora_model()
    infl = DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    infl.influences(xt, yt)
    edit(model)
    model.l2.base.weight.requires_grad_(False)
    with pytest.raises(StaleModelError, match="frozen"):
        infl.influences(xt, yt, x, y)


def test_buffers_are_part_of_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    model.eval()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    infl = DataInfInfluence(model, F.cross_entropy, progress=False).fit(loader(x, y))
    model[1].running_mean.add_(0.5)
    with pytest.raises(StaleModelError, match="frozen"):
        infl.influences(x[:3], y[:3])


# ------------------------------------------------------------------- 5. the loss
@pytest.mark.parametrize(
    "make",
    [
        lambda w: nn.CrossEntropyLoss(weight=w),
        lambda w: functools.partial(F.cross_entropy, weight=w),
    ],
    ids=["module-weight", "partial-weight"],
)
def test_losses_with_other_tensor_settings_are_refused(tmp_path, make):
    model, _, x, y, xt, yt = make_case("mlp", n=N, m=M)
    w1 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    path = str(tmp_path / "g.zarr")
    infl = fit_zarr(model, make(w1), x, y, path)
    with pytest.raises(StoreMismatchError, match="loss"):
        DataInfInfluence.from_store(model, make(w1 * 2), path, progress=False)
    same = DataInfInfluence.from_store(model, make(w1.clone()), path, progress=False)
    assert torch.equal(same.influences(xt, yt, x, y), infl.influences(xt, yt, x, y))


def test_values_captured_in_a_closure_are_part_of_the_loss(tmp_path):
    model, _, x, y, *_ = make_case("mlp", n=N, m=M)

    def weighted(scale):
        def loss(p, t):
            return F.cross_entropy(p, t) * scale

        return loss

    path = str(tmp_path / "g.zarr")
    fit_zarr(model, weighted(1.0), x, y, path)
    with pytest.raises(StoreMismatchError, match="loss"):
        DataInfInfluence.from_store(model, weighted(3.0), path, progress=False)
    DataInfInfluence.from_store(model, weighted(1.0), path, progress=False)


def test_an_unidentifiable_loss_needs_a_name(tmp_path):
    model, _, x, y, *_ = make_case("mlp", n=N, m=M)

    class Opaque:
        __slots__ = ()

    opaque = Opaque()

    def loss(p, t, _ctx=opaque):
        return F.cross_entropy(p, t)

    with pytest.raises(TypeError, match="loss_id"):
        DataInfInfluence(model, loss, progress=False)
    path = str(tmp_path / "g.zarr")
    fit_zarr(model, loss, x, y, path, loss_id="ce-v1")
    with pytest.raises(StoreMismatchError, match="loss"):
        DataInfInfluence.from_store(model, loss, path, loss_id="ce-v2")
    DataInfInfluence.from_store(model, loss, path, loss_id="ce-v1", progress=False)


# ------------------------------------------------- 6. the order of training rows
def test_a_matrix_resumed_over_rows_in_another_order_is_refused(fitted, tmp_path):
    model, loss, x, y, xt, yt, path, infl = fitted
    out = str(tmp_path / "m.zarr")
    calls = {"n": 0}
    from pydvl_datainf.scoring.tiles import TileOutput

    write = TileOutput.write_tile

    def fail_after_one(self, g, c, tile):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        write(self, g, c, tile)

    TileOutput.write_tile = fail_after_one
    try:
        with pytest.raises(KeyboardInterrupt):
            influence_matrix(
                infl, (xt, yt), out, test_rows=3, train_rows=4, progress=False
            )
    finally:
        TileOutput.write_tile = write
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    again = DataInfInfluence(
        model,
        loss,
        progress=False,
        store="zarr",
        store_path=path,
        store_options={"overwrite": True, "chunk_rows": 4},
    ).fit(loader(x[order], y[order]))
    with pytest.raises(StoreMismatchError, match="order"):
        influence_matrix(again, (xt, yt), out, resume=True, progress=False)


# ------------------------------------------------ 7. half-precision output overflow
def test_a_float16_matrix_that_overflows_is_refused(tmp_path):
    model, loss, x, y, xt, yt = make_case("mlp", n=N, m=M)
    infl = DataInfInfluence(model, loss, 1e-9, progress=False).fit(loader(x, y))
    biggest = infl.train_influences(xt, yt).abs().max().item()
    assert biggest > 65504
    with pytest.raises(OverflowError, match=r"float16.*65504.*float32"):
        influence_matrix(infl, (xt, yt), str(tmp_path / "m.zarr"), dtype="float16")


# ---------------------------------------- 8. every public read path is checked
def test_the_array_handed_out_is_checked(fitted, tmp_path):
    model, loss, x, y, xt, yt, path, infl = fitted
    out = str(tmp_path / "m.zarr")
    result = influence_matrix(
        infl, (xt, yt), out, test_rows=3, train_rows=4, dtype="float64", progress=False
    )
    full = result.load()
    assert torch.equal(
        torch.from_numpy(np.asarray(result.array[1:5, 3:11])), full[1:5, 3:11]
    )
    os.remove(chunk_file(out, "matrix", (1, 2)))
    with pytest.raises(StoreCorruptError, match=r"\(1, 2\)"):
        top_k(result.array, 3)
    with pytest.raises(StoreCorruptError, match=r"\(1, 2\)"):
        result.array[:, :]
    import zarr

    with pytest.raises(TypeError, match="MatrixResult"):
        top_k(zarr.open_array(os.path.join(out, "matrix"), mode="r"), 3)


def test_a_tile_file_vanishing_under_a_read_is_named_replaced(
    fitted, tmp_path, monkeypatch
):
    """Another run renames the matrix away while a tile is being read: the
    read fails on a missing file, and the error names the replacement."""
    import pydvl_datainf.scoring.tiles as tiles

    model, loss, x, y, xt, yt, path, infl = fitted
    out = str(tmp_path / "m.zarr")
    result = influence_matrix(
        infl, (xt, yt), out, test_rows=3, train_rows=4, dtype="float64", progress=False
    )
    read = tiles.read_checked

    def vanishing(*args, **kwargs):
        monkeypatch.setattr(tiles, "read_checked", read)
        os.rename(out, out + ".gone")
        raise FileNotFoundError(chunk_file(out, "matrix", (0, 0)))

    monkeypatch.setattr(tiles, "read_checked", vanishing)
    with pytest.raises(StoreReplacedError, match="nothing is there now"):
        result.array[:, :]


# --------------------------------------- 9. a reopened model never overwrites
def test_fit_on_a_reopened_model_needs_overwrite(fitted):
    model, loss, x, y, xt, yt, path, infl = fitted
    again = DataInfInfluence.from_store(model, loss, path, progress=False)
    before = again.train_influences(xt, yt)
    with pytest.raises(StoreExistsError, match="overwrite"):
        again.fit(loader(x[:10], y[:10]))
    assert torch.equal(
        DataInfInfluence.from_store(model, loss, path).train_influences(xt, yt), before
    )
    refit = DataInfInfluence(
        model,
        loss,
        progress=False,
        store="zarr",
        store_path=path,
        store_options={"overwrite": True},
    ).fit(loader(x[:10], y[:10]))
    assert refit.n_train == 10


def test_the_same_instance_may_refit_its_own_store(fitted):
    model, loss, x, y, xt, yt, path, infl = fitted
    infl.fit(loader(x[:12], y[:12]))  # it made this store: no overwrite needed
    assert infl.n_train == 12


# ------------------------------------------------- 10. derivable values are derived
def test_a_hand_edited_auto_lambda_is_refused(fitted):
    model, loss, x, y, xt, yt, path, infl = fitted
    group = open_zarr_group(path, "r+")
    lam = dict(group.attrs["regularization"])
    first = next(iter(lam))
    group.attrs["regularization"] = {**lam, first: lam[first] * 2}
    with pytest.raises(RegularizationError, match=rf"{first!r}.*edited"):
        DataInfInfluence.from_store(model, loss, path, progress=False)


# ------------------------------------------------ error messages name the cause
def test_an_empty_store_path_is_named(tmp_path):
    model, loss, x, y, *_ = make_case("mlp", n=N, m=M)
    with pytest.raises(ValueError, match="empty"):
        DataInfInfluence(model, loss, store="zarr", store_path="")


@pytest.mark.parametrize("name", ["batch_size", "test_rows", "train_rows"])
def test_a_negative_size_is_named(fitted, tmp_path, name):
    model, loss, x, y, xt, yt, path, infl = fitted
    with pytest.raises(ValueError, match=f"{name} must be a positive"):
        influence_matrix(infl, (xt, yt), str(tmp_path / "m.zarr"), **{name: -1})
    assert not os.path.exists(tmp_path / "m.zarr")


def test_reference_still_holds(fitted):
    model, loss, x, y, xt, yt, path, infl = fitted
    ref = DenseDataInf(model, loss, x, y, infl.blocks.to_dict())
    assert rel_err(infl.influences(xt, yt, x, y), ref.influences(xt, yt, x, y)) < 1e-8
