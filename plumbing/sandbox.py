"""The code sandbox: starts an untrusted program, and the verifier that tests it, in fresh processes under limits."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import marshal
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

from plumbing import harness

SANDBOX_USER = 65534  # "nobody": the program's user and group when we are root
# The harness runs as code compiled once by the sandbox's own interpreter, passed in argv (64 KB of hex, of the
# 128 KB Linux allows an argument): compiling its text would cost each process (two per check) several
# milliseconds, and the sandbox user may not read our files.
_HARNESS = open(harness.__file__, encoding="utf-8").read()
_COMPILE = "import marshal, sys; sys.stdout.write(marshal.dumps(compile(sys.stdin.read(), 'harness', 'exec')).hex())"
_BOOT = "import marshal, sys; exec(marshal.loads(bytes.fromhex(sys.argv[1])))"
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # the whole environment of a check's processes (and HOME)


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """What one code check may use."""
    timeout: float = 10.0  # wall-clock seconds per check (per input for stdin/stdout problems)
    memory_mb: int = 1024  # address space (RLIMIT_AS) of each process: a larger allocation raises MemoryError
    output_bytes: int = 1 << 22  # stdout past this kills the program; also the largest value a function returns
    file_mb: int = 16  # largest file the program may write (RLIMIT_FSIZE)
    processes: int = 64  # processes and threads of the sandbox user (RLIMIT_NPROC)
    scratch_mb: int = 64  # size of each private /tmp, /var/tmp and /dev/shm (memory-backed tmpfs)


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
    """Write a process's stdin, then close it (a thread: a program that reads late must not block us)."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:  # it ended without reading all its input
        pass
    os.close(fd)


def _read(caps: dict, until, deadline: float) -> dict[object, bytes] | str:
    """What each pipe carries (at most its cap) until every writer of `until` has closed it; else why not."""
    out = {pipe: bytearray() for pipe in caps}
    with selectors.DefaultSelector() as selector:
        for pipe in caps:
            selector.register(pipe, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                pipe = key.fileobj
                chunk = os.read(pipe.fileno(), 1 << 16)
                if not chunk and pipe is until:
                    return {p: bytes(b) for p, b in out.items()}
                if not chunk:
                    selector.unregister(pipe)
                out[pipe] += chunk
                if len(out[pipe]) > caps[pipe]:
                    return f"printed more than {caps[pipe]} bytes"
    return "timed out"


def _stop(proc: subprocess.Popen, namespaces: bool) -> None:
    """Kill a process and everything it started (its process group). In a PID namespace its init (unshare's
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
    proc.stdout.close()


@dataclasses.dataclass(frozen=True)
class _Sandbox:
    launcher: tuple[str, ...]  # unshare and its namespaces, or nothing
    python: str  # an interpreter the sandbox user can run
    harness: str  # plumbing/harness.py compiled by it (marshal, hex)
    private: bool  # the program's process mounts its own scratch space (root in a mount namespace)


@contextlib.contextmanager
def _workdir(box: _Sandbox):
    """The program's working directory: made by the harness inside its private /tmp, else a fresh one here."""
    if box.private:
        yield "/"
        return
    with tempfile.TemporaryDirectory(prefix="code-check-", ignore_cleanup_errors=True) as tmp:
        if os.geteuid() == 0:
            os.chown(tmp, SANDBOX_USER, SANDBOX_USER)  # the one place it may write (with world-writable ones)
        yield tmp


def _start(box: _Sandbox, role: str, header: dict, stdin: str, cwd: str, pass_fds: tuple[int, ...] = ()):
    """A fresh interpreter running the harness in its own session; its header and stdin are fed by a thread.
    The verifier runs as us, not as the sandbox user: out of the program's reach (no signal, no ptrace, no
    /proc/PID/mem), and with -S, since the tests need the standard library only and start faster without site."""
    command = [*box.launcher, box.python, "-I"] if role == "program" else [box.python, "-I", "-S"]
    stdin_r, stdin_w = os.pipe()
    try:
        proc = subprocess.Popen([*command, "-c", _BOOT, box.harness, role], cwd=cwd, env=_ENV,
                                stdin=stdin_r, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True, pass_fds=pass_fds)
    except BaseException:
        os.close(stdin_w)
        raise
    finally:
        os.close(stdin_r)
    data = marshal.dumps(header)
    threading.Thread(target=_feed, args=(stdin_w, b"%d\n" % len(data) + data + stdin.encode()), daemon=True).start()
    return proc


def _program_header(box: _Sandbox, program: str, mode: str, limits: SandboxLimits, **more) -> dict:
    root = os.geteuid() == 0
    nproc = limits.processes if root else _running_tasks(os.geteuid()) + limits.processes  # ours count too
    return {"program": program, "mode": mode, "private": box.private,
            "uid": SANDBOX_USER if root else -1, "scratch_mb": limits.scratch_mb,
            "limits": [math.ceil(limits.timeout) + 1, limits.memory_mb << 20, limits.file_mb << 20, nproc], **more}


def _run(box: _Sandbox, program: str, mode: str, stdin: str, limits: SandboxLimits) -> str | None:
    nonce = secrets.token_hex(16)
    with _workdir(box) as cwd:
        header = _program_header(box, program, mode, limits, nonce=nonce)
        proc = _start(box, "program", header, stdin, cwd)
        try:
            out = _read({proc.stdout: limits.output_bytes}, proc.stdout, time.monotonic() + limits.timeout)
        finally:
            _stop(proc, namespaces=bool(box.launcher))
    if isinstance(out, str):
        return None
    stdout, found, tail = out[proc.stdout].rpartition(f"\n{nonce}\n".encode())
    return stdout.decode("utf-8", errors="replace") if found and not tail else None


@functools.lru_cache(maxsize=None)
def _sandbox() -> _Sandbox:
    """The strongest launcher that works here, and an interpreter that the sandbox user can run (one under
    /root, such as a pyenv, is not), tried on a program that imports a module and prints 1."""
    namespaces = ("unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc")
    root = os.geteuid() == 0
    boxes = [(namespaces if root else (*namespaces, "--map-current-user"), root), ((), False)]
    pythons = dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")])
    for launcher, private in boxes if shutil.which("unshare") else boxes[1:]:
        for python in filter(None, pythons):
            try:
                code = subprocess.run([python, "-I", "-S", "-c", _COMPILE], input=_HARNESS, capture_output=True,
                                      text=True, check=True).stdout
                box = _Sandbox(launcher, python, code, private)
                if _run(box, "import fractions\nprint(1)", "script", "", SandboxLimits()) == "1\n":
                    return box
            except (OSError, subprocess.CalledProcessError):  # not a Python 3.8+, or the sandbox user may not run it
                pass
    raise RuntimeError("no sandbox for code checks: no Python interpreter that the sandbox user can run")


def run_sandboxed(program: str, mode: str, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> str | None:
    """Run a program in the sandbox ('script': to its end; 'stdio': on stdin, exit() allowed). Its stdout when
    it ran to the end; None when it did not (an error, an early exit, a timeout, a limit)."""
    return _run(_sandbox(), program, mode, stdin, limits)


def run_verified(program: str, tests: dict, limits: SandboxLimits = SandboxLimits()) -> tuple[bool, str]:
    """Test a program's functions from a verifier process that never runs the program. tests: "setup" (the
    problem's own code, run first), "tests" (code whose asserts decide), "remote" (the tests' name for each
    of the program's functions they call), "tested" (those names whose every value must be plain data), "data"
    (more names for the tests: plain data). The program's process serves its functions over two pipes; plain data
    crosses them. (passed, why), from the verifier's verdict alone."""
    box = _sandbox()
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    procs = []
    with _workdir(box) as cwd:
        try:
            header = _program_header(box, program, "serve", limits, requests=requests_r, replies=replies_w)
            procs.append(_start(box, "program", header, "", cwd, (requests_r, replies_w)))
            header = {"requests": requests_w, "replies": replies_r, "cap": limits.output_bytes,
                      "limits": [math.ceil(limits.timeout) + 1, limits.memory_mb << 20], "data": {}, **tests}
            procs.append(_start(box, "verifier", header, "", "/", (requests_w, replies_r)))
        except BaseException:
            for proc in procs:
                _stop(proc, namespaces=bool(box.launcher))
            raise
        finally:
            for fd in (requests_r, requests_w, replies_r, replies_w):
                os.close(fd)
        try:
            caps = {procs[1].stdout: 1 << 20, procs[0].stdout: limits.output_bytes}
            out = _read(caps, procs[1].stdout, time.monotonic() + limits.timeout)
        finally:
            _stop(procs[0], namespaces=bool(box.launcher))
            _stop(procs[1], namespaces=False)
    if isinstance(out, str):
        return False, out
    try:
        passed, reason = marshal.loads(out[procs[1].stdout])  # the verifier's: no line of the program runs there
        return passed is True, reason
    except (ValueError, EOFError, TypeError):
        return False, "the verifier gave no verdict"
