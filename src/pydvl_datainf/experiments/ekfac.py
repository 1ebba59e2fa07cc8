r"""EK-FAC: the eigenvalue-corrected Kronecker-factored curvature, as a baseline.

For a linear layer with weight $W$ (`out` × `in`, plus a bias column when
it has one), K-FAC approximates the layer's block of the Gauss–Newton
matrix by a Kronecker product $S \otimes A$ of the covariance of the layer's
inputs, $A = \mathbb{E}[a a^\top]$, and of the gradients with respect to its
outputs, $S = \mathbb{E}[\delta \delta^\top]$. EK-FAC (George et al., 2018)
keeps the eigenvectors $Q_A$, $Q_S$ of the two factors and replaces the
Kronecker eigenvalues by the second moments of the per-sample gradients in
that eigenbasis:

$$\Lambda_{ij} = \frac{1}{n} \sum_{k=1}^{n}
  \left(Q_S^\top \,\text{mat}(g_k)\, Q_A\right)_{ij}^2 .$$

The inverse curvature is applied in the eigenbasis,
$\text{mat}(x) = Q_S \left[(Q_S^\top \text{mat}(v) Q_A) \oslash
(\Lambda + \lambda_l)\right] Q_A^\top$, with the damping
$\lambda_l = c \cdot \text{mean}(\Lambda)$. Because the eigenbasis is
orthogonal, $\text{mean}(\Lambda) = \frac{1}{n}\sum_k \lVert g_k\rVert^2 / d_l$:
with $c = 0.1$ this is exactly DataInf's $\lambda_l$, so the two methods are
damped alike.

Two ways to fit it:

* [fit_ekfac][pydvl_datainf.experiments.ekfac.fit_ekfac] computes the factors
  with forward and backward hooks under **the loss the other methods use**
  (any per-sample loss, e.g. the target-token loss of a causal LM, with a
  token mask for padding), and the eigenvalues from the per-sample training
  gradients that DataInf's fit already produced. This is the empirical-Fisher
  EK-FAC, on the same curvature $G_l = \frac{1}{n}\sum_k g_k g_k^\top$ that
  DataInf and the exact inverse approximate.
* [fit_pydvl_ekfac][pydvl_datainf.experiments.ekfac.fit_pydvl_ekfac] fits
  pyDVL's `EkfacInfluence` (classification models with a cross-entropy loss
  only: pyDVL fits its factors with its own label-sampled pseudo-loss on
  `(batch, classes)` outputs), and
  [from_pydvl][pydvl_datainf.experiments.ekfac.from_pydvl] reads its factors.

Both give `{block: KroneckerEigenbasis}` for
[ekfac_influences][pydvl_datainf.experiments.ekfac.ekfac_influences]. Blocks
must be single linear layers (the library's `"module"` blocks of a
LoRA model), each flattened as the `(out, in)` weight, row-major, then the
bias.

Example:
    ```python
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from pydvl_datainf import DataInfInfluence
    from pydvl_datainf.experiments.baselines import training_gradients
    from pydvl_datainf.experiments.ekfac import ekfac_influences, fit_ekfac

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3))
    loss = torch.nn.functional.cross_entropy
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    infl = DataInfInfluence(model, loss).fit(loader)
    g_train = training_gradients(infl)
    factors = fit_ekfac(model, loss, loader, g_train)
    scores = ekfac_influences(factors, infl.per_sample_gradients(x[:3], y[:3]), g_train)
    assert scores.shape == (3, 40)  # pyDVL's sign: positive = helpful
    ```
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from pydvl_datainf import formula

__all__ = [
    "KroneckerEigenbasis",
    "fit_ekfac",
    "fit_pydvl_ekfac",
    "from_pydvl",
    "ekfac_influences",
]

logger = logging.getLogger(__name__)

Grads = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class KroneckerEigenbasis:
    r"""One linear layer's EK-FAC curvature.

    Attributes:
        qa: `(cols, cols)` eigenvectors of the input covariance $A$
            (`cols` = `in`, plus one for a bias).
        qs: `(out, out)` eigenvectors of the output-gradient covariance $S$.
        eigenvalues: `(out, cols)` corrected eigenvalues $\Lambda$.
        has_bias: whether the layer's gradient ends with its bias.
    """

    qa: torch.Tensor
    qs: torch.Tensor
    eigenvalues: torch.Tensor
    has_bias: bool

    def __post_init__(self) -> None:
        want = (self.qs.shape[0], self.qa.shape[0])
        if tuple(self.eigenvalues.shape) != want:
            raise ValueError(
                f"eigenvalues have shape {tuple(self.eigenvalues.shape)}, "
                f"expected {want} (out, cols)"
            )

    @property
    def size(self) -> int:
        """The number of parameters of the layer, `out * cols`."""
        return int(self.qs.shape[0] * self.qa.shape[0])


def _as_layer_matrix(
    v: torch.Tensor, out_f: int, cols: int, has_bias: bool
) -> torch.Tensor:
    """Flat `[weight (out, in) row-major, bias (out,)]` to `(m, out, in [+1])`."""
    if not has_bias:
        return v.reshape(-1, out_f, cols)
    w = v[:, : out_f * (cols - 1)].reshape(-1, out_f, cols - 1)
    b = v[:, out_f * (cols - 1) :].reshape(-1, out_f, 1)
    return torch.cat([w, b], dim=2)


def _from_layer_matrix(x: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """Inverse of `_as_layer_matrix`."""
    if not has_bias:
        return x.reshape(len(x), -1)
    return torch.cat([x[:, :, :-1].reshape(len(x), -1), x[:, :, -1]], dim=1)


def _linear_layers(model: nn.Module, blocks: Iterable[str]) -> Dict[str, nn.Linear]:
    modules = dict(model.named_modules())
    layers: Dict[str, nn.Linear] = OrderedDict()
    for name in blocks:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"Block {name!r} is not a linear module of the model: EK-FAC "
                "needs one block per nn.Linear (the 'module' blocks)"
            )
        layers[name] = module
    return layers


@torch.no_grad()
def _corrected_eigenvalues(
    g: torch.Tensor, qa: torch.Tensor, qs: torch.Tensor, has_bias: bool, chunk: int
) -> torch.Tensor:
    out_f, cols = qs.shape[0], qa.shape[0]
    total = torch.zeros(out_f, cols, dtype=torch.float64)
    for start in range(0, len(g), chunk):
        mat = _as_layer_matrix(g[start : start + chunk].double(), out_f, cols, has_bias)
        total += ((qs.T @ mat @ qa) ** 2).sum(0)
    return total / len(g)


def fit_ekfac(
    model: nn.Module,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    train_gradients: Grads,
    token_mask: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    progress: bool = False,
) -> OrderedDict[str, KroneckerEigenbasis]:
    r"""Fit EK-FAC under a given per-sample loss, for the blocks of `train_gradients`.

    One pass over `data` with forward hooks (layer inputs $a$) and tensor
    hooks (output gradients $\delta$) accumulates, per layer,
    $A = \sum_t a_t a_t^\top$ over the counted positions $t$ and
    $S = \sum_{k,t} \delta_{kt}\delta_{kt}^\top$, with $\delta_{kt}$ the
    gradient of sample $k$'s own loss at position $t$ (the loss is applied
    to each sample of the batch, as the per-sample convention does, and the
    per-sample losses are summed before one backward pass). Their
    eigenvectors (in float64) give the basis, and the eigenvalues are
    corrected with `train_gradients` (see the module's formula). Scale
    factors of $A$ and $S$ do not matter: only their eigenvectors are kept.

    Args:
        model: the model, with the layers named by the blocks.
        loss: `loss(output, target)`, applied to one sample at a time
            (batch dimension of 1).
        data: `(x, y)` training batches (the same data as the gradients).
        train_gradients: `{block: (n, d_l)}` per-sample training gradients,
            e.g. from [training_gradients][pydvl_datainf.experiments.baselines.training_gradients];
            each block must be one `nn.Linear` module of `model`.
        token_mask: `token_mask(x) -> (B, T)` boolean tensor of the sequence
            positions whose inputs count in $A$ (e.g. not padding); without
            it, every position counts.
        progress: show a progress bar.

    Returns:
        `{block: KroneckerEigenbasis}` in the order of `train_gradients`.

    Raises:
        ValueError: a block is not a linear module, or its width does not
            match the layer.

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import DataInfInfluence
        from pydvl_datainf.experiments.baselines import training_gradients
        from pydvl_datainf.experiments.ekfac import fit_ekfac

        model = torch.nn.Linear(4, 3)
        loss = torch.nn.functional.cross_entropy
        x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        loader = DataLoader(TensorDataset(x, y), batch_size=5)
        g = training_gradients(DataInfInfluence(model, loss).fit(loader))
        basis = fit_ekfac(model, loss, loader, g)[""]
        assert basis.qa.shape == (5, 5) and basis.qs.shape == (3, 3)  # bias column
        ```
    """
    layers = _linear_layers(model, train_gradients)
    cov_a: Dict[str, torch.Tensor] = {}
    cov_s: Dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        cols = layer.in_features + (layer.bias is not None)
        if layer.out_features * cols != train_gradients[name].shape[1]:
            raise ValueError(
                f"Block {name!r} has {train_gradients[name].shape[1]} parameters "
                f"but the layer has {layer.out_features * cols}"
            )
        cov_a[name] = torch.zeros(cols, cols, dtype=torch.float64)
        cov_s[name] = torch.zeros(
            layer.out_features, layer.out_features, dtype=torch.float64
        )
    mask: List[Optional[torch.Tensor]] = [None]

    def rows(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().double()
        if t.ndim > 2 and mask[0] is not None:
            return t[mask[0].to(t.device)]
        return t.reshape(-1, t.shape[-1])

    def forward_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Tuple[torch.Tensor, ...], out: Any) -> None:
            a = rows(inputs[0])
            if layers[name].bias is not None:
                a = torch.cat([a, a.new_ones(len(a), 1)], dim=1)
            cov_a[name] += (a.T @ a).cpu()
            if out.requires_grad:
                out.register_hook(backward_hook(name))

        return hook

    def backward_hook(name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            d = grad.detach().double().reshape(-1, grad.shape[-1])
            cov_s[name] += (d.T @ d).cpu()

        return hook

    handles = [
        layer.register_forward_hook(forward_hook(n)) for n, layer in layers.items()
    ]
    was_training = model.training
    model.eval()
    try:
        for x, y in tqdm(data, desc="EK-FAC factors", disable=not progress):
            mask[0] = token_mask(x).bool() if token_mask is not None else None
            out = model(x)
            total = sum(loss(out[k : k + 1], y[k : k + 1]) for k in range(len(y)))
            assert isinstance(total, torch.Tensor)
            total.backward()
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    factors: OrderedDict[str, KroneckerEigenbasis] = OrderedDict()
    for name, layer in layers.items():
        qa = torch.linalg.eigh(cov_a[name])[1]
        qs = torch.linalg.eigh(cov_s[name])[1]
        has_bias = layer.bias is not None
        lam = _corrected_eigenvalues(train_gradients[name], qa, qs, has_bias, 256)
        factors[name] = KroneckerEigenbasis(qa, qs, lam, has_bias)
    logger.info("EK-FAC fitted on %d layers", len(factors))
    return factors


def fit_pydvl_ekfac(model: nn.Module, data: Any, progress: bool = False) -> Any:
    """Fit pyDVL's `EkfacInfluence` (with the diagonal update) in eval mode.

    The model's trainable leaf modules must all be `nn.Linear` (as the LoRA
    matrices are) and its loss cross-entropy over `(batch, classes)` outputs.

    Args:
        model: the model.
        data: a DataLoader of `(x, y)` training batches.
        progress: show pyDVL's progress bars.

    Returns:
        The fitted `pydvl.influence.torch.EkfacInfluence`; read its factors
        with [from_pydvl][pydvl_datainf.experiments.ekfac.from_pydvl].

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf.experiments.ekfac import fit_pydvl_ekfac

        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 3))
        x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
        ekfac = fit_pydvl_ekfac(model, DataLoader(TensorDataset(x, y), batch_size=10))
        assert list(ekfac.ekfac_representation.layer_names) == ["0", "2"]
        ```
    """
    from pydvl.influence.torch import EkfacInfluence

    was = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # pyDVL's backward hooks on layers whose inputs need no gradient
            # (the first LoRA matrices) are fine: they see the output gradient
            warnings.filterwarnings("ignore", message="Full backward hook")
            ekfac = EkfacInfluence(model, update_diagonal=True, progress=progress)
            ekfac.fit(data)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    return ekfac


def from_pydvl(ekfac: Any) -> OrderedDict[str, KroneckerEigenbasis]:
    """The factors of a fitted pyDVL `EkfacInfluence`, per layer.

    pyDVL stores a layer's eigenvalues as `(out, in + 1)` when the layer has
    a bias (the bias is the last column), as this module does.

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf.experiments.ekfac import fit_pydvl_ekfac, from_pydvl

        model = torch.nn.Linear(4, 3)
        x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
        ekfac = fit_pydvl_ekfac(model, DataLoader(TensorDataset(x, y), batch_size=10))
        basis = from_pydvl(ekfac)[""]
        assert basis.has_bias and basis.eigenvalues.shape == (3, 5)
        ```
    """
    rep = ekfac.ekfac_representation
    factors: OrderedDict[str, KroneckerEigenbasis] = OrderedDict()
    for name, module, qa, qs, diag in zip(
        rep.layer_names, rep.layers_module, rep.evecs_a, rep.evecs_g, rep.diags
    ):
        qa, qs = qa.detach().double(), qs.detach().double()
        lam = diag.detach().double().reshape(qs.shape[0], qa.shape[0])
        has_bias = getattr(module, "bias", None) is not None
        factors[name] = KroneckerEigenbasis(qa, qs, lam, has_bias)
    return factors


@torch.no_grad()
def ekfac_influences(
    factors: Mapping[str, KroneckerEigenbasis],
    test: Grads,
    train: Grads,
    regularization_scale: float = formula.DEFAULT_REGULARIZATION_SCALE,
) -> torch.Tensor:
    r"""Influences $g_{test}^\top (\text{EK-FAC} + \lambda_l I)^{-1} g_{train}$, summed over blocks.

    Computed in float64, in the eigenbasis (see the module's formula), with
    $\lambda_l = c \cdot \text{mean}(\Lambda_l)$.

    Args:
        factors: `{block: KroneckerEigenbasis}` from
            [fit_ekfac][pydvl_datainf.experiments.ekfac.fit_ekfac] or
            [from_pydvl][pydvl_datainf.experiments.ekfac.from_pydvl].
        test: `{block: (m, d_l)}` test gradients.
        train: `{block: (n, d_l)}` training gradients, the same blocks.
        regularization_scale: $c$.

    Returns:
        `(m, n)` influences with pyDVL's sign (positive = helpful; the
        paper's $\mathcal{I}$ is the negative).

    Raises:
        ValueError: the factors' layers and the gradient blocks differ, or a
            block's width is not its layer's.

    Example:
        ```python
        import torch
        from pydvl_datainf.experiments.ekfac import KroneckerEigenbasis, ekfac_influences

        # identity eigenbases and unit eigenvalues: (1 + c) I, so the dot product / 1.1
        basis = KroneckerEigenbasis(torch.eye(2, dtype=torch.float64),
                                    torch.eye(3, dtype=torch.float64),
                                    torch.ones(3, 2, dtype=torch.float64), False)
        g = {"layer": torch.randn(4, 6, dtype=torch.float64)}
        s = ekfac_influences({"layer": basis}, g, g, regularization_scale=0.1)
        assert torch.allclose(s, g["layer"] @ g["layer"].T / 1.1)
        ```
    """
    if list(test) != list(train):
        raise ValueError("Test and train gradients have different blocks")
    if sorted(factors) != sorted(test):
        raise ValueError(
            f"EK-FAC layers {list(factors)} do not match the gradient blocks "
            f"{list(test)}"
        )
    m, n = len(next(iter(test.values()))), len(next(iter(train.values())))
    out = torch.zeros(m, n, dtype=torch.float64)
    for k in test:
        f = factors[k]
        out_f, cols = f.qs.shape[0], f.qa.shape[0]
        if f.size != test[k].shape[1] or f.size != train[k].shape[1]:
            raise ValueError(
                f"Block {k!r} has {test[k].shape[1]} parameters but EK-FAC sees a "
                f"{out_f}x{cols} layer: blocks must be single linear layers"
            )
        qa, qs, lam = f.qa.double(), f.qs.double(), f.eigenvalues.double()
        damping = regularization_scale * float(lam.mean())
        v = _as_layer_matrix(test[k].double(), out_f, cols, f.has_bias)
        x = qs @ ((qs.T @ v @ qa) / (lam + damping)) @ qa.T
        out += _from_layer_matrix(x, f.has_bias) @ train[k].double().T
    return out
