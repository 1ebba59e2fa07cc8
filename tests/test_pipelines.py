"""Experiment helpers on the user's own data, model and tokenizer (tiny sizes)."""

import numpy as np
import pytest
import torch

from pydvl_datainf.experiments import baselines as B
from pydvl_datainf.experiments.datasets import TextDataset
from pydvl_datainf.experiments.finetune import load_tokenizer, lora_classifier
from pydvl_datainf.experiments.pipelines import (
    block_regularization,
    compare_methods,
    finetune_task,
    fit_datainf,
    harm,
    mislabel_task,
    point_scores,
)

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "ok", "meh"]


def texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 6)))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A small BERT sequence classifier and MiniLM's tokenizer in a local folder."""
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path


def data(n, labels, seed=0, name="mine"):
    return TextDataset(texts(n, seed), labels, name=name)


def test_own_model_folder_and_string_labels(tiny_model_dir):
    train = data(12, ["pos", "neg"] * 6)
    test = data(4, ["pos", "neg"] * 2, seed=1)
    task = finetune_task(
        train,
        test,
        model=tiny_model_dir,
        rank=2,
        epochs=1,
        max_length=8,
        progress=False,
    )
    shapes = {tuple(p.shape) for p in task.model.parameters() if p.requires_grad}
    assert shapes == {(2, 16), (16, 2)}  # LoRA on the user's 16-wide model, not MiniLM
    assert task.config["model"] == str(tiny_model_dir)
    # no forced flips
    assert not task.flipped.any()
    assert (task.y_train.numpy() == task.train.labels).all()
    # the user's row order comes back
    assert task.user_rows().tolist() == list(range(12))
    assert task.to_user_order(np.asarray(task.train.row_ids)).tolist() == list(
        range(12)
    )
    assert [task.train.texts[i] for i in np.argsort(task.train.row_ids)] == train.texts


def test_own_model_object_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, local_files_only=True
    )
    tok = load_tokenizer(tiny_model_dir)
    task = finetune_task(
        data(8, [0, 1] * 4),
        data(4, [0, 1] * 2, seed=1),
        model=base,
        tokenizer=tok,
        rank=2,
        epochs=1,
        max_length=8,
        progress=False,
    )
    assert sum(p.numel() for p in task.model.parameters() if p.requires_grad) == 2 * (
        2 * 16 + 16 * 2
    )


def test_own_model_errors(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(FileNotFoundError, match="No model folder"):
        lora_classifier(2, base_model=tmp_path / "absent")
    with pytest.raises(ValueError, match=r"target_modules \['q_proj'\] name no layer"):
        lora_classifier(2, base_model=tiny_model_dir, target_modules=["q_proj"])
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, local_files_only=True
    )
    with pytest.raises(ValueError, match="predicts 2 labels but the data has 3"):
        lora_classifier(3, base_model=base)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        lora_classifier(2, base_model=torch.nn.Linear(2, 2))


def test_own_noisy_labels_and_flip_mask(tiny_model_dir):
    train = data(10, ["a", "b"] * 5)
    noisy = ["a", "b"] * 5
    noisy[3] = "a"  # one wrong label, the user knows it
    common = dict(model=tiny_model_dir, rank=2, epochs=1, max_length=8, progress=False)
    test = data(4, ["a", "b"] * 2, seed=1)
    task = finetune_task(train, test, noisy_labels=noisy, **common)
    assert task.to_user_order(task.flipped).tolist() == [int(i == 3) for i in range(10)]
    assert task.to_user_order(task.y_train.numpy())[3] == 0
    assert task.to_user_order(task.train.labels)[3] == 1  # the true label is kept
    # a mask the user gives overrides the comparison, nothing else is flipped
    mask = [0] * 10
    mask[7] = 1
    task = finetune_task(train, test, flipped=mask, **common)
    assert task.to_user_order(task.flipped).tolist() == mask
    assert (task.y_train.numpy() == task.train.labels).all()
    with pytest.raises(ValueError, match="either noisy_labels"):
        finetune_task(train, test, noisy_labels=noisy, flip=0.2, **common)
    with pytest.raises(ValueError, match="not among the class names"):
        finetune_task(train, test, noisy_labels=["c"] * 10, **common)
    with pytest.raises(ValueError, match="10 training texts"):
        finetune_task(train, test, noisy_labels=noisy[:4], **common)
    with pytest.raises(ValueError, match="0/1"):
        finetune_task(train, test, flipped=[2] * 10, **common)
    with pytest.raises(ValueError, match="classes differ"):
        finetune_task(train, data(2, ["x", "y"]), **common)


def test_mislabel_task_takes_a_text_dataset(tiny_model_dir):
    full = data(30, ["pos", "neg", "mid"] * 10)
    tiny3 = dict(rank=2, epochs=1, max_length=8, progress=False)
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=30522,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
    )
    task = mislabel_task(
        full, 18, 6, model=model, tokenizer=tiny_model_dir, seed=1, **tiny3
    )
    assert not task.flipped.any()  # no forced flips on the user's data
    rows = task.train.row_ids
    assert [full.texts[r] for r in rows] == task.train.texts
    assert set(rows).isdisjoint(task.test.row_ids)
    # the user's noisy labels and mask, given per row of the data set
    noisy = full.labels.copy()
    noisy[rows[0]] = (noisy[rows[0]] + 1) % 3
    flipped = (noisy != full.labels).astype(int)
    task = mislabel_task(
        full,
        18,
        6,
        noisy_labels=noisy,
        flipped=flipped,
        model=_fresh3(),
        tokenizer=tiny_model_dir,
        seed=1,
        **tiny3,
    )
    assert task.flipped.sum() == 1
    assert (
        task.to_user_order(task.flipped)[np.searchsorted(task.user_rows(), rows[0])]
        == 1
    )
    with pytest.raises(ValueError, match="noisy_labels has 3 entries for 30 rows"):
        mislabel_task(full, 18, 6, noisy_labels=[0, 1, 2], **tiny3)
    with pytest.raises(ValueError, match="apply to your own TextDataset"):
        mislabel_task("sms", 18, 6, flipped=[0] * 10, **tiny3)
    with pytest.raises(TypeError, match="'sms', 'bbc' or a TextDataset"):
        mislabel_task(["a", "b"], 1, 1)  # type: ignore[arg-type]


def _fresh3():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=30522,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
    )


def test_compare_methods_and_point_scores(tiny_model_dir):
    train = data(12, [0, 1] * 6)
    task = finetune_task(
        train,
        data(4, [0, 1] * 2, seed=1),
        flip=0.25,
        model=tiny_model_dir,
        rank=2,
        epochs=1,
        max_length=8,
        progress=False,
    )
    assert task.flipped.sum() == 3
    infl = fit_datainf(task, progress=False)
    g_train = B.training_gradients(infl)
    g_test = infl.per_sample_gradients(task.x_test, task.y_test)
    result = compare_methods(
        task, ["datainf", "exact", "hessian_free"], infl=infl, progress=False
    )
    lam = block_regularization(g_train, "auto", 0.1)
    assert result.regularization == pytest.approx(lam, rel=1e-12)
    want = B.exact_influences(g_test, g_train, lam).numpy()
    assert np.allclose(result.scores["exact"], want, rtol=1e-10, atol=0)
    # the library's model gives DataInf's numbers
    got = result.scores["datainf"]
    ref = infl.train_influences(task.x_test, task.y_test).double().numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    # a different rule changes λ and the scores
    other = compare_methods(
        task,
        ["datainf"],
        gradients=(g_train, g_test),
        regularization="global",
        regularization_scale=0.1,
        progress=False,
    )
    assert len(set(other.regularization.values())) == 1
    points = point_scores(task, g_train, lam)
    assert list(points) == ["training_loss", "el2n", "gradient_norm", "self_influence"]
    logits = task.model(task.x_train).double()
    loss = torch.nn.functional.cross_entropy(logits, task.y_train, reduction="none")
    assert np.allclose(points["training_loss"], loss.detach().numpy(), rtol=1e-5)
    assert all(v.shape == (12,) for v in points.values())
    assert harm(result.scores["datainf"]).shape == (12,)
    with pytest.raises(ValueError, match="Unknown methods"):
        point_scores(task, g_train, lam, ["loss"])
