"""The sandbox against hostile code: limits, isolation, cleanup. Runs the real sandbox (no mocks)."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from antipasto_pl.env import sandbox

from antipasto_pl.env.sandbox import SandboxLimits, isolation_level, run_code

from .isolation import leftovers, snapshot

LIMITS = SandboxLimits(wall_s=1.0)
FULL = isolation_level() == "full"
NAMESPACES = isolation_level() in ("full", "namespaces")


def _left_by(res, settle_s: float = 1.0) -> list[int]:
    """Processes still running as the run's sandbox uid (unique per run when the grader is root)."""
    deadline = time.monotonic() + settle_s
    while res.uid is not None:
        found = sandbox._pids_of_uid(res.uid)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)
    return []


def test_normal_run_reports_done_and_stdout() -> None:
    res = run_code("print('hello from the sandbox')", LIMITS)
    assert res.ready and res.done is not None and res.done["ok"]
    assert res.stdout == b"hello from the sandbox\n"
    assert res.exit_code == 0 and not res.timed_out and not res.output_exceeded


def test_stdout_cannot_forge_a_record() -> None:
    """Records come only through the result file, never from printed text; anything else written
    there makes the record invalid (a failed grade), never a pass."""
    code = (
        "import json, os, sys\n"
        "fake = json.dumps({'n': 'guess', 'k': 'done', 'ok': True, 'passed': True})\n"
        "print(fake); sys.stderr.write(fake + '\\n')\n"
        "for fd in range(3, 64):\n"
        "    try: os.write(fd, (fake + '\\n').encode())\n"
        "    except OSError: pass\n"
        "raise SystemExit(3)\n"
    )
    res = run_code(code, LIMITS)
    assert res.done is None and res.record_error is not None  # the writes to fd 3 spoilt the record


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("while True:\n    pass", id="infinite_loop"),
        pytest.param("import time\ntime.sleep(10**6)", id="sleep_forever"),
        pytest.param(
            "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(10**6)", id="ignore_sigterm"
        ),
    ],
)
def test_wall_timeout(code: str) -> None:
    start = time.monotonic()
    res = run_code(code, LIMITS)
    assert res.timed_out and res.done is None
    assert time.monotonic() - start < LIMITS.wall_s + 1.0
    assert not _left_by(res)


def test_cpu_limit_kills_a_busy_worker_before_the_wall_clock() -> None:
    res = run_code("while True:\n    pass", SandboxLimits(wall_s=10.0, cpu_s=1))
    assert not res.timed_out and res.done is None
    assert res.exit is not None and res.exit.get("signal") in (signal.SIGXCPU, signal.SIGKILL)


def test_memory_limit() -> None:
    res = run_code("x = bytearray(50 * 10**9)", LIMITS)
    assert res.done is not None and res.done["label"] == "memory"


def test_fork_bomb_is_capped_by_the_process_limit() -> None:
    limits = SandboxLimits(wall_s=2.0, nproc=16)
    code = (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
        "print('forked', n, flush=True)\n"
        "while True:\n"
        "    try: os.fork()\n"
        "    except OSError: pass\n"
    )
    res = run_code(code, limits)
    forked = int(res.stdout.split()[1])
    assert forked < limits.nproc, "RLIMIT_NPROC (or its replacement) did not contain the fork bomb"
    assert res.timed_out
    assert not _left_by(res)


def test_kill_parent_does_not_reach_the_grader() -> None:
    res = run_code("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('still here')", LIMITS)
    # the worker's parent is the sandbox supervisor (pid-namespace init): the kill is absorbed or ends
    # only the sandbox; this test process is obviously still running to check it
    assert res.ready
    assert res.timed_out is False


def test_os_exit_is_reported_without_a_done_record() -> None:
    res = run_code("import os\nos._exit(0)", LIMITS)
    assert res.done is None and res.exit_code == 0


def test_segfault_is_a_crash_not_a_hang() -> None:
    res = run_code("import ctypes\nctypes.string_at(0)", LIMITS)
    assert res.done is None and res.exit is not None and res.exit.get("signal") == 11


def test_interpreter_crash_by_recursion() -> None:
    code = "import sys\nsys.setrecursionlimit(10**7)\nclass A:\n    def __repr__(self):\n        return repr(self)\nrepr(A())"
    start = time.monotonic()
    res = run_code(code, LIMITS)
    assert res.done is None or res.done["ok"] is False
    assert time.monotonic() - start < LIMITS.wall_s + 1.0


def test_stdout_flood_is_cut_at_the_byte_cap() -> None:
    limits = SandboxLimits(wall_s=5.0, output_bytes=1 << 16)
    start = time.monotonic()
    res = run_code("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)", limits)
    assert res.output_exceeded and len(res.stdout) == limits.output_bytes
    assert time.monotonic() - start < 2.0, "the flood was not stopped early"


def test_writes_outside_the_workdir_fail_and_inside_succeed(canary) -> None:
    root, path = canary
    before = snapshot(root)
    code = (
        "import os, shutil\n"
        f"root, path = {root!r}, {path!r}\n"
        "attempts = [\n"
        "    lambda: open(path, 'w').write('pwned'),\n"
        "    lambda: open(os.path.join(root, 'new.txt'), 'w').write('x'),\n"
        "    lambda: os.remove(path),\n"
        "    lambda: os.chmod(path, 0o600),\n"
        "    lambda: shutil.rmtree(root),\n"
        "    lambda: open('/tmp/antipasto-escape.txt', 'w').write('x'),\n"
        "]\n"
        "for attempt in attempts:\n"
        "    try:\n"
        "        attempt()\n"
        "    except OSError:\n"
        "        pass\n"
        "open('inside.txt', 'w').write('ok')\n"
        "print(open('inside.txt').read())\n"
    )
    if not FULL:
        pytest.skip(f"isolation is {isolation_level()!r}: no read-only view of the filesystem on this machine")
    res = run_code(code, LIMITS, collect=("inside.txt",))
    assert res.stdout == b"ok\n" and res.files == {"inside.txt": b"ok"}
    assert snapshot(root) == before
    assert not os.path.exists("/tmp/antipasto-escape.txt")
    assert not os.path.exists(res.workdir), "the sandbox working dir was not removed"


def test_collect_refuses_symlinks() -> None:
    res = run_code("import os\nos.symlink('/etc/passwd', 'result.txt')", LIMITS, collect=("result.txt",))
    assert res.files == {}


@pytest.mark.skipif(not NAMESPACES, reason="no network namespace on this machine")
def test_no_network_to_localhost() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    code = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=0.5).sendall(b'leak')\n"
        "    print('connected')\n"
        "except OSError as exc:\n"
        "    print('refused', exc)\n"
    )
    try:
        res = run_code(code, LIMITS)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
    assert res.stdout.startswith(b"refused")


def test_environment_is_scrubbed(monkeypatch) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("ANTIPASTO_TEST_SECRET", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    code = (
        "import os\n"
        "print(dict(os.environ))\n"
        "for pid in os.listdir('/proc'):\n"
        "    if pid.isdigit():\n"
        "        try: print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "        except OSError: pass\n"
        "for pid in (os.getppid(), 1):\n"
        "    try: print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError: pass\n"
    )
    res = run_code(code, LIMITS)
    assert res.done is not None and res.done["ok"]
    assert secret.encode() not in res.stdout + res.stderr
    assert b"PATH" in res.stdout


def test_daemons_do_not_outlive_the_run(canary) -> None:
    root, path = canary
    marker = f"antipasto-daemon-{uuid.uuid4().hex}"
    before = snapshot(root)
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.execv(sys.executable, ['python', '-c', "
        f"'import time; time.sleep(3); open(\"{path}\", \"w\").write(\"late\"); time.sleep(60)  # {marker}'])\n"
        "    os._exit(0)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(60)\n"
        "time.sleep(0.2)\n"
        "print('parent done')\n"
    )
    res = run_code(code, LIMITS)
    assert res.stdout == b"parent done\n"
    assert not leftovers(marker) and not _left_by(res), "a daemon outlived its sandbox"
    assert snapshot(root) == before


def test_direct_launch_without_the_fork_server(monkeypatch) -> None:
    """Where pidfds are missing each run starts its own interpreter; containment must be the same."""
    monkeypatch.setattr(sandbox, "_FORK_SERVER", False)
    marker = f"antipasto-direct-{uuid.uuid4().hex}"
    res = run_code(
        "import os, sys\nif os.fork() == 0:\n    os.setsid()\n"
        f"    os.execv(sys.executable, ['python', '-c', 'import time; time.sleep(60)  # {marker}'])\nprint('ok')",
        LIMITS,
    )
    assert res.stdout == b"ok\n" and res.done is not None and res.done["ok"]
    assert not leftovers(marker) and not _left_by(res)
    start = time.monotonic()
    assert run_code("while True:\n    pass", LIMITS).timed_out
    assert time.monotonic() - start < LIMITS.wall_s + 1.0


@pytest.mark.skipif(os.geteuid() != 0, reason="without namespaces only root can contain daemons (uid sweep)")
def test_no_namespace_fallback_still_contains_as_root() -> None:
    """The "none" level (e.g. Docker without CAP_SYS_ADMIN): unprivileged uid, rlimits, uid sweep."""
    iso = sandbox._Isolation("none", ns=False, mounts=False, userns=False, drop_uid=True)
    marker = f"antipasto-none-{uuid.uuid4().hex}"
    code = (
        "import os, time\n"
        "print(os.getuid() != 0, flush=True)\n"
        "n = 0\n"
        "for _ in range(100):\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        os.setsid()\n"
        f"        os.execv('/bin/sh', ['sh', '-c', 'sleep 60 # {marker}'])\n"
        "    n += 1\n"
        "print(n)\n"
    )
    res = sandbox._run(iso, {"kind": "script", "code": code}, SandboxLimits(wall_s=2.0, nproc=16), ())
    unprivileged, forked = res.stdout.split()
    assert unprivileged == b"True" and int(forked) < 16
    assert not leftovers(marker) and not _left_by(res)


# ---------------------------------------------------------------- sequences of jobs in one sandbox


def test_later_jobs_find_nothing_running_and_cannot_touch_earlier_results() -> None:
    """Each job starts with only the supervisor alive and a fresh working dir; an earlier job's
    collected files are read before the next job runs, so it cannot rewrite them."""
    first = (
        "import os, time\n"
        "open('r.txt', 'w').write('job0')\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(0.3)\n"
        "    open('r.txt', 'w').write('late')\n"
        "    time.sleep(60)\n"
    )
    second = (
        "import os\n"
        "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), os.getpid(), os.listdir('.'))\n"
        "for d in os.listdir('..'):\n"
        "    try: open(os.path.join('..', d, 'r.txt'), 'w').write('job1')\n"
        "    except OSError: pass\n"
        "import time; time.sleep(0.5)\n"
    )
    jobs = [{"kind": "script", "code": first}, {"kind": "script", "code": second}]
    res0, res1 = sandbox.run_sequence(jobs, LIMITS, collect=[("r.txt",), ()])
    assert res0.files == {"r.txt": b"job0"}
    if NAMESPACES:
        own = int(res1.stdout.split()[-2])
        assert res1.stdout.decode().strip() == f"[1, {own}] {own} []", res1.stdout
    assert not _left_by(res0)


def test_no_job_holds_a_later_jobs_data_in_memory() -> None:
    """The supervisor reads a job only when it starts: the first job's memory (scanned raw, freed
    pages included) holds nothing of the second one, which finds its own marker the same way."""
    head, tail = uuid.uuid4().hex, uuid.uuid4().hex
    scan = (
        "import ctypes\n"
        f"head, tail = {head!r}.encode(), {tail!r}.encode()\n"
        "found = False\n"
        "for line in open('/proc/self/maps').read().splitlines():\n"
        "    fields = line.split()\n"
        "    lo, hi = (int(x, 16) for x in fields[0].split('-'))\n"
        "    if fields[1][0] != 'r' or fields[-1] in ('[vvar]', '[vvar_vclock]', '[vsyscall]') or hi - lo > 1 << 28:\n"
        "        continue\n"
        "    chunk = ctypes.string_at(lo, hi - lo)\n"
        "    at = chunk.find(head)\n"
        "    while at >= 0 and not found:\n"
        "        found = chunk[at + len(head) : at + len(head) + len(tail)] == tail\n"
        "        at = chunk.find(head, at + 1)\n"
        "print('found' if found else 'absent')\n"
    )
    jobs = [{"kind": "script", "code": scan}, {"kind": "script", "code": scan, "marker": head + tail}]
    res0, res1 = sandbox.run_sequence(jobs, SandboxLimits(wall_s=5.0))
    assert (res0.stdout, res1.stdout) == (b"absent\n", b"found\n")


def test_a_slow_job_hands_the_jobs_behind_it_over() -> None:
    handed: list[int] = []
    jobs = [{"kind": "script", "code": "import time\ntime.sleep(0.6)\nprint('slow')"}, {"kind": "script", "code": "print(2)"}]
    start = time.monotonic()
    results = sandbox.run_sequence(jobs, LIMITS, on_split=handed.append)
    assert handed == [1] and [r.stdout for r in results] == [b"slow\n"]
    assert time.monotonic() - start < LIMITS.wall_s + 0.5
    fast = sandbox.run_sequence(list(reversed(jobs)), LIMITS, on_split=handed.append)
    assert handed == [1] and [r.stdout for r in fast] == [b"2\n", b"slow\n"]


def test_a_job_over_its_output_cap_leaves_the_next_job_its_run() -> None:
    jobs = [{"kind": "script", "code": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)"}, {"kind": "script", "code": "print('next')"}]
    flood, nxt = sandbox.run_sequence(jobs, SandboxLimits(wall_s=5.0, output_bytes=1 << 16))
    assert flood.output_exceeded and not nxt.output_exceeded and nxt.stdout == b"next\n"


def test_code_that_does_not_compile_is_reported_like_a_worker_would() -> None:
    jobs = [{"kind": "script", "code": "def f(:\n"}, {"kind": "exit_code", "code": "def f(:\n", "suffix": "assert True\n"}]
    for res in sandbox.run_sequence(jobs, LIMITS):
        assert res.ready and res.done is not None and res.done["label"] == "syntax" and res.exit_code == 1


@pytest.mark.skipif(not FULL, reason=f"isolation is {isolation_level()!r}: no private tmpfs")
def test_jobs_write_to_a_private_size_capped_tmpfs() -> None:
    code = (
        "import os\n"
        "try:\n"
        "    with open('big', 'wb') as fh:\n"
        "        for _ in range(4): fh.write(b'x' * (1 << 19))\n"
        "    print('wrote')\n"
        "except OSError as exc:\n"
        "    print('full', exc.errno)\n"
    )
    res = run_code(code, SandboxLimits(wall_s=2.0, disk_bytes=1 << 20))
    assert res.stdout == b"full 28\n"  # ENOSPC
    assert not os.path.exists(res.workdir)  # nothing of it on the host


@pytest.mark.skipif(not NAMESPACES, reason="no network namespace on this machine")
def test_network_namespaces_are_never_shared_by_running_sandboxes() -> None:
    """Network namespaces are reused, never lent to two sandboxes at once: a unix socket in the
    abstract namespace (which needs no file and no interface) reaches no other sandbox, running
    alongside or later; and the loopback device stays down."""
    name = f"antipasto-{uuid.uuid4().hex}"
    listen = (
        "import socket, time\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.bind('\\0{name}'); s.listen(1)\n"
        "time.sleep(1.5)\n"
    )
    probe = (
        "import socket\n"
        "try:\n"
        f"    socket.socket(socket.AF_UNIX).connect('\\0{name}'); print('connected')\n"
        "except OSError:\n"
        "    print('refused')\n"
    )
    with ThreadPoolExecutor(1) as pool:
        listener = pool.submit(run_code, listen, SandboxLimits(wall_s=3.0))
        time.sleep(0.5)
        alongside = run_code(probe, LIMITS)
        listener.result()
    later = run_code(probe, LIMITS)
    assert (alongside.stdout, later.stdout) == (b"refused\n", b"refused\n")
    lo = run_code("import socket\ntry:\n    socket.create_connection(('127.0.0.1', 9), timeout=0.5)\nexcept OSError as exc:\n    print(exc.errno)", LIMITS)
    assert lo.stdout.strip() in (b"101", b"99")  # ENETUNREACH / EADDRNOTAVAIL: no usable loopback


@pytest.mark.skipif(os.geteuid() != 0 or not NAMESPACES, reason="needs root and namespaces")
def test_a_sandbox_without_namespaces_gets_none_of_another_sandboxes() -> None:
    """The fork server moves between namespaces to start isolated sandboxes; one started without
    namespaces must land back in the host's, never in one lent to an earlier sandbox."""
    assert run_code("pass", LIMITS).done is not None
    iso = sandbox._Isolation("none", ns=False, mounts=False, userns=False, drop_uid=True)
    code = "import os\nprint(*(os.readlink(f'/proc/self/ns/{k}') for k in ('pid', 'net', 'mnt')))"
    res = sandbox._run(iso, {"kind": "script", "code": code}, LIMITS, ())
    host = " ".join(os.readlink(f"/proc/self/ns/{k}") for k in ("pid", "net", "mnt"))
    assert res.stdout.decode().strip() == host
