"""Executors: where the operator's map steps and tile products run."""

from .base import Executor
from .local import LocalExecutor

__all__ = ["Executor", "LocalExecutor"]
