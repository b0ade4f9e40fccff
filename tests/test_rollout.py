"""rollout.py: steps in token space, the batched generation engine, MC labels against a policy whose true
values are known, balanced selection, and the script end to end (plain, torchrun, killed and resumed,
bad input)."""
import dataclasses
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from plumbing import cli, generation, models, runfiles
import grading
import rollout
from rollout import delimiter_token_mask, split_steps
from plumbing.models import build_prompt_ids, DEFAULT_INSTRUCTION
from conftest import ROOT, run_script, tiny_random_llama
from rollout import Config, mc_value, rollout_chunk, select_balanced
from plumbing.generation import generate


# ============================================================================= tiny tokenizers
def word_tokenizer(pieces: list[str]):
    """A Hugging Face fast tokenizer whose vocabulary is exactly `pieces` (matched longest first)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "</s>", "<unk>"] + pieces
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    pattern = "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def merged_newline_bpe():
    """A byte-pair tokenizer whose merges put "\\n" inside longer tokens (".\\n", "\\n\\n"), as real ones do."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1}
    for piece in list("abcdefghijklmnopqrstuvwxyz .=+0123456789\n") + [".\n", "\n\n", "st", "ep", "step"]:
        vocab[piece] = len(vocab)
    merges = [(".", "\n"), ("\n", "\n"), ("s", "t"), ("e", "p"), ("st", "ep")]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>")


def toy_tokenizer():
    spec = importlib.util.spec_from_file_location("toy_prepare", os.path.join(ROOT, "data", "toy", "prepare.py"))
    prepare = sys.modules["toy_prepare"] = importlib.util.module_from_spec(spec)  # dataclasses need it registered
    spec.loader.exec_module(prepare)
    return prepare.build_tokenizer([DEFAULT_INSTRUCTION, "\\boxed{}", "Start with 3. Add 4. Multiply by 2. Subtract 5.",
                                    *prepare.NAMES.values()])


# ============================================================================= steps in token space
def test_split_steps_toy_tokenizer():
    tok = toy_tokenizer()
    eos = tok.eos_token_id
    is_delim = delimiter_token_mask(tok, "\n")
    assert [tok.decode([i]) for i in is_delim.nonzero().flatten().tolist()] == ["\n"]
    steps_text = ["Add: 3+4=7\n", "Multiply: 7*2=4\n", "Subtract: 4-5=\\boxed{9}"]
    ids = tok("".join(steps_text)).input_ids + [eos]
    steps = split_steps(ids, is_delim, {eos})
    assert [tok.decode(s, skip_special_tokens=True) for s in steps] == steps_text
    assert sum(steps, []) == ids and steps[-1][-1] == eos  # EOS belongs to the last action
    # Tokens after EOS are no part of the response; a response cut by the limit keeps its partial last step.
    assert split_steps(ids + ids[:3], is_delim, {eos}) == steps
    cut = ids[:-4]
    assert split_steps(cut, is_delim, {eos}) == steps[:2] + [steps[2][:-4]]

    # A model may have several EOS ids (plumbing.models.eos_token_ids): any of them ends the last step.
    other = next(i for i in range(len(tok)) if i not in ids and not is_delim[i])  # a token the text does not use
    assert split_steps(ids[:-1] + [other] + ids[:3], is_delim, {eos, other}) == steps[:2] + [steps[2][:-1] + [other]]


def test_split_steps_merged_newline_tokens():
    tok = merged_newline_bpe()
    eos = tok.eos_token_id
    is_delim = delimiter_token_mask(tok, "\n")
    marked = {tok.convert_ids_to_tokens(i) for i in is_delim.nonzero().flatten().tolist()}
    assert marked == {"\n", ".\n", "\n\n"}
    text = "step one.\nstep two\n\nso 3+4=7.\nlast"
    ids = tok(text).input_ids
    assert tok.convert_ids_to_tokens(ids).count(".\n") == 2 and "\n\n" in tok.convert_ids_to_tokens(ids)
    steps = split_steps(ids + [eos], is_delim, {eos})
    assert [tok.decode(s) for s in steps] == ["step one.\n", "step two\n\n", "so 3+4=7.\n", "last</s>"]
    for step in steps[:-1]:  # a step ends at the FIRST token containing the delimiter, and only there
        assert is_delim[step[-1]] and not is_delim[step[:-1]].any()
    # Every state is an exact token prefix of the solution. Cutting the TEXT at "\n" and re-tokenising
    # the state would not be: "two\n" + "\nso" gives other ids than "two\n\nso" (docs/algorithm.md, "Notation").
    for t in range(len(steps)):
        state = sum(steps[:t], [])
        assert ids[: len(state)] == state
    text_state = text[: text.index("\n", text.index("two")) + 1]  # "step one.\nstep two\n"
    assert tok(text_state).input_ids != ids[: len(tok(text_state).input_ids)]


def test_delimiter_is_a_setting():
    tok = merged_newline_bpe()
    is_delim = delimiter_token_mask(tok, "\n\n")
    assert {tok.convert_ids_to_tokens(i) for i in is_delim.nonzero().flatten().tolist()} == {"\n\n"}
    ids = tok("a.\nb\n\nc").input_ids + [tok.eos_token_id]
    assert [tok.decode(s) for s in split_steps(ids, is_delim, {tok.eos_token_id})] == ["a.\nb\n\n", "c</s>"]


# ============================================================================= a scripted policy
PIECES = ["Q", "good\n", "bad\n", "\\boxed{1}", "\\boxed{0}"]
PAD, EOS, _, Q, GOOD, BAD, RIGHT, WRONG = range(8)


class SeenLength:
    """The scripted model's KV cache: all it needs is how many positions it has seen, and for how many batch
    rows. Like a Hugging Face cache it keeps or repeats rows (reorder_cache), so generate takes the path it
    takes with a real model: one prefill per distinct prompt, copied to the duplicates, and compaction."""

    def __init__(self, length: int, rows: int):
        self.length, self.rows = length, rows

    def reorder_cache(self, rows: torch.Tensor) -> None:
        self.rows = len(rows)


class ScriptedLM(torch.nn.Module):
    """A policy whose next-token distribution depends only on the last token, behind the Hugging Face
    causal-LM interface that generation.generate drives. It checks what the engine feeds it: left padding,
    an attention mask as long as prompt + cache, and positions that count real tokens only."""

    def __init__(self, next_token_probs: dict[int, dict[int, float]], vocab: int = 8):
        super().__init__()
        table = torch.zeros(vocab, vocab)  # [V, V] row: distribution of the next token after a token
        table[:, EOS] = 1.0  # pad, EOS, ...: anything unscripted ends
        for token, dist in next_token_probs.items():
            table[token] = 0.0
            for nxt, p in dist.items():
                table[token, nxt] = p
        self.logits_table = torch.nn.Parameter(table.log(), requires_grad=False)  # [V, V]

    def forward(self, input_ids, attention_mask, position_ids=None, cache=None, use_cache=True, logits_to_keep=0):
        past = cache.length if cache is not None else 0
        batch, length = input_ids.shape
        assert cache is None or cache.rows == batch, "the cache must hold the rows of the batch"
        assert attention_mask.shape == (batch, past + length)
        if past == 0:
            assert attention_mask[:, -1].all(), "prompts must be left padded"
        live = attention_mask[:, -1].bool()  # rows still generating
        assert torch.equal(position_ids[live, -1], attention_mask[live].sum(-1) - 1)
        logits = self.logits_table[input_ids]  # [B, L, V]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, cache=SeenLength(past + length, batch))


# First step "good" or "bad" (1/2 each); then the boxed answer, right with probability 0.8 after a good
# step and 0.3 after a bad one; then EOS. True values: V(s0) = 0.55, V(s0 good) = 0.8, V(s0 bad) = 0.3.
STOCHASTIC = {Q: {GOOD: 0.5, BAD: 0.5}, GOOD: {RIGHT: 0.8, WRONG: 0.2}, BAD: {RIGHT: 0.3, WRONG: 0.7}}
TRUE_VALUE = {(): 0.55, (GOOD,): 0.8, (BAD,): 0.3}
DETERMINISTIC = {Q: {GOOD: 1.0}, GOOD: {RIGHT: 1.0}}


def within_bound(estimate: float, p: float, m: int) -> bool:
    return abs(estimate - p) <= 4 * math.sqrt(p * (1 - p) / m) + 1e-12  # 4 standard errors


def run_chunk(max_new_tokens: int, M: int = 400, seed: int = 0):
    tok = word_tokenizer(PIECES)
    cfg = Config(n1=8, n_keep=4, M=M, max_new_tokens=max_new_tokens, batch_size=512, temperature=1.0, top_p=1.0)
    question = {"qid": "q0", "question": "Q", "answer": "1", "prompt_ids": [Q]}
    g = torch.Generator().manual_seed(seed)
    [record] = rollout_chunk(ScriptedLM(STOCHASTIC), tok, [question], cfg, delimiter_token_mask(tok, "\n"), g)
    return record


def test_mc_labels_match_true_values():
    M = 400
    record = run_chunk(max_new_tokens=5, M=M)
    by_prefix = {tuple(s["state_ids"][1:]): s for s in record["states"]}
    assert set(by_prefix) == set(TRUE_VALUE)  # s0 once, and both possible s1
    for prefix, state in by_prefix.items():
        assert state["t"] == len(prefix) and state["mc_value"] == state["num_correct"] / M
        assert within_bound(state["mc_value"], TRUE_VALUE[prefix], M), (prefix, state["mc_value"])
        assert len(state["actions"]) == M
    # Candidate actions: the first step of each completion. From s0 that is "good" or "bad" (not terminal);
    # from s1 it is the boxed answer + EOS (terminal), whose rewards average to the MC label.
    first = by_prefix[()]["actions"]
    assert all(a["ids"] in ([GOOD], [BAD]) and not a["terminal"] and a["reward"] is None for a in first)
    assert within_bound(sum(a["ids"] == [GOOD] for a in first) / M, 0.5, M)
    for prefix in [(GOOD,), (BAD,)]:
        state = by_prefix[prefix]
        assert all(a["terminal"] and a["ids"] in ([RIGHT, EOS], [WRONG, EOS]) for a in state["actions"])
        assert all(a["reward"] == float(a["ids"][0] == RIGHT) for a in state["actions"])
        assert sum(a["reward"] for a in state["actions"]) == state["num_correct"]
    # Every candidate keeps its own completion's reward: they add up to the MC label at every state.
    for state in record["states"]:
        assert sum(a["completion_reward"] for a in state["actions"]) == state["num_correct"]
    # The kept solutions carry the same labels at their step boundaries.
    for sol in record["solutions"]:
        assert sol["correct"] == (sol["ids"][-2] == RIGHT) and sol["step_ends"] == [1, 2]
        assert sol["mc_values"] == [by_prefix[()]["mc_value"], by_prefix[(sol["ids"][1],)]["mc_value"]]


def test_completion_cut_by_token_limit_counts_as_wrong():
    # Two new tokens cannot finish from s0 ("good", "\boxed{1}", EOS), even when the answer is right.
    record = run_chunk(max_new_tokens=2, M=100)
    by_prefix = {tuple(s["state_ids"][1:]): s for s in record["states"]}
    assert by_prefix[()]["mc_value"] == 0.0 and not any(s["correct"] for s in record["solutions"])
    assert by_prefix[()]["num_correct"] == 0
    # The limit is on the whole solution: from s1 only one of the two tokens is left, so nothing finishes.
    assert all(s["mc_value"] == 0.0 for s in record["states"])
    # Three tokens are enough for a whole solution: s0's label is an estimate of its true value again.
    record = run_chunk(max_new_tokens=3, M=100)
    by_prefix = {tuple(s["state_ids"][1:]): s for s in record["states"]}
    assert within_bound(by_prefix[()]["mc_value"], TRUE_VALUE[()], 100)
    for prefix in [(GOOD,), (BAD,)]:
        if prefix in by_prefix:
            assert within_bound(by_prefix[prefix]["mc_value"], TRUE_VALUE[prefix], 100)


def test_a_first_step_that_uses_up_the_limit_ends_the_solution_wrong():
    # One token: from s0 the step "good\n" or "bad\n" ends on its delimiter exactly at the limit. Two tokens:
    # from s0 the same steps are followed by an answer (cut), from s1 the answer step is cut before EOS.
    for max_new_tokens in (1, 2):
        record = run_chunk(max_new_tokens=max_new_tokens, M=50)
        for s in record["states"]:
            left = max_new_tokens - (len(s["state_ids"]) - s["prompt_len"])
            flags = {}
            for a in s["actions"]:
                flags.setdefault(tuple(a["ids"]), set()).add((a["terminal"], a["reward"]))
                if len(a["ids"]) == left:  # the first step used up the limit: the solution ends, wrong
                    assert a["terminal"] and a["reward"] == 0.0
            assert all(len(f) == 1 for f in flags.values())  # equal first steps of a state: one flag, one reward
        by_prefix = {tuple(s["state_ids"][1:]): s for s in record["states"]}
        assert all(a["terminal"] == (max_new_tokens == 1) for a in by_prefix[()]["actions"])


EOT = 8  # a second EOS: the model's generation config lists it beside the tokenizer's "</s>"


def second_eos_model(prompt_end: int = Q):
    """After a prompt ending with prompt_end: a right answer, then EOT (as Llama-3-Instruct ends with <|eot_id|>,
    Qwen2.5-Instruct with <|im_end|> beside <|endoftext|>) and, were it not stopped there, "bad" steps on to
    any token limit."""
    from transformers import GenerationConfig

    script = {prompt_end: {GOOD: 1.0}, GOOD: {RIGHT: 1.0}, RIGHT: {EOT: 1.0}, EOT: {BAD: 1.0}, BAD: {BAD: 1.0}}
    model = ScriptedLM(script, vocab=9)
    model.generation_config = GenerationConfig(eos_token_id=[EOS, EOT])
    return model


def test_a_second_eos_id_ends_the_solution_and_it_is_graded():
    tok = word_tokenizer(PIECES + ["<|eot|>"])
    assert tok.convert_tokens_to_ids("<|eot|>") == EOT and tok.eos_token_id == EOS
    model = second_eos_model()
    assert models.eos_token_ids(tok, model) == {EOS, EOT}
    # Premise: with the tokenizer's EOS alone the right answer runs on and is cut by the limit (graded wrong).
    [alone] = generate(model, [[Q]], eos_ids={EOS}, pad_id=PAD, max_new_tokens=6, temperature=0.0)
    assert alone.finish == "length" and alone.ids[:3] == [GOOD, RIGHT, EOT]
    cfg = Config(n1=4, n_keep=2, M=4, max_new_tokens=6, batch_size=16)
    question = {"qid": "q0", "question": "Q", "answer": "1", "prompt_ids": [Q]}
    [record] = rollout_chunk(model, tok, [question], cfg, delimiter_token_mask(tok, "\n"), torch.Generator())
    assert record["cut"] == 0 and record["correct_samples"] == 4  # nothing cut: every response graded right
    assert [s["ids"][1:] for s in record["solutions"]] == [[GOOD, RIGHT, EOT]]  # one distinct solution
    assert record["solutions"][0]["correct"] and record["solutions"][0]["step_ends"] == [1, 2]
    by_prefix = {tuple(s["state_ids"][1:]): s for s in record["states"]}
    assert {p: s["mc_value"] for p, s in by_prefix.items()} == {(): 1.0, (GOOD,): 1.0}
    # The action that ends with EOT ends the solution: terminal, with its graded reward (dapo.py's Q = r).
    assert all(a["ids"] == [RIGHT, EOT] and a["terminal"] and a["reward"] == 1.0 for a in by_prefix[(GOOD,)]["actions"])


def test_mc_value():
    assert mc_value([True, False, False, True]) == 0.5 and mc_value([False] * 16) == 0.0 and mc_value([True]) == 1.0


# ============================================================================= generate()
def test_generate_finish_reasons_and_order():
    model = ScriptedLM(DETERMINISTIC)
    prompts = [[Q], [Q, GOOD], [Q, GOOD, RIGHT], [Q, Q]]
    kw = dict(eos_ids={EOS}, pad_id=PAD, temperature=0.0, batch_size=2)  # batches of mixed prompt lengths
    full = generate(model, prompts, max_new_tokens=10, **kw)
    assert [(r.ids, r.finish) for r in full] == [
        ([GOOD, RIGHT, EOS], "eos"), ([RIGHT, EOS], "eos"), ([EOS], "eos"), ([GOOD, RIGHT, EOS], "eos")]
    cut = generate(model, prompts, max_new_tokens=2, **kw)
    assert [(r.ids, r.finish) for r in cut] == [
        ([GOOD, RIGHT], "length"), ([RIGHT, EOS], "eos"), ([EOS], "eos"), ([GOOD, RIGHT], "length")]
    pad_is_eos = generate(model, prompts, max_new_tokens=10, **{**kw, "pad_id": EOS})
    assert [(r.ids, r.finish) for r in pad_is_eos] == [(r.ids, r.finish) for r in full]


def test_sample_next_temperature_and_top_p():
    logits = torch.tensor([[0.6, 0.3, 0.1]]).log().repeat(2000, 1)  # [B, V]
    g = torch.Generator().manual_seed(0)
    assert (generation.sample_next(logits, 0.0, 1.0, g) == 0).all()
    assert (generation.sample_next(logits, 1.0, 0.5, g) == 0).all()  # the nucleus holds only the top token
    nucleus = generation.sample_next(logits, 1.0, 0.8, g)
    assert set(nucleus.tolist()) == {0, 1} and within_bound((nucleus == 0).float().mean().item(), 2 / 3, 2000)
    full = generation.sample_next(logits, 1.0, 1.0, g)
    assert within_bound((full == 2).float().mean().item(), 0.1, 2000)


def tempered_nucleus(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """The formula, written out plainly: p = softmax(logits / T); keep the most likely tokens until their mass
    reaches top_p (the token that crosses it included); renormalise."""
    weights = [math.exp(x / temperature) for x in logits]
    p = [w / sum(weights) for w in weights]
    kept, mass = set(), 0.0
    for i in sorted(range(len(p)), key=lambda i: -p[i]):
        if mass >= top_p:
            break
        kept.add(i)
        mass += p[i]
    return [p[i] / mass if i in kept else 0.0 for i in range(len(p))]


def test_sample_next_draws_from_the_tempered_nucleus(monkeypatch):
    # At T = 1 dividing the logits by T and multiplying by it agree; at T = 0.6 they do not: the first row's
    # nucleus (top_p 0.85) is tokens {0, 1} with probabilities 0.76 / 0.24 under softmax(logits / T), and
    # four tokens under softmax(logits * T). No token's mass is near the nucleus boundary.
    temperature, top_p, n = 0.6, 0.85, 20000
    rows = [[0.5, 0.25, 0.15, 0.07, 0.03], [0.1, 0.2, 0.3, 0.4, 1e-3]]
    logits = torch.tensor(rows).log().repeat_interleave(n, 0)  # [2n, V]
    expected = torch.tensor([tempered_nucleus([math.log(x) for x in r], temperature, top_p) for r in rows],
                            dtype=torch.float64)  # [2, V]
    assert expected[0].nonzero().flatten().tolist() == [0, 1] and expected[1].nonzero().flatten().tolist() == [1, 2, 3]
    # Exact: the weights sample_next draws from, normalised, are the formula.
    probs, ids = generation.tempered_nucleus(logits, temperature, top_p)  # [2n, K] each
    full = torch.zeros(logits.shape, dtype=torch.float64).scatter(-1, ids, probs.double())  # [2n, V]
    torch.testing.assert_close(full / full.sum(-1, keepdim=True), expected.repeat_interleave(n, 0), atol=1e-6, rtol=0)
    handed, draw = [], generation.draw

    def recording_draw(weights, generator):
        handed.append(weights)
        return draw(weights, generator)

    monkeypatch.setattr(generation, "draw", recording_draw)
    tokens = generation.sample_next(logits, temperature, top_p, torch.Generator().manual_seed(0))  # [2n]
    assert len(handed) == 1 and torch.equal(handed[0], probs), "sample_next draws from something else: update this"
    # Whatever draws the tokens: their frequencies are those of the formula, within 5 standard errors.
    for row in range(2):
        drawn = tokens[row * n: (row + 1) * n]
        for token, p in enumerate(expected[row].tolist()):
            frequency = (drawn == token).double().mean().item()
            assert abs(frequency - p) <= 5 * math.sqrt(p * (1 - p) / n), (row, token, frequency, p)


def test_a_nucleus_wider_than_the_first_top_k_is_the_formula():
    # tempered_nucleus looks among the top 64 tokens first and widens (x8) until every row's nucleus fits:
    # rows of 1,000 tokens whose nuclei hold 1, 8, 128, 279 tokens (top_p 0.3: the top 512 are needed) and
    # 1, 413, 846, 944 (top_p 0.95: the whole vocabulary); a top_p of 1 keeps the whole vocabulary.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1000, generator=g, dtype=torch.float64) * torch.tensor([[30.0], [1.5], [0.5], [0.05]])
    for top_p in (0.3, 0.95, 1.0):
        probs, ids = generation.tempered_nucleus(logits.float(), 0.8, top_p)
        full = probs.double() if ids is None else torch.zeros(4, 1000, dtype=torch.float64).scatter(
            -1, ids, probs.double())  # [4, V]
        expected = torch.tensor([tempered_nucleus(row.tolist(), 0.8, top_p) for row in logits], dtype=torch.float64)
        if top_p < 1:  # (at 1 the formula's float sum reaches 1 before the last tokens of mass ~1e-30)
            assert full.count_nonzero(-1).tolist() == expected.count_nonzero(-1).tolist(), top_p
        torch.testing.assert_close(full / full.sum(-1, keepdim=True), expected, atol=1e-6, rtol=0)
        if top_p < 1:  # the widening really happened
            assert min(expected.count_nonzero(-1)) < 64 < max(expected.count_nonzero(-1)), top_p


def test_an_exact_hit_of_top_p_ends_the_nucleus():
    """p = (0.5, 0.5) at top_p 0.5: the first token's mass reaches top_p, so the nucleus is that token alone."""
    logits = torch.zeros(2000, 2)  # [B, V]
    probs, ids = generation.tempered_nucleus(logits, 1.0, 0.5)
    assert (probs > 0).sum(-1).tolist() == [1] * 2000
    assert len(set(generation.sample_next(logits, 1.0, 0.5, torch.Generator().manual_seed(0)).tolist())) == 1


def test_the_nucleus_is_transformers_top_p_on_ties():
    """Rows whose masses hit top_p exactly (powers of two: no rounding) and ties at its edge: tempered_nucleus
    keeps as many tokens, of the same probabilities, as transformers' TopPLogitsWarper (whose rule vLLM's sampler
    follows: a token goes when the mass below and at it is at most 1 - top_p)."""
    from transformers import TopPLogitsWarper

    rows = [[0.5, 0.5], [0.25] * 4, [0.5, 0.25, 0.125, 0.125], [0.125, 0.5, 0.125, 0.25], [0.0625] * 16]
    for row in rows:
        logits = torch.tensor([row]).log()  # [1, V]
        for top_p in (0.125, 0.25, 0.5, 0.625, 0.75, 0.875, 0.9375, 0.99):
            probs, ids = generation.tempered_nucleus(logits, 1.0, top_p)  # [1, K]
            ours = sorted(probs[probs > 0].tolist())
            kept = TopPLogitsWarper(top_p)(None, logits.clone()).isfinite()  # [1, V]
            assert ours == sorted(torch.tensor(row)[kept[0]].tolist()), (row, top_p)


def test_draw_follows_the_weights_and_never_draws_a_zero():
    weights = torch.tensor([[0.0, 3.0, 0.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0]]).repeat_interleave(20000, 0)
    drawn = generation.draw(weights, torch.Generator().manual_seed(0))  # [40000]
    first, second = drawn[:20000], drawn[20000:]
    assert set(first.tolist()) == {1, 3} and set(second.tolist()) == {0}
    assert within_bound((first == 1).double().mean().item(), 0.75, 20000)


def test_draw_error_is_bounded():
    """What draw's docstring says of its fp32 arithmetic, replayed over every uniform torch.rand can give
    (multiples of 2^-24): no token is off by more than 1.2e-7, and the total variation grows with the vocabulary
    (tokens below 2^-24 get 0 or 2^-24) to 1.5e-3 at 152k; here a 4k-token row."""
    weights = torch.softmax(torch.randn(1, 4096, generator=torch.Generator().manual_seed(0)) * 2, -1)  # [1, V]
    cdf = weights.cumsum(-1)  # [1, V] as draw computes it
    uniforms = torch.arange(2**24, dtype=torch.float32)[:, None] * 2**-24  # [2^24, 1]
    u = torch.minimum(uniforms * cdf[:, -1:], torch.nextafter(cdf[:, -1:], torch.zeros(1, 1)))  # [2^24, 1]
    drawn = torch.searchsorted(cdf, u.T, right=True)[0]  # [2^24] what draw returns for each uniform
    exact = weights[0].double() / weights.double().sum()  # [V]
    error = (torch.bincount(drawn, minlength=4096).double() / 2**24 - exact).abs()  # [V]
    assert error.max() <= 1.2e-7 and 0.5 * error.sum() < 4096 * 2**-25


@pytest.fixture(scope="module")
def toy_policy(toy_dir):
    tok = models.load_tokenizer(str(toy_dir / "sft"))
    model = models.load_causal_lm(str(toy_dir / "sft"), torch.device("cpu")).eval()
    questions = [json.loads(line)["question"] for line in open(toy_dir / "test.jsonl")][:6]
    prompts = [build_prompt_ids(tok, q) for q in questions]
    assert len({len(p) for p in prompts}) > 1  # the batch really needs padding
    return tok, model, prompts


@torch.no_grad()
def greedy_without_cache(model, prompt, eos, max_new_tokens):
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item())
        if ids[-1] == eos:
            break
    return ids[len(prompt):]


def test_left_padded_batch_matches_one_at_a_time(toy_policy):
    tok, model, prompts = toy_policy
    kw = dict(eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id, max_new_tokens=40, temperature=0.0)
    batched = generate(model, prompts, batch_size=len(prompts), **kw)
    single = generate(model, prompts, batch_size=1, **kw)
    reference = [greedy_without_cache(model, p, tok.eos_token_id, 40) for p in prompts]
    assert [r.ids for r in batched] == [r.ids for r in single] == reference
    assert all(r.finish == ("eos" if r.ids[-1] == tok.eos_token_id else "length") for r in batched)
    assert any(r.finish == "eos" for r in batched)
    # pad = EOS (models without a pad token) gives the same output
    assert [r.ids for r in generate(model, prompts, batch_size=len(prompts),
                                    **{**kw, "pad_id": tok.eos_token_id})] == reference
    cut = generate(model, prompts, batch_size=len(prompts), **{**kw, "max_new_tokens": 3})
    for r, full in zip(cut, reference):
        assert r.ids == full[:3] and r.finish == ("length" if len(full) > 3 or full[-1] != tok.eos_token_id else "eos")


def test_repeated_prompts_prefilled_once_match_each_prompt_alone():
    # Rollouts repeat prompts (n1 per question, M per state): generate prefills each distinct prompt once and
    # copies its logits and cache rows to the repeats. Three prompts of different lengths, repeated and
    # interleaved, must each continue exactly as when generated alone.
    model = tiny_random_llama()
    a, b, c = [5, 9, 13, 2, 30, 7, 11], [8, 3], [21, 17, 40, 6]
    prompts = [a, b, a, c, b, a]
    alone = {tuple(p): greedy_without_cache(model, p, eos=-1, max_new_tokens=10) for p in (a, b, c)}
    assert len({tuple(r) for r in alone.values()}) == 3  # the continuations differ, so a mixed-up row shows
    eos = alone[tuple(a)][4]  # a ends with EOS at its 5th token; b and c may run to the limit
    alone = {p: greedy_without_cache(model, list(p), eos=eos, max_new_tokens=10) for p in alone}
    kw = dict(eos_ids={eos}, pad_id=0, temperature=0.0, batch_size=len(prompts))
    batched = generate(model, prompts, max_new_tokens=10, **kw)
    assert [r.ids for r in batched] == [alone[tuple(p)] for p in prompts]
    assert [r.finish for r in batched] == [("eos" if alone[tuple(p)][-1] == eos else "length") for p in prompts]
    assert {r.finish for r in batched} == {"eos", "length"}
    # Limits per row: copies of one prompt end at different steps, so finished rows leave the batch (and
    # the cache) while the others continue.
    limits = [10, 10, 3, 10, 2, 10]
    cut = generate(model, prompts, max_new_tokens=limits, **kw)
    assert [r.ids for r in cut] == [alone[tuple(p)][:n] for p, n in zip(prompts, limits)]


def padded_vocabulary_lm(tok):
    """A tiny Llama whose embedding matrix has 8 rows more than the tokenizer has tokens (as Qwen2.5's has 271),
    with an LM-head bias that makes those ids the likeliest by far."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok) + 8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.lm_head = torch.nn.Linear(16, config.vocab_size, bias=True)
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[len(tok):] = 50.0  # [8] the rows without a token
    return model


def test_generate_never_samples_ids_outside_the_tokenizer():
    tok = word_tokenizer(PIECES)
    model = padded_vocabulary_lm(tok)
    prompts = [[Q], [Q, GOOD]]
    kw = dict(eos_ids={EOS}, pad_id=PAD, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    unbounded = generate(model, prompts, temperature=0.0, **kw)
    assert all(t >= len(tok) for r in unbounded for t in r.ids)  # the model alone would emit only those
    for temperature, top_p in [(0.0, 1.0), (1.0, 1.0), (1.0, 0.9)]:
        out = generate(model, prompts, temperature=temperature, top_p=top_p, vocab_size=len(tok), **kw)
        assert all(0 <= t < len(tok) for r in out for t in r.ids) and any(r.ids for r in out)
    # rollout.py passes the tokenizer's size: its steps split without an IndexError.
    cfg = Config(n1=2, n_keep=2, M=2, max_new_tokens=4, batch_size=8)
    question = {"qid": "q0", "question": "Q", "answer": "1", "prompt_ids": [Q]}
    [record] = rollout_chunk(model, tok, [question], cfg, delimiter_token_mask(tok, "\n"), torch.Generator())
    assert all(t < len(tok) for s in record["states"] for a in s["actions"] for t in a["ids"])


# ============================================================================= select_balanced
def sol(i: int, ok: bool):
    return ([i], ok)


@pytest.mark.parametrize("n_right,n_wrong,n,kept_right,kept_wrong", [
    (4, 4, 6, 3, 3), (1, 7, 6, 1, 5), (7, 1, 6, 5, 1), (8, 0, 6, 6, 0), (0, 8, 6, 0, 6), (2, 1, 6, 2, 1),
    (4, 4, 5, 2, 3)])
def test_select_balanced(n_right, n_wrong, n, kept_right, kept_wrong):
    samples = [sol(i, True) for i in range(n_right)] + [sol(100 + i, False) for i in range(n_wrong)]
    kept = select_balanced(samples, n)
    assert (sum(ok for _, ok in kept), sum(not ok for _, ok in kept)) == (kept_right, kept_wrong)
    assert all(s in samples for s in kept)


def test_select_balanced_drops_duplicates_and_is_as_balanced_as_possible():
    samples = [sol(1, True)] * 5 + [sol(2, False)] * 5 + [sol(3, False)]
    assert sorted(select_balanced(samples, 6)) == sorted([sol(1, True), sol(2, False), sol(3, False)])
    for n_right in range(6):
        for n_wrong in range(6):
            for n in range(1, 7):
                kept = select_balanced([sol(i, True) for i in range(n_right)]
                                       + [sol(10 + i, False) for i in range(n_wrong)], n)
                right = sum(ok for _, ok in kept)
                wrong = len(kept) - right
                assert len(kept) == min(n, n_right + n_wrong) and len({tuple(ids) for ids, _ in kept}) == len(kept)
                best = min(abs(r - (len(kept) - r)) for r in range(len(kept) + 1)
                           if r <= n_right and len(kept) - r <= n_wrong)
                assert abs(right - wrong) == best


# ============================================================================= rollout.py end to end
def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def question_ids(toy_dir, k):
    return [r["id"] for r in read_lines(toy_dir / "train.jsonl")[:k]]


def test_rollout_output_format_and_invariants(toy_dir, toy_rollout):
    tok = models.load_tokenizer(str(toy_dir / "sft"))
    eos, M = tok.eos_token_id, 4
    is_delim = delimiter_token_mask(tok, "\n")
    questions = {r["id"]: r for r in read_lines(toy_dir / "train.jsonl")}
    states, solutions = read_lines(toy_rollout / "states.jsonl"), read_lines(toy_rollout / "solutions.jsonl")
    summary = json.load(open(toy_rollout / "summary.json"))

    assert [s["qid"] for s in states if s["t"] == 0] == question_ids(toy_dir, 12)  # s0 once, input order
    state_of = {}
    for s in states:
        assert set(s) == {"qid", "t", "prompt_len", "state_ids", "state_text", "mc_value", "num_correct", "actions"}
        prompt = build_prompt_ids(tok, questions[s["qid"]]["question"])
        response = s["state_ids"][s["prompt_len"]:]
        assert (s["state_ids"][: s["prompt_len"]] == prompt
                and s["state_text"] == tok.decode(response, skip_special_tokens=True))
        assert len(split_steps(response, is_delim, {eos})) == s["t"] and (not response or is_delim[response[-1]])
        assert s["mc_value"] == s["num_correct"] / M and len(s["actions"]) == M
        for a in s["actions"]:
            assert set(a) == {"ids", "text", "terminal", "reward", "completion_reward"}
            assert a["text"] == tok.decode(a["ids"], skip_special_tokens=True)
            assert not is_delim[a["ids"][:-1]].any()  # one step: no delimiter before its last token
            if a["terminal"]:
                # EOS or the solution's limit
                assert a["reward"] in (0.0, 1.0) and (a["ids"][-1] == eos or len(response) + len(a["ids"]) == 40)
                ended = a["ids"][-1] == eos
                text = tok.decode(response + a["ids"], skip_special_tokens=True)
                graded = grading.is_correct(text, questions[s["qid"]]["answer"])
                assert a["reward"] == float(ended and graded)
            else:
                assert a["reward"] is None and is_delim[a["ids"][-1]]
            assert a["completion_reward"] in (0.0, 1.0) and (not a["terminal"] or a["completion_reward"] == a["reward"])
        assert sum(a["reward"] or 0 for a in s["actions"]) <= s["num_correct"]
        assert sum(a["completion_reward"] for a in s["actions"]) == s["num_correct"]
        state_of[(s["qid"], tuple(s["state_ids"]))] = s

    per_question = {}
    for sol in solutions:
        assert set(sol) == {"qid", "prompt_len", "ids", "text", "correct", "step_ends", "mc_values"}
        response = sol["ids"][sol["prompt_len"]:]
        steps = split_steps(response, is_delim, {eos})
        assert sol["text"] == tok.decode(response, skip_special_tokens=True)
        assert sol["correct"] == (response[-1] == eos
                                  and grading.is_correct(sol["text"], questions[sol["qid"]]["answer"]))
        assert sol["step_ends"][0] == sol["prompt_len"] and len(sol["step_ends"]) == len(steps) == len(sol["mc_values"])
        assert sol["step_ends"] == sorted(set(sol["step_ends"])) and sol["step_ends"][-1] < len(sol["ids"])
        for end, value in zip(sol["step_ends"], sol["mc_values"]):
            state = state_of[(sol["qid"], tuple(sol["ids"][:end]))]  # every state is a prefix of its solution
            assert state["mc_value"] == value and (end == sol["prompt_len"] or is_delim[sol["ids"][end - 1]])
        per_question.setdefault(sol["qid"], []).append(sol)
    # every state belongs to a kept solution, and at most n = 2 solutions per question
    assert all(any(sol["ids"][: len(s["state_ids"])] == s["state_ids"] for sol in per_question[s["qid"]])
               for s in states)
    assert all(len(v) <= 2 for v in per_question.values()) and len(per_question) == 12

    assert summary["questions"] == 12 and summary["states"] == len(states)
    assert (summary["kept_solutions"] == len(solutions)
            and summary["kept_correct"] == sum(s["correct"] for s in solutions))
    assert math.isclose(summary["mean_mc_value"], sum(s["mc_value"] for s in states) / len(states))
    assert summary["tokens_generated"] > 0 and summary["tokens_per_second"] > 0 and summary["config"]["M"] == M
    assert summary["tokens_generated"] >= sum(len(sol["ids"]) - sol["prompt_len"] for sol in solutions)
    # what says whether the data can teach anything
    assert summary["responses"] == 12 * 4 + M * len(states)
    assert 0 <= summary["cut_by_token_limit"] < summary["responses"]
    assert summary["states_labelled_0"] == sum(s["mc_value"] == 0 for s in states)
    assert summary["states_labelled_1"] == sum(s["mc_value"] == 1 for s in states)
    assert 0 <= summary["questions_without_correct_sample"] < 12


def test_data_that_teach_nothing_are_reported(toy_dir, tmp_path):
    # 3 tokens cannot hold a toy solution: every response is cut, every label 0, and the run says so.
    proc = run_script("rollout.py", "--model", str(toy_dir / "sft"), "--data", str(toy_dir / "train.jsonl"),
                      "--out_dir", str(tmp_path), "--max_questions", "2", "--n1", "2", "--n_keep", "2", "--M", "2",
                      "--max_new_tokens", "3")
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["cut_by_token_limit"] == summary["responses"] > 0
    assert summary["questions_without_correct_sample"] == 2 and summary["states_labelled_0"] == summary["states"]
    assert f"responses cut by the token limit {summary['responses']} of {summary['responses']}" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "every MC label is 0" in warnings[0] and "--max_new_tokens" in warnings[0]
    assert "\r" not in proc.stderr and "\x1b[" not in proc.stderr  # no progress bar in a log


def test_n_keep_above_n1_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["rollout.py", "--n1", "4", "--n_keep", "6", "--out_dir", str(tmp_path / "out")])
    with pytest.raises(cli.InputError, match="--n_keep 6 must be between 1 and --n1 4"):
        rollout.main()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, flag", [("rollout", "--model"), ("eval", "--model"), ("critic", "--init"),
                                          ("dapo", "--policy")])
def test_help_shows_the_whole_summary_and_that_a_gguf_file_works(script, flag, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        cli.parse_config(module.Config, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    first_paragraph = " ".join(module.__doc__.strip().split("\n\n")[0].split())
    assert first_paragraph in text  # not cut after its first line
    assert ".gguf file" in text.split(f"{flag} {flag[2:].upper()} ")[1].split(" --")[0]


def test_torchrun_two_ranks_every_question_once(toy_dir, tmp_path):
    out = tmp_path / "ddp"
    run_script("torchrun", "--standalone", "--nproc_per_node=2", "rollout.py", "--model", str(toy_dir / "sft"),
               "--data", str(toy_dir / "train.jsonl"), "--out_dir", str(out), "--max_questions", "6",
               "--n1", "2", "--n_keep", "2", "--M", "2", "--max_new_tokens", "30", "--questions_per_chunk", "2")
    ids = question_ids(toy_dir, 6)
    assert [r["qid"] for r in read_lines(out / "shard-0.jsonl")] == ids[0::2]  # questions sharded over ranks
    assert [r["qid"] for r in read_lines(out / "shard-1.jsonl")] == ids[1::2]
    states = read_lines(out / "states.jsonl")
    assert [s["qid"] for s in states if s["t"] == 0] == ids
    assert {s["qid"] for s in read_lines(out / "solutions.jsonl")} == set(ids)
    summary = json.load(open(out / "summary.json"))
    assert summary["questions"] == 6 and summary["states"] == len(states) and summary["tokens_this_run"] > 0


def test_killed_run_resumes_without_losing_or_repeating_records(toy_dir, toy_rollout, tmp_path):
    # The toy_rollout settings on its first 6 questions, saved one by one so that a kill lands mid-way.
    out = tmp_path / "killed"
    args = ["rollout.py", "--model", str(toy_dir / "sft"), "--data", str(toy_dir / "train.jsonl"),
            "--out_dir", str(out), "--max_questions", "6", "--n1", "4", "--n_keep", "2", "--M", "4",
            "--max_new_tokens", "40", "--questions_per_chunk", "1"]
    shard = out / "shard-0.jsonl"
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log, stderr=log,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.time() + 300
            while not (shard.exists() and shard.read_bytes().count(b"\n") >= 1):
                assert proc.poll() is None and time.time() < deadline, open(tmp_path / "log").read()[-3000:]
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    data = shard.read_bytes()
    finished = [json.loads(line) for line in data[: data.rfind(b"\n")].splitlines()]  # what the killed run had saved
    assert 1 <= len(finished) < 6 and not (out / "states.jsonl").exists()  # killed mid-way, nothing looks done
    with open(shard, "a") as f:
        f.write('{"qid": "toy-1-5", "states": [')  # a record cut short by the kill

    run_script(*args)
    shard_records = read_lines(shard)  # every line whole again
    assert len(shard_records) == 6 and len({r["qid"] for r in shard_records}) == 6
    assert shard_records[: len(finished)] == finished  # no finished record lost or redone
    states = read_lines(out / "states.jsonl")
    uninterrupted = [s["qid"] for s in read_lines(toy_rollout / "states.jsonl") if s["t"] == 0][:6]
    assert [s["qid"] for s in states if s["t"] == 0] == uninterrupted == question_ids(toy_dir, 6)
    for record in finished:
        assert [s for s in states if s["qid"] == record["qid"]] == record["states"]
        assert [s for s in read_lines(out / "solutions.jsonl") if s["qid"] == record["qid"]] == record["solutions"]
    assert {s["qid"] for s in read_lines(out / "solutions.jsonl")} == set(uninterrupted)
    assert json.load(open(out / "summary.json"))["questions"] == 6


# ============================================================================= bad input
@pytest.fixture
def previous_output(toy_rollout, tmp_path):
    """An out_dir that holds a previous run's output, and a snapshot of its bytes."""
    out = tmp_path / "previous"
    shutil.copytree(toy_rollout, out)
    return out, {p: open(p, "rb").read() for p in glob.glob(str(out / "*"))}


BAD_DATA = {
    "malformed": ('{"question": "Start with 1. Add 2.", "answer": "3"}\n'
                  '{"question": "Start with 1.", "answer": \n', "line 2"),
    "missing_field": ('{"question": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n'
                      '{"question": "c"}\n', "line 3"),
    "empty": ("", "is empty"),
    "not_a_string": ('{"question": 5, "answer": "1"}\n', "line 1"),
    "duplicate_id": ('{"id": "a", "question": "x", "answer": "1"}\n'
                     '{"id": "a", "question": "y", "answer": "2"}\n', "line 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_file(case, toy_dir, tmp_path, previous_output, monkeypatch, capsys):
    content, where = BAD_DATA[case]
    data = tmp_path / f"{case}.jsonl"
    data.write_text(content)
    out, before = previous_output
    monkeypatch.setattr(sys, "argv", ["rollout.py", "--model", str(toy_dir / "sft"), "--data", str(data),
                                      "--out_dir", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(rollout.main)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(data) in lines[0] and where in lines[0], lines
    if case == "missing_field":
        assert "missing field(s) answer (other field names: --answer_field)" in lines[0]
    if case == "duplicate_id":
        assert "--id_field" in lines[0]
    assert {p: open(p, "rb").read() for p in glob.glob(str(out / "*"))} == before


@pytest.mark.parametrize("what", ["model", "data"])
def test_missing_path_exits_2_as_a_script(what, toy_dir, tmp_path, previous_output):
    out, before = previous_output
    paths = {"model": str(toy_dir / "sft"), "data": str(toy_dir / "train.jsonl"),
             what: str(tmp_path / "does-not-exist")}
    proc = run_script("rollout.py", "--model", paths["model"], "--data", paths["data"], "--out_dir", str(out),
                      check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and str(tmp_path / "does-not-exist") in lines[0], proc.stderr
    assert {p: open(p, "rb").read() for p in glob.glob(str(out / "*"))} == before


def test_model_dir_without_a_model(tmp_path, toy_dir, previous_output, monkeypatch, capsys):
    out, before = previous_output
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sys, "argv", ["rollout.py", "--model", str(tmp_path / "empty"),
                                      "--data", str(toy_dir / "train.jsonl"), "--out_dir", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(rollout.main)
    assert exit_info.value.code == 2 and str(tmp_path / "empty") in capsys.readouterr().err
    assert {p: open(p, "rb").read() for p in glob.glob(str(out / "*"))} == before


def mtimes(folder):
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(str(folder / "*"))}


def test_rerun_over_finished_output(toy_dir, previous_output):
    # previous_output holds the finished output of the toy_rollout settings (12 questions, --M 4 --n1 4).
    out, before = previous_output
    settings = {"max_questions": 12, "n1": 4, "n_keep": 2, "M": 4, "max_new_tokens": 40}

    def rerun(check=True, **changes):
        flags = [x for k, v in {**settings, **changes}.items() for x in (f"--{k}", str(v))]
        return run_script("rollout.py", "--model", str(toy_dir / "sft"), "--data", str(toy_dir / "train.jsonl"),
                          "--out_dir", str(out), *flags, check=check)

    # The same command (speed settings may differ): complete, nothing redone or rewritten.
    old = mtimes(out)
    proc = rerun(batch_size=7, questions_per_chunk=3)
    assert "complete" in proc.stdout and "already done" not in proc.stdout
    assert mtimes(out) == old and {p: open(p, "rb").read() for p in glob.glob(str(out / "*"))} == before
    # Other settings: one line naming them, nothing touched.
    proc = rerun(M=2, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert str(out / "summary.json") in lines[0] and "--M 4 -> 2" in lines[0] and "--n1" not in lines[0]
    assert "--overwrite true" in lines[0] and mtimes(out) == old
    # More questions: the finished ones are kept, the new one is added.
    rerun(max_questions=13)
    assert len(read_lines(out / "shard-0.jsonl")) == 13 and json.load(open(out / "summary.json"))["questions"] == 13
    assert open(out / "shard-0.jsonl", "rb").read().startswith(before[str(out / "shard-0.jsonl")])
    # --overwrite true: the old output is removed and the run starts afresh.
    rerun(max_questions=2, overwrite="true")
    assert len(read_lines(out / "shard-0.jsonl")) == 2 and json.load(open(out / "summary.json"))["questions"] == 2


def test_check_rerun_is_one_rule_for_finished_and_unfinished_output(tmp_path, capsys):
    @dataclasses.dataclass
    class Cfg:
        out_dir: str = str(tmp_path)
        k: int = 4
        batch_size: int = 8
        max_questions: int = 0
        overwrite: bool = False

    ignore = ("out_dir", "overwrite", "batch_size", "max_questions")
    done, settings, shard = tmp_path / "summary.json", tmp_path / "settings.json", tmp_path / "shard-0.jsonl"

    def check(cfg, work=(), covers=lambda record: True):
        return runfiles.check_rerun(cfg, str(tmp_path), str(done), str(settings), [str(p) for p in work], ignore, True,
                                  covers=covers)

    assert not check(Cfg())  # nothing there: a fresh start, whose settings are recorded
    assert json.load(open(settings)) == {"k": 4}
    assert not check(Cfg(k=5))  # no unfinished work: nothing to mix, the new settings win
    shard.write_text('{"id": "a"}\n')
    with pytest.raises(cli.InputError, match="unfinished work .*--k 5 -> 6.*--overwrite true"):
        check(Cfg(k=6), [shard])
    assert not check(Cfg(k=5, batch_size=64), [shard])  # an ignored setting: resumed
    done.write_text(json.dumps({"config": dataclasses.asdict(Cfg(k=5))}))
    assert check(Cfg(k=5, batch_size=64), [shard]) and "complete" in capsys.readouterr().out
    with pytest.raises(cli.InputError, match="finished output .*--k 5 -> 6"):
        check(Cfg(k=6), [shard])
    assert not check(Cfg(k=5, max_questions=9), [shard], covers=lambda record: False)  # more questions: resumed
    with pytest.raises(cli.InputError, match="other questions .*--max_questions 0 -> 9"):
        check(Cfg(k=5, max_questions=9), covers=lambda record: False)  # ... unless there is nothing to resume from
    assert not check(Cfg(k=6, overwrite=True), [shard])
    assert not tmp_path.exists() or sorted(os.listdir(tmp_path)) == ["settings.json"]
    assert json.load(open(settings)) == {"k": 6}
