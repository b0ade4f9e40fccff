"""How much of the toy's planted mistake has a policy unlearnt? P(right sign) at every trap of the test set.

The warm start's data adds where the question says subtract ("Subtract: 5+2=7"), 75% of the time. For each test
question with a subtraction, this script builds the right solution up to its first Subtract step's sign
("... Subtract: 5"; on the varied toy, told by its tokenizer, the earlier steps carry remarks drawn as in the
warm start's data) and reads off the probability each policy gives the next token: '-' (the question's
operation) or '+' (the mistake). The mean over the questions is a direct measure of the fix, beside accuracy,
which also counts random slips.

    python data/toy/planted_mistake.py --run_dir runs/toy --policies sft,iter1/actor,iter1/no-critic/actor,iter2/actor

prints a table and writes run_dir/planted_mistake.json ({policy: {"p_right", "p_mistake", "questions"}}).
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plumbing.cli import arg, InputError, parse_config, run  # noqa: E402
from plumbing.models import build_prompt_ids, load_causal_lm, load_tokenizer  # noqa: E402
from plumbing.runfiles import read_jsonl, write_json_atomic  # noqa: E402
import prepare  # noqa: E402

WORD_OPS = {text.split(" {k}")[0]: op for op, text in prepare.OPS.items()}  # "Multiply by" -> "*"


@dataclasses.dataclass
class Config:
    run_dir: str = arg("runs/toy", "a demo.sh folder: test.jsonl, sft/ and the policies below")
    policies: str = arg("sft,iter1/actor,iter1/no-critic/actor,iter2/actor",
                        "policy folders under run_dir, comma-separated")
    seed: int = arg(0, "seed of the remarks drawn for the earlier steps (varied toy)")


def parse_question(question: str) -> tuple[int, list[tuple[str, int]]]:
    """The start value and operations of a toy question (prepare.question_text's inverse)."""
    start = re.match(r"Start with (\d+)\.", question)
    words = "|".join(WORD_OPS)
    ops = [(WORD_OPS[word], int(k)) for word, k in re.findall(rf"({words}) (\d+)\.", question)]
    if start is None or not ops:
        raise ValueError(f"not a toy question: {question[:80]!r}")
    return int(start.group(1)), ops


def trap_prefixes(questions: list[str], tok, varied: bool, seed: int) -> list[list[int]]:
    """Prompt + the right solution up to the first Subtract step's sign, as token ids; questions without a
    subtraction are skipped."""
    rng, rows = random.Random(seed), []
    for question in questions:
        start, ops = parse_question(question)
        if "-" not in [op for op, _ in ops]:
            continue
        i = [op for op, _ in ops].index("-")
        steps = prepare.solution_steps(start, ops, rng=rng if varied else None, remarks=varied)  # trap_error 0
        operand = re.match(r"Subtract: (\d+)", steps[i]).group(1)
        rows.append(build_prompt_ids(tok, question) + tok("".join(steps[:i]) + "Subtract: " + operand).input_ids)
    return rows


@torch.no_grad()
def sign_probabilities(model, rows: list[list[int]], right: int, wrong: int) -> tuple[float, float]:
    """Mean over the rows of P(right) and P(wrong) as the next token."""
    p_right = p_wrong = 0.0
    for ids in rows:  # one row at a time: no padding, the exact forward of each prefix
        p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)  # [V]
        p_right, p_wrong = p_right + p[right].item(), p_wrong + p[wrong].item()
    return p_right / len(rows), p_wrong / len(rows)


def main() -> None:
    cfg = parse_config(Config)
    tok = load_tokenizer(os.path.join(cfg.run_dir, "sft"))
    test = os.path.join(cfg.run_dir, "test.jsonl")
    varied = all(f" {w}" in tok.get_vocab() for words in prepare.REMARK_WORDS for w in words)  # prepare.py --varied
    rows = trap_prefixes([r["question"] for r in read_jsonl(test, required=("question",))], tok, varied, cfg.seed)
    if not rows:
        raise InputError(f"{test}: no question with a subtraction")
    right, wrong = tok.convert_tokens_to_ids("-"), tok.convert_tokens_to_ids(prepare.mistake("-"))
    result = {}
    print(f"| policy | P('-'), the right sign | P('+'), the planted mistake |  ({len(rows)} test questions)")
    print("|---|---|---|")
    for name in [p for p in cfg.policies.split(",") if p]:
        model = load_causal_lm(os.path.join(cfg.run_dir, name), torch.device("cpu")).eval()
        p_right, p_wrong = sign_probabilities(model, rows, right, wrong)
        result[name] = {"p_right": p_right, "p_mistake": p_wrong, "questions": len(rows)}
        print(f"| {name} | {p_right:.3f} | {p_wrong:.3f} |")
    write_json_atomic(os.path.join(cfg.run_dir, "planted_mistake.json"), result)
    print(f"wrote {os.path.join(cfg.run_dir, 'planted_mistake.json')}")


if __name__ == "__main__":
    run(main)
