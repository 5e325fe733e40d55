"""The supervisor: pid 1 of a sandbox's pid namespace, trusted code only (the package doc has the whole layout).

It isolates itself (`_enter`, `_seal`: its namespaces, the view, its memory cgroup, then no privileges),
then runs the sandbox's jobs one after another: it reads job i only when job i starts, creates its fresh
working dir, forks its worker, enforces the wall deadline and the lifeline, kills every other process in
the namespace, reads back the files to collect and reports on the status pipe.
"""

from __future__ import annotations

import binascii
import json
import os
import select
import signal
import stat
import sys
import time
import traceback
import types

from .kernel import (
    _CLONE_NEWIPC,
    _CLONE_NEWNS,
    _CLONE_NEWUTS,
    _MS_PRIVATE,
    _MS_REC,
    _PR_CAP_AMBIENT,
    _PR_CAP_AMBIENT_CLEAR_ALL,
    _PR_CAPBSET_DROP,
    _PR_SET_DUMPABLE,
    _PR_SET_NO_NEW_PRIVS,
    _PR_SET_PDEATHSIG,
    _PR_SET_SECUREBITS,
    _SECURE_ALL_LOCKED,
    _check,
    _detach,
    _libc,
    _mount_proc,
)
from .memory import _MemoryGroup
from .records import _Out
from .view import _python_view, _sandbox_tmpfs
from .worker import _LABEL_SYNTAX, _worker, compile_submission

_SAVED_UID_OFFSET = 1 << 29  # sandbox uids are 2**20 + [0, 2**29): the supervisor's saved uid is none of them
_CGROUP: _MemoryGroup | None = None  # the memory cgroup the spawner lent this sandbox (set in its fork)


def _supervisor(header: dict, fds: list[int], lifeline: int, ready: bool, entered: bool = False) -> None:
    """The sandbox's pid 1: isolate, then run the jobs one after another (see the package doc). Never
    returns. `ready`: whoever forked us made the namespaces isolation asks for; `entered`: we are a
    spare and already did `_enter`."""
    status = _Out(fds[0])
    iso = header["isolation"]
    try:
        if not entered:
            _enter(iso, ready)
        _seal(header)
    except BaseException:
        status("fail", error="supervisor: " + traceback.format_exc(limit=4))
        os._exit(72)
    n = header["jobs"]
    job_files, job_io = fds[1 : 1 + n], fds[1 + n :]
    cgroup = _CGROUP
    sweep = iso["ns"] or iso["uid"] is not None  # kill(-1) reaches only this sandbox's processes
    compiled: dict[str, types.CodeType | None] = {}  # the jobs of a sandbox usually share their code
    for i in range(n):
        std = job_io[3 * i : 3 * i + 3]  # stdout, stderr, result file
        try:  # what an earlier job did to the sandbox (its disk, its inodes) can stop this one starting
            job = _read_job(job_files[i])
            _prepare(job)
            if job["code"] not in compiled:
                compiled[job["code"]] = _precompile(job["code"])
            code = compiled[job["code"]]
            ready_r, ready_w = os.pipe()
            worker = os.fork() if code is not _NO_CODE else -1
        except BaseException as exc:
            status("fail", job=i, error=f"job {i} could not start: {exc!r}")
            os._exit(72)
        if worker == 0:
            try:
                _worker(job, *std, ready_w, code)
            except BaseException:
                traceback.print_exc()  # on the job's stderr: SandboxError shows it
            finally:
                os._exit(70)
        os.close(ready_w)
        oom = _oom_kills(cgroup)
        if worker < 0:  # does not compile: report what its worker would, without starting one
            _Out(std[2], job["nonce"])("done", ok=False, label=_LABEL_SYNTAX)
            exit_rec: dict[str, object] | None = {"code": 1}
            started = True
        else:
            exit_rec = _supervise(worker, float(job["limits"]["wall"]), lifeline)
            _end_job(worker, sweep)
            if exit_rec is None:
                os._exit(125)
            started = _readable(ready_r)
        os.close(ready_r)
        if _oom_kills(cgroup) > oom:
            exit_rec["oom"] = True
        files = _read_back(job["workdir"], job["collect"], job["collect_bytes"])
        for fd in std:
            os.close(fd)
        status("exit", job=i, files=files, ready=started, memory=cgroup.kind if cgroup else "rlimit", **exit_rec)
    os._exit(0)


def _enter(iso: dict, ready: bool) -> None:
    """The supervisor's setup that needs nothing of the request (a spare does it ahead of time): its
    own mount/ipc/uts namespaces and a fresh /proc."""
    ctypes, libc = _libc()
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if not iso["userns"]:
        _detach()
    if not ready or (iso["ns"] and os.getpid() != 1):
        raise OSError("the sandbox's namespaces could not be set up")
    if iso["ns"]:
        if iso["userns"] and iso["mounts"]:  # the launcher made them all; the view is ours to build
            _python_view(ctypes, libc, proc=True)
            return
        if not iso["userns"]:  # a copy of the spawner's mount namespace: the view, or the host's mounts
            _check(ctypes, libc.unshare(_CLONE_NEWNS | _CLONE_NEWIPC | _CLONE_NEWUTS), "unshare")
            if not iso["mounts"]:
                _check(ctypes, libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
        _mount_proc(ctypes, libc, "/proc")


def _seal(header: dict) -> None:
    """The rest of the supervisor's setup: the sandbox tmpfs, then no privileges left."""
    ctypes, libc = _libc()
    iso = header["isolation"]
    if iso["mounts"]:
        _sandbox_tmpfs(ctypes, libc, header["dir"], iso["uid"], header["disk"])
    if _CGROUP is not None:
        _CGROUP.join(header["memory"])
    _drop_privileges(ctypes, libc, iso)


def _drop_privileges(ctypes, libc, iso: dict) -> None:
    """Become the unprivileged sandbox uid (real root) or shed all capabilities (user namespace);
    in every case forbid gaining privileges again (setuid binaries, file capabilities)."""
    if iso["uid"] is not None:
        os.setgroups([])
        os.setresgid(iso["gid"], iso["gid"], iso["gid"])
        # a saved uid no submission has: prlimit(2) and ptrace need all three uids to match, so the
        # jobs' code (same real uid, which lets us kill it) cannot lower our limits (say RLIMIT_NPROC,
        # to stop us forking the next job's worker); each worker drops it before the submission runs
        os.setresuid(iso["uid"], iso["uid"], iso["uid"] + _SAVED_UID_OFFSET)
    elif iso["userns"]:
        _check(ctypes, libc.prctl(_PR_SET_SECUREBITS, _SECURE_ALL_LOCKED, 0, 0, 0), "securebits")
        for cap in range(64):
            if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                break  # past the last capability this kernel knows
        libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        data = (ctypes.c_uint32 * 6)()
        _check(ctypes, libc.capset(header, data), "capset")
    _check(ctypes, libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    if iso["ns"]:
        # setuid clears the parent-death signal; restore it so that the end of whoever forked us (a
        # killed launcher, the fork server) always takes this namespace down.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _read_job(fd: int) -> dict:
    size = os.fstat(fd).st_size
    data = b""
    while len(data) < size and (chunk := os.pread(fd, size - len(data), len(data))):
        data += chunk
    os.close(fd)
    return json.loads(data)


def _prepare(job: dict) -> None:
    """Set, in the supervisor, what its next worker inherits: working dir, environment, argv. A fresh
    process pays a copy-on-write fault for every page this touches; we do only on the first job."""
    os.mkdir(job["workdir"], 0o700)
    os.chdir(job["workdir"])
    _set_environ(job["env"])
    sys.argv = ["solution.py"]  # as if run as `python solution.py` (argparse / unittest.main read it)


def _set_environ(env: dict[str, str]) -> None:
    """Make the environment exactly `env`, touching only what differs (os.environ is slow to rebuild)."""
    for key in [key for key in os.environ if key not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


_NO_CODE = compile("", "<none>", "exec")  # stands for "does not compile"
_PRECOMPILE_CHARS = 1 << 16  # longer code is compiled by its worker, under its limits


def _precompile(code: str) -> types.CodeType | None:
    """Compile a job's code in the supervisor (compiling never runs it): once for all the sandbox's jobs
    with that code, and a syntax error needs no worker at all. `_NO_CODE` when it cannot compile; None
    leaves it to the worker (too long to compile outside the job's limits, or a failure -- recursion,
    memory -- that depends on them)."""
    if len(code) > _PRECOMPILE_CHARS:
        return None
    try:
        return compile_submission(code)
    except (SyntaxError, ValueError):  # ValueError: NUL bytes
        return _NO_CODE
    except Exception:
        return None


def _readable(fd: int) -> bool:
    """Whether the worker wrote its byte on the ready pipe (it closed its end before any submission code)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1) == b"r"
    except BlockingIOError:
        return False


def _oom_kills(group: _MemoryGroup | None) -> int:
    return group.oom_kills() if group is not None else 0


def _supervise(child: int, wall: float, lifeline: int) -> dict[str, object] | None:
    """Wait for a worker, killing it at the deadline; its exit record, or None once the grader's
    lifeline has closed (the grader process is gone: nobody wants the result)."""
    deadline = time.monotonic() + wall
    pidfd = os.pidfd_open(child) if hasattr(os, "pidfd_open") else None
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                return {"timeout": True}
            watch = [lifeline] + ([pidfd] if pidfd is not None else [])
            ready, _, _ = select.select(watch, [], [], remaining if pidfd is not None else min(remaining, 0.01))
            if lifeline in ready:
                return None
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid:
                break
    finally:
        if pidfd is not None:
            os.close(pidfd)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"code": os.WEXITSTATUS(status)}


def _end_job(worker: int, sweep: bool) -> None:
    """Kill everything the job started, daemons included, and reap what comes back to us.

    With `sweep` we are pid 1 of the sandbox's pid namespace or run as a uid of our own, so kill(-1)
    reaches exactly the job's processes (never us). Without (no namespaces, no uid of our own) only
    the worker is ours to kill; the rest of the process group goes when the grader ends the sandbox.
    """
    try:
        os.kill(-1 if sweep else worker, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:  # as pid 1 every orphan of the job is our child: ECHILD means the namespace is empty
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _read_back(workdir: str, names: list[str], limit: int) -> dict[str, str]:
    """Base64 of the regular files `names` in a finished job's dir (never through a symlink).

    Every process of the job is dead by now, so nothing can swap a file while it is read; a file or
    dir the job locked with chmod is unlocked first (we run as its owner).
    """
    files: dict[str, str] = {}
    if not names:
        return files
    try:
        os.chmod(workdir, 0o700)
    except OSError:
        return files
    for name in names:
        path = os.path.join(workdir, name)
        try:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except PermissionError:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                os.chmod(path, 0o600)
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            data = b""
            while len(data) < limit and (chunk := os.read(fd, limit - len(data))):
                data += chunk
        except OSError:
            continue
        finally:
            os.close(fd)
        files[name] = binascii.b2a_base64(data, newline=False).decode()
    return files
