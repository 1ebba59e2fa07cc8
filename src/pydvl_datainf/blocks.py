r"""Block structures: which trainable parameters form each block $l$ of DataInf.

DataInf approximates the inverse Gauss–Newton matrix block-diagonally, one block
per group of parameters. The choice of groups changes the result, so it is
explicit. [build_blocks][pydvl_datainf.blocks.build_blocks] accepts:

| spec | blocks |
| --- | --- |
| `"module"` (default) | one block per leaf module owning trainable parameters (its weight and bias together). For a PEFT LoRA model: one block per `lora_A` and one per `lora_B` weight, as in the paper's code, and one per module in PEFT's `modules_to_save` (e.g. a new classifier head), named after the wrapped module. |
| `"lora"` | like `"module"`, but each adapted layer's `lora_A` and `lora_B` form one block, named after the adapted layer. |
| `"parameter"` | one block per trainable parameter tensor. |
| `BlockMode.FULL` / `LAYER_WISE` / `PARAMETER_WISE` | pyDVL's meaning, built by pyDVL itself, so results compare with pyDVL's other models. Beware: pyDVL's `LAYER_WISE` groups by *top-level children* only, which is a single block for a PEFT model. |
| a mapping `{block_name: [param_name, ...]}` | exactly these blocks, in this order. |

Frozen parameters (`requires_grad=False`) never belong to a block: they cost
nothing.

**The head of a PEFT model.** `get_peft_model` freezes the base model, but
parameters outside the LoRA adapters can stay trainable: with
`task_type="SEQ_CLS"` PEFT puts the classifier head in `modules_to_save`, and any
module listed there is trained too. With the string specs these parameters
form blocks of their own, next to the LoRA blocks (the paper uses the LoRA
blocks only). `include_head` chooses: `None` (default) keeps them and warns
once per call with a [HeadBlocksWarning][pydvl_datainf.blocks.HeadBlocksWarning]
naming them, `True` keeps them silently, `False` leaves them out (the paper's
LoRA-only blocks).

Example:
    ```python
    from torch import nn
    from pydvl_datainf.blocks import build_blocks

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    blocks = build_blocks(model)
    assert blocks.names == ["0", "2"]  # one block per layer
    assert blocks.sizes == [15, 8]     # weights and biases: 4*3 + 3, 3*2 + 2
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

from .errors import BlockStructureError
from .factored import join

__all__ = [
    "Block",
    "BlockStructure",
    "BlockSpec",
    "build_blocks",
    "BlockMode",
    "HeadBlocksWarning",
    "head_parameters",
]

logger = logging.getLogger(__name__)

BlockSpec = Union[str, BlockMode, Mapping[str, Sequence[str]]]
"""What users pass as `block_structure`."""

_LORA_SEGMENT = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.|$)")
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+$")


class HeadBlocksWarning(UserWarning):
    """A LoRA model has trainable parameters outside its LoRA adapters (e.g. a
    classifier head in PEFT's `modules_to_save`) and they form blocks.

    Silence it by choosing: `build_blocks(model, spec, include_head=True)` keeps
    them, `include_head=False` leaves them out.
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


def _by_module(
    names: Sequence[str], lora_together: bool
) -> OrderedDict[str, List[str]]:
    groups: OrderedDict[str, List[str]] = OrderedDict()
    saved = []
    for name in names:
        key = name.rpartition(".")[0]
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


def build_blocks(
    model: nn.Module,
    spec: BlockSpec = "module",
    *,
    include_head: Optional[bool] = None,
) -> BlockStructure:
    """Build the block structure of `model` from a spec (see module docs).

    Args:
        model: the torch model.
        spec: `"module"`, `"lora"`, `"parameter"`, a pyDVL `BlockMode`, or an
            ordered mapping from block names to parameter names.
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
            frozen or repeated parameter names, or empty blocks;
            `include_head=False` for a model without LoRA adapters, or
            `include_head` given with a `BlockMode` or a mapping (these name
            their parameters themselves).

    Example:
        ```python
        from peft import LoraConfig, get_peft_model
        from torch import nn
        from pydvl_datainf import build_blocks

        base = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        config = LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"])
        model = get_peft_model(base, config)
        lora_only = build_blocks(model, "lora", include_head=False)
        assert lora_only.names == ["base_model.model.0"]
        with_head = build_blocks(model, "lora", include_head=True)
        assert with_head.names == ["base_model.model.0", "base_model.model.2"]
        ```
    """
    trainable = list(_trainable(model))
    if not trainable:
        raise BlockStructureError(
            "The model has no trainable parameters (all have requires_grad=False)"
        )
    if include_head is not None and not isinstance(spec, str):
        raise BlockStructureError(
            "include_head applies to the string specs 'module', 'lora' and "
            "'parameter' only; a BlockMode or a mapping names its parameters itself"
        )
    if isinstance(spec, str) and spec in ("module", "lora", "parameter"):
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
                f"head in PEFT's modules_to_save): {head}. Pass include_head=True "
                f"to keep them without this warning, or include_head=False for "
                f"LoRA-only blocks, as in the DataInf paper.",
                HeadBlocksWarning,
                stacklevel=2,
            )
    mapping: Mapping[str, Sequence[str]]
    if isinstance(spec, BlockMode):
        built = ModelParameterDictBuilder(model).build_from_block_mode(spec)
        mapping = OrderedDict((k, list(v)) for k, v in built.items())
    elif isinstance(spec, str):
        if spec == "module":
            mapping = _by_module(trainable, lora_together=False)
        elif spec == "lora":
            mapping = _by_module(trainable, lora_together=True)
        elif spec == "parameter":
            mapping = OrderedDict((p, [p]) for p in trainable)
        else:
            raise BlockStructureError(
                f"Unknown block structure {spec!r}; use 'module', 'lora', "
                f"'parameter', a pydvl BlockMode or a dict of parameter names"
            )
    elif isinstance(spec, Mapping):
        mapping = spec
    else:
        raise BlockStructureError(
            f"block_structure must be a string, BlockMode or mapping, got {type(spec)}"
        )
    validated = _validate(model, mapping)
    params = dict(model.named_parameters())
    blocks = [
        Block(name, tuple(ps), tuple(tuple(params[p].shape) for p in ps))
        for name, ps in validated.items()
    ]
    uncovered = set(trainable) - {p for b in blocks for p in b.params}
    if uncovered:
        logger.info(
            "%d trainable parameters are in no block and are ignored: %s",
            len(uncovered),
            sorted(uncovered),
        )
    return BlockStructure(blocks)
