"""data/toy/plot.py draws demo.png from a run folder laid out as demo.sh leaves it (here a small synthetic one)."""
import json
import random

import pytest

from conftest import run_script

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def synthetic_run(run_dir, rng):
    write(run_dir / "summary.json", {key: {"greedy_acc": rng.random(), "sampled_acc": rng.random()}
                                     for key in ("base", "iter1", "iter1_no_critic", "iter2")})
    for it in (1, 2):
        bins = [{"bin": [b / 10, (b + 1) / 10], "states": 5 + b, "mean_predicted": b / 10 + 0.05,
                 "mean_label": min(1.0, b / 10 + 0.1 * rng.random())} for b in range(10)]
        write(run_dir / f"iter{it}" / "critic" / "metrics.json",
              {"heldout": {"states": sum(b["states"] for b in bins), "pearson_r": 0.9, "calibration": bins}})
    for actor in ("iter1/actor", "iter1/no-critic/actor", "iter2/actor"):
        fit = [{"advantages": [rng.uniform(-0.5, 0.5) for _ in range(3)],
                "log_ratios": [rng.uniform(-1, 1) for _ in range(3)]} for _ in range(50)]
        write(run_dir / actor / "fit.jsonl", "".join(json.dumps(f) + "\n" for f in fit))
        write(run_dir / actor / "train_summary.json", {"config": {"beta": 0.3}, "after_training": {"corr": 0.5}})
        write(run_dir / actor / "train_log.jsonl", "".join(json.dumps({"step": i + 1, "loss": 1 / (i + 1)}) + "\n"
                                                          for i in range(20)))


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    synthetic_run(tmp_path / "run", random.Random(0))
    proc = run_script("data/toy/plot.py", "--run_dir", str(tmp_path / "run"))
    png = (tmp_path / "run" / "demo.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 20_000, len(png)
    assert "demo.png" in proc.stdout


def test_plot_without_a_summary_says_so(tmp_path):
    proc = run_script("data/toy/plot.py", "--run_dir", str(tmp_path), check=False)
    assert proc.returncode == 2 and "no summary.json" in proc.stderr
