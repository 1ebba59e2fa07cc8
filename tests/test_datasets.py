"""Offline data sets, splits, label flipping and the synthetic tasks."""

import re

import numpy as np
import pytest

from pydvl_datainf.datasets import (
    TextDataset,
    flip_labels,
    load_bbc_news,
    load_sms_spam,
    load_text_dataset,
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
