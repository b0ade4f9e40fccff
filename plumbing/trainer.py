"""The rules critic.py and dapo.py share: the work folder beside out_dir, resume identity, the lr schedule, saving."""
from __future__ import annotations


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up to the peak, then linear decay to zero."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
