import pytest
import torch

from models import make_case
from pydvl_datainf import build_blocks, get_engine
from pydvl_datainf.gradients import FuncGradientEngine, LoopGradientEngine
from reference import per_sample_grads


@pytest.mark.parametrize("engine", ["func", "loop"])
@pytest.mark.parametrize("case", ["mlp", "conv", "lora", "regression"])
def test_engines_equal_backward_per_sample(engine, case):
    model, loss, x, y, *_ = make_case(case, n=9)
    blocks = build_blocks(model, "parameter")
    params = dict(model.named_parameters())
    got = get_engine(engine).per_sample_grads(
        model, loss, x, y, {k: params[k] for k in blocks.names}
    )
    ref = per_sample_grads(model, loss, x, y, blocks.to_dict())
    for k in blocks.names:
        assert got[k].dtype == torch.float64
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-13)


def test_half_precision_accumulates_in_float32():
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    x = torch.randn(4, 3, dtype=torch.bfloat16)
    y = torch.randn(4, 2, dtype=torch.bfloat16)
    for engine in (FuncGradientEngine(), LoopGradientEngine()):
        g = engine.per_sample_grads(
            model, torch.nn.functional.mse_loss, x, y, dict(model.named_parameters())
        )
        assert g["weight"].dtype == torch.float32 and g["weight"].shape == (4, 6)


def test_unknown_engine_lists_known_ones():
    with pytest.raises(ValueError, match="Unknown gradient engine 'nope'.*func"):
        get_engine("nope")


def test_auto_is_the_documented_default_without_import_side_effects():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pydvl_datainf.gradients.registry import DEFAULT_ENGINE, get_engine\n"
        "print(DEFAULT_ENGINE, type(get_engine('auto')).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["hooks", "HookGradientEngine"]
