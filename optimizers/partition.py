"""Adam-mini's parameter partition: which block of the Hessian each parameter belongs to.

Every trainable parameter gets one `BlockLayout`: the parameter is read as a flat
sequence of `numel` elements cut into equal consecutive blocks of `block_numel`
elements, and Adam-mini keeps one second-moment value per block.

Rules (those of the official package v1.1.1, matched on the dot-separated components
of the lower-cased name, so `transformer.linear_probe` never matches `linear`):

| rule      | which parameters                                    | block              |
|-----------|-----------------------------------------------------|--------------------|
| `element` | biases                                              | 1 element (Adam)   |
| `lora`    | peft adapters (`lora_A`, `lora_B`, `lora_embedding_*`) | one row          |
| `head`    | queries and keys (`q_proj`, `k_proj`, `wq`, ...)    | one attention head |
| `row`     | embeddings, output head, values, attention output, MLP | one row         |
| `tensor`  | norms, and anything unmatched (reported as fallback) | the whole tensor  |

LoRA factors never take the head path: `lora_A` is (rank, in) and its rows mix every
head, and `lora_B` rows are `rank` wide, far from a head's `head_dim * hidden`. One value
per row is the per-output-neuron rule the official package uses for values and MLPs.
A head is `head_dim` consecutive output rows; under GQA a key matrix simply has
`n_kv_heads * head_dim` rows and so `n_kv_heads` blocks.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Iterable, Optional, Sequence

import torch

EMBEDDING_NAMES = frozenset({"embed_tokens", "embed", "embd", "wte", "word_embeddings", "tok_embeddings"})
OUTPUT_NAMES = frozenset({"lm_head", "output", "final_layer", "v_head", "score"})  # score: HF reward heads
QUERY_KEY_NAMES = frozenset({"q_proj", "k_proj", "wq", "wk", "query", "key"})
VALUE_NAMES = frozenset({"v_proj", "wv", "value"})
ATTENTION_OUTPUT_NAMES = frozenset({"o_proj", "wo", "out_proj"})
MLP_NAMES = frozenset({"mlp", "feed_forward", "linear", "gate_proj", "up_proj", "down_proj"})
LORA_NAMES = frozenset({"lora_a", "lora_b", "lora_embedding_a", "lora_embedding_b"})
_LAYER_NORM_COMPONENT = re.compile(r"^ln(_\w+|\d+)?$")

RULES = ("element", "lora", "head", "row", "tensor")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Attention geometry Adam-mini needs to cut queries and keys into heads."""

    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def create(cls, dim: Optional[int], n_heads: Optional[int], n_kv_heads: Optional[int] = None,
               head_dim: Optional[int] = None) -> Optional["Geometry"]:
        """Validates the official constructor's geometry arguments.

        Returns None when neither `dim` nor `n_heads` is given (a model without attention).

        Raises:
            ValueError: naming the argument and its value when the geometry is inconsistent.
        """
        if dim is None and n_heads is None:
            if n_kv_heads is not None or head_dim is not None:
                raise ValueError(f"Invalid geometry: n_kv_heads={n_kv_heads}, head_dim={head_dim} "
                                 "given without dim and n_heads")
            return None
        for arg, value in (("dim", dim), ("n_heads", n_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Invalid {arg} value: {value!r}; expected a positive int")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if not isinstance(n_kv_heads, int) or n_kv_heads <= 0:
            raise ValueError(f"Invalid n_kv_heads value: {n_kv_heads!r}; expected a positive int")
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"Invalid n_kv_heads value: {n_kv_heads}; n_heads={n_heads} is not a multiple of it")
        if head_dim is None:
            if dim % n_heads != 0:
                raise ValueError(f"Invalid dim value: {dim}; not divisible by n_heads={n_heads} "
                                 "(pass head_dim explicitly if the model's heads are not dim / n_heads wide)")
            head_dim = dim // n_heads
        elif not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"Invalid head_dim value: {head_dim!r}; expected a positive int")
        return cls(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)


def geometry_from_model(model_or_config) -> dict:
    """Reads `dim`, `n_heads`, `n_kv_heads`, `head_dim` from a Hugging Face model or config.

    Follows nested `text_config` (multimodal models such as Gemma 3) and the usual aliases
    (`n_embd`, `d_model`, `n_head`, `num_key_value_heads`, `multi_query`).

    Raises:
        ValueError: when the config has no hidden size or no head count.
    """
    config = getattr(model_or_config, "config", model_or_config)
    text_config = getattr(config, "text_config", None)
    if text_config is not None and getattr(config, "hidden_size", None) is None:
        config = text_config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*names):
        for name in names:
            value = getattr(config, name, None)
            if value is not None:
                return value
        return None

    dim = first("hidden_size", "n_embd", "d_model", "dim")
    n_heads = first("num_attention_heads", "n_head", "n_heads", "num_heads")
    if dim is None or n_heads is None:
        raise ValueError(f"Cannot read the attention geometry from {type(config).__name__}: "
                         f"hidden size {dim!r}, attention heads {n_heads!r}")
    n_kv_heads = first("num_key_value_heads", "n_kv_heads", "num_kv_heads")
    if n_kv_heads is None and getattr(config, "multi_query", False):
        n_kv_heads = 1
    head_dim = first("head_dim")
    return {"dim": int(dim), "n_heads": int(n_heads),
            "n_kv_heads": int(n_kv_heads) if n_kv_heads is not None else None,
            "head_dim": int(head_dim) if head_dim is not None else None}


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """How one parameter is cut into Adam-mini blocks."""

    name: str
    shape: tuple
    rule: str
    block_numel: int
    weight_decay: bool
    fallback: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return self.numel // self.block_numel

    def blocks_touched(self, start: int, end: int) -> tuple[int, int]:
        """Block range [first, last) touched by elements [start, end) of the flat parameter."""
        end = min(end, self.numel)
        if end <= start:
            return 0, 0
        return start // self.block_numel, -(-end // self.block_numel)

    def state_numel(self, start: int = 0, end: Optional[int] = None) -> tuple[int, int]:
        """(m elements, v elements) needed for elements [start, end) of this parameter."""
        end = self.numel if end is None else min(end, self.numel)
        first, last = self.blocks_touched(start, end)
        return max(0, end - start), last - first

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "rule": self.rule,
                "block_numel": self.block_numel, "num_blocks": self.num_blocks,
                "weight_decay": self.weight_decay, "fallback": self.fallback}


def _is_norm(components: Sequence[str]) -> bool:
    return any("norm" in c or _LAYER_NORM_COMPONENT.match(c) for c in components)


def applies_weight_decay(name: str) -> bool:
    """Whether decoupled weight decay applies: never to norms and biases (any optimizer)."""
    components = name.lower().split(".")
    is_bias = components[-1] == "bias" or components[-1].endswith("_bias")
    return not (is_bias or _is_norm(components))


def classify(name: str, shape: Sequence[int], geometry: Optional[Geometry]) -> BlockLayout:
    """Chooses the block rule for one parameter.

    Raises:
        ValueError: a query/key parameter without geometry, or whose rows are not whole heads.
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    components = name.lower().split(".")
    is_bias = components[-1] == "bias" or components[-1].endswith("_bias")
    decays = applies_weight_decay(name)
    two_dim = len(shape) == 2

    def layout(rule, block_numel, fallback=False):
        return BlockLayout(name, shape, rule, block_numel, decays, fallback)

    if is_bias:
        return layout("element", 1)
    if any(c in LORA_NAMES for c in components):
        return layout("lora", shape[-1] if two_dim else numel)
    if two_dim and any(c in QUERY_KEY_NAMES for c in components):
        if geometry is None:
            raise ValueError(f"Invalid geometry: dim=None, n_heads=None, but attention parameter {name!r} "
                             "needs them; pass dim and n_heads (or build with Adam_mini.from_model)")
        rows, cols = shape
        if rows % geometry.head_dim != 0:
            raise ValueError(f"Invalid head_dim value: {geometry.head_dim}; {name!r} has {rows} rows, "
                             "not a whole number of heads")
        return layout("head", geometry.head_dim * cols)
    row_names = EMBEDDING_NAMES | OUTPUT_NAMES | VALUE_NAMES | ATTENTION_OUTPUT_NAMES | MLP_NAMES
    attention_proj = any(a == "attn" and b == "proj" for a, b in zip(components, components[1:]))
    if two_dim and (attention_proj or any(c in row_names for c in components)):
        return layout("row", shape[1])
    if _is_norm(components):
        return layout("tensor", numel)
    return layout("tensor", numel, fallback=True)


def partition(named_parameters: Iterable, geometry: Optional[Geometry]) -> list[tuple[BlockLayout, torch.Tensor]]:
    """Layouts for the trainable parameters, each tensor once (tied weights count once).

    Shapes come from DeepSpeed's `ds_shape` when the model was built under ZeRO-3 `zero.Init`.
    """
    seen = set()
    result = []
    for name, param in named_parameters:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        shape = tuple(getattr(param, "ds_shape", param.shape))
        result.append((classify(name, shape, geometry), param))
    return result


class PartitionReport:
    """The partition as data (`as_dict`, `to_json`) and as a readable table (`str`)."""

    def __init__(self, layouts: Sequence[BlockLayout]):
        self.layouts = list(layouts)

    @property
    def fallbacks(self) -> list[str]:
        return [layout.name for layout in self.layouts if layout.fallback]

    def as_dict(self) -> dict:
        counts = {rule: sum(l.rule == rule for l in self.layouts) for rule in RULES}
        total_numel = sum(l.numel for l in self.layouts)
        total_blocks = sum(l.num_blocks for l in self.layouts)
        return {"parameters": [l.as_dict() for l in self.layouts], "rule_counts": counts,
                "numel": total_numel, "num_blocks": total_blocks, "fallbacks": self.fallbacks}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.as_dict(), **kwargs)

    def __str__(self) -> str:
        header = ("parameter", "shape", "rule", "block numel", "blocks", "decay")
        rows = [(l.name, "x".join(map(str, l.shape)), l.rule + (" (fallback)" if l.fallback else ""),
                 str(l.block_numel), str(l.num_blocks), "yes" if l.weight_decay else "no") for l in self.layouts]
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header] + rows]
        summary = self.as_dict()
        lines.append(f"{len(self.layouts)} parameters, {summary['numel']} elements, "
                     f"{summary['num_blocks']} second-moment blocks")
        return "\n".join(lines)
