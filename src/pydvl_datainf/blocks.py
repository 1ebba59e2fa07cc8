r"""Block structures: which trainable parameters form each block $l$ of DataInf.

DataInf approximates the inverse Gauss–Newton matrix block-diagonally, one block
per group of parameters. The choice of groups changes the result, so it is
explicit. [build_blocks][pydvl_datainf.blocks.build_blocks] accepts:

| spec | blocks |
| --- | --- |
| `"paper"` (default) | the paper's blocks: one block per LoRA matrix, whether the adapters are `nn.Linear` modules (PEFT: one per `lora_A` and one per `lora_B` weight, named after the module) or bare `nn.Parameter`s of a hand-written layer (loralib style: one per `lora_A` and one per `lora_B` parameter, named after it). Every other trainable parameter is grouped by leaf module as in `"module"`: a model without LoRA gets one block per layer, and PEFT's `modules_to_save` (e.g. a new classifier head) one block each, named after the wrapped module. |
| `"module"` | one block per leaf module owning trainable parameters (its weight and bias together). The same as `"paper"` for PEFT models and models without LoRA; for a hand-written layer with bare `lora_A` and `lora_B` parameters, one block holding both. |
| `"lora"` | each adapted layer's `lora_A` and `lora_B` form one block, named after the adapted layer; other parameters as in `"module"`. |
| `"parameter"` | one block per trainable parameter tensor. |
| `BlockMode.FULL` / `LAYER_WISE` / `PARAMETER_WISE` | pyDVL's meaning, built by pyDVL itself, so results compare with pyDVL's other models. Beware: pyDVL's `LAYER_WISE` groups by *top-level children* only, which is a single block for a PEFT model. |
| a mapping `{block_name: [param_name, ...]}` | exactly these blocks, in this order. |
| a [BlockStructure][pydvl_datainf.blocks.BlockStructure] | exactly its blocks, e.g. one returned by `build_blocks`; its parameter shapes must match the model's. |

Frozen parameters (`requires_grad=False`) never belong to a block: they cost
nothing.

**The head of a PEFT model.** `get_peft_model` freezes the base model, but
parameters outside the LoRA adapters can stay trainable: with
`task_type="SEQ_CLS"` PEFT puts the classifier head in `modules_to_save`, and any
module listed there is trained too. With the string specs these parameters
form blocks of their own, next to the LoRA blocks (the paper uses the LoRA
blocks only). `include_head` (of `build_blocks` and of
[DataInfInfluence][pydvl_datainf.influence.DataInfInfluence]) chooses: `None`
(default) keeps them and warns with a
[HeadBlocksWarning][pydvl_datainf.blocks.HeadBlocksWarning] naming them and the
call that leaves them out, `True` keeps them silently, `False` leaves them out
(the paper's LoRA-only blocks).
[freeze_all_but_lora][pydvl_datainf.blocks.freeze_all_but_lora] freezes them
instead, so that they take part in nothing.

Example:
    ```python
    import torch
    from torch import nn
    from pydvl_datainf.blocks import build_blocks

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    blocks = build_blocks(model)
    assert blocks.names == ["0", "2"]  # no LoRA: one block per layer
    assert blocks.sizes == [15, 8]     # weights and biases: 4*3 + 3, 3*2 + 2

    class Adapted(nn.Module):  # a hand-written LoRA layer, as in loralib
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(4, 3).requires_grad_(False)
            self.lora_A = nn.Parameter(0.1 * torch.randn(2, 4))
            self.lora_B = nn.Parameter(0.1 * torch.randn(3, 2))

        def forward(self, x):
            return self.base(x) + x @ self.lora_A.T @ self.lora_B.T

    adapted = nn.Sequential(Adapted(), nn.Tanh(), Adapted())
    assert build_blocks(adapted).names == [  # one block per LoRA matrix
        "0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B",
    ]
    assert build_blocks(adapted, "module").names == ["0", "2"]  # A and B together
    ```
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import (
    Any,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
from pydvl.influence.torch.util import BlockMode, ModelParameterDictBuilder
from torch import nn

from .errors import BlockStructureError, outside_stacklevel
from .factored import join

__all__ = [
    "Block",
    "BlockStructure",
    "BlockSpec",
    "build_blocks",
    "BlockMode",
    "HeadBlocksWarning",
    "head_parameters",
    "lora_parameters",
    "freeze_all_but_lora",
]

logger = logging.getLogger(__name__)

DEFAULT_SPEC = "paper"
"""The default block spec: one block per LoRA matrix (see the module docs)."""

_STRING_SPECS = ("paper", "module", "lora", "parameter")
_LORA_NAMES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
_LORA_SEGMENT = re.compile(r"\.(" + "|".join(_LORA_NAMES) + r")(\.|$)")
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+$")


class HeadBlocksWarning(UserWarning):
    """A LoRA model has trainable parameters outside its LoRA adapters (e.g. a
    classifier head in PEFT's `modules_to_save`) and they form blocks.

    Silence it by choosing, in `build_blocks` or `DataInfInfluence`:
    `include_head=True` keeps them, `include_head=False` leaves them out. The
    message names the call to copy.
    """


@dataclass(frozen=True)
class Block:
    """One block: a name and the parameters it concatenates, in order."""

    name: str
    params: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]

    @property
    def sizes(self) -> Tuple[int, ...]:
        """Number of elements of each parameter."""
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def size(self) -> int:
        """$d_l$, the number of parameters of the block."""
        return sum(self.sizes)


class BlockStructure:
    """An ordered collection of [Block][pydvl_datainf.blocks.Block]s.

    Flat vectors over all blocks (e.g. influence factors) concatenate the blocks
    in this order, and each block concatenates its flattened parameters in order.
    """

    def __init__(self, blocks: Sequence[Block]):
        self.blocks: Tuple[Block, ...] = tuple(blocks)

    def __iter__(self) -> Iterator[Block]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockStructure) and self.blocks == other.blocks

    def __repr__(self) -> str:
        inner = ", ".join(f"{b.name!r}: {b.size}" for b in self.blocks)
        return f"BlockStructure({{{inner}}})"

    @property
    def names(self) -> List[str]:
        """Block names, in order."""
        return [b.name for b in self.blocks]

    @property
    def sizes(self) -> List[int]:
        """$d_l$ for each block, in order."""
        return [b.size for b in self.blocks]

    @property
    def n_parameters(self) -> int:
        """Total number of parameters over all blocks."""
        return sum(self.sizes)

    def parameter_names(self) -> List[str]:
        """All parameter names, in flat order."""
        return [p for b in self.blocks for p in b.params]

    def to_dict(self) -> OrderedDict[str, List[str]]:
        """The structure as `{block_name: [param_name, ...]}`, accepted back by
        [build_blocks][pydvl_datainf.blocks.build_blocks]."""
        return OrderedDict((b.name, list(b.params)) for b in self.blocks)

    def gather(self, per_param: Mapping[str, Any]) -> Dict[str, Any]:
        """Concatenate per-parameter `(n, numel)` tensors into per-block `(n, d_l)`.

        A block whose first parameter is
        [FactoredGrads][pydvl_datainf.factored.FactoredGrads] stays factored,
        with its other parameters as the dense tail; see
        [join][pydvl_datainf.factored.join].
        """
        out: Dict[str, Any] = OrderedDict()
        for b in self.blocks:
            out[b.name] = join([per_param[p] for p in b.params])
        return out

    def split(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Split `(n, n_parameters)` into per-block `(n, d_l)` views."""
        if flat.ndim != 2 or flat.shape[1] != self.n_parameters:
            raise ValueError(
                f"Expected a tensor of shape (n, {self.n_parameters}) "
                f"(n_parameters over all blocks), got {tuple(flat.shape)}"
            )
        return OrderedDict(zip(self.names, torch.split(flat, self.sizes, dim=1)))


BlockSpec = Union[str, BlockMode, Mapping[str, Sequence[str]], BlockStructure]
"""What users pass as `block_structure`."""


def _trainable(model: nn.Module) -> OrderedDict[str, nn.Parameter]:
    return OrderedDict((k, p) for k, p in model.named_parameters() if p.requires_grad)


def _is_lora(name: str) -> bool:
    return _LORA_SEGMENT.search("." + name) is not None


def head_parameters(model: nn.Module) -> List[str]:
    """Trainable parameters of a LoRA model that are not LoRA adapter weights.

    For a PEFT sequence classifier these are the classifier head's weights (in
    PEFT's `modules_to_save`). A model without LoRA adapters has no head in this
    sense: the result is empty.

    Args:
        model: the torch model, e.g. a `peft.PeftModel`.

    Returns:
        The parameter names, in the model's order.

    Example:
        ```python
        from peft import LoraConfig, get_peft_model
        from torch import nn
        from pydvl_datainf.blocks import head_parameters

        base = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        config = LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"])
        model = get_peft_model(base, config)
        assert head_parameters(model) == [
            "base_model.model.2.modules_to_save.default.weight",
            "base_model.model.2.modules_to_save.default.bias",
        ]
        ```
    """
    trainable = list(_trainable(model))
    if not any(_is_lora(p) for p in trainable):
        return []
    return [p for p in trainable if not _is_lora(p)]


def lora_parameters(model: nn.Module) -> List[str]:
    """Trainable LoRA adapter parameters: every `lora_A` and `lora_B` weight.

    PEFT's adapters (`nn.Linear` modules named `lora_A`, `lora_B`, and the
    `lora_embedding_A` / `lora_embedding_B` of embeddings) and bare
    `nn.Parameter`s with these names (loralib, hand-written layers) alike.

    Args:
        model: the torch model.

    Returns:
        The parameter names, in the model's order; empty without LoRA.

    Example:
        ```python
        from peft import LoraConfig, get_peft_model
        from torch import nn
        from pydvl_datainf.blocks import lora_parameters

        base = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"]))
        assert lora_parameters(model) == [
            "base_model.model.0.lora_A.default.weight",
            "base_model.model.0.lora_B.default.weight",
        ]
        ```
    """
    return [p for p in _trainable(model) if _is_lora(p)]


def freeze_all_but_lora(model: nn.Module) -> List[str]:
    """Freeze every trainable parameter outside the LoRA adapters.

    Call it after fine-tuning: influences then see the LoRA matrices only, as
    in the DataInf paper, and the frozen parameters (e.g. a new classifier
    head in PEFT's `modules_to_save`) cost nothing in `fit` or in memory. It
    only sets `requires_grad=False`; it unfreezes nothing, and the weights
    are unchanged.

    Args:
        model: a model with trainable LoRA adapters (see
            [lora_parameters][pydvl_datainf.blocks.lora_parameters]).

    Returns:
        The names of the parameters left trainable: the LoRA adapters.

    Raises:
        BlockStructureError: the model has no trainable LoRA parameters
            (freezing would leave nothing to compute influences on).

    Example:
        ```python
        from peft import LoraConfig, get_peft_model
        from torch import nn
        from pydvl_datainf.blocks import freeze_all_but_lora, head_parameters

        base = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        config = LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"])
        model = get_peft_model(base, config)
        assert len(head_parameters(model)) == 2  # the new head's weight, bias
        kept = freeze_all_but_lora(model)
        assert kept == [n for n, p in model.named_parameters() if p.requires_grad]
        assert len(kept) == 2 and head_parameters(model) == []
        ```
    """
    keep = lora_parameters(model)
    if not keep:
        raise BlockStructureError(
            "The model has no trainable lora_A/lora_B parameters; freezing the "
            "others would leave nothing trainable"
        )
    for name in head_parameters(model):
        model.get_parameter(name).requires_grad_(False)
    return keep


def _by_module(
    names: Sequence[str], lora_together: bool = False, bare_lora_apart: bool = False
) -> OrderedDict[str, List[str]]:
    """Group by leaf module. `lora_together`: each adapted layer's LoRA
    matrices form one block; `bare_lora_apart`: a bare `lora_A`/`lora_B`
    parameter forms a block of its own, named after it."""
    groups: OrderedDict[str, List[str]] = OrderedDict()
    saved = []
    for name in names:
        key, _, leaf = name.rpartition(".")
        # PEFT's modules_to_save (e.g. a new classifier head): name the block
        # after the wrapped module, not PEFT's trainable copy
        stripped = _MODULES_TO_SAVE.sub("", key)
        if stripped != key:
            saved.append(stripped)
            key = stripped
        if lora_together:
            match = _LORA_SEGMENT.search("." + name)
            if match is not None:
                key = ("." + name)[: match.start()].lstrip(".")
        elif bare_lora_apart and leaf in _LORA_NAMES:
            key = name
        groups.setdefault(key, []).append(name)
    if saved:
        logger.info(
            "PEFT modules_to_save found, one block each: %s", sorted(set(saved))
        )
    return groups


def _validate(
    model: nn.Module, spec: Mapping[str, Sequence[str]]
) -> OrderedDict[str, List[str]]:
    all_params = dict(model.named_parameters())
    seen: Dict[str, str] = {}
    out: OrderedDict[str, List[str]] = OrderedDict()
    for block, params in spec.items():
        if isinstance(params, str):
            raise BlockStructureError(
                f"Block {block!r}: expected a list of parameter names, got the "
                f"string {params!r}"
            )
        params = list(params)
        if not params:
            raise BlockStructureError(f"Block {block!r} has no parameters")
        for p in params:
            if p not in all_params:
                raise BlockStructureError(
                    f"Block {block!r} names unknown parameter {p!r}; the model's "
                    f"trainable parameters are {list(_trainable(model))}"
                )
            if not all_params[p].requires_grad:
                raise BlockStructureError(
                    f"Block {block!r} names frozen parameter {p!r} "
                    f"(requires_grad=False); frozen parameters cannot form blocks"
                )
            if p in seen:
                raise BlockStructureError(
                    f"Parameter {p!r} is in both block {seen[p]!r} and block {block!r}"
                )
            seen[p] = block
        out[str(block)] = params
    if not out:
        raise BlockStructureError("The block structure is empty")
    return out


def _head_advice(spec: str) -> str:
    """The calls that leave the head out, as a user copies them."""
    shown = "" if spec == DEFAULT_SPEC else f"{spec!r}, "
    keyword = "" if spec == DEFAULT_SPEC else f"block_structure={spec!r}, "
    return (
        f"`DataInfInfluence(model, loss, {keyword}include_head=False)` or "
        f"`build_blocks(model, {shown}include_head=False)`"
    )


def _from_spec(
    model: nn.Module, spec: BlockSpec, trainable: List[str]
) -> Mapping[str, Sequence[str]]:
    """The `{block: [parameter names]}` that a spec names (not yet validated)."""
    if isinstance(spec, BlockStructure):
        return spec.to_dict()
    if isinstance(spec, BlockMode):
        built = ModelParameterDictBuilder(model).build_from_block_mode(spec)
        return OrderedDict((k, list(v)) for k, v in built.items())
    if isinstance(spec, str):
        if spec == "paper":
            return _by_module(trainable, bare_lora_apart=True)
        if spec == "module":
            return _by_module(trainable)
        if spec == "lora":
            return _by_module(trainable, lora_together=True)
        if spec == "parameter":
            return OrderedDict((p, [p]) for p in trainable)
        raise BlockStructureError(
            f"Unknown block structure {spec!r}; use one of {list(_STRING_SPECS)}, "
            f"a pydvl BlockMode, a dict of parameter names or a BlockStructure"
        )
    if isinstance(spec, Mapping):
        return spec
    raise BlockStructureError(
        "block_structure must be a string, a BlockMode, a mapping or a "
        f"BlockStructure, got {type(spec)}"
    )


def build_blocks(
    model: nn.Module,
    spec: BlockSpec = DEFAULT_SPEC,
    *,
    include_head: Optional[bool] = None,
) -> BlockStructure:
    """Build the block structure of `model` from a spec (see module docs).

    Args:
        model: the torch model.
        spec: `"paper"` (default), `"module"`, `"lora"`, `"parameter"`, a
            pyDVL `BlockMode`, an ordered mapping from block names to
            parameter names, or a
            [BlockStructure][pydvl_datainf.blocks.BlockStructure] (e.g. built
            earlier by this function, for this model or a copy of it).
        include_head: only for the string specs and a model with LoRA adapters:
            what to do with its other trainable parameters (see
            [head_parameters][pydvl_datainf.blocks.head_parameters]). `None`:
            keep them as blocks and warn with a
            [HeadBlocksWarning][pydvl_datainf.blocks.HeadBlocksWarning];
            `True`: keep them; `False`: leave them out, so that the blocks are
            the LoRA adapters only.

    Returns:
        The validated [BlockStructure][pydvl_datainf.blocks.BlockStructure].

    Raises:
        BlockStructureError: unknown spec, no trainable parameters, unknown,
            frozen or repeated parameter names, or empty blocks; a
            `BlockStructure` whose parameter shapes differ from the model's;
            `include_head=False` for a model without LoRA adapters, or
            `include_head` given with a `BlockMode`, a mapping or a
            `BlockStructure` (these name their parameters themselves).

    Example:
        ```python
        from peft import LoraConfig, get_peft_model
        from torch import nn
        from pydvl_datainf import DataInfInfluence, build_blocks

        base = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        config = LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"])
        model = get_peft_model(base, config)
        lora_only = build_blocks(model, "lora", include_head=False)
        assert lora_only.names == ["base_model.model.0"]
        with_head = build_blocks(model, "lora", include_head=True)
        assert with_head.names == ["base_model.model.0", "base_model.model.2"]
        infl = DataInfInfluence(model, nn.functional.cross_entropy,
                                block_structure=lora_only)  # as built
        assert infl.blocks == lora_only
        ```
    """
    trainable = list(_trainable(model))
    if not trainable:
        raise BlockStructureError(
            "The model has no trainable parameters (all have requires_grad=False)"
        )
    if include_head is not None and not isinstance(spec, str):
        raise BlockStructureError(
            f"include_head applies to the string specs {list(_STRING_SPECS)} only; "
            "a BlockMode, a mapping or a BlockStructure names its parameters itself"
        )
    if isinstance(spec, str) and spec in _STRING_SPECS:
        head = head_parameters(model)
        if include_head is False:
            if not any(_is_lora(p) for p in trainable):
                raise BlockStructureError(
                    "include_head=False leaves only LoRA adapter parameters, but "
                    "the model has no trainable lora_A/lora_B parameters"
                )
            trainable = [p for p in trainable if _is_lora(p)]
        elif head and include_head is None:
            warnings.warn(
                f"The LoRA model has {len(head)} trainable parameters outside its "
                f"LoRA adapters, which form blocks of their own (e.g. a classifier "
                f"head in PEFT's modules_to_save): {head}. For LoRA-only blocks, "
                f"as in the DataInf paper, use {_head_advice(spec)}; pass "
                f"include_head=True instead to keep them without this warning.",
                HeadBlocksWarning,
                stacklevel=outside_stacklevel(),
            )
    validated = _validate(model, _from_spec(model, spec, trainable))
    params = dict(model.named_parameters())
    blocks = [
        Block(name, tuple(ps), tuple(tuple(params[p].shape) for p in ps))
        for name, ps in validated.items()
    ]
    if isinstance(spec, BlockStructure) and spec.blocks != tuple(blocks):
        wrong = [
            f"{b.name!r}: {list(b.shapes)} here, {list(s.shapes)} given"
            for b, s in zip(blocks, spec.blocks)
            if b != s
        ]
        raise BlockStructureError(
            "The BlockStructure was built for another model: parameter shapes "
            f"differ ({'; '.join(wrong)}). Build it from this model with "
            "build_blocks(model, ...)"
        )
    uncovered = set(trainable) - {p for b in blocks for p in b.params}
    if uncovered:
        logger.info(
            "%d trainable parameters are in no block and are ignored: %s",
            len(uncovered),
            sorted(uncovered),
        )
    return BlockStructure(blocks)
