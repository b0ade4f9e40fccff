"""The reward r of a response (ALGORITHM.md section 1: r = 1 if the final answer is correct, else 0).

Math: the final answer (the last \\boxed{}, else the last number) is compared with the reference answer,
by the built-in grader (normalisation, then exact or numeric equality; needs nothing) or by Hugging Face's
math-verify (symbolic, optional). Code: the response's program runs against the problem's unit tests
(HumanEval, MBPP or TACO layout) in a sandbox; r = 1 when every test passes (docs/code-tasks.md says what the
sandbox isolates and what it does not).

rollout.py grades every sampled solution and completion with grade_batch; eval.py grades its test answers
with the same functions, so the reward of training and the accuracy of evaluation are the same thing.
"""
from __future__ import annotations

import ast
import builtins
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

from common import InputError

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
    """\\text{abc} -> " abc" (for each occurrence, nested braces respected). The space keeps a unit a word
    of its own: 5\\text{cm} reads as "5 cm"."""
    while (i := s.find(command + "{")) >= 0:
        depth, j = 0, i + len(command)
        for j in range(i + len(command), len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                break
        s = s[:i] + " " + s[i + len(command) + 1: j] + s[j + 1:]
    return s


def normalize_answer(s: str) -> str:
    """Strip what does not change the value: $, \\text{} / \\mathrm{} wrappers, units such as \\% and
    ^\\circ, unit words, 'x =', spacing commands, \\dfrac / \\tfrac, \\left / \\right, a trailing period, the
    parentheses of a choice such as (B)."""
    s = s.strip()
    for command in ("\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\mbox", "\\boxed"):
        s = _unwrap(s, command)
    for junk in ("\\$", "$", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\left", "\\right", "^{\\circ}", "^\\circ",
                 "\\circ", "\\%", "%", "°", "\\displaystyle"):
        s = s.replace(junk, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    s = re.sub(r"\^\{(\w)\}", r"^\1", s)  # 2^{n} -> 2^n
    s = re.sub(r"^\s*[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = s.strip().rstrip(".").strip()
    # A number followed by unit words ("5 cm", "12 square feet", "5 cm^2") is the number. A unit is a word of two
    # letters or more, apart from the number: a letter or a product of letters written against the number
    # (6i, 3x, 2xy) is a complex number or an expression, not 6, 3 or 2.
    m = re.fullmatch(rf"({_NUMBER})(?:\s+[a-zA-Z]{{2,}}(?:\^\{{?\d\}}?)?)+", s)
    if m:
        s = m.group(1)
    return re.sub(r"^\(([A-Z])\)$", r"\1", s.replace(" ", ""))  # the choice (B) is B


def to_number(s: str) -> Fraction | None:
    """Exact value of 1,000 / 72.0 / -0.75 / 3/4 / \\frac{1}{2} / -\\frac34 / 3\\frac{1}{2}, or None."""
    s = s.replace("{,}", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"(-?)(\d+)(\\frac.+)", s)  # a mixed number: 3\frac{1}{2} is 3 + 1/2, as MATH writes it
    if m and (fraction := to_number(m.group(3))) is not None:
        return (-1 if m.group(1) else 1) * (int(m.group(2)) + fraction)
    m = re.fullmatch(r"(-?)\\frac\{?(-?\d+)\}?\{?(-?\d+)\}?", s) or re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    if m:
        sign = -1 if m.group(1) else 1
        return sign * Fraction(int(m.group(2)), int(m.group(3))) if int(m.group(3)) != 0 else None
    try:
        return Fraction(s) if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s) else None
    except (ValueError, ZeroDivisionError):
        return None


def _elements(s: str) -> tuple[str, list[str], str] | None:
    """A normalised answer with commas at the top level, split: "(1,2]" -> ("(", ["1", "2"], "]") (a tuple or an
    interval), "1,2" -> ("", ["1", "2"], "") (a list of solutions); None for a single answer."""
    opened = s[:1] if s[:1] in "([" else ""
    depth, parts, start = 0, [], len(opened)
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if opened and depth == 0 and i < len(s) - 1:  # "(1,2)\cup(3,4)": the brackets enclose a part only
            return None
        if c == "," and depth == bool(opened):
            parts.append(s[start:i])
            start = i + 1
    closed = s[-1:] if opened else ""
    parts.append(s[start: len(s) - len(closed)])
    return (opened, parts, closed) if len(parts) > 1 else None


def answers_match(predicted: str, reference: str) -> bool:
    a, b = normalize_answer(predicted), normalize_answer(reference)
    x, y = to_number(a), to_number(b)
    if x is not None or y is not None:
        return x == y
    if a == b:
        return True
    # Element by element: a tuple or an interval in order, with the same brackets; a list of solutions ("enter
    # all the solutions, separated by commas") in any order.
    p, r = _elements(a), _elements(b)
    if p is None or r is None or (p[0], p[2], len(p[1])) != (r[0], r[2], len(r[1])):
        return False
    if p[0]:
        return all(map(answers_match, p[1], r[1]))
    unmatched = r[1]
    for element in p[1]:
        match = next((i for i, other in enumerate(unmatched) if answers_match(element, other)), None)
        if match is None:
            return False
        unmatched = unmatched[:match] + unmatched[match + 1:]
    return True


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
# unprivileged user, since the kernel does not apply RLIMIT_NPROC to root. It is not a container:
# docs/code-tasks.md says what it does and does not isolate.
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
# limit needs no privilege), runs the program (and, for a call-based problem, calls it on every input; for
# HumanEval and MBPP, runs the tests on it), then proves that the tests ran to the end by writing a nonce that
# it read from stdin before the program started: a program that leaves early (sys.exit, os._exit, a crash, a
# kill) never writes it. The CPU limit also ends whatever escaped the process group.
# HumanEval and MBPP tests are assert statements in the program's own process, so `assert f(x) == y` would take
# an object that claims to equal everything (its own __eq__, or a subclass of int or str) for the answer. The
# tests therefore see the program's functions through a check that what they return is plain data: exact
# built-in types, compared by identity (a metaclass may redefine == between types too), all the way down. The
# names it needs are bound before the program runs, which could otherwise replace them in builtins.
_HARNESS = r"""
import ctypes, json, os, resource, sys

def plain_data_check(type=type, callable=callable, isinstance=isinstance, exec=exec):  # bound now: see above
    atoms, containers = (type(None), bool, int, float, complex, str, bytes), (list, tuple, set, frozenset)

    def one_of(kind, kinds):  # by identity: a metaclass may redefine == between types
        for k in kinds:
            if kind is k:
                return True
        return False

    def plain(value):
        kind = type(value)
        if kind is dict:
            return plain([*value.keys(), *value.values()])
        if one_of(kind, containers):
            for item in value:
                if not plain(item):
                    return False
            return True
        return one_of(kind, atoms)

    def checked(function):
        def call(*args, **kwargs):
            value = function(*args, **kwargs)
            if not plain(value):
                raise TypeError("a tested function returned something other than plain data")
            return value
        return call

    def run_tests(namespace, tested, code):
        # every function the program defines, and the tested names even when they are classes; not the other
        # classes, whose objects the tests may build (MBPP's Pair(5, 24))
        tests = {**namespace}
        for name, value in namespace.items():
            if name in tested or (callable(value) and not isinstance(value, type)):
                tests[name] = checked(value)
        exec(code, tests)
    return run_tests


def harness(mode, fn_name, cpu, memory, fsize, nproc):
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, fsize),
                         (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid programs (su, mount) give no rights back
    nonce = b""
    while not nonce.endswith(b"\n"):  # byte by byte: the rest of stdin is the program's input
        nonce += os.read(0, 1) or b"\n"
    out = os.dup(1)  # the nonce gets out even when the program closes or replaces stdout
    if mode == "tests":  # read before the program runs, which may rewrite tests.py or builtins
        run_tests, tests = plain_data_check(), compile(open("tests.py", encoding="utf-8").read(), "tests.py", "exec")
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(open("program.py", encoding="utf-8").read(), "program.py", "exec"), namespace)
    except SystemExit as e:  # a stdin/stdout program may stop with exit(); a test script may not
        if mode != "stdio" or e.code not in (None, 0):
            raise
    result = ""
    if mode == "tests":  # HumanEval, MBPP: fn_name names the tested functions, comma-separated
        run_tests(namespace, fn_name.split(","), tests)
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
    """Run files["program.py"] in the sandbox ('script': to its end; 'tests': then files["tests.py"], which sees
    the functions named in fn_name, comma-separated, and every other function of the program through the
    plain-data check; 'stdio': on stdin; 'call': fn_name on every argument list in files["inputs.json"]).
    (stdout, JSON list of the calls' values) when it ran to the end; None when it did not (an error, an early
    exit, a timeout, a limit)."""
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


def _tested_names(tests: str) -> list[str]:
    """The functions that MBPP asserts test: in each, the first called name that is not a built-in (it tests
    similar_elements in `set(similar_elements(a, b)) == {4, 5}`, max_chain_length in
    `max_chain_length([Pair(5, 24)], 1) == 1`)."""
    try:
        asserts = [node for node in ast.walk(ast.parse(tests)) if isinstance(node, ast.Assert)]
    except SyntaxError:  # the sandbox reports it: the check fails
        return []
    names = []
    for node in asserts:
        called = [call.func.id for call in ast.walk(node)  # breadth first: outer calls come first
                  if isinstance(call, ast.Call) and isinstance(call.func, ast.Name)]
        names += [name for name in called if not hasattr(builtins, name)][:1]
    return names


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
        tests = f"{problem['test']}\n\ncheck({problem['entry_point']})\n"
        return run_sandboxed({"program.py": program, "tests.py": tests}, "tests", problem["entry_point"],
                             limits=limits) is not None
    if layout == "mbpp":
        program = "\n".join([problem.get("test_setup_code") or "", code]) + "\n"
        tests = "\n".join(problem["test_list"]) + "\n"
        return run_sandboxed({"program.py": program, "tests.py": tests}, "tests", ",".join(_tested_names(tests)),
                             limits=limits) is not None
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


def check_grader(grader: str) -> None:
    if grader not in ("builtin", "math-verify"):
        raise InputError(f"--grader must be builtin or math-verify, got {grader!r}")
    if grader == "math-verify" and importlib.util.find_spec("math_verify") is None:
        raise InputError("--grader math-verify needs the math-verify package: pip install -r requirements-optional.txt")
