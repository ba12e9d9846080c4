"""Partition rules, the partition report, geometry and constructor validation."""
import json
import re
import types
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma3Config, Gemma3TextConfig, LlamaForCausalLM

from optimizers import Adam_mini, classify, geometry_from_model
from optimizers.partition import Geometry
from tests.tiny_models import straddling_llama_config, tiny_llama

GQA = dict(dim=96, n_heads=3, n_kv_heads=1)


def layouts(optimizer):
    return {layout.name: layout for layout in optimizer.partition_report.layouts}


def test_llama_gqa_rules_match_official_partition():
    by_name = layouts(Adam_mini(tiny_llama().named_parameters(), **GQA))
    head_numel = 32 * 96
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    k = by_name["model.layers.0.self_attn.k_proj.weight"]
    assert (q.rule, q.block_numel, q.num_blocks) == ("head", head_numel, 3)
    assert (k.rule, k.block_numel, k.num_blocks) == ("head", head_numel, 1)  # keys use n_kv_heads
    for name, rows in [("model.layers.0.self_attn.v_proj.weight", 32), ("model.layers.0.self_attn.o_proj.weight", 96),
                       ("model.layers.0.mlp.gate_proj.weight", 160), ("model.layers.0.mlp.down_proj.weight", 96),
                       ("model.embed_tokens.weight", 203), ("lm_head.weight", 203)]:
        assert (by_name[name].rule, by_name[name].num_blocks) == ("row", rows), name
    norm = by_name["model.layers.0.input_layernorm.weight"]
    bias = by_name["model.layers.0.mlp.up_proj.bias"]
    assert (norm.rule, norm.num_blocks, norm.weight_decay, norm.fallback) == ("tensor", 1, False, False)
    assert (bias.rule, bias.block_numel, bias.weight_decay) == ("element", 1, False)
    assert by_name["model.embed_tokens.weight"].weight_decay


def test_explicit_head_dim_wider_than_hidden_over_heads():
    model = LlamaForCausalLM(straddling_llama_config(num_attention_heads=4, num_key_value_heads=2, head_dim=48))
    q = layouts(Adam_mini(model.named_parameters(), dim=96, n_heads=4, n_kv_heads=2, head_dim=48))
    assert q["model.layers.0.self_attn.q_proj.weight"].num_blocks == 4
    assert q["model.layers.0.self_attn.k_proj.weight"].num_blocks == 2
    assert q["model.layers.0.self_attn.q_proj.weight"].block_numel == 48 * 96


def test_tied_embeddings_count_once_and_frozen_parameters_are_left_out():
    model = tiny_llama(tie_word_embeddings=True)
    model.model.layers[0].mlp.requires_grad_(False)
    optimizer = Adam_mini(model.named_parameters(), **GQA)
    names = set(layouts(optimizer))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert not any(name.startswith("model.layers.0.mlp.") for name in names)
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    assert optimizer.partition_report.as_dict()["numel"] == sum(p.numel() for p in trainable.values())


def test_lora_adapters_never_take_the_head_path():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    optimizer = Adam_mini(model.named_parameters(), **GQA)
    by_name = layouts(optimizer)
    assert len(by_name) == 2 * 3 * 2  # A and B for three projections in two layers
    assert {layout.rule for layout in by_name.values()} == {"lora"}
    lora_a = next(l for n, l in by_name.items() if "q_proj.lora_A" in n)
    lora_b = next(l for n, l in by_name.items() if "k_proj.lora_B" in n)
    assert (lora_a.shape, lora_a.block_numel, lora_a.num_blocks) == ((4, 96), 96, 4)
    assert (lora_b.shape, lora_b.block_numel, lora_b.num_blocks) == ((32, 4), 4, 32)
    ids = torch.randint(0, 203, (2, 8))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora_B" in n for n in changed)  # lora_B starts at zero, so lora_A has no gradient yet


def test_names_match_on_components_not_substrings():
    assert classify("transformer.linear_probe.weight", (4, 8), None).fallback
    assert classify("encoder.mlp.fc_in.weight", (4, 8), None).rule == "row"
    assert classify("blocks.0.ln_1.weight", (8,), None).weight_decay is False
    assert classify("h.0.attn.proj.weight", (8, 8), None).rule == "row"


def test_fallback_parameters_are_named_in_a_warning_and_the_report():
    model = torch.nn.Sequential()
    model.add_module("classifier", torch.nn.Linear(8, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = Adam_mini(model.named_parameters())
    messages = [str(w.message) for w in caught]
    assert any("classifier.weight" in m for m in messages)
    assert optimizer.partition_report.fallbacks == ["classifier.weight"]


def test_report_as_data_json_and_table():
    report = Adam_mini(tiny_llama().named_parameters(), **GQA).partition_report
    data = json.loads(report.to_json())
    assert data["rule_counts"] == {"element": 6, "lora": 0, "head": 4, "row": 12, "tensor": 5}
    assert data["num_blocks"] == sum(p["num_blocks"] for p in data["parameters"])
    table = str(report)
    assert "model.layers.1.self_attn.k_proj.weight" in table and "head" in table
    assert table.splitlines()[-1].startswith(f"{len(data['parameters'])} parameters")


def test_geometry_from_llama_and_nested_text_config():
    assert geometry_from_model(straddling_llama_config()) == {"dim": 96, "n_heads": 3, "n_kv_heads": 1,
                                                              "head_dim": 32}
    gemma = Gemma3Config(text_config=Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                      head_dim=32, vocab_size=100, num_hidden_layers=1,
                                                      intermediate_size=64))
    assert geometry_from_model(gemma) == {"dim": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 32}
    nested = types.SimpleNamespace(text_config=types.SimpleNamespace(hidden_size=32, num_attention_heads=2))
    assert geometry_from_model(nested)["dim"] == 32
    optimizer = Adam_mini.from_model(tiny_llama(), lr=1e-3)
    assert optimizer.geometry == Geometry(dim=96, n_heads=3, n_kv_heads=1, head_dim=32)
    with pytest.raises(ValueError, match="hidden size"):
        geometry_from_model(types.SimpleNamespace(vocab_size=3))


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (dict(dim=100, n_heads=3), "Invalid dim value: 100"),
    (dict(dim=96, n_heads=3, n_kv_heads=2), "Invalid n_kv_heads value: 2"),
    (dict(dim=96, n_heads=0), "Invalid n_heads value: 0"),
    (dict(dim=None, n_heads=None, n_kv_heads=None), "Invalid geometry: dim=None, n_heads=None"),
    (dict(dim=96, n_heads=3, head_dim=40), "Invalid head_dim value: 40"),
    (dict(implementation="cuda"), "Invalid implementation: 'cuda'"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, message):
    arguments = {**GQA, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        Adam_mini(tiny_llama().named_parameters(), **arguments)


def test_unnamed_parameters_are_refused():
    with pytest.raises(ValueError, match="named_parameters"):
        Adam_mini(tiny_llama().parameters(), **GQA)
