"""Offline data sets, splits, label flipping and the synthetic tasks."""

import re

import numpy as np
import pytest

from pydvl_datainf.experiments.datasets import (
    TextDataset,
    flip_labels,
    load_bbc_news,
    load_sms_spam,
    load_text_dataset,
    read_csv,
    split,
    templated_tasks,
)


@pytest.fixture(scope="module")
def sms():
    return load_sms_spam()


def test_sms_spam_ships_offline(sms):
    assert len(sms) == 4862
    assert sms.class_names == ["ham", "spam"]
    assert int(sms.labels.sum()) == 642
    assert all(isinstance(t, str) and t for t in sms.texts[:50])


def test_bbc_news_ships_offline():
    bbc = load_bbc_news()
    assert len(bbc) == 2225
    assert bbc.class_names == [
        "business",
        "entertainment",
        "politics",
        "sports",
        "tech",
    ]
    assert np.bincount(bbc.labels).tolist() == [510, 386, 417, 511, 401]
    assert load_text_dataset("bbc").texts[0] == bbc.texts[0]
    with pytest.raises(ValueError, match="Unknown data set"):
        load_text_dataset("imdb")


def test_split_is_disjoint_stratified_and_seeded(sms):
    train, test = split(sms, 500, 100, seed=3)
    assert len(train) == 500 and len(test) == 100
    again, _ = split(sms, 500, 100, seed=3)
    assert again.texts == train.texts
    # spam is 13.2% of the corpus; stratification keeps it within rounding
    assert abs(train.labels.mean() - 642 / 4862) < 0.01
    with pytest.raises(ValueError):
        split(sms, 4000, 1000)


def test_split_indices_are_disjoint():
    data = TextDataset([str(i) for i in range(50)], np.arange(50) % 3, ["a", "b", "c"])
    train, test = split(data, 30, 15, seed=0)
    assert len(set(train.texts) | set(test.texts)) == 45


def test_flip_labels():
    labels = np.arange(100) % 5
    noisy, flipped = flip_labels(labels, 0.2, 5, seed=1)
    assert flipped.sum() == 20
    assert (noisy[flipped == 1] != labels[flipped == 1]).all()
    assert (noisy[flipped == 0] == labels[flipped == 0]).all()
    assert noisy.min() >= 0 and noisy.max() < 5
    again, _ = flip_labels(labels, 0.2, 5, seed=1)
    assert (again == noisy).all()
    binary, fb = flip_labels(np.zeros(10, dtype=int), 0.5, 2, seed=0)
    assert (binary == fb).all()  # 0 becomes 1 exactly where flipped
    with pytest.raises(ValueError):
        flip_labels(labels, 1.5, 5)
    with pytest.raises(ValueError):
        flip_labels(labels, 0.1, 1)


FLY = "eagle sparrow bat pigeon owl parrot crow hawk swallow seagull duck bee butterfly falcon"
WARM = "red orange yellow pink gold amber scarlet crimson"
FRUIT = "apple banana cherry mango pear plum lemon grape peach melon kiwi orange"
RULES = [
    (
        r"is (?:the number )?(\d+) (?:an )?even(?: number)?\?",
        lambda m: int(m[1]) % 2 == 0,
    ),
    (
        r"is (?:the number )?(\d+) (?:smaller than|less than|below) ten\?",
        lambda m: int(m[1]) < 10,
    ),
    (r"(?:is|would you call) (?:a )?(\w+) a fruit\?", lambda m: m[1] in FRUIT.split()),
    (r"(?:can|does|is) a (\w+) (?:able to )?fly\?", lambda m: m[1] in FLY.split()),
    (r"(?:is|would you call) (\w+) a warm colour\?", lambda m: m[1] in WARM.split()),
    (
        r"is (\w+) (?:part of the weekend|a weekend day)\?",
        lambda m: m[1] in ("saturday", "sunday"),
    ),
    (
        r"(?:does the word|is the first letter of) (\w+) (?:start with )?a vowel\?",
        lambda m: m[1][0] in "aeiou",
    ),
    (r"(?=.*syllables).*'([la ]+)'.*", lambda m: len(m[1].split()) > 3),
]


def _answer(text: str) -> int:
    """Recompute the label of a templated question from its text."""
    for pattern, rule in RULES:
        if m := re.fullmatch(pattern, text):
            return int(rule(m))
    raise AssertionError(f"unknown template: {text!r}")


def test_templated_tasks_labels_follow_the_rules():
    data = templated_tasks(40, seed=2)
    assert len(data) == 8 * 40 and data.n_classes == 2
    assert data.groups is not None and len(data.group_names) == 8
    assert np.bincount(data.groups).tolist() == [40] * 8
    for g in range(8):  # balanced yes/no within each task
        assert data.labels[data.groups == g].sum() == 20
    assert all(_answer(t) == y for t, y in zip(data.texts, data.labels))
    sub = templated_tasks(10, tasks=["fly", "parity"])
    assert sub.group_names == ["parity", "fly"]
    with pytest.raises(ValueError):
        templated_tasks(10, tasks=["nope"])


def test_subset_keeps_groups():
    data = templated_tasks(5)
    sub = data.subset([3, 1])
    assert sub.texts == [data.texts[3], data.texts[1]]
    assert sub.groups.tolist() == [data.groups[3], data.groups[1]]


# ----------------------------------------------------------- the user's data
def test_string_labels_map_to_ids_in_sorted_or_given_order():
    data = TextDataset(["a", "b", "c"], ["spam", "ham", "spam"])
    assert data.class_names == ["ham", "spam"]
    assert data.labels.tolist() == [1, 0, 1]
    given = TextDataset(["a", "b"], ["spam", "ham"], ["spam", "ham"])
    assert given.labels.tolist() == [0, 1]
    ints = TextDataset(["a", "b", "c"], np.array([2, 0, 1]))
    assert ints.class_names == ["0", "1", "2"] and ints.labels.tolist() == [2, 0, 1]
    assert TextDataset(["a"], [1.0], ["x", "y"]).labels.tolist() == [1]


@pytest.mark.parametrize(
    "labels,names,message",
    [
        ([0, 2], ["x", "y"], r"labels \[2\] \(rows \[1\]\) are outside 0..1"),
        ([-1, 0], ["x", "y"], r"labels \[-1\] \(rows \[0\]\) are outside"),
        (["x", "z"], ["x", "y"], r"labels \['z'\] \(rows \[1\]\) are not among"),
        ([0, None], [], r"rows \[1\] have no label"),
        ([0, float("nan")], [], r"rows \[1\] have no label"),
        ([0, 1.5], [], r"must be integers or strings; rows \[1\] hold 1.5"),
        ([0, "a"], [], r"mix strings \(row 1\) and int \(row 0\)"),
        ([True, False], [], r"must be integers or strings; rows \[0, 1\]"),
        ([0, 1], ["x", "x"], r"class_names has duplicates"),
    ],
)
def test_bad_labels_are_rejected_with_the_rows_named(labels, names, message):
    with pytest.raises(ValueError, match=message):
        TextDataset(["p", "q"], labels, names)


def test_bad_texts_are_rejected():
    with pytest.raises(TypeError, match="not one string"):
        TextDataset("abc", [0, 1, 0])
    with pytest.raises(TypeError, match=r"rows \[1\]"):
        TextDataset(["a", 3], [0, 1])
    with pytest.raises(ValueError, match="2 texts but 3 labels"):
        TextDataset(["a", "b"], [0, 1, 0])


def test_row_ids_follow_subsets_and_splits(sms):
    sub = sms.subset([10, 4, 7]).subset([2, 0])
    assert sub.row_ids.tolist() == [7, 10]
    train, test = split(sms, 50, 20, seed=0)
    assert [sms.texts[r] for r in train.row_ids] == train.texts
    assert set(train.row_ids).isdisjoint(test.row_ids)


def test_read_csv(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text(
        'text,label,other\n"hello, world",pos,1\nbad day,neg,0\nfine,pos,0\n',
        encoding="utf-8",
    )
    data = read_csv(path, "text", "label")
    assert data.texts == ["hello, world", "bad day", "fine"]
    assert data.class_names == ["neg", "pos"] and data.labels.tolist() == [1, 0, 1]
    assert data.name == "mine" and data.row_ids.tolist() == [0, 1, 2]
    ints = read_csv(path, "text", "other")
    assert ints.labels.tolist() == [1, 0, 0] and ints.class_names == ["0", "1"]
    with pytest.raises(ValueError, match=r"no column 'txt'; its columns are \['text'"):
        read_csv(path, "txt", "label")
    with pytest.raises(FileNotFoundError, match="No CSV file"):
        read_csv(tmp_path / "absent.csv", "text", "label")
    (tmp_path / "blank.csv").write_text("text,label\na,x\nb,\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data rows \[1\] have no label"):
        read_csv(tmp_path / "blank.csv", "text", "label")
    (tmp_path / "range.csv").write_text("text,label\na,0\nb,3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="outside 0..1"):
        read_csv(tmp_path / "range.csv", "text", "label", class_names=["x", "y"])


def test_flip_labels_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="must lie in 0..1"):
        flip_labels(np.array([0, 2]), 0.5, 2)
