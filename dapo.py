"""DAPO stage B, the actor: advantages from the critic, the DAPO loss (eq. 12) and actor training
(docs/algorithm.md, "Stage B").

With pi_ref = the policy that generated the rollout (the SFT model in iteration 1) and the critic V_phi of
stage A, for every state s of states.jsonl and its M candidate actions a_1..a_M (the first steps of its M
completions):
  1. Q(s, a_i) = r(s, a_i), the graded reward, when a_i ends the solution (V of a finished solution is 0),
     else V_phi(s . a_i) (a critic with its own tokenizer reads the text of s . a_i: plumbing/retokenize.py).
     The critic is freed afterwards. (--q_source rollout, an ablation without a
     critic: Q(s, a_i) = the graded reward of a_i's own completion, one Monte-Carlo sample.)
  2. Advantage (eq. 13): A(s, a_i) = Q(s, a_i) - (1/M) sum_j Q(s, a_j), all M candidates, duplicates included.
  3. Training set: the unique candidates of every state whose advantage gap max A - min A is at least
     min_gap (paper: 0.1).
  4. log pi_ref(a|s), the SUM of the action's token log-probs, computed once with the policy itself before
     any update and cached on disk: no reference model sits in memory while the actor trains.
  5. The actor, initialised from pi_ref, minimises eq. 12,
         L(theta) = 1/2 E_{s,a} [ (A(s,a)/beta - log(pi_theta(a|s) / pi_ref(a|s)))^2 ],
     with all candidates of a state in the same micro-batch, AdamW, linear decay and gradient clipping.
  6. The actor is saved as a Hugging Face model directory: rollout.py and eval.py load it as the next policy,
     with fit.jsonl: log(pi_theta / pi_ref) of every training action after training, beside its advantage.
Steps 1, 4 and 5 read each state once: one row holds the state and then all its candidates, each candidate
attending to the state and to itself (plumbing.shared_prefix), instead of one row per (state, candidate).
Before steps 1 and 4, a few states are run both ways: for a model family whose rows differ (hybrid and SSM
layers, ALiBi, a longrope past its original length) the passes take one row per (state, candidate) instead, the
plain forward of s . a (--packing).

Reading order: the functions of steps 1-5 come first, the plain definitions of Q(s, a) and log pi(a|s)
(q_value, action_logp: one (state, action) pair at a time) before the packed versions the stage runs
(q_values, action_logps: the same numbers, faster; pair_logps: the same, one row per pair, where rows cannot be
packed); below the "machinery" line is what a learner may skip (input validation, loading, DDP/FSDP batching,
metrics, run files); main() marks its lines ALGORITHM or MACHINERY.

    python dapo.py --policy runs/toy/sft --critic runs/toy/iter1/critic --rollout_dir runs/toy/iter1/rollout \\
        --out_dir runs/toy/iter1/actor
    torchrun --nproc_per_node=8 dapo.py ...   # the states of each global batch are split over the ranks
    torchrun --nproc_per_node=8 dapo.py ... --fsdp true   # 7-8B models: parameters, gradients, AdamW state sharded
    python dapo.py ... --lora_r 16   # LoRA: frozen base (= pi_ref, adapters disabled), adapters trained, saved merged

The defaults are the paper's settings for 7-8B models. The toy task (0.5M parameters, a few hundred states)
takes --beta 0.3 --lr 1e-4 --epochs 4 --global_batch_actions 64 --micro_batch_actions 64 (demo.sh).

Output: out_dir (the actor, its tokenizer, train_log.jsonl with the metrics of every optimizer step,
train_summary.json with the data kept, the last step's metrics, the fit after training and the config, and
fit.jsonl) appears only when training has finished. Beside it, out_dir.work/ holds the cached Q values,
advantages and log pi_ref (reused by a rerun on the same inputs, e.g. with another beta or lr and --overwrite
true) and the resumable checkpoint (checkpoint/, in torch.distributed.checkpoint's format, sharded under
--fsdp): rerunning the same command after a kill resumes from it; over a finished actor it does nothing.

Iterative DAPO (section 6): iteration i+1 regenerates all data with the actor of iteration i, which becomes
pi_ref and the generator, and warm-starts the critic from the critic of iteration i (demo.sh runs this loop):
    policy=runs/toy/sft; warm=()
    for i in 1 2 3; do
        d=runs/toy/iter$i
        python rollout.py --model $policy --data runs/toy/train.jsonl --out_dir $d/rollout ...
        python critic.py --rollout_dir $d/rollout --init $policy "${warm[@]}" --out_dir $d/critic ...
        python dapo.py --policy $policy --critic $d/critic --rollout_dir $d/rollout --out_dir $d/actor ...
        policy=$d/actor; warm=(--init_critic $d/critic)
    done
"""
from __future__ import annotations

import collections
import dataclasses
import gc
import inspect
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoModelForCausalLM, set_seed

from plumbing.checkpoints import full_state_dict
from plumbing.cli import arg, InputError, parse_config, progress, run
from plumbing.distributed import (all_ranks_max, all_ranks_sum, cleanup_distributed, clip_gradients, distribute,
                                  held_per_rank, is_sharded, on_all_ranks, passes_in_step, setup_distributed,
                                  sync_gradients)
from plumbing.lora import (add_lora, adapter_init, base_dtype, LoraSettings, merged_state_dict, plain_model,
                           reference_mode, trainable)
from plumbing.models import (autocast, check_shardable, disable_dropout, enable_checkpointing, load_causal_lm,
                             load_sharded, load_tokenizer, set_precision)
from plumbing.retokenize import critic_tokens
from plumbing.runfiles import atomic_dir, read_jsonl, warn_useless_data, write_json_atomic, write_jsonl_atomic
from plumbing.shared_prefix import check_packing, pack, PACKING, shared_prefix_rows
from plumbing.tracking import start_tracking, TrackingConfig
from plumbing.trainer import lr_at, paper_defaults_note, report_peak_memory, set_lr, TrainingRun
from critic import action_values, check_action_values, load_critic_for, value_alone


@dataclasses.dataclass
class Config(LoraSettings, TrackingConfig):  # LoraSettings: --lora_r and its flags (plumbing.lora)
    policy: str = arg("runs/toy/sft", "pi_ref: the policy that generated the rollout; the actor starts from it "
                                      "(HF directory, hub name or .gguf file)")
    critic: str = arg("runs/toy/iter1/critic", "the critic directory of critic.py (unused with --q_source rollout)")
    q_source: str = arg("critic", "Q(s, a) of a non-terminal candidate: critic (V_phi(s . a), the paper) or rollout "
                                  "(the graded reward of its own completion, no critic: an ablation)")
    rollout_dir: str = arg("runs/toy/iter1/rollout", "rollout.py output directory (its states.jsonl)")
    out_dir: str = arg("runs/toy/iter1/actor", "where the trained actor goes (a Hugging Face model directory)")
    beta: float = arg(0.01, "KL strength beta: log(pi / pi_ref) is fitted to A / beta (paper: 0.01 or 0.02)")
    min_gap: float = arg(0.1, "keep a state only when max A - min A over its candidates is at least this (paper: 0.1)")
    lr: float = arg(5e-7, "peak learning rate (paper: 5e-7)")
    epochs: int = arg(1, "passes over the training states (paper: 1)")
    global_batch_actions: int = arg(2048, "actions per optimizer step, over all ranks, whole states only (paper: 2048)")
    micro_batch_actions: int = arg(32, "actions per forward pass on a rank, whole states only "
                                       "(a larger state goes alone)")
    warmup_fraction: float = arg(0.0, "fraction of the steps spent warming the learning rate up (then linear decay)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "clip the gradient norm of each optimizer step to this (0: no clipping)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass: less memory, more time")
    fsdp: bool = arg(False, "under torchrun: shard parameters, gradients and AdamW state over the ranks (FSDP2), "
                            "loading the policy and the critic straight into the shards")
    precision: str = arg("auto", "auto: bf16 autocast on CUDA, fp32 on the CPU | bf16: bf16 autocast everywhere "
                                 "(on the CPU it emulates a GPU run) | fp32: no autocast. Q, log pi_ref and "
                                 "training all run in it")
    packing: str = arg("auto", "auto: each state and its candidates in one row where that gives each pair's own "
                                "numbers (checked on the run's states), else one row per (state, candidate) | on: "
                                "one row per state or refuse | off: one row per (state, candidate)")
    critic_batch_size: int = arg(64, "actions per critic forward pass, whole states (Q values, once before training)")
    ref_batch_size: int = arg(64, "actions per forward pass of log pi_ref, whole states (once before training)")
    seed: int = arg(0, "seed of the order of the states")
    log_every: int = arg(10, "print a line of metrics every N optimizer steps (and after the last)")
    checkpoint_every: int = arg(50, "save the resumable checkpoint out_dir.work/checkpoint/ every N optimizer steps "
                                       "(0: never)")
    stop_after: int = arg(0, "stop after N optimizer steps as a kill would, leaving only the checkpoint (0: never)")
    overwrite: bool = arg(False, "remove out_dir and its checkpoint (finished or not) first and start afresh; "
                                 "the cached Q values and log pi_ref, keyed by their inputs, are kept")


# Settings a rerun may change (where the output goes, speed, logging): none of them changes the actor trained.
# Any other change is refused (plumbing.runfiles.check_rerun).
RESUME_IGNORES = ("out_dir", "overwrite", "micro_batch_actions", "critic_batch_size", "ref_batch_size", "packing",
                  "gradient_checkpointing", "log_every", "checkpoint_every", "stop_after", "report_to")
# The defaults are the paper's settings for 7-8B models; the toy task takes TOY_FLAGS (demo.sh's), which a run of
# only a few optimizer steps at the default learning rate names (plumbing.trainer.paper_defaults_note).
TOY_FLAGS = "--epochs 4 --global_batch_actions 64 --micro_batch_actions 64 --beta 0.3 --lr 1e-4"
CACHE = "prepared.pt"  # in out_dir.work/: Q values, advantages, the training set and log pi_ref (steps 1-4)


# ============================================================================= step 1: Q(s, a)
def q_value(critic, state: list[int], action: list[int], terminal: bool, reward: float | None) -> float:
    """Q(s, a), the plain definition: the graded reward r when a ends the solution (Q = r + V(finished) = r),
    else V_phi(s . a), the critic on the sequence s . a alone (Q = 0 + V)."""
    return float(reward) if terminal else value_alone(critic, state, action)


def q_values(states: list[dict], values_of) -> list[list[float]]:
    """Q(s, a_i) of every candidate of every state: q_value's numbers, computed faster (each state read once) and
    checked equal in tests/test_shared_prefix.py::test_q_values_are_the_plain_q_value. values_of maps
    [(state, [action, ...]), ...] to [[V(state . action), ...], ...] (critic.action_values); each distinct state is
    asked once, with its distinct non-terminal candidates (duplicates and records of the same state share them)."""
    candidates: dict[tuple, dict[tuple, None]] = {}  # state -> its distinct non-terminal actions, in order
    for s in states:
        for a in s["actions"]:
            if not a["terminal"]:
                candidates.setdefault(tuple(s["state_ids"]), {})[tuple(a["ids"])] = None
    asked = [(list(state), [list(a) for a in actions]) for state, actions in candidates.items()]
    values = {(tuple(state), tuple(a)): v for (state, actions), vs in zip(asked, values_of(asked), strict=True)
              for a, v in zip(actions, vs, strict=True)}
    return [[float(a["reward"]) if a["terminal"] else values[tuple(s["state_ids"]), tuple(a["ids"])]
             for a in s["actions"]] for s in states]


def rollout_q_values(states: list[dict]) -> list[list[float]]:
    """Q(s, a_i) without a critic (--q_source rollout, the ablation): the graded reward of the completion whose
    first step a_i is, a Monte-Carlo sample of Q, unbiased but 0 or 1. A candidate drawn k times gets the mean
    of its k completions' rewards (variance / k), as a critic gives its copies one value: training_set keeps one
    advantage per unique candidate, which must not depend on which copy came first. Averaging within the copies
    keeps the sum over the M candidates, so the baseline of eq. 13 is still the MC label V_hat(s)."""
    q = []
    for s in states:
        rewards: dict[tuple, list[float]] = {}
        for a in s["actions"]:
            rewards.setdefault(tuple(a["ids"]), []).append(float(a["completion_reward"]))
        q.append([sum(rewards[tuple(a["ids"])]) / len(rewards[tuple(a["ids"])]) for a in s["actions"]])
    return q


# ================================================================== steps 2-3: advantages (eq. 13) and the training set
def compute_advantages(q: torch.Tensor) -> torch.Tensor:
    """Eq. 13: A(s, a_i) = Q(s, a_i) - (1/M) sum_j Q(s, a_j), over the last dimension (the M candidates of a
    state, duplicates included, so that the mean is a sample estimate of V(s) under pi_ref). No division by
    the standard deviation: eq. 12 fits log(pi / pi_ref) to A / beta, the scale of A matters."""
    return q - q.mean(dim=-1, keepdim=True)  # [..., M]


def training_set(states: list[dict], q: list[list[float]], min_gap: float) -> list[dict]:
    """Steps 2-3: per state, the advantages of its M candidates; a state is kept when their gap is at least
    min_gap, with its unique candidates (nu_A = uniform over them). A candidate drawn several times gets the
    mean advantage of its copies: they agree unless its reward is noisy (a code test that timed out once), and
    then the mean is the better estimate of Q(s, a), whatever the order of the copies."""
    kept = []
    for s, q_s in zip(states, q, strict=True):
        advantages = compute_advantages(torch.tensor(q_s, dtype=torch.float64)).tolist()  # [M]
        if max(advantages) - min(advantages) < min_gap:
            continue
        copies = collections.defaultdict(list)  # unique candidate -> the advantages of its copies
        for a, adv in zip(s["actions"], advantages, strict=True):
            if a["ids"]:  # an empty step has log pi = 0 under every policy: nothing to learn from it
                copies[tuple(a["ids"])].append(adv)
        if copies:
            kept.append({"state_ids": s["state_ids"], "actions": [list(a) for a in copies],
                         "advantages": [sum(advs) / len(advs) for advs in copies.values()]})
    return kept


# ============================================================================= step 4: log pi(a|s)
def action_logp(model, state: list[int], action: list[int]) -> float:
    """log pi(a|s), the plain definition: the SUM of the action's token log-probs, from the model's plain forward
    of the sequence s . a (the logits at the state's last token and at every action token but the last predict
    the action's tokens; an empty action has log pi = 0)."""
    ids = torch.tensor([state + action], device=next(model.parameters()).device)  # [1, L]
    logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, len(state) - 1:-1].float(), -1)  # [|a|, V]
    return logp.gather(-1, ids[0, len(state):, None]).sum().item()


def action_logps(model, states: list[list[int]], actions: list[list[list[int]]]) -> torch.Tensor:
    """log pi(a|s) of every action of a batch of states (actions[i] are the candidates of states[i]): [N], the
    actions in order. action_logp's numbers, computed faster (each state read once) and checked equal in
    tests/test_shared_prefix.py::test_action_logps_are_the_plain_action_logp.

    Each state is read once: one row per state holds the state and then all its actions, each action seeing
    the state and itself (plumbing.shared_prefix). In training the gradient of every action flows into the
    state's tokens too, as it would through the sequence state . action. Rows are left-padded, so only the
    logits of the last K + 1 columns are computed (K = the most action tokens of a row): [B, K + 1, V]."""
    device = next(model.parameters()).device
    rows = shared_prefix_rows(states, actions, device)
    width = rows.input_ids.shape[1]
    keep = width - int(rows.token_from.min()) if len(rows.token_from) else 1  # columns from the first that predicts
    config = getattr(model, "module", model).config  # under DDP the model is wrapped
    logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask(config), position_ids=rows.position_ids,
                   use_cache=False, logits_to_keep=keep).logits  # [B, keep, V]
    predicting = logits[rows.token_row, rows.token_from - (width - keep)]  # [T, V] the logits before each action token
    targets = rows.input_ids[rows.token_row, rows.token_col]  # [T]
    token_logp = torch.log_softmax(predicting.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # [T]
    return torch.zeros(rows.num_actions, device=device).index_add(0, rows.token_action, token_logp)  # [N]


def pair_logps(model, states: list[list[int]], actions: list[list[list[int]]]) -> torch.Tensor:
    """action_logps' numbers with one row per (state, action): the plain forward of s . a, exact for any model
    family, the state read once per action (stage B takes it where shared rows differ: check_packing). Pairs of
    the same length share a forward pass, unpadded, so a row holds its pair and nothing else: [N]. Under DDP or
    FSDP every rank runs as many passes (the count differs with the lengths), as their collectives need."""
    device = next(model.parameters()).device
    pairs = [(s, a) for s, acts in zip(states, actions) for a in acts]
    by_length = collections.defaultdict(list)  # length of s . a -> its pairs
    for j, (s, a) in enumerate(pairs):
        by_length[len(s) + len(a)].append(j)
    passes = [(group, False) for group in by_length.values()]
    if hasattr(model, "require_backward_grad_sync") or hasattr(model, "set_requires_gradient_sync"):
        # DDP or FSDP: every pass takes part in collectives, so every rank runs as many (repeats that count zero)
        count = torch.tensor(len(passes), device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        passes += [(passes[0][0], True)] * (int(count) - len(passes))
    logps = [None] * len(pairs)  # [N] scalars, every one set below
    for group, repeat in passes:
        length = len(pairs[group[0]][0]) + len(pairs[group[0]][1])
        ids = torch.tensor([pairs[j][0] + pairs[j][1] for j in group], device=device)  # [b, L]
        n = max(len(pairs[j][1]) for j in group)  # the most action tokens of the group
        logits = model(input_ids=ids, use_cache=False, **last_logits(model, n + 1)).logits[:, -n - 1:-1]  # [b, n, V]
        token_logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, length - n:, None]).squeeze(-1)  # [b, n]
        sizes = torch.tensor([len(pairs[j][1]) for j in group], device=device)  # [b]
        of_action = torch.arange(n, device=device)[None] >= (n - sizes)[:, None]  # [b, n] a row's last |a| tokens
        for j, logp in zip(group, (token_logp * of_action).sum(-1)):
            logps[j] = logps[j] + 0 * logp if repeat else logp  # a repeat joins the graph: its backward runs too
    return torch.stack(logps) if logps else torch.zeros(0, device=device)  # [N]


# ============================================================== step 5: the DAPO loss (eq. 12) and the actor's training
def dapo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 12: L(theta) = 1/2 E_{s,a} [ (A(s,a)/beta - log(pi_theta(a|s) / pi_ref(a|s)))^2 ], the mean over
    the actions given. logp, ref_logp: [N] sums of each action's token log-probs. No log Z(s) term (the
    paper drops it; Theorem 3.2 shows the minimiser still improves on pi_ref), no clipping, no length
    normalisation."""
    if not logp.shape == ref_logp.shape == advantages.shape:
        raise ValueError(f"shapes differ: logp {tuple(logp.shape)}, ref_logp {tuple(ref_logp.shape)}, "
                         f"advantages {tuple(advantages.shape)}")
    log_ratio = logp - ref_logp  # [N]
    return 0.5 * ((advantages / beta - log_ratio) ** 2).mean()


def global_batches(sizes: list[int], batch_actions: int, seed: int) -> list[list[int]]:
    """The states of each optimizer step in one epoch: a shuffled order cut into batches of about
    batch_actions actions. The same batches for any number of ranks, so the optimizer steps and the
    learning-rate schedule are too: a rank left with fewer states than the others fills up with dummies."""
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(seed)).tolist()
    return pack(order, sizes, batch_actions)


def actor_step(cfg: Config, ddp, actor, train: list[dict], sizes: list[int], batch: list[int],
               logps=action_logps, moved_threshold: float = 1e-3) -> dict[str, float]:
    """The forward and backward passes of one optimizer step, on this rank's share of a global batch of whole
    states: the gradient of eq. 12's mean over all the step's actions (all ranks). fit_sums of this rank's, and
    its largest |log(pi / pi_ref)| ("largest"). logps: log pi(a|s) of a batch, action_logps (shared rows) or
    pair_logps (one row per pair)."""
    step_actions = sum(sizes[i] for i in batch)
    micro = rank_micro_batches(batch, sizes, cfg.micro_batch_actions, ddp.rank, ddp.world_size)
    sums = fit_sums(*[torch.zeros(0, dtype=torch.float64)] * 3)  # the sums over no actions: every rank has every key
    largest = 0.0
    for j, group in enumerate(micro):
        # An empty micro-batch (this rank has run out of states) computes on the step's first state and counts
        # zero: its passes only keep this rank in step with the others' collectives.
        states = [train[i] for i in group or batch[:1]]
        advantages = torch.tensor([a for s in states for a in s["advantages"]], device=ddp.device)  # [n]
        ref_logp = torch.tensor([r for s in states for r in s["ref_logp"]], device=ddp.device)  # [n]
        sync_gradients(actor, j == len(micro) - 1)  # reduce the gradients once, on the last micro-step
        with autocast(ddp.device):
            logp = logps(actor, [s["state_ids"] for s in states], [s["actions"] for s in states])  # [n]
        # The mean of eq. 12 over all actions of the step (all ranks): DDP and FSDP average over ranks, hence * world.
        weight = len(advantages) / step_actions * ddp.world_size if group else 0.0
        (dapo_loss(logp, ref_logp, advantages, cfg.beta) * weight).backward()
        if group:
            log_ratio = logp.detach().double().cpu() - ref_logp.double().cpu()  # [n]
            for k, v in fit_sums(log_ratio, advantages.double().cpu() / cfg.beta, advantages.double().cpu(),
                                 moved_threshold).items():
                sums[k] += v
            largest = max(largest, log_ratio.abs().max().item())
    return {**sums, "largest": largest}


def train_actor(cfg: Config, ddp, training: TrainingRun, model, train: list[dict], t0: float, tracker,
                logps=action_logps):
    """Step 5: minimise eq. 12, --epochs passes over the training states in global batches of whole states,
    AdamW with linear decay and gradient clipping, resumed from the run's checkpoint when there is one.
    (the actor, the metrics of every optimizer step), or (the actor, None) when --stop_after stopped it."""
    sizes = [len(s["actions"]) for s in train]
    schedule = [b for epoch in range(cfg.epochs)
                for b in global_batches(sizes, cfg.global_batch_actions, cfg.seed + epoch)]
    total = len(schedule)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    disable_dropout(model)  # log pi_ref came from eval mode: at theta = theta_ref log(pi / pi_ref) must be 0
    actor = distribute(model, ddp, cfg.fsdp)  # under FSDP `model` itself is sharded in place: actor is model
    optimizer = torch.optim.AdamW(trainable(model), lr=cfg.lr, betas=(0.9, 0.95),  # LoRA: the adapters only
                                  weight_decay=cfg.weight_decay)
    report_peak_memory("optimizer built")  # only with $DAPO_PEAK_MEMORY_FILE set (a diagnostic)
    meta = training.resume(model, optimizer)
    start, log = (meta["step"], meta["log"]) if meta else (0, [])
    threshold = log[-1]["moved_threshold"] if log else None  # measured at the first step, before its update
    if ddp.is_main:
        note = paper_defaults_note("dapo.py", cfg, total, TOY_FLAGS)
        if note:
            print(note)
        print(f"{total} optimizer steps of about {cfg.global_batch_actions} actions, {ddp.world_size} rank(s)")
    bar = progress(range(start, total), desc="DAPO actor", initial=start, total=total, disable=not ddp.is_main)
    for step in bar:
        lr = lr_at(step, total, int(cfg.warmup_fraction * total), cfg.lr)
        set_lr(optimizer, lr)
        # Nothing has moved at the first step (measured before its update): its largest |log(pi / pi_ref)| is the
        # rounding noise that "moved" must exceed from then on.
        sums = actor_step(cfg, ddp, actor, train, sizes, schedule[step], logps,
                          float("inf") if threshold is None else threshold)
        largest = all_ranks_max(sums.pop("largest"))
        threshold = max(1e-3, largest) if threshold is None else threshold
        grad_norm = clip_gradients(model, cfg.grad_clip)
        optimizer.step()
        if step == start:  # parameters, gradients and AdamW state all exist now
            shards = held_per_rank(model, optimizer)
            if ddp.is_main:
                tqdm.write(shards)
        optimizer.zero_grad(set_to_none=True)
        metrics = {"step": step + 1, "lr": lr, **fit_metrics({k: all_ranks_sum(v) for k, v in sums.items()}),
                   "grad_norm": grad_norm, "moved_threshold": threshold, "seconds": round(time.time() - t0, 2)}
        log.append(metrics)
        tracker.log({f"actor/{k}": v for k, v in metrics.items() if k not in ("step", "seconds")}, step + 1)
        if ddp.is_main:
            bar.set_postfix(loss=f"{metrics['loss']:.3g}", corr=f"{metrics['corr']:.2f}",
                            moved=f"{metrics['moved']:.2f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                tqdm.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in metrics.items()))
        if training.after_step(step + 1, total, model, optimizer, {"log": log}):
            return actor, None
    bar.close()
    return actor, log


# ================== machinery (a learner may skip: input validation, loading and freeing, DDP/FSDP, metrics, run files)
def read_states(path: str, completion_rewards: bool = False) -> list[dict]:
    """states.jsonl of rollout.py, every record checked before anything is computed; completion_rewards: every
    action must carry the reward of its completion (--q_source rollout)."""
    states = read_jsonl(path, required=("qid", "state_ids", "actions"))
    is_ids = lambda x: isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)  # noqa: E731
    for s in states:
        where = f"{path} line {s['_line']}"
        if not is_ids(s["state_ids"]) or not s["state_ids"]:
            raise InputError(f"{where}: state_ids must be a non-empty list of token ids")
        if not isinstance(s["actions"], list) or not s["actions"]:
            raise InputError(f"{where}: actions must be a non-empty list")
        for a in s["actions"]:
            if not isinstance(a, dict) or not is_ids(a.get("ids")) or not isinstance(a.get("terminal"), bool):
                raise InputError(f"{where}: every action needs ids (a list of token ids) and terminal (true or false)")
            if a["terminal"] and not isinstance(a.get("reward"), (int, float)):
                raise InputError(f"{where}: an action that ends the solution needs its reward (a number)")
            if completion_rewards and not isinstance(a.get("completion_reward"), (int, float)):
                raise InputError(f"{where}: --q_source rollout needs every action's completion_reward (a number), "
                                 "which rollout.py writes")
    return states


def read_inputs(cfg: Config) -> tuple[list[dict], object]:
    """Every input checked before anything is written: the settings, states.jsonl in full, the critic directory,
    the policy's tokenizer (the states' token ids must be its own) and, with --fsdp, that the policy can be sharded.
    The states and the tokenizer."""
    if cfg.beta <= 0:
        raise InputError(f"--beta must be positive, got {cfg.beta}")
    path = os.path.join(cfg.rollout_dir, "states.jsonl")
    if cfg.packing not in PACKING:
        raise InputError(f"--packing must be auto, on or off, got {cfg.packing}")
    if cfg.q_source not in ("critic", "rollout"):
        raise InputError(f"--q_source must be critic or rollout, got {cfg.q_source}")
    states = read_states(path, completion_rewards=cfg.q_source == "rollout")
    if cfg.q_source == "critic" and not os.path.isdir(cfg.critic):
        raise InputError(f"{cfg.critic}: critic directory does not exist")
    tok = load_tokenizer(cfg.policy)
    too_big = max(max(s["state_ids"] + [t for a in s["actions"] for t in a["ids"]]) for s in states)
    if too_big >= len(tok):
        raise InputError(f"{path}: token id {too_big} is outside the vocabulary of {cfg.policy} "
                         f"({len(tok)} tokens): was the rollout made with another policy?")
    if cfg.fsdp:
        check_shardable(cfg.policy, AutoModelForCausalLM)
    return states, tok


def critic_q_values(cfg: Config, ddp, states: list[dict]) -> list[list[float]]:
    """Step 1 with the critic of critic.py, loaded for this (whole on each rank, or sharded under --fsdp, as it was
    trained) and freed on return; its states and actions packed in shared rows where that is exact (--packing)."""
    critic = load_critic_for(cfg.critic, ddp, cfg.fsdp)
    # A critic with another tokenizer than the policy's reads the text of s . a in its own tokens (None: the same).
    tokens = critic_tokens(load_tokenizer(cfg.policy), load_tokenizer(cfg.critic),
                           os.path.join(cfg.rollout_dir, "states.jsonl"))
    asked = [(s["state_ids"], [a["ids"] for a in s["actions"] if not a["terminal"]]) for s in states]
    packed = check_action_values(critic, tokens.asked(asked)[0] if tokens else asked, cfg.packing,
                                 quiet=not ddp.is_main)
    values = lambda part: action_values(critic, part, batch_actions=cfg.critic_batch_size, packed=packed)  # noqa: E731
    values = tokens.through(values) if tokens else values
    q = q_values(states, lambda asked: on_all_ranks(values, asked))
    critic = None  # empty the closure's cell too, so the memory is released before empty_cache
    gc.collect()
    if ddp.device.type == "cuda":
        torch.cuda.empty_cache()
    return q


@torch.no_grad()
def reference_logps(model, states: list[dict], batch_actions: int, desc: str | None,
                    logps=action_logps) -> list[list[float]]:
    """Step 4: log pi_ref(a|s) of every action of every state ({state_ids, actions}), whole states of similar
    length packed into forward passes of about batch_actions actions (logps: action_logps or pair_logps)."""
    sizes = [len(s["actions"]) for s in states]
    order = sorted(range(len(states)), key=lambda i: len(states[i]["state_ids"]) + sum(map(len, states[i]["actions"])))
    out: list[list[float]] = [[] for _ in states]
    device = next(model.parameters()).device
    batches = pack(order, sizes, batch_actions)
    batches += [None] * (passes_in_step(model, len(batches)) - len(batches))  # FSDP: as many passes on every rank
    for batch in progress(batches, desc=desc, disable=desc is None):
        chosen = [states[i] for i in batch] if batch else [{"state_ids": [0], "actions": [[0]]}]  # None: a dummy
        with autocast(device):
            logp = logps(model, [s["state_ids"] for s in chosen], [s["actions"] for s in chosen])  # [n]
        flat = iter(logp.tolist())
        for i in batch or []:
            out[i] = [next(flat) for _ in states[i]["actions"]]
    return out


def last_logits(model, keep: int) -> dict:
    """The forward's argument that computes only the last `keep` columns of logits, for a model that takes it."""
    forward = plain_model(getattr(model, "module", model)).forward  # under DDP wrapped; with LoRA a peft model
    return {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(forward).parameters else {}


def load_policy(cfg: Config, ddp):
    """The policy to train (pi_ref before its first update): whole, or under torchrun with --fsdp sharded as it is
    loaded (plumbing.models.load_sharded: no rank holds a whole copy); with --lora_r, LoRA adapters added to the
    frozen base (plumbing.lora), in --base_dtype."""
    adapt = lambda model: add_lora(model, cfg, critic=False)  # noqa: E731  (the model itself with --lora_r 0)
    if cfg.fsdp and ddp.world_size > 1:
        return load_sharded(cfg.policy, AutoModelForCausalLM, ddp, wrap=adapt, dtype=base_dtype(cfg),
                            extra=lambda model: adapter_init(model, cfg.seed) if cfg.lora_r else {})
    return adapt(load_causal_lm(cfg.policy, ddp.device, base_dtype(cfg)))


def report_training_set(cfg: Config, states: list[dict], train: list[dict], is_main: bool) -> None:
    """How much of the rollout steps 2-3 kept; an error when nothing is left, a warning when the data teach nothing."""
    if is_main:
        print(f"states: {len(train)} of {len(states)} kept (advantage gap >= {cfg.min_gap}) | actions: "
              f"{sum(len(s['actions']) for s in train)} unique candidates of {sum(len(s['actions']) for s in states)}")
    if not train:
        raise InputError(f"{os.path.join(cfg.rollout_dir, 'states.jsonl')}: no state has an advantage gap >= "
                         f"{cfg.min_gap}: nothing to train on")
    if is_main:
        warn_useless_data([s["mc_value"] for s in states if "mc_value" in s],
                          after=": the advantages only reflect the critic's errors, nothing to learn")


def rank_micro_batches(batch: list[int], sizes: list[int], limit: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's share of a global batch, packed into micro-batches of at most `limit` actions, then padded
    with empty micro-batches to the count of the busiest rank: every rank runs the same number of forward and
    backward passes, the collectives of FSDP (a gather of each layer's parameters in every pass) and DDP match."""
    mine = [pack(batch[r::world_size], sizes, limit) for r in range(world_size)]
    return mine[rank] + [[]] * (max(map(len, mine)) - len(mine[rank]))


def fit_sums(log_ratio: torch.Tensor, target: torch.Tensor, advantages: torch.Tensor,
             moved_threshold: float = 1e-3) -> dict[str, float]:
    """What fit_metrics reads, as sums over the actions of a micro-batch (added over micro-batches and ranks):
    log_ratio = log(pi / pi_ref), target = A / beta. An action has moved when its log-prob changed by more than
    moved_threshold in its advantage's direction: train_actor measures it as the largest |log(pi / pi_ref)| of the
    first step, before any update (the rounding of batches composed differently from those of log pi_ref:
    about 1e-6 in fp32, far more in bf16), and never below 1e-3."""
    moved = torch.sign(advantages) * log_ratio > moved_threshold
    sums = {"actions": len(log_ratio), "loss": (0.5 * (target - log_ratio) ** 2).sum(),
            "abs_log_ratio": log_ratio.abs().sum(), "log_ratio": log_ratio.sum(), "target": target.sum(),
            "log_ratio_x_target": (log_ratio * target).sum(), "log_ratio_squared": (log_ratio ** 2).sum(),
            "target_squared": (target ** 2).sum(), "moved": moved.sum(), "nonzero_advantages": (advantages != 0).sum()}
    return {k: float(v) for k, v in sums.items()}


def fit_metrics(sums: dict[str, float]) -> dict:
    """How well log(pi / pi_ref) fits eq. 12's target A / beta: loss, mean |log ratio|, their correlation, and the
    fraction of actions (with a non-zero advantage) whose log-prob moved in the direction of their advantage."""
    n, x, y = sums["actions"], sums["log_ratio"], sums["target"]
    cov = sums["log_ratio_x_target"] / n - x * y / n ** 2
    var_x, var_y = sums["log_ratio_squared"] / n - (x / n) ** 2, sums["target_squared"] / n - (y / n) ** 2
    corr = cov / (var_x * var_y) ** 0.5 if var_x > 1e-10 and var_y > 1e-10 else 0.0  # 0 while pi = pi_ref
    return {"loss": sums["loss"] / n, "abs_log_ratio": sums["abs_log_ratio"] / n, "corr": corr,
            "moved": sums["moved"] / max(1.0, sums["nonzero_advantages"])}


@torch.no_grad()
def fit_after_training(actor, train: list[dict], sizes: list[int], batch_actions: int, ddp,
                       logps=action_logps) -> list[dict]:
    """Per training state, its advantages and log(pi_theta / pi_ref) of its candidates after training, on every
    rank. The states are split over the ranks as in training (rank_micro_batches: every rank runs as many
    passes, which a sharded model needs), then gathered."""
    actor.eval()
    mine = {}
    for group in rank_micro_batches(list(range(len(train))), sizes, batch_actions, ddp.rank, ddp.world_size):
        batch = [train[i] for i in group or [0]]  # an empty micro-batch computes on state 0 and keeps nothing
        with autocast(ddp.device):
            logp = logps(actor, [s["state_ids"] for s in batch], [s["actions"] for s in batch])  # [n]
        flat = iter(logp.float().tolist())
        for i in group:
            mine[i] = [next(flat) - r for r in train[i]["ref_logp"]]
    parts = [mine]
    if dist.is_initialized():
        parts = [None] * ddp.world_size
        dist.all_gather_object(parts, mine)
    log_ratios = {i: v for part in parts for i, v in part.items()}
    return [{"advantages": s["advantages"], "log_ratios": log_ratios[i]} for i, s in enumerate(train)]


def save_actor(cfg: Config, ddp, model, tok, states: list[dict], train: list[dict], log: list[dict], fit: list[dict],
               t0: float) -> None:
    """Step 6: the actor as a Hugging Face model directory (rollout.py and eval.py load it as the next policy) with
    train_log.jsonl, fit.jsonl and train_summary.json, complete before it appears under out_dir. A sharded actor's
    full weights are gathered onto rank 0's CPU first: the directory loads without FSDP."""
    advantages = torch.tensor([a for f in fit for a in f["advantages"]], dtype=torch.float64)  # [actions kept]
    log_ratios = torch.tensor([r for f in fit for r in f["log_ratios"]], dtype=torch.float64)  # [actions kept]
    after_training = fit_metrics(fit_sums(log_ratios, advantages / cfg.beta, advantages, log[-1]["moved_threshold"]))
    state = full_state_dict(model) if cfg.fsdp else None
    if not ddp.is_main:
        return
    with atomic_dir(cfg.out_dir) as tmp:  # with LoRA, the adapters merged into the weights: a plain model
        plain_model(model).save_pretrained(tmp, state_dict=merged_state_dict(model, state))
        tok.save_pretrained(tmp)
        write_jsonl_atomic(os.path.join(tmp, "train_log.jsonl"), log)
        write_jsonl_atomic(os.path.join(tmp, "fit.jsonl"), fit)
        write_json_atomic(os.path.join(tmp, "train_summary.json"), {
            "states": len(states), "states_kept": len(train), "actions": sum(len(s["actions"]) for s in states),
            "actions_kept": sum(len(s["actions"]) for s in train), "steps": len(log),
            "seconds": round(time.time() - t0, 2), "last_step": log[-1], "after_training": after_training,
            "config": dataclasses.asdict(cfg)})
    print(f"wrote the actor to {cfg.out_dir} ({len(log)} steps, {time.time() - t0:.0f}s)")


def report_fit(tracker, cfg: Config, tok, states: list[dict], q: list[list[float]], fit: list[dict], log: list[dict],
               shown_states: int = 4, shown_actions: int = 256) -> None:
    """To the tracker: the fit of eq. 12 after training (its metrics, and a table of A / beta against log(pi /
    pi_ref), one row per action), and a few states with their candidates, Q values and advantages (eq. 13)."""
    if not tracker.active:
        return
    advantages = torch.tensor([a for f in fit for a in f["advantages"]], dtype=torch.float64)  # [actions kept]
    log_ratios = torch.tensor([r for f in fit for r in f["log_ratios"]], dtype=torch.float64)  # [actions kept]
    after = fit_metrics(fit_sums(log_ratios, advantages / cfg.beta, advantages, log[-1]["moved_threshold"]))
    step = len(log)
    tracker.log({f"actor/after_training/{k}": v for k, v in after.items()}, step)
    tracker.table("actor/fit", ["A / beta", "log pi/pi_ref"],
                  [[a / cfg.beta, r] for a, r in zip(advantages.tolist()[:shown_actions], log_ratios.tolist())], step)
    rows = []
    for s, q_s in list(zip(states, q, strict=True))[:shown_states]:
        steps = s["state_ids"][s.get("prompt_len", 0):]  # rollout.py writes state_text; a hand-made file may not
        state_text = s.get("state_text") or tok.decode(steps, skip_special_tokens=True)
        for a, q_a, adv in zip(s["actions"], q_s, compute_advantages(torch.tensor(q_s, dtype=torch.float64)).tolist(),
                               strict=True):
            rows.append([state_text[-60:], tok.decode(a["ids"], skip_special_tokens=True), q_a, adv])
    tracker.table("actor/states", ["state (its end)", "candidate action", "Q", "advantage"], rows, step)


# ============================================================================= main
# The paper's steps: lines under an ALGORITHM comment are the algorithm; those under MACHINERY a learner may skip.
def main() -> None:
    # MACHINERY: settings, DDP, every input checked in full before anything is written, the rerun rule.
    cfg = parse_config(Config)
    set_precision(cfg.precision)
    ddp = setup_distributed()
    set_seed(cfg.seed)
    states, tok = read_inputs(cfg)
    tracker = start_tracking(cfg, "dapo.py", ddp.is_main)
    inputs = [os.path.join(cfg.rollout_dir, "states.jsonl"), *([cfg.critic] if cfg.q_source == "critic" else []),
              cfg.policy]
    training = TrainingRun.start(cfg, RESUME_IGNORES, inputs, "train_summary.json", ddp.world_size, ddp.is_main,
                                 extra=f"min_gap={cfg.min_gap} q_source={cfg.q_source} precision={cfg.precision} "
                                       f"fsdp={cfg.fsdp and ddp.world_size > 1}"
                                       + (f" base_dtype={cfg.base_dtype}" if cfg.base_dtype != "float32" else ""))
    if training is None:  # out_dir holds this run's finished actor
        cleanup_distributed()
        return

    # ALGORITHM 1-3. Q values, advantages (eq. 13) and the training set. MACHINERY: cached in out_dir.work/ with
    # step 4's log pi_ref (keyed by the inputs: a rerun with another beta or lr reuses them).
    prepared = training.load_cache(CACHE, key=training.inputs)
    if prepared is None:
        q = critic_q_values(cfg, ddp, states) if cfg.q_source == "critic" else rollout_q_values(states)
        prepared = {"key": training.inputs, "q_values": q, "train": training_set(states, q, cfg.min_gap)}
    elif ddp.is_main:
        print(f"reusing Q values, advantages and log pi_ref from {os.path.join(training.work_dir, CACHE)}")
    train = prepared["train"]
    report_training_set(cfg, states, train, ddp.is_main)

    # ALGORITHM 4. log pi_ref with the policy itself, before its first update: no second model in memory, and the
    # same model, in the same precision regime, as the one trained (sharded under --fsdp), so that log(pi / pi_ref)
    # is 0 at theta = theta_ref up to the rounding of differently composed batches. With --lora_r the base is frozen
    # and adapters are trained (plumbing.lora): pi_ref is the base, adapters off.
    model = load_policy(cfg, ddp)
    # MACHINERY: shared rows where they give action_logp's numbers, else one row per pair (--packing).
    packed = check_packing(model, action_logps, action_logp, [(s["state_ids"], s["actions"]) for s in train],
                           "log pi(a|s)", mode=cfg.packing, quiet=not ddp.is_main)
    logps = action_logps if packed else pair_logps
    if "ref_logp" not in train[0]:
        model.eval()
        with reference_mode(model):
            ref_logps = on_all_ranks(lambda part: reference_logps(model, part, cfg.ref_batch_size,
                                                                  "log pi_ref" if ddp.is_main else None, logps), train)
        for s, ref_logp in zip(train, ref_logps, strict=True):
            s["ref_logp"] = ref_logp
        training.save_cache(CACHE, prepared)
    if is_sharded(model):  # a pass without gradients leaves the root's weights gathered: the optimizer needs shards
        model.reshard()

    # ALGORITHM 5. Train the actor on eq. 12.
    t0 = time.time()
    actor, log = train_actor(cfg, ddp, training, model, train, t0, tracker, logps)
    if log is None:  # MACHINERY: stopped by --stop_after, leaving only the checkpoint
        cleanup_distributed()
        return

    # ALGORITHM 6. How far the actor got towards eq. 12's target (train_log.jsonl measures each step before its
    # update), then the actor. MACHINERY: the run files and the rerun rule.
    fit = fit_after_training(actor, train, [len(s["actions"]) for s in train], cfg.micro_batch_actions, ddp, logps)
    save_actor(cfg, ddp, model, tok, states, train, log, fit, t0)
    report_fit(tracker, cfg, tok, states, prepared["q_values"], fit, log)
    training.finish()
    cleanup_distributed()


if __name__ == "__main__":
    run(main)
