"""The preallocated in-memory store gives exactly the rows appended."""

import pytest
import torch

from pydvl_datainf.storage import MemoryGradientStore


@pytest.mark.parametrize("capacity", [None, 3, 10, 40])
def test_capacity_hint_never_changes_the_rows(capacity):
    g = torch.randn(10, 5, dtype=torch.float64)
    h = torch.randn(10, 2, dtype=torch.float64)
    store = MemoryGradientStore(["g", "h"], capacity=capacity)
    for i in range(0, 10, 4):
        store.append({"g": g[i : i + 4], "h": h[i : i + 4]})
    parts = list(store.appended())
    assert torch.equal(torch.cat([p["g"] for p in parts]), g)
    store.finalize()
    assert store.n == 10
    assert torch.equal(store.data["g"], g) and torch.equal(store.data["h"], h)
    idx = torch.tensor([9, 0, 4])
    assert torch.equal(store.take(idx)["h"], h[idx])
    chunks = list(store.chunks(3))
    assert [s for s, _ in chunks] == [0, 3, 6, 9]
    assert torch.equal(torch.cat([c["g"] for _, c in chunks]), g)


def test_large_buffer_is_usable():
    store = MemoryGradientStore(["w"], capacity=4096)
    g = torch.ones(4096, 1024)  # 16 MiB: takes the huge-page hint path
    store.append({"w": g})
    store.finalize()
    assert float(store.data["w"].sum()) == 4096 * 1024


def test_nbytes_while_appending_never_merges_the_parts():
    # AutoGradientStore asks for nbytes at every append: it must stay cheap
    store = MemoryGradientStore(["w"])
    for _ in range(3):
        store.append({"w": torch.randn(4, 5, dtype=torch.float64)})
        assert store.nbytes == store.n * 5 * 8
        assert len(store._parts["w"]) == store.n // 4
