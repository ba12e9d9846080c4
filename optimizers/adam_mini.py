"""Adam-mini that stays exact when DeepSpeed (ZeRO 0-3, bf16, CPU offload) shards the parameters.

Like the official package, each trainable parameter is its own param group (carrying its
`name`). DeepSpeed then presents the optimizer, per group, either the parameter itself or
one flat 1-D fp32 tensor: the whole parameter (fp16 ZeRO-0), or this rank's slice
`[rank * L, (rank + 1) * L)` of the flattened, end-padded parameter (ZeRO-1/2 and bf16
partition each group evenly; ZeRO-3 partitions each parameter). The presented length L
tells which: L equal to the parameter's numel is the whole of it. So the optimizer needs
no call beyond `deepspeed.initialize(model=..., optimizer=Adam_mini(...))`.

With `shared_groups=True` every parameter is in one group, and DeepSpeed presents one flat
partition holding pieces of many parameters; each rank finds them through DeepSpeed's
fragment mapping (ZeRO-1/2, bf16) or each parameter's partition size (ZeRO-3), see
`_fragment_table`.

A block cut by a shard boundary has its sum of squared gradients added up across the
data-parallel ranks (one all-reduce per `step()` call, over those blocks only), so every
rank holding part of it computes the same `v`. Padding never enters a block.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from . import kernels
from .compiled import compiled_update
from .partition import BlockLayout, Geometry, PartitionReport, geometry_from_model, partition

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "fused", "compiled", "foreach", "reference")


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the block statistics and of the update's arithmetic: fp32 for bf16/fp16 parameters
    (in bf16, beta2 = 0.999 rounds to 1.0; in fp16, eps = 1e-8 rounds to 0), else the parameter's."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@dataclass
class _Work:
    """One presented tensor's share of a step: which elements of which parameter it holds."""

    layout: BlockLayout
    param: torch.Tensor          # flat view of the presented tensor's valid elements
    grad: torch.Tensor           # flat, same length
    state: dict
    group: dict
    start: int                   # first element of the parameter held here
    straddle_blocks: list        # global block ids cut by a shard boundary (same on every rank)
    process_group: object = None
    sharded: bool = False        # a slice of the parameter, not all of it
    first_sq: float = math.nan   # cross-rank sum of squares of the first / last block, if cut
    last_sq: float = math.nan
    root: Optional[dict] = None  # the stored state `state` views, where it is a view (shared groups)
    slots: Optional[list] = None  # positions of straddle_blocks in the step's cut-block all-reduce

    @property
    def step(self) -> int:
        return (self.root or self.state)["step"]

    @property
    def block_offset(self) -> int:
        return self.start % self.layout.block_numel

    @property
    def blocks(self) -> tuple[int, int]:
        return self.layout.blocks_touched(self.start, self.start + self.param.numel())


def shard_bounds(numel: int, world_size: int, rank: int, zero_stage: int) -> tuple[int, int]:
    """Elements [start, end) of a parameter that DeepSpeed gives `rank` (one parameter per group).

    ZeRO-1/2 (and the bf16 optimizer) pad the group to a multiple of 2 * world_size and split
    it evenly; ZeRO-3 pads each parameter to a multiple of world_size. Stage 0 does not shard.
    """
    if zero_stage == 0 or world_size == 1:
        return 0, numel
    alignment = 2 * world_size if zero_stage in (1, 2) else world_size
    slice_numel = -(-numel // alignment) * alignment // world_size
    start = min(rank * slice_numel, numel)
    return start, min(start + slice_numel, numel)


def _straddle_blocks(layout: BlockLayout, slice_numel: int, world_size: int) -> list:
    """Blocks of `layout` cut by a boundary between consecutive ranks' slices."""
    blocks = set()
    for k in range(1, world_size):
        boundary = k * slice_numel
        if boundary < layout.numel:
            block = layout.block_of(boundary)
            if layout.block_bounds(block)[0] != boundary:
                blocks.add(block)
    return sorted(blocks)


def _uniform_pieces(item: _Work) -> list:
    """`item` cut where a fused projection's block size changes, so each piece has equal blocks.

    The pieces view `item`'s tensors and state; a piece keeps a cross-rank edge sum only
    where its edge is `item`'s.
    """
    layout = item.layout
    if not layout.segments:
        return [item]
    end = item.start + item.param.numel()
    first_block = item.blocks[0]
    exp_avg, block_sq_avg = item.state["exp_avg"].view(-1), item.state["block_sq_avg"]
    pieces = []
    for run_start, run_numel, block_numel, lo, hi in layout.runs(item.start, end):
        run_layout = BlockLayout(layout.name, (run_numel,), layout.rule, block_numel, layout.weight_decay)
        first, last = layout.blocks_touched(lo, hi)
        elements = slice(lo - item.start, hi - item.start)
        state = {"exp_avg": exp_avg[elements], "block_sq_avg": block_sq_avg[first - first_block:last - first_block]}
        pieces.append(_Work(run_layout, item.param[elements], item.grad[elements], state, item.group,
                            lo - run_start, [], item.process_group, item.sharded,
                            first_sq=item.first_sq if lo == item.start else math.nan,
                            last_sq=item.last_sq if hi == end else math.nan, root=item.root or item.state))
    return pieces


class ShardMismatchError(RuntimeError):
    """Optimizer state was saved for a different slice of a parameter (another world size)."""

    def __init__(self, message: str, sharded: bool = True):
        super().__init__(message)
        self.sharded = sharded


class Adam_mini(torch.optim.Optimizer):
    """Adam with one second-moment value per Hessian block (arXiv 2406.16793).

    Drop-in for the official `adam_mini.Adam_mini` constructor. `dim`, `n_heads`,
    `n_kv_heads` and `head_dim` describe the attention geometry (see `from_model` to read
    them off a Hugging Face model); they may be left out for models without attention.

    Args:
        named_parameters: `model.named_parameters()`; frozen parameters are left out and
            tied weights count once.
        lr, betas, eps, weight_decay: as in `torch.optim.AdamW` (decoupled weight decay,
            never applied to norms and biases).
        process_group: the data-parallel group DeepSpeed shards over, when it is not the
            world group. ZeRO-3 parameters carry their own (`ds_process_group`).
        implementation: "fused" (C kernel, CPU fp32/fp64), "compiled" (one `torch.compile`d
            function, any device: C++ on CPU, Triton on GPU; the first step compiles),
            "foreach" (vectorised torch, any device), "reference" (plain single-tensor math),
            or "auto": fused where it applies, else foreach.
        shared_groups: one param group for every parameter (weight decay still skips norms
            and biases) instead of one per parameter. DeepSpeed then runs its per-group
            collectives once, as for AdamW; under ZeRO-1/2 (and the bf16 optimizer) each rank
            finds its parameters' pieces of the flat partition through DeepSpeed's fragment
            mapping (`_hp_mapping`); under ZeRO-3 from each parameter's `partition_numel()`
            (sub-groups included). Not with DeepSpeed 0.19.8's `round_robin_gradients`, whose
            mapping is wrong: the first step raises there.
        model_sharding, verbose: accepted for compatibility with the official constructor.

    Raises:
        ValueError: an invalid hyperparameter or geometry, naming the argument and value.
    """

    def __init__(self, named_parameters: Iterable, lr=1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, dim: Optional[int] = None,
                 n_heads: Optional[int] = None, n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, qkv_layout: Optional[str] = None, process_group=None,
                 implementation: str = "auto", shared_groups: bool = False,
                 model_sharding: Optional[bool] = None, verbose: bool = False):
        lr_value = float(lr) if isinstance(lr, torch.Tensor) else lr
        if not isinstance(lr_value, (int, float)) or not 0.0 <= lr_value or math.isnan(lr_value):
            raise ValueError(f"Invalid learning rate: {lr}")
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas}; expected two values")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"Invalid implementation: {implementation!r}; use one of {IMPLEMENTATIONS}")
        self.geometry = Geometry.create(dim, n_heads, n_kv_heads, head_dim, qkv_layout)
        self.process_group = process_group
        self.implementation = implementation

        named = list(named_parameters)
        if named and not (isinstance(named[0], tuple) and len(named[0]) == 2):
            raise ValueError("Adam_mini needs named parameters: pass model.named_parameters(), "
                             f"got an iterable of {type(named[0]).__name__}")
        layouts_and_params = partition(named, self.geometry)
        if not layouts_and_params:
            raise ValueError("Adam_mini got no trainable parameters")
        self._layouts = {layout.name: layout for layout, _ in layouts_and_params}
        self._original_params = {layout.name: param for layout, param in layouts_and_params}
        self.partition_report = PartitionReport([layout for layout, _ in layouts_and_params])
        if self.partition_report.fallbacks:
            named = [f"{l.name} ({l.note})" if l.note else l.name for l in self.partition_report.layouts
                     if l.fallback]
            warnings.warn("Adam-mini: no partition rule matched these parameters, each gets one block "
                          f"for the whole tensor: {', '.join(named)}", stacklevel=2)
        if verbose:
            logger.info("Adam-mini partition:\n%s", self.partition_report)

        if shared_groups:
            # weight_decay applies to the parameters whose layout decays (see _hyper).
            groups = [{"params": [param for _, param in layouts_and_params],
                       "names": [layout.name for layout, _ in layouts_and_params], "weight_decay": weight_decay}]
        else:
            groups = [{"params": [param], "name": layout.name, "rule": layout.rule,
                       "block_numel": layout.block_numel,
                       "weight_decay": weight_decay if layout.weight_decay else 0.0}
                      for layout, param in layouts_and_params]
        self.shared_groups = shared_groups
        self._name_of = {id(param): layout.name for layout, param in layouts_and_params}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(groups, defaults)
        self._verified_groups = set()
        self._cut_tables = {}  # id(flat partition) -> its fragments and the cut blocks of all ranks

    @classmethod
    def from_model(cls, model: torch.nn.Module, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                   **kwargs) -> "Adam_mini":
        """Builds the optimizer with the geometry read from `model.config` (see `geometry_from_model`)."""
        geometry = geometry_from_model(model)
        geometry.update(kwargs)
        return cls(model.named_parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **geometry)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("betas", (0.9, 0.999))
            group.setdefault("eps", 1e-8)
        self.__dict__.setdefault("implementation", "auto")
        self.__dict__.setdefault("process_group", None)
        self.__dict__.setdefault("_verified_groups", set())
        self.__dict__.setdefault("shared_groups", False)
        self.__dict__.setdefault("_cut_tables", {})

    def load_state_dict(self, state_dict):
        # torch.optim casts loaded state to each parameter's dtype; the block statistics stay in theirs
        # (fp32 for bf16/fp16 parameters), from the saved values.
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        saved_statistics = {param: state_dict["state"][index]["block_sq_avg"]
                            for index, param in zip(saved_ids, params)
                            if "block_sq_avg" in state_dict["state"].get(index, {})}
        super().load_state_dict(state_dict)
        for param, block_sq_avg in saved_statistics.items():
            self.state[param]["block_sq_avg"] = block_sq_avg.to(device=param.device, copy=True,
                                                                dtype=statistics_dtype(param.dtype))
        self._pending_full_state = None  # the loaded state replaces any full state given before
        self._verified_groups = set()  # loaded state must be checked against this rank's slices
        self._cut_tables = {}

    # ---- where a presented tensor sits in its parameter -------------------------------------

    def _locate(self, group: dict, tensor: torch.Tensor, name: Optional[str] = None) -> _Work:
        """Works out which elements of which parameter `tensor` holds, and its state.

        Raises:
            RuntimeError: the presented slice does not fit the data-parallel world size.
            ShardMismatchError: the saved state was made for a different slice (another world size).
        """
        name = group["name"] if name is None else name
        layout = self._layouts[name]
        original = self._original_params[name]
        numel = layout.numel
        if tensor is original or tensor.numel() == numel:
            start, slice_numel, world_size, process_group = 0, numel, 1, None
        else:
            process_group = getattr(original, "ds_process_group", None) or self.process_group
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(f"Adam-mini: parameter {layout.name!r} ({numel} elements) was presented as a "
                                   f"shard of {tensor.numel()} elements, but torch.distributed is not initialized")
            world_size = dist.get_world_size(process_group)
            rank = dist.get_rank(process_group)
            slice_numel = tensor.numel()
            if slice_numel * world_size < numel or slice_numel > -(-numel // world_size) + 2:
                raise RuntimeError(
                    f"Adam-mini: parameter {layout.name!r} ({numel} elements) was presented as a shard of "
                    f"{slice_numel} elements, which does not split it over {world_size} ranks; pass the "
                    "data-parallel group DeepSpeed shards over as process_group=")
            start = min(rank * slice_numel, numel)
        valid = min(slice_numel, numel - start)
        grad = tensor.grad
        flat_param = tensor.view(-1)[:valid]
        flat_grad = grad.reshape(-1)[:valid]
        state = self.state[tensor]
        first_block, last_block = layout.blocks_touched(start, start + valid)
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(tensor) if valid == tensor.numel() and start == 0 \
                else torch.zeros(valid, dtype=tensor.dtype, device=tensor.device)
            state["block_sq_avg"] = torch.zeros(last_block - first_block, dtype=statistics_dtype(tensor.dtype),
                                                device=tensor.device)
            state["shard_start"] = start
            state["block_start"] = first_block  # with shard_start, places this piece in the whole (optimizers.reshard)
            self._fill_from_full_state(state, layout.name, flat_param, state["exp_avg"].view(-1),
                                       state["block_sq_avg"], start, (first_block, last_block))
        elif (state.get("shard_start", 0) != start or state["exp_avg"].numel() != valid
              or state["block_sq_avg"].numel() != last_block - first_block):
            raise ShardMismatchError(
                f"Adam-mini: saved state of {layout.name!r} covers elements from {state.get('shard_start', 0)} "
                f"({state['exp_avg'].numel()} elements, {state['block_sq_avg'].numel()} blocks) but this rank now "
                f"holds {valid} elements from {start}: the checkpoint was written at another data-parallel world "
                "size. Resume with the world size it was saved at, or start the optimizer afresh.",
                sharded=world_size > 1)
        straddles = _straddle_blocks(layout, slice_numel, world_size) if world_size > 1 else []
        return _Work(layout, flat_param, flat_grad, state, group, start, straddles, process_group,
                     sharded=world_size > 1)

    def _fragment_table(self, group: dict, tensor: torch.Tensor) -> dict:
        """This rank's pieces of a shared group's flat partition, and the blocks any rank's edge cuts.

        DeepSpeed ZeRO-1/2 and its bf16 optimizer flatten the group (in their own order, with
        alignment padding and, optionally, round-robin reordering) and give each parameter a
        fragment mapping, `_hp_mapping`: which elements of the parameter this rank holds and
        where in the flat partition. The cut blocks need every rank's pieces: gathered once,
        on the first step (and after loading state), then cached.

        Raises:
            RuntimeError: under ZeRO-3, or for a flat tensor no fragment mapping describes.
        """
        table = self._cut_tables.get(id(tensor))
        if table is not None and table["tensor"] is tensor:
            return table
        if hasattr(self._original_params[group["names"][0]], "ds_id"):
            fragments, process_group, misplaced = self._zero3_fragments(group, tensor)
        else:
            fragments, process_group, misplaced = self._mapped_fragments(group, tensor)
        everyone = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(everyone, (misplaced, [(index, start, numel) for index, start, _, numel in fragments]),
                               group=process_group)
        misplaced = next((problem for problem, _ in everyone if problem is not None), None)
        if misplaced is not None:
            raise RuntimeError(
                f"Adam-mini: shared_groups=True cannot find its pieces of the flat partition: {misplaced}. "
                "DeepSpeed 0.19.8 builds its fragment mapping in the original parameter order under "
                "round_robin_gradients=true (unless parameter alignment pads the group); disable "
                "round_robin_gradients, or build the optimizer with shared_groups=False.")
        cuts = set()
        for _, rank_fragments in everyone:
            for index, start, numel in rank_fragments:
                layout = self._layouts[group["names"][index]]
                for edge in (start, start + numel):
                    if 0 < edge < layout.numel and layout.block_bounds(layout.block_of(edge))[0] != edge:
                        cuts.add((index, layout.block_of(edge)))
        table = {"tensor": tensor, "fragments": fragments, "process_group": process_group,
                 "slots": {cut: slot for slot, cut in enumerate(sorted(cuts))}}
        self._cut_tables[id(tensor)] = table
        return table

    @staticmethod
    def _matches(master: torch.Tensor, weights: torch.Tensor) -> bool:
        """Whether a master-weight piece holds these model weights: at the start of a step it
        equals them, rounded to their dtype."""
        return torch.equal(master.detach().to(weights.dtype), weights.detach())

    def _mapped_fragments(self, group: dict, tensor: torch.Tensor) -> tuple:
        """ZeRO-1/2 and the bf16 optimizer: this rank's pieces from DeepSpeed's `_hp_mapping`.

        Returns (fragments as (index, start in parameter, start in partition, numel), process
        group, what points elsewhere, or None).
        """
        fragments, process_group, misplaced = [], self.process_group, None
        for index, name in enumerate(group["names"]):
            param = self._original_params[name]
            if not hasattr(param, "_hp_mapping"):
                raise RuntimeError(f"Adam-mini: a shared group was presented as a flat tensor of {tensor.numel()} "
                                   f"elements, but parameter {name!r} has no DeepSpeed fragment mapping "
                                   "(_hp_mapping); shared_groups=True needs DeepSpeed ZeRO-1/2 or whole parameters")
            process_group = getattr(param, "_dp_group", None) or process_group
            mapping = param._hp_mapping
            if mapping is None or mapping.hp_fragment.untyped_storage().data_ptr() != \
                    tensor.untyped_storage().data_ptr():
                continue
            start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
            if misplaced is None and not self._matches(mapping.hp_fragment, param.reshape(-1)[start:start + numel]):
                misplaced = f"the fragment mapping (_hp_mapping) of {name!r} does not point at its master weights"
            fragments.append((index, start, mapping.hp_fragment_address.start, numel))
        return sorted(fragments, key=lambda fragment: fragment[2]), process_group, misplaced

    def _zero3_fragments(self, group: dict, tensor: torch.Tensor) -> tuple:
        """ZeRO-3: the flat partition is each parameter's own slice, `partition_numel()` long
        (end-padded), one after another in the group's order. Same return as _mapped_fragments.

        DeepSpeed may cut the group into sub-groups of consecutive parameters (`sub_group_size`)
        and step each alone; the run this tensor holds is the one whose slices add up to its
        length and hold its values (at the start of a step the master copy equals them).
        """
        params = [self._original_params[name] for name in group["names"]]
        process_group = getattr(params[0], "ds_process_group", None) or self.process_group
        rank = dist.get_rank(process_group)
        slice_numels = [param.partition_numel() for param in params]
        for first in range(len(params)):
            last, total = first, 0
            while last < len(params) and total < tensor.numel():
                total, last = total + slice_numels[last], last + 1
            if total != tensor.numel():
                continue
            fragments, offset = [], 0
            for index in range(first, last):
                numel = self._layouts[group["names"][index]].numel
                start = min(rank * slice_numels[index], numel)
                valid = min(slice_numels[index], numel - start)
                if valid and not self._matches(tensor.view(-1)[offset:offset + valid],
                                               params[index].ds_tensor.view(-1)[:valid]):
                    break
                if valid:
                    fragments.append((index, start, offset, valid))
                offset += slice_numels[index]
            else:
                return fragments, process_group, None
        return [], process_group, f"no run of parameter slices holds the {tensor.numel()} presented elements"

    def _locate_fragments(self, group: dict, tensor: torch.Tensor, tables: list) -> list:
        """One _Work per parameter piece in a shared group's flat partition; their state views
        one flat `exp_avg` and one `block_sq_avg` (the pieces' blocks in partition order).

        Raises:
            ShardMismatchError: the saved state was made for other pieces (another world size).
        """
        table = self._fragment_table(group, tensor)
        tables.append(table)
        fragments, slots = table["fragments"], table["slots"]
        blocks = [self._layouts[group["names"][index]].blocks_touched(start, start + numel)
                  for index, start, _, numel in fragments]
        described = torch.tensor([[index, start, numel] for index, start, _, numel in fragments],
                                 dtype=torch.int64).view(-1, 3)
        state = self.state[tensor]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(tensor)
            state["block_sq_avg"] = torch.zeros(sum(last - first for first, last in blocks),
                                                dtype=statistics_dtype(tensor.dtype), device=tensor.device)
            state["fragments"] = described
            state["pieces"] = self._describe_pieces(fragments, blocks)
            self._fill_fragments_from_full_state(state, group, tensor, fragments, blocks)
        elif not torch.equal(state.get("fragments", torch.empty(0, 3, dtype=torch.int64)), described):
            raise ShardMismatchError(
                "Adam-mini: saved state of a shared param group covers other parameter pieces than this rank "
                "now holds: the checkpoint was written at another data-parallel world size. Resume with the "
                "world size it was saved at, or start the optimizer afresh.")
        if "pieces" not in state:  # state saved before it was recorded
            state["pieces"] = self._describe_pieces(fragments, blocks)
        flat_param, flat_grad = tensor.view(-1), tensor.grad.view(-1)
        exp_avg, block_sq_avg = state["exp_avg"].view(-1), state["block_sq_avg"]
        work, v_offset = [], 0
        for (index, start, offset, numel), (first, last) in zip(fragments, blocks):
            elements = slice(offset, offset + numel)
            view = {"exp_avg": exp_avg[elements], "block_sq_avg": block_sq_avg[v_offset:v_offset + last - first]}
            v_offset += last - first
            cut = sorted({block for block in (first, last - 1) if (index, block) in slots})
            work.append(_Work(self._layouts[group["names"][index]], flat_param[elements], flat_grad[elements], view,
                              group, start, cut, table["process_group"], sharded=True, root=state,
                              slots=[slots[(index, block)] for block in cut]))
        return work

    @staticmethod
    def _describe_pieces(fragments: list, blocks: list) -> torch.Tensor:
        """(offset in the flat partition, first block, last block + 1) of each fragment, in
        partition order: with `fragments` it places every piece of the state in its parameter."""
        return torch.tensor([[offset, first, last] for (_, _, offset, _), (first, last) in zip(fragments, blocks)],
                            dtype=torch.int64).view(-1, 3)

    # ---- state in a form that does not depend on the number of ranks --------------------------

    def load_full_state(self, full_state: dict) -> None:
        """Continues from whole-parameter state, such as `optimizers.reshard.consolidate` builds
        from a checkpoint written by any number of ranks.

        `full_state["params"]` maps a parameter name to {"step", "exp_avg" (numel), "block_sq_avg"
        (num_blocks), and optionally "fp32" (numel, the master weights)}. Nothing is copied now:
        on the first step each presented piece takes its elements and blocks from it (and the
        fp32 master piece DeepSpeed presents takes its weights), so the pieces follow this run's
        sharding, whatever the world size was. Parameters it does not name start afresh.

        Raises:
            ValueError: a name this optimizer does not train, or a tensor of the wrong size.
        """
        params = full_state["params"]
        problems = []
        for name, entry in params.items():
            layout = self._layouts.get(name)
            if layout is None:
                problems.append(f"{name!r} is not a parameter this optimizer trains")
                continue
            for key, expected in (("exp_avg", layout.numel), ("block_sq_avg", layout.num_blocks),
                                  ("fp32", layout.numel)):
                if key in entry and entry[key].numel() != expected:
                    problems.append(f"{name!r}: {key} has {entry[key].numel()} elements, expected {expected}")
        if problems:
            raise ValueError("Adam-mini: the full state does not fit this model: " + "; ".join(problems))
        self.state.clear()
        self._pending_full_state = params
        self._verified_groups = set()
        self._cut_tables = {}

    def _fill_from_full_state(self, state: dict, name: str, master: torch.Tensor, exp_avg: torch.Tensor,
                              block_sq_avg: torch.Tensor, start: int, blocks: tuple) -> None:
        """Fresh state of one piece (elements from `start`, `blocks`) from `load_full_state`'s, if given."""
        entry = (self.__dict__.get("_pending_full_state") or {}).get(name)
        if entry is None:
            return
        numel = exp_avg.numel()
        state["step"] = int(entry["step"])
        exp_avg.copy_(entry["exp_avg"].view(-1)[start:start + numel])
        block_sq_avg.copy_(entry["block_sq_avg"].view(-1)[blocks[0]:blocks[1]])
        if "fp32" in entry:
            master.copy_(entry["fp32"].view(-1)[start:start + numel])

    def _fill_fragments_from_full_state(self, state: dict, group: dict, tensor: torch.Tensor, fragments: list,
                                        blocks: list) -> None:
        pending = self.__dict__.get("_pending_full_state")
        if not pending:
            return
        flat_param, exp_avg, block_sq_avg = tensor.view(-1), state["exp_avg"].view(-1), state["block_sq_avg"]
        v_offset, steps = 0, set()
        for (index, start, offset, numel), (first, last) in zip(fragments, blocks):
            name = group["names"][index]
            elements = slice(offset, offset + numel)
            self._fill_from_full_state(state, name, flat_param[elements], exp_avg[elements],
                                       block_sq_avg[v_offset:v_offset + last - first], start, (first, last))
            if name in pending:
                steps.add(int(pending[name]["step"]))
            v_offset += last - first
        if len(steps) > 1:
            raise ValueError(f"Adam-mini: the full state gives one shared param group's parameters different step "
                             f"counts ({sorted(steps)}); a shared group steps all its parameters together")
        state["step"] = steps.pop() if steps else 0

    # ---- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work, mismatch, names, tables = [], None, set(), []
        for group in self.param_groups:
            for tensor in group["params"]:
                if tensor.grad is None:
                    continue
                names.add(group.get("name", "shared"))
                try:
                    if "names" not in group:
                        work.append(self._locate(group, tensor))
                    elif id(tensor) in self._name_of:  # unpartitioned: the parameter itself
                        work.append(self._locate(group, tensor, self._name_of[id(tensor)]))
                    else:
                        work += self._locate_fragments(group, tensor, tables)
                except ShardMismatchError as error:
                    mismatch = mismatch or error
        self._agree_on_state(work, mismatch, names, sharded=bool(tables))
        self._reduce_straddling_blocks(work, tables)
        for state in {id(item.root or item.state): item.root or item.state for item in work}.values():
            state["step"] += 1
        work = [piece for item in work for piece in _uniform_pieces(item)]
        if self.implementation in ("reference", "compiled"):
            for item in work:
                if self.implementation == "reference":
                    self._reference_update(item)
                else:
                    compiled_update(item, self._hyper(item), list(self._segments(item)))
            return loss
        rest = []
        for item in work:
            if self._use_fused(item):
                self._fused_update(item)
            else:
                rest.append(item)
        if rest:
            self._foreach_update(rest)
        return loss

    def _agree_on_state(self, work: list, mismatch: Optional[ShardMismatchError], names: set,
                        sharded: bool = False) -> None:
        """Raises on every rank if any rank holds state for another slice, before anything changes.

        Checked on the first step of each group after construction or loading, so that a rank
        whose own state happens to fit never waits alone in the block all-reduce.
        """
        unverified = names - self._verified_groups
        sharded = sharded or any(item.sharded for item in work) or (mismatch is not None and mismatch.sharded)
        if unverified and sharded and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([1.0 if mismatch else 0.0], device=work[0].param.device if work else "cpu")
            if "nccl" in str(dist.get_backend(self.process_group)) and flag.device.type == "cpu":
                flag = flag.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
            if flag.item() and mismatch is None:
                mismatch = ShardMismatchError(
                    "Adam-mini: another rank holds optimizer state saved at another data-parallel world size; "
                    "resume with the world size the checkpoint was saved at, or start the optimizer afresh.")
        if mismatch is not None:
            raise mismatch
        self._verified_groups |= unverified

    def _use_fused(self, item: _Work) -> bool:
        if self.implementation not in ("auto", "fused") or not kernels.supports(item.param):
            return False
        if item.grad.dtype != item.param.dtype or not (item.param.is_contiguous() and item.grad.is_contiguous()):
            return False
        available = kernels.load() is not None
        if not available and self.implementation == "fused":
            raise RuntimeError("Adam-mini: implementation='fused' but the CPU kernel could not be built")
        return available

    def _reduce_straddling_blocks(self, work: list, tables: Sequence[dict] = ()) -> None:
        """Sums, across ranks, the squared gradients of blocks cut by a shard boundary.

        One all-reduce per process group and step, of one slot per cut block: with one
        parameter per group every rank lists the same cut blocks in the same order; a shared
        group's slots come from its table (the same on every rank, whether or not this rank
        holds any cut block). Each rank adds its partial sums, zero for blocks it lacks.
        """
        plans = {}  # id(process group) -> [process group, slot count, items]
        for table in tables:
            plan = plans.setdefault(id(table["process_group"]), [table["process_group"], 0, []])
            plan[1] = max(plan[1], len(table["slots"]))
        for item in work:
            if not item.straddle_blocks:
                continue
            plan = plans.setdefault(id(item.process_group), [item.process_group, 0, []])
            if item.slots is None:
                item.slots = list(range(plan[1], plan[1] + len(item.straddle_blocks)))
                plan[1] += len(item.straddle_blocks)
            plan[2].append(item)
        for process_group, slot_count, items in plans.values():
            if not slot_count:
                continue
            device = items[0].param.device if items else (work[0].param.device if work else torch.device("cpu"))
            if "nccl" in str(dist.get_backend(process_group)) and device.type == "cpu":
                device = torch.device("cuda", torch.cuda.current_device())  # ZeRO-Offload: NCCL takes GPU tensors
            partial = torch.zeros(slot_count, dtype=torch.float64, device=device)
            for item in items:
                for block, sq in self._edge_block_sums(item):
                    if block in item.straddle_blocks:
                        partial[item.slots[item.straddle_blocks.index(block)]] += sq
            dist.all_reduce(partial, group=process_group)
            totals = partial.tolist()
            for item in items:
                first_block, last_block = item.blocks
                for slot, block in zip(item.slots, item.straddle_blocks):
                    if block == first_block:
                        item.first_sq = totals[slot]
                    if block == last_block - 1:
                        item.last_sq = totals[slot]

    @staticmethod
    def _edge_block_sums(item: _Work) -> list:
        """Local sums of squares of the first and last block touched (their held parts only)."""
        first_block, last_block = item.blocks
        if last_block == first_block:
            return []
        layout, grad = item.layout, item.grad
        head = min(grad.numel(), layout.block_bounds(first_block)[1] - item.start)
        sums = [(first_block, float(grad[:head].double().square().sum()))]
        if last_block - 1 > first_block:
            tail = (item.start + grad.numel()) - layout.block_bounds(last_block - 1)[0]
            sums.append((last_block - 1, float(grad[grad.numel() - tail:].double().square().sum())))
        return sums

    @staticmethod
    def _hyper(item: _Work) -> dict:
        group, step = item.group, item.step
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        # A shared group's weight decay applies to the parameters whose layout decays.
        weight_decay = group["weight_decay"] if item.layout.weight_decay else 0.0
        return dict(beta1=beta1, beta2=beta2, eps=group["eps"], lr=lr, weight_decay=weight_decay,
                    bias_correction1=1 - beta1 ** step, bias_correction2_sqrt=math.sqrt(1 - beta2 ** step))

    def _fused_update(self, item: _Work) -> None:
        kernels.fused_update(item.param, item.grad, item.state["exp_avg"], item.state["block_sq_avg"],
                             item.block_offset, item.layout.block_numel, item.first_sq, item.last_sq,
                             **self._hyper(item))

    def _reference_update(self, item: _Work) -> None:
        """Plain single-tensor Adam-mini: every block padded out to full size, no shortcuts. The
        arithmetic is in the block statistics' dtype (fp32 for bf16/fp16 parameters); the parameter
        and `exp_avg` are each rounded once to their own dtype."""
        h = self._hyper(item)
        block_numel, offset = item.layout.block_numel, item.block_offset
        exp_avg, block_sq_avg = item.state["exp_avg"].view(-1), item.state["block_sq_avg"]
        compute = block_sq_avg.dtype
        grad = item.grad.to(compute)
        n, num_blocks = grad.numel(), block_sq_avg.numel()
        padded = grad.new_zeros(num_blocks * block_numel)
        padded[offset:offset + n] = grad * grad
        block_sq = padded.view(num_blocks, block_numel).sum(dim=1)
        if not math.isnan(item.first_sq):
            block_sq[0] = item.first_sq
        if not math.isnan(item.last_sq):
            block_sq[-1] = item.last_sq
        block_sq_avg.mul_(h["beta2"]).add_(block_sq / block_numel, alpha=1 - h["beta2"])
        momentum = exp_avg.to(compute).lerp_(grad, 1 - h["beta1"])
        exp_avg.copy_(momentum)
        denom = (block_sq_avg.sqrt() / h["bias_correction2_sqrt"]).add_(h["eps"])
        param = item.param.to(compute).mul_(1 - h["lr"] * h["weight_decay"])
        param.addcdiv_(momentum, denom.repeat_interleave(block_numel)[offset:offset + n],
                       value=-h["lr"] / h["bias_correction1"])
        item.param.copy_(param)

    def _foreach_update(self, items: list) -> None:
        """Vectorised update: foreach over tensors for m and decay, block views for the rest.

        bf16/fp16 parameters take the same arithmetic in fp32 (their block statistics' dtype): the
        moment and the parameter are rounded once each to their own dtype, and the step uses the
        moment before its rounding.
        """
        same = [item for item in items if item.state["block_sq_avg"].dtype == item.param.dtype]
        exp_avgs = {id(item): item.state["exp_avg"].view(-1) for item in same}
        by_beta1 = {}
        for item in same:
            by_beta1.setdefault(item.group["betas"][0], []).append(item)
        for beta1, group in by_beta1.items():
            torch._foreach_lerp_([exp_avgs[id(item)] for item in group], [item.grad for item in group], 1 - beta1)
        for item in items:
            h = self._hyper(item)
            block_sq = self._block_sums(item)
            block_sq_avg = item.state["block_sq_avg"]
            block_sq_avg.mul_(h["beta2"]).add_(block_sq.div_(item.layout.block_numel), alpha=1 - h["beta2"])
            scale = (block_sq_avg.sqrt() / h["bias_correction2_sqrt"]).add_(h["eps"]).reciprocal_()
            scale.mul_(-h["lr"] / h["bias_correction1"])
            if id(item) in exp_avgs:
                param, exp_avg = item.param, exp_avgs[id(item)]
            else:
                param = item.param.to(scale.dtype)
                exp_avg = item.state["exp_avg"].view(-1).to(scale.dtype).lerp_(item.grad.to(scale.dtype),
                                                                               1 - h["beta1"])
                item.state["exp_avg"].view(-1).copy_(exp_avg)
            if h["weight_decay"]:
                param.mul_(1 - h["lr"] * h["weight_decay"])
            for segment, (lo, hi), (first, last) in self._segments(item):
                p, m = param[lo:hi], exp_avg[lo:hi]
                if segment == "body":
                    p.view(last - first, -1).addcmul_(m.view(last - first, -1), scale[first:last].unsqueeze(1))
                else:
                    p.add_(m * scale[first])
            if param is not item.param:
                item.param.copy_(param)

    @staticmethod
    def _segments(item: _Work):
        """Splits the held elements into a cut first block, whole blocks, and a cut last block.

        Yields (kind, element range, local block range).
        """
        block_numel, n = item.layout.block_numel, item.grad.numel()
        head = min(n, (block_numel - item.block_offset) % block_numel)
        whole = (n - head) // block_numel
        block = 0
        if head:
            yield "edge", (0, head), (0, 1)
            block = 1
        if whole:
            yield "body", (head, head + whole * block_numel), (block, block + whole)
            block += whole
        if head + whole * block_numel < n:
            yield "edge", (head + whole * block_numel, n), (block, block + 1)

    def _block_sums(self, item: _Work) -> torch.Tensor:
        """Each block's sum of squared gradients, in the block statistics' dtype."""
        block_sq_avg = item.state["block_sq_avg"]
        block_sq = block_sq_avg.new_zeros(block_sq_avg.numel())
        for segment, (lo, hi), (first, last) in self._segments(item):
            if segment == "body":
                rows = item.grad[lo:hi].view(last - first, -1)
                block_sq[first:last] = torch.linalg.vector_norm(rows, dim=1, dtype=block_sq.dtype).square_()
            else:
                block_sq[first] = item.grad[lo:hi].to(block_sq.dtype).square().sum()
        if not math.isnan(item.first_sq):
            block_sq[0] = item.first_sq
        if not math.isnan(item.last_sq):
            block_sq[-1] = item.last_sq
        return block_sq

    # ---- memory accounting -----------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds now."""
        return sum(value.numel() * value.element_size() for state in self.state.values()
                   for value in state.values() if isinstance(value, torch.Tensor))

    def planned_state_numel(self, world_size: int = 1, rank: int = 0, zero_stage: int = 0) -> tuple[int, int]:
        """(m elements, v elements) `rank` will hold under ZeRO `zero_stage` at `world_size`.

        Uses the same slice arithmetic and `BlockLayout.state_numel` that size the real state,
        for one group per parameter (the default); with `shared_groups=True` the pieces follow
        DeepSpeed's flat partition of the whole group, and `state_bytes()` is the figure.
        """
        m_total = v_total = 0
        for layout in self._layouts.values():
            start, end = shard_bounds(layout.numel, world_size, rank, zero_stage)
            m_numel, v_numel = layout.state_numel(start, end)
            m_total += m_numel
            v_total += v_numel
        return m_total, v_total

    def planned_state_bytes(self, world_size: int = 1, rank: int = 0, zero_stage: int = 0,
                            bytes_per_element: int = 4) -> int:
        """Bytes of state `rank` will hold (fp32 master state by default)."""
        return sum(self.planned_state_numel(world_size, rank, zero_stage)) * bytes_per_element


__all__ = ["Adam_mini", "ShardMismatchError", "shard_bounds", "geometry_from_model"]
