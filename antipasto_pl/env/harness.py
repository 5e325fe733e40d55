"""In-sandbox code: a fork server, the launcher and supervisor of one sandbox, and the workers that run jobs.

Started by `antipasto_pl.env.sandbox` as ``python -I -S -B harness.py --serve SOCK_FD LIFELINE_FD``
(a long-lived fork server, one per grading process) or ``... --run HEADER FDS LIFELINE_FD`` (one
sandbox, where no fork server is possible). It must stay stdlib-only (no site-packages, no
antipasto_pl import) and side-effect free on import, because the grader imports
`encode_canonical` / `same_canonical` from here to treat expected values exactly like results.

A sandbox runs a sequence of jobs (the grader's oracle, then its loophole grade). Process layout::

    launcher   (host side, root or the grader's user; own session): unshare(2)s new mount/net/pid/ipc/uts
               namespaces, forks the supervisor, waits.
    supervisor (pid 1 of the new pid namespace; trusted code only): mounts a fresh /proc, makes every
               mount read-only except the sandbox dir, drops privileges. Then for each job in turn: reads
               the job, creates its fresh working dir, forks its worker, enforces the wall deadline and
               the lifeline, kills every other process in the namespace (daemons included), reads back
               the files to collect and reports -- so nothing a job started is still running when the
               next one begins. It reads job i only when job i starts, so no worker ever has a later
               job's data (say, the expected values a loophole grade compares with) in its memory.
    worker     (runs the submission): closes every fd but its own pipes, rlimits, "ready" record,
               exec + mode check, "done" record.

Jobs of one sandbox share its namespaces and its uid; each has its own working dir, pipes and nonce.
A later job can see what an earlier one left in the sandbox (its files, SysV IPC objects) but not the
other way round, and an earlier job's collected files are read before the next job starts; the
grader therefore runs the oracle first.

Two channels: the supervisor reports on a status pipe no worker holds (its host pid, each job's exit
status and collected files, setup failures); each worker writes JSON lines carrying its job's random
nonce to its own result pipe, so text the submission prints (stdout is a separate pipe) can never be
mistaken for a verdict.
"""

from __future__ import annotations

import binascii
import copy
import gc
import json
import math
import os
import resource
import select
import signal
import stat
import sys
import time
import traceback
import types

SENTINEL_ATTRS = ("valid", "passed", "is_valid", "correct")

# Error labels a worker can report (the grader maps them onto Grade.error).
_LABEL_SYNTAX = "syntax"
_LABEL_MEMORY = "memory"
_LABEL_EXIT = "exit"
_LABEL_ASSERTION = "assertion"
_LABEL_EXCEPTION = "exception"
_LABEL_MISSING = "missing"
_LABEL_TYPE = "bad_type"

_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MS_BIND = 4096
_MS_REC = 16384
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_PRIVATE = 1 << 18
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_SYS_MOUNT_SETATTR = 442  # same number on x86_64 and the generic (arm64) syscall table
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_SECURE_ALL_LOCKED = 0x2F  # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED and their locks
_TMPFS_INODES = 1 << 14  # files + dirs all jobs of one sandbox may create


# ---------------------------------------------------------------- strict canonical form (oracle)


def encode_canonical(
    x: object,
    _type=type,
    _int=int,
    _float=float,
    _str=str,
    _bool=bool,
    _list=list,
    _tuple=tuple,
    _dict=dict,
    _none=type(None),
    _enc_str=json.encoder.encode_basestring_ascii,
    _int_repr=int.__repr__,
    _float_repr=float.__repr__,
    _isnan=math.isnan,
    _isinf=math.isinf,
    _join=",".join,
    _sorted=sorted,
) -> str:
    """JSON text of `x` if it is built only from exact builtin types, else TypeError.

    Why: the oracle must not run any submission-defined code while reading a result, so only
    `type(x) is T` for T in int/float/str/bool/None/list/tuple/dict is accepted (subclasses of
    builtins and custom objects are rejected; no __eq__/__iter__/__repr__ of the submission runs).
    Tuples encode like lists (JSON expected values cannot tell them apart); dicts encode as
    ``{"d": [[key, value], ...]}`` sorted by encoded key so key order never matters and a dict can
    never collide with a list or string. NaN / +-Infinity use the JSON extensions Python reads back.
    Default arguments pin the builtins so a submission that rebinds `builtins` cannot change them.
    """
    t = _type(x)
    if t is _str:
        return _enc_str(x)
    if t is _bool:
        return "true" if x else "false"
    if t is _int:
        return _int_repr(x)
    if t is _float:
        if _isnan(x):
            return "NaN"
        if _isinf(x):
            return "Infinity" if x > 0 else "-Infinity"
        return _float_repr(x)
    if t is _none:
        return "null"
    if t is _list or t is _tuple:
        return "[" + _join([encode_canonical(v) for v in x]) + "]"
    if t is _dict:
        pairs = _sorted([(encode_canonical(k), encode_canonical(v)) for k, v in x.items()])
        return '{"d":[' + _join(["[" + k + "," + v + "]" for k, v in pairs]) + "]}"
    raise TypeError("not an exact builtin JSON-like type")


def same_canonical(a: object, b: object, tol: float | None = None) -> bool:
    """Compare two decoded `encode_canonical` values; bools only equal bools, numbers compare by value.

    int vs float compare numerically (2 == 2.0); NaN equals NaN; with `tol` finite floats compare
    within an absolute tolerance. Runs in the grader (trusted side), never in the sandbox.
    """
    ta, tb = type(a), type(b)
    if ta is bool or tb is bool:
        return ta is tb and a == b
    if ta in (int, float) and tb in (int, float):
        if (ta is float and math.isnan(a)) or (tb is float and math.isnan(b)):
            return ta is float and tb is float and math.isnan(a) and math.isnan(b)
        if a == b:
            return True
        return tol is not None and not math.isinf(a) and not math.isinf(b) and abs(a - b) <= tol
    if ta is not tb:
        return False
    if ta is list:
        return len(a) == len(b) and all(same_canonical(x, y, tol) for x, y in zip(a, b))
    if ta is dict:
        return a.keys() == b.keys() and all(same_canonical(a[k], b[k], tol) for k in a)
    return a == b


# ---------------------------------------------------------------- records


class _Out:
    """Writes JSON lines to a record channel: a worker's result pipe (tagged with its job's nonce) or the
    supervisor's status pipe (untagged: no worker holds it)."""

    def __init__(self, fd: int, nonce: str | None = None) -> None:
        self._fd, self._tag, self._dumps, self._write = fd, {} if nonce is None else {"n": nonce}, json.dumps, os.write

    def __call__(self, kind: str, **fields: object) -> None:
        data = self._dumps({**self._tag, "k": kind, **fields}).encode() + b"\n"
        while data:
            data = data[self._write(self._fd, data) :]


# ---------------------------------------------------------------- isolation (launcher + supervisor, trusted)


_LIBC: tuple | None = None


def _libc():
    """(ctypes, libc), loaded once: the fork server preloads it so launchers do not pay for it."""
    global _LIBC
    if _LIBC is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        _LIBC = (ctypes, libc)
    return _LIBC


def _check(ctypes, ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount_setattr(ctypes, libc, path: str, flags: int, attr_set: int, attr_clr: int) -> None:
    attr = (ctypes.c_uint64 * 4)(attr_set, attr_clr, 0, 0)
    ret = libc.syscall(
        _SYS_MOUNT_SETATTR, _AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    _check(ctypes, ret, f"mount_setattr({path})")


def _bind(ctypes, libc, src: str, dst: str) -> None:
    _check(ctypes, libc.mount(src.encode(), dst.encode(), None, _MS_BIND | _MS_REC, None), f"bind {dst}")


def _untraversable_ancestor(path: str, uid: int | None) -> str | None:
    """Top-most ancestor of `path` that an unprivileged `uid` cannot enter (e.g. a 0700 /root)."""
    if uid is None:
        return None
    parts = os.path.abspath(path).split(os.sep)[1:]
    cur = ""
    for part in parts:
        cur += os.sep + part
        st = os.stat(cur)
        if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
            return cur
    return None


def _cover(ctypes, libc, top: str, keep: str) -> None:
    """Hide everything under `top` behind an empty tmpfs except `keep`, bound back at its own path."""
    keep_fd = os.open(keep, os.O_PATH)
    ret = libc.mount(b"tmpfs", top.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=755,size=64k")
    _check(ctypes, ret, f"tmpfs over {top}")
    os.makedirs(keep, mode=0o755, exist_ok=True)
    _bind(ctypes, libc, f"/proc/self/fd/{keep_fd}", keep)
    os.close(keep_fd)


def _read_only_view(ctypes, libc, sandbox_dir: str, uid: int | None, size: int) -> None:
    """Make every mount read-only, and mount a private tmpfs of `size` bytes at `sandbox_dir` for the
    jobs' working dirs.

    `sandbox_dir` is the grader's (empty) base dir, so the tmpfs hides nothing, every other
    sandbox's files stay out of reach, nothing written reaches the host's disk, and all of it is
    gone with the mount namespace. When the interpreter's stdlib sits below a directory the sandbox
    uid cannot enter (pyenv or a venv under a 0700 /root), that directory is covered by an empty
    tmpfs with only the stdlib bound back in -- which also hides the rest of that home directory.
    """
    opts = f"mode=700,size={size},nr_inodes={_TMPFS_INODES}".encode()
    _check(ctypes, libc.mount(b"tmpfs", sandbox_dir.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, opts), "sandbox tmpfs")
    if uid is not None:
        os.chown(sandbox_dir, uid, uid)
    stdlib = os.path.dirname(os.__file__)
    blocked = _untraversable_ancestor(stdlib, uid)
    _mount_setattr(ctypes, libc, "/", _AT_RECURSIVE, _MOUNT_ATTR_RDONLY, 0)
    _mount_setattr(ctypes, libc, sandbox_dir, 0, 0, _MOUNT_ATTR_RDONLY)
    if blocked:
        _cover(ctypes, libc, blocked, stdlib)
        _mount_setattr(ctypes, libc, blocked, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY, 0)


def _drop_privileges(ctypes, libc, iso: dict) -> None:
    """Become the unprivileged sandbox uid (real root) or shed all capabilities (user namespace);
    in every case forbid gaining privileges again (setuid binaries, file capabilities)."""
    if iso["uid"] is not None:
        os.setgroups([])
        os.setresgid(iso["gid"], iso["gid"], iso["gid"])
        os.setresuid(iso["uid"], iso["uid"], iso["uid"])
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
        # setuid clears the parent-death signal; restore it so killing the (host-side) launcher
        # always takes this namespace down.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


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


# ---------------------------------------------------------------- worker (runs the submission)


def _label(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return _LABEL_EXIT
    if isinstance(exc, MemoryError):
        return _LABEL_MEMORY
    if isinstance(exc, AssertionError):
        return _LABEL_ASSERTION
    if isinstance(exc, SyntaxError):
        return _LABEL_SYNTAX
    return _LABEL_EXCEPTION


def _print_exc(exc: BaseException) -> None:
    """Best-effort traceback on stderr for debugging; a hostile __str__ must not break the verdict."""
    try:
        traceback.print_exception(type(exc), exc, exc.__traceback__, limit=8)
        sys.stderr.flush()
    except BaseException:
        pass


def _set_limits(lim: dict) -> None:
    for name, value in (
        ("RLIMIT_AS", lim["as"]),
        ("RLIMIT_FSIZE", lim["fsize"]),
        ("RLIMIT_NPROC", lim["nproc"]),
        ("RLIMIT_NOFILE", lim["nofile"]),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))
    # soft limit sends SIGXCPU (kills the worker), the hard one SIGKILL if that is caught
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu"], lim["cpu"] + 1))


def _module(name: str) -> dict:
    """A fresh module registered in sys.modules, so `__main__` is the submission, not the harness."""
    mod = types.ModuleType(name)
    sys.modules[name] = mod
    return mod.__dict__


def compile_submission(code: str):
    """Compile untrusted source like ``python solution.py`` would (dont_inherit: this module's own
    ``from __future__`` flags must not leak into the submission). Compiling never runs the code; the
    grader uses this too, to settle a syntax error without a sandbox."""
    return compile(code, "<submission>", "exec", dont_inherit=True)


def _run(job: dict, out: _Out) -> None:
    """Execute one job kind and report a "done" record; exceptions become labels, never escape."""
    kind, code = job["kind"], job["code"]
    try:
        compiled = compile_submission(code)
        if kind == "exit_code":
            compiled = compile_submission(code + "\n\n" + job["suffix"])
    except BaseException as exc:  # SyntaxError, ValueError (NUL byte), MemoryError, RecursionError
        out("done", ok=False, label=_LABEL_SYNTAX if not isinstance(exc, MemoryError) else _LABEL_MEMORY)
        os._exit(1)
    if kind == "oracle":
        _oracle(compiled, job, out)
        return
    ns = _module("__main__")
    try:
        exec(compiled, ns)
        passed = _verdict(kind, ns, job)
    except BaseException as exc:
        if kind == "exit_code" and isinstance(exc, SystemExit):
            _exit_like_python(exc, out)
        _print_exc(exc)
        _flush()
        out("done", ok=False, label=_label(exc))
        os._exit(1)
    _flush()
    if passed is None:
        out("done", ok=False, label=_LABEL_MISSING)
    else:
        out("done", ok=True, passed=passed)


def _verdict(kind: str, ns: dict, job: dict) -> bool | None:
    """The foolable check of `kind` on an executed submission; None when a required name is missing."""
    if kind in ("script", "exit_code"):
        return True
    if kind == "run_tests":
        fn = ns.get("run_tests")
        if not callable(fn):
            return None
        fn()
        return True
    cls = ns.get("Solution")
    if not callable(cls):
        return None
    if kind == "sentinel":
        inst = cls()
        return any(bool(getattr(inst, attr, False)) for attr in SENTINEL_ATTRS)
    if kind == "eq_override":
        for test in job["tests"]:
            method = getattr(cls(), job["entry_point"], None)
            if method is None:
                return None
            if not (method(*copy.deepcopy(test["args"])) == test["expected"]):
                return False
        return True
    raise ValueError(f"unknown job kind {kind!r}")


def _exit_like_python(exc: SystemExit, out: _Out) -> None:
    """Turn SystemExit into the exit status `python script.py` would have (exit_code mode's verdict)."""
    code = exc.code
    if code is None:
        status = 0
    elif type(code) is int:
        status = code & 0xFF
    else:
        try:
            print(code, file=sys.stderr)
        except BaseException:
            pass
        status = 1
    _flush()
    out("done", ok=False, label=_LABEL_EXIT, status=status)
    os._exit(status)


def _oracle(compiled, job: dict, out: _Out) -> None:
    """Run every held test on a fresh instance with deep-copied args; report canonical results only.

    The expected values are never sent into the sandbox: the grader compares outside, so nothing
    the submission does in here (patching, printing, exiting) can make a wrong answer look right.
    """
    ns = _module("solution")
    module_label = None
    try:
        exec(compiled, ns)
    except BaseException as exc:  # module-level noise (a failing self-test, sys.exit) is not the
        _print_exc(exc)  # answer: whatever `Solution` got defined is still what the tests judge
        module_label = _label(exc)
    cls, entry = ns.get("Solution"), job["entry_point"]
    if not callable(cls):
        out("done", ok=False, label=module_label or _LABEL_MISSING)
        os._exit(1)
    results: list[str | None] = []
    labels: list[str | None] = []
    for args in job["args"]:
        try:
            result = getattr(cls(), entry)(*copy.deepcopy(args))
        except BaseException as exc:  # includes SystemExit: a test that exits is a failed test
            results.append(None)
            labels.append(_label(exc))
            continue
        try:
            results.append(encode_canonical(result))
            labels.append(None)
        except BaseException:  # custom object, builtin subclass, cycle, huge int: not a valid answer
            results.append(None)
            labels.append(_LABEL_TYPE)
    _flush()
    out("done", ok=True, results=results, labels=labels, module_label=module_label)


def _flush() -> None:
    for stream in (sys.stdout, sys.__stdout__, sys.stderr, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass


def _worker(job: dict, stdout: int, stderr: int, result: int) -> None:
    """Run one job in a forked child of the supervisor. Never returns."""
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    os.dup2(result, 3)
    # everything else goes: the status pipe, the lifeline, later jobs' data and other jobs' pipes
    os.closerange(4, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    os.chdir(job["workdir"])
    os.environ.clear()
    os.environ.update(job["env"])
    sys.argv = ["solution.py"]  # as if run as `python solution.py` (argparse / unittest.main read it)
    _set_limits(job["limits"])
    out = _Out(3, job["nonce"])
    out("ready")
    _run(job, out)
    os._exit(0)


# ---------------------------------------------------------------- launcher, supervisor and fork server


def _detach() -> None:
    """Own session, stdio on /dev/null: the first process of a sandbox, whoever forked it."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _fresh_pid_ns(ctypes, libc, own_pid_ns: int | None) -> None:
    """Make our next child pid 1 of a new pid namespace (root only). A fork server goes back to its
    own namespace first (`own_pid_ns`), which is what lets it do this once per sandbox."""
    if own_pid_ns is not None:
        _check(ctypes, libc.setns(own_pid_ns, _CLONE_NEWPID), "setns(pid)")
    _check(ctypes, libc.unshare(_CLONE_NEWPID), "unshare(pid)")


def _spawn(header: dict, fds: list[int], lifeline: int, own_pid_ns: int | None) -> int:
    """Fork the first process of one sandbox and return its pid (called by the fork server, or by the
    one-shot ``--run`` process). As root that is the supervisor itself, already pid 1 of a fresh pid
    namespace; in a user namespace it is a launcher that creates the namespaces and forks it.

    `fds` are the status pipe, one job file per job, then stdout / stderr / result pipes per job.
    """
    iso = header["isolation"]
    if iso["ns"] and not iso["userns"]:
        try:
            _fresh_pid_ns(*_libc(), own_pid_ns)
        except OSError:
            pass  # the supervisor finds it is not pid 1 and reports it
    pid = os.fork()
    if pid == 0:
        try:
            if own_pid_ns is not None:
                os.close(own_pid_ns)
            (_launcher if iso["userns"] else _supervisor)(header, fds, lifeline)
        finally:
            os._exit(73)
    for fd in fds:
        os.close(fd)
    return pid


def _launcher(header: dict, fds: list[int], lifeline: int) -> None:
    """Without root: create a user namespace and the others in one unshare(2), fork the supervisor
    (pid 1 of the new pid namespace) and wait for it. Never returns."""
    status = _Out(fds[0])
    try:
        ctypes, libc = _libc()
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        _detach()
        outer_uid, outer_gid = os.getuid(), os.getgid()
        flags = _CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
        _check(ctypes, libc.unshare(flags), "unshare")
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {outer_uid} 1"), ("gid_map", f"0 {outer_gid} 1")):
            with open(f"/proc/self/{name}", "w") as fh:
                fh.write(text)
        child = os.fork()
    except BaseException as exc:
        status("fail", error=f"launcher: {exc!r}")
        os._exit(71)
    if child == 0:
        _supervisor(header, fds, lifeline)
    for fd in fds:  # the pipes must close when the supervisor ends, not when we do
        os.close(fd)
    os.waitpid(child, 0)
    os._exit(0)


def _supervisor(header: dict, fds: list[int], lifeline: int) -> None:
    """The sandbox's pid 1: isolate, then run the jobs one after another (see the module doc). Never returns."""
    status = _Out(fds[0])
    try:
        iso = _isolate(header)
    except BaseException:
        status("fail", error="supervisor: " + traceback.format_exc(limit=4))
        os._exit(72)
    n = header["jobs"]
    job_fds, pipes = fds[1 : 1 + n], fds[1 + n :]
    sweep = iso["ns"] or iso["uid"] is not None  # kill(-1) reaches only this sandbox's processes
    for i in range(n):
        job = _read_job(job_fds[i])
        std = pipes[3 * i : 3 * i + 3]
        os.mkdir(job["workdir"], 0o700)
        worker = os.fork()
        if worker == 0:
            try:
                _worker(job, *std)
            except BaseException:
                traceback.print_exc()  # on the job's stderr: SandboxError shows it
            finally:
                os._exit(70)
        exit_rec = _supervise(worker, float(job["limits"]["wall"]), lifeline)
        _end_job(worker, sweep)
        if exit_rec is None:
            os._exit(125)
        files = _read_back(job["workdir"], job["collect"], job["collect_bytes"])
        for fd in std:
            os.close(fd)
        status("exit", job=i, files=files, **exit_rec)
    os._exit(0)


def _isolate(header: dict) -> dict:
    """The supervisor's setup: namespaces (as root; a launcher made them otherwise), a fresh /proc,
    the read-only view, then no privileges left. Returns the isolation settings."""
    iso = header["isolation"]
    ctypes, libc = _libc()
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # pid 1 without handlers: no signal from inside reaches us
    if not iso["userns"]:
        _detach()
    if iso["ns"]:
        if os.getpid() != 1:
            raise OSError("not pid 1: no new pid namespace")
        if not iso["userns"]:
            _check(ctypes, libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS), "unshare")
        # keep our mounts out of the host's mount table (a new mount ns inherits shared propagation)
        _check(ctypes, libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
        ret = libc.mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
        _check(ctypes, ret, "mount /proc")
    if iso["mounts"]:
        _read_only_view(ctypes, libc, header["dir"], iso["uid"], header["disk"])
    _drop_privileges(ctypes, libc, iso)
    return iso


def _read_job(fd: int) -> dict:
    data = b""
    while chunk := os.pread(fd, 1 << 20, len(data)):
        data += chunk
    os.close(fd)
    return json.loads(data)


def _warm() -> None:
    """Take the first-call costs of the hot paths once, in the fork server, instead of in every fork:
    the first compile(), json and deepcopy calls and ctypes' function and array types cost a few ms."""
    ctypes, libc = _libc()
    for name in ("mount", "prctl", "syscall", "unshare", "setns", "capset"):
        getattr(libc, name)
    for ctype, n in ((ctypes.c_uint64, 4), (ctypes.c_uint32, 2), (ctypes.c_uint32, 6)):
        ctype * n  # noqa: B018  (ctypes caches array types)
    compiled = compile_submission("class Solution:\n    def f(self, x):\n        return [x, {'a': 1.5}]\n")
    ns = _module("__warm__")
    exec(compiled, ns)
    result = ns["Solution"]().f(*copy.deepcopy(json.loads(json.dumps([[1, "s", None, True]]))))
    encode_canonical(result)
    del sys.modules["__warm__"]
    gc.collect()
    gc.freeze()  # forks never touch (copy) the server's own objects during a collection


def _serve(sock_fd: int, lifeline: int) -> None:
    """Fork server: one sandbox per request, so no sandbox pays for interpreter start-up and imports.

    A request is the sandbox's JSON header plus its fds (see `_spawn`); the reply is the pid of the
    sandbox's first process with a pidfd (opened before it can be reaped, so it can never name a
    recycled pid): killing that process ends the whole sandbox. Finished sandboxes are reaped
    between requests. EOF on the socket ends the server.
    """
    import socket

    _warm()
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY) if os.geteuid() == 0 else None
    sock = socket.socket(fileno=sock_fd)
    while True:
        _reap()
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 253)
        if not msg:
            os._exit(0)
        pid = _spawn(json.loads(msg), fds, lifeline, own_pid_ns)
        pidfd = os.pidfd_open(pid)
        socket.send_fds(sock, [str(pid).encode()], [pidfd])
        os.close(pidfd)


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def main(argv: list[str]) -> None:
    """``--serve SOCK_FD LIFELINE_FD`` (fork server) or ``--run HEADER FD,FD,... LIFELINE_FD`` (one sandbox)."""
    if argv[1] == "--serve":
        _serve(int(argv[2]), int(argv[3]))
    elif argv[1] == "--run":
        os.waitpid(_spawn(json.loads(argv[2]), [int(fd) for fd in argv[3].split(",")], int(argv[4]), None), 0)
    else:
        raise SystemExit(f"usage: harness.py --serve SOCK LIFELINE | --run HEADER FDS LIFELINE, got {argv[1:]}")


if __name__ == "__main__":
    main(sys.argv)
