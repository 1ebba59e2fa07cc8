"""Batches of `(x, y)` from a map-style dataset, with the identity of every row.

pyDVL's protocol, and so [fit][pydvl_datainf.influence.DataInfInfluence.fit]
and the scoring functions, read `(x, y)` batches. Data usually come as a
map-style dataset (a tokenized `datasets.Dataset`, a list of dicts, any object
with `__len__` and `__getitem__`) and a collate function (a Hugging Face data
collator, say). [DatasetBatches][pydvl_datainf.batches.DatasetBatches] joins
them in three steps, for batches of consecutive rows in dataset order:

1. **Select.** Rows that are mappings keep only the fields the collate
   function needs (`columns`), as the Hugging Face `Trainer` drops unused
   columns: text columns stay in the dataset, for the tables, and never reach
   the collator.
2. **Collate.** `collate_fn(rows)` pads and stacks the rows into a batch.
3. **Adapt.** A *batch adapter* turns the collated batch into `(x, y)`, the
   pair that `model(x)` and `loss(prediction, y)` take. The default accepts
   batches that already are pairs; [pydvl_datainf.hf][] has the adapters of its
   model wrappers, which models announce with a `batch_adapter` attribute
   (see [adapter_for][pydvl_datainf.batches.adapter_for]).

Row `i` of every result is row `i` of the dataset. Its *id*, for tables, is
the dataset index, the value of an id column, or a content hash
([row_hash][pydvl_datainf.batches.row_hash]); see
[RowInfo][pydvl_datainf.batches.RowInfo].

Example:
    ```python
    import torch
    from pydvl_datainf.batches import DatasetBatches

    rows = [{"x": [float(i), 1.0], "y": i % 2, "text": f"row {i}"} for i in range(5)]

    def collate(batch):
        return {"x": torch.tensor([r["x"] for r in batch]),
                "y": torch.tensor([r["y"] for r in batch])}

    def to_pair(batch):
        return batch["x"], batch["y"]

    data = DatasetBatches(rows, collate, adapter=to_pair, batch_size=2,
                          columns=["x", "y"], text="text")
    assert len(data) == 3 and data.n_rows == 5  # 3 batches of 5 rows
    x, y = next(iter(data))
    assert x.shape == (2, 2) and y.tolist() == [0, 1]
    info = data.row_info()
    assert info.ids == [0, 1, 2, 3, 4] and info.columns["text"][4] == "row 4"
    ```
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
    runtime_checkable,
)

import torch
from torch.utils.data import DataLoader, default_collate

__all__ = [
    "BatchAdapter",
    "DatasetBatches",
    "RowInfo",
    "IdSpec",
    "TextSpec",
    "adapter_for",
    "pair_batch",
    "row_hash",
]

logger = logging.getLogger(__name__)

Pair = Tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class BatchAdapter(Protocol):
    """Turns a collated batch into `(x, y)`.

    An adapter may have a `columns` attribute: the fields of mapping rows that
    the collate function should see (others are dropped before collation).
    """

    def __call__(self, batch: Any) -> Pair:  # pragma: no cover - a protocol
        ...


IdSpec = Union[None, str, Sequence[Any], Callable[[Any], Any]]
"""How rows are identified in tables: `None` for the dataset index, a column
name, one id per row, or a function of the row (e.g.
[row_hash][pydvl_datainf.batches.row_hash])."""

TextSpec = Union[None, str, Sequence[str]]
"""Columns shown beside the scores: a column name, several, `"auto"` (every
column whose value in the first row is a string) or `None`."""


def pair_batch(batch: Any) -> Pair:
    """The default adapter: a batch that already is an `(x, y)` pair.

    Raises:
        TypeError: anything else, naming what to pass instead.

    Example:
        >>> import torch
        >>> x, y = pair_batch([torch.zeros(2, 3), torch.ones(2)])
        >>> tuple(x.shape), tuple(y.shape)
        ((2, 3), (2,))
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return x, y
    raise TypeError(
        f"The collated batch is a {type(batch).__name__}, not an (x, y) pair of "
        f"tensors; pass an adapter that turns it into (x, y), or a model wrapper "
        f"with a batch_adapter (e.g. pydvl_datainf.hf.CausalLMWrapper)"
    )


def adapter_for(model: Any) -> BatchAdapter:
    """The batch adapter that a model announces, else
    [pair_batch][pydvl_datainf.batches.pair_batch].

    A model (for example [CausalLMWrapper][pydvl_datainf.hf.CausalLMWrapper])
    announces how a collated batch becomes its `(x, y)` with an attribute
    `batch_adapter`.

    Example:
        >>> import torch
        >>> adapter_for(torch.nn.Linear(2, 2)) is pair_batch
        True
    """
    adapter = getattr(model, "batch_adapter", None)
    return pair_batch if adapter is None else adapter


def _plain(value: Any) -> Any:
    """A JSON-able form of a field (tensors and arrays as nested lists)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def row_hash(row: Any) -> str:
    """A content id of a row: 16 hex digits of BLAKE2b over its canonical JSON.

    Equal rows get equal ids, whatever their position, so ids survive
    shuffling, filtering and concatenation of datasets. Fields are sorted by
    name; tensors and arrays count by their values.

    Example:
        >>> row_hash({"b": 1, "a": "x"}) == row_hash({"a": "x", "b": 1})
        True
        >>> len(row_hash({"a": "x"}))
        16
    """
    text = json.dumps(_plain(row), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass
class RowInfo:
    """Who the rows are: an id per row, and columns to show beside scores.

    Attributes:
        ids: one id per row, in row order.
        columns: `{name: values}`, each one value per row (e.g. the text).

    Example:
        >>> info = RowInfo(ids=["a", "b"], columns={"text": ["hello", "world"]})
        >>> info.take([1])
        RowInfo(ids=['b'], columns={'text': ['world']})
    """

    ids: List[Any]
    columns: Dict[str, List[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, values in self.columns.items():
            if len(values) != len(self.ids):
                raise ValueError(
                    f"Column {name!r} has {len(values)} values for {len(self.ids)} rows"
                )

    @property
    def n(self) -> int:
        """Number of rows."""
        return len(self.ids)

    def take(self, rows: Sequence[int]) -> RowInfo:
        """The information of the given rows, in that order."""
        return RowInfo(
            [self.ids[i] for i in rows],
            {k: [v[i] for i in rows] for k, v in self.columns.items()},
        )

    @classmethod
    def of(cls, rows: Any, n: int, exact: bool = True) -> RowInfo:
        """`rows` as a `RowInfo` for `n` rows.

        Args:
            rows: a `RowInfo`, an object with a `row_info()` method (such as
                [DatasetBatches][pydvl_datainf.batches.DatasetBatches]), a
                sequence of ids, or `None` (ids `0..n-1`).
            n: the number of rows the scores have.
            exact: require exactly `n` rows; else at least `n` (rows
                `0..n-1` are referred to).

        Raises:
            ValueError: another number of rows than `n` (fewer, if not exact).
        """
        if rows is None:
            info = cls(list(range(n)))
        elif isinstance(rows, RowInfo):
            info = rows
        elif hasattr(rows, "row_info"):
            info = rows.row_info()
        else:
            info = cls(list(rows))
        if info.n < n or (exact and info.n != n):
            raise ValueError(
                f"The row information has {info.n} rows but the scores have "
                f"{'' if exact else 'at least '}{n}: pass the rows of the same data"
            )
        return info


class _Collate:
    """Select, collate, adapt: a picklable `collate_fn` for a DataLoader."""

    def __init__(
        self,
        collate_fn: Callable[[List[Any]], Any],
        adapter: BatchAdapter,
        columns: Optional[Sequence[str]],
    ):
        self.collate_fn = collate_fn
        self.adapter = adapter
        self.columns = None if columns is None else list(columns)

    def select(self, row: Any) -> Any:
        if self.columns is None or not isinstance(row, Mapping):
            return row
        return {k: row[k] for k in self.columns if k in row}

    def __call__(self, rows: List[Any]) -> Pair:
        batch = self.collate_fn([self.select(r) for r in rows])
        out = self.adapter(batch)
        if not (
            isinstance(out, (tuple, list))
            and len(out) == 2
            and all(isinstance(t, torch.Tensor) for t in out)
        ):
            raise TypeError(
                f"The batch adapter {self.adapter!r} returned a "
                f"{type(out).__name__}, not an (x, y) pair of tensors"
            )
        return out[0], out[1]


class DatasetBatches:
    """`(x, y)` batches of consecutive rows of a map-style dataset, in order.

    An iterable of `(x, y)` pairs, so it can be passed wherever the library
    takes a loader: to [fit][pydvl_datainf.influence.DataInfInfluence.fit], as
    the test data of [top_k][pydvl_datainf.scoring.reductions.top_k],
    [mean_test_influence][pydvl_datainf.scoring.reductions.mean_test_influence]
    and [influence_matrix][pydvl_datainf.scoring.matrix.influence_matrix], and
    to pyDVL's calculators. Every pass yields the same batches. `len()` is the
    number of batches, as for a DataLoader; `n_rows` the number of rows.

    Args:
        dataset: a map-style dataset: `len(dataset)` and `dataset[i]` for
            `i < len(dataset)` (a `datasets.Dataset`, a list, a torch Dataset).
        collate_fn: turns a list of rows into a batch (default torch's
            `default_collate`), e.g. `DataCollatorWithPadding(tokenizer)`.
        batch_size: rows per batch. Scores do not depend on it.
        adapter: turns a collated batch into `(x, y)`; default
            [pair_batch][pydvl_datainf.batches.pair_batch].
        columns: the fields of mapping rows passed to `collate_fn`; default
            the adapter's `columns` attribute if it has one, else all.
        ids: row ids for tables (see [IdSpec][pydvl_datainf.batches.IdSpec]).
        text: columns shown beside scores (see
            [TextSpec][pydvl_datainf.batches.TextSpec]).
        num_workers: worker processes of the underlying DataLoader.

    Example:
        ```python
        import torch
        from torch.utils.data import TensorDataset
        from pydvl_datainf.batches import DatasetBatches, row_hash

        data = DatasetBatches(TensorDataset(torch.randn(10, 3), torch.arange(10)),
                              batch_size=4)
        assert [len(x) for x, _ in data] == [4, 4, 2]

        rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
        hashed = DatasetBatches(rows, ids=row_hash, text="auto")
        info = hashed.row_info()
        assert info.ids[0] == row_hash(rows[0]) and info.columns == {"text": ["a", "b"]}
        ```
    """

    def __init__(
        self,
        dataset: Any,
        collate_fn: Optional[Callable[[List[Any]], Any]] = None,
        *,
        batch_size: int = 8,
        adapter: Optional[BatchAdapter] = None,
        columns: Optional[Sequence[str]] = None,
        ids: IdSpec = None,
        text: TextSpec = None,
        num_workers: int = 0,
    ):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"DatasetBatches needs a map-style dataset (len() and [i]), got a "
                f"{type(dataset).__name__}; pass a DataLoader directly instead"
            )
        if isinstance(dataset, DataLoader):
            raise TypeError(
                "Pass the DataLoader itself where a loader is expected; "
                "DatasetBatches is for map-style datasets"
            )
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = dataset
        self.collate_fn = default_collate if collate_fn is None else collate_fn
        self.batch_size = int(batch_size)
        self.adapter: BatchAdapter = pair_batch if adapter is None else adapter
        if columns is None:
            columns = getattr(self.adapter, "columns", None)
        self.columns = None if columns is None else list(columns)
        self.ids = ids
        self.text = text
        self.num_workers = int(num_workers)
        self._info: Optional[RowInfo] = None

    @property
    def n_rows(self) -> int:
        """Number of rows of the dataset."""
        return len(self.dataset)

    def __len__(self) -> int:
        """Number of batches."""
        return -(-self.n_rows // self.batch_size)

    def loader(self) -> DataLoader:
        """A sequential torch DataLoader yielding the same `(x, y)` batches."""
        return DataLoader(
            self.dataset,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=_Collate(self.collate_fn, self.adapter, self.columns),
            num_workers=self.num_workers,
        )

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.loader())

    # ---------------------------------------------------------------- rows
    def _column(self, name: str) -> List[Any]:
        names = getattr(self.dataset, "column_names", None)
        if isinstance(names, (list, tuple)) and name in names:
            return list(self.dataset[name])  # one read of a columnar dataset
        values = []
        for i in range(self.n_rows):
            row = self.dataset[i]
            if not isinstance(row, Mapping) or name not in row:
                raise KeyError(
                    f"Row {i} of the dataset has no column {name!r}"
                    + (
                        f"; its columns are {list(row)}"
                        if isinstance(row, Mapping)
                        else ""
                    )
                )
            values.append(row[name])
        return values

    def _text_columns(self) -> List[str]:
        if self.text is None:
            return []
        if isinstance(self.text, str) and self.text != "auto":
            return [self.text]
        if isinstance(self.text, str):  # "auto"
            if self.n_rows == 0:
                return []
            first = self.dataset[0]
            if not isinstance(first, Mapping):
                return []
            return [k for k, v in first.items() if isinstance(v, str)]
        return list(self.text)

    def _ids(self) -> List[Any]:
        spec = self.ids
        n = self.n_rows
        if spec is None:
            return list(range(n))
        if isinstance(spec, str):
            return self._column(spec)
        if callable(spec):
            return [spec(self.dataset[i]) for i in range(n)]
        ids = list(spec)
        if len(ids) != n:
            raise ValueError(f"{len(ids)} ids were given for {n} rows")
        return ids

    def row_info(self) -> RowInfo:
        """The id of every row and the text columns (read once, then kept)."""
        if self._info is None:
            self._info = RowInfo(
                self._ids(), {c: self._column(c) for c in self._text_columns()}
            )
        return self._info

    def __repr__(self) -> str:
        return (
            f"DatasetBatches({type(self.dataset).__name__} of {self.n_rows} rows, "
            f"batch_size={self.batch_size}, adapter={self.adapter!r})"
        )
