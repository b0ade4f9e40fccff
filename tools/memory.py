"""GPU memory of critic.py / dapo.py training, per GPU: DDP against FSDP (--fsdp true), on 1 and N GPUs.

Computed from a model's config, not measured: counts of parameters are exact, activations are an estimate.

    python tools/memory.py                                   # the table for the one-node presets below
    python tools/memory.py --config runs/base/config.json --gpus 8 --micro_batch 4 --seq_len 1024
    python tools/memory.py --models Qwen2.5-72B --gpus 32 --accumulation false   # 4 nodes of 8 GPUs

Per parameter, training in fp32 master weights with AdamW (bf16 only in the computation):
  weights 4 bytes, gradients 4, AdamW's two moments 8: 16 bytes. DDP holds all of it on every GPU, plus its
  gradient buckets (a second fp32 copy of the gradients, 4 bytes). FSDP splits the 16 bytes over N GPUs and adds:
  - gathered: the bf16 weights of the units being computed: the root (embeddings, final norm, LM or value head,
    kept gathered from forward to backward) and two decoder layers (the current one and the one prefetched);
  - accumulator: with gradient accumulation (more than one micro-batch per rank and step), the reduce-scatter waits
    for the last micro-batch, so every GPU holds the full, unsharded fp32 gradient until then: 4 bytes/param.
Activations with gradient checkpointing, bf16 (2 bytes), b sequences of s tokens, per GPU:
  2 b s L H          the input of every decoder layer, kept for the recomputation
  + 2 b s c          one decoder layer recomputed in the backward pass, c = 16 H + 2 d_kv + 4 I values per token
                     (norms in fp32, q, k, v, rotated q and k, GQA-repeated k and v, attention output; SwiGLU's
                     gate, up, activation and product), with a fused attention kernel (no s x s scores)
  + 10 b k V         logits of the k positions whose log-probs dapo.py needs (bf16 logits, their fp32 copy and
                     log-softmax); the critic has none (k = 0)
H hidden size, L layers, I MLP size, d_kv = kv heads x head size, V vocabulary. Add about 1-2 GB for the CUDA
context and allocator fragmentation.

A second table: the whole model that every GPU holds outside the sharded training (fp32 for dapo.py's Q-value and
log pi_ref passes and for each rank's load before --fsdp shards it; bf16 weights for rollout.py and eval.py,
without their KV cache), and the CPU memory of a node whose ranks each load an fp32 copy (--gpus_per_node).
"""
from __future__ import annotations

import argparse
import json

# Hand-copied from each model's config.json on the Hugging Face hub (nothing is downloaded).
PRESETS = {
    "Qwen2.5-0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, attention_bias=True),
    "Qwen2.5-1.5B": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, attention_bias=True),
    "Qwen2.5-Math-7B": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                            intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, attention_bias=True),
    "Llama-3.1-8B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, attention_bias=False),
    # Qwen2.5-72B-Instruct (the paper's largest policy): more than one 8-GPU node holds, even sharded.
    "Qwen2.5-72B": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=29568, vocab_size=152064, tie_word_embeddings=False, attention_bias=True),
}
ONE_NODE = ["Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-Math-7B", "Llama-3.1-8B"]  # the default table
GB = 1e9


def parameter_counts(c: dict, critic: bool) -> tuple[int, int, int]:
    """(all parameters, one decoder layer, the root: embeddings, final norm and head) of the actor (a causal LM)
    or of the critic (the same transformer without the LM head, with a value head of H + 1)."""
    h, heads, kv, inter = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    d_kv = kv * (h // heads)
    bias = h + 2 * d_kv if c.get("attention_bias", False) else 0  # Qwen2: q, k and v carry biases
    layer = 2 * h * h + 2 * h * d_kv + bias + 3 * h * inter + 2 * h  # q, o; k, v; biases; gate, up, down; 2 norms
    embeddings = c["vocab_size"] * h
    head = h + 1 if critic else (0 if c.get("tie_word_embeddings", False) else embeddings)
    root = embeddings + h + head
    return c["num_hidden_layers"] * layer + root, layer, root


def activation_bytes(c: dict, micro_batch: int, seq_len: int, logit_positions: int) -> float:
    h, heads, inter = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"]
    d_kv = c["num_key_value_heads"] * (h // heads)
    tokens = micro_batch * seq_len
    per_layer_values = 16 * h + 2 * d_kv + 4 * inter
    return 2 * tokens * c["num_hidden_layers"] * h + 2 * tokens * per_layer_values \
        + 10 * micro_batch * logit_positions * c["vocab_size"]


def per_gpu(c: dict, gpus: int, fsdp: bool, accumulation: bool, critic: bool) -> dict[str, float]:
    """Bytes per GPU of the training state, by part."""
    n, layer, root = parameter_counts(c, critic)
    if not fsdp:  # every GPU holds the whole state; DDP (more than one GPU) adds its gradient buckets
        return {"weights": 4 * n, "gradients": 4 * n, "AdamW": 8 * n, "DDP buckets": 4 * n if gpus > 1 else 0}
    return {"weights": 4 * n / gpus, "gradients": 4 * n / gpus, "AdamW": 8 * n / gpus,
            "gathered bf16": 2 * (root + 2 * layer), "accumulator": 4 * n if accumulation else 0}


def report(name: str, c: dict, args) -> list[str]:
    """A markdown row per (model, role): total GB per GPU of the training state, then the activations."""
    rows = []
    for role, critic, positions in (("actor", False, args.logit_positions), ("critic", True, 0)):
        n = parameter_counts(c, critic)[0]
        cells = []
        for fsdp, gpus in ((False, 1), (False, args.gpus), (True, 1), (True, args.gpus)):
            parts = per_gpu(c, gpus, fsdp, args.accumulation, critic)
            cells.append(f"{sum(parts.values()) / GB:.1f}")
        fsdp_parts = per_gpu(c, args.gpus, True, args.accumulation, critic)
        detail = " + ".join(f"{v / GB:.1f}" for v in fsdp_parts.values())
        act = activation_bytes(c, args.micro_batch, args.seq_len, positions) / GB
        rows.append(f"| {name} {role} | {n / 1e9:.2f}B | " + " | ".join(cells) + f" | {detail} | {act:.1f} |")
    return rows


def whole_copies(name: str, c: dict, gpus_per_node: int) -> list[str]:
    """A markdown row per (model, role): GB of one whole fp32 copy and one whole bf16 copy, and of an fp32 copy
    per rank in a node's CPU memory."""
    rows = []
    for role, critic in (("actor", False), ("critic", True)):
        n = parameter_counts(c, critic)[0]
        cpu = gpus_per_node * 4 * n / GB
        rows.append(f"| {name} {role}, whole | {4 * n / GB:.1f} | {2 * n / GB:.1f} | {cpu:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a Hugging Face config.json (default: the presets)")
    parser.add_argument("--models", default=",".join(ONE_NODE), help=f"presets, comma-separated: {', '.join(PRESETS)}")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the multi-GPU columns (all nodes together)")
    parser.add_argument("--gpus_per_node", type=int, default=8, help="ranks per node, each loading its own copy")
    parser.add_argument("--micro_batch", type=int, default=4, help="sequences per forward pass per GPU")
    parser.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence (state + action)")
    parser.add_argument("--logit_positions", type=int, default=128, help="dapo.py: positions with logits per sequence "
                        "(the longest action + 1)")
    parser.add_argument("--accumulation", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                        help="more than one micro-batch per rank and optimizer step (true/false)")
    args = parser.parse_args()
    unknown = [m for m in args.models.split(",") if m not in PRESETS]
    if unknown:
        parser.error(f"--models: no preset {', '.join(unknown)} (presets: {', '.join(PRESETS)})")
    models = {m: PRESETS[m] for m in args.models.split(",")}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            models = {args.config: json.load(f)}
    g = args.gpus
    print(f"GB per GPU; FSDP {g} GPUs = weights + gradients + AdamW + gathered bf16 + accumulator"
          f"{'' if args.accumulation else ' (no accumulation)'}; activations: micro-batch {args.micro_batch} x "
          f"{args.seq_len} tokens, gradient checkpointing, bf16, {args.logit_positions} logit positions (actor)\n")
    print(f"| model | parameters | 1 GPU | DDP, {g} GPUs | FSDP, 1 GPU | FSDP, {g} GPUs | FSDP, {g} GPUs, by part | "
          "activations |")
    print("|---|---|---|---|---|---|---|---|")
    for name, c in models.items():
        print("\n".join(report(name, c, args)))
    print(f"\n| model | whole, fp32 (GB per GPU) | whole, bf16 (GB per GPU) | {args.gpus_per_node} fp32 copies "
          "(GB of CPU memory per node) |")
    print("|---|---|---|---|")
    for name, c in models.items():
        print("\n".join(whole_copies(name, c, args.gpus_per_node)))


if __name__ == "__main__":
    main()
