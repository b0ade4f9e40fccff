"""critic.py: one pass == per-prefix passes, training lowers the loss, DDP == one process, FSDP == one process
(sharded in two, resumable), save/load, resume after a stop, warm start, held-out split by question, bad input."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

import critic as C
from plumbing.checkpoints import training_meta
from plumbing.cli import InputError, parse_config
from plumbing.models import load_tokenizer
from plumbing.trainer import paper_defaults_note
from conftest import assert_sharded_in_two, run_script

# 4 steps (2 per epoch) of 8 solutions in micro-batches of 2: 4 micro-steps in one process, 2 per rank in two.
TRAIN = ["--batch_size", "8", "--micro_batch_size", "2", "--epochs", "2", "--lr", "3e-3", "--warmup_fraction", "0",
         "--heldout_fraction", "0.2", "--log_every", "1"]
FSDP = ["--fsdp", "true", "--gradient_checkpointing", "true"]  # activation checkpointing recomputes the same numbers


def train_args(toy_dir, toy_rollout, out_dir, *extra):
    return ["critic.py", "--rollout_dir", str(toy_rollout), "--init", str(toy_dir / "sft"), "--out_dir", str(out_dir),
            *TRAIN, *extra]


def params(critic_dir):
    return {k: v.clone() for k, v in C.load_critic(str(critic_dir), "cpu").state_dict().items()}


def assert_same_params(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"parameters differ by up to {worst}"


def random_head_critic(toy_dir):
    """The toy policy's backbone with a random head, so values differ from state to state."""
    critic = C.Critic.from_backbone(str(toy_dir / "sft"), "cpu").eval()
    torch.nn.init.normal_(critic.value_head.weight, std=0.1, generator=torch.Generator().manual_seed(0))
    return critic


@pytest.fixture(scope="module")
def solutions(toy_rollout):
    return C.load_solutions(str(toy_rollout / "solutions.jsonl"))


@pytest.fixture(scope="module")
def reference_critic(toy_dir, toy_rollout, tmp_path_factory):
    """One process, the settings of TRAIN: the run that DDP, resume and warm start are compared with."""
    out = tmp_path_factory.mktemp("critic") / "ref"
    proc = run_script(*train_args(toy_dir, toy_rollout, out))
    assert "step 4/4" in proc.stdout
    return out


def test_one_pass_equals_prefix_passes(toy_dir, solutions):
    critic = random_head_critic(toy_dir)
    some = solutions[:6]
    one_pass = C.values_at(critic, [s["ids"] for s in some], [s["value_positions"] for s in some],
                           batch_size=6)  # padded
    with torch.no_grad():
        prefix_only = [[critic(torch.tensor([s["ids"][: p + 1]]), torch.ones(1, p + 1, dtype=torch.long))[0, -1].item()
                        for p in s["value_positions"]] for s in some]
    # Shared prefix: s_0 read once, each later state s_t = s_0 . (the steps after it) as one action of s_0.
    first = [s["value_positions"][0] + 1 for s in some]  # length of s_0
    asked = [(s["ids"][:n], [s["ids"][n: p + 1] for p in s["value_positions"]]) for s, n in zip(some, first)]
    batched = [v for vs in C.action_values(critic, asked, batch_actions=5) for v in vs]
    flat = [v for vs in prefix_only for v in vs]
    assert torch.tensor(flat).std() > 1e-3  # the values differ, so equal lists mean something
    assert sum(len(s["value_positions"]) for s in some) > len(some)  # several states per solution
    torch.testing.assert_close(torch.tensor([v for vs in one_pass for v in vs]), torch.tensor(flat), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(flat), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["mse", "bce"])
def test_training_lowers_the_loss(toy_dir, solutions, kind):
    torch.manual_seed(0)
    critic = C.Critic.from_backbone(str(toy_dir / "sft"), "cpu").train()
    ids, mask, rows, cols, labels, _ = C.collate(solutions[:8], "cpu")
    optimizer = torch.optim.AdamW(critic.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = C.critic_loss(critic(ids, mask, return_logits=True)[rows, cols], labels, kind).mean()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.8 * losses[0], losses


def test_critic_loss_is_the_paper_formula():
    logits, label = torch.tensor([0.3, -2.0]), torch.tensor([0.25, 1.0])
    v = torch.sigmoid(logits)
    torch.testing.assert_close(C.critic_loss(logits, label, "mse"), (v - label) ** 2)
    torch.testing.assert_close(C.critic_loss(logits, label, "bce"), -(label * v.log() + (1 - label) * (1 - v).log()))


def test_state_weights_count_every_distinct_state_once(tmp_path):
    # Question a: three solutions share s_0 = the prompt [1, 2]; two of them share s_1 = [1, 2, 3, 4].
    # Question b: the same token ids as a's first solution, but another question: nothing shared with a.
    rows = [("a", [1, 2, 3, 4, 5, 6, 7], [2, 4, 6], [0.5, 0.25, 1.0]), ("a", [1, 2, 3, 4, 8, 9], [2, 4], [0.5, 0.25]),
            ("a", [1, 2, 10, 11], [2, 3], [0.5, 0.0]), ("b", [1, 2, 3, 4, 5, 6, 7], [2, 4], [0.75, 1.0])]
    path = tmp_path / "solutions.jsonl"
    path.write_text("".join(json.dumps({"qid": q, "ids": ids, "step_ends": ends, "mc_values": v}) + "\n"
                            for q, ids, ends, v in rows))
    solutions = C.load_solutions(str(path))
    assert [s["weights"] for s in solutions] == [[1 / 3, 1 / 2, 1], [1 / 3, 1 / 2], [1 / 3, 1], [1, 1]]
    assert sum(w for s in solutions for w in s["weights"]) == 6  # a: 4 distinct states, b: 2
    *_, labels, weights = C.collate(solutions, "cpu")
    assert weights.tolist() == pytest.approx([1 / 3, 1 / 2, 1, 1 / 3, 1 / 2, 1 / 3, 1, 1, 1])
    assert labels.tolist() == [v for *_, vs in rows for v in vs]


def test_training_loss_is_the_mean_over_distinct_states(toy_dir, toy_rollout, solutions, tmp_path):
    # One step over every solution: the logged loss is that of the fresh critic, V = 0.5 everywhere (zero head).
    n = len(solutions)
    run_script("critic.py", "--rollout_dir", str(toy_rollout), "--init", str(toy_dir / "sft"),
               "--out_dir", str(tmp_path / "critic"), "--batch_size", str(n), "--micro_batch_size", str(n),
               "--heldout_fraction", "0")
    distinct = {(s["qid"], tuple(s["ids"][: p + 1])): v
                for s in solutions for p, v in zip(s["value_positions"], s["mc_values"])}
    assert len(distinct) < sum(len(s["mc_values"]) for s in solutions)  # shared states exist
    expected = sum((0.5 - v) ** 2 for v in distinct.values()) / len(distinct)
    logged = json.load(open(tmp_path / "critic" / "metrics.json"))["final_train_loss"]
    assert logged == pytest.approx(expected, rel=1e-5)


def test_ddp_two_processes_match_one(toy_dir, toy_rollout, reference_critic, tmp_path):
    out = tmp_path / "ddp"
    proc = run_script("torchrun", "--nproc_per_node=2", *train_args(toy_dir, toy_rollout, out))
    assert "2 rank(s)" in proc.stdout and proc.stdout.count("step 4/4") == 1  # rank 0 alone logs
    ref, ddp = params(reference_critic), params(out)
    fresh = C.Critic.from_backbone(str(toy_dir / "sft"), "cpu").state_dict()
    assert max((ref[k] - fresh[k]).abs().max().item() for k in ref) > 1e-3  # training moved the parameters
    assert_same_params(ddp, ref, atol=1e-5)


@pytest.fixture(scope="module")
def fsdp_critic(toy_dir, toy_rollout, tmp_path_factory):
    """TRAIN sharded over 2 ranks (gloo on the CPU)."""
    out = tmp_path_factory.mktemp("critic") / "fsdp"
    proc = run_script("torchrun", "--nproc_per_node=2", *train_args(toy_dir, toy_rollout, out, *FSDP))
    return out, proc


def test_fsdp_two_ranks_match_one_process(reference_critic, fsdp_critic):
    out, proc = fsdp_critic
    assert "2 rank(s)" in proc.stdout and proc.stdout.count("step 4/4") == 1
    assert_sharded_in_two(proc.stdout)
    # 4 steps of 2 micro-batches per rank, clipped (grad norm 1-2.4 > --grad_clip 1): the saved critic, full weights
    # loaded in one process without FSDP, is the one-process critic.
    assert_same_params(params(out), params(reference_critic), atol=1e-4)
    one, two = (json.load(open(d / "metrics.json")) for d in (reference_critic, out))
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-4)
    for key in ("mse", "pearson_r"):
        assert two["heldout"][key] == pytest.approx(one["heldout"][key], rel=1e-3, abs=1e-5), key
    assert json.load(open(out / "config.json"))["architectures"] == ["LlamaModel"]  # not FSDPLlamaModel


def test_fsdp_resume_after_a_stop_continues_from_the_sharded_checkpoint(toy_dir, toy_rollout, fsdp_critic, tmp_path):
    out = tmp_path / "critic"
    ckpt = str(out) + ".work/checkpoint"
    run_script("torchrun", "--nproc_per_node=2", *train_args(toy_dir, toy_rollout, out, *FSDP, "--stop_after", "2"))
    assert not out.exists() and training_meta(ckpt)["step"] == 2
    shards = sorted(f for f in os.listdir(ckpt) if f.endswith(".distcp"))
    sizes = [os.path.getsize(os.path.join(ckpt, f)) for f in shards]
    assert len(shards) == 2 and max(sizes) < 0.6 * sum(sizes)  # each rank wrote its own half: none gathered the model
    proc = run_script("torchrun", "--nproc_per_node=2", *train_args(toy_dir, toy_rollout, out, *FSDP))
    assert "resuming from step 2" in proc.stdout and "step 3/4" in proc.stdout and "step 1/4" not in proc.stdout
    assert_same_params(params(out), params(fsdp_critic[0]), atol=1e-6)
    assert not os.path.exists(ckpt)


def test_metrics_written(reference_critic, solutions):
    m = json.load(open(reference_critic / "metrics.json"))
    held = m["heldout"]
    assert held["questions"] == 3 and held["states"] == sum(row["states"] for row in held["calibration"])
    assert m["steps"] == 4
    # metrics.json holds the saved critic's held-out metrics (formulas: test_heldout_metrics_match_their_formulas)
    # Measured as the run measured them (its eval batch size: the same padding, so the same rounding).
    again = C.heldout_metrics(C.load_critic(str(reference_critic), "cpu"), C.split_by_question(solutions, 0.2)[1],
                              m["config"]["eval_batch_size"])
    assert held["states"] == again["states"] and held["mse"] == pytest.approx(again["mse"], rel=1e-5, abs=1e-9)
    assert held["pearson_r"] == pytest.approx(again["pearson_r"], rel=1e-5, abs=1e-9)
    assert not os.path.exists(str(reference_critic) + ".work")  # removed once the critic is complete


def test_resume_after_a_stop_continues_from_the_checkpoint(toy_dir, toy_rollout, reference_critic, tmp_path):
    out = tmp_path / "critic"
    ckpt = str(out) + ".work/checkpoint"
    run_script(*train_args(toy_dir, toy_rollout, out, "--stop_after", "2"))
    assert not out.exists() and training_meta(ckpt)["step"] == 2  # only the checkpoint is left
    changed = run_script(*train_args(toy_dir, toy_rollout, out, "--lr", "1e-3"), check=False)  # a different run
    assert changed.returncode == 2 and "other settings" in changed.stderr
    proc = run_script(*train_args(toy_dir, toy_rollout, out))
    assert "resuming from step 2" in proc.stdout and "step 3/4" in proc.stdout and "step 1/4" not in proc.stdout
    assert_same_params(params(out), params(reference_critic), atol=1e-6)
    assert not os.path.exists(ckpt)


def test_rerun_over_finished_output(toy_dir, toy_rollout, reference_critic, tmp_path):
    out = tmp_path / "critic"
    shutil.copytree(reference_critic, out)
    old = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = run_script(*train_args(toy_dir, toy_rollout, out, "--micro_batch_size", "4"))  # a speed setting may differ
    assert "complete" in proc.stdout and "step 1/4" not in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == old
    proc = run_script(*train_args(toy_dir, toy_rollout, out, "--lr", "1e-3"), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--lr 0.003 -> 0.001" in lines[0]
    assert "--overwrite true" in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == old
    proc = run_script(*train_args(toy_dir, toy_rollout, out, "--lr", "1e-3", "--overwrite", "true"))
    assert "step 4/4" in proc.stdout and json.load(open(out / "metrics.json"))["config"]["lr"] == 1e-3
    assert sorted(os.listdir(tmp_path)) == ["critic"]  # no checkpoint or settings file left beside it


def test_labels_that_teach_nothing_are_reported(toy_dir, toy_rollout, tmp_path):
    (tmp_path / "rollout").mkdir()
    with open(tmp_path / "rollout" / "solutions.jsonl", "w") as f:
        for line in open(toy_rollout / "solutions.jsonl"):
            record = json.loads(line)
            f.write(json.dumps({**record, "mc_values": [0.0] * len(record["mc_values"])}) + "\n")
    proc = run_script(*train_args(toy_dir, tmp_path / "rollout", tmp_path / "critic", "--stop_after", "1"))
    assert "warning: every MC label is 0" in proc.stderr and "constant" in proc.stderr


def test_warm_start_loads_the_previous_critic(toy_dir, toy_rollout, reference_critic, tmp_path):
    out = tmp_path / "warm"
    run_script(*train_args(toy_dir, toy_rollout, out, "--init_critic", str(reference_critic), "--lr", "0"))
    assert_same_params(params(out), params(reference_critic), atol=0)  # lr 0: the warm start itself


def test_save_load_round_trip(toy_dir, solutions, tmp_path):
    critic = random_head_critic(toy_dir)
    states = [s["ids"][: p + 1] for s in solutions[:4] for p in s["value_positions"]]
    C.save_critic(critic, load_tokenizer(str(toy_dir / "sft")), str(tmp_path / "c"))
    assert sorted(os.listdir(tmp_path)) == ["c"]  # the temporary directory is gone
    loaded = C.load_critic(str(tmp_path / "c"), "cpu")
    last = [[len(s) - 1] for s in states]
    assert C.values_at(loaded, states, last) == C.values_at(critic, states, last)


def test_heldout_split_is_by_question_and_deterministic():
    sols = [{"qid": f"q{i % 20}", "ids": [i]} for i in range(60)]
    train, held = C.split_by_question(sols, 0.2)
    assert len({s["qid"] for s in held}) == 4 and len(train) + len(held) == 60
    assert not {s["qid"] for s in train} & {s["qid"] for s in held}
    assert C.split_by_question(list(reversed(sols)), 0.2)[1] == list(reversed(held))  # order does not matter
    assert C.split_by_question(sols, 0.0) == (sols, [])


class TableCritic(torch.nn.Module):
    """A stub critic whose value at a position is a fixed number per token id: known predictions."""

    def __init__(self, value_of: dict[int, float]):
        super().__init__()
        table = torch.zeros(16)
        for token, v in value_of.items():
            table[token] = v
        self.table = torch.nn.Parameter(table, requires_grad=False)  # [V]

    def forward(self, ids, mask):
        return self.table[ids]  # [B, T]


def test_heldout_metrics_match_their_formulas():
    # Two questions; in "a" two solutions share the states [1] and [1, 2] (counted once); "b" also starts
    # with token 1, but its state is another question's, so it counts apart.
    heldout = [{"qid": "a", "ids": [1, 2, 3, 4], "value_positions": [0, 1, 2], "mc_values": [0.5, 0.75, 1.0]},
               {"qid": "a", "ids": [1, 2, 5, 6], "value_positions": [0, 1, 2], "mc_values": [0.5, 0.75, 0.0]},
               {"qid": "b", "ids": [1, 7, 8], "value_positions": [0, 1], "mc_values": [0.25, 0.0]}]
    value_of = {1: 0.5, 2: 0.625, 3: 0.875, 5: 0.25, 7: 0.125}  # V of a state = value of its last token
    # The states a:[1], a:[1 2], a:[1 2 3], a:[1 2 5], b:[1], b:[1 7]: predictions and labels.
    pred = np.array([0.5, 0.625, 0.875, 0.25, 0.5, 0.125])
    label = np.array([0.5, 0.75, 1.0, 0.0, 0.25, 0.0])
    m = C.heldout_metrics(TableCritic(value_of), heldout, batch_size=2)
    assert m["questions"] == 2 and m["states"] == 6
    assert m["mse"] == pytest.approx(np.mean((pred - label) ** 2), abs=1e-12)
    assert m["pearson_r"] == pytest.approx(np.corrcoef(pred, label)[0, 1], abs=1e-12)
    bins = np.minimum(np.floor(pred * 10), 9).astype(int)
    assert m["calibration"] == [
        {"bin": [b / 10, (b + 1) / 10], "states": int((bins == b).sum()),
         "mean_predicted": pytest.approx(pred[bins == b].mean(), abs=1e-12),
         "mean_label": pytest.approx(label[bins == b].mean(), abs=1e-12)} for b in sorted(set(bins.tolist()))]
    # Every prediction the same: Pearson r is undefined, reported as None.
    assert C.heldout_metrics(TableCritic(dict.fromkeys(value_of, 0.5)), heldout, batch_size=4)["pearson_r"] is None


GOOD = {"qid": "a", "prompt_len": 2, "ids": [5, 6, 7, 8], "text": "x", "correct": True, "step_ends": [2, 3],
        "mc_values": [0.5, 1.0]}


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    (json.dumps(GOOD) + "\n{not json\n", "line 2: not valid JSON"),
    (json.dumps({**GOOD, "mc_values": [0.5, 1.5]}), "line 1: MC labels must be numbers in [0, 1]"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "step_ends"}), "line 1: missing field(s) step_ends"),
    (json.dumps({**GOOD, "step_ends": [2, 9]}), "line 1: every step end"),
    (json.dumps({**GOOD, "mc_values": [0.5]}), "line 1: 'step_ends' and 'mc_values'"),
])
def test_bad_solutions_file(tmp_path, content, message):
    path = tmp_path / "solutions.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=re.escape(str(path))) as e:
        C.load_solutions(str(path))
    assert message in str(e.value)


def test_bad_input_from_the_command_line(toy_dir, tmp_path):
    (tmp_path / "rollout").mkdir()
    (tmp_path / "rollout" / "solutions.jsonl").write_text(json.dumps({**GOOD, "mc_values": [0.5, -0.1]}) + "\n")
    out = tmp_path / "critic"
    proc = run_script("critic.py", "--rollout_dir", str(tmp_path / "rollout"), "--init", str(toy_dir / "sft"),
                      "--out_dir", str(out), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "solutions.jsonl line 1" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["rollout"]  # nothing written
    with pytest.raises(InputError, match="not a critic directory"):
        C.load_critic(str(toy_dir / "sft"), "cpu")  # a policy directory has no value head


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_training_forward_is_the_queried_critic_with_dropout_in_the_config(tmp_path, monkeypatch, checkpointing):
    """A GPT-2 backbone with dropout 0.1 (attention, residual, embedding): the loss of critic.py's training
    forward (train mode) is the loss of the values it gives when queried (values_at: eval mode)."""
    import sys

    from transformers import AutoModel

    from test_models import tiny_model
    from test_rollout import word_tokenizer

    tok = word_tokenizer(list("abcdefghij"))
    warm = C.Critic(tiny_model("gpt2", rate=0.1, auto_class=AutoModel))
    torch.nn.init.normal_(warm.value_head.weight, generator=torch.Generator().manual_seed(0))  # V varies
    C.save_critic(warm, tok, str(tmp_path / "warm"))
    g = torch.Generator().manual_seed(0)
    rows = [{"qid": str(i // 2), "ids": torch.randint(3, len(tok), (12,), generator=g).tolist(),
             "step_ends": [4, 8, 12], "mc_values": [0.25, 0.5, 1.0]} for i in range(6)]
    (tmp_path / "rollout").mkdir()
    (tmp_path / "rollout" / "solutions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    solutions = C.load_solutions(str(tmp_path / "rollout" / "solutions.jsonl"))
    values = C.values_at(warm, [s["ids"] for s in solutions], [s["value_positions"] for s in solutions])
    terms = [(w, (v - label) ** 2) for s, vs in zip(solutions, values)
             for w, v, label in zip(s["weights"], vs, s["mc_values"])]
    queried = sum(w * t for w, t in terms) / sum(w for w, _ in terms)
    # One step over all solutions with lr 0: the logged loss is that of the training forward before any update.
    argv = ["--rollout_dir", str(tmp_path / "rollout"), "--init_critic", str(tmp_path / "warm"),
            "--out_dir", str(tmp_path / "critic"), "--batch_size", "6", "--micro_batch_size", "3", "--lr", "0",
            "--heldout_fraction", "0", "--gradient_checkpointing", checkpointing]
    monkeypatch.setattr(sys, "argv", ["critic.py"] + argv)
    C.main()
    trained = json.load(open(tmp_path / "critic" / "metrics.json"))["final_train_loss"]
    assert trained == pytest.approx(queried, rel=1e-5, abs=1e-7)
    # Premise: with its dropout on, the training forward gives other values.
    ids, mask = C.pad_right([s["ids"] for s in solutions], "cpu")  # [6, 12]
    with torch.no_grad():
        noisy = warm.train()(ids, mask)[:, [3, 7, 11]]  # [6, 3]
    assert (noisy - torch.tensor(values)).abs().max() > 1e-3


def test_a_few_steps_at_the_paper_lr_name_the_toy_flags_in_one_line(toy_dir, toy_rollout, tmp_path):
    """The defaults are the paper's 7-8B settings: on the toy they are refused (fewer solutions than a batch of 512)
    or take a few steps that teach nothing visible, and the run says which flags the toy takes; with those, silence."""
    args = ["critic.py", "--rollout_dir", str(toy_rollout), "--init", str(toy_dir / "sft")]
    proc = run_script(*args, "--out_dir", str(tmp_path / "defaults"), check=False)
    assert proc.returncode == 2 and f"the toy takes {C.TOY_FLAGS} (demo.sh)" in proc.stderr, proc.stderr
    proc = run_script(*args, "--out_dir", str(tmp_path / "few"), "--batch_size", "8", "--micro_batch_size", "8")
    notes = [line for line in proc.stdout.splitlines() if "the defaults are the paper's 7-8B settings" in line]
    assert len(notes) == 1 and re.fullmatch(r"critic\.py: \d optimizer steps? at lr 5e-06: the defaults are the "
                                            r"paper's 7-8B settings; the toy takes (.*) \(demo\.sh\)",
                                            notes[0]).group(1) == C.TOY_FLAGS, notes
    toy = parse_config(C.Config, C.TOY_FLAGS.split())
    assert paper_defaults_note("critic.py", toy, 1, C.TOY_FLAGS) is None
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo.sh")) as f:
        assert f'CRITIC="{C.TOY_FLAGS}"' in f.read()  # the flags named are the demo's

