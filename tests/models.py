"""Small float64 models and data sets for the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class LoRALinear(nn.Module):
    """A frozen linear layer with a trainable low-rank adapter (lora_A, lora_B)."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


class LoRAMLP(nn.Module):
    def __init__(self, d_in=6, hidden=8, d_out=3, rank=2):
        super().__init__()
        self.l1 = LoRALinear(d_in, hidden, rank)
        self.l2 = LoRALinear(hidden, d_out, rank)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class TokenModel(nn.Module):
    """Token ids -> embedding mean -> linear: integer inputs."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.emb(x).mean(1)))


def mlp(d_in=5, hidden=6, d_out=3):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def make_case(name: str, n: int = 24, m: int = 5, seed: int = 0):
    """(model, loss, x_train, y_train, x_test, y_test) in float64."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        model, loss = mlp(), F.cross_entropy
        x = torch.randn(n + m, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n + m,), generator=g)
    elif name == "conv":
        model, loss = ConvNet(), F.cross_entropy
        x = torch.randn(n + m, 1, 4, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n + m,), generator=g)
    elif name == "lora":
        model, loss = LoRAMLP(), F.cross_entropy
        x = torch.randn(n + m, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n + m,), generator=g)
    elif name == "regression":
        model, loss = mlp(4, 6, 2), F.mse_loss
        x = torch.randn(n + m, 4, generator=g, dtype=torch.float64)
        y = torch.randn(n + m, 2, generator=g, dtype=torch.float64)
    else:
        raise ValueError(name)
    model = model.double()
    return model, loss, x[:n], y[:n], x[n:], y[n:]


def loader(x, y, bs=7, shuffle=False):
    """A DataLoader over `(x, y)` (batches of `bs`, in order unless `shuffle`)."""
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=shuffle)


def fit_zarr(model, loss, x, y, path, chunk_rows=None, bs=7, **kwargs):
    """`DataInfInfluence` fitted into a Zarr gradient store at `path`."""
    from pydvl_datainf import DataInfInfluence

    options = dict(kwargs.pop("store_options", {}))
    if chunk_rows is not None:
        options["chunk_rows"] = chunk_rows
    return DataInfInfluence(
        model,
        loss,
        progress=False,
        store="zarr",
        store_path=path,
        store_options=options,
        **kwargs,
    ).fit(loader(x, y, bs))
