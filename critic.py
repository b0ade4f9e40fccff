"""DAPO stage A, the critic: a value model V_phi(s) trained on the Monte-Carlo labels of rollout.py
(docs/algorithm.md, "The critic").

The model: a causal-LM backbone (by default the policy being improved) and a linear value head on the hidden
state of a state's last token, squashed by a sigmoid, so V(s) in (0, 1) estimates the probability that the
policy, continuing from s, ends with a correct answer. It estimates V^{pi_ref}; it is not a PRM.

Training, one pass per solution:
  1. Read solutions.jsonl: each kept solution's token ids, where each state s_t ends (step_ends[t]) and its
     MC label V_hat(s_t) (mc_values[t]). The ids are the policy's: a critic whose tokenizer is another reads
     the text of each state in its own tokens instead (plumbing/retokenize.py, which gives the exact rule).
  2. Hold out whole questions (never single states: states of one question share prefixes, so a split by
     state would leak) for the metrics.
  3. Causal attention means the hidden state at position step_ends[t] - 1 of the whole solution is the
     hidden state of s_t on its own: ONE forward pass gives V(s_0), ..., V(s_{T-1}).
  4. Loss against the MC label: MSE (arXiv version, the default) or soft-label binary cross-entropy
     (NeurIPS version), each state's term weighted by 1 / (the solutions of its question that contain it), so
     every distinct state counts once (state_weights; why and what a batch's mean is: docs/algorithm.md, "The
     critic"). Dropout off, AdamW, warm-up then linear decay, gradient clipping and accumulation, bf16
     autocast on CUDA.
  5. Held-out MSE, Pearson r and a calibration table (predicted V in bins vs. mean MC label), printed and
     written to out_dir/metrics.json; the critic is saved as one directory that `load_critic` reads back.

    python critic.py --rollout_dir runs/toy/iter1/rollout --init runs/toy/sft --out_dir runs/toy/iter1/critic
    torchrun --nproc_per_node=8 critic.py ...          # same flags; --batch_size stays the global batch
    torchrun --nproc_per_node=8 critic.py ... --fsdp true   # 7-8B models: parameters, gradients, AdamW state sharded
    python critic.py ... --init_critic runs/toy/iter1/critic   # iterative DAPO: warm start
    python critic.py ... --lora_r 16   # LoRA: frozen backbone, adapters and value head trained (plumbing/lora.py)

Reading order: the model, V(s . a) for stage B (value_alone, the plain definition, before action_values, the
same numbers with each state read once), the loss, the data and the training loop come first; below the
"machinery" line is what a learner may skip; main() marks its lines ALGORITHM or MACHINERY.

Paper settings (7-8B models): --lr 5e-6 --epochs 1 --batch_size 512 (the defaults); the toy task takes
--epochs 8 --batch_size 16 --micro_batch_size 16 --lr 1e-3 --heldout_fraction 0.1 (demo.sh). A killed run resumes
from out_dir.work/checkpoint/ (a torch.distributed.checkpoint directory, sharded under --fsdp) when rerun with
the same command (docs/pipeline.md, "Reruns and resume"); out_dir itself appears only when the critic is
complete, as full weights that load without FSDP.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoConfig, set_seed

from plumbing.checkpoints import full_state_dict
from plumbing.cli import arg, InputError, parse_config, progress, run
from plumbing.lora import add_lora, adapter_init, base_dtype, LoraSettings, merged_state_dict, plain_model, trainable
from plumbing.distributed import (all_ranks_sum, cleanup_distributed, clip_gradients, distribute, held_per_rank,
                                  passes_in_step, setup_distributed, sync_gradients)
from plumbing.models import (autocast, check_model_path, check_shardable, disable_dropout, enable_checkpointing,
                             gguf_source, load_pretrained, load_sharded, load_tokenizer, set_precision)
from plumbing.retokenize import critic_tokens, describe
from plumbing.runfiles import atomic_dir, read_jsonl, warn_useless_data, write_json_atomic
from plumbing.shared_prefix import check_packing, pack, shared_prefix_rows
from plumbing.tracking import start_tracking, TrackingConfig
from plumbing.trainer import lr_at, paper_defaults_note, report_peak_memory, set_lr, TrainingRun

HEAD_FILE = "value_head.pt"


@dataclasses.dataclass
class Config(LoraSettings, TrackingConfig):  # LoraSettings: --lora_r and its flags (plumbing.lora)
    rollout_dir: str = arg("runs/toy/iter1/rollout", "rollout.py output directory (its solutions.jsonl is the "
                                                     "training data)")
    init: str = arg("runs/toy/sft", "backbone of a fresh critic: HF causal-LM directory, hub name or .gguf file "
                                    "(the policy by default)")
    init_critic: str | None = arg(None, "warm start from this critic directory instead (iterative DAPO); "
                                        "--init is then unused")
    policy: str | None = arg(None, "the policy that made the rollout, whose tokenizer its token ids are in (default: "
                                   "the model of the rollout's summary.json, else the critic's own: --init_critic "
                                   "or --init); a critic with another tokenizer reads the text "
                                   "(plumbing/retokenize.py)")
    out_dir: str = arg("runs/toy/iter1/critic", "where the critic directory (backbone, value head, tokenizer, "
                                                "metrics.json) goes")
    loss: str = arg("mse", "mse: (V - V_hat)^2 (arXiv version) | bce: soft-label cross-entropy (NeurIPS version)")
    lr: float = arg(5e-6, "peak learning rate (paper, 7B: 5e-6)")
    epochs: int = arg(1, "passes over the training solutions (paper: 1)")
    batch_size: int = arg(512, "solutions per optimizer step over all ranks (paper: 512)")
    micro_batch_size: int = arg(8, "solutions per forward pass per rank; gradients accumulate up to --batch_size")
    warmup_fraction: float = arg(0.05, "fraction of the steps spent warming the learning rate up (then linear decay)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0: no clipping)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass: less memory, more compute")
    fsdp: bool = arg(False, "under torchrun: shard parameters, gradients and AdamW state over the ranks (FSDP2), "
                            "loading the model straight into the shards")
    precision: str = arg("auto", "auto: bf16 autocast on CUDA, fp32 on the CPU | bf16: bf16 autocast everywhere "
                                 "(on the CPU it emulates a GPU run) | fp32: no autocast; master weights stay fp32")
    heldout_fraction: float = arg(0.05, "fraction of QUESTIONS held out for the metrics (0: none)")
    eval_batch_size: int = arg(64, "solutions per forward pass when measuring the held-out metrics")
    seed: int = arg(0, "seed of the data order")
    log_every: int = arg(10, "print a line of metrics every N optimizer steps")
    checkpoint_every: int = arg(50, "save the resumable checkpoint out_dir.work/checkpoint/ every N optimizer steps "
                                    "(0: never)")
    stop_after: int = arg(0, "stop after N optimizer steps as a kill would, leaving only the checkpoint (0: never)")
    overwrite: bool = arg(False, "remove out_dir and its checkpoint (finished or not) first and start afresh")


# Settings a rerun may change (where the output goes, speed, logging): none of them changes the critic trained.
# Any other change is refused (plumbing.runfiles.check_rerun).
RESUME_IGNORES = ("out_dir", "overwrite", "micro_batch_size", "eval_batch_size", "gradient_checkpointing", "log_every",
                  "checkpoint_every", "stop_after", "report_to")
# The defaults are the paper's settings for 7-8B models; the toy task takes TOY_FLAGS (demo.sh's), which a run of
# only a few optimizer steps at the default learning rate names (plumbing.trainer.paper_defaults_note).
TOY_FLAGS = "--epochs 8 --batch_size 16 --micro_batch_size 16 --lr 1e-3 --heldout_fraction 0.1"


# ============================================================================= the model
class Critic(torch.nn.Module):
    """V_phi(s) = sigmoid(w . h(s) + b), h(s) the backbone's last hidden state at the last token of s."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone  # the transformer without its LM head: only hidden states are needed
        self.value_head = torch.nn.Linear(backbone.config.hidden_size, 1)
        # Zero weights: a fresh critic says V = 0.5 everywhere, the least committed guess, whatever the backbone.
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_backbone(cls, path: str, device, dtype: torch.dtype = torch.float32) -> "Critic":
        """A fresh value head (fp32) on the transformer of a causal-LM checkpoint (or of a critic directory)."""
        from transformers import AutoModel

        check_model_path(path, "critic backbone")
        try:
            backbone = load_pretrained(AutoModel, path, dtype)  # a GGUF file works too, dequantised
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot load a backbone ({e})") from None
        return cls(backbone).to(device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_logits: bool = False,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] token ids -> [B, T]: V of the prefix ending at every position (logits of V if asked). The
        mask is a [B, T] padding mask, or a 4-D mask with its position ids (plumbing.shared_prefix)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state  # [B, T, H]
        with torch.autocast(hidden.device.type, enabled=False):  # the head and the sigmoid in fp32, under bf16 too
            logits = self.value_head(hidden.float()).squeeze(-1)  # [B, T]
            return logits if return_logits else torch.sigmoid(logits)


# ================================================ V(s . a) for stage B: the plain definition, then each state read once
def value_alone(critic: Critic, state: list[int], action: list[int]) -> float:
    """V_phi(s . a), the plain definition: the critic on the sequence s . a alone, as it is trained (V(s) for an
    empty action)."""
    ids = torch.tensor([state + action], device=next(critic.parameters()).device)  # [1, L]
    return critic(ids, torch.ones_like(ids))[0, -1].item()


@torch.no_grad()
def action_values(critic: Critic, asked: list[tuple[list[int], list[list[int]]]],
                  batch_actions: int = 64, packed: bool = True) -> list[list[float]]:
    """V(s . a) for every action a of every (state s, [actions]) asked: the value at the action's last token
    (V(s) for an empty action). value_alone's numbers, computed faster and checked equal in
    tests/test_shared_prefix.py::test_q_values_are_the_plain_q_value: each state is read once, its actions packed
    after it in one row (plumbing.shared_prefix); whole states of similar length share a forward pass of about
    batch_actions actions. packed False: one row per (state, action) instead (pair_values), for a model family
    whose shared rows differ (check_action_values)."""
    device = next(critic.parameters()).device
    was_training = critic.training
    critic.eval()
    order = sorted(range(len(asked)), key=lambda i: len(asked[i][0]) + sum(map(len, asked[i][1])))
    values: list[list[float]] = [[] for _ in asked]
    batches = pack(order, [len(actions) for _, actions in asked], batch_actions)
    batches += [None] * (passes_in_step(critic, len(batches)) - len(batches))  # FSDP: as many passes on every rank
    for batch in batches:
        states, actions = ([asked[i][0] for i in batch], [asked[i][1] for i in batch]) if batch else ([[0]], [[[0]]])
        with autocast(device):
            flat = iter((packed_values if packed else pair_values)(critic, states, actions).tolist())
        for i in batch or []:
            values[i] = [next(flat) for _ in asked[i][1]]
    critic.train(was_training)
    return values


def packed_values(critic: Critic, states: list[list[int]], actions: list[list[list[int]]]) -> torch.Tensor:
    """V(s . a) of every action of a batch of states from their shared-prefix rows: [N], the actions in order.
    value_alone's numbers, computed faster (each state read once) and checked equal in
    tests/test_shared_prefix.py::test_q_values_are_the_plain_q_value (and by check_action_values on every run)."""
    rows = shared_prefix_rows(states, actions, next(critic.parameters()).device)
    v = critic(rows.input_ids, rows.attention_mask(critic.backbone.config),
               position_ids=rows.position_ids).float()  # [B, W]
    return v[rows.last_row, rows.last_col]  # [N]


def pair_values(critic: Critic, states: list[list[int]], actions: list[list[list[int]]]) -> torch.Tensor:
    """packed_values' numbers with one row per (state, action): the critic's plain forward of s . a, exact for
    any model family. Pairs of the same length share a forward pass, unpadded: [N]."""
    device = next(critic.parameters()).device
    pairs = [s + a for s, acts in zip(states, actions) for a in acts]
    by_length = collections.defaultdict(list)  # length of s . a -> its pairs
    for j, ids in enumerate(pairs):
        by_length[len(ids)].append(j)
    values = torch.zeros(len(pairs), device=device)  # [N]
    groups = list(by_length.values())
    for group in groups + [groups[0][:1]] * (passes_in_step(critic, len(groups)) - len(groups)):  # FSDP: in step
        ids = torch.tensor([pairs[j] for j in group], device=device)  # [b, L]
        values[group] = critic(ids, torch.ones_like(ids))[:, -1].float()  # [b] V at the last token
    return values


# ============================================================================= the loss
def critic_loss(logits: torch.Tensor, mc_value: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-state loss of the critic against the MC label V_hat(s) (docs/algorithm.md, "The critic"); [N] -> [N].
    mse: (V(s) - V_hat(s))^2, the arXiv version.
    bce: -[V_hat log V + (1 - V_hat) log(1 - V)], the NeurIPS version (computed from the logits: stable)."""
    if kind == "mse":
        return (torch.sigmoid(logits) - mc_value) ** 2
    return F.binary_cross_entropy_with_logits(logits, mc_value, reduction="none")


# =========================================== the data: one weight per distinct state, held-out questions, micro-batches
def state_weights(solutions: list[dict]) -> None:
    """Set s["weights"][t] = 1 / (number of solutions of the question that contain state s_t), so that every
    distinct state has total weight 1 however many kept solutions share it (its MC label is the same in each).
    Without it s_0, in all n solutions of a question, would weigh n times a state of one solution."""
    by_question = collections.defaultdict(list)
    for s in solutions:
        by_question[s["qid"]].append(s)
    for group in by_question.values():  # one question at a time: only its prefixes are held in memory
        prefixes = [[tuple(s["ids"][: p + 1]) for p in s["value_positions"]] for s in group]
        count = collections.Counter(p for ps in prefixes for p in ps)
        for s, ps in zip(group, prefixes, strict=True):
            s["weights"] = [1.0 / count[p] for p in ps]


def split_by_question(solutions: list[dict], heldout_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out), split by question. The held-out questions are those whose id hashes lowest: the
    same questions in every run and every DAPO iteration, so a warm-started critic never saw them."""
    qids = sorted({s["qid"] for s in solutions}, key=lambda q: hashlib.sha256(q.encode()).hexdigest())
    n_out = min(len(qids) - 1, math.ceil(heldout_fraction * len(qids))) if heldout_fraction > 0 else 0
    heldout = set(qids[:n_out])
    return [s for s in solutions if s["qid"] not in heldout], [s for s in solutions if s["qid"] in heldout]


def collate(solutions: list[dict], device) -> tuple[torch.Tensor, ...]:
    """A micro-batch: right-padded ids and mask [B, T], and for every state its row, position, label and loss
    weight [N]."""
    ids, mask = pad_right([s["ids"] for s in solutions], device)  # [B, T]
    rows = torch.tensor([b for b, s in enumerate(solutions) for _ in s["value_positions"]], device=device)  # [N]
    cols = torch.tensor([p for s in solutions for p in s["value_positions"]], device=device)  # [N]
    labels = torch.tensor([v for s in solutions for v in s["mc_values"]], device=device)  # [N]
    weights = torch.tensor([w for s in solutions for w in s["weights"]], device=device)  # [N]
    return ids, mask, rows, cols, labels, weights


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of the training solutions in an epoch: the same on every rank and after a resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003 * seed + epoch)).tolist()


# ============================================================================= training (steps 3-4)
def critic_step(cfg: Config, ddp, model, batch: list[dict]) -> float:
    """The forward and backward passes of one optimizer step: this rank's share of the global batch in
    micro-batches, one forward pass per solution (V at every step boundary), the loss against the MC labels.
    The gradient is the weighted mean over the global batch's states (state_weights; divided by this batch's
    total weight); returns this rank's weighted sum of the loss."""
    total_weight = sum(w for s in batch for w in s["weights"])  # over all ranks: every rank sees the whole batch
    mine = batch[ddp.rank:: ddp.world_size]
    accum = cfg.batch_size // (cfg.micro_batch_size * ddp.world_size)
    loss_sum = 0.0
    for micro in range(accum):
        ids, mask, rows, cols, labels, weights = collate(
            mine[micro * cfg.micro_batch_size: (micro + 1) * cfg.micro_batch_size], ddp.device)
        sync_gradients(model, micro == accum - 1)  # reduce the gradients once, on the last micro-step
        with autocast(ddp.device):
            logits = model(ids, mask, return_logits=True)  # [B, T]
        weighted = weights * critic_loss(logits[rows, cols].float(), labels, cfg.loss)  # [N]
        # DDP and FSDP average gradients over ranks: x world_size / (total weight of the global batch) makes the
        # gradient the weighted mean over the global batch, however it is split into ranks and micro-batches.
        (weighted.sum() * ddp.world_size / total_weight).backward()
        loss_sum += weighted.sum().item()
    return loss_sum


def train_critic(cfg: Config, ddp, training: TrainingRun, critic: Critic, train: list[dict], heldout: list[dict],
                 t0: float, tracker):
    """Steps 3-4: --epochs passes over the training solutions in global batches of --batch_size, AdamW with
    warm-up and linear decay and gradient clipping, resumed from the run's checkpoint when there is one. The last
    step's loss, or None when --stop_after stopped the run."""
    steps_per_epoch = len(train) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.gradient_checkpointing:
        enable_checkpointing(critic.backbone)
    critic.train()
    disable_dropout(critic)  # trained as the function it is queried as (values_at, action_values: eval mode)
    model = distribute(critic, ddp, cfg.fsdp)  # under FSDP `critic` itself is sharded in place: model is critic
    optimizer = torch.optim.AdamW(trainable(critic), lr=cfg.lr, weight_decay=cfg.weight_decay)  # LoRA: adapters, head
    report_peak_memory("optimizer built")  # only with $DAPO_PEAK_MEMORY_FILE set (a diagnostic)
    meta = training.resume(critic, optimizer)
    step, loss = (meta["step"], meta["train_loss"]) if meta else (0, None)
    if ddp.is_main:
        note = paper_defaults_note("critic.py", cfg, total_steps, TOY_FLAGS)
        if note:
            print(note)
        warn_useless_data([v for s in train for v in s["mc_values"]],
                          after=": the critic can only learn a constant (see the rollout's summary.json)")
        print(f"{len(train)} training solutions ({sum(len(s['mc_values']) for s in train)} states, "
              f"{round(sum(w for s in train for w in s['weights']))} distinct), {len(heldout)} held out | "
              f"{total_steps} steps of "
              f"{cfg.batch_size} solutions = {cfg.batch_size // (cfg.micro_batch_size * ddp.world_size)} "
              f"micro-batch(es) of {cfg.micro_batch_size} x {ddp.world_size} rank(s) | loss {cfg.loss}")
    bar = progress(total=total_steps, initial=step, desc="critic", disable=not ddp.is_main)
    first_step = step
    while step < total_steps:
        epoch, k = divmod(step, steps_per_epoch)
        order = epoch_order(len(train), cfg.seed, epoch)
        batch = [train[i] for i in order[k * cfg.batch_size: (k + 1) * cfg.batch_size]]
        lr = lr_at(step, total_steps, int(cfg.warmup_fraction * total_steps), cfg.lr)
        set_lr(optimizer, lr)
        loss_sum = critic_step(cfg, ddp, model, batch)
        grad_norm = clip_gradients(critic, cfg.grad_clip)
        optimizer.step()
        if step == first_step:  # parameters, gradients and AdamW state all exist now
            shards = held_per_rank(critic, optimizer)
            if ddp.is_main:
                tqdm.write(shards)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss = all_ranks_sum(loss_sum) / sum(w for s in batch for w in s["weights"])
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        tracker.log({"critic/loss": loss, "critic/lr": lr, "critic/grad_norm": grad_norm, "critic/epoch": epoch + 1},
                    step)
        if ddp.is_main and (step % cfg.log_every == 0 or step == total_steps):
            tqdm.write(f"step {step}/{total_steps} | epoch {epoch + 1} | {cfg.loss} {loss:.4f} | lr {lr:.2e} | "
                       f"grad norm {grad_norm:.3f} | {time.time() - t0:.1f}s")
        if training.after_step(step, total_steps, critic, optimizer, {"train_loss": loss}):
            return None
    bar.close()
    return loss


# ===================== machinery (a learner may skip: input validation, loading and saving, the packing check, metrics)
def load_solutions(path: str, policy_tok=None, policy: str = "") -> list[dict]:
    """solutions.jsonl, validated in full: {qid, ids, value_positions, mc_values, weights} per solution, where
    value_positions[t] = step_ends[t] - 1 is the last token of state s_t and weights[t] its loss weight
    (state_weights). With policy_tok (a tokenizer assumed, not named), a solution whose ids do not decode to its
    text (rollout.py writes it) is refused: its ids are another tokenizer's."""
    solutions = []
    for r in read_jsonl(path, required=("qid", "ids", "step_ends", "mc_values")):
        where = f"{path} line {r['_line']}"
        ids, ends, labels = r["ids"], r["step_ends"], r["mc_values"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise InputError(f"{where}: 'ids' must be a non-empty list of token ids")
        if not isinstance(ends, list) or not isinstance(labels, list) or not ends or len(ends) != len(labels):
            raise InputError(f"{where}: 'step_ends' and 'mc_values' must be non-empty lists of the same length")
        if not all(isinstance(e, int) and 1 <= e <= len(ids) for e in ends):
            raise InputError(f"{where}: every step end must be a position in 1..len(ids) = {len(ids)}")
        if not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in labels):
            raise InputError(f"{where}: MC labels must be numbers in [0, 1], got {labels}")
        if policy_tok is not None and isinstance(r.get("text"), str) and isinstance(r.get("prompt_len"), int):
            if policy_tok.decode(ids[r["prompt_len"]:], skip_special_tokens=True) != r["text"]:
                raise InputError(f"{where}: its token ids are not its text in the tokenizer of {policy}, assumed to "
                                 "be the rollout's policy: name the policy that made the rollout with --policy")
        # Tokens after the last state's end (the final action) carry no label: drop them.
        solutions.append({"qid": str(r["qid"]), "ids": ids[: max(ends)], "value_positions": [e - 1 for e in ends],
                          "mc_values": [float(v) for v in labels]})
    state_weights(solutions)
    return solutions


def read_inputs(cfg: Config, world_size: int) -> tuple[list[dict], list[dict], dict]:
    """Steps 1-2, before anything is written: the settings checked, solutions.jsonl read and validated in full
    (in the critic's tokens), the held-out questions set aside. (train, held-out, how the critic reads the
    policy's tokens)."""
    if cfg.loss not in ("mse", "bce"):
        raise InputError(f"--loss must be mse or bce, got {cfg.loss!r}")
    if cfg.batch_size % (cfg.micro_batch_size * world_size):
        raise InputError(f"--batch_size {cfg.batch_size} must be a multiple of --micro_batch_size x ranks "
                         f"= {cfg.micro_batch_size * world_size}")
    path = os.path.join(cfg.rollout_dir, "solutions.jsonl")
    solutions, tokens = critic_solutions(cfg, path)
    train, heldout = split_by_question(solutions, cfg.heldout_fraction)
    if len(train) < cfg.batch_size:  # a last partial batch is dropped: every rank does the same work
        note = paper_defaults_note("critic.py", cfg, 0, TOY_FLAGS)
        raise InputError(f"{path}: {len(train)} training solutions, fewer than one batch "
                         f"(--batch_size {cfg.batch_size})" + (f"; {note}" if note else ""))
    if cfg.fsdp:
        from transformers import AutoModel

        check_shardable(cfg.init_critic or cfg.init, AutoModel)
    return train, heldout, tokens


def rollout_policy(cfg: Config) -> tuple[str, bool]:
    """The policy whose token ids the rollout holds, and whether it was named (--policy, or the model in the
    rollout's summary.json) rather than assumed (the critic's source: it starts from the policy by default)."""
    if cfg.policy:
        return cfg.policy, True
    summary = os.path.join(cfg.rollout_dir, "summary.json")
    if os.path.isfile(summary):
        with open(summary, encoding="utf-8") as f:
            model = json.load(f).get("config", {}).get("model")
        if isinstance(model, str) and model:
            return model, True
    return cfg.init_critic or cfg.init, False


def critic_solutions(cfg: Config, path: str) -> tuple[list[dict], dict]:
    """solutions.jsonl in the critic's tokens: the policy's token ids as they are when the critic shares the
    policy's tokenizer, else each state's text in the critic's own tokens (plumbing/retokenize.py), and what
    the critic directory records of it."""
    policy, named = rollout_policy(cfg)
    policy_tok = load_tokenizer(policy)
    solutions = load_solutions(path, None if named else policy_tok, policy)
    critic_tok = load_tokenizer(cfg.init_critic or cfg.init)
    tokens = critic_tokens(policy_tok, critic_tok, path)
    if tokens is not None:
        solutions = tokens.solutions(solutions)
        state_weights(solutions)
    return solutions, describe(policy, policy_tok, critic_tok)


def build_critic(cfg: Config, ddp, solutions: list[dict]) -> Critic:
    """A warm start from the previous critic (iterative DAPO), or a fresh value head on the backbone; under
    --fsdp sharded as it is loaded. With --lora_r, the backbone frozen with LoRA adapters (plumbing.lora), the
    value head trained in full."""
    critic = load_critic_for(cfg.init_critic or cfg.init, ddp, cfg.fsdp, fresh=not cfg.init_critic, lora=cfg)
    vocab = critic.backbone.get_input_embeddings().num_embeddings
    if max(t for s in solutions for t in s["ids"]) >= vocab:
        raise InputError(f"{os.path.join(cfg.rollout_dir, 'solutions.jsonl')}: token ids beyond the critic's "
                         f"embeddings ({vocab}): its tokenizer has more tokens than its backbone")
    return critic


def save_critic(critic: Critic, tokenizer, out_dir: str, state: dict | None = None,
                metrics: dict | None = None) -> None:
    """One directory: the backbone (save_pretrained), the value head, the tokenizer and metrics.json (when
    given). Written beside out_dir and renamed into place, so a directory named out_dir is always a complete
    critic. `state` holds the critic's full weights when the module itself holds only a shard of them (FSDP).
    With LoRA the adapters are merged into the backbone's weights (plumbing.lora): a plain critic."""
    state = merged_state_dict(critic, critic.state_dict() if state is None else state)
    part = lambda prefix: {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    with atomic_dir(out_dir) as tmp:
        plain_model(critic.backbone).save_pretrained(tmp, state_dict=part("backbone."))
        torch.save(part("value_head."), os.path.join(tmp, HEAD_FILE))
        tokenizer.save_pretrained(tmp)
        if metrics is not None:
            write_json_atomic(os.path.join(tmp, "metrics.json"), metrics)


def load_critic(path: str, device, dtype: torch.dtype = torch.float32) -> Critic:
    """The critic saved by save_critic, ready for training or inference (the backbone in `dtype`)."""
    head = read_head(path, device)
    critic = Critic.from_backbone(path, device, dtype)
    critic.value_head.load_state_dict(head)
    return critic


def read_head(path: str, device) -> dict[str, torch.Tensor]:
    """The value head's weights in a critic directory (after checking that path is one)."""
    check_model_path(path, "critic")
    if not os.path.isfile(os.path.join(path, HEAD_FILE)):
        raise InputError(f"{path}: not a critic directory (no {HEAD_FILE}); train one with critic.py")
    return torch.load(os.path.join(path, HEAD_FILE), map_location=device, weights_only=True)


def load_critic_for(path: str, ddp, fsdp: bool, fresh: bool = False, lora=None) -> Critic:
    """The critic of a critic directory (fresh: a fresh value head on the backbone of a causal LM) for this run:
    whole, or under torchrun with fsdp sharded over the ranks as it is loaded (plumbing.models.load_sharded: no
    rank holds a whole copy); with LoRA settings (lora: a config with --lora_r > 0), its backbone adapted
    (plumbing.lora.add_lora) and in --base_dtype."""
    import torch.distributed as dist

    dtype = base_dtype(lora) if lora is not None else torch.float32
    adapt = (lambda critic: add_lora(critic, lora, critic=True)) if lora is not None else (lambda critic: critic)
    if not (fsdp and dist.is_initialized()):
        return adapt(Critic.from_backbone(path, ddp.device, dtype) if fresh else load_critic(path, ddp.device, dtype))
    from transformers import AutoModel

    check_model_path(path, "critic backbone")
    if fresh:  # zeros, as Critic.__init__ gives
        source, gguf = gguf_source(path)
        hidden = AutoConfig.from_pretrained(source, **gguf).hidden_size
        head = {"weight": torch.zeros(1, hidden), "bias": torch.zeros(1)}
    else:
        head = read_head(path, "cpu")
    head = {f"value_head.{k}": v for k, v in head.items()}
    return load_sharded(path, AutoModel, ddp, wrap=lambda backbone: adapt(Critic(backbone)), dtype=dtype,
                        extra=lambda critic: {**head, **(adapter_init(critic, lora.seed) if lora is not None else {})})


def pad_right(sequences: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: under causal attention a real token never sees the padding after it, so its hidden
    state (and position) is what it would be without padding."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=device)  # [B, T]
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)  # [B, T]
    return ids, mask


@torch.no_grad()
def values_at(critic: Critic, sequences: list[list[int]], positions: list[list[int]],
              batch_size: int = 64) -> list[list[float]]:
    """V at the given positions of each token sequence, one forward pass per sequence: values[i][k] is
    V(sequences[i][: positions[i][k] + 1])."""
    device = next(critic.parameters()).device
    was_training = critic.training
    critic.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths share a batch
    values: list[list[float]] = [[] for _ in sequences]
    for start in range(0, len(order), batch_size):
        batch = order[start: start + batch_size]
        ids, mask = pad_right([sequences[i] for i in batch], device)  # [B, T]
        with autocast(device):
            v = critic(ids, mask).float()  # [B, T]
        for row, i in enumerate(batch):
            values[i] = v[row, positions[i]].tolist()
    critic.train(was_training)
    return values


def check_action_values(critic: Critic, asked: list[tuple[list[int], list[list[int]]]], mode: str = "on",
                        quiet: bool = False) -> bool:
    """Whether action_values may pack this critic's states and actions (plumbing.shared_prefix.check_packing):
    mode on refuses with one line, before any Q value is used, a critic whose shared-prefix rows do not give
    the values of each (state, action) alone; auto says so and answers False (one row per pair); off: False."""
    return check_packing(critic, packed_values, value_alone, asked, "the critic's V(s . a)", per_token=False,
                         mode=mode, quiet=quiet)


def heldout_metrics(critic: Critic, heldout: list[dict], batch_size: int, bins: int = 10) -> dict:
    """MSE, Pearson r and a calibration table over the held-out states, each state once (s_0 and shared
    prefixes appear in several solutions of a question)."""
    values = values_at(critic, [s["ids"] for s in heldout], [s["value_positions"] for s in heldout], batch_size)
    pairs = {}
    for s, vs in zip(heldout, values, strict=True):
        for p, v, label in zip(s["value_positions"], vs, s["mc_values"], strict=True):
            pairs[(s["qid"], tuple(s["ids"][: p + 1]))] = (v, label)
    pred, label = torch.tensor(list(pairs.values()), dtype=torch.float64).T  # [N], [N]
    r = torch.corrcoef(torch.stack([pred, label]))[0, 1].item() if len(pred) > 1 else float("nan")
    table = []
    which = (pred * bins).long().clamp(max=bins - 1)  # [N] bin of each prediction
    for b in range(bins):
        inside = which == b
        if inside.any():
            table.append({"bin": [b / bins, (b + 1) / bins], "states": int(inside.sum()),
                          "mean_predicted": pred[inside].mean().item(), "mean_label": label[inside].mean().item()})
    return {"questions": len({s["qid"] for s in heldout}), "states": len(pred),
            "mse": ((pred - label) ** 2).mean().item(), "pearson_r": None if math.isnan(r) else r,
            "calibration": table}


def print_metrics(m: dict) -> None:
    r = "undefined (constant)" if m["pearson_r"] is None else f"{m['pearson_r']:.3f}"
    print(f"held-out: {m['questions']} questions, {m['states']} states | MSE {m['mse']:.4f} | Pearson r {r}")
    print("calibration:  predicted V   states   mean V   mean MC label")
    for row in m["calibration"]:
        lo, hi = row["bin"]
        print(f"              [{lo:.1f}, {hi:.1f})  {row['states']:7d}   "
              f"{row['mean_predicted']:.3f}    {row['mean_label']:.3f}")


def report_metrics(tracker, m: dict, step: int) -> None:
    """The held-out metrics to the tracker: MSE and Pearson r, and the calibration table."""
    tracker.log({"critic/heldout_mse": m["mse"], "critic/heldout_pearson_r": m["pearson_r"]}, step)
    tracker.table("critic/calibration", ["predicted V", "states", "mean V", "mean MC label"],
                  [[f"[{r['bin'][0]:.1f}, {r['bin'][1]:.1f})", r["states"], r["mean_predicted"], r["mean_label"]]
                   for r in m["calibration"]], step)


# ============================================================================= main
# The paper's steps: lines under an ALGORITHM comment are the algorithm; those under MACHINERY a learner may skip.
def main() -> None:
    # MACHINERY: settings, DDP, the rerun rule. ALGORITHM 1-2: the solutions with their MC labels (in the critic's
    # tokens), held-out questions set aside (read and checked in full before anything is written).
    cfg = parse_config(Config)
    set_precision(cfg.precision)
    ddp = setup_distributed()
    set_seed(cfg.seed)
    train, heldout, tokens = read_inputs(cfg, ddp.world_size)
    tracker = start_tracking(cfg, "critic.py", ddp.is_main)
    source = cfg.init_critic or cfg.init
    training = TrainingRun.start(cfg, RESUME_IGNORES, [os.path.join(cfg.rollout_dir, "solutions.jsonl"), source],
                                 "metrics.json", ddp.world_size, ddp.is_main)
    if training is None:  # out_dir holds this run's finished critic
        cleanup_distributed()
        return

    # ALGORITHM 3-4. The critic, trained on the MC labels: one forward pass per solution gives V at every step
    # boundary.
    tok = load_tokenizer(source)
    critic = build_critic(cfg, ddp, train + heldout)
    t0 = time.time()
    loss = train_critic(cfg, ddp, training, critic, train, heldout, t0, tracker)
    if loss is None:  # MACHINERY: stopped by --stop_after, leaving only the checkpoint
        cleanup_distributed()
        return

    # ALGORITHM 5. Held-out metrics, then the critic directory. MACHINERY: a sharded critic computes only with
    # every rank joining each forward pass (each layer's parameters are gathered from all), so under FSDP every
    # rank measures the same held-out batches; its full weights are gathered onto rank 0's CPU to be saved.
    metrics = heldout_metrics(critic, heldout, cfg.eval_batch_size) if heldout and (ddp.is_main or cfg.fsdp) else None
    state = full_state_dict(critic) if cfg.fsdp else None
    if ddp.is_main:
        if metrics:
            print_metrics(metrics)
            report_metrics(tracker, metrics, len(train) // cfg.batch_size * cfg.epochs)
        save_critic(critic, tok, cfg.out_dir, state, {
            "heldout": metrics, "train_solutions": len(train), "steps": len(train) // cfg.batch_size * cfg.epochs,
            "final_train_loss": loss, "seconds": round(time.time() - t0, 1), "tokens": tokens,
            "config": dataclasses.asdict(cfg)})
        print(f"critic saved to {cfg.out_dir}")
    training.finish()
    cleanup_distributed()  # its barrier keeps the other ranks until rank 0 has saved


if __name__ == "__main__":
    run(main)
