"""The demo as one picture: what a demo.sh run measured, drawn from the files its stages wrote.

  python data/toy/plot.py --run_dir runs/toy     # writes runs/toy/demo.png (needs matplotlib)

Four panels:
  1. Held-out accuracy, greedy and sampled, of the warm start, DAPO iteration 1, the iteration-1 ablation
     without a critic (Q from one rollout) and iteration 2 (summary.json of demo.sh).
  2. The critic's calibration on held-out states: mean predicted V against mean MC label, by bins of the
     prediction (iterN/critic/metrics.json).
  3. How the actor fitted eq. 12: log(pi_theta / pi_ref) after training against the target A / beta, for every
     training action of iteration 1, with the critic and without it (iter1/.../actor/fit.jsonl).
  4. The DAPO loss (eq. 12) at every optimizer step (train_log.jsonl of each actor).
A policy or file the run lacks is left out of its panel.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from plumbing.cli import arg, InputError, parse_config, run  # noqa: E402

# summary.json key, label, actor folder under run_dir (None: no DAPO training), colour
POLICIES = [("base", "warm start", None, "tab:gray"), ("iter1", "iteration 1", "iter1/actor", "tab:blue"),
            ("iter1_no_critic", "iteration 1,\nno critic", "iter1/no-critic/actor", "tab:orange"),
            ("iter2", "iteration 2", "iter2/actor", "tab:green")]


@dataclasses.dataclass
class Config:
    run_dir: str = arg("runs/toy", "the output folder of demo.sh (its summary.json and the stage folders)")
    out: str = arg("", "where the PNG goes (default: run_dir/demo.png)")


def read_json(path: str) -> dict | None:
    return json.load(open(path, encoding="utf-8")) if os.path.exists(path) else None


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")] if os.path.exists(path) else []


def plot_accuracy(ax, summary: dict) -> None:
    present = [(key, label) for key, label, _, _ in POLICIES if key in summary]
    x = range(len(present))
    for offset, kind, colour in [(-0.2, "greedy", "tab:blue"), (0.2, "sampled", "tab:orange")]:
        values = [summary[key][f"{kind}_acc"] for key, _ in present]
        bars = ax.bar([i + offset for i in x], values, width=0.4, color=colour, label=kind)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(list(x), [label for _, label in present], fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy on the held-out test set")
    ax.set_title("Held-out accuracy (sampled: T = 1)")
    ax.legend(loc="upper left", fontsize=8)


def plot_calibration(ax, run_dir: str) -> None:
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--", label="perfect")
    for it, colour in [(1, "tab:blue"), (2, "tab:green")]:
        metrics = read_json(os.path.join(run_dir, f"iter{it}", "critic", "metrics.json"))
        heldout = metrics and metrics.get("heldout")
        if not heldout:
            continue
        table = heldout["calibration"]
        r = "undefined" if heldout["pearson_r"] is None else f"{heldout['pearson_r']:.2f}"
        ax.scatter([b["mean_predicted"] for b in table], [b["mean_label"] for b in table], color=colour,
                   s=[10 + 200 * b["states"] / heldout["states"] for b in table],
                   label=f"iteration {it}: r {r}, {heldout['states']} states")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("critic's V (mean of a bin of 0.1)")
    ax.set_ylabel("MC label V_hat (mean of the bin)")
    ax.set_title("Critic calibration on held-out states (area: states)")
    ax.legend(loc="upper left", fontsize=8)


def plot_fit(ax, run_dir: str) -> None:
    reach, points = 0.0, []
    for key, label, actor, colour in POLICIES:
        if key not in ("iter1", "iter1_no_critic"):
            continue
        fit, summary = read_jsonl(os.path.join(run_dir, actor, "fit.jsonl")), read_json(
            os.path.join(run_dir, actor, "train_summary.json"))
        if not fit or not summary:
            continue
        beta = summary["config"]["beta"]
        target = [a / beta for f in fit for a in f["advantages"]]  # A / beta: what eq. 12 asks log ratio to be
        log_ratio = [r for f in fit for r in f["log_ratios"]]
        after = summary.get("after_training", {})
        ax.scatter(target, log_ratio, s=5, alpha=0.35, color=colour, edgecolors="none",
                   label=f"{label.replace(chr(10), ' ')}: {len(target)} actions, corr {after.get('corr', 0):.2f}")
        reach, points = max(reach, *map(abs, target)), points + log_ratio
    # The axes span the targets (a few log ratios fall far below them: the count is printed in the corner).
    lim = 1.5 * reach or 1.0
    ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8, ls="--", label="log ratio = A / beta")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    outside = sum(abs(r) > lim for r in points)
    if outside:
        ax.text(0.98, 0.02, f"{outside} log ratio(s) beyond +-{lim:.1f} not shown", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=7)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("A(s, a) / beta (the target of eq. 12)")
    ax.set_ylabel("log pi / pi_ref after training")
    ax.set_title("Iteration 1: the actor's fit of eq. 12")
    ax.legend(loc="upper left", fontsize=8, markerscale=3)


def plot_loss(ax, run_dir: str) -> None:
    for _, label, actor, colour in POLICIES:
        log = read_jsonl(os.path.join(run_dir, actor, "train_log.jsonl")) if actor else []
        if log:
            ax.plot([m["step"] for m in log], [m["loss"] for m in log], color=colour, lw=1, marker="o", ms=2,
                    label=label.replace("\n", " "))  # markers: a one-step run is still seen
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("DAPO loss (eq. 12), before the step")
    ax.set_title("Actor training loss")
    ax.legend(fontsize=8)


def main() -> None:
    cfg = parse_config(Config)
    summary = read_json(os.path.join(cfg.run_dir, "summary.json"))
    if summary is None:
        raise InputError(f"{cfg.run_dir}: no summary.json; run demo.sh to the end first")
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    plot_accuracy(axes[0, 0], summary)
    plot_calibration(axes[0, 1], cfg.run_dir)
    plot_fit(axes[1, 0], cfg.run_dir)
    plot_loss(axes[1, 1], cfg.run_dir)
    fig.suptitle(f"DAPO on the toy task: {cfg.run_dir}")
    fig.tight_layout()
    out = cfg.out or os.path.join(cfg.run_dir, "demo.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    run(main)
