"""The tool registry: who runs, with which library, on which jobs.

Adapters live in `tool_*.py` and are imported only inside the worker
subprocess, so that a missing or broken peer cannot affect the others.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from .base import ToolOutput
from .jobs import JobData

__all__ = ["TOOLS", "Tool", "get_runner"]


@dataclass(frozen=True)
class Tool:
    """A tool in the table.

    Attributes:
        key: command-line name.
        label: the table's name for it.
        library: distribution whose version is reported.
        method: the approximation it computes.
        target: `"module:function"` of the adapter, with optional keyword
            arguments in `kwargs`.
        requires: modules that must import (else a skipped row says so).
        datainf: computes DataInf (for the "fastest DataInf" row).
        only_jobs: jobs it runs on (None: all); others get an "n/a" row.
        not_on: `{job: reason}`: jobs it cannot run by design.
        quick: part of `--quick`.
        quick_jobs: in `--quick`, the jobs it runs on (None: all), to keep the
            smoke test short.
    """

    key: str
    label: str
    library: str
    method: str
    target: str
    kwargs: Dict[str, object] = field(default_factory=dict)
    requires: Tuple[str, ...] = ()
    datainf: bool = False
    only_jobs: Optional[Tuple[str, ...]] = None
    not_on: Dict[str, str] = field(default_factory=dict)
    quick: bool = True
    quick_jobs: Optional[Tuple[str, ...]] = None


TOOLS: OrderedDict[str, Tool] = OrderedDict(
    (t.key, t)
    for t in [
        Tool(
            "exact",
            "exact per-block inverse",
            "pydvl-datainf",
            "(G_l + λ_l I)⁻¹, dense",
            "tool_ours:run_exact",
        ),
        Tool(
            "ours",
            "**pydvl-datainf** DataInfInfluence",
            "pydvl-datainf",
            "DataInf",
            "tool_ours:run_ours",
            datainf=True,
        ),
        Tool(
            "ours-scalar",
            "pydvl-datainf, one λ",
            "pydvl-datainf",
            "DataInf",
            "tool_ours:run_ours",
            {"regularization": "scalar"},
            datainf=True,
            quick_jobs=("a",),
        ),
        Tool(
            "ours-calc",
            "pydvl-datainf via calculator",
            "pydvl-datainf",
            "DataInf",
            "tool_ours:run_ours",
            {"pipeline": "calculator"},
            datainf=True,
            only_jobs=("a",),
            quick=False,
        ),
        Tool(
            "pydvl-ihm",
            "pyDVL InverseHarmonicMeanInfluence",
            "pydvl",
            "DataInf",
            "tool_pydvl:run_ihm",
            datainf=True,
            quick_jobs=("a", "b"),
        ),
        Tool(
            "pydvl-ihm-calc",
            "pyDVL IHM via calculator",
            "pydvl",
            "DataInf",
            "tool_pydvl:run_ihm",
            {"pipeline": "calculator"},
            datainf=True,
            only_jobs=("a",),
            quick=False,
        ),
        Tool(
            "pydvl-ekfac",
            "pyDVL EkfacInfluence",
            "pydvl",
            "EK-FAC",
            "tool_pydvl:run_ekfac",
            quick_jobs=("a", "c"),
        ),
        Tool(
            "pydvl-lissa",
            "pyDVL LissaInfluence",
            "pydvl",
            "LiSSA (Hessian)",
            "tool_pydvl:run_lissa",
            quick_jobs=("a",),
        ),
        Tool(
            "pydvl-arnoldi",
            "pyDVL ArnoldiInfluence",
            "pydvl",
            "Arnoldi rank 10 (Hessian)",
            "tool_pydvl:run_arnoldi",
            quick_jobs=("a",),
        ),
        Tool(
            "dattri",
            "dattri IFAttributorDataInf",
            "dattri",
            "DataInf",
            "tool_dattri:run_dattri",
            requires=("dattri",),
            datainf=True,
        ),
        Tool(
            "kronfluence",
            "kronfluence EK-FAC",
            "kronfluence",
            "EK-FAC",
            "tool_kronfluence:run_kronfluence",
            requires=("kronfluence",),
        ),
    ]
)


def get_runner(tool: Tool) -> Callable[[JobData, bool], ToolOutput]:
    """Imports the adapter of `tool` (inside the worker)."""
    module, _, name = tool.target.partition(":")
    fn = getattr(importlib.import_module(f"{__package__}.{module}"), name)

    def run(job: JobData, quick: bool) -> ToolOutput:
        return fn(job, quick, **tool.kwargs)

    return run
