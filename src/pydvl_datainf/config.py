r"""Configuration parsing: regularization specifications and byte budgets.

The one place where a $\lambda$ specification is validated and resolved into
one $\lambda_l$ per block, with a range check against the compute dtype and the
scale of the squared gradient norms, and where byte budgets such as `"2GB"` are
parsed. Pure functions: no model, no storage.

Example:
    >>> from pydvl_datainf.config import parse_bytes, resolve_regularization
    >>> parse_bytes("1.5 KiB", default=0)
    1536
    >>> resolve_regularization("auto", {"a": 10}, {"a": 40.0}, n=4)
    OrderedDict([('a', 0.1)])
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import torch

from . import formula
from .blocks import BlockStructure
from .errors import RegularizationError

__all__ = [
    "negligible_blocks",
    "RegularizationSpec",
    "parse_bytes",
    "validate_regularization",
    "resolve_regularization",
    "check_regularization",
]

RegularizationSpec = Union[str, float, Mapping[str, Union[float, str]]]
"""`"auto"`, a positive float for every block, or `{block: float | "auto"}`."""

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BYTES = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(
    value: Union[None, int, float, str], default: Union[int, Callable[[], int]]
) -> int:
    """A byte count from an int, or a string such as `"2GB"`, `"512 MiB"`, `"1e9"`.

    Args:
        value: the budget; `None` means `default`.
        default: bytes, or a function giving them (called only when needed).

    Returns:
        A positive number of bytes.

    Raises:
        ValueError: an unknown unit, a malformed string, or a value that is
            not positive.

    Example:
        >>> parse_bytes("2GB", default=0), parse_bytes(None, default=64)
        (2000000000, 64)
    """
    if value is None:
        out = default() if callable(default) else default
        return int(out)
    if isinstance(value, bool):
        raise TypeError(f"A byte budget must be an int or a string, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = _BYTES.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"Cannot read {value!r} as a byte count; use an int or a string "
                f"such as '512MB', '2GiB' or '1e9'"
            )
        number = float(match.group(1)) * _UNITS[unit]
    else:
        raise TypeError(
            f"A byte budget must be an int or a string, got {type(value).__name__}"
        )
    if not (number >= 1 and math.isfinite(number)):
        raise ValueError(f"A byte budget must be at least one byte, got {value!r}")
    return int(number)


def _check_one(block: str, value: Any) -> Union[float, str]:
    if isinstance(value, str):
        if value != "auto":
            raise RegularizationError(
                f"Regularization for block {block!r} must be a positive float "
                f"or 'auto', got {value!r}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RegularizationError(
            f"Regularization for block {block!r} must be a positive float "
            f"or 'auto', got {type(value).__name__}"
        )
    if not (value > 0 and value < float("inf")):
        raise RegularizationError(
            f"Regularization for block {block!r} must be positive and finite, "
            f"got {value}"
        )
    return float(value)


def validate_regularization(
    spec: RegularizationSpec, block_names: Sequence[str]
) -> OrderedDict[str, Union[float, str]]:
    """Check a regularization spec and give one entry per block.

    Args:
        spec: `"auto"`, a positive float, or a dict with a float or `"auto"`
            for every block.
        block_names: the blocks, in order.

    Returns:
        `{block: float | "auto"}` in block order.

    Raises:
        RegularizationError: a value that is not positive and finite, a
            string other than `"auto"`, unknown or missing blocks.

    Example:
        >>> validate_regularization({"b": 0.5, "a": "auto"}, ["a", "b"])
        OrderedDict([('a', 'auto'), ('b', 0.5)])
    """
    names = list(block_names)
    if isinstance(spec, Mapping):
        unknown = [k for k in spec if k not in names]
        if unknown:
            raise RegularizationError(
                f"Regularization names unknown blocks {unknown}; the blocks are {names}"
            )
        missing = [k for k in names if k not in spec]
        if missing:
            raise RegularizationError(
                f"Regularization dict misses blocks {missing}; give a value "
                f"(float or 'auto') for every block of {names}"
            )
        return OrderedDict((k, _check_one(k, spec[k])) for k in names)
    return OrderedDict((k, _check_one(k, spec)) for k in names)


def check_regularization(
    block: str,
    value: float,
    dtype: torch.dtype = torch.float64,
    max_squared_norm: Optional[float] = None,
    source: str = "Regularization",
) -> float:
    r"""Check that $\lambda_l$ is usable in `dtype` at the scale of the norms.

    $R_l$ divides by $\lambda_l$ and scores are of the order of
    $\max_i \lVert g_{il}\rVert^2 / \lambda_l$. So $\lambda_l$ must be a
    positive normal number of `dtype`, and that ratio must neither overflow
    nor underflow in `dtype`.

    Args:
        block: the block's name (for the message).
        value: $\lambda_l$.
        dtype: the dtype the operator computes in.
        max_squared_norm: $\max_i \lVert g_{il}\rVert^2$, if known.
        source: what the value is, for the message.

    Returns:
        `value` as a float.

    Raises:
        RegularizationError: naming the block, the value and the usable range.

    Example:
        >>> check_regularization("a", 0.1, torch.float32, max_squared_norm=4.0)
        0.1
    """
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise RegularizationError(
            f"{source} of block {block!r} must be a positive float, got {value!r}"
        ) from None
    if not (lam > 0 and math.isfinite(lam)):
        raise RegularizationError(
            f"{source} of block {block!r} is {lam}; it must be positive and finite"
        )
    info = torch.finfo(dtype)
    if lam < info.tiny or lam > info.max:
        raise RegularizationError(
            f"{source} of block {block!r} is {lam:.3g}, outside the range of "
            f"{dtype} ({info.tiny:.3g} to {info.max:.3g}); its inverse would "
            f"give inf, NaN or zeros. Choose a value in range, or compute in "
            f"float64."
        )
    if max_squared_norm is not None and max_squared_norm > 0:
        ratio = float(max_squared_norm) / lam
        if not (info.tiny <= ratio <= info.max):
            raise RegularizationError(
                f"{source} of block {block!r} is {lam:.3g}, but the largest "
                f"squared gradient norm is {float(max_squared_norm):.3g}: "
                f"influences of order {ratio:.3g} {'overflow' if ratio > 1 else 'underflow'} "
                f"{dtype}. Choose a value closer to the norms (the 'auto' rule "
                f"gives one)."
            )
    return lam


def _sizes(blocks: Union[BlockStructure, Mapping[str, int]]) -> OrderedDict[str, int]:
    if isinstance(blocks, BlockStructure):
        return OrderedDict(zip(blocks.names, blocks.sizes))
    return OrderedDict((k, int(v)) for k, v in blocks.items())


def resolve_regularization(
    spec: RegularizationSpec,
    blocks: Union[BlockStructure, Mapping[str, int]],
    squared_norm_sums: Mapping[str, float],
    n: int,
    scale: float = formula.DEFAULT_REGULARIZATION_SCALE,
    dtype: torch.dtype = torch.float64,
    max_squared_norms: Optional[Mapping[str, float]] = None,
) -> OrderedDict[str, float]:
    r"""One checked $\lambda_l$ per block from a spec and the fitted norms.

    `"auto"` gives the paper's
    $\lambda_l = c \cdot \frac{1}{n}\sum_i \lVert g_{il}\rVert^2 / d_l$.
    Every value, given or resolved, goes through
    [check_regularization][pydvl_datainf.config.check_regularization].

    Args:
        spec: as for
            [validate_regularization][pydvl_datainf.config.validate_regularization].
        blocks: the block structure, or `{block: d_l}`.
        squared_norm_sums: $\sum_i \lVert g_{il}\rVert^2$ per block.
        n: number of training samples.
        scale: $c$ in the `"auto"` rule.
        dtype: the compute dtype.
        max_squared_norms: $\max_i \lVert g_{il}\rVert^2$ per block, for the
            range check (optional).

    Returns:
        `{block: lambda_l}` in block order.

    Raises:
        RegularizationError: an invalid spec, an `"auto"` value of zero (all
            gradients of the block vanish), or a value out of range.

    Example:
        >>> resolve_regularization({"a": 0.5}, {"a": 10}, {"a": 40.0}, n=4)
        OrderedDict([('a', 0.5)])
    """
    sizes = _sizes(blocks)
    if not (scale > 0 and math.isfinite(scale)):
        raise RegularizationError(
            f"regularization_scale must be positive and finite, got {scale}"
        )
    checked = validate_regularization(spec, list(sizes))
    out: OrderedDict[str, float] = OrderedDict()
    for name, d in sizes.items():
        value = checked[name]
        top = None if max_squared_norms is None else max_squared_norms[name]
        if value == "auto":
            lam = formula.auto_regularization(
                float(squared_norm_sums[name]), n, d, scale
            )
            if not (lam > 0 and math.isfinite(lam)):
                raise RegularizationError(_auto_regularization_advice(name, lam))
            out[name] = check_regularization(name, lam, dtype, top, "'auto' λ")
        else:
            out[name] = check_regularization(name, float(value), dtype, top)
    return out


def _auto_regularization_advice(block: str, lam: float) -> str:
    """Why `"auto"` gave no usable λ for `block`, and what to do."""
    if lam != 0:
        return (
            f"'auto' regularization of block {block!r} is {lam}: the mean squared "
            f"gradient norm of this block is not finite. Pass a positive float "
            f"for this block in `regularization`."
        )
    why = (
        "This block is a LoRA A matrix: LoRA starts lora_B at zero, so lora_A "
        "gets no gradient until the adapters are trained."
        if "lora_a" in block.lower()
        else "With LoRA this happens to the lora_A blocks of adapters that were "
        "not trained: lora_B starts at zero, so lora_A gets no gradient until "
        "the adapters are trained."
    )
    return (
        f"'auto' regularization of block {block!r} is 0: every training gradient "
        f"of this block is zero, so its influences carry no information. {why} "
        f"Train the model (the adapters) before `fit`; or leave this block out of "
        f"the block structure; or, to keep it with zero influences, pass a "
        f"positive float for it in `regularization`."
    )


def negligible_blocks(
    squared_norm_sums: Mapping[str, float],
    blocks: Union[BlockStructure, Mapping[str, int]],
    dtype: torch.dtype,
) -> List[str]:
    r"""Blocks whose gradients are at the level of rounding errors.

    A block whose gradient is zero in exact arithmetic (a bias that the loss
    does not depend on, say) still gets gradients of rounding noise; its
    `"auto"` $\lambda_l$ is then noise-sized, and the noise dominates every
    score through $1/\lambda_l$. Such a block has a mean squared gradient
    entry below $\epsilon^2$ times the largest block's, with $\epsilon$ the
    dtype's machine epsilon.

    Example:
        >>> import torch
        >>> negligible_blocks({"w": 10.0, "b": 1e-25}, {"w": 10, "b": 2}, torch.float32)
        ['b']
    """
    sizes = _sizes(blocks)
    per_entry = {k: float(squared_norm_sums[k]) / max(1, sizes[k]) for k in sizes}
    top = max(per_entry.values(), default=0.0)
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return [k for k, v in per_entry.items() if 0.0 < v <= eps * eps * top]
