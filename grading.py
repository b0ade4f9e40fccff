"""The reward r of a response (docs/algorithm.md, "Notation": r = 1 if the final answer is correct, else 0).

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
import importlib.util
import json
import math
import os
import re
import textwrap
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

from plumbing.cli import InputError
from plumbing.sandbox import SandboxLimits, run_sandboxed, run_verified

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
# The reward of a code response is 1 when its program passes every unit test of the problem. A policy trained on
# this reward is rewarded for fooling it, so the program runs in a sandbox (plumbing/sandbox.py: a fresh
# interpreter, an empty environment, limits, an unprivileged user, new namespaces, a private file system) and,
# for call-based problems, the tests run in a verifier process that never runs the program: they call its
# functions over a pipe and compare plain data, where the program cannot reach. It is not a container:
# docs/code-tasks.md says what it does and does not isolate.
CODE_INSTRUCTION = "Write a Python solution in a ```python code block."


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


# TACO's call-based tests, run by the verifier on the program's function. Answers are compared as JSON, the way
# TACO stores them (a returned tuple is a list), and APPS and TACO often store a returned value wrapped in a list.
_TACO_CALLS = """
for args, want in zip(inputs, outputs):
    got = json.loads(json.dumps(candidate(*args)))
    assert got == want or (type(want) is list and len(want) == 1 and got == want[0])
"""


def _used_names(tests: str) -> list[str]:
    """Every name some tests read (MBPP's: the program's functions and classes among them are called remotely)."""
    try:
        return sorted({node.id for node in ast.walk(ast.parse(tests)) if isinstance(node, ast.Name)})
    except SyntaxError:  # the verifier reports it: the check fails
        return []


def _bound_names(code: str) -> set[str]:
    """The names a module binds at its top level: its functions, classes, imports and variables."""
    names = set()
    try:
        tree = ast.parse(code)
    except SyntaxError:  # the program, which starts with it, fails too
        return names
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.alias):
                names.add((inner.asname or inner.name).split(".")[0])
            elif isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store):
                names.add(inner.id)
    return names


def check_code(response: str, problem: dict, limits: SandboxLimits = SandboxLimits()) -> tuple[bool, str]:
    """Reward r of a code response and why: its program (extract_code) passes every unit test of the problem, in
    the HumanEval, MBPP or TACO/APPS layout (code_layout). Call-based tests run in a verifier process that calls
    the program's functions with plain data; the problem's own code (HumanEval's prompt with helpers such as
    poly, MBPP's test_setup_code) is run there too, from the problem, not from the program."""
    code, layout = extract_code(response), code_layout(problem)
    if layout == "humaneval":
        entry = problem["entry_point"]
        if re.search(rf"^def\s+{re.escape(entry)}\s*\(", code, flags=re.MULTILINE):
            program = problem["prompt"] + "\n" + code  # a whole function: it replaces the prompt's stub
        else:  # the body of the prompt's function, as a completion model writes it
            indented = code.lstrip("\n")[:1] in (" ", "\t")
            program = problem["prompt"] + (code if indented else textwrap.indent(code, "    "))
        tests = f"{problem['test']}\n\ncheck({entry})\n"
        # The verifier runs the prompt (its own copy of the helpers) only when the tests use a name it binds
        # (HumanEval/32's poly): most prompts only import typing, which takes longer than starting Python.
        helpers = (_bound_names(problem["prompt"]) - {entry}) & set(_used_names(tests))
        return run_verified(program, {"setup": problem["prompt"] if helpers else "", "tests": tests,
                                      "remote": {entry: entry}, "tested": [entry]}, limits)
    if layout == "mbpp":
        setup = problem.get("test_setup_code") or ""  # the tests' and the program's: it runs in both processes
        tests = "\n".join(problem["test_list"]) + "\n"
        return run_verified(setup + "\n" + code + "\n", {"setup": setup, "tests": tests, "tested": _tested_names(tests),
                                                         "remote": {name: name for name in _used_names(tests)}}, limits)
    if layout == "taco":
        tests = _taco_tests(problem)
        inputs, outputs = tests["inputs"], tests["outputs"]
        if tests.get("fn_name"):  # call-based: fn_name(*inputs[i]) returns outputs[i]
            return run_verified(code, {"setup": "import json", "tests": _TACO_CALLS, "tested": ["candidate"],
                                       "remote": {"candidate": tests["fn_name"]},
                                       "data": {"inputs": inputs, "outputs": outputs}}, limits)
        for i, (stdin, expected) in enumerate(zip(inputs, outputs)):  # stdin/stdout: one process per input
            stdout = run_sandboxed(code, "stdio", stdin=_as_text(stdin), limits=limits)
            if stdout is None:
                return False, f"input {i}: the program did not run to its end"
            if not _same_output(stdout, _as_text(expected)):
                return False, f"input {i}: wrong output"
        return True, f"right output on all {len(inputs)} inputs"
    raise ValueError(f"not a code problem (HumanEval, MBPP or TACO layout): fields {sorted(problem)}")


def is_correct_code(response: str, problem: dict, limits: SandboxLimits = SandboxLimits()) -> bool:
    """Reward r of a code response: 1 when its program passes every unit test of its problem (check_code)."""
    return check_code(response, problem, limits)[0]


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
