"""What a tool adapter returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ToolOutput", "ToolUnsupported"]


class ToolUnsupported(RuntimeError):
    """The tool cannot run this job by design (not a failure); says why."""


@dataclass
class ToolOutput:
    """One tool's result on one job.

    Attributes:
        fit_s: wall time of the tool's fit / factor step.
        matrix_s: wall time from the fitted tool to the full (m, n) matrix.
        matrix: `(n_test, n_train)` influences in pyDVL's sign (positive =
            the training point helps the test point).
        config: how the tool was configured, one line.
    """

    fit_s: float
    matrix_s: float
    matrix: torch.Tensor
    config: str
