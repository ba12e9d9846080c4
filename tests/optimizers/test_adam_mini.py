"""Adam-mini's arithmetic: against the official package, across its three update paths,
through state_dict round-trips, its memory on Llama-2-7B, and inside a TRL trainer."""
import copy
import io
import math

import adam_mini as official
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from optimizers import Adam_mini
from optimizers.adam_mini import _Work
from optimizers.partition import BlockLayout
from tests.tiny_models import tiny_llama

GQA = dict(dim=96, n_heads=3, n_kv_heads=1)
HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def train(model, optimizer, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 203, (4, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def max_delta(model_a, model_b):
    b = dict(model_b.named_parameters())
    return max((p - b[n]).abs().max().item() for n, p in model_a.named_parameters())


@pytest.mark.parametrize("implementation", ["fused", "foreach", "reference"])
def test_matches_official_package_over_20_steps(implementation):
    # Llama with GQA and no biases: where official 1.1.1 works (one process, no DeepSpeed).
    model = tiny_llama(mlp_bias=False)
    theirs = copy.deepcopy(model)
    ours_optimizer = Adam_mini(model.named_parameters(), **HYPER, **GQA, implementation=implementation)
    official_optimizer = official.Adam_mini(theirs.named_parameters(), lr=HYPER["lr"], betas=HYPER["betas"],
                                            eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], verbose=False,
                                            **GQA)
    train(model, ours_optimizer, 20)
    train(theirs, official_optimizer, 20)
    assert max_delta(model, tiny_llama(mlp_bias=False)) > 1e-2  # it really trained
    assert max_delta(model, theirs) <= 1e-6


def _shard_items(optimizer, layout, param, grad, cuts):
    """Splits one parameter at `cuts` as ranks would hold it, with the cross-rank block sums filled in."""
    bounds = [0, *cuts, layout.numel]
    full_sq = grad.view(-1, layout.block_numel).square().sum(dim=1)
    items = []
    for start, end in zip(bounds, bounds[1:]):
        first, last = layout.blocks_touched(start, end)
        group = {"lr": HYPER["lr"], "betas": HYPER["betas"], "eps": HYPER["eps"], "weight_decay": 0.1, "name": "w"}
        state = {"step": 1, "exp_avg": torch.zeros(end - start, dtype=param.dtype),
                 "block_sq_avg": torch.zeros(last - first, dtype=param.dtype)}
        item = _Work(layout, param.view(-1)[start:end], grad.view(-1)[start:end], state, group, start, [])
        if start % layout.block_numel:
            item.first_sq = full_sq[first].item()
        if end % layout.block_numel:
            item.last_sq = full_sq[last - 1].item()
        items.append(item)
    return items


@pytest.mark.parametrize("cuts", [[], [13], [13, 27, 58], [3, 5]], ids=["whole", "one-cut", "three-cuts", "inside-one-block"])
def test_update_paths_agree_in_float64_on_cut_blocks(cuts):
    # 7 rows of 10: cuts fall inside rows, several in one row, and slices shorter than a row.
    layout = BlockLayout("w", (7, 10), "row", 10, True)
    generator = torch.Generator().manual_seed(0)
    param0 = torch.randn(70, dtype=torch.float64, generator=generator)
    grad = torch.randn(70, dtype=torch.float64, generator=generator)
    optimizer = Adam_mini([("mlp.weight", torch.nn.Parameter(param0.view(7, 10).clone()))])
    results = {}
    for path in ("reference", "foreach", "fused"):
        param = param0.clone()
        items = _shard_items(optimizer, layout, param, grad, cuts)
        for item in items:
            if path == "reference":
                optimizer._reference_update(item)
            elif path == "fused":
                optimizer._fused_update(item)
        if path == "foreach":
            optimizer._foreach_update(items)
        results[path] = param
    # The unsharded reference, by hand: one v per row, Adam's bias corrections at step 1.
    v = (1 - 0.95) * grad.view(7, 10).square().mean(dim=1)
    denom = (v.sqrt() / math.sqrt(1 - 0.95)).add(1e-8).repeat_interleave(10)
    expected = param0 * (1 - 1e-3 * 0.1) - 1e-3 / (1 - 0.9) * ((1 - 0.9) * grad) / denom
    for path, param in results.items():
        assert (param - expected).abs().max().item() <= 1e-14, path


def test_update_paths_agree_in_float64_over_training():
    models = {path: tiny_llama(dtype=torch.float64) for path in ("reference", "foreach", "fused")}
    for path, model in models.items():
        train(model, Adam_mini(model.named_parameters(), **HYPER, **GQA, implementation=path), 10)
    assert max_delta(models["foreach"], models["reference"]) <= 1e-12
    assert max_delta(models["fused"], models["reference"]) <= 1e-12


def test_bf16_parameters_take_the_foreach_path():
    model = tiny_llama(dtype=torch.bfloat16)
    before = copy.deepcopy(model)
    train(model, Adam_mini(model.named_parameters(), **HYPER, **GQA), 2)
    assert max_delta(model, before) > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_state_dict_round_trip_continues_the_same_trajectory():
    uninterrupted = tiny_llama()
    optimizer = Adam_mini(uninterrupted.named_parameters(), **HYPER, **GQA)
    train(uninterrupted, optimizer, 5)
    buffer = io.BytesIO()
    torch.save({"model": uninterrupted.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train(uninterrupted, optimizer, 5, seed=1)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors and Python values only
    resumed = tiny_llama(seed=99)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = Adam_mini(resumed.named_parameters(), **HYPER, **GQA)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    assert resumed_optimizer.state_bytes() == optimizer.state_bytes()
    train(resumed, resumed_optimizer, 5, seed=1)
    assert max_delta(resumed, uninterrupted) == 0.0


def test_llama2_7b_state_is_half_of_adamw():
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    numel = sum(p.numel() for p in model.parameters())
    optimizer = Adam_mini.from_model(model)
    adamw_bytes = 2 * numel * 4  # exp_avg and exp_avg_sq in fp32
    ratio = optimizer.planned_state_bytes() / adamw_bytes
    assert 0.5 < ratio <= 0.501
    # Sharded over 8 ranks, every rank still holds about half of AdamW's share.
    for stage in (1, 2, 3):
        per_rank = max(optimizer.planned_state_bytes(8, rank, stage) for rank in range(8))
        assert per_rank <= 0.501 * adamw_bytes / 8


def test_drives_trl_sft_trainer(tmp_path):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park"]
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    texts = ["the cat sat on the mat", "a dog ran to the park"] * 16
    model = tiny_llama(vocab_size=len(vocab), pad_token_id=0, eos_token_id=2)
    optimizer = Adam_mini.from_model(model, lr=3e-3, betas=(0.9, 0.95))
    config = SFTConfig(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, logging_steps=1,
                       report_to=[], use_cpu=True, save_strategy="no", max_length=16, seed=0,
                       dataset_text_field="text")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tokenizer, optimizers=(optimizer, None))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12
    assert {state["step"] for state in optimizer.state.values()} == {12}  # our optimizer took every step
    assert losses[-1] < 0.5 * losses[0]
