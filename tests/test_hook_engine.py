"""The hook engine against the one-sample-at-a-time reference engine."""

from __future__ import annotations

import copy
from typing import Callable, Dict, Iterator, List, Mapping, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pydvl_datainf.gradients import (
    GradientFallbackWarning,
    HookGradientEngine,
    LoopGradientEngine,
    get_engine,
)
from pydvl_datainf.gradients.losses import closed_form_losses, per_sample_losses
from pydvl_datainf.gradients.rules import get_rule, linear_rule, register_rule
from pydvl_datainf.hf import (
    CausalLMWrapper,
    SequenceClassifierWrapper,
    causal_lm_labels,
    causal_lm_loss,
    pack_inputs,
    unpack_inputs,
)

RTOL, ATOL = 1e-10, 1e-12


@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    """Every test in float64 with a fixed seed; defaults restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def trainable(model: nn.Module) -> Dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def check_against_loop(
    model: nn.Module,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    params: Optional[Mapping[str, nn.Parameter]] = None,
    engine: Optional[HookGradientEngine] = None,
) -> Dict[str, torch.Tensor]:
    """Asserts hook == loop for every parameter; returns the hook gradients."""
    params = trainable(model) if params is None else params
    engine = HookGradientEngine() if engine is None else engine
    got = engine.per_sample_grads(model, loss, x, y, params)
    ref = LoopGradientEngine().per_sample_grads(model, loss, x, y, params)
    assert list(got) == list(params)
    for k in params:
        assert got[k].shape == (len(x), params[k].numel()), k
        assert ref[k].abs().sum() > 0, f"degenerate test: zero gradient for {k}"
        torch.testing.assert_close(got[k], ref[k], rtol=RTOL, atol=ATOL, msg=k)
    assert all(p.grad is None for p in model.parameters()), ".grad was populated"
    return got


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


# ---------------------------------------------------------------- single layers


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 5), (7, 4, 5), (7, 2, 3, 5)])
def test_linear(bias: bool, shape: tuple) -> None:
    model = nn.Linear(5, 3, bias=bias).eval()
    x = torch.randn(*shape)
    y = torch.randn(*shape[:-1], 3)
    check_against_loop(model, F.mse_loss, x, y)


CONV_CASES = [
    dict(stride=2, padding=1, dilation=2, groups=2),
    dict(stride=1, padding="same", dilation=2, groups=1),
    dict(stride=1, padding="same", groups=2, bias=False),  # even kernel: asymmetric
    dict(stride=3, padding="valid"),
    dict(stride=1, padding=2, padding_mode="reflect"),
    dict(stride=2, padding=1, padding_mode="circular", groups=4),
]


@pytest.mark.parametrize("kwargs", CONV_CASES)
def test_conv1d(kwargs: dict) -> None:
    kernel = 4 if kwargs.get("bias") is False else 3
    model = nn.Sequential(
        nn.Conv1d(4, 8, kernel, **kwargs), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)
    )
    x = torch.randn(6, 4, 13)
    model(x)
    model.eval()
    check_against_loop(model, ce, x, torch.randint(0, 3, (6,)))


@pytest.mark.parametrize("kwargs", CONV_CASES)
def test_conv2d(kwargs: dict) -> None:
    kernel = (4, 3) if kwargs.get("bias") is False else 3
    model = nn.Sequential(
        nn.Conv2d(4, 6 if kwargs.get("groups", 1) != 4 else 8, kernel, **kwargs),
        nn.ReLU(inplace=True),  # in-place on the conv output: must not matter
        nn.Flatten(),
        nn.LazyLinear(3),
    )
    x = torch.randn(5, 4, 9, 8)
    model(x)
    model.eval()
    check_against_loop(model, ce, x, torch.randint(0, 3, (5,)))


class EmbedPool(nn.Module):
    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4, **kwargs)  # type: ignore[arg-type]
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x)).mean(1))


@pytest.mark.parametrize(
    "kwargs", [{}, {"padding_idx": 0}, {"padding_idx": 2, "scale_grad_by_freq": True}]
)
def test_embedding(kwargs: dict) -> None:
    model = EmbedPool(**kwargs).eval()
    x = torch.randint(0, 11, (6, 7))
    x[:, -2:] = kwargs.get("padding_idx", 0)  # repeated (padding) index
    got = check_against_loop(model, ce, x, torch.randint(0, 3, (6,)))
    if "padding_idx" in kwargs:
        rows = got["emb.weight"].reshape(6, 11, 4)[:, kwargs["padding_idx"]]
        assert torch.all(rows == 0)


@pytest.mark.parametrize(
    "norm",
    [
        lambda: nn.LayerNorm(6),
        lambda: nn.LayerNorm(6, bias=False),
        lambda: nn.LayerNorm((3, 6)),
        lambda: nn.RMSNorm(6),
        lambda: nn.RMSNorm(6, eps=1e-3),
    ],
)
def test_norms(norm: Callable[[], nn.Module]) -> None:
    layer = norm()
    with torch.no_grad():  # move away from the trivial init
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    model = nn.Sequential(nn.Linear(6, 6), layer, nn.Linear(6, 2)).eval()
    x = torch.randn(5, 3, 6)
    check_against_loop(model, F.mse_loss, x, torch.randn(5, 3, 2))


# ------------------------------------------------------------------- composites


class Mixed(nn.Module):
    """Embedding, conv over tokens, layer norm, linear; some layers frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv = nn.Conv1d(8, 8, 3, padding="same")
        self.norm = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.seen_hooks: List[Dict[str, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hooks = {n: len(m._forward_hooks) for n, m in self.named_children()}
        self.seen_hooks.append(hooks)
        h = self.emb(x)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = torch.relu(self.frozen(self.norm(h)))
        return self.head(h.mean(1))


def test_mixed_model_with_frozen_layers() -> None:
    model = Mixed().eval()
    model.conv.requires_grad_(False)
    model.frozen.requires_grad_(False)
    x = torch.randint(0, 20, (5, 6))
    params = trainable(model)
    assert not any(k.startswith(("conv.", "frozen.")) for k in params)

    plan = HookGradientEngine().plan(model, params)
    assert sorted(plan.hooked_names) == ["emb", "head", "norm"]
    assert plan.fallback == {}

    got = check_against_loop(model, ce, x, torch.randint(0, 3, (5,)))
    assert set(got) == {"emb.weight", "norm.weight", "norm.bias", "head.weight"} | {
        "head.bias"
    }
    # one forward for the whole batch, with hooks only on the owners ...
    hooked = {"emb": 1, "conv": 0, "norm": 1, "frozen": 0, "head": 1}
    assert model.seen_hooks[0] == hooked
    # ... then the loop engine's 5 forwards, without hooks: they were removed
    assert len(model.seen_hooks) == 1 + len(x)
    assert all(v == 0 for h in model.seen_hooks[1:] for v in h.values())


class Shared(nn.Module):
    """A block applied twice, and an output layer tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 5)
        self.block = nn.Linear(5, 5)
        self.out = nn.Linear(5, 9, bias=False)
        self.out.weight = self.emb.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = torch.tanh(self.block(h))
        h = torch.tanh(self.block(h))
        return self.out(h)  # (B, T, 9)


def test_shared_module_and_tied_weights() -> None:
    model = Shared().eval()
    params = trainable(model)
    assert set(params) == {"emb.weight", "block.weight", "block.bias"}
    plan = HookGradientEngine().plan(model, params)
    assert sorted(plan.hooked_names) == ["block", "emb", "out"]
    x = torch.randint(0, 9, (4, 3))
    y = torch.randint(0, 9, (4, 3))

    def loss(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, 9), t.reshape(-1))

    check_against_loop(model, loss, x, y, engine=HookGradientEngine(validate=True))


class Scale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class LinearWithGain(nn.Linear):
    """A linear subclass with an extra parameter that no rule knows."""

    def __init__(self, n: int, m: int) -> None:
        super().__init__(n, m)
        self.gain = nn.Parameter(torch.randn(m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain


class PlainLinearSubclass(nn.Linear):
    pass


def test_modules_without_rule_use_fallback() -> None:
    model = nn.Sequential(nn.Linear(4, 6), Scale(6), nn.Tanh(), LinearWithGain(6, 3))
    model.eval()
    params = trainable(model)
    plan = HookGradientEngine().plan(model, params)
    # the linear rule is not inherited by a subclass that overrides forward:
    # Scale and LinearWithGain use the module-local fallback
    assert plan.fallback == {}
    assert sorted(h.name for h in plan.local) == ["1", "3"]
    text = str(plan)
    assert "3.gain" in text and "LinearWithGain" in text and "module-local" in text
    whole = HookGradientEngine(local=False).plan(model, params)
    assert set(whole.fallback) == {"1.scale", "3.gain", "3.weight", "3.bias"}
    assert "Scale" in whole.fallback["1.scale"]
    assert whole.hooked_names == ["0"]
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.warns(GradientFallbackWarning, match=r"1 \(Scale\).*3 \(LinearWith"):
        check_against_loop(model, ce, x, y)
    check_against_loop(model, ce, x, y, engine=HookGradientEngine(local=False))
    check_against_loop(
        model, ce, x, y, engine=HookGradientEngine(fallback="loop", local=False)
    )

    with pytest.raises(ValueError, match=r"1\.scale.*Scale"):
        HookGradientEngine(fallback=None, local=False).per_sample_grads(
            model, ce, x, y, params
        )


class Branchy(nn.Module):
    """Data-dependent control flow: torch.func cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = Scale(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if bool((h.abs() < 1e6).all()):  # per sample: True; vmap cannot trace it
            h = h * 2
        return self.scale(h)


def test_failing_fallback_names_parameters() -> None:
    model = Branchy().eval()
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"scale\.scale.*Scale"):
        HookGradientEngine(fallback="func", local=False).per_sample_grads(
            model, F.mse_loss, x, y, trainable(model)
        )
    # the default fallback goes on to the autograd loop where torch.func fails
    check_against_loop(model, F.mse_loss, x, y, engine=HookGradientEngine(local=False))
    # the module-local fallback re-runs only Scale: the branch does not matter
    check_against_loop(
        model, F.mse_loss, x, y, engine=HookGradientEngine(fallback=None)
    )
    # the rules do not care about control flow
    check_against_loop(model, F.mse_loss, x, y, {"lin.weight": model.lin.weight})


class Flattened(nn.Module):
    """Applies a linear layer to (B * T, F): the batch is not in dimension 0."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, f = x.shape
        h = torch.tanh(self.inner(x.reshape(b * t, f))).reshape(b, t, f)
        return self.head(h.sum(1))


def test_module_not_batch_first_goes_to_fallback() -> None:
    model = Flattened().eval()
    check_against_loop(model, F.mse_loss, torch.randn(5, 3, 4), torch.randn(5, 2))


class FunctionalReuse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.lin(x)), self.lin.weight)


def test_validate_detects_parameter_used_outside_its_module() -> None:
    model = FunctionalReuse().eval()
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    params = {"lin.weight": model.lin.weight}
    with pytest.raises(RuntimeError, match="lin.weight"):
        HookGradientEngine(validate=True).per_sample_grads(
            model, F.mse_loss, x, y, params
        )


def test_frozen_requested_parameter_state_is_restored() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    model.requires_grad_(False)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    params = {"0.weight": model[0].weight}
    got = HookGradientEngine().per_sample_grads(model, F.mse_loss, x, y, params)
    assert not any(p.requires_grad for p in model.parameters())
    assert model[0].weight.grad is None
    model.requires_grad_(True)
    ref = LoopGradientEngine().per_sample_grads(model, F.mse_loss, x, y, params)
    torch.testing.assert_close(got["0.weight"], ref["0.weight"], rtol=RTOL, atol=ATOL)


def test_empty_batch_and_registry() -> None:
    model = nn.Linear(3, 2)
    params = trainable(model)
    got = HookGradientEngine().per_sample_grads(
        model, F.mse_loss, torch.empty(0, 3), torch.empty(0, 2), params
    )
    assert got["weight"].shape == (0, 6)
    assert isinstance(get_engine("hooks"), HookGradientEngine)
    assert isinstance(get_engine("auto"), HookGradientEngine)
    assert get_rule(nn.Linear) is linear_rule
    assert get_rule(PlainLinearSubclass) is linear_rule  # through the MRO
    assert get_rule(LinearWithGain) is None  # overrides forward


def test_custom_rule_registration() -> None:
    class Diag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    @register_rule(Diag)
    def diag_rule(module, inputs, grad_output, names=None):  # type: ignore[no-untyped-def]
        a = inputs[0]
        return {"weight": (a * grad_output).reshape(len(a), -1, 3).sum(1)}

    model = nn.Sequential(Diag(), nn.Tanh(), nn.Linear(3, 2)).eval()
    params = trainable(model)
    assert HookGradientEngine().plan(model, params).fallback == {}
    check_against_loop(model, F.mse_loss, torch.randn(4, 5, 3), torch.randn(4, 5, 2))


# ---------------------------------------------------------------- loss functions


class SeqMLP(nn.Module):
    def __init__(self, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _mean_ce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(o, t, reduction="mean")


def _sum_ce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(o, t, reduction="sum")


def _item_loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # data-dependent python control flow: vmap fails, the loop is used
    return F.mse_loss(o, t) * (2.0 if float(t.sum()) > 0 else 1.0)


@pytest.mark.parametrize(
    "case",
    [
        ("mean CE", _mean_ce, (7, 5), lambda: torch.randint(0, 4, (7,))),
        ("sum CE tokens", _sum_ce, (7, 5), lambda: torch.randint(0, 4, (7,))),
        ("mean MSE", F.mse_loss, (7, 3, 5), lambda: torch.randn(7, 3, 4)),
        ("sum MSE", lambda o, t: F.mse_loss(o, t, reduction="sum"), (7, 3, 5), None),
        ("no vmap", _item_loss, (7, 3, 5), lambda: torch.randn(7, 3, 4)),
    ],
    ids=lambda c: c[0],
)
def test_loss_reductions(case: tuple) -> None:
    _, loss, shape, make_y = case
    model = SeqMLP(4).eval()
    x = torch.randn(*shape)
    y = make_y() if make_y is not None else torch.randn(*shape[:-1], 4)
    check_against_loop(model, loss, x, y)
    for vectorize in (True, False):
        engine = HookGradientEngine(vectorize_loss=vectorize)
        check_against_loop(model, loss, x, y, engine=engine)


def test_per_sample_losses_match_batch_of_one() -> None:
    out = torch.randn(6, 3, requires_grad=True)
    y = torch.randint(0, 3, (6,))
    expected = torch.stack([_sum_ce(out[i : i + 1], y[i : i + 1]) for i in range(6)])
    for vectorize in (True, False):
        got = per_sample_losses(_sum_ce, out, y, vectorize)
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ half precision


def test_bfloat16_against_float32_twin() -> None:
    """bf16 forward/backward, float32 accumulation.

    The bf16 model and its float32 twin have the same (bf16-representable)
    weights and inputs; differences come from bf16 arithmetic in the forward
    and the backward only (about 8 bits of mantissa), hence a relative error
    tolerance of 2e-2 on each parameter's whole gradient matrix.
    """
    torch.set_default_dtype(torch.float32)
    half = nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8 * 10, 16),
        nn.LayerNorm(16),
        nn.Tanh(),
        nn.Linear(16, 3),
    ).eval()
    half = half.to(torch.bfloat16)
    twin = copy.deepcopy(half).float()
    x = torch.randn(12, 3, 10).to(torch.bfloat16)
    y = torch.randint(0, 3, (12,))
    got = HookGradientEngine().per_sample_grads(half, ce, x, y, trainable(half))
    ref = LoopGradientEngine().per_sample_grads(twin, ce, x.float(), y, trainable(twin))
    for k in ref:
        assert got[k].dtype == torch.float32
        err = (got[k] - ref[k]).norm() / ref[k].norm()
        assert err < 2e-2, (k, err.item())


# -------------------------------------------------------------------- Hugging Face


def test_pack_unpack_and_labels() -> None:
    ids = torch.tensor([[7, 8, 9, 0], [4, 5, 0, 0]])
    mask = (ids != 0).long()
    x = pack_inputs(ids, mask)
    assert x.shape == (2, 2, 4) and x.dtype == torch.long
    a, b = unpack_inputs(x)
    assert torch.equal(a, ids) and torch.equal(b, mask)
    labels = causal_lm_labels(ids, mask, [1, 1])
    assert labels.tolist() == [[-100, 8, 9, -100], [-100, 5, -100, -100]]
    left = torch.tensor([[0, 7, 8, 9]])
    assert causal_lm_labels(left, (left != 0).long(), [2]).tolist() == [
        [-100, -100, -100, 9]
    ]


def tiny_bert(lora: bool = True) -> nn.Module:
    """Random tiny BERT classifier in float64, with LoRA on query and value."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config)
    if lora:
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(
            r=4,
            target_modules=["query", "value"],
            lora_dropout=0.0,
            init_lora_weights=False,  # lora_B = 0 would make lora_A's gradient 0
        )
        model = peft.get_peft_model(model, config)
    return SequenceClassifierWrapper(model).double().eval()


def padded_batch(lengths: list, length: int, vocab: int = 100) -> tuple:
    ids = torch.randint(1, vocab, (len(lengths), length))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def test_lora_bert_with_padding() -> None:
    model = tiny_bert()
    params = trainable(model)
    assert params and all("lora_" in k for k in params)
    plan = HookGradientEngine().plan(model, params)
    assert plan.fallback == {} and len(plan.hooked) == len(params)

    ids, mask = padded_batch([9, 5, 7, 3, 9], 9)
    y = torch.randint(0, 3, (5,))
    got = check_against_loop(model, ce, pack_inputs(ids, mask), y)

    # other ids at the padding positions change no gradient
    noisy = torch.where(mask == 1, ids, torch.randint(1, 100, ids.shape))
    assert not torch.equal(noisy, ids)
    again = HookGradientEngine().per_sample_grads(
        model, ce, pack_inputs(noisy, mask), y, params
    )
    for k in params:
        torch.testing.assert_close(again[k], got[k], rtol=RTOL, atol=ATOL)


def tiny_lora_llama(position_ids_from_mask: bool = False) -> nn.Module:
    """Random tiny Llama in float64 with LoRA on q_proj and v_proj."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    base = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    model = CausalLMWrapper(peft.get_peft_model(base, lora), position_ids_from_mask)
    return model.double().eval()


def test_lora_causal_lm() -> None:
    model = tiny_lora_llama()
    ids, mask = padded_batch([8, 5, 6, 4], 8)
    labels = causal_lm_labels(ids, mask, prompt_lengths=[3, 2, 4, 1])
    x = pack_inputs(ids, mask)
    got = check_against_loop(model, causal_lm_loss, x, labels)

    # the loss of one sample is Hugging Face's own loss on it
    with torch.no_grad():
        n = 5
        hf = model.model(
            input_ids=ids[1:2, :n], attention_mask=mask[1:2, :n], labels=labels[1:2, :n]
        ).loss  # Hugging Face computes its loss in float32
        ours = causal_lm_loss(model(x[1:2]), labels[1:2])
    torch.testing.assert_close(ours.float(), hf, rtol=1e-5, atol=1e-6)

    noisy = torch.where(mask == 1, ids, torch.randint(1, 100, ids.shape))
    again = HookGradientEngine().per_sample_grads(
        model, causal_lm_loss, pack_inputs(noisy, mask), labels, trainable(model)
    )
    for k in got:
        torch.testing.assert_close(again[k], got[k], rtol=RTOL, atol=ATOL)


def test_causal_lm_loss_without_targets_is_zero() -> None:
    logits = torch.randn(1, 4, 7, requires_grad=True)
    value = causal_lm_loss(logits, torch.full((1, 4), -100))
    assert value.item() == 0.0
    (g,) = torch.autograd.grad(value, logits)
    assert torch.all(g == 0)


def test_full_bert_all_parameters() -> None:
    """Every parameter: embeddings (padding_idx), position embeddings looked up
    with ids of shape (1, L) and broadcast over the batch, layer norms, linear."""
    model = tiny_bert(lora=False)
    params = trainable(model)
    assert HookGradientEngine().plan(model, params).fallback == {}
    ids, mask = padded_batch([6, 4, 2, 6], 6)
    x, y = pack_inputs(ids, mask), torch.randint(0, 3, (4,))
    check_against_loop(model, ce, x, y)
    # without expanding the shared position embeddings, they need the fallback,
    # and torch.func cannot trace Hugging Face's attention masks
    name = "model.bert.embeddings.position_embeddings.weight"
    with pytest.raises(ValueError, match="position_embeddings"):
        HookGradientEngine(expand_shared=False, fallback="func").per_sample_grads(
            model, ce, x, y, {name: params[name]}
        )
    for fallback in ("loop", "auto"):
        engine = HookGradientEngine(expand_shared=False, fallback=fallback)
        check_against_loop(model, ce, x, y, {name: params[name]}, engine=engine)


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(
            lambda t: torch.tanh(self.inner(t)), x, use_reentrant=self.reentrant
        )
        return self.head(h)


def test_gradient_checkpointing() -> None:
    model = Checkpointed(reentrant=False).eval()
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    check_against_loop(model, F.mse_loss, x, y)
    # reentrant checkpointing runs the hooked forward without autograd: the
    # parameters go to the fallback (here: none, hence the error) rather than
    # silently getting zero gradients
    model.reentrant = True
    with pytest.raises(ValueError, match="inner.weight.*autograd disabled"):
        HookGradientEngine(fallback=None).per_sample_grads(
            model, F.mse_loss, x.requires_grad_(), y, trainable(model)
        )


def test_causal_lm_left_padding() -> None:
    """With positions from the mask, left padding changes no gradient."""
    model = tiny_lora_llama(position_ids_from_mask=True)
    params = trainable(model)
    seq = torch.randint(1, 100, (1, 5))
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    left_mask = (torch.arange(8) >= 3).long().unsqueeze(0)
    plain = HookGradientEngine().per_sample_grads(
        model,
        causal_lm_loss,
        pack_inputs(seq),
        causal_lm_labels(seq, None, [2]),
        params,
    )
    padded = HookGradientEngine().per_sample_grads(
        model,
        causal_lm_loss,
        pack_inputs(left, left_mask),
        causal_lm_labels(left, left_mask, [2]),
        params,
    )
    for k in params:
        assert plain[k].abs().sum() > 0
        torch.testing.assert_close(padded[k], plain[k], rtol=1e-9, atol=1e-12)


class InPlaceInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 1.0
        out = self.lin(h)
        h.mul_(2.0)  # the activation captured for `lin` is now stale
        return out + h


def test_input_modified_in_place_is_detected() -> None:
    model = InPlaceInput().eval()
    with pytest.raises(ValueError, match="modified in place"):
        HookGradientEngine(fallback=None).per_sample_grads(
            model, F.mse_loss, torch.randn(4, 3), torch.randn(4, 3), trainable(model)
        )


@pytest.mark.parametrize(
    "loss,out_shape,make_y",
    [
        (F.cross_entropy, (7, 4), lambda: torch.randint(0, 4, (7,))),
        (F.nll_loss, (7, 4), lambda: torch.randint(0, 4, (7,))),
        (F.mse_loss, (7, 3), lambda: torch.randn(7, 3, dtype=torch.float64)),
        (F.mse_loss, (7, 2, 3), lambda: torch.randn(7, 2, 3, dtype=torch.float64)),
        (F.l1_loss, (7, 3), lambda: torch.randn(7, 3, dtype=torch.float64)),
        (F.smooth_l1_loss, (7, 3), lambda: torch.randn(7, 3, dtype=torch.float64)),
        (F.huber_loss, (7, 3), lambda: torch.randn(7, 3, dtype=torch.float64)),
        (
            F.binary_cross_entropy_with_logits,
            (7, 3),
            lambda: torch.rand(7, 3, dtype=torch.float64),
        ),
        (
            F.binary_cross_entropy,
            (7, 3),
            lambda: torch.rand(7, 3, dtype=torch.float64),
        ),
    ],
)
def test_closed_form_losses_equal_batches_of_one(loss, out_shape, make_y) -> None:
    out = torch.randn(*out_shape, dtype=torch.float64)
    if loss is F.binary_cross_entropy:
        out = torch.sigmoid(out)
    if loss is F.nll_loss:
        out = torch.log_softmax(out, dim=1)
    y = make_y()
    expected = torch.stack([loss(out[i : i + 1], y[i : i + 1]) for i in range(7)])
    assert closed_form_losses(loss, out, y) is not None
    got = per_sample_losses(loss, out, y)
    assert torch.allclose(got, expected, rtol=1e-14, atol=0)


def test_closed_form_losses_decline_what_they_cannot_reproduce() -> None:
    out = torch.randn(4, 3, dtype=torch.float64)
    ignored = torch.tensor([0, -100, 2, 1])  # a batch of one with it is NaN
    assert closed_form_losses(F.cross_entropy, out, ignored) is None
    got = per_sample_losses(F.cross_entropy, out, ignored)
    assert torch.isnan(got[1]) and torch.isfinite(got[[0, 2, 3]]).all()
    broadcast = torch.randn(4, dtype=torch.float64)  # (4, 3) against (4,)
    assert closed_form_losses(F.mse_loss, out[:, :1], broadcast) is None
    assert closed_form_losses(_sum_ce, out, torch.tensor([0, 1, 2, 1])) is None
