"""DataInfInfluence against the independent dense float64 reference."""

import pickle
import threading
from collections import OrderedDict

import pytest
import torch
from pydvl.influence.types import InfluenceMode

from models import loader, make_case
from pydvl_datainf import DataInfInfluence
from reference import DenseDataInf, rel_err

TOL = 1e-8
CASES = ["mlp", "conv", "lora", "regression"]


def fitted(case, batch_size=7, **kwargs):
    model, loss, x, y, xt, yt = make_case(case)
    infl = DataInfInfluence(model, loss, progress=False, **kwargs)
    infl.fit(loader(x, y, batch_size))
    return infl, (model, loss, x, y, xt, yt)


@pytest.fixture(scope="module", params=CASES)
def case(request):
    infl, (model, loss, x, y, xt, yt) = fitted(request.param)
    ref = DenseDataInf(model, loss, x, y, infl.blocks.to_dict())
    return infl, ref, x, y, xt, yt


def test_lambda_is_paper_default(case):
    infl, ref, *_ = case
    for k, lam in infl.block_regularization.items():
        assert lam == pytest.approx(ref.lambdas[k], rel=1e-12)


def test_squared_norms_cached(case):
    infl, ref, *_ = case
    for k, s in infl.squared_norms.items():
        assert rel_err(s, (ref.train_grads[k] ** 2).sum(1)) < TOL


def test_influences(case):
    infl, ref, x, y, xt, yt = case
    got = infl.influences(xt, yt, x, y)
    assert got.shape == (len(xt), len(x)) and got.dtype == torch.float64
    assert rel_err(got, ref.influences(xt, yt, x, y)) < TOL


def test_influences_on_new_points_and_self(case):
    infl, ref, x, y, xt, yt = case
    # training side not seen in fit: gradients are computed, not looked up
    assert (
        rel_err(
            infl.influences(xt, yt, xt[:3], yt[:3]),
            ref.influences(xt, yt, xt[:3], yt[:3]),
        )
        < TOL
    )
    self_infl = infl.influences(xt, yt)
    assert rel_err(self_infl, ref.influences(xt, yt, xt, yt)) < TOL
    assert (torch.diagonal(self_infl) > 0).all()  # pyDVL sign: self-influence > 0


def test_factors_and_from_factors(case):
    infl, ref, x, y, xt, yt = case
    f = infl.influence_factors(xt, yt)
    assert f.shape == (len(xt), infl.n_parameters)
    assert rel_err(f, ref.factors(xt, yt)) < TOL
    assert (
        rel_err(infl.influences_from_factors(f, x, y), ref.influences(xt, yt, x, y))
        < TOL
    )


def test_by_block_variants(case):
    infl, ref, x, y, xt, yt = case
    expected = ref.influences_by_block(xt, yt, x, y)
    got = infl.influences_by_block(xt, yt, x, y)
    assert list(got) == infl.block_names
    for k in expected:
        assert rel_err(got[k], expected[k]) < TOL
    fb = infl.influence_factors_by_block(xt, yt)
    ref_fb = ref.factors_by_block(xt, yt)
    for k in ref_fb:
        assert rel_err(fb[k], ref_fb[k]) < TOL
    from_fb = infl.influences_from_factors_by_block(fb, x, y)
    from_flat = infl.influences_from_factors_by_block(
        torch.cat(list(fb.values()), 1), x, y
    )
    for k in expected:
        assert rel_err(from_fb[k], expected[k]) < TOL
        assert rel_err(from_flat[k], expected[k]) < TOL


def test_train_influences_covers_the_whole_cache(case):
    infl, ref, x, y, xt, yt = case
    assert rel_err(infl.train_influences(xt, yt), ref.influences(xt, yt, x, y)) < TOL


def test_perturbation_against_double_backward(case):
    infl, ref, x, y, xt, yt = case
    # more test points than training points: pyDVL 0.10 fails here
    got = infl.influences(xt, yt, x[:3], y[:3], mode=InfluenceMode.Perturbation)
    assert got.shape == (len(xt), 3, *x.shape[1:])
    expected = ref.perturbation(xt, yt, x[:3], y[:3])
    assert rel_err(got, expected) < TOL
    f = infl.influence_factors(xt, yt)
    got2 = infl.influences_from_factors(
        f, x[:3], y[:3], mode=InfluenceMode.Perturbation
    )
    assert rel_err(got2, expected) < TOL
    by_block = infl.influences_by_block(
        xt, yt, x[:3], y[:3], mode=InfluenceMode.Perturbation
    )
    assert rel_err(sum(by_block.values()), expected) < TOL


def test_perturbation_loop_fallback_equals_func():
    from pydvl_datainf import perturbation

    infl, (model, loss, x, y, xt, yt) = fitted("mlp")
    f = infl.influence_factors_by_block(xt, yt)
    a = perturbation._with_func(model, loss, infl.params, infl.blocks, f, x[:2], y[:2])
    b = perturbation._with_loop(model, loss, infl.params, infl.blocks, f, x[:2], y[:2])
    assert rel_err(b, a) < 1e-10


@pytest.mark.parametrize("spec", ["float", "dict"])
def test_explicit_regularization(spec):
    model, loss, x, y, xt, yt = make_case("lora")
    probe = DataInfInfluence(model, loss, progress=False)
    lambdas = {k: 0.05 * (i + 1) for i, k in enumerate(probe.block_names)}
    reg = 0.3 if spec == "float" else lambdas
    infl = DataInfInfluence(model, loss, reg, progress=False).fit(loader(x, y))
    expected_l = {k: 0.3 for k in lambdas} if spec == "float" else lambdas
    assert infl.block_regularization == expected_l
    ref = DenseDataInf(model, loss, x, y, infl.blocks.to_dict(), expected_l)
    assert rel_err(infl.influences(xt, yt, x, y), ref.influences(xt, yt, x, y)) < TOL


def test_dict_mixing_auto_and_float_and_scale():
    model, loss, x, y, xt, yt = make_case("mlp")
    infl = DataInfInfluence(
        model, loss, {"0": "auto", "2": 0.7}, regularization_scale=0.5, progress=False
    ).fit(loader(x, y))
    ref = DenseDataInf(model, loss, x, y, infl.blocks.to_dict())
    assert infl.block_regularization["0"] == pytest.approx(
        5 * ref.lambdas["0"], rel=1e-12
    )
    assert infl.block_regularization["2"] == 0.7


def test_with_regularization_changes_results_without_refit():
    infl, (model, loss, x, y, xt, yt) = fitted("mlp")
    before = infl.influences(xt, yt, x, y)
    infl.with_regularization(0.01)
    ref = DenseDataInf(model, loss, x, y, infl.blocks.to_dict(), {"0": 0.01, "2": 0.01})
    after = infl.influences(xt, yt, x, y)
    assert rel_err(after, ref.influences(xt, yt, x, y)) < TOL
    assert rel_err(after, before) > 1e-3  # the factor cache was invalidated
    infl.with_regularization("auto")
    assert rel_err(infl.influences(xt, yt, x, y), before) < 1e-13


@pytest.mark.parametrize("case_name", CASES)
def test_fit_batch_size_invariance(case_name):
    model, loss, x, y, xt, yt = make_case(case_name)
    results = []
    for bs in (1, 7, len(x)):
        infl = DataInfInfluence(model, loss, progress=False).fit(loader(x, y, bs))
        results.append(
            (
                infl.influences(xt, yt, x, y),
                infl.influence_factors(xt, yt),
                infl.train_influences(xt, yt),
            )
        )
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert rel_err(b, a) < 1e-12


def test_query_chunking_invariance_direct():
    infl, (model, loss, x, y, xt, yt) = fitted("lora")
    whole = infl.influences(xt, yt, x, y)
    parts = torch.cat(
        [
            torch.cat(
                [
                    infl.influences(
                        xt[i : i + 2], yt[i : i + 2], x[j : j + 5], y[j : j + 5]
                    )
                    for j in range(0, len(x), 5)
                ],
                1,
            )
            for i in range(0, len(xt), 2)
        ],
        0,
    )
    assert rel_err(parts, whole) < 1e-12


def test_test_factor_cache_is_exact_and_keyed_by_content():
    infl, (model, loss, x, y, xt, yt) = fitted("mlp")
    a = infl.influences(xt, yt, x, y)
    assert len(infl._factor_cache) == 1
    b = infl.influences(xt.clone(), yt.clone(), x, y)  # same content: cache hit
    assert len(infl._factor_cache) == 1 and torch.equal(a, b)
    c = infl.influences(xt + 1e-3, yt, x, y)  # new content: recomputed
    assert len(infl._factor_cache) == 2 and not torch.equal(a, c)
    nocache = DataInfInfluence(model, loss, progress=False, test_factor_cache=0)
    nocache.fit(loader(x, y))
    assert rel_err(nocache.influences(xt, yt, x, y), a) < 1e-13


def test_shuffled_loader_still_exact_for_explicit_queries(caplog):
    model, loss, x, y, xt, yt = make_case("mlp")
    infl = DataInfInfluence(model, loss, progress=False)
    infl.fit(loader(x, y, shuffle=True))
    assert "shuffles" in caplog.text
    ref = DenseDataInf(model, loss, x, y, infl.blocks.to_dict())
    assert rel_err(infl.influences(xt, yt, x, y), ref.influences(xt, yt, x, y)) < TOL


class _ModeSpy(torch.nn.Module):
    """Dropout that records the mode of every forward pass."""

    def __init__(self):
        super().__init__()
        self.dropout = torch.nn.Dropout(0.5)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.dropout(x)


def test_model_mode_restored_and_eval_used():
    model, loss, x, y, xt, yt = make_case("mlp")
    spy = _ModeSpy()
    model = torch.nn.Sequential(model, spy).double()
    model.train()
    # no factor cache, and a training side not seen in fit: every query runs
    # forward passes for both sides
    infl = DataInfInfluence(model, loss, progress=False, test_factor_cache=0)
    infl.fit(loader(x, y))
    assert model.training and spy.modes and not any(spy.modes)
    ref = DenseDataInf(model, loss, x, y, infl.blocks.to_dict())  # eval mode
    for _ in range(2):
        spy.modes.clear()
        got = infl.influences(xt, yt, xt[:3], yt[:3])
        assert len(spy.modes) >= 2 and not any(spy.modes)  # ran, in eval mode
        assert model.training  # restored
        # with dropout active the values would be random, not the reference's
        assert rel_err(got, ref.influences(xt, yt, xt[:3], yt[:3])) < TOL
    spy.modes.clear()
    infl.train_influences(xt, yt)
    assert spy.modes and not any(spy.modes) and model.training


def test_n_parameters_before_fit_and_state():
    model, loss, *_ = make_case("lora")
    infl = DataInfInfluence(model, loss)
    assert infl.n_parameters == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    assert not infl.is_fitted and infl.is_thread_safe


def test_pickle_roundtrip_keeps_results():
    infl, (model, loss, x, y, xt, yt) = fitted("mlp")
    a = infl.influences(xt, yt, x, y)
    clone = pickle.loads(pickle.dumps(infl))
    assert torch.equal(clone.influences(xt, yt, x, y), a)


def test_concurrent_queries_from_threads_are_exact():
    infl, (model, loss, x, y, xt, yt) = fitted("conv")
    expected = [
        infl.influences(xt[i : i + 1], yt[i : i + 1], x, y) for i in range(len(xt))
    ]
    infl._factor_cache.clear()
    out = [None] * len(xt)

    def work(i):
        for _ in range(3):
            out[i] = infl.influences(xt[i : i + 1], yt[i : i + 1], x.flip(0), y.flip(0))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xt))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(xt)):
        assert rel_err(out[i], expected[i].flip(1)) < 1e-12


def test_to_moves_model_store_and_norms_and_drops_cached_factors():
    infl, (model, loss, x, y, xt, yt) = fitted("mlp")
    a = infl.influences(xt, yt, x, y)
    clone = pickle.loads(pickle.dumps(infl))
    generation = clone.generation
    clone.influences(xt, yt, x, y)
    assert len(clone._factor_cache) == 1
    clone.to("meta")  # a device with no data: everything must have moved
    assert clone.generation > generation and len(clone._factor_cache) == 0
    assert all(p.device.type == "meta" for p in clone.model.parameters())
    assert all(s.device.type == "meta" for s in clone.squared_norms.values())
    assert all(g.device.type == "meta" for g in clone.store.read(0, 3).values())
    # the original is untouched, and a move to its own device keeps results
    assert infl.store.read(0, 1)["0"].device.type == "cpu"
    assert torch.equal(infl.to("cpu").influences(xt, yt, x, y), a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_and_back_keeps_results():
    infl, (model, loss, x, y, xt, yt) = fitted("conv")
    a = infl.influences(xt, yt, x, y)
    on_gpu = infl.to("cuda").influences(xt, yt, x, y)
    assert on_gpu.device.type == "cuda"
    assert rel_err(on_gpu.cpu(), a) < 1e-10
    assert torch.equal(infl.to("cpu").influences(xt, yt, x, y).cpu(), a)


def test_ordered_dict_block_structure_end_to_end():
    model, loss, x, y, xt, yt = make_case("mlp")
    spec = OrderedDict(all=["0.weight", "0.bias", "2.weight", "2.bias"])
    infl = DataInfInfluence(model, loss, block_structure=spec, progress=False).fit(
        loader(x, y)
    )
    ref = DenseDataInf(model, loss, x, y, spec)
    assert rel_err(infl.influences(xt, yt, x, y), ref.influences(xt, yt, x, y)) < TOL


def test_per_sample_gradients_and_hessian_free_baseline(case):
    infl, ref, x, y, xt, yt = case
    g = infl.per_sample_gradients(xt, yt)
    ref_g = ref.grads(xt, yt)
    for k in ref_g:
        assert rel_err(g[k], ref_g[k]) < 1e-10
    flat = torch.cat(list(g.values()), 1)
    expected = sum(ref_g[k] @ ref.train_grads[k].T for k in ref_g)
    assert rel_err(infl.influences_from_factors(flat, x, y), expected) < 1e-10
