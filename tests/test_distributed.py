"""Dask: the matrix on a LocalCluster, worker failure, pyDVL's calculators,
thread safety, and the integer-input pitfall of pyDVL's Dask calculator."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import dask
import dask.array as da
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from pydvl.influence import DaskInfluenceCalculator, SequentialInfluenceCalculator
from pydvl.influence.influence_calculator import DisableClientSingleThreadCheck
from pydvl.influence.torch.util import NestedTorchCatAggregator, TorchNumpyConverter

from models import TokenModel, fit_zarr, loader, make_case
from pydvl_datainf import DataInfInfluence, influence_matrix
from reference import DenseDataInf, rel_err

distributed = pytest.importorskip("distributed")

N, M = 30, 9


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=2,  # multi-threaded workers
        processes=True,
        dashboard_address=":0",
        silence_logs=40,
    )
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model, loss, x, y, xt, yt = make_case("lora", n=N, m=M)
    path = tmp_path_factory.mktemp("store") / "g.zarr"
    infl = fit_zarr(model, loss, x, y, path, chunk_rows=8)
    ref = DenseDataInf(model, loss, x, y, infl.blocks.to_dict())
    return infl, ref, x, y, xt, yt


def test_cluster_matrix_equals_local_and_reference(client, case, tmp_path, monkeypatch):
    infl, ref, x, y, xt, yt = case
    local = influence_matrix(
        infl,
        (xt, yt),
        tmp_path / "local.zarr",
        test_rows=3,
        dtype="float64",
        progress=False,
    )

    def no_pickling(self):
        raise AssertionError("the model must not be sent to the workers")

    monkeypatch.setattr(DataInfInfluence, "__getstate__", no_pickling)
    res = influence_matrix(
        infl,
        (xt, yt),
        tmp_path / "dist.zarr",
        test_rows=3,
        dtype="float64",
        client=client,
        progress=False,
    )
    assert res.tiles_computed == res.tiles == 3 * 4
    got = res.load()
    assert torch.equal(got, local.load())  # the same bits
    assert rel_err(got, ref.influences(xt, yt, x, y)) < 1e-8
    factors = zarr.open_group(str(tmp_path / "dist.zarr"), mode="r")["factors/0"][:]
    local_f = zarr.open_group(str(tmp_path / "local.zarr"), mode="r")["factors/0"][:]
    assert np.array_equal(factors, local_f)


def test_cluster_matrix_float32_and_resume(client, tmp_path):
    model, loss, x, y, xt, yt = make_case("mlp", n=40, m=6)
    model, x, xt = model.float(), x.float(), xt.float()
    infl = fit_zarr(model, loss, x, y, tmp_path / "g.zarr", chunk_rows=16)
    mem = DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    res = influence_matrix(
        infl, (xt, yt), tmp_path / "m.zarr", client=client, progress=False
    )
    assert res.array.dtype == np.float32
    assert rel_err(res.load(), mem.influences(xt, yt, x, y)) < 1e-6
    group = zarr.open_group(str(tmp_path / "m.zarr"), mode="r+")
    group["done"][0, 1] = 0  # as if that tile had been lost
    again = influence_matrix(
        infl,
        (xt, yt),
        tmp_path / "m.zarr",
        resume=True,
        client=client,
        progress=False,
    )
    assert again.tiles_computed == 1
    assert rel_err(again.load(), mem.influences(xt, yt, x, y)) < 1e-6


def test_cluster_needs_a_zarr_store(client, tmp_path):
    model, loss, x, y, xt, yt = make_case("mlp", n=10, m=2)
    infl = DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    with pytest.raises(TypeError, match="store='zarr'"):
        influence_matrix(infl, (xt, yt), tmp_path / "m.zarr", client=client)


def test_pydvl_dask_calculator_on_multithreaded_workers(client, case):
    infl, ref, x, y, xt, yt = case
    # is_thread_safe=True lets pyDVL use workers with 2 threads each; the model
    # is scattered with its store's path, not its gradients
    calc = DaskInfluenceCalculator(infl, TorchNumpyConverter(), client)
    dxt = da.from_array(xt.numpy(), chunks=(3, -1))
    dyt = da.from_array(yt.numpy(), chunks=(3,))
    dx = da.from_array(x.numpy(), chunks=(5, -1))
    dy = da.from_array(y.numpy(), chunks=(5,))
    got = torch.from_numpy(calc.influences(dxt, dyt, dx, dy).compute())
    assert rel_err(got, ref.influences(xt, yt, x, y)) < 1e-8
    factors = torch.from_numpy(calc.influence_factors(dxt, dyt).compute())
    assert rel_err(factors, ref.factors(xt, yt)) < 1e-8


def test_threads_share_one_model_exactly(case, tmp_path):
    infl, ref, x, y, xt, yt = case
    rc = DataInfInfluence(infl.model, infl.loss, progress=False, store="recompute")
    rc.fit(loader(x, y))
    expected = ref.influences(xt, yt, x, y)

    def work(i):
        model = (infl, rc)[i % 2]
        j = i % M
        a = model.influences(xt[j : j + 1], yt[j : j + 1], x.flip(0), y.flip(0))
        b = model.train_influences(xt[j : j + 1], yt[j : j + 1])
        return j, a, b

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(48)))
    for j, a, b in results:
        assert rel_err(a, expected[j : j + 1].flip(1)) < 1e-8
        assert rel_err(b, expected[j : j + 1]) < 1e-8


def test_pydvl_dask_integer_inputs_pitfall_and_fix(tmp_path):
    torch.manual_seed(0)
    model = TokenModel().double()
    x, y = torch.randint(0, 50, (20, 6)), torch.randint(0, 3, (20,))
    infl = DataInfInfluence(model, F.cross_entropy, progress=False)
    infl.fit(loader(x, y))
    expected = infl.influences(x[:6], y[:6], x, y)
    calc = DaskInfluenceCalculator(
        infl, TorchNumpyConverter(), DisableClientSingleThreadCheck
    )
    dx, dy = da.from_array(x.numpy(), chunks=(5, -1)), da.from_array(y.numpy(), 5)
    dxt = da.from_array(x[:6].numpy(), chunks=(3, -1))
    dyt = da.from_array(y[:6].numpy(), chunks=3)
    lazy = calc.influences(dxt, dyt, dx, dy)
    assert lazy.dtype == np.int64  # pyDVL declares the inputs' dtype
    with dask.config.set(scheduler="synchronous"):
        lazy.to_zarr(str(tmp_path / "bad.zarr"))
        fixed = lazy.astype(np.float64)  # the fix: declare the float dtype
        fixed.to_zarr(str(tmp_path / "good.zarr"))
    bad = torch.from_numpy(zarr.open_array(str(tmp_path / "bad.zarr"))[:])
    good = torch.from_numpy(zarr.open_array(str(tmp_path / "good.zarr"))[:])
    assert bad.dtype == torch.int64 and rel_err(bad, expected) > 1e-6  # truncated
    assert good.dtype == torch.float64 and rel_err(good, expected) < 1e-12
    ours = influence_matrix(
        infl, (x[:6], y[:6]), tmp_path / "ours.zarr", progress=False
    )
    assert rel_err(ours.load(), expected) < 1e-6


@pytest.mark.parametrize("kind", ["zarr", "recompute"])
def test_sequential_calculator_to_zarr(kind, case, tmp_path):
    infl0, ref, x, y, xt, yt = case
    infl = (
        infl0
        if kind == "zarr"
        else DataInfInfluence(
            infl0.model, infl0.loss, progress=False, store="recompute"
        ).fit(loader(x, y))
    )
    calc = SequentialInfluenceCalculator(infl)
    lazy = calc.influences(loader(xt, yt, 4), loader(x, y, 8))
    lazy.to_zarr(str(tmp_path / "m.zarr"), TorchNumpyConverter())
    stored = torch.from_numpy(zarr.open_array(str(tmp_path / "m.zarr"))[:])
    assert stored.dtype == torch.float64
    assert rel_err(stored, ref.influences(xt, yt, x, y)) < 1e-8
    direct = calc.influences(loader(xt, yt, 4), loader(x, y, 8)).compute(
        NestedTorchCatAggregator()
    )
    assert rel_err(direct, stored) < 1e-12


def test_worker_killed_mid_run_still_completes(client, case, tmp_path):
    infl, ref, x, y, xt, yt = case
    local = influence_matrix(
        infl,
        (xt, yt),
        tmp_path / "local.zarr",
        test_rows=3,
        train_rows=8,
        dtype="float64",
        progress=False,
    )

    def slow_tiles():
        import pydvl_datainf.scoring.tiles as m

        original = m.mark_done

        def mark(done, index, value):
            time.sleep(0.4)
            original(done, index, value)

        m.mark_done = mark

    client.run(slow_tiles)
    pids = client.run(os.getpid)
    out = tmp_path / "dist.zarr"
    killed = {}

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                done = int((zarr.open_group(str(out), mode="r")["done"][:] != 0).sum())
            except Exception:
                done = 0
            if done >= 2:
                busy = [w for w, keys in client.processing().items() if keys]
                victim = busy[0] if busy else next(iter(pids))
                os.kill(pids[victim], signal.SIGKILL)
                killed["done_at_kill"] = done
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    res = influence_matrix(
        infl,
        (xt, yt),
        out,
        test_rows=3,
        train_rows=8,
        dtype="float64",
        client=client,
        progress=False,
    )
    t.join()
    assert "done_at_kill" in killed and killed["done_at_kill"] < res.tiles
    assert set(client.run(os.getpid).values()) != set(pids.values())  # restarted
    assert bool(zarr.open_group(str(out), mode="r")["done"][:].all())
    assert torch.equal(res.load(), local.load())  # bit-identical after the loss


def test_bit_identical_across_worker_counts_and_executors(client, case, tmp_path):
    infl, ref, x, y, xt, yt = case
    kw = dict(test_rows=4, train_rows=4, dtype="float64", progress=False)
    local = influence_matrix(infl, (xt, yt), tmp_path / "local.zarr", **kw).load()
    two = influence_matrix(
        infl, (xt, yt), tmp_path / "two.zarr", client=client, **kw
    ).load()
    with (
        distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=3,
            processes=False,
            dashboard_address=":0",
            silence_logs=40,
        ) as cluster,
        distributed.Client(cluster) as one_client,
    ):
        one = influence_matrix(
            infl, (xt, yt), tmp_path / "one.zarr", client=one_client, **kw
        ).load()
    assert torch.equal(two, local) and torch.equal(one, local)
    assert rel_err(local, ref.influences(xt, yt, x, y)) < 1e-8
    # the pyDVL model's queries (other chunking): equal up to rounding
    assert rel_err(infl.influences(xt, yt, x, y), local) < 1e-12


def test_worker_killed_during_the_factor_pass_same_bits(client, case, tmp_path):
    infl, ref, x, y, xt, yt = case
    kw = dict(test_rows=M, train_rows=4, dtype="float64", progress=False)
    local = influence_matrix(infl, (xt, yt), tmp_path / "local.zarr", **kw)

    def slow_corrections():
        from pydvl_datainf.operator import DataInfOperator

        original = DataInfOperator.corrections
        if getattr(original, "slowed", False):
            return

        def slow(self, *args, **kwargs):
            time.sleep(0.5)
            return original(self, *args, **kwargs)

        slow.slowed = True
        DataInfOperator.corrections = slow

    client.run(slow_corrections)
    pids = client.run(os.getpid)
    killed = {}

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline:
            busy = [
                w
                for w, keys in client.processing().items()
                if any("corrections" in str(k) for k in keys)
            ]
            if busy:
                time.sleep(0.2)
                os.kill(pids[busy[0]], signal.SIGKILL)
                killed["worker"] = busy[0]
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer)
    t.start()
    res = influence_matrix(infl, (xt, yt), tmp_path / "dist.zarr", client=client, **kw)
    t.join()
    assert "worker" in killed
    assert torch.equal(res.load(), local.load())


def test_a_clean_run_logs_no_tracebacks(case, tmp_path):
    """Scheduler and worker logs of a clean run hold no traceback (a cancelled
    scattered future used to make the scheduler log AssertionErrors)."""
    import logging

    infl, ref, x, y, xt, yt = case
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep(logging.WARNING)
    logging.getLogger("distributed").addHandler(handler)
    try:
        with (
            distributed.LocalCluster(
                n_workers=2,
                threads_per_worker=2,
                processes=True,
                dashboard_address=":0",
            ) as cluster,
            distributed.Client(cluster) as c,
        ):
            for i in range(2):
                influence_matrix(
                    infl,
                    (xt, yt),
                    tmp_path / f"m{i}.zarr",
                    test_rows=3,
                    client=c,
                    progress=False,
                )
            time.sleep(0.5)
            logs = [m for _, m in c.get_scheduler_logs(n=10000)]
            for worker_logs in c.get_worker_logs(n=10000).values():
                logs += [m for _, m in worker_logs]
    finally:
        logging.getLogger("distributed").removeHandler(handler)
    bad = [m for m in logs + records if "Traceback" in m or "AssertionError" in m]
    assert not bad, bad[:3]
