"""The hook engine: one batched forward, one batched backward, then rules."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union, cast

import torch
from torch import nn

from ...factored import Rows, densify
from ...projection import ProjectedGrads, Projection, project_rows
from ..engine import GradientEngine, LossFn, accumulation_dtype, check_projections
from ..func import FuncGradientEngine
from ..loop import LoopGradientEngine
from .backward import check_sum, output_gradients
from .capture import Call, Capture
from .dispatch import Accumulator, Result, call_problem, dispatch, dispatch_traced
from .plan import HookedModule, HookPlan, make_plan, warn_once

__all__ = ["HookGradientEngine"]

logger = logging.getLogger(__name__)


def _edges(order: List[Tuple[HookedModule, Call]]) -> Tuple[List[Any], List[int]]:
    """The output edges to differentiate: per call, its output, then the
    outputs of its traced uses; and the index of each call's first edge."""
    edges: List[Any] = []
    first: List[int] = []
    for _, call in order:
        first.append(len(edges))
        edges.append(call.edge)
        edges.extend(u.edge for u in call.traced or [])
    return edges, first


def _use_counts(order: List[Tuple[HookedModule, Call]]) -> Dict[str, int]:
    """How many contributions each parameter gets (calls, or traced uses)."""
    uses: Dict[str, int] = {}
    for h, call in order:
        if call.traced is not None:
            for u in call.traced:
                name = h.params[u.local]
                uses[name] = uses.get(name, 0) + 1
        else:
            for n in h.params.values():
                uses[n] = uses.get(n, 0) + 1
    return uses


def _untracked(plan: HookPlan, capture: Capture) -> Dict[str, str]:
    """Parameters of modules only ever called with autograd disabled (e.g.
    reentrant gradient checkpointing), with the reason: the fallback decides."""
    failed: Dict[str, str] = {}
    for h in plan.hooked:
        if id(h.module) in capture.untracked and not capture.calls[id(h.module)]:
            reason = (
                f"{h.label} was only called with autograd disabled "
                "(gradient checkpointing?)"
            )
            failed.update({n: reason for n in h.params.values()})
    return failed


class HookGradientEngine(GradientEngine):
    """Per-sample gradients with module hooks: one forward, one backward.

    See the [package documentation][pydvl_datainf.gradients.hooks] for the
    algorithm and its requirements (in particular: the model must be in
    `eval()` mode). Print `engine.plan(model, params)` to see which module
    computes which parameter, and how.

    Args:
        fallback: engine for the parameters that neither a rule nor the
            module-local fallback covers: `"auto"` (default: `torch.func`, and
            the autograd loop where `torch.func` fails, e.g. on Hugging Face
            attention masks), `"func"`, `"loop"`, an engine instance, or
            `None` to raise a `ValueError` instead.
        vectorize_loss: evaluate the per-sample losses with `torch.func.vmap`
            when the loss allows it (otherwise, or on failure, a loop).
        validate: also compute the gradient of the summed loss with respect to
            the hooked parameters in the same backward, and raise a
            `RuntimeError` if it differs from the sum of the per-sample
            gradients (e.g. a parameter used outside its module's forward).
            Costs one extra weight-gradient product per hooked layer. Not
            meaningful for embeddings with `scale_grad_by_freq`. It does not
            detect samples interacting in the forward (train mode).
        expand_shared: a hooked module called on a batch of one inside the
            batched forward (e.g. Hugging Face position embeddings, looked up
            with position ids of shape `(1, L)`) has an output that is shared
            by all samples. With this option the output (and the input given
            to the rule) is expanded to the batch size, so that each sample
            gets its own branch. This is exact whenever the output is
            broadcast against batched tensors (the usual case). Without it,
            such modules go to the fallback.
        local: compute the parameters of modules without a rule with the
            module-local fallback (re-running only that module's forward,
            vmapped over samples) instead of the whole-model `fallback`.
        trace: for modules without a rule, first trace the uses of their
            parameters in the batched forward: when every use is a linear map
            (`F.linear`, `x @ P`, `x @ P.T`, as in loralib), the gradients
            come from the recorded inputs and output gradients, without
            running the module again (rank-one factors for one vector per
            sample); otherwise, and with `trace=False`, the module is re-run
            vmapped.

    Example:
        ```python
        import torch
        from torch import nn
        from pydvl_datainf.gradients import HookGradientEngine

        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        params = dict(model.named_parameters())
        engine = HookGradientEngine()
        print(engine.plan(model, params))
        grads = engine.per_sample_grads(
            model, nn.functional.cross_entropy,
            torch.randn(16, 4), torch.randint(0, 3, (16,)), params,
        )
        assert grads["2.weight"].shape == (16, 24)
        ```
    """

    name = "hooks"

    def __init__(
        self,
        fallback: Union[str, GradientEngine, None] = "auto",
        vectorize_loss: bool = True,
        validate: bool = False,
        expand_shared: bool = True,
        local: bool = True,
        trace: bool = True,
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
        self.local = local
        self.trace = trace

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(fallback={self.fallback!r}, "
            f"vectorize_loss={self.vectorize_loss}, validate={self.validate}, "
            f"expand_shared={self.expand_shared}, local={self.local}, "
            f"trace={self.trace})"
        )

    def plan(self, model: nn.Module, params: Mapping[str, torch.Tensor]) -> HookPlan:
        """Which module computes which of `params`, and how.

        Ownership is by identity, so that a parameter tied between several
        modules is credited to all of them. A module whose calls turn out not
        to be separable by sample (seen only during the pass) still goes to
        the whole-model fallback, with a warning naming it.

        Args:
            model: the model.
            params: the requested parameters by name.

        Returns:
            The plan; `print(plan)` lists parameter, module and method.
        """
        return make_plan(model, params, local=self.local)

    def per_sample_grads(
        self,
        model: nn.Module,
        loss: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        params: Mapping[str, nn.Parameter],
    ) -> Dict[str, torch.Tensor]:
        grads = self._per_sample(model, loss, x, y, params, factored=False)
        return {k: densify(cast(Rows, v)) for k, v in grads.items()}

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
        grads = self._per_sample(model, loss, x, y, params, factored=True)
        return cast(Dict[str, Rows], grads)

    def per_sample_grads_projected(
        self,
        model: nn.Module,
        loss: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        params: Mapping[str, nn.Parameter],
        projections: Mapping[str, Projection],
    ) -> Dict[str, ProjectedGrads]:
        r"""Projected per-sample gradients with their exact squared norms.

        A linear layer called once per forward whose weight has a Kronecker
        projection ([kronecker_spec][pydvl_datainf.projection.kronecker_spec]
        of its shape) is projected from its per-token factors,
        $\sum_t (P_{out}\delta_{it})(P_{in}a_{it})^\top$, and its squared
        norms come from the token Gram matrices
        ([token_squared_norms][pydvl_datainf.compressed.token_squared_norms]):
        no $d_{out} \times d_{in}$ per-sample gradient is formed. Every other
        parameter is computed as by `per_sample_grads_factored` and then
        projected. `validate=True` does not check the weights projected from
        factors.

        Example:
            ```python
            import torch
            from torch import nn
            from pydvl_datainf.gradients import HookGradientEngine
            from pydvl_datainf.projection import Projection, dense_spec, kronecker_spec

            model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 2))
            params = dict(model.named_parameters())
            projections = {
                "0.weight": Projection(kronecker_spec((32, 16), (4, 4), seed=0)),
                "0.bias": Projection(dense_spec(32, 32, "identity")),
                "2.weight": Projection(kronecker_spec((2, 32), (2, 8), seed=1)),
                "2.bias": Projection(dense_spec(2, 2, "identity")),
            }
            x = torch.randn(8, 10, 16)  # 10 tokens per sample
            y = torch.randn(8, 10, 2)
            out = HookGradientEngine().per_sample_grads_projected(
                model.eval(), nn.functional.mse_loss, x, y, params, projections
            )
            assert out["0.weight"].dense().shape == (8, 16)
            assert out["0.weight"].squared_norms.shape == (8,)
            ```
        """
        check_projections(params, projections)
        grads = self._per_sample(
            model, loss, x, y, params, factored=True, projections=projections
        )
        return {
            k: v if isinstance(v, ProjectedGrads) else project_rows(projections[k], v)
            for k, v in grads.items()
        }

    def _per_sample(
        self,
        model: nn.Module,
        loss: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        params: Mapping[str, nn.Parameter],
        factored: bool,
        projections: Optional[Mapping[str, Projection]] = None,
    ) -> Dict[str, Result]:
        if len(x) == 0:
            return {
                k: torch.empty(0, p.numel(), dtype=accumulation_dtype(p.dtype))
                for k, p in params.items()
            }
        plan = self.plan(model, params)
        cost = plan.cost()
        if cost is not None:
            warn_once(
                model,
                f"{type(model).__name__}: {cost}. Register a rule with "
                "pydvl_datainf.gradients.rules.register_rule to avoid it; "
                "print(engine.plan(model, params)) for details.",
            )
        fallback = dict(plan.fallback)
        result: Dict[str, Result] = {}
        changed = [p for p in params.values() if not p.requires_grad]
        for p in changed:
            p.requires_grad_(True)
        try:
            if plan.hooked:
                hooked, failed = self._hooked_pass(
                    model, loss, x, y, params, plan, factored, projections
                )
                result.update(hooked)
                fallback.update(failed)
                if failed and self.fallback is not None:
                    warn_once(
                        model,
                        f"{type(model).__name__}: whole-model fallback (torch.func "
                        "re-runs the whole model per sample, typically 2-3x a plain "
                        "pass) for " + "; ".join(sorted(set(failed.values()))),
                    )
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
        projections: Optional[Mapping[str, Projection]] = None,
    ) -> Tuple[Dict[str, Result], Dict[str, str]]:
        """One forward and one backward; returns gradients and failed params."""
        batch = len(x)
        capture = Capture(plan, batch, self.expand_shared, self.trace)
        with capture, torch.enable_grad():
            out = model(x)
        order: List[Tuple[HookedModule, Call]] = [
            (h, c) for h in plan.hooked for c in capture.calls[id(h.module)]
        ]
        edges, first = _edges(order)
        checked = (
            [(n, params[n]) for h in plan.hooked for n in h.params.values()]
            if self.validate
            else []
        )
        grads = output_gradients(
            loss, out, y, edges, [p for _, p in checked], self.vectorize_loss
        )
        del out
        uses = _use_counts(order)
        failed = _untracked(plan, capture)
        acc = Accumulator(params, batch)
        for (h, call), i in zip(order, first):
            g, grads[i] = grads[i], None  # free output gradients as we go
            if g is None or any(n in failed for n in h.params.values()):
                continue
            problem = call_problem(h, call, g, batch)
            if problem is None:
                try:
                    if call.traced is not None:
                        n_uses = len(call.traced)
                        dispatch_traced(
                            h, call, grads[i + 1 : i + 1 + n_uses], acc, factored, uses
                        )
                    else:
                        dispatch(h, call, g, acc, factored, uses, projections)
                except Exception as e:  # noqa: BLE001 - reported, then fallback
                    kind = "rule" if h.rule is not None else "module-local fallback"
                    problem = f"{kind} for {h.label} failed: {type(e).__name__}: {e}"
                    logger.info("%s; using the whole-model fallback", problem)
            if problem is not None:
                failed.update({n: problem for n in h.params.values()})
        names = [n for h in plan.hooked for n in h.params.values()]
        result = acc.finish(names, failed)
        for (name, p), g in zip(checked, grads[len(edges) :]):
            value = result.get(name)
            if name not in failed and not isinstance(value, ProjectedGrads):
                check_sum(name, p, densify(cast(Rows, value)), g)
        return result, failed

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
                "Register a rule (pydvl_datainf.gradients.rules.register_rule) or "
                "use a fallback engine."
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
                warn_once(
                    model,
                    f"{type(model).__name__}: torch.func failed "
                    f"({type(e).__name__}); the autograd loop computes "
                    f"{', '.join(reasons)}, one forward and backward per sample",
                )
                return LoopGradientEngine().per_sample_grads(model, loss, x, y, subset)
            raise ValueError(
                f"No per-sample gradient rule for these parameters, and the "
                f"fallback {engine!r} failed ({type(e).__name__}: {e}): {details}. "
                "Register a rule (pydvl_datainf.gradients.rules.register_rule), or "
                "use HookGradientEngine(fallback='loop') or engine='loop'."
            ) from e
