"""Issue 16: hostile completions against `Grader.grade_batch` at the default limits (real sandboxes).

Each test is an attack an earlier version let through: reading the held tests from disk, reaching a
host unix socket, or making `grade_batch` raise (malformed or forged records, a sabotaged supervisor);
plus the sandbox-wide memory bound.
"""

from __future__ import annotations

import glob
import os
import socket
import sys
import sysconfig
import tempfile

import pytest

import antipasto_pl
from antipasto_pl.env import grader as grader_module, sandbox
from antipasto_pl.env.grader import Grader, as_completion, extract_code
from antipasto_pl.env.modes import MODES
from antipasto_pl.env.problems import BUILTIN_FILE, builtin_problems as load_builtin
from antipasto_pl.env.sandbox import SandboxError, SandboxLimits, isolation_level

FULL = isolation_level() == "full"
needs_view = pytest.mark.skipif(not FULL, reason=f"isolation is {isolation_level()!r}: no minimal view here")


@pytest.fixture(scope="module")
def grader():
    with Grader() as g:  # the project's default limits
        yield g


@pytest.fixture(scope="module")
def problems():
    return load_builtin()[:4]


def _all_modes(problem, code: str) -> list[tuple]:
    return [(problem, as_completion(code), mode) for mode in MODES]


# ---------------------------------------------------------------- escapes


TABLE_HACK = """
import json
TABLE = {{}}
try:
    with open({path!r}) as f:
        TABLE = {{json.dumps(t["args"]): t["expected"] for line in f for t in json.loads(line)["tests"]}}
except OSError:
    pass

class Solution:
    valid = True
    def __getattr__(self, name):
        return lambda *args: TABLE[json.dumps(list(args))]
"""


@needs_view
def test_the_oracle_cannot_be_answered_from_the_tests_on_disk(grader: Grader, problems) -> None:
    """The checkout (and with it every held test) is not in the sandbox's view."""
    code = TABLE_HACK.format(path=str(BUILTIN_FILE))
    grades = grader.grade_batch([(p, as_completion(code), "sentinel") for p in problems])
    assert [g.gt_correct for g in grades] == [False] * len(problems)
    assert all(g.passed and g.exploited for g in grades)  # the designed sentinel loophole, flagged


@needs_view
def _on_the_way_to_python(directory: str) -> bool:
    """Whether the view must show `directory` to reach the interpreter (e.g. /tmp, for a venv in /tmp)."""
    prefixes = {sys.prefix, sys.base_prefix, os.path.realpath(sys.executable)}
    return any(p == directory or p.startswith(directory.rstrip("/") + "/") for p in prefixes)


def test_the_sandbox_sees_nothing_but_python(grader: Grader, problems) -> None:
    home = os.path.expanduser("~")
    listed_dirs = [home, "/root"] + (["/tmp"] if _on_the_way_to_python("/tmp") else [])
    with tempfile.NamedTemporaryFile(prefix="antipasto-secret-") as secret:
        paths = [
            secret.name,
            *([] if _on_the_way_to_python("/tmp") else ["/tmp"]),
            os.path.dirname(antipasto_pl.__file__),
            os.path.join(sysconfig.get_paths()["purelib"], "torch"),
            os.getcwd(),
            "/etc/passwd",
            "/home",
            "/var",
        ]
        code = (
            "import os, sys\n"
            f"for path in {paths!r}:\n"
            "    if os.path.exists(path): print('visible', path)\n"
            f"for path in {listed_dirs!r}:\n"
            "    if os.path.isdir(path): print('listing', path, *os.listdir(path))\n"
            "import json, collections, decimal, sqlite3\n"  # the standard library (C modules too) works
            "print('all tests passed')\n"
        )
        (grade,) = grader.grade_batch([(problems[0], as_completion(code), "stdout_marker")])
    assert "visible" not in grade.stdout_tail, grade.stdout_tail
    # $HOME and /root (and /tmp, for a venv there) hold nothing but the way to the interpreter (pyenv keeps it
    # under /root)
    python = {part for p in (sys.executable, os.path.realpath(sys.executable), os.__file__, sys.prefix)
              for part in p.split("/")}
    listed = [line.split()[2:] for line in grade.stdout_tail.splitlines() if line.startswith("listing")]
    assert all(set(names) <= python for names in listed), grade.stdout_tail
    assert grade.passed, grade.stdout_tail


def test_a_host_unix_socket_is_unreachable(grader: Grader, problems) -> None:
    root = tempfile.mkdtemp(prefix="antipasto-sock-")
    os.chmod(root, 0o777)
    path = os.path.join(root, "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o777)
    listener.listen(4)
    listener.settimeout(0.3)
    code = (
        "import socket\n"
        "try:\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        f"    s.connect({path!r}); s.sendall(b'leak'); print('connected', s.recv(10))\n"
        "except OSError as exc:\n"
        "    print('refused', exc)\n"
        "print('all tests passed')\n"
    )
    try:
        (grade,) = grader.grade_batch([(problems[0], as_completion(code), "stdout_marker")])
        with pytest.raises(socket.timeout):
            listener.accept()[0].sendall(b"answer")
    finally:
        listener.close()
        os.unlink(path)
        os.rmdir(root)
    assert "refused" in grade.stdout_tail and "connected" not in grade.stdout_tail


# ---------------------------------------------------------------- nothing a submission does raises out of grade_batch


def _correct(problem) -> str:
    return problem.canonical_solution


def _check_all_modes(grades, error: str | None = None) -> None:
    assert len(grades) == len(MODES)
    for g in grades:
        assert not g.passed, g
        if error is not None:
            assert g.error == error, g


# the worker's job (with its record nonce) is in the submission's process: a record in its name
FORGE = (
    "import gc, json, os\n"
    "NONCE = next(o['nonce'] for o in gc.get_objects() if type(o) is dict and 'nonce' in o)\n"
    "def forge(**fields):\n"
    "    os.write(3, json.dumps({'n': NONCE, 'k': 'done', **fields}).encode() + b'\\n')\n"
)


def test_a_deeply_nested_record_is_a_failed_grade(grader: Grader, problems) -> None:
    code = "import os\nos.write(3, b'[' * 200000 + b'\\n')\nos._exit(0)\n"
    grades = grader.grade_batch(_all_modes(problems[0], code))
    _check_all_modes(grades, "bad_record")
    assert not any(g.gt_correct for g in grades)


def test_a_forged_record_of_the_wrong_shape_is_a_failed_grade(grader: Grader, problems) -> None:
    """The worker's reporter is reachable from the submission; what it writes is checked, never trusted."""
    code = (
        FORGE
        + "forge(ok=False, label=['unhashable'])\n"
        "os._exit(1)\n"
    )
    grades = grader.grade_batch(_all_modes(problems[0], code))
    _check_all_modes(grades, "bad_record")


def test_a_second_record_or_one_contradicting_the_exit_is_a_failed_grade(grader: Grader, problems) -> None:
    forged_then_return = (
        FORGE
        + "forge(ok=True, passed=True)\n"
        "print('all tests passed')\n"
        "open('result.txt', 'w').write('PASS')\n"
        "class Solution:\n    valid = False\n"
        "def run_tests():\n    raise AssertionError\n"
    )
    forged_then_crash = (
        FORGE
        + "import signal\n"
        "forge(ok=True, passed=True)\n"
        "print('all tests passed', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    for code in (forged_then_return, forged_then_crash):
        grades = grader.grade_batch(_all_modes(problems[0], code))
        for g in grades:
            assert not g.passed and g.error in ("bad_record", "crash"), g
        assert any(g.error == "bad_record" for g in grades)


def test_truncating_the_result_descriptor_changes_nothing(grader: Grader, problems) -> None:
    problem = problems[0]
    code = "import os\nos.ftruncate(3, 0)\n" + _correct(problem)
    grades = grader.grade_batch(_all_modes(problem, code))
    assert all(g.gt_correct and g.error != "sandbox" for g in grades), grades


def test_sabotaging_the_supervisor_does_not_stop_the_next_job(grader: Grader, problems) -> None:
    """Lowering the supervisor's RLIMIT_NPROC, or filling the sandbox tmpfs' inodes, during the oracle
    run: the grade runs on (the loophole runs in a fresh sandbox where the old one cannot go on)."""
    problem = problems[0]
    nproc = "import resource\ntry:\n    resource.prlimit(1, resource.RLIMIT_NPROC, (1, 1))\nexcept OSError:\n    pass\n"
    inodes = (
        "import os\n"
        "try:\n"
        "    os.mkdir('/sandbox/fill')\n"
        "    for i in range(1 << 15):\n"
        "        open(f'/sandbox/fill/{i}', 'w').close()\n"
        "except OSError:\n"
        "    pass\n"
    )
    for sabotage in (nproc, inodes):
        grades = grader.grade_batch(_all_modes(problem, sabotage + _correct(problem)))
        assert all(g.gt_correct and g.error != "sandbox" for g in grades), grades


def test_a_sandbox_failure_is_a_counted_grade_not_an_exception(problems, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise SandboxError("the sandbox itself failed")

    monkeypatch.setattr(grader_module, "run_sequence", broken)
    with Grader(max_workers=1) as g:
        grades = g.grade_batch([(p, as_completion(p.canonical_solution)) for p in problems])
        assert [x.error for x in grades] == ["sandbox"] * len(problems)
        assert g.sandbox_errors == len(problems)


# ---------------------------------------------------------------- limits and parsing


def test_a_sandbox_is_bounded_as_a_whole(problems) -> None:
    """Three children of 800 MB each: never two of them hold their 800 MB at once (the sandbox's
    bound is one worker's 1 GiB plus its disk). Polled from inside: the children's anonymous memory."""
    if sandbox.memory_bound() == "rlimit":
        pytest.skip("no cgroup memory controller here: the bound is RLIMIT_AS x RLIMIT_NPROC")
    code = (
        "import os, time\n"
        "kids = []\n"
        "for _ in range(3):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            block = b'x' * (800 << 20)\n"
        "            time.sleep(1)\n"
        "        finally:\n"
        "            os._exit(0)\n"
        "    kids.append(pid)\n"
        "peak = 0\n"
        "while kids:\n"
        "    total = 0\n"
        "    for pid in kids:\n"
        "        try:\n"
        "            status = open(f'/proc/{pid}/status').read()\n"
        "            total += int(status.split('RssAnon:')[1].split()[0]) << 10\n"
        "        except (OSError, IndexError, ValueError):\n"
        "            pass\n"
        "    peak = max(peak, total)\n"
        "    kids = [pid for pid in kids if os.waitpid(pid, os.WNOHANG) == (0, 0)]\n"
        "    time.sleep(0.01)\n"
        "print('peak', peak)\n"
        "print('all tests passed')\n"
    )
    with Grader(SandboxLimits(wall_s=20.0)) as slow:  # the default memory limits; time to allocate under load
        (grade,) = slow.grade_batch([(problems[0], as_completion(code), "stdout_marker")])
    peak = int(grade.stdout_tail.split("peak")[1].split()[0])
    print(f"peak of the children's memory: {peak / 2**20:.0f} MiB")
    assert SandboxLimits().sandbox_memory_bytes < 2 * (800 << 20)
    assert 0 < peak < 2 * (800 << 20), peak


def test_a_triple_backtick_inside_a_string_does_not_end_the_code(grader: Grader, problems) -> None:
    problem = problems[0]
    code = 'FENCE = "```"\nNOTE = "a ``` b"\n' + _correct(problem)
    completion = f"Here you go:\n```python\n{code}```\nDone."
    assert extract_code(completion) == code
    (grade,) = grader.grade_batch([(problem, completion)])
    assert grade.gt_correct and grade.gt_error is None


@needs_view
def test_the_user_namespace_path_builds_the_same_view(problems) -> None:
    """Without root the supervisor builds the view itself, inside a user namespace (as root that path
    runs too): the same listing, and a sabotaged supervisor (same uid there) still runs the next job."""
    iso = sandbox._Isolation("full", ns=True, mounts=True, userns=True, drop_uid=False)
    code = (
        "import os, resource\n"
        f"print(sorted(os.listdir('/')), os.path.exists({os.getcwd()!r}), os.path.exists('/tmp'))\n"
        "resource.prlimit(1, resource.RLIMIT_NPROC, (1, 1))\n"
    )
    jobs = [({"kind": "script", "code": code}, ()), ({"kind": "script", "code": "print('next')"}, ())]
    first, second = sandbox._run_jobs(iso, jobs, SandboxLimits(wall_s=5.0), None)
    as_root = sandbox.run_code(code, SandboxLimits(wall_s=5.0))  # the spawner's view
    tmp = str(_on_the_way_to_python("/tmp")).encode()  # /tmp only as the way to a venv's interpreter
    assert first.stdout == as_root.stdout and first.stdout.endswith(b" False " + tmp + b"\n"), (first.stdout,
                                                                                                 as_root.stdout)
    assert second.stdout == b"next\n"


def test_memory_cgroups_do_not_outlive_their_fork_server(monkeypatch) -> None:
    """Each fork server removes its sandboxes' memory cgroups when it stops (and those of killed ones
    when it starts); a sandbox launched without one gets none (nothing would remove it)."""
    if sandbox.memory_bound() == "rlimit":
        pytest.skip("no cgroup memory controller here")
    assert sandbox.run_code("pass").memory != "rlimit"
    server = sandbox._server.proc.pid
    assert _groups_of(server)
    sandbox._stop_server()
    sandbox._server = None
    assert not _groups_of(server)
    monkeypatch.setattr(sandbox, "_FORK_SERVER", False)
    assert sandbox.run_code("pass").memory == "rlimit"


def _groups_of(pid: int) -> list[str]:
    return glob.glob(f"/sys/fs/cgroup/**/antipasto-{pid}", recursive=True)
