"""The training-row index finds exactly the rows it was given, in both modes."""

from __future__ import annotations

import pytest
import torch

from pydvl_datainf.rows import RowIndex, row_digests, row_keys


@pytest.mark.parametrize("exact_bytes", [0, 10**6], ids=["digest", "exact"])
def test_lookup_finds_first_occurrences_and_refuses_unknown_rows(exact_bytes):
    x = torch.randn(10, 3)
    y = torch.arange(10) % 4
    x[7], y[7] = x[2], y[2]  # a duplicate: its first row is 2
    index = RowIndex(exact_bytes)
    index.add(x[:6], y[:6])
    index.add(x[6:], y[6:])
    assert index.n == 10
    got = index.lookup(x[[9, 0, 7, 5]], y[[9, 0, 7, 5]])
    assert got is not None and got.tolist() == [9, 0, 2, 5]
    other = x[:2].clone()
    other[1, 0] = torch.nextafter(other[1, 0], torch.tensor(10.0))  # one ulp away
    assert index.lookup(other, y[:2]) is None
    assert index.lookup(x[:2], y[:2] + 1) is None
    assert index.lookup(x[:2].double(), y[:2]) is None  # another dtype
    assert index.lookup(x[:2, :2], y[:2]) is None  # another shape


def test_padded_batches_of_different_lengths_are_separate_groups():
    a, b = torch.randint(0, 9, (4, 5)), torch.randint(0, 9, (3, 8))
    ya, yb = torch.zeros(4, dtype=torch.long), torch.ones(3, dtype=torch.long)
    index = RowIndex(10**6)
    index.add(a, ya)
    index.add(b, yb)
    assert index.lookup(b[[2, 0]], yb[[2, 0]]).tolist() == [6, 4]
    assert index.lookup(a[[3]], ya[[3]]).tolist() == [3]


def test_keys_are_the_row_bytes_and_digests_differ_by_row():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([True, False])
    keys = row_keys(x, y)
    assert keys[0] == x[0].numpy().tobytes() + b"\x01"
    assert keys[1] == x[1].numpy().tobytes() + b"\x00"
    digests = row_digests(x, y)
    assert len(set(digests)) == 2 and all(len(d) == 16 for d in digests)
    assert row_keys(x[:0], y[:0]) == []


def test_pickling_keeps_the_index():
    import pickle

    x, y = torch.randn(6, 3), torch.arange(6)
    index = RowIndex(10**6)
    index.add(x, y)
    clone = pickle.loads(pickle.dumps(index))
    assert clone.lookup(x[[5, 0]], y[[5, 0]]).tolist() == [5, 0]


def test_mode_follows_the_sample_size():
    x, y = torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    small, large = RowIndex(4 * 4 + 8), RowIndex(4 * 4 + 7)
    for index in (small, large):
        index.add(x, y)
    ((exact_small, _),) = small._tables.values()
    ((exact_large, _),) = large._tables.values()
    assert exact_small and not exact_large
