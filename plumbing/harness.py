"""Inside a code check: the program's process and the verifier's (standard library only: a bare `python -I` runs it)."""
# plumbing/sandbox.py runs this file (compiled) with ROLE last in argv and sends a header (marshal) on stdin:
# its length, a newline, the header; for a stdin/stdout program its input follows. Two roles:
# - "program": the untrusted program's process. It makes the check's scratch space private, drops to the
#   sandbox user, sets its limits, and only then runs the program: as a script, on stdin, or serving the
#   program's functions to the verifier over two pipes ("serve").
# - "verifier": runs the problem's own code (HumanEval's prompt, MBPP's test_setup_code) and its tests. The
#   tested functions are proxies: a call sends its arguments to the program's process and receives the value
#   back, so `assert candidate(x) == y` is evaluated here, where no line of the program ever runs. Only plain
#   data crosses, in a small format of its own (below): what this process decodes is built by its own
#   constructors from bytes, so each value is exactly the built-in type it says, whatever the program sent
#   (and without json, re or ast to import, each of which would cost about as much as Python's start).
from __future__ import annotations

import builtins
import errno
import marshal
import os
import resource
import sys

SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")  # the world-writable places; each check gets an empty one of its own
SYSTEM = ("usr", "etc", "dev", "proc", "sys", "tmp", "var")  # what a program may need at / (and bin, lib: links)
MS_NOSUID, MS_NODEV, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, SYS_MOUNT_SETATTR = 2, 4, -100, 0x8000, 1, 442
CONTAINERS = ((b"l", list), (b"t", tuple), (b"e", set), (b"f", frozenset))


class NotPlain(Exception):
    """A value that is not plain data, met on the way between the program and the verifier."""


class ProgramFault(BaseException):  # not an Exception: a test's `except Exception:` cannot swallow it
    """The program cannot be called the way the tests call it, or it failed when called."""


# The wire format of plain data (None, bool, int, float, complex, str, bytes; list, tuple, set, frozenset and dict
# of them; exact types, compared by identity, since a metaclass may redefine == between types). One tag byte,
# then: N T F (None, True, False); i<decimal>; d<float.hex>; c<hex>;<hex>; (complex); s<n>:<n bytes of UTF-8>;
# b<n>:<n bytes>; l t e f<n>:<n items> (list, tuple, set, frozenset); m<n>:<n key, value pairs> (dict). Beyond
# plain data: h<number>;<str> (an object kept in the program's process) and g<str> (a global of the problem's).
def encode(value, other, out) -> None:
    """Append value's bytes to out (a list); other(value, out) for what is not plain data."""
    kind = type(value)
    if value is None or kind is bool:
        out.append(b"T" if value is True else b"F" if value is False else b"N")
    elif kind is int:
        out.append(b"i%d;" % value)
    elif kind is float:
        out.append(b"d%s;" % value.hex().encode())
    elif kind is complex:
        out.append(b"c%s;%s;" % (value.real.hex().encode(), value.imag.hex().encode()))
    elif kind is str or kind is bytes:
        data = value.encode("utf-8", "surrogatepass") if kind is str else value
        out += [b"s%d:" % len(data) if kind is str else b"b%d:" % len(data), data]
    elif kind is dict:
        out.append(b"m%d:" % len(value))
        for key, item in value.items():
            encode(key, other, out)
            encode(item, other, out)
    else:
        for tag, container in CONTAINERS:
            if kind is container:
                out.append(tag + b"%d:" % len(value))
                for item in value:
                    encode(item, other, out)
                return
        other(value, out)


def decode(data: bytes, other):
    """encode's bytes -> the value; other(tag, body) for an h (body: number, str) or g (body: str)."""
    value, end = _decode(data, 0, other)
    if end != len(data):
        raise NotPlain("bytes after the value")
    return value


def _upto(data: bytes, i: int, stop: bytes) -> tuple[bytes, int]:
    end = data.index(stop, i)  # ValueError when it is missing
    return data[i:end], end + 1


def _decode(data: bytes, i: int, other):
    tag, i = data[i:i + 1], i + 1
    if tag in (b"N", b"T", b"F"):
        return {b"N": None, b"T": True, b"F": False}[tag], i
    if tag == b"i" or tag == b"h":
        number, i = _upto(data, i, b";")
        if tag == b"i":
            return int(number), i
        kind, i = _decode(data, i, other)
        return other("h", (int(number), kind)), i
    if tag == b"d" or tag == b"c":
        real, i = _upto(data, i, b";")
        if tag == b"d":
            return float.fromhex(real.decode("ascii")), i
        imag, i = _upto(data, i, b";")
        return complex(float.fromhex(real.decode("ascii")), float.fromhex(imag.decode("ascii"))), i
    if tag == b"g":
        name, i = _decode(data, i, other)
        return other("g", name), i
    size, i = _upto(data, i, b":")
    n = int(size)
    if n < 0:
        raise NotPlain("a negative size")
    if tag == b"s" or tag == b"b":
        if len(chunk := data[i:i + n]) != n:
            raise NotPlain("cut short")
        return (chunk.decode("utf-8", "surrogatepass") if tag == b"s" else chunk), i + n
    items = []
    for _ in range(2 * n if tag == b"m" else n):
        item, i = _decode(data, i, other)
        items.append(item)
    if tag == b"m":
        return dict(zip(items[::2], items[1::2])), i
    for name, container in CONTAINERS:
        if tag == name:
            return container(items), i
    raise NotPlain(f"unknown tag {tag!r}")


def dumps(value, other) -> bytes:
    encode(value, other, out := [])
    return b"".join(out)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def _send(fd: int, kind: bytes, body: bytes) -> None:
    """One message: its length, a newline, a kind byte (v value, e error, n names, c call), the body."""
    data = memoryview(b"%d\n" % (len(body) + 1) + kind + body)
    while data:
        data = data[os.write(fd, data):]


def _receive(stream, cap: int) -> tuple[bytes, bytes] | None:
    """The next message (kind, body) from a buffered stream; None at its end; NotPlain past the cap."""
    size = stream.readline(24)
    if not size.endswith(b"\n"):
        if size:
            raise NotPlain("a message without a length")
        return None
    if not 0 < int(size) <= cap:
        raise NotPlain(f"a message of {int(size)} bytes, past the cap of {cap}")
    message = stream.read(int(size))
    return (message[:1], message[1:]) if len(message) == int(size) else None


# ----------------------------------------------------------------------------- the program's process
def private_file_system(size_mb: int) -> None:
    """In this check's mount namespace (unshare made its mounts private): the top-level directories that are not
    the system's or the interpreter's (/home, /work, /root, /opt, ...: where data sets and their answers live)
    hidden under empty file systems, every file system read-only, then an empty tmpfs on each scratch place.
    Nothing the program writes outlives the check or reaches another."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def mount(path: str, options: str) -> None:
        if libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()) != 0:
            raise OSError(ctypes.get_errno(), f"mount tmpfs on {path}")
    interpreter = [sys.prefix, sys.base_prefix, os.path.realpath(sys.executable), *sys.path]
    keep = {*SYSTEM, *(path.split("/")[1] for path in interpreter if path.startswith("/"))}
    for name in sorted(set(os.listdir("/")) - keep):
        if os.path.isdir(path := "/" + name) and not os.path.islink(path):
            mount(path, "size=4k,mode=755")
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY, 0, 0, 0)  # struct mount_attr: set, clear, propagation, userns
    if libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, attr, ctypes.sizeof(attr)) != 0:
        if ctypes.get_errno() != errno.ENOSYS:  # a kernel before 5.12 has none: the rest still holds
            raise OSError(ctypes.get_errno(), "mount_setattr /")
    for path in filter(os.path.isdir, SCRATCH):
        mount(path, f"size={size_mb}m,mode=1777")


def serve(program: str, requests: int, replies: int) -> None:
    """Run the program, report its functions' names, then call them as the verifier asks until it hangs up."""
    namespace, handles, solution = {"__name__": "__main__"}, [], []
    try:
        exec(compile(program, "program.py", "exec"), namespace)
    except BaseException as e:  # exit() too: the tests have not run
        _send(replies, b"e", f"the program raised {_describe(e)} before the tests".encode())
        return
    names = {name: value.__name__ if type(value) is type(sys) else "" for name, value in namespace.items()
             if callable(value) or type(value) is type(sys)}  # its functions and classes, and its modules by name
    _send(replies, b"n", dumps(names, None))

    def resolve(name: str):
        if name in namespace:
            return namespace[name]
        if "Solution" in namespace:  # LeetCode style: one Solution object, as a judge makes it
            solution[:] = solution or [namespace["Solution"]()]
            return getattr(solution[0], name)
        raise NameError(f"the program defines no {name}")

    def known(tag, body):  # the verifier passes back what it got from here, or a global of the problem's setup
        if tag == "h" and 0 <= body[0] < len(handles):
            return handles[body[0]]
        if tag == "g" and body in namespace:
            return namespace[body]
        raise NotPlain(f"an unknown reference {body!r}")

    stream = os.fdopen(requests, "rb")
    while message := _receive(stream, sys.maxsize):  # the verifier's calls: no cap
        name = "the program"
        try:
            name, plain, args, kwargs = decode(message[1], known)
            target = resolve(name)
            value = target(*args, **kwargs)

            def other(obj, out):  # an object of the program's own class (MBPP's Pair(5, 24)) stays here, by number
                if plain or not isinstance(target, type):
                    raise NotPlain(f"{name} returned a {type(obj).__name__}, not plain data")
                handles.append(obj)
                out.append(b"h%d;" % (len(handles) - 1))
                encode(type(obj).__name__, None, out)
            _send(replies, b"v", dumps(value, other))
        except BaseException as e:
            _send(replies, b"e", (str(e) if isinstance(e, NotPlain) else f"{name} raised {_describe(e)}").encode())


def program_process(header: dict) -> None:
    import ctypes  # here: the verifier starts faster without it

    if header["private"]:
        private_file_system(header["scratch_mb"])
    if header["uid"] >= 0:  # we are root: the kernel does not apply RLIMIT_NPROC to root
        os.setgroups([])
        os.setgid(header["uid"])
        os.setuid(header["uid"])
    cpu, memory, fsize, nproc = header["limits"]
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, fsize),
                         (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid programs (su, mount) give no rights back
    if header["private"]:  # a fresh directory inside the private /tmp: the program's, holding program.py only
        os.mkdir(workdir := f"/tmp/code-check-{os.urandom(8).hex()}", 0o700)
        os.chdir(workdir)
    os.environ["HOME"] = os.getcwd()
    with open("program.py", "w", encoding="utf-8", errors="surrogatepass") as f:  # for tracebacks; runs from memory
        f.write(header["program"])
    mode = header["mode"]
    if mode == "serve":
        serve(header["program"], header["requests"], header["replies"])
        os._exit(0)
    out = os.dup(1)  # the nonce gets out even when the program closes or replaces stdout
    try:
        exec(compile(header["program"], "program.py", "exec"), {"__name__": "__main__"})
    except SystemExit as e:  # a stdin/stdout program may stop with exit()
        if mode != "stdio" or e.code not in (None, 0):
            raise
    sys.stdout.flush()
    # Written after the program's end, with a nonce read before it started: a program that leaves early (a
    # crash, os._exit, a kill) never writes it. It proves only that: the output is compared in the caller.
    with open(out, "wb") as f:
        f.write(b"\n" + header["nonce"].encode() + b"\n")
    os._exit(0)  # threads the program left running do not hold the process


# ----------------------------------------------------------------------------- the verifier's process
class Link:
    """The verifier's end of the two pipes: calls go out, values come back; the first fault is kept."""

    def __init__(self, requests: int, replies: int, cap: int):
        self.requests, self.replies, self.cap = requests, os.fdopen(replies, "rb"), cap
        self.calls, self.fault, self.problem_objects = 0, None, {}

    def failed(self, reason: str) -> ProgramFault:
        self.fault = self.fault or reason  # kept: a test that catches everything cannot make it pass
        return ProgramFault(reason)

    def receive(self, other):
        """The next value the program's process sends, decoded here; a fault for an error, an end, a lie."""
        try:
            message = _receive(self.replies, self.cap)
            if message is None:
                raise self.failed("the program ended before the tests did")
            kind, body = message
            if kind == b"e":
                raise self.failed(body.decode(errors="replace")[:300])
            if kind not in (b"v", b"n"):
                raise NotPlain("the program's process sent something that is not a reply")
            return decode(body, other)
        except (NotPlain, ValueError, TypeError, RecursionError, MemoryError) as e:
            raise self.failed(str(e)[:300]) from None

    def call(self, name: str, plain: bool, args: tuple, kwargs: dict):
        self.calls += 1

        def other(value, out):  # what the tests pass in must be plain too, or come from the program or the problem
            if type(value) is Opaque:
                out.append(b"h%d;s0:" % value.number)
            elif id(value) in self.problem_objects:
                out.append(b"g")
                encode(self.problem_objects[id(value)], None, out)
            else:
                raise self.failed(f"the tests pass a {type(value).__name__} to {name}: only plain data reaches the "
                                  "program's process")
        try:
            _send(self.requests, b"c", dumps([name, plain, list(args), kwargs], other))
        except OSError:
            raise self.failed("the program ended before the tests did") from None

        def opaque(tag, body):
            if tag == "h" and not plain:
                return Opaque(self, *body)
            raise NotPlain(f"{name} returned something that is not plain data")
        return self.receive(opaque)


class Remote:
    """A function of the program, seen from the verifier: calling it calls it in the program's process."""

    def __init__(self, link: Link, name: str, plain: bool):
        self.link, self.name, self.plain = link, name, plain

    def __call__(self, *args, **kwargs):
        return self.link.call(self.name, self.plain, args, kwargs)


class Opaque:
    """An object of the program's own class that a test built (MBPP's Pair(5, 24)): it stays in the program's
    process; here it can only be passed back to the program's functions, never compared or looked into."""
    __slots__ = ("link", "number", "kind")

    def __init__(self, link, number, kind):
        self.link, self.number, self.kind = link, number, str(kind)

    def refuse(self, *args):
        raise self.link.failed(f"a test used a {self.kind} object of the program's: only plain data is compared")
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __hash__ = __bool__ = __len__ = __iter__ = refuse
    __contains__ = __getitem__ = __getattr__ = __int__ = __float__ = __index__ = refuse


def run_tests(header: dict, link: Link) -> tuple[bool, str]:
    """The problem's own code, then its tests, on the program's functions; (passed, why)."""
    namespace = {"__name__": "__main__"}
    exec(compile(header["setup"], "problem.py", "exec"), namespace)  # its helpers (HumanEval's poly): the problem's
    link.problem_objects = {id(value): name for name, value in namespace.items()  # MBPP's trees: passed by name
                            if not callable(value) and type(value).__name__ != "module"}
    names = link.receive(None)
    names = names if type(names) is dict else {}
    for local, remote in header["remote"].items():  # a built-in name is the program's only when it defines it
        tested = local in header["tested"]
        if not tested and (local in namespace or names.get(remote) == local):
            if local not in namespace:  # MBPP's `math.isclose(...)`, where the program imported math: ours
                namespace[local] = __import__(local)
        elif tested or not hasattr(builtins, local) or remote in names:
            namespace[local] = Remote(link, remote, plain=tested)
    namespace.update(header["data"])
    tests = header["tests"]
    try:
        exec(compile(tests, "tests.py", "exec"), namespace)
    except ProgramFault:
        pass
    except AssertionError as e:
        line, tb = 0, e.__traceback__
        while tb:  # the innermost line of the tests
            line, tb = (tb.tb_lineno if tb.tb_frame.f_code.co_filename == "tests.py" else line), tb.tb_next
        return False, link.fault or f"a test failed: {tests.splitlines()[line - 1].strip() if line else ''}"[:300]
    except BaseException as e:
        return False, link.fault or f"the tests raised {_describe(e)}"
    if link.fault:
        return False, link.fault
    return True, f"every test passed ({link.calls} call{'s' * (link.calls != 1)} to the program)"


def verifier_process(header: dict) -> None:
    cpu, memory = header["limits"]
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    verdict = os.dup(1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what the tests print is not the verdict
    link = Link(header["requests"], header["replies"], header["cap"])
    try:
        passed, reason = run_tests(header, link)
    except BaseException as e:  # the program's hello was a fault, or the problem's own code failed
        passed, reason = False, link.fault or f"the problem's own code raised {_describe(e)}"
    os.write(verdict, marshal.dumps((passed, reason)))  # written here, after the last test, and only here
    os._exit(0)


def main(role: str) -> None:
    sys.set_int_max_str_digits(0)  # an honest answer may be a long integer
    size = b""
    while not size.endswith(b"\n"):  # byte by byte: the rest of stdin is the program's input
        size += os.read(0, 1) or b"\n"
    data = b""
    while len(data) < int(size):
        if not (chunk := os.read(0, int(size) - len(data))):
            raise EOFError("the header was cut short")
        data += chunk
    header = marshal.loads(data)  # from the caller, trusted
    (program_process if role == "program" else verifier_process)(header)


if __name__ == "__main__":
    main(sys.argv[-1])
