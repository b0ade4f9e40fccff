"""Accuracy of a policy on a held-out JSONL test set: greedy (the paper's protocol) and sampled.

For every test question x, with the same prompt as rollout.py (zero-shot chain of thought):
  1. Greedy: one response, decoded greedily up to max_new_tokens (paper: 2048); its verdict is the reward
     of rollout.py (final answer equals the reference; a response cut by the token limit is wrong).
  2. Sampled: k responses at a temperature. Sampled accuracy is the mean verdict over all samples;
     pass@k counts a question solved when any sample is right; maj@k grades the most frequent final answer
     of the samples (equal answers such as 1,000 and 1000 vote together).
With --task code (HumanEval, MBPP or TACO records) a verdict runs the program against the problem's unit
tests in grading.py's sandbox, greedy accuracy is pass@1 (greedy), and there is no maj@k.

    python eval.py --model runs/toy/iter1/actor --data runs/toy/test.jsonl --out_dir runs/toy/iter1/eval
    torchrun --nproc_per_node=8 eval.py --model ... --data ...   # questions sharded over ranks

Output (out_dir): responses.jsonl (one record per question: its greedy and sampled responses with their
verdicts) and summary.json (greedy_acc, sampled_acc, pass@k, maj@k as fractions in [0, 1], ...).

Resume: the questions are cut into chunks of --questions_per_chunk, dealt out to the ranks in turn, and every
chunk has its own seed. A rank appends each graded chunk to its own shard-RANK.jsonl as ONE line, so a chunk
is saved whole or not at all; rerunning the same command after a kill skips the chunks already saved and
draws for the others exactly what an uninterrupted run draws, on any number of ranks (a rerun with other
settings is refused: every setting but --out_dir changes the draws). Rank 0 merges the shards and removes
them once summary.json is written.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import time

import torch
from transformers import set_seed

from plumbing.cli import arg, InputError, parse_config, progress, run
from plumbing.distributed import barrier, cleanup_distributed, setup_distributed
from plumbing.models import eos_token_ids, load_tokenizer
from plumbing.runfiles import (append_jsonl, check_rerun, read_shard, read_shards, warn_useless_data,
                               write_json_atomic, write_jsonl_atomic)
from grading import answers_match, extract_answer, grade_batch, normalize_answer, reference_answer
from rollout import QuestionConfig, load_questions
from plumbing.generation import Generation
from plumbing.tracking import start_tracking, TrackingConfig
from plumbing.vllm_engine import check_engine, EngineConfig, generate, load_policy


@dataclasses.dataclass
class Config(QuestionConfig, EngineConfig, TrackingConfig):
    model: str = arg("runs/toy/sft", "policy to evaluate: HF directory, hub name or .gguf file")
    data: str = arg("runs/toy/test.jsonl", "JSONL of held-out questions with reference answers, or (needs datasets) a "
                                           "hub data set name, a .parquet file or a save_to_disk directory")
    out_dir: str = arg("runs/toy/base/eval", "where responses.jsonl and summary.json go")
    max_new_tokens: int = arg(2048, "token limit of a response (paper: 2048); a response cut by it is wrong")
    k: int = arg(4, "sampled responses per question for sampled accuracy, pass@k and maj@k (0: greedy only)")
    temperature: float = arg(1.0, "sampling temperature of the k samples")
    top_p: float = arg(1.0, "nucleus sampling threshold of the k samples")
    batch_size: int = arg(64, "sequences per generation batch")
    questions_per_chunk: int = arg(64, "questions generated and saved together; a kill loses at most a chunk per rank")
    seed: int = arg(0, "sampling seed (each chunk offsets it): the same settings give the same numbers on any ranks")
    overwrite: bool = arg(False, "remove out_dir (finished or not) first and start afresh")


# A resumed eval must end with the numbers of an uninterrupted one, so it may change only where the output goes.
# Every other setting changes what is drawn: the questions (--max_questions, --max_prompt_tokens) and
# --questions_per_chunk decide which questions share a chunk and its seed, --batch_size which rows share a
# sampling call. (rollout.py promises less and allows more: its RESUME_IGNORES.)
RESUME_IGNORES = ("out_dir", "overwrite", "report_to")


# ============================================================================= accuracy
def majority_answer(texts: list[str]) -> str | None:
    """maj@k vote: the most frequent normalised final answer, equal answers (grading.answers_match) counted
    together; a tie goes to the answer seen first; None when no response has an answer."""
    groups: list[list[str]] = []  # each group holds answers equal to its first one
    for text in texts:
        answer = extract_answer(text)
        if answer is None:
            continue
        answer = normalize_answer(answer)
        for group in groups:
            if answers_match(answer, group[0]):
                group.append(answer)
                break
        else:
            groups.append([answer])
    return max(groups, key=len)[0] if groups else None


def grade_question(q: dict, greedy: Generation, samples: list[Generation], decode, task: str = "math",
                   grader: str = "builtin") -> dict:
    """One question's record: its responses, their verdicts (the reward of rollout.py: the response ended and
    is right; code runs its tests) and, for math, the majority vote of the samples."""
    greedy_text, texts = decode(greedy.ids), [decode(s.ids) for s in samples]
    greedy_correct, *correct = grade_batch([t if g.finish == "eos" else None for g, t in
                                            zip([greedy, *samples], [greedy_text, *texts], strict=True)],
                                           [q["answer"]] * (1 + len(samples)), task, grader)
    vote = bool(samples) and task == "math"  # programs have no final answer to vote on
    voters = [t for s, t in zip(samples, texts, strict=True) if s.finish == "eos"]  # a response cut has no vote
    maj = majority_answer(voters) if vote else None
    return {"id": q["qid"], "question": q["question"], "reference": q["answer"],
            "greedy_response": greedy_text, "greedy_finish": greedy.finish, "greedy_correct": greedy_correct,
            "sampled_responses": texts, "sampled_finish": [s.finish for s in samples], "sampled_correct": correct,
            "maj_answer": maj,
            "maj_correct": (maj is not None and answers_match(maj, reference_answer(q["answer"]))) if vote else None}


def summarize(records: list[dict], cfg: Config, world_size: int, seconds: float) -> dict:
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    sampled = cfg.k > 0
    sampled_cut = [f == "length" for r in records for f in r["sampled_finish"]]
    return {"model": cfg.model, "data": cfg.data, "num_questions": len(records),
            "greedy_acc": mean([r["greedy_correct"] for r in records]),
            "sampled_acc": mean([mean(r["sampled_correct"]) for r in records]) if sampled else None,
            "pass@k": mean([any(r["sampled_correct"]) for r in records]) if sampled else None,
            "maj@k": mean([r["maj_correct"] for r in records]) if sampled and cfg.task == "math" else None,
            "greedy_cut": mean([r["greedy_finish"] == "length" for r in records]),  # cut by the token limit
            "sampled_cut": sum(sampled_cut) / max(1, len(sampled_cut)) if sampled else None,
            "task": cfg.task, "k": cfg.k, "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.seed, "world_size": world_size, "seconds": round(seconds, 2), "config": dataclasses.asdict(cfg)}


def print_table(s: dict) -> None:
    rows = [("pass@1 (greedy)" if s["task"] == "code" else "greedy accuracy", s["greedy_acc"])]
    if s["k"]:
        rows += [(f"sampled accuracy (T={s['temperature']})", s["sampled_acc"]), (f"pass@{s['k']}", s["pass@k"])]
        rows += [(f"maj@{s['k']}", s["maj@k"])] if s["maj@k"] is not None else []
    print(f"{s['model']} on {s['data']}: {s['num_questions']} questions, {s['seconds']:.0f}s")
    for name, value in rows:
        print(f"  {name:<28} {value:6.3f}")
    cut = f"{s['greedy_cut']:.3f} greedy" + (f", {s['sampled_cut']:.3f} sampled" if s["k"] else "")
    print(f"  {'cut by the token limit':<28} {cut}")


def report_eval(cfg: Config, summary: dict, records: list[dict], shown: int = 8) -> None:
    """--report_to: the accuracies, and a few questions with their greedy responses and verdicts."""
    tracker = start_tracking(cfg, "eval.py", is_main=True)
    tracker.log({f"eval/{k}": v for k, v in summary.items()}, 0)
    tracker.table("eval/responses", ["question", "reference", "greedy response", "correct"],
                  [[r["question"], r["reference"], r["greedy_response"], r["greedy_correct"]] for r in records[:shown]])


# ============================================================================= main
# The lines under an ALGORITHM comment are the evaluation; those under MACHINERY a learner may skip.
def main() -> None:
    # MACHINERY: settings, DDP, the questions checked in full before anything is written, the rerun rule, resume.
    cfg = parse_config(Config)
    if cfg.k < 0 or (cfg.k > 0 and cfg.temperature <= 0):
        raise InputError(f"--k must be >= 0 and --temperature > 0 when sampling (got k={cfg.k}, T={cfg.temperature})")
    check_engine(cfg, cfg.model)
    ddp = setup_distributed()
    tok = load_tokenizer(cfg.model)
    questions = load_questions(cfg, tok)  # validated in full before anything is written
    done, settings = os.path.join(cfg.out_dir, "summary.json"), os.path.join(cfg.out_dir, "settings.json")
    shards = glob.glob(os.path.join(cfg.out_dir, "shard-*.jsonl"))
    if check_rerun(cfg, cfg.out_dir, done, settings, shards, RESUME_IGNORES, ddp.is_main,
                   covers=lambda summary: summary["num_questions"] == len(questions)):
        cleanup_distributed()
        return
    os.makedirs(cfg.out_dir, exist_ok=True)
    model = load_policy(cfg, cfg.model, ddp, seed=cfg.seed)  # --engine: HF model or vLLM
    set_seed(cfg.seed)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731

    # Chunks are cut from the whole question list, not from a rank's share, and chunk c has its own seed: what is
    # drawn for a question depends on the settings alone, not on the number of ranks or on where a kill landed.
    chunks = [questions[i: i + cfg.questions_per_chunk] for i in range(0, len(questions), cfg.questions_per_chunk)]
    # Resume: skip every chunk already in some shard (a line cut short by a kill is dropped first).
    my_shard = os.path.join(cfg.out_dir, f"shard-{ddp.rank}.jsonl")
    read_shard(my_shard)
    barrier()
    done = {r["chunk"] for r in read_shards(cfg.out_dir)}
    mine = [c for c in range(ddp.rank, len(chunks), ddp.world_size) if c not in done]
    if ddp.is_main:
        print(f"{len(questions)} questions, {sum(len(chunks[c]) for c in done)} already done, {ddp.world_size} rank(s)")

    # ALGORITHM 1-2: greedy and k sampled responses per question, graded; one shard line per chunk.
    t0 = time.time()
    gen = dict(eos_ids=eos_token_ids(tok, model), pad_id=tok.pad_token_id, max_new_tokens=cfg.max_new_tokens,
               batch_size=cfg.batch_size, vocab_size=len(tok))
    with open(my_shard, "a", encoding="utf-8") as shard:
        bar = progress(total=sum(len(chunks[c]) for c in mine), desc=f"eval rank {ddp.rank}", position=ddp.local_rank)
        for c in mine:
            chunk = chunks[c]
            g = torch.Generator(ddp.device).manual_seed(cfg.seed + 1_000_000 * c)
            greedy = generate(model, [q["prompt_ids"] for q in chunk], temperature=0.0, desc="greedy", **gen)
            samples = generate(model, [q["prompt_ids"] for q in chunk for _ in range(cfg.k)],
                               temperature=cfg.temperature, top_p=cfg.top_p, generator=g, desc="sampled", **gen)
            records = [grade_question(q, greedy[i], samples[i * cfg.k: (i + 1) * cfg.k], decode, cfg.task, cfg.grader)
                       for i, q in enumerate(chunk)]
            # One line per chunk: a kill while grading (seconds per code question) leaves none of it, so the rerun
            # redraws the whole chunk with its seed, never the rest of it as another batch.
            append_jsonl(shard, {"chunk": c, "records": records})
            bar.update(len(chunk))
        bar.close()
    barrier()

    # MACHINERY: rank 0 merges the shards (every question exactly once, in input order), then the accuracies.
    if ddp.is_main:
        by_id = {r["id"]: r for line in read_shards(cfg.out_dir) for r in line["records"]}
        merged = [by_id[q["qid"]] for q in questions]
        write_jsonl_atomic(os.path.join(cfg.out_dir, "responses.jsonl"), merged)
        summary = summarize(merged, cfg, ddp.world_size, time.time() - t0)
        write_json_atomic(os.path.join(cfg.out_dir, "summary.json"), summary)  # last: its presence means done
        for path in (glob.glob(os.path.join(cfg.out_dir, "shard-*.jsonl"))
                     + [os.path.join(cfg.out_dir, "settings.json")]):
            os.remove(path)
        print_table(summary)
        greedy_cut = sum(r["greedy_finish"] == "length" for r in merged)
        sampled_cut = sum(f == "length" for r in merged for f in r["sampled_finish"])
        warn_useless_data(cut=greedy_cut + sampled_cut, responses=len(merged) * (1 + cfg.k))
        report_eval(cfg, summary, merged)
    cleanup_distributed()


if __name__ == "__main__":
    run(main)
