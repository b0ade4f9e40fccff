"""DAPO stage A, data generation: sample solutions, label every step prefix by Monte Carlo, and keep the
first step of each completion as a candidate action (docs/algorithm.md, "Stage A").

For every training question x, with pi_ref = pi_gen = the current policy:
  1. Generator: sample n1 solutions, grade them, keep n with correct and wrong as balanced as possible.
  2. Cut each kept solution into steps a_0..a_{T-1} (in token space: a step ends at the first token whose
     text contains the delimiter). Its states are s_t = x . a_0 ... a_{t-1}, t = 0..T-1.
  3. Completer: from every state, M completions to the end, graded. The MC label of the state is
     V_hat(s_t) = (number correct) / M; a completion cut by the token limit counts as wrong.
  4. Candidate actions: the first step of each of those M completions, with a flag for "this step ends the
     solution" and, for those, the graded reward (dapo.py takes Q = r for them). Every candidate also keeps
     the graded reward of its whole completion (one Monte-Carlo sample of Q; dapo.py --q_source rollout).

    python rollout.py --model runs/toy/sft --data runs/toy/train.jsonl --out_dir runs/toy/iter1/rollout
    torchrun --nproc_per_node=8 rollout.py --model ... --data ...   # questions sharded over ranks

Output (out_dir): states.jsonl (one record per state), solutions.jsonl (the kept solutions, with the MC
label at every step boundary), summary.json; docs/formats.md gives their fields. Rewards come from grading.py.
Each rank appends each finished question to its own shard (shard-RANK.jsonl) and flushes it, so rerunning the
same command after a kill resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import time

import torch

from plumbing.cli import arg, InputError, parse_config, progress, run
from plumbing.distributed import all_ranks_sum, barrier, cleanup_distributed, setup_distributed
from plumbing.models import build_prompt_ids, DEFAULT_INSTRUCTION, eos_token_ids, load_tokenizer
from plumbing.runfiles import (append_jsonl, check_rerun, read_table, read_shard, read_shards, warn_useless_data,
                               write_json_atomic, write_jsonl_atomic)
from plumbing.tracking import start_tracking, TrackingConfig
from plumbing.vllm_engine import check_engine, EngineConfig, generate, load_policy
from grading import CODE_INSTRUCTION, check_grader, code_layout, code_question, grade_batch


@dataclasses.dataclass
class QuestionConfig:
    """How questions are read, prompted and graded: the same for rollout.py and eval.py."""
    question_field: str = arg("question", "field of the question text ('problem' for MATH)")
    answer_field: str = arg("answer", "field of the reference: '#### N' solutions, \\boxed{} solutions or bare answers")
    task: str = arg("math", "math | code: how a response is graded (code: the whole record is the reference problem)")
    grader: str = arg("builtin", "math answers: builtin (needs nothing) | math-verify (Hugging Face's symbolic "
                                 "checker, optional)")
    id_field: str = arg("id", "field of the question id (the line number when the field is absent)")
    instruction: str = arg(DEFAULT_INSTRUCTION, "zero-shot chain-of-thought instruction added to each question")
    max_questions: int = arg(0, "use only the first N questions (0: all)")
    max_prompt_tokens: int = arg(0, "skip (never truncate) a question whose prompt is longer than this (0: no limit)")
    data_config: str = arg("", "--data as a hub data set: its configuration ('main' for openai/gsm8k)")
    data_split: str = arg("", "--data as a hub data set: its split (train, test; empty: its only one)")


@dataclasses.dataclass
class Config(QuestionConfig, EngineConfig, TrackingConfig):
    model: str = arg("runs/toy/sft", "policy to sample from (pi_ref = pi_gen): HF directory, hub name or .gguf file")
    data: str = arg("runs/toy/train.jsonl", "JSONL of questions with reference answers, or (needs datasets) a hub "
                                            "data set name, a .parquet file or a save_to_disk directory")
    out_dir: str = arg("runs/toy/iter1/rollout", "where states.jsonl, solutions.jsonl and summary.json go")
    n1: int = arg(32, "generator samples per question (paper: 32)")
    n_keep: int = arg(6, "n: solutions kept per question, correct and wrong balanced (paper: 6)")
    M: int = arg(16, "completions per state: MC label and candidate actions (paper: 16)")
    temperature: float = arg(1.0, "sampling temperature of generator and completer")
    top_p: float = arg(1.0, "nucleus sampling threshold")
    max_new_tokens: int = arg(1024, "token limit of a solution; a completion cut by it is wrong")
    delimiter: str = arg("\n", "step delimiter: a step ends at the first token whose text contains it")
    batch_size: int = arg(256, "sequences per generation batch (256: the fastest in tests/benchmark_rollout.py)")
    questions_per_chunk: int = arg(16, "questions generated together (and saved together) per rank")
    seed: int = arg(0, "sampling seed (each rank offsets it)")
    overwrite: bool = arg(False, "remove out_dir (finished or not) first and start afresh")


# Settings a rerun may change (where the output goes, how many questions, speed): none of them changes a
# record already saved. Any other change is refused (plumbing.runfiles.check_rerun). A resumed rollout promises every
# question exactly once, not the samples of an uninterrupted run (its generator is reseeded from the number
# of questions done), so draw-changing speed settings may change too; eval.py, which promises the numbers of
# an uninterrupted run, allows only --out_dir.
RESUME_IGNORES = ("out_dir", "overwrite", "max_questions", "batch_size", "questions_per_chunk",
                  "gpu_memory_utilization", "tensor_parallel_size", "report_to")


# ============================================================================= steps in token space
def delimiter_token_mask(tok, delimiter: str) -> torch.Tensor:
    """[vocab] bool: True for every token whose text contains the step delimiter.

    Steps live in token space: a step ends at the first such token (for "\\n" that includes merged tokens
    like ".\\n" or "\\n\\n"), so states are always exact token prefixes and never re-tokenised."""
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    return torch.tensor([delimiter in t for t in texts], dtype=torch.bool)


def split_steps(response_ids: list[int], is_delim: torch.Tensor, eos_ids: set[int]) -> list[list[int]]:
    """Cut a response into steps: each step ends with a delimiter token; the last one ends with an EOS, any of
    the model's (kept: it is the action that ends the solution), or is cut by the token limit."""
    steps, current = [], []
    for t in response_ids:
        current.append(t)
        if t in eos_ids or bool(is_delim[t]):
            steps.append(current)
            current = []
            if t in eos_ids:
                break
    if current:
        steps.append(current)
    return steps


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


def rollout_chunk(model, tok, questions: list[dict], cfg: Config, is_delim: torch.Tensor,
                  g: torch.Generator) -> list[dict]:
    """Steps 1-4 of the docstring for a chunk of questions; returns one record per question."""
    eos = eos_token_ids(tok, model)  # every EOS id ends a solution (instruct models have several)
    gen = dict(eos_ids=eos, pad_id=tok.pad_token_id, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
               top_p=cfg.top_p, batch_size=cfg.batch_size, generator=g, vocab_size=len(tok))
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731

    # 1. Generator: n1 samples per question, graded (a sample cut by the token limit is wrong); keep n balanced.
    prompts = [q["prompt_ids"] for q in questions for _ in range(cfg.n1)]
    samples = generate(model, prompts, desc="generator", **gen)
    rewards = grade_batch([decode(s.ids) if s.finish == "eos" else None for s in samples],
                          [q["answer"] for q in questions for _ in range(cfg.n1)], cfg.task, cfg.grader)
    records = []
    for qi in range(len(questions)):
        mine = samples[qi * cfg.n1: (qi + 1) * cfg.n1]
        graded = [(s.ids, ok) for s, ok in zip(mine, rewards[qi * cfg.n1: (qi + 1) * cfg.n1], strict=True)]
        records.append({"kept": select_balanced(graded, cfg.n_keep), "tokens": sum(len(s.ids) for s in mine),
                        "responses": len(mine), "cut": sum(s.finish == "length" for s in mine),
                        "correct_samples": sum(ok for _, ok in graded)})

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

    # 3. Completer: M completions to the end from every state, graded. max_new_tokens limits the whole
    # solution, so a completion from s_t gets what the steps before it left over.
    prompts = [questions[qi]["prompt_ids"] + prefix for qi, prefix, _ in states for _ in range(cfg.M)]
    budgets = [cfg.max_new_tokens - len(prefix) for _, prefix, _ in states for _ in range(cfg.M)]
    completions = generate(model, prompts, desc="completer", **{**gen, "max_new_tokens": budgets})
    prefixes = [prefix for _, prefix, _ in states for _ in range(cfg.M)]  # [len(states) * M]
    rewards = grade_batch([decode(prefix + c.ids) if c.finish == "eos" else None
                           for prefix, c in zip(prefixes, completions, strict=True)],
                          [questions[qi]["answer"] for qi, _, _ in states for _ in range(cfg.M)], cfg.task, cfg.grader)

    # 4. MC labels and candidate actions (the first step of each completion).
    state_records: list[list[dict]] = [[] for _ in questions]
    label_of: list[dict] = [{} for _ in questions]
    for si, (qi, prefix, t) in enumerate(states):
        q, comps = questions[qi], completions[si * cfg.M: (si + 1) * cfg.M]
        correct = rewards[si * cfg.M: (si + 1) * cfg.M]
        actions = []
        for c, ok in zip(comps, correct, strict=True):
            first = split_steps(c.ids, is_delim, eos)[0] if c.ids else []
            # The first step ends the solution when the completion has no other step: the completion ended with
            # EOS (graded) or used up the token limit (wrong; even when its last token is a delimiter, nothing can
            # follow it, so Q = r = 0 is its exact value, as in the MC label). The M completions of a state share
            # one limit, so equal first steps of a state always get the same flag and reward.
            terminal = len(first) == len(c.ids)
            actions.append({"ids": first, "text": decode(first), "terminal": terminal,
                            "reward": float(ok) if terminal else None, "completion_reward": float(ok)})
        value = mc_value(correct)
        records[qi]["tokens"] += sum(len(c.ids) for c in comps)
        records[qi]["responses"] += len(comps)
        records[qi]["cut"] += sum(c.finish == "length" for c in comps)
        label_of[qi][tuple(prefix)] = value
        state_records[qi].append({
            "qid": q["qid"], "t": t, "prompt_len": len(q["prompt_ids"]), "state_ids": q["prompt_ids"] + prefix,
            "state_text": decode(prefix), "mc_value": value, "num_correct": sum(correct), "actions": actions})

    out = []
    for qi, (q, rec) in enumerate(zip(questions, records, strict=True)):
        solutions = []
        for ids, ok in rec["kept"]:
            steps = split_steps(ids, is_delim, eos)
            ends = [len(q["prompt_ids"]) + sum(len(s) for s in steps[:t]) for t in range(len(steps))]
            prefixes = [tuple(tok_id for s in steps[:t] for tok_id in s) for t in range(len(steps))]
            solutions.append({"qid": q["qid"], "prompt_len": len(q["prompt_ids"]), "ids": q["prompt_ids"] + ids,
                              "text": decode(ids), "correct": ok, "step_ends": ends,
                              "mc_values": [label_of[qi][p] for p in prefixes]})
        out.append({"qid": q["qid"], "states": state_records[qi], "solutions": solutions, "tokens": rec["tokens"],
                    "responses": rec["responses"], "cut": rec["cut"], "correct_samples": rec["correct_samples"]})
    return out


# =================================== machinery (a learner may skip: reading and checking the questions, shards, resume)
def load_questions(cfg: Config, tok) -> list[dict]:
    if cfg.task not in ("math", "code"):
        raise InputError(f"--task must be math or code, got {cfg.task!r}")
    check_grader(cfg.grader)
    code = cfg.task == "code"
    flags = {cfg.question_field: "--question_field", cfg.answer_field: "--answer_field"}
    rows = read_table(cfg.data, cfg.data_config, cfg.data_split, flags=flags,
                      required=(cfg.question_field,) if code else (cfg.question_field, cfg.answer_field))
    # The default instruction asks for \boxed{}: code gets its own unless one is given.
    instruction = CODE_INSTRUCTION if code and cfg.instruction == DEFAULT_INSTRUCTION else cfg.instruction
    if cfg.max_questions:
        rows = rows[: cfg.max_questions]
    questions, seen = [], set()
    for r in rows:
        qid = str(r.get(cfg.id_field, r["_line"]))
        if qid in seen:
            raise InputError(f"{cfg.data} line {r['_line']}: duplicate id {qid!r} (field {cfg.id_field!r}: --id_field)")
        seen.add(qid)
        if not isinstance(r[cfg.question_field], str) or not r[cfg.question_field].strip():
            raise InputError(f"{cfg.data} line {r['_line']}: field {cfg.question_field!r} must be a non-empty string")
        if code and code_layout(r) is None:
            raise InputError(f"{cfg.data} line {r['_line']}: not a code problem with tests: it needs prompt, test and "
                             "entry_point (HumanEval), test_list (MBPP) or input_output (TACO)")
        reference = {k: v for k, v in r.items() if k != "_line"} if code else str(r[cfg.answer_field])
        question = code_question(r[cfg.question_field], reference) if code else r[cfg.question_field]
        prompt_ids = build_prompt_ids(tok, question, instruction)
        if cfg.max_prompt_tokens and len(prompt_ids) > cfg.max_prompt_tokens:
            continue  # a cut question is another question: leave it out rather than truncate it
        questions.append({"qid": qid, "question": question, "answer": reference, "prompt_ids": prompt_ids})
    if len(questions) < len(rows):
        print(f"{cfg.data}: skipped {len(rows) - len(questions)} question(s) whose prompt is longer than "
              f"--max_prompt_tokens {cfg.max_prompt_tokens}")
    if not questions:
        raise InputError(f"{cfg.data}: no question left (every prompt is longer than --max_prompt_tokens)")
    return questions


def report_rollout(cfg: Config, summary: dict, states: list[dict], shown: int = 8) -> None:
    """--report_to: the summary's numbers, and a few states with their MC labels and candidate actions."""
    tracker = start_tracking(cfg, "rollout.py", is_main=True)
    tracker.log({f"rollout/{k}": v for k, v in summary.items()}, 0)
    tracker.table("rollout/states", ["state (its end)", "MC label", "candidate actions"],
                  [[s["state_text"][-60:], s["mc_value"], " / ".join(a["text"] for a in s["actions"])]
                   for s in states[:shown]])


# ============================================================================= main
# The paper's steps are rollout_chunk's; in main the lines under an ALGORITHM comment are the algorithm, those under
# MACHINERY a learner may skip.
def main() -> None:
    # MACHINERY: settings, DDP, the questions checked in full before anything is written, the rerun rule, resume.
    cfg = parse_config(Config)
    if not 1 <= cfg.n_keep <= cfg.n1:
        raise InputError(f"--n_keep {cfg.n_keep} must be between 1 and --n1 {cfg.n1} (it keeps n of the n1 samples)")
    check_engine(cfg, cfg.model)
    ddp = setup_distributed()
    tok = load_tokenizer(cfg.model)
    questions = load_questions(cfg, tok)  # validated in full before anything is written
    done, settings = os.path.join(cfg.out_dir, "summary.json"), os.path.join(cfg.out_dir, "settings.json")
    shards = glob.glob(os.path.join(cfg.out_dir, "shard-*.jsonl"))
    if check_rerun(cfg, cfg.out_dir, done, settings, shards, RESUME_IGNORES, ddp.is_main,
                   covers=lambda summary: summary["questions"] == len(questions)):
        cleanup_distributed()
        return
    os.makedirs(cfg.out_dir, exist_ok=True)
    model = load_policy(cfg, cfg.model, ddp, seed=cfg.seed + 1000 * ddp.rank)  # --engine: HF model or vLLM
    is_delim = delimiter_token_mask(tok, cfg.delimiter)

    # Resume: skip every question already in some shard (a rerun may even use another number of ranks).
    my_shard = os.path.join(cfg.out_dir, f"shard-{ddp.rank}.jsonl")
    read_shard(my_shard)  # drops a line cut short by a kill
    barrier()
    done = {r["qid"] for r in read_shards(cfg.out_dir)}
    todo = [q for q in questions[ddp.rank:: ddp.world_size] if q["qid"] not in done]
    if ddp.is_main:
        print(f"{len(questions)} questions, {len(done)} already done, {ddp.world_size} rank(s)")

    # ALGORITHM 1-4, a chunk of questions at a time (rollout_chunk), each appended to this rank's shard.
    g = torch.Generator(ddp.device).manual_seed(cfg.seed + 1000 * ddp.rank + len(done))
    t0, tokens = time.time(), 0
    with open(my_shard, "a", encoding="utf-8") as shard:
        bar = progress(total=len(todo), desc=f"rollout rank {ddp.rank}", position=ddp.local_rank)
        for start in range(0, len(todo), cfg.questions_per_chunk):
            chunk = todo[start: start + cfg.questions_per_chunk]
            for record in rollout_chunk(model, tok, chunk, cfg, is_delim, g):
                tokens += record["tokens"]
                append_jsonl(shard, record)
            bar.update(len(chunk))
        bar.close()
    elapsed = time.time() - t0
    tokens = all_ranks_sum(tokens)  # this run's tokens on every rank (rank 0 prints)

    # MACHINERY: rank 0 merges the shards (every question exactly once, in input order) and writes the summary.
    if ddp.is_main:
        by_qid = {r["qid"]: r for r in read_shards(cfg.out_dir)}
        merged = [by_qid[q["qid"]] for q in questions if q["qid"] in by_qid]
        states = [s for r in merged for s in r["states"]]
        write_jsonl_atomic(os.path.join(cfg.out_dir, "states.jsonl"), states)
        write_jsonl_atomic(os.path.join(cfg.out_dir, "solutions.jsonl"), [s for r in merged for s in r["solutions"]])
        summary = {"questions": len(merged), "states": len(states),
                   "mean_mc_value": sum(s["mc_value"] for s in states) / max(1, len(states)),
                   "kept_solutions": sum(len(r["solutions"]) for r in merged),
                   "kept_correct": sum(s["correct"] for r in merged for s in r["solutions"]),
                   "tokens_generated": sum(r["tokens"] for r in merged),
                   # what says whether the data can teach anything
                   "responses": sum(r["responses"] for r in merged),
                   "cut_by_token_limit": sum(r["cut"] for r in merged),
                   "questions_without_correct_sample": sum(r["correct_samples"] == 0 for r in merged),
                   "states_labelled_0": sum(s["mc_value"] == 0 for s in states),
                   "states_labelled_1": sum(s["mc_value"] == 1 for s in states),
                   "tokens_this_run": tokens, "seconds_this_run": round(elapsed, 2),
                   "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1), "config": dataclasses.asdict(cfg)}
        write_json_atomic(os.path.join(cfg.out_dir, "summary.json"), summary)
        print(f"questions {summary['questions']} | states {summary['states']} | mean MC label "
              f"{summary['mean_mc_value']:.3f} | tokens generated {summary['tokens_generated']} | "
              f"{summary['tokens_per_second']} tokens/s (this run, all ranks)")
        print(f"responses cut by the token limit {summary['cut_by_token_limit']} of {summary['responses']} | questions "
              f"with no correct sample {summary['questions_without_correct_sample']} of {summary['questions']} | "
              f"states labelled 0 / 1: {summary['states_labelled_0']} / {summary['states_labelled_1']}")
        warn_useless_data([s["mc_value"] for s in states], summary["cut_by_token_limit"], summary["responses"],
                                 after=": the critic can only learn a constant")
        report_rollout(cfg, summary, states)
    cleanup_distributed()


if __name__ == "__main__":
    run(main)
