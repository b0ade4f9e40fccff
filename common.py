"""Shared plumbing for rollout.py, critic.py, dapo.py and eval.py.

Nothing of the algorithm lives here: only what several scripts need in the same form.
  - config: a dataclass per script, whose fields carry their help text, parsed from the command line
  - errors: bad input raises InputError (file and line in the message); `run` turns it into one line + exit 2
  - DDP: `setup_distributed` works under plain `python` (one process) and under `torchrun`
  - FSDP2: sharding, gradient sync, clipping and checkpoints that work the same on plain, DDP and sharded models
  - JSONL: validated reading, crash-safe appending, atomic writing
  - models: tokenizer / causal LM loading with clear errors, prompts, step delimiters in token space
  - training: learning-rate schedule and resumable checkpoints shared by the critic and the actor
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import glob
import inspect
import json
import os
import shutil
import sys
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


# ----------------------------------------------------------------------------- config
def arg(default: Any, help: str) -> Any:
    """A config field with its one line of documentation (shown by --help)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def parse_config(cls: type, argv: list[str] | None = None):
    """Build an argparse CLI from a config dataclass: every field becomes --name."""
    doc = sys.modules[cls.__module__].__doc__ or ""
    description = " ".join(doc.strip().split("\n\n")[0].split()).replace("%", "%%")  # its first paragraph, whole
    parser = argparse.ArgumentParser(allow_abbrev=False, description=description)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = f.type if isinstance(f.type, type) else eval(f.type, {})  # annotations are strings
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")  # argparse formats %
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=_parse_bool, default=default, help=help_text, metavar="BOOL")
        elif default is None:
            parser.add_argument(f"--{f.name}", type=str, default=None, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=default, help=help_text)
    return cls(**vars(parser.parse_args(argv)))


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# ----------------------------------------------------------------------------- errors
class InputError(Exception):
    """Bad input from the user (a file, a field, a path): reported as one line, exit status 2."""


def run(main: Callable[[], Any]) -> None:
    """Call main(); turn an InputError into one clear line on stderr and a non-zero exit."""
    try:
        main()
    except InputError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)  # one line, whatever it wraps
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)


# ----------------------------------------------------------------------------- progress bars
def progress(iterable=None, **kwargs):
    """A tqdm bar on a terminal. When stderr goes to a file there is none (the scripts print their own lines of
    progress and results): a redrawn or stacked bar leaves carriage returns and cursor moves in a log."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)


# ----------------------------------------------------------------------------- DDP
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
    """One process under `python`, one per GPU (or CPU worker) under `torchrun`.

    torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPUs, gloo on the CPU (what the tests use)."""
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
        # Two CPU processes on two cores: one thread each, or they fight over the cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return Dist(rank, world, local, device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_ranks_sum(x: float) -> float:
    """Sum a number over all ranks (itself when there is one process)."""
    if not dist.is_initialized():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- FSDP2
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


def check_shardable(path: str, auto_class) -> None:
    """Fail fast, before any work, when --fsdp cannot shard a model: its skeleton is built on the meta device
    (no weight is read or allocated) and searched for decoder layers."""
    from transformers import AutoConfig

    source, gguf = gguf_source(path)
    with torch.device("meta"):
        model = auto_class.from_config(AutoConfig.from_pretrained(source, **gguf))
    if not decoder_layers(model):
        raise InputError(f"{path}: --fsdp cannot find the decoder layers of {type(model).__name__} to shard "
                         "(its class declares no _no_split_modules); run without --fsdp")


def distribute(model, ddp: Dist, fsdp: bool):
    """The model the training loop calls. One process: the model itself. Under torchrun: wrapped by DDP, or,
    with fsdp, sharded in place by FSDP2 (every decoder layer, then the root: embeddings, final norm, heads).
    On CUDA the shards stay fp32 (the master weights) while layers compute in bf16 and gradients are reduced
    in fp32; on the CPU everything stays fp32. Build the optimizer after this: sharding replaces parameters."""
    layers = decoder_layers(model) if fsdp else []
    if fsdp and not layers:  # checked in one process too: the same command under torchrun would fail
        raise InputError(f"--fsdp cannot find the decoder layers of {type(model).__name__} to shard; "
                         "run without --fsdp")
    if fsdp and dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(ddp.device.type, (ddp.world_size,))
        mixed = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if ddp.device.type == "cuda" else MixedPrecisionPolicy())
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=mixed)
        fully_shard(model, mesh=mesh, mp_policy=mixed)
        return model
    if ddp.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[ddp.local_rank] if ddp.device.type == "cuda" else None)
    return model


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
        finalize_dir(tmp, path)
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


# ----------------------------------------------------------------------------- JSONL
def read_jsonl(path: str, required: Iterable[str] = (), allow_empty: bool = False,
               flags: dict[str, str] | None = None) -> list[dict]:
    """Read and validate every line before anything is computed, so bad input fails fast and
    names the file and line. `flags` maps a required field to the flag that names it, for the message."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path} line {line_no}: expected a JSON object, got {type(record).__name__}")
            missing = [k for k in required if k not in record]
            if missing:
                named_by = [flags[k] for k in missing if flags and k in flags]
                raise InputError(f"{path} line {line_no}: missing field(s) {', '.join(missing)}"
                                 + (f" (other field names: {', '.join(named_by)})" if named_by else ""))
            record["_line"] = line_no
            records.append(record)
    if not records and not allow_empty:
        raise InputError(f"{path}: the file is empty")
    return records


def read_shard(path: str) -> list[dict]:
    """Records of a shard that this program appended itself. A line cut short by a kill is dropped
    (and truncated away) so that the rerun appends after the last complete record."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    keep = data[: data.rfind(b"\n") + 1]  # everything up to the last complete line
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return [json.loads(line) for line in keep.decode("utf-8").splitlines() if line.strip()]


def read_shards(out_dir: str) -> list[dict]:
    """The records of every rank's shard-RANK.jsonl in out_dir (a rerun may use another number of ranks)."""
    return [r for path in sorted(glob.glob(os.path.join(out_dir, "shard-*.jsonl"))) for r in read_shard(path)]


def append_jsonl(f, record: dict) -> None:
    """One line per finished unit of work, flushed to disk before the next begins (resume after a kill)."""
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> None:
    """Write to a temporary file and rename: readers see the old file or the whole new one, never half."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def check_rerun(cfg, out_dir: str, done: str, settings: str, work: list[str], ignore: tuple[str, ...], is_main: bool,
                covers: Callable[[dict], bool] = lambda record: True) -> bool:
    """The one rule of the four scripts for a run over earlier output; call it before anything is written.
      - --overwrite true: out_dir, the settings file and the work paths are removed first; the run starts afresh.
      - Finished output (`done`, the JSON file a run writes last, with its settings under "config"): made with
        these settings, it is complete: say so and return True (the caller exits 0; nothing is redone or
        rewritten). Made with other settings: stop, naming them.
      - Unfinished work (the existing `work` paths: shards, a checkpoint), whose run recorded its settings in
        `settings`: resumed only with the same settings, else stop, naming those that differ.
    `ignore` names the settings a rerun may change (where output goes, speed, logging, how many questions): none
    alters a saved result. `covers(done record)` says whether finished output holds all this command asks for
    (more questions than it holds: resumed from the work, or refused when there is none)."""
    if cfg.overwrite:
        barrier()  # every rank has looked at the old output before rank 0 removes it
        if is_main:
            for path in [out_dir, settings, *work]:
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        barrier()
    ours = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignore}
    retry = "rerun with those settings, add --overwrite true to replace it, or use another --out_dir"
    work = [p for p in work if os.path.exists(p)]
    if os.path.exists(done):
        with open(done, encoding="utf-8") as f:
            record = json.load(f)
        theirs = record.get("config", {})
        if _changed(ours, theirs):
            raise InputError(f"{done}: {out_dir} holds the finished output of a run with other settings "
                             f"({_changed(ours, theirs)}); {retry}")
        if covers(record):
            if is_main:
                print(f"{out_dir}: complete, made with these settings; nothing to do (--overwrite true redoes it)")
            return True
        if not work:  # it would be replaced by a run that holds other questions
            everything = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out_dir", "overwrite")}
            raise InputError(f"{done}: {out_dir} holds the finished output of a run over other questions "
                             f"({_changed(everything, theirs)}); {retry}")
    if work and os.path.exists(settings):
        with open(settings, encoding="utf-8") as f:
            theirs = json.load(f)
        if _changed(ours, theirs):
            raise InputError(f"{settings}: {out_dir} holds unfinished work of a run with other settings "
                             f"({_changed(ours, theirs)}); {retry}")
    barrier()  # every rank has compared before rank 0 rewrites the file
    if is_main:
        os.makedirs(os.path.dirname(settings) or ".", exist_ok=True)
        write_json_atomic(settings, ours)
    return False


def _changed(ours: dict, theirs: dict) -> str:
    """The settings that differ, as '--name old -> new, ...' ('' when none does)."""
    return ", ".join(f"--{k} {theirs[k]!r} -> {ours[k]!r}" for k in ours if k in theirs and theirs[k] != ours[k])


def warn_useless_data(labels: list[float] = (), cut: int = 0, responses: int = 0, after: str = "") -> bool:
    """One warning line (stderr) when the data cannot teach anything: every MC label is the same (the critic can
    only learn a constant, and DAPO's advantages are then the critic's errors), or most responses were cut by the
    token limit (they count as wrong). `after` says what follows from it for the script. True when it warned."""
    reasons = []
    if labels and len(set(labels)) == 1:
        reasons.append(f"every MC label is {labels[0]:g} ({len(labels)} states){after}")
    if responses and cut > responses / 2:
        reasons.append(f"{cut} of {responses} responses were cut by the token limit (they count as wrong): "
                       "raise --max_new_tokens")
    if reasons:
        print("warning: " + "; ".join(reasons), file=sys.stderr, flush=True)
    return bool(reasons)


# ----------------------------------------------------------------------------- models
def check_model_path(path: str, what: str = "model") -> None:
    """A local directory (or GGUF file) must exist; a hub-style name ("org/name") is left to transformers."""
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1 or os.sep != "/"
    if looks_local and not os.path.exists(path):
        kind = "GGUF model file" if path.endswith(".gguf") else f"{what} path"
        raise InputError(f"{path}: {kind} does not exist")


def gguf_source(path: str) -> tuple[str, dict]:
    """from_pretrained arguments for a model path: a GGUF file (name ending in .gguf) is read as (its
    directory, gguf_file=its name) and dequantised to float, which needs the optional packages gguf and
    accelerate (requirements-optional.txt); anything else is passed on unchanged."""
    if not path.endswith(".gguf"):
        return path, {}
    import importlib.util

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(f"{path}: reading a GGUF file needs the package(s) {', '.join(missing)}: "
                         "pip install -r requirements-optional.txt")
    return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}


def load_pretrained(auto_class, path: str, dtype: torch.dtype):
    """auto_class.from_pretrained for a directory, a hub name or a GGUF file. A model read from GGUF holds
    float weights but stays marked as GGUF-quantised, which forbids save_pretrained; the marks are removed, so
    a model trained from a GGUF file saves as a plain directory that loads without the GGUF packages."""
    source, gguf = gguf_source(path)
    model = auto_class.from_pretrained(source, dtype=dtype, **gguf)
    if gguf:
        model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def materialize_gguf(gguf_path: str, out_dir: str) -> None:
    """Dequantise a GGUF file once into a normal Hugging Face directory (float32 weights, tokenizer with its
    chat template): every stage then loads it quickly, and nothing it produces needs the GGUF packages.
        python -c "import common; common.materialize_gguf('model.Q8_0.gguf', 'runs/base')"
    """
    if not gguf_path.endswith(".gguf"):
        raise InputError(f"{gguf_path}: not a GGUF file (the name must end in .gguf)")
    tok = load_tokenizer(gguf_path)
    model = load_causal_lm(gguf_path, torch.device("cpu"))
    tmp = out_dir.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    finalize_dir(tmp, out_dir)
    print(f"wrote {gguf_path} as a Hugging Face model directory (float32): {out_dir}")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    check_model_path(path, "tokenizer")
    source, gguf = gguf_source(path)
    try:
        tok = AutoTokenizer.from_pretrained(source, **gguf)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot load a tokenizer ({e})") from None
    if tok.pad_token_id is None:  # many chat models have no pad token: pad = EOS is safe with attention masks
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends on the right, so prompts are padded on the left
    return tok


def load_causal_lm(path: str, device: torch.device, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    check_model_path(path)
    try:
        model = load_pretrained(AutoModelForCausalLM, path, dtype)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot load a causal language model ({e})") from None
    return model.to(device)


def build_prompt_ids(tok, question: str, instruction: str = DEFAULT_INSTRUCTION) -> list[int]:
    """The prompt of a question as token ids: the model's chat template when it has one, else a plain
    '{question}\\n{instruction}\\n' (the toy model's format)."""
    content = f"{question}\n{instruction}" if instruction else question
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tok(content + "\n").input_ids


def lm_forward(model, input_ids, attention_mask, position_ids=None, cache=None, last_only=False):
    """One causal-LM forward that returns (logits, cache). Transformers 5 renamed `past_key_values` to
    `cache`; this accepts either so the scripts run on both sides of the rename."""
    name = _cache_argument(type(model))
    extra = {"logits_to_keep": 1} if last_only else {}  # skip the [B, L, V] logits of a long prompt
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, **{name: cache}, **extra)
    return out.logits, getattr(out, name)


@functools.lru_cache
def _cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def delimiter_token_mask(tok, delimiter: str) -> torch.Tensor:
    """[vocab] bool: True for every token whose text contains the step delimiter.

    Steps live in token space: a step ends at the first such token (for "\\n" that includes merged tokens
    like ".\\n" or "\\n\\n"), so states are always exact token prefixes and never re-tokenised."""
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    return torch.tensor([delimiter in t for t in texts], dtype=torch.bool)


def split_steps(response_ids: list[int], is_delim: torch.Tensor, eos_id: int | None) -> list[list[int]]:
    """Cut a response into steps: each step ends with a delimiter token; the last one ends with EOS
    (kept: it is the action that ends the solution) or is cut by the token limit."""
    steps, current = [], []
    for t in response_ids:
        current.append(t)
        if t == eos_id or bool(is_delim[t]):
            steps.append(current)
            current = []
            if t == eos_id:
                break
    if current:
        steps.append(current)
    return steps


# ----------------------------------------------------------------------------- shared-prefix rows
@dataclasses.dataclass
class SharedPrefixRows:
    """A batch of states with their candidate actions, one row per state: the state's tokens once, then every
    action after it, with a block attention mask in which each action sees the state and itself only, and
    position ids that restart after the state. Every action token therefore gets the hidden state it would
    get in the sequence state . action on its own, while the state is read once instead of once per action.
    Rows are left-padded, so the actions of every row end at the last column."""

    input_ids: torch.Tensor  # [B, W]
    position_ids: torch.Tensor  # [B, W]
    allowed: torch.Tensor  # [B, 1, W, W] True where a query token (dim 2) may attend to a key token (dim 3)
    # Per action token (T of them, actions in order): row, column, column of the token that predicts it
    # (the previous action token, or the state's last token for an action's first token) and action index.
    token_row: torch.Tensor  # [T]
    token_col: torch.Tensor  # [T]
    token_from: torch.Tensor  # [T]
    token_action: torch.Tensor  # [T]
    # Per action (N): row and column of its last token; an empty action ends at the state's last token.
    last_row: torch.Tensor  # [N]
    last_col: torch.Tensor  # [N]

    @property
    def num_actions(self) -> int:
        return len(self.last_row)

    def attention_mask(self, config) -> torch.Tensor:
        """`allowed` in the form a transformers model takes as a custom 4-D mask (passed through unchanged):
        boolean for sdpa, additive (0 or a large negative number) for eager attention, which adds it to the
        scores. Flash-attention and the other kernels take no mask of this shape, hence the refusal."""
        implementation = config._attn_implementation
        if implementation == "sdpa":
            return self.allowed
        if implementation == "eager":
            return torch.zeros(self.allowed.shape, device=self.allowed.device).masked_fill(
                ~self.allowed, torch.finfo(torch.float32).min)  # [B, 1, W, W]
        raise InputError(f"attn_implementation={implementation!r}: shared-prefix rows need a custom 4-D attention "
                         "mask, which only 'sdpa' and 'eager' take; load the model with attn_implementation='sdpa'")


def shared_prefix_rows(states: list[list[int]], actions: list[list[list[int]]], device) -> SharedPrefixRows:
    """Pack each state with its actions (actions[i] are the candidates of states[i]) into one row."""
    if any(not s for s in states):
        raise ValueError("shared_prefix_rows: a state needs at least one token (its prompt)")
    lengths = [len(s) + sum(map(len, a)) for s, a in zip(states, actions)]
    width = max(lengths)
    ids, positions, segments = [], [], []
    token_row, token_col, token_from, token_action, last_row, last_col = [], [], [], [], [], []
    for row, (state, acts, n) in enumerate(zip(states, actions, lengths)):
        pad = width - n
        ids.append([0] * pad + state + [t for a in acts for t in a])  # the padding's ids are never attended to
        positions.append([0] * pad + list(range(len(state))) + [len(state) + k for a in acts for k in range(len(a))])
        # Segment -1: padding, 0: the state, j + 1: action j. A token attends to earlier tokens of the state and
        # of its own segment; padding (on the left) only to padding, so no query row is fully masked.
        segments.append([-1] * pad + [0] * len(state) + [j + 1 for j, a in enumerate(acts) for _ in a])
        state_end = pad + len(state) - 1  # column of the state's last token
        col = state_end + 1
        for a in acts:
            for k in range(len(a)):
                token_row.append(row)
                token_col.append(col + k)
                token_from.append(col + k - 1 if k else state_end)
                token_action.append(len(last_row))
            last_row.append(row)
            last_col.append(col + len(a) - 1 if a else state_end)
            col += len(a)
    tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
    segment = tensor(segments)  # [B, W]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()  # [W, W]
    same_or_state = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == 0)  # [B, W, W]
    return SharedPrefixRows(tensor(ids), tensor(positions), (causal & same_or_state)[:, None],
                            tensor(token_row), tensor(token_col), tensor(token_from), tensor(token_action),
                            tensor(last_row), tensor(last_col))


def pack(indices: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive states packed into groups of at most `limit` actions (a state larger than the limit forms
    its own group)."""
    groups, current, count = [], [], 0
    for i in indices:
        if current and count + sizes[i] > limit:
            groups.append(current)
            current, count = [], 0
        current.append(i)
        count += sizes[i]
    return groups + [current] if current else groups



# ----------------------------------------------------------------------------- training
def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up to the peak, then linear decay to zero."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def save_checkpoint(path: str, state: dict) -> None:
    """A dict (dapo.py's cache of Q values and log pi_ref) written atomically; model training state goes through
    save_training_state instead."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=False) if os.path.exists(path) else None


def finalize_dir(tmp_dir: str, out_dir: str) -> None:
    """Replace out_dir with the fully written tmp_dir, so a half-saved model never looks finished."""
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)


def enable_checkpointing(model) -> None:
    """Recompute activations in the backward pass (less memory, more compute). Transformers 5 renamed
    gradient checkpointing to activation checkpointing; either name works."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the paper trains in bf16); full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
