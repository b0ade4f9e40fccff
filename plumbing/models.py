"""Model loading: tokenizers and causal LMs from a directory, a hub name or a GGUF file; their EOS ids; chat
prompts; dropout off and checkpointing for training; autocast."""
from __future__ import annotations



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


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the paper trains in bf16); full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


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
