"""Experiment tracking, --report_to none | tensorboard | wandb: the metrics the scripts already print and write, per
optimizer step, with the run's settings, and a few tables. Rank 0 alone reports; both trackers are optional installs.

TensorBoard's event files go beside the output, in OUT_DIR.tensorboard/ (`tensorboard --logdir runs/toy` shows every
stage of the demo's folder); a table becomes a Markdown text. wandb logs to its project "dapo" (offline, with no
account, when WANDB_MODE=offline), a table as a wandb.Table.
"""
from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import json

from plumbing.cli import arg, InputError

TRACKERS = ("none", "tensorboard", "wandb")


@dataclasses.dataclass
class TrackingConfig:
    report_to: str = arg("none", "none | tensorboard (OUT_DIR.tensorboard/) | wandb: every step's metrics, the "
                                 "settings and tables (an optional install: pip install tensorboard, or wandb)")

    def __post_init__(self):  # checked with the other settings, before any input is read or output written
        if self.report_to not in TRACKERS:
            raise InputError(f"--report_to must be one of {', '.join(TRACKERS)}, got {self.report_to!r}")
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise InputError(f"--report_to {self.report_to} needs the package {self.report_to}, which is not "
                             f"installed: pip install {self.report_to}")


def start_tracking(cfg, script: str, is_main: bool) -> "Tracker":
    """The tracker of this run (one that does nothing on ranks other than 0 and with --report_to none), closed when
    the process exits, however the run ends."""
    if not is_main or cfg.report_to == "none":
        return Tracker(None, None)
    tracker = _open(cfg, script)
    atexit.register(tracker.close)
    return tracker


def _open(cfg, script: str) -> "Tracker":
    settings = dataclasses.asdict(cfg)
    if cfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=cfg.out_dir.rstrip("/") + ".tensorboard")
        writer.add_text(f"{script}/config", "```\n" + json.dumps(settings, indent=2) + "\n```")
        return Tracker("tensorboard", writer)
    import wandb

    return Tracker("wandb", wandb.init(project="dapo", name=f"{script} {cfg.out_dir}", job_type=script,
                                       config=settings))


class Tracker:
    def __init__(self, kind: str | None, backend):
        self.kind, self.backend = kind, backend

    @property
    def active(self) -> bool:
        """Whether anything is reported (--report_to other than none, on rank 0): work done only to report waits."""
        return self.kind is not None

    def log(self, metrics: dict, step: int) -> None:
        """Scalars (non-numbers and None are left out) at an optimizer step."""
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.kind == "tensorboard":
            for name, value in numbers.items():
                self.backend.add_scalar(name, value, step)
        elif self.kind == "wandb":
            self.backend.log(numbers, step=step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int = 0) -> None:
        if self.kind == "tensorboard":
            cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v).replace("\n", "\\n").replace("|", "\\|")  # noqa: E731
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
            self.backend.add_text(name, "\n".join(lines), step)
        elif self.kind == "wandb":
            import wandb

            self.backend.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.backend.close()
        elif self.kind == "wandb":
            self.backend.finish()
        self.kind = None  # closed once
