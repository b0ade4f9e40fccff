"""The embedded toy task: worked solutions, the planted mistake, and the tokenizer the scripts rely on."""
import importlib.util
import os
import random
import sys

from conftest import ROOT, run_script

from rollout import delimiter_token_mask, split_steps
from plumbing.models import DEFAULT_INSTRUCTION
from grading import is_correct

spec = importlib.util.spec_from_file_location("toy_prepare", os.path.join(ROOT, "data", "toy", "prepare.py"))
prepare = sys.modules["toy_prepare"] = importlib.util.module_from_spec(spec)  # dataclasses need it registered
spec.loader.exec_module(prepare)


def test_worked_solution_names_each_operation_and_grades_correct():
    steps = prepare.solution_steps(3, [("+", 2), ("*", 3), ("-", 1)])
    assert steps == ["Add: 3+2=5\n", "Multiply: 5*3=5\n", "Subtract: 5-1=\\boxed{4}"]
    assert is_correct("".join(steps), "4") and not is_correct("".join(steps), "5")


def test_planted_mistake_is_a_sign_error_inside_a_step_named_subtract():
    ops = [("-", 2), ("+", 1), ("-", 3)]
    wrong = prepare.solution_steps(7, ops, random.Random(0), trap_error=1.0)
    # The name stays the question's operation; the sign is the mistake; later steps go on from the wrong value.
    assert wrong == ["Subtract: 7+2=9\n", "Add: 9+1=0\n", "Subtract: 0+3=\\boxed{3}"]
    assert prepare.solution_steps(7, ops, random.Random(0), trap_error=0.0) == prepare.solution_steps(7, ops)
    rng = random.Random(1)
    made = sum(prepare.solution_steps(7, [("-", 2)], rng, trap_error=0.75)[0].startswith("Subtract: 7+")
               for _ in range(4000))
    assert abs(made / 4000 - 0.75) < 0.03  # about trap_error of the subtractions, not all or none
    assert all(prepare.solution_steps(7, [("+", 2), ("*", 3)], rng, trap_error=1.0)
               == prepare.solution_steps(7, [("+", 2), ("*", 3)])
               for _ in range(20))  # only subtractions are ever done wrong


def test_tokenizer_round_trips_and_steps_split_in_token_space():
    rng = random.Random(0)
    prepare.CFG = prepare.Config()
    problems = [prepare.make_problem(rng) for _ in range(50)]
    tok = prepare.build_tokenizer([DEFAULT_INSTRUCTION, "\\boxed{}", *(prepare.question_text(*p) for p in problems),
                                   *prepare.NAMES.values()])
    is_delim = delimiter_token_mask(tok, "\n")
    for start, ops in problems:
        steps = prepare.solution_steps(start, ops, rng, trap_error=0.5)
        ids = tok("".join(steps)).input_ids + [tok.eos_token_id]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == "".join(steps)
        cut = split_steps(ids, is_delim, {tok.eos_token_id})
        assert [tok.decode(s, skip_special_tokens=True) for s in cut] == steps
        assert tok.convert_ids_to_tokens(ids[0]) in prepare.NAMES.values()  # the name is one token


def test_varied_toy_adds_a_free_remark_that_leaves_the_step_and_the_mistake_alone():
    ops = [("-", 2), ("+", 1), ("-", 3)]
    words = [set(w) for w in prepare.REMARK_WORDS]
    for trap_error in (0.0, 1.0):  # no mistake, and the planted mistake in every subtraction
        plain = prepare.solution_steps(7, ops, random.Random(0), trap_error=trap_error)
        varied = prepare.solution_steps(7, ops, random.Random(0), trap_error=trap_error, remarks=True)
        for p, v in zip(plain, varied):
            body, end = (p[:-1], "\n") if p.endswith("\n") else (p, "")
            assert v.startswith(body + " ") and v.endswith(end)  # the same step, then the remark before the line end
            remark = v[len(body):len(v) - len(end)].split()
            assert len(remark) == 2 and remark[0] in words[0] and remark[1] in words[1]
        assert is_correct("".join(varied), plain[-1].split("boxed{")[1][0])  # the answer still grades
    assert varied[0].startswith("Subtract: 7+2=9 ")
    rng = random.Random(2)
    drawn = {"".join(prepare.solution_steps(7, [("+", 1)], rng, remarks=True)) for _ in range(200)}
    assert len(drawn) > 120  # 256 remarks, drawn uniformly: 200 draws give about 139 distinct texts


def test_strong_critic_tokenizer_is_another_that_reads_the_policys_text(tmp_path):
    """prepare.py --strong_critic true: out_dir/strong/ alone (the task files and sft/ untouched), a backbone with
    a tokenizer of its own (whole words and numbers), which the critic's mapping reads the policy's text with."""
    from plumbing.models import load_tokenizer
    from plumbing.retokenize import critic_tokens

    run_script("data/toy/prepare.py", "--out_dir", str(tmp_path), "--strong_critic", "true", "--strong_examples",
               "64", "--sft_batch_size", "32", "--strong_hidden_size", "32", "--strong_layers", "1")
    assert sorted(os.listdir(tmp_path)) == ["strong"]
    prepare.CFG = prepare.Config()
    rng = random.Random(0)
    policy_tok = prepare.build_tokenizer(prepare.vocabulary_corpus())
    strong_tok = load_tokenizer(str(tmp_path / "strong"))
    assert strong_tok.convert_ids_to_tokens(strong_tok("Multiply: 12*3 Adx").input_ids) == ["Multiply", ":", " ", "12",
                                                                                             "*", "3", " ", "Ad", "x"]
    tokens = critic_tokens(policy_tok, strong_tok, "solutions.jsonl")
    assert tokens is not None  # not the policy's tokenizer: the critic reads the text
    start, ops = prepare.make_problem(rng)
    steps = prepare.solution_steps(start, ops, rng, trap_error=0.5)
    prompt = prepare.build_prompt_ids(policy_tok, prepare.question_text(start, ops), DEFAULT_INSTRUCTION)
    ids = prompt + policy_tok("".join(steps)).input_ids
    ends = [len(prompt) + len(policy_tok("".join(steps[:t])).input_ids) for t in range(len(steps))]
    rows = tokens.solutions([{"qid": "q", "ids": ids, "value_positions": [e - 1 for e in ends],
                              "mc_values": [0.5] * len(ends)}])
    assert len(rows) == 1 and strong_tok.unk_token_id not in rows[0]["ids"]  # every boundary at a critic token's end
    assert [strong_tok.decode(rows[0]["ids"][: p + 1]) for p in rows[0]["value_positions"]] == \
        [policy_tok.decode(ids[:e]) for e in ends]
