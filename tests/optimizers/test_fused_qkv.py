"""Fused query/key/value projections: each architecture's layout against the blocks its own
forward shows (perturb one row of the fused weight, see which query, key or value head moves), the update on it (whole and cut
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


def phi3(**overrides):
    return Phi3ForCausalLM(Phi3Config(**SMALL, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=1,
                                      intermediate_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                      **overrides))


def groups_from_parts(parts):
    """Hand-built blocks from each row's observed part: one per query head, one per distinct key
    head, one per value row. parts: {row: (part, heads)}."""
    by_head = {}
    for row, (part, heads) in parts.items():
        key = (part, heads) if part != "value" else (part, row)
        by_head.setdefault(key, set()).add(row)
    return {frozenset(rows): part for (part, _), rows in by_head.items()}


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


def observed_parts(model, fused):
    """What each output row of the fused projection feeds, seen in the model's own forward.

    One row at a time gets a random perturbation; layer 0's cached keys and values (per key/value
    head) and its attention weights (per query head) are compared with the unperturbed run. A row
    that moves the cached keys is a key row of the kv heads it moves; one that moves the cached
    values is a value row; one that moves only the attention weights is a query row of the heads
    it moves. Returns {row: (part, heads)}; asserts every row moves exactly one of them.
    Some versions cache a key/value head once per query head of its group (transformers 5.19's grouped
    Falcon broadcasts before caching, 5.2x does not): bit-identical cached heads count as one head.
    """
    model = model.double().eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, SMALL["vocab_size"], (2, 5), generator=generator)

    def layer_zero():
        out = model(input_ids=input_ids, use_cache=True, output_attentions=True)
        cache = out.get("cache") or out.past_key_values  # renamed `cache` in transformers 5.2x
        layer = cache.layers[0]
        return layer.keys, layer.values, out.attentions[0]  # (B, kv, T, hd) twice, (B, heads, T, T)

    def moved_heads(before, after):
        return tuple((before != after).any(dim=(0, 2, 3)).nonzero().flatten().tolist())

    def first_copies(heads):
        """Per cached head (B, n, T, hd), the first head it is a bit-identical copy of."""
        return [next(j for j in range(i + 1) if torch.equal(heads[:, j], heads[:, i])) for i in range(heads.shape[1])]

    def moved_kv_heads(before, after, copy_of):
        """The distinct key or value heads moved; a head's copies move with it, all or none."""
        moved = moved_heads(before, after)
        heads = tuple(sorted({copy_of[i] for i in moved}))
        assert set(moved) == {i for i, first in enumerate(copy_of) if first in heads}, f"copies moved apart: {moved}"
        return heads

    keys, values, attention = layer_zero()
    key_copy_of, value_copy_of = first_copies(keys), first_copies(values)
    parts = {}
    weight = fused.weight
    for row in range(weight.shape[0]):
        with torch.no_grad():
            original = weight[row].clone()
            weight[row] += torch.randn(weight.shape[1], generator=generator, dtype=weight.dtype)
            moved_keys, moved_values, moved_attention = layer_zero()
            weight[row] = original
        key_heads = moved_kv_heads(keys, moved_keys, key_copy_of)
        value_heads = moved_kv_heads(values, moved_values, value_copy_of)
        query_heads = moved_heads(attention, moved_attention)
        if key_heads:
            assert len(key_heads) == 1 and not value_heads, f"row {row} moves keys {key_heads}, values {value_heads}"
            parts[row] = ("key", key_heads)
        elif value_heads:
            assert len(value_heads) == 1 and not query_heads, f"row {row} moves values and attention"
            parts[row] = ("value", value_heads)
        else:
            assert len(query_heads) == 1, f"row {row} moves attention heads {query_heads}"
            parts[row] = ("query", query_heads)
    return parts


def fused_layout(model, name):
    optimizer = Adam_mini.from_model(model)
    layout = next(l for l in optimizer.partition_report.layouts if l.name == name)
    assert layout.rule == "qkv" and not optimizer.partition_report.fallbacks
    return layout


def bloom():
    return BloomForCausalLM(BloomConfig(vocab_size=64, n_layer=1, hidden_size=HIDDEN, n_head=HEADS,
                                        attn_implementation="eager"))


# Each architecture's fused projection, its own forward as the reference for the layout, and the number
# of key blocks Adam-mini must give it.
FUSED_ARCHITECTURES = {
    "gpt_neox": (lambda: neox(attn_implementation="eager"), "gpt_neox.layers.0.attention.query_key_value", HEADS),
    "falcon_multi_query": (lambda: falcon(attn_implementation="eager"), "transformer.h.0.self_attention.query_key_value", 1),
    "falcon_per_head": (lambda: falcon(multi_query=False, attn_implementation="eager"),
                        "transformer.h.0.self_attention.query_key_value", HEADS),
    "falcon_grouped_1": (lambda: falcon(new_decoder_architecture=True, num_kv_heads=1, num_attention_heads=6,
                                        hidden_size=96, attn_implementation="eager"),
                         "transformer.h.0.self_attention.query_key_value", 1),
    "falcon_grouped_2": (lambda: falcon(new_decoder_architecture=True, num_kv_heads=2, num_attention_heads=6,
                                        hidden_size=96, attn_implementation="eager"),
                         "transformer.h.0.self_attention.query_key_value", 2),
    "bloom": (bloom, "transformer.h.0.self_attention.query_key_value", HEADS),
    "phi3": (lambda: phi3(attn_implementation="eager"), "model.layers.0.self_attn.qkv_proj", 1),
    "mpt": (lambda: MptForCausalLM(MptConfig(vocab_size=64, n_layers=1, d_model=HIDDEN, n_heads=HEADS,
                                             attn_implementation="eager")), "transformer.blocks.0.attn.Wqkv", HEADS),
}


@pytest.mark.parametrize("architecture", list(FUSED_ARCHITECTURES))
def test_fused_layout_matches_what_the_model_computes(architecture):
    build, module_name, key_blocks = FUSED_ARCHITECTURES[architecture]
    model = build()
    layout = fused_layout(model, f"{module_name}.weight")
    parts = observed_parts(model, model.get_submodule(module_name))
    assert actual_groups(layout) == groups_from_parts(parts)
    assert layout.split()[1]["blocks"] == key_blocks


def test_gpt_neox_split_and_phi3_report():
    layout = fused_layout(neox(), "gpt_neox.layers.0.attention.query_key_value.weight")
    assert layout.split() == [{"part": "query", "blocks": 3, "block_numel": HEAD_DIM * HIDDEN},
                              {"part": "key", "blocks": 3, "block_numel": HEAD_DIM * HIDDEN},
                              {"part": "value", "blocks": HIDDEN, "block_numel": HIDDEN}]
    report = Adam_mini.from_model(phi3()).partition_report
    data = report.as_dict()
    assert data["rule_counts"]["qkv"] == 1
    entry = next(p for p in data["parameters"] if p["rule"] == "qkv")
    assert entry["split"][1] == {"part": "key", "blocks": 1, "block_numel": HEAD_DIM * HIDDEN}
    assert entry["num_blocks"] == HEADS + 1 + HEAD_DIM
    table = str(report)
    assert re.search(r"qkv_proj\.weight\s+80x48\s+qkv \(concatenated\)\s+q:768 k:768 v:48\s+q:3 k:1 v:16", table)


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
