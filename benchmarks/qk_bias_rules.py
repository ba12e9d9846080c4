"""Which Adam-mini block should query and key biases (Qwen2) get? A measurement.

A key bias b adds q . b to every score of a query, which softmax ignores, so its true gradient
is zero, unless rotary embeddings rotate b differently at each position. This prints (1) the
float64 gradient of the key and query biases, per dimension of one head, for Qwen2 (rotary
on every dimension) and GPT-NeoX (rotary on a quarter by default), and (2) a short training
run of a tiny Qwen2 under each choice of block for the two biases: per element (Adam), per
head, per tensor, with the final loss and how far each bias moved.

    python -m benchmarks.qk_bias_rules [--steps 100]
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config, Qwen2ForCausalLM

from optimizers import Adam_mini

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 4, 2, 16, 128


def qwen2(dtype=torch.float64) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64)
    model = Qwen2ForCausalLM(config).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    return model


def bias_gradients() -> None:
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    model = qwen2()
    model(input_ids=ids, labels=ids).loss.backward()
    attention = model.model.layers[0].self_attn
    rows = [("Qwen2", attention.q_proj.bias.grad, attention.k_proj.bias.grad)]
    for rotary_pct in (0.25, 1.0):
        torch.manual_seed(0)
        neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                                                num_hidden_layers=1, num_attention_heads=HEADS,
                                                rotary_pct=rotary_pct)).double()
        neox(input_ids=ids, labels=ids).loss.backward()
        grad = neox.gpt_neox.layers[0].attention.query_key_value.bias.grad.view(HEADS, 3, HEAD_DIM)  # (head, q/k/v, dim)
        rows.append((f"GPT-NeoX rotary_pct={rotary_pct}", grad[:, 0].flatten(), grad[:, 1].flatten()))
    print("float64 bias gradients, one batch: max |query|, max |key|, then |key| per dimension of head 0")
    for name, query, key in rows:
        per_dim = " ".join(f"{value:.0e}" for value in key[:HEAD_DIM].abs().tolist())
        print(f"  {name:24} {query.abs().max():.1e}  {key.abs().max():.1e}  [{per_dim}]")


def train(query_rule: str, key_rule: str, dtype, steps: int) -> tuple:
    model = qwen2(dtype)
    optimizer = Adam_mini.from_model(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    # The partition has no switch for this (it is what is being decided): re-cut the two biases
    # before the first step, when the state is still to be made from the layouts.
    for name, layout in list(optimizer._layouts.items()):
        rule = query_rule if name.endswith("q_proj.bias") else key_rule if name.endswith("k_proj.bias") else None
        if rule:
            block_numel = {"element": 1, "head": HEAD_DIM, "tensor": layout.numel}[rule]
            optimizer._layouts[name] = dataclasses.replace(layout, rule=rule, block_numel=block_numel)
    start = {name: param.detach().float().clone() for name, param in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    sequences = torch.randint(0, VOCAB, (8, 16), generator=generator)  # memorised: the loss can fall
    for _ in range(steps):
        ids = sequences[torch.randint(0, 8, (8,), generator=generator)]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        loss = model(input_ids=sequences, labels=sequences).loss.item()

    def moved(suffix):
        return max((param.detach().float() - start[name]).abs().max().item()
                   for name, param in model.named_parameters() if name.endswith(suffix))
    return loss, moved("q_proj.bias"), moved("k_proj.bias")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    bias_gradients()
    print(f"\ntiny Qwen2, {args.steps} steps, lr 1e-3: final loss, max |change| of the query and key biases")
    print(f"  {'dtype':9} {'query':8} {'key':8} {'loss':>6} {'query moved':>12} {'key moved':>10}")
    for dtype in (torch.float32, torch.bfloat16):
        for query_rule in ("element", "head"):
            for key_rule in ("element", "head", "tensor"):
                loss, query_moved, key_moved = train(query_rule, key_rule, dtype, args.steps)
                print(f"  {str(dtype).split('.')[1]:9} {query_rule:8} {key_rule:8} {loss:6.3f} "
                      f"{query_moved:12.4f} {key_moved:10.4f}")


if __name__ == "__main__":
    main()
