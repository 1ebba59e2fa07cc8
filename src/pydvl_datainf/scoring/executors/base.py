"""What an executor does: run the operator's map steps and tiles somewhere.

An executor computes test factors $R\\,v$ (map over the operator's fixed
partitions of training chunks, reduce in the operator's fixed tree, finish)
and writes pending tiles of an output. Executors differ only in *where* the
steps run; the partitions, the order of additions and the kernels are the
operator's, so every executor gives the same bits.

To add an executor, subclass [Executor][pydvl_datainf.scoring.executors.base.Executor]
and implement `factors` and `write_tiles` with
[DataInfOperator.corrections][pydvl_datainf.operator.DataInfOperator.corrections],
[DataInfOperator.reduce][pydvl_datainf.operator.DataInfOperator.reduce],
[DataInfOperator.finish][pydvl_datainf.operator.DataInfOperator.finish] and
[DataInfOperator.tiles][pydvl_datainf.operator.DataInfOperator.tiles].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from ...operator import DataInfOperator
from ..tiles import TileOutput

__all__ = ["Executor"]

Blockwise = Dict[str, torch.Tensor]


class Executor(ABC):
    """Runs the operator's map/reduce steps and tile products."""

    @abstractmethod
    def factors(
        self,
        op: DataInfOperator,
        v: Mapping[str, torch.Tensor],
        progress: bool = False,
    ) -> Blockwise:
        """$R\\,v$ per block: map over `op.partitions()`, `op.reduce`, `op.finish`."""

    @abstractmethod
    def write_tiles(
        self,
        op: DataInfOperator,
        output: TileOutput,
        pending: Sequence[Tuple[int, int]],
        names: List[str],
        progress: bool = False,
    ) -> None:
        """Compute and write the `(group, chunk)` tiles of `output`, each then
        marked done, reading the factors of each group from `output`."""
