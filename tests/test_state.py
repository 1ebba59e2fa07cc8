"""FittedState, fit and persistence against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from models import fit_zarr, loader, make_case
from pydvl_datainf import DataInfInfluence, RegularizationError, StoreMismatchError
from pydvl_datainf.blocks import build_blocks
from pydvl_datainf.config import parse_bytes, validate_regularization
from pydvl_datainf.fit import GradientFunction, fit
from pydvl_datainf.gradients import get_engine
from pydvl_datainf.operator import DataInfOperator
from pydvl_datainf.persistence import check_identity, identity
from pydvl_datainf.state import FittedState
from pydvl_datainf.storage import MemoryGradientStore
from reference import DenseDataInf, dense_R, per_sample_grads, rel_err

TOL = 1e-8


def test_from_gradients_matches_the_dense_reference():
    g = torch.Generator().manual_seed(0)
    train = {
        "a": torch.randn(30, 4, generator=g, dtype=torch.float64),
        "b": torch.randn(30, 6, generator=g, dtype=torch.float64) * 3,
    }
    test = {
        k: torch.randn(5, v.shape[1], generator=g, dtype=v.dtype)
        for k, v in train.items()
    }
    state = FittedState.from_gradients(train, {"a": "auto", "b": 0.7})
    assert state.n == 30 and state.dtype == torch.float64
    lam_a = 0.1 * float((train["a"] ** 2).sum()) / 30 / 4
    assert state.regularization["a"] == pytest.approx(lam_a, rel=1e-12)
    assert state.regularization["b"] == 0.7
    factors = DataInfOperator(state).apply(test)
    for k, lam in state.regularization.items():
        assert rel_err(factors[k], test[k] @ dense_R(train[k], lam)) < TOL
    other = state.with_regularization(2.0)
    assert other.regularization == {"a": 2.0, "b": 2.0}
    assert state.regularization["b"] == 0.7  # states are values
    assert other.store is state.store


def test_from_gradients_refuses_bad_input():
    with pytest.raises(ValueError, match="row counts"):
        FittedState.from_gradients({"a": torch.ones(3, 2), "b": torch.ones(4, 2)})
    with pytest.raises(RegularizationError, match="float32"):
        FittedState.from_gradients({"a": torch.ones(3, 2)}, 1e-40)


def test_fit_function_gives_the_reference_state():
    model, loss, x, y, xt, yt = make_case("lora")
    blocks = build_blocks(model)
    grads = GradientFunction(model, loss, get_engine("auto"), blocks)
    state = fit(
        grads, loader(x, y, 5), MemoryGradientStore(blocks.names), progress=False
    )
    ref = DenseDataInf(model, loss, x, y, blocks.to_dict())
    assert state.n == len(x) and state.rows is not None and state.rows.n == len(x)
    assert state.fingerprint == grads.fingerprint() and "cross_entropy" in state.loss
    for k in blocks.names:
        assert state.regularization[k] == pytest.approx(ref.lambdas[k], rel=1e-12)
        assert rel_err(state.squared_norms[k], (ref.train_grads[k] ** 2).sum(1)) < TOL
    test = per_sample_grads(model, loss, xt, yt, blocks.to_dict())
    got = DataInfOperator(state).influences(test)
    assert rel_err(got, ref.influences(xt, yt, x, y)) < TOL


def test_the_model_exposes_its_state_and_gradients():
    model, loss, x, y, xt, yt = make_case("mlp")
    infl = DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    state = infl.state
    assert state.n == infl.n_train and state.fingerprint == infl.fingerprint
    g = infl.gradients(xt, yt)
    ref = per_sample_grads(model, loss, xt, yt, infl.blocks.to_dict())
    assert all(rel_err(g[k], ref[k]) < 1e-10 for k in ref)
    generation = infl.generation
    infl.with_regularization(0.5)
    assert infl.generation == generation + 1 and infl.state is not state
    assert state.regularization != infl.state.regularization


def test_identity_check_names_what_differs(tmp_path):
    model, loss, x, y, *_ = make_case("mlp")
    infl = fit_zarr(model, loss, x, y, tmp_path / "g.zarr")
    record = identity(infl.state, n_test=3)
    check_identity("m.zarr", record, identity(infl.state, n_test=3))
    other = identity(infl.state.with_regularization(0.5), n_test=4)
    with pytest.raises(StoreMismatchError, match="another number of test points") as e:
        check_identity("m.zarr", record, other, what="The influence matrix")
    assert "other regularization" in str(e.value) and "m.zarr" in str(e.value)


def test_config_parses_budgets_and_specs():
    assert parse_bytes("2GB", 0) == 2 * 10**9
    assert parse_bytes("1.5 KiB", 0) == 1536
    assert parse_bytes(None, lambda: 7) == 7 and parse_bytes(1e3, 0) == 1000
    for bad in ("lots", "-1GB", 0, "1 XB"):
        with pytest.raises(ValueError):
            parse_bytes(bad, 0)
    with pytest.raises(RegularizationError, match="unknown blocks"):
        validate_regularization({"z": 1.0}, ["a"])
