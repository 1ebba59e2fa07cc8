r"""Saving a [FittedState][pydvl_datainf.state.FittedState] with its Zarr store,
reopening it, and the one identity check for everything written to disk.

A Zarr gradient store records, besides the gradients: the block structure and
shapes, $n$, the squared norms, $\lambda_l$ and their spec, the SHA-256 of the
fitted weights, the digest of the frozen weights and buffers, the identity of
the loss (with its settings), the digests of the training rows and of their
order. [load_state][pydvl_datainf.persistence.load_state] checks all of it
against the model at hand, recomputes $\lambda_l$ where its spec allows, and
refuses a mismatch with
[StoreMismatchError][pydvl_datainf.errors.StoreMismatchError], naming what
differs. [identity][pydvl_datainf.persistence.identity] and
[check_identity][pydvl_datainf.persistence.check_identity] are the same check
for other outputs (e.g. an influence matrix) computed from a fitted state.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from .blocks import BlockStructure
from .config import (
    RegularizationSpec,
    check_regularization,
    resolve_regularization,
)
from .errors import (
    NegligibleGradientWarning,
    RegularizationError,
    StoreMismatchError,
    outside_stacklevel,
)
from .projection import (
    ProjectionSpec,
    projections_digest,
    projections_from_dict,
    projections_to_dict,
)
from .rows import DIGEST_BYTES, RowIndex
from .state import FittedState
from .storage import FitState, ZarrGradientStore

__all__ = [
    "save_state",
    "load_state",
    "identity",
    "check_identity",
    "stored_metadata",
    "stored_projections",
]

logger = logging.getLogger(__name__)

_ROWS = "rows/digests"
_METADATA = "metadata"  # the key of the caller's fit metadata in the fit state
_PROJECTIONS = "projections"  # the key of the blocks' projections
_REASONS = {
    "weights_digest": "other weights",
    "projections": "another compression of the gradients",
    "frozen_digest": "other frozen weights (another base model, quantization or buffers)",
    "train_order": "training rows in another order (or other training rows)",
    "test_digest": "other test data",
    "n_train": "another number of training points",
    "n_test": "another number of test points",
    "block_names": "other blocks",
    "block_sizes": "other blocks",
    "block_shapes": "other blocks",
    "regularization": "other regularization",
    "norm_sums": "other training data",
    "loss": "another loss",
    "dtype": "another dtype",
    "test_rows": "another test_rows",
    "train_rows": "another train_rows",
}


def identity(state: FittedState, **extra: Any) -> Dict[str, Any]:
    """What identifies results computed from `state` (JSON-serialisable).

    Args:
        state: the fitted state.
        **extra: more entries (e.g. `n_test`, `test_digest`).

    Returns:
        `{n_train, block_names, block_sizes, weights_digest, frozen_digest,
        train_order, regularization, norm_sums, loss, **extra}`.

    Example:
        ```python
        import torch
        from pydvl_datainf.persistence import identity
        from pydvl_datainf.state import FittedState

        state = FittedState.from_gradients({"w": torch.ones(4, 3)}, 0.5)
        attrs = identity(state, n_test=10)
        assert attrs["n_train"] == 4 and attrs["n_test"] == 10
        assert attrs["regularization"] == {"w": 0.5}
        assert attrs["norm_sums"] == {"w": 12.0}
        ```
    """
    out: Dict[str, Any] = {
        "n_train": state.n,
        "block_names": list(state.blocks.names),
        "block_sizes": list(state.blocks.sizes),
        "weights_digest": state.fingerprint,
        "frozen_digest": state.frozen_fingerprint,
        "train_order": state.rows_digest,
        "projections": projections_digest(state.projections),
        "regularization": {k: float(v) for k, v in state.regularization.items()},
        "norm_sums": dict(state.norm_sums),
        "loss": state.loss,
    }
    out.update(extra)
    return out


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, Mapping) and isinstance(have, Mapping):
        return set(want) == set(have) and all(_same(have[k], want[k]) for k in want)
    if isinstance(want, float) and isinstance(have, (int, float)):
        return math.isclose(float(have), want, rel_tol=1e-6, abs_tol=0.0)
    return bool(have == want)


def check_identity(
    path: str,
    recorded: Mapping[str, Any],
    expected: Mapping[str, Any],
    what: str = "The store",
    recover: str = "Use the same model, fit and data, or start again with "
    "overwrite=True.",
) -> None:
    """Raise unless `recorded` agrees with `expected` on every expected key.

    Floats (and dicts of floats) agree within a relative 1e-6; everything else
    must be equal. A key missing from `recorded` differs.

    Args:
        path: where the record is (for the message).
        recorded: what was stored.
        expected: what the current computation has.
        what: names the thing at `path`, e.g. `"The influence matrix"`.
        recover: how to recover, appended to the message.

    Raises:
        StoreMismatchError: listing what differs and how to recover.

    Example:
        >>> check_identity("m.zarr", {"n_train": 3}, {"n_train": 3})
    """
    bad = [k for k, v in expected.items() if not _same(recorded.get(k), v)]
    if bad:
        reasons = sorted({_REASONS.get(k, k) for k in bad})
        raise StoreMismatchError(
            f"{what} at {path!r} was made with {', '.join(reasons)} (differing: "
            f"{bad}). {recover}"
        )


def _zarr(store: Any) -> Optional[ZarrGradientStore]:
    inner = getattr(store, "resolved", store)
    return inner if isinstance(inner, ZarrGradientStore) else None


def save_state(state: FittedState) -> None:
    """Persist `state` with its store (a no-op for in-memory stores).

    The identity of the fit goes with the store's own fit state, which marks
    the store complete; the row digests follow, bound to their places and
    listed in the store's manifest; then the store is published at its path
    (see [publish][pydvl_datainf.storage.zarr.ZarrGradientStore.publish]).
    """
    indexed = state.rows is not None and state.rows.n == state.n
    warn_negligible(state)
    state.store.save_fit_state(
        FitState(
            n_train=state.n,
            regularization=dict(state.regularization),
            regularization_spec=dict(state.regularization_spec),
            regularization_scale=state.regularization_scale,
            squared_norms=dict(state.squared_norms),
            weights_digest=state.fingerprint,
            block_structure=dict(state.blocks.to_dict()),
            block_shapes={b.name: [list(s) for s in b.shapes] for b in state.blocks},
            frozen_digest=state.frozen_fingerprint,
            rows_digest=state.rows_digest,
            extra={
                "loss": state.loss,
                "rows_indexed": indexed,
                _METADATA: dict(state.metadata),
                _PROJECTIONS: projections_to_dict(state.projections),
            },
        )
    )
    zs = _zarr(state.store)
    if zs is not None and state.rows is not None and indexed:
        digests = state.rows.digests()
        zs.save_array(_ROWS, digests, max(1, min(len(digests), 2**20)))
    state.store.publish()


def _load_rows(
    zs: ZarrGradientStore, n: int, extra: Mapping[str, Any]
) -> Optional[RowIndex]:
    if not extra.get("rows_indexed"):
        return None
    digests = zs.load_array(_ROWS)
    if digests is None:  # the writer died before the index was written
        logger.warning(
            "The gradient store at %s has no row index; training rows passed "
            "to queries are recomputed (rounded as stored).",
            zs.path,
        )
        return None
    if digests.shape != (n, DIGEST_BYTES):
        raise StoreMismatchError(
            f"The row index of the gradient store at {zs.path!r} has shape "
            f"{digests.shape}, not ({n}, {DIGEST_BYTES}): the store is damaged. "
            f"Fit again with overwrite=True."
        )
    return RowIndex.from_digests(np.asarray(digests))


def load_state(
    store: ZarrGradientStore,
    blocks: BlockStructure,
    fingerprint: str,
    loss: str,
    *,
    frozen_fingerprint: str,
    projections: Optional[Mapping[str, ProjectionSpec]] = None,
    dtype: torch.dtype = torch.float32,
    regularization: Optional[RegularizationSpec] = None,
    allow_other_loss: bool = False,
) -> FittedState:
    r"""Reopen the fitted state saved with a Zarr gradient store.

    Args:
        store: the open store.
        blocks: the model's block structure (built from the stored spec).
        fingerprint: the model's current weights digest.
        loss: the identity of the loss at hand (see
            [loss_name][pydvl_datainf.fingerprint.loss_name]).
        frozen_fingerprint: the digest of the model's current frozen weights
            and buffers (see [frozen_digest][pydvl_datainf.fingerprint.frozen_digest]).
        projections: the projections the model compresses its gradients with
            (`None`: none); they must be those the store was written with.
        dtype: the compute dtype, for the range check of $\lambda_l$.
        regularization: `None` keeps the stored $\lambda_l$; else a new spec,
            resolved from the stored norms.
        allow_other_loss: accept a loss of another name than at fit (e.g.
            the same loss defined elsewhere).

    Returns:
        The fitted state over `store`.

    Raises:
        StoreMismatchError: an incomplete store, other blocks, weights,
            frozen weights or loss, or inconsistent contents.
        RegularizationError: a stored $\lambda_l$ that is not positive and
            finite, out of range for `dtype`, or not the value its spec gives
            with the stored norms (it was edited).
    """
    fs = store.load_fit_state()
    path = store.path
    stored_projections = projections_from_dict(dict(fs.extra or {}).get(_PROJECTIONS))
    shapes = {b.name: [list(s) for s in b.shapes] for b in blocks}
    widths = (
        list(blocks.sizes)
        if stored_projections is None
        else [stored_projections[k].k for k in blocks.names]
    )
    if (fs.block_shapes and shapes != fs.block_shapes) or (
        widths != list(store.block_sizes)
    ):
        raise StoreMismatchError(
            f"The gradient store at {path!r} was written for blocks of other "
            f"shapes: stored {fs.block_shapes} (rows of widths "
            f"{list(store.block_sizes)}), model {shapes} (widths {widths})"
        )
    if fs.weights_digest != fingerprint:
        raise StoreMismatchError(
            f"The gradient store at {path!r} was written for other weights "
            f"(SHA-256 {fs.weights_digest[:12]}..., the model has "
            f"{fingerprint[:12]}...). Load the weights that were fitted, or fit "
            f"again."
        )
    if fs.frozen_digest != frozen_fingerprint:
        raise StoreMismatchError(
            f"The gradient store at {path!r} was written for other frozen weights: "
            f"the model's parameters outside the blocks or its buffers differ from "
            f"those at fit (digest {fs.frozen_digest[:12]}..., the model has "
            f"{frozen_fingerprint[:12]}...). A common cause: the adapters were put "
            f"on another base model, or on another quantization of it. Load the "
            f"base model that was fitted, or fit again."
        )
    extra = dict(getattr(fs, "extra", None) or {})
    if projections_digest(stored_projections) != projections_digest(projections):
        raise StoreMismatchError(
            f"The gradient store at {path!r} holds "
            + (
                "uncompressed gradients"
                if stored_projections is None
                else "gradients compressed with other projections"
            )
            + ", but the model "
            + ("compresses" if projections is not None else "does not compress")
            + " its gradients in this way. Reopen it with the store's own "
            "compression (DataInfInfluence.from_store does), or fit again."
        )
    stored_loss = str(extra.get("loss", ""))
    if not stored_loss:
        logger.warning(
            "The gradient store at %s does not record its loss; make sure it is "
            "the one used at fit.",
            path,
        )
    elif stored_loss != loss and not allow_other_loss:
        raise StoreMismatchError(
            f"The gradient store at {path!r} was written with the loss "
            f"{stored_loss!r}, but the model is given another loss, or the same one "
            f"with other settings: {loss!r}. Pass the loss used at fit, or "
            f"allow_other_loss=True if it is the same function."
        )
    n = int(fs.n_train)
    norms = OrderedDict((k, fs.squared_norms[k]) for k in blocks.names)
    for k, s in norms.items():
        if (
            tuple(s.shape) != (n,)
            or not bool(torch.isfinite(s).all())
            or (bool((s < 0).any()))
        ):
            raise StoreMismatchError(
                f"The squared norms of block {k!r} in the gradient store at "
                f"{path!r} are damaged (shape {tuple(s.shape)} for n={n}, or "
                f"negative or non-finite values). Fit again."
            )
    if store.n != n:
        raise StoreMismatchError(
            f"The gradient store at {path!r} holds {store.n} rows but records "
            f"n={n}: the store is damaged. Fit again."
        )
    maxima = {k: float(v.max()) if n else 0.0 for k, v in norms.items()}
    lam: OrderedDict[str, float] = OrderedDict()
    for k in blocks.names:
        value = fs.regularization.get(k, float("nan"))
        if regularization is not None:  # replaced below: no need to check it
            lam[k] = float(value)
            continue
        try:
            lam[k] = check_regularization(
                k, value, dtype, maxima[k], source="Stored regularization"
            )
        except RegularizationError as e:
            raise RegularizationError(
                f"{e}. The gradient store at {path!r} is damaged or was edited; "
                f"pass regularization= to set λ, or fit again."
            ) from None
    if regularization is None:
        _check_derived_lambda(fs, blocks, norms, lam, dtype, maxima, path)
    state = FittedState(
        blocks=blocks,
        n=n,
        squared_norms=norms,
        regularization=lam,
        store=store,
        fingerprint=fingerprint,
        frozen_fingerprint=frozen_fingerprint,
        projections=(
            None
            if stored_projections is None
            else OrderedDict((k, stored_projections[k]) for k in blocks.names)
        ),
        rows=_load_rows(store, n, extra),
        rows_digest=fs.rows_digest,
        regularization_spec=OrderedDict(fs.regularization_spec),
        regularization_scale=float(fs.regularization_scale),
        loss=stored_loss or loss,
        dtype=dtype,
        metadata=stored_metadata(fs),
    )
    if regularization is not None:
        state = state.with_regularization(regularization)
    return state


_LAMBDA_RTOL = 1e-5  # sums of squared norms over other CPUs round differently


def _check_derived_lambda(
    fs: FitState,
    blocks: BlockStructure,
    norms: Mapping[str, torch.Tensor],
    lam: Mapping[str, float],
    dtype: torch.dtype,
    maxima: Mapping[str, float],
    path: str,
) -> None:
    """Refuse a stored λ_l that is not what its spec gives with the stored norms."""
    spec = {k: fs.regularization_spec.get(k, "auto") for k in blocks.names}
    sums = {k: float(v.sum()) for k, v in norms.items()}  # as fit sums them
    want = resolve_regularization(
        spec, blocks, sums, int(fs.n_train), fs.regularization_scale, dtype, maxima
    )
    for k in blocks.names:
        if not math.isclose(lam[k], want[k], rel_tol=_LAMBDA_RTOL, abs_tol=0.0):
            raise RegularizationError(
                f"The stored regularization of block {k!r} is {lam[k]!r}, but its "
                f"spec {spec[k]!r} with the stored squared norms gives {want[k]!r}: "
                f"the gradient store at {path!r} is damaged or was edited. Pass "
                f"regularization= to set λ, or fit again."
            )


def stored_metadata(store: Any) -> Dict[str, Any]:
    """The metadata that `fit(..., metadata=...)` recorded in a store, read
    without a model (e.g. to rebuild the model a command line run used).

    Args:
        store: a [ZarrGradientStore][pydvl_datainf.storage.ZarrGradientStore]
            (complete), its path or URL, or its
            [FitState][pydvl_datainf.storage.FitState].

    Returns:
        The recorded metadata; `{}` if none was recorded.

    Raises:
        StoreMismatchError: an incomplete store.
        FileNotFoundError: no store at the path.

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import DataInfInfluence
        from pydvl_datainf.persistence import stored_metadata

        model, loss = torch.nn.Linear(3, 2), torch.nn.functional.cross_entropy
        data = DataLoader(TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))))
        DataInfInfluence(model, loss, store="zarr", store_path="grads.zarr",
                         progress=False).fit(data, metadata={"run": 1})
        assert stored_metadata("grads.zarr") == {"run": 1}
        ```
    """
    if isinstance(store, FitState):
        fs = store
    else:
        zs = (
            store
            if isinstance(store, ZarrGradientStore)
            else ZarrGradientStore.open(store)
        )
        fs = zs.load_fit_state()
    extra = dict(getattr(fs, "extra", None) or {})
    return dict(extra.get(_METADATA) or {})


def stored_projections(state: FitState) -> Optional[Dict[str, ProjectionSpec]]:
    """The projections a store's gradients were compressed with (`None` if
    they were not), from its [FitState][pydvl_datainf.storage.FitState]."""
    return projections_from_dict(dict(state.extra or {}).get(_PROJECTIONS))


def warn_negligible(state: FittedState) -> None:
    """Warn about blocks whose gradients are rounding noise (a fit's check)."""
    tiny = state.negligible_blocks()
    if tiny:
        warnings.warn(
            f"The gradients of blocks {tiny} are at the level of rounding errors "
            f"(their mean squared entry is below the dtype's epsilon squared times "
            f"the largest block's): their 'auto' λ is noise-sized and would make "
            f"noise dominate every score. Leave them out of the block structure "
            f"(e.g. freeze those parameters), or give them a float λ.",
            NegligibleGradientWarning,
            stacklevel=outside_stacklevel(),
        )
