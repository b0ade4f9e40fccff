"""tools/export_steps.py: rollout.py's MC-labelled solutions in TRL's stepwise-supervision format, one record per
kept solution, one label per step (the MC value after it), the steps' text the solution's own; datasets loads it."""
import json
import os

import pytest

from plumbing.models import load_tokenizer
from conftest import ROOT, run_script


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_the_exported_file_has_a_label_per_step_of_every_kept_solution(toy_dir, toy_rollout, tmp_path):
    out = tmp_path / "steps.jsonl"
    proc = run_script("tools/export_steps.py", "--rollout_dir", str(toy_rollout), "--out", str(out),
                      env={"OMP_NUM_THREADS": "1"})
    solutions, records = read(toy_rollout / "solutions.jsonl"), read(out)
    assert len(records) == len(solutions) > 0 and f"{len(records)} solutions" in proc.stdout
    tok = load_tokenizer(str(toy_dir / "sft"))
    for s, r in zip(solutions, records, strict=True):
        assert set(r) == {"prompt", "completions", "labels", "mc_values"}
        assert len(r["completions"]) == len(r["labels"]) == len(r["mc_values"]) == len(s["step_ends"])
        assert r["mc_values"] == [*s["mc_values"][1:], float(s["correct"])]  # V^(s_{t+1}); the last: the reward
        assert r["labels"] == [v > 0 for v in r["mc_values"]] and r["labels"][-1] == s["correct"]
        assert all(isinstance(label, bool) for label in r["labels"])
        # The steps, joined by the delimiter PRMTrainer puts back, are the solution's text.
        response = tok.decode(s["ids"][s["prompt_len"]:], skip_special_tokens=True)
        assert "\n".join(r["completions"]) == response.rstrip("\n")
        assert r["prompt"] == tok.decode(s["ids"][: s["prompt_len"]])
    majority = tmp_path / "majority.jsonl"
    run_script("tools/export_steps.py", "--rollout_dir", str(toy_rollout), "--out", str(majority), "--threshold", "0.5",
               env={"OMP_NUM_THREADS": "1"})
    assert [r["labels"] for r in read(majority)] == [[v > 0.5 for v in r["mc_values"]] for r in records]

    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("json", data_files=str(out), split="train")
    assert loaded.num_rows == len(solutions) and loaded.column_names[:3] == ["prompt", "completions", "labels"]
    assert [len(x) for x in loaded["labels"]] == [len(s["step_ends"]) for s in solutions]


def test_a_directory_that_is_not_a_finished_rollout_is_one_line(tmp_path):
    proc = run_script(os.path.join(ROOT, "tools", "export_steps.py"), "--rollout_dir", str(tmp_path), check=False)
    assert proc.returncode == 2 and proc.stderr == f"error: {tmp_path / 'summary.json'}: no such file: --rollout_dir " \
        "must be a finished rollout.py output directory\n"
