"""DAPO stage A, data generation: sample solutions, label every step prefix by Monte Carlo, and keep the
first step of each completion as a candidate action (ALGORITHM.md section 2).

For every training question x, with pi_ref = pi_gen = the current policy:
  1. Generator: sample n1 solutions, grade them, keep n with correct and wrong as balanced as possible.
  2. Cut each kept solution into steps a_0..a_{T-1} (in token space: a step ends at the first token whose
     text contains the delimiter). Its states are s_t = x . a_0 ... a_{t-1}, t = 0..T-1.
  3. Completer: from every state, M completions to the end, graded. The MC label of the state is
     V_hat(s_t) = (number correct) / M; a completion cut by the token limit counts as wrong.
  4. Candidate actions: the first step of each of those M completions, with a flag for "this step ends the
     solution" and, for those, the graded reward (dapo.py takes Q = r for them).

    python rollout.py --model runs/toy/sft --data runs/toy/train.jsonl --out_dir runs/toy/iter1/rollout
    torchrun --nproc_per_node=8 rollout.py --model ... --data ...   # questions sharded over ranks

Output (out_dir): states.jsonl (one record per state), solutions.jsonl (the kept solutions, with the MC
label at every step boundary), summary.json. The format is documented in the README. Each rank appends
each finished question to its own shard (shard-RANK.jsonl) and flushes it, so rerunning the same command
after a kill resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import time
from fractions import Fraction

import torch
from tqdm import tqdm

from common import (DEFAULT_INSTRUCTION, InputError, all_ranks_sum, arg, barrier, build_prompt_ids, cleanup_distributed,
                    delimiter_token_mask, lm_forward, load_causal_lm, load_tokenizer, parse_config, read_jsonl, read_shard,
                    run, append_jsonl, setup_distributed, split_steps, write_json_atomic, write_jsonl_atomic)


@dataclasses.dataclass
class Config:
    model: str = arg("runs/toy/sft", "policy to sample from (pi_ref = pi_gen): HF directory or hub name")
    data: str = arg("runs/toy/train.jsonl", "JSONL of questions with reference answers")
    out_dir: str = arg("runs/toy/rollout", "where states.jsonl, solutions.jsonl and summary.json go")
    question_field: str = arg("question", "field of the question text ('problem' for MATH)")
    answer_field: str = arg("answer", "field of the reference: '#### N' solutions, \\boxed{} solutions or bare answers")
    id_field: str = arg("id", "field of the question id (the line number when the field is absent)")
    instruction: str = arg(DEFAULT_INSTRUCTION, "zero-shot chain-of-thought instruction added to each question")
    n1: int = arg(32, "generator samples per question (paper: 32)")
    n: int = arg(6, "solutions kept per question, correct and wrong balanced (paper: 6)")
    M: int = arg(16, "completions per state: MC label and candidate actions (paper: 16)")
    temperature: float = arg(1.0, "sampling temperature of generator and completer")
    top_p: float = arg(1.0, "nucleus sampling threshold")
    max_new_tokens: int = arg(1024, "token limit of a solution; a completion cut by it is wrong")
    delimiter: str = arg("\n", "step delimiter: a step ends at the first token whose text contains it")
    batch_size: int = arg(64, "sequences per generation batch")
    questions_per_chunk: int = arg(16, "questions generated together (and saved together) per rank")
    max_questions: int = arg(0, "use only the first N questions (0: all)")
    seed: int = arg(0, "sampling seed (each rank offsets it)")


# ============================================================================= grading (math)
_NUMBER = r"-?\d(?:[\d,]*\d)?(?:\.\d+)?|-?\.\d+"  # a comma ends a number unless a digit follows (1,000 but "25, so")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces included."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:  # "\boxed 5"
        m = re.match(r"\\(?:boxed|fbox)\s+(\S+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1: j]
    return None  # unbalanced: the solution was cut off


def extract_answer(text: str) -> str | None:
    """The final answer of a response: the last \\boxed{...}, else "The answer is ...", else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = re.findall(r"answer is[:\s]*(.+)", text, flags=re.IGNORECASE)
    if m:
        return re.split(r"\.\s", m[-1])[0].strip().rstrip(".").strip()  # "The answer is 5. Because ..." -> 5
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def reference_answer(reference: str) -> str:
    """The answer inside a reference: GSM8K ('... #### 72'), MATH (\\boxed{}) or a bare answer."""
    reference = str(reference)
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    boxed = last_boxed(reference)
    return boxed.strip() if boxed is not None else reference.strip()


def _unwrap(s: str, command: str) -> str:
    """\\text{abc} -> abc (for each occurrence, nested braces respected)."""
    while (i := s.find(command + "{")) >= 0:
        depth, j = 0, i + len(command)
        for j in range(i + len(command), len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                break
        s = s[:i] + s[i + len(command) + 1: j] + s[j + 1:]
    return s


def normalize_answer(s: str) -> str:
    """Strip what does not change the value: $, \\text{} / \\mathrm{} wrappers, units such as \\% and
    ^\\circ, 'x =', spacing commands, \\dfrac / \\tfrac, \\left / \\right, a trailing period."""
    s = s.strip()
    for command in ("\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\boxed"):
        s = _unwrap(s, command)
    for junk in ("\\$", "$", "\\!", "\\,", "\\;", "\\:", "\\left", "\\right", "^{\\circ}", "^\\circ", "\\circ",
                 "\\%", "%", "°", "\\displaystyle"):
        s = s.replace(junk, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    s = re.sub(r"^\s*[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = s.strip().rstrip(".").strip()
    # A number followed by a unit word ("5 cm", "12 dollars") is the number.
    m = re.fullmatch(rf"({_NUMBER})\s*[a-zA-Z ]+", s)
    if m:
        s = m.group(1)
    return s.replace(" ", "")


def to_number(s: str) -> Fraction | None:
    """Exact value of 1,000 / 72.0 / -0.75 / 3/4 / \\frac{1}{2} / -\\frac34, or None."""
    s = s.replace("{,}", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"(-?)\\frac\{?(-?\d+)\}?\{?(-?\d+)\}?", s) or re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    if m:
        sign = -1 if m.group(1) else 1
        return sign * Fraction(int(m.group(2)), int(m.group(3))) if int(m.group(3)) != 0 else None
    try:
        return Fraction(s) if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s) else None
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, reference: str) -> bool:
    a, b = normalize_answer(predicted), normalize_answer(reference)
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        return x == y
    return a == b


def is_correct(response: str, reference: str) -> bool:
    """Reward r: 1 when the response's final answer equals the reference answer."""
    predicted = extract_answer(response)
    return predicted is not None and answers_match(predicted, reference_answer(reference))


# ============================================================================= batched generation
@dataclasses.dataclass
class Generation:
    ids: list[int]  # generated tokens (EOS included when it ended the sequence)
    finish: str  # "eos" | "step" (ended by a delimiter token) | "length" (cut by the limit)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] next tokens; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V]
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # [B, V] tokens past the nucleus
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, eos_id: int, pad_id: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, stop_at: torch.Tensor | None = None,
             batch_size: int = 64, generator: torch.Generator | None = None, desc: str | None = None) -> list[Generation]:
    """Continue every prompt (token ids) until EOS, the token limit or, when stop_at ([V] bool) is given,
    the first token it marks (one-step generation). Batched with the KV cache; prompts are left padded."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    results: list[Generation | None] = [None] * len(prompts)
    stop_at = stop_at.to(device) if stop_at is not None else None
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
        batch = order[start: start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in batch], device=device)  # [B, L]
        attn = (torch.arange(width, device=device)[None] >= torch.tensor(
            [width - len(prompts[i]) for i in batch], device=device)[:, None]).long()  # [B, L] 0 on the padding
        position = (attn.cumsum(-1) - 1).clamp(min=0)  # [B, L] real tokens count from 0 despite padding
        logits, cache = lm_forward(model, ids, attn, position, last_only=True)
        logits = logits[:, -1]  # [B, V]
        done = torch.zeros(len(batch), dtype=torch.bool, device=device)  # [B]
        finish = ["length"] * len(batch)
        new_tokens = []
        for _ in range(max_new_tokens):
            token = sample_next(logits, temperature, top_p, generator)  # [B]
            token = torch.where(done, torch.full_like(token, pad_id), token)
            new_tokens.append(token)
            ended_eos = ~done & (token == eos_id)  # [B]
            ended_step = ~done & ~ended_eos & (stop_at[token] if stop_at is not None else torch.zeros_like(done))
            for j in ended_eos.nonzero().flatten().tolist():
                finish[j] = "eos"
            for j in ended_step.nonzero().flatten().tolist():
                finish[j] = "step"
            done |= ended_eos | ended_step
            if done.all():
                break
            attn = torch.cat([attn, (~done).long()[:, None]], dim=1)  # [B, L+t] finished rows attend to nothing new
            position = position[:, -1:] + 1  # [B, 1]
            logits, cache = lm_forward(model, token[:, None], attn, position, cache)
            logits = logits[:, -1]  # [B, V]
        generated = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in batch]  # [B, t]
        for j, i in enumerate(batch):
            length = len(generated[j])
            if finish[j] != "length":  # keep up to and including the token that ended it
                length = next(k for k, t in enumerate(generated[j]) if t == eos_id or (
                    finish[j] == "step" and bool(stop_at[t]))) + 1
            results[i] = Generation(generated[j][:length], finish[j])
    return results


# ============================================================================= stage A for a chunk of questions
def select_balanced(samples: list[tuple[list[int], bool]], n: int) -> list[tuple[list[int], bool]]:
    """Keep n distinct solutions with correct and wrong as balanced as possible (paper: n = 6 of n1 = 32)."""
    unique = list({tuple(ids): (ids, ok) for ids, ok in samples}.values())
    right = [s for s in unique if s[1]]
    wrong = [s for s in unique if not s[1]]
    n_right = min(len(right), max(n // 2, n - len(wrong)))
    return right[:n_right] + wrong[: n - n_right]


def mc_value(correct: list[bool]) -> float:
    """MC label of a state: V_hat(s) = (number of correct completions) / M."""
    return sum(correct) / len(correct)


def rollout_chunk(model, tok, questions: list[dict], cfg: Config, is_delim: torch.Tensor, g: torch.Generator) -> list[dict]:
    """Steps 1-4 of the docstring for a chunk of questions; returns one record per question."""
    eos = tok.eos_token_id
    gen = dict(eos_id=eos, pad_id=tok.pad_token_id, max_new_tokens=cfg.max_new_tokens,
               temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size, generator=g)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731

    # 1. Generator: n1 samples per question, graded; keep n balanced.
    prompts = [q["prompt_ids"] for q in questions for _ in range(cfg.n1)]
    samples = generate(model, prompts, desc="generator", **gen)
    records = []
    for qi, q in enumerate(questions):
        mine = samples[qi * cfg.n1: (qi + 1) * cfg.n1]
        graded = [(s.ids, s.finish == "eos" and is_correct(decode(s.ids), q["answer"])) for s in mine]
        records.append({"kept": select_balanced(graded, cfg.n), "tokens": sum(len(s.ids) for s in mine)})

    # 2. States: every step prefix s_0..s_{T-1} of every kept solution (s_0, shared by all, only once).
    states = []  # (question index, response ids so far, step index t)
    for qi, rec in enumerate(records):
        seen = set()
        for ids, _ in rec["kept"]:
            steps = split_steps(ids, is_delim, eos)
            for t in range(len(steps)):
                prefix = [tok_id for step in steps[:t] for tok_id in step]
                if tuple(prefix) not in seen:
                    seen.add(tuple(prefix))
                    states.append((qi, prefix, t))

    # 3. Completer: M completions to the end from every state.
    prompts = [questions[qi]["prompt_ids"] + prefix for qi, prefix, _ in states for _ in range(cfg.M)]
    completions = generate(model, prompts, desc="completer", **gen)

    # 4. MC labels and candidate actions (the first step of each completion).
    state_records: list[list[dict]] = [[] for _ in questions]
    label_of: list[dict] = [{} for _ in questions]
    for si, (qi, prefix, t) in enumerate(states):
        q, comps = questions[qi], completions[si * cfg.M: (si + 1) * cfg.M]
        correct = [c.finish == "eos" and is_correct(decode(prefix + c.ids), q["answer"]) for c in comps]
        actions = []
        for c, ok in zip(comps, correct):
            first = split_steps(c.ids, is_delim, eos)[0] if c.ids else []
            # The first step ends the solution when the completion has no other step; a step cut by the
            # token limit also ends it (wrong).
            terminal = len(first) == len(c.ids) and c.finish != "step"
            actions.append({"ids": first, "text": decode(first), "terminal": terminal,
                            "reward": float(ok) if terminal else None})
        value = mc_value(correct)
        records[qi]["tokens"] += sum(len(c.ids) for c in comps)
        label_of[qi][tuple(prefix)] = value
        state_records[qi].append({
            "qid": q["qid"], "t": t, "prompt_len": len(q["prompt_ids"]), "state_ids": q["prompt_ids"] + prefix,
            "state_text": decode(prefix), "mc_value": value, "num_correct": sum(correct), "actions": actions})

    out = []
    for qi, (q, rec) in enumerate(zip(questions, records)):
        solutions = []
        for ids, ok in rec["kept"]:
            steps = split_steps(ids, is_delim, eos)
            ends = [len(q["prompt_ids"]) + sum(len(s) for s in steps[:t]) for t in range(len(steps))]
            prefixes = [tuple(tok_id for s in steps[:t] for tok_id in s) for t in range(len(steps))]
            solutions.append({"qid": q["qid"], "prompt_len": len(q["prompt_ids"]), "ids": q["prompt_ids"] + ids,
                              "text": decode(ids), "correct": ok, "step_ends": ends,
                              "mc_values": [label_of[qi][p] for p in prefixes]})
        out.append({"qid": q["qid"], "states": state_records[qi], "solutions": solutions, "tokens": rec["tokens"]})
    return out


def load_questions(cfg: Config, tok) -> list[dict]:
    rows = read_jsonl(cfg.data, required=(cfg.question_field, cfg.answer_field))
    if cfg.max_questions:
        rows = rows[: cfg.max_questions]
    questions, seen = [], set()
    for r in rows:
        qid = str(r.get(cfg.id_field, r["_line"]))
        if qid in seen:
            raise InputError(f"{cfg.data} line {r['_line']}: duplicate id {qid!r}")
        seen.add(qid)
        if not isinstance(r[cfg.question_field], str) or not r[cfg.question_field].strip():
            raise InputError(f"{cfg.data} line {r['_line']}: field {cfg.question_field!r} must be a non-empty string")
        questions.append({"qid": qid, "question": r[cfg.question_field], "answer": str(r[cfg.answer_field]),
                          "prompt_ids": build_prompt_ids(tok, r[cfg.question_field], cfg.instruction)})
    return questions


def main() -> None:
    cfg = parse_config(Config)
    ddp = setup_distributed()
    tok = load_tokenizer(cfg.model)
    questions = load_questions(cfg, tok)  # validated in full before anything is written
    model = load_causal_lm(cfg.model, ddp.device, torch.bfloat16 if ddp.device.type == "cuda" else torch.float32).eval()
    is_delim = delimiter_token_mask(tok, cfg.delimiter)
    os.makedirs(cfg.out_dir, exist_ok=True)

    # Resume: skip every question already in some shard (a rerun may even use another number of ranks).
    my_shard = os.path.join(cfg.out_dir, f"shard-{ddp.rank}.jsonl")
    read_shard(my_shard)  # drops a line cut short by a kill
    barrier()
    done = {r["qid"] for path in glob.glob(os.path.join(cfg.out_dir, "shard-*.jsonl")) for r in read_shard(path)}
    todo = [q for q in questions[ddp.rank:: ddp.world_size] if q["qid"] not in done]
    if ddp.is_main:
        print(f"{len(questions)} questions, {len(done)} already done, {ddp.world_size} rank(s)")

    g = torch.Generator(ddp.device).manual_seed(cfg.seed + 1000 * ddp.rank + len(done))
    t0, tokens = time.time(), 0
    with open(my_shard, "a", encoding="utf-8") as shard:
        bar = tqdm(total=len(todo), desc=f"rollout rank {ddp.rank}", position=ddp.rank)
        for start in range(0, len(todo), cfg.questions_per_chunk):
            chunk = todo[start: start + cfg.questions_per_chunk]
            for record in rollout_chunk(model, tok, chunk, cfg, is_delim, g):
                tokens += record["tokens"]
                append_jsonl(shard, record)
            bar.update(len(chunk))
        bar.close()
    elapsed = time.time() - t0
    tokens = all_ranks_sum(tokens)  # this run's tokens on every rank (rank 0 prints)

    if ddp.is_main:  # merge the shards: every question exactly once, in input order
        by_qid = {r["qid"]: r for path in sorted(glob.glob(os.path.join(cfg.out_dir, "shard-*.jsonl")))
                  for r in read_shard(path)}
        merged = [by_qid[q["qid"]] for q in questions if q["qid"] in by_qid]
        states = [s for r in merged for s in r["states"]]
        write_jsonl_atomic(os.path.join(cfg.out_dir, "states.jsonl"), states)
        write_jsonl_atomic(os.path.join(cfg.out_dir, "solutions.jsonl"), [s for r in merged for s in r["solutions"]])
        summary = {"questions": len(merged), "states": len(states),
                   "mean_mc_value": sum(s["mc_value"] for s in states) / max(1, len(states)),
                   "kept_solutions": sum(len(r["solutions"]) for r in merged),
                   "kept_correct": sum(s["correct"] for r in merged for s in r["solutions"]),
                   "tokens_generated": sum(r["tokens"] for r in merged),
                   "tokens_this_run": tokens, "seconds_this_run": round(elapsed, 2),
                   "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1), "config": dataclasses.asdict(cfg)}
        write_json_atomic(os.path.join(cfg.out_dir, "summary.json"), summary)
        print(f"questions {summary['questions']} | states {summary['states']} | mean MC label "
              f"{summary['mean_mc_value']:.3f} | tokens generated {summary['tokens_generated']} | "
              f"{summary['tokens_per_second']} tokens/s (this run, all ranks)")
    cleanup_distributed()


if __name__ == "__main__":
    run(main)
