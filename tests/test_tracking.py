"""--report_to tensorboard: the event files of critic.py and dapo.py, read back with TensorBoard's EventAccumulator,
hold every optimizer step's metrics, the held-out calibration and the fit of eq. 12 after training, the settings and
a table of states with their candidates, Q values and advantages; a tracker that is not installed is one line."""
import json

import pytest

from conftest import run_script

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag: acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]}
    return scalars, texts


def test_critic_and_actor_report_every_step_to_tensorboard(toy_dir, toy_rollout, tmp_path):
    pytest.importorskip("tensorboard")
    critic, actor = tmp_path / "critic", tmp_path / "actor"
    run_script("critic.py", "--rollout_dir", str(toy_rollout), "--init", str(toy_dir / "sft"), "--out_dir", str(critic),
               "--batch_size", "8", "--micro_batch_size", "8", "--epochs", "2", "--lr", "1e-3",
               "--heldout_fraction", "0.25", "--report_to", "tensorboard", env=ONE_THREAD)
    scalars, texts = events(tmp_path / "critic.tensorboard")
    steps = json.loads((critic / "metrics.json").read_text())["steps"]
    for name in ("critic/loss", "critic/lr", "critic/grad_norm"):
        assert [s for s, _ in scalars[name]] == list(range(1, steps + 1)), name
    heldout = json.loads((critic / "metrics.json").read_text())["heldout"]
    assert scalars["critic/heldout_mse"] == [(steps, pytest.approx(heldout["mse"], rel=1e-6))]
    assert "| predicted V | states | mean V | mean MC label |" in texts["critic/calibration/text_summary"]
    assert '"report_to": "tensorboard"' in texts["critic.py/config/text_summary"]

    run_script("dapo.py", "--policy", str(toy_dir / "sft"), "--critic", str(critic), "--rollout_dir", str(toy_rollout),
               "--out_dir", str(actor), "--global_batch_actions", "16", "--micro_batch_actions", "16", "--lr", "1e-4",
               "--beta", "0.3", "--min_gap", "0.05", "--report_to", "tensorboard", env=ONE_THREAD)
    scalars, texts = events(tmp_path / "actor.tensorboard")
    log = [json.loads(line) for line in (actor / "train_log.jsonl").read_text().splitlines()]
    for name in ("loss", "lr", "abs_log_ratio", "corr", "moved", "grad_norm"):
        assert scalars[f"actor/{name}"] == [(r["step"], pytest.approx(r[name], rel=1e-5, abs=1e-7)) for r in log], name
    after = json.loads((actor / "train_summary.json").read_text())["after_training"]
    assert scalars["actor/after_training/loss"] == [(len(log), pytest.approx(after["loss"], rel=1e-5))]
    assert texts["actor/states/text_summary"].startswith("| state (its end) | candidate action | Q | advantage |")
    assert "| A / beta | log pi/pi_ref |" in texts["actor/fit/text_summary"]


def test_a_tracker_that_is_not_installed_is_one_line(monkeypatch):
    import importlib.util

    from plumbing.cli import InputError
    from plumbing.tracking import TrackingConfig

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(InputError) as e:
        TrackingConfig(report_to="wandb")
    assert str(e.value) == "--report_to wandb needs the package wandb, which is not installed: pip install wandb"
    proc = run_script("dapo.py", "--report_to", "mlflow", check=False)
    assert proc.returncode == 2 and "--report_to must be one of none, tensorboard, wandb, got 'mlflow'" in proc.stderr


def test_critic_and_actor_report_to_wandb_offline(toy_dir, toy_rollout, tmp_path):
    """wandb with no account and no network (WANDB_MODE=offline): every stage finishes, each leaves its offline
    run, with the critic's calibration and the actor's fit and states as tables at their last step."""
    pytest.importorskip("wandb")
    env = {**ONE_THREAD, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    critic = tmp_path / "critic"
    run_script("critic.py", "--rollout_dir", str(toy_rollout), "--init", str(toy_dir / "sft"), "--out_dir", str(critic),
               "--batch_size", "8", "--micro_batch_size", "8", "--epochs", "2", "--lr", "1e-3",
               "--heldout_fraction", "0.25", "--report_to", "wandb", env=env)
    run_script("dapo.py", "--policy", str(toy_dir / "sft"), "--critic", str(critic), "--rollout_dir", str(toy_rollout),
               "--out_dir", str(tmp_path / "actor"), "--global_batch_actions", "16", "--micro_batch_actions", "16",
               "--lr", "1e-4", "--beta", "0.3", "--min_gap", "0.05", "--report_to", "wandb", env=env)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(list(r.glob("*.wandb")) for r in runs)
    steps = json.loads((critic / "metrics.json").read_text())["steps"]
    tables = {p.name.split("_")[0]: (p, json.loads(p.read_text())) for r in runs for p in r.rglob("*.table.json")}
    assert tables["calibration"][0].name.startswith(f"calibration_{steps}_")
    assert tables["calibration"][1]["columns"] == ["predicted V", "states", "mean V", "mean MC label"]
    assert tables["states"][1]["columns"] == ["state (its end)", "candidate action", "Q", "advantage"]
    assert tables["fit"][1]["columns"] == ["A / beta", "log pi/pi_ref"] and tables["fit"][1]["data"]


def test_rollout_and_eval_report_their_summaries_to_tensorboard(toy_dir, tmp_path):
    pytest.importorskip("tensorboard")
    run_script("rollout.py", "--model", str(toy_dir / "sft"), "--data", str(toy_dir / "train.jsonl"),
               "--out_dir", str(tmp_path / "rollout"), "--max_questions", "2", "--n1", "2", "--n_keep", "2", "--M", "2",
               "--max_new_tokens", "40", "--report_to", "tensorboard", env=ONE_THREAD)
    scalars, texts = events(tmp_path / "rollout.tensorboard")
    summary = json.loads((tmp_path / "rollout" / "summary.json").read_text())
    assert scalars["rollout/states"] == [(0, summary["states"])]
    assert scalars["rollout/mean_mc_value"] == [(0, pytest.approx(summary["mean_mc_value"], rel=1e-6))]
    assert texts["rollout/states/text_summary"].startswith("| state (its end) | MC label | candidate actions |")
    run_script("eval.py", "--model", str(toy_dir / "sft"), "--data", str(toy_dir / "test.jsonl"),
               "--out_dir", str(tmp_path / "eval"), "--k", "2", "--max_new_tokens", "40", "--report_to", "tensorboard",
               env=ONE_THREAD)
    scalars, texts = events(tmp_path / "eval.tensorboard")
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    for name in ("greedy_acc", "sampled_acc", "pass@k", "maj@k"):
        assert scalars[f"eval/{name}"] == [(0, pytest.approx(summary[name], rel=1e-6))], name
    assert "| question | reference | greedy response | correct |" in texts["eval/responses/text_summary"]
