"""Model loading: tokenizers and causal LMs from a directory, a hub name or a GGUF file, whole or (under FSDP)
straight into each rank's shards; their EOS ids; chat prompts; dropout off and checkpointing for training; the
precision regime (autocast)."""
from __future__ import annotations

import contextlib
import json
import os

import torch

from plumbing.cli import InputError
from plumbing.distributed import decoder_layers
from plumbing.runfiles import atomic_dir


DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def check_model_path(path: str, what: str = "model") -> None:
    """A local directory or GGUF file must exist; a hub-style name ("org/name", not ending in .gguf: transformers
    reads a GGUF file from a directory only) is left to transformers."""
    looks_local = path.endswith(".gguf") or path.startswith((".", "/", "~")) or path.count("/") != 1 or os.sep != "/"
    if looks_local and not os.path.exists(path):
        kind = "GGUF model file" if path.endswith(".gguf") else f"{what} path"
        raise InputError(f"{path}: {kind} does not exist")


def gguf_source(path: str) -> tuple[str, dict]:
    """from_pretrained arguments for a model path: a GGUF file (name ending in .gguf) is read as (its
    directory, gguf_file=its name) and dequantised to float, which needs the optional packages gguf and
    accelerate (requirements-optional.txt); anything else is passed on unchanged. A GGUF file is always
    local: one that does not exist says so, whichever packages are installed."""
    if not path.endswith(".gguf"):
        return path, {}
    check_model_path(path)
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
        python -c "from plumbing.models import materialize_gguf; materialize_gguf('model.Q8_0.gguf', 'runs/base')"
    """
    if not gguf_path.endswith(".gguf"):
        raise InputError(f"{gguf_path}: not a GGUF file (the name must end in .gguf)")
    tok = load_tokenizer(gguf_path)
    model = load_causal_lm(gguf_path, torch.device("cpu"))
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
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


def eos_token_ids(tok, model=None) -> set[int]:
    """Every token id that ends a response: the tokenizer's EOS and each EOS id of the model's generation
    config, one id or a list (instruct models list several: Llama-3.1-Instruct three, Qwen2.5-Instruct two).
    A response that ends with one the sampler does not know runs on to the token limit and is graded wrong.
    from_pretrained reads generation_config.json, or builds the generation config from config.json when
    there is none (a directory without the file; a GGUF file, of which transformers reads one EOS id); a
    model without one (not a transformers model) leaves the tokenizer's."""
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = listed if isinstance(listed, (list, tuple)) else [listed]
    return {int(i) for i in [tok.eos_token_id, *listed] if i is not None}


def build_prompt_ids(tok, question: str, instruction: str = DEFAULT_INSTRUCTION) -> list[int]:
    """The prompt of a question as token ids: the model's chat template when it has one, else a plain
    '{question}\\n{instruction}\\n' (the toy model's format)."""
    content = f"{question}\n{instruction}" if instruction else question
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tok(content + "\n").input_ids


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off for training, the model staying in train mode (gradient checkpointing runs only in train
    mode). log pi_ref is computed in eval mode, so with dropout on log(pi/pi_ref) would not be 0 at theta =
    theta_ref, and a critic trained with dropout would not be the function it is queried as. Every dropout
    module gets p = 0, and so does every float named like a dropout rate (attention_dropout, dropout,
    attn_pdrop, layerdrop, ...) held by a module or by its config: attention functions and layer drop read
    them beside self.training, some (Persimmon) from the config. A saved model's config then says 0."""
    from transformers import PretrainedConfig

    def zero_rates(holder, seen: set) -> None:
        for name, value in list(vars(holder).items()):
            if "drop" in name and isinstance(value, float):
                setattr(holder, name, 0.0)
            elif isinstance(value, PretrainedConfig) and id(value) not in seen:  # a config, or a sub-config
                seen.add(id(value))
                zero_rates(value, seen)

    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):  # Dropout, Dropout1d/2d/3d, AlphaDropout
            module.p = 0.0
        zero_rates(module, seen)


def enable_checkpointing(model) -> None:
    """Recompute activations in the backward pass (less memory, more compute). Transformers 5 renamed
    gradient checkpointing to activation checkpointing; either name works."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


PRECISIONS = ("auto", "bf16", "fp32")
_precision = "auto"


def set_precision(name: str) -> None:
    """The run's precision regime (--precision), for every forward pass of the process: auto is bf16 autocast
    on CUDA (the paper trains in bf16) and fp32 on the CPU; bf16 asks for bf16 autocast on the CPU too (it
    emulates the GPU's regime there: tests/test_precision.py); fp32 turns autocast off everywhere. One regime
    for training and for the passes stage B caches (Q, log pi_ref): a value computed in one and compared with
    one computed in another is biased."""
    global _precision
    if name not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    _precision = name


def bf16_compute(device: torch.device) -> bool:
    """Whether this run's layers compute in bf16 (set_precision): autocast, and FSDP's gathered weights."""
    return _precision == "bf16" or (_precision == "auto" and device.type == "cuda")


def compute_dtype(model) -> torch.dtype:
    """The dtype model's layers compute in without autocast: its parameters', or bf16 for a model sharded by
    FSDP whose units gather their weights in bf16 (plumbing.distributed.distribute)."""
    from plumbing.distributed import is_sharded

    parameter = next(model.parameters())
    return torch.bfloat16 if is_sharded(model) and bf16_compute(parameter.device) else parameter.dtype


def autocast(device: torch.device):
    """bf16 autocast where the run computes in bf16 (set_precision), else full precision; the master weights
    stay fp32 either way."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_compute(device))


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


# =================================================================== FSDP: loading straight into each rank's shards
# Under --fsdp no rank ever holds a whole copy of a model: its skeleton is built with its parameters on the meta
# device (no memory), sharded by FSDP2, each rank's shards allocated, and then filled one checkpoint tensor at a
# time: rank 0 reads the tensor (memory-mapped from the safetensors files), broadcasts it, every rank keeps its
# slice. Rank 0 reads and broadcasts (as accelerate and verl do) rather than every rank reading its own slices (as
# torchtitan's dcp.load of the safetensors does): one reader of a network file system instead of all, any
# checkpoint layout transformers writes, and the same code for a hub name or a local directory.
@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter created inside is moved to the meta device as it is registered (a shape, no memory);
    buffers stay real, so a non-persistent one that is not in any checkpoint (the rotary inv_freq) keeps the
    value its module computed. A parameter assigned again (tied embeddings) is already on meta and stays the
    same object: the tie holds."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_on_meta(path: str, auto_class, dtype: torch.dtype = torch.float32):
    """auto_class's model of the checkpoint at path, its parameters on the meta device (in dtype when
    materialised)."""
    from transformers import AutoConfig

    source, gguf = gguf_source(path)
    try:
        config = AutoConfig.from_pretrained(source, **gguf)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the model's config ({e})") from None
    with parameters_on_meta():
        return auto_class.from_config(config, dtype=dtype)


def safetensors_files(path: str) -> list[str] | None:
    """The safetensors files of a checkpoint (a directory or a hub name), or None: a GGUF file, .bin weights, or
    a hub name not in the local cache and not downloadable."""
    if path.endswith(".gguf"):
        return None
    if os.path.isdir(path):
        folder = path
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
    else:
        try:
            from transformers.utils import cached_file

            index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
            single = None if index else cached_file(path, "model.safetensors",
                                                    _raise_exceptions_for_missing_entries=False)
        except (OSError, ValueError):
            return None
        folder = os.path.dirname(index or single or "")
    if index and os.path.isfile(index):
        names = sorted(set(json.load(open(index))["weight_map"].values()))
        if not os.path.isdir(path):  # a hub name: each shard file into the cache
            from transformers.utils import cached_file

            return [cached_file(path, name) for name in names]
        return [os.path.join(folder, name) for name in names]
    return [single] if single and os.path.isfile(single) else None


class CheckpointTensors:
    """The tensors of a checkpoint by name, read one at a time (rank 0 only). From its safetensors files,
    memory-mapped: a tensor read becomes anonymous memory only as the copy that is broadcast. Where there
    are none (a GGUF file, .bin weights), or a parameter of the model is not found with its shape (a checkpoint
    that transformers converts while loading), the whole model is loaded once, by rank 0, and read from.
    required: the model's parameters and their shapes; optional: its persistent buffers (filled when found)."""

    def __init__(self, path: str, auto_class, required: dict[str, torch.Size], optional: dict[str, torch.Size]):
        self.whole, self.found = None, {}
        files = safetensors_files(path)
        if files:
            from safetensors import safe_open

            opened = [safe_open(f, framework="pt") for f in files]
            shapes = {k: (f, tuple(f.get_slice(k).get_shape())) for f in opened for k in f.keys()}  # noqa: SIM118
            for name, shape in {**optional, **required}.items():
                key = next((k for k in self.candidates(name) if shapes.get(k, (0, None))[1] == tuple(shape)), None)
                if key is not None:
                    self.found[name] = (shapes[key][0], key)
        if not all(name in self.found for name in required):
            print(f"{path}: rank 0 loads the whole model once to fill the shards (no safetensors files with the "
                  "model's own parameter names and shapes)", flush=True)
            self.whole, self.found = load_pretrained(auto_class, path, torch.float32).state_dict(), {}
            missing = [name for name in required if not self.has(name)]
            if missing:
                raise InputError(f"{path}: the checkpoint holds no {', '.join(missing[:3])}")

    @staticmethod
    def candidates(name: str) -> list[str]:
        """Where a parameter of a base model (AutoModel, e.g. a critic's backbone) or of a causal LM may sit in a
        checkpoint saved from either: its own name, or with a base model's prefix added or removed."""
        name = name.replace(".base_layer.", ".")  # a Linear that LoRA adapts (peft) holds the base as base_layer
        prefixes = ("model.", "transformer.", "backbone.")
        return [name, *(p + name for p in prefixes), *(name[len(p):] for p in prefixes if name.startswith(p))]

    def has(self, name: str) -> bool:
        return name in self.found if self.whole is None else name.replace(".base_layer.", ".") in self.whole

    def get(self, name: str) -> torch.Tensor:
        if self.whole is not None:
            return self.whole[name.replace(".base_layer.", ".")]
        f, key = self.found[name]
        return f.get_tensor(key)


@torch.no_grad()
def fill_shards(model, read, names: list[str], device: torch.device) -> None:
    """Give the sharded model (after to_empty) its values: for each name, rank 0 reads the full tensor (read(name)),
    broadcasts it in the target's dtype, and every rank copies its own slice into its shard. At most one full
    tensor is in flight per rank."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name in names:
        target = tensors[name]
        full = (read(name).to(device=device, dtype=target.dtype) if dist.get_rank() == 0
                else torch.empty(target.shape, dtype=target.dtype, device=device))
        dist.broadcast(full, src=0)
        if hasattr(target, "device_mesh"):  # a DTensor: this rank's slice, as FSDP2 cuts it
            full = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
            target = target.to_local()
        target.copy_(full)
        del full


def load_sharded(path: str, auto_class, ddp, wrap=None, extra=None, dtype: torch.dtype = torch.float32):
    """The model of path (its weights in dtype), sharded by FSDP2 over the ranks, no rank holding a whole copy on
    the way: built on the meta device, sharded (plumbing.distributed.distribute), each rank's shards allocated on
    its device, then filled from the checkpoint (fill_shards). wrap(model) builds a model around it, on the meta
    device too (the critic around its backbone, LoRA adapters in its layers), whose own parameters come from
    extra(wrapped model): full tensors by name, on every rank. Every rank must call it."""
    import torch.distributed as dist

    from plumbing.distributed import distribute

    inner = build_on_meta(path, auto_class, dtype)
    with parameters_on_meta():
        model = wrap(inner) if wrap else inner
    extra = extra(model) if extra else {}
    prefix = "" if model is inner else next(n + "." for n, m in model.named_modules() if m is inner)
    distribute(model, ddp, fsdp=True)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # computed by their modules
    model.to_empty(device=ddp.device)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    saved = set(model.state_dict())  # parameters and persistent buffers
    required = {n.removeprefix(prefix): p.shape for n, p in model.named_parameters() if n not in extra}
    optional = {n.removeprefix(prefix): b.shape for n, b in model.named_buffers() if n in saved and n not in extra}
    reader, names = None, [None]
    if dist.get_rank() == 0:
        try:
            reader = CheckpointTensors(path, auto_class, required, optional)
            names[0] = [*extra, *(prefix + n for n in required), *(prefix + n for n in optional if reader.has(n))]
        except InputError as e:  # every rank stops with rank 0's line, none waits for a broadcast that never comes
            names[0] = str(e)
    dist.broadcast_object_list(names, src=0)
    if isinstance(names[0], str):
        raise InputError(names[0])
    fill_shards(model, lambda n: extra[n] if n in extra else reader.get(n.removeprefix(prefix)), names[0], ddp.device)
    return model
