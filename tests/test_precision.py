"""One precision regime for stage B: Q and log pi_ref are computed by the model that is trained, as it computes in
training (--precision). Under bf16 autocast on the CPU (--precision bf16), which emulates a GPU run, log(pi / pi_ref)
at the first step (before any update) is the rounding of differently composed batches, far below what a log pi_ref
computed in another regime would give; and V leaves the critic in fp32 (its head and sigmoid never run in bf16),
one process or sharded by FSDP."""
import json
import os

import pytest
import torch

import critic as C
import dapo
from conftest import run_script

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
FLAGS = ["--beta", "0.3", "--lr", "1e-4", "--epochs", "1", "--global_batch_actions", "16", "--micro_batch_actions", "4",
         "--ref_batch_size", "64", "--precision", "bf16"]


@pytest.fixture(scope="module")
def toy_critic(toy_dir, toy_rollout, tmp_path_factory):
    out = tmp_path_factory.mktemp("critic") / "critic"
    run_script("critic.py", "--rollout_dir", str(toy_rollout), "--init", str(toy_dir / "sft"), "--out_dir", str(out),
               "--batch_size", "8", "--micro_batch_size", "8", "--lr", "1e-3", "--epochs", "2",
               "--heldout_fraction", "0", env=ONE_THREAD)
    return out


def regime_gap(toy_dir, toy_rollout, toy_critic) -> tuple[float, list[dict]]:
    """The mean |log pi| difference, over the training set's actions, between fp32 and bf16 autocast: the bias of
    a log pi_ref computed in one regime and compared with log pi_theta computed in the other."""
    states = dapo.read_states(os.path.join(toy_rollout, "states.jsonl"))
    critic = C.load_critic(str(toy_critic), torch.device("cpu"))
    train = dapo.training_set(states, dapo.q_values(states, lambda asked: C.action_values(critic, asked)), 0.1)
    model = dapo.load_causal_lm(str(toy_dir / "sft"), torch.device("cpu")).eval()
    args = ([s["state_ids"] for s in train], [s["actions"] for s in train])
    with torch.no_grad():
        fp32 = dapo.action_logps(model, *args)  # [N]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = dapo.action_logps(model, *args)  # [N]
    return (fp32 - bf16).abs().mean().item(), train


@pytest.mark.parametrize("fsdp", [False, True], ids=["one process", "fsdp on 2 ranks"])
def test_first_step_log_ratio_is_rounding_noise_under_bf16(toy_dir, toy_rollout, toy_critic, tmp_path, fsdp):
    gap, train = regime_gap(toy_dir, toy_rollout, toy_critic)
    assert len(train) >= 4 and gap > 2e-3  # bf16 moves log pi by this much: a mixed regime would show it
    out = tmp_path / "actor"
    args = ["dapo.py", "--policy", str(toy_dir / "sft"), "--critic", str(toy_critic), "--rollout_dir",
            str(toy_rollout), "--out_dir", str(out), *FLAGS]
    if fsdp:
        run_script("torchrun", "--nproc_per_node=2", *args, "--fsdp", "true")
    else:
        run_script(*args, env=ONE_THREAD)
    first = json.loads(open(out / "train_log.jsonl").readline())
    # Before any update only the composition of the batches differs between log pi_ref and log pi_theta (64 actions
    # per pass, then 4): in the same regime that is bf16 rounding of a few rows, not the regime's bias.
    print(f"first step's mean |log pi/pi_ref| {first['abs_log_ratio']:.3g}, fp32 vs bf16 {gap:.3g}")
    assert first["abs_log_ratio"] < gap / 5, (first["abs_log_ratio"], gap)
    assert first["moved"] == 0 and first["moved_threshold"] >= 1e-3
    # V from the critic's fp32 head and sigmoid: the Q values of non-terminal candidates are not bf16 numbers.
    cache = torch.load(str(out) + ".work/prepared.pt", weights_only=False)  # kept for reruns
    states = dapo.read_states(os.path.join(toy_rollout, "states.jsonl"))
    q = torch.tensor([v for s, qs in zip(states, cache["q_values"], strict=True) for a, v in zip(s["actions"], qs)
                      if not a["terminal"]])  # [non-terminal candidates]
    assert len(q) > 20 and (q == q.bfloat16().float()).float().mean() < 0.2


def test_the_value_head_runs_in_fp32_under_bf16_autocast(toy_critic):
    critic = C.load_critic(str(toy_critic), torch.device("cpu")).eval()
    ids = torch.randint(0, 100, (4, 24), generator=torch.Generator().manual_seed(0))  # [B, T]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        v = critic(ids, torch.ones_like(ids))  # [B, T]
        hidden = critic.backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state  # [B, T, H]
    assert v.dtype == torch.float32  # a head under autocast would give bf16 (its Linear and the sigmoid)
    w, b = critic.value_head.weight.double(), critic.value_head.bias.double()
    exact = torch.sigmoid(hidden.double() @ w.T + b).squeeze(-1)  # [B, T]
    assert (v.double() - exact).abs().max().item() < 1e-6
    assert len(set(v.flatten().tolist())) > 0.9 * v.numel()  # not the few hundred values of a bf16 sigmoid
