"""Benchmark (a script, not a test): tokens per second of the two engines of --engine, the batched Hugging Face
engine (plumbing/generation.py) and vLLM (plumbing/vllm_engine.py), on the same prompts with the same settings.

  1. Prompts: the first --questions questions of --data, each in the model's prompt format (chat template),
     each repeated --samples_per_question times (as the generator samples n1 per question).
  2. Each engine generates them all, once for a warm-up on a few, then timed: tokens / seconds.
  3. Prints both speeds and their ratio and, when greedy (--temperature 0), on how many prompts the two engines
     wrote the same tokens.

The HF engine runs first and is freed before vLLM starts (on a GPU vLLM takes --gpu_memory_utilization of it).
On a GPU both run in bf16, on the CPU in fp32, as rollout.py and eval.py run them. Needs vLLM (docs/scaling.md).

    python data/toy/prepare.py --out_dir runs/toy
    python tools/benchmark_engines.py --model runs/toy/sft --data runs/toy/test.jsonl --questions 300 \\
        --samples_per_question 8 --max_new_tokens 40 --threads 1
    python tools/benchmark_engines.py --model Qwen/Qwen2.5-Math-1.5B-Instruct --data data/math/test500.jsonl \\
        --question_field problem --questions 500 --samples_per_question 16 --max_new_tokens 1024   # a GPU
"""
from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing.cli import arg, parse_config, run  # noqa: E402
from plumbing.distributed import setup_distributed  # noqa: E402
from plumbing.models import build_prompt_ids, eos_token_ids, load_tokenizer  # noqa: E402
from plumbing.runfiles import read_jsonl  # noqa: E402
from plumbing.vllm_engine import check_engine, EngineConfig, generate, load_policy  # noqa: E402


@dataclasses.dataclass
class Config(EngineConfig):
    model: str = arg("runs/toy/sft", "policy: a Hugging Face directory or hub name")
    data: str = arg("runs/toy/test.jsonl", "JSONL of questions")
    question_field: str = arg("question", "field of the question text")
    questions: int = arg(300, "questions used (the first N)")
    samples_per_question: int = arg(8, "each prompt is repeated this many times, as the generator does")
    max_new_tokens: int = arg(40, "token limit per sequence")
    temperature: float = arg(1.0, "sampling temperature (0: greedy, and the tokens of the two engines are compared)")
    top_p: float = arg(1.0, "nucleus sampling threshold")
    batch_size: int = arg(256, "sequences per batch of the HF engine (vLLM schedules its own)")
    threads: int = arg(0, "CPU threads of each engine (0: their defaults); 1 gives steadier figures on a busy machine")
    seed: int = arg(0, "sampling seed")


def timed(model, prompts, tok, cfg: Config) -> tuple[list, float, float]:
    """(generations, wall seconds, CPU seconds of this process: steadier on a shared machine; on the CPU the
    vLLM engine runs inside this process, so they count it too)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kw = dict(eos_ids=eos_token_ids(tok, model), pad_id=tok.pad_token_id, max_new_tokens=cfg.max_new_tokens,
              temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size, vocab_size=len(tok))
    generate(model, prompts[:8], generator=torch.Generator(device).manual_seed(cfg.seed), **kw)  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    out = generate(model, prompts, generator=torch.Generator(device).manual_seed(cfg.seed), **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    cfg = parse_config(Config)
    check_engine(dataclasses.replace(cfg, engine="vllm"), cfg.model)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        # vLLM's CPU worker binds its own OpenMP threads, one per core listed here
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cfg.threads - 1}" if cfg.threads > 1 else "0")
    ddp = setup_distributed()
    tok = load_tokenizer(cfg.model)
    questions = [r[cfg.question_field] for r in read_jsonl(cfg.data, required=(cfg.question_field,))]
    prompts = [build_prompt_ids(tok, q) for q in questions[: cfg.questions] for _ in range(cfg.samples_per_question)]

    results = {}
    for engine in ("hf", "vllm"):
        model = load_policy(dataclasses.replace(cfg, engine=engine), cfg.model, ddp, cfg.seed)
        out, seconds, cpu = timed(model, prompts, tok, cfg)
        results[engine] = out, seconds, cpu, sum(len(o.ids) for o in out)
        del model  # the HF model's memory goes back before vLLM takes its share
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads for hf)"
    print(f"device {device}, model {cfg.model}, {len(prompts)} sequences ({cfg.questions} prompts x "
          f"{cfg.samples_per_question}), max_new_tokens {cfg.max_new_tokens}, temperature {cfg.temperature}, "
          f"top_p {cfg.top_p}")
    speed, per_cpu = {}, {}
    for engine, (_, seconds, cpu, tokens) in results.items():
        speed[engine], per_cpu[engine] = tokens / seconds, tokens / cpu
        print(f"  {engine:<5} {tokens:>9,} tokens in {seconds:8.1f}s = {speed[engine]:>9,.0f} tokens/s "
              f"({cpu:.1f} CPU s: {per_cpu[engine]:,.0f} tokens per CPU second)")
    print(f"  vllm / hf: {speed['vllm'] / speed['hf']:.2f}x in tokens/s, {per_cpu['vllm'] / per_cpu['hf']:.2f}x "
          "in tokens per CPU second")
    if cfg.temperature == 0:
        same = sum(h.ids == v.ids for h, v in zip(results["hf"][0], results["vllm"][0]))
        print(f"  greedy: the same tokens on {same} of {len(prompts)} sequences")


if __name__ == "__main__":
    run(main)
