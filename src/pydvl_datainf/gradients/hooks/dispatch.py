"""Turning one captured call into per-sample gradients: rule or module-local."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Set, Union, cast

import torch

from ...compressed import token_squared_norms
from ...factored import FactoredGrads, Rows
from ...projection import ProjectedGrads, Projection
from ..engine import accumulation_dtype
from ..rules import accepts_out, get_factor_rule, get_token_factor_rule
from .capture import Call
from .local import local_per_sample_grads
from .plan import HookedModule
from .trace import use_grads

__all__ = ["Accumulator", "Result", "call_problem", "dispatch", "dispatch_traced"]

logger = logging.getLogger(__name__)

Result = Union[Rows, ProjectedGrads]
"""One parameter's per-sample gradients: dense, factored, or projected."""


class Accumulator:
    """Per-sample gradients of a batch, summed over the calls of each module.

    Args:
        params: the requested parameters by name.
        batch: the batch size.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], batch: int):
        self.params = params
        self.batch = batch
        self.result: Dict[str, Result] = {}
        self.written: Set[str] = set()

    def buffer(self, name: str) -> torch.Tensor:
        """The `(batch, numel)` output of `name`, allocated on first use."""
        if name not in self.result:
            p = self.params[name]
            self.result[name] = torch.empty(
                self.batch,
                p.numel(),
                dtype=accumulation_dtype(p.dtype),
                device=p.device,
            )
        return cast(torch.Tensor, self.result[name])

    def views(self, names: Mapping[str, str]) -> Dict[str, torch.Tensor]:
        """Preallocated `(batch, *shape)` outputs by local name, for rules, of
        the parameters not yet written (later calls add to them)."""
        return {
            local: self.buffer(name).view(self.batch, *self.params[name].shape)
            for local, name in names.items()
            if name not in self.written
        }

    def add(self, name: str, value: torch.Tensor) -> None:
        """Adds one call's per-sample gradients of `name`."""
        value = value.reshape(self.batch, -1)
        dst = self.buffer(name)
        if name in self.written:
            dst.add_(value)
        else:
            if value.data_ptr() != dst.data_ptr():
                dst.copy_(value)  # the rule did not use `out`
            self.written.add(name)

    def factored(self, name: str, left: torch.Tensor, right: torch.Tensor) -> None:
        """Stores the rank-one factors of `name` (a weight used by one call)."""
        self.result[name] = FactoredGrads(left.detach(), right.detach())
        self.written.add(name)

    def projected(self, name: str, value: ProjectedGrads) -> None:
        """Stores the projected gradients of `name` (a weight used by one call)."""
        self.result[name] = value
        self.written.add(name)

    def finish(self, names: Any, failed: Mapping[str, str]) -> Dict[str, Result]:
        """The gradients of `names`: zero where no gradient reached, none for
        the `failed` ones."""
        for name in names:
            if name in failed:
                self.result.pop(name, None)
            elif name not in self.written:  # never called, or no gradient
                self.buffer(name).zero_()
        return self.result


def call_problem(
    h: HookedModule, call: Call, g: torch.Tensor, batch: int
) -> Optional[str]:
    """Why this call cannot be split by sample, or `None`."""
    if call.modified():
        return f"the input of {h.label} was modified in place after the call"
    if g.dim() == 0 or g.shape[0] != batch:
        return f"{h.label} does not see the batch in dimension 0"
    if h.rule is not None:
        a = call.inputs[0] if call.inputs else None
        if not isinstance(a, torch.Tensor) or a.dim() == 0 or a.shape[0] != batch:
            return f"{h.label} does not see the batch in dimension 0"
    return None


def _try_rule(
    rule: Any, what: str, h: HookedModule, call: Call, g: torch.Tensor
) -> Optional[Any]:
    """`rule(module, inputs, g)`, or `None` if it fails (the next rule decides)."""
    try:
        return rule(h.module, call.inputs, g)
    except Exception as e:  # noqa: BLE001 - the next rule decides
        logger.debug("%s rule for %s failed (%s)", what, h.name, e)
        return None


def _project(
    h: HookedModule,
    call: Call,
    g: torch.Tensor,
    acc: Accumulator,
    todo: Dict[str, str],
    projections: Mapping[str, Projection],
) -> Dict[str, str]:
    """Projects the weight from its per-token factors when its projection is
    a Kronecker product of its shape; returns the names left to do."""
    projection = projections.get(todo.get("weight", ""))
    rule = get_token_factor_rule(type(h.module))
    if projection is None or rule is None or projection.spec.kind != "kronecker":
        return todo
    factors = _try_rule(rule, "token factor", h, call, g)
    if factors is None:
        return todo
    left, right = factors
    if projection.spec.shape != (left.shape[2], right.shape[2]):
        return todo
    rows = projection.apply_tokens(left, right)
    norms = token_squared_norms(left, right)
    todo = dict(todo)
    acc.projected(todo.pop("weight"), ProjectedGrads(rows, norms))
    return todo


def _factor(
    h: HookedModule,
    call: Call,
    g: torch.Tensor,
    acc: Accumulator,
    todo: Dict[str, str],
) -> Dict[str, str]:
    """Tries the factor rule for the weight; returns the names left to do."""
    todo = dict(todo)
    rule = get_factor_rule(type(h.module))
    if rule is None or "weight" not in todo:
        return todo
    factors = _try_rule(rule, "factor", h, call, g)
    if factors is not None:
        acc.factored(todo.pop("weight"), *factors)
    return todo


def dispatch(
    h: HookedModule,
    call: Call,
    g: torch.Tensor,
    acc: Accumulator,
    factored: bool,
    uses: Mapping[str, int],
    projections: Optional[Mapping[str, Projection]] = None,
) -> None:
    """Adds the per-sample gradients of one call of `h` to `acc`.

    Args:
        h: the module and how it is computed.
        call: its captured call.
        g: the gradient of the summed loss w.r.t. the call's output.
        acc: where the gradients go.
        factored: whether a weight used by one call may stay factored.
        uses: the number of calls that contribute to each parameter.
        projections: projections by parameter name; a weight used by one call
            whose layer has a token factor rule and whose projection is a
            Kronecker product is projected from its per-token factors.

    Raises:
        Exception: whatever the rule or the module-local fallback raises; the
            engine then sends the module's parameters to the whole-model
            fallback.
    """
    if h.rule is None:
        grads = local_per_sample_grads(h.module, call, g, list(h.params), acc.batch)
        for local, name in h.params.items():
            acc.add(name, grads[local].to(accumulation_dtype(grads[local].dtype)))
        return
    todo = dict(h.params)
    single = uses.get(todo.get("weight", ""), 0) == 1
    if projections and single:
        todo = _project(h, call, g, acc, todo, projections)
    if factored and single and "weight" in todo:
        todo = _factor(h, call, g, acc, todo)
    if not todo:
        return
    kwargs: Dict[str, Any] = {}
    if accepts_out(h.rule):
        kwargs["out"] = acc.views(todo)
    rule: Any = h.rule
    per_sample = rule(h.module, call.inputs, g, names=list(todo), **kwargs)
    for local, name in todo.items():
        acc.add(name, per_sample[local])


def dispatch_traced(
    h: HookedModule,
    call: Call,
    grads: List[Optional[torch.Tensor]],
    acc: Accumulator,
    factored: bool,
    uses: Mapping[str, int],
) -> None:
    """Adds the per-sample gradients of a traced call (see
    [trace][pydvl_datainf.gradients.hooks.trace]) to `acc`.

    Args:
        h: the module (without a rule).
        call: its call, with `call.traced` set.
        grads: the gradient of the summed loss w.r.t. each use's output.
        acc: where the gradients go.
        factored: whether a parameter with one use may stay factored.
        uses: the number of uses that contribute to each parameter.

    Raises:
        ValueError: if a use does not see the batch first; the engine then
            sends the module's parameters to the whole-model fallback.
    """
    assert call.traced is not None
    for use, g in zip(call.traced, grads):
        if g is None:  # no gradient reached this use
            continue
        name = h.params[use.local]
        one = factored and uses.get(name, 0) == 1
        dense, factors = use_grads(use, g, acc.params[name], acc.batch, one)
        if factors is not None:
            acc.factored(name, *factors)
        else:
            assert dense is not None
            acc.add(name, dense)
