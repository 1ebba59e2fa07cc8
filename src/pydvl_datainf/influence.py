r"""[DataInfInfluence][pydvl_datainf.influence.DataInfInfluence]: DataInf as a pyDVL
`InfluenceFunctionModel` for torch, exact to the formula, fitted once.

For blocks $l = 1..L$ of trainable parameters (see [blocks][pydvl_datainf.blocks]),
DataInf approximates the inverse of the damped Gauss–Newton matrix by the
block-diagonal operator $R = \operatorname{diag}(R_1, \dots, R_L)$ with

$$
R_l = \frac{1}{n}\sum_{i=1}^n \left(g_{il} g_{il}^\top + \lambda_l I\right)^{-1},
\qquad g_{il} = \nabla_{\theta_l}\ell(y_i, f_\theta(x_i)),
$$

applied in closed form by Sherman–Morrison (see [formula][pydvl_datainf.formula]).

**Sign and scale.** Following pyDVL, `influences` returns
$g_{test}^\top R\, g_{train}$: self-influence is positive and a positive value
means the training point *helps* (up-weighting it lowers the test loss). The
paper's $\mathcal{I}_{DataInf}$ is the negative of this. The result does not
depend on batch sizes or chunking: $n$ is always the full training set size.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Tuple,
    Union,
    cast,
)

import torch
from pydvl.influence.base_influence_function_model import InfluenceFunctionModel
from pydvl.influence.types import InfluenceMode, UnsupportedInfluenceModeException
from torch import nn
from torch.utils.data import DataLoader

from . import formula
from .batches import DatasetBatches, adapter_for
from .blocks import DEFAULT_SPEC, BlockSpec, BlockStructure, build_blocks
from .config import RegularizationSpec, parse_bytes, validate_regularization
from .dask_fit import fit_on_dask
from .errors import (
    BlockStructureError,
    NotFittedError,
    RegularizationError,
    StaleModelError,
    StoreMismatchError,
)
from .fingerprint import WeightWatch
from .fit import GradientFunction, check_batch, training_gradients
from .fit import fit as fit_state
from .gradients import GradientEngine, LossFn, accumulation_dtype, get_engine
from .operator import DataInfOperator
from .persistence import load_state, stored_projections
from .perturbation import perturbation_influences_by_block
from .projection import Compression, projection_specs
from .rows import batch_digest
from .state import FittedState
from .storage import (
    GradientStore,
    ZarrGradientStore,
    inspect_path,
    resolve_store_dtype,
)
from .storage.policy import StoreSpec, check_store_spec, new_store

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

__all__ = ["DataInfInfluence", "RegularizationSpec"]

logger = logging.getLogger(__name__)

Blockwise = Dict[str, torch.Tensor]


def _check_mode(mode: Any) -> InfluenceMode:
    """The mode as an `InfluenceMode`; pyDVL's exception for anything else."""
    if isinstance(mode, InfluenceMode):
        return mode
    try:
        return InfluenceMode(mode)
    except ValueError:
        raise UnsupportedInfluenceModeException(mode) from None


class DataInfInfluence(InfluenceFunctionModel[torch.Tensor, DataLoader]):
    r"""DataInf influence (Kwon et al., ICLR 2024) for torch models.

    `fit` makes one pass over the training loader and caches, per block, the
    per-sample squared gradient norms, $\lambda_l$, $n$, and (by default) the
    per-sample gradients. Queries are then matrix products over this cache.

    Args:
        model: the trained model. Only parameters with `requires_grad=True`
            take part; frozen ones (e.g. a LoRA base) cost nothing.
        loss: `loss(prediction, target)`, applied to each sample alone,
            whatever its reduction (pyDVL's convention).
        regularization: `"auto"` for the paper's
            $\lambda_l = c \cdot \text{mean}_i \lVert g_{il}\rVert^2 / d_l$,
            a positive float for every block, or a dict with one value
            (float or `"auto"`) for every block name.
        block_structure: a spec for
            [build_blocks][pydvl_datainf.blocks.build_blocks] (`"paper"`,
            `"module"`, `"lora"`, `"parameter"`, a pyDVL `BlockMode`, a
            mapping `{block: [parameter names]}`) or a
            [BlockStructure][pydvl_datainf.blocks.BlockStructure] it built.
            Default `"paper"`: one block per LoRA matrix (`lora_A`, `lora_B`),
            and one per leaf module for other trainable parameters.
        include_head: for a LoRA model with other trainable parameters (e.g.
            the classifier head that PEFT keeps in `modules_to_save`), with a
            string `block_structure`: `None` keeps them as blocks of their own
            and warns with a
            [HeadBlocksWarning][pydvl_datainf.blocks.HeadBlocksWarning];
            `True` keeps them silently; `False` leaves them out, so that the
            blocks are the LoRA matrices only, as in the DataInf paper.
        regularization_scale: $c$ in the `"auto"` rule (0.1 in the paper).
        engine: per-sample gradient engine, a name (`"auto"`, `"func"`,
            `"loop"`, ...) or an instance of
            [GradientEngine][pydvl_datainf.gradients.GradientEngine].
        store: where `fit` keeps the per-sample training gradients (see
            [storage][pydvl_datainf.storage]): `"memory"`; `"zarr"` (at
            `store_path`, written chunk by chunk during fit); `"recompute"`
            (keeps none, replays the training loader on queries); `"auto"`
            (memory if the gradients fit `memory_budget`, else Zarr); or a
            callable `block_names -> GradientStore`.
        progress: show tqdm progress bars.
        test_factor_cache: how many recent test batches' factors to keep, so
            that pyDVL's calculators do not recompute them for every train chunk
            of a row (0 disables).
        store_path: local path or fsspec URL of the Zarr store (`"zarr"`, and
            `"auto"` when it spills; a temporary directory if not given there).
        store_dtype: dtype of Zarr-stored gradients: `"float32"` (default for
            float32 models), `"float16"` or `"bfloat16"` (half the disk, read
            back to float32), `"float64"`.
        memory_budget: bytes (or a string such as `"1GB"`) of gradients that
            `"auto"` keeps in memory; default a quarter of the available RAM.
        store_options: more [ZarrGradientStore][pydvl_datainf.storage.ZarrGradientStore]
            arguments: `overwrite`, `chunk_rows`, `storage_options`,
            `compressors`.
        loss_id: a name for the loss, used as its identity in stores and
            outputs instead of its settings. Needed for a loss whose settings
            cannot be read (see [loss_name][pydvl_datainf.fingerprint.loss_name]);
            change it whenever the loss changes.
        compression: compress the per-sample gradients before they are
            stored: a [Compression][pydvl_datainf.projection.Compression]
            (or a dict of its fields, e.g. `{"side": 16}`), or explicit
            projections `{block: ProjectionSpec}`. Every block is projected
            with a seeded random projection recorded in the store; the squared
            norms and $\lambda_l$ stay exact, inner products are taken in
            projected space (see the docs' "Scaling to LLMs" page for the
            error and how to choose the size). Factors, stored rows and
            `per_sample_gradients` are then in projected space. Default: none.
        factorize: let `fit` keep rank-one per-sample gradients (linear layers
            without a token dimension, e.g. the LoRA adapters of an MLP) as
            their two factors in the in-memory cache (see
            [pydvl_datainf.factored][]): exact, $(p+q)/(pq)$ of the memory,
            and no per-sample outer products during `fit`. Reads expand
            them. Needs an engine with factor support (the default hooks
            engine); on-disk stores always hold dense rows.

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import DataInfInfluence

        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 3))
        x, y = torch.randn(100, 4), torch.randint(0, 3, (100,))
        loader = DataLoader(TensorDataset(x, y), batch_size=32)
        infl = DataInfInfluence(model, torch.nn.functional.cross_entropy)
        infl.fit(loader)
        scores = infl.influences(x[:5], y[:5], x, y)  # (5, 100), pyDVL sign
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        regularization: RegularizationSpec = "auto",
        block_structure: BlockSpec = DEFAULT_SPEC,
        *,
        include_head: Optional[bool] = None,
        regularization_scale: float = formula.DEFAULT_REGULARIZATION_SCALE,
        engine: Union[str, GradientEngine] = "auto",
        store: StoreSpec = "memory",
        progress: bool = True,
        test_factor_cache: int = 4,
        store_path: Optional[Union[str, os.PathLike]] = None,
        store_dtype: Union[None, str, torch.dtype] = None,
        memory_budget: Union[None, int, str] = None,
        store_options: Optional[Mapping[str, Any]] = None,
        factorize: bool = True,
        loss_id: Optional[str] = None,
        compression: Union[None, Compression, Mapping[str, Any]] = None,
    ):
        self.model = model
        self.loss = loss
        self.blocks: BlockStructure = build_blocks(
            model, block_structure, include_head=include_head
        )
        if not (regularization_scale > 0 and regularization_scale < float("inf")):
            raise RegularizationError(
                f"regularization_scale must be positive, got {regularization_scale}"
            )
        self.regularization_scale = float(regularization_scale)
        self._regularization_spec = validate_regularization(
            regularization, self.blocks.names
        )
        self.engine = get_engine(engine)
        check_store_spec(store, store_path, store_options)
        if memory_budget is not None:
            parse_bytes(memory_budget, 0)  # fail early on a malformed budget
        self._store_spec = store
        self.store_path = None if store_path is None else os.fspath(store_path)
        self.store_dtype = resolve_store_dtype(store_dtype)
        self.memory_budget = memory_budget
        self.store_options: Dict[str, Any] = dict(store_options or {})
        self._owned_store: Optional[Tuple[str, str]] = None  # (path, store id)
        self.progress = progress
        self.factorize = bool(factorize)
        self.test_factor_cache = int(test_factor_cache)
        dtype = dict(model.named_parameters())[self.blocks.parameter_names()[0]].dtype
        self._gradients = GradientFunction(
            model,
            loss,
            self.engine,
            self.blocks,
            loss_id=loss_id,
            projections=projection_specs(
                compression, self.blocks, accumulation_dtype(dtype)
            ),
        )
        self._lock = self._gradients.lock
        self._factor_cache: OrderedDict[Tuple[int, bytes], Blockwise] = OrderedDict()
        self._generation = 0
        self._fitted: Optional[FittedState] = None
        self._watch: Optional[WeightWatch] = None

    # ------------------------------------------------------------------ state
    def _set_state(
        self, state: Optional[FittedState], watch: Optional[WeightWatch] = None
    ) -> None:
        """Replace the fitted state (under the lock): a new generation."""
        with self._lock:
            self._generation += 1
            self._fitted = state
            if watch is not None or state is None:
                self._watch = watch
            self._factor_cache.clear()

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_factor_cache"] = OrderedDict()
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = self._gradients.lock

    @property
    def generation(self) -> int:
        """Incremented by every change of the fitted state (fit, λ, device)."""
        return self._generation

    @property
    def state(self) -> FittedState:
        """The fitted state, after checking that the model is fitted and its
        weights are those that were fitted.

        The check is cheap: the trainable weights are hashed, and the frozen
        ones and the buffers are checked for in-place changes (see
        [WeightWatch][pydvl_datainf.fingerprint.WeightWatch]).

        Raises:
            NotFittedError: before `fit`.
            StaleModelError: the weights changed since `fit`.
        """
        return self._snapshot()[0]

    def _snapshot(self, full: bool = False) -> Tuple[FittedState, int]:
        """The fitted state and its generation, checked, in one consistent read."""
        with self._lock:
            state, generation, watch = self._fitted, self._generation, self._watch
        if state is None or watch is None:
            raise NotFittedError(type(self))
        current = self._gradients.frozen()
        reason = watch.changed_fully(current) if full else watch.changed(current)
        if reason == "trainable":
            raise StaleModelError(
                "The model's trainable weights changed after fit; the cached "
                "gradients no longer apply. Call fit again, or restore the fitted "
                "weights."
            )
        if reason:
            raise StaleModelError(
                "The model's frozen weights or buffers (parameters outside the "
                "blocks, e.g. the base model of LoRA adapters, or normalisation "
                "statistics) changed after fit; the cached gradients no longer "
                "apply. Call fit again, or restore them."
            )
        return state, generation

    def verified_state(self) -> FittedState:
        """The fitted state after a full check of every weight the gradients
        depend on: the trainable weights and a full digest of the frozen ones
        and of the buffers. Long runs (an influence matrix, top-k,
        self-influence) call it once at their start; queries make the cheaper
        check of [state][pydvl_datainf.influence.DataInfInfluence.state].

        Raises:
            NotFittedError: before `fit`.
            StaleModelError: a weight or buffer changed since `fit`.
        """
        return self._snapshot(full=True)[0]

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the trainable weights at fit (`""` before fit)."""
        return "" if self._fitted is None else self._fitted.fingerprint

    @property
    def store(self) -> Optional[GradientStore]:
        """The training gradients (`None` before fit)."""
        return None if self._fitted is None else self._fitted.store

    @property
    def metadata(self) -> Dict[str, Any]:
        """The metadata recorded by `fit` (`{}` before fit or if none)."""
        return {} if self._fitted is None else dict(self._fitted.metadata)

    @property
    def n_train(self) -> int:
        """Number of fitted training samples (0 before fit)."""
        return 0 if self._fitted is None else self._fitted.n

    @property
    def squared_norms(self) -> Dict[str, torch.Tensor]:
        r"""$\lVert g_{il}\rVert^2$ per block, `(n,)` each."""
        return OrderedDict() if self._fitted is None else self._fitted.squared_norms

    @property
    def block_regularization(self) -> Dict[str, float]:
        r"""The resolved $\lambda_l$ per block."""
        return OrderedDict() if self._fitted is None else self._fitted.regularization

    @property
    def params(self) -> OrderedDict[str, nn.Parameter]:
        """The parameters of all blocks, by name, in block order."""
        return self._gradients.params

    @property
    def n_parameters(self) -> int:
        """Number of parameters over all blocks (valid before fit)."""
        return self.blocks.n_parameters

    @property
    def block_names(self) -> List[str]:
        """Block names, in the order of flat factors."""
        return self.blocks.names

    @property
    def is_fitted(self) -> bool:
        return self._fitted is not None

    @property
    def is_thread_safe(self) -> bool:
        """True: queries from several threads give exact results.

        Every change of the fitted state (`fit`, `with_regularization`, `to`)
        makes a new state and a new generation under a lock; a query reads one
        state at its start and uses it throughout, and cached test factors are
        keyed by the generation. Gradient computations hold the model's lock,
        shared by every instance on that model object (the engines swap
        parameters or register hooks); matrix products and store reads run
        concurrently. Other code must not run the same model in another thread
        at the same time.
        """
        return True

    @property
    def device(self) -> torch.device:
        return self._gradients.device

    def to(self, device: Union[str, torch.device]) -> DataInfInfluence:
        """Move the model and the fitted state to `device`."""
        device = torch.device(device)
        with self._lock:
            self.model.to(device)
            state = None if self._fitted is None else self._fitted.to(device)
            watch = None if state is None else self._new_watch(state)
            self._set_state(state, watch)
        return self

    def with_regularization(
        self, regularization: RegularizationSpec
    ) -> DataInfInfluence:
        """Change $\\lambda_l$ without refitting (the cache does not depend on it).

        Args:
            regularization: as in the constructor.

        Returns:
            This instance.

        Raises:
            RegularizationError: an invalid value, or one out of range for the
                compute dtype and the scale of the fitted norms.
        """
        with self._lock:
            spec = validate_regularization(regularization, self.blocks.names)
            state = self._fitted
            if state is not None:
                state = state.with_regularization(spec, self.regularization_scale)
            self._regularization_spec = spec
            self._set_state(state, self._watch)
        return self

    # -------------------------------------------------------------- gradients
    def gradients(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> OrderedDict[str, torch.Tensor]:
        r"""Per-sample gradients per block, `{block: (len(x), d_l)}` (eval mode).

        The public form of what the influence matrix and the executors need;
        see [per_sample_gradients][pydvl_datainf.influence.DataInfInfluence.per_sample_gradients].
        """
        return OrderedDict(self._gradients(x, y))

    def per_sample_gradients(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> OrderedDict[str, torch.Tensor]:
        r"""Per-sample gradients $\nabla_{\theta_l}\ell(y_i, f_\theta(x_i))$ per block.

        Uses the model in eval mode and the configured engine. Passing these,
        concatenated, to `influences_from_factors` gives the Hessian-free
        baseline $g_{test}^\top g_{train}$.

        Returns:
            `{block: (len(x), d_l)}`, in block order.
        """
        check_batch(x, y)
        return self.gradients(x, y)

    # ---------------------------------------------------------------- factors
    def _factors(
        self, state: FittedState, generation: int, x: torch.Tensor, y: torch.Tensor
    ) -> Blockwise:
        """Test factors $R_l g$ per block, from the cache when the batch was seen."""
        if self.test_factor_cache <= 0:
            return DataInfOperator(state).apply(self._gradients(x, y))
        key = (generation, batch_digest(x, y))
        with self._lock:
            hit = self._factor_cache.get(key)
            if hit is not None:
                self._factor_cache.move_to_end(key)
                return hit
        factors = DataInfOperator(state).apply(self._gradients(x, y))
        with self._lock:
            if generation == self._generation:  # else: stale, do not keep
                self._factor_cache[key] = factors
                while len(self._factor_cache) > self.test_factor_cache:
                    self._factor_cache.popitem(last=False)
        return factors

    def influence_factors_by_block(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> OrderedDict[str, torch.Tensor]:
        r"""$R_l\, \nabla_{\theta_l}\ell(y_j, f_\theta(x_j))$ for each block.

        Returns:
            `{block: (len(x), d_l)}`, in block order.
        """
        state, generation = self._snapshot()
        check_batch(x, y)
        return OrderedDict(self._factors(state, generation, x, y))

    def _influence_factors(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(self.influence_factors_by_block(x, y).values()), dim=1)

    def influence_factors(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""$R\, \nabla_\theta \ell(y_j, f_\theta(x_j))$ for each sample of the batch.

        Args:
            x: model inputs, batch first.
            y: targets.

        Returns:
            `(len(x), n_parameters)`, blocks concatenated in block order
            (with `compression`: `(len(x), sum of k_l)`, in projected space).
        """
        return self._influence_factors(x, y)

    # ------------------------------------------------------------- influences
    def _interactions(
        self,
        state: FittedState,
        factors: Blockwise,
        x: torch.Tensor,
        y: torch.Tensor,
        mode: InfluenceMode,
    ) -> Blockwise:
        if mode == InfluenceMode.Up:
            grads = training_gradients(state, self._gradients, x, y)
            out: Blockwise = OrderedDict()
            for k, f in factors.items():
                dtype = torch.promote_types(f.dtype, grads[k].dtype)
                g = grads[k].to(device=f.device, dtype=dtype)
                out[k] = f.to(dtype) @ g.T
            return out
        device = self.device
        factors = self._gradients.unproject(factors)  # into parameter space
        with self._gradients.eval_mode():
            return OrderedDict(
                perturbation_influences_by_block(
                    self.model,
                    self.loss,
                    self.params,
                    self.blocks,
                    {k: f.to(device) for k, f in factors.items()},
                    x.to(device),
                    y.to(device),
                )
            )

    def influences_from_factors_by_block(
        self,
        z_test_factors: Union[torch.Tensor, Mapping[str, torch.Tensor]],
        x: torch.Tensor,
        y: torch.Tensor,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> OrderedDict[str, torch.Tensor]:
        r"""Block-wise $\langle f_{j,l}, \nabla_{\theta_l}\ell(y_i, f_\theta(x_i))\rangle$.

        Args:
            z_test_factors: `(m, n_parameters)` factors, or `{block: (m, d_l)}`.
            x: training-side inputs.
            y: training-side targets.
            mode: `Up`, or `Perturbation` (gradient w.r.t. `x`).

        Returns:
            `{block: (m, len(x))}` for Up, `{block: (m, len(x), *x.shape[1:])}`
            for Perturbation.

        Raises:
            UnsupportedInfluenceModeException: an unknown mode (pyDVL's).
        """
        mode = _check_mode(mode)
        state, _ = self._snapshot()
        check_batch(x, y)
        factors = state.as_blocks(z_test_factors)
        return OrderedDict(self._interactions(state, factors, x, y, mode))

    def influences_from_factors(
        self,
        z_test_factors: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> torch.Tensor:
        r"""$\langle f_j, \nabla_\theta \ell(y_i, f_\theta(x_i))\rangle$, summed over blocks.

        Args:
            z_test_factors: `(m, n_parameters)` factors, e.g. from
                [influence_factors][pydvl_datainf.influence.DataInfInfluence.influence_factors].
            x: training-side inputs.
            y: training-side targets.
            mode: `Up` or `Perturbation`.

        Returns:
            `(m, len(x))` for Up, `(m, len(x), *x.shape[1:])` for Perturbation.

        Raises:
            UnsupportedInfluenceModeException: an unknown mode (pyDVL's).
        """
        parts = self.influences_from_factors_by_block(z_test_factors, x, y, mode)
        return cast(torch.Tensor, sum(parts.values()))

    def influences_by_block(
        self,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        x: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> OrderedDict[str, torch.Tensor]:
        r"""Block-wise influences $g_{test,l}^\top R_l\, g_{train,l}$ (pyDVL sign).

        Args:
            x_test: test inputs.
            y_test: test targets.
            x: training-side inputs; `None` means `x_test`.
            y: training-side targets; must be given together with `x`.
            mode: `Up` or `Perturbation`.

        Returns:
            `{block: (len(x_test), len(x))}` for Up, with trailing `x.shape[1:]`
            for Perturbation.

        Raises:
            UnsupportedInfluenceModeException: an unknown mode (pyDVL's).
        """
        mode = _check_mode(mode)
        state, generation = self._snapshot()
        if (x is None) != (y is None):
            raise ValueError("Give both x and y for the training side, or neither")
        check_batch(x_test, y_test, "x_test")
        if x is None or y is None:
            x, y = x_test, y_test
        else:
            check_batch(x, y)
        factors = self._factors(state, generation, x_test, y_test)
        return OrderedDict(self._interactions(state, factors, x, y, mode))

    def _influences(
        self,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        x: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> torch.Tensor:
        parts = self.influences_by_block(x_test, y_test, x, y, mode)
        return cast(torch.Tensor, sum(parts.values()))

    def influences(
        self,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        x: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> torch.Tensor:
        r"""Influences $g_{test}^\top R\, g_{train}$ (pyDVL sign, the paper's negated).

        A positive value means that up-weighting the training point lowers the
        test loss (helpful); self-influence is positive.

        Args:
            x_test: test inputs.
            y_test: test targets.
            x: training-side inputs; `None` means `x_test`.
            y: training-side targets; must be given together with `x`.
            mode: `Up`, or `Perturbation` (gradient w.r.t. the training input).

        Returns:
            `(len(x_test), len(x))` for Up; `(len(x_test), len(x), *x.shape[1:])`
            for Perturbation.

        Raises:
            UnsupportedInfluenceModeException: an unknown mode (pyDVL's).
        """
        return self._influences(x_test, y_test, x, y, mode)

    def train_influences(
        self, x_test: torch.Tensor, y_test: torch.Tensor
    ) -> torch.Tensor:
        r"""Influences of the test batch on *every* fitted training sample.

        No training gradient is recomputed: this is two matrix products per
        block over the cache. Columns follow the order of the fit pass.

        Returns:
            `(len(x_test), n_train)`, pyDVL sign.
        """
        state, generation = self._snapshot()
        check_batch(x_test, y_test, "x_test")
        factors = self._factors(state, generation, x_test, y_test)
        return DataInfOperator(state).scores(factors)

    # -------------------------------------------------------------------- fit
    def _new_watch(self, state: FittedState) -> WeightWatch:
        return WeightWatch(
            self.params,
            state.fingerprint,
            self._gradients.frozen(),
            state.frozen_fingerprint,
        )

    def _owns_store_at_path(self) -> bool:
        """Whether the store at `store_path` is the one this instance created."""
        if self.store_path is None or self._owned_store is None:
            return False
        path, store_id = self._owned_store
        if path != self.store_path:
            return False
        found = inspect_path(path, self.store_options.get("storage_options"))
        return bool(found.attrs.get("store_id")) and found.attrs["store_id"] == store_id

    def _new_store(self, data: Any = None) -> GradientStore:
        """A new store for `fit`; refitting may replace the store this
        instance created (never one it only opened, nor one that replaced it)."""
        options = dict(self.store_options)
        options["overwrite"] = (
            bool(options.get("overwrite", False)) or self._owns_store_at_path()
        )
        store = new_store(
            self._store_spec,
            self.blocks.names,
            data=data,
            gradients=self._gradients,
            path=self.store_path,
            dtype=self.store_dtype,
            memory_budget=self.memory_budget,
            bytes_per_row=self.n_parameters * self._gradients.dtype.itemsize,
            options=options,
        )
        return store

    def _remember_store(self, store: GradientStore) -> None:
        """Remember a Zarr store this instance created at `store_path`."""
        store = getattr(store, "resolved", store)
        if isinstance(store, ZarrGradientStore) and store.path == self.store_path:
            self._owned_store = (store.path, store.store_id)

    def fit(
        self,
        data: Union[DataLoader, Iterable[Tuple[torch.Tensor, torch.Tensor]], Any],
        *,
        collate_fn: Optional[Callable[[List[Any]], Any]] = None,
        batch_size: int = 8,
        metadata: Optional[Mapping[str, Any]] = None,
        client: Optional[Client] = None,
        partition_rows: Optional[int] = None,
        resume: bool = False,
    ) -> DataInfInfluence:
        r"""One pass over `data`: cache gradients, squared norms and $\lambda_l$.

        Training rows are numbered in the order of this pass (a shuffling
        loader gives a random order; prefer `shuffle=False`).

        With a Dask `client`, the pass runs on the cluster: fixed partitions
        of rows, each written by a task into the Zarr store at `store_path`,
        with the same bits as a one-process fit (see
        [fit_on_dask][pydvl_datainf.dask_fit.fit_on_dask]).

        Args:
            data: an iterable of `(x, y)` batches, e.g. a torch DataLoader; or,
                with `collate_fn`, a map-style dataset (e.g. a tokenized
                `datasets.Dataset`), read in order: row `i` is dataset row `i`.
            collate_fn: makes a batch of dataset rows (e.g. a Hugging Face data
                collator); the model's `batch_adapter`, if it has one, turns
                the batch into `(x, y)` (see
                [DatasetBatches][pydvl_datainf.batches.DatasetBatches]).
            batch_size: rows per batch with `collate_fn` (scores do not depend
                on it).
            metadata: JSON-serialisable facts to record with the fit (and in a
                Zarr store); read back by
                [metadata][pydvl_datainf.influence.DataInfInfluence.metadata],
                also after `from_store`.
            client: a `distributed.Client` to fit on (needs `store="zarr"`;
                `data` a DataLoader over a map-style dataset, in order, or a
                dataset with `collate_fn`).
            partition_rows: with `client`, rows per partition (default about
                $n/16$).
            resume: with `client`, finish an interrupted fit of the same model,
                loss and data.

        Returns:
            This instance, fitted.

        Raises:
            EmptyDataError: the loader yields no samples.
            NonFiniteGradientError: a gradient is NaN or inf (names the samples).
            RegularizationError: an `"auto"` $\lambda_l$ is zero, or a value
                is out of range for the compute dtype.
            ValueError: `client` without `store="zarr"` and a `store_path`.
            TypeError: `metadata` that JSON cannot hold.

        Example:
            ```python
            import torch
            from torch.utils.data import TensorDataset
            from pydvl_datainf import DataInfInfluence

            model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
            dataset = TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,)))
            infl = DataInfInfluence(model, loss, progress=False).fit(
                dataset, collate_fn=torch.utils.data.default_collate,
                metadata={"data": "random"})
            assert infl.n_train == 20 and infl.metadata == {"data": "random"}
            ```
        """
        if collate_fn is not None:
            data = DatasetBatches(
                data, collate_fn, batch_size=batch_size, adapter=adapter_for(self.model)
            )
        if client is None and (partition_rows is not None or resume):
            raise ValueError("partition_rows and resume apply to a fit with client=")
        if client is not None:
            loader = data.loader() if isinstance(data, DatasetBatches) else data
            # not under the model's lock: in-process workers compute on this
            # very model, and take the lock themselves
            with self._lock:
                self._set_state(None)
            state = self._fit_on_dask(loader, client, partition_rows, resume, metadata)
            with self._lock:
                self._remember_store(state.store)
                self._set_state(state, self._new_watch(state))
            return self
        with self._lock:
            self._set_state(None)
            store = self._new_store(data)
            try:
                state = fit_state(
                    self._gradients,
                    data,
                    store,
                    regularization=self._regularization_spec,
                    regularization_scale=self.regularization_scale,
                    factorize=self.factorize,
                    progress=self.progress,
                    metadata=metadata,
                )
            except BaseException:
                store.close()  # a temporary directory goes at once
                raise
            self._remember_store(state.store)
            self._set_state(state, self._new_watch(state))
        return self

    def _fit_on_dask(
        self,
        data: Any,
        client: Client,
        partition_rows: Optional[int],
        resume: bool,
        metadata: Optional[Mapping[str, Any]],
    ) -> FittedState:
        if self._store_spec != "zarr" or self.store_path is None:
            raise ValueError(
                "A fit on Dask writes a Zarr store that the workers share: pass "
                "store='zarr' and a store_path that every worker can reach"
            )
        options = self.store_options
        return fit_on_dask(
            self._gradients,
            data,
            client,
            self.store_path,
            regularization=self._regularization_spec,
            regularization_scale=self.regularization_scale,
            dtype=self.store_dtype,
            chunk_rows=options.get("chunk_rows"),
            partition_rows=partition_rows,
            overwrite=bool(options.get("overwrite", False))
            or self._owns_store_at_path(),
            resume=resume,
            storage_options=options.get("storage_options"),
            compressors=options.get("compressors"),
            metadata=metadata,
            progress=self.progress,
        )

    @classmethod
    def from_store(
        cls,
        model: nn.Module,
        loss: LossFn,
        store: Union[str, os.PathLike, ZarrGradientStore],
        *,
        regularization: Optional[RegularizationSpec] = None,
        engine: Union[str, GradientEngine] = "auto",
        progress: bool = True,
        test_factor_cache: int = 4,
        storage_options: Optional[Mapping[str, Any]] = None,
        allow_other_loss: bool = False,
        loss_id: Optional[str] = None,
    ) -> DataInfInfluence:
        r"""Reopen a model fitted into a Zarr gradient store, without refitting.

        The store records the block structure, $n$, $\lambda_l$, the squared
        norms, a SHA-256 of the fitted weights, a digest of the frozen weights
        and buffers, the identity of the loss with its settings, and the
        digests of the training rows and of their order; the model must have
        exactly these blocks and weights (frozen ones included), and the loss
        must be the same, with the same settings.

        The reopened model reads the store but does not own it: `fit` on it
        refuses to replace the store unless `store_options={"overwrite": True}`
        is given to a new instance.

        Args:
            model: the model, with the weights it had at fit.
            loss: the loss used at fit.
            store: the store's path or fsspec URL, or an open
                [ZarrGradientStore][pydvl_datainf.storage.ZarrGradientStore].
            regularization: `None` keeps the fitted $\lambda_l$ (checked);
                otherwise a new spec, as in the constructor (resolved from the
                stored norms).
            engine: per-sample gradient engine for test-side gradients.
            progress: show progress bars.
            test_factor_cache: as in the constructor.
            storage_options: fsspec options for URLs.
            allow_other_loss: accept a loss whose name differs from the one
                recorded at fit (e.g. the same function defined elsewhere).
            loss_id: the name given to the loss at fit, if one was.

        Returns:
            A fitted instance reading its training gradients from the store.
            Queries on training rows read their stored gradients (the row
            index is saved with the store).

        Raises:
            StoreMismatchError: the store is incomplete or damaged, or was
                written for other blocks, other weights (frozen ones
                included) or another loss.
            RegularizationError: a stored $\lambda_l$ is not positive and
                finite, or out of range for the model's dtype.
            FileNotFoundError: no store at the path.

        Example:
            ```python
            import torch
            from torch.utils.data import DataLoader, TensorDataset
            from pydvl_datainf import DataInfInfluence

            torch.manual_seed(0)
            model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
            x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
            loader = DataLoader(TensorDataset(x, y), batch_size=16)
            infl = DataInfInfluence(model, loss, store="zarr",
                                    store_path="grads.zarr").fit(loader)
            # later, in another process, with the same weights
            again = DataInfInfluence.from_store(model, loss, "grads.zarr")
            assert again.n_train == 40
            assert torch.equal(again.train_influences(x[:2], y[:2]),
                               infl.train_influences(x[:2], y[:2]))
            ```
        """
        zs = (
            store
            if isinstance(store, ZarrGradientStore)
            else ZarrGradientStore.open(store, storage_options)
        )
        recorded = zs.load_fit_state()
        try:  # the recorded mapping, whatever spec or default made it
            blocks = build_blocks(model, recorded.block_structure)
        except BlockStructureError as e:
            raise StoreMismatchError(
                f"The gradient store at {zs.path!r} was written for other blocks "
                f"({list(recorded.block_structure)}): {e}"
            ) from e
        self = cls(
            model,
            loss,
            "auto",
            blocks,
            regularization_scale=recorded.regularization_scale,
            engine=engine,
            progress=progress,
            test_factor_cache=test_factor_cache,
            store="zarr",
            store_path=zs.path,
            store_options={"storage_options": dict(storage_options or {})},
            loss_id=loss_id,
            compression=stored_projections(recorded),
        )
        watch = WeightWatch(self.params, frozen=self._gradients.frozen())
        state = load_state(
            zs,
            blocks,
            watch.digest,
            self._gradients.loss_identity(),
            frozen_fingerprint=watch.frozen_digest,
            projections=self._gradients.projections,
            dtype=self._gradients.dtype,
            regularization=regularization,
            allow_other_loss=allow_other_loss,
        )
        self._regularization_spec = state.regularization_spec
        self._set_state(state, watch)
        return self
