"""data/toy/advantage_quality.py: the true advantage and its standard error, the figures, and a tiny run end to end."""
import importlib.util
import json
import math
import os
import sys

import pytest

from conftest import ROOT, run_script

spec = importlib.util.spec_from_file_location("toy_advantage_quality",
                                              os.path.join(ROOT, "data", "toy", "advantage_quality.py"))
aq = sys.modules["toy_advantage_quality"] = importlib.util.module_from_spec(spec)  # dataclasses need it registered
spec.loader.exec_module(aq)


def test_true_advantage_is_eq13_over_the_copies_with_its_standard_error():
    # M = 4: candidate [5] drawn twice (Q 0.5 +- 0.1), [6] once (Q 1, terminal, exact), [7] once (Q 0.25 +- 0.2).
    state = {"actions": [{"ids": [5]}, {"ids": [6]}, {"ids": [5]}, {"ids": [7]}]}
    record = {"candidates": [{"ids": [5], "count": 2, "true_q": 0.5, "se": 0.1},
                             {"ids": [6], "count": 1, "true_q": 1.0, "se": 0.0},
                             {"ids": [7], "count": 1, "true_q": 0.25, "se": 0.2}]}
    adv, se = aq.true_advantages(state, record)
    baseline = (0.5 * 2 + 1.0 + 0.25) / 4
    assert adv == pytest.approx([0.5 - baseline, 1.0 - baseline, 0.5 - baseline, 0.25 - baseline])
    # A_[5] = (1 - 2/4) Q_5 - 1/4 Q_6 - 1/4 Q_7; A_[6] = -2/4 Q_5 + (1 - 1/4) Q_6 - 1/4 Q_7
    assert se[0] == se[2] == pytest.approx(math.sqrt(0.5 ** 2 * 0.01 + 0.25 ** 2 * 0.04))
    assert se[1] == pytest.approx(math.sqrt(0.5 ** 2 * 0.01 + 0.25 ** 2 * 0.04))
    assert se[3] == pytest.approx(math.sqrt(0.5 ** 2 * 0.01 + 0.75 ** 2 * 0.04))


def test_agreement_figures():
    truth, se = [0.5, -0.5, 0.01, -0.2], [0.1, 0.1, 0.1, 0.0]
    m = aq.agreement(truth, se, [0.4, 0.3, -0.3, -0.1])
    assert m["mse"] == pytest.approx((0.01 + 0.64 + 0.0961 + 0.01) / 4)
    assert m["clear"] == 3  # 0.01 is within 2 SE of zero
    assert m["sign_agreement"] == pytest.approx(2 / 3) and m["opposite_sign"] == pytest.approx(1 / 3)  # -0.5 as +0.3
    assert aq.agreement(truth, se, truth)["pearson_r"] == pytest.approx(1.0)
    zero = aq.agreement(truth, se, [0.0] * 4)
    assert zero["sign_agreement"] == zero["opposite_sign"] == 0  # a zero estimate has no sign
    assert (m["large"], m["large_missed"]) == (0, 0)  # no |A| > 0.5
    big = aq.agreement([0.6, -0.8, 0.7, 0.1], se, [0.1, -0.5, -0.15, 0.0])
    assert (big["large"], big["large_missed"]) == (3, 2)  # 0.1 and -0.15 are within 0.15 of 0; 0.1's truth is small


def test_per_candidate_keeps_one_value_per_unique_nonempty_candidate():
    states = [{"actions": [{"ids": [1]}, {"ids": []}, {"ids": [1]}, {"ids": [2]}]}]
    assert aq.per_candidate(states, [[0.1, 0.9, 0.3, 0.5]]) == pytest.approx([0.2, 0.5])
    u = aq.uniqueness(states)
    assert u["mean_unique_share"] == 0.75 and u["states_at_least_90pct_unique"] == 0


def test_tiny_run_end_to_end(toy_dir, toy_rollout, tmp_path):
    critic_dir = tmp_path / "critic"
    run_script("critic.py", "--rollout_dir", str(toy_rollout), "--init", str(toy_dir / "sft"), "--out_dir",
               str(critic_dir), "--epochs", "1", "--batch_size", "8", "--micro_batch_size", "8",
               "--heldout_fraction", "0.2")
    out = tmp_path / "aq"
    args = ["data/toy/advantage_quality.py", "--rollout_dir", str(toy_rollout), "--critic", str(critic_dir),
            "--policy", str(toy_dir / "sft"), "--data", str(toy_dir / "train.jsonl"), "--out_dir", str(out),
            "--num_states", "3", "--completions", "8", "--states_per_chunk", "2"]
    proc = run_script(*args)
    summary = json.loads((out / "summary.json").read_text())
    truth = [json.loads(line) for line in (out / "true_q.jsonl").read_text().splitlines()]
    assert summary["states_sampled"] == len(truth) == 3 and "| critic |" in proc.stdout
    for record in truth:
        assert len(record["candidates"]) >= 2  # only states whose candidates differ are sampled
        for c in record["candidates"]:
            assert c["k"] == (0 if c["terminal"] else 8) and 0 <= c["true_q"] <= 1
            assert c["se"] == pytest.approx(math.sqrt(c["true_q"] * (1 - c["true_q"]) / 8)) or c["terminal"]
    assert set(summary["estimators"]) == {"critic", "one rollout", "MC baseline"}
    assert "nothing to do" in run_script(*args).stdout  # a rerun over finished output does nothing
