r"""Registries of per-layer rules, their signatures and shared helpers.

A *rule* knows, for one layer type, how the gradient of a loss with respect to
the layer's parameters follows from the layer's input $a$ and the gradient
$g = \partial L / \partial z$ of the loss with respect to its output $z$.
Rules are looked up by the exact type of the module first, then along its
method resolution order, so that a subclass of `nn.Linear` uses the linear rule
unless it registers its own. A rule is inherited only by subclasses that do not
override `forward`: a subclass computing something else (say, a loralib-style
`nn.Linear` adding `lora_B @ lora_A`) would otherwise get wrong gradients
silently. Such subclasses get no rule; the hook engine computes their
parameters with its module-local fallback.
"""

from __future__ import annotations

import functools
import inspect
from typing import (
    Any,
    Callable,
    Collection,
    Dict,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    cast,
)

import torch
from torch import nn

from ..engine import accumulation_dtype

__all__ = [
    "GradRule",
    "RULE_PARAMS",
    "FactorRule",
    "TokenFactorRule",
    "accepts_out",
    "batched_input",
    "get_factor_rule",
    "get_rule",
    "get_token_factor_rule",
    "out_buffer",
    "register_factor_rule",
    "register_rule",
    "register_token_factor_rule",
    "to_accumulation",
    "unregister_rule",
    "wanted",
]

RULE_PARAMS: Tuple[str, ...] = ("weight", "bias")
"""Names of the parameters that rules compute; others go to the fallback."""


class GradRule(Protocol):
    """Signature of a per-layer rule: per-sample gradients of a layer's
    `weight` and `bias` from its inputs and output gradient."""

    def __call__(
        self,
        module: nn.Module,
        inputs: Sequence[Any],
        grad_output: torch.Tensor,
        names: Optional[Collection[str]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Computes the per-sample gradients of one call of `module`.

        Rules may also accept a keyword argument `out`: a mapping from
        parameter name to a preallocated contiguous tensor of shape
        `(batch, *param.shape)` to write the result into (and return). The
        engine passes it to the rules that accept it, to save an allocation and
        a copy; the built-in rules do.

        Args:
            module: the layer.
            inputs: its positional inputs in the forward call, batch first.
            grad_output: gradient of the summed loss with respect to its
                output, same shape as the output (batch first).
            names: the names of the parameters to compute among `RULE_PARAMS`;
                `None` for all those of the module that require grad.

        Returns:
            Per-sample gradients by parameter name, each of shape
            `(batch, *param.shape)`.
        """
        ...


class FactorRule(Protocol):
    """Signature of a rank-one factor rule for a layer's `weight`."""

    def __call__(
        self, module: nn.Module, inputs: Sequence[Any], grad_output: torch.Tensor
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The two factors of the per-sample weight gradients of one call.

        Args:
            module: the layer.
            inputs: its positional inputs in the forward call, batch first.
            grad_output: gradient of the summed loss with respect to its output.

        Returns:
            `(left, right)` of shapes `(batch, p)` and `(batch, q)` such that
            the per-sample gradient of the weight, flattened, is
            `(left[i, :, None] * right[i, None, :]).reshape(-1)`; or `None`
            when this call's gradients are not rank one (e.g. several tokens
            per sample). See [pydvl_datainf.factored][].
        """
        ...


class TokenFactorRule(Protocol):
    r"""Signature of a per-token factor rule for a layer's `weight`.

    For layers whose per-sample weight gradient is a sum over tokens (or
    positions) of outer products, $\nabla_W \ell_i = \sum_t \delta_{it}
    a_{it}^\top$, the factors let a Kronecker projection
    ([apply_tokens][pydvl_datainf.projection.Projection.apply_tokens]) and the
    exact squared norm be computed without forming the gradient.
    """

    def __call__(
        self, module: nn.Module, inputs: Sequence[Any], grad_output: torch.Tensor
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The per-token factors of the weight gradients of one call.

        Args:
            module: the layer.
            inputs: its positional inputs in the forward call, batch first.
            grad_output: gradient of the summed loss with respect to its output.

        Returns:
            `(left, right)` of shapes `(batch, T, p)` and `(batch, T, q)` such
            that the per-sample gradient of the weight, flattened, is
            `(left[i].T @ right[i]).reshape(-1)`; or `None` when this call does
            not have that form.
        """
        ...


_RULES: Dict[type, GradRule] = {}
_FACTOR_RULES: Dict[type, FactorRule] = {}
_TOKEN_FACTOR_RULES: Dict[type, TokenFactorRule] = {}

_R = TypeVar("_R", bound=GradRule)
_T = TypeVar("_T")


def _registrar(
    registry: Dict[type, Any], module_types: Sequence[type], what: str
) -> Callable[[_T], _T]:
    """A decorator that files its argument in `registry` under `module_types`."""
    if not module_types:
        raise TypeError(f"{what} needs at least one module type")

    def decorator(rule: _T) -> _T:
        for t in module_types:
            registry[t] = rule
        return rule

    return decorator


def register_rule(*module_types: Type[nn.Module]) -> Callable[[_R], _R]:
    """Decorator registering a rule for one or more module types.

    A later registration for the same type replaces the earlier one.

    Args:
        module_types: the module classes the rule applies to.

    Example:
        ```python
        import torch
        from torch import nn
        from pydvl_datainf.gradients.rules import register_rule, wanted

        class Scale(nn.Module):
            def __init__(self, n: int):
                super().__init__()
                self.weight = nn.Parameter(torch.ones(n))

            def forward(self, x):
                return x * self.weight

        @register_rule(Scale)
        def _scale_rule(module, inputs, grad_output, names=None):
            if "weight" not in wanted(module, names):
                return {}
            a, g = inputs[0], grad_output
            return {"weight": (a * g).reshape(len(a), -1, a.shape[-1]).sum(1)}

        # the hook engine now uses the rule, and agrees with the per-sample loop
        from pydvl_datainf.gradients import HookGradientEngine, LoopGradientEngine
        from pydvl_datainf.gradients.rules import unregister_rule

        model = nn.Sequential(nn.Linear(3, 4), Scale(4))
        params = dict(model.named_parameters())
        x, y = torch.randn(5, 3), torch.randn(5, 4)
        loss = nn.functional.mse_loss
        assert HookGradientEngine().plan(model, params).fallback == {}
        hooked = HookGradientEngine().per_sample_grads(model, loss, x, y, params)
        looped = LoopGradientEngine().per_sample_grads(model, loss, x, y, params)
        assert torch.allclose(hooked["1.weight"], looped["1.weight"], atol=1e-6)
        unregister_rule(Scale)
        ```
    """
    return _registrar(_RULES, module_types, "register_rule")


def unregister_rule(module_type: Type[nn.Module]) -> None:
    """Removes the rule registered for exactly `module_type`, if any."""
    _RULES.pop(module_type, None)


def _lookup(registry: Dict[type, Any], module_type: type) -> Any:
    rule = registry.get(module_type)
    if rule is not None:
        return rule
    forward = getattr(module_type, "forward", None)
    for base in module_type.__mro__[1:]:
        rule = registry.get(base)
        if rule is not None:
            return rule if forward is getattr(base, "forward", None) else None
    return None


def get_rule(module_type: type) -> Optional[GradRule]:
    """The rule for a module type, or `None`.

    The rule registered for exactly `module_type`, else the one of the nearest
    class in its MRO, provided that `module_type` inherits that class's
    `forward` unchanged.
    """
    return cast(Optional[GradRule], _lookup(_RULES, module_type))


def register_factor_rule(
    *module_types: Type[nn.Module],
) -> Callable[[FactorRule], FactorRule]:
    """Decorator registering a rank-one
    [FactorRule][pydvl_datainf.gradients.rules.registry.FactorRule].

    Looked up like
    [get_rule][pydvl_datainf.gradients.rules.registry.get_rule]; a layer needs
    a (dense) rule as well, which computes its other parameters and every call
    that the factor rule declines.
    """
    return _registrar(_FACTOR_RULES, module_types, "register_factor_rule")


def get_factor_rule(module_type: type) -> Optional[FactorRule]:
    """The rank-one factor rule for a module type, or `None`."""
    return cast(Optional[FactorRule], _lookup(_FACTOR_RULES, module_type))


def register_token_factor_rule(
    *module_types: Type[nn.Module],
) -> Callable[[TokenFactorRule], TokenFactorRule]:
    """Decorator registering a per-token
    [TokenFactorRule][pydvl_datainf.gradients.rules.registry.TokenFactorRule],
    looked up like [get_rule][pydvl_datainf.gradients.rules.registry.get_rule]."""
    return _registrar(_TOKEN_FACTOR_RULES, module_types, "register_token_factor_rule")


def get_token_factor_rule(module_type: type) -> Optional[TokenFactorRule]:
    """The per-token factor rule for a module type, or `None`."""
    return cast(Optional[TokenFactorRule], _lookup(_TOKEN_FACTOR_RULES, module_type))


def wanted(module: nn.Module, names: Optional[Collection[str]]) -> List[str]:
    """The parameters among `RULE_PARAMS` that a rule must compute.

    Args:
        module: the layer.
        names: explicit names, or `None` for all rule parameters that exist
            (are not `None`) and require grad.
    """
    out = []
    for n in RULE_PARAMS:
        p = module._parameters.get(n)
        if p is None:
            continue
        if (names is None and p.requires_grad) or (names is not None and n in names):
            out.append(n)
    return out


def to_accumulation(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`t` in the accumulation dtype of parameter `p`."""
    return t.to(accumulation_dtype(p.dtype))


def out_buffer(
    out: Optional[Mapping[str, torch.Tensor]], name: str
) -> Optional[torch.Tensor]:
    """The preallocated output for `name`, if any."""
    return None if out is None else out.get(name)


def accepts_out(rule: Callable[..., Any]) -> bool:
    """Whether a rule takes the optional keyword argument `out`."""
    try:
        return _accepts_out(rule)
    except TypeError:  # unhashable callable
        return _accepts_out.__wrapped__(rule)


@functools.lru_cache(maxsize=256)
def _accepts_out(rule: Callable[..., Any]) -> bool:
    try:
        return "out" in inspect.signature(rule).parameters
    except (TypeError, ValueError):
        return False


def batched_input(x: Any) -> torch.Tensor:
    """`x`, checked to be a tensor (a rule's batched input)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor input, got {type(x).__name__}")
    return x
