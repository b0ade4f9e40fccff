"""The CUDA paths on one GPU, skipped without one: the generation engine on the GPU (fp32 and the bf16 that
rollout.py and eval.py load models in), the shared-prefix log-probs under bf16 autocast, every script end to end
on the GPU, FSDP2's bf16 mixed precision with one rank, and --engine vllm (when vllm is installed). NCCL between
two ranks and FSDP over two GPUs are in tests/test_fsdp.py (they need two GPUs). Run them all with
`python -m pytest -q tests` on a GPU machine."""
import importlib.util
import json
import random

import pytest
import torch
from conftest import run_script, tiny_random_llama

import dapo
from plumbing.models import load_causal_lm
from plumbing.generation import generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_greedy_generation_on_the_gpu_matches_the_cpu():
    # Repeated prompts of different lengths: the GPU takes the same path (one prefill per distinct prompt, rows
    # copied, finished rows compacted) and, in fp32, the same tokens as the CPU.
    rng = random.Random(0)
    distinct = [[rng.randrange(2, 48) for _ in range(n)] for n in (3, 9, 5)]
    prompts = [distinct[i] for i in (0, 1, 0, 2, 1, 0)]
    kw = dict(eos_ids={1}, pad_id=0, max_new_tokens=12, temperature=0.0, batch_size=4, vocab_size=48)
    model = tiny_random_llama()
    cpu = generate(model, prompts, **kw)
    gpu = generate(model.to("cuda"), prompts, **kw)
    assert [g.ids for g in gpu] == [c.ids for c in cpu] and [g.finish for g in gpu] == [c.finish for c in cpu]


def test_bf16_sampling_on_the_gpu_stays_in_the_vocabulary():
    model = tiny_random_llama(vocab=56).to("cuda", torch.bfloat16)  # 8 embedding rows beyond a 48-token tokenizer
    g = torch.Generator("cuda").manual_seed(0)
    out = generate(model, [[5, 6, 7]] * 8 + [[9]] * 8, eos_ids={1}, pad_id=0, max_new_tokens=10, temperature=1.0,
                   top_p=0.9, generator=g, vocab_size=48)
    assert all(0 <= t < 48 for o in out for t in o.ids) and all(o.finish in ("eos", "length") for o in out)


def test_shared_prefix_log_probs_under_bf16_autocast_match_fp32():
    model = tiny_random_llama(seed=1)
    states = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13]]
    actions = [[[20, 21], [22], [23, 24, 25]], [[26, 27, 28, 29]], [[30], [31, 32]]]
    exact = dapo.action_logps(model, states, actions)  # [6] fp32 on the CPU
    model = model.to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logp = dapo.action_logps(model, states, actions)  # [6]
    assert logp.dtype == torch.float32  # log-softmax in fp32 whatever the compute dtype
    torch.testing.assert_close(logp.cpu(), exact, rtol=0.05, atol=0.1)
    logp.sum().backward()  # the gradient reaches every layer through the packed rows
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_every_script_runs_on_the_gpu(toy_dir, tmp_path):
    # One process: setup_distributed picks the GPU, rollout and eval load the policy in bf16, critic and dapo
    # train in fp32 under bf16 autocast.
    model, data = str(toy_dir / "sft"), str(toy_dir / "train.jsonl")
    run_script("rollout.py", "--model", model, "--data", data, "--out_dir", str(tmp_path / "rollout"),
               "--max_questions", "8", "--n1", "4", "--n_keep", "2", "--M", "4", "--max_new_tokens", "40")
    run_script("critic.py", "--rollout_dir", str(tmp_path / "rollout"), "--init", model, "--out_dir",
               str(tmp_path / "critic"), "--batch_size", "8", "--micro_batch_size", "4", "--lr", "1e-3",
               "--heldout_fraction", "0")
    run_script("dapo.py", "--policy", model, "--critic", str(tmp_path / "critic"), "--rollout_dir",
               str(tmp_path / "rollout"), "--out_dir", str(tmp_path / "actor"), "--beta", "0.3", "--lr", "1e-4",
               "--global_batch_actions", "64", "--micro_batch_actions", "16", "--min_gap", "0.0")
    run_script("eval.py", "--model", str(tmp_path / "actor"), "--data", str(toy_dir / "test.jsonl"), "--out_dir",
               str(tmp_path / "eval"), "--max_questions", "8", "--k", "2", "--max_new_tokens", "40")
    summary = json.load(open(tmp_path / "eval" / "summary.json"))
    assert 0.0 <= summary["greedy_acc"] <= 1.0 and summary["world_size"] == 1
    actor = load_causal_lm(str(tmp_path / "actor"), torch.device("cpu"))  # saved fp32, loads without a GPU
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in actor.parameters())


def test_fsdp_mixed_precision_with_one_rank(toy_dir, toy_rollout, tmp_path):
    # torchrun with one rank and --fsdp true: bf16 compute, fp32 master weights and reduction (the
    # MixedPrecisionPolicy of distributed.distribute), a sharded checkpoint, and a saved actor in fp32.
    critic = tmp_path / "critic"
    run_script("torchrun", "--nproc_per_node=1", "critic.py", "--rollout_dir", str(toy_rollout), "--init",
               str(toy_dir / "sft"), "--out_dir", str(critic), "--batch_size", "8", "--micro_batch_size", "4",
               "--lr", "1e-3", "--heldout_fraction", "0", "--fsdp", "true")
    args = ["torchrun", "--nproc_per_node=1", "dapo.py", "--policy", str(toy_dir / "sft"), "--critic", str(critic),
            "--rollout_dir", str(toy_rollout), "--out_dir", str(tmp_path / "actor"), "--beta", "0.1", "--lr", "3e-4",
            "--global_batch_actions", "32", "--micro_batch_actions", "8", "--min_gap", "0.0", "--fsdp", "true",
            "--gradient_checkpointing", "true"]
    run_script(*args, "--stop_after", "1")
    assert "resuming from" in run_script(*args).stdout
    actor = load_causal_lm(str(tmp_path / "actor"), torch.device("cpu"))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in actor.parameters())
    log = [json.loads(line) for line in open(tmp_path / "actor" / "train_log.jsonl")]
    assert len(log) >= 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in log)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (pip install vllm)")
def test_vllm_engine_on_the_gpu(toy_dir, tmp_path):
    # --engine vllm on the GPU (bf16, CUDA graphs, vLLM's own process): greedy tokens against the HF engine's in bf16
    # (bf16 rounding makes near-ties flip more often than fp32's: most, not all, prompts agree), then rollout.py
    # and eval.py end to end.
    from plumbing.distributed import Dist
    from plumbing.models import build_prompt_ids, load_tokenizer
    from plumbing.runfiles import read_jsonl
    from plumbing.vllm_engine import EngineConfig, load_policy, vllm_generate

    model_dir = str(toy_dir / "sft")
    tok = load_tokenizer(model_dir)
    prompts = [build_prompt_ids(tok, r["question"]) for r in read_jsonl(str(toy_dir / "test.jsonl"))]
    kw = dict(eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id, max_new_tokens=40, temperature=0.0,
              vocab_size=len(tok))
    hf = generate(load_causal_lm(model_dir, torch.device("cuda"), torch.bfloat16).eval(), prompts, **kw)
    engine = load_policy(EngineConfig(engine="vllm", gpu_memory_utilization=0.3), model_dir,
                         Dist(0, 1, 0, torch.device("cuda")), seed=0)
    vllm = vllm_generate(engine, prompts, **kw)
    assert sum(h.ids == v.ids for h, v in zip(hf, vllm)) >= 0.8 * len(prompts)
    engine.llm.llm_engine.engine_core.shutdown()
    run_script("rollout.py", "--engine", "vllm", "--gpu_memory_utilization", "0.3", "--model", model_dir, "--data",
               str(toy_dir / "train.jsonl"), "--out_dir", str(tmp_path / "rollout"), "--max_questions", "8", "--n1",
               "4", "--n_keep", "2", "--M", "4", "--max_new_tokens", "40")
    states = [json.loads(line) for line in open(tmp_path / "rollout" / "states.jsonl")]
    assert states and all(0 <= t < len(tok) for s in states for a in s["actions"] for t in a["ids"])
    run_script("eval.py", "--engine", "vllm", "--gpu_memory_utilization", "0.3", "--model", model_dir, "--data",
               str(toy_dir / "test.jsonl"), "--out_dir", str(tmp_path / "eval"), "--max_questions", "8", "--k", "2",
               "--max_new_tokens", "40")
    assert json.load(open(tmp_path / "eval" / "summary.json"))["config"]["engine"] == "vllm"
