"""nano_dapo.py: DAPO, Direct Advantage Policy Optimization (Liu et al., arXiv 2412.18279), in one file.

The whole algorithm on the project's toy task, read top to bottom, run in a few minutes on a CPU:
    python data/toy/prepare.py --out_dir runs/toy   # the task, a tiny Llama and its flawed warm start (pi_ref)
    python nano_dapo.py                             # one DAPO iteration; greedy accuracy before and after

For the current policy pi_ref (docs/algorithm.md tells each step in full):
Stage A, data (rollout)
  1. Generator: sample n1 solutions per question, grade them, keep n_keep, correct and wrong balanced.
  2. Cut each kept solution into steps, in token space (a step ends at a token whose text holds "\\n");
     its states are the step prefixes s_t = x . a_0 ... a_{t-1}.
  3. Completer: M completions from every state, graded. MC label V_hat(s) = fraction correct; the first step
     of each completion is a candidate action a_i of s.
Stage A, critic
  4. V_phi(s) = sigmoid(w . h(s) + b), a value head on the policy's backbone, fitted to V_hat(s) by MSE.
Stage B, actor
  5. Q(s, a) = r when a ends the solution, else V_phi(s . a); A(s, a_i) = Q(s, a_i) - mean_j Q(s, a_j) (eq. 13).
  6. Keep the states whose advantage gap max A - min A >= min_gap, with their unique candidates.
  7. Minimise eq. 12, L = 1/2 E[(A(s,a)/beta - log pi_theta(a|s)/pi_ref(a|s))^2], with log pi(a|s) the sum of
     the action's token log-probs. The actor starts from pi_ref.
Iterate: the actor becomes pi_ref and the generator of the next iteration (--iterations).

The stage scripts (rollout.py, critic.py, dapo.py, eval.py) run the same equations on real models (DDP/FSDP,
resume, vLLM, code grading, each state read once); tests/test_nano_dapo.py holds both to the same numbers.
Plain PyTorch and transformers only, one process, float32.
"""
import argparse
import dataclasses
import json
import os
import re
import time

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass
class Config:
    toy_dir: str = "runs/toy"  # data/toy/prepare.py's output: train.jsonl, test.jsonl, sft/ (the warm start)
    iterations: int = 1  # DAPO iterations, each: rollout -> critic -> actor
    questions: int = 256  # training questions per iteration (the same ones, resampled by the new policy)
    n1: int = 8  # generator samples per question (paper: 32)
    n_keep: int = 4  # solutions kept per question, correct and wrong balanced (paper: 6)
    M: int = 16  # completions per state: its MC label and its candidate actions (paper: 16)
    max_new_tokens: int = 40  # token limit of a whole solution; a solution cut by it is wrong
    critic_lr: float = 3e-4  # (paper, 7B: 5e-6)
    critic_epochs: int = 8  # (paper: 1)
    critic_batch: int = 16  # states per critic step
    beta: float = 0.3  # log(pi / pi_ref) is fitted to A / beta (paper: 0.01 or 0.02 for 7B models)
    min_gap: float = 0.1  # keep a state when max A - min A over its candidates is at least this (paper: 0.1)
    actor_lr: float = 1e-4  # (paper, 7B: 5e-7)
    actor_epochs: int = 8  # (paper: 1)
    actor_batch: int = 64  # actions per actor step, whole states only (paper: 2048)
    seed: int = 0


def pad_right(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: under causal attention a real token never sees the padding after it."""
    width = max(map(len, sequences))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])  # [B, L]
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])  # [B, L]
    return ids, mask


# ============================================================================ stage A: data
@torch.no_grad()
def sample(model, tok, prompts: list[list[int]], budgets: list[int], greedy: bool = False,
           batch_size: int = 128) -> list[tuple[list[int], bool]]:
    """Continue each prompt (token ids) for at most its budget of tokens, sampling at temperature 1 and top-p 1
    (the MC label estimates V of pi_ref itself, not of a sharpened policy) or greedily: (response ids, ended with
    EOS) per prompt. A response is cut at its own budget after generating up to the batch's largest."""
    tok.padding_side = "left"  # generation continues every row from the same last column
    knobs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = tok.pad({"input_ids": prompts[i: i + batch_size]}, return_tensors="pt")  # [B, L] ids and mask
        new = model.generate(**batch, max_new_tokens=max(budgets[i: i + batch_size]), pad_token_id=tok.pad_token_id,
                             **knobs)[:, batch["input_ids"].shape[1]:]  # [B, <= max budget]
        for row, budget in zip(new.tolist(), budgets[i: i + batch_size]):
            row = row[:budget]
            ended = tok.eos_token_id in row
            out.append((row[: row.index(tok.eos_token_id) + 1] if ended else row, ended))
    return out


def grade(response: str, answer: str) -> bool:
    """The reward r: 1 when the final answer, the last \\boxed{...} (else the last number), is the reference
    answer (the toy's answers are single digits; grading.py compares real math answers)."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", response) or re.findall(r"\d+", response)
    return bool(found) and found[-1].strip() == answer.strip()


def split_steps(response_ids: list[int], is_delim: list[bool], eos_id: int) -> list[list[int]]:
    """Steps in token space: a step ends at the first token whose text holds the delimiter ("\\n", also inside
    merged tokens such as ".\\n"), the last one at EOS (kept: that action ends the solution) or at the token
    limit. States are then exact token prefixes, never re-tokenized text."""
    steps, current = [], []
    for t in response_ids:
        current.append(t)
        if t == eos_id or is_delim[t]:
            steps.append(current)
            current = []
            if t == eos_id:
                break
    return steps + [current] if current else steps


def select_balanced(samples: list[tuple[list[int], bool]], n: int) -> list[tuple[list[int], bool]]:
    """n distinct solutions, correct and wrong as balanced as possible (paper: n = 6 of n1 = 32)."""
    unique = list({tuple(ids): (ids, ok) for ids, ok in samples}.values())
    right, wrong = [s for s in unique if s[1]], [s for s in unique if not s[1]]
    n_right = min(len(right), max(n // 2, n - len(wrong)))
    return right[:n_right] + wrong[: n - n_right]


def mc_value(correct: list[bool]) -> float:
    """The Monte-Carlo label of a state: V_hat(s) = (number of correct completions from s) / M."""
    return sum(correct) / len(correct)


def rollout(policy, tok, questions: list[dict], cfg: Config) -> list[dict]:
    """Steps 1-3 for every question: one record per distinct state, {state_ids, mc_value, actions}, each action
    {ids, terminal, reward}: its token ids, whether it ends the solution, and (then) its graded reward."""
    is_delim = ["\n" in tok.decode([i]) for i in range(len(tok))]
    eos = tok.eos_token_id
    text = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    # 1. Generator: n1 graded samples per question (a sample cut by the token limit is wrong), n_keep kept.
    samples = sample(policy, tok, [q["prompt"] for q in questions for _ in range(cfg.n1)],
                     [cfg.max_new_tokens] * len(questions) * cfg.n1)
    states = []  # (question, response prefix): every step prefix of every kept solution, once
    for qi, q in enumerate(questions):
        graded = [(ids, ended and grade(text(ids), q["answer"])) for ids, ended in samples[qi * cfg.n1:][: cfg.n1]]
        seen = set()
        for ids, _ in select_balanced(graded, cfg.n_keep):
            steps = split_steps(ids, is_delim, eos)
            for t in range(len(steps)):  # 2. the states s_0 .. s_{T-1}
                prefix = [token for step in steps[:t] for token in step]
                if tuple(prefix) not in seen:
                    seen.add(tuple(prefix))
                    states.append((q, prefix))
    # 3. Completer: M completions from every state, within what the steps before it left of the token limit.
    completions = sample(policy, tok, [q["prompt"] + prefix for q, prefix in states for _ in range(cfg.M)],
                         [cfg.max_new_tokens - len(prefix) for _, prefix in states for _ in range(cfg.M)])
    records = []
    for si, (q, prefix) in enumerate(states):
        correct, actions = [], []
        for ids, ended in completions[si * cfg.M:][: cfg.M]:
            ok = ended and grade(text(prefix + ids), q["answer"])
            first = split_steps(ids, is_delim, eos)[0] if ids else []  # the candidate action
            # It ends the solution when nothing follows it (EOS, or the token limit: then r = 0 is exact).
            actions.append({"ids": first, "terminal": len(first) == len(ids), "reward": float(ok)})
            correct.append(ok)
        records.append({"state_ids": q["prompt"] + prefix, "mc_value": mc_value(correct), "actions": actions})
    return records


# ============================================================================ stage A: the critic
class Critic(torch.nn.Module):
    """V_phi(s) = sigmoid(w . h(s) + b): h(s) is the backbone's last hidden state at the last token of s."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone  # the policy's transformer without its LM head
        self.value_head = torch.nn.Linear(backbone.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)  # a fresh critic says V = 0.5 everywhere
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, sequences: list[list[int]]) -> torch.Tensor:
        """V of each token sequence (a state, or a state followed by an action): [B]."""
        ids, mask = pad_right(sequences)  # [B, L]
        hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, H]
        last = hidden[torch.arange(len(ids)), mask.sum(1) - 1]  # [B, H] each sequence's last real token
        return torch.sigmoid(self.value_head(last).squeeze(-1))  # [B]


def critic_loss(values: torch.Tensor, mc_values: torch.Tensor) -> torch.Tensor:
    """MSE against the MC labels, each distinct state once: mean_s (V_phi(s) - V_hat(s))^2. [N], [N] -> []."""
    return ((values - mc_values) ** 2).mean()


def linear_decay(optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))


def train_critic(critic: Critic, states: list[dict], cfg: Config) -> float:
    """Step 4: AdamW on critic_loss over shuffled batches of states, linear decay; the last epoch's mean loss."""
    critic.train()
    optimizer = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=0.0)
    batches = (len(states) + cfg.critic_batch - 1) // cfg.critic_batch
    schedule = linear_decay(optimizer, cfg.critic_epochs * batches)
    for _ in range(cfg.critic_epochs):
        order, losses = torch.randperm(len(states)).tolist(), []
        for b in range(batches):
            batch = [states[i] for i in order[b * cfg.critic_batch:][: cfg.critic_batch]]
            labels = torch.tensor([s["mc_value"] for s in batch])  # [B]
            loss = critic_loss(critic([s["state_ids"] for s in batch]), labels)  # []
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    critic.eval()
    return sum(losses) / len(losses)


# ============================================================================ stage B: advantages
@torch.no_grad()
def q_value(critic: Critic, state: list[int], actions: list[dict]) -> torch.Tensor:
    """Step 5, Q(s, a_i) of each candidate of a state: the reward r(s, a_i) when a_i ends the solution (nothing follows
    it: Q = r + 0), else V_phi(s . a_i) (no reward until the end: Q = 0 + V). [M]."""
    values = critic([state + a["ids"] for a in actions]).tolist()  # [M]
    return torch.tensor([a["reward"] if a["terminal"] else v for a, v in zip(actions, values)])  # [M]


def compute_advantages(q: torch.Tensor) -> torch.Tensor:
    """Step 5, eq. 13: A(s, a_i) = Q(s, a_i) - (1/M) sum_j Q(s, a_j), all M candidates, duplicates included (their mean
    estimates V(s) under pi_ref). No division by a standard deviation: eq. 12 needs the scale of A."""
    return q - q.mean(dim=-1, keepdim=True)  # [..., M]


def training_set(states: list[dict], q: list[torch.Tensor], min_gap: float) -> list[dict]:
    """Step 6: {state_ids, actions, advantages} per kept state: its unique candidates, each with the mean
    advantage of its copies; an empty step is dropped (log pi = 0 under every policy)."""
    kept = []
    for s, q_s in zip(states, q):
        advantages = compute_advantages(torch.as_tensor(q_s, dtype=torch.float64)).tolist()  # [M]
        if max(advantages) - min(advantages) < min_gap:
            continue  # every candidate about as good as the others: nothing to learn here
        copies = {}  # unique candidate -> the advantages of its copies
        for a, adv in zip(s["actions"], advantages):
            if a["ids"]:
                copies.setdefault(tuple(a["ids"]), []).append(adv)
        if copies:
            kept.append({"state_ids": s["state_ids"], "actions": [list(a) for a in copies],
                         "advantages": [sum(c) / len(c) for c in copies.values()]})
    return kept


# ============================================================================ stage B: the actor
def action_logp(model, states: list[list[int]], actions: list[list[int]]) -> torch.Tensor:
    """log pi(a|s) of each (state, action) pair: the SUM of the action's token log-probs, from the plain forward
    pass of the sequence s . a (the logits at position t predict token t + 1). [N]."""
    ids, mask = pad_right([s + a for s, a in zip(states, actions)])  # [N, L]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # [N, L-1, V]
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [N, L-1]
    width = ids.shape[1] - 1
    in_action = torch.tensor([[0] * (len(s) - 1) + [1] * len(a) + [0] * (width - len(s) + 1 - len(a))
                              for s, a in zip(states, actions)])  # [N, L-1] 1 where the predicted token is a's
    return (token_logp * in_action).sum(dim=-1)  # [N]


def dapo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 12: L(theta) = 1/2 E_{s,a} [(A(s,a)/beta - log(pi_theta(a|s) / pi_ref(a|s)))^2], the mean over the
    actions given ([N] each). No log Z(s) term (the paper drops it), no clipping, no length normalisation."""
    log_ratio = logp - ref_logp  # [N]
    return 0.5 * ((advantages / beta - log_ratio) ** 2).mean()


def state_batches(sizes: list[int], batch_actions: int) -> list[list[int]]:
    """Shuffled states in batches of about batch_actions actions: all candidates of a state share a batch."""
    batches, current, count = [], [], 0
    for i in torch.randperm(len(sizes)).tolist():
        if current and count + sizes[i] > batch_actions:
            batches, current, count = batches + [current], [], 0
        current, count = current + [i], count + sizes[i]
    return batches + [current] if current else batches


def train_actor(policy, train: list[dict], cfg: Config) -> float:
    """Step 7: the actor (policy, trained in place: pi_ref is its state before the first step) minimises eq. 12
    with AdamW, linear decay and gradient clipping. log pi_ref is computed once, before any update."""
    pairs = lambda states: ([s["state_ids"] for s in states for _ in s["actions"]],  # noqa: E731
                            [a for s in states for a in s["actions"]])
    with torch.no_grad():
        for s in train:
            s["ref_logp"] = action_logp(policy, *pairs([s])).tolist()  # [actions of s]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.actor_lr, betas=(0.9, 0.95), weight_decay=0.0)
    epochs = [state_batches([len(s["actions"]) for s in train], cfg.actor_batch) for _ in range(cfg.actor_epochs)]
    schedule = linear_decay(optimizer, sum(map(len, epochs)))
    for batch in (b for epoch in epochs for b in epoch):
        states = [train[i] for i in batch]
        advantages = torch.tensor([a for s in states for a in s["advantages"]])  # [N]
        ref_logp = torch.tensor([r for s in states for r in s["ref_logp"]])  # [N]
        loss = dapo_loss(action_logp(policy, *pairs(states)), ref_logp, advantages, cfg.beta)  # []
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return loss.item()


# ============================================================================ evaluation and the iteration
def greedy_accuracy(model, tok, questions: list[dict], cfg: Config) -> float:
    """The paper's protocol: one greedy response per question, graded (a response cut by the limit is wrong)."""
    responses = sample(model, tok, [q["prompt"] for q in questions], [cfg.max_new_tokens] * len(questions), greedy=True)
    return sum(ended and grade(tok.decode(ids, skip_special_tokens=True), q["answer"])
               for (ids, ended), q in zip(responses, questions)) / len(questions)


def read_questions(path: str, tok) -> list[dict]:
    """{prompt, answer} per line of the toy's JSONL: the prompt is '{question}\\n{instruction}\\n' as token ids."""
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [{"prompt": tok(f"{r['question']}\n{INSTRUCTION}\n").input_ids, "answer": r["answer"]} for r in rows]


def main(cfg: Config) -> None:
    torch.manual_seed(cfg.seed)
    t0, sft = time.time(), os.path.join(cfg.toy_dir, "sft")
    assert os.path.isdir(sft), f"{sft} does not exist: run python data/toy/prepare.py --out_dir {cfg.toy_dir} first"
    tok = AutoTokenizer.from_pretrained(sft)
    train_questions = read_questions(os.path.join(cfg.toy_dir, "train.jsonl"), tok)[: cfg.questions]
    test_questions = read_questions(os.path.join(cfg.toy_dir, "test.jsonl"), tok)
    policy = AutoModelForCausalLM.from_pretrained(sft).eval()  # pi_ref of iteration 1: the warm start
    critic = Critic(AutoModel.from_pretrained(sft))  # later iterations warm-start from the last critic
    print(f"greedy accuracy before DAPO: {greedy_accuracy(policy, tok, test_questions, cfg):.3f} "
          f"({len(test_questions)} test questions)")
    for iteration in range(1, cfg.iterations + 1):
        states = rollout(policy, tok, train_questions, cfg)  # stage A: data from pi_ref
        print(f"[{iteration}] rollout: {len(states)} states, {len(states) * cfg.M} completions, mean MC label "
              f"{sum(s['mc_value'] for s in states) / len(states):.3f} ({time.time() - t0:.0f}s)")
        loss = train_critic(critic, states, cfg)  # stage A: the critic
        print(f"[{iteration}] critic: MSE {loss:.4f} in its last epoch ({time.time() - t0:.0f}s)")
        q = [q_value(critic, s["state_ids"], s["actions"]) for s in states]  # stage B: Q, then A and the data
        train = training_set(states, q, cfg.min_gap)
        loss = train_actor(policy, train, cfg)  # stage B: the actor, which becomes the next pi_ref
        print(f"[{iteration}] actor: {len(train)} states, {sum(len(s['actions']) for s in train)} actions, "
              f"last loss {loss:.3f} ({time.time() - t0:.0f}s)")
        print(f"[{iteration}] greedy accuracy after iteration {iteration}: "
              f"{greedy_accuracy(policy.eval(), tok, test_questions, cfg):.3f} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field in dataclasses.fields(Config):
        parser.add_argument(f"--{field.name}", type=field.type, default=field.default)
    main(Config(**vars(parser.parse_args())))
