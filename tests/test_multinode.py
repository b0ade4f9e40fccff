"""Two nodes on one machine: two torchrun launches with --nnodes 2 and --node_rank 0 and 1, one gloo process each,
meeting at a rendezvous on localhost, as two machines that share --out_dir would. critic.py and dapo.py under
--fsdp true equal one process (dapo.py also stopped and resumed across the nodes); rollout.py and eval.py write
every question exactly once; a directory that some rank cannot see stops every rank with one line. And the
computed memory table of the 72B model on 2 and 4 nodes."""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

import critic as C
from conftest import ROOT, assert_sharded_in_two, run_script
from test_dapo import TRAIN_FLAGS as DAPO_FLAGS, assert_same_training

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
FSDP = ["--fsdp", "true", "--gradient_checkpointing", "true"]
# 4 steps (2 per epoch) of 8 solutions in micro-batches of 2: accumulation over 2 micro-batches per rank on 2 ranks.
CRITIC_FLAGS = ["--batch_size", "8", "--micro_batch_size", "2", "--epochs", "2", "--lr", "3e-3",
                "--warmup_fraction", "0", "--heldout_fraction", "0.2", "--log_every", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args, env=None, check=True, timeout=300) -> list[str]:
    """`torchrun --nnodes 2 --node_rank R --nproc_per_node 1 --rdzv_endpoint 127.0.0.1:PORT <args>` for R = 0 and 1,
    started together (torchrun's default static rendezvous: node 0 hosts it); the output of each node, stdout then
    stderr. Outputs go to files, not pipes: a node blocked on a full pipe would stall the other at a collective."""
    port = free_port()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    logs = [tempfile.TemporaryFile("w+") for _ in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--rdzv_endpoint", f"127.0.0.1:{port}", *args],
                              cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
             for r, log in enumerate(logs)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:  # a node left waiting for the other (one failed): end it and its worker
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if check and codes != [0, 0]:
        raise AssertionError(f"two nodes exited {codes}\nnode 0:\n{outputs[0][-4000:]}\nnode 1:\n{outputs[1][-4000:]}")
    return outputs


def critic_args(toy_dir, toy_rollout, out_dir, *extra):
    return ["critic.py", "--rollout_dir", str(toy_rollout), "--init", str(toy_dir / "sft"), "--out_dir", str(out_dir),
            *CRITIC_FLAGS, *extra]


def critic_params(critic_dir) -> dict:
    return C.load_critic(str(critic_dir), "cpu").state_dict()


@pytest.fixture(scope="module")
def one_process_critic(toy_dir, toy_rollout, tmp_path_factory):
    """critic.py in one process: what two nodes must equal, and the critic of the dapo.py runs."""
    out = tmp_path_factory.mktemp("multinode") / "critic"
    run_script(*critic_args(toy_dir, toy_rollout, out), env=ONE_THREAD)
    return out


def test_critic_fsdp_on_two_nodes_equals_one_process(toy_dir, toy_rollout, one_process_critic, tmp_path):
    out = tmp_path / "critic"
    node0, node1 = two_nodes(*critic_args(toy_dir, toy_rollout, out, *FSDP))
    assert "2 rank(s)" in node0 and "step 4/4" in node0 and "step 4/4" not in node1  # global rank 0 alone logs
    assert_sharded_in_two(node0)  # one shard on each node
    one, two = critic_params(one_process_critic), critic_params(out)
    init = C.Critic.from_backbone(str(toy_dir / "sft"), "cpu").state_dict()
    assert max((one[k] - init[k]).abs().max().item() for k in one) > 1e-3  # training moved the parameters
    assert max((two[k] - one[k]).abs().max().item() for k in one) <= 1e-4
    m1, m2 = (json.load(open(d / "metrics.json")) for d in (one_process_critic, out))
    assert m2["final_train_loss"] == pytest.approx(m1["final_train_loss"], rel=1e-4)
    assert m2["heldout"]["mse"] == pytest.approx(m1["heldout"]["mse"], rel=1e-3)


def test_dapo_fsdp_on_two_nodes_stops_resumes_and_equals_one_process(toy_dir, toy_rollout, one_process_critic,
                                                                     tmp_path):
    def args(out_dir, *extra):
        return ["dapo.py", "--policy", str(toy_dir / "sft"), "--critic", str(one_process_critic),
                "--rollout_dir", str(toy_rollout), "--out_dir", str(out_dir), *DAPO_FLAGS, *extra]

    run_script(*args(tmp_path / "one"), env=ONE_THREAD)
    out = tmp_path / "two"
    node0, _ = two_nodes(*args(out, *FSDP, "--stop_after", "1"))
    assert "stopped after step 1" in node0
    shards = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "two.work" / "checkpoint" / "*.distcp")))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # one shard per global rank, side by side on the shared disk
    node0, node1 = two_nodes(*args(out, *FSDP))
    assert "resuming from" in node0 and "resuming from" not in node1
    assert_sharded_in_two(node0)
    assert_same_training(tmp_path / "one", out, toy_dir / "sft")  # the actor, and the metrics of every step


def test_rollout_on_two_nodes_writes_every_question_once(toy_dir, toy_rollout, tmp_path):
    out = tmp_path / "rollout"
    two_nodes("rollout.py", "--model", str(toy_dir / "sft"), "--data", str(toy_dir / "train.jsonl"),
              "--out_dir", str(out), "--max_questions", "12", "--n1", "4", "--n_keep", "2", "--M", "4",
              "--max_new_tokens", "40", "--questions_per_chunk", "6")
    questions = [json.loads(line)["id"] for line in open(toy_dir / "train.jsonl")][:12]
    shards = sorted(p.name for p in out.glob("shard-*.jsonl"))
    assert shards == ["shard-0.jsonl", "shard-1.jsonl"]  # named by the global rank: the nodes' files stay apart
    for rank, shard in enumerate(shards):
        assert [json.loads(line)["qid"] for line in open(out / shard)] == questions[rank::2]
    solutions = [json.loads(line)["qid"] for line in open(out / "solutions.jsonl")]
    assert list(dict.fromkeys(solutions)) == questions  # merged once, in input order
    assert json.load(open(out / "summary.json"))["questions"] == 12


def test_eval_on_two_nodes_writes_every_question_once(toy_dir, tmp_path):
    out = tmp_path / "eval"
    node0, node1 = two_nodes("eval.py", "--model", str(toy_dir / "sft"), "--data", str(toy_dir / "test.jsonl"),
                             "--out_dir", str(out), "--max_questions", "7", "--k", "2", "--max_new_tokens", "40",
                             "--questions_per_chunk", "2")
    questions = [json.loads(line)["id"] for line in open(toy_dir / "test.jsonl")][:7]
    assert [json.loads(line)["id"] for line in open(out / "responses.jsonl")] == questions
    summary = json.load(open(out / "summary.json"))
    assert (summary["num_questions"], summary["world_size"]) == (7, 2)
    assert sorted(p.name for p in out.iterdir()) == ["responses.jsonl", "summary.json"]  # rank 0 merged, cleaned up
    assert "greedy accuracy" in node0 and "greedy accuracy" not in node1  # the table: global rank 0 alone prints


# Every rank checks the directory of its work: first one they share (not made yet), then one of its own per rank
# (as on nodes without a shared disk).
SHARED_OR_NOT = """
import os, sys
sys.path.insert(0, ".")
from plumbing.cli import InputError
from plumbing.distributed import check_shared_dir, cleanup_distributed, setup_distributed
ddp = setup_distributed()
check_shared_dir(f"{sys.argv[1]}/shared/out")
print(f"rank {ddp.rank}: shared", flush=True)
os.makedirs(f"{sys.argv[1]}/rank{ddp.rank}")
try:
    check_shared_dir(f"{sys.argv[1]}/rank{ddp.rank}/out")
except InputError as e:
    print(f"rank {ddp.rank}: refused: {e}", flush=True)
cleanup_distributed()
"""


def test_a_directory_some_rank_cannot_see_stops_every_rank(tmp_path):
    (tmp_path / "check.py").write_text(SHARED_OR_NOT)
    (tmp_path / "runs").mkdir()
    node0, node1 = two_nodes(str(tmp_path / "check.py"), str(tmp_path / "runs"))
    for rank, output in enumerate((node0, node1)):
        assert f"rank {rank}: shared" in output
        refused = next(line for line in output.splitlines() if line.startswith(f"rank {rank}: refused"))
        assert "rank 0 on" in refused and "rank 1 on" in refused and "every node sees" in refused
    # The check makes no directory and leaves no file behind.
    assert sorted(os.listdir(tmp_path / "runs")) == ["rank0", "rank1"]
    assert not os.listdir(tmp_path / "runs" / "rank0") and not os.listdir(tmp_path / "runs" / "rank1")


def test_memory_table_of_72b_on_2_and_4_nodes():
    rows = {}
    for gpus in (16, 32):
        out = run_script("tools/memory.py", "--models", "Qwen2.5-72B", "--gpus", str(gpus), "--accumulation", "false")
        rows[gpus] = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
                      for line in out.stdout.splitlines() if line.startswith("| Qwen")}
    actor, critic = rows[32]["Qwen2.5-72B actor"], rows[32]["Qwen2.5-72B critic"]
    assert actor[0] == "72.71B"  # the published size of Qwen2.5-72B: 72.7B
    assert float(critic[0][:-1]) == pytest.approx(72.71 - 152064 * 8192 / 1e9, abs=0.01)  # no LM head
    # FSDP: 16 bytes per parameter over the GPUs, plus gathered units that do not depend on their number.
    for role, n in (("actor", 72.71), ("critic", float(critic[0][:-1]))):
        state16, state32 = (float(rows[g][f"Qwen2.5-72B {role}"][4]) for g in (16, 32))
        assert state16 - state32 == pytest.approx(16 * n * (1 / 16 - 1 / 32), abs=0.1)
    assert float(rows[16]["Qwen2.5-72B actor"][4]) > 80 > float(actor[4])  # 2 nodes of 80 GB GPUs: too few
    whole = rows[32]["Qwen2.5-72B actor, whole"]
    assert (float(whole[0]), float(whole[1])) == pytest.approx((4 * 72.71, 2 * 72.71), abs=0.1)


RANK0_DECIDES = """
import sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from plumbing.cli import InputError
from plumbing.distributed import cleanup_distributed, rank0_decides, setup_distributed

ddp = setup_distributed()
seen = rank0_decides(lambda: ddp.rank == 0, "the output")  # rank 1's view differs: it follows rank 0
print(f"rank {{ddp.rank}}: follows {{seen}}", flush=True)
for strict, decide in ((True, lambda: ddp.rank == 0), (False, lambda: (_ for _ in ()).throw(InputError("x: bad"))
                                                         if ddp.rank == 0 else 1)):
    try:
        rank0_decides(decide, "the checkpoint", strict=strict)
        print(f"rank {{ddp.rank}}: went on", flush=True)
    except InputError as e:
        print(f"rank {{ddp.rank}}: stopped: {{e}}", flush=True)
print(f"rank {{ddp.rank}}: agrees {{rank0_decides(lambda: 7, 'the cache')}}", flush=True)
cleanup_distributed()
"""


def test_rank_0_decides_what_the_disk_holds_for_every_rank(tmp_path):
    """A decision read from the shared disk gates collectives, so every rank takes rank 0's: a rank whose view
    differs follows it (said in one line), or, strict, every rank stops with that line; rank 0's refusal stops all."""
    script = tmp_path / "decide.py"
    script.write_text(RANK0_DECIDES.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    out = run_script("torchrun", "--nproc_per_node=2", str(script)).stdout
    for rank in (0, 1):
        assert f"rank {rank}: follows True" in out and f"rank {rank}: agrees 7" in out
        assert f"rank {rank}: stopped: the checkpoint: rank 1 on" in out and "every rank must see" in out
        assert f"rank {rank}: stopped: x: bad" in out
        assert f"rank {rank}: went on" not in out
    assert out.count("all follow rank 0") == 2  # once for each of the two views that differ, by rank 0 alone
