"""GPU memory of critic.py / dapo.py training, per GPU: DDP against FSDP (--fsdp true), on 1 and N GPUs.

Computed from a model's config, not measured: counts of parameters are exact, activations are an estimate.

    python tools/memory.py                                   # the table for the one-node presets below
    python tools/memory.py --config runs/base/config.json --gpus 8 --micro_batch 4 --seq_len 1024
    python tools/memory.py --models Qwen2.5-72B --gpus 32 --accumulation false   # 4 nodes of 8 GPUs
    python tools/memory.py --lora_r 16 --cards 24,48,80      # which model fits one GPU, full and LoRA
    python tools/memory.py --measure_cpu                     # one figure measured on the CPU beside its prediction

Per parameter, training in fp32 master weights with AdamW (bf16 only in the computation):
  weights 4 bytes, gradients 4, AdamW's two moments 8: 16 bytes. DDP holds all of it on every GPU, plus its
  gradient buckets (a second fp32 copy of the gradients, 4 bytes). FSDP splits the 16 bytes over N GPUs and adds:
  - gathered: the bf16 weights of the units being computed: the root (embeddings, final norm, LM or value head,
    kept gathered from forward to backward) and two decoder layers (the current one and the one prefetched);
  - accumulator: with gradient accumulation (more than one micro-batch per rank and step), the reduce-scatter waits
    for the last micro-batch, so every GPU holds the full, unsharded fp32 gradient until then: 4 bytes/param. The
    gradient shard exists only after that reduce-scatter, which frees the accumulator (and the optimizer step's
    zero_grad frees the shard before the next accumulation): the two never coexist, so the shard is not added.
One GPU or DDP under bf16 autocast adds autocast's cached bf16 copy of the weights it casts (every Linear weight
that requires a gradient, the tied LM head included: about 2 bytes/param; measured +61 MB on a 33M model, 0 with
cache_enabled=False). Under FSDP the gathered weights are bf16 already (no copy); a frozen base is not cached.
LoRA (--lora_r r, --lora_targets, --base_dtype): the frozen base holds its weights only (4 bytes/param in fp32, 2
in bf16), the adapters r (in + out) per targeted Linear of the blocks (and the critic's value head) 16 bytes each
(fp32 weights, gradients, AdamW), the activations as in full fine-tuning (the gradient flows through every layer).
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
without their KV cache), the CPU memory of a node whose ranks each load an fp32 copy (--gpus_per_node), and each
rank's peak while loading under --fsdp: the whole fp32 model when every rank loads it before sharding, its shard
plus the largest tensor in flight (the embeddings) with sharded loading (built on the meta device, sharded, the
shards filled from rank 0's broadcast).

A third table, one GPU of each size in --cards: for every model and role, full fine-tuning (fp32 weights) and LoRA
(fp32 and bf16 base), whether the training state, autocast's copy, the activations at the largest micro-batch
that fits (gradient checkpointing, --seq_len tokens) and CONTEXT_GB of CUDA context fit, and that micro-batch.
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
PRESETS["Qwen2.5-Math-1.5B"] = PRESETS["Qwen2.5-1.5B"]  # the same architecture (the README's one-GPU example)
ONE_NODE = ["Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-Math-7B", "Llama-3.1-8B"]  # the default table
GB = 1e9
CONTEXT_GB = 1.5  # CUDA context and allocator fragmentation, added in the one-GPU table


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


def linear_shapes(c: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of every Linear of one decoder layer, by its name (Llama / Qwen2 names)."""
    h, heads, inter = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"]
    d_kv = c["num_key_value_heads"] * (h // heads)
    return {"q_proj": (h, h), "k_proj": (h, d_kv), "v_proj": (h, d_kv), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def lora_parameters(c: dict, r: int, targets: str = "all") -> int:
    """Parameters of the LoRA adapters: r (in + out) per targeted Linear of every decoder layer (plumbing.lora)."""
    shapes = linear_shapes(c)
    names = shapes if targets == "all" else [t.strip() for t in targets.split(",")]
    return c["num_hidden_layers"] * sum(r * sum(shapes[name]) for name in names)


def autocast_copy_bytes(c: dict, critic: bool) -> float:
    """autocast's cached bf16 copy of the Linear weights (q..down of every layer and the LM head, tied or not;
    the embeddings are looked up, not cast): 2 bytes each, while the forward's autocast region and its graph last."""
    n, _, root = parameter_counts(c, critic)
    embeddings = c["vocab_size"] * c["hidden_size"]
    lm_head = 0 if critic else embeddings
    return 2 * (n - root + lm_head) + (2 * (c["hidden_size"] + 1) if critic else 0)


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
    # With accumulation the gradient shard and the unsharded accumulator never coexist: the larger, the accumulator.
    return {"weights": 4 * n / gpus, "gradients": 0 if accumulation else 4 * n / gpus, "AdamW": 8 * n / gpus,
            "gathered bf16": 2 * (root + 2 * layer), "accumulator": 4 * n if accumulation else 0}


def lora_state(c: dict, critic: bool, r: int, targets: str, base_bytes: int) -> dict[str, float]:
    """Bytes of LoRA's training state on one GPU: the frozen base, the adapters (and the critic's value head)
    with their gradients and AdamW state in fp32, and autocast's copy (none: a frozen base is not cached)."""
    n = parameter_counts(c, critic)[0]
    trained = lora_parameters(c, r, targets) + (c["hidden_size"] + 1 if critic else 0)
    return {"base": base_bytes * n, "adapters": 16 * trained, "autocast copy": 0}


def one_gpu_rows(name: str, c: dict, args) -> list[str]:
    """A markdown row per (model, role, full or LoRA): GB of state, activations per sequence, and for each card
    the largest micro-batch (a power of two up to 64) that fits, or "no"."""
    rows = []
    for role, critic, positions in (("actor", False, args.logit_positions), ("critic", True, 0)):
        full = {**per_gpu(c, 1, False, True, critic), "autocast copy": autocast_copy_bytes(c, critic)}
        modes = [("full, fp32", full)]
        for dtype, size in (("fp32", 4), ("bf16", 2)):
            modes.append((f"LoRA r{args.lora_r} {args.lora_targets}, {dtype} base",
                          lora_state(c, critic, args.lora_r, args.lora_targets, size)))
        for mode, parts in modes:
            state = sum(parts.values()) / GB
            per_sequence = activation_bytes(c, 1, args.seq_len, positions) / GB
            cells = []
            for card in args.cards:
                fits = [b for b in (1, 2, 4, 8, 16, 32, 64)
                        if state + activation_bytes(c, b, args.seq_len, positions) / GB + CONTEXT_GB <= card]
                cells.append(f"micro-batch {fits[-1]}" if fits else "no")
            rows.append(f"| {name} {role}, {mode} | {state:.1f} | {per_sequence:.2f} | " + " | ".join(cells) + " |")
    return rows


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


def whole_copies(name: str, c: dict, gpus_per_node: int, gpus: int) -> list[str]:
    """A markdown row per (model, role): GB of one whole fp32 copy and one whole bf16 copy, of an fp32 copy per
    rank in a node's CPU memory, and each rank's peak while loading under --fsdp: the whole fp32 model (every rank
    loads it, then shards it) or, with sharded loading, its fp32 shard plus the largest tensor in flight."""
    rows = []
    for role, critic in (("actor", False), ("critic", True)):
        n, layer, _ = parameter_counts(c, critic)
        cpu = gpus_per_node * 4 * n / GB
        largest = max(c["vocab_size"] * c["hidden_size"], max(i * o for i, o in linear_shapes(c).values()))
        sharded = (4 * n / gpus + 4 * largest) / GB
        rows.append(f"| {name} {role}, whole | {4 * n / GB:.1f} | {2 * n / GB:.1f} | {cpu:.0f} | {4 * n / GB:.1f} | "
                    f"{sharded:.1f} |")
    return rows


def measure_cpu(hidden: int = 1024, layers: int = 8, vocab: int = 32000, lora_r: int = 16, steps: int = 2) -> None:
    """One figure measured on the CPU beside what this script predicts: the growth of the process's peak resident
    memory (ru_maxrss) over AdamW training steps of a Llama built locally (fp32, no autocast, micro-batch 1 x 64
    tokens: activations negligible), full fine-tuning in one process and LoRA (every Linear of the blocks) in
    another, against the predicted state (full: weights are loaded before, so gradients + AdamW = 12 bytes/param;
    LoRA: the adapters' 16 bytes/param)."""
    import subprocess
    import sys

    c = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
             intermediate_size=4 * hidden, vocab_size=vocab, tie_word_embeddings=True)
    n = parameter_counts(c, False)[0]
    for mode, predicted in (("full", 12 * n), ("lora", 16 * lora_parameters(c, lora_r))):
        code = MEASURE.format(c=c, mode=mode, r=lora_r, steps=steps)
        grown = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     env={"OMP_NUM_THREADS": "1", **__import__("os").environ}).stdout.split()[-1])
        print(f"{mode}: {n / 1e6:.0f}M parameters, peak RSS grew {grown / 1e6:.0f} MB over {steps} AdamW steps; "
              f"predicted {predicted / 1e6:.0f} MB")


MEASURE = """
import resource, sys, torch
sys.path.insert(0, ".")
from transformers import LlamaConfig, LlamaForCausalLM
c = {c!r}
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**c, max_position_embeddings=128))
if "{mode}" == "lora":
    import types
    from plumbing.lora import add_lora, trainable
    model = add_lora(model, types.SimpleNamespace(lora_r={r}, lora_alpha=16.0, lora_target_modules="all"), False)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
ids = torch.randint(0, c["vocab_size"], (1, 64))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range({steps}):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


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
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank of the one-GPU table's LoRA rows")
    parser.add_argument("--lora_targets", default="all", help="LoRA's Linear layers: all, or names (q_proj,v_proj)")
    parser.add_argument("--cards", default="24,48,80", help="GB of the one-GPU table's cards, comma-separated")
    parser.add_argument("--measure_cpu", action="store_true", help="measure one figure on the CPU and exit")
    args = parser.parse_args()
    if args.measure_cpu:
        measure_cpu()
        return
    args.cards = [float(x) for x in args.cards.split(",")]
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
          f"(GB of CPU memory per node) | loading peak per GPU, --fsdp, each rank loads it all | loading peak per GPU, "
          f"sharded loading on {g} GPUs |")
    print("|---|---|---|---|---|---|")
    for name, c in models.items():
        print("\n".join(whole_copies(name, c, args.gpus_per_node, g)))
    print(f"\nOne GPU (no FSDP), computed: GB of training state (full: + autocast's bf16 copy), GB of activations per "
          f"sequence of {args.seq_len} tokens (gradient checkpointing, bf16), and per card the largest micro-batch "
          f"that fits with {CONTEXT_GB} GB of CUDA context\n")
    print("| model, role, training | state | activations per sequence | "
          + " | ".join(f"{card:g} GB" for card in args.cards) + " |")
    print("|---|---|---|" + "---|" * len(args.cards))
    for name, c in models.items():
        print("\n".join(one_gpu_rows(name, c, args)))


if __name__ == "__main__":
    main()
