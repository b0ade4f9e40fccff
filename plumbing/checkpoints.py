"""Resumable training state in torch.distributed.checkpoint's format (sharded under FSDP), and full weights."""
from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

from plumbing.distributed import barrier


def save_training_state(path: str, model, optimizer, meta: dict) -> None:
    """The resumable checkpoint, a directory: the model and optimizer state in torch.distributed.checkpoint's
    format (under FSDP every rank writes its own shards and no rank gathers the whole model) and meta.pt (step,
    config, ...). Written beside path and renamed into place, so path is always a complete checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    main = not dist.is_initialized() or dist.get_rank() == 0
    tmp = path.rstrip("/") + ".tmp"
    if main and os.path.exists(tmp):  # left by a run killed while saving
        shutil.rmtree(tmp)
    barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    if main:
        torch.save(meta, os.path.join(tmp, "meta.pt"))
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    barrier()


def training_meta(path: str) -> dict | None:
    """meta.pt of the resumable checkpoint at path, or None when there is none."""
    meta = os.path.join(path, "meta.pt")
    return torch.load(meta, weights_only=False) if os.path.exists(meta) else None


def load_training_state(path: str, model, optimizer) -> None:
    """Load the checkpoint of save_training_state into a model and optimizer set up as when it was saved
    (sharded or not): each rank reads only what it holds."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model) -> dict:
    """The whole model's weights on rank 0's CPU (an empty dict on the other ranks), gathered one tensor at a
    time, to save as a plain model directory that loads in one process without FSDP. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
