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
import tempfile
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    Union,
    cast,
)

import torch
from pydvl.influence.base_influence_function_model import InfluenceFunctionModel
from pydvl.influence.types import InfluenceMode
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from . import formula
from .blocks import BlockSpec, BlockStructure, build_blocks
from .errors import (
    BlockStructureError,
    EmptyDataError,
    NonFiniteGradientError,
    NotFittedError,
    RegularizationError,
    StaleModelError,
    StoreExistsError,
    StoreMismatchError,
)
from .factored import Rows, densify, rows_nbytes
from .factored import squared_norms as factored_norms
from .fingerprint import WeightWatch
from .gradients import GradientEngine, LossFn, accumulation_dtype, get_engine
from .perturbation import perturbation_influences_by_block
from .rows import RowIndex, batch_digest
from .stores import (
    AutoGradientStore,
    FitState,
    GradientStore,
    MemoryGradientStore,
    RecomputeGradientStore,
    ZarrGradientStore,
    resolve_store_dtype,
    zarr_group_exists,
)

__all__ = ["DataInfInfluence", "RegularizationSpec"]

logger = logging.getLogger(__name__)

RegularizationSpec = Union[str, float, Mapping[str, Union[float, str]]]
"""`"auto"`, a positive float for every block, or `{block: float | "auto"}`."""

Blockwise = Dict[str, torch.Tensor]

StoreSpec = Union[str, Callable[[List[str]], GradientStore]]
"""`"memory"`, `"zarr"`, `"recompute"`, `"auto"`, or `block_names -> GradientStore`."""

_STORE_KINDS = ("memory", "zarr", "recompute", "auto")

_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = (
    weakref.WeakKeyDictionary()
)
_MODEL_LOCKS_GUARD = threading.Lock()


def _model_lock(model: nn.Module) -> threading.RLock:
    """One lock per model object, shared by every DataInfInfluence on it.

    Gradient engines swap parameters or register hooks on the module, so two
    instances sharing a model must not compute gradients at the same time.
    """
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = threading.RLock()
            _MODEL_LOCKS[model] = lock
        return lock


def _check_batch(x: torch.Tensor, y: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(
            f"{what} and its labels must be torch tensors, got {type(x).__name__} "
            f"and {type(y).__name__}"
        )
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(
            f"{what} and its labels need a batch dimension, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if len(x) != len(y):
        raise ValueError(
            f"{what} has {len(x)} samples but its labels have {len(y)} "
            f"(shapes {tuple(x.shape)} and {tuple(y.shape)})"
        )


def _expected_rows(data: Any) -> Optional[int]:
    """Number of samples a DataLoader will yield, if it can tell (a hint only)."""
    if not isinstance(data, DataLoader):
        return None
    try:
        return len(data.sampler)  # type: ignore[arg-type]
    except TypeError:
        return None


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
        block_structure: see [build_blocks][pydvl_datainf.blocks.build_blocks];
            default one block per leaf module with trainable parameters.
        regularization_scale: $c$ in the `"auto"` rule (0.1 in the paper).
        engine: per-sample gradient engine, a name (`"auto"`, `"func"`,
            `"loop"`, ...) or an instance of
            [GradientEngine][pydvl_datainf.gradients.GradientEngine].
        store: where `fit` keeps the per-sample training gradients (see
            [stores][pydvl_datainf.stores]): `"memory"`; `"zarr"` (at
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
        store_options: more [ZarrGradientStore][pydvl_datainf.stores.ZarrGradientStore]
            arguments: `overwrite`, `chunk_rows`, `storage_options`,
            `compressors`.
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
        block_structure: BlockSpec = "module",
        *,
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
    ):
        self.model = model
        self.loss = loss
        self.blocks: BlockStructure = build_blocks(model, block_structure)
        if not regularization_scale > 0:
            raise RegularizationError(
                f"regularization_scale must be positive, got {regularization_scale}"
            )
        self.regularization_scale = float(regularization_scale)
        self._regularization_spec = self._validate_regularization(regularization)
        self.engine = get_engine(engine)
        if not (callable(store) or store in _STORE_KINDS):
            raise ValueError(
                f"store must be one of {list(_STORE_KINDS)} or a callable returning "
                f"a GradientStore, got {store!r}"
            )
        if store == "zarr" and store_path is None:
            raise ValueError("store='zarr' needs store_path (a path or fsspec URL)")
        unknown = set(store_options or {}) - {
            "overwrite",
            "chunk_rows",
            "storage_options",
            "compressors",
        }
        if unknown:
            raise ValueError(
                f"Unknown store_options {sorted(unknown)}; use overwrite, "
                f"chunk_rows, storage_options, compressors"
            )
        self._store_spec = store
        self.store_path = None if store_path is None else os.fspath(store_path)
        self.store_dtype = resolve_store_dtype(store_dtype)
        self.memory_budget = memory_budget
        self.store_options: Dict[str, Any] = dict(store_options or {})
        self._owned_store_path: Optional[str] = None
        self.progress = progress
        self.factorize = bool(factorize)
        self.test_factor_cache = int(test_factor_cache)
        self._lock = _model_lock(model)
        self._eval_depth = 0
        self._factor_cache: OrderedDict[bytes, Blockwise] = OrderedDict()
        self._reset_fit()

    # ------------------------------------------------------------------ state
    def _reset_fit(self) -> None:
        self.store: Optional[GradientStore] = None
        self.n_train: int = 0
        self.squared_norms: Dict[str, torch.Tensor] = OrderedDict()
        self.block_regularization: Dict[str, float] = OrderedDict()
        self._watch: Optional[WeightWatch] = None
        self._rows: Optional[RowIndex] = None
        self._factor_cache.clear()

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_factor_cache"] = OrderedDict()
        state["_eval_depth"] = 0
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_eval_depth", 0)
        self._lock = _model_lock(self.model)

    @property
    def params(self) -> OrderedDict[str, nn.Parameter]:
        """The parameters of all blocks, by name, in block order."""
        named = dict(self.model.named_parameters())
        return OrderedDict((p, named[p]) for p in self.blocks.parameter_names())

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
        return self.store is not None

    @property
    def is_thread_safe(self) -> bool:
        """True: gradient computations and caches are guarded by a lock.

        The lock belongs to the model object, so several instances sharing one
        model also serialize their gradient computations (the engines swap
        parameters or register hooks). Matrix products and store reads run
        concurrently. Other code must not run the same model in another
        thread at the same time.
        """
        return True

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def to(self, device: Union[str, torch.device]) -> DataInfInfluence:
        """Move the model and the cached state to `device`."""
        device = torch.device(device)
        with self._lock:
            self.model.to(device)
            if self.store is not None:
                self.store = self.store.to(device)
                self.squared_norms = OrderedDict(
                    (k, v.to(device)) for k, v in self.squared_norms.items()
                )
                self._watch = WeightWatch(self.params)
            self._factor_cache.clear()
        return self

    # --------------------------------------------------------- regularization
    def _validate_regularization(
        self, spec: RegularizationSpec
    ) -> Dict[str, Union[float, str]]:
        names = self.blocks.names

        def check(block: str, value: Any) -> Union[float, str]:
            if isinstance(value, str):
                if value != "auto":
                    raise RegularizationError(
                        f"Regularization for block {block!r} must be a positive "
                        f"float or 'auto', got {value!r}"
                    )
                return value
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RegularizationError(
                    f"Regularization for block {block!r} must be a positive float "
                    f"or 'auto', got {type(value).__name__}"
                )
            if not (value > 0 and value < float("inf")):
                raise RegularizationError(
                    f"Regularization for block {block!r} must be positive and "
                    f"finite, got {value}"
                )
            return float(value)

        if isinstance(spec, Mapping):
            unknown = [k for k in spec if k not in names]
            if unknown:
                raise RegularizationError(
                    f"Regularization names unknown blocks {unknown}; the blocks "
                    f"are {names}"
                )
            missing = [k for k in names if k not in spec]
            if missing:
                raise RegularizationError(
                    f"Regularization dict misses blocks {missing}; give a value "
                    f"(float or 'auto') for every block of {names}"
                )
            return OrderedDict((k, check(k, spec[k])) for k in names)
        return OrderedDict((k, check(k, spec)) for k in names)

    def _resolve_regularization(
        self, spec: Mapping[str, Union[float, str]], sums: Mapping[str, float]
    ) -> Dict[str, float]:
        out: Dict[str, float] = OrderedDict()
        for b in self.blocks:
            value = spec[b.name]
            if value == "auto":
                lam = formula.auto_regularization(
                    sums[b.name], self.n_train, b.size, self.regularization_scale
                )
                if not (lam > 0 and lam < float("inf")):
                    raise RegularizationError(
                        f"'auto' regularization of block {b.name!r} is {lam}: all "
                        f"its training gradients vanish. Pass a positive float for "
                        f"this block, or leave it out of the block structure."
                    )
                out[b.name] = lam
            else:
                out[b.name] = float(value)
        return out

    def with_regularization(
        self, regularization: RegularizationSpec
    ) -> DataInfInfluence:
        """Change $\\lambda_l$ without refitting (the cache does not depend on it).

        Args:
            regularization: as in the constructor.

        Returns:
            This instance.
        """
        with self._lock:
            self._regularization_spec = self._validate_regularization(regularization)
            if self.is_fitted:
                sums = {k: float(v.sum()) for k, v in self.squared_norms.items()}
                self.block_regularization = self._resolve_regularization(
                    self._regularization_spec, sums
                )
            self._factor_cache.clear()
        return self

    # -------------------------------------------------------------- gradients
    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """The model in eval mode (restored after); nested uses cost nothing."""
        if self._eval_depth:
            self._eval_depth += 1
            try:
                yield
            finally:
                self._eval_depth -= 1
            return
        was_training = self.model.training
        self.model.eval()
        self._eval_depth = 1
        try:
            yield
        finally:
            self._eval_depth = 0
            self.model.train(was_training)

    def _grads(
        self, x: torch.Tensor, y: torch.Tensor, offset: Optional[int] = None
    ) -> Blockwise:
        """Per-sample gradients per block, `(b, d_l)`, checked for finiteness."""
        grads = self._grads_and_norms(x, y, offset)[0]
        return OrderedDict((k, densify(g)) for k, g in grads.items())

    def _grads_and_norms(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        offset: Optional[int] = None,
        factored: bool = False,
    ) -> Tuple[Dict[str, Rows], Blockwise]:
        """Per-sample gradients and their squared norms per block.

        A gradient with a NaN or inf entry has a non-finite squared norm, so the
        norms (needed anyway) double as the finiteness check.

        Args:
            factored: allow [FactoredGrads][pydvl_datainf.factored.FactoredGrads]
                blocks (their norms come from the factors).

        Raises:
            NonFiniteGradientError: naming the samples (training indices when
                `offset` is given).
        """
        device = self.device
        x, y = x.to(device), y.to(device)
        with self._lock, self._eval_mode():
            if factored:
                per_param = self.engine.per_sample_grads_factored(
                    self.model, self.loss, x, y, self.params
                )
            else:
                per_param = dict(
                    self.engine.per_sample_grads(
                        self.model, self.loss, x, y, self.params
                    )
                )
        grads = self.blocks.gather(per_param)
        norms = OrderedDict((k, factored_norms(g)) for k, g in grads.items())
        # the norms are >= 0: a finite total (one reduction) means all are
        # finite; otherwise look closer (the total alone may overflow)
        if not bool(torch.isfinite(torch.cat(list(norms.values())).sum())):
            finite = torch.stack([torch.isfinite(s) for s in norms.values()])
        else:
            finite = None
        if finite is not None and not bool(finite.all()):
            bad_blocks = [k for k, ok in zip(norms, finite.all(dim=1)) if not ok]
            idx = torch.nonzero(~finite.all(dim=0)).flatten().tolist()
            where = (
                f"training samples {[offset + i for i in idx][:20]}"
                if offset is not None
                else f"samples {idx[:20]} of the batch"
            )
            raise NonFiniteGradientError(
                f"NaN or inf per-sample gradients (or squared norms overflowing "
                f"their dtype) for {where} ({len(idx)} in all) in blocks "
                f"{bad_blocks}"
            )
        return grads, norms

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
        _check_batch(x, y)
        return OrderedDict(self._grads(x, y))

    def _train_grads(self, x: torch.Tensor, y: torch.Tensor) -> Blockwise:
        """Gradients of training-side samples: cached rows if known, else computed."""
        assert self.store is not None
        if self._rows is not None and self.store.random_access:
            index = self._rows.lookup(x, y)
            if index is not None:
                return self.store.take(index)
        return self._grads(x, y)

    # -------------------------------------------------------------------- fit
    def _gradient_bytes_per_row(self) -> int:
        item = accumulation_dtype(next(iter(self.params.values())).dtype).itemsize
        return self.n_parameters * item

    def _zarr_store(self, path: str) -> ZarrGradientStore:
        opts = dict(self.store_options)
        overwrite = bool(opts.pop("overwrite", False)) or (
            path == self._owned_store_path
        )
        store = ZarrGradientStore(
            path,
            self.blocks.names,
            dtype=self.store_dtype,
            overwrite=overwrite,
            **opts,
        )
        self._owned_store_path = path
        return store

    def _budget_bytes(self) -> int:
        if self.memory_budget is None:
            import psutil

            return int(psutil.virtual_memory().available // 4)
        if isinstance(self.memory_budget, str):
            from dask.utils import parse_bytes

            return int(parse_bytes(self.memory_budget))
        return int(self.memory_budget)

    def _new_store(self, data: Any = None) -> GradientStore:
        spec = self._store_spec
        if spec == "memory":
            return MemoryGradientStore(self.blocks.names, capacity=_expected_rows(data))
        if spec == "zarr":
            assert self.store_path is not None
            return self._zarr_store(self.store_path)
        if spec == "recompute":
            return RecomputeGradientStore(
                self.blocks.names,
                data,
                self._grads,
            )
        if spec == "auto":
            budget = self._budget_bytes()
            path = self.store_path
            if path is None:
                path = os.path.join(tempfile.mkdtemp(prefix="datainf-"), "grads.zarr")
            elif (
                not self.store_options.get("overwrite", False)
                and path != self._owned_store_path
                and zarr_group_exists(path, self.store_options.get("storage_options"))
            ):
                raise StoreExistsError(
                    f"A Zarr store already exists at {path!r}; pass "
                    f"store_options={{'overwrite': True}} or another store_path"
                )
            try:
                n_est: Optional[int] = len(data.dataset)
            except (AttributeError, TypeError):
                n_est = None
            if n_est is not None and n_est * self._gradient_bytes_per_row() > budget:
                logger.info(
                    "Gradients (~%.3g GB) exceed the memory budget (%.3g GB): "
                    "writing them to %s",
                    n_est * self._gradient_bytes_per_row() / 1e9,
                    budget / 1e9,
                    path,
                )
                return self._zarr_store(path)
            zpath = path
            return AutoGradientStore(
                self.blocks.names, budget, lambda: self._zarr_store(zpath)
            )
        return cast(GradientStore, cast(Callable, spec)(self.blocks.names))

    @staticmethod
    def _exact_key_bytes(store: GradientStore, grads: Mapping[str, Rows]) -> int:
        """Largest sample kept by its bytes in the row index: one cached gradient
        row for in-memory caches (the index never outgrows the cache), else 64."""
        if isinstance(store, MemoryGradientStore):
            n = len(next(iter(grads.values())))
            return max(64, sum(rows_nbytes(g) for g in grads.values()) // max(1, n))
        return 64

    def fit(self, data: DataLoader) -> DataInfInfluence:
        """One pass over `data`: cache gradients, squared norms and $\\lambda_l$.

        Training rows are numbered in the order of this pass (a shuffling
        loader gives a random order; prefer `shuffle=False`).

        Args:
            data: an iterable of `(x, y)` batches, e.g. a torch DataLoader.

        Returns:
            This instance, fitted.

        Raises:
            EmptyDataError: the loader yields no samples.
            NonFiniteGradientError: a gradient is NaN or inf (names the samples).
            RegularizationError: an `"auto"` $\\lambda_l$ is zero.
        """
        if isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler):
            logger.warning(
                "The training loader shuffles: training rows are numbered in the "
                "order of this pass, not the dataset's order."
            )
        with self._lock, self._eval_mode():  # eval mode once for the pass
            self._reset_fit()
            store = self._new_store(data)
            factored = self.factorize and getattr(store, "accepts_factored", False)
            rows: Optional[RowIndex] = None
            norm_parts: Dict[str, List[torch.Tensor]] = {
                k: [] for k in self.blocks.names
            }
            try:
                total = len(data)  # type: ignore[arg-type]
            except TypeError:
                total = None
            n = 0
            for batch in tqdm(
                data, total=total, desc="DataInf fit", disable=not self.progress
            ):
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise TypeError(
                        "The training loader must yield (x, y) pairs, got "
                        f"{type(batch).__name__}"
                        + (
                            f" of length {len(batch)}"
                            if hasattr(batch, "__len__")
                            else ""
                        )
                    )
                x, y = batch
                _check_batch(x, y, "training batch x")
                if len(x) == 0:
                    continue
                grads, norms = self._grads_and_norms(x, y, offset=n, factored=factored)
                for k, s in norms.items():
                    norm_parts[k].append(s)
                store.note_batch(x, y)
                store.append(grads)
                if store.random_access:
                    if rows is None:
                        rows = RowIndex(self._exact_key_bytes(store, grads))
                    rows.add(x, y)
                n += len(x)
            if n == 0:
                raise EmptyDataError(
                    "The training loader yielded no samples; DataInf needs n > 0"
                )
            store.finalize()
            self.n_train = n
            self.squared_norms = OrderedDict(
                (k, torch.cat(v)) for k, v in norm_parts.items()
            )
            sums = {k: float(v.sum()) for k, v in self.squared_norms.items()}
            self.block_regularization = self._resolve_regularization(
                self._regularization_spec, sums
            )
            self._rows = rows if store.random_access else None
            self._watch = WeightWatch(self.params)
            store.save_fit_state(
                FitState(
                    n_train=n,
                    regularization=dict(self.block_regularization),
                    regularization_spec=dict(self._regularization_spec),
                    regularization_scale=self.regularization_scale,
                    squared_norms=dict(self.squared_norms),
                    weights_digest=self._watch.digest,
                    block_structure=dict(self.blocks.to_dict()),
                    block_shapes={
                        b.name: [list(s) for s in b.shapes] for b in self.blocks
                    },
                )
            )
            if isinstance(store, AutoGradientStore):
                store = store.resolved
            self.store = store
        logger.info(
            "Fitted DataInf on %d samples, %d blocks, %d parameters; lambda: %s",
            n,
            len(self.blocks),
            self.n_parameters,
            {k: f"{v:.3g}" for k, v in self.block_regularization.items()},
        )
        return self

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
    ) -> DataInfInfluence:
        r"""Reopen a model fitted into a Zarr gradient store, without refitting.

        The store records the block structure, $n$, $\lambda_l$, the squared
        norms and a SHA-256 of the fitted weights; the model must have exactly
        these blocks and weights.

        Args:
            model: the model, with the weights it had at fit.
            loss: the loss used at fit.
            store: the store's path or fsspec URL, or an open
                [ZarrGradientStore][pydvl_datainf.stores.ZarrGradientStore].
            regularization: `None` keeps the fitted $\lambda_l$; otherwise a
                new spec, as in the constructor (resolved from the stored norms).
            engine: per-sample gradient engine for test-side gradients.
            progress: show progress bars.
            test_factor_cache: as in the constructor.
            storage_options: fsspec options for URLs.

        Returns:
            A fitted instance reading its training gradients from the store.
            Queries on training rows recompute their gradients (the row digests
            of `fit` are not stored); the streaming matrix and
            `train_influences` read the store.

        Raises:
            StoreMismatchError: the store is incomplete, or was written for
                other blocks or other weights.
            FileNotFoundError: no store at the path.

        Example:
            ```python
            infl = DataInfInfluence(model, loss, store="zarr",
                                    store_path="grads.zarr").fit(loader)
            # later, in another process
            infl = DataInfInfluence.from_store(model, loss, "grads.zarr")
            ```
        """
        zs = (
            store
            if isinstance(store, ZarrGradientStore)
            else ZarrGradientStore.open(store, storage_options)
        )
        state = zs.load_fit_state()
        try:
            blocks = build_blocks(model, state.block_structure)
        except BlockStructureError as e:
            raise StoreMismatchError(
                f"The gradient store at {zs.path!r} was written for other blocks "
                f"({list(state.block_structure)}): {e}"
            ) from e
        shapes = {b.name: [list(s) for s in b.shapes] for b in blocks}
        if (state.block_shapes and shapes != state.block_shapes) or (
            blocks.sizes != zs.block_sizes
        ):
            raise StoreMismatchError(
                f"The gradient store at {zs.path!r} was written for blocks of other "
                f"shapes: stored {state.block_shapes}, model {shapes}"
            )
        self = cls(
            model,
            loss,
            state.regularization_spec if regularization is None else regularization,
            state.block_structure,
            regularization_scale=state.regularization_scale,
            engine=engine,
            progress=progress,
            test_factor_cache=test_factor_cache,
            store="zarr",
            store_path=zs.path,
            store_options={"storage_options": dict(storage_options or {})},
        )
        watch = WeightWatch(self.params)
        if watch.digest != state.weights_digest:
            raise StoreMismatchError(
                f"The gradient store at {zs.path!r} was written for other weights "
                f"(SHA-256 {state.weights_digest[:12]}..., the model has "
                f"{watch.digest[:12]}...). Load the weights that were fitted, or "
                f"fit again."
            )
        self.n_train = state.n_train
        self.squared_norms = OrderedDict(
            (k, state.squared_norms[k]) for k in self.blocks.names
        )
        if regularization is None:
            self.block_regularization = OrderedDict(
                (k, state.regularization[k]) for k in self.blocks.names
            )
        else:
            sums = {k: float(v.sum()) for k, v in self.squared_norms.items()}
            self.block_regularization = self._resolve_regularization(
                self._regularization_spec, sums
            )
        self._watch = watch
        self._rows = None
        self._owned_store_path = zs.path
        self.store = zs
        return self

    def _check_ready(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(type(self))
        assert self._watch is not None
        if self._watch.changed():
            raise StaleModelError(
                "The model's trainable weights changed after fit; the cached "
                "gradients no longer apply. Call fit again, or restore the fitted "
                "weights."
            )

    # ---------------------------------------------------------------- factors
    def _factors_from_grads(self, v: Blockwise) -> Blockwise:
        """$R_l v$ per block, streaming the training gradients chunk by chunk."""
        assert self.store is not None
        corrections = {k: torch.zeros_like(t) for k, t in v.items()}
        for start, chunk in self.store.chunks():
            for k in corrections:
                g = chunk[k].to(device=v[k].device, dtype=v[k].dtype)
                s = self.squared_norms[k][start : start + len(g)].to(g)
                corrections[k] += formula.inverse_harmonic_mean_correction(
                    v[k], g, s, self.block_regularization[k]
                )
        return OrderedDict(
            (
                k,
                formula.finish_inverse_harmonic_mean(
                    v[k], corrections[k], self.n_train, self.block_regularization[k]
                ),
            )
            for k in v
        )

    def _factors(self, x: torch.Tensor, y: torch.Tensor) -> Blockwise:
        """Test factors per block, from the LRU cache when the batch was seen."""
        if self.test_factor_cache <= 0:
            return self._factors_from_grads(self._grads(x, y))
        key = batch_digest(x, y)
        with self._lock:
            hit = self._factor_cache.get(key)
            if hit is not None:
                self._factor_cache.move_to_end(key)
                return hit
        factors = self._factors_from_grads(self._grads(x, y))
        with self._lock:
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
        self._check_ready()
        _check_batch(x, y)
        return OrderedDict(self._factors(x, y))

    def _influence_factors(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(self.influence_factors_by_block(x, y).values()), dim=1)

    def influence_factors(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""$R\, \nabla_\theta \ell(y_j, f_\theta(x_j))$ for each sample of the batch.

        Args:
            x: model inputs, batch first.
            y: targets.

        Returns:
            `(len(x), n_parameters)`, blocks concatenated in block order.
        """
        self._check_ready()
        return self._influence_factors(x, y)

    # ------------------------------------------------------------- influences
    def _factors_as_blocks(
        self, z: Union[torch.Tensor, Mapping[str, torch.Tensor]]
    ) -> Blockwise:
        if isinstance(z, Mapping):
            if list(z) != self.blocks.names:
                raise ValueError(
                    f"Factor blocks {list(z)} do not match the model's blocks "
                    f"{self.blocks.names}"
                )
            out = OrderedDict()
            for b in self.blocks:
                t = z[b.name]
                if t.ndim != 2 or t.shape[1] != b.size:
                    raise ValueError(
                        f"Factors of block {b.name!r} must have shape (m, {b.size}), "
                        f"got {tuple(t.shape)}"
                    )
                out[b.name] = t
            lengths = {len(t) for t in out.values()}
            if len(lengths) != 1:
                raise ValueError(f"Factor blocks have different lengths {lengths}")
            return out
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"Factors must be a tensor or dict, got {type(z).__name__}")
        if z.ndim != 2 or z.shape[1] != self.n_parameters:
            raise ValueError(
                f"Factors must have shape (m, n_parameters={self.n_parameters}), got "
                f"{tuple(z.shape)}"
            )
        return self.blocks.split(z)

    def _check_mode(self, mode: InfluenceMode) -> InfluenceMode:
        if not isinstance(mode, InfluenceMode):
            try:
                return InfluenceMode(mode)
            except ValueError:
                raise ValueError(
                    f"Unsupported influence mode {mode!r}; use InfluenceMode.Up or "
                    f"InfluenceMode.Perturbation"
                ) from None
        return mode

    def _interactions(
        self,
        factors: Blockwise,
        x: torch.Tensor,
        y: torch.Tensor,
        mode: InfluenceMode,
    ) -> Blockwise:
        mode = self._check_mode(mode)
        if mode == InfluenceMode.Up:
            grads = self._train_grads(x, y)
            return OrderedDict(
                (
                    k,
                    f.to(torch.promote_types(f.dtype, grads[k].dtype))
                    @ grads[k].to(torch.promote_types(f.dtype, grads[k].dtype)).T,
                )
                for k, f in factors.items()
            )
        device = self.device
        with self._lock, self._eval_mode():
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
        """
        self._check_ready()
        _check_batch(x, y)
        return OrderedDict(
            self._interactions(self._factors_as_blocks(z_test_factors), x, y, mode)
        )

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
        """
        return cast(
            torch.Tensor,
            sum(
                self.influences_from_factors_by_block(
                    z_test_factors, x, y, mode
                ).values()
            ),
        )

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
        """
        self._check_ready()
        if (x is None) != (y is None):
            raise ValueError("Give both x and y for the training side, or neither")
        _check_batch(x_test, y_test, "x_test")
        if x is None or y is None:
            x, y = x_test, y_test
        else:
            _check_batch(x, y)
        return OrderedDict(
            self._interactions(self._factors(x_test, y_test), x, y, mode)
        )

    def _influences(
        self,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        x: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> torch.Tensor:
        return cast(
            torch.Tensor,
            sum(self.influences_by_block(x_test, y_test, x, y, mode).values()),
        )

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
        """
        self._check_ready()
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
        self._check_ready()
        _check_batch(x_test, y_test, "x_test")
        assert self.store is not None
        factors = self._factors(x_test, y_test)
        dtype = next(iter(factors.values())).dtype
        out = torch.zeros(len(x_test), self.n_train, dtype=dtype, device=self.device)
        for start, chunk in self.store.chunks():
            for k, f in factors.items():
                g = chunk[k].to(device=out.device, dtype=dtype)
                out[:, start : start + len(g)] += f.to(out.device) @ g.T
        return out
