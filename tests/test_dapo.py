"""dapo.py: the advantage (eq. 13), the loss (eq. 12) and its gradient, the training set, batching, bad input,
and actor training end to end on the toy task with the real critic (one process, two DDP processes, resume)."""
import json
import os
import re
import sys

import pytest
import torch

import critic as critic_lib
import dapo
from common import InputError, load_causal_lm, load_checkpoint, load_tokenizer
from conftest import run_script
from rollout import generate

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # a tiny model gains nothing from threads that fight over shared cores
TRAIN_FLAGS = ["--beta", "0.1", "--lr", "3e-4", "--epochs", "1", "--global_batch_actions", "48",
               "--micro_batch_actions", "16", "--min_gap", "0.1", "--log_every", "1"]


# ============================================================================= the objective
def test_compute_advantages_is_q_minus_mean_over_all_candidates():
    q = torch.tensor([1.0, 1.0, 0.0, 0.5])  # a duplicate candidate counts twice in the mean
    torch.testing.assert_close(dapo.compute_advantages(q), torch.tensor([0.375, 0.375, -0.625, -0.125]))
    q = torch.rand(5, 8, generator=torch.Generator().manual_seed(0))  # [states, M]
    a = dapo.compute_advantages(q)
    for s in range(5):
        torch.testing.assert_close(a[s], q[s] - q[s].sum() / 8)  # no std normalisation
    torch.testing.assert_close(a.sum(-1), torch.zeros(5))


def test_dapo_loss_value_and_gradient_match_eq_12():
    g = torch.Generator().manual_seed(0)
    logp = (-5 * torch.rand(7, generator=g)).requires_grad_(True)
    ref = -5 * torch.rand(7, generator=g)
    adv = torch.randn(7, generator=g)
    beta = 0.05
    loss = dapo.dapo_loss(logp, ref, adv, beta)
    residual = adv / beta - (logp.detach() - ref)  # A/beta - log(pi/pi_ref)
    assert loss.item() == pytest.approx(0.5 * (residual ** 2).sum().item() / 7, rel=1e-6)
    loss.backward()
    # d/d logp_i of 1/(2N) sum_j (A_j/beta - logp_j + ref_j)^2 = -(A_i/beta - logp_i + ref_i) / N
    torch.testing.assert_close(logp.grad, -residual / 7)
    # At log pi = log pi_ref + A/beta the loss is zero: no log Z, clipping or length normalisation.
    assert dapo.dapo_loss(ref + adv / beta, ref, adv, beta).item() == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError):
        dapo.dapo_loss(logp, ref[:3], adv, beta)


# ============================================================================= data
def state(ids, actions):
    return {"qid": "q", "state_ids": ids, "actions": [
        {"ids": a, "terminal": r is not None, "reward": r} for a, r in actions]}


def test_q_values_terminal_takes_reward_and_each_sequence_is_asked_once():
    states = [state([1, 2], [([3], None), ([3], None), ([4, 5], 1.0), ([6], None)]),
              state([1, 7], [([8, 9], 0.0), ([3], None)])]
    asked = []

    def fake_critic(sequences):
        asked.extend(map(tuple, sequences))
        return [0.1 * len(s) for s in sequences]

    q = dapo.q_values(states, fake_critic)
    assert q[0] == pytest.approx([0.3, 0.3, 1.0, 0.3]) and q[1] == pytest.approx([0.0, 0.3])
    assert sorted(asked) == sorted({(1, 2, 3), (1, 2, 6), (1, 7, 3)})  # never a terminal one, never twice


def test_rollout_q_is_the_completion_reward_and_copies_share_their_mean():
    # One state, M = 6: "3" drawn three times (completions right, wrong, right), "4 5" terminal and right,
    # "6" twice (both wrong). The MC label of the state is 3/6.
    s = state([1, 2], [([3], None), ([3], None), ([4, 5], 1.0), ([6], None), ([3], None), ([6], None)])
    for a, r in zip(s["actions"], [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]):
        a["completion_reward"] = r
    [q] = dapo.rollout_q_values([s])
    assert q == pytest.approx([2 / 3, 2 / 3, 1.0, 0.0, 2 / 3, 0.0])  # every copy of "3" gets the mean of its three
    advantages = dapo.compute_advantages(torch.tensor(q))
    assert torch.tensor(q).mean().item() == pytest.approx(0.5)  # the baseline is still the MC label
    # One advantage per unique candidate, whichever copy training_set meets first.
    [train] = dapo.training_set([s], [q], min_gap=0.1)
    assert train["actions"] == [[3], [4, 5], [6]]
    assert train["advantages"] == pytest.approx([advantages[0].item(), 0.5, -0.5])


def test_training_set_keeps_unique_candidates_of_states_with_a_gap():
    states = [state([1], [([2], None), ([2], None), ([2], None), ([3], None)]),  # Q 1,1,1,0
              state([1], [([2], None), ([3], None)]),  # equal Q: no gap
              state([1], [([2], None), ([3], None), ([], 0.0)])]  # an empty step: kept in the mean only
    q = [[1.0, 1.0, 1.0, 0.0], [0.5, 0.5], [1.0, 0.5, 0.0]]
    train = dapo.training_set(states, q, min_gap=0.1)
    assert [t["actions"] for t in train] == [[[2], [3]], [[2], [3]]]
    assert train[0]["advantages"] == pytest.approx([0.25, -0.75])  # mean over all 4, duplicates included
    assert train[1]["advantages"] == pytest.approx([0.5, 0.0])
    assert dapo.training_set(states, q, min_gap=1.1) == []


def test_batches_hold_whole_states_and_feed_every_rank():
    sizes = [3, 5, 2, 4, 1, 6, 2]
    assert dapo.pack([0, 1, 2, 3], sizes, 8) == [[0, 1], [2, 3]]
    assert dapo.pack([5, 1], sizes, 4) == [[5], [1]]  # a state larger than the limit goes alone
    batches = dapo.global_batches(sizes, 8, world_size=2, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(7))  # every state once per epoch
    assert all(len(b) >= 2 for b in batches)
    assert batches != dapo.global_batches(sizes, 8, world_size=2, seed=1)  # shuffled per epoch
    with pytest.raises(InputError):
        dapo.global_batches([3], 8, world_size=2, seed=0)


@pytest.mark.parametrize("line, message", [
    ('{"qid": "a", "state_ids": [1, 2], "actions": [{"ids": [3], "terminal": false}]}\n{"qid": "b", "state_ids": [1]',
     "line 2: not valid JSON"),
    ('{"qid": "a", "actions": []}', "line 1: missing field(s) state_ids"),
    ('{"qid": "a", "state_ids": [1], "actions": [{"ids": [3], "terminal": true, "reward": null}]}', "line 1: an action that ends"),
    ('{"qid": "a", "state_ids": [1], "actions": [{"ids": "3", "terminal": false}]}', "line 1: every action needs"),
    ('{"qid": "a", "state_ids": [], "actions": [{"ids": [3], "terminal": false}]}', "line 1: state_ids must be"),
    ("", "the file is empty"),
    ('{"qid": "a", "state_ids": [1], "actions": [{"ids": [3], "terminal": false}]}',
     "line 1: --q_source rollout needs"),
])
def test_read_states_rejects_bad_input(tmp_path, line, message):
    path = tmp_path / "states.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError, match=re.escape(message)) as e:
        dapo.read_states(str(path), completion_rewards="q_source" in message)
    assert str(path) in str(e.value)


# ============================================================================= actor training, end to end
@pytest.fixture(scope="module")
def toy_critic(toy_dir, toy_rollout, tmp_path_factory):
    """A real critic (critic.py) trained briefly on the tiny rollout."""
    out = tmp_path_factory.mktemp("critic") / "critic"
    run_script("critic.py", "--rollout_dir", str(toy_rollout), "--init", str(toy_dir / "sft"), "--out_dir", str(out),
               "--batch_size", "8", "--micro_batch_size", "8", "--lr", "1e-3", "--epochs", "1", "--heldout_fraction", "0",
               env=ONE_THREAD)
    return out


def train(toy_dir, toy_rollout, toy_critic, out_dir, *extra, torchrun=False):
    args = ["dapo.py", "--policy", str(toy_dir / "sft"), "--critic", str(toy_critic), "--rollout_dir", str(toy_rollout),
            "--out_dir", str(out_dir), *TRAIN_FLAGS, *extra]
    return run_script("torchrun", "--nproc_per_node=2", *args) if torchrun else run_script(*args, env=ONE_THREAD)


@pytest.fixture(scope="module")
def actor(toy_dir, toy_rollout, toy_critic, tmp_path_factory):
    out = tmp_path_factory.mktemp("dapo") / "actor"
    proc = train(toy_dir, toy_rollout, toy_critic, out)
    return out, proc


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def action_logp(model, state_ids, action_ids) -> float:
    """log pi(a|s) the plain way: one unpadded sequence, the full logits."""
    ids = torch.tensor([state_ids + action_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # [L-1, V]
    return logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][-len(action_ids):].sum().item()


def read_log(actor_dir):
    return [json.loads(line) for line in open(os.path.join(actor_dir, "train_log.jsonl"))]


def params(path):
    return load_causal_lm(str(path), torch.device("cpu")).state_dict()


def test_actor_is_a_policy_directory_with_metrics(actor, toy_dir):
    out, proc = actor
    assert "states:" in proc.stdout and "kept (advantage gap >= 0.1)" in proc.stdout
    tok = load_tokenizer(str(out))
    model = load_causal_lm(str(out), torch.device("cpu"))
    gen = generate(model, [tok("Start with 3. Add 4.\n").input_ids], eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                   max_new_tokens=5, temperature=0)
    assert len(gen[0].ids) > 0
    log = read_log(out)
    assert len(log) >= 2 and {"loss", "abs_log_ratio", "corr", "moved", "lr", "grad_norm"} <= set(log[0])
    assert log[0]["abs_log_ratio"] < 1e-4  # the first step sees pi = pi_ref
    summary = json.load(open(out / "train_summary.json"))
    assert f"states: {summary['states_kept']} of {summary['states']} kept" in proc.stdout
    assert 0 < summary["states_kept"] < summary["states"] and 0 < summary["actions_kept"] < summary["actions"]
    assert not os.path.exists(str(out) + ".work/checkpoint.pt")  # a finished run leaves no checkpoint


def test_cached_q_values_and_ref_logps_are_right(actor, toy_dir, toy_rollout, toy_critic):
    out, _ = actor
    prepared = load_checkpoint(str(out) + ".work/prepared.pt")
    states = dapo.read_states(str(toy_rollout / "states.jsonl"))
    critic = critic_lib.load_critic(str(toy_critic), torch.device("cpu"))
    terminal_differs = 0
    for s, q_s in zip(states, prepared["q_values"]):
        values = critic_lib.critic_values(critic, [s["state_ids"] + a["ids"] for a in s["actions"]])
        for a, q, v in zip(s["actions"], q_s, values):
            if a["terminal"]:
                assert q == a["reward"]  # Q = r: the critic's value of a finished solution is not used
                terminal_differs += abs(v - a["reward"]) > 1e-3
            else:
                assert q == pytest.approx(v, abs=1e-5)
    assert terminal_differs > 0  # so the check above could fail
    # log pi_ref, computed once in batches with left padding, equals the plain computation.
    policy = load_causal_lm(str(toy_dir / "sft"), torch.device("cpu"))
    pairs = [(t["state_ids"], a, r) for t in prepared["train"] for a, r in zip(t["actions"], t["ref_logp"])]
    assert len(pairs) > 10
    for s, a, cached in pairs[:: max(1, len(pairs) // 40)]:
        assert cached == pytest.approx(action_logp(policy, s, a), abs=1e-4)


def test_training_raises_positive_advantage_actions_over_negative(actor, toy_dir):
    out, _ = actor
    prepared = load_checkpoint(str(out) + ".work/prepared.pt")
    model = load_causal_lm(str(out), torch.device("cpu"))
    pairs = [(t["state_ids"], a) for t in prepared["train"] for a in t["actions"]]
    pad_id = load_tokenizer(str(out)).pad_token_id
    logp = dapo.reference_logps(model, pairs, 64, pad_id, desc=None)  # batched: checked against plain above
    ref = [r for t in prepared["train"] for r in t["ref_logp"]]
    advantages = [a for t in prepared["train"] for a in t["advantages"]]
    up = [lp - r for lp, r, a in zip(logp, ref, advantages) if a > 1e-6]
    down = [lp - r for lp, r, a in zip(logp, ref, advantages) if a < -1e-6]
    assert up and down
    assert sum(up) / len(up) - sum(down) / len(down) > 0.2
    # fit.jsonl holds the same log ratios after training, one line per training state, beside the advantages.
    fit = [json.loads(line) for line in open(out / "fit.jsonl")]
    assert [f["advantages"] for f in fit] == [t["advantages"] for t in prepared["train"]]
    assert [r for f in fit for r in f["log_ratios"]] == pytest.approx([lp - r for lp, r in zip(logp, ref)], abs=1e-4)
    after = json.load(open(out / "train_summary.json"))["after_training"]
    assert after["corr"] > 0 and after["loss"] < read_log(out)[0]["loss"]  # closer to A / beta than pi_ref was


def test_q_from_the_rollout_needs_no_critic(toy_dir, toy_rollout, tmp_path):
    out = tmp_path / "actor"
    # No critic exists: --q_source rollout must not look for one.
    train(toy_dir, toy_rollout, tmp_path / "no-critic", out, "--q_source", "rollout")
    prepared = load_checkpoint(str(out) + ".work/prepared.pt")
    states = dapo.read_states(str(toy_rollout / "states.jsonl"), completion_rewards=True)
    assert prepared["q_values"] == dapo.rollout_q_values(states)
    for s, q_s in zip(states, prepared["q_values"]):
        assert sum(q_s) == pytest.approx(sum(a["completion_reward"] for a in s["actions"]))  # baseline = MC label
        assert all(q == a["reward"] for a, q in zip(s["actions"], q_s) if a["terminal"])
    summary = json.load(open(out / "train_summary.json"))
    assert summary["config"]["q_source"] == "rollout" and summary["states_kept"] > 0
    assert sum(1 for _ in open(out / "fit.jsonl")) == summary["states_kept"]


def test_q_from_the_rollout_refuses_states_without_completion_rewards(toy_dir, tmp_path, monkeypatch):
    rollout = tmp_path / "rollout"
    rollout.mkdir()
    (rollout / "states.jsonl").write_text(json.dumps(state([1, 2], [([3], None), ([4], 1.0)])) + "\n")
    argv = ["--policy", str(toy_dir / "sft"), "--rollout_dir", str(rollout), "--out_dir", str(tmp_path / "actor"),
            "--q_source", "rollout"]
    monkeypatch.setattr(sys, "argv", ["dapo.py"] + argv)
    with pytest.raises(InputError, match=re.escape(f"{rollout / 'states.jsonl'} line 1: --q_source rollout needs")):
        dapo.main()
    assert not (tmp_path / "actor").exists() and not (tmp_path / "actor.work").exists()


def test_two_ddp_processes_equal_one(actor, toy_dir, toy_rollout, toy_critic, tmp_path):
    out, _ = actor
    # Activation checkpointing recomputes the same numbers: it may ride along.
    train(toy_dir, toy_rollout, toy_critic, tmp_path / "ddp", "--gradient_checkpointing", "true", torchrun=True)
    one, two, init = params(out), params(tmp_path / "ddp"), params(toy_dir / "sft")
    assert max((one[k] - init[k]).abs().max().item() for k in one) > 1e-4  # lr 3e-4, a few steps
    for k in one:  # float sums in another order, through Adam: a small fraction of one step
        torch.testing.assert_close(two[k], one[k], atol=3e-5, rtol=0)
    # Adam hides the scale of the gradient; the logged gradient norm (before clipping) and loss do not.
    log_one, log_two = (read_log(d) for d in (out, tmp_path / "ddp"))
    assert len(log_one) == len(log_two) >= 2
    for a, b in zip(log_one, log_two):
        for key in ("loss", "abs_log_ratio", "corr", "moved", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


def test_resume_after_a_kill_gives_the_same_actor(actor, toy_dir, toy_rollout, toy_critic, tmp_path):
    out, _ = actor
    proc = train(toy_dir, toy_rollout, toy_critic, tmp_path / "actor", "--stop_after", "1")
    assert "stopped after step 1" in proc.stdout
    assert not (tmp_path / "actor").exists() and (tmp_path / "actor.work" / "checkpoint.pt").exists()
    proc = train(toy_dir, toy_rollout, toy_critic, tmp_path / "actor")
    assert "reusing Q values" in proc.stdout and "resuming from" in proc.stdout
    one, resumed = params(out), params(tmp_path / "actor")
    for k in one:
        torch.testing.assert_close(resumed[k], one[k], atol=1e-6, rtol=0)


def test_bad_input_stops_with_one_line_and_writes_nothing(toy_dir, toy_rollout, toy_critic, tmp_path):
    bad = tmp_path / "rollout"
    bad.mkdir()
    lines = open(toy_rollout / "states.jsonl").read().splitlines()
    (bad / "states.jsonl").write_text(lines[0] + "\n" + lines[1][:-5] + "\n")
    proc = run_script("dapo.py", "--policy", str(toy_dir / "sft"), "--critic", str(toy_critic), "--rollout_dir", str(bad),
                      "--out_dir", str(tmp_path / "actor"), check=False, env=ONE_THREAD)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {bad / 'states.jsonl'} line 2")
    assert sorted(os.listdir(tmp_path)) == ["rollout"]


@pytest.mark.parametrize("what", ["critic", "policy", "beta"])
def test_bad_paths_and_settings_raise_input_error(toy_dir, toy_rollout, toy_critic, tmp_path, monkeypatch, what):
    argv = {"policy": str(toy_dir / "sft"), "critic": str(toy_critic), "rollout_dir": str(toy_rollout),
            "out_dir": str(tmp_path / "actor"), "beta": "0.1"}
    argv[what] = "0" if what == "beta" else str(tmp_path / "missing")
    monkeypatch.setattr(sys, "argv", ["dapo.py"] + [x for k, v in argv.items() for x in (f"--{k}", v)])
    with pytest.raises(InputError, match="beta" if what == "beta" else "missing"):
        dapo.main()
    assert not (tmp_path / "actor").exists() and not (tmp_path / "actor.work").exists()
