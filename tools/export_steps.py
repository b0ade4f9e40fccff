"""rollout.py's Monte-Carlo-labelled solutions in TRL's stepwise-supervision format, for a process reward model.

    python tools/export_steps.py --rollout_dir runs/toy/iter1/rollout        # -> its trl_steps.jsonl

One record per kept solution of solutions.jsonl (docs/formats.md), the columns TRL's PRMTrainer reads:
  prompt       the prompt the policy was given (its chat template included), as text
  completions  the solution's steps as text, each without its trailing delimiter (PRMTrainer's step_separator
               puts it back: give it the rollout's --delimiter, "\\n" by default)
  labels       one bool per step: the MC value of the prefix that ends with the step is above --threshold.
               The prefix after step t < T-1 is the state s_{t+1}, labelled V^(s_{t+1}) by rollout.py; the prefix
               after the last step is the whole solution, labelled by its reward. With --threshold 0 (the default)
               a step is good when some completion from it ends correct: Math-Shepherd's "hard" estimate.
               PRMTrainer reads labels as classes (int(label)), so a fraction cannot be given to it as such.
  mc_values    the same values before the threshold, floats in [0, 1] (PRMTrainer drops other columns)
The states' own labels are V^(s_t) with s_0 the prompt alone; that one labels no step and is not exported.
A JSONL file loads with datasets: load_dataset("json", data_files=...). Needs only the rollout's tokenizer.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing.cli import arg, InputError, parse_config, run  # noqa: E402
from plumbing.models import load_tokenizer  # noqa: E402
from plumbing.runfiles import read_jsonl, write_jsonl_atomic  # noqa: E402


@dataclasses.dataclass
class Config:
    rollout_dir: str = arg("runs/toy/iter1/rollout", "a finished rollout.py output directory")
    out: str = arg("", "the JSONL file written (empty: trl_steps.jsonl in --rollout_dir)")
    tokenizer: str = arg("", "decodes the token ids (empty: the rollout's --model, from its summary.json)")
    threshold: float = arg(0.0, "a step's label is True when the MC value after it is above this (0.5: a majority)")


def step_labels(solution: dict, threshold: float) -> tuple[list[float], list[bool]]:
    """(mc_values, labels) of the solution's steps: the value after step t is V^(s_{t+1}), after the last its reward."""
    after = [*solution["mc_values"][1:], float(solution["correct"])]
    return after, [value > threshold for value in after]


def stepwise_record(solution: dict, decode, delimiter: str, threshold: float) -> dict:
    ids, ends = solution["ids"], [*solution["step_ends"], len(solution["ids"])]
    steps = [decode(ids[start:end]) for start, end in zip(ends, ends[1:])]  # step t: ids[step_ends[t]:step_ends[t+1]]
    steps = [s[: -len(delimiter)] if delimiter and s.endswith(delimiter) else s for s in steps]
    mc_values, labels = step_labels(solution, threshold)
    return {"prompt": decode(ids[: solution["prompt_len"]], keep_special=True), "completions": steps,
            "labels": labels, "mc_values": mc_values}


def main():
    cfg = parse_config(Config)
    summary_path = os.path.join(cfg.rollout_dir, "summary.json")
    if not os.path.isfile(summary_path):
        raise InputError(f"{summary_path}: no such file: --rollout_dir must be a finished rollout.py output directory")
    with open(summary_path) as f:
        rollout_cfg = json.load(f)["config"]
    tok = load_tokenizer(cfg.tokenizer or rollout_cfg["model"])

    def decode(ids: list[int], keep_special: bool = False) -> str:
        return tok.decode(ids, skip_special_tokens=not keep_special)  # a response's EOS is not step text

    solutions = read_jsonl(os.path.join(cfg.rollout_dir, "solutions.jsonl"),
                           required=("ids", "prompt_len", "step_ends", "mc_values", "correct"))
    records = [stepwise_record(s, decode, rollout_cfg["delimiter"], cfg.threshold) for s in solutions]
    out = cfg.out or os.path.join(cfg.rollout_dir, "trl_steps.jsonl")
    write_jsonl_atomic(out, records)
    steps = sum(len(r["labels"]) for r in records)
    good = sum(sum(r["labels"]) for r in records)
    print(f"{len(records)} solutions, {steps} steps ({good} labelled good, MC value > {cfg.threshold}) -> {out}")


if __name__ == "__main__":
    run(main)
