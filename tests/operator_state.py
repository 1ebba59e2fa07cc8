"""Build a fitted state for operator tests from per-sample gradients."""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

import torch

from pydvl_datainf.blocks import Block, BlockStructure
from pydvl_datainf.formula import squared_norms
from pydvl_datainf.storage import GradientStore, MemoryGradientStore


def make_state(
    grads: Mapping[str, torch.Tensor],
    lams: Mapping[str, float],
    store: Optional[GradientStore] = None,
):
    """A FittedState over `grads` with the given lambdas (kept in a store)."""
    from pydvl_datainf.state import FittedState

    if store is None:
        store = MemoryGradientStore(list(grads))
        store.append(dict(grads))
        store.finalize()
    blocks = BlockStructure(
        [Block(k, (k,), ((int(v.shape[1]),),)) for k, v in grads.items()]
    )
    return FittedState(
        blocks=blocks,
        n=len(next(iter(grads.values()))),
        squared_norms=OrderedDict((k, squared_norms(v)) for k, v in grads.items()),
        regularization=OrderedDict((k, float(lams[k])) for k in grads),
        store=store,
        fingerprint="",
    )
