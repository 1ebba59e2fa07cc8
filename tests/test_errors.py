"""Bad input gets a clear error that names the problem."""

import pytest
import torch
from pydvl.influence.types import InfluenceMode, UnsupportedInfluenceModeException
from pydvl.utils.exceptions import NotFittedException

from models import loader, make_case
from pydvl_datainf import (
    DataInfInfluence,
    EmptyDataError,
    NonFiniteGradientError,
    NotFittedError,
    RegularizationError,
    StaleModelError,
)
from pydvl_datainf.fit import GradientFunction


@pytest.fixture
def fitted():
    model, loss, x, y, xt, yt = make_case("mlp")
    return DataInfInfluence(model, loss, progress=False).fit(loader(x, y)), x, y, xt, yt


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: m.influences(x, y),
        lambda m, x, y: m.influence_factors(x, y),
        lambda m, x, y: m.influences_from_factors(torch.zeros(2, m.n_parameters), x, y),
        lambda m, x, y: m.influences_by_block(x, y),
        lambda m, x, y: m.influence_factors_by_block(x, y),
        lambda m, x, y: m.train_influences(x, y),
    ],
)
def test_unfitted_use(call):
    model, loss, x, y, *_ = make_case("mlp")
    infl = DataInfInfluence(model, loss)
    with pytest.raises(NotFittedError, match="must be fitted"):
        call(infl, x, y)
    assert issubclass(NotFittedError, NotFittedException)


def test_length_mismatch(fitted):
    infl, x, y, xt, yt = fitted
    with pytest.raises(ValueError, match="x_test has 5 samples but its labels have 4"):
        infl.influences(xt, yt[:4], x, y)
    with pytest.raises(ValueError, match="x has 24 samples but its labels have 23"):
        infl.influences(xt, yt, x, y[:-1])
    with pytest.raises(ValueError, match="x has 5 samples but its labels have 2"):
        infl.influence_factors(xt, yt[:2])


def test_x_without_y(fitted):
    infl, x, y, xt, yt = fitted
    with pytest.raises(ValueError, match="both x and y"):
        infl.influences_by_block(xt, yt, x, None)


def test_non_tensor_input(fitted):
    infl, x, y, xt, yt = fitted
    with pytest.raises(TypeError, match="must be torch tensors"):
        infl.influence_factors(xt.numpy(), yt)


def test_nan_gradients_name_samples():
    model, loss, x, y, *_ = make_case("mlp")
    x = x.clone()
    x[9, 0] = float("nan")
    x[15, 2] = float("inf")
    infl = DataInfInfluence(model, loss, progress=False)
    with pytest.raises(NonFiniteGradientError, match=r"training samples \[9\]"):
        infl.fit(loader(x, y))
    assert not infl.is_fitted
    with pytest.raises(NonFiniteGradientError, match=r"samples \[9, 15\]"):
        infl.fit(loader(x, y, bs=24))


def test_nan_in_query_batch(fitted):
    infl, x, y, xt, yt = fitted
    bad = xt.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"samples \[3\] of the batch"):
        infl.influences(bad, yt, x, y)


def test_empty_loader():
    model, loss, x, y, *_ = make_case("mlp")
    with pytest.raises(EmptyDataError, match="no samples"):
        DataInfInfluence(model, loss).fit(loader(x[:0], y[:0]))
    with pytest.raises(EmptyDataError):
        DataInfInfluence(model, loss).fit([])


def test_loader_must_yield_pairs():
    model, loss, x, y, *_ = make_case("mlp")
    with pytest.raises(TypeError, match=r"\(x, y\) pairs"):
        DataInfInfluence(model, loss).fit([(x, y, y)])


def test_unsupported_mode(fitted):
    infl, x, y, xt, yt = fitted
    f = infl.influence_factors(xt, yt)
    calls = [
        lambda: infl.influences(xt, yt, x, y, mode="sideways"),
        lambda: infl.influences_by_block(xt, yt, x, y, mode="sideways"),
        lambda: infl.influences_from_factors(f, x, y, mode="sideways"),
        lambda: infl.influences_from_factors_by_block(f, x, y, mode="sideways"),
    ]
    for call in calls:  # pyDVL's exception, a ValueError
        with pytest.raises(UnsupportedInfluenceModeException, match="sideways"):
            call()
    assert torch.equal(
        infl.influences(xt, yt, x, y, mode="up"), infl.influences(xt, yt, x, y)
    )


def test_factor_width(fitted):
    infl, x, y, xt, yt = fitted
    with pytest.raises(ValueError, match=r"n_parameters=57"):
        infl.influences_from_factors(torch.zeros(2, 56, dtype=torch.float64), x, y)
    with pytest.raises(ValueError, match=r"n_parameters=57"):
        infl.influences_from_factors(torch.zeros(57, dtype=torch.float64), x, y)
    with pytest.raises(ValueError, match="do not match the model's blocks"):
        infl.influences_from_factors_by_block({"0": torch.zeros(2, 36)}, x, y)
    with pytest.raises(ValueError, match=r"block '2' must have shape \(m, 21\)"):
        infl.influences_from_factors_by_block(
            {"0": torch.zeros(2, 36), "2": torch.zeros(2, 20)}, x, y
        )


@pytest.mark.parametrize(
    "reg,match",
    [
        (0.0, "block '0' must be positive"),
        (-1.0, "must be positive"),
        (float("inf"), "finite"),
        ("big", "'auto'"),
        ({"0": 0.1, "2": -0.5}, "block '2' must be positive"),
        ({"0": 0.1, "2": 0.1, "9": 0.1}, r"unknown blocks \['9'\]"),
        ({"0": 0.1}, r"misses blocks \['2'\]"),
        ({"0": 0.1, "2": None}, "block '2'"),
    ],
)
def test_bad_regularization(reg, match):
    model, loss, *_ = make_case("mlp")
    with pytest.raises(RegularizationError, match=match):
        DataInfInfluence(model, loss, reg)


def test_bad_regularization_scale():
    model, loss, *_ = make_case("mlp")
    with pytest.raises(RegularizationError, match="regularization_scale"):
        DataInfInfluence(model, loss, regularization_scale=0.0)


def test_with_regularization_validates_and_keeps_state(fitted):
    infl, x, y, xt, yt = fitted
    before = dict(infl.block_regularization)
    with pytest.raises(RegularizationError):
        infl.with_regularization({"0": 0.1})
    assert infl.block_regularization == before


def test_auto_lambda_zero_for_dead_block():
    model, loss, x, y, *_ = make_case("mlp")
    torch.nn.init.zeros_(model[2].weight)  # no gradient reaches layer 0
    with pytest.raises(RegularizationError, match="block '0'.*is 0") as err:
        DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    assert "every training gradient of this block is zero" in str(err.value)
    assert "Train the model (the adapters) before `fit`" in str(err.value)
    infl = DataInfInfluence(model, loss, {"0": 0.1, "2": "auto"}, progress=False)
    infl.fit(loader(x, y))  # an explicit λ makes it usable


def test_untrained_lora_adapters_are_told_to_train_first():
    """Untrained LoRA: lora_B is zero, so lora_A gets no gradient. The error
    names that cause and training as the fix."""
    model, loss, x, y, *_ = make_case("lora")
    lora_b = [m for n, m in model.named_modules() if n.endswith("lora_B")]
    assert lora_b
    for m in lora_b:
        torch.nn.init.zeros_(m.weight)  # as LoRA initialises it
    with pytest.raises(RegularizationError, match="lora_A.*is 0") as err:
        DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    message = str(err.value)
    assert "This block is a LoRA A matrix" in message
    assert "lora_B at zero" in message and "Train the model" in message


def test_stale_weights_refused_then_accepted_after_restore(fitted):
    infl, x, y, xt, yt = fitted
    model = infl.model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(0.01)
    with pytest.raises(StaleModelError, match="changed after fit"):
        infl.influences(xt, yt, x, y)
    model.load_state_dict(saved)
    infl.influences(xt, yt, x, y)
    model[2].bias.data[0] += 1.0  # an edit through .data, not versioned
    with pytest.raises(StaleModelError):
        infl.influence_factors(xt, yt)
    model.load_state_dict(saved)
    model.load_state_dict(saved)  # same values, new version counters: fine
    infl.influence_factors(xt, yt)


def test_perturbation_needs_float_inputs():
    emb = torch.nn.Sequential(
        torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(8, 2)
    )
    x = torch.randint(0, 10, (6, 2))
    y = torch.randint(0, 2, (6,))
    infl = DataInfInfluence(emb, torch.nn.functional.cross_entropy, progress=False)
    infl.fit(loader(x, y, 3))
    assert infl.influences(x, y, x, y).dtype == torch.float32
    with pytest.raises(TypeError, match="must be floating point"):
        infl.influences(x, y, x, y, mode=InfluenceMode.Perturbation)


def test_finite_norms_whose_total_overflows_are_not_an_error():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    x = torch.full((2, 1), 2.6e9)  # per-sample gradient 2x² ≈ 1.4e19
    y = torch.zeros(2, 1)
    infl = DataInfInfluence(model, torch.nn.functional.mse_loss, progress=False)
    _, norms = GradientFunction(model, infl.loss, infl.engine, infl.blocks).with_norms(
        x, y
    )
    (s,) = norms.values()
    assert torch.isfinite(s).all() and not torch.isfinite(s.sum())
