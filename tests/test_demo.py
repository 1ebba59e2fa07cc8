"""The demo end to end, with tiny sizes (the full run is the README's first command)."""

import numpy as np
import zarr

from pydvl_datainf import demo


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
    assert (defaults.dataset, defaults.n_train, defaults.flip) == ("sms", 1000, 0.2)
