"""The fit on Dask: the same bits as a one-process fit whatever the number of
workers, a worker killed mid-run, an interrupted fit resumed, and the refusals."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from models import make_case
from pydvl_datainf import DataInfInfluence, StoreExistsError, StoreMismatchError
from pydvl_datainf.dask_fit import partition_rows_for
from pydvl_datainf.storage import ZarrGradientStore
from pydvl_datainf.storage.partitioned import PartitionedStore, partial_path
from reference import DenseDataInf, rel_err

distributed = pytest.importorskip("distributed")

N, M, BATCH, CHUNK = 40, 5, 4, 8  # 5 partitions of 8 rows (2 batches each)


def local_client(n_workers: int, processes: bool):
    """A client of a local cluster of one-thread workers, closed after use."""
    cluster = distributed.LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=processes,
        dashboard_address=":0",
        silence_logs=40,
    )
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def client():
    yield from local_client(2, processes=True)


@pytest.fixture(scope="module")
def one_worker():
    yield from local_client(1, processes=False)


def case():
    model, loss, x, y, xt, yt = make_case("lora", n=N, m=M)
    return model, loss, x, y, xt, yt


def loader(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def model_for(path, **kw):
    model, loss, *_ = case()
    options = {"chunk_rows": CHUNK, **kw.pop("options", {})}
    return DataInfInfluence(
        model,
        loss,
        progress=False,
        store="zarr",
        store_path=path,
        store_options=options,
        **kw,
    )


def idle(client):
    """Wait until no task runs on any worker (a task of a failed fit that was
    running when it failed ends on its own)."""

    def executing(dask_worker):
        return len(dask_worker.state.executing)

    deadline = time.time() + 30
    while any(client.run(executing).values()) and time.time() < deadline:
        time.sleep(0.05)


def same_store(a, b):
    """Every array of two stores, their λ and their identity, bit for bit."""
    sa, sb = ZarrGradientStore.open(a), ZarrGradientStore.open(b)
    ra, rb = sa.read(0, N), sb.read(0, N)
    assert all(torch.equal(ra[k], rb[k]) for k in ra)
    fa, fb = sa.load_fit_state(), sb.load_fit_state()
    assert all(torch.equal(fa.squared_norms[k], fb.squared_norms[k]) for k in ra)
    assert fa.regularization == fb.regularization
    for key in ("weights_digest", "frozen_digest", "rows_digest"):
        assert getattr(fa, key) == getattr(fb, key) != ""
    assert np.array_equal(sa.load_array("rows/digests"), sb.load_array("rows/digests"))


def test_the_same_bits_as_one_process_whatever_the_workers(
    client, one_worker, tmp_path
):
    torch.set_num_threads(1)  # the workers' arithmetic (one thread each)
    model, loss, x, y, xt, yt = case()
    local = model_for(tmp_path / "local.zarr").fit(loader(x, y))
    two = model_for(tmp_path / "two.zarr").fit(loader(x, y), client=client)
    one = model_for(tmp_path / "one.zarr").fit(
        loader(x, y), client=one_worker, partition_rows=16
    )
    same_store(tmp_path / "local.zarr", tmp_path / "two.zarr")
    same_store(tmp_path / "local.zarr", tmp_path / "one.zarr")
    assert torch.equal(two.influences(xt, yt, x, y), local.influences(xt, yt, x, y))
    ref = DenseDataInf(model, loss, x, y, local.blocks.to_dict())
    assert rel_err(one.influences(xt, yt, x, y), ref.influences(xt, yt, x, y)) < 1e-8
    assert not os.path.exists(partial_path(str(tmp_path / "two.zarr")))


def test_a_worker_killed_mid_run_gives_the_same_store(client, tmp_path):
    torch.set_num_threads(1)
    model, loss, x, y, *_ = case()
    model_for(tmp_path / "local.zarr").fit(loader(x, y))

    def slow_partitions():
        from pydvl_datainf.storage.partitioned import PartitionedStore as P

        original = P.write_partition

        def slow(self, pid, batches):
            time.sleep(0.5)
            original(self, pid, batches)

        P.write_partition = slow

    client.run(slow_partitions)
    pids = client.run(os.getpid)
    path = tmp_path / "dist.zarr"
    killed = {}

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline:
            busy = [w for w, keys in client.processing().items() if keys]
            if busy:
                time.sleep(0.2)
                os.kill(pids[busy[0]], signal.SIGKILL)
                killed["at"] = time.time()
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer)
    t.start()
    model_for(path).fit(loader(x, y), client=client)
    t.join()
    assert "at" in killed
    assert set(client.run(os.getpid).values()) != set(pids.values())  # restarted
    same_store(tmp_path / "local.zarr", path)


def test_an_interrupted_fit_resumes_with_the_partitions_left(
    one_worker, tmp_path, monkeypatch
):
    torch.set_num_threads(1)
    model, loss, x, y, *_ = case()
    model_for(tmp_path / "local.zarr").fit(loader(x, y))
    path = tmp_path / "g.zarr"
    original = PartitionedStore.write_partition

    def dies_from_the_third(self, pid, batches):
        if pid >= 2:
            raise RuntimeError("the machine went down")
        original(self, pid, batches)

    monkeypatch.setattr(PartitionedStore, "write_partition", dies_from_the_third)
    with pytest.raises(RuntimeError, match="went down"):
        model_for(path).fit(loader(x, y), client=one_worker)
    monkeypatch.setattr(PartitionedStore, "write_partition", original)
    assert not path.exists() and os.path.exists(partial_path(str(path)))
    with pytest.raises(StoreExistsError, match="resume=True"):
        model_for(path).fit(loader(x, y), client=one_worker)
    calls = []
    monkeypatch.setattr(
        PartitionedStore,
        "write_partition",
        lambda self, pid, b: (calls.append(pid), original(self, pid, b)),
    )
    model_for(path).fit(loader(x, y), client=one_worker, resume=True)
    assert sorted(calls) == [2, 3, 4]  # only the partitions left
    same_store(tmp_path / "local.zarr", path)
    assert not os.path.exists(partial_path(str(path)))


def test_resuming_with_other_rows_or_another_model_is_refused(
    one_worker, tmp_path, monkeypatch
):
    model, loss, x, y, *_ = case()
    path = tmp_path / "g.zarr"
    original = PartitionedStore.write_partition

    def dies_after_one(self, pid, batches):
        if pid > 0:
            raise RuntimeError("the machine went down")
        original(self, pid, batches)

    monkeypatch.setattr(PartitionedStore, "write_partition", dies_after_one)
    with pytest.raises(RuntimeError, match="went down"):
        model_for(path).fit(loader(x, y), client=one_worker)
    idle(one_worker)
    monkeypatch.setattr(PartitionedStore, "write_partition", original)
    other = x.clone()
    other[1] += 1.0  # a row of the finished partition changed
    with pytest.raises(StoreMismatchError, match="partition 0"):
        model_for(path).fit(loader(other, y), client=one_worker, resume=True)
    again = model_for(path)
    with torch.no_grad():
        next(again.model.parameters()).add_(0.1)
    with pytest.raises(StoreMismatchError, match="frozen_digest"):
        again.fit(loader(x, y), client=one_worker, resume=True)
    fresh = model_for(path, options={"overwrite": True})
    fresh.fit(loader(x, y), client=one_worker)  # starts again
    assert fresh.n_train == N


def test_loaders_a_fit_on_dask_cannot_split_are_refused(one_worker, tmp_path):
    model, loss, x, y, *_ = case()
    infl = model_for(tmp_path / "g.zarr")
    shuffled = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        infl.fit(shuffled, client=one_worker)
    with pytest.raises(TypeError, match="DataLoader"):
        infl.fit([(x[:4], y[:4])], client=one_worker)
    with pytest.raises(ValueError, match="multiple"):
        infl.fit(loader(x, y), client=one_worker, partition_rows=12)
    memory = DataInfInfluence(model, loss, progress=False)
    with pytest.raises(ValueError, match="store='zarr'"):
        memory.fit(loader(x, y), client=one_worker)
    with pytest.raises(ValueError, match="client="):
        memory.fit(loader(x, y), resume=True)


def test_partitions_never_depend_on_the_workers():
    assert partition_rows_for(N, BATCH, CHUNK) == 8
    assert partition_rows_for(10_000, 32, 64) == 640
    assert partition_rows_for(10_000, 24, 64, partition_rows=192 * 3) == 576
