"""A cost model for DataInf with compressed gradients on Llama-3-8B with LoRA.

The job: Llama-3-8B, LoRA rank 8 on the query and value projections of all 32
layers, 100,000 training sequences of 512 tokens, one DataInf block per LoRA
matrix (128 blocks), each projected by a Kronecker product that keeps the rank
side and projects the wide side to `side` dimensions (k_l = 8 x side).

Every figure in the output is labelled:

* **architecture**: counted from the model's published configuration;
* **published**: a vendor's or a paper's figure, with its source;
* **measured**: read from a results file of this repository (CPU runs of
  `bench_projection.py`, `bench_index.py`);
* **computed**: a ratio of measured figures;
* **estimated**: computed here from the above; the formula is in the code.
  `fit` on 8 GPUs assumes linear scaling (each GPU computes the per-sample
  gradients of its own rows; only the norms and lambda are combined), and a
  test gradient is costed at the same utilisation as `fit` (test sequences
  in batches).

The check against measurements: the same FLOP formulas are applied to the CPU
model of `bench_projection.py`, and the ratio of the projection's cost to the
plain forward+backward predicted from FLOPs is compared with the ratio
measured there; their quotient (the projection's relative inefficiency, as
small GEMMs run below a large one's rate) scales the GPU estimate.

Usage:
    python benchmarks/cost_llm.py --out benchmarks/results/index/llm-cost.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Tuple

RESULTS = Path(__file__).resolve().parent / "results"
PROJECTION = "index/projection-lora.json"
INDEX = "index/index-1m.json"

# --- architecture: Meta-Llama-3-8B config.json (Meta, 2024) ------------------
LLAMA3_8B = {
    "parameters": 8.03e9,
    "layers": 32,
    "hidden": 4096,
    "q_out": 4096,  # 32 heads x 128
    "v_out": 1024,  # 8 key-value heads x 128 (grouped-query attention)
}
RANK = 8
N_TRAIN = 100_000
TOKENS = 512

# --- published figures ---------------------------------------------------------
PUBLISHED = {
    "h100_bf16_dense_tflops": {
        "value": 989.4,
        "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM5, BF16 Tensor Core, dense)",
    },
    "h100_hbm_tb_s": {
        "value": 3.35,
        "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM5, HBM3 bandwidth)",
    },
    "llama3_training_mfu": {
        "value": 0.40,
        "source": "The Llama 3 Herd of Models (Dubey et al., 2024), Table 4: 38-43% "
        "BF16 model FLOPs utilisation on H100 GPUs",
    },
    "nvme_read_gb_s": {
        "value": 3.0,
        "source": "a typical NVMe SSD's sequential read (an assumption, not a "
        "measurement: data-centre drives read 3 to 7 GB/s)",
    },
}


def lora_shapes() -> List[Tuple[int, int]]:
    """(d_out, d_in) of the LoRA matrices of one layer: A and B of q and v."""
    h, r = LLAMA3_8B["hidden"], RANK
    return [(r, h), (LLAMA3_8B["q_out"], r), (r, h), (LLAMA3_8B["v_out"], r)]


def trainable() -> int:
    return int(LLAMA3_8B["layers"] * sum(a * b for a, b in lora_shapes()))


def sides(d_out: int, d_in: int, side: int) -> Tuple[int, int]:
    """(k_out, k_in): the rank side kept, the wide side projected to `side`."""
    return (d_out if d_out <= RANK else side, d_in if d_in <= RANK else side)


def projected_width(side: int) -> int:
    """Numbers per sample: k_out k_in per block (8 x side)."""
    per_layer = sum(math.prod(sides(a, b, side)) for a, b in lora_shapes())
    return int(LLAMA3_8B["layers"] * per_layer)


def floor_flops_per_token() -> float:
    """Forward (2 N) + input gradients (2 N) of the frozen model, plus
    attention scores and values (4 T d per layer forward, x3 with the backward)."""
    n, layers, d = LLAMA3_8B["parameters"], LLAMA3_8B["layers"], LLAMA3_8B["hidden"]
    return 4 * n + 3 * 4 * TOKENS * d * layers


def projection_flops_per_token(side: int, tokens: int = TOKENS) -> float:
    """The per-token projections of the wide sides, the per-sample products
    and the exact norms (the cheaper of the Gram and the dense way), x2 for
    multiply-adds; the formula of bench_projection.projection_flops."""
    total = 0.0
    for d_out, d_in in lora_shapes():
        k_out, k_in = sides(d_out, d_in, side)
        projected = (d_out * k_out if k_out < d_out else 0) + (
            d_in * k_in if k_in < d_in else 0
        )
        norms = min(tokens * (d_out + d_in), d_out * d_in)  # per token
        total += projected + k_out * k_in + norms
    return 2 * total * LLAMA3_8B["layers"]


def load(name: str) -> Any:
    path = RESULTS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the benchmark that writes it")
    return json.loads(path.read_text())


def measured() -> Dict[str, Any]:
    proj = load(PROJECTION)
    index = load(INDEX)
    flat = [
        r
        for r in index["runs"]
        if r["index"] == "flat float32 (exact)"
        and r["dim"] == min(x["dim"] for x in index["runs"])
    ][0]
    predicted = proj["projection_flops"] / proj["floor_flops"]
    observed = proj["cpu_ratio_to_floor"]["projected"] - 1
    return {
        "cpu_projection_overhead": {
            "kind": "measured",
            "value": observed,
            "file": PROJECTION,
            "what": "projected per-sample gradients / plain forward+backward - 1, "
            f"CPU time, {proj['model']}",
        },
        "cpu_projection_overhead_from_flops": {
            "kind": "computed",
            "value": predicted,
            "file": PROJECTION,
            "what": "the same, predicted from the FLOP formulas",
        },
        "projection_inefficiency": {
            "kind": "computed",
            "value": observed / predicted,
            "file": PROJECTION,
            "what": "measured overhead / overhead predicted from FLOPs",
        },
        "cpu_flat_search_s_per_query_row_dim": {
            "kind": "measured",
            "value": flat["batched_per_query_cpu_s"] / (index["n"] * flat["dim"]),
            "file": INDEX,
            "what": f"exact top-{index['k']} over {index['n']:,} x {flat['dim']} "
            "float32 rows, batched, one thread: seconds per query per row and column",
        },
    }


def estimates(side: int, m: Dict[str, Any]) -> Dict[str, Any]:
    tflops = (
        PUBLISHED["h100_bf16_dense_tflops"]["value"]
        * PUBLISHED["llama3_training_mfu"]["value"]
        * 1e12
    )
    tokens = N_TRAIN * TOKENS
    floor = tokens * floor_flops_per_token() / tflops
    overhead = (
        projection_flops_per_token(side)
        / floor_flops_per_token()
        * m["projection_inefficiency"]["value"]
    )
    width = projected_width(side)
    dense_bytes = N_TRAIN * trainable() * 4
    store16 = N_TRAIN * width * 2
    test_grad = floor / N_TRAIN * (1 + overhead)
    scores_gpu = store16 / (PUBLISHED["h100_hbm_tb_s"]["value"] * 1e12)
    scores_cpu = m["cpu_flat_search_s_per_query_row_dim"]["value"] * N_TRAIN * width
    dense_pass = dense_bytes / (PUBLISHED["nvme_read_gb_s"]["value"] * 1e9)
    return {
        "side": side,
        "projected_floats_per_sample": width,
        "compression": trainable() / width,
        "store_float16_gb": store16 / 1e9,
        "fit_floor_1gpu_s": floor,
        "fit_overhead_fraction": overhead,
        "fit_1gpu_s": floor * (1 + overhead),
        "fit_8gpu_s": floor * (1 + overhead) / 8,
        "test_gradient_per_sequence_s": test_grad,
        "scores_per_query_batch_gpu_s": scores_gpu,
        "scores_per_query_cpu_s": scores_cpu,
        "dense_store_pass_s": dense_pass,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    m = measured()
    record = {
        "job": f"Llama-3-8B, LoRA r={RANK} on q and v, {N_TRAIN:,} sequences of "
        f"{TOKENS} tokens",
        "architecture": {
            **LLAMA3_8B,
            "rank": RANK,
            "blocks": 4 * LLAMA3_8B["layers"],
            "trainable": trainable(),
            "dense_store_float32_gb": N_TRAIN * trainable() * 4 / 1e9,
            "floor_flops_per_token": floor_flops_per_token(),
        },
        "published": PUBLISHED,
        "measured": m,
        "estimated": [estimates(s, m) for s in args.sides],
    }
    text = json.dumps(record, indent=1)
    assert not math.isnan(record["estimated"][0]["fit_1gpu_s"])
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
