"""Forward hooks that capture each call's inputs and output edge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from .plan import HookPlan
from .trace import LinearUse, Tracer

__all__ = ["Call", "Capture"]


@dataclass
class Call:
    """One call of a hooked module in the batched forward.

    Attributes:
        args: its positional inputs, detached (the first one expanded to the
            batch when the call was shared by the batch).
        kwargs: its keyword inputs, detached.
        versions: the version counters of the tensor inputs at the call, to
            detect later in-place changes.
        edge: the autograd edge of its output.
        traced: for a module without a rule, the linear uses of its
            parameters when every use was recognised, else `None`.
    """

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    versions: List[int]
    edge: GradientEdge
    traced: Optional[List[LinearUse]] = None

    @property
    def inputs(self) -> Tuple[Any, ...]:
        """What rules see: the positional inputs, else the keyword ones."""
        return self.args if self.args else tuple(self.kwargs.values())

    def tensors(self) -> List[torch.Tensor]:
        """The tensor inputs, positional then keyword."""
        values = [*self.args, *self.kwargs.values()]
        return [a for a in values if isinstance(a, torch.Tensor)]

    def modified(self) -> bool:
        """Whether a tensor input was modified in place after the call."""
        return [a._version for a in self.tensors()] != self.versions


def _detach(a: Any) -> Any:
    return a.detach() if isinstance(a, torch.Tensor) else a


class Capture:
    """Context manager hooking the plan's modules during one forward.

    Args:
        plan: the modules to hook.
        batch: the batch size.
        expand_shared: expand the output (and first input) of a call made on
            a batch of one to the batch, so that each sample gets its branch.
        trace: trace the linear uses of the parameters of modules without a
            rule (see [trace][pydvl_datainf.gradients.hooks.trace]).

    Attributes:
        calls: the captured calls, per `id(module)`.
        untracked: ids of modules called with autograd disabled.
    """

    def __init__(
        self, plan: HookPlan, batch: int, expand_shared: bool, trace: bool = True
    ):
        self.batch = batch
        self.expand_shared = expand_shared
        self.modules = [h.module for h in plan.hooked]
        self.traced = {
            id(h.module): {n: getattr(h.module, n) for n in h.params}
            for h in plan.hooked
            if trace and h.rule is None
        }
        self._tracers: Dict[int, List[Tracer]] = {k: [] for k in self.traced}
        self._active: List[Tracer] = []  # in the order they were entered
        self.calls: Dict[int, List[Call]] = {id(m): [] for m in self.modules}
        self.untracked: set = set()
        self._handles: List[RemovableHandle] = []
        self._capturing = False

    def _shared(self, output: torch.Tensor, first: Any) -> bool:
        return (
            self.expand_shared
            and self.batch > 1
            and output.dim() > 0
            and output.shape[0] == 1
            and isinstance(first, torch.Tensor)
            and first.dim() > 0
            and first.shape[0] == 1
        )

    def pre_hook(self, mod: nn.Module, args: Tuple[Any, ...]) -> None:
        """Starts tracing a module without a rule."""
        if self._capturing:
            tracer = Tracer(self.traced[id(mod)])
            tracer.__enter__()
            self._tracers[id(mod)].append(tracer)
            self._active.append(tracer)

    def _stop(self, mod: nn.Module) -> Optional[List[LinearUse]]:
        """Stops the module's innermost tracer; its uses if all recognised."""
        stack = self._tracers.get(id(mod))
        if not stack:
            return None
        tracer = stack.pop()
        if not self._active or self._active[-1] is not tracer:
            return None  # not properly nested (the mode stays until __exit__)
        self._active.pop()
        tracer.__exit__(None, None, None)
        return tracer.uses if tracer.ok else None

    def hook(
        self,
        mod: nn.Module,
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        output: Any,
    ) -> Optional[torch.Tensor]:
        """The forward hook: records the call, maybe expands its output."""
        if not self._capturing:
            return None
        traced = self._stop(mod)
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            self.untracked.add(id(mod))
            return None
        args = tuple(_detach(a) for a in args)
        kwargs = {k: _detach(v) for k, v in kwargs.items()}
        values = [*args, *kwargs.values()]
        versions = [a._version for a in values if isinstance(a, torch.Tensor)]
        first = args[0] if args else next(iter(kwargs.values()), None)
        replaced: Optional[torch.Tensor] = None
        if self._shared(output, first):  # shared by the whole batch
            assert isinstance(first, torch.Tensor)
            output = replaced = output.expand(self.batch, *output.shape[1:])
            wide = first.expand(self.batch, *first.shape[1:])
            if args:
                args = (wide, *args[1:])
            else:
                key = next(iter(kwargs))
                kwargs = {**kwargs, key: wide}
        self.calls[id(mod)].append(
            Call(args, kwargs, versions, get_gradient_edge(output), traced)
        )
        return replaced

    def __enter__(self) -> Capture:
        self._capturing = True
        self._handles = [
            m.register_forward_hook(self.hook, with_kwargs=True) for m in self.modules
        ]
        self._handles += [
            m.register_forward_pre_hook(self.pre_hook)
            for m in self.modules
            if id(m) in self.traced
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        self._capturing = False
        while self._active:  # a forward that raised
            self._active.pop().__exit__(None, None, None)
        for stack in self._tracers.values():
            stack.clear()
        for handle in self._handles:
            handle.remove()
        self._handles = []
