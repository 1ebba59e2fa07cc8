"""Which module computes which parameter, and how: the hook engine's plan.

[make_plan][pydvl_datainf.gradients.hooks.plan.make_plan] assigns every
requested parameter to the modules that own it, and each module to one way of
computing its per-sample gradients, from cheapest to dearest:

* **rule**: a per-layer rule (see [pydvl_datainf.gradients.rules][]), from the
  activations and output gradients captured in the one batched pass;
* **local**: the module-local fallback, for a module without a rule: its own
  `forward` is run again on the captured inputs, vmapped over the samples, and
  differentiated with respect to its own parameters only;
* **whole model**: the fallback engine (`torch.func` over the whole model,
  then the autograd loop), for parameters not owned by any module.

Parameters of the first two kinds may still go to the whole-model fallback
when the batched pass shows that a module cannot be split by sample (e.g. it
does not see the batch in dimension 0); the engine then warns, naming the
layer.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, MutableSet, Optional, Tuple

import torch
from torch import nn

from ..rules import RULE_PARAMS, GradRule, get_rule

__all__ = [
    "GradientFallbackWarning",
    "HookPlan",
    "HookedModule",
    "make_plan",
    "warn_once",
]


class GradientFallbackWarning(UserWarning):
    """Some per-sample gradients are computed by a slower fallback."""


@dataclass
class HookedModule:
    """A module that receives hooks, and how its gradients are computed.

    Attributes:
        name: the module's name in `model.named_modules()`.
        module: the module itself.
        rule: its per-layer rule, or `None` for the module-local fallback.
        params: requested parameter names by local name (`"weight"`, ...).
    """

    name: str
    module: nn.Module
    rule: Optional[GradRule]
    params: Dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """`name (Type)`, for messages."""
        return f"{self.name or '<root>'} ({type(self.module).__name__})"

    @property
    def method(self) -> str:
        """How the module's gradients are computed, in words."""
        if self.rule is None:
            return "module-local vmap (re-runs this module's forward)"
        return f"rule {getattr(self.rule, '__name__', type(self.rule).__name__)}"


@dataclass
class HookPlan:
    """Which modules are hooked, and which parameters go to the fallback.

    Print it to see, parameter by parameter, which module computes it and how.

    Attributes:
        hooked: the modules that get hooks, with a rule or module-local.
        fallback: requested parameter names left to the whole-model fallback
            engine, with the reason.

    Example:
        ```python
        from torch import nn
        from pydvl_datainf.gradients import HookGradientEngine

        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        plan = HookGradientEngine().plan(model, dict(model.named_parameters()))
        print(plan)  # one line per parameter: module, method
        assert plan.fallback == {} and plan.local == []
        ```
    """

    hooked: List[HookedModule] = field(default_factory=list)
    fallback: Dict[str, str] = field(default_factory=dict)

    @property
    def hooked_names(self) -> List[str]:
        """Names of the hooked modules."""
        return [h.name for h in self.hooked]

    @property
    def local(self) -> List[HookedModule]:
        """The modules computed by the module-local fallback."""
        return [h for h in self.hooked if h.rule is None]

    def rows(self) -> List[Tuple[str, str, str]]:
        """`(parameter, module, method)` for every requested parameter."""
        out = [
            (name, h.label, h.method) for h in self.hooked for name in h.params.values()
        ]
        out += [
            (name, "-", f"whole-model fallback: {why}")
            for name, why in self.fallback.items()
        ]
        return out

    def cost(self) -> Optional[str]:
        """What the fallbacks of this plan cost, in words; `None` if none."""
        parts = []
        if self.local:
            names = ", ".join(h.label for h in self.local)
            parts.append(
                f"no per-sample rule for {names}: each re-runs its own forward, "
                "vmapped over the samples (about one extra forward and backward "
                "of that layer per batch)"
            )
        if self.fallback:
            parts.append(
                "whole-model fallback for "
                + "; ".join(f"{k} ({v})" for k, v in self.fallback.items())
                + ": torch.func re-runs the whole model per sample (typically "
                "2-3x a plain pass), the autograd loop one pass per sample"
            )
        return "; ".join(parts) or None

    def __str__(self) -> str:
        rows = [("parameter", "module", "computed by"), *self.rows()]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


def _owners(
    model: nn.Module, params: Mapping[str, torch.Tensor]
) -> Tuple[Dict[str, List[Tuple[str, nn.Module, str]]], set]:
    """Owning `(module name, module, local name)` per requested parameter
    (by identity, so that tied parameters have several owners), and the
    requested names that are the first of their tensor."""
    by_id: Dict[int, str] = {}
    for name, p in params.items():
        by_id.setdefault(id(p), name)
    owners: Dict[str, List[Tuple[str, nn.Module, str]]] = {k: [] for k in params}
    for mod_name, mod in model.named_modules():
        for local, p in mod.named_parameters(recurse=False):
            if id(p) in by_id:
                owners[by_id[id(p)]].append((mod_name, mod, local))
    return owners, set(by_id.values())


def make_plan(
    model: nn.Module, params: Mapping[str, torch.Tensor], local: bool = True
) -> HookPlan:
    """Finds the modules owning `params` and how each computes them.

    A module uses its rule when it has one and every requested parameter it
    owns is a rule parameter (`weight`, `bias`); otherwise the module-local
    fallback (or, with `local=False`, the whole-model fallback for those
    parameters).

    Args:
        model: the model.
        params: the requested parameters by name.
        local: whether modules without a rule use the module-local fallback.

    Returns:
        The plan.
    """
    owners, first_names = _owners(model, params)
    plan = HookPlan()
    hooked: Dict[int, HookedModule] = {}
    for name in params:
        if name not in first_names:  # same tensor requested twice
            plan.fallback[name] = "duplicate of another requested parameter"
        elif not owners[name]:
            plan.fallback[name] = "not owned by any submodule of the model"
    by_module: Dict[int, List[Tuple[str, str]]] = {}
    modules: Dict[int, Tuple[str, nn.Module]] = {}
    for name, found in owners.items():
        if name in plan.fallback:
            continue
        for mod_name, mod, local_name in found:
            by_module.setdefault(id(mod), []).append((local_name, name))
            modules[id(mod)] = (mod_name, mod)
    for key, pairs in by_module.items():
        mod_name, mod = modules[key]
        rule = get_rule(type(mod))
        if rule is None or any(ln not in RULE_PARAMS for ln, _ in pairs):
            if not local:
                label = f"{mod_name or '<root>'} ({type(mod).__name__})"
                for ln, name in pairs:
                    plan.fallback[name] = (
                        f"no rule for {label}"
                        if rule is None
                        else f"'{ln}' of {label} is not weight/bias"
                    )
                continue
            rule = None
        hooked[key] = HookedModule(mod_name, mod, rule, dict(pairs))
    # a parameter left to the whole model must not also be summed from modules
    for h in hooked.values():
        h.params = {ln: n for ln, n in h.params.items() if n not in plan.fallback}
    plan.hooked = [h for h in hooked.values() if h.params]
    return plan


_WARNED: weakref.WeakKeyDictionary[nn.Module, MutableSet[str]] = (
    weakref.WeakKeyDictionary()
)


def warn_once(model: nn.Module, message: str) -> None:
    """Warns with `message` once per model (and message).

    Args:
        model: the model the message is about.
        message: the warning, naming the layers and what they cost.
    """
    seen = _WARNED.setdefault(model, set())
    if message in seen:
        return
    seen.add(message)
    warnings.warn(message, GradientFallbackWarning, stacklevel=4)
