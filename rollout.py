"""DAPO stage A, data generation: sample solutions, label every step prefix by Monte Carlo, and keep the
first step of each completion as a candidate action (ALGORITHM.md section 2).

For every training question x, with pi_ref = pi_gen = the current policy:
  1. Generator: sample n1 solutions, grade them, keep n with correct and wrong as balanced as possible.
  2. Cut each kept solution into steps a_0..a_{T-1} (in token space: a step ends at the first token whose
     text contains the delimiter). Its states are s_t = x . a_0 ... a_{t-1}, t = 0..T-1.
  3. Completer: from every state, M completions to the end, graded. The MC label of the state is
     V_hat(s_t) = (number correct) / M; a completion cut by the token limit counts as wrong.
  4. Candidate actions: the first step of each of those M completions, with a flag for "this step ends the
     solution" and, for those, the graded reward (dapo.py takes Q = r for them).

    python rollout.py --model runs/toy/sft --data runs/toy/train.jsonl --out_dir runs/toy/iter1/rollout
    torchrun --nproc_per_node=8 rollout.py --model ... --data ...   # questions sharded over ranks

Output (out_dir): states.jsonl (one record per state), solutions.jsonl (the kept solutions, with the MC
label at every step boundary), summary.json. The format is documented in the README. Each rank appends
each finished question to its own shard (shard-RANK.jsonl) and flushes it, so rerunning the same command
after a kill resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import torch
from tqdm import tqdm
from transformers.cache_utils import DynamicLayer

from common import (DEFAULT_INSTRUCTION, InputError, all_ranks_sum, arg, barrier, build_prompt_ids, check_resume_settings,
                    cleanup_distributed, delimiter_token_mask, lm_forward, load_causal_lm, load_tokenizer, parse_config, read_jsonl, read_shard,
                    read_shards, run, append_jsonl, setup_distributed, split_steps, write_json_atomic, write_jsonl_atomic)


@dataclasses.dataclass
class QuestionConfig:
    """How questions are read, prompted and graded: the same for rollout.py and eval.py."""
    question_field: str = arg("question", "field of the question text ('problem' for MATH)")
    answer_field: str = arg("answer", "field of the reference: '#### N' solutions, \\boxed{} solutions or bare answers")
    task: str = arg("math", "math | code: how a response is graded (code: the whole record is the reference problem)")
    grader: str = arg("builtin", "math answers: builtin (needs nothing) | math-verify (Hugging Face's symbolic checker, optional)")
    id_field: str = arg("id", "field of the question id (the line number when the field is absent)")
    instruction: str = arg(DEFAULT_INSTRUCTION, "zero-shot chain-of-thought instruction added to each question")
    max_questions: int = arg(0, "use only the first N questions (0: all)")
    max_prompt_tokens: int = arg(0, "skip (never truncate) a question whose prompt is longer than this (0: no limit)")


@dataclasses.dataclass
class Config(QuestionConfig):
    model: str = arg("runs/toy/sft", "policy to sample from (pi_ref = pi_gen): HF directory or hub name")
    data: str = arg("runs/toy/train.jsonl", "JSONL of questions with reference answers")
    out_dir: str = arg("runs/toy/rollout", "where states.jsonl, solutions.jsonl and summary.json go")
    n1: int = arg(32, "generator samples per question (paper: 32)")
    n_keep: int = arg(6, "n: solutions kept per question, correct and wrong balanced (paper: 6)")
    M: int = arg(16, "completions per state: MC label and candidate actions (paper: 16)")
    temperature: float = arg(1.0, "sampling temperature of generator and completer")
    top_p: float = arg(1.0, "nucleus sampling threshold")
    max_new_tokens: int = arg(1024, "token limit of a solution; a completion cut by it is wrong")
    delimiter: str = arg("\n", "step delimiter: a step ends at the first token whose text contains it")
    batch_size: int = arg(256, "sequences per generation batch (256: the fastest in tests/benchmark_rollout.py)")
    questions_per_chunk: int = arg(16, "questions generated together (and saved together) per rank")
    seed: int = arg(0, "sampling seed (each rank offsets it)")


# Settings a resumed run may change (where the output goes, how many questions, speed): none of them
# changes a record already saved. Any other change is refused (common.check_resume_settings).
RESUME_IGNORES = ("out_dir", "max_questions", "batch_size", "questions_per_chunk")


# ============================================================================= grading (math)
_NUMBER = r"-?\d(?:[\d,]*\d)?(?:\.\d+)?|-?\.\d+"  # a comma ends a number unless a digit follows (1,000 but "25, so")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces included."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:  # "\boxed 5"
        m = re.match(r"\\(?:boxed|fbox)\s+(\S+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1: j]
    return None  # unbalanced: the solution was cut off


def extract_answer(text: str) -> str | None:
    """The final answer of a response: the last \\boxed{...}, else "The answer is ...", else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = re.findall(r"answer is[:\s]*(.+)", text, flags=re.IGNORECASE)
    if m:
        return re.split(r"\.\s", m[-1])[0].strip().rstrip(".").strip()  # "The answer is 5. Because ..." -> 5
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def reference_answer(reference: str) -> str:
    """The answer inside a reference: GSM8K ('... #### 72'), MATH (\\boxed{}) or a bare answer."""
    reference = str(reference)
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    boxed = last_boxed(reference)
    return boxed.strip() if boxed is not None else reference.strip()


def _unwrap(s: str, command: str) -> str:
    """\\text{abc} -> abc (for each occurrence, nested braces respected)."""
    while (i := s.find(command + "{")) >= 0:
        depth, j = 0, i + len(command)
        for j in range(i + len(command), len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                break
        s = s[:i] + s[i + len(command) + 1: j] + s[j + 1:]
    return s


def normalize_answer(s: str) -> str:
    """Strip what does not change the value: $, \\text{} / \\mathrm{} wrappers, units such as \\% and
    ^\\circ, 'x =', spacing commands, \\dfrac / \\tfrac, \\left / \\right, a trailing period."""
    s = s.strip()
    for command in ("\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\boxed"):
        s = _unwrap(s, command)
    for junk in ("\\$", "$", "\\!", "\\,", "\\;", "\\:", "\\left", "\\right", "^{\\circ}", "^\\circ", "\\circ",
                 "\\%", "%", "°", "\\displaystyle"):
        s = s.replace(junk, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    s = re.sub(r"^\s*[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = s.strip().rstrip(".").strip()
    # A number followed by a unit word ("5 cm", "12 dollars") is the number.
    m = re.fullmatch(rf"({_NUMBER})\s*[a-zA-Z ]+", s)
    if m:
        s = m.group(1)
    return s.replace(" ", "")


def to_number(s: str) -> Fraction | None:
    """Exact value of 1,000 / 72.0 / -0.75 / 3/4 / \\frac{1}{2} / -\\frac34, or None."""
    s = s.replace("{,}", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"(-?)\\frac\{?(-?\d+)\}?\{?(-?\d+)\}?", s) or re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    if m:
        sign = -1 if m.group(1) else 1
        return sign * Fraction(int(m.group(2)), int(m.group(3))) if int(m.group(3)) != 0 else None
    try:
        return Fraction(s) if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s) else None
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, reference: str) -> bool:
    a, b = normalize_answer(predicted), normalize_answer(reference)
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        return x == y
    return a == b


def is_correct(response: str, reference: str) -> bool:
    """Reward r: 1 when the response's final answer equals the reference answer."""
    predicted = extract_answer(response)
    return predicted is not None and answers_match(predicted, reference_answer(reference))


def is_correct_math_verify(response: str, reference: str) -> bool:
    """Reward r by Hugging Face's math-verify (pip install math-verify): the reference answer and the
    response's answer are parsed to SymPy and compared symbolically, so (x+1)^2 = x^2+2x+1."""
    from math_verify import parse, verify

    gold = parse("$" + reference_answer(reference) + "$")
    return bool(gold) and verify(gold, parse(response))


# ============================================================================= grading (code)
# The reward of a code response is 1 when its program passes every unit test of the problem. The program is
# untrusted, so each check runs in a sandbox: a fresh `python -I` in a fresh temporary directory (removed
# afterwards) with an empty environment and limits on wall-clock time, CPU time, memory, file size, processes
# and output; in new network, PID and mount namespaces where the OS allows; and, when we are root, as an
# unprivileged user, since the kernel does not apply RLIMIT_NPROC to root. It is not a container: the README
# says what it does and does not isolate.
CODE_INSTRUCTION = "Write a Python solution in a ```python code block."
SANDBOX_USER = 65534  # "nobody": the program's user and group when we are root


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """What one sandboxed process may use."""
    timeout: float = 10.0  # wall-clock seconds per process (one process per input for stdin/stdout problems)
    memory_mb: int = 1024  # address space (RLIMIT_AS): a larger allocation raises MemoryError
    output_bytes: int = 1 << 22  # stdout past this kills the program
    file_mb: int = 16  # largest file the program may write (RLIMIT_FSIZE)
    processes: int = 64  # processes and threads of the sandbox user (RLIMIT_NPROC)


# Runs first in the sandboxed interpreter. It sets the limits before any untrusted line runs (lowering a
# limit needs no privilege), runs the program (and, for a call-based problem, calls it on every input), then
# proves that the tests ran to the end by writing a nonce that it read from stdin before the program started:
# a program that leaves early (sys.exit, os._exit, a crash, a kill) never writes it. The CPU limit also ends
# whatever escaped the process group.
_HARNESS = r"""
import ctypes, json, os, resource, sys

def harness(mode, fn_name, cpu, memory, fsize, nproc):
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, fsize),
                         (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid programs (su, mount) give no rights back
    nonce = b""
    while not nonce.endswith(b"\n"):  # byte by byte: the rest of stdin is the program's input
        nonce += os.read(0, 1) or b"\n"
    out = os.dup(1)  # the nonce gets out even when the program closes or replaces stdout
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(open("program.py", encoding="utf-8").read(), "program.py", "exec"), namespace)
    except SystemExit as e:  # a stdin/stdout program may stop with exit(); a test script may not
        if mode != "stdio" or e.code not in (None, 0):
            raise
    result = ""
    if mode == "call":  # LeetCode style (class Solution) or a plain function
        fn = getattr(namespace["Solution"](), fn_name) if "Solution" in namespace else namespace[fn_name]
        result = json.dumps([fn(*args) for args in json.load(open("inputs.json", encoding="utf-8"))])
    sys.stdout.flush()
    with open(out, "wb") as f:
        f.write(b"\n" + nonce.strip() + result.encode() + b"\n")
    os._exit(0)  # threads the program left running do not hold the process

harness(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
"""


def extract_code(response: str) -> str:
    """The program of a response: its last ```python block, else its last plain ``` block, else all of it."""
    blocks = re.findall(r"```([\w+-]*)[^\n]*\n(.*?)```", response, flags=re.DOTALL)  # (language, code)
    python = [code for language, code in blocks if language.lower() in ("python", "python3", "py")]
    plain = [code for language, code in blocks if not language]
    return (python or plain or [response])[-1]


def _taco_tests(problem: dict) -> dict | None:
    """TACO/APPS tests {"inputs", "outputs"[, "fn_name"]}, stored as a dict or a JSON string; None if malformed."""
    tests = problem.get("input_output")
    try:
        tests = json.loads(tests) if isinstance(tests, str) else tests
    except json.JSONDecodeError:
        return None
    if not isinstance(tests, dict) or not all(isinstance(tests.get(key), list) for key in ("inputs", "outputs")):
        return None
    return tests if 0 < len(tests["inputs"]) == len(tests["outputs"]) else None


def code_layout(problem: dict) -> str | None:
    """'humaneval' (prompt, test, entry_point), 'mbpp' (test_list) or 'taco' (input_output); None when the
    problem has none of them, or no tests."""
    if {"prompt", "test", "entry_point"} <= problem.keys():
        return "humaneval"
    if isinstance(problem.get("test_list"), list) and problem["test_list"]:
        return "mbpp"
    if _taco_tests(problem) is not None:
        return "taco"
    return None


def code_question(question: str, problem: dict) -> str:
    """The question shown to the policy: MBPP's text names no function, so its tests follow it (the MBPP
    paper's prompt); a TACO problem's starter code (the signature to fill in) follows its statement."""
    if code_layout(problem) == "mbpp" and "assert" not in question:
        return question + "\nYour code should pass these tests:\n" + "\n".join(problem["test_list"])
    if problem.get("starter_code"):
        return question + "\n" + problem["starter_code"]
    return question


def _running_tasks(uid: int) -> int:
    """Processes and threads the user runs now: what RLIMIT_NPROC counts."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:  # it ended meanwhile
            pass
    return count


def _feed(fd: int, data: bytes) -> None:
    """Write the program's stdin, then close it (a thread: a program that reads late must not block us)."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:  # the program ended without reading all its input
        pass
    os.close(fd)


def _read_capped(pipe, deadline: float, cap: int) -> bytes | None:
    """All that is written to the pipe until every writer has closed it; None past the deadline or the cap."""
    out = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(pipe, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if selector.select(left):
                chunk = os.read(pipe.fileno(), 1 << 16)
                if not chunk:
                    return bytes(out)
                out += chunk
                if len(out) > cap:
                    return None
    return None


def _stop(proc: subprocess.Popen, namespaces: bool) -> None:
    """Kill a check and everything it started (its process group). In a PID namespace its init (unshare's
    child) goes first: the kernel then kills the whole namespace and unshare reaps it, so no zombie is left
    to the system's init (zombies count against the sandbox user's process limit until it reaps them)."""
    if namespaces:
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                for pid in f.read().split():
                    os.kill(int(pid), signal.SIGKILL)
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _launch(launcher: tuple[str, ...], python: str, files: dict[str, str], args: list[str], stdin: str,
            limits: SandboxLimits) -> tuple[str, str] | None:
    """One sandboxed process: (its stdout, what the harness wrote after the tests) when it ran to the end."""
    root = os.geteuid() == 0
    nproc = limits.processes if root else _running_tasks(os.geteuid()) + limits.processes  # ours count too
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="code-check-", ignore_cleanup_errors=True) as tmp:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(os.path.join(tmp, name), 0o644)  # readable by the sandbox user whatever our umask
        drop = {}
        if root:
            os.chown(tmp, SANDBOX_USER, SANDBOX_USER)  # the one place it may write (with world-writable ones)
            if not launcher:  # else unshare drops to the sandbox user inside the new namespaces
                drop = dict(user=SANDBOX_USER, group=SANDBOX_USER, extra_groups=[])
        command = [*launcher, python, "-I", "-c", _HARNESS, *args, str(math.ceil(limits.timeout) + 1),
                   str(limits.memory_mb << 20), str(limits.file_mb << 20), str(nproc)]
        stdin_r, stdin_w = os.pipe()
        proc = subprocess.Popen(command, cwd=tmp, env={"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8"},
                                stdin=stdin_r, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True, **drop)
        os.close(stdin_r)
        try:
            threading.Thread(target=_feed, args=(stdin_w, f"{nonce}\n{stdin}".encode()), daemon=True).start()
            out = _read_capped(proc.stdout, time.monotonic() + limits.timeout, limits.output_bytes)
        finally:
            _stop(proc, namespaces=bool(launcher))
            proc.stdout.close()
    if out is None:
        return None
    stdout, found, tail = out.rpartition(f"\n{nonce}".encode())
    if not found or not tail.endswith(b"\n") or b"\n" in tail[:-1]:
        return None
    return stdout.decode("utf-8", errors="replace"), tail[:-1].decode()


@functools.lru_cache(maxsize=None)
def _sandbox() -> tuple[tuple[str, ...], str]:
    """The strongest launcher that works here, and an interpreter that the sandbox user can run (one under
    /root, such as a pyenv, is not), tried on a program that prints 1."""
    namespaces = ("unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc")
    namespaces += (("--setgid", str(SANDBOX_USER), "--setuid", str(SANDBOX_USER)) if os.geteuid() == 0
                   else ("--map-current-user",))
    launchers = [namespaces, ()] if shutil.which("unshare") else [()]
    pythons = dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")])
    for launcher in launchers:
        for python in filter(None, pythons):
            try:
                ran = _launch(launcher, python, {"program.py": "print(1)"}, ["stdio", ""], "", SandboxLimits())
                if ran == ("1\n", ""):
                    return launcher, python
            except OSError:  # the sandbox user may not run it
                pass
    raise RuntimeError("no sandbox for code checks: no Python interpreter that the sandbox user can run")


def run_sandboxed(files: dict[str, str], mode: str, fn_name: str = "", stdin: str = "",
                  limits: SandboxLimits = SandboxLimits()) -> tuple[str, str] | None:
    """Run files["program.py"] in the sandbox ('script': to its end; 'stdio': on stdin; 'call': fn_name on
    every argument list in files["inputs.json"]). (stdout, JSON list of the calls' values) when it ran to the
    end; None when it did not (an error, an early exit, a timeout, a limit)."""
    launcher, python = _sandbox()
    return _launch(launcher, python, files, [mode, fn_name], stdin, limits)


def _same_output(got: str, expected: str) -> bool:
    """Standard output against the expected one, token by token (spacing and line ends do not count); a
    float answer (an expected token with a '.') within 1e-6."""
    def same(x: str, y: str) -> bool:
        try:
            return x == y or ("." in y and math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-6))
        except ValueError:
            return False
    a, b = got.split(), expected.split()
    return len(a) == len(b) and all(map(same, a, b))


def _as_text(value) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)  # TACO gives some as lists of lines


def is_correct_code(response: str, problem: dict, limits: SandboxLimits = SandboxLimits()) -> bool:
    """Reward r of a code response: its program (extract_code) passes every unit test of the problem, in the
    HumanEval, MBPP or TACO/APPS layout (code_layout)."""
    code, layout = extract_code(response), code_layout(problem)
    if layout == "humaneval":
        if re.search(rf"^def\s+{re.escape(problem['entry_point'])}\s*\(", code, flags=re.MULTILINE):
            program = problem["prompt"] + "\n" + code  # a whole function: it replaces the prompt's stub
        else:  # the body of the prompt's function, as a completion model writes it
            indented = code.lstrip("\n")[:1] in (" ", "\t")
            program = problem["prompt"] + (code if indented else textwrap.indent(code, "    "))
        program += f"\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
        return run_sandboxed({"program.py": program}, "script", limits=limits) is not None
    if layout == "mbpp":
        program = "\n".join([problem.get("test_setup_code") or "", code, *problem["test_list"]]) + "\n"
        return run_sandboxed({"program.py": program}, "script", limits=limits) is not None
    if layout == "taco":
        tests = _taco_tests(problem)
        inputs, outputs = tests["inputs"], tests["outputs"]
        if tests.get("fn_name"):  # call-based: fn_name(*inputs[i]) returns outputs[i]
            ran = run_sandboxed({"program.py": code, "inputs.json": json.dumps(inputs)}, "call", tests["fn_name"],
                                limits=limits)
            # APPS and TACO often store a returned value wrapped in a list: [value]
            return ran is not None and all(got == want or (isinstance(want, list) and len(want) == 1 and got == want[0])
                                           for got, want in zip(json.loads(ran[1]), outputs))
        for stdin, expected in zip(inputs, outputs):  # stdin/stdout: one process per input, as a judge runs it
            ran = run_sandboxed({"program.py": code}, "stdio", stdin=_as_text(stdin), limits=limits)
            if ran is None or not _same_output(ran[0], _as_text(expected)):
                return False
        return True
    raise ValueError(f"not a code problem (HumanEval, MBPP or TACO layout): fields {sorted(problem)}")


def grade(response: str, reference, task: str, grader: str = "builtin") -> bool:
    """Reward r of a response: math compares its final answer with the reference answer (built-in or
    math-verify grader); code runs its program against the unit tests of the reference problem."""
    if task == "code":
        return is_correct_code(response, reference)
    return is_correct_math_verify(response, reference) if grader == "math-verify" else is_correct(response, reference)


def grade_batch(responses: list[str | None], references: list, task: str, grader: str = "builtin",
                workers: int = os.cpu_count() or 1) -> list[bool]:
    """Rewards of many responses; None stands for a response cut by the token limit (wrong, never run). Code
    checks run in parallel, each waiting on its own process."""
    reward = lambda response, reference: response is not None and grade(response, reference, task, grader)  # noqa: E731
    if task != "code":  # pure Python and quick: threads would only take turns
        return list(map(reward, responses, references))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(reward, responses, references))


# ============================================================================= batched generation
@dataclasses.dataclass
class Generation:
    ids: list[int]  # generated tokens (EOS included when it ended the sequence)
    finish: str  # "eos" | "step" (ended by a delimiter token) | "length" (cut by the limit)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] next tokens; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V]
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # [B, V] tokens past the nucleus
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]


class PreallocatedLayer(DynamicLayer):
    """A transformers cache layer whose keys and values live in buffers sized for the whole generation.
    DynamicLayer grows by torch.cat, which copies the whole cache at every step (30% of a batch-256 decode
    on CPU); here a step writes one column in place, and attention reads a view of the columns written.
    Made for generate: it appends (update) and keeps or repeats rows (reorder_cache), nothing else (no crop)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.key_buffer = keys.new_empty(*keys.shape[:2], capacity, keys.shape[3])  # [B, H, capacity, D]
        self.value_buffer = values.new_empty(*values.shape[:2], capacity, values.shape[3])  # [B, H, capacity, D]
        self.length = 0
        self.update(keys, values)

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length: end] = key_states
        self.value_buffer[:, :, self.length: end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]  # [B, H, length, D] views
        return self.keys, self.values

    def reorder_cache(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) the batch rows `rows`, copying only the positions written so far."""
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(len(rows), *old.shape[1:])  # [b, H, capacity, D]
            torch.index_select(old[:, :, : self.length], 0, rows, out=new[:, :, : self.length])  # no temporary
            setattr(self, name, new)
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]

    batch_select_indices = reorder_cache


def preallocate(cache, capacity: int):
    """Swap every plain DynamicLayer of a filled transformers cache for a PreallocatedLayer that holds
    `capacity` positions. Other layers (sliding window, linear attention, quantized, ...) and caches of
    other kinds (a legacy tuple, a custom model's own) stay as they are: they just take the slower path."""
    for i, layer in enumerate(getattr(cache, "layers", ())):
        if type(layer) is DynamicLayer and layer.get_seq_length() > 0 and layer.keys.dim() == 4:
            cache.layers[i] = PreallocatedLayer(layer.keys, layer.values, capacity)
    return cache


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, eos_id: int, pad_id: int, max_new_tokens: int | list[int],
             temperature: float = 1.0, top_p: float = 1.0, stop_at: torch.Tensor | None = None,
             batch_size: int = 64, generator: torch.Generator | None = None, desc: str | None = None) -> list[Generation]:
    """Continue every prompt (token ids) until EOS, the token limit or, when stop_at ([V] bool) is given,
    the first token it marks (one-step generation). Batched with the KV cache; prompts are left padded.
    max_new_tokens is one limit for all, or one per prompt.

    Speed: a decode step is many small ops, so whatever is not the model's own compute is worth removing.
    The prefill runs once per distinct prompt of a batch; the KV cache and the attention mask are
    preallocated for the whole generation and written in place (no torch.cat of the cache every step); rows
    that finished leave the batch and the cache once a quarter of it has finished (a compaction copies the
    cache, so not at every row that ends); a step syncs with the host once, to know when to stop."""
    device = next(model.parameters()).device
    budget = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    results: list[Generation | None] = [None] * len(prompts)
    stop_at = stop_at.to(device) if stop_at is not None else None
    reasons = ["length", "eos", "step"]  # finish codes 0, 1, 2
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
        batch = order[start: start + batch_size]
        width, steps = max(len(prompts[i]) for i in batch), max(0, *(budget[i] for i in batch))
        ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in batch], device=device)  # [B, L]
        # The mask of the prompt and of every step to come; step t passes the view of its first L + t columns.
        attn = torch.zeros(len(batch), width + steps, dtype=torch.long, device=device)  # [B, L+T]
        attn[:, :width] = torch.arange(width, device=device)[None] >= torch.tensor(
            [width - len(prompts[i]) for i in batch], device=device)[:, None]  # 0 on the padding
        position = (attn[:, :width].cumsum(-1) - 1).clamp(min=0)  # [B, L] real tokens count from 0 despite padding
        # Rollouts sample many continuations of one prompt (n1 per question, M per state): the prefill runs
        # once per distinct prompt, and its logits and cache rows are then repeated for the copies.
        rows_of: dict[tuple[int, ...], list[int]] = {}  # distinct prompt -> its batch rows
        for j, i in enumerate(batch):
            rows_of.setdefault(tuple(prompts[i]), []).append(j)
        distinct = [copies[0] for copies in rows_of.values()]  # [U] one batch row per distinct prompt
        logits, cache = lm_forward(model, ids[distinct], attn[distinct, :width], position[distinct], last_only=True)
        cache = preallocate(cache, width + steps)
        can_reorder = callable(getattr(cache, "reorder_cache", None))  # False for a custom model's own cache
        if len(distinct) < len(batch):
            if can_reorder:
                source = torch.empty(len(batch), dtype=torch.long, device=device)  # [B] prefill row of each batch row
                for u, copies in enumerate(rows_of.values()):
                    source[copies] = u
                logits = logits[source]  # [B, 1, V]
                cache.reorder_cache(source)
            else:  # a cache that cannot copy rows (not a transformers Cache, so not preallocated): prefill every row
                logits, cache = lm_forward(model, ids, attn[:, :width], position, last_only=True)
        logits = logits[:, -1]  # [B, V]
        position = position[:, -1:]  # [B, 1]
        # Per batch row: the tokens it generated (pad after its end), how many count, and why it ended.
        out = torch.full((len(batch), max(steps, 1)), pad_id, device=device)  # [B, T]
        length = torch.zeros(len(batch), dtype=torch.long, device=device)  # [B]
        finish = torch.zeros(len(batch), dtype=torch.long, device=device)  # [B] index into reasons
        # Per live row (rows still in the model's batch, finished or not): its batch row, limit, whether it ended.
        rows = torch.arange(len(batch), device=device)  # [b]
        limit = torch.tensor([budget[i] for i in batch], device=device)  # [b]
        done = limit <= 0  # [b]
        for t in range(steps):
            token = sample_next(logits, temperature, top_p, generator)  # [b]
            token = torch.where(done, pad_id, token)  # finished rows still in the batch add nothing
            out[rows, t] = token
            ended_eos = ~done & (token == eos_id)  # [b]
            ended_step = ~done & ~ended_eos & (stop_at[token] if stop_at is not None else False)  # [b]
            ended = ended_eos | ended_step | (~done & (t + 1 >= limit))  # [b] the limit ends a row as "length"
            length[rows] = torch.where(ended, t + 1, length[rows])
            finish[rows] = torch.where(ended, ended_eos.long() + 2 * ended_step.long(), finish[rows])
            done |= ended
            finished = int(done.sum())  # the one host sync of a step
            if finished == len(done):
                break
            if can_reorder and finished >= len(done) / 4:  # compaction: finished rows leave the batch
                keep = (~done).nonzero().squeeze(1)  # [b']
                rows, limit, done, token = rows[keep], limit[keep], done[keep], token[keep]
                position, attn = position[keep], attn[keep]
                cache.reorder_cache(keep)
            attn[:, width + t] = (~done).long()  # finished rows attend to nothing new
            position = position + 1  # [b, 1]
            logits, cache = lm_forward(model, token[:, None], attn[:, : width + t + 1], position, cache)
            logits = logits[:, -1]  # [b, V]
        for j, (ids_j, n, code) in enumerate(zip(out.tolist(), length.tolist(), finish.tolist())):
            results[batch[j]] = Generation(ids_j[:n], reasons[code])
    return results


# ============================================================================= stage A for a chunk of questions
def select_balanced(samples: list[tuple[list[int], bool]], n: int) -> list[tuple[list[int], bool]]:
    """Keep n distinct solutions with correct and wrong as balanced as possible (paper: n = 6 of n1 = 32)."""
    unique = list({tuple(ids): (ids, ok) for ids, ok in samples}.values())
    right = [s for s in unique if s[1]]
    wrong = [s for s in unique if not s[1]]
    n_right = min(len(right), max(n // 2, n - len(wrong)))
    return right[:n_right] + wrong[: n - n_right]


def mc_value(correct: list[bool]) -> float:
    """MC label of a state: V_hat(s) = (number of correct completions) / M."""
    return sum(correct) / len(correct)


def rollout_chunk(model, tok, questions: list[dict], cfg: Config, is_delim: torch.Tensor, g: torch.Generator) -> list[dict]:
    """Steps 1-4 of the docstring for a chunk of questions; returns one record per question."""
    eos = tok.eos_token_id
    gen = dict(eos_id=eos, pad_id=tok.pad_token_id, max_new_tokens=cfg.max_new_tokens,
               temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size, generator=g)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731

    # 1. Generator: n1 samples per question, graded (a sample cut by the token limit is wrong); keep n balanced.
    prompts = [q["prompt_ids"] for q in questions for _ in range(cfg.n1)]
    samples = generate(model, prompts, desc="generator", **gen)
    rewards = grade_batch([decode(s.ids) if s.finish == "eos" else None for s in samples],
                          [q["answer"] for q in questions for _ in range(cfg.n1)], cfg.task, cfg.grader)
    records = []
    for qi in range(len(questions)):
        mine = samples[qi * cfg.n1: (qi + 1) * cfg.n1]
        graded = [(s.ids, ok) for s, ok in zip(mine, rewards[qi * cfg.n1: (qi + 1) * cfg.n1])]
        records.append({"kept": select_balanced(graded, cfg.n_keep), "tokens": sum(len(s.ids) for s in mine)})

    # 2. States: every step prefix s_0..s_{T-1} of every kept solution (s_0, shared by all, only once).
    states = []  # (question index, response ids so far, step index t)
    for qi, rec in enumerate(records):
        seen = set()
        for ids, _ in rec["kept"]:
            steps = split_steps(ids, is_delim, eos)
            for t in range(len(steps)):
                prefix = [tok_id for step in steps[:t] for tok_id in step]
                if tuple(prefix) not in seen:
                    seen.add(tuple(prefix))
                    states.append((qi, prefix, t))

    # 3. Completer: M completions to the end from every state, graded. max_new_tokens limits the whole
    # solution, so a completion from s_t gets what the steps before it left over.
    prompts = [questions[qi]["prompt_ids"] + prefix for qi, prefix, _ in states for _ in range(cfg.M)]
    budgets = [cfg.max_new_tokens - len(prefix) for _, prefix, _ in states for _ in range(cfg.M)]
    completions = generate(model, prompts, desc="completer", **{**gen, "max_new_tokens": budgets})
    rewards = grade_batch([decode(prefix + c.ids) if c.finish == "eos" else None
                           for (_, prefix, _), c in zip([s for s in states for _ in range(cfg.M)], completions)],
                          [questions[qi]["answer"] for qi, _, _ in states for _ in range(cfg.M)], cfg.task, cfg.grader)

    # 4. MC labels and candidate actions (the first step of each completion).
    state_records: list[list[dict]] = [[] for _ in questions]
    label_of: list[dict] = [{} for _ in questions]
    for si, (qi, prefix, t) in enumerate(states):
        q, comps = questions[qi], completions[si * cfg.M: (si + 1) * cfg.M]
        correct = rewards[si * cfg.M: (si + 1) * cfg.M]
        actions = []
        for c, ok in zip(comps, correct):
            first = split_steps(c.ids, is_delim, eos)[0] if c.ids else []
            # The first step ends the solution when the completion has no other step; a step cut by the
            # token limit also ends it (wrong).
            terminal = len(first) == len(c.ids) and c.finish != "step"
            actions.append({"ids": first, "text": decode(first), "terminal": terminal,
                            "reward": float(ok) if terminal else None})
        value = mc_value(correct)
        records[qi]["tokens"] += sum(len(c.ids) for c in comps)
        label_of[qi][tuple(prefix)] = value
        state_records[qi].append({
            "qid": q["qid"], "t": t, "prompt_len": len(q["prompt_ids"]), "state_ids": q["prompt_ids"] + prefix,
            "state_text": decode(prefix), "mc_value": value, "num_correct": sum(correct), "actions": actions})

    out = []
    for qi, (q, rec) in enumerate(zip(questions, records)):
        solutions = []
        for ids, ok in rec["kept"]:
            steps = split_steps(ids, is_delim, eos)
            ends = [len(q["prompt_ids"]) + sum(len(s) for s in steps[:t]) for t in range(len(steps))]
            prefixes = [tuple(tok_id for s in steps[:t] for tok_id in s) for t in range(len(steps))]
            solutions.append({"qid": q["qid"], "prompt_len": len(q["prompt_ids"]), "ids": q["prompt_ids"] + ids,
                              "text": decode(ids), "correct": ok, "step_ends": ends,
                              "mc_values": [label_of[qi][p] for p in prefixes]})
        out.append({"qid": q["qid"], "states": state_records[qi], "solutions": solutions, "tokens": rec["tokens"]})
    return out


def check_grader(grader: str) -> None:
    if grader not in ("builtin", "math-verify"):
        raise InputError(f"--grader must be builtin or math-verify, got {grader!r}")
    if grader == "math-verify" and importlib.util.find_spec("math_verify") is None:
        raise InputError("--grader math-verify needs the math-verify package: pip install -r requirements-optional.txt")


def load_questions(cfg: Config, tok) -> list[dict]:
    if cfg.task not in ("math", "code"):
        raise InputError(f"--task must be math or code, got {cfg.task!r}")
    check_grader(cfg.grader)
    code = cfg.task == "code"
    rows = read_jsonl(cfg.data, required=(cfg.question_field,) if code else (cfg.question_field, cfg.answer_field))
    # The default instruction asks for \boxed{}: code gets its own unless one is given.
    instruction = CODE_INSTRUCTION if code and cfg.instruction == DEFAULT_INSTRUCTION else cfg.instruction
    if cfg.max_questions:
        rows = rows[: cfg.max_questions]
    questions, seen = [], set()
    for r in rows:
        qid = str(r.get(cfg.id_field, r["_line"]))
        if qid in seen:
            raise InputError(f"{cfg.data} line {r['_line']}: duplicate id {qid!r}")
        seen.add(qid)
        if not isinstance(r[cfg.question_field], str) or not r[cfg.question_field].strip():
            raise InputError(f"{cfg.data} line {r['_line']}: field {cfg.question_field!r} must be a non-empty string")
        if code and code_layout(r) is None:
            raise InputError(f"{cfg.data} line {r['_line']}: not a code problem with tests: it needs prompt, test and "
                             "entry_point (HumanEval), test_list (MBPP) or input_output (TACO)")
        reference = {k: v for k, v in r.items() if k != "_line"} if code else str(r[cfg.answer_field])
        question = code_question(r[cfg.question_field], reference) if code else r[cfg.question_field]
        prompt_ids = build_prompt_ids(tok, question, instruction)
        if cfg.max_prompt_tokens and len(prompt_ids) > cfg.max_prompt_tokens:
            continue  # a cut question is another question: leave it out rather than truncate it
        questions.append({"qid": qid, "question": question, "answer": reference, "prompt_ids": prompt_ids})
    if len(questions) < len(rows):
        print(f"{cfg.data}: skipped {len(rows) - len(questions)} question(s) whose prompt is longer than "
              f"--max_prompt_tokens {cfg.max_prompt_tokens}")
    if not questions:
        raise InputError(f"{cfg.data}: no question left (every prompt is longer than --max_prompt_tokens)")
    return questions


def main() -> None:
    cfg = parse_config(Config)
    ddp = setup_distributed()
    tok = load_tokenizer(cfg.model)
    questions = load_questions(cfg, tok)  # validated in full before anything is written
    os.makedirs(cfg.out_dir, exist_ok=True)
    check_resume_settings(cfg.out_dir, cfg, ddp.is_main, ignore=RESUME_IGNORES)  # before a shard is touched
    model = load_causal_lm(cfg.model, ddp.device, torch.bfloat16 if ddp.device.type == "cuda" else torch.float32).eval()
    is_delim = delimiter_token_mask(tok, cfg.delimiter)

    # Resume: skip every question already in some shard (a rerun may even use another number of ranks).
    my_shard = os.path.join(cfg.out_dir, f"shard-{ddp.rank}.jsonl")
    read_shard(my_shard)  # drops a line cut short by a kill
    barrier()
    done = {r["qid"] for r in read_shards(cfg.out_dir)}
    todo = [q for q in questions[ddp.rank:: ddp.world_size] if q["qid"] not in done]
    if ddp.is_main:
        print(f"{len(questions)} questions, {len(done)} already done, {ddp.world_size} rank(s)")

    g = torch.Generator(ddp.device).manual_seed(cfg.seed + 1000 * ddp.rank + len(done))
    t0, tokens = time.time(), 0
    with open(my_shard, "a", encoding="utf-8") as shard:
        bar = tqdm(total=len(todo), desc=f"rollout rank {ddp.rank}", position=ddp.rank)
        for start in range(0, len(todo), cfg.questions_per_chunk):
            chunk = todo[start: start + cfg.questions_per_chunk]
            for record in rollout_chunk(model, tok, chunk, cfg, is_delim, g):
                tokens += record["tokens"]
                append_jsonl(shard, record)
            bar.update(len(chunk))
        bar.close()
    elapsed = time.time() - t0
    tokens = all_ranks_sum(tokens)  # this run's tokens on every rank (rank 0 prints)

    if ddp.is_main:  # merge the shards: every question exactly once, in input order
        by_qid = {r["qid"]: r for r in read_shards(cfg.out_dir)}
        merged = [by_qid[q["qid"]] for q in questions if q["qid"] in by_qid]
        states = [s for r in merged for s in r["states"]]
        write_jsonl_atomic(os.path.join(cfg.out_dir, "states.jsonl"), states)
        write_jsonl_atomic(os.path.join(cfg.out_dir, "solutions.jsonl"), [s for r in merged for s in r["solutions"]])
        summary = {"questions": len(merged), "states": len(states),
                   "mean_mc_value": sum(s["mc_value"] for s in states) / max(1, len(states)),
                   "kept_solutions": sum(len(r["solutions"]) for r in merged),
                   "kept_correct": sum(s["correct"] for r in merged for s in r["solutions"]),
                   "tokens_generated": sum(r["tokens"] for r in merged),
                   "tokens_this_run": tokens, "seconds_this_run": round(elapsed, 2),
                   "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1), "config": dataclasses.asdict(cfg)}
        write_json_atomic(os.path.join(cfg.out_dir, "summary.json"), summary)
        print(f"questions {summary['questions']} | states {summary['states']} | mean MC label "
              f"{summary['mean_mc_value']:.3f} | tokens generated {summary['tokens_generated']} | "
              f"{summary['tokens_per_second']} tokens/s (this run, all ranks)")
    cleanup_distributed()


if __name__ == "__main__":
    run(main)
