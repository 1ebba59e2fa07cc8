"""Rank-one factored per-sample gradients: the factors, the engine, the cache.

Every value is compared with the dense path (the autograd loop, or the dense
engine) and with the independent float64 reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import LoRAMLP, loader, make_case
from pydvl_datainf import DataInfInfluence, MemoryGradientStore
from pydvl_datainf.factored import (
    FactoredGrads,
    RowParts,
    densify,
    join,
    squared_norms,
)
from pydvl_datainf.gradients import HookGradientEngine
from pydvl_datainf.storage import AutoGradientStore, ZarrGradientStore
from reference import DenseDataInf, per_sample_grads, rel_err


def outer_rows(u, a):
    return torch.stack([torch.outer(u[i], a[i]).reshape(-1) for i in range(len(u))])


# ------------------------------------------------------------------ the factors


def test_dense_and_norms_equal_explicit_outer_products():
    u = torch.randn(5, 3, dtype=torch.float64)
    a = torch.randn(5, 4, dtype=torch.float64)
    t = torch.randn(5, 2, dtype=torch.float64)
    g = FactoredGrads(u, a, t)
    expected = torch.cat([outer_rows(u, a), t], dim=1)
    assert g.shape == (5, 14) and len(g) == 5
    assert torch.equal(g.dense(), expected)
    assert torch.allclose(g.squared_norms(), (expected**2).sum(1), rtol=1e-14, atol=0)
    assert torch.allclose(squared_norms(g), squared_norms(expected), rtol=1e-14)
    idx = torch.tensor([4, 0, 0])
    assert torch.equal(g[idx].dense(), expected[idx])
    assert torch.equal(g[1:3].dense(), expected[1:3])
    assert g.nbytes == (15 + 20 + 10) * 8
    out = torch.empty(5, 14, dtype=torch.float64)
    assert g.dense(out=out) is out and torch.equal(out, expected)
    with pytest.raises(ValueError, match="shape"):
        g.dense(out=torch.empty(5, 13, dtype=torch.float64))


def test_join_keeps_the_first_factored_part_and_densifies_the_rest():
    u, a = torch.randn(4, 3), torch.randn(4, 2)
    b = torch.randn(4, 3)
    other = FactoredGrads(torch.randn(4, 2), torch.randn(4, 2))
    joined = join([FactoredGrads(u, a), b, other])
    assert isinstance(joined, FactoredGrads)
    assert torch.equal(
        joined.dense(), torch.cat([outer_rows(u, a), b, other.dense()], 1)
    )
    dense_first = join([b, FactoredGrads(u, a)])
    assert isinstance(dense_first, torch.Tensor)
    assert torch.equal(dense_first, torch.cat([b, outer_rows(u, a)], 1))


def test_inconsistent_factors_are_refused():
    with pytest.raises(ValueError, match="rows"):
        FactoredGrads(torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="dtypes"):
        FactoredGrads(torch.randn(3, 2), torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        FactoredGrads(torch.randn(3, 2, 1), torch.randn(3, 2))


# ------------------------------------------------------------------ the engine


class Reused(nn.Module):
    """One linear layer applied twice: its gradient has rank two."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class Tokens(nn.Module):
    """A linear layer on (batch, tokens, features): not rank one."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)).mean(1))


@pytest.mark.parametrize(
    "model,x,factored",
    [
        (
            LoRAMLP(),
            torch.randn(9, 6),
            {f"l{i}.lora_{m}.weight" for i in (1, 2) for m in "AB"},
        ),
        (Reused(), torch.randn(9, 4), {"head.weight"}),
        (Tokens(), torch.randn(9, 2, 4), {"head.weight"}),
        (Tokens(), torch.randn(9, 1, 4), {"lin.weight", "head.weight"}),
    ],
    ids=["lora", "reused-layer", "tokens", "one-token"],
)
def test_engine_factors_exactly_the_rank_one_weights(model, x, factored):
    model = model.double().eval()
    x = x.double()
    y = torch.randint(0, 3, (len(x),))
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    engine = HookGradientEngine()
    got = engine.per_sample_grads_factored(model, F.cross_entropy, x, y, params)
    dense = engine.per_sample_grads(model, F.cross_entropy, x, y, params)
    ref = per_sample_grads(model, F.cross_entropy, x, y, {k: [k] for k in params})
    assert {k for k, v in got.items() if isinstance(v, FactoredGrads)} == factored
    for k in params:
        assert isinstance(dense[k], torch.Tensor)
        assert rel_err(densify(got[k]), ref[k]) < 1e-12, k
        assert rel_err(dense[k], ref[k]) < 1e-12, k


def test_validation_accepts_factored_weights():
    model = LoRAMLP().double().eval()
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    got = HookGradientEngine(validate=True).per_sample_grads_factored(
        model, F.cross_entropy, x, y, params
    )
    assert any(isinstance(v, FactoredGrads) for v in got.values())


# ------------------------------------------------------------------ the cache


@pytest.mark.parametrize("structure", ["module", "lora", "parameter"])
@pytest.mark.parametrize("case", ["mlp", "lora", "regression"])
def test_factored_fit_equals_dense_fit_and_reference(case, structure):
    model, loss, x, y, xt, yt = make_case(case, n=30)
    fac = DataInfInfluence(model, loss, block_structure=structure, progress=False)
    fac.fit(loader(x, y))
    dense = DataInfInfluence(
        model, loss, block_structure=structure, progress=False, factorize=False
    ).fit(loader(x, y))
    store = fac.store
    assert isinstance(store, MemoryGradientStore) and store.factored_blocks
    assert not dense.store.factored_blocks
    assert store.nbytes < dense.store.nbytes
    for k in fac.block_names:
        assert rel_err(store.data[k], dense.store.data[k]) == 0.0
        assert rel_err(fac.squared_norms[k], dense.squared_norms[k]) < 1e-14
    ref = DenseDataInf(model, loss, x, y, fac.blocks.to_dict())
    for got in (fac, dense):
        assert (
            rel_err(got.influences(xt, yt, x, y), ref.influences(xt, yt, x, y)) < 1e-8
        )
        assert rel_err(got.influence_factors(xt, yt), ref.factors(xt, yt)) < 1e-8
    assert rel_err(fac.train_influences(xt, yt), dense.train_influences(xt, yt)) < 1e-13


def test_store_switches_a_block_to_dense_when_a_batch_is_not_factored():
    u, a = (
        torch.randn(6, 3, dtype=torch.float64),
        torch.randn(6, 2, dtype=torch.float64),
    )
    dense_rows = torch.randn(4, 6, dtype=torch.float64)
    for capacity in (None, 10):
        store = MemoryGradientStore(["w"], capacity=capacity)
        store.append({"w": FactoredGrads(u[:3], a[:3])})
        store.append({"w": dense_rows})
        store.append({"w": FactoredGrads(u[3:], a[3:])})
        store.finalize()
        expected = torch.cat(
            [outer_rows(u[:3], a[:3]), dense_rows, outer_rows(u[3:], a[3:])]
        )
        assert store.n == 10 and not store.factored_blocks
        assert torch.equal(store.data["w"], expected)
        assert store.nbytes == 10 * 6 * 8


def test_factored_store_reads_in_bounded_chunks():
    u, a = torch.randn(50, 4), torch.randn(50, 5)
    store = MemoryGradientStore(["w"], capacity=50)
    store.append({"w": FactoredGrads(u, a)})
    store.finalize()
    assert store.factored_blocks == ["w"] and store.nbytes == 50 * 9 * 4
    store_rows = store.chunk_rows
    assert store_rows is not None
    chunks = list(store.chunks())
    assert [s for s, _ in chunks] == list(range(0, 50, store_rows))
    assert torch.equal(torch.cat([c["w"] for _, c in chunks]), outer_rows(u, a))
    idx = torch.tensor([7, 3])
    assert torch.equal(store.take(idx)["w"], outer_rows(u, a)[idx])
    assert torch.equal(store.read(10, 13)["w"], outer_rows(u, a)[10:13])


def test_auto_store_spills_factored_rows_to_zarr_as_dense(tmp_path):
    model, loss, x, y, xt, yt = make_case("lora", n=40)
    mem = DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    auto = DataInfInfluence(
        model,
        loss,
        progress=False,
        store="auto",
        store_path=tmp_path / "spill.zarr",
        memory_budget=mem.store.nbytes // 2,
    ).fit(loader(x, y))
    assert isinstance(auto.store, ZarrGradientStore)
    for k in mem.block_names:
        assert torch.equal(auto.store.read(0, 40)[k], mem.store.data[k])
    assert rel_err(auto.influences(xt, yt, x, y), mem.influences(xt, yt, x, y)) < 1e-13


def test_auto_store_keeps_factors_in_memory():
    store = AutoGradientStore(["w"], 10**6, lambda: pytest.fail("must not spill"))
    assert store.accepts_factored
    store.append({"w": FactoredGrads(torch.randn(3, 4), torch.randn(3, 5))})
    store.finalize()
    assert isinstance(store.resolved, MemoryGradientStore)
    assert store.resolved.factored_blocks == ["w"]


def test_factorize_false_and_custom_engines_give_dense_caches():
    model, loss, x, y, *_ = make_case("lora", n=12)
    for options in ({"factorize": False}, {"engine": "func"}, {"engine": "loop"}):
        infl = DataInfInfluence(model, loss, progress=False, **options).fit(
            loader(x, y)
        )
        assert not infl.store.factored_blocks, options


def test_factored_cache_survives_pickling_and_to():
    import pickle

    model, loss, x, y, xt, yt = make_case("lora", n=20)
    infl = DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    expected = infl.influences(xt, yt, x, y)
    clone = pickle.loads(pickle.dumps(infl))
    assert clone.store.factored_blocks == infl.store.factored_blocks
    assert torch.equal(clone.influences(xt, yt, x, y), expected)
    moved = infl.to("cpu")
    assert moved.store.factored_blocks and torch.equal(
        moved.influences(xt, yt, x, y), expected
    )


def test_fit_keys_samples_by_digests_taken_at_fit(tmp_path):
    model, loss, x, y, xt, yt = make_case("lora", n=20)
    mem = DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    assert mem.state.rows.nbytes == 20 * 16  # digests only, no copy of x
    x[3] += 1.0  # the caller changes its data after fit: the index must not
    rows = mem.state.rows.lookup(x[[2, 1]], y[[2, 1]])
    assert rows is not None and rows.tolist() == [2, 1]
    assert mem.state.rows.lookup(x[[3]], y[[3]]) is None
    # on disk too, and the index is saved with the store
    zs = DataInfInfluence(
        model, loss, progress=False, store="zarr", store_path=tmp_path / "z.zarr"
    ).fit(loader(x, y))
    again = DataInfInfluence.from_store(model, loss, tmp_path / "z.zarr")
    assert again.state.rows.lookup(x[[3, 0]], y[[3, 0]]).tolist() == [3, 0]
    assert zs.state.rows.n == 20


# ------------------------------------------------------------------ batches kept


def _parts(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = [
        FactoredGrads(
            torch.randn(k, 3, generator=g, dtype=torch.float64),
            torch.randn(k, 4, generator=g, dtype=torch.float64),
            torch.randn(k, 2, generator=g, dtype=torch.float64),
        )
        for k in sizes
    ]
    parts = RowParts()
    for b in batches:
        parts.append(b)
    return parts, torch.cat([b.dense() for b in batches])


def test_row_parts_address_rows_across_batches():
    parts, dense = _parts([3, 1, 4, 2])
    assert len(parts) == 10 and parts.shape == (10, 14)
    for start, stop in [(0, 10), (2, 5), (3, 4), (4, 9), (9, 12), (5, 5), (-3, 2)]:
        expected = dense[max(0, start) : stop]
        assert torch.equal(parts[max(0, start) : stop].dense(), expected), (start, stop)
    idx = torch.tensor([9, 0, 3, 3, 7, -1, 4])
    assert torch.equal(parts.take(idx).dense(), dense[idx])
    assert torch.equal(parts.whole().dense(), dense)
    with pytest.raises(IndexError):
        parts.take(torch.tensor([10]))


def test_row_parts_copy_views_and_repeated_buffers_only():
    fresh = FactoredGrads(torch.randn(4, 3), torch.randn(4, 2))
    parts = RowParts()
    parts.append(fresh)
    assert parts.parts[0].left.data_ptr() == fresh.left.data_ptr()  # no copy
    parts.append(fresh)  # the same tensors again: must not alias
    assert parts.parts[1].left.data_ptr() != fresh.left.data_ptr()
    big = torch.randn(10, 3)
    parts.append(FactoredGrads(big[2:6], torch.randn(4, 2)))  # a view of more
    assert parts.parts[2].left.untyped_storage().nbytes() == 4 * 3 * 4
    big[2:6] = 0.0
    assert parts.parts[2].left.abs().sum() > 0
    with pytest.raises(ValueError, match="layout"):
        parts.append(FactoredGrads(torch.randn(1, 5), torch.randn(1, 2)))


def test_cache_never_aliases_the_callers_batches():
    model = nn.Linear(6, 5).double().eval()
    batches = [
        (torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64))
        for _ in range(3)
    ]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    got = HookGradientEngine().per_sample_grads_factored(
        model, F.mse_loss, *batches[0], dict(model.named_parameters())
    )
    assert torch.equal(got["weight"].right, batches[0][0])  # the input itself
    infl = DataInfInfluence(model, F.mse_loss, progress=False)
    infl.fit(batches)  # a list: no capacity, batches kept as they come
    assert infl.store.factored_blocks
    before = infl.store.data[infl.block_names[0]].clone()
    expected = infl.influences(x[:4], y[:4], x, y)
    for bx, _ in batches:
        bx.zero_()  # the caller reuses its buffers
    assert torch.equal(infl.store.data[infl.block_names[0]], before)
    assert torch.equal(infl.train_influences(x[:4], y[:4]), expected)


def test_memory_store_mixes_dense_and_factored_blocks():
    parts, dense = _parts([3, 4])
    other = torch.randn(7, 5, dtype=torch.float64)
    for capacity in (None, 7, 2):
        store = MemoryGradientStore(["f", "d"], capacity=capacity)
        store.append({"f": parts[0:3], "d": other[:3]})
        store.append({"f": parts[3:7], "d": other[3:]})
        batches = list(store.appended())
        assert [len(b["d"]) for b in batches] == [3, 4]
        assert torch.equal(densify(batches[1]["f"]), dense[3:])
        store.finalize()
        assert store.factored_blocks == ["f"]
        assert store.nbytes == 7 * (3 + 4 + 2) * 8 + 7 * 5 * 8
        assert torch.equal(store.data["f"], dense) and torch.equal(
            store.data["d"], other
        )
        idx = torch.tensor([6, 0, 3])
        assert torch.equal(store.take(idx)["f"], dense[idx])
        assert torch.equal(store.read(2, 5)["d"], other[2:5])
        chunks = list(store.chunks(3))
        assert torch.equal(torch.cat([c["f"] for _, c in chunks]), dense)
