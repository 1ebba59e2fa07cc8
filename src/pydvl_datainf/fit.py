r"""The fit pass: one pass over the training data gives a
[FittedState][pydvl_datainf.state.FittedState].

[GradientFunction][pydvl_datainf.fit.GradientFunction] computes per-sample
gradients per block for a model and a loss (in eval mode, under the model's
lock, checked for finiteness); it is a plain callable `(x, y) -> {block: (b, d_l)}`,
which is all a recompute store needs. [fit][pydvl_datainf.fit.fit] streams the
training loader through it into a gradient store, collects the squared norms,
resolves $\lambda_l$ and records the fingerprint of the weights, the loss and
the row digests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from .blocks import BlockStructure
from .config import RegularizationSpec, validate_regularization
from .errors import EmptyDataError, NonFiniteGradientError
from .factored import Rows, densify
from .factored import squared_norms as factored_norms
from .fingerprint import FrozenRefs, frozen_digest, loss_name, weights_digest
from .gradients import GradientEngine, LossFn, accumulation_dtype
from .persistence import save_state
from .projection import Projection, ProjectionSpec
from .rows import RowIndex, RowOrder, batch_digest, row_digests
from .state import FittedState
from .storage import AutoGradientStore, GradientStore

__all__ = [
    "GradientFunction",
    "fit",
    "model_lock",
    "check_batch",
    "check_metadata",
    "training_gradients",
]

logger = logging.getLogger(__name__)

Blockwise = Dict[str, torch.Tensor]

_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = (
    weakref.WeakKeyDictionary()
)
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """One lock per model object, shared by every user of it in this process.

    Gradient engines swap parameters or register hooks on the module, so two
    computations on one model must not run at the same time.
    """
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = threading.RLock()
            _MODEL_LOCKS[model] = lock
        return lock


def check_batch(x: Any, y: Any, what: str = "x") -> None:
    """Raise a clear error unless `x` and `y` are tensors with one length."""
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


def check_metadata(metadata: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """`metadata` as JSON reads it back (what a store returns after reopening).

    Tuples become lists and keys become strings, so a state in memory holds
    the same metadata as one reopened from disk.

    Raises:
        TypeError: values that JSON cannot hold (or NaN and infinities).

    Example:
        >>> check_metadata({"model": "smollm2", "columns": ("prompt", "completion")})
        {'columns': ['prompt', 'completion'], 'model': 'smollm2'}
        >>> check_metadata(None)
        {}
    """
    try:
        text = json.dumps(dict(metadata or {}), allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"fit metadata must be plain JSON: {e}") from None
    return dict(json.loads(text))


class GradientFunction:
    """Per-sample gradients per block of a model, as a plain function.

    Computes in eval mode (the model's mode is restored after) under the
    model's lock, and checks every gradient for NaN and inf.

    Args:
        model: the model.
        loss: the per-sample loss `loss(prediction, target)`.
        engine: the per-sample gradient engine.
        blocks: the block structure.
        loss_id: a name for the loss, used as its identity instead of its
            settings (see [loss_name][pydvl_datainf.fingerprint.loss_name]).
        projections: a projection per block (see
            [Compression][pydvl_datainf.projection.Compression]): the rows
            are then the projected gradients $P_l g_{il}$, and the norms those
            of the unprojected ones.

    Raises:
        UnidentifiableLossError: the loss cannot be identified and no
            `loss_id` was given.

    Example:
        ```python
        import torch
        from pydvl_datainf import build_blocks, get_engine
        from pydvl_datainf.fit import GradientFunction

        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
                                    torch.nn.Linear(3, 2))
        loss = torch.nn.functional.cross_entropy
        blocks = build_blocks(model)
        grads = GradientFunction(model, loss, get_engine("auto"), blocks)
        g = grads(torch.randn(5, 4), torch.randint(0, 2, (5,)))
        assert {k: v.shape for k, v in g.items()} == {
            "0": torch.Size([5, 15]), "2": torch.Size([5, 8])}
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        engine: GradientEngine,
        blocks: BlockStructure,
        loss_id: Optional[str] = None,
        projections: Optional[Mapping[str, ProjectionSpec]] = None,
    ):
        self.model = model
        self.loss = loss
        self.engine = engine
        self.blocks = blocks
        self.loss_id = loss_id
        self.loss_identity()  # fail early for a loss that cannot be identified
        self.projections: Optional[OrderedDict[str, ProjectionSpec]] = None
        if projections is not None:
            if list(projections) != blocks.names:
                raise ValueError(
                    f"projections for blocks {list(projections)}, the model has "
                    f"{blocks.names}"
                )
            for b in blocks:
                spec = projections[b.name]
                if spec.dim != b.size or len(spec.parts) != len(b.params):
                    raise ValueError(
                        f"the projection of block {b.name!r} takes {spec.dim} "
                        f"columns in {len(spec.parts)} parts; the block has "
                        f"{b.size} in {len(b.params)} parameters"
                    )
            self.projections = OrderedDict((k, projections[k]) for k in blocks.names)
        self.lock = model_lock(model)
        self._eval_depth = 0
        self._frozen_refs: Optional[FrozenRefs] = None
        self._materialised: Dict[str, Dict[str, Projection]] = {}

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        del state["lock"]
        state["_eval_depth"] = 0
        state["_frozen_refs"] = None
        state["_materialised"] = {}  # regenerated from the specs where it runs
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = model_lock(self.model)

    @property
    def params(self) -> OrderedDict[str, nn.Parameter]:
        """The parameters of all blocks, by name, in block order."""
        named = dict(self.model.named_parameters())
        return OrderedDict((p, named[p]) for p in self.blocks.parameter_names())

    @property
    def device(self) -> torch.device:
        """The device of the first block parameter."""
        return next(iter(self.params.values())).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype gradients are accumulated in."""
        return accumulation_dtype(next(iter(self.params.values())).dtype)

    def fingerprint(self) -> str:
        """SHA-256 of the block parameters' current values."""
        return weights_digest(self.params)

    def frozen(self) -> OrderedDict[str, torch.Tensor]:
        """The model's other parameters and its buffers, by name: what the
        gradients depend on besides the block parameters (as the model holds
        them now)."""
        if self._frozen_refs is None:
            self._frozen_refs = FrozenRefs(self.model, self.blocks.parameter_names())
        return self._frozen_refs.current()

    def frozen_fingerprint(self) -> str:
        """Digest of the frozen parameters' and buffers' current values."""
        return frozen_digest(self.frozen())

    def loss_identity(self) -> str:
        """The identity of the loss and its settings (see
        [loss_name][pydvl_datainf.fingerprint.loss_name])."""
        return loss_name(self.loss, self.loss_id)

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The model in eval mode under its lock (restored after); nests."""
        with self.lock:
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

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Blockwise:
        """Dense per-sample gradients `{block: (len(x), d_l)}`."""
        grads = self.with_norms(x, y)[0]
        return OrderedDict((k, densify(g)) for k, g in grads.items())

    def with_norms(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        offset: Optional[int] = None,
        factored: bool = False,
    ) -> Tuple[Dict[str, Rows], Blockwise]:
        """Per-sample gradients and their squared norms per block.

        A gradient with a NaN or inf entry has a non-finite squared norm, so the
        norms double as the finiteness check.

        Args:
            x: inputs, batch first.
            y: targets.
            offset: the training index of the first sample (for messages).
            factored: allow [FactoredGrads][pydvl_datainf.factored.FactoredGrads]
                blocks (their norms come from the factors).

        Raises:
            NonFiniteGradientError: naming the samples.
        """
        device = self.device
        x, y = x.to(device), y.to(device)
        with self.eval_mode():
            params = self.params
            if self.projections is not None:
                projected = self.engine.per_sample_grads_projected(
                    self.model, self.loss, x, y, params, self.parameter_projections()
                )
            elif factored:
                per_param = self.engine.per_sample_grads_factored(
                    self.model, self.loss, x, y, params
                )
            else:
                per_param = dict(
                    self.engine.per_sample_grads(self.model, self.loss, x, y, params)
                )
        if self.projections is not None:
            rows = self.blocks.gather({p: g.rows for p, g in projected.items()})
            grads: Dict[str, Rows] = (
                rows if factored else {k: densify(g) for k, g in rows.items()}
            )
            norms = OrderedDict(
                (b.name, sum_norms([projected[p].squared_norms for p in b.params]))
                for b in self.blocks
            )
        else:
            grads = self.blocks.gather(per_param)
            norms = OrderedDict((k, factored_norms(g)) for k, g in grads.items())
        # the norms are >= 0: a finite total means all are finite; otherwise
        # look closer (the total alone may overflow)
        if bool(torch.isfinite(torch.cat(list(norms.values())).sum())):
            return grads, norms
        finite = torch.stack([torch.isfinite(s) for s in norms.values()])
        if bool(finite.all()):
            return grads, norms
        bad_blocks = [k for k, ok in zip(norms, finite.all(dim=1)) if not ok]
        idx = torch.nonzero(~finite.all(dim=0)).flatten().tolist()
        where = (
            f"training samples {[offset + i for i in idx][:20]}"
            if offset is not None
            else f"samples {idx[:20]} of the batch"
        )
        raise NonFiniteGradientError(
            f"NaN or inf per-sample gradients (or squared norms overflowing their "
            f"dtype) for {where} ({len(idx)} in all) in blocks {bad_blocks}"
        )

    def parameter_projections(self) -> Dict[str, Projection]:
        """The projection of every block parameter, by name, materialised on
        the model's device (regenerated from the specs, checked, once)."""
        assert self.projections is not None
        device = self.device
        key = str(device)
        if key not in self._materialised:
            out: Dict[str, Projection] = {}
            for b in self.blocks:
                whole = Projection(self.projections[b.name], device)
                out.update(zip(b.params, whole.parts))
            self._materialised[key] = out
        return self._materialised[key]

    def unproject(self, factors: Mapping[str, torch.Tensor]) -> Blockwise:
        r"""Factors in projected space, $f_l$, taken back to parameter space,
        $P_l^\top f_l$ (unchanged without projections): the directions in
        parameter space whose inner products with the gradients are the
        projected scores."""
        if self.projections is None:
            return OrderedDict(factors)
        device = self.device
        return OrderedDict(
            (
                k,
                Projection(self.projections[k], device, f.dtype).transpose_apply(f),
            )
            for k, f in factors.items()
        )

    @property
    def widths(self) -> List[int]:
        """The width of each block's rows: $k_l$ projected, else $d_l$."""
        if self.projections is None:
            return list(self.blocks.sizes)
        return [self.projections[k].k for k in self.blocks.names]


def sum_norms(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The squared norm of a block's rows from its parameters' squared norms."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _batches(data: Any, progress: bool) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    try:
        total: Optional[int] = len(data)
    except TypeError:
        total = None
    for batch in tqdm(data, total=total, desc="DataInf fit", disable=not progress):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            length = f" of length {len(batch)}" if hasattr(batch, "__len__") else ""
            raise TypeError(
                "The training loader must yield (x, y) pairs, got "
                f"{type(batch).__name__}{length}"
            )
        x, y = batch
        check_batch(x, y, "training batch x")
        if len(x):
            yield x, y


def fit(
    gradients: GradientFunction,
    data: Any,
    store: GradientStore,
    *,
    regularization: RegularizationSpec = "auto",
    regularization_scale: float = 0.1,
    factorize: bool = True,
    progress: bool = True,
    metadata: Optional[Mapping[str, Any]] = None,
) -> FittedState:
    r"""One pass over `data`: gradients into `store`, norms, $\lambda_l$, digests.

    Training rows are numbered in the order of this pass. A Zarr store gets
    the fitted state saved with it (see
    [save_state][pydvl_datainf.persistence.save_state]).

    Args:
        gradients: the model's per-sample gradients.
        data: an iterable of `(x, y)` batches, e.g. a torch DataLoader.
        store: an empty gradient store for the blocks.
        regularization: `"auto"`, a float or `{block: float | "auto"}`.
        regularization_scale: $c$ in the `"auto"` rule.
        factorize: keep rank-one blocks factored in stores that accept it.
        progress: show a progress bar.
        metadata: JSON-serialisable facts to record with the state (and the
            store); see [check_metadata][pydvl_datainf.fit.check_metadata].

    Returns:
        The fitted state.

    Raises:
        EmptyDataError: the loader yields no samples.
        NonFiniteGradientError: a gradient is NaN or inf (names the samples).
        RegularizationError: an invalid or out-of-range $\lambda_l$.
        TypeError: `metadata` that JSON cannot hold.

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import MemoryGradientStore, build_blocks, get_engine
        from pydvl_datainf.fit import GradientFunction, fit

        model = torch.nn.Linear(4, 2)
        loss = torch.nn.functional.cross_entropy
        x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
        loader = DataLoader(TensorDataset(x, y), batch_size=8)
        blocks = build_blocks(model)
        state = fit(GradientFunction(model, loss, get_engine("auto"), blocks), loader,
                    MemoryGradientStore(blocks.names), progress=False)
        assert state.n == 20 and list(state.regularization) == [""]
        print(state.regularization)  # the resolved lambda of the one block
        ```
    """
    spec = validate_regularization(regularization, gradients.blocks.names)
    recorded = check_metadata(metadata)
    if isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler):
        logger.warning(
            "The training loader shuffles: training rows are numbered in the "
            "order of this pass, not the dataset's order."
        )
    names = gradients.blocks.names
    factored = factorize and getattr(store, "accepts_factored", False)
    rows = RowIndex() if store.random_access else None
    order = RowOrder()
    norm_parts: Dict[str, List[torch.Tensor]] = {k: [] for k in names}
    n = 0
    with gradients.eval_mode():  # eval mode once for the pass
        for x, y in _batches(data, progress):
            grads, norms = gradients.with_norms(x, y, offset=n, factored=factored)
            for k, s in norms.items():
                norm_parts[k].append(s)
            store.note_batch(x, y)
            store.append(grads)
            digests = row_digests(x, y)
            order.add(digests)
            if rows is not None:
                rows.extend(digests, batch_digest(x, y))
            n += len(x)
        if n == 0:
            raise EmptyDataError(
                "The training loader yielded no samples; DataInf needs n > 0"
            )
        store.finalize(publish=False)  # published once its state is saved
        fingerprint = gradients.fingerprint()
        frozen = gradients.frozen_fingerprint()
    squared_norms = OrderedDict((k, torch.cat(v)) for k, v in norm_parts.items())
    state = FittedState(
        blocks=gradients.blocks,
        n=n,
        squared_norms=squared_norms,
        regularization=OrderedDict(),
        store=store,
        fingerprint=fingerprint,
        frozen_fingerprint=frozen,
        rows=rows,
        rows_digest=order.hexdigest(),
        projections=gradients.projections,
        regularization_spec=spec,
        regularization_scale=float(regularization_scale),
        loss=gradients.loss_identity(),
        dtype=gradients.dtype,
        metadata=recorded,
    )
    state = state.with_regularization(spec)
    if isinstance(store, AutoGradientStore):
        state = dataclasses.replace(state, store=store.resolved)
    save_state(state)
    logger.info(
        "Fitted DataInf on %d samples, %d blocks, %d parameters; lambda: %s",
        n,
        len(gradients.blocks),
        gradients.blocks.n_parameters,
        {k: f"{v:.3g}" for k, v in state.regularization.items()},
    )
    return state


def _round_like(grads: Blockwise, store: GradientStore) -> Blockwise:
    """Computed rows, rounded as the store rounds the rows it keeps."""
    stored = getattr(store, "dtype", None)
    if not isinstance(stored, torch.dtype):
        return grads
    return OrderedDict(
        (k, g.to(stored).to(g.dtype) if g.dtype != stored else g)
        for k, g in grads.items()
    )


def training_gradients(
    state: FittedState,
    gradients: GradientFunction,
    x: torch.Tensor,
    y: torch.Tensor,
) -> Blockwise:
    """Gradients of training-side samples, the same whatever their batch.

    With a random-access store, training rows recognised by the row index are
    read from the store, and other rows are computed and rounded to the
    store's dtype, exactly as the store rounded the rows it keeps (a no-op
    when it keeps them as computed). So a row gives the same numbers alone,
    in any batch, and after reopening the store, with or without its index.
    A recompute store keeps nothing: every row is computed.

    Args:
        state: the fitted state.
        gradients: the model's per-sample gradients.
        x: training-side inputs.
        y: training-side targets.

    Returns:
        `{block: (len(x), d_l)}`.
    """
    store = state.store
    if not store.random_access:
        return gradients(x, y)
    rows = state.rows.locate(x, y) if state.rows is not None else None
    if rows is None or bool((rows < 0).all()):
        return _round_like(gradients(x, y), store)
    known = rows >= 0
    if bool(known.all()):
        return store.take(rows)
    stored = store.take(rows[known])
    new = _round_like(gradients(x[~known], y[~known]), store)
    out: Blockwise = OrderedDict()
    for k, g in new.items():
        s = stored[k].to(device=g.device)
        dtype = torch.promote_types(g.dtype, s.dtype)
        merged = torch.empty(len(x), g.shape[1], dtype=dtype, device=g.device)
        merged[known.to(g.device)] = s.to(dtype)
        merged[~known.to(g.device)] = g.to(dtype)
        out[k] = merged
    return out
