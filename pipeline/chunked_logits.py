"""Log-probabilities of target tokens (and entropies) with no (tokens, vocabulary) tensor: the LM head
is applied chunk by chunk over the scored tokens inside an autograd function whose backward recomputes
each chunk's logits, as chunked cross-entropy does in torchtune and NeMo-RL.

    logprobs, entropy = token_logprobs(model, inputs, targets, chunk=1024, with_entropy=True)

`model` is a causal LM, a peft model around one or a DeepSpeed engine around either; `inputs` its
keyword inputs (input_ids, attention_mask, position_ids); `targets` (B, T') the token each of the last
T' positions predicts, IGNORE_INDEX where nothing is scored. A chunk of c tokens holds c x vocab
logits, their fp32 upcast and (for the gradient) the fp32 softmax turned into the logits' gradient in
place: per cell 4 bytes plus the logits' own (bf16: 6), 8 with the entropy. The fp32 scores upcast
each chunk as the whole-logits path upcasts them all.

The model runs its own forward, through the DeepSpeed engine's (whose backward starts from hooks on
that forward's outputs), with the LM head module's forward replaced for the call by the chunk loop. The
head's parameters are so used within the head module's call: ZeRO-3 gathers them for it and again for
its backward, and autograd hands each its gradient once, as DeepSpeed's gradient hooks expect. A plain
linear head (Llama's) has its gradient taken by hand, the weight's accumulated in place over the chunks
in its own dtype (as Liger's fused cross-entropy does); any other (peft's LoRA wrapper, whose adapters
ZeRO-3 then gathers with the head) is rerun per chunk under autograd. `chunk=0` is the whole-logits
path, the reference the chunked one is held to; models whose forward transforms the head's output
(soft-capping, scaling) take it too.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

LOGITS_CHUNK = 1024  # tokens per chunk: 1024 x 32000 bf16 logits take ~0.2 GiB
IGNORE_INDEX = -100  # targets not scored (torch cross_entropy's default ignore_index; pipeline.data's labels)

# Model configs whose forward transforms the LM head's output (soft-capping, scaling): the chunked
# scores would be transformed too, so these models take the whole-logits path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def chunk_problem(field: str, chunk) -> Optional[str]:
    """The config problem of a chunk size `chunk` read from `field`, or None."""
    if isinstance(chunk, int) and chunk >= 0:
        return None
    return f"`{field}` is {chunk}; give the tokens per chunk of logits (e.g. {LOGITS_CHUNK}), or 0 for the whole logits"


def token_logprobs(model, inputs: dict, targets: torch.Tensor, chunk: int = LOGITS_CHUNK,
                   with_entropy: bool = False) -> tuple:
    """Log-probabilities of `targets` under `model` run on `inputs`, and optionally the entropies of
    the same positions' distributions (no gradient).

    targets: (B, T') long, the token each of the model's last T' positions predicts (IGNORE_INDEX:
    none). Returns ((B, T') fp32 log-probs, 0 where ignored; (B, T') fp32 entropies, 0 where ignored,
    or None). `chunk`: tokens per chunk, 0 for the whole logits at once.
    """
    call = dict(inputs, use_cache=False, logits_to_keep=targets.shape[1])
    if chunk and not _transforms_logits(model):
        scores = {}
        with _head_scores(output_head(model), targets, chunk, with_entropy, scores):
            logprobs = model(**call).logits
        return logprobs, scores.get("entropy")
    logits = model(**call).logits.float()  # (B, T', V)
    return whole_logits_scores(logits, targets, with_entropy)


def next_token_targets(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) the token each of T positions predicts: the next one of `tokens` (B, T) (labels:
    IGNORE_INDEX stays ignored), none after the last."""
    return F.pad(tokens[:, 1:], (0, 1), value=IGNORE_INDEX)


def whole_logits_scores(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False) -> tuple:
    """`token_logprobs` from logits (B, T', V) all held at once."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    scored = targets != IGNORE_INDEX
    logprobs = selective_log_softmax(logits, targets.masked_fill(~scored, 0)).masked_fill(~scored, 0.0)
    if not with_entropy:
        return logprobs, None
    with torch.no_grad():
        return logprobs, entropy_from_logits(logits.detach()).masked_fill(~scored, 0.0)


def output_head(model) -> nn.Module:
    """The LM head module of a causal LM, a peft model or a DeepSpeed engine around either."""
    return getattr(model, "module", model).get_output_embeddings()


_warned = set()  # model classes whose whole-logits fallback has been logged


def _transforms_logits(model) -> bool:
    module = getattr(model, "module", model)
    config = module.config.get_text_config() if hasattr(module.config, "get_text_config") else module.config
    transforms = [name for name in LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if transforms and type(module).__name__ not in _warned:
        _warned.add(type(module).__name__)
        logger.warning("%s transforms its logits after the LM head (%s): its log-probabilities use the whole "
                       "logits", type(module).__name__, ", ".join(transforms))
    return bool(transforms)


@contextlib.contextmanager
def _head_scores(head: nn.Module, targets: torch.Tensor, chunk: int, with_entropy: bool, scores: dict):
    """For the duration, calling `head` on hidden states (B, T', H) returns the (B, T') log-probs of
    `targets` (and puts the entropies in `scores["entropy"]`) instead of the logits."""
    scorer = LinearHead(head) if type(head) is nn.Linear and "forward" not in vars(head) else ModuleHead(head)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[:2] != targets.shape:
            raise ValueError(f"the LM head got hidden states {tuple(hidden.shape)} for targets {tuple(targets.shape)}")
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B * T', H)
        logprobs, entropy = ChunkedLogprobs.apply(flat, targets.reshape(-1), scorer, chunk, with_entropy,
                                                  *scorer.params)
        if with_entropy:
            scores["entropy"] = entropy.view(targets.shape)
        return logprobs.view(targets.shape)

    own = vars(head).get("forward")  # a forward set on the instance itself stays its own
    head.forward = forward
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


# ---- the autograd function and the heads it runs -------------------------------------------------

def _scores_(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool) -> tuple:
    """((c,) log-probs of `targets` (c,), (c,) entropies or None) from fp32 logits (c, V), which it
    overwrites: no second (c, V) buffer without the entropy, one with it."""
    shifted = logits.sub_(logits.amax(-1, keepdim=True))  # (c, V) z - max z
    target_logits = shifted.gather(1, targets[:, None])[:, 0]
    entropy = None
    if with_entropy:
        exp = shifted.exp()
        total = exp.sum(-1)
        # -sum p log p = log sum e^s - sum e^s s / sum e^s, s the shifted logits
        entropy = total.log() - (exp[:, None, :] @ shifted[:, :, None])[:, 0, 0] / total
    else:
        total = shifted.exp_().sum(-1)
    return target_logits - total.log(), entropy


def _logits_grad_(logits: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d(sum grad * log p(targets)) / d logits = grad * (onehot(targets) - softmax), in place over the
    fp32 logits (c, V)."""
    probs = logits.sub_(logits.amax(-1, keepdim=True)).exp_()
    probs.div_(probs.sum(-1, keepdim=True))
    result = probs.mul_(-grad[:, None])
    result[torch.arange(len(targets), device=targets.device), targets] += grad
    return result


class LinearHead:
    """A plain linear LM head: logits by `F.linear`, gradients by hand, the weight's and bias's
    accumulated in place (in their own dtype, as one matmul over all tokens would round them once)."""

    def __init__(self, module: nn.Linear):
        self.weight, self.bias = module.weight, module.bias
        self.params = [self.weight] + ([self.bias] if self.bias is not None else [])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)  # looked up now: ZeRO-3 may swap it

    def rng_state(self):
        return None

    def backward(self, hidden, targets, grad, need_hidden: bool, grads: list, state) -> Optional[torch.Tensor]:
        """The chunk's hidden-state gradient (or None); adds its parameter gradients into `grads`."""
        with torch.no_grad():  # the 16-bit logits go as soon as they are upcast
            grad_logits = _logits_grad_(self.logits(hidden).float(), targets, grad).to(self.weight.dtype)
            if self.weight.requires_grad:
                if grads[0] is None:
                    grads[0] = torch.zeros_like(self.weight)
                grads[0].addmm_(grad_logits.t(), hidden)
            if self.bias is not None and self.bias.requires_grad:
                summed = grad_logits.sum(0)
                grads[1] = summed if grads[1] is None else grads[1].add_(summed)
            return grad_logits @ self.weight if need_hidden else None


class ModuleHead:
    """Any other LM head module (peft's LoRA wrapper): its own forward per chunk, rerun under autograd
    in the backward with the chunk's random state (dropout) restored."""

    def __init__(self, module: nn.Module):
        self.forward = module.forward
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.stochastic = module.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())
        _register_zero3_parameters(module)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.forward(hidden)

    def rng_state(self):
        if not self.stochastic:
            return None
        return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def backward(self, hidden, targets, grad, need_hidden: bool, grads: list, state) -> Optional[torch.Tensor]:
        with torch.random.fork_rng(enabled=state is not None):
            if state is not None:
                torch.set_rng_state(state[0])
                if state[1] is not None:
                    torch.cuda.set_rng_state_all(state[1])
            with torch.enable_grad():
                hidden = hidden.detach().requires_grad_(need_hidden)
                logits = self.logits(hidden)
        with torch.no_grad():  # a copy: the logits are the graph's output
            grad_logits = _logits_grad_(logits.detach().to(torch.float32, copy=True), targets, grad).to(logits.dtype)
        inputs = ([hidden] if need_hidden else []) + self.params
        computed = list(torch.autograd.grad(logits, inputs, grad_logits, allow_unused=True))
        grad_hidden = computed.pop(0) if need_hidden else None
        for index, part in enumerate(computed):
            if part is not None:
                grads[index] = part if grads[index] is None else grads[index].add_(part)
        return grad_hidden


def _register_zero3_parameters(module: nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters for its call; the head's submodules' parameters (peft's
    base layer and adapters) are made the head's too (DeepSpeed's external parameters), so they stay
    gathered through the chunk loop and its backward."""
    nested = [p for name, p in module.named_parameters() if "." in name and hasattr(p, "ds_id")]
    if nested:
        from deepspeed import zero

        for param in nested:
            zero.register_external_parameter(module, param)


class ChunkedLogprobs(torch.autograd.Function):
    """(N,) fp32 log-probs of the targets (N,) from hidden states (N, H) through `head`, `chunk` tokens
    of logits at a time; targets IGNORE_INDEX give 0 and no gradient. The (N,) entropies (an empty
    tensor unless `with_entropy`) have no gradient. `params` are the head's trainable parameters, so
    autograd hands them their gradients once."""

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk: int, with_entropy: bool, *params):
        scored = (targets != IGNORE_INDEX).nonzero()[:, 0]  # (S,) the positions that are scored
        logprobs = torch.zeros(len(targets), dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logprobs) if with_entropy else logprobs.new_empty(0)
        states = []
        for rows in scored.split(chunk):
            states.append(head.rng_state())
            logits = head.logits(hidden[rows]).float()
            logprobs[rows], chunk_entropy = _scores_(logits, targets[rows], with_entropy)
            del logits
            if with_entropy:
                entropy[rows] = chunk_entropy
        ctx.save_for_backward(hidden, targets, scored)
        ctx.head, ctx.chunk, ctx.states = head, chunk, states
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        hidden, targets, scored = ctx.saved_tensors
        head, need_hidden = ctx.head, ctx.needs_input_grad[0]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grads = [None] * len(head.params)
        for rows, state in zip(scored.split(ctx.chunk), ctx.states):
            grad = head.backward(hidden[rows], targets[rows], grad_logprobs[rows].float(), need_hidden, grads, state)
            if need_hidden:
                grad_hidden[rows] = grad
        # Nothing scored still hands each trainable parameter a gradient, as DeepSpeed's hooks expect.
        grads = [torch.zeros_like(param) if grad is None and needed else grad
                 for grad, param, needed in zip(grads, head.params, ctx.needs_input_grad[5:])]
        return (grad_hidden, None, None, None, None, *grads)
