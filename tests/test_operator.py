"""DataInfOperator against the dense float64 reference (explicit inverses)."""

from __future__ import annotations

import threading
from typing import Dict, Iterator, Mapping, Optional, Tuple

import pytest
import torch

from operator_state import make_state
from pydvl_datainf.operator import (
    DataInfOperator,
    chunk_partitions,
    prefetch,
    tile_product,
    tree_reduce,
)
from pydvl_datainf.storage import GradientStore, MemoryGradientStore
from reference import auto_lambda, dense_R, rel_err

TOL = 1e-8


@pytest.fixture(scope="module")
def data() -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(37, 5, generator=g, dtype=torch.float64),
        "b": 3 * torch.randn(37, 3, generator=g, dtype=torch.float64),
    }


@pytest.fixture(scope="module")
def test_grads() -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "a": torch.randn(4, 5, generator=g, dtype=torch.float64),
        "b": torch.randn(4, 3, generator=g, dtype=torch.float64),
    }


def reference(data, lams):
    return {k: dense_R(v, lams[k]) for k, v in data.items()}


def lambdas(data):
    return {k: auto_lambda(v) for k, v in data.items()}


@pytest.mark.parametrize("chunk_rows", [1, 4, 10, 37, 100])
@pytest.mark.parametrize("partitions", [1, 3, 8])
def test_apply_matches_dense_reference(data, test_grads, chunk_rows, partitions):
    lams = lambdas(data)
    R = reference(data, lams)
    op = DataInfOperator(
        make_state(data, lams), chunk_rows=chunk_rows, partitions=partitions
    )
    f = op.apply(test_grads)
    assert list(f) == ["a", "b"]
    for k in data:
        assert f[k].dtype == torch.float64
        assert rel_err(f[k], test_grads[k] @ R[k]) < TOL
    scores = op.scores(f)
    want = sum(test_grads[k] @ R[k] @ data[k].T for k in data)
    assert scores.shape == (4, 37)
    assert rel_err(scores, want) < TOL
    assert rel_err(op.influences(test_grads), want) < TOL


def test_explicit_regularization(data, test_grads):
    lams = {"a": 0.3, "b": 2.0}
    R = reference(data, lams)
    op = DataInfOperator(make_state(data, lams), chunk_rows=6)
    f = op.apply(test_grads)
    for k in data:
        assert rel_err(f[k], test_grads[k] @ R[k]) < TOL


def test_corrections_are_additive_over_any_partition(data, test_grads):
    op = DataInfOperator(make_state(data, lambdas(data)), chunk_rows=3)
    full = op.corrections(test_grads)
    perm = torch.randperm(op.n_chunks, generator=torch.Generator().manual_seed(3))
    cuts = [0, 2, 3, 9, op.n_chunks]
    parts = [
        op.corrections(test_grads, perm[lo:hi].tolist())
        for lo, hi in zip(cuts, cuts[1:])
    ]
    total = {k: sum(p[k] for p in parts) for k in full}
    for k in full:
        assert torch.allclose(total[k], full[k], rtol=1e-12, atol=0)
        assert full[k].abs().max() > 0
    # empty partition: zeros, not an error
    empty = op.corrections(test_grads, [])
    assert all(float(t.abs().max()) == 0 for t in empty.values())


def test_chunk_size_invariance(data, test_grads):
    lams = lambdas(data)
    a = DataInfOperator(make_state(data, lams), chunk_rows=1).apply(test_grads)
    b = DataInfOperator(make_state(data, lams), chunk_rows=37).apply(test_grads)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-12, atol=1e-14)


def test_apply_is_map_then_tree_reduce_bit_for_bit(data, test_grads):
    """What an executor does (map per fixed partition, fixed tree) gives apply's bits."""
    op = DataInfOperator(make_state(data, lambdas(data)), chunk_rows=2, partitions=5)
    parts = [op.corrections(test_grads, ids) for ids in op.partitions()]
    assert len(parts) == 5
    want = op.finish(test_grads, op.reduce(parts))
    got = op.apply(test_grads)
    for k in want:
        assert torch.equal(got[k], want[k])


def test_tiles_stream_every_chunk_in_order(data, test_grads):
    lams = lambdas(data)
    op = DataInfOperator(make_state(data, lams), chunk_rows=10)
    f = op.apply(test_grads)
    seen = [(c, s, t.shape[1]) for c, s, t in op.tiles(f)]
    assert seen == [(0, 0, 10), (1, 10, 10), (2, 20, 10), (3, 30, 7)]
    only = list(op.tiles(f, [2]))
    assert [(c, s) for c, s, _ in only] == [(2, 20)]
    full = op.scores(f)
    assert torch.equal(only[0][2], full[:, 20:30])


@pytest.mark.parametrize("method", ["gram", "pairs", "auto"])
@pytest.mark.parametrize("chunk_rows", [5, 37])
def test_self_scores_match_reference(data, method, chunk_rows):
    lams = lambdas(data)
    R = reference(data, lams)
    want = sum(((data[k] @ R[k]) * data[k]).sum(1) for k in data)
    op = DataInfOperator(make_state(data, lams), chunk_rows=chunk_rows)
    got = op.self_scores(method=method)
    assert got.shape == (37,)
    assert rel_err(got, want) < TOL
    assert bool((got > 0).all())


def test_self_scores_auto_picks_pairs_for_small_budget(data, monkeypatch):
    lams = lambdas(data)
    op = DataInfOperator(make_state(data, lams), chunk_rows=8)
    a = op.self_scores(method="auto", memory_budget=1)
    b = op.self_scores(method="pairs")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="method"):
        op.self_scores(method="nope")


def test_float32_state_computes_in_float32(data, test_grads):
    d32 = {k: v.float() for k, v in data.items()}
    lams = lambdas(data)
    R = reference(data, lams)
    op = DataInfOperator(make_state(d32, lams), chunk_rows=7)
    f = op.apply({k: v.float() for k, v in test_grads.items()})
    for k in data:
        assert f[k].dtype == torch.float32
        assert rel_err(f[k], test_grads[k] @ R[k]) < 1e-5


def test_bad_state_is_refused(data):
    with pytest.raises(ValueError, match="regularization"):
        DataInfOperator(make_state(data, {"a": 0.0, "b": 1.0}))
    with pytest.raises(ValueError, match="chunk_rows"):
        DataInfOperator(make_state(data, lambdas(data)), chunk_rows=0)
    with pytest.raises(ValueError, match="partitions"):
        DataInfOperator(make_state(data, lambdas(data)), partitions=0).partitions()


class _StreamOnly(GradientStore):
    """A store without random access that counts its passes."""

    random_access = False

    def __init__(self, data: Mapping[str, torch.Tensor]):
        super().__init__(list(data))
        self.data = dict(data)
        self.passes = 0

    @property
    def n(self) -> int:
        return len(next(iter(self.data.values())))

    def append(self, grads):  # pragma: no cover - never written
        raise NotImplementedError

    def chunks(
        self, rows: Optional[int] = None
    ) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
        self.passes += 1
        step = rows or 8
        for s in range(0, self.n, step):
            yield s, {k: v[s : s + step] for k, v in self.data.items()}

    def take(self, index):  # pragma: no cover
        return {k: v[index] for k, v in self.data.items()}


def test_apply_makes_one_pass_over_a_streaming_store(data, test_grads):
    lams = lambdas(data)
    store = _StreamOnly(data)
    op = DataInfOperator(make_state(data, lams, store=store), chunk_rows=4)
    f = op.apply(test_grads)
    assert store.passes == 1
    ref = DataInfOperator(make_state(data, lams), chunk_rows=4).apply(test_grads)
    for k in f:
        assert torch.equal(f[k], ref[k])


def test_tree_reduce_and_partitions():
    assert tree_reduce([1], 1, lambda a, b: a + b) == 1
    # the tree shape: ((a b) (c (d e)))
    got = tree_reduce(list("abcde"), 5, lambda a, b: f"({a}{b})")
    assert got == "((ab)(c(de)))"
    with pytest.raises(ValueError):
        tree_reduce([], 0, lambda a, b: a)
    assert chunk_partitions(3, 8) == [[0], [1], [2]]
    assert chunk_partitions(10, 4) == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    assert sum(chunk_partitions(1000), []) == list(range(1000))


def test_prefetch_reads_ahead_in_a_thread_and_propagates_errors():
    seen = []

    def items():
        for i in range(3):
            seen.append(threading.current_thread().name)
            yield i
        raise OSError("disk gone")

    it = prefetch(items())
    assert next(it) == 0
    with pytest.raises(OSError, match="disk gone"):
        list(it)
    assert set(seen) == {"datainf-prefetch"}


def test_prefetch_stops_when_closed_early():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    it = prefetch(items(), depth=1)
    assert next(it) == 0
    it.close()
    assert len(produced) <= 4


def test_tile_product_uses_no_copy_for_matching_dtype():
    f = {"w": torch.ones(2, 3), "v": torch.ones(2, 1)}
    g = {"w": torch.eye(3), "v": 2 * torch.ones(3, 1)}
    assert torch.equal(tile_product(f, g), torch.full((2, 3), 3.0))
    with pytest.raises(ValueError):
        tile_product({}, g)


def test_memory_store_state_roundtrip(data):
    store = MemoryGradientStore(list(data))
    store.append(data)
    store.finalize()
    op = DataInfOperator(make_state(data, lambdas(data), store=store), chunk_rows=9)
    assert op.n == 37 and op.n_chunks == 5
    assert op.chunk_range(4) == (36, 37)


def test_results_do_not_depend_on_the_address_of_the_inputs(data, test_grads):
    """BLAS rounds differently for unaligned operands (e.g. buffers a Dask
    worker deserialised): the operator aligns them, so the bits are the same."""
    import numpy as np

    op = DataInfOperator(make_state(data, lambdas(data)), chunk_rows=8)
    want = op.apply(test_grads)

    def at_offset(t, off):
        buf = np.empty(t.numel() + 8, dtype=np.float64)
        a = buf[off : off + t.numel()].reshape(t.shape)
        a[...] = t.numpy()
        return torch.from_numpy(a)

    for off in range(1, 8):
        v = {k: at_offset(t, off) for k, t in test_grads.items()}
        got = op.apply(v)
        assert all(torch.equal(got[k], want[k]) for k in want)
        s = op.scores({k: at_offset(t, off) for k, t in want.items()})
        assert torch.equal(s, op.scores(want))
