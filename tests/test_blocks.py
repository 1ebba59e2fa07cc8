import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import List

import pytest
import torch
from pydvl.influence.torch.util import BlockMode
from torch import nn

from models import LoRAMLP, mlp
from pydvl_datainf import BlockStructureError, build_blocks


def test_default_is_one_block_per_leaf_module():
    b = build_blocks(mlp(5, 6, 3))
    assert b.names == ["0", "2"]
    assert b.sizes == [5 * 6 + 6, 6 * 3 + 3]
    assert b.n_parameters == 36 + 21
    assert b["0"].params == ("0.weight", "0.bias")


def test_lora_model_default_blocks_are_lora_a_and_b_frozen_excluded():
    b = build_blocks(LoRAMLP())
    assert b.names == ["l1.lora_A", "l1.lora_B", "l2.lora_A", "l2.lora_B"]
    assert all("base" not in p for p in b.parameter_names())


def test_lora_grouping_puts_a_and_b_together():
    b = build_blocks(LoRAMLP(), "lora")
    assert b.names == ["l1", "l2"]
    assert b["l1"].params == ("l1.lora_A.weight", "l1.lora_B.weight")


def test_parameter_mode():
    b = build_blocks(mlp(), "parameter")
    assert b.names == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_pydvl_block_modes_keep_pydvl_meaning():
    model = LoRAMLP()
    assert build_blocks(model, BlockMode.FULL).names == [""]
    # pyDVL's LAYER_WISE: top-level children only
    assert build_blocks(model, BlockMode.LAYER_WISE).names == ["l1", "l2"]
    wrapped = nn.Sequential(OrderedDict(inner=model))
    assert build_blocks(wrapped, BlockMode.LAYER_WISE).names == ["inner"]
    assert len(build_blocks(model, BlockMode.PARAMETER_WISE)) == 4


def test_custom_structure_and_split_gather_roundtrip():
    model = mlp()
    spec = OrderedDict(last=["2.weight", "2.bias"], first=["0.weight"])
    b = build_blocks(model, spec)
    assert b.names == ["last", "first"]
    assert b.to_dict() == spec
    flat = torch.arange(2 * b.n_parameters, dtype=torch.float64).reshape(2, -1)
    parts = b.split(flat)
    assert parts["last"].shape == (2, 21) and parts["first"].shape == (2, 30)
    per_param = {
        "2.weight": parts["last"][:, :18],
        "2.bias": parts["last"][:, 18:],
        "0.weight": parts["first"],
    }
    assert torch.equal(torch.cat(list(b.gather(per_param).values()), 1), flat)
    with pytest.raises(ValueError, match="n_parameters"):
        b.split(flat[:, :-1])


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"a": ["nope"]}, "unknown parameter 'nope'"),
        ({"a": ["0.weight"], "b": ["0.weight"]}, "in both block 'a' and block 'b'"),
        ({"a": []}, "no parameters"),
        ({"a": "0.weight"}, "list of parameter names"),
        ({}, "empty"),
        ("layers", "Unknown block structure"),
    ],
)
def test_invalid_structures(spec, match):
    with pytest.raises(BlockStructureError, match=match):
        build_blocks(mlp(), spec)


def test_frozen_parameters_rejected_and_all_frozen_model():
    model = mlp()
    model[0].weight.requires_grad_(False)
    with pytest.raises(BlockStructureError, match="frozen parameter '0.weight'"):
        build_blocks(model, {"a": ["0.weight"]})
    model.requires_grad_(False)
    with pytest.raises(BlockStructureError, match="no trainable parameters"):
        build_blocks(model)


def test_peft_lora_and_modules_to_save_blocks():
    from peft import LoraConfig, get_peft_model

    base = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"])
    )
    b = build_blocks(model, include_head=True)
    assert b.names == [
        "base_model.model.0.lora_A.default",
        "base_model.model.0.lora_B.default",
        "base_model.model.2",
    ]
    assert b["base_model.model.2"].params == (
        "base_model.model.2.modules_to_save.default.weight",
        "base_model.model.2.modules_to_save.default.bias",
    )
    grouped = build_blocks(model, "lora", include_head=True)
    assert grouped.names == ["base_model.model.0", "base_model.model.2"]
    assert grouped["base_model.model.0"].size == 2 * 4 + 5 * 2


def _peft_with_head():
    from peft import LoraConfig, get_peft_model

    base = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    return get_peft_model(
        base, LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"])
    )


HEAD = [
    "base_model.model.2.modules_to_save.default.weight",
    "base_model.model.2.modules_to_save.default.bias",
]


def test_head_parameters_of_peft_model_and_plain_model():
    from pydvl_datainf.blocks import head_parameters

    assert head_parameters(_peft_with_head()) == HEAD
    assert head_parameters(mlp()) == []  # no LoRA: no head in this sense
    assert head_parameters(LoRAMLP()) == []  # LoRA only


@pytest.mark.parametrize("spec", ["module", "lora", "parameter"])
def test_head_is_kept_with_a_warning_naming_it_by_default(spec):
    from pydvl_datainf.blocks import HeadBlocksWarning

    model = _peft_with_head()
    with pytest.warns(HeadBlocksWarning, match="modules_to_save.default.weight"):
        default = build_blocks(model, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = build_blocks(model, spec, include_head=True)
    assert default == kept
    assert set(HEAD) <= set(kept.parameter_names())


@pytest.mark.parametrize(
    "spec, names",
    [
        (
            "module",
            ["base_model.model.0.lora_A.default", "base_model.model.0.lora_B.default"],
        ),
        ("lora", ["base_model.model.0"]),
        (
            "parameter",
            [
                "base_model.model.0.lora_A.default.weight",
                "base_model.model.0.lora_B.default.weight",
            ],
        ),
    ],
)
def test_include_head_false_gives_lora_only_blocks_silently(spec, names):
    model = _peft_with_head()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = build_blocks(model, spec, include_head=False)
    assert b.names == names
    assert not set(HEAD) & set(b.parameter_names())
    assert b.n_parameters == 2 * 4 + 5 * 2


def test_no_warning_without_head():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_blocks(LoRAMLP())
        build_blocks(mlp())


def test_include_head_errors():
    with pytest.raises(BlockStructureError, match="no trainable lora_A/lora_B"):
        build_blocks(mlp(), include_head=False)
    with pytest.raises(BlockStructureError, match="string specs"):
        build_blocks(_peft_with_head(), BlockMode.FULL, include_head=False)
    with pytest.raises(BlockStructureError, match="string specs"):
        build_blocks(mlp(), {"a": ["0.weight"]}, include_head=True)


def test_lora_only_mapping_feeds_datainf_influence():
    from pydvl_datainf import DataInfInfluence

    model = _peft_with_head()
    spec = build_blocks(model, "lora", include_head=False).to_dict()
    infl = DataInfInfluence(
        model, torch.nn.functional.cross_entropy, block_structure=spec
    )
    assert infl.blocks.names == ["base_model.model.0"]


# --- the paper's blocks for hand-written LoRA (bare parameters) ---------------


class BareLoRALinear(nn.Module):
    """A frozen linear layer with `lora_A`, `lora_B` as bare parameters (loralib)."""

    def __init__(self, d_in: int, d_out: int, rank: int = 2, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(d_out), requires_grad=bias)
        self.lora_A = nn.Parameter(torch.randn(rank, d_in) / d_in**0.5)
        self.lora_B = nn.Parameter(0.1 * torch.randn(d_out, rank))

    def forward(self, x):
        out = nn.functional.linear(x, self.weight, self.bias)
        return out + x @ self.lora_A.T @ self.lora_B.T


class BareLoRAMLP(nn.Module):
    def __init__(self, bias: bool = False):
        super().__init__()
        self.l1 = BareLoRALinear(6, 8, bias=bias)
        self.l2 = BareLoRALinear(8, 3, bias=bias)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


LORA_BLOCKS = ["l1.lora_A", "l1.lora_B", "l2.lora_A", "l2.lora_B"]


def test_bare_parameter_lora_gets_one_block_per_matrix_as_peft_does():
    bare, peft_style = BareLoRAMLP(), LoRAMLP()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no head: no warning
        b = build_blocks(bare)
    assert b.names == LORA_BLOCKS == build_blocks(peft_style).names
    assert b["l1.lora_A"].params == ("l1.lora_A",)
    assert b.sizes == [2 * 6, 8 * 2, 2 * 8, 3 * 2]
    assert b.sizes == build_blocks(peft_style).sizes
    assert b == build_blocks(bare, "paper") == build_blocks(bare, "parameter")


def test_module_spec_keeps_one_block_per_leaf_module_for_bare_lora():
    b = build_blocks(BareLoRAMLP(), "module")
    assert b.names == ["l1", "l2"]
    assert b["l1"].params == ("l1.lora_A", "l1.lora_B")
    assert build_blocks(BareLoRAMLP(), "lora").to_dict() == b.to_dict()


def test_bare_lora_layer_with_a_trainable_bias():
    from pydvl_datainf.blocks import HeadBlocksWarning

    model = BareLoRAMLP(bias=True)
    with pytest.warns(HeadBlocksWarning, match="l1.bias"):
        b = build_blocks(model)
    assert b.names == ["l1", "l1.lora_A", "l1.lora_B", "l2", "l2.lora_A", "l2.lora_B"]
    assert b["l1"].params == ("l1.bias",)
    lora_only = build_blocks(model, include_head=False)
    assert lora_only.names == LORA_BLOCKS


@pytest.mark.parametrize("make", [mlp, LoRAMLP, lambda: _peft_with_head()])
def test_default_equals_module_for_peft_and_plain_models(make):
    """The default changed for bare-parameter LoRA only: stores fitted with
    the earlier default on these models keep their blocks."""
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert build_blocks(model) == build_blocks(model, "module")


# --- a BlockStructure as the spec ----------------------------------------------


def test_block_structure_is_accepted_as_built():
    model = _peft_with_head()
    built = build_blocks(model, "lora", include_head=False)
    assert build_blocks(model, built) == built
    # a copy of the model (same names and shapes) takes it too
    assert build_blocks(_peft_with_head(), built) == built


def test_block_structure_of_another_model_is_refused():
    built = build_blocks(mlp(5, 6, 3))
    with pytest.raises(
        BlockStructureError,
        match=r"another model.*'0': \[\(7, 5\), \(7,\)\] here, \[\(6, 5\)",
    ):
        build_blocks(mlp(5, 7, 3), built)
    with pytest.raises(BlockStructureError, match="unknown parameter"):
        build_blocks(LoRAMLP(), built)
    with pytest.raises(BlockStructureError, match="names its parameters itself"):
        build_blocks(mlp(5, 6, 3), built, include_head=True)


def _trained_peft_with_head():
    """`_peft_with_head` in float64 with non-zero `lora_B` (as after training)."""
    model = _peft_with_head().double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    return model


def _data(n: int = 20):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def test_block_structure_round_trips_through_datainf_and_from_store(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from pydvl_datainf import DataInfInfluence

    model, loss = _trained_peft_with_head(), torch.nn.functional.cross_entropy
    x, y = _data()
    lora_only = build_blocks(model, include_head=False)
    infl = DataInfInfluence(
        model,
        loss,
        block_structure=lora_only,
        store="zarr",
        store_path=tmp_path / "g.zarr",
        progress=False,
    ).fit(DataLoader(TensorDataset(x, y), batch_size=8))
    assert infl.blocks == lora_only
    by_option = DataInfInfluence(model, loss, include_head=False)
    assert by_option.blocks == lora_only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recorded mapping: no head warning
        again = DataInfInfluence.from_store(
            model, loss, tmp_path / "g.zarr", progress=False
        )
    assert again.blocks == lora_only
    torch.testing.assert_close(
        again.train_influences(x[:3], y[:3]),
        infl.train_influences(x[:3], y[:3]),
        rtol=1e-10,
        atol=0,
    )


def test_store_fitted_with_module_blocks_reopens_with_them(tmp_path):
    """A store keeps the blocks it was fitted with, whatever today's default."""
    from torch.utils.data import DataLoader, TensorDataset

    from pydvl_datainf import DataInfInfluence

    model, loss = BareLoRAMLP().double(), torch.nn.functional.cross_entropy
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    DataInfInfluence(
        model,
        loss,
        block_structure="module",
        store="zarr",
        store_path=tmp_path / "g.zarr",
        progress=False,
    ).fit(DataLoader(TensorDataset(x, y), batch_size=8))
    again = DataInfInfluence.from_store(model, loss, tmp_path / "g.zarr")
    assert again.block_names == ["l1", "l2"]
    assert DataInfInfluence(model, loss).block_names == LORA_BLOCKS


# --- the head warning: raised at the user's line, its advice runs -------------


def test_head_warning_points_at_the_users_call():
    from pydvl_datainf import DataInfInfluence
    from pydvl_datainf.blocks import HeadBlocksWarning

    model = _peft_with_head()
    with pytest.warns(HeadBlocksWarning) as direct:
        build_blocks(model)
    with pytest.warns(HeadBlocksWarning) as wrapped:
        DataInfInfluence(model, torch.nn.functional.cross_entropy)
    for record in (direct, wrapped):
        (w,) = [w for w in record if issubclass(w.category, HeadBlocksWarning)]
        assert w.filename == __file__


def _advice(message: str) -> List[str]:
    """The calls a HeadBlocksWarning tells the user to make, as printed."""
    return re.findall(r"`([^`]+\(model[^`]*\))`", message)


@pytest.mark.parametrize("spec", ["paper", "module", "lora", "parameter"])
def test_head_warning_advice_runs_as_printed_and_gives_lora_only_blocks(spec):
    from pydvl_datainf import DataInfInfluence
    from pydvl_datainf.blocks import HeadBlocksWarning, head_parameters

    model, loss = _peft_with_head(), torch.nn.functional.cross_entropy
    kwargs = {} if spec == "paper" else {"block_structure": spec}
    with pytest.warns(HeadBlocksWarning) as record:
        DataInfInfluence(model, loss, **kwargs)
    (message,) = [str(w.message) for w in record]
    calls = _advice(message)
    assert [c.split("(")[0] for c in calls] == ["DataInfInfluence", "build_blocks"]
    namespace = {
        "model": model,
        "loss": loss,
        "DataInfInfluence": DataInfInfluence,
        "build_blocks": build_blocks,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # following the advice silences it
        made = [eval(call, namespace) for call in calls]
    blocks = [made[0].blocks, made[1]]
    for b in blocks:
        assert not set(head_parameters(model)) & set(b.parameter_names())
        assert b == build_blocks(model, spec, include_head=False)


# --- freezing everything but the adapters --------------------------------------


def test_freeze_all_but_lora():
    from pydvl_datainf import freeze_all_but_lora
    from pydvl_datainf.blocks import lora_parameters

    model = BareLoRAMLP(bias=True)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert freeze_all_but_lora(model) == LORA_BLOCKS
    assert [n for n, p in model.named_parameters() if p.requires_grad] == LORA_BLOCKS
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing outside the adapters: no warning
        assert build_blocks(model).names == LORA_BLOCKS
    # freezes only: an adapter frozen before stays frozen
    model.l2.lora_B.requires_grad_(False)
    assert freeze_all_but_lora(model) == LORA_BLOCKS[:3] == lora_parameters(model)
    peft = _peft_with_head()
    assert freeze_all_but_lora(peft) == [
        "base_model.model.0.lora_A.default.weight",
        "base_model.model.0.lora_B.default.weight",
    ]
    with pytest.raises(BlockStructureError, match="no trainable lora_A/lora_B"):
        freeze_all_but_lora(mlp())
    assert all(p.requires_grad for p in mlp().parameters())


def test_scores_with_the_head_are_lora_only_plus_head_only():
    """Each block is inverted alone: the head block adds its own term."""
    from torch.utils.data import DataLoader, TensorDataset

    from pydvl_datainf import DataInfInfluence
    from pydvl_datainf.blocks import HeadBlocksWarning, head_parameters

    model, loss = _trained_peft_with_head(), torch.nn.functional.cross_entropy
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)

    def scores(**options):
        infl = DataInfInfluence(model, loss, progress=False, **options).fit(loader)
        return infl.train_influences(x[:4], y[:4])

    with pytest.warns(HeadBlocksWarning):
        both = scores()
    lora = scores(include_head=False)
    head = scores(block_structure={"head": head_parameters(model)})
    assert (both - lora).abs().max() > 1e-3 * both.abs().max()  # the head counts
    torch.testing.assert_close(both, lora + head, rtol=1e-10, atol=1e-12)


# --- the README's claim about the default blocks --------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_section() -> str:
    text = " ".join(README.read_text(encoding="utf-8").split())
    return text[text.index("## What is computed") : text.index("**Sign.**")]


def test_readme_claim_about_the_default_blocks_holds():
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from pydvl_datainf import DataInfInfluence, freeze_all_but_lora
    from pydvl_datainf.blocks import HeadBlocksWarning, lora_parameters

    section = _readme_section()
    claims = [
        "by default the paper's blocks: one per LoRA matrix, that is one per "
        "`lora_A` and one per `lora_B`, whether PEFT made the adapters or they "
        "are hand-written `nn.Parameter`s; and one per leaf module, its weight "
        "and bias together, for any other trainable parameter",
        "by default the head here is one more block, and a `HeadBlocksWarning` says so",
        "`DataInfInfluence(model, loss, include_head=False)` gives the paper's "
        "LoRA-only blocks",
        "`freeze_all_but_lora(model)` freezes the head altogether",
    ]
    for claim in claims:
        assert claim in section, f"the README no longer says: {claim}"

    # a PEFT sequence classifier: one block per lora_A and per lora_B, + head
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=16,
            num_labels=2,
        )
    )
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=2, target_modules=["query", "value"]
    )
    model = get_peft_model(bert, config)
    lora = lora_parameters(model)
    assert len(lora) == 2 * 2 * 2  # layers x (query, value) x (A, B)
    with pytest.warns(HeadBlocksWarning):
        default = build_blocks(model)
    assert [b.params for b in default][: len(lora)] == [(p,) for p in lora]
    (head,) = default.blocks[len(lora) :]
    assert head.name == "base_model.model.classifier"
    assert [s[-1] for s in head.shapes] == [8, 2]  # weight and bias together
    loss = torch.nn.functional.cross_entropy
    paper = DataInfInfluence(model, loss, include_head=False)
    assert paper.blocks.parameter_names() == lora
    # hand-written adapters: the same blocks; other layers: one block each
    bare = nn.Sequential(BareLoRAMLP(), nn.Linear(3, 2))
    with pytest.warns(HeadBlocksWarning):
        blocks = build_blocks(bare)
    assert [b.params for b in blocks] == [
        *[(f"0.{name}",) for name in LORA_BLOCKS],
        ("1.weight", "1.bias"),
    ]
    assert build_blocks(mlp()).names == ["0", "2"]
    freeze_all_but_lora(model)
    assert build_blocks(model) == paper.blocks
