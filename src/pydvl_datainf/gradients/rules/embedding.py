"""Rule for `nn.Embedding`."""

from __future__ import annotations

from typing import (
    Any,
    Collection,
    Dict,
    Mapping,
    Optional,
    Sequence,
    cast,
)

import torch
from torch import nn

from .registry import (
    batched_input,
    out_buffer,
    register_rule,
    to_accumulation,
    wanted,
)

__all__ = ["embedding_rule"]


@register_rule(nn.Embedding)
def embedding_rule(
    module: nn.Module,
    inputs: Sequence[Any],
    grad_output: torch.Tensor,
    names: Optional[Collection[str]] = None,
    out: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    r"""Per-sample gradients of `nn.Embedding` for indices `(B, ...)`.

    Row $v$ of $\nabla_E \ell_i$ is the sum of the output gradients at the
    positions of sample $i$ whose index is $v$; the row of `padding_idx` is
    zero. With `scale_grad_by_freq`, each row is divided by the number of
    occurrences of its index *in the sample*, as for a batch of one.

    The result has shape `(B, num_embeddings, embedding_dim)`: mind the memory
    for large vocabularies.
    """
    todo = wanted(module, names)
    if "weight" not in todo:
        return {}
    module = cast(nn.Embedding, module)
    weight = module.weight
    idx = batched_input(inputs[0])
    b = idx.shape[0]
    n_emb, dim = weight.shape
    idx = idx.reshape(b, -1).long()
    g = to_accumulation(grad_output, weight).reshape(b, -1, dim)
    if module.padding_idx is not None:
        g = g.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0.0)
    flat = (idx + n_emb * torch.arange(b, device=idx.device).unsqueeze(1)).reshape(-1)
    gw = out_buffer(out, "weight")
    if gw is None:
        gw = torch.zeros(b, n_emb, dim, dtype=g.dtype, device=g.device)
    else:
        gw.zero_()
    gw.view(b * n_emb, dim).index_add_(0, flat, g.reshape(-1, dim))
    if module.scale_grad_by_freq:
        counts = torch.zeros(b * n_emb, dtype=g.dtype, device=g.device)
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=g.dtype))
        gw.div_(counts.reshape(b, n_emb, 1).clamp_min(1.0))
    return {"weight": gw}
