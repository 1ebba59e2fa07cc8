r"""Per-sample gradients from one batched forward and one batched backward.

[HookGradientEngine][pydvl_datainf.gradients.hooks.engine.HookGradientEngine] computes the
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
   per-layer rules of [rules][pydvl_datainf.gradients.rules], summing the
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
* A module without a rule (a custom layer, a loralib-style `nn.Linear`
  subclass with `lora_A` / `lora_B`, adapters as bare `nn.Parameter`s) is
  computed by the **module-local fallback**
  ([local][pydvl_datainf.gradients.hooks.local]): its inputs and output
  gradients are captured in the same pass, and only that module's `forward`
  runs again, vmapped over the samples. Parameters that no module owns, or
  modules whose calls cannot be split by sample, go to a whole-model fallback
  engine (`torch.func`, then the autograd loop); if that fails a `ValueError`
  names them and their module types. The engine warns once per model, naming
  the layers that use a fallback and what it costs, and
  `engine.plan(model, params)` prints the assignment.
* In-place operations on a module's *output* are harmless (the gradient is
  taken at the output's autograd edge, before the modification); a module
  whose *input* is modified in place after the call is detected and left to
  the fallback engine.
* Modules only ever called with autograd disabled (as in reentrant gradient
  checkpointing) are left to the fallback engine; non-reentrant checkpointing
  works.
* Half-precision (`bfloat16`, `float16`) models: the backward runs in the
  model's dtype, but the per-sample products are accumulated and returned in
  float32 (see
  [accumulation_dtype][pydvl_datainf.gradients.engine.accumulation_dtype]).
  The module-local fallback differentiates in the model's dtype and returns
  float32.

This is the default engine of
[get_engine][pydvl_datainf.gradients.registry.get_engine] (`"auto"`).

The package is split by step: [plan][pydvl_datainf.gradients.hooks.plan]
(which module computes what), [capture][pydvl_datainf.gradients.hooks.capture]
(forward hooks), [backward][pydvl_datainf.gradients.hooks.backward] (the one
backward), [dispatch][pydvl_datainf.gradients.hooks.dispatch] (rules and the
module-local fallback per call) and [engine][pydvl_datainf.gradients.hooks.engine].

Example:
    ```python
    import torch
    from torch import nn
    from pydvl_datainf.gradients import HookGradientEngine

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    model[0].requires_grad_(False)  # frozen: no per-sample gradient, no hook
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    grads = HookGradientEngine().per_sample_grads(
        model, nn.functional.cross_entropy,
        torch.randn(16, 4), torch.randint(0, 3, (16,)), params,
    )
    assert grads["2.weight"].shape == (16, 24)
    ```
"""

from __future__ import annotations

from ..losses import per_sample_losses
from .engine import HookGradientEngine
from .local import local_per_sample_grads
from .plan import (
    GradientFallbackWarning,
    HookedModule,
    HookPlan,
    make_plan,
)

__all__ = [
    "GradientFallbackWarning",
    "HookGradientEngine",
    "HookPlan",
    "HookedModule",
    "local_per_sample_grads",
    "make_plan",
    "per_sample_losses",
]
