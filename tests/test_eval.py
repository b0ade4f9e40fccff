"""eval.py on the toy model: greedy accuracy against a hand count, the summary, seeding, torchrun sharding,
bad input; and the maj@k vote as a pure function."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_script

from plumbing import cli, runfiles
import eval as eval_script
from plumbing.cli import parse_config
from plumbing.models import build_prompt_ids, load_causal_lm, load_tokenizer
from plumbing.runfiles import read_jsonl
from eval import RESUME_IGNORES, Config, majority_answer
from plumbing.generation import generate

N, K, MAX_NEW_TOKENS = 7, 3, 40  # an odd number of questions: two ranks get unequal shares
SUMMARY_FIELDS = {"greedy_acc", "sampled_acc", "pass@k", "maj@k", "num_questions", "k", "temperature", "seconds",
                  "model", "data", "max_new_tokens", "seed", "world_size", "config"}


def run_eval(toy_dir, out_dir, *extra, launcher=()):
    return run_script(*launcher, "eval.py", "--model", str(toy_dir / "sft"), "--data", str(toy_dir / "test.jsonl"),
                      "--out_dir", str(out_dir), "--max_questions", str(N), "--k", str(K),
                      "--max_new_tokens", str(MAX_NEW_TOKENS), *extra,
                      env={"OMP_NUM_THREADS": "1"})  # tiny model, shared cores: a second thread only spins


def outputs(out_dir):
    records = [json.loads(line) for line in open(out_dir / "responses.jsonl")]
    return records, json.load(open(out_dir / "summary.json"))


@pytest.fixture(scope="module")
def one_process(toy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    run_eval(toy_dir, out)
    return out


def test_greedy_accuracy_equals_a_hand_count(toy_dir, one_process):
    questions = read_jsonl(str(toy_dir / "test.jsonl"))[:N]
    tok = load_tokenizer(str(toy_dir / "sft"))
    model = load_causal_lm(str(toy_dir / "sft"), torch.device("cpu")).eval()
    prompts = [build_prompt_ids(tok, q["question"]) for q in questions]
    gens = generate(model, prompts, eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id,
                    max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
    texts = [tok.decode(g.ids, skip_special_tokens=True) for g in gens]
    # By hand: the last \boxed{N}, or (the grader's fallback for a response that boxes nothing) the last number.
    answers = [(re.findall(r"\\boxed\{([^{}]*)\}", t) or re.findall(r"\d+", t) or [None])[-1] for t in texts]
    hand = [g.finish == "eos" and a == q["answer"] for g, a, q in zip(gens, answers, questions)]

    records, summary = outputs(one_process)
    assert [r["id"] for r in records] == [q["id"] for q in questions]
    assert [r["greedy_response"] for r in records] == texts
    assert [r["greedy_correct"] for r in records] == hand
    assert summary["greedy_acc"] == pytest.approx(sum(hand) / N)


def test_summary_has_every_field_and_agrees_with_the_responses(one_process):
    records, summary = outputs(one_process)
    assert SUMMARY_FIELDS <= set(summary)
    assert (summary["num_questions"], summary["k"], summary["temperature"], summary["world_size"]) == (N, K, 1.0, 1)
    for key in ("greedy_acc", "sampled_acc", "pass@k", "maj@k"):
        assert 0.0 <= summary[key] <= 1.0
    assert all(len(r["sampled_responses"]) == len(r["sampled_correct"]) == K for r in records)
    assert summary["sampled_acc"] == pytest.approx(sum(sum(r["sampled_correct"]) for r in records) / (N * K))
    assert summary["pass@k"] == pytest.approx(sum(any(r["sampled_correct"]) for r in records) / N)
    assert summary["maj@k"] == pytest.approx(sum(r["maj_correct"] for r in records) / N)
    assert summary["pass@k"] >= summary["sampled_acc"]
    assert summary["greedy_cut"] == pytest.approx(sum(r["greedy_finish"] == "length" for r in records) / N)
    sampled_cut = sum(f == "length" for r in records for f in r["sampled_finish"])
    assert summary["sampled_cut"] == pytest.approx(sampled_cut / (N * K))
    assert sorted(p.name for p in one_process.iterdir()) == ["responses.jsonl", "summary.json"]  # no parts, no .tmp


def test_same_seed_same_numbers_other_seed_other_samples(toy_dir, one_process, tmp_path):
    records, summary = outputs(one_process)
    run_eval(toy_dir, tmp_path / "same")
    run_eval(toy_dir, tmp_path / "other", "--seed", "1")
    same_records, same_summary = outputs(tmp_path / "same")
    other_records, _ = outputs(tmp_path / "other")
    drop = lambda s: {k: v for k, v in s.items() if k not in ("seconds", "config")}  # noqa: E731
    assert same_records == records and drop(same_summary) == drop(summary)
    assert [r["greedy_response"] for r in other_records] == [r["greedy_response"] for r in records]
    assert [r["sampled_responses"] for r in other_records] != [r["sampled_responses"] for r in records]


def test_torchrun_two_processes_cover_every_question_once(toy_dir, one_process, tmp_path):
    run_eval(toy_dir, tmp_path, launcher=("torchrun", "--nproc_per_node=2"))
    records, summary = outputs(tmp_path)
    single, _ = outputs(one_process)
    assert [r["id"] for r in records] == [r["id"] for r in single]  # every question exactly once, input order
    assert [r["greedy_correct"] for r in records] == [r["greedy_correct"] for r in single]
    assert [r["greedy_response"] for r in records] == [r["greedy_response"] for r in single]
    assert (summary["num_questions"], summary["world_size"]) == (N, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["responses.jsonl", "summary.json"]


# eval.py as a script, but its grader announces every question and hangs in the 5th: with chunks of 3 questions
# the process is then killed inside chunk 1, after one of its questions was graded (code grading takes seconds
# per question, so a real kill often lands there).
HANG_IN_THE_5TH_GRADING = """
import sys, time
import eval
from plumbing import cli
grade, calls = eval.grade_question, []
def announced_grade(*args, **kwargs):
    calls.append(1)
    print(f"grading question {len(calls)}", flush=True)
    if len(calls) == 5:
        time.sleep(600)
    return grade(*args, **kwargs)
eval.grade_question = announced_grade
sys.argv[0] = "eval.py"
cli.run(eval.main)
"""


def test_kill_inside_a_chunk_resumes_with_the_numbers_of_an_uninterrupted_run(toy_dir, tmp_path):
    chunked = ("--questions_per_chunk", "3")  # 7 questions: chunks of 3, 3 and 1
    run_eval(toy_dir, tmp_path / "whole", *chunked)
    out = tmp_path / "killed"
    args = ["--model", str(toy_dir / "sft"), "--data", str(toy_dir / "test.jsonl"), "--out_dir", str(out),
            "--max_questions", str(N), "--k", str(K), "--max_new_tokens", str(MAX_NEW_TOKENS), *chunked]
    with open(tmp_path / "log", "w") as log:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-c", HANG_IN_THE_5TH_GRADING, *args], cwd=ROOT, env=env,
                                stdout=log, stderr=log)
        try:
            deadline = time.time() + 300
            while "grading question 5" not in open(tmp_path / "log").read():
                assert proc.poll() is None and time.time() < deadline, open(tmp_path / "log").read()[-3000:]
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
    shard = out / "shard-0.jsonl"
    saved = [json.loads(line) for line in shard.read_text().splitlines()]
    assert [line["chunk"] for line in saved] == [0] and not (out / "summary.json").exists()  # chunk 1: nothing of it
    # Mark the saved chunk (a rerun that redid it would overwrite the mark), then cut a line short as a kill would.
    saved[0]["records"][0]["greedy_response"] = "kept, not redone"
    shard.write_text(json.dumps(saved[0]) + "\n" + '{"chunk": 1, "records": [{"id": ')

    run_script("eval.py", *args, env={"OMP_NUM_THREADS": "1"})
    records, summary = outputs(out)
    whole_records, whole_summary = outputs(tmp_path / "whole")
    assert records[:3] == saved[0]["records"]  # the saved chunk is kept, not redone
    assert records[3:] == whole_records[3:]  # the rest is what the uninterrupted run drew
    drop = lambda s: {k: v for k, v in s.items() if k not in ("seconds", "config")}  # noqa: E731
    assert drop(summary) == drop(whole_summary)
    assert sorted(p.name for p in out.iterdir()) == ["responses.jsonl", "summary.json"]


@pytest.mark.parametrize("change", [("--batch_size", "7"), ("--questions_per_chunk", "2"), ("--max_questions", "5")])
def test_resume_with_settings_that_change_the_draws_is_refused(toy_dir, tmp_path, monkeypatch, capsys, change):
    out = tmp_path / "out"
    args = ["eval.py", "--model", str(toy_dir / "sft"), "--data", str(toy_dir / "test.jsonl"), "--out_dir", str(out),
            "--max_questions", str(N), "--k", str(K)]
    out.mkdir()
    runfiles.check_rerun(parse_config(Config, args[1:]), str(out), str(out / "summary.json"),
                         str(out / "settings.json"), [], RESUME_IGNORES, True)  # records the settings of that run
    (out / "shard-0.jsonl").write_text('{"chunk": 0, "records": []}\n')  # unfinished work of that run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(sys, "argv", args + list(change))
    with pytest.raises(SystemExit) as exit_info:
        cli.run(eval_script.main)
    assert exit_info.value.code == 2 and f"{change[0]} " in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_responses_cut_by_the_token_limit_are_reported(toy_dir, tmp_path):
    proc = run_eval(toy_dir, tmp_path, "--max_new_tokens", "3", "--max_questions", "2", "--k", "1")
    _, summary = outputs(tmp_path)
    assert summary["greedy_cut"] == summary["sampled_cut"] == 1.0
    assert "cut by the token limit       1.000 greedy, 1.000 sampled" in proc.stdout
    assert "warning: 4 of 4 responses were cut by the token limit" in proc.stderr and "--max_new_tokens" in proc.stderr


def test_rerun_over_finished_output(toy_dir, one_process, tmp_path):
    out = tmp_path / "eval"
    shutil.copytree(one_process, out)
    old = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = run_eval(toy_dir, out)  # the same command: complete, nothing redone or rewritten
    assert "complete" in proc.stdout and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == old
    for extra, named in [(("--k", "2"), "--k 3 -> 2"), (("--max_questions", "3"), "--max_questions 7 -> 3")]:
        proc = run_script("eval.py", "--model", str(toy_dir / "sft"), "--data", str(toy_dir / "test.jsonl"),
                          "--out_dir", str(out), "--max_questions", str(N), "--k", str(K),
                          "--max_new_tokens", str(MAX_NEW_TOKENS), *extra, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and named in lines[0] and "--overwrite true" in lines[0], lines
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == old
    run_eval(toy_dir, out, "--k", "0", "--overwrite", "true")  # redone from scratch with the new settings
    records, summary = outputs(out)
    assert summary["k"] == 0 and all(r["sampled_responses"] == [] for r in records)


@pytest.mark.parametrize("case", ["malformed", "missing_field", "no_model"])
def test_bad_input_exits_2_naming_the_file(toy_dir, tmp_path, case):
    data, model = tmp_path / "test.jsonl", toy_dir / "sft"
    lines = ['{"id": "a", "question": "Start with 1. Add 2.", "answer": "3"}']
    second = {"malformed": '{"id": "b", "question": ', "missing_field": '{"id": "b", "question": "Add 1."}'}
    lines.append(second.get(case, lines[0].replace('"a"', '"b"')))
    data.write_text("\n".join(lines) + "\n")
    if case == "no_model":
        model = tmp_path / "no-such-model"
    out = tmp_path / "out"
    proc = run_script("eval.py", "--model", str(model), "--data", str(data), "--out_dir", str(out), check=False)
    assert proc.returncode == 2, proc.stderr
    named = str(model) if case == "no_model" else f"{data} line 2"
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and named in proc.stderr
    assert not (out / "summary.json").exists()


def test_majority_vote_counts_equal_answers_together():
    # 1,000 and 1000 are one answer (2 votes) and beat 7 (1 vote); "no answer here" has no number and no vote.
    assert majority_answer(["\\boxed{7}", "so \\boxed{1,000}", "no answer here", "\\boxed{1000}"]) == "1,000"
    assert majority_answer(["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{3}"]) in ("\\frac{1}{2}", "0.5")
    assert majority_answer(["\\boxed{4}", "\\boxed{5}"]) == "4"  # a tie goes to the answer seen first
    assert majority_answer(["no answer here", "nothing"]) is None
    assert majority_answer(["The answer is $12$."]) == "12"  # normalised: $ and the period stripped


def test_a_second_eos_id_ends_the_response_and_it_is_graded(tmp_path, monkeypatch):
    """A model whose generation config lists a second EOS and that ends with it (test_rollout.second_eos_model:
    run on, it would be cut by the limit): greedy and sampled responses end there, uncut, and are graded."""
    import test_rollout as scripted

    tok = scripted.word_tokenizer(scripted.PIECES + ["<|eot|>"])
    tok.padding_side = "left"
    monkeypatch.setattr(eval_script, "load_tokenizer", lambda path: tok)
    unk = tok.unk_token_id  # the prompt "Q\n" ends with "\n", which the tokenizer does not have
    monkeypatch.setattr(eval_script, "load_policy", lambda *args, **kwargs: scripted.second_eos_model(prompt_end=unk))
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "Q", "answer": "1"}) + "\n")
    argv = ["--model", "scripted", "--data", str(tmp_path / "test.jsonl"), "--out_dir", str(tmp_path / "eval"),
            "--instruction", "", "--k", "3", "--max_new_tokens", "6"]
    monkeypatch.setattr(sys, "argv", ["eval.py"] + argv)
    eval_script.main()
    [record], summary = outputs(tmp_path / "eval")
    assert record["greedy_finish"] == "eos" and record["sampled_finish"] == ["eos"] * 3
    assert record["greedy_response"] == "good\n\\boxed{1}<|eot|>" and record["greedy_correct"]
    assert summary["greedy_acc"] == summary["sampled_acc"] == summary["maj@k"] == 1.0
    assert summary["greedy_cut"] == summary["sampled_cut"] == 0.0
