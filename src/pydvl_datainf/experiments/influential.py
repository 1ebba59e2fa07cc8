r"""The paper's influential-data protocol, with contrasts on the same adapter.

The DataInf paper (Kwon et al., ICLR 2024, Section 4.3) fine-tunes LoRA on a
generative task made of ten classes and asks, for every test prompt, whether
its most helpful training examples come from its own class.
[run_paper_protocol][pydvl_datainf.experiments.influential.run_paper_protocol]
does so as the paper's code does:

1. the data of [paper_task][pydvl_datainf.experiments.generative_tasks.paper_task]
   (or the paper's own files, from
   [load_paper_files][pydvl_datainf.experiments.generative_tasks.load_paper_files]):
   90 training and 10 test examples per class;
2. LoRA fine-tuning by [PAPER_FINETUNING][pydvl_datainf.experiments.llm.PAPER_FINETUNING]
   (about 10 updates on the whole text);
3. per-sample gradients in one or more *scopes*
   ([GRADIENT_SCOPES][pydvl_datainf.experiments.llm.GRADIENT_SCOPES]), each
   pass shared by all the methods of
   [influence_scores][pydvl_datainf.experiments.llm.influence_scores]. The
   paper's influence gradients cover the beginning-of-sequence token and the
   prompt (`"prompt"`; `"prompt_padded"` also scores the end-of-sequence
   padding up to the split's longest prompt, as the paper's code does). The
   contrasts on the same adapter: the answer's tokens only (`"answer"`) and
   the whole text (`"text"`);
4. per test prompt, the AUC of its scores for "same class" and the recall of
   its class among its top $k$ training examples ($k$ = 90, the size of a
   class), with their mean and standard deviation over the test prompts
   ([class_metrics][pydvl_datainf.experiments.llm.class_metrics]).

Scores follow pyDVL's sign (positive = helpful, ranked largest first); the
paper's $\mathcal{I}_{\mathrm{DataInf}}$ is the negative, so the paper ranks
its most negative first: the same ranking.

Example:
    ```python
    from transformers import LlamaConfig, LlamaForCausalLM
    from pydvl_datainf.experiments.finetune import load_tokenizer
    from pydvl_datainf.experiments.influential import run_paper_protocol
    from pydvl_datainf.experiments.llm import FineTuning

    # SmolLM2 by default (load_smollm2); here a tiny random Llama, and MiniLM's
    # tokenizer with [CLS] and [SEP] as its BOS and EOS tokens
    tokenizer = load_tokenizer()
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
    tiny_llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
    ))
    result = run_paper_protocol(
        "math with reasoning", n_train=4, n_test=1, classes=3,
        recipe=FineTuning(updates=2, batch_size=8),
        scopes={"prompt": ["datainf", "exact"], "answer": ["datainf"]},
        base=(tiny_llama, tokenizer), progress=False,
    )
    prompt = result["scopes"]["prompt"]["methods"]["datainf"]
    print(prompt["auc"], prompt["auc_std"], prompt["recall"])
    ```
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from torch import nn

from .generative_tasks import GenerativeTask, paper_task
from .llm import (
    METHODS,
    PAPER_FINETUNING,
    FineTuning,
    class_metrics,
    encode_scope,
    evaluate_causal_lm,
    finetune_lora,
    influence_scores,
    load_smollm2,
    trainable_parameters,
    unload_lora,
)

__all__ = ["PAPER_SCOPES", "run_paper_protocol"]

logger = logging.getLogger(__name__)

PAPER_SCOPES: Dict[str, Tuple[str, ...]] = {
    "prompt": METHODS,
    "prompt_padded": ("datainf", "exact", "hessian_free", "cosine"),
    "answer": METHODS,
    "text": METHODS,
}
"""The scopes of the gradients and the methods run in each, by default."""


def _quality(
    model: nn.Module, tokenizer: Any, test: GenerativeTask, max_length: int
) -> Dict[str, Any]:
    """The test loss on the answer's tokens and the exact match, overall and per class."""
    q = evaluate_causal_lm(
        model, *encode_scope(tokenizer, test, "answer", max_length=max_length)
    )
    return {
        "test_loss": float(q["loss"].mean()),
        "test_exact": float(q["exact"].mean()),
        "per_class": [
            {
                "class": int(k),
                "test_loss": float(q["loss"][test.classes == k].mean()),
                "test_exact": float(q["exact"][test.classes == k].mean()),
            }
            for k in range(len(test.class_names))
        ],
    }


def run_paper_protocol(
    task: str,
    seed: int = 0,
    n_train: int = 90,
    n_test: int = 10,
    classes: Optional[int] = None,
    recipe: FineTuning = PAPER_FINETUNING,
    scopes: Mapping[str, Sequence[str]] = PAPER_SCOPES,
    lissa_iterations: int = 100,
    max_length: int = 256,
    data: Optional[Tuple[GenerativeTask, GenerativeTask]] = None,
    base: Optional[Tuple[nn.Module, Any]] = None,
    progress: bool = True,
    on_scope: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> Dict[str, Any]:
    """Fine-tune LoRA on a task as the paper does, then score in every scope.

    Args:
        task: one of [PAPER_TASKS][pydvl_datainf.experiments.generative_tasks.PAPER_TASKS].
        seed: seed of the data (the recipe has its own seed).
        n_train: training examples per class.
        n_test: test examples per class.
        classes: use the first `classes` classes only (default: all ten).
        recipe: the fine-tuning (default: the paper's).
        scopes: `{scope: methods}`: the gradients' scopes (see
            [GRADIENT_SCOPES][pydvl_datainf.experiments.llm.GRADIENT_SCOPES])
            and the methods of [influence_scores][pydvl_datainf.experiments.llm.influence_scores]
            run on each.
        lissa_iterations: LiSSA's number of steps.
        max_length: the longest text allowed, in tokens.
        data: `(train, test)` to use instead of generating them, e.g. from
            [load_paper_files][pydvl_datainf.experiments.generative_tasks.load_paper_files]
            (then `seed`, `n_train`, `n_test` and `classes` are ignored).
        base: `(model, tokenizer)` from [load_smollm2][pydvl_datainf.experiments.llm.load_smollm2]
            to reuse (the adapters are removed again at the end); loaded if
            omitted.
        progress: show progress bars.
        on_scope: called after every scope with the result so far (the
            scopes done), e.g. to save partial results of a long run.

    Returns:
        A JSON-friendly dict: `task`, `config`, `recipe`, `class_names`,
        `finetune` (the loss of every update), `quality` (the test loss on
        the answer's tokens and the exact match under greedy decoding),
        `scopes` (per scope: the metrics of every method, with `per_class`,
        LiSSA's `lissa_error` after every step when LiSSA and the exact
        inverse run, the longest row in tokens and the seconds of each
        step) and `seconds`.
    """
    seconds: Dict[str, float] = OrderedDict()
    t = time.perf_counter()
    train, test = (
        data if data is not None else paper_task(task, seed, n_train, n_test, classes)
    )
    if base is None:
        base = load_smollm2()
    seconds["load"] = time.perf_counter() - t
    tokenizer = base[1]
    t = time.perf_counter()
    lm, losses = finetune_lora(
        base, train, recipe, max_length=max_length, progress=progress
    )
    seconds["fine-tuning"] = time.perf_counter() - t
    results: Dict[str, Any] = OrderedDict()
    out: Dict[str, Any] = {
        "task": task,
        "config": {
            "n_train_per_class": int(np.bincount(train.classes).min()),
            "n_test_per_class": int(np.bincount(test.classes).min()),
            "classes": len(train.class_names),
            "seed": seed,
            "data": "generated" if data is None else "given",
            "lissa_iterations": lissa_iterations,
            "trainable_parameters": trainable_parameters(lm),
        },
        "recipe": recipe.as_dict(),
        "class_names": list(train.class_names),
        "finetune": {"losses": losses},
        "scopes": results,
        "seconds": seconds,
    }
    try:
        t = time.perf_counter()
        out["quality"] = _quality(lm, tokenizer, test, max_length)
        seconds["evaluation"] = time.perf_counter() - t
        for scope, methods in scopes.items():
            x, y = encode_scope(tokenizer, train, scope, max_length=max_length)
            xt, yt = encode_scope(tokenizer, test, scope, max_length=max_length)
            diagnostics: Dict[str, Any] = {}
            scores, step_seconds = influence_scores(
                lm,
                x,
                y,
                xt,
                yt,
                methods=methods,
                lissa_iterations=lissa_iterations,
                seed=recipe.seed,
                progress=progress,
                diagnostics=diagnostics,
            )
            results[scope] = {
                "methods": {
                    m: class_metrics(s, test.classes, train.classes)
                    for m, s in scores.items()
                },
                "max_tokens": int(x.shape[-1]),
                "seconds": dict(step_seconds),
                **diagnostics,
            }
            logger.info(
                "%s, %s: DataInf AUC %.3f",
                task,
                scope,
                results[scope]["methods"].get("datainf", {}).get("auc", np.nan),
            )
            if on_scope is not None:
                on_scope(out)
    finally:
        unload_lora(lm)
    return out
