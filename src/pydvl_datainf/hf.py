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

import logging
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IGNORE_INDEX",
    "CausalLMWrapper",
    "SequenceClassifierWrapper",
    "causal_lm_labels",
    "causal_lm_loss",
    "pack_inputs",
    "unpack_inputs",
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `(B, num_labels)` from packed inputs `(B, 2, L)`."""
        input_ids, attention_mask = unpack_inputs(x)
        return _logits(self.model(input_ids=input_ids, attention_mask=attention_mask))


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `(B, L, vocab)` from packed inputs `(B, 2, L)`."""
        input_ids, attention_mask = unpack_inputs(x)
        kwargs = {}
        if self.position_ids_from_mask:
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
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
