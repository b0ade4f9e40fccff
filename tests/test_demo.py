"""demo.sh end to end with every stage shrunk (DEMO_SMOKE=1): it runs and writes a complete summary.json, and with
DEMO_REPORT_TO=tensorboard (when installed) every stage's TensorBoard events."""
import importlib.util
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_demo_smoke_writes_complete_summary(tmp_path):
    out = tmp_path / "toy"
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    env = {**os.environ, "DEMO_SMOKE": "1", "OUT": str(out), "PYTHON": sys.executable,
           **({"DEMO_REPORT_TO": "tensorboard"} if tensorboard else {})}
    proc = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for policy in ("base", "iter1", "iter1_no_critic", "iter2"):
        for key in ("greedy_acc", "sampled_acc"):
            assert 0.0 <= summary[policy][key] <= 1.0
    assert -1.0 <= summary["critic_pearson_r"] <= 1.0 and summary["wall_seconds"] > 0
    assert "| DAPO iteration 2 |" in proc.stdout and "SMOKE RUN" in proc.stdout  # the table, marked as a smoke run
    assert summary["kind"] == "smoke" and (out / "demo_kind").read_text().strip() == "smoke"
    assert "| DAPO iteration 1, Q from one rollout (no critic) |" in proc.stdout  # with the ablation's row
    no_critic = json.loads((out / "iter1" / "no-critic" / "actor" / "train_summary.json").read_text())
    assert no_critic["config"]["q_source"] == "rollout"
    assert no_critic["config"]["rollout_dir"] == str(out / "iter1" / "rollout")  # the same data as iteration 1
    # The figure needs matplotlib (requirements-optional.txt); without it the demo says how to get it.
    if importlib.util.find_spec("matplotlib"):
        png = (out / "demo.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    else:
        assert "no figure: matplotlib is missing" in proc.stdout and not (out / "demo.png").exists()
    # The second iteration starts from the first: its rollout used iteration 1's actor as pi_ref.
    rollout2 = json.loads((out / "iter2" / "rollout" / "summary.json").read_text())
    assert rollout2["config"]["model"] == str(out / "iter1" / "actor")
    if tensorboard:  # the critic's and the actor's metrics at every optimizer step, read back as TensorBoard does
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for run, tag, steps in [("critic", "critic/loss", json.loads((out / "iter1" / "critic" / "metrics.json")
                                                                    .read_text())["steps"]),
                                ("actor", "actor/loss", json.loads((out / "iter1" / "actor" / "train_summary.json")
                                                                  .read_text())["steps"])]:
            acc = EventAccumulator(str(out / "iter1" / f"{run}.tensorboard"))
            acc.Reload()
            assert [e.step for e in acc.Scalars(tag)] == list(range(1, steps + 1)), run
        assert all((out / d).is_dir() for d in ("base/eval.tensorboard", "iter2/rollout.tensorboard",
                                                "iter1/no-critic/actor.tensorboard"))
    # Rerunning resumes: every stage is found complete and skipped.
    again = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already") == 12, again.stdout[-2000:]


def test_demo_smoke_with_the_strong_critic(tmp_path):
    """DEMO_CRITIC=strong, every stage shrunk: the critic of both iterations starts from prepare.py's strong backbone,
    which has its own tokenizer, so critic.py and dapo.py read the policy's text in the critic's tokens."""
    out = tmp_path / "strong"
    env = {**os.environ, "DEMO_SMOKE": "1", "DEMO_CRITIC": "strong", "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["critic_backbone"] == "strong" and (out / "demo_kind").read_text().strip() == "smoke critic=strong"
    assert all(0.0 <= summary[p]["sampled_acc"] <= 1.0 for p in ("base", "iter1", "iter1_no_critic", "iter2"))
    strong_tokenizer = (out / "strong" / "tokenizer.json").read_text()
    assert strong_tokenizer != (out / "sft" / "tokenizer.json").read_text()
    for it in ("iter1", "iter2"):
        tokens = json.loads((out / it / "critic" / "metrics.json").read_text())["tokens"]
        assert tokens["critic_reads"].startswith("its own tokens"), tokens
        assert tokens["policy_vocabulary"] != tokens["critic_vocabulary"]
        assert (out / it / "critic" / "tokenizer.json").read_text() == strong_tokenizer  # the critic's own, kept
        assert (out / it / "actor" / "model.safetensors").exists()  # dapo.py asked that critic for Q


def test_a_folder_of_the_other_kind_is_refused(tmp_path):
    # A smoke run's folder must not pass for the full demo (nor the other way), nor a folder of unknown kind.
    for folder, kind, smoke in [("smoke", "smoke\n", "0"), ("full", "full\n", "1"), ("unknown", None, "0")]:
        out = tmp_path / folder
        out.mkdir()
        (out / ("demo_kind" if kind else "stage_ms.tsv")).write_text(kind or "")
        before = sorted(p.name for p in out.iterdir())
        env = {**os.environ, "DEMO_SMOKE": smoke, "OUT": str(out), "PYTHON": "false"}  # nothing may run
        proc = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {out}") and "OUT" in proc.stderr, proc.stderr
        assert sorted(p.name for p in out.iterdir()) == before


def test_the_toy_kind_and_m_are_part_of_the_folder_kind(tmp_path):
    # A plain toy's folder must not be resumed as a varied one or with another M (their stages would be skipped).
    out = tmp_path / "full"
    out.mkdir()
    (out / "demo_kind").write_text("full\n")
    for extra in ({"DEMO_TOY": "varied"}, {"DEMO_M": "4"}, {"DEMO_CRITIC": "strong"}):
        env = {**os.environ, "DEMO_SMOKE": "0", "OUT": str(out), "PYTHON": "false", **extra}
        proc = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "not a full" in proc.stderr, proc.stderr
    env = {**os.environ, "DEMO_TOY": "other", "OUT": str(tmp_path / "x"), "PYTHON": "false"}
    proc = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "DEMO_TOY must be toy or varied" in proc.stderr and not (tmp_path / "x").exists()
    env = {**os.environ, "DEMO_CRITIC": "big", "OUT": str(tmp_path / "x"), "PYTHON": "false"}
    proc = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "DEMO_CRITIC must be policy or strong" in proc.stderr
    assert not (tmp_path / "x").exists()
    for cores in ("0", "two", "-1"):
        env = {**os.environ, "DEMO_CORES": cores, "OUT": str(tmp_path / "x"), "PYTHON": "false"}
        proc = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "DEMO_CORES must be a positive whole number" in proc.stderr, proc.stderr
        assert not (tmp_path / "x").exists()
