"""Exceptions raised by pydvl-datainf. Each names the problem and how to fix it."""

from __future__ import annotations

from pydvl.utils.exceptions import NotFittedException

__all__ = [
    "NotFittedError",
    "StaleModelError",
    "NonFiniteGradientError",
    "EmptyDataError",
    "RegularizationError",
    "BlockStructureError",
]


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
