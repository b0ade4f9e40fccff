"""Shared fixtures (a tiny toy task and a tiny rollout, built once per test session) and helpers."""
import os
import re
import subprocess
import sys

import pytest

# Tiny models: one thread per process is faster than two threads fighting over two cores (set before torch loads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_script(*args, env=None, check=True, timeout=600, cwd=ROOT):
    """Run `python <args>` (or torchrun when args[0] == 'torchrun') from the repository root."""
    cmd = (([sys.executable, "-m", "torch.distributed.run"] + list(args[1:])) if args[0] == "torchrun"
           else [sys.executable, *args])
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}"
                             f"\nstderr:\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """A toy task with a briefly warm-started tiny Llama: runs/toy layout (train.jsonl, test.jsonl, sft/)."""
    out = tmp_path_factory.mktemp("toy")
    run_script("data/toy/prepare.py", "--out_dir", str(out), "--num_train", "48", "--num_test", "24",
               "--sft_examples", "3072", "--sft_batch_size", "64")
    return out


@pytest.fixture(scope="session")
def toy_rollout(toy_dir, tmp_path_factory):
    """rollout.py on 12 toy questions with tiny settings: states.jsonl, solutions.jsonl, summary.json."""
    out = tmp_path_factory.mktemp("rollout")
    run_script("rollout.py", "--model", str(toy_dir / "sft"), "--data", str(toy_dir / "train.jsonl"),
               "--out_dir", str(out), "--max_questions", "12", "--n1", "4", "--n_keep", "2", "--M", "4",
               "--max_new_tokens", "40", "--questions_per_chunk", "6")
    return out


def held_per_rank(stdout: str) -> tuple[int, list[tuple[int, int, int]]]:
    """(parameters of the model, [(parameter, gradient, optimizer-state values) held by each rank]), read from the
    'held per rank' line that critic.py and dapo.py print after their first optimizer step."""
    line = next(line for line in stdout.splitlines() if "held per rank" in line)
    total = int(re.search(r"of ([\d,]+) parameters", line).group(1).replace(",", ""))
    ranks = re.findall(r"rank \d+ ([\d,]+) / ([\d,]+) / ([\d,]+)", line)
    return total, [tuple(int(x.replace(",", "")) for x in rank) for rank in ranks]


def assert_sharded_in_two(stdout: str) -> None:
    """Under FSDP with 2 ranks each holds about half of the parameters, of their gradients and of AdamW's state
    (two moments per parameter); together exactly the whole model."""
    total, ranks = held_per_rank(stdout)
    assert len(ranks) == 2 and sum(p for p, _, _ in ranks) == total
    for params, grads, state in ranks:
        assert 0.45 * total <= params <= 0.55 * total and grads == params and state == 2 * params, (total, ranks)


@pytest.fixture
def one_thread():
    """Tiny models on 2 cores: one torch thread per test process (restored afterwards)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_random_llama(vocab: int = 48, seed: int = 0):
    """A two-layer Llama with random weights, built in memory: a real transformers model and cache (so
    generate's preallocated cache, row copies and compaction all run) in a fraction of a second."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.5)  # large weights: clear argmax margins, greedy is well defined
    return LlamaForCausalLM(config).eval()
