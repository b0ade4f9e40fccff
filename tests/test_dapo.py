"""dapo.py: the advantage (eq. 13), the loss (eq. 12) and its gradient, the training set, batching, bad input,
and actor training end to end on the toy task with the real critic (one process, two DDP processes, two FSDP
ranks, resume)."""
import functools
import itertools
import json
import os
import re
import shutil
import sys

import pytest
import torch

import critic as critic_lib
import dapo
from plumbing.checkpoints import training_meta
from plumbing.cli import InputError, parse_config
from plumbing.models import load_causal_lm, load_tokenizer
from plumbing.trainer import paper_defaults_note
from conftest import assert_sharded_in_two, run_script
from plumbing.generation import generate

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # a tiny model gains nothing from threads that fight over shared cores
# The toy rollout kept 57 states of 4 actions on the machine of 2026-12-01: batches of 28 actions are 7 states, 8
# times, and then 1, so on two ranks the last batch leaves one rank without a state, and micro-batches of 12 (3
# states) leave the ranks with different numbers of micro-batches in the others. Another CPU samples another
# rollout, so train_args replaces the two batch sizes with ones that do the same on the data at hand (schedule).
TRAIN_FLAGS = ["--beta", "0.1", "--lr", "3e-4", "--epochs", "1", "--global_batch_actions", "28",
               "--micro_batch_actions", "12", "--min_gap", "0.1", "--log_every", "1"]
FSDP = ["--fsdp", "true", "--gradient_checkpointing", "true"]  # activation checkpointing recomputes the same numbers


def read_cache(out) -> dict:
    """dapo.py's cache of steps 1-4 (Q values, advantages, the training set, log pi_ref) beside the actor."""
    return torch.load(str(out) + ".work/" + dapo.CACHE, map_location="cpu", weights_only=False)


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


def test_q_values_terminal_takes_reward_and_each_state_is_asked_once():
    states = [state([1, 2], [([3], None), ([3], None), ([4, 5], 1.0), ([6], None)]),
              state([1, 7], [([8, 9], 0.0), ([3], None)]),
              state([1, 2], [([6], None), ([5, 5, 5], None)]),  # the first state again (another solution's s_0)
              state([4], [([1], 1.0)])]  # only a terminal candidate: the critic is not asked about it
    asked = []

    def fake_critic(pairs):
        asked.extend((tuple(s), tuple(map(tuple, actions))) for s, actions in pairs)
        return [[0.1 * (len(s) + len(a)) for a in actions] for s, actions in pairs]

    q = dapo.q_values(states, fake_critic)
    assert q[0] == pytest.approx([0.3, 0.3, 1.0, 0.3]) and q[1] == pytest.approx([0.0, 0.3])
    assert q[2] == pytest.approx([0.3, 0.5]) and q[3] == [1.0]
    # Each state once, with its distinct non-terminal candidates: never a terminal one, never twice.
    assert asked == [((1, 2), ((3,), (6,), (5, 5, 5))), ((1, 7), ((3,),))]


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


def test_training_set_keeps_a_gap_equal_to_min_gap():
    # Q values that are sums of powers of two: advantages and gaps are exact in binary floating point, so the
    # boundary is really at the boundary. Q 0.5, 0.25: advantages +-0.125, gap 0.25 (== min_gap: kept).
    # Q 0.5, 0.25 + 2^-10: gap 0.25 - 2^-10 (just below: dropped).
    states = [state([1], [([2], None), ([3], None)]), state([4], [([2], None), ([3], None)])]
    q = [[0.5, 0.25], [0.5, 0.25 + 2 ** -10]]
    train = dapo.training_set(states, q, min_gap=0.25)
    assert [t["state_ids"] for t in train] == [[1]] and train[0]["advantages"] == [0.125, -0.125]
    assert [t["state_ids"] for t in dapo.training_set(states, q, min_gap=0.25 - 2 ** -10)] == [[1], [4]]


def test_copies_of_a_candidate_share_one_advantage_whatever_their_order():
    # [2] drawn twice, its reward 1 once and 0 once (a code test that timed out the second time): Q 1, 0, 0.5.
    copies = [([2], 1.0), ([3], 0.0), ([2], 0.0), ([4], 0.5)]
    for order in (copies, copies[::-1]):
        [kept] = dapo.training_set([state([1], order)], [[r for _, r in order]], min_gap=0.1)
        advantage = dict(zip(map(tuple, kept["actions"]), kept["advantages"]))
        assert advantage == pytest.approx({(2,): 0.5 - 0.375, (3,): -0.375, (4,): 0.125})  # mean Q = 0.375


def test_batches_hold_whole_states_and_every_rank_runs_as_many_micro_batches():
    sizes = [3, 5, 2, 4, 1, 6, 2]
    assert dapo.pack([0, 1, 2, 3], sizes, 8) == [[0, 1], [2, 3]]
    assert dapo.pack([5, 1], sizes, 4) == [[5], [1]]  # a state larger than the limit goes alone
    batches = dapo.global_batches(sizes, 8, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(7))  # every state once per epoch
    assert batches != dapo.global_batches(sizes, 8, seed=1)  # shuffled per epoch
    # Ranks split a batch state by state; the one with fewer micro-batches, or no state, fills up with empty ones.
    assert [dapo.rank_micro_batches([0, 1, 2], sizes, 4, r, 2) for r in range(2)] == [[[0], [2]], [[1], []]]
    assert [dapo.rank_micro_batches([3], sizes, 4, r, 2) for r in range(2)] == [[[3]], [[]]]


@pytest.mark.parametrize("line, message", [
    ('{"qid": "a", "state_ids": [1, 2], "actions": [{"ids": [3], "terminal": false}]}\n{"qid": "b", "state_ids": [1]',
     "line 2: not valid JSON"),
    ('{"qid": "a", "actions": []}', "line 1: missing field(s) state_ids"),
    ('{"qid": "a", "state_ids": [1], "actions": [{"ids": [3], "terminal": true, "reward": null}]}',
     "line 1: an action that ends"),
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
               "--batch_size", "8", "--micro_batch_size", "8", "--lr", "1e-3", "--epochs", "1",
               "--heldout_fraction", "0", env=ONE_THREAD)
    return out


@functools.lru_cache
def schedule(rollout: str, critic: str) -> tuple[int, int]:
    """(--global_batch_actions, --micro_batch_actions) for which, on this rollout's training set (steps 1-3 with this
    critic), the last batch holds one state (fewer than 2 ranks) and the first leaves the 2 ranks with different
    numbers of micro-batches: the case the DDP and FSDP tests must cover. The largest such batches (fewest steps).
    Without a critic (a run with --q_source rollout), the training set of the rollout's own Q values."""
    states = dapo.read_states(os.path.join(rollout, "states.jsonl"), completion_rewards=True)
    if os.path.isdir(critic):
        model = critic_lib.load_critic(critic, torch.device("cpu"))
        q = dapo.q_values(states, lambda asked: critic_lib.action_values(model, asked))
    else:
        q = dapo.rollout_q_values(states)
    sizes = [len(s["actions"]) for s in dapo.training_set(states, q, 0.1)]
    for batch, micro in itertools.product(range(4 * (sum(sizes) // 4), 7, -4), (8, 12, 16)):
        batches = dapo.global_batches(sizes, batch, seed=0)
        split = [dapo.rank_micro_batches(batches[0], sizes, micro, r, 2) for r in range(2)]
        if len(batches) >= 2 and len(batches[-1]) == 1 and [] in split[1]:
            return batch, micro
    raise AssertionError(f"no batch sizes leave a rank without a state on this rollout: {sizes}")


def train_args(toy_dir, toy_rollout, toy_critic, out_dir, *extra):
    batch, micro = schedule(str(toy_rollout), str(toy_critic))
    return ["dapo.py", "--policy", str(toy_dir / "sft"), "--critic", str(toy_critic), "--rollout_dir", str(toy_rollout),
            "--out_dir", str(out_dir), *TRAIN_FLAGS, "--global_batch_actions", str(batch),
            "--micro_batch_actions", str(micro), *extra]


def train(toy_dir, toy_rollout, toy_critic, out_dir, *extra, torchrun=False):
    args = train_args(toy_dir, toy_rollout, toy_critic, out_dir, *extra)
    return run_script("torchrun", "--nproc_per_node=2", *args) if torchrun else run_script(*args, env=ONE_THREAD)


@pytest.fixture(scope="module")
def actor(toy_dir, toy_rollout, toy_critic, tmp_path_factory):
    out = tmp_path_factory.mktemp("dapo") / "actor"
    proc = train(toy_dir, toy_rollout, toy_critic, out)
    return out, proc


pytestmark = pytest.mark.usefixtures("one_thread")


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
    gen = generate(model, [tok("Start with 3. Add 4.\n").input_ids], eos_ids={tok.eos_token_id},
                   pad_id=tok.pad_token_id, max_new_tokens=5, temperature=0)
    assert len(gen[0].ids) > 0
    log = read_log(out)
    assert len(log) >= 2 and {"loss", "abs_log_ratio", "corr", "moved", "lr", "grad_norm"} <= set(log[0])
    assert log[0]["abs_log_ratio"] < 1e-4  # the first step sees pi = pi_ref
    summary = json.load(open(out / "train_summary.json"))
    assert f"states: {summary['states_kept']} of {summary['states']} kept" in proc.stdout
    assert 0 < summary["states_kept"] < summary["states"] and 0 < summary["actions_kept"] < summary["actions"]


def test_cached_q_values_and_ref_logps_are_right(actor, toy_dir, toy_rollout, toy_critic):
    out, _ = actor
    prepared = read_cache(out)
    states = dapo.read_states(str(toy_rollout / "states.jsonl"))
    critic = critic_lib.load_critic(str(toy_critic), torch.device("cpu"))
    terminal_differs = 0
    for s, q_s in zip(states, prepared["q_values"]):
        sequences = [s["state_ids"] + a["ids"] for a in s["actions"]]  # each pair alone: the plain computation
        values = [v for v, in critic_lib.values_at(critic, sequences, [[len(x) - 1] for x in sequences])]
        for a, q, v in zip(s["actions"], q_s, values):
            if a["terminal"]:
                assert q == a["reward"]  # Q = r: the critic's value of a finished solution is not used
                terminal_differs += abs(v - a["reward"]) > 1e-3
            else:
                assert q == pytest.approx(v, abs=1e-5)
    assert terminal_differs > 0  # so the check above could fail
    # log pi_ref, computed once in batches of shared-prefix rows, equals the plain computation.
    policy = load_causal_lm(str(toy_dir / "sft"), torch.device("cpu"))
    pairs = [(t["state_ids"], a, r) for t in prepared["train"] for a, r in zip(t["actions"], t["ref_logp"])]
    assert len(pairs) > 10
    for s, a, cached in pairs[:: max(1, len(pairs) // 40)]:
        assert cached == pytest.approx(action_logp(policy, s, a), abs=1e-4)


def test_training_raises_positive_advantage_actions_over_negative(actor, toy_dir):
    out, _ = actor
    prepared = read_cache(out)
    model = load_causal_lm(str(out), torch.device("cpu"))
    logp = [lp for s in dapo.reference_logps(model, prepared["train"], 64, desc=None) for lp in s]  # checked above
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
    # after_training is eq. 12's loss (and the correlation) over those log ratios, towards A / beta (beta 0.1).
    after = json.load(open(out / "train_summary.json"))["after_training"]
    pairs = [(r, a / 0.1) for f in fit for r, a in zip(f["log_ratios"], f["advantages"])]
    assert after["loss"] == pytest.approx(sum(0.5 * (t - r) ** 2 for r, t in pairs) / len(pairs), rel=1e-6)
    assert after["corr"] > 0


def test_q_from_the_rollout_needs_no_critic(toy_dir, toy_rollout, tmp_path):
    out = tmp_path / "actor"
    # No critic exists: --q_source rollout must not look for one.
    train(toy_dir, toy_rollout, tmp_path / "no-critic", out, "--q_source", "rollout")
    prepared = read_cache(out)
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


def assert_same_training(one_dir, two_dir, init_dir):
    """The same actor and the same metrics at every optimizer step (as many steps, at the same learning rates)."""
    one, two, init = params(one_dir), params(two_dir), params(init_dir)
    assert max((one[k] - init[k]).abs().max().item() for k in one) > 1e-4  # lr 3e-4, a few steps
    for k in one:  # float sums in another order, through Adam: a small fraction of one step
        torch.testing.assert_close(two[k], one[k], atol=3e-5, rtol=0)
    # Adam hides the scale of the gradient; the logged gradient norm (before clipping) and loss do not.
    log_one, log_two = read_log(one_dir), read_log(two_dir)
    assert len(log_one) == len(log_two) >= 2
    for a, b in zip(log_one, log_two):
        for key in ("lr", "loss", "abs_log_ratio", "corr", "moved", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


def test_schedule_premise(actor, toy_rollout, toy_critic):
    """The batches the actor trained with (train_args): the last holds a single state (fewer than 2 ranks), the first
    leaves rank 1 an empty micro-batch; one optimizer step per batch."""
    out, _ = actor
    sizes = [len(t["actions"]) for t in read_cache(out)["train"]]  # the training set dapo.py itself made
    batch, micro = schedule(str(toy_rollout), str(toy_critic))
    batches = dapo.global_batches(sizes, batch, seed=0)
    assert len(batches[-1]) == 1 and len(read_log(out)) == len(batches) >= 2
    micro = [dapo.rank_micro_batches(batches[0], sizes, micro, r, 2) for r in range(2)]
    assert len(micro[0]) == len(micro[1]) and [] in micro[1]  # rank 1 pads with an empty micro-batch


def test_two_ddp_processes_equal_one_even_when_a_batch_has_fewer_states_than_ranks(actor, toy_dir, toy_rollout,
                                                                                    toy_critic, tmp_path):
    out, _ = actor
    train(toy_dir, toy_rollout, toy_critic, tmp_path / "ddp", "--gradient_checkpointing", "true", torchrun=True)
    assert_same_training(out, tmp_path / "ddp", toy_dir / "sft")


@pytest.fixture(scope="module")
def fsdp_actor(toy_dir, toy_rollout, toy_critic, tmp_path_factory):
    out = tmp_path_factory.mktemp("dapo") / "fsdp"
    proc = train(toy_dir, toy_rollout, toy_critic, out, *FSDP, torchrun=True)
    return out, proc


def test_fsdp_two_ranks_equal_one_process(actor, fsdp_actor, toy_dir):
    out, _ = actor
    fsdp_out, proc = fsdp_actor
    assert_sharded_in_two(proc.stdout)
    assert_same_training(out, fsdp_out, toy_dir / "sft")  # the saved actor loads in one process, without FSDP
    assert json.load(open(fsdp_out / "config.json"))["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_one_row_per_pair_on_two_ranks_equals_packed_rows_in_one_process(actor, toy_dir, toy_rollout, toy_critic,
                                                                         tmp_path, sharding):
    """--packing off (dapo.pair_logps, one row per (state, action)) under DDP and FSDP: the ranks' passes differ in
    number (pairs of one length share one), so repeats that count zero even them out; the actor equals the packed
    rows' in one process."""
    out, _ = actor
    train(toy_dir, toy_rollout, toy_critic, tmp_path / sharding, "--packing", "off",
          *(FSDP if sharding == "fsdp" else []), torchrun=True)
    assert_same_training(out, tmp_path / sharding, toy_dir / "sft")


def test_resume_after_a_kill_gives_the_same_actor(actor, toy_dir, toy_rollout, toy_critic, tmp_path):
    out, _ = actor
    proc = train(toy_dir, toy_rollout, toy_critic, tmp_path / "actor", "--stop_after", "1")
    assert "stopped after step 1" in proc.stdout
    assert not (tmp_path / "actor").exists() and training_meta(str(tmp_path / "actor.work" / "checkpoint"))["step"] == 1
    proc = train(toy_dir, toy_rollout, toy_critic, tmp_path / "actor")
    assert "reusing Q values" in proc.stdout and "resuming from" in proc.stdout
    one, resumed = params(out), params(tmp_path / "actor")
    for k in one:
        torch.testing.assert_close(resumed[k], one[k], atol=1e-6, rtol=0)
    assert not (tmp_path / "actor.work" / "checkpoint").exists()  # a finished run leaves no checkpoint


def test_fsdp_resume_after_a_kill_gives_the_same_actor(fsdp_actor, toy_dir, toy_rollout, toy_critic, tmp_path):
    proc = train(toy_dir, toy_rollout, toy_critic, tmp_path / "actor", *FSDP, "--stop_after", "1", torchrun=True)
    assert "stopped after step 1" in proc.stdout
    ckpt = tmp_path / "actor.work" / "checkpoint"
    assert not (tmp_path / "actor").exists() and training_meta(str(ckpt))["step"] == 1
    shards = sorted(f for f in os.listdir(ckpt) if f.endswith(".distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # one shard file per rank
    proc = train(toy_dir, toy_rollout, toy_critic, tmp_path / "actor", *FSDP, torchrun=True)
    assert "resuming from" in proc.stdout
    one, resumed = params(fsdp_actor[0]), params(tmp_path / "actor")
    for k in one:
        torch.testing.assert_close(resumed[k], one[k], atol=1e-6, rtol=0)
    assert not ckpt.exists()


def test_rerun_over_finished_or_unfinished_output(actor, toy_dir, toy_rollout, toy_critic, tmp_path):
    out, _ = actor
    shutil.copytree(out, tmp_path / "actor")
    shutil.copytree(str(out) + ".work", tmp_path / "actor.work")
    old = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "actor").iterdir()}
    proc = train(toy_dir, toy_rollout, toy_critic, tmp_path / "actor", "--micro_batch_actions", "8")  # speed only
    assert "complete" in proc.stdout and "step 1" not in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "actor").iterdir()} == old
    args = (toy_dir, toy_rollout, toy_critic, tmp_path / "actor", "--beta", "0.2")
    proc = run_script(*train_args(*args), check=False, env=ONE_THREAD)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "finished" in lines[0] and "--beta 0.1 -> 0.2" in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "actor").iterdir()} == old
    proc = train(*args, "--overwrite", "true", "--stop_after", "1")  # redone, the inputs' cache kept
    assert "reusing Q values" in proc.stdout and "stopped after step 1" in proc.stdout
    assert not (tmp_path / "actor").exists()
    proc = run_script(*train_args(toy_dir, toy_rollout, toy_critic, tmp_path / "actor"), check=False, env=ONE_THREAD)
    lines = proc.stderr.strip().splitlines()  # unfinished work of --beta 0.2 is not resumed with --beta 0.1
    assert proc.returncode == 2 and len(lines) == 1 and "unfinished" in lines[0] and "--beta 0.2 -> 0.1" in lines[0]


def test_labels_that_teach_nothing_are_reported(toy_dir, toy_rollout, toy_critic, tmp_path):
    (tmp_path / "rollout").mkdir()
    with open(tmp_path / "rollout" / "states.jsonl", "w") as f:
        for line in open(toy_rollout / "states.jsonl"):
            f.write(json.dumps({**json.loads(line), "mc_value": 0.0}) + "\n")
    proc = train(toy_dir, tmp_path / "rollout", toy_critic, tmp_path / "actor", "--stop_after", "1", "--min_gap", "0")
    assert "warning: every MC label is 0" in proc.stderr and "critic's errors" in proc.stderr


def test_bad_input_stops_with_one_line_and_writes_nothing(toy_dir, toy_rollout, toy_critic, tmp_path):
    bad = tmp_path / "rollout"
    bad.mkdir()
    lines = open(toy_rollout / "states.jsonl").read().splitlines()
    (bad / "states.jsonl").write_text(lines[0] + "\n" + lines[1][:-5] + "\n")
    proc = run_script("dapo.py", "--policy", str(toy_dir / "sft"), "--critic", str(toy_critic),
                      "--rollout_dir", str(bad), "--out_dir", str(tmp_path / "actor"), check=False, env=ONE_THREAD)
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


# ============================================================================= dropout is off in training
@pytest.mark.parametrize("family, checkpointing", [("gpt2", "false"), ("opt", "true")])
def test_first_step_starts_at_pi_ref_with_dropout_in_the_config(family, checkpointing, tmp_path, monkeypatch):
    """A model whose config has dropout 0.1 (GPT-2: attention, residual and embedding; OPT: attention, hidden
    states, layer drop): log pi_ref comes from eval mode, the actor trains in train mode, and at theta = theta_ref
    eq. 12's log(pi / pi_ref) is still 0, with and without gradient checkpointing."""
    from test_models import tiny_model
    from test_rollout import word_tokenizer

    tok = word_tokenizer(list("abcdefghij"))
    policy = tiny_model(family, rate=0.1)
    policy.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    g = torch.Generator().manual_seed(0)
    states = [{"qid": str(i), "state_ids": torch.randint(3, len(tok), (6,), generator=g).tolist(),
               "actions": [{"ids": torch.randint(3, len(tok), (3,), generator=g).tolist(), "terminal": False,
                            "completion_reward": float(j % 2)} for j in range(4)]} for i in range(4)]
    (tmp_path / "rollout").mkdir()
    (tmp_path / "rollout" / "states.jsonl").write_text("".join(json.dumps(s) + "\n" for s in states))
    # Premise: the model's training forward, dropout on, is far from log pi_ref.
    batch = ([s["state_ids"] for s in states], [[a["ids"] for a in s["actions"]] for s in states])
    with torch.no_grad():
        ref = dapo.action_logps(policy.eval(), *batch)  # [16]
        noisy = dapo.action_logps(policy.train(), *batch)  # [16]
    assert (noisy - ref).abs().mean() > 1e-2
    argv = ["--policy", str(tmp_path / "policy"), "--rollout_dir", str(tmp_path / "rollout"), "--q_source", "rollout",
            "--out_dir", str(tmp_path / "actor"), "--beta", "0.1", "--lr", "1e-3", "--global_batch_actions", "8",
            "--micro_batch_actions", "4", "--gradient_checkpointing", checkpointing]
    monkeypatch.setattr(sys, "argv", ["dapo.py"] + argv)
    dapo.main()
    first, second = read_log(tmp_path / "actor")
    assert first["abs_log_ratio"] < 1e-5  # measured before the first update: pi = pi_ref
    assert second["abs_log_ratio"] > 1e-3  # the update moved it


def test_a_few_steps_at_the_paper_lr_name_the_toy_flags_in_one_line(toy_dir, toy_rollout, toy_critic, tmp_path):
    """The defaults are the paper's 7-8B settings (2048 actions per step, lr 5e-7): on the toy one step that teaches
    nothing visible, and the run says which flags the toy takes; with those flags, silence."""
    proc = run_script("dapo.py", "--policy", str(toy_dir / "sft"), "--critic", str(toy_critic), "--rollout_dir",
                      str(toy_rollout), "--out_dir", str(tmp_path / "actor"), env=ONE_THREAD)
    notes = [line for line in proc.stdout.splitlines() if "the defaults are the paper's 7-8B settings" in line]
    assert notes == [f"dapo.py: 1 optimizer step at lr 5e-07: the defaults are the paper's 7-8B settings; the toy "
                     f"takes {dapo.TOY_FLAGS} (demo.sh)"], proc.stdout
    toy = parse_config(dapo.Config, dapo.TOY_FLAGS.split())
    assert paper_defaults_note("dapo.py", toy, 1, dapo.TOY_FLAGS) is None
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo.sh")) as f:
        assert f'DAPO="{dapo.TOY_FLAGS}"' in f.read()  # the flags named are the demo's

