"""The local executor: map steps and tiles in this process."""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from ...operator import DataInfOperator
from ..tiles import TileOutput
from .base import Executor

__all__ = ["LocalExecutor"]

Blockwise = Dict[str, torch.Tensor]


class LocalExecutor(Executor):
    """Runs everything in the calling process, on the factors' device.

    Args:
        device: where tiles are multiplied (default: CPU, or the device of the
            factors handed to `factors`).
        factor_cache: factor groups kept in memory while writing tiles.

    Example:
        ```python
        import torch
        from pydvl_datainf.operator import DataInfOperator
        from pydvl_datainf.scoring.executors.local import LocalExecutor
        from pydvl_datainf.state import FittedState

        op = DataInfOperator(FittedState.from_gradients({"w": torch.randn(20, 4)}))
        test_grads = {"w": torch.randn(2, 4)}
        f = LocalExecutor().factors(op, test_grads)
        assert torch.equal(f["w"], op.apply(test_grads)["w"])  # the same bits
        ```
    """

    def __init__(
        self,
        device: Union[None, str, torch.device] = None,
        factor_cache: int = 4,
    ):
        self.device = torch.device("cpu" if device is None else device)
        self.factor_cache = max(1, int(factor_cache))

    def factors(
        self,
        op: DataInfOperator,
        v: Mapping[str, torch.Tensor],
        progress: bool = False,
    ) -> Blockwise:
        return op.apply(v, progress)

    def write_tiles(
        self,
        op: DataInfOperator,
        output: TileOutput,
        pending: Sequence[Tuple[int, int]],
        names: List[str],
        progress: bool = False,
    ) -> None:
        cached: OrderedDict[int, Blockwise] = OrderedDict()

        def factors(g: int) -> Blockwise:
            if g not in cached:
                while len(cached) >= self.factor_cache:
                    cached.popitem(last=False)
                cached[g] = {
                    k: t.to(self.device)
                    for k, t in output.read_factors(g, names).items()
                }
            return cached[g]

        bar = tqdm(total=len(pending), desc="DataInf matrix", disable=not progress)
        pool = ThreadPoolExecutor(1, thread_name_prefix="datainf-write")
        last: List[Future[None]] = []

        def write(g: int, c: int, tile: torch.Tensor) -> None:
            """Write in the background while the next tile is multiplied; at
            most one write in flight, its errors raised here."""
            if last:
                last.pop().result()
            last.append(pool.submit(output.write_tile, g, c, tile))
            bar.update()

        try:
            if op.state.store.random_access:
                by_group: Dict[int, List[int]] = {}
                for g, c in pending:
                    by_group.setdefault(g, []).append(c)
                for g, cs in by_group.items():
                    for c, _, tile in op.tiles(factors(g), cs):
                        write(g, c, tile)
                    cached.pop(g, None)
            else:  # one pass over a streaming store, every group per chunk
                by_chunk: Dict[int, List[int]] = {}
                for g, c in pending:
                    by_chunk.setdefault(c, []).append(g)
                for c, _, chunk in op.iter_chunks(sorted(by_chunk)):
                    for g in by_chunk[c]:
                        write(g, c, op.tile(factors(g), chunk))
            if last:
                last.pop().result()
        finally:
            pool.shutdown(wait=True)
            bar.close()
