"""Run untrusted model-written code in isolated, resource-limited child processes (docs/design.md section 6).

A sandbox runs a sequence of jobs (`run_sequence`; the grader's oracle, then its loophole grade) or
one (`run_sandboxed`, `run_code`). Each job gets a fresh working directory, a scrubbed environment
and its own worker process running `antipasto_pl.env.harness` (stdlib only, ``python -I -S -B``),
and everything a job started is killed before the next job begins. A per-process *fork server* (a
pre-started, pre-imported harness interpreter) forks every sandbox, so none pays for interpreter
start-up; where that is impossible (no pidfd / not Linux) each sandbox starts its own interpreter.

On Linux, where allowed, every sandbox gets fresh pid, mount, ipc and uts namespaces and a network
namespace no other running sandbox uses:

* network namespace: only a downed loopback, so no connection can leave the sandbox; empty ones are
  reused once a sandbox is over (see `harness.spawner._Spawner`: nothing a sandbox did survives it there);
* pid namespace: the harness supervisor is pid 1, so every process a job starts (double forks and
  ``setsid`` daemons included) dies before the next job and with the sandbox, and host processes are
  invisible;
* mount namespace: a view of nothing but Python (`harness.view._python_view`): a fresh tmpfs root with
  read-only binds of the interpreter, its standard library (no site-packages) and the shared
  libraries it loads, a few device nodes, a fresh /proc and a private size-capped tmpfs (nothing of
  it reaches the host) for the jobs' working dirs. The checkout, /tmp, /home, /root, datasets and
  caches are not there at all, so no file can be read from them and no unix socket bound in them
  can be connected to (a read-only mount would stop neither);
* as real root the harness switches to a random unprivileged uid (RLIMIT_NPROC is ignored for root,
  so this is what stops a fork bomb); as a normal user it runs in a user namespace and drops all
  capabilities instead.

Resource limits (CPU, address space, file size, processes, open files, no core dumps) are set on
the worker right before the submission runs; as root, each sandbox also gets a memory cgroup that
bounds all its processes and its tmpfs together (`memory_bound`). The wall clock is enforced twice:
per job by the supervisor inside, and by this module, which SIGKILLs the sandbox's first process (ending its pid
namespace) and, without a pid namespace, its process group and every process of the sandbox uid.
Output is read incrementally and the sandbox is killed as soon as a job exceeds its byte budget
(the jobs after it then run in a fresh sandbox).

Verdicts: what the supervisor observes (exit status, OOM kills, stdout, collected files) is out of
the submission's reach; the worker's own record is not, and is checked as data (`_parse_done`).
Whatever a submission does, the worst it gets is a failed grade: a job that cannot start in its
sandbox runs in a fresh one, and only a fault of the sandbox itself raises `SandboxError`.

Isolation levels (`isolation_level()`): "full" (namespaces + the view of nothing but Python +
unprivileged uid or no capabilities), "namespaces" (namespaces, but building the view failed),
"none" (rlimits, a process group and, as root, an unprivileged uid). Anything below "full" logs one warning per process.
"""

from __future__ import annotations

import atexit
import binascii
import json
import logging
import math
import os
import secrets
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from antipasto_pl.env.harness.view import VIEW_WORKDIRS
from antipasto_pl.env.harness.worker import LABELS

log = logging.getLogger(__name__)

HARNESS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness", "__main__.py")
_GRACE_S = 0.5  # how long after the wall limit the host side kills a run the supervisor did not end
_DRAIN_S = 0.5  # after the launcher exits, how long to wait for pipes held by stray processes
SPLIT_S = 0.1  # a job running this long hands the jobs waiting behind it to another sandbox (on_split)
_MAX_JOBS = 32  # per sandbox: 4 fds a job travel in one SCM_RIGHTS message (at most 253)
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_PYTHON = (sys.executable, "-I", "-S", "-B", HARNESS_PATH)


class SandboxError(RuntimeError):
    """The sandbox itself failed (the harness never started): an infrastructure fault, not a grade."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run resource limits. `cpu_s=None` means ceil(wall_s) + 1 CPU seconds."""

    wall_s: float = 5.0
    cpu_s: int | None = None
    memory_bytes: int = 1 << 30  # RLIMIT_AS of the worker
    file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE
    nproc: int = 32  # RLIMIT_NPROC (per sandbox uid; counts the supervisor and the worker)
    nofile: int = 64  # RLIMIT_NOFILE
    output_bytes: int = 1 << 20  # cap on captured stdout and on captured stderr, each
    result_bytes: int = 16 << 20  # cap on the worker's records (oracle results)
    disk_bytes: int = 64 << 20  # the sandbox's private tmpfs: all files its jobs write, together
    # all of a sandbox's processes and its tmpfs together (a memory cgroup; see `memory_bound`);
    # None: memory_bytes + disk_bytes, one worker's address space plus a full disk
    sandbox_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.sandbox_memory_bytes is None:
            object.__setattr__(self, "sandbox_memory_bytes", self.memory_bytes + self.disk_bytes)
        if not (self.wall_s > 0 and math.isfinite(self.wall_s)):
            raise ValueError(f"SandboxLimits.wall_s must be a positive finite number of seconds, got {self.wall_s!r}")
        sizes = ("memory_bytes", "file_size_bytes", "output_bytes", "result_bytes", "disk_bytes", "sandbox_memory_bytes")
        for name in (*sizes, "nproc", "nofile"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive int, got {value!r}")
        if self.nproc < 2 or self.nofile < 16:
            raise ValueError(f"SandboxLimits needs nproc >= 2 and nofile >= 16 for the harness, got {self.nproc}, {self.nofile}")
        if self.cpu_s is not None and (not isinstance(self.cpu_s, int) or self.cpu_s <= 0):
            raise ValueError(f"SandboxLimits.cpu_s must be a positive int or None, got {self.cpu_s!r}")

    def harness_limits(self) -> dict[str, Any]:
        cpu = self.cpu_s if self.cpu_s is not None else math.ceil(self.wall_s) + 1
        return {
            "wall": self.wall_s,
            "cpu": cpu,
            "as": self.memory_bytes,
            "fsize": self.file_size_bytes,
            "nproc": self.nproc,
            "nofile": self.nofile,
        }


@dataclass(frozen=True)
class SandboxResult:
    """What came back from one job. `exit` and `ready` are the supervisor's (no submission code can
    write them); `done` is the worker's record, which the submission's code could have written: it is
    checked (`_parse_done`) and, if it is not exactly what the harness writes, dropped with
    `record_error` set."""

    stdout: bytes
    stderr: bytes
    ready: bool  # the harness reached the point of running the submission
    done: dict[str, Any] | None  # worker's report (verdict / oracle results), None if it never finished
    # supervisor's report on the worker: {"code": n} | {"signal": n} | {"timeout": True}, plus "oom": True
    # when the sandbox's memory cgroup OOM-killed one of the job's processes
    exit: dict[str, Any] | None
    timed_out: bool
    output_exceeded: bool
    files: dict[str, bytes] = field(default_factory=dict)
    isolation: str = "none"
    wall_s: float = 0.0
    workdir: str = ""  # where it ran (already deleted)
    uid: int | None = None  # the unprivileged uid the submission ran as (None: the grader's own uid)
    record_error: str | None = None  # why the worker's record was rejected (forged or malformed)
    memory: str = "rlimit"  # what bounded the sandbox's memory as a whole (see `memory_bound`)

    @property
    def exit_code(self) -> int | None:
        """The worker's exit status as `python script.py` would report it (None if killed or timed out)."""
        return None if self.exit is None else self.exit.get("code")


# ---------------------------------------------------------------- isolation probing


@dataclass(frozen=True)
class _Isolation:
    level: str
    ns: bool  # unshare(2) new namespaces
    mounts: bool  # the view of nothing but Python, working dirs on a private tmpfs
    userns: bool  # not root: the namespaces live in a user namespace
    drop_uid: bool  # real root: switch the harness to a random unprivileged uid


_iso_lock = threading.Lock()
_iso: _Isolation | None = None
_memory = "rlimit"
_lifeline: tuple[int, int] | None = None


def _candidates() -> list[_Isolation]:
    root = os.geteuid() == 0
    out: list[_Isolation] = []
    if sys.platform.startswith("linux"):
        out.append(_Isolation("full", True, True, not root, root))
        out.append(_Isolation("namespaces", True, False, not root, root))
    out.append(_Isolation("none", False, False, False, root))
    return out


def isolation_level() -> str:
    """Which isolation this machine gives ("full", "namespaces" or "none"); probed once per process."""
    return _isolation().level


def memory_bound() -> str:
    """What bounds a sandbox's memory as a whole: "cgroup v2" or "cgroup v1" (a memory cgroup per
    sandbox capped at `SandboxLimits.sandbox_memory_bytes`: past it the kernel's OOM killer ends the
    sandbox's largest process, and the grade says "memory"), or "rlimit" where neither is usable
    (not root, or no memory controller delegated to us): then only each process is capped (RLIMIT_AS),
    and a sandbox can hold up to `nproc` x `memory_bytes` plus its tmpfs. Sandboxes started without
    the fork server (no pidfds) are bounded by rlimits only: nothing would remove their cgroups."""
    _isolation()
    return _memory


def _isolation() -> _Isolation:
    global _iso, _memory
    with _iso_lock:
        if _iso is None:
            for cand in _candidates():
                try:
                    res = _run(cand, {"kind": "script", "code": "pass"}, SandboxLimits(wall_s=10.0), ())
                except SandboxError as exc:
                    log.debug("sandbox isolation %r unavailable: %s", cand.level, exc)
                    continue
                if res.done is not None and res.done.get("ok"):
                    _iso, _memory = cand, res.memory
                    break
            else:
                raise SandboxError("no sandbox configuration could run a trivial job; see the debug log")
            if _iso.level != "full":
                log.warning(
                    "sandbox isolation is %r on this machine (no %s): untrusted code runs with weaker "
                    "containment; see antipasto_pl.env.sandbox",
                    _iso.level,
                    "view of nothing but Python" if _iso.level == "namespaces" else "namespaces",
                )
        return _iso


_base_lock = threading.Lock()
_base: tuple[int, str] | None = None  # (owner pid, dir)


def _workdir_base() -> str:
    """This process's dir for sandbox dirs without the view (with it, they are on a tmpfs inside
    it): traversable (0711) but not listable by sandboxes; one dir per running sandbox."""
    global _base
    with _base_lock:
        if _base is None or _base[0] != os.getpid():
            path = tempfile.mkdtemp(prefix=f"antipasto-sbx-{os.getpid()}-")
            os.chmod(path, 0o711)
            _base = (os.getpid(), path)
        return _base[1]


@atexit.register
def _remove_workdir_base() -> None:
    if _base is not None and _base[0] == os.getpid():  # a forked child must not delete its parent's
        shutil.rmtree(_base[1], ignore_errors=True)


def _lifeline_fd() -> int:
    """Read end of a pipe nobody writes: it reads EOF in every sandbox once this process is gone."""
    global _lifeline
    if _lifeline is None:
        _lifeline = os.pipe()
    return _lifeline[0]


# ---------------------------------------------------------------- launching


class _ForkServer:
    """The per-process fork server (`harness.server._serve`), talked to over a SOCK_SEQPACKET socketpair."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        lifeline = _lifeline_fd()
        self.proc = subprocess.Popen(
            [*_PYTHON, "--serve", str(theirs.fileno()), str(lifeline)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(), lifeline),
            cwd="/",
            env={"PATH": _SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
            # own process group: a Ctrl-C in the trainer's terminal must not reach it; same session, so its
            # sandboxes share the trainer's scheduler autogroup instead of competing with it as another one
            process_group=0,
        )
        theirs.close()
        self.sock, self.owner = ours, os.getpid()

    def launch(self, header: bytes, fds: Sequence[int]) -> tuple[int, int]:
        """Fork a launcher for one sandbox (`harness.spawner._Spawner.spawn` takes `header` and `fds`); return (pid, pidfd)."""
        socket.send_fds(self.sock, [header], list(fds))
        msg, rfds, _, _ = socket.recv_fds(self.sock, 64, 1)
        if not msg or len(rfds) != 1:
            raise OSError("fork server closed the connection")
        return int(msg), rfds[0]

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_server_lock = threading.Lock()
_server: _ForkServer | None = None


def _fork_server_supported() -> bool:
    if not (sys.platform.startswith("linux") and hasattr(os, "pidfd_open") and hasattr(socket, "send_fds")):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # kernel older than 5.3
        return False
    return True


_FORK_SERVER = _fork_server_supported()


def _launch_via_server(header: bytes, fds: Sequence[int]) -> tuple[int, int]:
    global _server
    with _server_lock:
        for _ in range(2):
            if _server is None or _server.owner != os.getpid() or _server.proc.poll() is not None:
                if _server is not None and _server.owner != os.getpid():
                    _server.sock.close()  # inherited through fork(): belongs to the parent process
                _server = _ForkServer()
            try:
                return _server.launch(header, fds)
            except OSError as exc:
                log.warning("sandbox fork server failed (%s); restarting it", exc)
                _server = None
        raise SandboxError("the sandbox fork server could not be (re)started")


@atexit.register
def _stop_server() -> None:
    if _server is not None and _server.owner == os.getpid():
        _server.close()


@dataclass
class _Launcher:
    """Handle on one sandbox's launcher process: started by the fork server (pidfd) or by Popen."""

    pid: int
    pidfd: int | None
    popen: subprocess.Popen | None = None

    def exited(self) -> bool:
        if self.pidfd is not None:
            return bool(select.select([self.pidfd], [], [], 0)[0])
        assert self.popen is not None
        try:  # WNOWAIT: an unreaped pid keeps its process group from being recycled
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def kill(self) -> None:
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, block: bool = True) -> None:
        """Reap (Popen) or wait for the exit of (pidfd) the killed launcher; without `block` a pidfd
        launcher is left to the fork server to reap."""
        if self.popen is not None:
            self.popen.wait()
        elif self.pidfd is not None and block:
            select.select([self.pidfd], [], [], 5.0)
        if self.pidfd is not None:
            os.close(self.pidfd)


def _start(header: dict[str, Any], fds: Sequence[int]) -> _Launcher:
    if _FORK_SERVER:
        pid, pidfd = _launch_via_server(json.dumps(header).encode(), fds)
        return _Launcher(pid, pidfd)
    lifeline = _lifeline_fd()
    popen = subprocess.Popen(
        [*_PYTHON, "--run", json.dumps(header), ",".join(map(str, fds)), str(lifeline)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(*fds, lifeline),
        cwd="/",
        env={"PATH": _SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
    )  # the sandbox makes its own process group, as it does under the fork server
    return _Launcher(popen.pid, None, popen)


def _unnamed_file(data: bytes) -> int:
    """An unnamed file holding `data`: a job (the supervisor reads it only when the job starts), or
    an empty result file for a job's worker."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("antipasto-job", os.MFD_CLOEXEC)
    else:
        with tempfile.TemporaryFile() as fh:  # unlinked on creation
            fd = os.dup(fh.fileno())
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return fd


# ---------------------------------------------------------------- running


def run_sandboxed(
    job: Mapping[str, Any], limits: SandboxLimits | None = None, *, collect: Sequence[str] = ()
) -> SandboxResult:
    """Run one harness job (see `antipasto_pl.env.harness`) in a fresh sandbox.

    `job` needs "kind" and "code" plus the kind's fields; nonce, limits, working dir, environment
    and isolation are filled in here. `collect` names files in the working dir to read back
    (regular files only, symlinks refused, at most `limits.output_bytes` each) once the job's
    processes are dead; the directory is deleted afterwards.
    """
    return run_sequence([job], limits, collect=[collect])[0]


def run_sequence(
    jobs: Sequence[Mapping[str, Any]],
    limits: SandboxLimits | None = None,
    *,
    collect: Sequence[Sequence[str]] | None = None,
    on_split: Callable[[int], None] | None = None,
) -> list[SandboxResult]:
    """Run jobs one after another in one fresh sandbox (one namespace setup for all of them).

    Each job gets its own working dir, output pipes, nonce and wall limit, and every process it started is
    killed before the next job begins; a later job can find what an earlier one left in the sandbox,
    never the other way round (see `antipasto_pl.env.harness`), so put the job whose verdict must not
    be influenced first. `collect[i]` names the files to read back for job i.

    With `on_split`, a job still running after `SPLIT_S` while later jobs wait hands those over:
    ``on_split(k)`` is called with the index of the first waiting job, the caller runs jobs k.. (in
    another sandbox, in parallel), and only the results for jobs before k come back -- so a slow job
    delays the others by `SPLIT_S` at most, at the price of one more sandbox.
    """
    collect = collect if collect is not None else [()] * len(jobs)
    if len(collect) != len(jobs):
        raise ValueError(f"run_sequence got {len(jobs)} jobs but {len(collect)} collect lists")
    for job in jobs:
        if not isinstance(job, Mapping) or not isinstance(job.get("code"), str) or not isinstance(job.get("kind"), str):
            raise ValueError(f"a sandbox job must be a mapping with str 'kind' and 'code', got {job!r:.200}")
    return _run_jobs(_isolation(), list(zip(jobs, collect)), limits or SandboxLimits(), on_split)


def run_code(code: str, limits: SandboxLimits | None = None, *, collect: Sequence[str] = ()) -> SandboxResult:
    """Run `code` as a script (``__name__ == "__main__"``) in a fresh sandbox."""
    return run_sandboxed({"kind": "script", "code": code}, limits, collect=collect)


_Jobs = Sequence[tuple[Mapping[str, Any], Sequence[str]]]


def _run(iso: _Isolation, job: Mapping[str, Any], limits: SandboxLimits, collect: Sequence[str]) -> SandboxResult:
    return _run_jobs(iso, [(job, collect)], limits, None)[0]


def _run_jobs(
    iso: _Isolation, jobs: _Jobs, limits: SandboxLimits, on_split: Callable[[int], None] | None
) -> list[SandboxResult]:
    """`jobs` in as few sandboxes as possible: when the host has to kill a sandbox (a job over its
    output cap or past the backstop deadline), or a job cannot start in it (something an earlier
    job did to the sandbox), the jobs after that one run in a fresh sandbox. After a hand-over
    (`on_split`) only the jobs before it are ours."""
    results: list[SandboxResult] = []
    end = len(jobs)

    def hand_over(k: int) -> None:  # `k` counts from the first job of the current sandbox
        nonlocal end
        end = len(results) + k
        on_split(end)  # type: ignore[misc]  (only passed on when set)

    while len(results) < end:
        split = hand_over if on_split is not None and end == len(jobs) else None  # once
        results += _run_sandbox(iso, jobs[len(results) : min(end, len(results) + _MAX_JOBS)], limits, split)
    return results


def _run_sandbox(
    iso: _Isolation, jobs: _Jobs, limits: SandboxLimits, on_split: Callable[[int], None] | None
) -> list[SandboxResult]:
    """One sandbox running `jobs`; results for the jobs it got through (at least one)."""
    start = time.monotonic()
    uid = (1 << 20) + secrets.randbelow(1 << 29) if iso.drop_uid else None
    # with the view the jobs' dirs live on a private tmpfs inside it; nothing of them is on the host
    sandbox_dir = VIEW_WORKDIRS if iso.mounts else tempfile.mkdtemp(prefix="sbx-", dir=_workdir_base())
    status_r, status_w = os.pipe()
    pipes = [[os.pipe() for _ in range(2)] for _ in jobs]  # stdout, stderr per job
    results = [_unnamed_file(b"") for _ in jobs]  # per job, the worker's records: read once the job is over
    readers = [[r for r, _ in job_pipes] for job_pipes in pipes]
    writers = [status_w]  # in the order `harness.spawner._Spawner.spawn` takes them: status, job files, job fds
    to_close = [status_r, status_w, *results, *(fd for job_pipes in pipes for pair in job_pipes for fd in pair)]
    try:
        if uid is not None and not iso.mounts:
            os.chown(sandbox_dir, uid, uid)
        nonces = [secrets.token_hex(16) for _ in jobs]
        workdirs = [os.path.join(sandbox_dir, secrets.token_hex(8)) for _ in jobs]
        for (job, collect), nonce, workdir in zip(jobs, nonces, workdirs):
            env = {"PATH": _SAFE_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
            payload = {
                **job,
                "nonce": nonce,
                "workdir": workdir,
                "limits": limits.harness_limits(),
                "env": env,
                "collect": list(collect),
                "collect_bytes": limits.output_bytes,
            }
            writers.append(_unnamed_file(json.dumps(payload).encode()))
            to_close.append(writers[-1])
        writers += [fd for job_pipes, result in zip(pipes, results) for fd in (job_pipes[0][1], job_pipes[1][1], result)]
        header = {
            "isolation": {"ns": iso.ns, "mounts": iso.mounts, "userns": iso.userns, "uid": uid, "gid": uid},
            "dir": sandbox_dir,
            "disk": limits.disk_bytes,
            "memory": limits.sandbox_memory_bytes,
            "jobs": len(jobs),
        }
        launcher = _start(header, writers)
        for fd in writers:
            if fd not in results:
                os.close(fd)
                to_close.remove(fd)
        pump = _Pump(status_r, readers, limits, start, n_collect=sum(len(collect) for _, collect in jobs))
        try:
            pump.run(launcher, on_exit=lambda: _kill_tree(launcher, iso, uid), on_split=on_split)
        finally:
            _kill_tree(launcher, iso, uid)
            launcher.wait(block=not pump.complete)  # complete: every job's processes are already gone
        records = [_read_done(fd, limits) for fd in results]
    finally:
        for fd in to_close:
            os.close(fd)
        if not iso.mounts:
            _rmtree(sandbox_dir)
    if pump.fail is not None:
        raise SandboxError(f"sandbox setup failed (isolation {iso.level!r}): {pump.fail}")
    return pump.results(iso, jobs, workdirs, records, nonces, uid)


class _Pump:
    """Reads a sandbox's status pipe and every job's stdout / stderr pipes until every job has
    reported and closed its pipes (`complete`: the supervisor's own exit and namespace teardown are
    not waited for), the current job's backstop deadline passes, a stream goes over its byte cap, the
    jobs after a slow one have been handed over (`run_sequence`'s on_split) and the slow one has
    finished, or the sandbox is gone."""

    def __init__(self, status: int, readers: list[list[int]], limits: SandboxLimits, start: float, n_collect: int) -> None:
        self.limits, self.start, self.n = limits, start, len(readers)
        self.keys: dict[int, tuple[int, str]] = {status: (-1, "status")}
        for i, fds in enumerate(readers):
            self.keys.update({fd: (i, name) for fd, name in zip(fds, ("stdout", "stderr"))})
        self.bufs = {key: bytearray() for key in self.keys.values()}
        self.status_cap = (n_collect * (limits.output_bytes * 4 // 3 + 1024)) + (64 << 10) * self.n
        self.exits: list[tuple[dict[str, Any], float]] = []  # each finished job's exit record and arrival time
        self.fail: str | None = None
        self.cut: int | None = None  # the last job whose result counts, when the host ended the sandbox early
        self.timed_out = self.exceeded = False  # why, if not a split: that job ran past its backstop / over a byte cap
        self.complete = False
        self._open = [2] * self.n  # per job, its pipes not yet at EOF
        self._parsed = 0

    def run(self, launcher: _Launcher, on_exit: Callable[[], None], on_split: Callable[[int], None] | None) -> None:
        """`on_exit` runs once the launcher has exited, to kill strays still holding pipes open."""
        sel = selectors.DefaultSelector()
        for fd in self.keys:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        if launcher.pidfd is not None:
            sel.register(launcher.pidfd, selectors.EVENT_READ)
        exited = gone = False  # exit handled / pidfd reported it
        drain_until = math.inf
        try:
            while any(key.fd in self.keys for key in sel.get_map().values()):
                now, current = time.monotonic(), len(self.exits)
                if self.cut is not None and current > self.cut and not any(self._open[: self.cut + 1]):
                    break  # handed over, and the slow job is done
                deadline = min(self._job_start() + self.limits.wall_s + _GRACE_S, drain_until)
                if now >= deadline:
                    if not exited:
                        self.timed_out, self.cut = True, current
                    break
                wake = deadline
                if on_split is not None and self.cut is None and current < self.n - 1:
                    split_at = self._job_start() + SPLIT_S
                    if now >= split_at:
                        self.cut = current
                        on_split(current + 1)
                    else:
                        wake = min(wake, split_at)
                poll = wake - now if launcher.pidfd is not None else min(wake - now, 0.05)
                for key, _ in sel.select(max(poll, 0.0)):
                    if key.fd not in self.keys:  # the launcher's pidfd: it exited
                        sel.unregister(key.fd)
                        gone = True
                        continue
                    chunk = os.read(key.fd, 1 << 16)
                    name = self.keys[key.fd]
                    if not chunk:
                        sel.unregister(key.fd)
                        if name[0] >= 0:
                            self._open[name[0]] -= 1
                        continue
                    buf = self.bufs[name]
                    room = (self.status_cap if name[0] < 0 else self.limits.output_bytes) - len(buf)
                    buf += chunk[:room]
                    if name[0] < 0:
                        self._parse_status()
                        if len(chunk) > room:
                            self.fail = "the supervisor's status channel went over its cap"
                    elif len(chunk) > room and (self.cut is None or name[0] <= self.cut):
                        self.exceeded, self.cut = True, name[0]
                if self.exceeded or self.fail is not None:
                    break
                if len(self.exits) == self.n and not any(self._open):
                    self.complete = True
                    break
                if not exited and (gone if launcher.pidfd is not None else launcher.exited()):
                    exited = True
                    on_exit()
                    drain_until = time.monotonic() + _DRAIN_S
        finally:
            sel.close()

    def _job_start(self) -> float:
        return self.exits[-1][1] if self.exits else self.start

    def _parse_status(self) -> None:
        buf = self.bufs[(-1, "status")]
        end = buf.rfind(b"\n") + 1
        for line in bytes(buf[self._parsed : end]).splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            kind = rec.get("k") if isinstance(rec, dict) else None
            if kind == "exit":
                self.exits.append((rec, time.monotonic()))
            elif kind == "fail" and isinstance(rec.get("job"), int) and rec["job"] > 0:
                # a later job could not start (an earlier one filled the disk, say): it and the rest
                # go to a fresh sandbox
                self.cut = min(self.cut if self.cut is not None else rec["job"], rec["job"] - 1)
            elif kind == "fail":
                self.fail = str(rec.get("error"))
        self._parsed = end

    def results(
        self,
        iso: _Isolation,
        jobs: _Jobs,
        workdirs: list[str],
        records: list[tuple[bytes, bool]],
        nonces: list[str],
        uid: int | None,
    ) -> list[SandboxResult]:
        """Results for the jobs this sandbox got through: every job with an exit record, plus the one
        the host stopped it in or the one it ended in (a sandbox that dies by itself is an error
        unless that job had started; a later job that did not start is left to a fresh sandbox).
        `records`: per job, what its worker wrote to its result file and whether it went over its cap."""
        n = self.cut + 1 if self.cut is not None else min(len(self.exits) + 1, len(workdirs))
        out: list[SandboxResult] = []
        for i in range(n):
            stdout, stderr = bytes(self.bufs[(i, "stdout")]), bytes(self.bufs[(i, "stderr")])
            raw, over = records[i]
            exit_rec, ended = self.exits[i] if i < len(self.exits) else ({}, time.monotonic())
            stopped = i == self.cut and i >= len(self.exits)  # killed while it ran
            ready = stopped or exit_rec.get("ready") is True
            if not ready and i > 0:
                break
            if not ready:
                tail = stderr[-2000:].decode("utf-8", "replace")
                raise SandboxError(f"sandbox harness did not start (isolation {iso.level!r}): {tail}")
            status = {k: v for k, v in exit_rec.items() if k in ("code", "signal", "timeout", "oom")}
            done, record_error = _parse_done(raw, nonces[i], jobs[i][0], status)
            files = exit_rec.get("files") if isinstance(exit_rec.get("files"), dict) else {}
            out.append(
                SandboxResult(
                    stdout=stdout,
                    stderr=stderr,
                    ready=ready,
                    done=done,
                    exit=status or None,
                    timed_out=(stopped and self.timed_out) or bool(status.get("timeout")),
                    output_exceeded=(i == self.cut and self.exceeded) or over,
                    files={name: binascii.a2b_base64(data) for name, data in files.items()},
                    isolation=iso.level,
                    wall_s=ended - (self.exits[i - 1][1] if i else self.start),
                    workdir=workdirs[i],
                    uid=uid,
                    record_error=record_error,
                    memory=str(exit_rec.get("memory", "rlimit")),
                )
            )
        return out


def _kill_tree(launcher: _Launcher, iso: _Isolation, uid: int | None) -> None:
    """SIGKILL the sandbox's first process: with namespaces that ends everything (pid 1 of the pid
    namespace, or the launcher it dies with); without, also its process group and every process
    of the sandbox uid (daemons that left the group)."""
    launcher.kill()
    if not iso.ns:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if uid is not None:
            for pid in _pids_of_uid(uid):
                _signal(pid)


def _signal(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes owned by `uid`."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z":
            pids.append(int(name))
    return pids


def _rmtree(path: str) -> None:
    def fix(func, p, _exc):  # the submission may have chmod-ed things to 000
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)


def _read_done(fd: int, limits: SandboxLimits) -> tuple[bytes, bool]:
    """What a job's worker wrote to its result file, and whether it went over its cap: more than
    `result_bytes`, or as much as RLIMIT_FSIZE let the worker write (the rest was refused)."""
    size = os.fstat(fd).st_size
    return os.pread(fd, min(size, limits.result_bytes), 0), size > limits.result_bytes or size >= limits.file_size_bytes


def _parse_done(raw: bytes, nonce: str, job: Mapping[str, Any], status: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The worker's "done" record, if it is exactly what the harness writes for `job`; else (None, why).

    Code in the submission's process can write the result file (and read the nonce), so nothing in
    it is taken on trust: it must be one JSON line with our nonce, the fields and types this job
    kind reports, and an outcome that agrees with how the supervisor saw the worker end (`status`):
    a pass needs exit status 0, a failure its label's status. Anything else -- a second record, a
    record followed by a crash, garbage, JSON nested too deep to parse -- is rejected. What a
    well-formed record can still claim is only what the job's own check reports: a list of answers
    the grader compares outside (oracle), one pass bit whose meaning is the mode's loophole, or a
    failure label; the verdicts of the stdout, file and exit-status modes come from the supervisor.
    """
    if not raw:
        return None, None
    if raw.count(b"\n") != 1 or not raw.endswith(b"\n"):
        return None, "not exactly one record"
    try:
        rec = json.loads(raw)
    except Exception:  # ValueError, RecursionError (deep nesting), MemoryError
        return None, "not JSON"
    if not isinstance(rec, dict) or rec.get("n") != nonce or rec.get("k") != "done" or type(rec.get("ok")) is not bool:
        return None, "not this job's done record"
    fields = set(rec) - {"n", "k", "ok"}
    if rec["ok"]:
        code = 0
        if job["kind"] == "oracle":
            n = len(job["args"])
            ok = (
                fields == {"results", "labels", "module_label"}
                and type(rec["results"]) is list
                and len(rec["results"]) == n
                and all(r is None or type(r) is str for r in rec["results"])
                and type(rec["labels"]) is list
                and len(rec["labels"]) == n
                and all(label is None or _is_label(label) for label in rec["labels"])
                and (rec["module_label"] is None or _is_label(rec["module_label"]))
            )
        else:
            ok = fields == {"passed"} and type(rec["passed"]) is bool
    else:
        status_field = rec.get("status")
        code = status_field if job["kind"] == "exit_code" and rec.get("label") == "exit" else 1
        ok = _is_label(rec.get("label")) and (
            fields == {"label"} or (fields == {"label", "status"} and type(status_field) is int and code == status_field)
        )
    if not ok:
        return None, "fields or types not of a done record"
    if not status.get("timeout") and (status.get("code") != code or "signal" in status):
        return None, "contradicts how the worker ended"
    return rec, None


def _is_label(value: object) -> bool:
    return type(value) is str and value in LABELS
