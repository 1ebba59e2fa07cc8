"""DataInf over datasets: rows in, tables out.

[DatasetInfluence][pydvl_datainf.dataset_influence.DatasetInfluence] pairs a
[DataInfInfluence][pydvl_datainf.influence.DataInfInfluence] with the way a
dataset becomes batches (a collate function, the model's batch adapter, the
row ids and the text columns). `fit` and every query take map-style datasets
(e.g. tokenized `datasets.Dataset`s) and return pandas tables with the row id,
the score and the text, ranked. It is what
[fit_from_trainer][pydvl_datainf.trainer.fit_from_trainer] and the command
line return and use.

Scores follow pyDVL's sign: positive means the training row helps (lowers the
test loss when up-weighted); the DataInf paper's influence is the negative.

Example:
    ```python
    import torch
    from pydvl_datainf import DataInfInfluence
    from pydvl_datainf.dataset_influence import DatasetInfluence

    torch.manual_seed(0)
    rows = [{"x": torch.randn(3).tolist(), "y": i % 2, "text": f"example {i}"}
            for i in range(12)]

    def collate(batch):
        return (torch.tensor([r["x"] for r in batch]),
                torch.tensor([r["y"] for r in batch]))

    model = torch.nn.Linear(3, 2)
    infl = DataInfInfluence(model, torch.nn.functional.cross_entropy, progress=False)
    data = DatasetInfluence(infl, collate, text="text").fit(rows[:10])
    table = data.top_k(rows[10:], k=3)     # the 3 most helpful rows per test row
    assert list(table.columns) == ["test_row", "test_id", "rank", "train_row",
                                   "train_id", "score", "train_text", "test_text"]
    ranked = data.self_influence()         # every training row, largest first
    assert ranked["text"].iloc[0] == f"example {ranked['row'].iloc[0]}"
    ```
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from .batches import (
    BatchAdapter,
    DatasetBatches,
    IdSpec,
    TextSpec,
    adapter_for,
)
from .errors import StoreMismatchError
from .gradients import LossFn
from .influence import DataInfInfluence
from .rows import row_digests
from .scoring import (
    MatrixResult,
    influence_matrix,
    mean_test_influence,
    self_influence,
    top_k,
)
from .scoring.frames import scores_frame
from .storage import ZarrGradientStore

__all__ = ["DatasetInfluence", "ROWS_KEY"]

logger = logging.getLogger(__name__)

ROWS_KEY = "rows"
"""The key of the fit metadata under which the batching of the training rows
is recorded (their number, the batch size, the id and text columns)."""


class DatasetInfluence:
    """A DataInf model whose data are map-style datasets and whose results are
    tables.

    Args:
        influence: the (unfitted or fitted) DataInf model.
        collate_fn: turns a list of dataset rows into a batch, e.g. a Hugging
            Face data collator; default torch's `default_collate`.
        batch_size: rows per batch (scores do not depend on it).
        adapter: turns a collated batch into `(x, y)`; default the model's
            `batch_adapter` (see
            [adapter_for][pydvl_datainf.batches.adapter_for]).
        columns: the fields of mapping rows passed to `collate_fn`; default
            the adapter's.
        ids: how rows are identified in tables: `None` (dataset index), a
            column name, or a function of the row such as
            [row_hash][pydvl_datainf.batches.row_hash].
        text: columns shown beside the scores; `"auto"` (default) shows every
            column holding strings.
        test: the default test dataset of the queries (e.g. the evaluation
            set of a trainer).

    Attributes:
        influence: the DataInf model.
        train: the training batches after `fit` (`None` before).
    """

    def __init__(
        self,
        influence: DataInfInfluence,
        collate_fn: Optional[Callable[[List[Any]], Any]] = None,
        *,
        batch_size: int = 8,
        adapter: Optional[BatchAdapter] = None,
        columns: Optional[Sequence[str]] = None,
        ids: IdSpec = None,
        text: TextSpec = "auto",
        test: Any = None,
    ):
        self.influence = influence
        self.collate_fn = collate_fn
        self.batch_size = int(batch_size)
        self.adapter = adapter_for(influence.model) if adapter is None else adapter
        self.columns = None if columns is None else list(columns)
        self.ids = ids
        self.text = text
        self.test = test
        self.train: Optional[DatasetBatches] = None

    @property
    def progress(self) -> bool:
        """Whether progress bars show (the DataInf model's setting)."""
        return bool(self.influence.progress)

    def batches(self, dataset: Any) -> DatasetBatches:
        """`dataset` as batches, collated and described like the training data.

        Args:
            dataset: a map-style dataset, or `DatasetBatches` (returned as is).
        """
        if isinstance(dataset, DatasetBatches):
            return dataset
        return DatasetBatches(
            dataset,
            self.collate_fn,
            batch_size=self.batch_size,
            adapter=self.adapter,
            columns=self.columns,
            ids=self.ids,
            text=self.text,
        )

    def _rows_metadata(self, train: DatasetBatches) -> Dict[str, Any]:
        return {
            "n": train.n_rows,
            "batch_size": train.batch_size,
            "ids": self.ids if isinstance(self.ids, str) else None,
            "text": self.text,
        }

    def fit(
        self, dataset: Any, *, metadata: Optional[Mapping[str, Any]] = None
    ) -> DatasetInfluence:
        """Fit on every row of `dataset`, in order: row `i` is dataset row `i`.

        Args:
            dataset: a map-style dataset (or `DatasetBatches`).
            metadata: JSON facts to record with the fit (and in a Zarr store),
                beside the batching of the rows (under
                [ROWS_KEY][pydvl_datainf.dataset_influence.ROWS_KEY]).

        Returns:
            This object, fitted.
        """
        train = self.batches(dataset)
        recorded = dict(metadata or {})
        recorded.setdefault(ROWS_KEY, self._rows_metadata(train))
        self.influence.fit(train, metadata=recorded)
        self.train = train
        return self

    def _train(self) -> DatasetBatches:
        """The training batches; raises before `fit`."""
        if self.train is None:
            raise RuntimeError(
                "Fit first (fit(dataset)), or reopen a store with from_store"
            )
        return self.train

    def _test(self, test: Any) -> DatasetBatches:
        test = self.test if test is None else test
        if test is None:
            raise ValueError("Pass a test dataset (no default test set was given)")
        return self.batches(test)

    # ------------------------------------------------------------ queries
    def self_influence(
        self, *, top: Optional[int] = None, **options: Any
    ) -> pd.DataFrame:
        """Self-influence of every training row, largest first.

        Large self-influence marks rows the model finds unusual: outliers,
        mislabeled or memorised examples.

        Args:
            top: keep the first `top` rows of the ranking.
            **options: passed to
                [self_influence][pydvl_datainf.scoring.reductions.self_influence].

        Returns:
            Columns `rank`, `row`, `id`, `score`, then the text columns.
        """
        train = self._train()
        options.setdefault("progress", self.progress)
        scores = self_influence(self.influence, **options)
        return scores_frame(scores, train, top=top)

    def mean_test_influence(
        self,
        test: Any = None,
        *,
        ascending: bool = False,
        top: Optional[int] = None,
        **options: Any,
    ) -> pd.DataFrame:
        """Influence of every training row on the mean test loss, ranked.

        Args:
            test: the test dataset; default the one given at construction.
            ascending: most harmful first (the most negative scores; the
                paper's mislabel ranking); default most helpful first.
            top: keep the first `top` rows of the ranking.
            **options: passed to
                [mean_test_influence][pydvl_datainf.scoring.reductions.mean_test_influence].

        Returns:
            Columns `rank`, `row`, `id`, `score`, then the text columns.
        """
        train = self._train()
        options.setdefault("progress", self.progress)
        scores = mean_test_influence(self.influence, self._test(test), **options)
        return scores_frame(scores, train, ascending=ascending, top=top)

    def top_k(
        self,
        test: Any = None,
        k: int = 10,
        *,
        largest: bool = True,
        **options: Any,
    ) -> pd.DataFrame:
        """The `k` most helpful (or harmful) training rows of every test row.

        Args:
            test: the test dataset; default the one given at construction.
            k: training rows per test row.
            largest: most helpful; `False` for the most harmful.
            **options: passed to [top_k][pydvl_datainf.scoring.reductions.top_k].

        Returns:
            One row per test row and rank (see
            [top_k_frame][pydvl_datainf.scoring.frames.top_k_frame]).
        """
        train = self._train()
        options.setdefault("progress", self.progress)
        batches = self._test(test)
        result = top_k(self.influence, k, batches, largest=largest, **options)
        return result.to_frame(train, batches)

    def matrix(
        self, test: Any, path: Union[str, os.PathLike], **options: Any
    ) -> MatrixResult:
        """The whole influence matrix of `test` on the training rows, in Zarr.

        Args:
            test: the test dataset.
            path: where to write it.
            **options: passed to
                [influence_matrix][pydvl_datainf.scoring.matrix.influence_matrix]
                (`resume`, `overwrite`, ...).
        """
        options.setdefault("progress", self.progress)
        return influence_matrix(self.influence, self._test(test), path, **options)

    # ------------------------------------------------------------- stores
    def check_rows(self) -> None:
        """Check that the training batches are the rows that were fitted.

        Compares each row's content digest with the one recorded at fit
        (stores keep them). A store without the digests is accepted with a
        warning.

        Raises:
            StoreMismatchError: another number of rows, or a row whose
                content differs (naming the first).
        """
        train = self._train()
        state = self.influence.state
        if train.n_rows != state.n:
            raise StoreMismatchError(
                f"The training dataset has {train.n_rows} rows but {state.n} were "
                f"fitted: pass the dataset that was fitted"
            )
        if state.rows is None:
            logger.warning("No row digests were recorded: the rows are not checked")
            return
        fitted = state.rows.digests()
        offset = 0
        for x, y in tqdm(
            train,
            total=len(train),
            desc="DataInf check rows",
            disable=not self.progress,
        ):
            got = row_digests(x, y)
            for i, d in enumerate(got):
                if bytes(fitted[offset + i]) != d:
                    raise StoreMismatchError(
                        f"Training row {offset + i} differs from the row that was "
                        f"fitted (its tokens or labels changed, or the rows moved). "
                        f"Pass the dataset, tokenization and collator of the fit, "
                        f"or fit again."
                    )
            offset += len(got)

    @classmethod
    def from_store(
        cls,
        model: nn.Module,
        loss: LossFn,
        store: Union[str, os.PathLike, ZarrGradientStore],
        dataset: Any,
        collate_fn: Optional[Callable[[List[Any]], Any]] = None,
        *,
        check: bool = True,
        adapter: Optional[BatchAdapter] = None,
        columns: Optional[Sequence[str]] = None,
        ids: IdSpec = None,
        text: TextSpec = None,
        test: Any = None,
        **options: Any,
    ) -> DatasetInfluence:
        """Reopen a fit saved in a Zarr store, with its training dataset.

        The batch size, id column and text columns recorded at fit are used
        unless given. With `check`, every training row is compared with the
        fitted one (see
        [check_rows][pydvl_datainf.dataset_influence.DatasetInfluence.check_rows]).

        Args:
            model: the model with the fitted weights (wrapped as at fit).
            loss: the loss of the fit.
            store: the store's path, or an open store.
            dataset: the training dataset of the fit.
            collate_fn: as at fit.
            check: check the rows against the store.
            adapter: as in the constructor.
            columns: as in the constructor.
            ids: as in the constructor; default the recorded id column.
            text: as in the constructor; default the recorded columns.
            test: the default test dataset of the queries.
            **options: passed to
                [DataInfInfluence.from_store][pydvl_datainf.influence.DataInfInfluence.from_store].

        Raises:
            StoreMismatchError: another model, loss or dataset than at fit.
        """
        infl = DataInfInfluence.from_store(model, loss, store, **options)
        rows = dict(infl.metadata.get(ROWS_KEY) or {})
        self = cls(
            infl,
            collate_fn,
            batch_size=int(rows.get("batch_size") or 8),
            adapter=adapter,
            columns=columns,
            ids=rows.get("ids") if ids is None else ids,
            text=rows.get("text") if text is None else text,
            test=test,
        )
        self.train = self.batches(dataset)
        if check:
            self.check_rows()
        return self

    def __repr__(self) -> str:
        n = "unfitted" if self.train is None else f"{self.train.n_rows} training rows"
        return f"DatasetInfluence({n}, batch_size={self.batch_size})"
