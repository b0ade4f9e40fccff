"""data/toy/planted_mistake.py: the trap prefixes, P(sign) against its formula, and a run on the tiny toy."""
import importlib.util
import json
import math
import os
import random
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, run_script

spec = importlib.util.spec_from_file_location("toy_planted_mistake",
                                              os.path.join(ROOT, "data", "toy", "planted_mistake.py"))
pm = sys.modules["toy_planted_mistake"] = importlib.util.module_from_spec(spec)  # dataclasses need it registered
spec.loader.exec_module(pm)


def test_parse_question_inverts_the_question_text():
    rng = random.Random(0)
    pm.prepare.CFG = pm.prepare.Config()
    for _ in range(200):
        start, ops = pm.prepare.make_problem(rng)
        assert pm.parse_question(pm.prepare.question_text(start, ops)) == (start, ops)
    with pytest.raises(ValueError, match="not a toy question"):
        pm.parse_question("What is 2 + 2?")


class CharTok:
    """One id per character: enough to read the prefixes back."""
    def __call__(self, text):
        return SimpleNamespace(input_ids=[ord(c) for c in text])


def test_trap_prefix_is_the_right_solution_up_to_the_first_subtract_sign(monkeypatch):
    monkeypatch.setattr(pm, "build_prompt_ids", lambda tok, q: [])  # the solution part only
    questions = ["Start with 3. Add 2. Subtract 1. Subtract 2. Keep only the last digit after each step.",
                 "Start with 3. Add 2. Multiply by 3. Keep only the last digit after each step."]  # no subtraction
    rows = pm.trap_prefixes(questions, CharTok(), varied=False, seed=0)
    assert ["".join(map(chr, r)) for r in rows] == ["Add: 3+2=5\nSubtract: 5"]
    varied = "".join(map(chr, pm.trap_prefixes(questions[:1], CharTok(), varied=True, seed=0)[0]))
    first, rest = varied.split("\n")  # "Add: 3+2=5 <remark>", "Subtract: 5"
    assert first.startswith("Add: 3+2=5 ") and len(first.split()) == 4 and rest == "Subtract: 5"


def test_sign_probabilities_are_the_softmax_of_the_next_token_averaged_over_rows():
    class Fixed(torch.nn.Module):  # logits after the last token: its id picks one of two distributions
        def forward(self, input_ids):
            last = input_ids[0, -1].item()
            logits = torch.log(torch.tensor([0.7, 0.2, 0.1] if last == 0 else [0.1, 0.3, 0.6]))
            return SimpleNamespace(logits=logits.expand(1, input_ids.shape[1], 3))
    p_right, p_wrong = pm.sign_probabilities(Fixed(), [[2, 0], [1, 1], [0]], right=0, wrong=1)
    assert p_right == pytest.approx((0.7 + 0.1 + 0.7) / 3) and p_wrong == pytest.approx((0.2 + 0.3 + 0.2) / 3)


def test_run_on_the_tiny_toy(toy_dir):
    proc = run_script("data/toy/planted_mistake.py", "--run_dir", str(toy_dir), "--policies", "sft")
    result = json.loads((toy_dir / "planted_mistake.json").read_text())
    with_subtraction = sum("Subtract" in json.loads(line)["question"] for line in open(toy_dir / "test.jsonl"))
    assert result["sft"]["questions"] == with_subtraction > 0
    assert 0 < result["sft"]["p_right"] + result["sft"]["p_mistake"] <= 1 + 1e-6
    assert "| sft |" in proc.stdout and not math.isnan(result["sft"]["p_right"])
