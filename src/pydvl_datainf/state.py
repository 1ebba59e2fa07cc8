r"""[FittedState][pydvl_datainf.state.FittedState]: everything one fit pass learned.

A fitted state is what the DataInf operator needs and nothing else: the block
structure, $n$, the per-sample squared norms $\lVert g_{il}\rVert^2$, the
resolved $\lambda_l$, the store of training gradients, the fingerprint of the
weights they were computed with, the loss they were computed for, and the
index of training rows. It is made by [fit][pydvl_datainf.fit.fit], reopened by
[load_state][pydvl_datainf.persistence.load_state], or built from gradients
in memory with
[FittedState.from_gradients][pydvl_datainf.state.FittedState.from_gradients].
States are values: every change (new $\lambda$, another device) gives a new
state, so a reader holding the old one keeps a consistent view.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from . import formula
from .blocks import Block, BlockStructure
from .config import (
    RegularizationSpec,
    negligible_blocks,
    resolve_regularization,
    validate_regularization,
)
from .errors import EmptyDataError
from .projection import ProjectionSpec
from .rows import RowIndex
from .storage import GradientStore, MemoryGradientStore

__all__ = ["FittedState"]


def _max_norms(norms: Mapping[str, torch.Tensor]) -> OrderedDict[str, float]:
    return OrderedDict((k, float(v.max()) if len(v) else 0.0) for k, v in norms.items())


@dataclass(frozen=True)
class FittedState:
    r"""The result of one fit pass, read by the DataInf operator.

    Attributes:
        blocks: the block structure.
        n: number of training samples $n$.
        squared_norms: $\lVert g_{il}\rVert^2$, `(n,)` per block.
        regularization: the resolved $\lambda_l$ per block.
        store: the per-sample training gradients.
        fingerprint: digest of the trainable weights at fit (`""` if unknown).
        frozen_fingerprint: digest of the model's other parameters and buffers
            at fit (`""` if unknown), see
            [frozen_digest][pydvl_datainf.fingerprint.frozen_digest].
        rows: digests of the training rows, to recognise them in queries.
        rows_digest: SHA-256 of the training rows' digests in the order of the
            fit pass (`""` if unknown): identifies the columns of results.
        projections: the projection of each block when the gradients are
            compressed (see [Compression][pydvl_datainf.projection.Compression]);
            `None` for the gradients themselves.
        regularization_spec: the spec $\lambda$ was resolved from.
        regularization_scale: $c$ in the `"auto"` rule.
        loss: the name of the loss used at fit (`""` if unknown).
        dtype: the dtype the operator computes in (for range checks).
        metadata: JSON-serialisable facts recorded by the caller of `fit`
            (e.g. the configuration of a command line run), saved with a Zarr
            store and read back with it.

    Example:
        ```python
        import torch
        from pydvl_datainf.state import FittedState

        g = torch.randn(10, 3)
        state = FittedState.from_gradients({"w": g})
        assert state.n == 10 and list(state.regularization) == ["w"]
        # "auto": lambda = 0.1 * mean squared norm / d
        assert abs(state.regularization["w"] - 0.1 * g.pow(2).sum(1).mean() / 3) < 1e-6
        ```
    """

    blocks: BlockStructure
    n: int
    squared_norms: OrderedDict[str, torch.Tensor]
    regularization: OrderedDict[str, float]
    store: GradientStore
    fingerprint: str = ""
    frozen_fingerprint: str = ""
    rows: Optional[RowIndex] = None
    rows_digest: str = ""
    projections: Optional[OrderedDict[str, ProjectionSpec]] = None
    regularization_spec: OrderedDict[str, Union[float, str]] = field(
        default_factory=OrderedDict
    )
    regularization_scale: float = formula.DEFAULT_REGULARIZATION_SCALE
    loss: str = ""
    dtype: torch.dtype = torch.float32
    metadata: Dict[str, Any] = field(default_factory=dict)

    @property
    def block_names(self) -> list:
        """Block names, in order."""
        return self.blocks.names

    @property
    def widths(self) -> List[int]:
        r"""The width of each block's stored rows and factors: $k_l$ when
        compressed, else $d_l$."""
        if self.projections is None:
            return list(self.blocks.sizes)
        return [self.projections[k].k for k in self.blocks.names]

    @property
    def norm_sums(self) -> OrderedDict[str, float]:
        r"""$\sum_i \lVert g_{il}\rVert^2$ per block."""
        return OrderedDict((k, float(v.sum())) for k, v in self.squared_norms.items())

    def negligible_blocks(self) -> List[str]:
        """Blocks whose gradients are at the level of rounding errors (see
        [negligible_blocks][pydvl_datainf.config.negligible_blocks])."""
        return negligible_blocks(self.norm_sums, self.blocks, self.dtype)

    def resolve(self, regularization: RegularizationSpec) -> OrderedDict[str, float]:
        r"""$\lambda_l$ per block for a spec, from this state's norms, checked."""
        return resolve_regularization(
            regularization,
            self.blocks,
            self.norm_sums,
            self.n,
            self.regularization_scale,
            self.dtype,
            _max_norms(self.squared_norms),
        )

    def with_regularization(
        self,
        regularization: RegularizationSpec,
        regularization_scale: Optional[float] = None,
    ) -> FittedState:
        r"""A new state with other $\lambda_l$ (no refit: nothing else depends on it).

        Args:
            regularization: `"auto"`, a float, or `{block: float | "auto"}`.
            regularization_scale: $c$ for `"auto"`; default this state's.

        Returns:
            A new state sharing the store, norms and row index.

        Raises:
            RegularizationError: an invalid or out-of-range value.
        """
        scale = (
            self.regularization_scale
            if regularization_scale is None
            else float(regularization_scale)
        )
        state = dataclasses.replace(self, regularization_scale=scale)
        return dataclasses.replace(
            state,
            regularization=state.resolve(regularization),
            regularization_spec=validate_regularization(
                regularization, self.blocks.names
            ),
        )

    def as_blocks(
        self, z: Union[torch.Tensor, Mapping[str, torch.Tensor]]
    ) -> OrderedDict[str, torch.Tensor]:
        """Factors `(m, sum of widths)` or `{block: (m, width)}` as checked blocks
        (the width of a block is $d_l$, or $k_l$ when compressed).

        Raises:
            ValueError: other blocks, widths or lengths.
            TypeError: neither a tensor nor a mapping.
        """
        names = self.blocks.names
        widths = dict(zip(names, self.widths))
        if isinstance(z, Mapping):
            if list(z) != names:
                raise ValueError(
                    f"Factor blocks {list(z)} do not match the model's blocks {names}"
                )
            for k in names:
                t = z[k]
                if t.ndim != 2 or t.shape[1] != widths[k]:
                    raise ValueError(
                        f"Factors of block {k!r} must have shape (m, {widths[k]}), "
                        f"got {tuple(t.shape)}"
                    )
            lengths = {len(t) for t in z.values()}
            if len(lengths) != 1:
                raise ValueError(f"Factor blocks have different lengths {lengths}")
            return OrderedDict((k, z[k]) for k in names)
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"Factors must be a tensor or dict, got {type(z).__name__}")
        d = sum(widths.values())
        if z.ndim != 2 or z.shape[1] != d:
            what = (
                "compressed widths" if self.projections is not None else "n_parameters"
            )
            raise ValueError(
                f"Factors must have shape (m, {what}={d}), got {tuple(z.shape)}"
            )
        return OrderedDict(zip(names, torch.split(z, list(widths.values()), dim=1)))

    def to(self, device: Union[str, torch.device]) -> FittedState:
        """A state whose store and norms are on `device`."""
        device = torch.device(device)
        return dataclasses.replace(
            self,
            store=self.store.to(device),
            squared_norms=OrderedDict(
                (k, v.to(device)) for k, v in self.squared_norms.items()
            ),
        )

    @classmethod
    def from_gradients(
        cls,
        grads: Mapping[str, torch.Tensor],
        regularization: RegularizationSpec = "auto",
        regularization_scale: float = formula.DEFAULT_REGULARIZATION_SCALE,
        blocks: Optional[BlockStructure] = None,
    ) -> FittedState:
        r"""An in-memory state from per-sample gradients `{block: (n, d_l)}`.

        Args:
            grads: per-sample training gradients per block, in block order.
            regularization: as for
                [with_regularization][pydvl_datainf.state.FittedState.with_regularization].
            regularization_scale: $c$ in the `"auto"` rule.
            blocks: the block structure; default one block per key, each one
                parameter of shape `(d_l,)`.

        Returns:
            A state over a
            [MemoryGradientStore][pydvl_datainf.storage.MemoryGradientStore].

        Raises:
            EmptyDataError: no rows.
            ValueError: blocks of other widths or row counts.
            RegularizationError: an invalid or out-of-range value.

        Example:
            >>> import torch
            >>> g = {"a": torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)}
            >>> FittedState.from_gradients(g, 1.0).regularization
            OrderedDict([('a', 1.0)])
        """
        names: Sequence[str] = list(grads)
        if blocks is None:
            blocks = BlockStructure(
                [Block(k, (k,), ((int(grads[k].shape[1]),),)) for k in names]
            )
        if list(blocks.names) != list(names):
            raise ValueError(f"Gradient blocks {names} are not {blocks.names}")
        lengths = {len(g) for g in grads.values()}
        if len(lengths) != 1:
            raise ValueError(f"Gradient blocks have different row counts {lengths}")
        n = lengths.pop()
        if n == 0:
            raise EmptyDataError("No gradient rows; DataInf needs n > 0")
        for b in blocks:
            g = grads[b.name]
            if g.ndim != 2 or g.shape[1] != b.size:
                raise ValueError(
                    f"Gradients of block {b.name!r} must have shape (n, {b.size}), "
                    f"got {tuple(g.shape)}"
                )
        store = MemoryGradientStore(names)
        store.append(OrderedDict((k, grads[k]) for k in names))
        store.finalize()
        norms = OrderedDict((k, formula.squared_norms(grads[k])) for k in names)
        dtype = next(iter(grads.values())).dtype
        base = cls(
            blocks=blocks,
            n=n,
            squared_norms=norms,
            regularization=OrderedDict(),
            store=store,
            regularization_scale=float(regularization_scale),
            dtype=dtype if dtype.is_floating_point else torch.float32,
        )
        return base.with_regularization(regularization)
