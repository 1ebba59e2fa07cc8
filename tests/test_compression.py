"""Compressed gradient stores: against an independent float64 reference built from
explicit projection matrices, exact with a rotation, the same through every
store, reopened, on Dask, and refused when the compression differs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from models import fit_zarr, loader, make_case
from pydvl_datainf import DataInfInfluence, StoreMismatchError, influence_matrix
from pydvl_datainf.projection import Compression, Projection
from pydvl_datainf.storage import ZarrGradientStore
from reference import DenseDataInf, per_sample_grads, rel_err

N, M = 30, 5


def explicit_reference(model, loss, x, y, xt, yt, blocks, specs, lambdas):
    """Scores from explicit matrices: P_l as a dense matrix, exact squared
    norms, R_l v = (v - (1/n) sum_i w_i (g~_i . v) g~_i) / lambda_l."""
    train = per_sample_grads(model, loss, x, y, blocks)
    test = per_sample_grads(model, loss, xt, yt, blocks)
    n = len(x)
    out = 0
    for k in blocks:
        P = Projection(specs[k], dtype=torch.float64).matrix()
        g, t = train[k].double(), test[k].double()
        gp, tp = g @ P.T, t @ P.T
        w = 1.0 / (lambdas[k] + (g**2).sum(1))
        v = (tp - ((tp @ gp.T) * w) @ gp / n) / lambdas[k]
        out = out + v @ gp.T
    return out


def case(kind="gaussian", side=2, dense_k=5):
    model, loss, x, y, xt, yt = make_case("lora", n=N, m=M)
    c = Compression(side=side, dense_k=dense_k, kind=kind, seed=3)
    return model, loss, x, y, xt, yt, c


@pytest.mark.parametrize("store", ["memory", "zarr", "recompute"])
def test_compressed_scores_equal_the_explicit_reference(store, tmp_path):
    model, loss, x, y, xt, yt, c = case()
    kw = {"store_path": tmp_path / "g.zarr"} if store == "zarr" else {}
    infl = DataInfInfluence(
        model, loss, progress=False, store=store, compression=c, **kw
    ).fit(loader(x, y))
    specs = infl.state.projections
    assert specs is not None
    assert infl.state.widths == [specs[k].k for k in infl.block_names]
    assert sum(infl.state.widths) < infl.n_parameters  # it compresses
    want = explicit_reference(
        model,
        loss,
        x,
        y,
        xt,
        yt,
        infl.blocks.to_dict(),
        specs,
        infl.block_regularization,
    )
    assert rel_err(infl.influences(xt, yt, x, y), want) < 1e-8
    assert rel_err(infl.train_influences(xt, yt), want) < 1e-8
    # λ comes from the exact norms and d_l, not from the projected rows
    ref = DenseDataInf(model, loss, x, y, infl.blocks.to_dict())
    for k, lam in infl.block_regularization.items():
        assert abs(lam - ref.lambdas[k]) <= 1e-12 * ref.lambdas[k]


def test_a_rotation_gives_the_uncompressed_scores(tmp_path):
    model, loss, x, y, xt, yt, _ = case()
    rotation = Compression(kind="orthogonal", seed=5)
    infl = fit_zarr(model, loss, x, y, tmp_path / "g.zarr", compression=rotation)
    ref = DenseDataInf(model, loss, x, y, infl.blocks.to_dict())
    assert rel_err(infl.influences(xt, yt, x, y), ref.influences(xt, yt, x, y)) < 1e-8
    # Perturbation mode takes the factors back to parameter space
    got = infl.influences(xt, yt, x[:4], y[:4], mode="perturbation")
    assert rel_err(got, ref.perturbation(xt, yt, x[:4], y[:4])) < 1e-8
    res = influence_matrix(
        infl, (xt, yt), tmp_path / "m.zarr", dtype="float64", progress=False
    )
    assert rel_err(res.load(), ref.influences(xt, yt, x, y)) < 1e-8


def test_a_reopened_store_projects_test_gradients_the_same_way(tmp_path):
    model, loss, x, y, xt, yt, c = case()
    infl = fit_zarr(model, loss, x, y, tmp_path / "g.zarr", compression=c)
    again = DataInfInfluence.from_store(
        model, loss, tmp_path / "g.zarr", progress=False
    )
    assert again.state.projections == infl.state.projections
    assert torch.equal(again.influences(xt, yt, x, y), infl.influences(xt, yt, x, y))
    store = ZarrGradientStore.open(tmp_path / "g.zarr")
    assert store.block_sizes == infl.state.widths


def test_another_compression_is_refused(tmp_path):
    from pydvl_datainf.fingerprint import WeightWatch
    from pydvl_datainf.persistence import load_state

    model, loss, x, y, xt, yt, c = case()
    infl = fit_zarr(model, loss, x, y, tmp_path / "g.zarr", compression=c)
    other = DataInfInfluence(
        model, loss, compression=Compression(side=2, dense_k=5, seed=4)
    )
    watch = WeightWatch(other.params, frozen=other._gradients.frozen())
    with pytest.raises(StoreMismatchError, match="compressed with other projections"):
        load_state(
            ZarrGradientStore.open(tmp_path / "g.zarr"),
            infl.blocks,
            watch.digest,
            other._gradients.loss_identity(),
            frozen_fingerprint=watch.frozen_digest,
            projections=other._gradients.projections,
            dtype=torch.float64,
        )
    with pytest.raises(StoreMismatchError, match="uncompressed"):
        plain = fit_zarr(model, loss, x, y, tmp_path / "p.zarr")
        load_state(
            ZarrGradientStore.open(tmp_path / "p.zarr"),
            plain.blocks,
            watch.digest,
            plain._gradients.loss_identity(),
            frozen_fingerprint=watch.frozen_digest,
            projections=infl.state.projections,
            dtype=torch.float64,
        )


def test_a_matrix_of_another_compression_is_not_resumed(tmp_path):
    model, loss, x, y, xt, yt, c = case()
    a = fit_zarr(model, loss, x, y, tmp_path / "a.zarr", compression=c)
    out = tmp_path / "m.zarr"
    influence_matrix(a, (xt, yt), out, progress=False)
    b = fit_zarr(
        model,
        loss,
        x,
        y,
        tmp_path / "b.zarr",
        compression=Compression(side=2, dense_k=5, seed=99),
    )
    with pytest.raises(StoreMismatchError, match="compression"):
        influence_matrix(b, (xt, yt), out, resume=True, progress=False)


def test_compressed_fit_on_dask_is_the_same(tmp_path):
    distributed = pytest.importorskip("distributed")
    torch.set_num_threads(1)
    model, loss, x, y, xt, yt, c = case()
    data = DataLoader(TensorDataset(x, y), batch_size=5)
    local = fit_zarr(
        model, loss, x, y, tmp_path / "l.zarr", chunk_rows=5, bs=5, compression=c
    )
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        dist = DataInfInfluence(
            model,
            loss,
            progress=False,
            store="zarr",
            store_path=tmp_path / "d.zarr",
            store_options={"chunk_rows": 5},
            compression=c,
        ).fit(data, client=client)
    a = ZarrGradientStore.open(tmp_path / "l.zarr").read(0, N)
    b = ZarrGradientStore.open(tmp_path / "d.zarr").read(0, N)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(dist.influences(xt, yt, x, y), local.influences(xt, yt, x, y))


def test_bad_compression_choices_are_refused():
    model, loss, *_ = case()
    with pytest.raises(ValueError, match="side"):
        DataInfInfluence(model, loss, compression={"side": 0})
    with pytest.raises(TypeError, match="compression"):
        DataInfInfluence(model, loss, compression="small")
    with pytest.raises(ValueError, match="kind"):
        DataInfInfluence(model, loss, compression={"kind": "sparse"})


# ------------------------------------------------------------ top-k by index
def test_top_k_from_an_index_equals_the_streaming_top_k(tmp_path):
    model, loss, x, y, xt, yt, c = case()
    infl = fit_zarr(model, loss, x, y, tmp_path / "g.zarr", compression=c)
    from pydvl_datainf import top_k

    for largest in (True, False):
        exact = top_k(infl, 7, (xt, yt), largest=largest, progress=False)
        fast = top_k(infl, 7, (xt, yt), largest=largest, index=True, progress=False)
        assert torch.equal(fast.indices, exact.indices)
        assert rel_err(fast.values, exact.values) < 1e-5  # float32 inner products
    assert (tmp_path / "g.zarr.index" / "index.json").exists()


def test_a_new_lambda_reuses_the_index_and_new_rows_rebuild_it(tmp_path):
    from pydvl_datainf import top_k

    model, loss, x, y, xt, yt, c = case()
    infl = fit_zarr(model, loss, x, y, tmp_path / "g.zarr", compression=c)
    top_k(infl, 5, (xt, yt), index=True, progress=False)
    marker = tmp_path / "g.zarr.index" / "index.json"
    built = marker.stat().st_mtime_ns
    infl.with_regularization(0.5)
    exact = top_k(infl, 5, (xt, yt), progress=False)
    fast = top_k(infl, 5, (xt, yt), index=True, progress=False)
    assert torch.equal(fast.indices, exact.indices)
    assert marker.stat().st_mtime_ns == built  # not rebuilt for a new λ
    again = DataInfInfluence(
        model,
        loss,
        progress=False,
        store="zarr",
        store_path=tmp_path / "g.zarr",
        store_options={"overwrite": True},
        compression=c,
    ).fit(loader(x.flip(0), y.flip(0)))  # other rows at the same path
    exact = top_k(again, 5, (xt, yt), progress=False)
    fast = top_k(again, 5, (xt, yt), index=True, progress=False)
    assert torch.equal(fast.indices, exact.indices)
    assert marker.stat().st_mtime_ns != built  # rebuilt


def test_an_index_path_that_is_not_ours_is_refused_and_kept(tmp_path):
    from pydvl_datainf import StoreExistsError, top_k

    model, loss, x, y, xt, yt, c = case()
    infl = fit_zarr(model, loss, x, y, tmp_path / "g.zarr", compression=c)
    mine = tmp_path / "g.zarr.index"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError):
        top_k(infl, 5, (xt, yt), index=True, progress=False)
    assert (mine / "notes.txt").read_text() == "mine"


def test_the_curvature_matrices_give_the_factors():
    from pydvl_datainf.operator import DataInfOperator

    model, loss, x, y, xt, yt, c = case()
    infl = DataInfInfluence(model, loss, progress=False, compression=c).fit(
        loader(x, y)
    )
    op = DataInfOperator(infl.state)
    v = infl.gradients(xt, yt)
    slow, fast = op.apply(v), op.apply_curvature(v)
    for k in slow:
        assert rel_err(fast[k], slow[k]) < 1e-10
