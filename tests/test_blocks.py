import warnings
from collections import OrderedDict

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
