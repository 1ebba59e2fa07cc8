"""Datasets in, tables out: DatasetBatches, fit metadata, score tables and
DatasetInfluence, against the tensor API and the dense float64 reference."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

from models import make_case
from pydvl_datainf import DataInfInfluence, mean_test_influence, self_influence, top_k
from pydvl_datainf.batches import (
    DatasetBatches,
    RowInfo,
    adapter_for,
    pair_batch,
    row_hash,
)
from pydvl_datainf.dataset_influence import ROWS_KEY, DatasetInfluence
from pydvl_datainf.errors import StoreMismatchError
from pydvl_datainf.persistence import stored_metadata
from pydvl_datainf.scoring.frames import scores_frame, to_arrow, top_k_frame
from pydvl_datainf.scoring.reductions import TopK
from reference import DenseDataInf, rel_err


def dict_rows(x, y):
    return [
        {"x": x[i], "y": y[i], "text": f"row {i}", "uid": f"u{i}"}
        for i in range(len(x))
    ]


def collate_xy(batch):
    return torch.stack([r["x"] for r in batch]), torch.stack([r["y"] for r in batch])


@pytest.fixture(scope="module")
def case():
    model, loss, x, y, xt, yt = make_case("lora")
    return model, loss, x, y, xt, yt


# ------------------------------------------------------------- batches
def test_batches_match_a_dataloader_and_keep_order():
    x, y = torch.randn(11, 3), torch.arange(11)
    data = DatasetBatches(TensorDataset(x, y), batch_size=4)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    assert len(data) == 3 and data.n_rows == 11
    for _ in range(2):  # every pass yields the same batches
        for (a, b), (c, d) in zip(data, loader, strict=True):
            assert torch.equal(a, c) and torch.equal(b, d)


def test_batches_select_columns_before_collating():
    rows = [{"x": torch.ones(2), "y": torch.tensor(1), "text": "a"}] * 3
    seen = []

    def collate(batch):
        seen.append(sorted(batch[0]))
        return collate_xy(batch)

    list(DatasetBatches(rows, collate, columns=["x", "y"]))
    assert seen == [["x", "y"]]
    with pytest.raises(TypeError, match="not an .x, y. pair"):
        list(DatasetBatches(rows, default_collate))  # a dict is not a pair


def test_batches_ids_and_text():
    x, y = torch.randn(4, 2), torch.arange(4)
    rows = dict_rows(x, y)
    assert DatasetBatches(rows).row_info().ids == [0, 1, 2, 3]
    assert DatasetBatches(rows, ids="uid").row_info().ids == ["u0", "u1", "u2", "u3"]
    hashed = DatasetBatches(rows, ids=row_hash).row_info().ids
    assert hashed == [row_hash(r) for r in rows] and len(set(hashed)) == 4
    assert row_hash({"a": torch.tensor([1, 2])}) == row_hash({"a": [1, 2]})
    auto = DatasetBatches(rows, text="auto").row_info()
    assert auto.columns == {
        "text": ["row 0", "row 1", "row 2", "row 3"],
        "uid": ["u0", "u1", "u2", "u3"],
    }
    with pytest.raises(ValueError, match="3 ids were given for 4 rows"):
        DatasetBatches(rows, ids=["a", "b", "c"]).row_info()
    with pytest.raises(KeyError, match="no column 'nope'"):
        DatasetBatches(rows, text="nope").row_info()


def test_batches_refuse_what_is_not_a_map_style_dataset():
    with pytest.raises(TypeError, match="map-style"):
        DatasetBatches(iter([1, 2]))
    with pytest.raises(TypeError, match="DataLoader"):
        DatasetBatches(DataLoader(TensorDataset(torch.zeros(2, 1))))
    with pytest.raises(ValueError, match="batch_size"):
        DatasetBatches([1], batch_size=0)


def test_adapter_for_reads_the_model():
    class Wrapped(torch.nn.Module):
        batch_adapter = staticmethod(pair_batch)

    assert adapter_for(torch.nn.Linear(1, 1)) is pair_batch
    assert adapter_for(Wrapped()) is pair_batch


# ---------------------------------------------------------- fit metadata
def test_fit_on_a_dataset_equals_fit_on_a_loader(case):
    model, loss, x, y, xt, yt = case
    a = DataInfInfluence(model, loss, progress=False).fit(
        TensorDataset(x, y), collate_fn=default_collate, batch_size=5
    )
    b = DataInfInfluence(model, loss, progress=False).fit(
        DataLoader(TensorDataset(x, y), batch_size=5)
    )
    assert torch.equal(a.train_influences(xt, yt), b.train_influences(xt, yt))
    assert a.metadata == {} and b.metadata == {}


def test_metadata_round_trips_through_a_zarr_store(case, tmp_path):
    model, loss, x, y, _, _ = case
    path = tmp_path / "g.zarr"
    meta = {"run": {"columns": ("prompt", "completion"), "max_length": 64}}
    infl = DataInfInfluence(model, loss, progress=False, store="zarr", store_path=path)
    infl.fit(DataLoader(TensorDataset(x, y), batch_size=8), metadata=meta)
    expected = {"run": {"columns": ["prompt", "completion"], "max_length": 64}}
    assert infl.metadata == expected  # as JSON reads it back, in memory too
    assert stored_metadata(path) == expected
    assert DataInfInfluence.from_store(model, loss, path).metadata == expected
    infl.with_regularization(0.5)
    assert infl.metadata == expected


def test_metadata_that_json_cannot_hold_is_refused_before_the_pass(case):
    model, loss, x, y, _, _ = case
    calls = []

    class Counting:
        def __iter__(self):
            calls.append(1)
            return iter(DataLoader(TensorDataset(x, y), batch_size=8))

    infl = DataInfInfluence(model, loss, progress=False)
    for bad in ({"t": torch.ones(1)}, {"nan": float("nan")}):
        with pytest.raises(TypeError, match="plain JSON"):
            infl.fit(Counting(), metadata=bad)
    assert calls == [] and not infl.is_fitted


# ---------------------------------------------------------------- frames
def test_scores_frame_ranks_with_ties_in_row_order():
    info = RowInfo(["a", "b", "c", "d"], {"text": ["A", "B", "C", "D"]})
    s = torch.tensor([1.0, 3.0, 1.0, -2.0])
    down = scores_frame(s, info)
    assert down["row"].tolist() == [1, 0, 2, 3] and down["rank"].tolist() == [
        1,
        2,
        3,
        4,
    ]
    assert down["text"].tolist() == ["B", "A", "C", "D"]
    up = scores_frame(s, info, ascending=True, top=2)
    assert up["id"].tolist() == ["d", "a"] and up["score"].tolist() == [-2.0, 1.0]
    with pytest.raises(ValueError, match="3 rows but the scores have 4"):
        scores_frame(s, ["a", "b", "c"])
    with pytest.raises(ValueError, match="one-dimensional"):
        scores_frame(torch.zeros(2, 2))


def test_top_k_frame_lays_out_every_test_row():
    best = TopK(torch.tensor([[3.0, 2.0], [5.0, 1.0]]), torch.tensor([[2, 0], [1, 2]]))
    train = RowInfo(["t0", "t1", "t2"], {"text": ["x0", "x1", "x2"]})
    test = RowInfo(["q0", "q1"], {"text": ["y0", "y1"]})
    table = best.to_frame(train, test)
    assert list(table.columns) == [
        "test_row", "test_id", "rank", "train_row", "train_id", "score",
        "train_text", "test_text",
    ]  # fmt: skip
    assert table["train_text"].tolist() == ["x2", "x0", "x1", "x2"]
    assert table["test_id"].tolist() == ["q0", "q0", "q1", "q1"]
    assert table["score"].tolist() == [3.0, 2.0, 5.0, 1.0]
    with pytest.raises(ValueError, match="scores have at least 3"):
        top_k_frame(best, ["t0", "t1"])
    arrow = to_arrow(table)
    assert (
        arrow.num_rows == 4
        and arrow.column("train_id").to_pylist() == table["train_id"].tolist()
    )


# ------------------------------------------------------- DatasetInfluence
@pytest.fixture(scope="module")
def fitted(case):
    model, loss, x, y, xt, yt = case
    infl = DataInfInfluence(model, loss, progress=False)
    data = DatasetInfluence(infl, collate_xy, batch_size=6, ids="uid", text="text")
    data.fit(dict_rows(x, y))
    return data, case


def test_tables_hold_the_reference_scores(fitted):
    data, (model, loss, x, y, xt, yt) = fitted
    ref = DenseDataInf(model, loss, x, y, data.influence.blocks.to_dict())
    full = ref.influences(xt, yt, x, y)  # (m, n) float64, independent
    test_rows = dict_rows(xt, yt)

    ranked = data.self_influence()
    self_ref = torch.stack(
        [
            ref.influences(x[i : i + 1], y[i : i + 1], x[i : i + 1], y[i : i + 1])[0, 0]
            for i in range(len(x))
        ]
    )
    got = torch.tensor(ranked.sort_values("row")["score"].to_numpy())
    assert rel_err(got, self_ref) < 1e-8
    assert ranked["id"].tolist() == [f"u{i}" for i in ranked["row"]]
    assert ranked["text"].tolist() == [f"row {i}" for i in ranked["row"]]
    assert ranked["score"].is_monotonic_decreasing

    mean = data.mean_test_influence(test_rows, ascending=True)
    got = torch.tensor(mean.sort_values("row")["score"].to_numpy())
    assert rel_err(got, full.mean(0)) < 1e-8
    assert mean["score"].is_monotonic_increasing

    table = data.top_k(test_rows, k=3)
    assert len(table) == 3 * len(xt)
    for j in range(len(xt)):
        part = table[table["test_row"] == j]
        assert part["train_row"].tolist() == full[j].topk(3).indices.tolist()
        assert (
            rel_err(torch.tensor(part["score"].to_numpy()), full[j].topk(3).values)
            < 1e-8
        )
        assert part["test_text"].tolist() == [f"row {j}"] * 3


def test_tables_equal_the_tensor_reductions(fitted):
    data, (_, _, x, y, xt, yt) = fitted
    infl = data.influence
    best = top_k(infl, 4, (xt, yt), progress=False)
    table = data.top_k(dict_rows(xt, yt), k=4)
    assert table["train_row"].tolist() == best.indices.reshape(-1).tolist()
    assert np.array_equal(
        table["score"].to_numpy(), best.values.reshape(-1).double().numpy()
    )
    s = self_influence(infl, progress=False)
    ranked = data.self_influence()
    assert np.array_equal(
        ranked["score"].to_numpy(),
        s[torch.tensor(ranked["row"].to_numpy())].double().numpy(),
    )
    m = mean_test_influence(infl, (xt, yt), progress=False)
    assert np.allclose(
        data.mean_test_influence(dict_rows(xt, yt))["score"].to_numpy(),
        m.sort(descending=True).values.double().numpy(),
    )
    assert data.influence.metadata[ROWS_KEY] == {
        "n": len(x),
        "batch_size": 6,
        "ids": "uid",
        "text": "text",
    }


def test_queries_need_a_fit_and_a_test_set(case):
    model, loss, x, y, _, _ = case
    data = DatasetInfluence(DataInfInfluence(model, loss, progress=False), collate_xy)
    with pytest.raises(RuntimeError, match="Fit first"):
        data.self_influence()
    data.fit(dict_rows(x, y))
    with pytest.raises(ValueError, match="Pass a test dataset"):
        data.top_k()


def test_from_store_checks_the_rows(case, tmp_path):
    model, loss, x, y, xt, yt = case
    path = tmp_path / "g.zarr"
    infl = DataInfInfluence(model, loss, progress=False, store="zarr", store_path=path)
    rows = dict_rows(x, y)
    first = DatasetInfluence(
        infl, collate_xy, batch_size=5, ids="uid", text="text"
    ).fit(rows)
    again = DatasetInfluence.from_store(
        model, loss, path, rows, collate_xy, progress=False
    )
    assert again.batch_size == 5 and again.text == "text" and again.ids == "uid"
    pd.testing.assert_frame_equal(again.self_influence(), first.self_influence())

    changed = [dict(r) for r in rows]
    changed[7]["y"] = (changed[7]["y"] + 1) % 3
    with pytest.raises(StoreMismatchError, match="Training row 7 differs"):
        DatasetInfluence.from_store(
            model, loss, path, changed, collate_xy, progress=False
        )
    with pytest.raises(StoreMismatchError, match="has 23 rows but 24 were fitted"):
        DatasetInfluence.from_store(
            model, loss, path, rows[:-1], collate_xy, progress=False
        )
    unchecked = DatasetInfluence.from_store(
        model, loss, path, changed, collate_xy, check=False, progress=False
    )
    assert unchecked.train is not None and unchecked.train.n_rows == len(rows)
    assert json.loads(json.dumps(stored_metadata(path)))[ROWS_KEY]["batch_size"] == 5
