"""The paper-design tasks, the loader of the paper's own files, token scopes and
the paper-style fine-tuning (on a tiny Llama; SmolLM2 in test_llm_tasks.py)."""

import json
import re

import numpy as np
import pytest
import torch

from pydvl_datainf.experiments.generative_tasks import (
    PAPER_MATH_TEMPLATES,
    PAPER_TASKS,
    TRANSFORMATIONS,
    GenerativeTask,
    load_paper_files,
    paper_math_problems,
    paper_sentence_transformations,
    paper_task,
    pseudo_word,
)

POOL = [f"w{i} x{i} y{i} z{i}" for i in range(30)]


def _header_and_sentence(prompt):
    m = re.fullmatch(
        r"(\w+) is an assistant that rewrites sentences by one rule: (.*)\.\n"
        r"Sentence: (.*)\nRewritten:",
        prompt,
    )
    assert m is not None, prompt
    return m.group(1), m.group(2), m.group(3)


def test_sentence_pool_is_shared_and_split_the_paper_way():
    train, test = paper_sentence_transformations(
        seed=1, n_train=6, n_test=2, sentences=POOL
    )
    assert len(train) == 60 and len(test) == 20
    assert np.bincount(train.classes).tolist() == [6] * 10
    per_class_train = {k: [] for k in range(10)}
    headers = {}
    for split, rows in ((train, per_class_train), (test, {k: [] for k in range(10)})):
        for p, t, k in zip(split.prompts, split.targets, split.classes):
            name, title, sentence = _header_and_sentence(p)
            instruction, fn = TRANSFORMATIONS[split.class_names[k]]
            assert title == instruction and t == " " + fn(sentence)
            # one header per class, the same in training and test
            assert headers.setdefault(int(k), name) == name
            rows[int(k)].append(sentence)
        if split is test:
            test_sentences = rows
    # every class has the same training sentences, in the same order, and
    # the same test sentences, none of which is a training sentence
    assert all(v == per_class_train[0] for v in per_class_train.values())
    assert all(v == test_sentences[0] for v in test_sentences.values())
    assert not set(test_sentences[0]) & set(per_class_train[0])
    assert len(set(headers.values())) == 10
    again = paper_sentence_transformations(seed=1, n_train=6, n_test=2, sentences=POOL)
    assert again[0].prompts == train.prompts
    other = paper_sentence_transformations(seed=2, n_train=6, n_test=2, sentences=POOL)
    assert other[0].prompts != train.prompts


@pytest.mark.parametrize("reasoning", [False, True])
def test_math_answers_and_reasons_are_right(reasoning):
    train, test = paper_math_problems(reasoning, seed=3, n_train=8, n_test=2)
    assert len(train) == 80 and len(test) == 20
    assert train.class_names == list(PAPER_MATH_TEMPLATES)
    for split in (train, test):
        for p, t, k in zip(split.prompts, split.targets, split.classes):
            assert p.startswith("Solve this math problem.\n") and p.endswith("\n")
            numbers = [int(v) for v in re.findall(r"\d+", p)]
            assert numbers and all(1 <= v <= 99 for v in numbers)
            if reasoning:
                m = re.fullmatch(
                    r"Reason: ([^=]+) = ([^=]+) = (\d+)\.\nAnswer: (\d+)", t
                )
                assert m is not None, t
                _, reason, _ = PAPER_MATH_TEMPLATES[split.class_names[k]]
                assert m.group(1) == reason.split(" = ")[0]  # names the quantity
                computed = eval(m.group(2))  # noqa: S307
                assert computed == int(m.group(3)) == int(m.group(4))
            else:
                assert re.fullmatch(r"Answer: \d+", t)
    # the same problems with and without reasoning
    plain, _ = paper_math_problems(not reasoning, seed=3, n_train=8, n_test=2)
    assert plain.prompts == train.prompts


def test_math_answer_of_one_template():
    train, _ = paper_math_problems(
        False, seed=0, n_train=20, n_test=1, classes=["water tank"]
    )
    for p, t in zip(train.prompts, train.targets):
        hi, lo = (int(v) for v in re.findall(r"\d+", p))
        assert hi >= lo and t == f"Answer: {hi - lo}"


def test_paper_task_sizes_and_errors():
    for name in PAPER_TASKS[1:]:
        train, test = paper_task(name, classes=3, n_train=5, n_test=2)
        assert (len(train), len(test), len(train.class_names)) == (15, 6, 3)
    with pytest.raises(ValueError, match="Unknown task"):
        paper_task("nope")
    with pytest.raises(ValueError, match="classes must be in"):
        paper_task("math with reasoning", classes=11)
    with pytest.raises(ValueError, match="positive"):
        paper_task("math with reasoning", n_test=0)
    with pytest.raises(ValueError, match="Need 12 sentences"):
        paper_sentence_transformations(n_train=10, n_test=2, sentences=POOL[:5])


def test_pseudo_words():
    rng = np.random.default_rng(0)
    words = [pseudo_word(rng) for _ in range(200)]
    assert all(re.fullmatch(r"[A-Z][a-z]{3,8}", w) for w in words)
    assert len(set(words)) > 150


def _paper_rows(task):
    """Rows as the paper's files hold them: prompt, text = prompt + answer + </s>."""
    return [
        {"prompt": p, "text": p + t + "</s>", "variation": task.class_names[k]}
        for p, t, k in zip(task.prompts, task.targets, task.classes)
    ]


def test_load_paper_files_from_json_lines(tmp_path):
    train, test = paper_math_problems(True, n_train=3, n_test=1, classes=2)
    (tmp_path / "datasets").mkdir()
    for split, task in (("train", train), ("test", test)):
        lines = [json.dumps(r) for r in _paper_rows(task)]
        (tmp_path / "datasets" / f"math_with_reason_{split}.jsonl").write_text(
            "\n".join(lines)
        )
    got_train, got_test = load_paper_files(tmp_path, "math with reasoning")
    for got, want in ((got_train, train), (got_test, test)):
        assert got.prompts == want.prompts and got.targets == want.targets
        assert got.classes.tolist() == want.classes.tolist()
        assert got.class_names == want.class_names
    with pytest.raises(FileNotFoundError, match="grammars_train"):
        load_paper_files(tmp_path, "sentence transformations")


def test_load_paper_files_errors(tmp_path):
    rows = [{"prompt": "a -> ", "text": "b</s>", "variation": "x"}]
    (tmp_path / "grammars_train.jsonl").write_text(json.dumps(rows[0]))
    (tmp_path / "grammars_test.jsonl").write_text(json.dumps(rows[0]))
    with pytest.raises(ValueError, match="does not start with its prompt"):
        load_paper_files(tmp_path, "sentence transformations")
    ok = {"prompt": "a -> ", "text": "a -> b</s>", "variation": "x"}
    new = dict(ok, variation="y")
    (tmp_path / "grammars_train.jsonl").write_text(json.dumps(ok))
    (tmp_path / "grammars_test.jsonl").write_text(json.dumps(new))
    with pytest.raises(ValueError, match="classes the training file does not"):
        load_paper_files(tmp_path, "sentence transformations")


def test_load_paper_files_from_a_datasets_folder(tmp_path):
    """The paper's files are folders written by `datasets` (Arrow streams)."""
    pa = pytest.importorskip("pyarrow")
    train, test = paper_sentence_transformations(
        n_train=2, n_test=1, classes=2, sentences=POOL
    )
    for split, task in (("train", train), ("test", test)):
        folder = tmp_path / f"grammars_{split}.hf"
        folder.mkdir()
        table = pa.Table.from_pylist(_paper_rows(task))
        with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
    got_train, got_test = load_paper_files(tmp_path, "sentence transformations")
    assert got_train.prompts == train.prompts and got_test.targets == test.targets


# ------------------------------------------------------------- token scopes


@pytest.fixture(scope="module")
def tokenizer():
    from pydvl_datainf.experiments.finetune import load_tokenizer

    tok = load_tokenizer()
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    return tok


def _ids(tokenizer, s):
    return tokenizer(s, add_special_tokens=False)["input_ids"]


def test_scopes_score_the_right_tokens(tokenizer):
    from pydvl_datainf.experiments.llm import encode_scope
    from pydvl_datainf.hf import unpack_inputs

    task = GenerativeTask(
        "t", ["one two three", "four"], [" five", " six seven"], [0, 1], ["a", "b"]
    )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    p = [_ids(tokenizer, s) for s in task.prompts]
    a = [_ids(tokenizer, s) for s in task.targets]
    for scope in ("prompt", "prompt_padded", "answer", "text"):
        x, y = encode_scope(tokenizer, task, scope)
        ids, mask = unpack_inputs(x)
        for i in range(2):
            real = ids[i][mask[i] == 1].tolist()
            scored = y[i][y[i] != -100].tolist()
            whole = [bos] + p[i] + a[i] + [eos]
            if scope == "prompt":
                assert real == scored == [bos] + p[i]
            elif scope == "prompt_padded":
                width = 1 + max(len(q) for q in p)
                assert real == [bos] + p[i]
                assert ids[i].tolist() == scored == real + [eos] * (width - len(real))
            elif scope == "answer":
                assert real == whole and scored == a[i] + [eos]
            else:
                assert real == scored == whole
    x, y = encode_scope(tokenizer, task, "text", bos=False)
    assert unpack_inputs(x)[0][0, 0].item() == p[0][0]
    with pytest.raises(ValueError, match="scope must be one of"):
        encode_scope(tokenizer, task, "nope")
    with pytest.raises(ValueError, match="max_length"):
        encode_scope(tokenizer, task, "text", max_length=3)


def test_padded_prompt_loss_counts_the_padding(tokenizer):
    """The paper's labels = input ids: the mean runs over the padding too."""
    from pydvl_datainf.experiments.llm import encode_scope
    from pydvl_datainf.hf import causal_lm_loss

    task = GenerativeTask(
        "t", ["one two three", "four"], [" x", " y"], [0, 1], ["a", "b"]
    )
    x, y = encode_scope(tokenizer, task, "prompt_padded")
    logits = torch.randn(2, x.shape[-1], tokenizer.vocab_size, dtype=torch.float64)
    row = 1
    ce = torch.nn.functional.cross_entropy(
        logits[row, :-1], x[row, 0, 1:], reduction="none"
    )
    want = ce.mean()  # every position after the first, padding included
    got = causal_lm_loss(logits[row : row + 1], y[row : row + 1])
    assert torch.isclose(got, want, rtol=1e-12)


# ------------------------------------------------------ paper-style fine-tuning


def _tiny_llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).eval()


def test_finetuning_recipe_batches():
    from pydvl_datainf.experiments.llm import PAPER_FINETUNING, FineTuning

    assert (PAPER_FINETUNING.updates, PAPER_FINETUNING.batch_size) == (10, 64)
    assert (PAPER_FINETUNING.rank, PAPER_FINETUNING.alpha) == (8, 32.0)
    assert PAPER_FINETUNING.dropout == 0.05 and PAPER_FINETUNING.lr == 3e-4
    batches = FineTuning(updates=5, batch_size=4).batches(9)
    flat = torch.cat(batches).tolist()
    # successive random orders: every row once in each pass over the data
    assert sorted(flat[:9]) == list(range(9)) and len(flat) == 20
    assert [
        len(b) for b in FineTuning(updates=None, epochs=2, batch_size=4).batches(9)
    ] == [
        4,
        4,
        1,
        4,
        4,
        1,
    ]


def test_finetune_lora_updates_and_unloads(tokenizer):
    pytest.importorskip("peft")
    from pydvl_datainf.experiments.llm import (
        FineTuning,
        encode_scope,
        evaluate_causal_lm,
        finetune_lora,
        unload_lora,
    )

    model = _tiny_llama(tokenizer.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, _ = paper_math_problems(False, n_train=4, n_test=1, classes=2)
    recipe = FineTuning(updates=6, batch_size=8, lr=1e-2, dropout=0.0)
    lm, losses = finetune_lora(
        (model, tokenizer), train, recipe, micro_batch=3, progress=False
    )
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert not lm.training
    # the recorded loss of an update is the loss over the batch's tokens
    x, y = encode_scope(tokenizer, train, "text")
    assert all(np.isfinite(losses))
    after = evaluate_causal_lm(lm, x, y)["loss"]
    assert after.mean() < losses[0]
    base = unload_lora(lm)
    assert base is model and not any("lora" in k for k in base.state_dict())
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])


def test_micro_batches_do_not_change_the_update(tokenizer):
    pytest.importorskip("peft")
    from pydvl_datainf.experiments.llm import FineTuning, finetune_lora, unload_lora

    train, _ = paper_math_problems(True, n_train=3, n_test=1, classes=2)
    recipe = FineTuning(updates=2, batch_size=6, lr=1e-2, dropout=0.0)
    weights = []
    for micro in (6, 2):
        model = _tiny_llama(tokenizer.vocab_size).double()
        lm, _ = finetune_lora(
            (model, tokenizer), train, recipe, micro_batch=micro, progress=False
        )
        weights.append(
            torch.cat(
                [p.detach().flatten() for p in lm.parameters() if p.requires_grad]
            )
        )
        unload_lora(lm)
    scale = weights[0].abs().max()
    assert torch.allclose(weights[0], weights[1], rtol=0, atol=1e-9 * scale)


def test_run_paper_protocol_reports_every_scope(tokenizer):
    pytest.importorskip("peft")
    from pydvl_datainf.experiments.influential import run_paper_protocol
    from pydvl_datainf.experiments.llm import FineTuning

    model = _tiny_llama(tokenizer.vocab_size)
    done = []
    result = run_paper_protocol(
        "math without reasoning",
        n_train=3,
        n_test=1,
        classes=2,
        recipe=FineTuning(updates=2, batch_size=4, lr=1e-2),
        scopes={"prompt": ["datainf", "exact", "lissa"], "text": ["hessian_free"]},
        lissa_iterations=5,
        base=(model, tokenizer),
        progress=False,
        on_scope=lambda r: done.append(list(r["scopes"])),
    )
    assert done == [["prompt"], ["prompt", "text"]]
    prompt = result["scopes"]["prompt"]
    assert set(prompt["methods"]) == {"datainf", "exact", "lissa"}
    assert (
        len(prompt["lissa_error"]) == 5
        and "lissa_error" not in result["scopes"]["text"]
    )
    for v in prompt["methods"].values():
        assert 0 <= v["auc"] <= 1 and v["auc_std"] >= 0 and len(v["per_class"]) == 2
    assert (
        result["config"]["n_train_per_class"] == 3
        and len(result["finetune"]["losses"]) == 2
    )
    assert not any("lora" in k for k in model.state_dict())  # the adapters are gone


def test_influence_scores_do_not_depend_on_the_batch_size(tokenizer):
    """The test gradients are computed in batches of `batch_size` rows."""
    pytest.importorskip("peft")
    from pydvl_datainf.experiments.llm import (
        FineTuning,
        encode_scope,
        finetune_lora,
        influence_scores,
        unload_lora,
    )

    model = _tiny_llama(tokenizer.vocab_size).double()
    train, test = paper_math_problems(True, n_train=3, n_test=3, classes=2)
    recipe = FineTuning(updates=2, batch_size=6, lr=1e-2, dropout=0.0)
    lm, _ = finetune_lora((model, tokenizer), train, recipe, progress=False)
    x, y = encode_scope(tokenizer, train, "answer")
    xt, yt = encode_scope(tokenizer, test, "answer")
    methods = ["datainf", "exact", "hessian_free"]
    scores = [
        influence_scores(lm, x, y, xt, yt, methods, batch_size=b, progress=False)[0]
        for b in (16, 4)  # the 6 test rows in one batch, then in two
    ]
    unload_lora(lm)
    for m in methods:
        a, b = scores[0][m], scores[1][m]
        assert a.shape == (6, 6)
        assert np.allclose(a, b, rtol=0, atol=1e-8 * np.abs(a).max()), m
