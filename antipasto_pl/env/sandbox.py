"""Run untrusted model-written code in an isolated, resource-limited child process (DESIGN section 6).

Every run gets a fresh working directory, a scrubbed environment, its own session and process group,
and runs `antipasto_pl.env.harness` (stdlib only, ``python -I -S -B``). A per-process *fork server*
(a pre-started harness interpreter) forks one launcher per run, so no run pays for interpreter
start-up; where that is impossible (no pidfd / not Linux) each run starts its own interpreter.

On Linux, where allowed, the launcher unshare(2)s new network, pid, mount, ipc and uts namespaces:

* network namespace: only a downed loopback, so no connection can leave the sandbox;
* pid namespace: the harness supervisor is pid 1, so every process the submission starts (double
  forks and ``setsid`` daemons included) dies with it, and host processes are invisible;
* mount namespace: a fresh /proc, and every mount read-only except a bind of the working dir;
* as real root the harness switches to a random unprivileged uid (RLIMIT_NPROC is ignored for root,
  so this is what stops a fork bomb); as a normal user it runs in a user namespace and drops all
  capabilities instead.

Resource limits (CPU, address space, file size, processes, open files, no core dumps) are set on
the worker right before the submission runs. The wall clock is enforced twice: by the supervisor
inside and by this module, which SIGKILLs the namespace init, the launcher and (without a pid
namespace) the process group and every process of the sandbox uid. Output is read incrementally
and the run is killed as soon as it exceeds its byte budget.

Isolation levels (`isolation_level()`): "full" (namespaces + read-only view + unprivileged uid or no
capabilities), "namespaces" (namespaces, but the read-only view failed), "none" (rlimits, a process
group and, as root, an unprivileged uid). Anything below "full" logs one warning per process.
"""

from __future__ import annotations

import atexit
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
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

HARNESS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness.py")
_JOB_FILE = ".antipasto_job.json"
_GRACE_S = 0.5  # how long after the wall limit the host side kills a run the supervisor did not end
_DRAIN_S = 0.5  # after the launcher exits, how long to wait for pipes held by stray processes
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
    result_bytes: int = 16 << 20  # cap on the harness result channel (oracle results)

    def __post_init__(self) -> None:
        if not (self.wall_s > 0 and math.isfinite(self.wall_s)):
            raise ValueError(f"SandboxLimits.wall_s must be a positive finite number of seconds, got {self.wall_s!r}")
        for name in ("memory_bytes", "file_size_bytes", "nproc", "nofile", "output_bytes", "result_bytes"):
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
    """What came back from one run. `done` / `exit` are the harness's nonce-checked records."""

    stdout: bytes
    stderr: bytes
    ready: bool  # the harness reached the point of running the submission
    done: dict[str, Any] | None  # worker's report (verdict / oracle results), None if it never finished
    exit: dict[str, Any] | None  # supervisor's report on the worker: {"code": n} | {"signal": n} | {"timeout": True}
    timed_out: bool
    output_exceeded: bool
    files: dict[str, bytes] = field(default_factory=dict)
    isolation: str = "none"
    wall_s: float = 0.0
    workdir: str = ""  # where it ran (already deleted)
    uid: int | None = None  # the unprivileged uid the submission ran as (None: the grader's own uid)

    @property
    def exit_code(self) -> int | None:
        """The worker's exit status as `python script.py` would report it (None if killed or timed out)."""
        return None if self.exit is None else self.exit.get("code")


# ---------------------------------------------------------------- isolation probing


@dataclass(frozen=True)
class _Isolation:
    level: str
    ns: bool  # unshare(2) new namespaces
    mounts: bool  # read-only view of everything but the working dir
    userns: bool  # not root: the namespaces live in a user namespace
    drop_uid: bool  # real root: switch the harness to a random unprivileged uid


_iso_lock = threading.Lock()
_iso: _Isolation | None = None
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


def _isolation() -> _Isolation:
    global _iso
    with _iso_lock:
        if _iso is None:
            for cand in _candidates():
                try:
                    res = _run(cand, {"kind": "script", "code": "pass"}, SandboxLimits(wall_s=10.0), ())
                except SandboxError as exc:
                    log.debug("sandbox isolation %r unavailable: %s", cand.level, exc)
                    continue
                if res.done is not None and res.done.get("ok"):
                    _iso = cand
                    break
            else:
                raise SandboxError("no sandbox configuration could run a trivial job; see the debug log")
            if _iso.level != "full":
                log.warning(
                    "sandbox isolation is %r on this machine (no %s): untrusted code runs with weaker "
                    "containment; see antipasto_pl.env.sandbox",
                    _iso.level,
                    "read-only mount view" if _iso.level == "namespaces" else "namespaces",
                )
        return _iso


_base_lock = threading.Lock()
_base: tuple[int, str] | None = None  # (owner pid, dir)


def _workdir_base() -> str:
    """This process's dir for run working dirs: traversable (0711) but not listable by sandboxes.

    Inside a sandbox it is covered by an empty tmpfs with only that run's dir bound back in.
    """
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
    """The per-process fork server (`harness._serve`), talked to over a SOCK_SEQPACKET socketpair."""

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
            start_new_session=True,  # a Ctrl-C in the trainer's terminal must not kill it
        )
        theirs.close()
        self.sock, self.owner = ours, os.getpid()

    def launch(self, job_path: str, fds: Sequence[int]) -> tuple[int, int]:
        """Fork a launcher for `job_path` with (stdout, stderr, result) write ends; return (pid, pidfd)."""
        socket.send_fds(self.sock, [job_path.encode()], list(fds))
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


def _launch_via_server(job_path: str, fds: Sequence[int]) -> tuple[int, int]:
    global _server
    with _server_lock:
        for _ in range(2):
            if _server is None or _server.owner != os.getpid() or _server.proc.poll() is not None:
                if _server is not None and _server.owner != os.getpid():
                    _server.sock.close()  # inherited through fork(): belongs to the parent process
                _server = _ForkServer()
            try:
                return _server.launch(job_path, fds)
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
    """Handle on one run's launcher process: started by the fork server (pidfd) or by Popen."""

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

    def wait(self) -> None:
        if self.popen is not None:
            self.popen.wait()
        elif self.pidfd is not None:
            select.select([self.pidfd], [], [], 5.0)
        if self.pidfd is not None:
            os.close(self.pidfd)


def _start(job_path: str, fds: tuple[int, int, int]) -> _Launcher:
    if _FORK_SERVER:
        pid, pidfd = _launch_via_server(job_path, fds)
        return _Launcher(pid, pidfd)
    lifeline = _lifeline_fd()
    popen = subprocess.Popen(
        [*_PYTHON, "--run", job_path, str(fds[2]), str(lifeline)],
        stdin=subprocess.DEVNULL,
        stdout=fds[0],
        stderr=fds[1],
        pass_fds=(fds[2], lifeline),
        cwd="/",
        env={"PATH": _SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
    )  # the launcher calls setsid() itself, as it does under the fork server
    return _Launcher(popen.pid, None, popen)


# ---------------------------------------------------------------- running


def run_sandboxed(
    job: Mapping[str, Any], limits: SandboxLimits | None = None, *, collect: Sequence[str] = ()
) -> SandboxResult:
    """Run one harness job (see `antipasto_pl.env.harness`) in a fresh sandbox.

    `job` needs "kind" and "code" plus the kind's fields; nonce, limits, working dir, environment
    and isolation are filled in here. `collect` names files in the working dir to read back
    (regular files only, symlinks refused, at most `limits.output_bytes` each) before the directory
    is deleted.
    """
    if not isinstance(job, Mapping) or not isinstance(job.get("code"), str) or not isinstance(job.get("kind"), str):
        raise ValueError(f"run_sandboxed job must be a mapping with str 'kind' and 'code', got {job!r:.200}")
    return _run(_isolation(), job, limits or SandboxLimits(), collect)


def run_code(code: str, limits: SandboxLimits | None = None, *, collect: Sequence[str] = ()) -> SandboxResult:
    """Run `code` as a script (``__name__ == "__main__"``) in a fresh sandbox."""
    return run_sandboxed({"kind": "script", "code": code}, limits, collect=collect)


def _run(iso: _Isolation, job: Mapping[str, Any], limits: SandboxLimits, collect: Sequence[str]) -> SandboxResult:
    start = time.monotonic()
    nonce = secrets.token_hex(16)
    uid = (1 << 20) + secrets.randbelow(1 << 29) if iso.drop_uid else None
    workdir = tempfile.mkdtemp(prefix="run-", dir=_workdir_base())
    pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, result
    readers = tuple(r for r, _ in pipes)
    writers = [w for _, w in pipes]
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        full_job = {
            **job,
            "nonce": nonce,
            "workdir": workdir,
            "limits": limits.harness_limits(),
            "env": {"PATH": _SAFE_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
            "isolation": {"ns": iso.ns, "mounts": iso.mounts, "userns": iso.userns, "uid": uid, "gid": uid},
        }
        job_path = os.path.join(workdir, _JOB_FILE)
        fd = os.open(job_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(full_job, fh)
        launcher = _start(job_path, (writers[0], writers[1], writers[2]))
        for w in writers:
            os.close(w)
        writers.clear()
        streams: dict[str, bytes] = {}
        try:
            streams, timed_out, exceeded = _collect_output(
                launcher, readers, limits, start, on_exit=lambda: _kill_tree(launcher, iso, uid, None)
            )
        finally:
            init = _parse_records(streams.get("result", b""), nonce).get("launch", {}).get("init")
            _kill_tree(launcher, iso, uid, init if isinstance(init, int) else None)
            launcher.wait()
        files = {name: data for name in collect if (data := _read_file(workdir, name, limits.output_bytes)) is not None}
    finally:
        for fd in (*readers, *writers):
            os.close(fd)
        _rmtree(workdir)
    records = _parse_records(streams["result"], nonce)
    if "fail" in records:
        raise SandboxError(f"sandbox setup failed (isolation {iso.level!r}): {records['fail'].get('error')}")
    ready = "ready" in records
    if not ready and not timed_out and not exceeded:
        tail = streams["stderr"][-2000:].decode("utf-8", "replace")
        raise SandboxError(f"sandbox harness did not start (isolation {iso.level!r}): {tail}")
    exit_rec = records.get("exit")
    return SandboxResult(
        stdout=streams["stdout"],
        stderr=streams["stderr"],
        ready=ready,
        done=records.get("done"),
        exit=exit_rec,
        timed_out=timed_out or bool(exit_rec and exit_rec.get("timeout")),
        output_exceeded=exceeded,
        files=files,
        isolation=iso.level,
        wall_s=time.monotonic() - start,
        workdir=workdir,
        uid=uid,
    )


def _collect_output(
    launcher: _Launcher, readers: tuple[int, ...], limits: SandboxLimits, start: float, on_exit: Callable[[], None]
) -> tuple[dict[str, bytes], bool, bool]:
    """Read stdout, stderr and the result pipe incrementally until EOF, the deadline or a byte cap.

    `on_exit` runs once the launcher has exited, to kill strays still holding the pipes open.
    """
    names = ("stdout", "stderr", "result")
    caps = {"stdout": limits.output_bytes, "stderr": limits.output_bytes, "result": limits.result_bytes}
    bufs = {name: bytearray() for name in names}
    sel = selectors.DefaultSelector()
    for name, fd in zip(names, readers):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    if launcher.pidfd is not None:
        sel.register(launcher.pidfd, selectors.EVENT_READ, "exit")
    deadline = start + limits.wall_s + _GRACE_S
    timed_out = exceeded = exited = False
    try:
        while any(key.data != "exit" for key in sel.get_map().values()):
            now = time.monotonic()
            if now >= deadline:
                timed_out = not exited
                break
            poll = deadline - now if launcher.pidfd is not None else min(deadline - now, 0.05)
            for key, _ in sel.select(poll):
                if key.data == "exit":
                    sel.unregister(key.fd)
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.data]
                room = caps[key.data] - len(buf)
                buf += chunk[:room]
                exceeded = exceeded or len(chunk) > room
            if exceeded:
                break
            if not exited and launcher.exited():
                exited = True
                on_exit()
                deadline = min(deadline, time.monotonic() + _DRAIN_S)
    finally:
        sel.close()
    return {k: bytes(v) for k, v in bufs.items()}, timed_out, exceeded


def _kill_tree(launcher: _Launcher, iso: _Isolation, uid: int | None, init: int | None) -> None:
    """SIGKILL the namespace init (ends the whole pid namespace) and the launcher; without a pid
    namespace also the process group and every process of the sandbox uid (daemons that left it)."""
    if init is not None and not launcher.exited():  # while the launcher lives, `init` is unreaped
        _signal(init)
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


def _read_file(workdir: str, name: str, limit: int) -> bytes | None:
    """Read workdir/name if it is a regular file (never following a symlink the submission planted)."""
    try:
        fd = os.open(os.path.join(workdir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _rmtree(path: str) -> None:
    def fix(func, p, _exc):  # the submission may have chmod-ed things to 000
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)


def _parse_records(raw: bytes, nonce: str) -> dict[str, dict[str, Any]]:
    """First record of each kind carrying our nonce; anything else on the channel is ignored."""
    records: dict[str, dict[str, Any]] = {}
    for line in raw.split(b"\n"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("n") == nonce and isinstance(rec.get("k"), str):
            records.setdefault(rec["k"], rec)
    return records
