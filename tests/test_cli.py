"""The `pydvl-datainf` command line, on a tiny Llama saved to a folder and a
LoRA adapter trained by SFTTrainer: one command gives the table the training
script gets, the store records the run, and queries and replays check it."""

import configparser
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import pydvl_datainf
import tiny_hf
from pydvl_datainf import cli, top_k
from pydvl_datainf.persistence import stored_metadata
from pydvl_datainf.trainer import fit_from_trainer
from reference import rel_err

pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A base model folder, a trained adapter, JSONL data, and the training
    script's own tables (fit_from_trainer)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d = tmp_path_factory.mktemp("cli")
    tok = tiny_hf.tokenizer()
    model = tiny_hf.llama(tok)
    model.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    rows = tiny_hf.rows()
    tiny_hf.write_jsonl(d / "train.jsonl", rows)
    tiny_hf.write_jsonl(d / "test.jsonl", rows[:2])
    trainer = tiny_hf.sft_trainer(d / "out", model, tok, rows)  # bf16 autocast
    trainer.save_model(str(d / "adapter"))
    result = fit_from_trainer(trainer)
    assert result is not None
    return {
        "dir": d,
        "self": result.self_influence(),
        "top": result.top_k(k=2),  # the eval set: the first two rows
        "mean": result.mean_test_influence(ascending=True),
    }


def run(args, cwd):
    """`pydvl-datainf ARGS` in this process: (exit code, stdout, stderr)."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        os.chdir(old)
    return code


FIT = [
    "--model",
    "base",
    "--adapter",
    "adapter",
    "--data",
    "train.jsonl",
    "--no-progress",
]


@pytest.fixture(scope="module")
def store(work):
    """One command, in a subprocess: fit into a store and rank by self-influence."""
    d = work["dir"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    src = str(Path(pydvl_datainf.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "pydvl_datainf.cli", "self-influence", *FIT]
    command += ["--store", "grads.zarr", "--output", "self.csv"]
    done = subprocess.run(
        command, cwd=d, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank" in done.stdout and "reverse: red blue =>" in done.stdout
    return d / "grads.zarr"


def scores(frame):
    return torch.tensor(frame["score"].to_numpy())


def test_one_command_gives_the_training_scripts_table(work, store):
    table = pd.read_csv(work["dir"] / "self.csv")
    script = work["self"]
    assert table["row"].tolist() == script["row"].tolist()
    assert rel_err(scores(table), scores(script)) < 1e-5
    assert table["prompt"].tolist() == script["prompt"].tolist()
    # SFTTrainer ends its completions with the EOS token; the file has none
    assert (table["completion"] + "[SEP]").tolist() == script["completion"].tolist()


def test_the_store_records_the_run(work, store):
    recorded = stored_metadata(store)[cli.CLI_KEY]
    d = work["dir"]
    assert recorded["adapter"] == str(d / "adapter") and recorded["data"] == str(
        d / "train.jsonl"
    )
    assert recorded["prompt_column"] == "prompt" and len(recorded["data_sha256"]) == 64
    assert cli.command_line(cli.recorded_options(str(store)), "x.zarr") == shlex.join(
        ["pydvl-datainf", "fit", "--model", str(d / "base"), "--adapter",
         str(d / "adapter"), "--data", str(d / "train.jsonl"), "--store", "x.zarr"]
    )  # fmt: skip


def test_queries_on_the_store(work, store, capsys):
    d = work["dir"]
    args = ["--store", "grads.zarr", "--test", "test.jsonl", "--no-progress"]
    assert run(["top-k", *args, "-k", "2", "--output", "top.jsonl"], d) == 0
    top = pd.read_json(d / "top.jsonl", lines=True)
    assert top["train_row"].tolist() == work["top"]["train_row"].tolist()
    assert rel_err(scores(top), scores(work["top"])) < 1e-5
    assert top["test_prompt"].tolist() == work["top"]["test_prompt"].tolist()

    assert run(["mean-influence", *args, "--harmful", "--output", "mean.csv"], d) == 0
    mean = pd.read_csv(d / "mean.csv")
    assert mean["row"].tolist() == work["mean"]["row"].tolist()
    assert rel_err(scores(mean), scores(work["mean"])) < 1e-5

    assert run(["matrix", *args, "--output", "m.zarr"], d) == 0
    stored = top_k(str(d / "m.zarr"), 2, progress=False)  # read back, checked
    assert stored.indices.reshape(-1).tolist() == top["train_row"].tolist()
    assert rel_err(stored.values.reshape(-1), scores(top)) < 1e-5

    assert (
        run(["self-influence", "--store", "grads.zarr", "--output", "s.parquet"], d)
        == 0
    )
    pd.testing.assert_frame_equal(
        pd.read_parquet(d / "s.parquet"), pd.read_csv(d / "self.csv")
    )

    capsys.readouterr()
    assert run(["info", "--store", "grads.zarr"], d) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["options"]["data"] == str(d / "train.jsonl")
    assert info["command"].startswith("pydvl-datainf fit ")


def test_replay_and_the_recorded_command_refit_the_same(work, store):
    d = work["dir"]
    assert (
        run(
            ["replay", "--store", "grads.zarr", "--to", "again.zarr", "--no-progress"],
            d,
        )
        == 0
    )
    info = cli.command_line(cli.recorded_options(str(store)), "third.zarr")
    assert run([*shlex.split(info)[1:], "--no-progress"], d) == 0
    first = cli.reopen(str(store), progress=False).self_influence()
    for other in ("again.zarr", "third.zarr"):
        again = cli.reopen(str(d / other), progress=False).self_influence()
        pd.testing.assert_frame_equal(again, first)


def test_other_data_formats(work, store):
    d = work["dir"]
    pd.DataFrame(tiny_hf.rows()).to_csv(d / "train.csv", index=False)
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(tiny_hf.rows())}).save_to_disk(
        str(d / "saved")
    )
    expected = pd.read_csv(d / "self.csv")
    for data in ("train.csv", "saved"):
        out = f"self-{data}.csv"
        args = ["self-influence", *FIT, "--output", out, "--show", "0"]
        args[args.index("train.jsonl")] = data
        assert run(args, d) == 0
        assert pd.read_csv(d / out)["score"].tolist() == expected["score"].tolist()


def test_changed_data_are_refused(work, store, capsys):
    d = work["dir"]
    tiny_hf.write_jsonl(d / "moving.jsonl", tiny_hf.rows())
    fit = ["fit", *FIT, "--store", "moving.zarr"]
    fit[fit.index("train.jsonl")] = "moving.jsonl"
    assert run(fit, d) == 0
    changed = tiny_hf.rows()
    changed[3]["completion"] = " something else"
    tiny_hf.write_jsonl(d / "moving.jsonl", changed)
    capsys.readouterr()
    assert run(["self-influence", "--store", "moving.zarr", "--no-progress"], d) == 1
    assert "Training row 3 differs" in capsys.readouterr().err
    assert run(["replay", "--store", "moving.zarr", "--to", "x.zarr"], d) == 1
    assert "changed since the fit" in capsys.readouterr().err


def test_usage_errors(work, capsys):
    d = work["dir"]
    assert run(["self-influence", "--no-progress"], d) == 2
    assert "Give --store" in capsys.readouterr().err
    assert run(["fit", *FIT], d) == 2  # fit needs a store
    bad = ["self-influence", *FIT]
    bad[bad.index("train.jsonl")] = "train.txt"
    (d / "train.txt").write_text("x")
    assert run(bad, d) == 1
    assert "Unknown data format '.txt'" in capsys.readouterr().err
    assert run(["self-influence", "--store", "nowhere.zarr"], d) == 1


def test_console_script_entry_point():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    scripts = config["options.entry_points"]["console_scripts"].strip().splitlines()
    assert "pydvl-datainf = pydvl_datainf.cli:main" in [s.strip() for s in scripts]
    assert callable(cli.main)


def test_a_classifier(tmp_path):
    """`--task sequence-classification` on a CSV of texts and labels, with a
    LoRA adapter: the scores of a fit on packed inputs made here, without the
    command line."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import BertConfig, BertForSequenceClassification

    from pydvl_datainf import DataInfInfluence, self_influence
    from pydvl_datainf.hf import SequenceClassifierWrapper, pack_inputs

    tok = tiny_hf.tokenizer()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=8, num_hidden_layers=1,
        num_attention_heads=1, intermediate_size=16, num_labels=2,
    )  # fmt: skip
    base = BertForSequenceClassification(config)
    base.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    lora = LoraConfig(
        task_type="SEQ_CLS", r=2, target_modules=["query", "value"],
        init_lora_weights=False,  # random B: gradients without training
    )  # fmt: skip
    model = get_peft_model(base, lora)
    model.save_pretrained(tmp_path / "adapter")
    texts = ["good film", "bad plot", "very good", "very bad film", "good plot"]
    labels = [1, 0, 1, 0, 1]
    frame = pd.DataFrame({"text": texts, "label": labels})
    frame.to_csv(tmp_path / "clf.csv", index=False)
    args = ["self-influence", "--model", "clf", "--adapter", "adapter", "--task",
            "sequence-classification", "--text-column", "text", "--data", "clf.csv",
            "--output", "clf.jsonl", "--show", "0", "--no-progress"]  # fmt: skip
    assert run(args, tmp_path) == 0
    table = pd.read_json(tmp_path / "clf.jsonl", lines=True)
    assert sorted(table["text"]) == sorted(texts)

    enc = tok(texts, padding=True, return_tensors="pt")
    x = pack_inputs(enc["input_ids"], enc["attention_mask"])
    data = DataLoader(TensorDataset(x, torch.tensor(labels)), batch_size=2)
    infl = DataInfInfluence(
        SequenceClassifierWrapper(model), torch.nn.functional.cross_entropy,
        progress=False,
    ).fit(data)  # fmt: skip
    ref = self_influence(infl, progress=False)
    got = torch.tensor(table.sort_values("row")["score"].to_numpy())
    assert rel_err(got, ref) < 1e-4
