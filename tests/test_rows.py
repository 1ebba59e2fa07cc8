"""The training-row index: exact recognition, bounded memory, consistent numbers."""

from __future__ import annotations

import pickle
import weakref

import pytest
import torch

from models import fit_zarr, make_case
from pydvl_datainf import DataInfInfluence
from pydvl_datainf.rows import (
    DIGEST_BYTES,
    RowIndex,
    batch_digest,
    row_digests,
    row_keys,
)
from reference import rel_err


def test_lookup_finds_first_occurrences_and_refuses_unknown_rows():
    x = torch.randn(10, 3)
    y = torch.arange(10) % 4
    x[7], y[7] = x[2], y[2]  # a duplicate: its first row is 2
    index = RowIndex()
    index.add(x[:6], y[:6])
    index.add(x[6:], y[6:])
    assert index.n == 10
    got = index.lookup(x[[9, 0, 7, 5]], y[[9, 0, 7, 5]])
    assert got is not None and got.tolist() == [9, 0, 2, 5]
    other = x[:2].clone()
    other[1, 0] = torch.nextafter(other[1, 0], torch.tensor(10.0))  # one ulp away
    assert index.lookup(other, y[:2]) is None
    assert index.locate(other, y[:2]).tolist() == [0, -1]
    assert index.lookup(x[:2], y[:2] + 1) is None
    assert index.lookup(x[:2].double(), y[:2]) is None  # another dtype
    assert index.lookup(x[:2, :2], y[:2]) is None  # another shape
    assert RowIndex().locate(x[:2], y[:2]).tolist() == [-1, -1]


def test_padded_batches_of_different_lengths_never_match():
    a, b = torch.randint(0, 9, (4, 5)), torch.randint(0, 9, (3, 8))
    ya, yb = torch.zeros(4, dtype=torch.long), torch.ones(3, dtype=torch.long)
    index = RowIndex()
    index.add(a, ya)
    index.add(b, yb)
    assert index.lookup(b[[2, 0]], yb[[2, 0]]).tolist() == [6, 4]
    assert index.lookup(a[[3]], ya[[3]]).tolist() == [3]
    padded = torch.cat([a[:1], torch.zeros(1, 3, dtype=a.dtype)], 1)
    assert index.lookup(padded, ya[:1]) is None


def test_keys_are_the_row_bytes_and_digests_differ_by_row():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([True, False])
    keys = row_keys(x, y)
    assert keys[0] == x[0].numpy().tobytes() + b"\x01"
    assert keys[1] == x[1].numpy().tobytes() + b"\x00"
    digests = row_digests(x, y)
    assert len(set(digests)) == 2 and all(len(d) == 16 for d in digests)
    assert row_keys(x[:0], y[:0]) == []


def test_pickling_and_saved_digests_keep_the_index():
    x, y = torch.randn(6, 3), torch.arange(6)
    index = RowIndex()
    index.add(x, y)
    clone = pickle.loads(pickle.dumps(index))
    assert clone.lookup(x[[5, 0]], y[[5, 0]]).tolist() == [5, 0]
    again = RowIndex.from_digests(index.digests())
    assert again.n == 6 and again.lookup(x[[3]], y[[3]]).tolist() == [3]


def test_memory_is_digests_only_and_inputs_are_not_kept():
    x, y = torch.randn(1000, 64), torch.arange(1000)
    index = RowIndex()
    index.add(x, y)
    ref = weakref.ref(x)
    del x
    assert ref() is None  # no copy, no reference to the batch
    assert index.nbytes == 1000 * DIGEST_BYTES
    index.locate(torch.randn(2, 64), torch.arange(2))  # builds the lookup table
    assert index.nbytes == 1000 * (DIGEST_BYTES + DIGEST_BYTES + 8)


def _half_store_model(tmp_path):
    model, loss, x, y, xt, yt = make_case("mlp")
    model = model.float()
    x, xt = x.float(), xt.float()
    infl = fit_zarr(model, loss, x, y, tmp_path / "g.zarr", store_dtype="float16")
    return infl, model, loss, x, y, xt, yt


def test_a_row_gives_the_same_numbers_whatever_its_batch(tmp_path):
    infl, model, loss, x, y, xt, yt = _half_store_model(tmp_path)
    known = infl.influences(xt, yt, x[:4], y[:4])  # read from the store
    stored = infl.store.take(torch.arange(4))
    f = infl.influence_factors_by_block(xt, yt)
    expected = sum(f[k] @ stored[k].T.to(f[k]) for k in f)
    assert torch.allclose(known, expected, rtol=1e-6, atol=0)
    new = xt[:2] + 0.5  # rows not seen in fit
    mixed = infl.influences(xt, yt, torch.cat([x[:4], new]), torch.cat([y[:4], yt[:2]]))
    alone = infl.influences(xt, yt, new, yt[:2])
    # the same numbers up to rounding: a batch of another shape may use
    # another matrix kernel, which adds in another order
    assert rel_err(mixed[:, :4], known) < 1e-6
    assert rel_err(mixed[:, 4:], alone) < 1e-6
    # unknown rows are rounded to the store's dtype, as stored rows are
    g = infl.per_sample_gradients(new, yt[:2])
    rounded = {k: v.half().float() for k, v in g.items()}
    assert torch.allclose(
        alone, sum(f[k] @ rounded[k].T for k in f), rtol=1e-5, atol=1e-7
    )
    assert not torch.allclose(alone, sum(f[k] @ g[k].T for k in f), rtol=1e-7, atol=0)


def test_index_is_saved_with_the_store_and_reloaded(tmp_path):
    infl, model, loss, x, y, xt, yt = _half_store_model(tmp_path)
    mixed_x = torch.cat([x[3:6], xt[:1] + 0.5])
    mixed_y = torch.cat([y[3:6], yt[:1]])
    before = infl.influences(xt, yt, mixed_x, mixed_y)
    reopened = DataInfInfluence.from_store(model, loss, tmp_path / "g.zarr")
    rows = reopened.state.rows
    assert rows is not None and rows.n == len(x)
    assert rows.lookup(x[[5, 1]], y[[5, 1]]).tolist() == [5, 1]
    assert torch.equal(reopened.influences(xt, yt, mixed_x, mixed_y), before)


def test_a_damaged_row_index_is_refused_and_a_missing_one_changes_nothing(
    tmp_path, caplog
):
    from pydvl_datainf.errors import StoreMismatchError
    from pydvl_datainf.storage import open_zarr_group

    infl, model, loss, x, y, xt, yt = _half_store_model(tmp_path)
    path = tmp_path / "g.zarr"
    mixed_x = torch.cat([x[3:6], xt[:1] + 0.5])
    mixed_y = torch.cat([y[3:6], yt[:1]])
    before = infl.influences(xt, yt, mixed_x, mixed_y)
    chunks = [p for p in (path / "rows" / "digests").rglob("*") if p.is_file()]
    chunks = [p for p in chunks if p.name != "zarr.json"]
    assert chunks
    chunks[0].write_bytes(b"\x00" * chunks[0].stat().st_size)  # corrupt it
    with pytest.raises(StoreMismatchError, match="rows/digests"):
        DataInfInfluence.from_store(model, loss, path)
    # a writer that died before the index: no index, the same numbers
    group = open_zarr_group(path, "r+")
    manifest = dict(group.attrs["manifest"])
    del manifest["rows/digests"]
    group.attrs["manifest"] = manifest
    reopened = DataInfInfluence.from_store(model, loss, path)
    assert reopened.state.rows is None and "no row index" in caplog.text
    assert torch.equal(reopened.influences(xt, yt, mixed_x, mixed_y), before)


def test_batches_of_the_fit_are_recognised_whole_with_first_occurrences():
    x, y = torch.randn(10, 3), torch.arange(10)
    x[7], y[7] = x[2], y[2]  # a duplicate of row 2, in another batch
    index = RowIndex()
    for lo, hi in ((0, 5), (5, 10)):
        index.extend(row_digests(x[lo:hi], y[lo:hi]), batch_digest(x[lo:hi], y[lo:hi]))
    # the second batch again, as a calculator passes it: the same rows as one
    # by one lookups give (the duplicate maps to its first occurrence)
    whole = index.locate(x[5:].clone(), y[5:].clone())
    assert whole.tolist() == [5, 6, 2, 8, 9]
    one_by_one = torch.cat(
        [index.locate(x[i : i + 1], y[i : i + 1]) for i in range(5, 10)]
    )
    assert torch.equal(whole, one_by_one)
    # a batch never seen is looked up row by row, then remembered
    mixed = (x[[7, 0]], y[[7, 0]])
    assert index.locate(*mixed).tolist() == [2, 0] == index.locate(*mixed).tolist()
    # new rows forget what was remembered
    index.extend(row_digests(torch.randn(1, 3), torch.tensor([3])))
    assert index.locate(*mixed).tolist() == [2, 0]
