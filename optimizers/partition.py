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
| `qkv`     | fused projections (`query_key_value`, `qkv_proj`, `Wqkv`) | a head for query and key rows, a row for value rows |
| `row`     | embeddings, output head, values, attention output, MLP | one row         |
|           | (also GPT-NeoX `embed_in`, `attention.dense`)        |                    |
| `tensor`  | norms, and anything unmatched (reported as fallback) | the whole tensor  |

LoRA factors never take the head path: `lora_A` is (rank, in) and its rows mix every
head, and `lora_B` rows are `rank` wide, far from a head's `head_dim * hidden`. One value
per row is the per-output-neuron rule the official package uses for values and MLPs.
A head is `head_dim` consecutive output rows; under GQA a key matrix simply has
`n_kv_heads * head_dim` rows and so `n_kv_heads` blocks.

A fused projection stacks the query, key and value rows in one matrix, in one of two orders
(`QKV_LAYOUTS`): "grouped" repeats, per KV head, that group's query heads, its key head and
its value head (GPT-NeoX and Bloom: one query head per group; Falcon: all three of its
variants), "concatenated" puts all query rows, then all key rows, then all value rows (Phi-3
`qkv_proj`, MPT `Wqkv`). Its blocks are still consecutive, so it is described as segments of
equal blocks (`BlockLayout.segments`) and the sharded update needs nothing new. GPT-2's
`c_attn` is a `Conv1D`, stored input x output: a head is a set of columns, strided in memory,
and it keeps one block for the tensor (named in the fallback warning with that reason), as
does CodeGen's `qkv_proj`, whose rows interleave four model-parallel groups of (q, v, k).
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
import re
from typing import Iterable, Optional, Sequence

import torch

EMBEDDING_NAMES = frozenset({"embed_tokens", "embed", "embd", "wte", "word_embeddings", "tok_embeddings",
                             "embed_in"})
OUTPUT_NAMES = frozenset({"lm_head", "output", "final_layer", "v_head", "score"})  # score: HF reward heads
QUERY_KEY_NAMES = frozenset({"q_proj", "k_proj", "wq", "wk", "query", "key"})
VALUE_NAMES = frozenset({"v_proj", "wv", "value"})
ATTENTION_OUTPUT_NAMES = frozenset({"o_proj", "wo", "out_proj"})
# Module pairs naming an attention output: GPT-2 style `attn.proj`; GPT-NeoX, Falcon and Bloom
# `attention.dense` / `self_attention.dense` (their MLP's `dense_h_to_4h` is matched by `mlp`).
ATTENTION_OUTPUT_PAIRS = frozenset({("attn", "proj"), ("attention", "dense"), ("self_attention", "dense")})
MLP_NAMES = frozenset({"mlp", "feed_forward", "linear", "gate_proj", "up_proj", "down_proj"})
LORA_NAMES = frozenset({"lora_a", "lora_b", "lora_embedding_a", "lora_embedding_b"})
_LAYER_NORM_COMPONENT = re.compile(r"^ln(_\w+|\d+)?$")
# Fused query/key/value projections and the row order their name implies; a model type in
# QKV_LAYOUT_BY_MODEL_TYPE overrides it (read by geometry_from_model).
FUSED_QKV_NAMES = {"query_key_value": "grouped", "qkv_proj": "concatenated", "wqkv": "concatenated",
                   "c_attn": "conv1d"}
QKV_LAYOUTS = ("grouped", "concatenated")
QKV_LAYOUT_BY_MODEL_TYPE = {"gpt_neox": "grouped", "falcon": "grouped", "bloom": "grouped",
                            "phi3": "concatenated", "mpt": "concatenated", "chatglm": "concatenated",
                            "codegen": "codegen"}
_UNSPLIT_QKV = {
    "conv1d": "a Conv1D stores input x output, so its heads are strided columns; one block for the tensor",
    "codegen": "CodeGen's rows interleave 4 model-parallel groups of (q, v, k); one block for the tensor",
}

RULES = ("element", "lora", "head", "qkv", "row", "tensor")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Attention geometry Adam-mini needs to cut queries and keys into heads."""

    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    qkv_layout: Optional[str] = None  # row order of fused projections; None: implied by the name

    @classmethod
    def create(cls, dim: Optional[int], n_heads: Optional[int], n_kv_heads: Optional[int] = None,
               head_dim: Optional[int] = None, qkv_layout: Optional[str] = None) -> Optional["Geometry"]:
        """Validates the official constructor's geometry arguments (and `qkv_layout`).

        Returns None when neither `dim` nor `n_heads` is given (a model without attention).

        Raises:
            ValueError: naming the argument and its value when the geometry is inconsistent.
        """
        if qkv_layout is not None and qkv_layout not in QKV_LAYOUTS + tuple(_UNSPLIT_QKV):
            raise ValueError(f"Invalid qkv_layout value: {qkv_layout!r}; use one of {QKV_LAYOUTS} or None")
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
        return cls(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, qkv_layout=qkv_layout)


def geometry_from_model(model_or_config) -> dict:
    """Reads `dim`, `n_heads`, `n_kv_heads`, `head_dim` from a Hugging Face model or config.

    Follows nested `text_config` (multimodal models such as Gemma 3) and the usual aliases
    (`n_embd`, `d_model`, `n_head`, `num_key_value_heads`, `multi_query`). `qkv_layout` comes
    from the model type (`QKV_LAYOUT_BY_MODEL_TYPE`), None for the others.

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
    model_type = getattr(config, "model_type", None)
    if model_type == "falcon" and not getattr(config, "new_decoder_architecture", False):
        # Falcon fills num_kv_heads with the head count even when its attention is multi-query.
        n_kv_heads = 1 if getattr(config, "multi_query", False) else n_heads
    head_dim = first("head_dim")
    geometry = {"dim": int(dim), "n_heads": int(n_heads),
                "n_kv_heads": int(n_kv_heads) if n_kv_heads is not None else None,
                "head_dim": int(head_dim) if head_dim is not None else None}
    if model_type in QKV_LAYOUT_BY_MODEL_TYPE:
        geometry["qkv_layout"] = QKV_LAYOUT_BY_MODEL_TYPE[model_type]
    return geometry


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """How one parameter is cut into Adam-mini blocks.

    `block_numel` is the size of every block, except for a fused projection, whose
    `segments` list in memory order `(part, numel, block_numel)` runs of equal blocks
    ("query", "key", "value"); its `block_numel` is then the query/key head block.
    `note` says why a parameter was left whole where it has a finer structure.
    """

    name: str
    shape: tuple
    rule: str
    block_numel: int
    weight_decay: bool
    fallback: bool = False
    segments: tuple = ()
    note: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @functools.cached_property
    def _runs(self) -> tuple[list, list, list]:
        """(first element, block_numel, first block) of each run of equal blocks."""
        runs = self.segments or (("", self.numel, self.block_numel),)
        starts, sizes, first_blocks = [], [], []
        element = block = 0
        for _, numel, block_numel in runs:
            starts.append(element)
            sizes.append(block_numel)
            first_blocks.append(block)
            element += numel
            block += numel // block_numel
        return starts, sizes, first_blocks

    @property
    def num_blocks(self) -> int:
        if not self.segments:
            return self.numel // self.block_numel
        return sum(numel // block_numel for _, numel, block_numel in self.segments)

    def block_of(self, element: int) -> int:
        """The block holding flat element `element`."""
        if not self.segments:
            return element // self.block_numel
        starts, sizes, first_blocks = self._runs
        run = bisect.bisect_right(starts, element) - 1
        return first_blocks[run] + (element - starts[run]) // sizes[run]

    def block_bounds(self, block: int) -> tuple[int, int]:
        """Elements [start, end) of block `block`."""
        if not self.segments:
            return block * self.block_numel, (block + 1) * self.block_numel
        starts, sizes, first_blocks = self._runs
        run = bisect.bisect_right(first_blocks, block) - 1
        start = starts[run] + (block - first_blocks[run]) * sizes[run]
        return start, start + sizes[run]

    def runs(self, start: int, end: int):
        """Yields (run start, run numel, block_numel, lo, hi) for each run of equal blocks that
        elements [lo, hi) of [start, end) fall in: the pieces a uniform update can take."""
        starts, sizes, _ = self._runs
        runs = self.segments or (("", self.numel, self.block_numel),)
        for run_start, (_, numel, block_numel) in zip(starts, runs):
            lo, hi = max(start, run_start), min(end, run_start + numel)
            if lo < hi:
                yield run_start, numel, block_numel, lo, hi

    def blocks_touched(self, start: int, end: int) -> tuple[int, int]:
        """Block range [first, last) touched by elements [start, end) of the flat parameter."""
        end = min(end, self.numel)
        if end <= start:
            return 0, 0
        return self.block_of(start), self.block_of(end - 1) + 1

    def state_numel(self, start: int = 0, end: Optional[int] = None) -> tuple[int, int]:
        """(m elements, v elements) needed for elements [start, end) of this parameter."""
        end = self.numel if end is None else min(end, self.numel)
        first, last = self.blocks_touched(start, end)
        return max(0, end - start), last - first

    def split(self) -> list[dict]:
        """A fused projection's blocks by part: [{"part", "blocks", "block_numel"}, ...]."""
        parts = {}
        for part, numel, block_numel in self.segments:
            entry = parts.setdefault(part, {"part": part, "blocks": 0, "block_numel": block_numel})
            entry["blocks"] += numel // block_numel
        return list(parts.values())

    def as_dict(self) -> dict:
        data = {"name": self.name, "shape": list(self.shape), "rule": self.rule,
                "block_numel": self.block_numel, "num_blocks": self.num_blocks,
                "weight_decay": self.weight_decay, "fallback": self.fallback}
        if self.segments:
            data["split"] = self.split()
        if self.note:
            data["note"] = self.note
        return data


def fused_qkv_segments(order: str, rows: int, cols: int, geometry: Geometry) -> tuple:
    """Segments of a fused (rows, cols) projection: a block per query/key head, one per value row.

    Raises:
        ValueError: when `rows` is not (n_heads + 2 * n_kv_heads) * head_dim.
    """
    head_numel = geometry.head_dim * cols
    expected = (geometry.n_heads + 2 * geometry.n_kv_heads) * geometry.head_dim
    if rows != expected:
        raise ValueError(f"fused projection has {rows} rows, but n_heads={geometry.n_heads}, n_kv_heads="
                         f"{geometry.n_kv_heads}, head_dim={geometry.head_dim} make {expected}")
    if order == "grouped":
        query_heads = geometry.n_heads // geometry.n_kv_heads
        group = (("query", query_heads * head_numel, head_numel), ("key", head_numel, head_numel),
                 ("value", head_numel, cols))
        return group * geometry.n_kv_heads
    return (("query", geometry.n_heads * head_numel, head_numel),
            ("key", geometry.n_kv_heads * head_numel, head_numel),
            ("value", geometry.n_kv_heads * head_numel, cols))


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

    def layout(rule, block_numel, fallback=False, **extra):
        return BlockLayout(name, shape, rule, block_numel, decays, fallback, **extra)

    if is_bias:
        return layout("element", 1)
    if any(c in LORA_NAMES for c in components):
        return layout("lora", shape[-1] if two_dim else numel)
    fused = next((FUSED_QKV_NAMES[c] for c in components if c in FUSED_QKV_NAMES), None)
    if two_dim and fused is not None:
        order = (geometry.qkv_layout if geometry is not None else None) or fused
        if order in _UNSPLIT_QKV:
            return layout("tensor", numel, fallback=True, note=_UNSPLIT_QKV[order])
        if geometry is None:
            raise ValueError(f"Invalid geometry: dim=None, n_heads=None, but fused attention parameter {name!r} "
                             "needs them; pass dim and n_heads (or build with Adam_mini.from_model)")
        try:
            segments = fused_qkv_segments(order, shape[0], shape[1], geometry)
        except ValueError as error:
            raise ValueError(f"Invalid geometry for {name!r}: {error}") from None
        return layout("qkv", geometry.head_dim * shape[1], segments=segments, note=order)
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
    attention_proj = any(pair in ATTENTION_OUTPUT_PAIRS for pair in zip(components, components[1:]))
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
        # "qkv" is listed only where a model has fused projections, so reports of the many
        # models without them keep the shape they always had.
        counts = {rule: sum(l.rule == rule for l in self.layouts) for rule in RULES}
        if not counts["qkv"]:
            del counts["qkv"]
        total_numel = sum(l.numel for l in self.layouts)
        total_blocks = sum(l.num_blocks for l in self.layouts)
        return {"parameters": [l.as_dict() for l in self.layouts], "rule_counts": counts,
                "numel": total_numel, "num_blocks": total_blocks, "fallbacks": self.fallbacks}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.as_dict(), **kwargs)

    def __str__(self) -> str:
        header = ("parameter", "shape", "rule", "block numel", "blocks", "decay")
        rows = [(l.name, "x".join(map(str, l.shape)), _rule_cell(l), _split_cell(l, "block_numel"),
                 _split_cell(l, "blocks"), "yes" if l.weight_decay else "no") for l in self.layouts]
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header] + rows]
        summary = self.as_dict()
        lines.append(f"{len(self.layouts)} parameters, {summary['numel']} elements, "
                     f"{summary['num_blocks']} second-moment blocks")
        lines += [f"{l.name}: {l.note}" for l in self.layouts if l.fallback and l.note]
        return "\n".join(lines)


def _rule_cell(layout: BlockLayout) -> str:
    if layout.segments:
        return f"qkv ({layout.note})"
    return layout.rule + (" (fallback)" if layout.fallback else "")


def _split_cell(layout: BlockLayout, key: str) -> str:
    """One number, or one per part for a fused projection (`q:3072 k:3072 v:96`)."""
    if not layout.segments:
        return str(layout.block_numel if key == "block_numel" else layout.num_blocks)
    return " ".join(f"{entry['part'][0]}:{entry[key]}" for entry in layout.split())
