r"""Per-sample gradients from one batched forward and one batched backward.

[HookGradientEngine][pydvl_datainf.hooks.HookGradientEngine] computes the
per-sample gradients that DataInf needs without looping over samples and
without `torch.func`. For a batch $x_1, \dots, x_B$ it

1. installs forward hooks on the modules that *own* the requested parameters
   (and only on those: frozen layers cost nothing beyond the forward and the
   backward pass through them), capturing each call's input activations $a$ and
   the autograd edge of its output $z$;
2. runs **one** batched forward `out = model(x)`;
3. evaluates the per-sample losses exactly as pyDVL's convention demands, i.e.
   with the user's loss on a batch of one,
   $\ell_i = \mathrm{loss}(\mathrm{out}[i{:}i{+}1], y[i{:}i{+}1])$ (in one
   call for common `torch.nn.functional` losses, else vectorised with
   `torch.func.vmap` when possible, otherwise in a loop over the batch),
   whatever the reduction of the loss;
4. runs **one** backward of $L = \sum_i \ell_i$ with respect to the captured
   module outputs (never to the parameters, so that no `.grad` is populated);
5. turns activations and output gradients into per-sample gradients with the
   per-layer rules of [grad_rules][pydvl_datainf.grad_rules], summing the
   contributions of modules called several times in one forward. With
   `per_sample_grads_factored` (what `fit` uses), a linear layer called once
   on one vector per sample returns its weight gradients as the rank-one
   factors $(\partial L/\partial z_i, a_i)$ instead
   ([pydvl_datainf.factored][]).

The key identity is that, when samples do not interact in the forward,
$\partial L / \partial z_i = \partial \ell_i / \partial z_i$ for the output
$z_i$ of every layer on sample $i$, so that, e.g. for a linear layer
$z_{it} = W a_{it} + b$ on tokens $t$,

$$
\nabla_W \ell_i = \sum_{\text{calls}} \sum_t
    \frac{\partial L}{\partial z_{it}} a_{it}^\top .
$$

Requirements and caveats:

* **Samples must not interact in the forward.** Dropout must be off and batch
  normalisation must use its running statistics: the model must be in
  `eval()` mode. The engine does **not** call `model.train()` or
  `model.eval()`; the caller (`DataInfInfluence` in this library) puts the
  model in evaluation mode.
* Hooked modules must see the batch in the first dimension of their inputs and
  outputs. Modules whose activations do not have the batch size in dimension 0
  (e.g. after a reshape to `(B * T, F)`) are detected and their parameters are
  computed by the fallback engine. Modules called on a batch of one whose
  output is broadcast over the batch (position embeddings) are handled by
  expanding their output (see `expand_shared`).
* A parameter must be used only through its owning module's `forward` (tied
  weights shared by several modules are fine: every owner contributes). A
  parameter also used functionally elsewhere (`F.linear(h, emb.weight)`)
  would get a partial gradient; pass `validate=True` to detect this.
* Parameters owned by a module type without a rule, or that are not the
  `weight` / `bias` of their module, are computed by a fallback engine
  (`torch.func` by default) restricted to those parameters; if that fails a
  `ValueError` names them and their module types.
* In-place operations on a module's *output* are harmless (the gradient is
  taken at the output's autograd edge, before the modification); a module
  whose *input* is modified in place after the call is detected and left to
  the fallback engine.
* Modules only ever called with autograd disabled (as in reentrant gradient
  checkpointing) are left to the fallback engine; non-reentrant checkpointing
  works.
* Half-precision (`bfloat16`, `float16`) models: the backward runs in the
  model's dtype, but the per-sample products are accumulated and returned in
  float32 (see [accumulation_dtype][pydvl_datainf.gradients.accumulation_dtype]).

Importing this module registers the engine as `"hooks"` and makes it the
default of [get_engine][pydvl_datainf.gradients.get_engine] (`"auto"`).

Example:
    ```python
    import torch
    from torch import nn
    from pydvl_datainf.hooks import HookGradientEngine

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    model[0].requires_grad_(False)  # frozen: no per-sample gradient, no hook
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    grads = HookGradientEngine().per_sample_grads(
        model, nn.functional.cross_entropy,
        torch.randn(16, 4), torch.randint(0, 3, (16,)), params,
    )
    grads["2.weight"].shape  # torch.Size([16, 24])
    ```
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_map

from pydvl_datainf.factored import FactoredGrads, Rows, densify
from pydvl_datainf.grad_rules import (
    RULE_PARAMS,
    GradRule,
    accepts_out,
    get_factor_rule,
    get_rule,
)
from pydvl_datainf.gradients import (
    FuncGradientEngine,
    GradientEngine,
    LoopGradientEngine,
    LossFn,
    accumulation_dtype,
    register_engine,
)

__all__ = ["HookGradientEngine", "HookPlan", "HookedModule"]

logger = logging.getLogger(__name__)


@dataclass
class HookedModule:
    """A module that receives hooks, and what its rule computes.

    Attributes:
        name: the module's name in `model.named_modules()`.
        module: the module itself.
        rule: its per-layer rule.
        params: requested parameter names by local name (`"weight"`, `"bias"`).
    """

    name: str
    module: nn.Module
    rule: GradRule
    params: Dict[str, str] = field(default_factory=dict)


@dataclass
class HookPlan:
    """Which modules are hooked and which parameters go to the fallback.

    Attributes:
        hooked: the modules that get hooks.
        fallback: requested parameter names that the rules cannot handle, with
            the reason.
    """

    hooked: List[HookedModule] = field(default_factory=list)
    fallback: Dict[str, str] = field(default_factory=dict)

    @property
    def hooked_names(self) -> List[str]:
        """Names of the hooked modules."""
        return [h.name for h in self.hooked]


def _slice_batch(out: Any, i: int, batch: int) -> Any:
    """`out[i:i+1]` for every tensor leaf of `out` with the batch in dim 0."""

    def cut(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch:
            return t[i : i + 1]
        return t

    return tree_map(cut, out)


def _allocate(
    names: List[str], params: Mapping[str, torch.Tensor], batch: int
) -> Dict[str, torch.Tensor]:
    """Uninitialised `(batch, numel)` outputs that the rules write into."""
    out: Dict[str, torch.Tensor] = {}
    for name in names:
        p = params[name]
        out[name] = torch.empty(
            batch, p.numel(), dtype=accumulation_dtype(p.dtype), device=p.device
        )
    return out


_CLASS_LOSSES = (F.cross_entropy, F.nll_loss)
_ELEMENT_LOSSES = (
    F.mse_loss,
    F.l1_loss,
    F.smooth_l1_loss,
    F.huber_loss,
    F.binary_cross_entropy_with_logits,
    F.binary_cross_entropy,
)


def _closed_form_losses(
    loss: LossFn, out: Any, y: torch.Tensor
) -> Optional[torch.Tensor]:
    """The per-sample losses of common `torch.nn.functional` losses (called with
    their defaults) in one call, in the cases where `reduction="none"` gives
    exactly the batch-of-one values; `None` otherwise."""
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or len(out) != len(y):
        return None
    if loss in _CLASS_LOSSES:
        if out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
            if bool((y == -100).any()):  # ignored target: a batch of one is NaN
                return None
            return loss(out, y, reduction="none")
        return None
    if loss in _ELEMENT_LOSSES and out.shape == y.shape:
        return loss(out, y, reduction="none").reshape(len(y), -1).mean(1)
    return None


def per_sample_losses(
    loss: LossFn, out: Any, y: torch.Tensor, vectorize: bool = True
) -> torch.Tensor:
    """The losses $\\ell_i = $ `loss(out[i:i+1], y[i:i+1])`, as a vector.

    Common losses of `torch.nn.functional` with their default arguments
    (`cross_entropy` and `nll_loss` on class indices; `mse_loss`, `l1_loss`,
    `smooth_l1_loss`, `huber_loss` and the binary cross-entropies on targets of
    the output's shape) are evaluated in one call with `reduction="none"`,
    which gives the same values.

    Args:
        loss: the user's loss, applied to batches of one.
        out: the batched model output (a tensor or a pytree of tensors).
        y: the batched targets.
        vectorize: try `torch.func.vmap` over the loss first; on any failure
            fall back to a Python loop.

    Returns:
        A tensor of shape `(len(y),)`, differentiable with respect to `out`.
    """
    batch = len(y)
    closed = _closed_form_losses(loss, out, y)
    if closed is not None:
        return closed
    if vectorize:
        try:

            def one(o: Any, t: torch.Tensor) -> torch.Tensor:
                return loss(tree_map(lambda u: u.unsqueeze(0), o), t.unsqueeze(0))

            values = torch.func.vmap(one)(out, y)
            if values.shape == (batch,):
                return values
            logger.debug("vmap over the loss gave shape %s", tuple(values.shape))
        except Exception as e:  # noqa: BLE001 - any failure means: loop instead
            logger.debug("vmap over the loss failed (%s); looping", e)
    return torch.stack(
        [
            loss(_slice_batch(out, i, batch), y[i : i + 1]).reshape(())
            for i in range(batch)
        ]
    )


class HookGradientEngine(GradientEngine):
    """Per-sample gradients with module hooks: one forward, one backward.

    See the [module documentation][pydvl_datainf.hooks] for the algorithm and
    its requirements (in particular: the model must be in `eval()` mode).

    Args:
        fallback: engine for the parameters that no rule covers: `"auto"`
            (default: `torch.func`, and the autograd loop where `torch.func`
            fails, e.g. on Hugging Face attention masks), `"func"`, `"loop"`,
            an engine instance, or `None` to raise a `ValueError` instead.
        vectorize_loss: evaluate the per-sample losses with `torch.func.vmap`
            when the loss allows it (otherwise, or on failure, a loop).
        validate: also compute the gradient of the summed loss with respect to
            the hooked parameters in the same backward, and raise a
            `RuntimeError` if it differs from the sum of the per-sample
            gradients (e.g. a parameter used outside its module's forward).
            Costs one extra weight-gradient product per hooked layer. Not
            meaningful for embeddings with `scale_grad_by_freq`. It does not
            detect samples interacting in the forward (train mode): the
            per-sample split then still sums to the batch gradient.
        expand_shared: a hooked module called on a batch of one inside the
            batched forward (e.g. Hugging Face position embeddings, looked up
            with position ids of shape `(1, L)`) has an output that is shared
            by all samples, and its gradient would mix them. With this option
            the output (and the input given to the rule) is expanded to the
            batch size, so that each sample gets its own branch. This is exact
            whenever the output is broadcast against batched tensors (the
            usual case); a model that instead reduces over that dimension
            would change. Without it, such modules go to the fallback.
    """

    name = "hooks"

    def __init__(
        self,
        fallback: Union[str, GradientEngine, None] = "auto",
        vectorize_loss: bool = True,
        validate: bool = False,
        expand_shared: bool = True,
    ):
        if isinstance(fallback, str) and fallback not in ("auto", "func", "loop"):
            raise ValueError(
                f"fallback must be 'auto', 'func', 'loop', an engine or None, not "
                f"{fallback!r}"
            )
        self.fallback = fallback
        self.vectorize_loss = vectorize_loss
        self.validate = validate
        self.expand_shared = expand_shared

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(fallback={self.fallback!r}, "
            f"vectorize_loss={self.vectorize_loss}, validate={self.validate}, "
            f"expand_shared={self.expand_shared})"
        )

    @staticmethod
    def plan(model: nn.Module, params: Mapping[str, torch.Tensor]) -> HookPlan:
        """Finds the modules owning `params` and whether a rule covers them.

        Ownership is by identity, so that a parameter tied between several
        modules is credited to all of them.

        Args:
            model: the model.
            params: the requested parameters by name.

        Returns:
            The plan: hooked modules and parameters left to the fallback.
        """
        by_id: Dict[int, str] = {}
        for name, p in params.items():
            by_id.setdefault(id(p), name)
        first_names = set(by_id.values())
        owners: Dict[str, List[Tuple[str, nn.Module, str]]] = {k: [] for k in params}
        for mod_name, mod in model.named_modules():
            for local, p in mod._parameters.items():
                if p is not None and id(p) in by_id:
                    owners[by_id[id(p)]].append((mod_name, mod, local))

        plan = HookPlan()
        for name in params:
            if name not in first_names:  # same tensor requested twice
                plan.fallback[name] = "duplicate of another requested parameter"
                continue
            found = owners[name]
            if not found:
                plan.fallback[name] = "not owned by any submodule of the model"
                continue
            for mod_name, mod, local in found:
                label = f"{mod_name or '<root>'} ({type(mod).__name__})"
                if local not in RULE_PARAMS:
                    plan.fallback[name] = f"'{local}' of {label} is not weight/bias"
                    break
                if get_rule(type(mod)) is None:
                    plan.fallback[name] = f"no rule for {label}"
                    break

        hooked: Dict[int, HookedModule] = {}
        for name, found in owners.items():
            if name in plan.fallback:
                continue
            for mod_name, mod, local in found:
                h = hooked.get(id(mod))
                if h is None:
                    rule = get_rule(type(mod))
                    assert rule is not None
                    h = hooked[id(mod)] = HookedModule(mod_name, mod, rule)
                h.params[local] = name
        plan.hooked = list(hooked.values())
        return plan

    def per_sample_grads(
        self,
        model: nn.Module,
        loss: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        params: Mapping[str, nn.Parameter],
    ) -> Dict[str, torch.Tensor]:
        grads = self._per_sample(model, loss, x, y, params, factored=False)
        return {k: densify(v) for k, v in grads.items()}

    def per_sample_grads_factored(
        self,
        model: nn.Module,
        loss: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        params: Mapping[str, nn.Parameter],
    ) -> Dict[str, Rows]:
        """Like `per_sample_grads`, but rank-one weight gradients stay factored.

        A weight is returned as
        [FactoredGrads][pydvl_datainf.factored.FactoredGrads] when its layer has
        a factor rule that accepts the call (e.g. `nn.Linear` on inputs without
        a token dimension) and the layer is called once per forward; all other
        parameters are dense, as from `per_sample_grads`.

        The factors may be views of the layer's input, which can be `x`
        itself: copy them before changing `x` in place.
        """
        return self._per_sample(model, loss, x, y, params, factored=True)

    def _per_sample(
        self,
        model: nn.Module,
        loss: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        params: Mapping[str, nn.Parameter],
        factored: bool,
    ) -> Dict[str, Rows]:
        batch = len(x)
        if batch == 0:
            return {
                k: torch.empty(0, p.numel(), dtype=accumulation_dtype(p.dtype))
                for k, p in params.items()
            }
        plan = self.plan(model, params)
        fallback = dict(plan.fallback)
        result: Dict[str, Rows] = {}

        changed = [p for p in params.values() if not p.requires_grad]
        for p in changed:
            p.requires_grad_(True)
        try:
            if plan.hooked:
                hooked, failed = self._hooked_pass(
                    model, loss, x, y, params, plan, factored
                )
                result.update(hooked)
                fallback.update(failed)
            if fallback:
                result.update(self._fallback(model, loss, x, y, params, fallback))
        finally:
            for p in changed:
                p.requires_grad_(False)
        return {k: result[k] for k in params}

    def _hooked_pass(
        self,
        model: nn.Module,
        loss: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        params: Mapping[str, nn.Parameter],
        plan: HookPlan,
        factored: bool = False,
    ) -> Tuple[Dict[str, Rows], Dict[str, str]]:
        """One forward and one backward; returns gradients and failed params."""
        batch = len(x)
        # per module: (inputs, their versions, output edge) for each call
        calls: Dict[int, List[Tuple[Tuple[Any, ...], List[int], GradientEdge]]] = {
            id(h.module): [] for h in plan.hooked
        }
        capturing = [True]
        untracked: set = set()  # modules called with autograd off

        def hook(
            mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any
        ) -> Optional[torch.Tensor]:
            if not capturing[0]:
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                untracked.add(id(mod))
                return None
            inputs = args if args else tuple(kwargs.values())
            inputs = tuple(
                a.detach() if isinstance(a, torch.Tensor) else a for a in inputs
            )
            versions = [a._version for a in inputs if isinstance(a, torch.Tensor)]
            first = inputs[0] if inputs else None
            if (
                self.expand_shared
                and batch > 1
                and output.dim() > 0
                and output.shape[0] == 1
                and isinstance(first, torch.Tensor)
                and first.dim() > 0
                and first.shape[0] == 1
            ):  # shared by the whole batch: one branch per sample
                output = output.expand(batch, *output.shape[1:])
                inputs = (first.expand(batch, *first.shape[1:]), *inputs[1:])
                calls[id(mod)].append((inputs, versions, get_gradient_edge(output)))
                return output
            calls[id(mod)].append((inputs, versions, get_gradient_edge(output)))
            return None

        handles = [
            h.module.register_forward_hook(hook, with_kwargs=True) for h in plan.hooked
        ]
        try:
            with torch.enable_grad():
                out = model(x)
        finally:
            capturing[0] = False
            for handle in handles:
                handle.remove()

        with torch.enable_grad():
            total = per_sample_losses(loss, out, y, self.vectorize_loss).sum()
        del out

        order = [(h, c) for h in plan.hooked for c in calls[id(h.module)]]
        edges: List[GradientEdge] = [e for _, (_, _, e) in order]
        checked: List[Tuple[str, torch.Tensor]] = []
        if self.validate:
            checked = [
                (name, params[name]) for h in plan.hooked for name in h.params.values()
            ]
        grads: List[Optional[torch.Tensor]] = [None] * (len(edges) + len(checked))
        if edges and total.requires_grad:
            grads = list(
                torch.autograd.grad(
                    total,
                    [*edges, *(get_gradient_edge(p) for _, p in checked)],
                    allow_unused=True,
                )
            )
        del total

        names = [n for h in plan.hooked for n in h.params.values()]
        uses: Dict[str, int] = {}
        for h, _ in order:
            for n in h.params.values():
                uses[n] = uses.get(n, 0) + 1
        result: Dict[str, Any] = {}

        def buffer(name: str) -> torch.Tensor:
            if name not in result:
                result.update(_allocate([name], params, batch))
            return cast(torch.Tensor, result[name])

        written: set = set()
        failed: Dict[str, str] = {}
        for h in plan.hooked:
            if id(h.module) in untracked and not calls[id(h.module)]:
                # e.g. reentrant gradient checkpointing: let the fallback decide
                reason = (
                    f"{h.name} ({type(h.module).__name__}) was only called with "
                    "autograd disabled (gradient checkpointing?)"
                )
                failed.update({n: reason for n in h.params.values()})
        for i, (h, (inputs, versions, _)) in enumerate(order):
            g, grads[i] = grads[i], None  # free output gradients as we go
            if g is None or any(n in failed for n in h.params.values()):
                continue
            tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
            if [a._version for a in tensors] != versions:
                reason = (
                    f"the input of {h.name} ({type(h.module).__name__}) was "
                    "modified in place after the call"
                )
                failed.update({n: reason for n in h.params.values()})
                continue
            a = inputs[0] if inputs else None
            if (
                not isinstance(a, torch.Tensor)
                or a.dim() == 0
                or a.shape[0] != batch
                or g.dim() == 0
                or g.shape[0] != batch
            ):
                reason = (
                    f"{h.name} ({type(h.module).__name__}) does not see the batch "
                    "in dimension 0"
                )
                failed.update({n: reason for n in h.params.values()})
                continue
            local_names = dict(h.params)
            weight_name = local_names.get("weight")
            factor_rule = get_factor_rule(type(h.module)) if factored else None
            if (
                factor_rule is not None
                and weight_name is not None
                and uses[weight_name] == 1
            ):
                try:
                    factors = factor_rule(h.module, inputs, g)
                except Exception as e:  # noqa: BLE001 - the dense rule decides
                    logger.debug("factor rule for %s failed (%s)", h.name, e)
                    factors = None
                if factors is not None:
                    left, right = factors
                    result[weight_name] = FactoredGrads(left.detach(), right.detach())
                    written.add(weight_name)
                    del local_names["weight"]
            if not local_names:
                continue
            kwargs: Dict[str, Any] = {}
            if accepts_out(h.rule):
                kwargs["out"] = {
                    local: buffer(name).view(batch, *params[name].shape)
                    for local, name in local_names.items()
                    if name not in written
                }
            try:
                rule: Any = h.rule
                per_sample = rule(
                    h.module, inputs, g, names=list(local_names), **kwargs
                )
            except Exception as e:  # noqa: BLE001 - reported, then fallback
                logger.warning("rule for %s failed (%s); using fallback", h.name, e)
                reason = f"rule for {h.name} ({type(h.module).__name__}) failed: {e}"
                failed.update({n: reason for n in h.params.values()})
                continue
            for local, name in local_names.items():
                value = per_sample[local].reshape(batch, -1)
                if name in written:
                    buffer(name).add_(value)
                else:
                    dst = buffer(name)
                    if value.data_ptr() != dst.data_ptr():
                        dst.copy_(value)  # the rule did not use `out`
                    written.add(name)
            del per_sample, g

        for name in names:
            if name in failed:
                result.pop(name, None)
            elif name not in written:  # never called, or no gradient reached it
                buffer(name).zero_()

        for (name, checked_param), g in zip(checked, grads[len(edges) :]):
            if name in failed:
                continue
            self._check(name, checked_param, densify(result[name]), g)
        return result, failed

    @staticmethod
    def _check(
        name: str, p: torch.Tensor, per_sample: torch.Tensor, g: Optional[torch.Tensor]
    ) -> None:
        """Raises if the summed per-sample gradients differ from the batch one.

        The error is measured relative to the sum of the per-sample magnitudes,
        the scale of rounding errors even when the per-sample gradients cancel.
        """
        dtype = per_sample.dtype
        total = per_sample.sum(0)
        ref = torch.zeros_like(total) if g is None else g.detach().reshape(-1).to(dtype)
        scale = per_sample.abs().sum(0).norm().item()
        tol = {torch.float64: 1e-8, torch.float32: 1e-3}.get(p.dtype, 5e-2)
        diff = (total - ref).norm().item()
        if diff > tol * scale + torch.finfo(dtype).tiny:
            raise RuntimeError(
                f"per-sample gradients of {name!r} do not sum to the batch gradient "
                f"(error {diff:.2e}, scale {scale:.2e}); is the parameter used "
                "outside its module's forward?"
            )

    def _fallback(
        self,
        model: nn.Module,
        loss: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        params: Mapping[str, nn.Parameter],
        reasons: Mapping[str, str],
    ) -> Dict[str, torch.Tensor]:
        """Per-sample gradients of the parameters no rule could handle."""
        details = "; ".join(f"{k}: {v}" for k, v in reasons.items())
        if self.fallback is None:
            raise ValueError(
                f"No per-sample gradient rule for these parameters: {details}. "
                "Register a rule (pydvl_datainf.grad_rules.register_rule) or use "
                "a fallback engine."
            )
        engine: GradientEngine
        if isinstance(self.fallback, GradientEngine):
            engine = self.fallback
        elif self.fallback == "loop":
            engine = LoopGradientEngine()
        else:
            engine = FuncGradientEngine()
        logger.info("%s computes %d parameter(s): %s", engine, len(reasons), details)
        subset = {k: params[k] for k in reasons}
        try:
            return engine.per_sample_grads(model, loss, x, y, subset)
        except Exception as e:
            if self.fallback == "auto":
                # torch.func cannot trace data-dependent control flow (e.g. HF
                # attention masks): the autograd loop always works
                logger.warning(
                    "torch.func failed (%s: %s); computing %d parameter(s) with "
                    "the autograd loop",
                    type(e).__name__,
                    e,
                    len(reasons),
                )
                return LoopGradientEngine().per_sample_grads(model, loss, x, y, subset)
            raise ValueError(
                f"No per-sample gradient rule for these parameters, and the "
                f"fallback {engine!r} failed ({type(e).__name__}: {e}): {details}. "
                "Register a rule (pydvl_datainf.grad_rules.register_rule), or use "
                "HookGradientEngine(fallback='loop') or engine='loop'."
            ) from e


register_engine(HookGradientEngine.name, HookGradientEngine, default=True)
