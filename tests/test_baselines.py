"""Baselines against the independent dense float64 reference, and the metrics."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from models import make_case
from pydvl_datainf import DataInfInfluence
from pydvl_datainf.experiments import baselines as B
from pydvl_datainf.experiments import ekfac as E
from pydvl_datainf.experiments.pipelines import block_regularization
from reference import dense_exact_inverse, dense_R, per_sample_grads, rel_err

TOL = 1e-8


def fitted(case, n=24, m=5, **kwargs):
    model, loss, x, y, xt, yt = make_case(case, n=n, m=m)
    infl = DataInfInfluence(model, loss, progress=False, **kwargs)
    infl.fit(DataLoader(TensorDataset(x, y), batch_size=7))
    return infl, model, loss, x, y, xt, yt


@pytest.mark.parametrize(
    "case,n",
    [
        ("mlp", 60),  # d_l <= n: solve in parameter space
        ("mlp", 12),  # d_l > n for the first layer: Woodbury in sample space
        ("lora", 40),
        ("conv", 24),
    ],
)
def test_exact_inverse_matches_dense_reference(case, n):
    infl, model, loss, x, y, xt, yt = fitted(case, n=n)
    blocks = infl.blocks.to_dict()
    ref_train = per_sample_grads(model, loss, x, y, blocks)
    ref_test = per_sample_grads(model, loss, xt, yt, blocks)
    lam = infl.block_regularization
    want = sum(
        ref_test[k] @ dense_exact_inverse(ref_train[k], lam[k]) @ ref_train[k].T
        for k in blocks
    )
    g_train = B.training_gradients(infl)
    g_test = infl.per_sample_gradients(xt, yt)
    got = B.exact_influences(g_test, g_train, lam)
    assert got.dtype == torch.float64 and got.shape == (len(xt), n)
    assert rel_err(got, want) < TOL
    # factors, and a different training-side set
    f = B.exact_factors(g_test, g_train, lam)
    for k in blocks:
        want_f = ref_test[k] @ dense_exact_inverse(ref_train[k], lam[k])
        assert rel_err(f[k], want_f) < TOL
    other = B.exact_influences(g_test, g_train, lam, other=g_test)
    assert other.shape == (len(xt), len(xt))


def test_both_solves_agree():
    g = torch.randn(30, 8, dtype=torch.float64)
    v = torch.randn(4, 8, dtype=torch.float64)
    lam = {"b": 0.3}
    dense = B.exact_factors({"b": v}, {"b": g}, lam)["b"]  # d <= n
    # the same system through Woodbury: duplicate columns push d above n
    wide = B.exact_factors({"b": v}, {"b": g[:5]}, lam)["b"]
    want_wide = v @ dense_exact_inverse(g[:5], 0.3)
    assert rel_err(dense, v @ dense_exact_inverse(g, 0.3)) < TOL
    assert rel_err(wide, want_wide) < TOL


def test_datainf_from_gradients_equals_model():
    infl, model, loss, x, y, xt, yt = fitted("lora")
    g_train = B.training_gradients(infl)
    g_test = infl.per_sample_gradients(xt, yt)
    got = B.datainf_influences(g_test, g_train, infl.block_regularization)
    assert rel_err(got, infl.train_influences(xt, yt)) < TOL
    assert block_regularization(g_train, "auto", 0.1) == pytest.approx(
        dict(infl.block_regularization), rel=1e-12
    )


def test_datainf_from_gradients_matches_dense_reference():
    gen = torch.Generator().manual_seed(3)
    g = OrderedDict(
        a=torch.randn(9, 4, generator=gen, dtype=torch.float64),
        b=3.0 * torch.randn(9, 6, generator=gen, dtype=torch.float64),
    )
    t = OrderedDict(
        (k, torch.randn(3, v.shape[1], generator=gen, dtype=torch.float64))
        for k, v in g.items()
    )
    other = OrderedDict(
        (k, torch.randn(5, v.shape[1], generator=gen, dtype=torch.float64))
        for k, v in g.items()
    )
    lam = {"a": 0.2, "b": 1.7}
    want = sum(t[k] @ dense_R(g[k], lam[k]) @ g[k].T for k in g)
    assert rel_err(B.datainf_influences(t, g, lam), want) < TOL
    want_other = sum(t[k] @ dense_R(g[k], lam[k]) @ other[k].T for k in g)
    assert rel_err(B.datainf_influences(t, g, lam, other), want_other) < TOL
    self_want = torch.stack(
        [sum(g[k][i] @ dense_R(g[k], lam[k]) @ g[k][i] for k in g) for i in range(9)]
    )
    got = torch.as_tensor(B.datainf_self_influences(g, lam))
    assert rel_err(got, self_want) < TOL


def test_block_regularization_rules():
    g = OrderedDict(
        a=torch.ones(4, 2, dtype=torch.float64),
        b=2 * torch.ones(4, 6, dtype=torch.float64),
    )
    # auto: 0.1 * mean_i |g_i|^2 / d = 0.1 * 1 (a), 0.1 * 4 (b)
    assert block_regularization(g, "auto", 0.1) == pytest.approx({"a": 0.1, "b": 0.4})
    # global: 0.1 * (4*2*1 + 4*6*4) / 4 / 8 = 0.1 * 26 / 8
    assert block_regularization(g, "global", 0.1) == pytest.approx(
        {"a": 0.325, "b": 0.325}
    )
    assert block_regularization(g, 0.5) == {"a": 0.5, "b": 0.5}
    with pytest.raises(ValueError, match="positive"):
        block_regularization(g, -1.0)


def test_point_baselines_against_hand_computation():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1])
    p = torch.softmax(logits, 1)
    want_loss = -torch.log(p[torch.arange(3), y])
    assert np.allclose(B.per_sample_losses(logits, y), want_loss.numpy(), rtol=1e-12)
    onehot = torch.eye(2, dtype=torch.float64)[y]
    want_el2n = ((p - onehot) ** 2).sum(1).sqrt()
    assert np.allclose(B.el2n_scores(logits, y), want_el2n.numpy(), rtol=1e-12)
    g = OrderedDict(
        a=torch.tensor([[3.0], [0.0]]), b=torch.tensor([[0.0, 4.0], [1.0, 0.0]])
    )
    assert np.allclose(B.gradient_norms(g), [5.0, 1.0])


def test_hessian_free_is_plain_dot_products():
    infl, model, loss, x, y, xt, yt = fitted("mlp")
    g_train = B.training_gradients(infl)
    g_test = infl.per_sample_gradients(xt, yt)
    ref = per_sample_grads(model, loss, xt, yt, infl.blocks.to_dict())
    reft = per_sample_grads(model, loss, x, y, infl.blocks.to_dict())
    want = sum(ref[k] @ reft[k].T for k in ref)
    assert rel_err(B.hessian_free_influences(g_test, g_train), want) < TOL


def test_lissa_converges_to_exact():
    g = {"b": torch.randn(40, 6, dtype=torch.float64)}
    v = {"b": torch.randn(3, 6, dtype=torch.float64)}
    lam = {"b": 0.5}
    exact = B.exact_factors(v, g, lam)["b"]
    # full batch: deterministic, converges geometrically
    got = B.lissa_factors(v, g, lam, iterations=3000, batch_size=40)["b"]
    assert rel_err(got, exact) < 1e-6
    # mini-batches: stable (never diverges) and close
    noisy = B.lissa_factors(v, g, lam, iterations=3000, batch_size=8)["b"]
    assert torch.isfinite(noisy).all()
    assert rel_err(noisy, exact) < 0.3


def test_merge_blocks():
    g = OrderedDict(a=torch.ones(2, 3), b=torch.zeros(2, 1), c=torch.ones(2, 2))
    m = B.merge_blocks(g, {"ab": ["a", "b"], "c": ["c"]})
    assert list(m) == ["ab", "c"] and m["ab"].shape == (2, 4)
    with pytest.raises(ValueError):
        B.merge_blocks(g, {"ab": ["a", "b"]})


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="different blocks"):
        B.hessian_free_influences({"a": torch.ones(1, 2)}, {"b": torch.ones(1, 2)})
    with pytest.raises(ValueError, match="width"):
        B.hessian_free_influences({"a": torch.ones(1, 2)}, {"a": torch.ones(1, 3)})


def float32_case(case, n=40, m=5):
    # pyDVL 0.10's EkfacInfluence allocates its factors in float32 only
    model, loss, x, y, xt, yt = make_case(case, n=n, m=m)
    model, x, xt = model.float(), x.float(), xt.float()
    infl = DataInfInfluence(model, loss, progress=False)
    infl.fit(DataLoader(TensorDataset(x, y), batch_size=7))
    return infl, model, loss, x, y, xt, yt


@pytest.mark.parametrize("case", ["lora", "mlp"])  # without / with biases
def test_ekfac_application_matches_explicit_kronecker_inverse(case):
    infl, model, loss, x, y, xt, yt = float32_case(case)
    ekfac = E.fit_pydvl_ekfac(model, DataLoader(TensorDataset(x, y), batch_size=8))
    g_train = B.training_gradients(infl)
    g_test = infl.per_sample_gradients(xt, yt)
    got = E.ekfac_influences(
        E.from_pydvl(ekfac), g_test, g_train, regularization_scale=0.1
    )
    rep = ekfac.ekfac_representation
    want = torch.zeros(len(xt), len(x), dtype=torch.float64)
    for name, module, qa, qg, diag in zip(
        rep.layer_names, rep.layers_module, rep.evecs_a, rep.evecs_g, rep.diags
    ):
        qa, qg, diag = qa.detach(), qg.detach(), diag.detach()
        kron = torch.kron(qg.double(), qa.double())  # row-major vec of (out, cols)
        d = diag.double().reshape(-1)
        inv = kron @ torch.diag(1 / (d + 0.1 * d.mean())) @ kron.T
        out_f, cols = qg.shape[0], qa.shape[0]
        # our layout: weight (out, in) row-major, then bias; pyDVL's: (out, in + 1)
        perm = torch.arange(out_f * cols).reshape(out_f, cols)
        if module.bias is not None:
            w = perm[:, :-1].reshape(-1)
            perm = torch.cat([w, perm[:, -1]])
        perm = perm.reshape(-1)
        inv = inv[perm][:, perm]
        want += g_test[name].double() @ inv @ g_train[name].double().T
    assert rel_err(got, want) < 1e-5
    assert not any(p.grad is not None for p in model.parameters())


def test_ekfac_rejects_blocks_that_are_not_one_layer():
    infl, model, loss, x, y, xt, yt = float32_case("lora")
    ekfac = E.fit_pydvl_ekfac(model, DataLoader(TensorDataset(x, y), batch_size=8))
    g = B.training_gradients(infl)
    merged = {k.replace("lora_A", "X").replace("lora_B", "X") for k in g}
    groups = {
        m: [k for k in g if k.replace("lora_A", "X").replace("lora_B", "X") == m]
        for m in merged
    }
    gm = B.merge_blocks(g, groups)
    with pytest.raises(ValueError, match="do not match"):
        E.ekfac_influences(E.from_pydvl(ekfac), gm, gm)


def test_roc_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(size=200) + labels
    scores[:20] = 0.5  # ties
    assert B.roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    with pytest.raises(ValueError):
        B.roc_auc(scores, np.zeros(200))


def test_detection_metrics():
    harm = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    flipped = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    m = B.detection_metrics(harm, flipped, top_fraction=0.2)
    assert m["recall_top"] == 0.5  # top 2 holds one of the two flipped
    assert m["auc"] == pytest.approx(1 - 1 / 16)


def test_class_match_metrics():
    scores = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 3.0, 2.0, 1.0]])
    train = np.array([0, 0, 1, 1])
    m = B.class_match_metrics(scores, np.array([0, 1]), train)
    # row 0: perfect; row 1: top-2 = {1, 2} holds one of class 1
    assert m["recall"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx((1.0 + 0.5) / 2)


def test_rowwise_correlation():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 30))
    b = a + 0.3 * rng.normal(size=(4, 30))
    mean, rows = B.rowwise_correlation(a, b)
    want = [np.corrcoef(a[i], b[i])[0, 1] for i in range(4)]
    assert rows == pytest.approx(want) and mean == pytest.approx(np.mean(want))
    s_mean, _ = B.rowwise_correlation(a, np.exp(a), "spearman")
    assert s_mean == pytest.approx(1.0)
    with pytest.raises(ValueError):
        B.rowwise_correlation(a, b, "kendall")
