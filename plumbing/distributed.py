"""DDP and FSDP2: one process under python, one per GPU under torchrun; sharding, gradient sync and clipping."""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from plumbing.cli import InputError


@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


DIST_TIMEOUT_VARIABLE, DIST_TIMEOUT_DEFAULT_MIN = "DAPO_DIST_TIMEOUT_MIN", 180.0


def dist_timeout() -> datetime.timedelta:
    """How long a collective waits for the slowest rank before the job is torn down: $DAPO_DIST_TIMEOUT_MIN
    minutes, 180 by default. torch's default (10 minutes with NCCL) is too short for rollout.py and eval.py,
    whose ranks finish their shares of the questions at different times and then meet at one last collective.
    A setting of the machine and job size, not of the experiment, and the same for every script: so an
    environment variable, like NCCL's own, rather than a flag in four configs and their resume checks."""
    text = os.environ.get(DIST_TIMEOUT_VARIABLE, str(DIST_TIMEOUT_DEFAULT_MIN))
    try:
        if float(text) > 0:
            return datetime.timedelta(minutes=float(text))
    except (ValueError, OverflowError):  # not a number, or too many minutes for a timedelta
        pass
    raise InputError(f"{DIST_TIMEOUT_VARIABLE}={text!r}: expected a positive number of minutes")


def setup_distributed() -> Dist:
    """One process under `python`, one per GPU (or CPU worker) under `torchrun`, on one node or several.

    torchrun sets RANK / WORLD_SIZE (over all nodes) and LOCAL_RANK (on this node): the local rank picks the GPU,
    the global rank everything else (a rank's share of the work, its shard and checkpoint files; rank 0 alone
    writes the shared files). NCCL on GPUs, gloo on the CPU (what the tests use)."""
    if int(os.environ.get("RANK", -1)) == -1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(0, 1, 0, device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    timeout = dist_timeout()
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        # The processes of one machine share its cores (LOCAL_WORLD_SIZE: this node's processes, not all nodes'),
        # never more threads than $OMP_NUM_THREADS asks for: two processes on two cores fight over more.
        share = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, min(share, torch.get_num_threads())))
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return Dist(rank, world, local, device)


def cleanup_distributed() -> None:
    """The end of a script's work under torchrun: every rank waits for the others (rank 0 may still be writing).
    The process group itself is destroyed by plumbing.cli.run once main() has returned and what it held is freed
    (destroy_distributed): a DDP model's reducer that outlives its process group deadlocks or aborts in its
    destructor (seen in CI: a rank hung in ~ProcessGroupGloo after its work was written)."""
    if dist.is_initialized() and int(os.environ.get("RANK", -1)) != -1:  # the ranks' group, not one vLLM made here
        dist.barrier()


def destroy_distributed() -> None:
    """Destroy the ranks' process group (not one vLLM made here), last: after every model that holds it is freed."""
    if dist.is_initialized() and int(os.environ.get("RANK", -1)) != -1:
        dist.destroy_process_group()


def all_ranks_sum(x: float, op=None) -> float:
    """Sum a number over all ranks (itself when there is one process); op: another reduction (dist.ReduceOp)."""
    if not dist.is_initialized():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.item()


def all_ranks_max(x: float) -> float:
    """The largest of a number over all ranks."""
    return all_ranks_sum(x, dist.ReduceOp.MAX)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def check_shared_dir(directory: str) -> None:
    """Stop, on every rank, unless every rank sees the files every other rank writes where directory is (or will
    be). The ranks of all nodes meet only in their output: rank 0 merges the others' shards, and every rank reads
    the settings, caches and checkpoints written there. On a disk of its own, each node would go on alone and
    silently (a merge of half the questions, or ranks out of step until the timeout). Each rank writes a file,
    of a name never used before (an NFS client may cache a name looked up earlier as missing), in the nearest
    directory that exists (what is created below it is on its disk: nothing is created here), then looks for
    the others' files there."""
    if not dist.is_initialized():
        return
    import socket
    import uuid

    rank, world = dist.get_rank(), dist.get_world_size()
    token = [uuid.uuid4().hex]
    dist.broadcast_object_list(token, src=0)
    near = os.path.abspath(directory)
    while not os.path.isdir(near):
        near = os.path.dirname(near)
    name = os.path.join(near, f".dapo-shared-{token[0]}-{{}}")
    try:
        open(name.format(rank), "w").close()
        wrote = True
    except OSError:  # not writable here: this rank cannot write its output either; the others must still meet it
        wrote = False
    dist.barrier()
    unseen = sum(not os.path.exists(name.format(r)) for r in range(world))
    seen = [None] * world
    dist.all_gather_object(seen, (socket.gethostname(), rank, unseen))
    dist.barrier()  # every rank has looked before the files go
    if wrote:
        os.remove(name.format(rank))
    blind = [f"rank {r} on {host}" for host, r, n in seen if n]
    if blind:
        raise InputError(f"{directory}: {', '.join(blind)} cannot see the files of every other rank in {near}; "
                         "under torchrun on several nodes --out_dir must be on a file system every node sees, "
                         "writable by every rank (NFS, Lustre, ...)")


def rank0_decides(decide, what: str, strict: bool = False):
    """decide() as global rank 0 sees it, on every rank: a decision read from the shared disk (is the output
    finished, is there a checkpoint, a cache) that says which collectives follow must be the same on every rank,
    and one node's stale view of a network file system must not split them. Every rank decides from its own
    view; one whose answer differs from rank 0's says so in one line and follows rank 0, or, strict (it must
    read what rank 0 saw), every rank stops with that line. An InputError of rank 0's stops every rank with its
    line; one of another rank alone is its differing view."""
    if not dist.is_initialized():
        return decide()
    import socket

    try:
        mine = ("ok", decide())
    except InputError as e:
        mine = ("error", str(e))
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (socket.gethostname(), mine))
    differ = [f"rank {r} on {host}" for r, (host, view) in enumerate(views) if view != views[0][1]]
    if differ:
        line = (f"{what}: {', '.join(differ)} see(s) otherwise than rank 0 on {views[0][0]} (a stale or unshared "
                f"view of the file system?)")
        if strict:
            raise InputError(line + "; every rank must see the same files")
        if dist.get_rank() == 0:
            print(line + "; all follow rank 0", flush=True)
    kind, value = views[0][1]
    if kind == "error":
        raise InputError(value)
    return value


# Under DDP every rank holds the whole model, its gradients and AdamW state: 16 bytes per parameter, 112 GB for
# a 7B model. FSDP2 (torch.distributed.fsdp.fully_shard) splits all three over the ranks; each decoder layer's
# full parameters exist only while that layer computes. The helpers below take the plain, DDP or sharded model
# alike, so the training loops have one path.
def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a Hugging Face model: the blocks its classes declare must never be split
    (`_no_split_modules`, the declaration accelerate's device_map reads too). Each becomes one FSDP unit."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def is_sharded(model) -> bool:
    """Whether model is sharded by FSDP2 (fully_shard makes its class a subclass of FSDPModule)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def distribute(model, ddp: Dist, fsdp: bool):
    """The model the training loop calls. One process: the model itself. Under torchrun: wrapped by DDP, or,
    with fsdp, sharded in place by FSDP2 (every decoder layer, then the root: embeddings, final norm, heads); a
    model already sharded (plumbing.models.load_sharded) is returned as it is. The shards are fp32 (the master
    weights); where the run computes in bf16 (plumbing.models.bf16_compute: CUDA by default) each unit's weights
    are gathered in bf16 and gradients reduced in fp32. A critic's value head is a unit of its own that stays
    fp32 (V comes out of an fp32 Linear). Build the optimizer after this: sharding replaces parameters."""
    if fsdp and dist.is_initialized() and is_sharded(model):
        return model
    layers = decoder_layers(model) if fsdp else []
    if fsdp and not layers:  # checked in one process too: the same command under torchrun would fail
        raise InputError(f"--fsdp cannot find the decoder layers of {type(model).__name__} to shard; "
                         "run without --fsdp")
    if fsdp and dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from plumbing.models import bf16_compute

        mesh = init_device_mesh(ddp.device.type, (ddp.world_size,))
        mixed = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if bf16_compute(ddp.device) else MixedPrecisionPolicy())
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=mixed)
        if hasattr(model, "value_head"):  # the critic's: gathered in fp32, its input cast to fp32
            fully_shard(model.value_head, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
        fully_shard(model, mesh=mesh, mp_policy=mixed)
        return model
    if ddp.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[ddp.local_rank] if ddp.device.type == "cuda" else None)
    return model


def passes_in_step(model, count: int) -> int:
    """How many forward passes this rank must run so that every rank runs as many: under FSDP each pass gathers
    every unit's weights from all ranks, so a rank with fewer states of its own runs empty passes (the most any
    rank has); otherwise its own count."""
    if not (dist.is_initialized() and is_sharded(model)):
        return count
    n = torch.tensor(count, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n)


def sync_gradients(model, sync: bool) -> None:
    """Gradient accumulation: reduce gradients over the ranks in the backward pass of the last micro-batch only.
    Earlier ones accumulate locally (DDP: no all-reduce; FSDP: no reduce-scatter, so each rank holds full-size
    fp32 gradients until the last micro-batch: the price of sending them once per step)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = sync


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def clip_gradients(model, max_norm: float) -> float:
    """Clip the norm of the whole gradient (all ranks' shards under FSDP) to max_norm (0: no clipping) and return
    the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


def held_per_rank(model, optimizer) -> str:
    """How many parameter, gradient and optimizer-state values each rank holds (its shards under FSDP, whole
    copies under DDP); call it after a backward pass and an optimizer step, when all three exist."""
    params = list(model.parameters())
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]  # not "step"
    mine = [sum(_local(p).numel() for p in params), sum(_local(p.grad).numel() for p in params if p.grad is not None),
            sum(_local(v).numel() for v in states)]
    ranks = [mine]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    total = sum(p.numel() for p in params)
    return (f"held per rank (parameters / gradients / optimizer state) of {total:,} parameters: "
            + "; ".join(f"rank {r} {p:,} / {g:,} / {s:,}" for r, (p, g, s) in enumerate(ranks)))


def on_all_ranks(fn, items: list) -> list:
    """fn(items), with the items split over the ranks and the results gathered back, in order, on every rank."""
    if not dist.is_initialized():
        return fn(items)
    rank, world = dist.get_rank(), dist.get_world_size()
    parts = [None] * world
    dist.all_gather_object(parts, fn(items[rank::world]))
    out = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out
