"""The linear datamodeling score: the metric, its interval, checkpoints, the setups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from pydvl_datainf.experiments import lds
from pydvl_datainf.experiments.baselines import hessian_free_influences
from pydvl_datainf.experiments.finetune import load_tokenizer
from pydvl_datainf.experiments.generative_tasks import paper_task
from pydvl_datainf.experiments.llm import FineTuning


# --------------------------------------------------------------- subsets
def test_subsets_are_seeded_halves() -> None:
    masks = lds.subset_masks(41, 32, seed=3)
    assert masks.shape == (32, 41) and masks.dtype == bool
    assert (masks.sum(axis=1) == 20).all()  # round(0.5 * 41)
    assert (masks == lds.subset_masks(41, 32, seed=3)).all()
    other = lds.subset_masks(41, 32, seed=4)
    assert (masks != other).any()
    assert len({tuple(r) for r in masks}) == 32  # no repeats at this size
    # every point is in about half the subsets
    assert 0.2 < masks.mean(axis=0).min() and masks.mean(axis=0).max() < 0.8
    assert (lds.subset_masks(10, 3, fraction=0.3).sum(axis=1) == 3).all()


@pytest.mark.parametrize(
    "args", [(10, 4, 0.0), (10, 4, 1.0), (10, 4, 0.01), (10, 1, 0.5)]
)
def test_subsets_reject_degenerate_settings(args: tuple) -> None:
    with pytest.raises(ValueError):
        lds.subset_masks(*args)


# --------------------------------------------------------------- the metric
def test_predicted_loss_is_minus_the_summed_scores() -> None:
    scores = np.array([[1.0, -2.0, 4.0], [0.5, 0.5, 0.5]])
    masks = np.array([[1, 1, 0], [0, 1, 1]], dtype=bool)
    assert lds.predicted_losses(scores, masks).tolist() == [[1.0, -1.0], [-2.0, -1.0]]
    with pytest.raises(ValueError, match="disagree"):
        lds.predicted_losses(scores, masks[:, :2])


def _ridge(n: int, d: int, n_test: int, lam: float, seed: int) -> tuple:
    """Ridge regression where half-set retraining is close to linear."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    xt = rng.normal(size=(n_test, d))
    yt = xt @ rng.normal(size=d) + 1.0

    def fit(rows: np.ndarray) -> np.ndarray:
        xs, ys = x[rows], y[rows]
        return np.linalg.solve(xs.T @ xs + lam * np.eye(d), xs.T @ ys)

    def test_losses(theta: np.ndarray) -> np.ndarray:
        return (xt @ theta - yt) ** 2

    theta = fit(np.arange(n))
    # exact influence of up-weighting each training point, pyDVL's sign:
    # g_test^T H^{-1} g_train with the Hessian of the ridge objective
    hessian = 2 * (x.T @ x + lam * np.eye(d))
    g_train = 2 * (x @ theta - y)[:, None] * x
    g_test = 2 * (xt @ theta - yt)[:, None] * xt
    scores = g_test @ np.linalg.solve(hessian, g_train.T)
    return fit, test_losses, scores


def test_exact_influence_on_a_near_linear_model_scores_near_one() -> None:
    fit, test_losses, scores = _ridge(n=60, d=4, n_test=10, lam=500.0, seed=0)
    masks = lds.subset_masks(60, 40, seed=0)
    losses = lds.retrain_losses(
        lambda rows: test_losses(fit(rows)), masks, progress=False
    )
    per_test = lds.lds(scores, masks, losses)
    assert per_test.min() > 0.95, per_test
    # the wrong sign convention gives the opposite ranking
    assert lds.lds(-scores, masks, losses).max() < -0.95
    # a per-test-point scale does not change the ranking
    scaled = scores * np.arange(1, 11)[:, None]
    np.testing.assert_allclose(lds.lds(scaled, masks, losses), per_test)


def test_lds_matches_scipy_spearman() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(5)
    masks = lds.subset_masks(20, 12, seed=1)
    scores = rng.normal(size=(3, 20))
    losses = rng.normal(size=(12, 3))
    losses[:2, 0] = losses[2, 0]  # ties
    got = lds.lds(scores, masks, losses)
    predicted = lds.predicted_losses(scores, masks)
    want = [spearmanr(predicted[:, j], losses[:, j])[0] for j in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_constant_test_loss_has_no_lds() -> None:
    masks = lds.subset_masks(6, 4)
    losses = np.ones((4, 2))
    losses[:, 1] = [0.1, 0.3, 0.2, 0.4]
    scores = np.random.default_rng(0).normal(size=(2, 6))
    per_test = lds.lds(scores, masks, losses)
    assert np.isnan(per_test[0]) and np.isfinite(per_test[1])
    out = lds.bootstrap_lds({"datainf": scores}, masks, losses, resamples=20)
    assert out["datainf"]["test_points"] == 1
    assert out["datainf"]["per_test"][0] is None  # JSON-friendly
    assert out["datainf"]["lds"] == pytest.approx(per_test[1])


# ------------------------------------------------------------ the bootstrap
def _noisy_problem(seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    masks = lds.subset_masks(50, 32, seed=seed)
    effect = rng.normal(size=(20, 50))
    losses = -(masks @ effect.T) + 3.0 * rng.normal(size=(32, 20))
    return masks, effect, losses, rng


def test_bootstrap_interval_contains_the_estimate_and_is_seeded() -> None:
    masks, effect, losses, rng = _noisy_problem()
    scores = {
        "datainf": effect + rng.normal(size=effect.shape),
        "exact": effect,
        "random": rng.normal(size=effect.shape),
        "copy": None,
    }
    scores["copy"] = scores["datainf"].copy()
    out = lds.bootstrap_lds(scores, masks, losses, resamples=200, seed=1)
    for m, v in out.items():
        lo, hi = v["ci"]
        assert lo <= v["lds"] <= hi, m
        assert hi - lo > 0.01, m  # a real spread
        assert len(v["per_test"]) == 20 and v["test_points"] == 20
        assert v["lds"] == pytest.approx(np.mean(v["per_test"]))
    assert "difference" not in out["datainf"]
    # the true effect beats the noisy one and random scores, paired
    assert out["exact"]["difference_ci"][0] > 0
    assert out["random"]["difference_ci"][1] < 0
    lo, hi = out["random"]["ci"]
    assert lo < 0 < hi  # chance
    # identical scores: the paired difference is exactly 0
    assert out["copy"]["difference"] == 0 and out["copy"]["difference_ci"] == [0, 0]
    again = lds.bootstrap_lds(scores, masks, losses, resamples=200, seed=1)
    assert again["exact"]["ci"] == out["exact"]["ci"]
    other = lds.bootstrap_lds(scores, masks, losses, resamples=200, seed=2)
    assert other["exact"]["ci"] != out["exact"]["ci"]
    # a wider level gives a wider interval
    wide = lds.bootstrap_lds(scores, masks, losses, resamples=200, seed=1, level=0.99)
    assert wide["exact"]["ci"][0] <= out["exact"]["ci"][0]
    assert wide["exact"]["ci"][1] >= out["exact"]["ci"][1]


def test_bootstrap_rejects_bad_input() -> None:
    masks, effect, losses, _ = _noisy_problem()
    with pytest.raises(ValueError, match="reference"):
        lds.bootstrap_lds({"exact": effect}, masks, losses)
    with pytest.raises(ValueError, match="do not match"):
        lds.bootstrap_lds({"datainf": effect}, masks, losses[:, :3])
    with pytest.raises(ValueError, match="level"):
        lds.bootstrap_lds({"datainf": effect}, masks, losses, level=95)
    with pytest.raises(ValueError, match="No scores"):
        lds.bootstrap_lds({}, masks, losses)


# ------------------------------------------------------- checkpoints, TracIn
def test_checkpoints_follow_the_schedule() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 5)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    seen = []
    with lds.record_checkpoints(every=2) as checkpoints:
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
            seen.append(model.weight.detach().clone())
    assert [c.step for c in checkpoints] == [2, 4, 5]
    # the mean learning rate of the steps each checkpoint closes
    lrs = [0.1 * (1 - s / 5) for s in range(5)]
    want = [np.mean(lrs[0:2]), np.mean(lrs[2:4]), lrs[4]]
    np.testing.assert_allclose([c.lr for c in checkpoints], want, rtol=1e-12)
    checkpoints[0].restore()
    assert torch.equal(model.weight, seen[1])
    checkpoints[-1].restore()
    assert torch.equal(model.weight, seen[-1])
    # the hook is gone after the block
    opt.step()
    assert [c.step for c in checkpoints] == [2, 4, 5]


def test_checkpoints_refuse_a_second_optimizer() -> None:
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt_a, opt_b = torch.optim.SGD([a], lr=0.1), torch.optim.SGD([b], lr=0.1)
    with pytest.raises(RuntimeError, match="two optimizers"):
        with lds.record_checkpoints(every=1):
            opt_a.step()
            opt_b.step()
    with pytest.raises(ValueError):
        with lds.record_checkpoints(every=0):
            pass


def test_tracin_sums_learning_rate_times_dot_products() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))
    x_train, x_test = torch.randn(5, 3), torch.randn(2, 3)

    def grads() -> tuple:  # gradients of (w . x)^2 / 2: (w . x) x
        wd = w.detach()
        return {"w": (x_train @ wd)[:, None] * x_train}, {
            "w": (x_test @ wd)[:, None] * x_test
        }

    values = [torch.randn(3) for _ in range(3)]
    checkpoints = [
        lds.Checkpoint(k + 1, 0.1 * (k + 1), [(w, v)]) for k, v in enumerate(values)
    ]
    start = w.detach().clone()
    got = lds.tracin_influences(checkpoints, grads)
    want = torch.zeros(2, 5, dtype=torch.float64)
    for c, v in zip(checkpoints, values):
        with torch.no_grad():
            w.copy_(v)
        g_train, g_test = grads()
        want += c.lr * hessian_free_influences(g_test, g_train)
    with torch.no_grad():
        w.copy_(start)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    assert torch.equal(w, start)  # restored
    with pytest.raises(ValueError):
        lds.tracin_influences([], grads)


def test_cosine_ignores_gradient_scale() -> None:
    torch.manual_seed(0)
    g_train = {"a": torch.randn(6, 4), "b": torch.randn(6, 2)}
    g_test = {"a": torch.randn(3, 4), "b": torch.randn(3, 2)}
    s = lds.cosine_influences(g_test, g_train)
    scaled = {k: v * torch.arange(1.0, 7.0)[:, None] for k, v in g_train.items()}
    torch.testing.assert_close(lds.cosine_influences(g_test, scaled), s)
    flat_train = torch.cat(list(g_train.values()), 1).double()
    flat_test = torch.cat(list(g_test.values()), 1).double()
    want = torch.nn.functional.cosine_similarity(
        flat_test[:, None], flat_train[None], dim=2
    )
    torch.testing.assert_close(s, want, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------ the setups
def _tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=2,
        )
    )


def test_classifier_setup_reduced(tmp_path: Path) -> None:
    """Every method, a few subsets, a tiny BERT: a record the docs can read."""
    bert = _tiny_bert()
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    record = lds.classifier_lds(
        "sms",
        n_train=16,
        n_test=6,
        n_subsets=4,
        epochs=2,
        batch_size=8,
        max_length=16,
        rank=2,
        lissa_iterations=5,
        resamples=50,
        model=bert,
        progress=False,
    )
    assert list(record["methods"]) == list(lds.METHODS)
    assert record["metric"]["n_subsets"] == 4 and record["metric"]["subset_size"] == 8
    assert np.asarray(record["losses"]).shape == (4, 6)
    for m, v in record["methods"].items():
        assert v["ci"][0] <= v["lds"] <= v["ci"][1], m
        assert -1 <= v["lds"] <= 1
    # one checkpoint per epoch of 2 steps, the last one the final model
    assert [c["step"] for c in record["config"]["checkpoints"]] == [2, 4]
    assert set(record["method_seconds"]) == set(lds.METHODS)
    assert record["seconds"]["total"]["wall"] > 0
    # the user's model is copied, never modified
    assert all(torch.equal(before[k], v) for k, v in bert.state_dict().items())
    out = tmp_path / "lds.json"
    lds.save(record, out)
    lds.save(dict(record, setup="causal_lm"), out)
    doc = json.loads(out.read_text())
    assert list(doc["setups"]) == ["causal_lm", "classifier"]
    assert doc["setups"]["classifier"]["methods"]["datainf"]["lds"] == pytest.approx(
        record["methods"]["datainf"]["lds"]
    )


def test_setups_check_their_arguments() -> None:
    with pytest.raises(ValueError, match="datainf"):
        lds.classifier_lds("sms", methods=["exact"], progress=False)
    with pytest.raises(ValueError, match="Unknown methods"):
        lds.classifier_lds("sms", methods=["datainf", "trak"], progress=False)
    with pytest.raises(ValueError, match="mode"):
        lds.run("classifier", mode="quick")
    tiny = (None, None)
    with pytest.raises(ValueError, match="updates=None"):
        lds.causal_lm_lds(None, None, recipe=FineTuning(), base=tiny)  # type: ignore[arg-type]


def _tiny_llama() -> tuple:
    tokenizer = load_tokenizer()
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    return llama, tokenizer


def test_causal_lm_setup_reduced() -> None:
    """Every method on a tiny Llama; the base model comes back without adapters."""
    llama, tokenizer = _tiny_llama()
    names = [n for n, _ in llama.named_parameters()]
    train, test = paper_task("math without reasoning", n_train=4, n_test=1, classes=2)
    recipe = FineTuning(rank=2, updates=None, epochs=2, batch_size=4, lr=1e-2)
    record = lds.causal_lm_lds(
        train,
        test,
        recipe=recipe,
        n_subsets=4,
        checkpoints=2,
        lissa_iterations=5,
        resamples=50,
        base=(llama, tokenizer),
        progress=False,
    )
    assert list(record["methods"]) == list(lds.METHODS)
    assert np.asarray(record["losses"]).shape == (4, 2)
    assert record["config"]["updates"] == 4
    assert [c["step"] for c in record["config"]["checkpoints"]] == [2, 4]
    assert record["config"]["train_scope"] == "text"
    assert record["config"]["test_scope"] == "answer"
    for m, v in record["methods"].items():
        assert v["ci"][0] <= v["lds"] <= v["ci"][1], m
    assert [n for n, _ in llama.named_parameters()] == names  # adapters removed
