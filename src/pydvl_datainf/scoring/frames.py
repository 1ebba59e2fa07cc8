"""Scores as tables: one row per training row (or per test and training pair),
with the row's id, its score and, when known, its text.

[scores_frame][pydvl_datainf.scoring.frames.scores_frame] ranks a vector of
scores over training rows (self-influence, influence on the mean test loss);
[top_k_frame][pydvl_datainf.scoring.frames.top_k_frame] lays out a
[TopK][pydvl_datainf.scoring.reductions.TopK] result, also available as
`TopK.to_frame`. Row ids and text come from a
[RowInfo][pydvl_datainf.batches.RowInfo] or anything with a `row_info()`
method, such as [DatasetBatches][pydvl_datainf.batches.DatasetBatches].
Tables are pandas DataFrames; [to_arrow][pydvl_datainf.scoring.frames.to_arrow]
converts one to an Arrow table.

Scores follow pyDVL's sign: positive means the training row helps (lowers the
test loss when up-weighted). The DataInf paper's influence is the negative.

Example:
    ```python
    import torch
    from pydvl_datainf.batches import RowInfo
    from pydvl_datainf.scoring.frames import scores_frame

    rows = RowInfo(ids=["a", "b", "c"], columns={"text": ["x", "y", "z"]})
    table = scores_frame(torch.tensor([0.5, 2.0, -1.0]), rows)
    assert table["id"].tolist() == ["b", "a", "c"]  # most helpful first
    assert list(table.columns) == ["rank", "row", "id", "score", "text"]
    ```
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Union

import numpy as np
import pandas as pd
import torch

from ..batches import RowInfo

__all__ = ["scores_frame", "top_k_frame", "to_arrow"]


class _Ranked(Protocol):
    """What a top-k result has (see `TopK`)."""

    values: torch.Tensor
    indices: torch.Tensor


def _numpy(t: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def scores_frame(
    scores: Union[torch.Tensor, np.ndarray],
    rows: Any = None,
    *,
    ascending: bool = False,
    top: Optional[int] = None,
    score_name: str = "score",
) -> pd.DataFrame:
    """One score per training row as a ranked table.

    Args:
        scores: `(n,)` scores, row `i` for training row `i`.
        rows: who the rows are (see
            [RowInfo.of][pydvl_datainf.batches.RowInfo.of]); default ids
            `0..n-1`.
        ascending: rank the smallest first (e.g. the most harmful rows by
            influence on the mean test loss); default the largest first.
        top: keep only the first `top` rows of the ranking.
        score_name: the name of the score column.

    Returns:
        Columns `rank` (1 first), `row` (position in the fitted data), `id`,
        the score, then the row's columns (e.g. `text`). Ties keep row order.

    Raises:
        ValueError: `scores` not one-dimensional, or rows of another length.
    """
    values = _numpy(scores)
    if values.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {values.shape}")
    info = RowInfo.of(rows, len(values))
    key = values if ascending else -values
    order = np.argsort(key, kind="stable")
    if top is not None:
        order = order[: max(0, int(top))]
    picked = info.take(order.tolist())
    frame = pd.DataFrame(
        {
            "rank": np.arange(1, len(order) + 1),
            "row": order,
            "id": picked.ids,
            score_name: values[order],
        }
    )
    for name, col in picked.columns.items():
        frame[name if name not in frame.columns else f"row_{name}"] = col
    return frame


def top_k_frame(topk: _Ranked, train: Any = None, test: Any = None) -> pd.DataFrame:
    """A [TopK][pydvl_datainf.scoring.reductions.TopK] result as a long table.

    Args:
        topk: the result of [top_k][pydvl_datainf.scoring.reductions.top_k].
        train: who the training rows are (a `RowInfo`, `DatasetBatches`, ids,
            or `None` for positions). Its columns appear as `train_<name>`.
        test: who the test rows are, likewise; columns as `test_<name>`.

    Returns:
        One row per test row and rank: `test_row`, `test_id`, `rank` (1 the
        first of the test row's list), `train_row`, `train_id`, `score`, then
        the training and test columns.

    Example:
        ```python
        import torch
        from pydvl_datainf.scoring.frames import top_k_frame
        from pydvl_datainf.scoring.reductions import TopK

        best = TopK(values=torch.tensor([[3.0, 2.0], [5.0, 1.0]]),
                    indices=torch.tensor([[7, 1], [0, 7]]))
        table = top_k_frame(best, train=[f"t{i}" for i in range(8)])
        assert table["train_id"].tolist() == ["t7", "t1", "t0", "t7"]
        assert table["rank"].tolist() == [1, 2, 1, 2]
        ```
    """
    values, indices = _numpy(topk.values), topk.indices.detach().to("cpu").numpy()
    n_test, k = indices.shape
    n_train = int(indices.max()) + 1 if indices.size else 0
    train_info = RowInfo.of(train, n_train, exact=False)
    test_info = RowInfo.of(test, n_test)
    flat = indices.reshape(-1).astype(np.int64)
    test_rows = np.repeat(np.arange(n_test), k)
    picked_train = train_info.take(flat.tolist())
    picked_test = test_info.take(test_rows.tolist())
    frame = pd.DataFrame(
        {
            "test_row": test_rows,
            "test_id": picked_test.ids,
            "rank": np.tile(np.arange(1, k + 1), n_test),
            "train_row": flat,
            "train_id": picked_train.ids,
            "score": values.reshape(-1),
        }
    )
    for name, col in picked_train.columns.items():
        frame[f"train_{name}"] = col
    for name, col in picked_test.columns.items():
        frame[f"test_{name}"] = col
    return frame


def to_arrow(frame: pd.DataFrame) -> Any:
    """A table as a `pyarrow.Table` (needs `pyarrow`, which `datasets` brings).

    Example:
        >>> import pandas as pd
        >>> to_arrow(pd.DataFrame({"id": [1, 2], "score": [0.5, 0.1]})).num_rows
        2
    """
    try:
        import pyarrow as pa
    except ImportError as e:  # pragma: no cover - pyarrow comes with datasets
        raise ImportError("to_arrow needs pyarrow: pip install pyarrow") from e
    return pa.Table.from_pandas(frame, preserve_index=False)
