r"""Per-layer rules that turn activations into per-sample gradients.

When the batch is processed in one forward pass, the total loss is the sum of
the per-sample losses, $L = \sum_i \ell_i$, and samples do not interact, then
the gradient $g_i = \partial L / \partial z_i$ of a layer's output on sample
$i$ equals $\partial \ell_i / \partial z_i$, so that a rule can split the
parameter gradient sample by sample. For instance, for a linear layer
$z_{it} = W a_{it} + b$ applied to the tokens $t$ of sample $i$:

$$
\nabla_W \ell_i = \sum_t g_{it} a_{it}^\top, \qquad
\nabla_b \ell_i = \sum_t g_{it}.
$$

One module per layer family, each registering its rules when this package is
imported:

* [linear][pydvl_datainf.gradients.rules.linear]: `nn.Linear` (inputs of any
  rank $\geq 2$; this covers the `lora_A` / `lora_B` adapters of PEFT), with
  a rank-one *factor rule* for inputs without a token dimension (`fit` caches
  the two factors instead of the dense gradient, see
  [pydvl_datainf.factored][]);
* [conv][pydvl_datainf.gradients.rules.conv]: `nn.Conv1d`, `nn.Conv2d`
  (stride, padding including `'same'` and non-zero padding modes, dilation,
  groups);
* [embedding][pydvl_datainf.gradients.rules.embedding]: `nn.Embedding`
  (`padding_idx`, `scale_grad_by_freq`);
* [norms][pydvl_datainf.gradients.rules.norms]: `nn.LayerNorm`, `nn.RMSNorm`.

Registration and lookup live in
[registry][pydvl_datainf.gradients.rules.registry]. All rules compute in
[accumulation_dtype][pydvl_datainf.gradients.engine.accumulation_dtype] of the
parameter: half-precision layers give float32 gradients. A layer type without a
rule is still handled by the hook engine, with its module-local fallback.

Example:
    ```python
    from torch import nn
    from pydvl_datainf.gradients.rules import get_rule, linear_rule

    assert get_rule(nn.Linear) is linear_rule
    ```
"""

from __future__ import annotations

from .conv import conv1d_rule, conv2d_rule
from .embedding import embedding_rule
from .linear import linear_factors, linear_rule, linear_token_factors
from .norms import layer_norm_rule, rms_norm_rule
from .registry import (
    RULE_PARAMS,
    FactorRule,
    GradRule,
    TokenFactorRule,
    accepts_out,
    get_factor_rule,
    get_rule,
    get_token_factor_rule,
    register_factor_rule,
    register_rule,
    register_token_factor_rule,
    unregister_rule,
    wanted,
)

__all__ = [
    "FactorRule",
    "GradRule",
    "RULE_PARAMS",
    "TokenFactorRule",
    "accepts_out",
    "conv1d_rule",
    "conv2d_rule",
    "embedding_rule",
    "get_factor_rule",
    "get_rule",
    "get_token_factor_rule",
    "layer_norm_rule",
    "linear_factors",
    "linear_rule",
    "linear_token_factors",
    "register_factor_rule",
    "register_rule",
    "register_token_factor_rule",
    "rms_norm_rule",
    "unregister_rule",
    "wanted",
]
