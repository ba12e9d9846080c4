"""Fused query/key/value projections: each architecture's layout against a partition built by
hand from that architecture's own split of the fused output, the update on it (whole and cut
at shard boundaries) against the per-block formula, and the same under real DeepSpeed ranks."""
import math
import re
import warnings

import pytest
import torch
from transformers import (BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM, GPT2Config,
                          GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, MptConfig, MptForCausalLM,
                          Phi3Config, Phi3ForCausalLM)

from optimizers import Adam_mini
from optimizers.adam_mini import _uniform_pieces, _Work
from optimizers.compiled import compiled_update
from tests.conftest import launch_ranks, read_json

HIDDEN, HEADS, HEAD_DIM = 48, 3, 16  # a 2-rank shard boundary falls inside a key head of GPT-NeoX
SMALL = dict(vocab_size=64, num_hidden_layers=1)


def neox(**overrides):
    return GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                            intermediate_size=96, **overrides))


def falcon(**overrides):
    return FalconForCausalLM(FalconConfig(**{**SMALL, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
                                             **overrides}))


def phi3():
    return Phi3ForCausalLM(Phi3Config(**SMALL, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=1,
                                      intermediate_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def with_rows(rows):
    """(1, 1, rows) tensor whose values are the row indices, to push through a model's own split."""
    return torch.arange(rows, dtype=torch.float32).view(1, 1, rows)


def groups(query, key, value):
    """Hand-built blocks: one per query head, one per distinct key head, one per value row.

    query, key: (heads, head_dim) row indices; value: row indices in any shape.
    """
    expected = {frozenset(head.tolist()): "query" for head in query.long()}
    expected.update({frozenset(head.tolist()): "key" for head in key.long()})
    expected.update({frozenset([row]): "value" for row in value.long().flatten().tolist()})
    return expected


def actual_groups(layout):
    """The layout's blocks as row sets, each named by its part; checks every row is in one block."""
    rows, cols = layout.shape
    part_of_element = []
    for part, numel, _ in layout.segments:
        part_of_element += [part] * (numel // cols)
    by_block = {}
    for row in range(rows):
        block = layout.block_of(row * cols)
        assert layout.block_of(row * cols + cols - 1) == block, f"row {row} split across blocks"
        by_block.setdefault(block, set()).add(row)
    for block, members in by_block.items():
        lo, hi = layout.block_bounds(block)
        assert hi - lo == len(members) * cols
    return {frozenset(members): part_of_element[min(members)] for members in by_block.values()}


def fused_layout(model, name):
    optimizer = Adam_mini.from_model(model)
    layout = next(l for l in optimizer.partition_report.layouts if l.name == name)
    assert layout.rule == "qkv" and not optimizer.partition_report.fallbacks
    return layout


def test_gpt_neox_interleaves_q_k_v_per_head():
    model = neox()
    layout = fused_layout(model, "gpt_neox.layers.0.attention.query_key_value.weight")
    # GPTNeoXAttention.forward: the output is viewed as (heads, 3 * head_dim), then chunked in three.
    per_head = torch.arange(3 * HIDDEN).view(HEADS, 3 * HEAD_DIM)
    query, key, value = per_head.chunk(3, dim=-1)
    assert actual_groups(layout) == groups(query, key, value)
    assert layout.split() == [{"part": "query", "blocks": 3, "block_numel": HEAD_DIM * HIDDEN},
                              {"part": "key", "blocks": 3, "block_numel": HEAD_DIM * HIDDEN},
                              {"part": "value", "blocks": HIDDEN, "block_numel": HIDDEN}]


@pytest.mark.parametrize("variant, kv_heads", [
    (dict(), 1),                                                  # multi-query (the config's default)
    (dict(multi_query=False), HEADS),                             # one key and value per head, interleaved
    (dict(new_decoder_architecture=True, num_kv_heads=1, num_attention_heads=6, hidden_size=96), 1),
    (dict(new_decoder_architecture=True, num_kv_heads=2, num_attention_heads=6, hidden_size=96), 2),
], ids=["multi_query", "per_head", "grouped_1", "grouped_2"])
def test_falcon_variants_follow_its_own_split(variant, kv_heads):
    model = falcon(**variant)
    layout = fused_layout(model, "transformer.h.0.self_attention.query_key_value.weight")
    rows = layout.shape[0]
    query, key, value = model.transformer.h[0].self_attention._split_heads(with_rows(rows))
    # (1, 1, heads, head_dim) each; grouped variants broadcast a key head to its query heads.
    assert actual_groups(layout) == groups(query[0, 0], key[0, 0], value[0, 0])
    assert [entry["blocks"] for entry in layout.split()][1] == kv_heads


def test_bloom_interleaves_per_head():
    model = BloomForCausalLM(BloomConfig(vocab_size=64, n_layer=1, hidden_size=HIDDEN, n_head=HEADS))
    layout = fused_layout(model, "transformer.h.0.self_attention.query_key_value.weight")
    query, key, value = model.transformer.h[0].self_attention._reshape(with_rows(3 * HIDDEN))
    # (1, heads, 1, head_dim) each.
    assert actual_groups(layout) == groups(query[0, :, 0], key[0, :, 0], value)


def test_phi3_concatenates_q_then_k_then_v_with_gqa():
    model = phi3()
    layout = fused_layout(model, "model.layers.0.self_attn.qkv_proj.weight")
    # Phi3Attention.forward slices the output at num_heads * head_dim and num_kv_heads * head_dim.
    rows = torch.arange((HEADS + 2) * HEAD_DIM)
    query_end = HEADS * HEAD_DIM
    query = rows[:query_end].view(HEADS, HEAD_DIM)
    key = rows[query_end:query_end + HEAD_DIM].view(1, HEAD_DIM)
    assert actual_groups(layout) == groups(query, key, rows[query_end + HEAD_DIM:])
    report = Adam_mini.from_model(model).partition_report
    data = report.as_dict()
    assert data["rule_counts"]["qkv"] == 1
    entry = next(p for p in data["parameters"] if p["rule"] == "qkv")
    assert entry["split"][1] == {"part": "key", "blocks": 1, "block_numel": HEAD_DIM * HIDDEN}
    assert entry["num_blocks"] == HEADS + 1 + HEAD_DIM
    table = str(report)
    assert re.search(r"qkv_proj\.weight\s+80x48\s+qkv \(concatenated\)\s+q:768 k:768 v:48\s+q:3 k:1 v:16", table)


def test_mpt_chunks_wqkv_in_three():
    model = MptForCausalLM(MptConfig(vocab_size=64, n_layers=1, d_model=HIDDEN, n_heads=HEADS))
    layout = fused_layout(model, "transformer.blocks.0.attn.Wqkv.weight")
    query, key, value = torch.arange(3 * HIDDEN).chunk(3)  # MptAttention: mixed_qkv.chunk(3, dim=2)
    assert actual_groups(layout) == groups(query.view(HEADS, HEAD_DIM), key.view(HEADS, HEAD_DIM), value)


def test_gpt2_conv1d_c_attn_stays_whole_and_says_why():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=1, n_embd=HIDDEN, n_head=HEADS))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = Adam_mini.from_model(model)
    layout = next(l for l in optimizer.partition_report.layouts if l.name == "transformer.h.0.attn.c_attn.weight")
    assert (layout.shape, layout.rule, layout.num_blocks, layout.fallback) == ((HIDDEN, 3 * HIDDEN), "tensor", 1, True)
    assert "Conv1D stores input x output" in layout.note
    assert any("c_attn.weight (a Conv1D stores input x output" in str(w.message) for w in caught)
    assert "transformer.h.0.attn.c_attn.weight: a Conv1D" in str(optimizer.partition_report)


def test_wrong_geometry_names_the_parameter_and_the_row_count():
    model = neox()
    with pytest.raises(ValueError, match=r"'gpt_neox.layers.0.attention.query_key_value.weight'.*144 rows, but "
                                         r"n_heads=6, n_kv_heads=2, head_dim=8 make 80"):
        Adam_mini(model.named_parameters(), dim=HIDDEN, n_heads=6, n_kv_heads=2)
    with pytest.raises(ValueError, match="Invalid qkv_layout value: 'rows'"):
        Adam_mini(model.named_parameters(), dim=HIDDEN, n_heads=HEADS, qkv_layout="rows")


HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def expected_first_step(param, grad, layout):
    """Step 1 by hand from the hand-built blocks: m_hat = g, v_hat = the block's mean square."""
    denom = torch.empty_like(grad).view(-1)
    flat = grad.reshape(-1)
    for block in range(layout.num_blocks):
        lo, hi = layout.block_bounds(block)
        denom[lo:hi] = flat[lo:hi].square().mean().sqrt() + HYPER["eps"]
    return param * (1 - HYPER["lr"] * HYPER["weight_decay"]) - HYPER["lr"] * grad / denom.view_as(grad)


def neox_fp64_with_grads(seed=0):
    torch.manual_seed(seed)
    model = neox().double()
    ids = torch.randint(0, 64, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    return model


@pytest.mark.parametrize("implementation", ["reference", "foreach", "fused", "compiled"])
def test_update_on_fused_projection_matches_hand_built_blocks(implementation):
    model = neox_fp64_with_grads()
    weight = model.gpt_neox.layers[0].attention.query_key_value.weight
    optimizer = Adam_mini.from_model(model, **HYPER, implementation=implementation)
    layout = next(l for l in optimizer.partition_report.layouts if l.name.endswith("query_key_value.weight"))
    expected = expected_first_step(weight.detach().clone(), weight.grad.clone(), layout)
    optimizer.step()
    assert (weight.detach() - expected).abs().max().item() <= 1e-15


# A head of the fused (144, 48) weight spans 2304 elements: query 0-767, key 768-1535, values
# 1536-2303 (rows of 48).
@pytest.mark.parametrize("cuts", [[1000], [2305, 2306], [100, 3000, 5000], [1536 + 47]],
                         ids=["key-head", "query-head-one-element", "three", "value-row"])
def test_cut_fused_projection_matches_whole(cuts):
    """Slices as ranks hold them (cut inside query heads, key heads and value rows), with the
    cross-rank sums of the cut blocks filled in as the all-reduce would: every update path
    must give the unsharded result."""
    model = neox_fp64_with_grads()
    weight = model.gpt_neox.layers[0].attention.query_key_value.weight
    optimizer = Adam_mini.from_model(model, **HYPER)
    layout = next(l for l in optimizer.partition_report.layouts if l.name.endswith("query_key_value.weight"))
    grad = weight.grad.reshape(-1)
    expected = expected_first_step(weight.detach().clone(), weight.grad.clone(), layout).reshape(-1)
    block_sq = [grad[slice(*layout.block_bounds(b))].square().sum().item() for b in range(layout.num_blocks)]
    bounds = [0, *cuts, layout.numel]
    for implementation in ("reference", "foreach", "fused", "compiled"):
        optimizer.implementation = implementation
        param = weight.detach().reshape(-1).clone()
        work = []
        for start, end in zip(bounds, bounds[1:]):
            first, last = layout.blocks_touched(start, end)
            state = {"step": 1, "exp_avg": torch.zeros(end - start, dtype=torch.float64),
                     "block_sq_avg": torch.zeros(last - first, dtype=torch.float64)}
            item = _Work(layout, param[start:end], grad[start:end], state, dict(HYPER), start, [])
            if layout.block_bounds(first)[0] != start:
                item.first_sq = block_sq[first]
            if layout.block_bounds(last - 1)[1] != end:
                item.last_sq = block_sq[last - 1]
            work.append(item)
        pieces = [piece for item in work for piece in _uniform_pieces(item)]
        if implementation == "foreach":
            optimizer._foreach_update(pieces)
        for piece in pieces:
            if implementation == "reference":
                optimizer._reference_update(piece)
            elif implementation == "fused":
                optimizer._fused_update(piece)
            elif implementation == "compiled":
                compiled_update(piece, optimizer._hyper(piece), list(optimizer._segments(piece)))
        assert (param - expected).abs().max().item() <= 1e-15, implementation


@pytest.mark.slow
def test_fused_projections_exact_under_zero_2_and_3(tmp_path):
    launch_ranks(2, ["tests/optimizers/fused_qkv_worker.py", "--out", tmp_path / "results.json"])
    results = read_json(tmp_path / "results.json")
    for case in ("neox_zero2", "neox_zero3", "phi3_zero2", "phi3_zero3"):
        assert "error" not in results[case], results[case].get("error")
        assert results[case]["cut_blocks"] >= 1, case  # a boundary really falls inside a fused block
        assert max(results[case]["max_delta_per_step"]) <= 1e-6, case
