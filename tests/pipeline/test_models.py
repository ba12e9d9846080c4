"""pipeline.models on tiny Llamas built and saved in the test; nothing is downloaded."""
import json
import logging
import subprocess
import sys
import weakref

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import is_flash_attn_2_available

from pipeline.config import LoraConfig, ModelConfig
from pipeline.models import (ModelLoadError, RewardModel, adapters_disabled, apply_lora, count_parameters,
                             last_token_index, load_causal_lm, load_reference, load_tokenizer, model_dtype, save_model)
from tests.conftest import REPO_ROOT, launch_ranks, read_json
from tests.tiny_models import save_tiny_model_dir, tiny_llama, tiny_tokenizer

TINY_CONFIG = {"model_type": "llama", "vocab_size": 50, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 32}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def vocab_size():
    return len(tiny_tokenizer())


def real_tokens(vocab_size, shape, seed=0):
    # Ids 4 and up: clear of the special tokens, so pads and real tokens never coincide.
    return torch.randint(4, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def set_lora_b_nonzero(model, seed=0):
    # peft starts lora_B at zero, which would make every adapter comparison trivially true.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def checkpointing_on(model):
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


# --- loading -----------------------------------------------------------------------------------

def test_load_saved_dir_reproduces_logits_exactly(tmp_path):
    reference = tiny_llama(seed=3)
    reference.save_pretrained(tmp_path)
    loaded = load_causal_lm(ModelConfig(path=str(tmp_path)))
    input_ids = real_tokens(203, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, reference(input_ids).logits)
    assert all(p.dtype == torch.bfloat16 for p in
               load_causal_lm(ModelConfig(path=str(tmp_path)), dtype=torch.bfloat16).parameters())


def test_build_from_config_dict():
    model = load_causal_lm(ModelConfig(config=dict(TINY_CONFIG)))
    assert isinstance(model, LlamaForCausalLM)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_key_value_heads) == (64, 2, 2)
    assert model(torch.zeros(1, 5, dtype=torch.long)).logits.shape == (1, 5, 50)


def test_config_dict_without_model_type_names_the_field():
    config = {key: value for key, value in TINY_CONFIG.items() if key != "model_type"}
    with pytest.raises(ModelLoadError, match=r"`model.config` has no `model_type`"):
        load_causal_lm(ModelConfig(config=config))


def test_meta_device_allocates_no_storage(model_dir):
    from_dir = load_causal_lm(ModelConfig(path=str(model_dir)), device="meta")
    from_config = load_causal_lm(ModelConfig(config=dict(TINY_CONFIG)), device="meta")
    reward = RewardModel.from_causal_lm(ModelConfig(config=dict(TINY_CONFIG)), device="meta")
    for model in (from_dir, from_config, reward):
        assert all(p.is_meta for p in model.parameters())
    # The dry run sees the real architecture: same parameter count as the loaded model.
    assert count_parameters(from_dir) == count_parameters(load_causal_lm(ModelConfig(path=str(model_dir))))


def test_missing_path_and_missing_config_json_name_model_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match=rf"`model.path` {missing} does not exist"):
        load_causal_lm(ModelConfig(path=str(missing)))
    with pytest.raises(ModelLoadError, match=rf"`model.path` {tmp_path} holds no model \(no config.json\)"):
        load_causal_lm(ModelConfig(path=str(tmp_path)))
    tiny_llama().config.save_pretrained(tmp_path)  # a config but no weights
    with pytest.raises(ModelLoadError, match=r"`model.path` .* holds no weights"):
        load_causal_lm(ModelConfig(path=str(tmp_path)))
    with pytest.raises(ModelLoadError, match=r"`model.path` is not set"):
        load_causal_lm(ModelConfig())


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, caplog):
    tiny_tokenizer(pad=False).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.models"):
        tokenizer = load_tokenizer(ModelConfig(config=dict(TINY_CONFIG), tokenizer_path=str(tmp_path)))
    assert tokenizer.pad_token == "<eos>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert "no pad token" in caplog.text
    batch = tokenizer(["the cat", "the cat sat"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_tokenizer_errors_name_the_field(tmp_path):
    with pytest.raises(ModelLoadError, match=r"`model.tokenizer_path` is not set"):
        load_tokenizer(ModelConfig(config=dict(TINY_CONFIG)))
    with pytest.raises(ModelLoadError, match=r"`model.tokenizer_path` .* does not exist"):
        load_tokenizer(ModelConfig(path=str(tmp_path), tokenizer_path=str(tmp_path / "nowhere")))
    with pytest.raises(ModelLoadError, match=rf"`model.path` {tmp_path} holds no model or tokenizer "
                                             r"\(no config.json\): none of tokenizer.json, "):
        load_tokenizer(ModelConfig(path=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(ModelLoadError, match=rf"`model.path` {tmp_path} holds no tokenizer: none of"):
        load_tokenizer(ModelConfig(path=str(tmp_path)))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=rf"`model.path` {tmp_path} holds no loadable tokenizer"):
        load_tokenizer(ModelConfig(path=str(tmp_path)))


def test_gradient_checkpointing_is_on_and_gives_the_same_gradients(model_dir, vocab_size, tmp_path):
    plain = load_causal_lm(ModelConfig(path=str(model_dir)))
    checkpointed = load_causal_lm(ModelConfig(path=str(model_dir), gradient_checkpointing=True))
    assert not checkpointing_on(plain) and checkpointing_on(checkpointed)
    assert checkpointed.config.use_cache is False
    input_ids = real_tokens(vocab_size, (2, 8))
    for model in (plain, checkpointed):
        model.train()
        model(input_ids, labels=input_ids).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=name)
    # The export is for inference: cache on in the file, the training model left as it was.
    save_model(checkpointed, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["use_cache"] is True
    assert checkpointed.config.use_cache is False


def layer_inputs_kept(model, input_ids) -> tuple:
    """(loss, gradients, which decoder layers' inputs the graph still holds once the forward is done): a
    weak reference to each layer's input dies when nothing but the references is left."""
    inputs = []
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    hooks = [layer.register_forward_pre_hook(lambda module, args: inputs.append(weakref.ref(args[0])))
             for layer in layers]
    loss = model(input_ids, labels=input_ids).loss
    kept = [reference() is not None for reference in inputs]
    for hook in hooks:
        hook.remove()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}, kept


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_offloaded_activations_leave_the_graph_and_change_nothing(model_dir, vocab_size, lora):
    """`model.offload_activations`: the checkpointed layer inputs are no longer held by the graph (its copies
    in host memory are), and loss and gradients are the same bits as without offload (fp32)."""
    input_ids = real_tokens(vocab_size, (2, 8))
    results = {}
    for offload in (False, True):
        model = load_causal_lm(ModelConfig(path=str(model_dir), gradient_checkpointing=True,
                                           offload_activations=offload))
        if lora:
            torch.manual_seed(0)  # the same lora_A in both
            model = apply_lora(model, LoraConfig(enabled=True, r=4))
            set_lora_b_nonzero(model)
        results[offload] = layer_inputs_kept(model.train(), input_ids)
    (loss, grads, kept), (offloaded_loss, offloaded_grads, offloaded_kept) = results[False], results[True]
    assert kept == [True, True]
    # With LoRA the frozen embeddings' output is made a leaf that requires grad (transformers'
    # enable_input_require_grads, so gradients reach the adapters through the checkpoints), and a leaf
    # is held by its gradient accumulator: the first layer's input stays where it is.
    assert offloaded_kept == [lora, False]
    assert torch.equal(loss, offloaded_loss)
    assert grads.keys() == offloaded_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(grad, offloaded_grads[name]), name


@pytest.mark.skipif(is_flash_attn_2_available(), reason="flash-attn is usable here, so there is no fallback")
def test_flash_attention_falls_back_to_sdpa(model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.models"):
        model = load_causal_lm(ModelConfig(path=str(model_dir), attn_implementation="flash_attention_2"))
    # transformers 5.25 (the lock's) has no public getter for the implementation a model runs.
    assert model.config._attn_implementation == "sdpa"
    assert "flash_attention_2" in caplog.text


# --- LoRA and export -----------------------------------------------------------------------------

def test_lora_trains_only_adapters(model_dir):
    base = load_causal_lm(ModelConfig(path=str(model_dir)))
    base_total, _ = count_parameters(base)
    model = apply_lora(base, LoraConfig(enabled=True, r=4))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    # 2 layers x (q, k, v, o), each with lora_A and lora_B.
    assert len(trainable) == 2 * 4 * 2
    total, trainable_numel = count_parameters(model)
    assert total - trainable_numel == base_total
    assert trainable_numel == sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


def test_lora_layers_pattern_restricts_adapters(model_dir):
    model = apply_lora(load_causal_lm(ModelConfig(path=str(model_dir))),
                       LoraConfig(enabled=True, layers_pattern="layers.1."))
    adapted = sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A")
                     and name.endswith("_proj"))
    assert adapted == sorted(f"base_model.model.model.layers.1.self_attn.{p}_proj" for p in "qkvo")
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    no_such_layer = LoraConfig(enabled=True, layers_pattern="layers.7.")
    with pytest.raises(ModelLoadError, match=r"`model.lora.target_modules` .* no module containing 'layers.7.'"):
        apply_lora(load_causal_lm(ModelConfig(path=str(model_dir))), no_such_layer)


def test_save_model_writes_loadable_adapter_and_merged_model(model_dir, vocab_size, tmp_path):
    model = apply_lora(load_causal_lm(ModelConfig(path=str(model_dir))), LoraConfig(enabled=True))
    set_lora_b_nonzero(model)
    input_ids = real_tokens(vocab_size, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        base_logits = load_causal_lm(ModelConfig(path=str(model_dir)))(input_ids).logits
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter really changes the output

    adapter_dir, merged_dir = save_model(model, tiny_tokenizer(), tmp_path / "export")
    assert (adapter_dir / "adapter_model.safetensors").is_file() and (merged_dir / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, use_safetensors=True)
    reloaded = PeftModel.from_pretrained(load_causal_lm(ModelConfig(path=str(model_dir))), adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, expected, rtol=0, atol=1e-5)
        # The merge ran on a copy: the training model still has its adapters and its outputs.
        assert torch.equal(model(input_ids=input_ids).logits, expected)
    assert any("lora_A" in name for name, _ in model.named_parameters())
    assert load_tokenizer(ModelConfig(path=str(merged_dir))).get_vocab() == tiny_tokenizer().get_vocab()


# --- reward model ---------------------------------------------------------------------------------

def hand_score(reward_model, tokens):
    """Score of one unpadded row from the backbone's hidden state at its last token."""
    with torch.no_grad():
        hidden = reward_model.backbone(input_ids=tokens[None]).last_hidden_state[0, -1]  # (H,)
        return hidden @ reward_model.v_head.weight[0]


def test_reward_score_is_taken_at_last_real_token_for_both_paddings(model_dir, vocab_size):
    reward_model = RewardModel.from_causal_lm(ModelConfig(path=str(model_dir))).eval()
    pad = tiny_tokenizer().pad_token_id
    tokens = real_tokens(vocab_size, (5,))
    short = tokens[:3]
    rows = [torch.cat([tokens, torch.full((3,), pad)]),             # right-padded
            torch.cat([torch.full((3,), pad), tokens]),             # left-padded
            torch.cat([short, torch.full((5,), pad)])]              # shorter row, right-padded
    input_ids = torch.stack(rows)
    attention_mask = (input_ids != pad).long()
    assert last_token_index(attention_mask).tolist() == [4, 7, 2]
    with torch.no_grad():
        scores = reward_model(input_ids, attention_mask)
    assert scores.shape == (3,)
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(scores[0], hand_score(reward_model, tokens), rtol=0, atol=1e-5)
    torch.testing.assert_close(scores[2], hand_score(reward_model, short), rtol=0, atol=1e-5)
    assert (scores[0] - scores[2]).abs() > 1e-4  # different sequences, different scores

    other_pads = input_ids.masked_fill(attention_mask == 0, 7)  # a real word id in every pad slot
    changed_last = input_ids.clone()
    changed_last[0, 4] = 4 if tokens[4] != 4 else 5
    with torch.no_grad():
        torch.testing.assert_close(reward_model(other_pads, attention_mask), scores, rtol=0, atol=1e-6)
        assert (reward_model(changed_last, attention_mask)[0] - scores[0]).abs() > 1e-4


def test_reward_model_save_load_round_trip(model_dir, vocab_size, tmp_path):
    reward_model = RewardModel.from_causal_lm(ModelConfig(path=str(model_dir)))
    assert reward_model.config.hidden_size == 96 and reward_model.v_head.weight.shape == (1, 96)
    assert not hasattr(reward_model.backbone, "lm_head")
    input_ids = real_tokens(vocab_size, (3, 6))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0
    reward_model.save_pretrained(tmp_path / "rm")
    marker = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert marker["format"] == "reward_model" and marker["hidden_size"] == 96
    reloaded = RewardModel.from_pretrained(tmp_path / "rm")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids, attention_mask), reward_model(input_ids, attention_mask))
    with pytest.raises(ModelLoadError, match=r"`reward.path` .* holds no reward model \(no reward_model.json\)"):
        RewardModel.from_pretrained(model_dir, field="reward.path")


def test_reward_model_with_lora_trains_adapters_and_v_head_and_exports(model_dir, vocab_size, tmp_path):
    model = apply_lora(RewardModel.from_causal_lm(ModelConfig(path=str(model_dir))), LoraConfig(enabled=True))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("v_head" in name for name in trainable)
    assert all("lora_" in name or "v_head" in name for name in trainable)
    set_lora_b_nonzero(model)
    input_ids = real_tokens(vocab_size, (2, 6))
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        expected = model(input_ids, attention_mask)
    _, merged_dir = save_model(model, None, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(RewardModel.from_pretrained(merged_dir)(input_ids, attention_mask), expected,
                                   rtol=0, atol=1e-5)


# --- parameter counts -----------------------------------------------------------------------------

def test_count_parameters_counts_tied_embeddings_once():
    untied = tiny_llama(tie_word_embeddings=False)
    tied = tiny_llama(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    vocab, hidden = tied.lm_head.weight.shape
    assert count_parameters(tied)[0] == count_parameters(untied)[0] - vocab * hidden
    tied.model.embed_tokens.weight.requires_grad_(False)
    assert count_parameters(tied)[1] == count_parameters(tied)[0] - vocab * hidden


def test_count_parameters_uses_full_size_of_zero3_partitions():
    layer = torch.nn.Linear(8, 4, bias=False)
    # What ZeRO-3 leaves on a rank that holds none of a tensor: empty data, full size in ds_numel.
    layer.weight.data = torch.empty(0)
    layer.weight.ds_numel = 32
    assert count_parameters(layer) == (32, 32)


def test_loaders_name_the_field_the_path_came_from(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"`remax.ref_model_path` .*empty holds no model \(no config.json\)"):
        load_causal_lm(ModelConfig(path=str(empty)), field="remax.ref_model_path")
    with pytest.raises(ModelLoadError, match=r"`policy_path` .*missing does not exist"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "missing")), field="policy_path")


# --- load dtype, the reference, the architecture for plans ----------------------------------------

def test_model_dtype_is_the_engine_precision_unless_set():
    assert model_dtype(ModelConfig(), "bf16") == torch.bfloat16
    assert model_dtype(ModelConfig(), "fp32") == torch.float32
    assert model_dtype(ModelConfig(dtype="fp32"), "bf16") == torch.float32
    assert model_dtype(ModelConfig(dtype="bf16")) == torch.bfloat16


def test_model_dtype_problems_name_the_field():
    from pipeline.config import ConfigError, RunConfig, load_config
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, None, ["model.path=m", "data.path=d", "model.dtype=float8"])
    assert "`model.dtype` is 'float8'; use one of fp32, bf16, fp16" in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, None, ["model.path=m", "data.path=d", "model.dtype=bf16", "engine.precision=fp32"])
    assert "`model.dtype` is bf16 with `engine.precision` fp32" in str(error.value)
    assert load_config(RunConfig, None, ["model.path=m", "data.path=d", "engine.precision=bf16"]).model.dtype is None


# RSS growth (the peak, and the anonymous memory that stays) of a fresh process loading a saved bf16
# Llama (32000 x 256 embeddings, 8 layers), in multiples of its safetensors size. In bf16 the parameters are the checkpoint's memory-mapped pages
# (file-backed, shared between ranks, resident as they are touched); an fp32 load converts into new
# memory, 2x the checkpoint.
PEAK_LOAD = """
import json, sys, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from pipeline.config import ModelConfig
from pipeline.models import load_causal_lm
directory = Path(sys.argv[1])
if sys.argv[2] == "save":
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                                 num_attention_heads=4)).to(torch.bfloat16).save_pretrained(directory)
    print("saved")
    sys.exit(0)
import transformers.models.llama.modeling_llama  # imported before the baseline, as the loader would
def status(field):  # bytes, from /proc/self/status
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
before, anonymous_before = status("VmRSS"), status("RssAnon")
model = load_causal_lm(ModelConfig(path=str(directory), dtype=sys.argv[2]))
size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
print(json.dumps({"peak": (status("VmHWM") - before) / size, "anonymous": (status("RssAnon") - anonymous_before) / size,
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""


def test_bf16_weights_load_straight_from_safetensors_without_an_fp32_copy(tmp_path):
    directory = tmp_path / "bf16_llama"

    def peak(dtype):
        result = subprocess.run([sys.executable, "-c", PEAK_LOAD, str(directory), dtype], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1]) if dtype != "save" else None

    peak("save")  # writes the checkpoint
    bf16, fp32 = peak("bf16"), peak("fp32")
    assert (bf16["dtypes"], fp32["dtypes"]) == (["torch.bfloat16"], ["torch.float32"])
    # Measured peaks: 0.47x in bf16 (the pages read so far), 3.2x in fp32; an fp32 copy alone would be 2x.
    assert bf16["peak"] < 1.2 and fp32["peak"] > 2.0, (bf16, fp32)
    # What stays: nothing new in bf16 (0.05x: the weights are the file's pages), the converted weights in fp32.
    assert bf16["anonymous"] < 0.25 and fp32["anonymous"] > 1.8, (bf16, fp32)


def test_reference_loads_from_its_own_path_frozen_in_the_asked_dtype(model_dir, tmp_path):
    actor = load_causal_lm(ModelConfig(path=str(model_dir)))
    reference = load_reference(ModelConfig(path=str(model_dir)), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in reference.parameters())
    actor_storage = {p.data_ptr() for p in actor.parameters()}
    assert not actor_storage & {p.data_ptr() for p in reference.parameters()}
    for (name, mine), (_, theirs) in zip(reference.named_parameters(), actor.named_parameters()):
        assert torch.equal(mine, theirs.to(torch.bfloat16)), name
    other = save_tiny_model_dir(tmp_path / "other", seed=7)
    from_path = load_reference(ModelConfig(path=str(model_dir)), str(other))
    assert torch.equal(from_path.lm_head.weight, load_causal_lm(ModelConfig(path=str(other))).lm_head.weight)
    with pytest.raises(ModelLoadError, match=r"`remax.ref_model_path` .*nowhere does not exist"):
        load_reference(ModelConfig(path=str(model_dir)), str(tmp_path / "nowhere"))
    # Nothing to load: LoRA uses the actor with adapters disabled; a model built from a config dict has no file.
    lora = LoraConfig(enabled=True, r=4, alpha=8)
    assert load_reference(ModelConfig(path=str(model_dir), lora=lora)) is None
    assert load_reference(ModelConfig(config=dict(TINY_CONFIG))) is None


def test_lora_actor_with_adapters_disabled_is_the_base_model(model_dir, vocab_size):
    from pipeline.generation import response_logprobs

    base = load_causal_lm(ModelConfig(path=str(model_dir))).eval()
    actor = apply_lora(load_causal_lm(ModelConfig(path=str(model_dir))), LoraConfig(enabled=True, r=4, alpha=8))
    set_lora_b_nonzero(actor)
    actor.eval()
    sequences = real_tokens(vocab_size, (3, 14), seed=4)
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :3] = 0  # a left-padded prompt
    with torch.no_grad():
        expected, _ = response_logprobs(base, sequences, attention_mask, 6)
        with adapters_disabled(actor) as reference:
            as_reference, _ = response_logprobs(reference, sequences, attention_mask, 6)
        as_actor, _ = response_logprobs(actor, sequences, attention_mask, 6)
    assert (as_reference - expected).abs().max().item() <= 1e-5
    assert (as_actor - expected).abs().max().item() > 1e-3  # the adapters are back on afterwards
    with pytest.raises(TypeError, match="needs a peft model"):
        with adapters_disabled(base):
            pass


@pytest.mark.slow
def test_lora_reference_and_chunked_logits_inside_zero2_and_zero3_engines(tmp_path):
    """The LoRA actor with adapters disabled is the base model; the chunked loss and gradients (fp32) are the
    whole logits', full-parameter and with LoRA on the LM head (ZeRO-3 gathers the head's weights for the
    chunk loop and for its backward)."""
    out = tmp_path / "results.json"
    launch_ranks(2, ["tests/pipeline/reference_worker.py", "--out", out])
    results = read_json(out)
    for stage in ("zero2", "zero3"):
        assert results[stage]["reference_vs_base"] <= 1e-5, (stage, results[stage])
        assert results[stage]["actor_vs_base"] > 1e-3, (stage, results[stage])
    for name, heads in (("chunked zero2", 1), ("chunked zero3", 1), ("chunked zero3 LoRA", 2)):
        result = results[name]
        assert result["head_grads"] == heads, (name, result)  # the LM head's weight, or its two adapters
        # At ZeRO-3 the head's weight (LoRA: its frozen base layer's) is partitioned outside the head's call.
        assert (result["partitioned_head_params"] >= 1) == ("zero3" in name), (name, result)
        assert result["loss_error"] <= 1e-6 and result["head_grad_error"] <= 1e-6, (name, result)
        # Gradients below the head: its input's last-bit differences carried through two layers.
        assert result["grad_error"] <= 1e-5, (name, result)


def test_meta_model_uses_model_architecture_until_path_holds_a_model(model_dir, tmp_path, caplog):
    not_yet = tmp_path / "sft_export"
    config = ModelConfig(path=str(not_yet), architecture=str(model_dir))
    with caplog.at_level(logging.WARNING, logger="pipeline.models"):
        model = load_causal_lm(config, device="meta")
    assert count_parameters(model) == count_parameters(load_causal_lm(ModelConfig(path=str(model_dir))))
    assert f"`model.path` {not_yet} holds no model yet" in caplog.text
    with pytest.raises(ModelLoadError, match=r"`model.path` .*sft_export does not exist"):
        load_causal_lm(config)  # real loads never fall back
    save_tiny_model_dir(not_yet, seed=1, num_hidden_layers=1)
    assert load_causal_lm(config, device="meta").config.num_hidden_layers == 1  # the path wins once it exists
    with pytest.raises(ModelLoadError, match=r"`model.architecture` .*nowhere does not exist"):
        load_causal_lm(ModelConfig(path=str(tmp_path / "x"), architecture=str(tmp_path / "nowhere")), device="meta")


@pytest.mark.slow
def test_zero3_models_are_created_sharded_and_compute_what_the_whole_model_does(tmp_path):
    out = tmp_path / "results.json"
    launch_ranks(2, ["tests/pipeline/sharded_load_worker.py", "--out", out])
    results = read_json(out)
    for name in ("policy", "reference", "reward", "critic"):
        result = results[name]
        # Each of the 2 ranks holds half the parameter bytes from creation on, never the whole model.
        assert all(abs(held - result["whole"] / 2) <= 0.01 * result["whole"] for held in result["held"]), result
        assert result["param_diff"] == 0.0, result  # the checkpoint's values, bit for bit
        assert result["buffer_mismatches"] == [], result  # RoPE's inv_freq in float32, as in the whole model
    assert results["policy"]["dtype"] == "torch.bfloat16"
    # The same bf16 weights; the whole model ran before zero.Init swapped F.linear for DeepSpeed's own linear,
    # which rounds differently in bf16 (half an ulp at 1: 2^-8 = 3.9e-3).
    assert results["policy"]["loss_diff"] <= 1e-3 * results["policy"]["expected_loss"], results["policy"]
    for name in ("policy", "reference"):
        assert results[name]["logprobs_diff"] <= 4e-3, results[name]
    assert results["reward"]["scores_diff"] <= 4e-3 * max(1.0, results["reward"]["score_scale"]), results["reward"]
