"""Exceptions raised by pydvl-datainf. Each names the problem and how to fix it."""

from __future__ import annotations

import inspect
import os

from pydvl.utils.exceptions import NotFittedException

__all__ = [
    "NotFittedError",
    "StaleModelError",
    "NonFiniteGradientError",
    "EmptyDataError",
    "RegularizationError",
    "BlockStructureError",
    "StoreExistsError",
    "StoreMismatchError",
    "StoreCorruptError",
    "StoreReplacedError",
    "NegligibleGradientWarning",
    "outside_stacklevel",
]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def outside_stacklevel() -> int:
    """The `stacklevel` for `warnings.warn` that points at the user's code.

    Called by the function that warns, it counts the frames from that function
    up to the first one outside this package, so that a warning shows the
    user's line (their call of `build_blocks` or of `DataInfInfluence`,
    whichever of the library's functions raised it on the way).

    Returns:
        1 for the calling function itself, plus one per library frame above.

    Example:
        ```python
        import warnings
        from pydvl_datainf.errors import outside_stacklevel

        def check(x):  # outside the package: the warning shows this line
            if x < 0:
                warnings.warn("negative", stacklevel=outside_stacklevel())

        assert outside_stacklevel() == 1  # called from outside the package
        ```
    """
    frame = inspect.currentframe()
    caller = None if frame is None else frame.f_back
    level = 1
    while caller is not None and caller.f_back is not None:
        if not os.path.abspath(caller.f_code.co_filename).startswith(_PACKAGE_DIR):
            break
        caller = caller.f_back
        level += 1
    return level


class NotFittedError(NotFittedException):
    """A query was made before `fit`. Subclass of pyDVL's `NotFittedException`."""


class StaleModelError(RuntimeError):
    """The model's trainable weights changed since `fit`; the cache is stale.

    Refit, or restore the weights that were fitted.
    """


class NonFiniteGradientError(ValueError):
    """Some per-sample gradients contain NaN or inf; the message lists the samples."""


class EmptyDataError(ValueError):
    """The training data loader yielded no samples."""


class RegularizationError(ValueError):
    """Invalid regularization: non-positive, or naming unknown or missing blocks."""


class BlockStructureError(ValueError):
    """Invalid block structure: unknown, frozen, repeated parameters or empty blocks."""


class StoreExistsError(FileExistsError):
    """A Zarr store (gradients or influence matrix) already exists at the path.

    Pass `overwrite=True` to replace it, or, for an influence matrix,
    `resume=True` to finish it.
    """


class StoreMismatchError(ValueError):
    """A Zarr store does not belong to this computation.

    Raised when a store was written for other weights, other blocks, other
    test data or other settings, when it is incomplete (its writer died), or
    when a loader replayed by a recompute store yields other data than at fit.
    """


class StoreCorruptError(StoreMismatchError):
    """Data in a Zarr store is missing or damaged: a deleted or corrupt chunk
    (failed checksum), a changed array shape, or a missing manifest.

    The message names the array and the chunk and how to recover (usually:
    write the store again with `overwrite=True`). A subclass of
    [StoreMismatchError][pydvl_datainf.errors.StoreMismatchError].
    """


class StoreReplacedError(StoreMismatchError):
    """The store or output at a path was replaced (by another process or another
    fit) after it was opened: what is there now is not what this object was
    reading or writing. Open it again, or fit again; a subclass of
    [StoreMismatchError][pydvl_datainf.errors.StoreMismatchError]."""


class NegligibleGradientWarning(UserWarning):
    """Some blocks' gradients are rounding noise: their `"auto"` λ would be
    noise-sized (see [negligible_blocks][pydvl_datainf.config.negligible_blocks])."""
