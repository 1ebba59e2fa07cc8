"""The maximum-inner-product index: exact and approximate search, and its faults.

Exact search is compared with the top-k of the explicit score matrix; the
approximate kinds with a recall floor. On disk: a flipped byte, a missing
file, an incomplete write, changed rows and other build options are refused
with an error that names the problem, and a directory that is not ours is
never replaced or deleted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pydvl_datainf.compressed import apply_compressed
from pydvl_datainf.errors import StoreCorruptError, StoreExistsError, StoreMismatchError
from pydvl_datainf.storage import claim_path
from pydvl_datainf.storage.index import (
    INDEX_FILE,
    MARKER,
    IndexOptions,
    MipsIndex,
    open_or_build,
    recall_at_k,
    rows_digest,
)

pytest.importorskip("faiss")


def clustered(n=3000, d=24, clusters=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g) * 2
    labels = torch.randint(0, clusters, (n,), generator=g)
    scale = torch.rand(n, 1, generator=g) + 0.5  # rows of different norms
    return (centers[labels] + torch.randn(n, d, generator=g)) * scale


@pytest.fixture(scope="module")
def rows():
    return clustered()


@pytest.fixture(scope="module")
def queries():
    return clustered(20, seed=1)


def exact_top(queries, rows, k, largest=True):
    return (queries @ rows.T).topk(k, dim=1, largest=largest)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_flat_search_is_exact(rows, queries, largest, storage):
    index = MipsIndex.build(rows, IndexOptions(storage=storage))
    scores, ids = index.search(queries, 10, largest=largest)
    stored = rows.half().float() if storage == "float16" else rows
    exact = exact_top(queries, stored, 10, largest)
    assert recall_at_k(ids, exact.indices) == 1.0
    assert torch.allclose(scores, exact.values, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "options",
    [
        IndexOptions(kind="hnsw", hnsw_m=16, ef_search=256),
        IndexOptions(kind="ivf", nlist=32, nprobe=8),
        IndexOptions(kind="ivf", nlist=32, nprobe=8, storage="float16"),
    ],
    ids=["hnsw", "ivf", "ivf-float16"],
)
def test_approximate_search_finds_most_of_the_exact_top_k(rows, queries, options):
    index = MipsIndex.build(rows, options)
    scores, ids = index.search(queries, 20)
    exact = exact_top(queries, rows, 20)
    assert recall_at_k(ids, exact.indices) >= 0.9
    found = torch.gather(queries @ rows.T, 1, ids.clamp_min(0))
    assert torch.allclose(
        scores, found, rtol=1e-3, atol=1e-2 * float(found.abs().max())
    )


def test_fewer_probes_lose_recall_and_need_no_rebuild(rows, queries):
    index = MipsIndex.build(rows, IndexOptions(kind="ivf", nlist=64, nprobe=64))
    exact = exact_top(queries, rows, 50).indices
    full = recall_at_k(index.search(queries, 50)[1], exact)
    index.set_search(nprobe=1)
    assert index.options.nprobe == 1
    assert recall_at_k(index.search(queries, 50)[1], exact) < full


def test_top_k_of_datainf_scores_from_the_index_for_any_lambda(tmp_path):
    """score = (R g_t) . g_j: R acts on the queries, the index is over the rows.
    Two values of lambda are answered by the same index file, unchanged."""
    g = torch.Generator().manual_seed(3)
    train = torch.randn(500, 40, generator=g, dtype=torch.float64)
    test = torch.randn(4, 40, generator=g, dtype=torch.float64)
    norms = train.square().sum(1)
    path = tmp_path / "rows.index"
    index = open_or_build(path, train)
    stamp = (path / INDEX_FILE).stat().st_mtime_ns
    for lam in (0.01, 10.0):
        factors = apply_compressed(test, train, norms, lam)
        expected = (factors @ train.T).topk(15, dim=1)
        index = open_or_build(path, train)
        scores, ids = index.search(factors, 15)
        assert recall_at_k(ids, expected.indices) == 1.0
        assert torch.allclose(scores.double(), expected.values, rtol=1e-5)
    assert (path / INDEX_FILE).stat().st_mtime_ns == stamp


# ------------------------------------------------------------------ the digest


def test_the_rows_digest_ignores_chunking_and_sees_any_change(rows):
    assert rows_digest(rows) == rows_digest(lambda: rows.split(777))
    assert rows_digest(rows) == rows_digest(rows.numpy())
    changed = rows.clone()
    changed[1234, 5] += 1e-6
    assert rows_digest(changed) != rows_digest(rows)
    assert rows_digest(rows[:-1]) != rows_digest(rows)


def test_an_index_from_chunks_equals_one_from_the_tensor(rows, queries):
    a = MipsIndex.build(rows)
    b = MipsIndex.build(lambda: iter(rows.split(1000)))
    assert a.rows_digest == b.rows_digest
    assert torch.equal(a.search(queries, 5)[1], b.search(queries, 5)[1])


# ------------------------------------------------------------------ on disk


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_saved_index_reads_back_with_the_same_answers(tmp_path, rows, queries, kind):
    index = MipsIndex.build(rows, IndexOptions(kind=kind))
    index.save(tmp_path / "idx")
    again = MipsIndex.open(tmp_path / "idx", digest=rows_digest(rows))
    assert (again.n, again.dim, again.options) == (index.n, index.dim, index.options)
    s1, i1 = index.search(queries, 7)
    s2, i2 = again.search(queries, 7)
    assert torch.equal(i1, i2) and torch.equal(s1, s2)
    marker = json.loads((tmp_path / "idx" / MARKER).read_text())
    assert marker["format"] == "pydvl_datainf.mips_index" and marker["complete"]


@pytest.fixture
def saved(tmp_path, rows):
    path = tmp_path / "idx"
    MipsIndex.build(rows).save(path)
    return path


def test_a_flipped_byte_is_refused(saved, rows):
    file = saved / INDEX_FILE
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="damaged"):
        MipsIndex.open(saved)
    rebuilt = open_or_build(saved, rows)  # ours: rebuilt in place
    assert MipsIndex.open(saved, digest=rebuilt.rows_digest).n == len(rows)


def test_a_missing_file_is_refused(saved):
    (saved / INDEX_FILE).unlink()
    with pytest.raises(StoreCorruptError, match="missing"):
        MipsIndex.open(saved)


def test_an_index_of_other_rows_is_stale_and_rebuilt(saved, rows, queries):
    changed = rows.clone()
    changed[0] *= 2
    with pytest.raises(StoreMismatchError, match="stale"):
        MipsIndex.open(saved, digest=rows_digest(changed))
    index = open_or_build(saved, changed)
    assert index.rows_digest == rows_digest(changed)
    assert MipsIndex.open(saved, digest=rows_digest(changed)).n == len(rows)
    ids = index.search(queries, 10)[1]
    assert recall_at_k(ids, exact_top(queries, changed, 10).indices) == 1.0


def test_other_build_options_are_refused_and_rebuilt(saved, rows):
    hnsw = IndexOptions(kind="hnsw")
    with pytest.raises(StoreMismatchError, match="built with"):
        MipsIndex.open(saved, options=hnsw)
    # search options alone are not a reason to rebuild
    MipsIndex.open(saved, options=IndexOptions(ef_search=999, nprobe=3))
    assert open_or_build(saved, rows, hnsw).options.kind == "hnsw"


def test_an_incomplete_index_is_refused_and_rebuilt(saved, rows):
    marker = json.loads((saved / MARKER).read_text())
    (saved / MARKER).write_text(json.dumps({**marker, "complete": False}))
    with pytest.raises(StoreCorruptError, match="incomplete"):
        MipsIndex.open(saved)
    assert open_or_build(saved, rows).n == len(rows)
    assert json.loads((saved / MARKER).read_text())["complete"]


def test_an_existing_index_is_replaced_only_with_overwrite(saved, rows):
    index = MipsIndex.build(rows[:100])
    with pytest.raises(StoreExistsError, match="overwrite=True"):
        index.save(saved)
    index.save(saved, overwrite=True)
    assert MipsIndex.open(saved).n == 100


def test_a_foreign_directory_is_never_replaced_or_deleted(tmp_path, rows):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine")
    for attempt in (
        lambda: MipsIndex.build(rows[:50]).save(mine, overwrite=True),
        lambda: open_or_build(mine, rows[:50]),
    ):
        with pytest.raises(StoreExistsError, match="never"):
            attempt()
    assert os.listdir(mine) == ["todo.txt"]
    assert (mine / "todo.txt").read_text() == "mine"
    with pytest.raises(StoreMismatchError, match="not an index"):
        MipsIndex.open(mine)


def test_a_store_of_ours_is_not_taken_for_an_index(tmp_path, rows):
    store = tmp_path / "grads.zarr"
    claim_path(str(store), "gradient_store")
    before = sorted(p.name for p in store.iterdir())
    with pytest.raises(StoreExistsError):
        open_or_build(store, rows[:50])
    assert sorted(p.name for p in store.iterdir()) == before


def test_a_damaged_marker_is_refused_and_left_alone(saved, rows):
    (saved / MARKER).write_text("{not json")
    with pytest.raises(StoreCorruptError, match="marker"):
        MipsIndex.open(saved)
    with pytest.raises(StoreExistsError):
        open_or_build(saved, rows)
    assert (saved / MARKER).read_text() == "{not json"


def test_nothing_there_and_bad_queries(tmp_path, rows):
    with pytest.raises(FileNotFoundError):
        MipsIndex.open(tmp_path / "none")
    index = MipsIndex.build(rows[:10])
    with pytest.raises(ValueError, match="columns"):
        index.search(torch.randn(2, 3), 1)
    with pytest.raises(ValueError, match="k must be"):
        index.search(torch.randn(2, rows.shape[1]), 11)
    with pytest.raises(ValueError, match="kind"):
        IndexOptions(kind="lsh")
    with pytest.raises(ValueError, match="no rows"):
        MipsIndex.build(rows[:0])


def test_an_empty_directory_is_free(tmp_path, rows):
    empty = Path(tmp_path / "empty")
    empty.mkdir()
    assert open_or_build(empty, rows[:30]).n == 30
