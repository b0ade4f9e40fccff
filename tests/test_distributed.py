"""Ranks that finish early: the process-group timeout is a setting that reaches torch.distributed, and a run
torn down at its last collective (shards complete, no merge yet) is finished by a rerun that only merges."""
import datetime
import json
import shutil
import sys
import time

import pytest

from plumbing import cli, distributed, runfiles
import eval as eval_script
import rollout
from conftest import run_script

# rank 1 reaches the barrier 20 s after rank 0: with a 3-second timeout rank 0 gives up (torch's default waits).
LATE_RANK = """
import sys, time
sys.path.insert(0, ".")
import torch.distributed as dist
from plumbing.distributed import setup_distributed
if setup_distributed().rank == 1:
    time.sleep(20)
dist.barrier()
"""


def test_timeout_setting_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv(distributed.DIST_TIMEOUT_VARIABLE, raising=False)
    assert distributed.dist_timeout() == datetime.timedelta(minutes=180)
    monkeypatch.setenv(distributed.DIST_TIMEOUT_VARIABLE, "2.5")
    assert distributed.dist_timeout() == datetime.timedelta(minutes=2.5)
    for bad in ("0", "-3", "ten", "nan", "inf"):
        monkeypatch.setenv(distributed.DIST_TIMEOUT_VARIABLE, bad)
        with pytest.raises(cli.InputError, match=distributed.DIST_TIMEOUT_VARIABLE):
            distributed.dist_timeout()


def test_timeout_reaches_the_process_group(tmp_path):
    (tmp_path / "late_rank.py").write_text(LATE_RANK)
    start = time.time()
    proc = run_script("torchrun", "--standalone", "--nproc_per_node=2", str(tmp_path / "late_rank.py"),
                      env={distributed.DIST_TIMEOUT_VARIABLE: "0.05", "OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode != 0 and "Timed out waiting 3000ms" in proc.stderr, proc.stderr[-3000:]
    assert time.time() - start < 60


def never_generate(*args, **kwargs):
    raise AssertionError("a rerun over complete shards generated something")


def test_eval_rerun_after_a_tear_down_at_the_last_collective_only_merges(toy_dir, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", str(toy_dir / "sft"), "--data", str(toy_dir / "test.jsonl"),
                                      "--out_dir", str(out), "--max_questions", "5", "--k", "2",
                                      "--max_new_tokens", "30", "--questions_per_chunk", "2"])
    calls = []

    def barrier_that_times_out():  # the barrier after the shards, where a fast rank waits for the slowest
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("Timed out waiting for the other ranks")

    monkeypatch.setattr(eval_script, "barrier", barrier_that_times_out)
    with pytest.raises(RuntimeError, match="Timed out"):
        cli.run(eval_script.main)
    saved = [r for line in runfiles.read_shards(str(out)) for r in line["records"]]
    assert len(saved) == 5 and not (out / "summary.json").exists()  # the shard was complete before the collective

    monkeypatch.setattr(eval_script, "barrier", distributed.barrier)
    monkeypatch.setattr(eval_script, "generate", never_generate)
    cli.run(eval_script.main)
    assert [json.loads(line) for line in open(out / "responses.jsonl")] == saved
    assert json.load(open(out / "summary.json"))["num_questions"] == 5


def test_rollout_rerun_over_complete_shards_only_merges(toy_dir, toy_rollout, tmp_path, monkeypatch):
    out = tmp_path / "rollout"
    shutil.copytree(toy_rollout, out)  # the shards and settings of the toy_rollout fixture, as a tear-down leaves them
    for name in ("states.jsonl", "solutions.jsonl", "summary.json"):
        (out / name).unlink()
    monkeypatch.setattr(sys, "argv", ["rollout.py", "--model", str(toy_dir / "sft"),
                                      "--data", str(toy_dir / "train.jsonl"), "--out_dir", str(out),
                                      "--max_questions", "12", "--n1", "4", "--n_keep", "2", "--M", "4",
                                      "--max_new_tokens", "40", "--questions_per_chunk", "6"])
    monkeypatch.setattr(rollout, "generate", never_generate)
    cli.run(rollout.main)
    for name in ("states.jsonl", "solutions.jsonl"):
        assert (out / name).read_bytes() == (toy_rollout / name).read_bytes()
    assert json.load(open(out / "summary.json"))["tokens_this_run"] == 0
