"""Faults on the model side: stale weights, λ out of range, damaged or mismatched
stores. Each gives a clear error, or the right answer with an explicit override."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from models import fit_zarr, loader, make_case
from pydvl_datainf import (
    DataInfInfluence,
    RegularizationError,
    StaleModelError,
    StoreMismatchError,
)
from pydvl_datainf.config import check_regularization, resolve_regularization
from pydvl_datainf.fingerprint import WeightWatch, loss_name
from pydvl_datainf.storage import open_zarr_group
from reference import DenseDataInf, rel_err


# ----------------------------------------------------------- stale weights
@pytest.mark.parametrize(
    "edit",
    [
        lambda p: p.data.copy_(p.data.flip(0)),  # keeps sum and sum of squares
        lambda p: p.data.copy_(p.data[torch.randperm(len(p))]),
        lambda p: p.data.view(-1)[0].copy_(
            torch.nextafter(p.data.view(-1)[0], p.data.new_tensor(9.0))
        ),
    ],
    ids=["flip", "permute", "one-ulp"],
)
def test_any_change_of_trainable_values_is_detected(edit):
    model, loss, x, y, xt, yt = make_case("mlp")
    infl = DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    weight = dict(model.named_parameters())["0.weight"]
    saved = weight.detach().clone()
    edit(weight)
    assert not torch.equal(weight.detach(), saved)
    with pytest.raises(StaleModelError, match="changed after fit"):
        infl.influences(xt, yt)
    with torch.no_grad():
        weight.copy_(saved)
    infl.influences(xt, yt)  # restored: accepted


def test_weight_watch_sees_permutations_through_data():
    p = torch.nn.Parameter(torch.arange(6.0).reshape(3, 2))
    watch = WeightWatch({"p": p})
    p.data[:] = p.data[[2, 0, 1]]
    assert watch.changed()


# ------------------------------------------------------------------ lambda
@pytest.mark.parametrize("lam", [1e-40, 1e300])
def test_lambda_out_of_range_for_float32_is_refused(lam):
    model, loss, x, y, xt, yt = make_case("mlp")
    model = model.float()
    x = x.float()
    with pytest.raises(RegularizationError, match="outside the range of torch.float32"):
        DataInfInfluence(model, loss, lam, progress=False).fit(loader(x, y))
    infl = DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    before = dict(infl.block_regularization)
    with pytest.raises(RegularizationError, match="float32"):
        infl.with_regularization(lam)
    assert infl.block_regularization == before  # unchanged after the error
    # float64 holds both values: accepted there
    check_regularization("b", lam, torch.float64)


def test_lambda_against_the_scale_of_the_norms():
    with pytest.raises(RegularizationError, match="overflow"):
        resolve_regularization(
            1e-30,
            {"a": 2},
            {"a": 1e10},
            1,
            dtype=torch.float32,
            max_squared_norms={"a": 1e10},
        )
    with pytest.raises(RegularizationError, match="underflow"):
        resolve_regularization(
            1e30,
            {"a": 2},
            {"a": 1e-10},
            1,
            dtype=torch.float32,
            max_squared_norms={"a": 1e-10},
        )
    got = resolve_regularization(
        1e-3, {"a": 2}, {"a": 1.0}, 1, dtype=torch.float32, max_squared_norms={"a": 1.0}
    )
    assert got["a"] == 1e-3


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf")])
def test_a_corrupted_stored_lambda_is_refused_on_open(tmp_path, bad):
    model, loss, x, y, xt, yt = make_case("mlp")
    path = tmp_path / "g.zarr"
    infl = fit_zarr(model, loss, x, y, path)
    expected = infl.influences(xt, yt, x, y)
    group = open_zarr_group(path, "r+")
    lam = dict(group.attrs["regularization"])
    first = next(iter(lam))
    group.attrs["regularization"] = {**lam, first: bad}
    with pytest.raises(RegularizationError, match=f"{first!r}.*damaged or was edited"):
        DataInfInfluence.from_store(model, loss, path, progress=False)
    # an explicit λ overrides the damaged one
    fixed = DataInfInfluence.from_store(
        model, loss, path, regularization=dict(infl.block_regularization)
    )
    assert rel_err(fixed.influences(xt, yt, x, y), expected) < 1e-12


# -------------------------------------------------------------------- loss
def test_the_loss_is_recorded_and_checked_on_open(tmp_path):
    model, loss, x, y, xt, yt = make_case("mlp")
    path = tmp_path / "g.zarr"
    infl = fit_zarr(model, loss, x, y, path)
    assert open_zarr_group(path, "r").attrs["fit_extra"]["loss"] == loss_name(loss)
    other = functools.partial(torch.nn.functional.cross_entropy, label_smoothing=0.3)
    with pytest.raises(StoreMismatchError, match="another loss|with the loss"):
        DataInfInfluence.from_store(model, other, path)
    with pytest.raises(StoreMismatchError, match="allow_other_loss"):
        DataInfInfluence.from_store(model, torch.nn.CrossEntropyLoss(), path)
    same = DataInfInfluence.from_store(model, loss, path, progress=False)
    assert torch.equal(same.influences(xt, yt, x, y), infl.influences(xt, yt, x, y))
    # an explicit override: the user says it is the same loss
    module = DataInfInfluence.from_store(
        model, torch.nn.CrossEntropyLoss(), path, allow_other_loss=True
    )
    ref = DenseDataInf(model, loss, x, y, infl.blocks.to_dict())
    assert rel_err(module.influences(xt, yt, x, y), ref.influences(xt, yt, x, y)) < 1e-8


def test_loss_names_tell_settings_and_lambdas_apart():
    ce = torch.nn.functional.cross_entropy
    assert loss_name(ce) == "torch.nn.functional.cross_entropy"
    assert loss_name(torch.nn.CrossEntropyLoss()) != loss_name(
        torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    )
    assert loss_name(functools.partial(ce, label_smoothing=0.1)) != loss_name(ce)
    f = lambda p, t: ce(p, t)  # noqa: E731
    g = lambda p, t: ce(p, t) * 2  # noqa: E731
    assert loss_name(f) != loss_name(g)


# ------------------------------------------------------------ damaged store
@pytest.mark.parametrize("damage", ["short", "nan", "negative"])
def test_damaged_norms_are_refused(tmp_path, damage):
    model, loss, x, y, *_ = make_case("mlp")
    path = tmp_path / "g.zarr"
    fit_zarr(model, loss, x, y, path)
    group = open_zarr_group(path, "r+")
    norms = np.asarray(group["norms/0"][:])
    if damage == "short":
        norms = norms[:-1]
    else:
        norms[3] = np.nan if damage == "nan" else -1.0
    arr = group.create_array(
        "norms/0", shape=norms.shape, dtype=norms.dtype, overwrite=True
    )
    arr[:] = norms
    with pytest.raises(StoreMismatchError, match="norms"):
        DataInfInfluence.from_store(model, loss, path)


# ------------------------------------------------- gradients of rounding noise
class KeyBiasAttention(torch.nn.Module):
    """One attention head whose key bias cannot change the output: it adds the
    same amount to every key's score of a query, and softmax ignores that. Its
    gradient is zero in exact arithmetic and rounding noise in float."""

    def __init__(self, d=8, classes=3):
        super().__init__()
        self.q = torch.nn.Linear(d, d)
        self.k = torch.nn.Linear(d, d)  # its bias is the silent one
        self.v = torch.nn.Linear(d, d)
        self.out = torch.nn.Linear(d, classes)

    def forward(self, x):  # x: (b, tokens, d)
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 8**0.5, dim=-1)
        return self.out((att @ self.v(x)).mean(1))


def test_blocks_of_rounding_noise_are_named():
    import warnings

    from pydvl_datainf.errors import NegligibleGradientWarning

    torch.manual_seed(0)
    model = KeyBiasAttention()
    x, y = torch.randn(40, 5, 8), torch.randint(0, 3, (40,))
    loss = torch.nn.functional.cross_entropy
    with pytest.warns(NegligibleGradientWarning, match=r"\['k\.bias'\]") as seen:
        DataInfInfluence(model, loss, block_structure="parameter", progress=False).fit(
            loader(x, y)
        )
    assert seen[0].filename == __file__  # raised at the user's call
    model.k.bias.requires_grad_(False)  # the advice: leave it out
    with warnings.catch_warnings():
        warnings.simplefilter("error", NegligibleGradientWarning)
        DataInfInfluence(model, loss, block_structure="parameter", progress=False).fit(
            loader(x, y)
        )
