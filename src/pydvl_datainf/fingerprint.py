r"""Fingerprints of what a fit depends on: the weights, the frozen weights, the loss.

`fit` caches per-sample gradients that are only valid for the model and the
loss they were computed with. This module identifies both:

- [weights_digest][pydvl_datainf.fingerprint.weights_digest]: a SHA-256 over the
  names, shapes, dtypes and bytes of the trainable parameters (any change of
  any value is detected, including edits through `.data` that keep sums);
- [frozen_digest][pydvl_datainf.fingerprint.frozen_digest]: a digest of every
  other tensor the gradients depend on, the frozen parameters (the base model
  of a LoRA fine-tune, in whatever quantization) and the buffers (e.g. batch
  norm statistics), with a CRC-32C per tensor (fast enough for a base model of
  billions of parameters);
- [loss_name][pydvl_datainf.fingerprint.loss_name]: the identity of a loss,
  its settings included: tensor settings such as `weight` or `pos_weight`,
  the arguments of a `functools.partial`, the values captured by a closure.
  A loss that cannot be identified raises
  [UnidentifiableLossError][pydvl_datainf.fingerprint.UnidentifiableLossError]:
  give it a name.

[WeightWatch][pydvl_datainf.fingerprint.WeightWatch] tells whether any of this
changed since fit. Its cheap check runs before every query: the trainable
weights are hashed again (they are small for LoRA), and every frozen tensor is
checked for being the same tensor, unmodified by torch's in-place operations
(its version counter), and holding the same values at a fixed sample of
positions. Its full check hashes every frozen tensor again; long runs (an
influence matrix, top-k, self-influence) make it once at their start.
`benchmarks/bench_fingerprint.py` measures both.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import types
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, cast

import numpy as np
import torch
from torch import nn

__all__ = [
    "weights_digest",
    "frozen_digest",
    "frozen_tensors",
    "FrozenRefs",
    "WeightWatch",
    "loss_name",
    "UnidentifiableLossError",
    "SAMPLE_SIZE",
]

SAMPLE_SIZE = 64
"""Values per frozen tensor that the cheap check compares (at fixed positions)."""


def _bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(cast(Any, t.view(torch.uint8).numpy()))


def weights_digest(params: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of `params`, in order.

    Example:
        >>> import torch
        >>> w = {"w": torch.tensor([1.0, 2.0])}
        >>> weights_digest(w) == weights_digest({"w": torch.tensor([2.0, 1.0])})
        False
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in params.items():
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
            h.update(_bytes(p))
    return h.hexdigest()


def frozen_tensors(
    model: nn.Module, trainable: Any = ()
) -> OrderedDict[str, torch.Tensor]:
    """Every parameter of `model` not in `trainable`, and every buffer, by name.

    These are what the per-sample gradients depend on besides the trainable
    weights: the frozen base of a LoRA model, embeddings, normalisation
    statistics. Tensors shared under several names are listed once.

    Args:
        model: the model.
        trainable: names of the parameters that are fingerprinted apart.

    Example:
        ```python
        import torch
        from pydvl_datainf.fingerprint import frozen_tensors

        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        names = list(frozen_tensors(model, ["0.weight", "0.bias"]))
        assert names == ["1.weight", "1.bias", "1.running_mean", "1.running_var",
                         "1.num_batches_tracked"]
        ```
    """
    skip = set(trainable)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, p in model.named_parameters():
        if name not in skip:
            out[name] = p
    for name, b in model.named_buffers():
        out[name] = b
    return out


class FrozenRefs:
    """Where each frozen tensor of a model lives (its module and attribute), so
    that the tensors the model holds *now* are read without walking it.

    Args:
        model: the model.
        trainable: names of the parameters that are fingerprinted apart.

    Example:
        ```python
        import torch
        from pydvl_datainf.fingerprint import FrozenRefs

        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
        refs = FrozenRefs(model, ["0.weight", "0.bias"])
        model[1].weight = torch.nn.Parameter(torch.zeros(1, 2))  # replaced
        assert refs.current()["1.weight"] is model[1].weight
        ```
    """

    def __init__(self, model: nn.Module, trainable: Any = ()):
        self._refs = []
        for name in frozen_tensors(model, trainable):
            owner, _, attr = name.rpartition(".")
            self._refs.append((name, model.get_submodule(owner), attr))

    def current(self) -> OrderedDict[str, torch.Tensor]:
        """The frozen tensors, by name, as the model holds them now."""
        return OrderedDict((name, getattr(m, attr)) for name, m, attr in self._refs)


def _crc32c(t: torch.Tensor) -> int:
    import google_crc32c

    view = np.asarray(_bytes(t))
    view.flags.writeable = False
    return int(google_crc32c.value(view))


def frozen_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Digest of `tensors`: SHA-256 over each one's name, shape, dtype and CRC-32C.

    A CRC-32C of every tensor's bytes (several GB/s) in place of a SHA-256 of
    them: it detects any accidental change, for models too large to hash with
    SHA-256 before every long run.

    Example:
        >>> import torch
        >>> a = {"w": torch.zeros(3)}
        >>> frozen_digest(a) == frozen_digest({"w": torch.zeros(3)})
        True
    """
    with torch.no_grad():
        return _combine(tensors, {k: _crc32c(t) for k, t in tensors.items()})


def _sample_positions(numel: int, seed: int) -> torch.Tensor:
    if numel <= SAMPLE_SIZE:
        return torch.arange(numel)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, numel, (SAMPLE_SIZE,), generator=g)


class _FrozenView:
    """What the cheap check remembers of one frozen tensor: which tensor it is,
    its version counter, and its values at a few fixed positions."""

    def __init__(self, t: torch.Tensor, seed: int, crc: int):
        self.seed = seed
        self.crc = crc
        self.remember(t)

    def remember(self, t: torch.Tensor) -> None:
        self.tensor = t
        self.ptr = t.data_ptr() if t.numel() else 0
        self.version = getattr(t, "_version", 0)
        self.meta = (tuple(t.shape), t.dtype)
        self.positions = _sample_positions(t.numel(), self.seed).to(t.device)
        self.sample = self._take(t)

    def _take(self, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return t.detach().reshape(-1)[self.positions].clone()

    def unchanged(self, t: torch.Tensor) -> bool:
        """Cheap when nothing happened; a full CRC-32C of `t` when anything
        did (another tensor, storage or version, or other sampled values), so
        that equal values put back or moved to another device are accepted."""
        if (
            t is self.tensor
            and (tuple(t.shape), t.dtype) == self.meta
            and (t.data_ptr() if t.numel() else 0) == self.ptr
            and getattr(t, "_version", 0) == self.version
            and t.device == self.positions.device
            and bool(torch.equal(self._take(t), self.sample))
        ):
            return True
        if (tuple(t.shape), t.dtype) != self.meta or _crc32c(t) != self.crc:
            return False
        self.remember(t)
        return True


class WeightWatch:
    """Remembers the weights a fit used and tells whether they changed.

    Args:
        params: the trainable parameters, by name (held by reference).
        digest: the digest they must have (default: the current one), e.g.
            the digest recorded at fit, after a move to another device.
        frozen: the frozen parameters and buffers, by name (see
            [frozen_tensors][pydvl_datainf.fingerprint.frozen_tensors]).
        frozen_digest: the digest they must have (default: the current one).

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> base = torch.zeros(100)
        >>> watch = WeightWatch({"p": p}, frozen={"base": base})
        >>> p.data[:] = p.data.flip(0)  # same sum, other values
        >>> watch.changed()
        'trainable'
        >>> p.data[:] = p.data.flip(0)
        >>> _ = base.add_(1.0)          # a frozen tensor changed in place
        >>> watch.changed()
        'frozen'
    """

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        digest: Optional[str] = None,
        frozen: Optional[Mapping[str, torch.Tensor]] = None,
        frozen_digest: Optional[str] = None,
    ):
        self.params = dict(params)
        self.digest = weights_digest(self.params) if digest is None else digest
        tensors = dict(frozen or {})
        with torch.no_grad():
            crcs = {k: _crc32c(t) for k, t in tensors.items()}
        now = _combine(tensors, crcs)
        self.frozen_digest = now if frozen_digest is None else frozen_digest
        self._views: Dict[str, _FrozenView] = {
            k: _FrozenView(t, i, crcs[k]) for i, (k, t) in enumerate(tensors.items())
        }
        self._stale = now != self.frozen_digest

    @property
    def frozen(self) -> Dict[str, torch.Tensor]:
        """The watched frozen tensors, by name."""
        return {k: v.tensor for k, v in self._views.items()}

    def changed(self, current: Optional[Mapping[str, torch.Tensor]] = None) -> str:
        """What changed since fit, by the cheap check: `"trainable"`,
        `"frozen"`, or `""` for nothing.

        The trainable weights are hashed in full. A frozen tensor passes at
        little cost when it is the same tensor, its version counter has not
        moved and its values at a fixed sample of positions are the same;
        otherwise its CRC-32C is computed and compared. An edit through
        `.data` (which torch does not count) of values outside the sample is
        seen by [changed_fully][pydvl_datainf.fingerprint.WeightWatch.changed_fully].

        Args:
            current: the frozen tensors the model holds now, by name (to see
                tensors replaced by new ones); default those watched.
        """
        if weights_digest(self.params) != self.digest:
            return "trainable"
        if self._stale:
            return "frozen"
        now = self.frozen if current is None else current
        if list(now) != list(self._views):
            return "frozen"
        with torch.no_grad():
            for k, view in self._views.items():
                if not view.unchanged(now[k]):
                    return "frozen"
        return ""

    def changed_fully(
        self, current: Optional[Mapping[str, torch.Tensor]] = None
    ) -> str:
        """As [changed][pydvl_datainf.fingerprint.WeightWatch.changed], then
        a full digest of every frozen tensor (one read of all of them)."""
        reason = self.changed(current)
        if reason:
            return reason
        now = self.frozen if current is None else current
        return "frozen" if frozen_digest(now) != self.frozen_digest else ""


def _combine(tensors: Mapping[str, torch.Tensor], crcs: Mapping[str, int]) -> str:
    h = hashlib.sha256()
    for name, t in tensors.items():
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{crcs[name]}|".encode())
    return h.hexdigest()


# --------------------------------------------------------------------- losses
class UnidentifiableLossError(TypeError):
    """A loss whose settings cannot be read, so that a store cannot tell it
    from another: pass `loss_id=` (a name that you change whenever the loss
    changes)."""


_MAX_DEPTH = 8


def _tensor_id(t: Any) -> str:
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    h = hashlib.sha256(_bytes(t)).hexdigest()[:16]
    return f"tensor{tuple(t.shape)}{t.dtype}[{h}]"


def _code_id(code: types.CodeType) -> str:
    h = hashlib.blake2b(code.co_code, digest_size=8)
    h.update(repr(code.co_consts).encode())
    h.update(repr(code.co_names).encode())
    return h.hexdigest()


def _function_id(f: types.FunctionType, depth: int) -> str:
    name = f"{getattr(f, '__module__', '')}.{f.__qualname__}"
    if "<" not in f.__qualname__ and not f.__closure__:
        return name  # a module-level function: by its name
    parts: List[str] = [_code_id(f.__code__)]  # a lambda or a nested function
    if f.__defaults__:
        parts.append("defaults=" + _describe(f.__defaults__, depth + 1))
    if f.__kwdefaults__:
        parts.append("kwdefaults=" + _describe(f.__kwdefaults__, depth + 1))
    if f.__closure__:
        cells = []
        for var, cell in zip(f.__code__.co_freevars, f.__closure__):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                value = None
            cells.append(f"{var}={_describe(value, depth + 1)}")
        parts.append("closure=(" + ", ".join(cells) + ")")
    return name + (f"[{'; '.join(parts)}]" if parts else "")


def _module_id(m: nn.Module, depth: int) -> str:
    cls = type(m)
    settings = {
        k: v
        for k, v in sorted(vars(m).items())
        if not k.startswith("_")
        and k != "training"
        and isinstance(v, (bool, int, float, str, type(None)))
    }
    name = f"{cls.__module__}.{cls.__qualname__}({m.extra_repr()}){settings}"
    others = {
        k: v
        for k, v in sorted(vars(m).items())
        if not k.startswith("_")
        and k != "training"
        and not isinstance(v, (bool, int, float, str, type(None)))
    }
    parts = [f"{k}={_describe(v, depth + 1)}" for k, v in others.items()]
    tensors = list(m.named_parameters()) + list(m.named_buffers())
    if tensors:
        parts.append(
            "tensors=(" + ", ".join(f"{k}={_tensor_id(t)}" for k, t in tensors) + ")"
        )
    children = [f"{k}={_module_id(c, depth + 1)}" for k, c in m.named_children()]
    parts += children
    return name + (f"[{'; '.join(parts)}]" if parts else "")


def _describe(value: Any, depth: int = 0) -> str:
    """A stable description of a loss or of one of its settings."""
    if depth > _MAX_DEPTH:
        raise UnidentifiableLossError("the loss's settings nest too deeply")
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return repr(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return str(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _tensor_id(value)
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(v, depth + 1) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, dict):
        items = sorted((repr(k), _describe(v, depth + 1)) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if isinstance(value, functools.partial):
        args = [_describe(a, depth + 1) for a in value.args]
        args += [
            f"{k}={_describe(v, depth + 1)}" for k, v in sorted(value.keywords.items())
        ]
        return f"partial({_describe(value.func, depth + 1)}, {', '.join(args)})"
    if isinstance(value, types.FunctionType):
        return _function_id(value, depth)
    if inspect.isbuiltin(value) or isinstance(value, type):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if isinstance(value, types.MethodType):
        return f"{_describe(value.__self__, depth + 1)}.{value.__func__.__name__}"
    if isinstance(value, types.ModuleType):
        return f"module {value.__name__}"
    if isinstance(value, nn.Module):
        return _module_id(value, depth)
    if callable(value) and hasattr(value, "__dict__"):
        cls = type(value)
        state = {k: v for k, v in vars(value).items() if not k.startswith("__")}
        return f"{cls.__module__}.{cls.__qualname__}{_describe(state, depth + 1)}"
    raise UnidentifiableLossError(
        f"cannot read the settings of {type(value).__module__}."
        f"{type(value).__qualname__}"
    )


def loss_name(loss: Any, loss_id: Optional[str] = None) -> str:
    """The identity of a loss: its name and every setting that changes its value.

    Module-level functions are named by `module.qualname` (their code, default
    arguments and the globals they read are not part of the identity: give
    such a function another name when you change it). Functions defined inside
    others (lambdas, closures) add a digest of their code, their default
    arguments and the values they capture. The arguments of a
    `functools.partial`, the attributes, parameters and buffers of a
    `torch.nn` loss module (e.g. `weight`, `pos_weight`, `label_smoothing`)
    and the attributes of other callable objects are included, tensors by a
    digest of their values.

    Args:
        loss: the loss.
        loss_id: a name given by the user, used instead (for a loss whose
            settings cannot be read; change it whenever the loss changes).

    Raises:
        UnidentifiableLossError: `loss` (or a value it captures) cannot be
            identified and no `loss_id` was given.

    Example:
        >>> import functools, torch
        >>> ce = torch.nn.functional.cross_entropy
        >>> loss_name(ce)
        'torch.nn.functional.cross_entropy'
        >>> w = torch.tensor([1.0, 3.0])
        >>> loss_name(functools.partial(ce, weight=w)) == loss_name(
        ...     functools.partial(ce, weight=w * 2))
        False
    """
    if loss_id is not None:
        if not isinstance(loss_id, str) or not loss_id:
            raise ValueError(f"loss_id must be a non-empty string, got {loss_id!r}")
        return f"user:{loss_id}"
    try:
        return _describe(loss)
    except UnidentifiableLossError as e:
        raise UnidentifiableLossError(
            f"The loss {loss!r} cannot be identified ({e}), so a gradient store "
            f"could not tell it from another loss. Pass loss_id='<a name>' and "
            f"change the name whenever the loss changes."
        ) from None
