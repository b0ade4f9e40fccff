"""FSDP plumbing shared by critic.py and dapo.py: a model that cannot be sharded stops before any work; the memory
table of tools/memory.py; and the CUDA path (NCCL, bf16 mixed precision), run only where 2 GPUs are present."""
import json
import os

import pytest
import torch

import critic as C
from plumbing.distributed import decoder_layers
from plumbing.models import load_causal_lm
from conftest import assert_sharded_in_two, run_script

# Runs critic.py or dapo.py in a process whose Llama classes declare no decoder layers, as an unknown
# architecture would: `cli.run` must turn the refusal into one line and exit status 2.
UNSHARDABLE = """
import sys
from transformers.models.llama import modeling_llama
modeling_llama.LlamaPreTrainedModel._no_split_modules = None
import {script}
from plumbing import cli
sys.argv = {argv!r}
cli.run({script}.main)
"""


def test_decoder_layers_are_found(toy_dir):
    model = load_causal_lm(str(toy_dir / "sft"), torch.device("cpu"))
    assert decoder_layers(model) == list(model.model.layers)
    critic = C.Critic.from_backbone(str(toy_dir / "sft"), "cpu")
    assert decoder_layers(critic) == list(critic.backbone.layers)
    assert decoder_layers(torch.nn.Linear(2, 2)) == []


@pytest.mark.parametrize("script", ["critic", "dapo"])
def test_a_model_without_decoder_layers_stops_before_any_work(toy_dir, toy_rollout, tmp_path, script):
    out = tmp_path / "out"
    argv = [f"{script}.py", "--rollout_dir", str(toy_rollout), "--out_dir", str(out), "--fsdp", "true"]
    if script == "critic":
        argv += ["--init", str(toy_dir / "sft"), "--batch_size", "8", "--micro_batch_size", "8"]
    else:
        (tmp_path / "critic").mkdir()  # never read: the refusal comes before the Q values
        argv += ["--policy", str(toy_dir / "sft"), "--critic", str(tmp_path / "critic")]
    proc = run_script("-c", UNSHARDABLE.format(script=script, argv=argv), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "cannot find the decoder layers" in last
    assert sorted(os.listdir(tmp_path)) == (["critic"] if script == "dapo" else [])  # nothing written


def test_memory_table_runs_and_counts_parameters_exactly(tmp_path):
    proc = run_script("tools/memory.py")
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert "| 0.49B |" in rows["Qwen2.5-0.5B actor"] and "| 7.62B |" in rows["Qwen2.5-Math-7B actor"]
    assert "| 8.03B |" in rows["Llama-3.1-8B actor"]  # the published sizes: 494M, 7.62B, 8.03B
    # 7B on 8 GPUs: DDP needs 16 bytes per parameter (+ buckets); FSDP shards them.
    _, _, n, one_gpu, ddp, _, fsdp, *_ = rows["Qwen2.5-Math-7B actor"].split("|")
    assert float(one_gpu) == pytest.approx(16 * 7.6155, rel=1e-3) and float(fsdp) < float(ddp) / 3
    config = tmp_path / "config.json"  # a transformers config.json works too
    config.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "num_key_value_heads": 4, "intermediate_size": 128, "vocab_size": 100}))
    assert "0.00B" in run_script("tools/memory.py", "--config", str(config), "--gpus", "2").stdout


# ============================================================================= CUDA: NCCL, bf16 mixed precision
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="FSDP on GPUs (NCCL, bf16 compute) needs 2 GPUs")


def relative_update_difference(one: dict, two: dict, init: dict) -> float:
    """|update_two - update_one| / |update_one| over all parameters: bf16 compute moves both runs alike, not
    identically, so the runs are compared through the size of their disagreement against the size of the update."""
    diff = sum(((two[k] - one[k]) ** 2).sum() for k in one) ** 0.5
    update = sum(((one[k] - init[k]) ** 2).sum() for k in one) ** 0.5
    return (diff / update).item()


@two_gpus
def test_critic_fsdp_on_two_gpus_matches_one_gpu(toy_dir, toy_rollout, tmp_path):
    args = ["critic.py", "--rollout_dir", str(toy_rollout), "--init", str(toy_dir / "sft"), "--batch_size", "8",
            "--micro_batch_size", "2", "--epochs", "2", "--lr", "3e-3", "--warmup_fraction", "0",
            "--heldout_fraction", "0.2"]
    run_script(*args, "--out_dir", str(tmp_path / "one"), env={"CUDA_VISIBLE_DEVICES": "0"})
    proc = run_script("torchrun", "--nproc_per_node=2", *args, "--out_dir", str(tmp_path / "fsdp"), "--fsdp", "true")
    assert_sharded_in_two(proc.stdout)
    one, two = (C.load_critic(str(tmp_path / d), "cpu").state_dict() for d in ("one", "fsdp"))
    assert all(v.dtype == torch.float32 for v in two.values())  # fp32 master weights are what is saved
    init = C.Critic.from_backbone(str(toy_dir / "sft"), "cpu").state_dict()
    assert relative_update_difference(one, two, init) < 0.1
    m1, m2 = (json.load(open(tmp_path / d / "metrics.json")) for d in ("one", "fsdp"))
    assert m2["final_train_loss"] == pytest.approx(m1["final_train_loss"], rel=0.05)


@two_gpus
def test_dapo_fsdp_on_two_gpus_matches_one_gpu_and_resumes(toy_dir, toy_rollout, tmp_path):
    critic = tmp_path / "critic"
    run_script("critic.py", "--rollout_dir", str(toy_rollout), "--init", str(toy_dir / "sft"), "--out_dir", str(critic),
               "--batch_size", "8", "--micro_batch_size", "8", "--lr", "1e-3", "--heldout_fraction", "0")
    args = ["dapo.py", "--policy", str(toy_dir / "sft"), "--critic", str(critic), "--rollout_dir", str(toy_rollout),
            "--beta", "0.1", "--lr", "3e-4", "--epochs", "2", "--global_batch_actions", "148",
            "--micro_batch_actions", "8", "--log_every", "1"]
    run_script(*args, "--out_dir", str(tmp_path / "one"), env={"CUDA_VISIBLE_DEVICES": "0"})
    fsdp = ["torchrun", "--nproc_per_node=2", *args, "--out_dir", str(tmp_path / "fsdp"), "--fsdp", "true",
            "--gradient_checkpointing", "true"]
    run_script(*fsdp, "--stop_after", "2")
    proc = run_script(*fsdp)
    assert "resuming from" in proc.stdout
    one, two, init = (load_causal_lm(str(d), torch.device("cpu")).state_dict()
                      for d in (tmp_path / "one", tmp_path / "fsdp", toy_dir / "sft"))
    assert all(v.dtype == torch.float32 for v in two.values())
    assert relative_update_difference(one, two, init) < 0.1
    logs = [[json.loads(line) for line in open(tmp_path / d / "train_log.jsonl")] for d in ("one", "fsdp")]
    assert len(logs[0]) == len(logs[1])
    assert logs[1][-1]["loss"] == pytest.approx(logs[0][-1]["loss"], rel=0.1)
