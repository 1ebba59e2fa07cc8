r"""Per-layer rules that turn activations into per-sample gradients.

A *rule* knows, for one layer type, how the gradient of a loss with respect to
the layer's parameters follows from the layer's input $a$ and the gradient
$g = \partial L / \partial z$ of the loss with respect to its output $z$. When
the batch is processed in one forward pass and the total loss is the sum of the
per-sample losses, $L = \sum_i \ell_i$, and samples do not interact, then
$g_i = \partial \ell_i / \partial z_i$, so that the rule can split the gradient
sample by sample. For instance, for a linear layer $z_{it} = W a_{it} + b$
applied to the tokens $t$ of sample $i$:

$$
\nabla_W \ell_i = \sum_t g_{it} a_{it}^\top, \qquad
\nabla_b \ell_i = \sum_t g_{it}.
$$

Rules are looked up by the exact type of the module first, then along its
method resolution order, so that a subclass of `nn.Linear` uses the linear rule
unless it registers its own. A rule is inherited only by subclasses that do not
override `forward`: a subclass computing something else (say, scaling the
output by an extra parameter) would otherwise get wrong gradients silently. Such
subclasses get no rule, and their parameters go to the fallback engine, unless
a rule is registered for them.

Built-in rules: `nn.Linear` (inputs of any rank $\geq 2$; this covers the
`lora_A` / `lora_B` adapters of PEFT), `nn.Conv1d` and `nn.Conv2d` (stride,
padding including `'same'` and non-zero padding modes, dilation, groups),
`nn.Embedding` (`padding_idx`, `scale_grad_by_freq`), `nn.LayerNorm` and
`nn.RMSNorm`.

A layer may also have a *factor rule* (see
[register_factor_rule][pydvl_datainf.grad_rules.register_factor_rule]): when
the per-sample gradient of its weight is rank one, as for `nn.Linear` on
inputs without a token dimension, the rule returns the two factors and `fit`
caches them instead of the dense gradient (see [pydvl_datainf.factored][]).

All rules compute in
[accumulation_dtype][pydvl_datainf.gradients.accumulation_dtype] of the
parameter: half-precision layers give float32 gradients.

Example:
    Registering a rule for a layer that scales its input elementwise:

    ```python
    import torch
    from torch import nn
    from pydvl_datainf.grad_rules import register_rule, wanted

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
    ```
"""

from __future__ import annotations

import functools
import inspect
import logging
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
import torch.nn.functional as F
from torch import nn

from pydvl_datainf.gradients import accumulation_dtype

__all__ = [
    "GradRule",
    "RULE_PARAMS",
    "FactorRule",
    "accepts_out",
    "get_factor_rule",
    "get_rule",
    "register_factor_rule",
    "register_rule",
    "unregister_rule",
    "wanted",
]

logger = logging.getLogger(__name__)

RULE_PARAMS: Tuple[str, ...] = ("weight", "bias")
"""Names of the parameters that rules compute; others go to the fallback."""


class GradRule(Protocol):
    """Signature of a per-layer rule.

    Args:
        module: the layer.
        inputs: its positional inputs in the forward call, batch first.
        grad_output: gradient of the summed loss with respect to its output,
            same shape as the output (batch first).
        names: the names of the parameters to compute among `RULE_PARAMS`;
            `None` for all those of the module that require grad.

    Returns:
        Per-sample gradients by parameter name, each of shape
        `(batch, *param.shape)`.

    Rules may also accept a keyword argument `out`: a mapping from parameter
    name to a preallocated contiguous tensor of shape `(batch, *param.shape)`
    to write the result into (and return). The engine passes it to the rules
    that accept it, to save an allocation and a copy; the built-in rules do.
    """

    def __call__(
        self,
        module: nn.Module,
        inputs: Sequence[Any],
        grad_output: torch.Tensor,
        names: Optional[Collection[str]] = None,
    ) -> Dict[str, torch.Tensor]: ...


class FactorRule(Protocol):
    """Signature of a rank-one factor rule for a layer's `weight`.

    Args:
        module: the layer.
        inputs: its positional inputs in the forward call, batch first.
        grad_output: gradient of the summed loss with respect to its output.

    Returns:
        `(left, right)` of shapes `(batch, p)` and `(batch, q)` such that the
        per-sample gradient of the weight, flattened, is
        `(left[i, :, None] * right[i, None, :]).reshape(-1)`; or `None` when
        this call's gradients are not rank one (e.g. several tokens per sample).
        See [pydvl_datainf.factored][].
    """

    def __call__(
        self, module: nn.Module, inputs: Sequence[Any], grad_output: torch.Tensor
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]: ...


_RULES: Dict[type, GradRule] = {}
_FACTOR_RULES: Dict[type, FactorRule] = {}

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
    """Decorator registering a rank-one [FactorRule][pydvl_datainf.grad_rules.FactorRule].

    Looked up like [get_rule][pydvl_datainf.grad_rules.get_rule]; a layer needs
    a (dense) rule as well, which computes its other parameters and every call
    that the factor rule declines.
    """
    return _registrar(_FACTOR_RULES, module_types, "register_factor_rule")


def get_factor_rule(module_type: type) -> Optional[FactorRule]:
    """The rank-one factor rule for a module type, or `None`."""
    return cast(Optional[FactorRule], _lookup(_FACTOR_RULES, module_type))


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


def _cast(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`t` in the accumulation dtype of parameter `p`."""
    return t.to(accumulation_dtype(p.dtype))


def _dst(
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


def _batch(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor input, got {type(x).__name__}")
    return x


_SMALL_OUTER = 2048


@register_rule(nn.Linear)
def linear_rule(
    module: nn.Module,
    inputs: Sequence[Any],
    grad_output: torch.Tensor,
    names: Optional[Collection[str]] = None,
    out: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    r"""Per-sample gradients of `nn.Linear` for inputs `(B, ..., in_features)`.

    $\nabla_W \ell_i = \sum_t g_{it} a_{it}^\top$ and
    $\nabla_b \ell_i = \sum_t g_{it}$, where $t$ runs over all the middle
    dimensions (tokens, positions...).
    """
    todo = wanted(module, names)
    if not todo:
        return {}
    weight = cast(nn.Linear, module).weight
    a = _cast(_batch(inputs[0]), weight)
    g = _cast(grad_output, weight)
    if a.dim() < 2:
        raise ValueError("the linear rule needs batched inputs (B, ..., in)")
    b = a.shape[0]
    g = g.reshape(b, -1, g.shape[-1])
    result: Dict[str, torch.Tensor] = {}
    if "weight" in todo:
        a = a.reshape(b, -1, a.shape[-1])
        dst = _dst(out, "weight")
        if a.shape[1] == 1 and a.shape[-1] * g.shape[-1] <= _SMALL_OUTER:
            # one token, small matrix: a broadcast product beats a batched matmul
            result["weight"] = torch.mul(g[:, 0, :, None], a[:, 0, None, :], out=dst)
        else:
            result["weight"] = torch.bmm(g.transpose(1, 2), a, out=dst)
    if "bias" in todo:
        result["bias"] = torch.sum(g, 1, out=_dst(out, "bias"))
    return result


@register_factor_rule(nn.Linear)
def linear_factors(
    module: nn.Module, inputs: Sequence[Any], grad_output: torch.Tensor
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    r"""$(g_i, a_i)$ for a linear layer that sees one input vector per sample.

    Declines (returns `None`) inputs with token dimensions of length other than
    one, and layers too small to gain from factors ($p q \le p + q$).
    """
    weight = cast(nn.Linear, module).weight
    a = _batch(inputs[0])
    if a.dim() < 2 or a[0].numel() != a.shape[-1]:
        return None
    p, q = weight.shape
    if p * q <= p + q or grad_output.shape[0] != a.shape[0]:
        return None
    b = a.shape[0]
    left = _cast(grad_output, weight).reshape(b, p)
    right = _cast(a, weight).reshape(b, q)
    return left, right


def _explicit_padding(module: Any, n_spatial: int) -> List[Tuple[int, int]]:
    """(left, right) padding for each spatial dimension of a convolution."""
    padding = module.padding
    dilation = module.dilation
    kernel = module.kernel_size
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * n_spatial
        pads = []
        for d, k in zip(dilation, kernel):
            total = d * (k - 1)
            left = total // 2
            pads.append((left, total - left))
        return pads
    return [(p, p) for p in padding]


def _conv_rule(
    module: Any,
    inputs: Sequence[Any],
    grad_output: torch.Tensor,
    names: Optional[Collection[str]],
    out: Optional[Mapping[str, torch.Tensor]],
    n_spatial: int,
) -> Dict[str, torch.Tensor]:
    todo = wanted(module, names)
    if not todo:
        return {}
    weight = module.weight
    x = _cast(_batch(inputs[0]), weight)
    g = _cast(grad_output, weight)
    if x.dim() != n_spatial + 2:
        raise ValueError(
            f"the conv rule needs batched inputs of rank {n_spatial + 2}, "
            f"got shape {tuple(x.shape)}"
        )
    b = x.shape[0]
    result: Dict[str, torch.Tensor] = {}
    if "bias" in todo:
        result["bias"] = torch.sum(
            g.reshape(b, g.shape[1], -1), -1, out=_dst(out, "bias")
        )
    if "weight" not in todo:
        return result

    pads = _explicit_padding(module, n_spatial)
    if module.padding_mode != "zeros":
        # as in nn.Conv*d: pad with the mode, then convolve without padding
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        pads = [(0, 0)] * n_spatial
    flat = [p for pair in reversed(pads) for p in pair]
    if any(flat):
        x = F.pad(x, flat)

    kernel = tuple(module.kernel_size)
    stride = tuple(module.stride)
    dilation = tuple(module.dilation)
    if n_spatial == 1:  # view a 1-d convolution as a 2-d one of height 1
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    # columns: (B, C_in * prod(kernel), L), channel-major as the weight layout
    cols = F.unfold(x, kernel_size=kernel, dilation=dilation, stride=stride)
    groups = module.groups
    c_out = weight.shape[0]
    cols = cols.reshape(b, groups, -1, cols.shape[-1])
    gg = g.reshape(b, groups, c_out // groups, -1)
    if gg.shape[-1] != cols.shape[-1]:
        raise ValueError(
            f"conv rule: {gg.shape[-1]} output positions but {cols.shape[-1]} "
            "patches; unsupported padding or input"
        )
    dst = _dst(out, "weight")
    gw = torch.matmul(
        gg,
        cols.transpose(-1, -2),
        out=None if dst is None else dst.view(b, groups, c_out // groups, -1),
    )
    result["weight"] = gw.view(b, *weight.shape)
    return result


@register_rule(nn.Conv1d)
def conv1d_rule(
    module: nn.Module,
    inputs: Sequence[Any],
    grad_output: torch.Tensor,
    names: Optional[Collection[str]] = None,
    out: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    r"""Per-sample gradients of `nn.Conv1d` for inputs `(B, C, L)`.

    The input is unfolded into patches $u_{il}$ (one per output position $l$),
    so that $\nabla_W \ell_i = \sum_l g_{il} u_{il}^\top$ group by group.
    """
    return _conv_rule(module, inputs, grad_output, names, out, 1)


@register_rule(nn.Conv2d)
def conv2d_rule(
    module: nn.Module,
    inputs: Sequence[Any],
    grad_output: torch.Tensor,
    names: Optional[Collection[str]] = None,
    out: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    r"""Per-sample gradients of `nn.Conv2d` for inputs `(B, C, H, W)`.

    As [conv1d_rule][pydvl_datainf.grad_rules.conv1d_rule], with patches
    extracted by `torch.nn.functional.unfold`.
    """
    return _conv_rule(module, inputs, grad_output, names, out, 2)


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
    idx = _batch(inputs[0])
    b = idx.shape[0]
    n_emb, dim = weight.shape
    idx = idx.reshape(b, -1).long()
    g = _cast(grad_output, weight).reshape(b, -1, dim)
    if module.padding_idx is not None:
        g = g.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0.0)
    flat = (idx + n_emb * torch.arange(b, device=idx.device).unsqueeze(1)).reshape(-1)
    gw = _dst(out, "weight")
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


def _norm_rule(
    module: Any,
    inputs: Sequence[Any],
    grad_output: torch.Tensor,
    names: Optional[Collection[str]],
    out: Optional[Mapping[str, torch.Tensor]],
    normalize: Callable[[torch.Tensor, Tuple[int, ...]], torch.Tensor],
) -> Dict[str, torch.Tensor]:
    todo = wanted(module, names)
    if not todo:
        return {}
    ref = module.weight if module.weight is not None else module.bias
    x = _cast(_batch(inputs[0]), ref)
    g = _cast(grad_output, ref)
    shape = tuple(module.normalized_shape)
    b = x.shape[0]
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    result: Dict[str, torch.Tensor] = {}
    if "weight" in todo:
        xhat = normalize(x, dims)
        prod = (g * xhat).reshape(b, -1, *shape)
        result["weight"] = torch.sum(prod, 1, out=_dst(out, "weight"))
    if "bias" in todo:
        result["bias"] = torch.sum(g.reshape(b, -1, *shape), 1, out=_dst(out, "bias"))
    return result


@register_rule(nn.LayerNorm)
def layer_norm_rule(
    module: nn.Module,
    inputs: Sequence[Any],
    grad_output: torch.Tensor,
    names: Optional[Collection[str]] = None,
    out: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    r"""Per-sample gradients of `nn.LayerNorm` (affine weight, optional bias).

    With $\hat{x} = (x - \mu) / \sqrt{\sigma^2 + \epsilon}$ over the normalised
    dimensions, $\nabla_\gamma \ell_i = \sum_t g_{it} \odot \hat{x}_{it}$ and
    $\nabla_\beta \ell_i = \sum_t g_{it}$.
    """
    eps = cast(nn.LayerNorm, module).eps

    def normalize(x: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + eps)

    return _norm_rule(module, inputs, grad_output, names, out, normalize)


if hasattr(nn, "RMSNorm"):

    @register_rule(nn.RMSNorm)
    def rms_norm_rule(
        module: nn.Module,
        inputs: Sequence[Any],
        grad_output: torch.Tensor,
        names: Optional[Collection[str]] = None,
        out: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        r"""Per-sample gradients of `nn.RMSNorm`.

        $\nabla_\gamma \ell_i = \sum_t g_{it} \odot x_{it} /
        \sqrt{\overline{x_{it}^2} + \epsilon}$.
        """
        x0 = _batch(inputs[0])
        eps = cast(nn.RMSNorm, module).eps
        if eps is None:
            eps = torch.finfo(x0.dtype).eps

        def normalize(x: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)

        return _norm_rule(module, inputs, grad_output, names, out, normalize)
