"""The demo end to end, with tiny sizes (the full run is the README's first command)."""

import numpy as np
import pytest
import zarr

from pydvl_datainf.experiments import demo


def test_demo_smoke(tmp_path, capsys):
    res = demo.main(
        [
            "--n-train",
            "40",
            "--n-test",
            "12",
            "--epochs",
            "1",
            "--max-length",
            "24",
            "--rank",
            "2",
            "--show",
            "3",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    matrix = zarr.open_group(str(tmp_path / "influences.zarr"), mode="r")["matrix"]
    assert matrix.shape == (12, 40)
    assert np.isfinite(np.asarray(matrix[:])).all()
    assert (tmp_path / "mislabel_detection.png").stat().st_size > 10_000
    for key in ("auc_datainf", "auc_hessian_free", "auc_exact"):
        assert 0.0 <= res[key] <= 1.0
    out = capsys.readouterr().out
    assert "mislabel detection AUC" in out
    assert out.count("label '") == 3  # the flagged texts, with snippets


def test_demo_flags():
    args = demo._parser().parse_args(
        ["--dataset", "bbc", "--seed", "3", "--out", "x", "--no-progress"]
    )
    assert (args.dataset, args.seed, str(args.out), args.no_progress) == (
        "bbc",
        3,
        "x",
        True,
    )
    defaults = demo._parser().parse_args([])
    # resolved later: 1000 / 200 / 0.2 for the packaged sets, 0 flips for a CSV
    assert (defaults.dataset, defaults.n_train, defaults.flip) == ("sms", None, None)


def _csv(path, with_mask):
    words = ["good", "great", "bad", "awful", "fine", "poor"]
    rng = np.random.default_rng(0)
    lines = ["id,review,sentiment" + (",wrong" if with_mask else "")]
    for i in range(30):
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 5))))
        label = ["pos", "neg"][i % 2]
        lines.append(
            f"{i},{text},{label}" + (f",{int(i % 7 == 0)}" if with_mask else "")
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _tiny_model(path):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from pydvl_datainf.experiments.finetune import load_tokenizer

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


def _run(tmp_path, *extra):
    return demo.main(
        [
            "--epochs", "1", "--max-length", "12", "--rank", "2", "--show", "2",
            "--out", str(tmp_path / "out"), "--no-progress",
            "--model", str(tmp_path / "model"), *extra,
        ]
    )  # fmt: skip


def test_demo_reads_a_csv_with_a_known_mask(tmp_path, capsys):
    _tiny_model(tmp_path / "model")
    path = _csv(tmp_path / "mine.csv", with_mask=True)
    res = _run(
        tmp_path, "--csv", str(path), "--text-col", "review",
        "--label-col", "sentiment", "--flipped-col", "wrong", "--n-test", "6",
    )  # fmt: skip
    assert 0.0 <= res["auc_datainf"] <= 1.0 and res["plot"] is not None
    lines = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert lines[0].startswith("row,label,flipped,harm DataInf")
    rows = [int(line.split(",")[0]) for line in lines[1:]]
    assert len(rows) == 24 and rows == sorted(rows)  # the file's row order
    source = path.read_text().splitlines()[1:]
    for line in lines[1:]:
        r, label, flipped = line.split(",")[:3]
        fields = source[int(r)].split(",")
        assert (label, flipped) == (fields[2], fields[3])  # nothing flipped by us
    assert "mislabel detection AUC" in capsys.readouterr().out


def test_demo_reads_a_csv_without_a_mask(tmp_path, capsys):
    _tiny_model(tmp_path / "model")
    path = _csv(tmp_path / "mine.csv", with_mask=False)
    res = _run(
        tmp_path, "--csv", str(path), "--text-col", "review", "--label-col", "sentiment"
    )
    assert res["auc_datainf"] is None and res["plot"] is None
    out = capsys.readouterr().out
    assert "no known wrong labels" in out and "row " in out
    lines = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert len(lines) == 1 + 24  # 30 rows, 6 held out as the test set
    assert all(line.split(",")[2] == "0" for line in lines[1:])


def test_demo_csv_errors(tmp_path, capsys):
    path = _csv(tmp_path / "mine.csv", with_mask=False)
    with pytest.raises(SystemExit):
        demo.main(["--csv", str(path), "--text-col", "text", "--no-progress"])
    assert "no column 'text'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--flipped-col", "x", "--no-progress"])
    assert "--flipped-col needs --csv" in capsys.readouterr().err
