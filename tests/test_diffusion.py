import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

from pydvl_datainf import DataInfInfluence
from pydvl_datainf.diffusion import (
    FixedNoiseDenoising,
    TinyUNet,
    cosine_alphas_cumprod,
    pack_diffusion_data,
)
from reference import DenseDataInf, rel_err


@pytest.fixture(scope="module")
def lora_unet():
    torch.manual_seed(0)
    images = (torch.rand(18, 1, 8, 8) * 2 - 1).double()
    data = pack_diffusion_data(images, n_timesteps=3, seed=0)
    unet = get_peft_model(
        TinyUNet(base=8),
        LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False),
    )
    model = FixedNoiseDenoising(unet, timesteps=data.timesteps).double()
    return model, data


def test_packing_fixes_noise_and_timesteps():
    images = torch.rand(5, 1, 4, 4)
    a = pack_diffusion_data(images, n_timesteps=4, seed=3)
    b = pack_diffusion_data(images, n_timesteps=4, seed=3)
    assert torch.equal(a.tensors[0], b.tensors[0])
    assert a.tensors[0].shape == (5, 5, 1, 4, 4) and a.tensors[1].shape == (
        5,
        4,
        1,
        4,
        4,
    )
    assert torch.equal(a.tensors[0][:, 0], images)
    assert torch.equal(a.tensors[0][:, 1:], a.tensors[1])
    assert a.timesteps.tolist() == [200, 400, 599, 799]
    abar = cosine_alphas_cumprod()
    assert abar[0] > 0.99 and abar[-1] < 1e-3 and (abar[1:] <= abar[:-1]).all()


def test_per_sample_loss_is_deterministic_and_matches_the_formula(lora_unet):
    model, data = lora_unet
    x, y = data.tensors
    model.eval()
    out = model(x[:2])
    abar = cosine_alphas_cumprod()[data.timesteps].double()
    k = 1
    noisy = abar[k].sqrt() * x[:2, 0] + (1 - abar[k]).sqrt() * x[:2, 1 + k]
    expected = model.denoiser(noisy, data.timesteps[k].repeat(2))
    torch.testing.assert_close(out[:, k], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(model(x[:2]), out)


@pytest.mark.parametrize("engine", ["hooks", "func", "loop"])
def test_lora_unet_influences_against_dense_reference(lora_unet, engine):
    model, data = lora_unet
    x, y = data.tensors
    infl = DataInfInfluence(model, F.mse_loss, engine=engine, progress=False)
    infl.fit(DataLoader(data, batch_size=5))
    assert len(infl.blocks) == 4 and all("lora_" in n for n in infl.block_names)
    ref = DenseDataInf(model, F.mse_loss, x, y, infl.blocks.to_dict())
    assert (
        rel_err(infl.train_influences(x[:4], y[:4]), ref.influences(x[:4], y[:4], x, y))
        < 1e-8
    )
    assert (
        rel_err(infl.influence_factors(x[:4], y[:4]), ref.factors(x[:4], y[:4])) < 1e-8
    )
