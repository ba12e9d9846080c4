"""Packed micro-batches (`data.packing`): rows concatenated into one sequence instead of padded.

    train, eval, collate = batch_layout(config.data, train, eval, tokenizer.pad_token_id)
    engine(**model_inputs(batch), labels=batch["labels"])

Rows are grouped once, before training, into packs of at most `data.packing_tokens` tokens (best-fit
decreasing, TRL's `bfd` strategy), and the packs are the items the sampler shuffles and deals out:
`engine.micro_batch_size` counts packs. So DeepSpeed's micro-batch, the accumulation window, the steps
of an epoch and a resumed run's data position are counted in packs exactly as they are in rows
unpacked, and every rank runs the same number of micro-batches. What changes is how many rows a step
trains on (as many as fill the packs), and the logged `tokens` are the real tokens, as padded.

A micro-batch's packs become one sequence (1, N), N <= micro_batch_size x packing_tokens, with
`position_ids` restarting at 0 at each row and no attention mask. transformers reads such positions as
packed rows (`masking_utils.find_packed_sequence_indices`, `modeling_flash_attention_utils`): flash
attention runs its variable-length kernel, SDPA and eager attention get a block-diagonal causal mask,
so no token attends to another row. Labels are -100 at each row's first token, so a row's last token
never learns to predict the next row's first. Models whose attention masks come from transformers'
`create_causal_mask` (Llama, Mistral, Qwen, Gemma, GPT-2 and most others) support this.

Losses: SFT's mean over the answer tokens of the micro-batch counts the same tokens as padded; a pair's
chosen and rejected sequences share a pack, and `sequence_sums` / `sequence_ends` give DPO's summed
log-probs and the reward model's score per sequence. A packed micro-batch therefore has the loss and
gradients of the padded batch of the same rows (tests/pipeline/test_packing.py, 1e-5 in fp32).
"""
from __future__ import annotations

import bisect
import logging
from typing import Callable, Sequence

import pyarrow.compute as pc
import torch

from .config import DataConfig
from .data import IGNORE_INDEX, collate_pairwise, collate_sft

logger = logging.getLogger(__name__)


def pack_indices(lengths: Sequence[int], budget: int) -> list:
    """Row indices grouped into packs of at most `budget` tokens, best fit decreasing: the longest row
    first, each into the pack it fills the most (a new pack when none has room). Rows keep file order
    within a pack; packs come in the order they were opened.

    Raises:
        ValueError: a row longer than `budget` (the config's validation keeps rows within it).
    """
    packs, rooms = [], []  # rooms: sorted (room left, pack index)
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        if length > budget:
            raise ValueError(f"row {index} has {length} tokens, more than a pack's {budget}")
        fit = bisect.bisect_left(rooms, (length, -1))
        if fit == len(rooms):
            packs.append([index])
            bisect.insort(rooms, (budget - length, len(packs) - 1))
        else:
            room, pack = rooms.pop(fit)
            packs[pack].append(index)
            bisect.insort(rooms, (room - length, pack))
    return [sorted(pack) for pack in packs]


def row_lengths(dataset) -> list:
    """Tokens per row of a tokenised split: `input_ids`, or a pair's chosen plus rejected (read from the
    Arrow columns, without building the rows)."""
    table = dataset.with_format("arrow")
    if "input_ids" in dataset.column_names:
        return pc.list_value_length(table["input_ids"]).to_pylist()
    chosen, rejected = (pc.list_value_length(table[name]) for name in ("chosen_input_ids", "rejected_input_ids"))
    return pc.add(chosen, rejected).to_pylist()


class PackedRows(torch.utils.data.Dataset):
    """A tokenised split as packs: item i is the list of rows (dicts) of pack i."""

    def __init__(self, dataset, budget: int):
        self.dataset, self.budget = dataset, budget
        self.lengths = row_lengths(dataset)
        self.packs = pack_indices(self.lengths, budget)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> list:
        return [self.dataset[row] for row in self.packs[index]]

    def fill(self) -> float:
        """Real tokens over the packs' capacity."""
        return sum(self.lengths) / (len(self.packs) * self.budget) if self.packs else 0.0


def _packed(sequences: list, labels: list) -> dict:
    """One (1, N) sequence of `sequences` (token id lists) with positions restarting at each, and their
    `labels` with IGNORE_INDEX at each sequence's first token."""
    positions = [torch.arange(len(ids)) for ids in sequences]
    labels = [torch.as_tensor(row, dtype=torch.long).index_fill(0, torch.tensor([0]), IGNORE_INDEX)
              for row in labels]
    return {"input_ids": torch.cat([torch.as_tensor(ids, dtype=torch.long) for ids in sequences])[None],
            "labels": torch.cat(labels)[None], "position_ids": torch.cat(positions)[None]}


def collate_packed_sft(packs: list) -> dict:
    """The rows of a micro-batch's packs as one sequence: `input_ids`, `labels` (answer tokens, IGNORE_INDEX
    elsewhere and at every row's first token) and `position_ids`, each (1, N); no padding."""
    rows = [row for pack in packs for row in pack]
    return _packed([row["input_ids"] for row in rows], [row["labels"] for row in rows])


def collate_packed_pairwise(packs: list) -> dict:
    """The pairs of a micro-batch's packs as one sequence, every chosen sequence before every rejected one
    in pair order (as `collate_pairwise` stacks them): `input_ids` and `position_ids` (1, N), and where rows
    carry `prompt_length`, `labels` (1, N) on the answer tokens only."""
    pairs = [row for pack in packs for row in pack]
    sequences = [row["chosen_input_ids"] for row in pairs] + [row["rejected_input_ids"] for row in pairs]
    if not all("prompt_length" in row for row in pairs):
        return {name: value for name, value in _packed(sequences, sequences).items() if name != "labels"}
    prompts = [row["prompt_length"] for row in pairs] * 2
    labels = [[IGNORE_INDEX] * prompt + list(ids[prompt:]) for ids, prompt in zip(sequences, prompts)]
    return _packed(sequences, labels)


def batch_layout(data: DataConfig, train_set, eval_set, pad_token_id: int) -> tuple:
    """(train items, eval items, collate) for sft, chat or pairwise data: the rows and a padding collator,
    or with `data.packing` their packs and a packing collator."""
    pairwise = data.format == "pairwise"
    if not data.packing:
        collate = collate_pairwise if pairwise else collate_sft
        return train_set, eval_set, lambda rows: collate(rows, pad_token_id)
    budget = data.pack_tokens()
    train_packs, eval_packs = PackedRows(train_set, budget), PackedRows(eval_set, budget)
    logger.info("packed %d training rows into %d packs of at most %d tokens (%.0f%% full), %d eval rows into %d",
                len(train_set), len(train_packs), budget, 100 * train_packs.fill(), len(eval_set), len(eval_packs))
    collate: Callable = collate_packed_pairwise if pairwise else collate_packed_sft
    return train_packs, eval_packs, collate


# ---- a batch's forward inputs and per-sequence reductions ------------------------------------------

def is_packed(batch: dict) -> bool:
    return "position_ids" in batch


def model_inputs(batch: dict) -> dict:
    """A collated batch's forward inputs: ids and the padding mask, or for a packed batch ids and positions
    (no mask: transformers then keeps attention within each row). A causal LM also needs `use_cache=False`:
    transformers looks for packed rows only where there is no KV cache, and makes one unless told not to."""
    if is_packed(batch):
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def token_count(batch: dict) -> torch.Tensor:
    """The real (not padding) tokens of a collated batch."""
    if is_packed(batch):
        return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)
    return batch["attention_mask"].sum()


def sequence_index(position_ids: torch.Tensor) -> torch.Tensor:
    """(1, N) positions restarting at 0 per sequence -> (N,) the sequence each token belongs to."""
    return (position_ids[0] == 0).cumsum(0) - 1


def sequence_sums(values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """values (1, N) per token of a packed batch -> (S,) their sum per sequence, in order."""
    index = sequence_index(position_ids)
    count = int((position_ids == 0).sum())
    return values.new_zeros(count).index_add(0, index, values[0])


def sequence_ends(position_ids: torch.Tensor) -> torch.Tensor:
    """(1, N) packed positions -> (S,) the index of each sequence's last token."""
    starts = torch.nonzero(position_ids[0] == 0).flatten()
    return torch.cat([starts[1:] - 1, starts.new_tensor([position_ids.shape[1] - 1])])


__all__ = ["pack_indices", "row_lengths", "PackedRows", "collate_packed_sft", "collate_packed_pairwise",
           "batch_layout", "is_packed", "model_inputs", "token_count", "sequence_index", "sequence_sums",
           "sequence_ends"]
