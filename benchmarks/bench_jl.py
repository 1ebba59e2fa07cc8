"""The Johnson-Lindenstrauss bound against inner-product errors measured on random data.

For each projected dimension k, `--pairs` pairs of correlated vectors in
dimension 4,096 (a decaying spectrum, like gradients) are projected by a dense
Gaussian, a dense Rademacher and a Kronecker projection (64 x 64 layout,
sqrt(k) per side), and the relative inner-product error
|Pu.Pv - u.v| / (|u| |v|) is measured: its largest value and its 99th
percentile, next to the bound's epsilon for the same k, the number of pairs
and a failure probability of 0.01 (`pydvl_datainf.jl.jl_epsilon`; the bound
covers the dense kinds only). For the Kronecker kind the vectors are
per-sample gradients of a linear layer, sums over 16 tokens of outer
products, as the layer's gradients are. Also the table of the dimension the
bound asks for, `jl_dimension(epsilon, delta, pairs)`.

Usage:
    python benchmarks/bench_jl.py --out benchmarks/results/index/jl.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

try:
    from pydvl_datainf.jl import jl_dimension, jl_epsilon
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from pydvl_datainf.jl import jl_dimension, jl_epsilon
from pydvl_datainf.projection import Projection, dense_spec, kronecker_spec

SIDE = 64
DIM = SIDE * SIDE
DELTA = 0.01


def vectors(pairs: int, seed: int) -> torch.Tensor:
    """(2, pairs, DIM) correlated pairs with a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, DIM + 1, dtype=torch.float64) ** -0.5
    u = torch.randn(pairs, DIM, generator=g, dtype=torch.float64) * scale
    v = 0.5 * u + torch.randn(pairs, DIM, generator=g, dtype=torch.float64) * scale
    return torch.stack([u, v])


def token_gradients(pairs: int, seed: int, tokens: int = 16) -> torch.Tensor:
    """(2, pairs, DIM): sums over tokens of outer products (linear-layer gradients)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(tokens, SIDE, generator=g, dtype=torch.float64)
    out = []
    for _ in range(2):
        d = torch.randn(pairs, tokens, SIDE, generator=g, dtype=torch.float64)
        a = shared + torch.randn(pairs, tokens, SIDE, generator=g, dtype=torch.float64)
        out.append((d.transpose(1, 2) @ a).reshape(pairs, DIM))
    return torch.stack(out)


def errors(p: Projection, uv: torch.Tensor) -> torch.Tensor:
    u, v = uv
    pu, pv = p.apply(u), p.apply(v)
    exact = (u * v).sum(1)
    return ((pu * pv).sum(1) - exact).abs() / (u.norm(dim=1) * v.norm(dim=1))


def bound(k: int, pairs: int) -> Any:
    """The bound's epsilon, or None where it gives none below 1."""
    try:
        return jl_epsilon(k, DELTA, pairs)
    except ValueError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[64, 256, 1024, 2304])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dense_uv = vectors(args.pairs, 0)
    token_uv = token_gradients(args.pairs, 1)
    rows: List[Dict[str, Any]] = []
    for k in args.ks:
        side = int(round(k**0.5))
        kinds = {
            "gaussian": (dense_spec(DIM, k, "gaussian", 3, "float64"), dense_uv),
            "rademacher": (dense_spec(DIM, k, "rademacher", 4, "float64"), dense_uv),
            "kronecker": (
                kronecker_spec((SIDE, SIDE), (side, side), "gaussian", 5, "float64"),
                token_uv,
            ),
        }
        for kind, (spec, uv) in kinds.items():
            e = errors(Projection(spec), uv)
            row = {
                "k": spec.k,
                "kind": kind,
                "max_error": float(e.max()),
                "p99_error": float(e.quantile(0.99)),
                "median_error": float(e.median()),
                "bound_epsilon": bound(spec.k, args.pairs)
                if kind != "kronecker"
                else None,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = [
        {
            "epsilon": eps,
            "pairs": pairs,
            "k": jl_dimension(eps, DELTA, pairs),
        }
        for eps in (0.05, 0.1, 0.2, 0.3)
        for pairs in (1, 10**6, 10**10)
    ]
    record = {
        "dim": DIM,
        "pairs": args.pairs,
        "delta": DELTA,
        "measured": rows,
        "dimension_table": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
