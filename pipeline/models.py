"""Models every stage uses: tokenizer and causal LM loading, LoRA, export, the reward model.

Models come from a local Hugging Face directory (`model.path`) or are built fresh from a
config dict (`model.config`); nothing is fetched from the hub. Weights are read from
safetensors where the directory has them, and otherwise only through transformers'
`weights_only` loader, never by unpickling arbitrary objects.

The reward model follows DeepSpeed-Chat: the causal LM's base transformer (no LM head)
plus `Linear(hidden, 1, bias=False)`, scored at the last non-pad token of each row.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import logging
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import is_flash_attn_2_available

from pipeline.config import LoraConfig, ModelConfig
from pipeline.packing import sequence_ends
from pipeline.rl.algos import last_token_index

logger = logging.getLogger(__name__)

REWARD_MARKER_FILE = "reward_model.json"
V_HEAD_FILE = "v_head.safetensors"
# What AutoTokenizer reads a tokenizer from; a directory with none of them holds no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelLoadError(ValueError):
    """A model, tokenizer or adapter cannot be set up as configured; the message names the field."""


# ---------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(config: ModelConfig, field: str = "model.path"):
    """Loads the tokenizer from `model.tokenizer_path`, else `config.path` (named `field` in messages),
    and makes sure it can pad.

    A tokenizer without a pad token pads with its eos token (else its unk token): batches
    are built with attention masks, so the pad id never has to be a token of its own.

    Raises:
        ModelLoadError: when neither path is set, the path does not exist, nothing loadable
            is there, or the tokenizer has no pad, eos or unk token to pad with.
    """
    if config.tokenizer_path:
        field, path = "model.tokenizer_path", config.tokenizer_path
    else:
        path = config.path
    if path is None:
        raise ModelLoadError(f"`model.tokenizer_path` is not set and `{field}` is not set; a model built "
                             "from `model.config` needs `model.tokenizer_path` (a local tokenizer directory)")
    directory = Path(path)
    if not directory.exists():
        raise ModelLoadError(f"`{field}` {path} does not exist")
    if directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        # Said plainly here: transformers' own error for this talks of slow-tokenizer conversion.
        what = "tokenizer" if (directory / "config.json").is_file() else "model or tokenizer (no config.json)"
        hint = ", or set `model.tokenizer_path`" if field == "model.path" else ""
        raise ModelLoadError(f"`{field}` {path} holds no {what}: none of {', '.join(TOKENIZER_FILES)}; "
                             f"point it at a saved Hugging Face model or tokenizer directory{hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"`{field}` {path} holds no loadable tokenizer: {exc}") from exc
    if tokenizer.pad_token is None:
        substitute = tokenizer.eos_token or tokenizer.unk_token
        if substitute is None:
            raise ModelLoadError(f"`{field}` {path}: the tokenizer has no pad, eos or unk token to pad with; "
                                 "add a pad token to the tokenizer")
        tokenizer.pad_token = substitute
        # Pad == eos: losses must mask by attention mask, not by pad id, or eos is never learned.
        logger.warning("Tokenizer at %s has no pad token; padding with %r", path, substitute)
    return tokenizer


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_dtype(config: ModelConfig, precision: str = "fp32") -> torch.dtype:
    """The dtype to load weights in: `model.dtype`, else the engine's `precision` (fp32 | bf16 | fp16).

    A bf16 engine gets bf16 weights read straight from safetensors: DeepSpeed builds its fp32 master
    copy from them anyway, so an fp32 load would only add 2 bytes per parameter on every rank.
    """
    return DTYPES[config.dtype or precision]


def load_causal_lm(config: ModelConfig, *, dtype: Optional[torch.dtype] = None, device: Optional[str] = None,
                   field: str = "model.path"):
    """Loads `config.path` (named `field` in messages) or builds a fresh model from `model.config`, as a
    causal LM, in `dtype` (default: `model.dtype`, else fp32; stages pass `model_dtype(config.model,
    precision)`). Weights are read in that dtype from safetensors: no fp32 copy is made on the way.

    `device="meta"` builds the architecture without allocating storage (dry runs, geometry,
    parameter counts); weights are not read then. Any other device moves the loaded model.

    Raises:
        ModelLoadError: when neither or both of `model.path` and `model.config` are set, the
            path does not exist, holds no config.json or no weights, or loading fails.
    """
    attn_implementation = resolve_attn_implementation(config.attn_implementation)
    if dtype is None:
        dtype = model_dtype(config)
    common = dict(dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=config.trust_remote_code)
    if config.path is not None and config.config is not None:
        raise ModelLoadError("`model.path` and `model.config` are both set; give one of them")
    if config.path is None:
        if config.config is None:
            raise ModelLoadError("`model.path` is not set; give a local Hugging Face model directory "
                                 "(or `model.config` to build a model from a config)")
        hf_config = config_from_dict(config.config)
        model = _from_config(AutoModelForCausalLM, hf_config, device, **common)
    else:
        if device == "meta":
            directory = architecture_dir(config, field)
            hf_config = AutoConfig.from_pretrained(directory, trust_remote_code=config.trust_remote_code)
            model = _from_config(AutoModelForCausalLM, hf_config, device, **common)
        else:
            directory = check_model_dir(config.path, field)
            model = _from_pretrained(AutoModelForCausalLM, directory, field, **common)
    if device not in (None, "meta"):
        model.to(device)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model, config.offload_activations)
    return model


def load_reference(config: ModelConfig, path: Optional[str] = None, *, dtype: Optional[torch.dtype] = None,
                   device: Optional[str] = None, field: str = "remax.ref_model_path") -> Optional[nn.Module]:
    """The frozen reference policy, read from its own safetensors (memory-mapped by safetensors) in
    `dtype`: `path` (named `field` in messages) if given, else the starting policy at `config.path`.
    Never a copy of the actor, so no rank holds an extra full-precision model while the actor loads.

    Returns None where there is nothing to load: with LoRA and no `path` the reference is the actor
    itself with its adapters disabled (`adapters_disabled`); a model built from `model.config` has no
    file, so the caller copies the actor before it trains.

    Raises:
        ModelLoadError: as `load_causal_lm`, naming `field` or `model.path`.
    """
    if path is None and (config.lora.enabled or config.path is None):
        return None
    source = ModelConfig(path=path or config.path, attn_implementation=config.attn_implementation,
                         trust_remote_code=config.trust_remote_code, dtype=config.dtype)
    reference = load_causal_lm(source, dtype=dtype, device=device, field=field if path else "model.path")
    reference.requires_grad_(False)
    return reference.eval()


@contextlib.contextmanager
def adapters_disabled(actor):
    """The LoRA actor as its own reference for the duration: peft's adapters switched off, so forward
    passes give the base model's outputs with no second copy of its weights (TRL's `ref_model=None`).
    `actor` is a peft model or a DeepSpeed engine around one; yields `actor`.

    Raises:
        TypeError: when `actor` holds no peft model.
    """
    from peft import PeftModel

    peft_model = getattr(actor, "module", actor)  # a DeepSpeed engine keeps the model in .module
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"adapters_disabled needs a peft model (LoRA), got {type(peft_model).__name__}")
    with peft_model.disable_adapter():
        yield actor


def resolve_attn_implementation(name: str) -> str:
    """`flash_attention_2` falls back to `sdpa` (with a warning) where flash-attn cannot run."""
    if name == "flash_attention_2" and not is_flash_attn_2_available():
        logger.warning("`model.attn_implementation` is flash_attention_2 but flash-attn is not available "
                       "(not installed or no CUDA device); using sdpa")
        return "sdpa"
    return name


def config_from_dict(values: dict):
    """A transformers config from `model.config` (`model_type` plus that model's fields).

    Raises:
        ModelLoadError: when `model_type` is missing or unknown.
    """
    values = dict(values)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ModelLoadError(f"`model.config` has no `model_type` (keys: {', '.join(sorted(values))}); "
                             "add one, e.g. model_type: llama")
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as exc:
        raise ModelLoadError(f"`model.config.model_type` is {model_type!r}, which transformers does not know") from exc


def check_model_dir(path, field: str) -> Path:
    """The directory at `path`, checked to hold a Hugging Face config.

    Raises:
        ModelLoadError: when it does not exist or has no config.json.
    """
    directory = Path(path)
    if not directory.exists():
        raise ModelLoadError(f"`{field}` {path} does not exist")
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"`{field}` {path} holds no model (no config.json)")
    return directory


def architecture_dir(config: ModelConfig, field: str = "model.path") -> Path:
    """The directory whose config.json describes the model: `config.path` (named `field`) once it holds a
    model, `model.architecture` until then (plans and dry runs before an earlier stage has written it).

    Raises:
        ModelLoadError: when neither holds a config.json.
    """
    if config.architecture is None or (Path(config.path) / "config.json").is_file():
        return check_model_dir(config.path, field)
    logger.warning("`%s` %s holds no model yet; using the architecture in `model.architecture` %s",
                   field, config.path, config.architecture)
    return check_model_dir(config.architecture, "model.architecture")


def _from_config(auto_class, hf_config, device: Optional[str], **kwargs):
    if device == "meta":
        # Parameters are created on the meta device: shapes only, no memory.
        with torch.device("meta"):
            return auto_class.from_config(hf_config, **kwargs)
    return _rope_buffers_in_fp32(auto_class.from_config(hf_config, **kwargs))


def _rope_buffers_in_fp32(model: nn.Module) -> nn.Module:
    """Rotary embeddings' buffers (`inv_freq`) in float32, as their modules compute them in a model built whole.

    Built under ZeRO-3's zero.Init (`sharded_creation`), transformers 5.19 lets DeepSpeed create them in the
    model's dtype: in bf16 every frequency, and each position's angle with it, is off by up to 2^-9 of itself
    (a tiny ZeRO-3 reward model scored -0.130 where the same bf16 weights loaded whole scored -0.138, fp32
    -0.136). transformers 5.25 keeps them in float32 itself; then nothing is done here. A fresh module of the
    same class and config, built outside zero.Init, gives the float32 values.
    """
    for module in model.modules():
        if "RotaryEmbedding" not in type(module).__name__ or not hasattr(module, "config"):
            continue
        floating = [b for b in module.buffers(recurse=False) if b.is_floating_point()]
        if all(b.dtype == torch.float32 for b in floating) or "config" not in inspect.signature(type(module)).parameters:
            continue
        fresh = type(module)(config=module.config)
        for name, buffer in fresh.named_buffers(recurse=False):
            setattr(module, name, buffer.to(getattr(module, name).device))  # keeps the buffer's persistence
    return model


def _from_pretrained(auto_class, directory: Path, field: str, **kwargs):
    if any(directory.glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    elif any(directory.glob("*.bin")):
        # Old checkpoints: the restricted unpickler that admits tensors only, never arbitrary objects.
        kwargs.update(use_safetensors=False, weights_only=True)
    else:
        raise ModelLoadError(f"`{field}` {directory} holds no weights (no *.safetensors file)")
    try:
        model = auto_class.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"`{field}` {directory} could not be loaded: {exc}") from exc
    return _rope_buffers_in_fp32(model)


def enable_gradient_checkpointing(model: PreTrainedModel, offload: bool = False) -> None:
    """Recompute activations in the backward; the KV cache is useless then, so it is turned off.
    With `offload` (`model.offload_activations`) each checkpointed layer's input waits for its backward
    in host memory (`checkpoint_in_host_memory`)."""
    # Non-reentrant checkpointing keeps gradients flowing when the embeddings are frozen (LoRA).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if offload:
        # transformers' own `offload=True` asks for pinned memory even where there is no accelerator, and
        # fails there. Its layers call `_gradient_checkpointing_func`, the hook its
        # GradientCheckpointingLayer documents for a checkpointing function of one's own.
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False):
                module._gradient_checkpointing_func = functools.partial(checkpoint_in_host_memory,
                                                                        module._gradient_checkpointing_func)
    model.config.use_cache = False


def checkpoint_in_host_memory(checkpoint, function, *args, **kwargs):
    """`checkpoint(function, *args, **kwargs)` with what it saves for the backward copied to host memory.

    A non-reentrant checkpoint saves the layer's positional inputs (the hidden states: transformers binds
    the mask and RoPE tables into `function`) under the saved-tensor hooks active around the call, so those
    are what goes to the host; inside the layer its own hooks keep only placeholders. The backward copies
    each input back for its layer's recompute. Pinned where CUDA is (the copies run asynchronously on the
    compute stream); elsewhere a plain memory-to-memory copy. A copy: loss and gradients are unchanged."""
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        return checkpoint(function, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# LoRA and export


def apply_lora(model: nn.Module, lora: LoraConfig):
    """Wraps `model` with peft LoRA adapters; only the adapters (and a reward model's v_head) train.

    Targets are resolved here to an explicit list of module names, so `lora.layers_pattern`
    can restrict them to modules whose full name contains it and a typo is reported by field.

    Raises:
        ModelLoadError: when no module matches `model.lora.target_modules` (and `layers_pattern`).
    """
    import peft

    targets = lora_target_names(model, lora)
    is_reward = isinstance(model, RewardModel)
    peft_config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none",
        # The freshly initialised v_head must train in full; peft then saves it with the adapter.
        modules_to_save=["v_head"] if is_reward else None,
        task_type=None if is_reward else "CAUSAL_LM")
    return peft.get_peft_model(model, peft_config)


def lora_target_names(model: nn.Module, lora: LoraConfig) -> list[str]:
    """Full names of the modules LoRA adapts: peft's suffix rule, then the `layers_pattern` filter.

    Raises:
        ModelLoadError: when nothing matches.
    """
    suffixes = tuple(lora.target_modules)
    names = [name for name, _ in model.named_modules()
             if any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)
             and lora.layers_pattern in name]
    if not names:
        pattern = f" containing {lora.layers_pattern!r}" if lora.layers_pattern else ""
        raise ModelLoadError(f"`model.lora.target_modules` {list(suffixes)} matches no module{pattern} of "
                             f"{type(model).__name__}; check `model.lora.target_modules` and "
                             "`model.lora.layers_pattern`")
    return names


def save_model(model: nn.Module, tokenizer, directory) -> list[Path]:
    """Writes the final Hugging Face export (safetensors) and the tokenizer; returns the directories.

    A plain model goes to `directory`. A peft model writes its adapter to `directory/adapter`
    and the merged full model to `directory/merged`; the merge runs on a copy, so the model
    passed in keeps its adapters (the copy costs one extra model of memory for a moment).
    Pass the full model, not a ZeRO-3 partitioned one.
    """
    from peft import PeftModel

    directory = Path(directory)
    if isinstance(model, PeftModel):
        adapter_dir, merged_dir = directory / "adapter", directory / "merged"
        model.save_pretrained(adapter_dir, safe_serialization=True)
        _save_full(copy.deepcopy(model).merge_and_unload(), merged_dir)
        written = [adapter_dir, merged_dir]
    else:
        _save_full(model, directory)
        written = [directory]
    if tokenizer is not None:
        for path in written:
            tokenizer.save_pretrained(path)
    return written


def _save_full(model: nn.Module, directory: Path) -> None:
    config = model.config
    use_cache = getattr(config, "use_cache", None)
    # Training turned the KV cache off for checkpointing; the exported model is for inference.
    if use_cache is False:
        config.use_cache = True
    try:
        if isinstance(model, RewardModel):
            model.save_pretrained(directory)
        else:
            # transformers 5 writes safetensors only and ignores the flag; 4.x honours it.
            model.save_pretrained(directory, safe_serialization=True)
    finally:
        if use_cache is False:
            config.use_cache = use_cache


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; tied weights count once, ZeRO-3 shards at full size."""
    total = trainable = 0
    for param in model.parameters():  # deduplicated, so a tied embedding appears once
        numel = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        total += numel
        if param.requires_grad:
            trainable += numel
    return total, trainable


# ---------------------------------------------------------------------------------------------
# Reward model


def hidden_size_of(config) -> int:
    """Width of the backbone's last hidden state.

    Raises:
        ModelLoadError: when the config names no hidden size.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    # OPT projects its output to `word_embed_proj_dim`, which can differ from hidden_size.
    for name in ("word_embed_proj_dim", "hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ModelLoadError(f"{type(config).__name__} names no hidden size (hidden_size, n_embd or d_model)")


class RewardModel(nn.Module):
    """Transformer backbone (no LM head) + `v_head = Linear(hidden, 1, bias=False)`.

    The score of a sequence is the v_head value at its last non-pad token.
    """

    def __init__(self, backbone: PreTrainedModel, v_head: Optional[nn.Linear] = None):
        super().__init__()
        self.backbone = backbone
        hidden_size = hidden_size_of(backbone.config)
        if v_head is None:
            reference = next(backbone.parameters())
            v_head = nn.Linear(hidden_size, 1, bias=False, device=reference.device, dtype=reference.dtype)
            # std 1/sqrt(hidden + 1) (lm-human-preferences): initial scores of order one.
            nn.init.normal_(v_head.weight, mean=0.0, std=1.0 / math.sqrt(hidden_size + 1))
        self.v_head = v_head
        self._takes_position_ids = "position_ids" in inspect.signature(backbone.forward).parameters

    @property
    def config(self):
        """The backbone's config (hidden size, heads) for geometry helpers."""
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                per_token: bool = False, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids, attention_mask: (B, T). Returns scores (B,), or with `per_token` the v_head value
        at every position (B, T): a critic's values (PPO), called through its DeepSpeed engine.
        A packed batch (pipeline.packing) gives `position_ids` (1, N) restarting at each sequence and no
        mask: the scores (S,) are then each sequence's last token's."""
        if position_ids is not None and attention_mask is None:
            hidden = self.backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
            return self.v_head(hidden[0, sequence_ends(position_ids)]).squeeze(-1)  # (S,)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {}
        if self._takes_position_ids:
            # Real tokens start at position 0 under left padding too, so a row scores the same
            # however it is padded (not every model derives positions from the mask itself).
            extra["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                               **extra).last_hidden_state  # (B, T, H)
        values = self.v_head(hidden).squeeze(-1)  # (B, T)
        if per_token:
            return values
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)

    @classmethod
    def from_causal_lm(cls, config: ModelConfig, *, dtype: Optional[torch.dtype] = None,
                       device: Optional[str] = None) -> "RewardModel":
        """Starts a reward model from a causal LM (an SFT export or `model.config`): its base
        transformer plus a new v_head. Gradient checkpointing and attention follow `config`.

        Raises:
            ModelLoadError: as `load_causal_lm`, or when the model has no separable base model.
        """
        causal_lm = load_causal_lm(config, dtype=dtype, device=device)
        backbone = causal_lm.base_model
        if backbone is causal_lm:
            raise ModelLoadError(f"{type(causal_lm).__name__} has no base model under an LM head "
                                 f"(base_model_prefix {causal_lm.base_model_prefix!r}); it cannot be a reward backbone")
        return cls(backbone)

    @classmethod
    def from_pretrained(cls, directory, *, dtype: torch.dtype = torch.float32, device: Optional[str] = None,
                        attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                        field: str = "model.path") -> "RewardModel":
        """Reloads a reward model written by `save_pretrained`; `field` names the config field in errors.

        Raises:
            ModelLoadError: when the directory is missing, is not a reward model export, or its
                v_head does not fit the backbone.
        """
        from safetensors.torch import load_file

        directory = check_model_dir(directory, field)
        if not (directory / REWARD_MARKER_FILE).is_file():
            raise ModelLoadError(f"`{field}` {directory} holds no reward model (no {REWARD_MARKER_FILE}); "
                                 "start one from a causal LM with RewardModel.from_causal_lm")
        common = dict(dtype=dtype, attn_implementation=resolve_attn_implementation(attn_implementation),
                      trust_remote_code=trust_remote_code)
        if device == "meta":
            hf_config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
            backbone = _from_config(AutoModel, hf_config, device, **common)
        else:
            backbone = _from_pretrained(AutoModel, directory, field, **common)
        hidden_size = hidden_size_of(backbone.config)
        v_head = nn.Linear(hidden_size, 1, bias=False, device="meta" if device == "meta" else None, dtype=dtype)
        if device != "meta":
            weight = load_file(directory / V_HEAD_FILE)["weight"]
            if tuple(weight.shape) != (1, hidden_size):
                raise ModelLoadError(f"`{field}` {directory}: {V_HEAD_FILE} has shape {tuple(weight.shape)}, "
                                     f"the backbone needs (1, {hidden_size})")
            with torch.no_grad():
                v_head.weight.copy_(weight)
        model = cls(backbone, v_head)
        if device not in (None, "meta"):
            model.to(device)
        return model

    def save_pretrained(self, directory) -> Path:
        """Writes the backbone (safetensors), `v_head.safetensors` and the `reward_model.json` marker."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory, safe_serialization=True)
        save_file({"weight": self.v_head.weight.detach().cpu().contiguous()}, str(directory / V_HEAD_FILE))
        marker = {"format": "reward_model", "backbone": type(self.backbone).__name__,
                  "hidden_size": self.v_head.in_features, "score": "v_head at the last non-pad token"}
        (directory / REWARD_MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        return directory
