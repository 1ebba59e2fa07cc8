"""Engines by name: `get_engine("auto")` is the hook engine.

The built-in engines are `"hooks"`
([HookGradientEngine][pydvl_datainf.gradients.hooks.engine.HookGradientEngine],
the default that `"auto"` resolves to), `"func"`
([FuncGradientEngine][pydvl_datainf.gradients.func.FuncGradientEngine]) and
`"loop"` ([LoopGradientEngine][pydvl_datainf.gradients.loop.LoopGradientEngine]).
The default is fixed here, not by importing anything; `register_engine(...,
default=True)` changes it explicitly.
"""

from __future__ import annotations

from typing import Callable, Dict, Union

from .engine import GradientEngine
from .func import FuncGradientEngine
from .hooks import HookGradientEngine
from .loop import LoopGradientEngine

__all__ = ["DEFAULT_ENGINE", "get_engine", "register_engine"]

DEFAULT_ENGINE = HookGradientEngine.name
"""The engine that `"auto"` resolves to, unless changed by `register_engine`."""

_ENGINES: Dict[str, Callable[[], GradientEngine]] = {
    HookGradientEngine.name: HookGradientEngine,
    FuncGradientEngine.name: FuncGradientEngine,
    LoopGradientEngine.name: LoopGradientEngine,
}
_default = [DEFAULT_ENGINE]


def register_engine(
    name: str, factory: Callable[[], GradientEngine], default: bool = False
) -> None:
    """Make an engine available by name to
    [get_engine][pydvl_datainf.gradients.registry.get_engine].

    Args:
        name: the name users pass as `engine=`.
        factory: a callable returning a new engine.
        default: whether `"auto"` resolves to this engine from now on.

    Example:
        ```python
        from pydvl_datainf.gradients import (
            LoopGradientEngine, get_engine, register_engine,
        )

        register_engine("slow", LoopGradientEngine)
        assert isinstance(get_engine("slow"), LoopGradientEngine)
        ```
    """
    if name == "auto":
        raise ValueError("'auto' is reserved for the default engine")
    _ENGINES[name] = factory
    if default:
        _default[0] = name


def get_engine(engine: Union[str, GradientEngine] = "auto") -> GradientEngine:
    """An engine instance from a name (`"auto"`, `"hooks"`, `"func"`, `"loop"`,
    ...) or itself.

    `"auto"` is the hook engine (one batched forward and backward, per-layer
    rules, a module-local fallback for layers without a rule).

    Raises:
        ValueError: for an unknown name; the message lists the known ones.

    Example:
        ```python
        from pydvl_datainf.gradients import HookGradientEngine, get_engine

        assert isinstance(get_engine("auto"), HookGradientEngine)
        ```
    """
    if isinstance(engine, GradientEngine):
        return engine
    name = _default[0] if engine == "auto" else engine
    try:
        return _ENGINES[name]()
    except KeyError:
        raise ValueError(
            f"Unknown gradient engine {engine!r}; known engines: "
            f"{sorted(['auto', *_ENGINES])}"
        ) from None
