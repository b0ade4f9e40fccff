"""The rules critic.py and dapo.py share: the work folder beside out_dir, resume identity, the lr schedule, saving."""
from __future__ import annotations

import dataclasses
import os
import shutil

import torch

from plumbing.checkpoints import load_training_state, save_training_state, training_meta
from plumbing.distributed import rank0_decides
from plumbing.runfiles import check_rerun, fingerprint, write_json_atomic


PEAK_MEMORY_VARIABLE = "DAPO_PEAK_MEMORY_FILE"  # a diagnostic: where each rank writes its peak memory (below)


def start_memory_trace() -> None:
    """With $DAPO_PEAK_MEMORY_FILE set, follow this process's anonymous resident memory (RssAnon of
    /proc/self/status: what the process allocated, not the pages of a memory-mapped checkpoint file, which the
    kernel can drop) every 2 ms from here on, on Linux; report_peak_memory writes the largest seen."""
    if not os.environ.get(PEAK_MEMORY_VARIABLE) or not os.path.exists("/proc/self/status"):
        return
    import threading
    import time

    def rss_anon_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024

    def follow() -> None:
        while True:
            _peak[0] = max(_peak[0], rss_anon_mb())
            time.sleep(0.002)

    _peak[0] = rss_anon_mb()
    threading.Thread(target=follow, daemon=True).start()


_peak = [0.0]


def report_peak_memory(point: str) -> None:
    """With $DAPO_PEAK_MEMORY_FILE set, write this rank's peak anonymous memory since the start (and, on CUDA, the
    peak of allocated GPU memory), in MB, to that path + "." + the rank, as JSON {point: {...}}: how much a rank
    needed to load its model (critic.py and dapo.py call it once the optimizer exists, before the first step)."""
    path = os.environ.get(PEAK_MEMORY_VARIABLE)
    if not path:
        return

    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    report = {"rss_anon_mb": round(_peak[0], 1)}
    if torch.cuda.is_available():
        report["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    write_json_atomic(f"{path}.{rank}", {point: report})


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up to the peak, then linear decay to zero."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


FEW_STEPS = 20  # fewer optimizer steps than this, at the paper's learning rates, move a model too little to see


def paper_defaults_note(script: str, cfg, steps: int, toy_flags: str) -> str | None:
    """One line for a run of fewer than FEW_STEPS optimizer steps at the default learning rate (the defaults are
    the paper's settings for 7-8B models): run by hand on the toy, it would otherwise learn nothing visible and
    say nothing. The line names the flags the toy takes (demo.sh's); None otherwise."""
    default_lr = next(f.default for f in dataclasses.fields(cfg) if f.name == "lr")
    if steps >= FEW_STEPS or cfg.lr != default_lr:
        return None
    return (f"{script}: {steps} optimizer step{'' if steps == 1 else 's'} at lr {cfg.lr:g}: the defaults are the "
            f"paper's 7-8B settings; the toy takes {toy_flags} (demo.sh)")


@dataclasses.dataclass
class TrainingRun:
    """The files of one training run and the rules both trainers follow (docs/pipeline.md, "Reruns and resume").

    out_dir appears only when training has finished, written whole and renamed into place. Beside it,
    out_dir.work/ holds what a rerun needs: settings.json (the settings of the unfinished run: a rerun with others
    is refused), checkpoint/ (the resumable state, sharded under FSDP) and the script's own caches. A checkpoint is
    resumed only by the same run: the same settings (bar those in `ignore`: output, speed, logging), the same
    number of ranks and the same inputs (a fingerprint of the files they are read from)."""
    cfg: object  # the script's Config (a dataclass with out_dir, overwrite, checkpoint_every and stop_after)
    ignore: tuple[str, ...]  # settings a rerun may change: none of them changes what is trained
    inputs: str  # fingerprint of the input files (plumbing.runfiles.fingerprint)
    world_size: int
    is_main: bool
    recorded: bool = dataclasses.field(default=False, init=False)  # settings.json written

    @property
    def work_dir(self) -> str:
        return self.cfg.out_dir.rstrip("/") + ".work"

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.work_dir, "checkpoint")

    @property
    def run_settings(self) -> dict:
        """The settings that change what is trained (all but `ignore`): what settings.json records."""
        return {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in self.ignore}

    @property
    def identity(self) -> dict:
        """What a checkpoint must match to be resumed."""
        return {"inputs": self.inputs, "world_size": self.world_size, **self.run_settings}

    @classmethod
    def start(cls, cfg, ignore: tuple[str, ...], inputs: list[str], done: str, world_size: int, is_main: bool,
              extra: str = "") -> TrainingRun | None:
        """The run, after the rerun rule (plumbing.runfiles.check_rerun) has passed; None when out_dir already holds
        its finished output (`done`, a file in out_dir), so there is nothing to do. `extra` joins the fingerprint of
        the inputs (settings that change a cached result, for example)."""
        run = cls(cfg, ignore, fingerprint(*inputs, extra=extra), world_size, is_main)
        finished = check_rerun(cfg, cfg.out_dir, os.path.join(cfg.out_dir, done), run.settings, [run.checkpoint],
                               ignore, is_main, write_settings=False)
        return None if finished else run

    @property
    def settings(self) -> str:
        return os.path.join(self.work_dir, "settings.json")

    def record_settings(self) -> None:
        """settings.json (the rerun rule), written with the run's first piece of work, not before: a run that a
        check refuses after `start` (dapo.py's packing check, say) leaves nothing behind."""
        if self.is_main and not self.recorded:
            os.makedirs(self.work_dir, exist_ok=True)
            write_json_atomic(self.settings, self.run_settings)
        self.recorded = True

    def resume(self, model, optimizer) -> dict | None:
        """Load this run's checkpoint into the model and optimizer (built as when it was saved, sharded or not)
        and return what was saved with it (step, log, ...); None when there is none. A checkpoint of another run
        (other inputs or another number of ranks: other settings were refused by `start`) is ignored, saying why."""
        # Rank 0's view decides (strict: every rank must then read the checkpoint's files it saw).
        meta = rank0_decides(lambda: training_meta(self.checkpoint), f"{self.checkpoint}: the checkpoint", strict=True)
        if meta is None:
            return None
        if meta["run_id"] == self.identity:
            load_training_state(self.checkpoint, model, optimizer)
            if self.is_main:
                print(f"resuming from step {meta['step']} ({self.checkpoint})", flush=True)
            return meta
        if self.is_main:
            why = {"inputs": "other inputs (an input file changed)",
                   "world_size": f"{meta['run_id'].get('world_size')} rank(s), not {self.world_size}"}
            print(f"ignoring {self.checkpoint}: it was made with " + "; ".join(
                why.get(k, f"--{k} {meta['run_id'].get(k)!r}") for k in self.identity
                if meta["run_id"].get(k) != self.identity[k]))
        return None

    def after_step(self, step: int, total: int, model, optimizer, meta: dict) -> bool:
        """After optimizer step number `step` (1-based) of `total`: save the checkpoint every --checkpoint_every
        steps (0: never) and at --stop_after; True when the run stops here, as --stop_after asks (as a kill would,
        leaving only the checkpoint)."""
        every, stop_after = self.cfg.checkpoint_every, self.cfg.stop_after
        stop = bool(stop_after) and step == stop_after and step < total
        if stop or (every > 0 and step % every == 0 and step < total):  # every rank writes what it holds
            self.record_settings()
            save_training_state(self.checkpoint, model, optimizer, {**meta, "step": step, "run_id": self.identity})
        if stop and self.is_main:
            print(f"stopped after step {step} (--stop_after); rerun the same command to resume from "
                  f"{self.checkpoint}", flush=True)
        return stop

    def finish(self) -> None:
        """Once out_dir is complete: the checkpoint and the settings go (caches in the work folder stay)."""
        if not self.is_main:
            return
        for path in (self.checkpoint, self.settings):
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        if os.path.isdir(self.work_dir) and not os.listdir(self.work_dir):
            os.rmdir(self.work_dir)

    def load_cache(self, name: str, key: str):
        """A cache the script keeps in the work folder (dapo.py: Q values and log pi_ref), or None when there is
        none or it was made from other inputs (`key`). Rank 0 reads it and sends it to the others: whether it is
        there decides which passes follow, the same on every rank."""
        import torch.distributed as dist

        path = os.path.join(self.work_dir, name)
        cache = [torch.load(path, map_location="cpu", weights_only=False)
                 if self.is_main and os.path.exists(path) else None]
        if dist.is_initialized():
            dist.broadcast_object_list(cache, src=0)
        return cache[0] if cache[0] is not None and cache[0].get("key") == key else None

    def save_cache(self, name: str, cache: dict) -> None:
        """Written atomically by rank 0: a kill while writing leaves the old cache or none."""
        self.record_settings()
        if self.is_main:
            path = os.path.join(self.work_dir, name)
            torch.save(cache, path + ".tmp")
            os.replace(path + ".tmp", path)
