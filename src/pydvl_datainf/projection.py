r"""Seeded random projections of per-sample gradients, one per block.

A projection $P_l \in \mathbb{R}^{k_l \times d_l}$ maps the gradient of block
$l$ to $\tilde g_{il} = P_l g_{il}$, $k_l \ll d_l$ numbers. DataInf is made of
inner products, and random projections keep inner products in expectation,
$\mathbb{E}[P^\top P] = I$, with an error that falls as $1/\sqrt{k_l}$ (see
[jl][pydvl_datainf.jl] for the stated bound).

A projection is fully described by a small, JSON-serialisable
[ProjectionSpec][pydvl_datainf.projection.ProjectionSpec] (kind, dimensions,
seed, dtype), so that the same matrices are regenerated bit for bit in another
process or on a Dask worker: they are drawn in float64 on the CPU from an
explicit `torch.Generator` with elementwise arithmetic only, then cast and
moved. Each random matrix's SHA-256 digest is recorded in the spec and checked
when it is regenerated, so a machine that would draw other numbers raises
[ProjectionMismatchError][pydvl_datainf.projection.ProjectionMismatchError]
instead of silently projecting test gradients differently from the stored
training rows.

Kinds:

| kind | matrix | use |
| --- | --- | --- |
| `"gaussian"` | i.i.d. $\mathcal N(0, 1/k)$ | small dense blocks |
| `"rademacher"` | i.i.d. $\pm 1/\sqrt{k}$ | small dense blocks |
| `"orthogonal"` | $k \ge d$ orthonormal columns, $P^\top P = I$ | no compression, a random rotation (exact) |
| `"identity"` | $I_d$ | no compression |
| `"kronecker"` | $P_{out} \otimes P_{in}$ | linear layers (LoGra-style) |
| `"concat"` | block-diagonal over consecutive slices | a block of several parameters |

**Linear layers.** The per-sample gradient of a linear layer's weight over the
tokens $t$ of a sample is $G_i = \sum_t \delta_{t} a_{t}^\top$ ($\delta$: output
gradients, $a$: inputs). With $P = P_{out} \otimes P_{in}$ (row-major
vectorisation, as the parameters are laid out),

$$
P \operatorname{vec}(G_i) = \operatorname{vec}\Big(\sum_t (P_{out}\delta_t)
(P_{in} a_t)^\top\Big),
$$

$k_{out} k_{in}$ numbers computed from the per-token factors without forming the
$d_{out} \times d_{in}$ gradient
([apply_tokens][pydvl_datainf.projection.Projection.apply_tokens]). A rank-one
[FactoredGrads][pydvl_datainf.factored.FactoredGrads] is projected side by
side and stays rank one
([apply_rows][pydvl_datainf.projection.Projection.apply_rows]).

Example:
    >>> spec = kronecker_spec((4, 6), (2, 3), seed=1)
    >>> spec.dim, spec.k
    (24, 6)
    >>> same = ProjectionSpec.from_json(spec.to_json())
    >>> same == spec
    True
    >>> p = Projection(spec)
    >>> g = torch.randn(5, 24)
    >>> p.apply(g).shape
    torch.Size([5, 6])
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

import torch

from .factored import FactoredGrads, Rows
from .factored import squared_norms as rows_squared_norms

__all__ = [
    "Compression",
    "SPEC_VERSION",
    "LEAF_KINDS",
    "KINDS",
    "ProjectionMismatchError",
    "ProjectionSpec",
    "Projection",
    "ProjectedGrads",
    "dense_spec",
    "kronecker_spec",
    "concat_spec",
    "block_spec",
    "block_specs",
    "derive_seed",
    "project_rows",
    "projection_specs",
    "projections_to_dict",
    "projections_from_dict",
    "projections_digest",
]

SPEC_VERSION = 1
"""The version of the generation algorithm; a spec of another version is refused."""

LEAF_KINDS: Tuple[str, ...] = ("gaussian", "rademacher", "orthogonal", "identity")
"""Kinds that are one explicit $k \\times d$ matrix."""

KINDS: Tuple[str, ...] = LEAF_KINDS + ("kronecker", "concat")
"""All kinds of [ProjectionSpec][pydvl_datainf.projection.ProjectionSpec]."""

_DTYPES: Dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


class ProjectionMismatchError(RuntimeError):
    """A projection regenerated from its spec differs from the recorded one
    (another random number generator or library version), or a spec is of an
    unknown version. Test gradients would be projected differently from the
    stored training rows; recompute the store on this machine."""


def derive_seed(seed: int, *path: Union[str, int]) -> int:
    """A 63-bit seed for a named part, the same in every process.

    Example:
        >>> derive_seed(0, "block", 1) == derive_seed(0, "block", 1)
        True
        >>> derive_seed(0, "a") != derive_seed(0, "b")
        True
    """
    text = "/".join([str(int(seed)), *map(str, path)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


@dataclass(frozen=True)
class ProjectionSpec:
    """A JSON-serialisable description of one projection $P$ ($k \\times d$).

    Attributes:
        kind: one of [KINDS][pydvl_datainf.projection.KINDS].
        dim: $d$, the input dimension.
        k: the output dimension.
        seed: the seed of the random matrix (leaf kinds).
        dtype: the dtype in which the projection is applied.
        parts: the factors (`"kronecker"`: `(out, in)`) or the consecutive
            slices (`"concat"`).
        digest: SHA-256 of the float64 matrix (random leaf kinds), checked
            when the matrix is regenerated; `None` skips the check.
    """

    kind: str
    dim: int
    k: int
    seed: int = 0
    dtype: str = "float32"
    parts: Tuple[ProjectionSpec, ...] = ()
    digest: Optional[str] = field(default=None, compare=True)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}"
            )
        if self.dim <= 0 or self.k <= 0:
            raise ValueError(f"dim and k must be positive, got {self.dim}, {self.k}")
        if self.kind in LEAF_KINDS and self.parts:
            raise ValueError(f"a {self.kind!r} projection has no parts")
        if self.kind == "identity" and self.k != self.dim:
            raise ValueError(f"the identity needs k == dim, got {self.k}, {self.dim}")
        if self.kind == "orthogonal" and self.k < self.dim:
            raise ValueError(
                f"an orthogonal projection needs k >= dim (an exact isometry), got "
                f"k={self.k} < dim={self.dim}; use 'gaussian' or 'rademacher' to "
                "compress"
            )
        if self.kind == "kronecker":
            if len(self.parts) != 2:
                raise ValueError("a Kronecker projection has two parts (out, in)")
            out, inp = self.parts
            if (self.dim, self.k) != (out.dim * inp.dim, out.k * inp.k):
                raise ValueError("Kronecker dimensions are the products of its parts'")
        if self.kind == "concat":
            if not self.parts:
                raise ValueError("a concatenation needs at least one part")
            if (self.dim, self.k) != (
                sum(p.dim for p in self.parts),
                sum(p.k for p in self.parts),
            ):
                raise ValueError("concatenated dimensions are the sums of its parts'")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a `torch.dtype`."""
        return _DTYPES[self.dtype]

    @property
    def shape(self) -> Tuple[int, ...]:
        """The input layout: `(d,)` for a leaf, `(d_out, d_in)` for a Kronecker
        product, the concatenation of the parts' layouts for `"concat"`."""
        if self.kind in LEAF_KINDS:
            return (self.dim,)
        if self.kind == "kronecker":
            return (self.parts[0].dim, self.parts[1].dim)
        return tuple(d for p in self.parts for d in p.shape)

    def leaves(self) -> List[ProjectionSpec]:
        """The leaf specs, depth first."""
        if self.kind in LEAF_KINDS:
            return [self]
        return [leaf for p in self.parts for leaf in p.leaves()]

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict (with the generation algorithm's version)."""
        out: Dict[str, Any] = {
            "version": SPEC_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "k": self.k,
            "dtype": self.dtype,
            "seed": self.seed,
        }
        if self.kind in LEAF_KINDS:
            if self.digest is not None:
                out["digest"] = self.digest
        else:
            out["parts"] = [p.to_dict() for p in self.parts]
        return out

    def to_json(self) -> str:
        """The spec as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProjectionSpec:
        """The spec of [to_dict][pydvl_datainf.projection.ProjectionSpec.to_dict].

        Raises:
            ProjectionMismatchError: a spec written by another version of the
                generation algorithm.
        """
        version = d.get("version")
        if version != SPEC_VERSION:
            raise ProjectionMismatchError(
                f"projection spec of version {version!r}, this library generates "
                f"version {SPEC_VERSION}; recompute the store with this version"
            )
        return cls(
            kind=str(d["kind"]),
            dim=int(d["dim"]),
            k=int(d["k"]),
            seed=int(d.get("seed", 0)),
            dtype=str(d["dtype"]),
            parts=tuple(cls.from_dict(p) for p in d.get("parts", ())),
            digest=d.get("digest"),
        )

    @classmethod
    def from_json(cls, text: str) -> ProjectionSpec:
        """The spec of [to_json][pydvl_datainf.projection.ProjectionSpec.to_json]."""
        return cls.from_dict(json.loads(text))

    def sealed(self) -> ProjectionSpec:
        """The same spec with the digest of every random leaf filled in."""
        if self.kind in ("gaussian", "rademacher", "orthogonal"):
            return replace(self, digest=_digest(_generate(self)))
        if self.kind == "identity":
            return self
        return replace(self, parts=tuple(p.sealed() for p in self.parts))


# ------------------------------------------------------------------ generation
def _digest(m: torch.Tensor) -> str:
    data = m.contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def _rotation(k: int, d: int, gen: torch.Generator) -> torch.Tensor:
    r"""$d \le k$ orthonormal columns of a random rotation, from elementwise arithmetic only.

    Layers of rotations of random disjoint pairs of rows (Givens rotations with
    the rational parametrisation $c = (1-t^2)/(1+t^2)$, $s = 2t/(1+t^2)$),
    applied to the first $d$ columns of $I_k$, then random signs. Every operation is
    a correctly rounded IEEE operation on single elements, so the bits do not
    depend on the number of threads or the CPU's vector width (a LAPACK QR
    would).
    """
    q = torch.eye(k, d, dtype=torch.float64)
    half = k // 2
    for _ in range(max(1, math.ceil(math.log2(k))) if k > 1 else 0):
        q = q[torch.randperm(k, generator=gen)]  # random disjoint pairs (a, b)
        t = torch.rand(half, 1, generator=gen, dtype=torch.float64) * 2 - 1
        t2 = t * t
        c, s = (1 - t2) / (1 + t2), (2 * t) / (1 + t2)
        a, b = q[:half], q[half : 2 * half]
        q = torch.cat([c * a - s * b, s * a + c * b, q[2 * half :]])
    signs = torch.randint(0, 2, (k, 1), generator=gen, dtype=torch.float64) * 2 - 1
    return q * signs


def _generate(spec: ProjectionSpec) -> torch.Tensor:
    """The float64 CPU matrix of a leaf spec."""
    k, d = spec.k, spec.dim
    if spec.kind == "identity":
        return torch.eye(d, dtype=torch.float64)
    gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    if spec.kind == "gaussian":
        return torch.randn(k, d, generator=gen, dtype=torch.float64) / math.sqrt(k)
    if spec.kind == "rademacher":
        signs = torch.randint(0, 2, (k, d), generator=gen, dtype=torch.float64)
        return (signs * 2 - 1) / math.sqrt(k)
    if spec.kind == "orthogonal":  # k >= d: d orthonormal columns of a rotation
        return _rotation(k, d, gen)
    raise ValueError(f"{spec.kind!r} is not a leaf kind")


def _checked(spec: ProjectionSpec) -> torch.Tensor:
    m = _generate(spec)
    if spec.digest is not None and _digest(m) != spec.digest:
        raise ProjectionMismatchError(
            f"the {spec.kind} projection ({spec.k} x {spec.dim}, seed {spec.seed}) "
            "regenerated here differs from the one recorded with the store (another "
            "torch version or random number generator?); test gradients would be "
            "projected differently from the training rows. Recompute the store on "
            "this machine."
        )
    return m


# ------------------------------------------------------------------ constructors
def dense_spec(
    dim: int,
    k: int,
    kind: str = "gaussian",
    seed: int = 0,
    dtype: str = "float32",
    seal: bool = True,
) -> ProjectionSpec:
    """The spec of one dense $k \\times d$ projection.

    Args:
        dim: $d$.
        k: the output dimension.
        kind: `"gaussian"`, `"rademacher"`, `"orthogonal"` ($k \\ge d$) or
            `"identity"` ($k = d$).
        seed: the seed.
        dtype: the dtype in which it is applied.
        seal: record the digest of the random matrix (generates it once).

    Example:
        >>> dense_spec(10, 4, "rademacher", seed=3).k
        4
    """
    if kind not in LEAF_KINDS:
        raise ValueError(f"kind must be one of {LEAF_KINDS}, got {kind!r}")
    spec = ProjectionSpec(kind, dim, k, seed=seed, dtype=dtype)
    return spec.sealed() if seal else spec


def kronecker_spec(
    shape: Sequence[int],
    k: Sequence[int],
    kind: str = "gaussian",
    seed: int = 0,
    dtype: str = "float32",
    seal: bool = True,
) -> ProjectionSpec:
    r"""$P_{out} \otimes P_{in}$ for a weight of shape $(d_{out}, d_{in})$.

    A side whose $k$ is at least its dimension is not compressed: it is the
    identity (or, with `kind="orthogonal"`, a random rotation).

    Args:
        shape: $(d_{out}, d_{in})$.
        k: $(k_{out}, k_{in})$.
        kind: the kind of both sides (a leaf kind).
        seed: the seed; each side gets its own derived seed.
        dtype: the dtype in which it is applied.
        seal: record the digests.

    Example:
        >>> s = kronecker_spec((8, 4096), (16, 64))  # a LoRA A matrix, r = 8
        >>> [p.kind for p in s.parts], s.k
        (['identity', 'gaussian'], 512)
    """
    if len(shape) != 2 or len(k) != 2:
        raise ValueError(f"shape and k are (out, in) pairs, got {shape}, {k}")
    parts = []
    for side, d, kk in zip(("out", "in"), shape, k):
        side_kind = kind
        if kk >= d and kind != "orthogonal":
            side_kind, kk = "identity", d
        parts.append(
            dense_spec(d, kk, side_kind, derive_seed(seed, side), dtype, seal=seal)
        )
    out, inp = parts
    return ProjectionSpec(
        "kronecker", out.dim * inp.dim, out.k * inp.k, seed, dtype, (out, inp)
    )


def concat_spec(parts: Sequence[ProjectionSpec]) -> ProjectionSpec:
    """A block-diagonal projection over consecutive slices (a block made of
    several parameters: a weight and its bias, say).

    Example:
        >>> w, b = kronecker_spec((3, 5), (2, 2)), dense_spec(3, 3, "identity")
        >>> s = concat_spec([w, b])
        >>> s.dim, s.k, s.shape
        (18, 7, (3, 5, 3))
    """
    dtypes = {p.dtype for p in parts}
    if len(dtypes) != 1:
        raise ValueError(f"parts of one projection have one dtype, got {dtypes}")
    return ProjectionSpec(
        "concat",
        sum(p.dim for p in parts),
        sum(p.k for p in parts),
        0,
        dtypes.pop(),
        tuple(parts),
    )


def block_spec(
    shapes: Sequence[Sequence[int]],
    side: int = 16,
    dense_k: int = 256,
    kind: str = "gaussian",
    seed: int = 0,
    dtype: str = "float32",
    seal: bool = True,
) -> ProjectionSpec:
    r"""The projection of one block made of parameters of the given shapes.

    Always a `"concat"` with one part per parameter, in order (the block's
    rows are its parameters' rows side by side), so that
    `Projection(spec).parts[i]` projects the block's $i$-th parameter (what
    [per_sample_grads_projected][pydvl_datainf.gradients.engine.GradientEngine.per_sample_grads_projected]
    takes):

    * a matrix $(d_{out}, d_{in})$ (a linear layer's weight):
      [kronecker_spec][pydvl_datainf.projection.kronecker_spec] with `side`
      on each side (a side of at most `side` is kept, as the rank side of a
      LoRA matrix);
    * anything else (a bias, a norm's scale): a dense projection to `dense_k`,
      or the identity if it has at most `dense_k` entries.

    Args:
        shapes: the parameters' shapes, in the block's order.
        side: $k_{out} = k_{in}$ for matrices.
        dense_k: $k$ for the other parameters.
        kind: the random kind (`"gaussian"` or `"rademacher"`; `"orthogonal"`
            keeps every dimension).
        seed: the block's seed; each parameter gets a derived one.
        dtype: the dtype in which it is applied.
        seal: record the digests.

    Example:
        >>> s = block_spec([(8, 4096), (4096, 8)], side=16)  # LoRA A and B, r = 8
        >>> [p.k for p in s.parts], s.k
        ([128, 128], 256)
        >>> block_spec([(64, 32), (64,)], side=8, dense_k=16).shape  # weight, bias
        (64, 32, 64)
    """
    parts = []
    for i, shape in enumerate(shapes):
        part_seed = derive_seed(seed, "parameter", i)
        if len(shape) == 2:
            parts.append(
                kronecker_spec(shape, (side, side), kind, part_seed, dtype, seal)
            )
        else:
            d = math.prod(shape)
            if kind == "orthogonal":
                k, leaf = d, "orthogonal"
            elif d <= dense_k:
                k, leaf = d, "identity"
            else:
                k, leaf = dense_k, kind
            parts.append(dense_spec(d, k, leaf, part_seed, dtype, seal))
    return concat_spec(parts)


def block_specs(
    blocks: Mapping[str, Sequence[Sequence[int]]],
    side: int = 16,
    dense_k: int = 256,
    kind: str = "gaussian",
    seed: int = 0,
    dtype: str = "float32",
) -> Dict[str, ProjectionSpec]:
    """[block_spec][pydvl_datainf.projection.block_spec] for every block, each
    with a seed derived from `seed` and the block's name.

    Example:
        >>> specs = block_specs({"l1": [(8, 64)], "l2": [(3, 8), (3,)]}, side=4)
        >>> {name: s.k for name, s in specs.items()}
        {'l1': 16, 'l2': 15}
    """
    return {
        name: block_spec(shapes, side, dense_k, kind, derive_seed(seed, name), dtype)
        for name, shapes in blocks.items()
    }


@dataclass(frozen=True)
class Compression:
    r"""How per-sample gradients are compressed before they are stored.

    Every block gets a seeded random projection
    ([block_spec][pydvl_datainf.projection.block_spec]): each matrix
    parameter (a linear layer's weight, a LoRA matrix) a Kronecker product
    $P_{out} \otimes P_{in}$ with `side` rows on each side (a side already
    at most `side` long, such as the rank side of a LoRA matrix, is kept), so
    that it is projected from the per-token factors; every other parameter a
    dense projection to `dense_k` (kept whole if smaller). The squared norms
    and $\lambda_l$ stay exact; inner products are taken in projected space,
    with the error of the Johnson-Lindenstrauss bound (see [jl][pydvl_datainf.jl]).

    Attributes:
        side: $k_{out} = k_{in}$ for matrix parameters.
        dense_k: $k$ for the other parameters.
        kind: `"gaussian"` or `"rademacher"` (`"orthogonal"` keeps every
            dimension: a random rotation, for tests).
        seed: the seed; each block and parameter derives its own.

    Example:
        >>> c = Compression(side=16)
        >>> specs = c.specs({"lora_A": [(8, 576)], "lora_B": [(576, 8)]})
        >>> {name: s.k for name, s in specs.items()}  # 8 x 16 each, of 4608
        {'lora_A': 128, 'lora_B': 128}
    """

    side: int = 16
    dense_k: int = 256
    kind: str = "gaussian"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.side < 1 or self.dense_k < 1:
            raise ValueError(
                f"side and dense_k must be positive, got {self.side}, {self.dense_k}"
            )
        if self.kind not in ("gaussian", "rademacher", "orthogonal"):
            raise ValueError(
                f"kind must be 'gaussian', 'rademacher' or 'orthogonal', got "
                f"{self.kind!r}"
            )

    @classmethod
    def of(
        cls, value: Union[None, Compression, Mapping[str, Any]]
    ) -> Optional[Compression]:
        """`value` as a `Compression` (`None` stays `None`; a dict gives the fields)."""
        if value is None or isinstance(value, Compression):
            return value
        if isinstance(value, Mapping):
            return cls(**dict(value))
        raise TypeError(
            f"compression must be a Compression, a dict of its fields, or None; got "
            f"{type(value).__name__}"
        )

    def specs(
        self, blocks: Mapping[str, Sequence[Sequence[int]]], dtype: str = "float32"
    ) -> Dict[str, ProjectionSpec]:
        """The projection of every block `{name: [parameter shapes]}`."""
        return block_specs(blocks, self.side, self.dense_k, self.kind, self.seed, dtype)


def projection_specs(
    compression: Union[None, Compression, Mapping[str, Any]],
    blocks: Any,
    dtype: torch.dtype = torch.float32,
) -> Optional[Dict[str, ProjectionSpec]]:
    """The projection of every block of `blocks` (a
    [BlockStructure][pydvl_datainf.blocks.BlockStructure]) for a compression
    choice: `None`, a [Compression][pydvl_datainf.projection.Compression] (or
    a dict of its fields), or explicit specs `{block: ProjectionSpec}`.

    Raises:
        ValueError: explicit specs for other blocks.

    Example:
        >>> from torch import nn
        >>> from pydvl_datainf.blocks import build_blocks
        >>> blocks = build_blocks(nn.Linear(64, 32))
        >>> {k: s.k for k, s in projection_specs({"side": 4}, blocks).items()}
        {'': 48}
    """
    if compression is None:
        return None
    names = list(blocks.names)
    if isinstance(compression, Mapping) and all(
        isinstance(v, ProjectionSpec) for v in compression.values()
    ):
        if sorted(compression) != sorted(names):
            raise ValueError(
                f"projections for blocks {sorted(compression)}, the model has {names}"
            )
        return {k: compression[k] for k in names}
    config = Compression.of(compression)
    assert config is not None
    name = str(dtype).replace("torch.", "")
    return config.specs(
        {b.name: [list(s) for s in b.shapes] for b in blocks},
        dtype=name if name in _DTYPES else "float32",
    )


def projections_to_dict(
    specs: Optional[Mapping[str, ProjectionSpec]],
) -> Optional[Dict[str, Any]]:
    """Block projections as JSON values (`None` stays `None`)."""
    if specs is None:
        return None
    return {name: spec.to_dict() for name, spec in specs.items()}


def projections_from_dict(
    data: Optional[Mapping[str, Any]],
) -> Optional[Dict[str, ProjectionSpec]]:
    """The inverse of [projections_to_dict][pydvl_datainf.projection.projections_to_dict]."""
    if data is None:
        return None
    return {name: ProjectionSpec.from_dict(d) for name, d in data.items()}


def projections_digest(specs: Optional[Mapping[str, ProjectionSpec]]) -> str:
    """SHA-256 of block projections (`""` for uncompressed gradients): part of
    the identity of a fit.

    Example:
        >>> projections_digest(None)
        ''
        >>> a = Compression(side=2).specs({"w": [(4, 4)]})
        >>> projections_digest(a) == projections_digest(Compression(side=2).specs({"w": [(4, 4)]}))
        True
    """
    if specs is None:
        return ""
    text = json.dumps(projections_to_dict(specs), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------ application
@dataclass(frozen=True)
class ProjectedGrads:
    r"""Projected per-sample rows of one block with their exact squared norms.

    DataInf's $\lambda_l$ and the denominators $\lambda_l + \lVert g_{il}\rVert^2$
    use the norms of the *unprojected* gradients; only inner products are
    taken in projected space (see [compressed][pydvl_datainf.compressed]).

    Attributes:
        rows: the projected rows $(n, k_l)$, dense or as rank-one factors.
        squared_norms: $\lVert g_{il}\rVert^2$ of the unprojected rows, $(n,)$.
    """

    rows: Rows
    squared_norms: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)

    def dense(self) -> torch.Tensor:
        """The projected rows as a dense tensor."""
        rows = self.rows
        return rows.dense() if isinstance(rows, FactoredGrads) else rows


class Projection:
    """A [ProjectionSpec][pydvl_datainf.projection.ProjectionSpec], materialised.

    Args:
        spec: the spec.
        device: where the matrices live (generated on the CPU, then moved).
        dtype: the dtype of the matrices and of the projected rows (default:
            the spec's).

    Raises:
        ProjectionMismatchError: a regenerated matrix differs from its recorded
            digest.

    Example:
        >>> p = Projection(dense_spec(6, 6, "orthogonal", dtype="float64"))
        >>> x = torch.randn(3, 6, dtype=torch.float64)
        >>> torch.allclose(p.apply(x) @ p.apply(x).T, x @ x.T)
        True
    """

    def __init__(
        self,
        spec: ProjectionSpec,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        self.spec = spec
        self.dtype = spec.torch_dtype if dtype is None else dtype
        self.device = torch.device("cpu" if device is None else device)
        self.parts: Tuple[Projection, ...] = tuple(
            Projection(p, self.device, self.dtype) for p in spec.parts
        )
        self.weight: Optional[torch.Tensor] = None
        if spec.kind in LEAF_KINDS and spec.kind != "identity":
            self.weight = _checked(spec).to(device=self.device, dtype=self.dtype)

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def k(self) -> int:
        return self.spec.k

    def __repr__(self) -> str:
        return f"Projection({self.spec.kind}, {self.k} x {self.dim}, {self.dtype})"

    def matrix(self) -> torch.Tensor:
        """The explicit $k \\times d$ matrix (for tests and small blocks)."""
        if self.spec.kind == "identity":
            return torch.eye(self.dim, dtype=self.dtype, device=self.device)
        if self.weight is not None:
            return self.weight
        if self.spec.kind == "kronecker":
            return torch.kron(self.parts[0].matrix(), self.parts[1].matrix())
        return torch.block_diag(*(p.matrix() for p in self.parts))

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype)

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """$P g_i$ for the dense rows $(n, d)$: $(n, k)$.

        Kronecker products act on the row-major $(d_{out}, d_{in})$ layout of
        each row without forming the Kronecker matrix.
        """
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(
                f"rows of shape {tuple(rows.shape)} for a projection of {self.dim} "
                "columns"
            )
        rows = self._cast(rows)
        kind = self.spec.kind
        if kind == "identity":
            return rows
        if self.weight is not None:
            return rows @ self.weight.T
        if kind == "kronecker":
            out, inp = self.parts
            g = rows.reshape(len(rows), out.dim, inp.dim)
            return self._sides(out, inp, g)
        pieces, start = [], 0
        for p in self.parts:
            pieces.append(p.apply(rows[:, start : start + p.dim]))
            start += p.dim
        return torch.cat(pieces, dim=1)

    @staticmethod
    def _sides(out: Projection, inp: Projection, g: torch.Tensor) -> torch.Tensor:
        """$P_{out} G_i P_{in}^\\top$ for $(n, d_{out}, d_{in})$, flattened."""
        n = len(g)
        if inp.weight is not None:
            g = g @ inp.weight.T
        if out.weight is not None:
            g = torch.matmul(out.weight, g)
        return g.reshape(n, out.k * inp.k)

    def apply_rows(self, rows: Rows) -> Rows:
        """$P g_i$ for dense or factored rows.

        A [FactoredGrads][pydvl_datainf.factored.FactoredGrads] projected by a
        Kronecker product (or a concatenation of a Kronecker product and one
        part for its dense tail) stays factored: each side is projected,
        $(P_{out} u_i) \\otimes (P_{in} a_i)$. Anything else is projected densely.

        Example:
            >>> p = Projection(kronecker_spec((3, 4), (2, 2), seed=0))
            >>> g = FactoredGrads(torch.randn(5, 3), torch.randn(5, 4))
            >>> torch.allclose(p.apply_rows(g).dense(), p.apply(g.dense()), atol=1e-5)
            True
        """
        if not isinstance(rows, FactoredGrads):
            return self.apply(rows)
        kron, tail = self._factor_layout(rows)
        if kron is None:
            return self.apply(rows.dense())
        left = kron.parts[0].apply(rows.left)
        right = kron.parts[1].apply(rows.right)
        if tail is None:
            return FactoredGrads(left, right)
        assert rows.tail is not None
        return FactoredGrads(left, right, tail.apply(rows.tail))

    def _factor_layout(
        self, rows: FactoredGrads
    ) -> Tuple[Optional[Projection], Optional[Projection]]:
        """(the Kronecker part, the tail's part) if they match the factors."""
        p, q = rows.left.shape[1], rows.right.shape[1]
        if self.spec.kind == "kronecker" and rows.tail is None:
            kron, tail = self, None
        elif (
            self.spec.kind == "concat"
            and len(self.parts) == 1
            and self.parts[0].spec.kind == "kronecker"
            and rows.tail is None
        ):
            kron, tail = self.parts[0], None
        elif (
            self.spec.kind == "concat"
            and len(self.parts) == 2
            and self.parts[0].spec.kind == "kronecker"
            and rows.tail is not None
            and self.parts[1].dim == rows.tail.shape[1]
        ):
            kron, tail = self.parts[0], self.parts[1]
        else:
            return None, None
        if kron.spec.shape != (p, q):
            return None, None
        return kron, tail

    def apply_tokens(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        r"""$P \operatorname{vec}(\sum_t \delta_{it} a_{it}^\top)$ from per-token factors.

        Args:
            left: $(n, T, d_{out})$, the output gradients $\delta_{it}$.
            right: $(n, T, d_{in})$, the inputs $a_{it}$.

        Returns:
            $(n, k_{out} k_{in})$: $\sum_t (P_{out}\delta_{it})(P_{in}a_{it})^\top$,
            computed in $O(nT(d_{out}k_{out} + d_{in}k_{in} + k_{out}k_{in}))$
            without forming any $d_{out} \times d_{in}$ matrix.

        Example:
            >>> p = Projection(kronecker_spec((3, 4), (2, 2), dtype="float64"))
            >>> d, a = torch.randn(5, 7, 3).double(), torch.randn(5, 7, 4).double()
            >>> g = (d.transpose(1, 2) @ a).reshape(5, -1)  # the dense gradients
            >>> torch.allclose(p.apply_tokens(d, a), p.apply(g))
            True
        """
        if self.spec.kind != "kronecker":
            raise ValueError(
                f"per-token factors need a Kronecker projection, not {self.spec.kind!r}"
            )
        out, inp = self.parts
        if left.dim() != 3 or right.dim() != 3 or left.shape[:2] != right.shape[:2]:
            raise ValueError(
                f"per-token factors are (n, T, d_out) and (n, T, d_in), got "
                f"{tuple(left.shape)} and {tuple(right.shape)}"
            )
        if (left.shape[2], right.shape[2]) != (out.dim, inp.dim):
            raise ValueError(
                f"factors of widths {(left.shape[2], right.shape[2])} for a Kronecker "
                f"projection of shape {(out.dim, inp.dim)}"
            )
        left, right = self._cast(left), self._cast(right)
        if out.weight is not None:
            left = left @ out.weight.T
        if inp.weight is not None:
            right = right @ inp.weight.T
        return (left.transpose(1, 2) @ right).reshape(len(left), out.k * inp.k)

    def transpose_apply(self, rows: torch.Tensor) -> torch.Tensor:
        """$P^\top f_i$ for rows $(n, k)$: $(n, d)$, back in parameter space.

        Example:
            >>> p = Projection(kronecker_spec((3, 4), (2, 2), dtype="float64"))
            >>> f = torch.randn(5, 4, dtype=torch.float64)
            >>> torch.allclose(p.transpose_apply(f), f @ p.matrix())
            True
        """
        if rows.dim() != 2 or rows.shape[1] != self.k:
            raise ValueError(
                f"rows of shape {tuple(rows.shape)} for a projection to {self.k}"
            )
        rows = self._cast(rows)
        kind = self.spec.kind
        if kind == "identity":
            return rows
        if self.weight is not None:
            return rows @ self.weight
        if kind == "kronecker":
            out, inp = self.parts
            f = rows.reshape(len(rows), out.k, inp.k)
            if inp.weight is not None:
                f = f @ inp.weight
            if out.weight is not None:
                f = torch.matmul(out.weight.T, f)
            return f.reshape(len(rows), out.dim * inp.dim)
        pieces, start = [], 0
        for p in self.parts:
            pieces.append(p.transpose_apply(rows[:, start : start + p.k]))
            start += p.k
        return torch.cat(pieces, dim=1)


def project_rows(projection: Projection, rows: Rows) -> ProjectedGrads:
    """The projected rows of one block with the exact squared norms of `rows`.

    The norms are taken before the projection, in the rows' own dtype.

    Example:
        >>> p = Projection(dense_spec(4, 2, seed=0))
        >>> out = project_rows(p, torch.ones(3, 4))
        >>> out.dense().shape, out.squared_norms
        (torch.Size([3, 2]), tensor([4., 4., 4.]))
    """
    norms = rows_squared_norms(rows)
    return ProjectedGrads(projection.apply_rows(rows), cast(torch.Tensor, norms))
