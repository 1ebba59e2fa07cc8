from pydvl_datainf import demo


def test_demo_runs_and_finds_mislabeled_points(tmp_path, capsys):
    res = demo.main(
        ["--n-train", "300", "--n-test", "60", "--epochs", "30", "--out", str(tmp_path),
         "--no-progress"]
    )
    assert (tmp_path / "influences.zarr").exists()
    assert 0.0 <= res["auc_hessian_free"] <= 1.0
    assert res["auc_datainf"] > 0.55  # better than chance on flipped labels
    assert "mislabel detection AUC" in capsys.readouterr().out
