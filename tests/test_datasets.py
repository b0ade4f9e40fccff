"""Real benchmark layouts (GSM8K, MATH with a solution or an answer field, generic question/answer) through
rollout.load_questions and the grader: the field names are settings, the reference answer is found inside
each layout, and a response is graded against it."""
import json
import sys
from types import SimpleNamespace

import pytest

from plumbing.cli import InputError
from plumbing.models import DEFAULT_INSTRUCTION
from grading import grade_batch, reference_answer
from rollout import Config, load_questions


class CharTokenizer:
    """A tokenizer without a chat template: one id per character, so the prompt can be read back exactly."""
    chat_template = None

    def __call__(self, text):
        return SimpleNamespace(input_ids=[ord(c) for c in text])


def decode(ids):
    return "".join(map(chr, ids))


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# Each layout: records as the benchmark ships them, the fields to read, the reference answer inside each
# record, and responses graded right and wrong against it.
LAYOUTS = {
    "gsm8k": dict(
        rows=[{"question": "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many "
                           "clips did she sell in April and May?",
               "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                         "Altogether 48+24 = <<48+24=72>>72.\n#### 72"},
              {"question": "A shop sells 1,200 pens a week. How many in two weeks?",
               "answer": "1,200 * 2 = 2,400\n#### 2,400"}],
        fields={}, references=["72", "2,400"],
        right=["April: 48.\nMay: 24.\nTotal: \\boxed{72}", "The answer is 2400."],
        wrong=["Total: \\boxed{24}", "The answer is 1200."]),
    "math_solution": dict(
        rows=[{"problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?", "level": "Level 1", "type": "Prealgebra",
               "solution": "We add: $\\frac{1}{4}+\\frac{1}{4} = \\boxed{\\frac{1}{2}}$."},
              {"problem": "Find $\\sin 60^\\circ$.", "level": "Level 2", "type": "Precalculus",
               "solution": "It is $\\boxed{\\dfrac{\\sqrt{3}}{2}}$."}],
        fields={"question_field": "problem", "answer_field": "solution"},
        references=["\\frac{1}{2}", "\\dfrac{\\sqrt{3}}{2}"],
        right=["So the sum is \\boxed{0.5}", "Hence $\\boxed{\\frac{\\sqrt{3}}{2}}$."],
        wrong=["So the sum is \\boxed{\\frac{1}{8}}", "Hence \\boxed{\\frac{1}{2}}."]),
    "math_answer": dict(
        rows=[{"problem": "How many positive divisors does 12 have?", "solution": "1, 2, 3, 4, 6, 12: $\\boxed{6}$.",
               "answer": "6", "unique_id": "test/number_theory/1.json"},
              {"problem": "Solve $2x = 7$.", "solution": "$x = \\boxed{\\frac72}$", "answer": "\\frac{7}{2}",
               "unique_id": "test/algebra/2.json"}],
        fields={"question_field": "problem", "answer_field": "answer", "id_field": "unique_id"},
        references=["6", "\\frac{7}{2}"],
        right=["The divisors are 1, 2, 3, 4, 6, 12, so \\boxed{6}.", "x = \\boxed{3.5}"],
        wrong=["\\boxed{12}", "x = \\boxed{\\frac{2}{7}}"]),
    "generic": dict(
        rows=[{"id": "q-a", "question": "What is 6 times 7?", "answer": "42"},
              {"id": "q-b", "question": "What is 10% of 50?", "answer": 5}],
        fields={}, references=["42", "5"],
        right=["6 * 7 = 42\n\\boxed{42}", "\\boxed{5\\%}"],
        wrong=["\\boxed{43}", "The last number is 50"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_is_read_and_graded(layout, tmp_path):
    spec = LAYOUTS[layout]
    cfg = Config(data=write(tmp_path / f"{layout}.jsonl", spec["rows"]), **spec["fields"])
    questions = load_questions(cfg, CharTokenizer())
    question_field, id_field = spec["fields"].get("question_field", "question"), spec["fields"].get("id_field", "id")
    assert [q["qid"] for q in questions] == [str(r.get(id_field, i + 1)) for i, r in enumerate(spec["rows"])]
    for q, row, ref in zip(questions, spec["rows"], spec["references"]):
        # The paper's zero-shot chain-of-thought prompt around the question (no chat template here).
        assert decode(q["prompt_ids"]) == f"{row[question_field]}\n{DEFAULT_INSTRUCTION}\n"
        assert reference_answer(q["answer"]) == ref
    answers = [q["answer"] for q in questions]
    assert grade_batch(spec["right"], answers, "math") == [True, True]
    assert grade_batch(spec["wrong"], answers, "math") == [False, False]
    assert grade_batch([None, None], answers, "math") == [False, False]  # cut by the token limit: wrong


def test_instruction_and_question_limit_are_settings(tmp_path):
    cfg = Config(data=write(tmp_path / "g.jsonl", LAYOUTS["gsm8k"]["rows"]), instruction="Answer briefly.",
                 max_questions=1)
    questions = load_questions(cfg, CharTokenizer())
    assert len(questions) == 1 and decode(questions[0]["prompt_ids"]).endswith("\nAnswer briefly.\n")


def test_wrong_field_names_name_the_file_and_line(tmp_path):
    path = write(tmp_path / "math.jsonl", LAYOUTS["math_solution"]["rows"])
    missing = (r"math\.jsonl line 1: missing field\(s\) question, answer "
               r"\(other field names: --question_field, --answer_field\)")
    with pytest.raises(InputError, match=missing):
        load_questions(Config(data=path), CharTokenizer())  # MATH read with the GSM8K field names
    with pytest.raises(InputError, match=r"math\.jsonl line 1: missing field\(s\) answer"):
        load_questions(Config(data=path, question_field="problem"), CharTokenizer())


def test_math_verify_grader_is_optional_and_symbolic(tmp_path, monkeypatch):
    rows = [{"problem": "Expand $(x+1)^2$.", "answer": "x^2+2x+1"}, {"problem": "Half of 7?", "answer": "\\frac{7}{2}"}]
    path = write(tmp_path / "m.jsonl", rows)
    with pytest.raises(InputError, match="--grader must be builtin or math-verify"):
        load_questions(Config(data=path, question_field="problem", grader="sympy"), CharTokenizer())
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if it were not installed
    with pytest.raises(InputError, match="requirements-optional.txt"):
        load_questions(Config(data=path, question_field="problem", grader="math-verify"), CharTokenizer())
    monkeypatch.undo()
    pytest.importorskip("math_verify")
    answers = [q["answer"] for q in load_questions(Config(data=path, question_field="problem", grader="math-verify"),
                                                   CharTokenizer())]
    responses = ["So it is \\boxed{(x+1)(x+1)}", "\\boxed{3.5}"]
    assert grade_batch(responses, answers, "math") == [False, True]  # built-in: no algebra
    assert grade_batch(responses, answers, "math", "math-verify") == [True, True]
    assert grade_batch(["\\boxed{x^2+1}", None], answers, "math", "math-verify") == [False, False]


def test_max_prompt_tokens_skips_long_questions_and_never_truncates(tmp_path):
    from plumbing.cli import InputError
    from rollout import Config, load_questions

    class Tok:  # one token per character: prompt length is easy to reason about
        chat_template = None
        def __call__(self, text):
            return type("E", (), {"input_ids": [ord(c) for c in text]})()

    data = tmp_path / "q.jsonl"
    data.write_text('{"id": "short", "question": "1+1?", "answer": "2"}\n'
                    '{"id": "long", "question": "' + "x" * 200 + '", "answer": "2"}\n')
    full = load_questions(Config(data=str(data), instruction=""), Tok())
    limit = len(full[0]["prompt_ids"])
    kept = load_questions(Config(data=str(data), instruction="", max_prompt_tokens=limit), Tok())
    assert [q["qid"] for q in kept] == ["short"] and kept[0]["prompt_ids"] == full[0]["prompt_ids"]
    with pytest.raises(InputError, match="no question left"):
        load_questions(Config(data=str(data), instruction="", max_prompt_tokens=1), Tok())
