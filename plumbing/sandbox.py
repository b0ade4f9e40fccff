"""The code sandbox: runs an untrusted program in a fresh interpreter, directory and namespaces, under limits."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time


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
