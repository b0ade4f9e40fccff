"""Shared plumbing for rollout.py, critic.py, dapo.py and eval.py.

Nothing of the algorithm lives here: only what several scripts need in the same form.
  - config: a dataclass per script, whose fields carry their help text, parsed from the command line
  - errors: bad input raises InputError (file and line in the message); `run` turns it into one line + exit 2
  - DDP: `setup_distributed` works under plain `python` (one process) and under `torchrun`
  - JSONL: validated reading, crash-safe appending, atomic writing
  - models: tokenizer / causal LM loading with clear errors, prompts, step delimiters in token space
  - training: learning-rate schedule and resumable checkpoints shared by the critic and the actor
"""
from __future__ import annotations

import argparse
import dataclasses
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


def setup_distributed() -> Dist:
    """One process under `python`, one per GPU (or CPU worker) under `torchrun`.

    torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPUs, gloo on the CPU (what the tests use)."""
    if int(os.environ.get("RANK", -1)) == -1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(0, 1, 0, device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    else:
        # Two CPU processes on two cores: one thread each, or they fight over the cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        device = torch.device("cpu")
        dist.init_process_group("gloo")
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


# ----------------------------------------------------------------------------- training
def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up to the peak, then linear decay to zero."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def save_checkpoint(path: str, state: dict) -> None:
    """A resumable checkpoint is one dict {model, optimizer, step, ...} written atomically."""
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


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

