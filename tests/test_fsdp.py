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


# ============================================================================= CPU: loading straight into the shards
def build_llama(toy_dir, out, hidden: int, layers: int) -> int:
    """A Llama of the toy's vocabulary with `layers` layers of width `hidden`, random, saved in bf16 with the toy's
    tokenizer; also a critic directory (the same files and a zero value head). Its number of parameters."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(toy_dir / "sft")
    config.hidden_size, config.num_hidden_layers, config.intermediate_size = hidden, layers, 4 * hidden
    config.num_attention_heads = config.num_key_value_heads = hidden // 64
    config.head_dim = 64
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out / "policy")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy_dir / "sft" / name, out / "policy")
    shutil.copytree(out / "policy", out / "critic")
    torch.save({"weight": torch.zeros(1, hidden), "bias": torch.zeros(1)}, out / "critic" / C.HEAD_FILE)
    return sum(p.numel() for p in model.parameters())


def peak_before_training(script: str, model_dir, rollout, out) -> float:
    """The larger of the 2 ranks' peak anonymous memory (MB) from the start of `torchrun script --fsdp true` to
    the creation of its optimizer ($DAPO_PEAK_MEMORY_FILE); the run is stopped there. glibc is told to give every
    allocation of 128 kB or more pages of its own (its default threshold, kept fixed), returned when freed:
    otherwise its heap keeps freed blocks (a layer's shard, a gathered layer) and RssAnon counts memory the
    process no longer holds."""
    import signal
    import subprocess
    import sys
    import time

    args = ([f"{script}.py", "--rollout_dir", str(rollout), "--out_dir", str(out), "--fsdp", "true"]
            + (["--init", str(model_dir / "policy"), "--batch_size", "8", "--micro_batch_size", "4",
                "--heldout_fraction", "0"] if script == "critic" else
               ["--policy", str(model_dir / "policy"), "--critic", str(model_dir / "critic"), "--min_gap", "0"]))
    peak = str(out) + ".peak"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2 ** 17), "DAPO_PEAK_MEMORY_FILE": peak}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *args],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not all(os.path.exists(f"{peak}.{r}") for r in range(2)):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "no peak memory written in 10 minutes"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return max(json.load(open(f"{peak}.{r}"))["optimizer built"]["rss_anon_mb"] for r in range(2))


@pytest.mark.parametrize("script", ["critic", "dapo"])
def test_no_rank_holds_a_whole_model_while_loading(toy_dir, toy_rollout, tmp_path, script):
    """Under --fsdp with 2 ranks each rank's anonymous memory peaks, before training, at about its half of the fp32
    model: built on the meta device, sharded, then filled one checkpoint tensor at a time (dapo.py: the critic's
    shards for the Q values, freed, then the policy's). Measured above the same run on a model of 0.3M parameters.
    Loading a whole fp32 copy per rank, as before, gives more than 1.0 x the fp32 size."""
    rollout = tmp_path / "rollout"  # a few of the rollout's states and solutions: the memory is the models'
    rollout.mkdir()
    for name, n in (("solutions.jsonl", 8), ("states.jsonl", 6)):
        (rollout / name).write_text("".join(open(toy_rollout / name).readlines()[:n]))
    sizes = {}
    for tag, hidden, layers in (("small", 64, 2), ("large", 640, 32)):
        (tmp_path / tag).mkdir()
        parameters = build_llama(toy_dir, tmp_path / tag, hidden, layers)
        sizes[tag] = (parameters, peak_before_training(script, tmp_path / tag, rollout, tmp_path / f"{tag}-out"))
    (_, small), (parameters, large) = sizes["small"], sizes["large"]
    fp32_mb = 4 * parameters / 2 ** 20
    print(f"{script}.py --fsdp, 2 ranks, {parameters / 1e6:.0f}M parameters ({fp32_mb:.0f} MB in fp32): peak "
          f"RssAnon per rank {large:.0f} MB, {small:.0f} MB on a tiny model: {(large - small) / fp32_mb:.2f} x fp32")
    assert 150e6 < parameters < 400e6
    assert large - small < 0.7 * fp32_mb


SHARDED_LOADING = """
import sys
sys.path.insert(0, {root!r})
import torch
from transformers import AutoModelForCausalLM
import critic as C
from plumbing.distributed import cleanup_distributed, setup_distributed
from plumbing.models import load_causal_lm, load_sharded

ddp = setup_distributed()
ids = torch.tensor([[1, 5, 9, 2, 7, 7, 3, 11, 4, 6]])
for path in {policies!r}:
    whole, sharded = load_causal_lm(path, ddp.device), load_sharded(path, AutoModelForCausalLM, ddp)
    same = all(torch.equal(p.full_tensor(), whole.state_dict()[n]) for n, p in sharded.named_parameters())
    with torch.no_grad():
        gap = (sharded(input_ids=ids).logits - whole(input_ids=ids).logits).abs().max().item()
    print(f"rank {{ddp.rank}} {{path}}: shards equal {{same}}, logits {{gap}}", flush=True)
whole, sharded = C.load_critic({critic!r}, ddp.device), C.load_critic_for({critic!r}, ddp, fsdp=True)
with torch.no_grad():
    gap = (sharded(ids, torch.ones_like(ids)) - whole(ids, torch.ones_like(ids))).abs().max().item()
print(f"rank {{ddp.rank}} critic: values {{gap}}", flush=True)
cleanup_distributed()
"""


def test_sharded_loading_gives_the_whole_models_weights(toy_dir, tmp_path):
    """load_sharded's shards are the checkpoint's weights, bit for bit, and the sharded model computes what the whole
    one does: from safetensors (rank 0 reads each tensor and broadcasts it), from .bin weights (rank 0 loads the
    whole model once, the fallback a GGUF file also takes), and a critic from a critic directory (the backbone's
    names with their prefix, the value head beside)."""
    from safetensors.torch import load_file

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("config.json", "generation_config.json"):
        (bin_dir / name).write_text((toy_dir / "sft" / name).read_text())
    torch.save(load_file(str(toy_dir / "sft" / "model.safetensors")), bin_dir / "pytorch_model.bin")
    critic_dir = tmp_path / "critic"
    critic = C.Critic.from_backbone(str(toy_dir / "sft"), "cpu")
    torch.nn.init.normal_(critic.value_head.weight, std=0.1)
    C.save_critic(critic, C.load_tokenizer(str(toy_dir / "sft")), str(critic_dir))
    script = tmp_path / "load.py"
    script.write_text(SHARDED_LOADING.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                             policies=[str(toy_dir / "sft"), str(bin_dir)], critic=str(critic_dir)))
    out = run_script("torchrun", "--nproc_per_node=2", str(script)).stdout
    for rank in (0, 1):
        for path in (toy_dir / "sft", bin_dir):
            assert f"rank {rank} {path}: shards equal True, logits 0.0" in out, out
        assert f"rank {rank} critic: values 0.0" in out, out
    assert out.count("rank 0 loads the whole model once") == 1  # the .bin directory only, and on rank 0 only
