"""Packed micro-batches (pipeline.packing) against the padded batch of the same rows: attention stays within
each row (logits of every row as in its own forward), and SFT, DPO and reward-model losses and gradients
are the padded ones within 1e-5 in fp32; the packing itself by hand; bad settings named by field."""
import json
import random

import pytest
import torch

from pipeline.config import ConfigError, DataConfig, load_config
from pipeline.data import collate_pairwise, collate_sft, prepare_dataset
from pipeline.models import RewardModel
from pipeline.packing import PackedRows, batch_layout, collate_packed_pairwise, collate_packed_sft, pack_indices
from pipeline.rl.models import Models
from stages.dpo import DpoSection, dpo_step
from stages.reward import reward_step
from stages.sft import SFTConfig, sft_step
from tests.tiny_models import TINY_WORDS, tiny_llama, tiny_tokenizer

TOLERANCE = 1e-5  # fp32, packed against padded


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def words(rng, count: int) -> str:
    return " ".join(rng.choice(TINY_WORDS) for _ in range(count))


def prepared(tokenizer, tmp_path, fmt: str, count: int = 6):
    """`count` rows of lengths from 4 to ~30 tokens, prepared as a stage prepares them (`fmt` sft or pairwise)."""
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        prompt = words(rng, rng.randint(1, 8))
        rows.append({"prompt": prompt, "response": " " + words(rng, rng.randint(1, 20))} if fmt == "sft" else
                    {"prompt": prompt, "chosen": " " + words(rng, rng.randint(1, 12)),
                     "rejected": " " + words(rng, rng.randint(1, 12))})
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DataConfig(path=str(path), format=fmt, eval_path=str(path), max_length=32, max_prompt_length=16,
                        cache=False)
    train, _, _ = prepare_dataset(config, tokenizer, seed=0)
    return config, train


def model_for(tokenizer, seed: int = 0, attention: str = "sdpa"):
    model = tiny_llama(seed=seed, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model.config._attn_implementation = attention
    return model


def loss_and_grads(step, model, batch) -> tuple:
    model.zero_grad()
    loss = step(batch)[0]
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(padded: tuple, packed: tuple) -> None:
    (loss, grads), (packed_loss, packed_grads) = padded, packed
    assert abs(packed_loss - loss) <= TOLERANCE * max(1.0, abs(loss))
    assert grads.keys() == packed_grads.keys() and grads
    for name, grad in grads.items():
        assert (packed_grads[name] - grad).abs().max() <= TOLERANCE * max(1.0, grad.abs().max()), name


# ---- grouping rows into packs --------------------------------------------------------------------------

def test_best_fit_decreasing_by_hand():
    # Longest first: 7 opens a pack (room 1); 5 opens one (room 3); 4 fits neither (room 1, 3) and opens a
    # third (room 4); 3 goes where it leaves the least room (the second, room 0); 2 into the third.
    assert pack_indices([5, 3, 7, 2, 4], budget=8) == [[2], [0, 1], [3, 4]]
    lengths = [random.Random(seed).randint(1, 50) for seed in range(200)]
    packs = pack_indices(lengths, budget=64)
    assert sorted(row for pack in packs for row in pack) == list(range(200))
    assert all(sum(lengths[row] for row in pack) <= 64 for pack in packs)
    assert len(packs) <= 1.1 * sum(lengths) / 64 + 1  # nearly full: within a tenth of the least possible
    with pytest.raises(ValueError, match="row 1 has 9 tokens"):
        pack_indices([3, 9], budget=8)


def test_packed_sft_batch_restarts_positions_and_masks_each_row_start():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = collate_packed_sft([rows[:1], rows[1:]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # The second row's first token is not learned from the first row's last: -100 there.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in batch


def test_packed_pairs_put_every_chosen_sequence_before_every_rejected_one():
    pairs = [{"chosen_input_ids": [5, 6, 7], "rejected_input_ids": [5, 8], "prompt_length": 1},
             {"chosen_input_ids": [9, 10], "rejected_input_ids": [9, 11, 12], "prompt_length": 1}]
    batch = collate_packed_pairwise([pairs])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 10, 5, 8, 9, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 10, -100, 8, -100, 11, 12]]


def test_packs_of_a_prepared_split_hold_every_row_within_the_budget(tokenizer, tmp_path):
    config, train = prepared(tokenizer, tmp_path, "pairwise", count=12)
    packs = PackedRows(train.select(range(11, -1, -1)), budget=40)  # a selection, as the eval split is
    rows = [row for index in range(len(packs)) for row in packs[index]]
    assert sorted(row["chosen_input_ids"] + row["rejected_input_ids"] for row in rows) == sorted(
        row["chosen_input_ids"] + row["rejected_input_ids"] for row in train)
    assert all(sum(len(row["chosen_input_ids"]) + len(row["rejected_input_ids"]) for row in pack) <= 40
               for pack in (packs[index] for index in range(len(packs))))
    assert len(packs) < len(train)


# ---- attention stays within rows -------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_attention_never_crosses_rows(tokenizer, attention):
    """Each row's logits in the packed forward are those of the row alone: a token that saw another row
    would differ."""
    model = model_for(tokenizer, attention=attention).eval()
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(4, len(tokenizer), (length,), generator=generator).tolist() for length in (7, 3, 12, 1, 5)]
    batch = collate_packed_sft([[{"input_ids": ids, "labels": ids} for ids in rows]])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in rows]
    assert torch.allclose(packed, torch.cat(alone), atol=1e-5, rtol=0)
    # The same tokens without restarted positions (one long row) attend across: the check can fail.
    with torch.no_grad():
        unpacked = model(input_ids=batch["input_ids"]).logits[0]
    assert not torch.allclose(unpacked, torch.cat(alone), atol=1e-3, rtol=0)


# ---- losses and gradients: packed = padded --------------------------------------------------------------

def test_sft_loss_and_gradients_packed_equal_padded(tokenizer, tmp_path):
    config, train = prepared(tokenizer, tmp_path, "sft")
    rows = [train[index] for index in range(len(train))]
    model = model_for(tokenizer)
    step = lambda batch: sft_step(model, batch)  # noqa: E731
    padded = loss_and_grads(step, model, collate_sft(rows, tokenizer.pad_token_id))
    packed = loss_and_grads(step, model, collate_packed_sft([rows[:2], rows[2:]]))
    assert_same_loss_and_grads(padded, packed)
    # Counted tokens are the real ones either way.
    assert sft_step(model, collate_packed_sft([rows]))[1]["tokens"] == sum(len(row["input_ids"]) for row in rows)


def test_dpo_loss_and_gradients_packed_equal_padded(tokenizer, tmp_path):
    config, train = prepared(tokenizer, tmp_path, "pairwise")
    pairs = [train[index] for index in range(len(train))]
    actor, reference = model_for(tokenizer, seed=0), model_for(tokenizer, seed=1).requires_grad_(False)
    models, dpo = Models(actor=actor, reference=reference, tokenizer=tokenizer), DpoSection(beta=0.5)
    step = lambda batch: dpo_step(models, batch, dpo)  # noqa: E731
    padded_batch = collate_pairwise(pairs, tokenizer.pad_token_id)
    packed_batch = collate_packed_pairwise([pairs[:3], pairs[3:]])
    assert_same_loss_and_grads(loss_and_grads(step, actor, padded_batch), loss_and_grads(step, actor, packed_batch))
    # The per-pair log-probs behind the loss, one by one.
    padded_sums, packed_sums = step(padded_batch)[1], step(packed_batch)[1]
    for name in ("logps/chosen", "logps/rejected", "rewards/margins"):
        assert packed_sums[name].item() == pytest.approx(padded_sums[name].item(), abs=TOLERANCE)


def test_reward_loss_and_gradients_packed_equal_padded(tokenizer, tmp_path):
    config, train = prepared(tokenizer, tmp_path, "pairwise")
    pairs = [train[index] for index in range(len(train))]
    torch.manual_seed(0)
    model = RewardModel(model_for(tokenizer).model)
    step = lambda batch: reward_step(model, batch)  # noqa: E731
    padded_batch = collate_pairwise(pairs, tokenizer.pad_token_id)
    packed_batch = collate_packed_pairwise([pairs])
    assert_same_loss_and_grads(loss_and_grads(step, model, padded_batch), loss_and_grads(step, model, packed_batch))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=packed_batch["input_ids"], position_ids=packed_batch["position_ids"]),
                              model(padded_batch["input_ids"], padded_batch["attention_mask"]), atol=TOLERANCE)


def test_batch_layout_packs_train_and_eval_with_the_default_budget(tokenizer, tmp_path):
    config, train = prepared(tokenizer, tmp_path, "sft", count=8)
    config.packing = True
    packed_train, packed_eval, collate = batch_layout(config, train, train, tokenizer.pad_token_id)
    assert packed_train.budget == config.max_length  # one longest row
    batch = collate([packed_train[index] for index in range(len(packed_train))])
    assert batch["input_ids"].shape == (1, sum(len(row["input_ids"]) for row in train))


# ---- settings ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["data.packing_tokens=1024"], "`data.packing_tokens` is set but `data.packing` is false"),
    (["data.packing=true", "data.packing_tokens=100"],
     "`data.packing_tokens` is 100; a pack must hold the longest row, so use at least `data.max_length` (512)"),
    (["data.packing=true", "data.format=pairwise", "data.packing_tokens=600"],
     "`data.packing_tokens` is 600; a pack must hold the longest row, so use at least 2 x `data.max_length` (1024)"),
    (["data.packing=true", "data.format=prompt"], "`data.packing` is true with `data.format` 'prompt'"),
])
def test_bad_packing_settings_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(SFTConfig, None, ["model.path=m", "data.path=d", *overrides])
    assert message in str(error.value)
