r"""LoRA-tuned diffusion models behind pyDVL's `(x, y)` protocol.

The paper's second use case is text-to-image diffusion with LoRA adapters on the
attention layers of a UNet. The training loss of a denoising diffusion model is
random (a noise $\epsilon$ and a timestep $t$ per step), so per-sample gradients
are only well defined once both are fixed. Like the paper, which averages over
fixed timesteps, this module fixes them per sample:

$$
\ell(x_0) = \frac{1}{K}\sum_{k=1}^K \left\lVert
    \epsilon_\theta\!\left(\sqrt{\bar\alpha_{t_k}}\,x_0 +
    \sqrt{1-\bar\alpha_{t_k}}\,\epsilon_k,\; t_k\right) - \epsilon_k \right\rVert^2 / D,
$$

with $K$ timesteps $t_k$ shared by all samples and noises $\epsilon_k$ drawn once
per sample from a seeded generator, so gradients are deterministic.

* [TinyUNet][pydvl_datainf.diffusion.TinyUNet]: a compact UNet-style denoiser
  with a self-attention block whose `to_q`, `to_k`, `to_v`, `to_out` are
  `nn.Linear` (the usual LoRA targets, e.g. with PEFT).
* [FixedNoiseDenoising][pydvl_datainf.diffusion.FixedNoiseDenoising]: wraps a
  denoiser so that `model(x)` returns its noise predictions at the fixed
  timesteps, for inputs packed by
  [pack_diffusion_data][pydvl_datainf.diffusion.pack_diffusion_data]; the loss
  is `torch.nn.functional.mse_loss`.

Example:
    ```python
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from pydvl_datainf import DataInfInfluence
    from pydvl_datainf.diffusion import (
        FixedNoiseDenoising, TinyUNet, pack_diffusion_data)

    torch.manual_seed(0)
    images = torch.rand(32, 1, 8, 8) * 2 - 1
    data = pack_diffusion_data(images, n_timesteps=2, seed=0)
    # init_lora_weights=False: nonzero B, as after fine-tuning (with PEFT's
    # default B = 0, the gradients of A vanish and "auto" regularization refuses)
    config = LoraConfig(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    unet = get_peft_model(TinyUNet(base=8, time_dim=16), config)
    model = FixedNoiseDenoising(unet, timesteps=data.timesteps)
    infl = DataInfInfluence(model, F.mse_loss).fit(DataLoader(data, batch_size=16))
    scores = infl.train_influences(*data[:4])   # pyDVL sign
    assert scores.shape == (4, 32)
    assert (scores.diagonal() > 0).all()        # self-influence is positive
    ```
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

__all__ = [
    "TinyUNet",
    "FixedNoiseDenoising",
    "DiffusionDataset",
    "pack_diffusion_data",
    "cosine_alphas_cumprod",
]


def cosine_alphas_cumprod(n_steps: int = 1000, s: float = 0.008) -> torch.Tensor:
    r"""$\bar\alpha_t$ of the cosine schedule (Nichol & Dhariwal, 2021), $t=0..T-1$."""
    t = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (f[1:] / f[0]).clamp(1e-5, 1.0).to(torch.float32)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, `(len(t), dim)`."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class Attention(nn.Module):
    """Single-head self-attention over spatial positions, with Linear projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = h.shape
        seq = h.flatten(2).transpose(1, 2)  # (b, hw, c)
        q, k, v = self.to_q(seq), self.to_k(seq), self.to_v(seq)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
        out = self.to_out(att @ v)
        return h + out.transpose(1, 2).reshape(b, c, hh, ww)


class TinyUNet(nn.Module):
    """A compact UNet-style noise predictor $\\epsilon_\\theta(x_t, t)$.

    One down-sampling stage, a self-attention block at the low resolution, one
    up-sampling stage with a skip connection, and a timestep embedding added
    after the first convolution.

    Args:
        channels: image channels.
        base: feature channels.
        time_dim: size of the timestep embedding.
    """

    def __init__(self, channels: int = 1, base: int = 16, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(time_dim, base), nn.SiLU(), nn.Linear(base, base)
        )
        self.conv_in = nn.Conv2d(channels, base, 3, padding=1)
        self.down = nn.Conv2d(base, 2 * base, 3, stride=2, padding=1)
        self.attn = Attention(2 * base)
        self.up = nn.ConvTranspose2d(2 * base, base, 2, stride=2)
        self.conv_out = nn.Conv2d(2 * base, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.time_dim).to(x.dtype))
        h0 = F.silu(self.conv_in(x) + temb[:, :, None, None])
        h1 = self.attn(F.silu(self.down(h0)))
        h2 = F.silu(self.up(h1))
        return self.conv_out(torch.cat([h0, h2], dim=1))


class DiffusionDataset(TensorDataset):
    """`(x, y)` pairs for [FixedNoiseDenoising][pydvl_datainf.diffusion.FixedNoiseDenoising].

    `x[i]` stacks the clean image and its $K$ fixed noises, `(K + 1, C, H, W)`;
    `y[i]` is the noise target, `(K, C, H, W)`. `timesteps` are shared.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, timesteps: torch.Tensor):
        super().__init__(x, y)
        self.timesteps = timesteps


def pack_diffusion_data(
    images: torch.Tensor,
    n_timesteps: int = 4,
    seed: int = 0,
    n_steps: int = 1000,
    timesteps: Sequence[int] | None = None,
) -> DiffusionDataset:
    """Fix the noises and timesteps of every image once, for deterministic losses.

    Args:
        images: `(n, C, H, W)` clean images, scaled to about [-1, 1].
        n_timesteps: $K$, used when `timesteps` is not given (evenly spaced).
        seed: seed of the noise generator.
        n_steps: length $T$ of the diffusion schedule.
        timesteps: explicit shared timesteps.

    Returns:
        A [DiffusionDataset][pydvl_datainf.diffusion.DiffusionDataset].
    """
    if timesteps is None:
        ts = torch.linspace(0, n_steps - 1, n_timesteps + 2)[1:-1].round().long()
    else:
        ts = torch.as_tensor(list(timesteps), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(
        len(images), len(ts), *images.shape[1:], generator=g, dtype=images.dtype
    )
    x = torch.cat([images.unsqueeze(1), noise], dim=1)
    return DiffusionDataset(x, noise.clone(), ts)


class FixedNoiseDenoising(nn.Module):
    """`model(x)` = the denoiser's noise predictions at the fixed timesteps.

    Args:
        denoiser: a module called as `denoiser(x_t, t)` returning the noise
            prediction, e.g. [TinyUNet][pydvl_datainf.diffusion.TinyUNet] (with
            LoRA adapters).
        timesteps: the shared timesteps $t_1..t_K$.
        alphas_cumprod: $\\bar\\alpha_t$; the cosine schedule by default.

    With `loss = torch.nn.functional.mse_loss`, `loss(model(x[i:i+1]), y[i:i+1])`
    is the per-sample loss of the module docstring.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        timesteps: torch.Tensor,
        alphas_cumprod: torch.Tensor | None = None,
    ):
        super().__init__()
        self.denoiser = denoiser
        abar = cosine_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        steps = torch.as_tensor(timesteps, dtype=torch.long)
        self.timesteps: torch.Tensor
        self.abar: torch.Tensor
        self.register_buffer("timesteps", steps)
        self.register_buffer("abar", abar[steps].clone())

    @staticmethod
    def _split(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return x[:, 0], x[:, 1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clean, noise = self._split(x)
        b = len(x)
        preds = []
        # one denoiser call per timestep keeps the batch dimension = samples,
        # which per-sample gradient hooks rely on
        for k in range(noise.shape[1]):
            abar = self.abar[k].to(x.dtype)
            noisy = abar.sqrt() * clean + (1 - abar).sqrt() * noise[:, k]
            preds.append(self.denoiser(noisy, self.timesteps[k].repeat(b)))
        return torch.stack(preds, dim=1)
