r"""Saving a [FittedState][pydvl_datainf.state.FittedState] with its Zarr store,
reopening it, and the one identity check for everything written to disk.

A Zarr gradient store records, besides the gradients: the block structure and
shapes, $n$, the squared norms, $\lambda_l$ and their spec, the SHA-256 of the
fitted weights, the name of the loss, and the digests of the training rows.
[load_state][pydvl_datainf.persistence.load_state] checks all of it against
the model at hand and refuses a mismatch with
[StoreMismatchError][pydvl_datainf.errors.StoreMismatchError], naming what
differs. [identity][pydvl_datainf.persistence.identity] and
[check_identity][pydvl_datainf.persistence.check_identity] are the same check
for other outputs (e.g. an influence matrix) computed from a fitted state.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from .blocks import BlockStructure
from .config import RegularizationSpec, check_regularization
from .errors import RegularizationError, StoreMismatchError
from .rows import DIGEST_BYTES, RowIndex
from .state import FittedState
from .storage import (
    FitState,
    ZarrGradientStore,
    create_checked_array,
    open_checked_array,
    open_zarr_group,
    read_checked,
    write_manifest,
)

__all__ = ["save_state", "load_state", "identity", "check_identity"]

logger = logging.getLogger(__name__)

_ROWS = "rows/digests"
_REASONS = {
    "weights_digest": "other weights",
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
        `{n_train, block_names, block_sizes, weights_digest, regularization,
        norm_sums, loss, **extra}`.

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

    The loss name goes with the store's own fit state, which marks the store
    complete; the row digests follow, checksummed and listed in the store's
    manifest. A store whose writer died in between reopens without a row index,
    which changes no number (see `DataInfInfluence`).
    """
    indexed = state.rows is not None and state.rows.n == state.n
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
            extra={"loss": state.loss, "rows_indexed": indexed},
        )
    )
    zs = _zarr(state.store)
    if zs is not None and state.rows is not None and indexed:
        group = open_zarr_group(zs.path, "r+", zs.storage_options)
        digests = state.rows.digests()
        arr = create_checked_array(
            group,
            _ROWS,
            shape=digests.shape,
            chunks=(max(1, min(len(digests), 2**20)), DIGEST_BYTES),
            dtype="uint8",
        )
        arr[:] = digests
        write_manifest(group, [_ROWS])


def _load_rows(
    zs: ZarrGradientStore, n: int, extra: Mapping[str, Any]
) -> Optional[RowIndex]:
    if not extra.get("rows_indexed"):
        return None
    group = open_zarr_group(zs.path, "r", zs.storage_options)
    manifest = dict(group.attrs.get("manifest") or {})
    if _ROWS not in manifest:  # the writer died before the index was written
        logger.warning(
            "The gradient store at %s has no row index; training rows passed "
            "to queries are recomputed (rounded as stored).",
            zs.path,
        )
        return None
    recover = "Fit again with overwrite=True."
    arr = open_checked_array(
        group,
        _ROWS,
        zs.path,
        shape=(n, DIGEST_BYTES),
        manifest=manifest,
        what="gradient store",
        recover=recover,
    )
    digests = read_checked(
        arr,
        _ROWS,
        zs.path,
        (slice(0, n), slice(0, DIGEST_BYTES)),
        what="gradient store",
        recover=recover,
    )
    return RowIndex.from_digests(np.asarray(digests))


def load_state(
    store: ZarrGradientStore,
    blocks: BlockStructure,
    fingerprint: str,
    loss: str,
    *,
    dtype: torch.dtype = torch.float32,
    regularization: Optional[RegularizationSpec] = None,
    allow_other_loss: bool = False,
) -> FittedState:
    r"""Reopen the fitted state saved with a Zarr gradient store.

    Args:
        store: the open store.
        blocks: the model's block structure (built from the stored spec).
        fingerprint: the model's current weights digest.
        loss: the name of the loss at hand (see
            [loss_name][pydvl_datainf.fingerprint.loss_name]).
        dtype: the compute dtype, for the range check of $\lambda_l$.
        regularization: `None` keeps the stored $\lambda_l$; else a new spec,
            resolved from the stored norms.
        allow_other_loss: accept a loss of another name than at fit (e.g.
            the same loss defined elsewhere).

    Returns:
        The fitted state over `store`.

    Raises:
        StoreMismatchError: an incomplete store, other blocks, weights or
            loss, or inconsistent contents.
        RegularizationError: a stored $\lambda_l$ that is not positive and
            finite, or out of range for `dtype`.
    """
    fs = store.load_fit_state()
    path = store.path
    shapes = {b.name: [list(s) for s in b.shapes] for b in blocks}
    if (fs.block_shapes and shapes != fs.block_shapes) or (
        list(blocks.sizes) != list(store.block_sizes)
    ):
        raise StoreMismatchError(
            f"The gradient store at {path!r} was written for blocks of other "
            f"shapes: stored {fs.block_shapes}, model {shapes}"
        )
    if fs.weights_digest != fingerprint:
        raise StoreMismatchError(
            f"The gradient store at {path!r} was written for other weights "
            f"(SHA-256 {fs.weights_digest[:12]}..., the model has "
            f"{fingerprint[:12]}...). Load the weights that were fitted, or fit "
            f"again."
        )
    extra = dict(getattr(fs, "extra", None) or {})
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
            f"{stored_loss!r}, but the model is given {loss!r}. Pass the loss used "
            f"at fit, or allow_other_loss=True if it is the same function."
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
    state = FittedState(
        blocks=blocks,
        n=n,
        squared_norms=norms,
        regularization=lam,
        store=store,
        fingerprint=fingerprint,
        rows=_load_rows(store, n, extra),
        regularization_spec=OrderedDict(fs.regularization_spec),
        regularization_scale=float(fs.regularization_scale),
        loss=stored_loss or loss,
        dtype=dtype,
    )
    if regularization is not None:
        state = state.with_regularization(regularization)
    return state
