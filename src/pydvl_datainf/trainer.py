"""DataInf after a Hugging Face `Trainer` (or TRL's `SFTTrainer`) has trained.

[fit_from_trainer][pydvl_datainf.trainer.fit_from_trainer] fits DataInf with
what the trainer used: its model (with the trained adapters), its data
collator, its device and its training dataset, and with the loss on exactly
the tokens the trainer trained on (the collator's labels, where `-100` marks
padding and, in completion-only training, the prompt). It returns a
[DatasetInfluence][pydvl_datainf.dataset_influence.DatasetInfluence], whose
queries give ranked tables of training rows with their text. Three lines
in a training script: the import, `influence = fit_from_trainer(trainer)`
after `trainer.train()`, and a query such as `influence.top_k(k=5)` (the
most helpful training rows of every row of the trainer's evaluation set).

[DataInfCallback][pydvl_datainf.trainer.DataInfCallback] does the same at the
end of `trainer.train()`.

**Per-sample loss.** The loss of a training row is the mean token
cross-entropy over that row's target tokens (the trainer averages over the
tokens of a batch; the tokens are the same). Classifiers get the loss of
their `problem_type`.

**Several processes (DDP).** The fit runs once, on the main process (rank 0),
with the unwrapped model on that process's device; the other processes get
`None`. All processes then wait for it (`accelerator.wait_for_everyone()`),
so raise `ddp_timeout` in the training arguments if the fit takes longer than
its default 30 minutes. With FSDP or DeepSpeed ZeRO-3 no process holds the
whole model: save the adapter and run the command line (`pydvl-datainf fit`)
on one device.

**Not supported.** Packed or padding-free batches (several examples in one
row have no per-example loss) and iterable datasets (rows need indices).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from transformers import TrainerCallback

from .batches import IdSpec, TextSpec
from .dataset_influence import DatasetInfluence
from .hf import wrap_model
from .influence import DataInfInfluence

__all__ = ["fit_from_trainer", "DataInfCallback"]

logger = logging.getLogger(__name__)


def _check_trainer(trainer: Any) -> None:
    args = trainer.args
    if getattr(args, "packing", False):
        raise ValueError(
            "The trainer packs several examples into one row (packing=True): "
            "per-example influences need one example per row. Train with "
            "packing=False."
        )
    if getattr(args, "padding_free", False):
        raise ValueError(
            "The trainer uses padding-free batches (padding_free=True): "
            "per-example influences need one example per row."
        )
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(
        trainer, "is_deepspeed_enabled", False
    ):
        raise ValueError(
            "With FSDP or DeepSpeed no single process holds the whole model: save "
            "the model (trainer.save_model) and run `pydvl-datainf fit` on it."
        )
    data = trainer.train_dataset
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(
            f"The trainer's training dataset is a {type(data).__name__}, not a "
            f"map-style dataset: DataInf needs the index of every row"
        )


def _eval_dataset(trainer: Any) -> Any:
    data = getattr(trainer, "eval_dataset", None)
    if isinstance(data, Mapping):
        return next(iter(data.values())) if len(data) == 1 else None
    return data


def fit_from_trainer(
    trainer: Any,
    *,
    task: Optional[str] = None,
    ids: IdSpec = None,
    text: TextSpec = "auto",
    batch_size: Optional[int] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    progress: Optional[bool] = None,
    **options: Any,
) -> Optional[DatasetInfluence]:
    """Fit DataInf on a trainer's training dataset after training.

    Args:
        trainer: a `transformers.Trainer` (or a subclass, such as TRL's
            `SFTTrainer`) that has trained.
        task: `"causal-lm"` or `"sequence-classification"`; default from the
            model's class (see [infer_task][pydvl_datainf.hf.infer_task]).
        ids: how rows are identified in tables: `None` (the index in the
            trainer's training dataset), an id column, or a function of the
            row such as [row_hash][pydvl_datainf.batches.row_hash].
        text: columns shown beside the scores; `"auto"` shows every column
            holding strings (e.g. `prompt` and `completion`).
        batch_size: rows per batch; default the trainer's per-device
            evaluation batch size (scores do not depend on it).
        metadata: JSON facts to record with the fit.
        progress: show progress bars; default unless the trainer's
            `disable_tqdm`.
        **options: passed to
            [DataInfInfluence][pydvl_datainf.influence.DataInfInfluence]
            (`store`, `store_path`, `block_structure`, `regularization`, ...).

    Returns:
        On the main process, a fitted
        [DatasetInfluence][pydvl_datainf.dataset_influence.DatasetInfluence]
        whose default test set is the trainer's evaluation dataset; `None` on
        the other processes.

    Raises:
        ValueError: packed or padding-free batches, FSDP or DeepSpeed, or a
            model of unknown task.
        TypeError: an iterable (not map-style) training dataset.

    Example:
        ```python
        import tempfile
        import torch
        from datasets import Dataset
        from transformers import (DataCollatorWithPadding, PreTrainedTokenizerFast,
                                  BertConfig, BertForSequenceClassification,
                                  Trainer, TrainingArguments)
        from tokenizers import Tokenizer, models, pre_tokenizers
        from pydvl_datainf.trainer import fit_from_trainer

        words = ["[PAD]", "[UNK]", "good", "bad", "film", "very", "plot"]
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]")
        texts = ["good film", "bad plot", "very good", "very bad film", "good plot"]
        data = Dataset.from_dict({"text": texts, "label": [1, 0, 1, 0, 1]})
        data = data.map(lambda r: tokenizer(r["text"]))
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=len(words), hidden_size=8, num_hidden_layers=1,
            num_attention_heads=1, intermediate_size=16, num_labels=2))
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(out, max_steps=2, report_to=[], disable_tqdm=True,
                                     use_cpu=True, per_device_train_batch_size=5)
            trainer = Trainer(model, args, train_dataset=data,
                              data_collator=DataCollatorWithPadding(tokenizer))
            trainer.train()
        influence = fit_from_trainer(trainer, block_structure="parameter")
        ranked = influence.self_influence()
        assert sorted(ranked["text"]) == sorted(texts)
        ```
    """
    if not trainer.is_world_process_zero():
        logger.info("DataInf fits on the main process only; this one waits")
        trainer.accelerator.wait_for_everyone()
        return None
    _check_trainer(trainer)
    wrapped, loss = wrap_model(trainer.model, task)
    if progress is None:
        progress = not bool(getattr(trainer.args, "disable_tqdm", False))
    infl = DataInfInfluence(wrapped, loss, progress=progress, **options)
    result = DatasetInfluence(
        infl,
        trainer.data_collator,
        batch_size=batch_size or int(trainer.args.per_device_eval_batch_size),
        ids=ids,
        text=text,
        test=_eval_dataset(trainer),
    )
    logger.info(
        "Fitting DataInf on %d training rows of the trainer", len(trainer.train_dataset)
    )
    try:
        result.fit(trainer.train_dataset, metadata=metadata)
    finally:
        trainer.accelerator.wait_for_everyone()
    return result


class DataInfCallback(TrainerCallback):
    """A `TrainerCallback` that fits DataInf when training ends.

    Attach it to a trainer with
    [attach][pydvl_datainf.trainer.DataInfCallback.attach]; after
    `trainer.train()`, `result` holds what
    [fit_from_trainer][pydvl_datainf.trainer.fit_from_trainer] returns.

    Args:
        trainer: the trainer it belongs to (set by `attach`).
        **options: passed to `fit_from_trainer`.

    Attributes:
        result: the fitted
            [DatasetInfluence][pydvl_datainf.dataset_influence.DatasetInfluence]
            after training (`None` before, and on other processes than the
            main one).
    """

    def __init__(self, trainer: Any = None, **options: Any):
        self.trainer = trainer
        self.options = options
        self.result: Optional[DatasetInfluence] = None

    @classmethod
    def attach(cls, trainer: Any, **options: Any) -> DataInfCallback:
        """A callback for `trainer`, added to its callbacks.

        Example:
            `datainf = DataInfCallback.attach(trainer, store="zarr",
            store_path="grads.zarr")`, then `trainer.train()` and
            `datainf.result.self_influence()`.
        """
        callback = cls(trainer, **options)
        trainer.add_callback(callback)
        return callback

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Fit DataInf with the trainer (see `fit_from_trainer`)."""
        if self.trainer is None:
            raise RuntimeError(
                "DataInfCallback needs its trainer: add it with "
                "DataInfCallback.attach(trainer)"
            )
        self.result = fit_from_trainer(self.trainer, **self.options)
