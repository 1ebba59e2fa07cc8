"""Results do not depend on how pyDVL's calculators chunk the data."""

import dask
import dask.array as da
import pytest
import torch
import zarr
from pydvl.influence import DaskInfluenceCalculator, SequentialInfluenceCalculator
from pydvl.influence.influence_calculator import DisableClientSingleThreadCheck
from pydvl.influence.torch.util import (
    NestedTorchCatAggregator,
    TorchCatAggregator,
    TorchNumpyConverter,
)
from pydvl.influence.types import InfluenceMode
from torch.utils.data import DataLoader, TensorDataset

from models import loader, make_case
from pydvl_datainf import DataInfInfluence
from reference import DenseDataInf, rel_err


@pytest.fixture(scope="module")
def setup():
    model, loss, x, y, xt, yt = make_case("lora", n=30, m=8)
    infl = DataInfInfluence(model, loss, progress=False)
    infl.fit(DataLoader(TensorDataset(x, y), batch_size=30))
    ref = DenseDataInf(model, loss, x, y, infl.blocks.to_dict())
    return infl, ref, x, y, xt, yt


@pytest.mark.parametrize("test_bs,train_bs", [(1, 30), (3, 7), (8, 4), (5, 1)])
def test_sequential_calculator_chunking(setup, test_bs, train_bs):
    infl, ref, x, y, xt, yt = setup
    calc = SequentialInfluenceCalculator(infl)
    got = calc.influences(loader(xt, yt, test_bs), loader(x, y, train_bs)).compute(
        NestedTorchCatAggregator()
    )
    expected = ref.influences(xt, yt, x, y)
    assert rel_err(got, expected) < 1e-8
    assert rel_err(got, infl.influences(xt, yt, x, y)) < 1e-12
    factors = calc.influence_factors(loader(xt, yt, test_bs)).compute(
        TorchCatAggregator()
    )
    assert rel_err(factors, ref.factors(xt, yt)) < 1e-8
    from_f = calc.influences_from_factors(
        [factors[i : i + test_bs] for i in range(0, len(xt), test_bs)],
        loader(x, y, train_bs),
    ).compute(NestedTorchCatAggregator())
    assert rel_err(from_f, expected) < 1e-8


def test_sequential_perturbation_with_larger_test_chunk(setup):
    infl, ref, x, y, xt, yt = setup
    calc = SequentialInfluenceCalculator(infl)
    got = calc.influences(
        loader(xt, yt, 8), loader(x[:4], y[:4], 2), mode=InfluenceMode.Perturbation
    ).compute(NestedTorchCatAggregator())
    assert got.shape == (8, 4, 6)
    assert rel_err(got, ref.perturbation(xt, yt, x[:4], y[:4])) < 1e-8


def test_sequential_to_zarr(setup, tmp_path):
    infl, ref, x, y, xt, yt = setup
    calc = SequentialInfluenceCalculator(infl)
    lazy = calc.influences(loader(xt, yt, 3), loader(x, y, 7))
    lazy.to_zarr(str(tmp_path / "m.zarr"), TorchNumpyConverter())
    stored = torch.from_numpy(zarr.open_array(str(tmp_path / "m.zarr"))[:])
    assert rel_err(stored, ref.influences(xt, yt, x, y)) < 1e-8


# chunks of one row hit a pyDVL 0.10 bug (its Dask calculator squeezes them)
@pytest.mark.parametrize("test_chunk,train_chunk", [(8, 30), (3, 7), (2, 4)])
def test_dask_calculator_chunking(setup, test_chunk, train_chunk):
    infl, ref, x, y, xt, yt = setup
    calc = DaskInfluenceCalculator(
        infl, TorchNumpyConverter(), DisableClientSingleThreadCheck
    )
    dxt = da.from_array(xt.numpy(), chunks=(test_chunk, -1))
    dyt = da.from_array(yt.numpy(), chunks=(test_chunk,))
    dx = da.from_array(x.numpy(), chunks=(train_chunk, -1))
    dy = da.from_array(y.numpy(), chunks=(train_chunk,))
    with dask.config.set(scheduler="synchronous"):
        got = torch.from_numpy(calc.influences(dxt, dyt, dx, dy).compute())
        factors = torch.from_numpy(calc.influence_factors(dxt, dyt).compute())
    assert rel_err(got, ref.influences(xt, yt, x, y)) < 1e-8
    assert rel_err(got, infl.influences(xt, yt, x, y)) < 1e-12
    assert rel_err(factors, ref.factors(xt, yt)) < 1e-8
