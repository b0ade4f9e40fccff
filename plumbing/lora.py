"""LoRA (--lora_r N) for critic.py and dapo.py: the base model frozen (in fp32, or in bf16 on a GPU), low-rank adapters
trained in its decoder blocks, saved merged into plain weights.

With rank r, every targeted Linear W (out x in) of the decoder blocks computes W x + (alpha / r) B A x, A (r x in)
random and B (out x r) zero at the start, so the adapted model is exactly the base model until the first update.
Only A and B are trained, with their AdamW state in fp32; the critic's value head always trains in full (it sits
outside the adapted backbone). The scripts call four things at clear points:
  - LoraSettings, a mixin of their Config: the flags, checked with the other settings (peft installed, dropout 0);
  - add_lora(model, cfg, critic) after loading, before plumbing.distributed.distribute;
  - reference_mode(model), a context manager: the adapters disabled, the model is pi_ref (the frozen base), in
    the precision regime the actor trains in;
  - merged_state_dict(model, state) and plain_model(model) when saving: the adapters merged into the base weights
    (W + (alpha / r) B A, computed from the full state dict on rank 0's CPU, so it works on a sharded model too),
    the keys those of the plain model, so the saved directory loads without peft.
The resumable checkpoint (plumbing.checkpoints) holds the adapted model's state, base and adapters, and the
optimizer's, like any other model's: a killed LoRA run resumes under one process, DDP and FSDP alike.

peft is an optional install (requirements-optional.txt); asking for LoRA without it is one line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util

import torch

from plumbing.cli import arg, InputError

ADAPTER = "default"  # peft's name of the one adapter
BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class LoraSettings:
    lora_r: int = arg(0, "LoRA rank: train low-rank adapters of the decoder blocks' Linear layers on a frozen base "
                         "(needs peft); 0: full fine-tuning")
    lora_alpha: float = arg(16.0, "LoRA scale: the adapters' update is (alpha / r) B A")
    lora_dropout: float = arg(0.0, "LoRA dropout: must stay 0 (dropout would make log pi differ from log pi_ref "
                                   "at theta = theta_ref)")
    lora_target_modules: str = arg("all", "comma-separated names of the decoder blocks' Linear layers to adapt "
                                          "(e.g. q_proj,v_proj); all: every Linear of the blocks (never the LM "
                                          "head or the value head)")
    base_dtype: str = arg("float32", "dtype of the frozen base with --lora_r: float32 | bfloat16 (on a GPU: half "
                                     "the memory; the adapters and their AdamW state stay fp32)")

    def __post_init__(self):  # checked with the other settings, before any input is read or output written
        check_lora(self)
        if hasattr(super(), "__post_init__"):
            super().__post_init__()


def check_lora(cfg) -> None:
    """The LoRA settings, each refusal one line: a rank >= 0, dropout 0, a known base dtype (bf16 only with
    adapters, on a GPU), and peft installed when the rank is above 0."""
    if cfg.lora_r < 0:
        raise InputError(f"--lora_r must be 0 (full fine-tuning) or a positive rank, got {cfg.lora_r}")
    if cfg.base_dtype not in BASE_DTYPES:
        raise InputError(f"--base_dtype must be float32 or bfloat16, got {cfg.base_dtype!r}")
    if cfg.lora_r == 0:
        if cfg.base_dtype != "float32":
            raise InputError("--base_dtype bfloat16 needs --lora_r > 0: full fine-tuning keeps fp32 master weights")
        return
    if cfg.lora_dropout != 0:
        raise InputError(f"--lora_dropout must be 0, got {cfg.lora_dropout}: with dropout log pi would differ from "
                         "log pi_ref at theta = theta_ref (and the critic would be trained as another function than "
                         "the one queried)")
    if cfg.lora_alpha <= 0:
        raise InputError(f"--lora_alpha must be positive, got {cfg.lora_alpha}")
    if cfg.base_dtype == "bfloat16" and not torch.cuda.is_available():
        raise InputError("--base_dtype bfloat16 needs a GPU (bf16 autocast); on the CPU the base stays float32")
    if importlib.util.find_spec("peft") is None:
        raise InputError(f"--lora_r {cfg.lora_r} needs the package peft, which is not installed: "
                         "pip install -r requirements-optional.txt (or pip install 'peft>=0.13')")


def base_dtype(cfg) -> torch.dtype:
    """The dtype to load the model in: the frozen base's with LoRA, fp32 (the master weights) without."""
    return BASE_DTYPES[cfg.base_dtype] if cfg.lora_r else torch.float32


def block_linears(model, targets: str) -> list[str]:
    """The qualified names of the Linear layers inside the model's decoder blocks (those FSDP shards one by one:
    plumbing.distributed.decoder_layers), all of them or those whose own name is one of the comma-separated
    targets. The LM head and the critic's value head are outside the blocks."""
    from plumbing.distributed import decoder_layers

    layers = {id(m) for m in decoder_layers(model)}
    wanted = None if targets == "all" else {t.strip() for t in targets.split(",") if t.strip()}
    names, inside = [], []
    for name, module in model.named_modules():
        while inside and not name.startswith(inside[-1] + "."):
            inside.pop()
        if id(module) in layers:
            inside.append(name)
        elif inside and isinstance(module, torch.nn.Linear) and (wanted is None or name.rsplit(".", 1)[-1] in wanted):
            names.append(name)
    if not names:
        raise InputError(f"--lora_target_modules {targets}: no Linear layer of that name in the decoder blocks of "
                         f"{type(model).__name__}")
    return names


def add_lora(model, cfg, critic: bool):
    """With --lora_r > 0: the model's base frozen and LoRA adapters (fp32, B = 0: the model is unchanged) on the
    Linear layers of its decoder blocks. The actor (a causal LM) becomes a peft model; for the critic, its backbone
    does and the value head stays outside it, trained in full. With --lora_r 0, the model as it is. Call it after
    loading, before plumbing.distributed.distribute (which shards the adapted model like any other)."""
    if not cfg.lora_r:
        return model
    from peft import get_peft_model, LoraConfig

    target = model.backbone if critic else model
    peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                             target_modules=block_linears(target, cfg.lora_target_modules))
    adapted = get_peft_model(target, peft_config, autocast_adapter_dtype=True)  # fp32 adapters on a bf16 base
    for p in adapted.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    with torch.no_grad():  # the same start whether the model is built whole or on the meta device (load_sharded)
        start = adapter_init(adapted, getattr(cfg, "seed", 0))
        for name, p in adapted.named_parameters():
            if name in start and p.device.type != "meta":
                p.copy_(start[name])
    if critic:
        model.backbone = adapted
        return model
    return adapted


def adapter_init(model, seed: int) -> dict[str, torch.Tensor]:
    """The adapters' starting values by parameter name (of model, or of a model holding a peft model: the names
    as model.named_parameters gives them): every A as nn.Linear initialises its weight (Kaiming uniform), from
    a generator seeded with `seed`, in the order of the names, every B zero, so that B A = 0. A function of the
    names and shapes only: a model built on the meta device and filled shard by shard
    (plumbing.models.load_sharded) starts where the same model built whole does."""
    generator = torch.Generator().manual_seed(seed)
    start = {}
    for name, p in model.named_parameters():
        if f".lora_A.{ADAPTER}." in name:
            bound = 1 / p.shape[1] ** 0.5  # kaiming_uniform_(a=sqrt(5)) of a Linear: U(-1/sqrt(in), 1/sqrt(in))
            start[name] = (torch.rand(p.shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        elif f".lora_B.{ADAPTER}." in name:
            start[name] = torch.zeros(p.shape, dtype=torch.float32)
    return start


def trainable(model) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: all of them in full fine-tuning; the adapters (and the value head)
    with LoRA."""
    return [p for p in model.parameters() if p.requires_grad]


def _peft_models(model) -> list:
    """The peft models in a model: itself (the actor) or its backbone (the critic)."""
    try:
        from peft import PeftModel
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, PeftModel)]


@contextlib.contextmanager
def reference_mode(model):
    """Inside: the adapters disabled, so the model computes the frozen base, pi_ref, in the same precision regime
    as training (the base's dtype, the same autocast). Without LoRA: nothing changes."""
    with contextlib.ExitStack() as stack:
        for m in _peft_models(getattr(model, "module", model)):
            stack.enter_context(m.disable_adapter())
        yield model


def plain_model(model):
    """The transformers model inside a peft model (its Linear layers still adapted: save it with
    merged_state_dict's weights); any other model as it is."""
    return model.get_base_model() if _peft_models(model)[:1] == [model] else model


def merged_state_dict(model, state: dict | None) -> dict | None:
    """The weights to save: without LoRA, `state` as it is (None: the module's own). With LoRA, `state` (the full
    state dict, gathered on rank 0's CPU under FSDP; None: the module's own) with every adapter merged into its
    base weight, W + (alpha / r) B A, in fp32, and the keys of the plain model (no base_model.model., no
    base_layer, no lora_A / lora_B): the directory saved from it loads without peft."""
    peft_models = _peft_models(getattr(model, "module", model))
    if not peft_models:
        return state
    state = model.state_dict() if state is None else state
    scale = {name: m.scaling[ADAPTER] for name, m in model.named_modules()
             if isinstance(getattr(m, "scaling", None), dict) and ADAPTER in m.scaling}
    merged = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        value = value.float() if value.is_floating_point() else value
        if key.endswith(".base_layer.weight"):
            layer = key.removesuffix(".base_layer.weight")
            a, b = (state[f"{layer}.lora_{x}.{ADAPTER}.weight"].float() for x in "AB")  # [r, in], [out, r]
            value = value + scale[layer] * (b @ a)  # [out, in]
        merged[key.replace(".base_layer.", ".").replace("base_model.model.", "", 1)] = value
    return merged
