"""In-sandbox code: the fork server, the supervisor of one sandbox, and the workers that run its jobs.

Started by `antipasto_pl.env.sandbox` as ``python -I -S -B harness.py --serve SOCK_FD LIFELINE_FD``
(a long-lived fork server, one per grading process) or ``... --run HEADER FDS LIFELINE_FD`` (one
sandbox, where no fork server is possible). It must stay stdlib-only (no site-packages, no
antipasto_pl import) and side-effect free on import, because the grader imports
`encode_canonical` / `same_canonical` from here to treat expected values exactly like results.

A sandbox runs a sequence of jobs (the grader's oracle, then its loophole grade). Process layout::

    spawner    (the fork server; trusted, imports done): forks each sandbox's first process -- as root
               into a fresh pid namespace and namespaces it prepared once (`_Spawner`).
    launcher   (only without root): creates a user namespace and the others, forks the supervisor.
    supervisor (pid 1 of the sandbox's pid namespace; trusted code only): its own mount/ipc/uts
               namespaces in the view of nothing but Python (`_python_view`), a fresh /proc, a
               private tmpfs for working dirs, its memory cgroup (`_MemoryGroup`), then no
               privileges (and a saved uid no job has, so no job can lower its rlimits). Then
               for each job in turn: reads the job, creates its fresh working dir, forks its worker,
               enforces the wall deadline and the lifeline, kills every other process in the
               namespace (daemons included), reads back the files to collect and reports -- so
               nothing a job started is still running when the next one begins. It reads job i only
               when job i starts, so no worker ever has a later job's data (say, the expected values
               a loophole grade compares with) in its memory. A job that cannot start (an earlier
               one filled the disk, say) ends the sandbox; the grader runs the rest in a fresh one.
    worker     (runs the submission): closes every fd but its own, rlimits, "ready" byte on a pipe
               it then closes, exec + mode check, "done" record.

Jobs of one sandbox share its namespaces and its uid; each has its own working dir, fds and nonce.
A later job can see what an earlier one left in the sandbox (its files, SysV IPC objects) but not the
other way round, and an earlier job's collected files are read before the next job starts; the
grader therefore runs the oracle first.

Record channels, by who can write them: the supervisor reports on a status pipe no worker holds
(each job's exit status, whether its worker got ready, its OOM kills and collected files; setup
failures), so those are the submission's effects as observed from outside. Each worker writes one
"done" record (its job's nonce, its verdict or oracle answers) to its own result file (unnamed; the
grader reads it once the job is over). That file is writable by any code in the worker, the
submission's included -- no secret can be kept from code running in the same process -- so the
grader treats the record as the submission's data: it is checked field by field and against the
exit status the supervisor saw (`sandbox._parse_done`), the oracle's answers are compared with the
expected values outside, and the stdout, file and exit-status verdicts never depend on it.
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
import socket
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
LABELS = frozenset({_LABEL_SYNTAX, _LABEL_MEMORY, _LABEL_EXIT, _LABEL_ASSERTION, _LABEL_EXCEPTION, _LABEL_MISSING, _LABEL_TYPE})

_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MS_RDONLY = 1
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
_SAVED_UID_OFFSET = 1 << 29  # sandbox uids are 2**20 + [0, 2**29): the supervisor's saved uid is none of them


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
    """Writes JSON lines to a record channel: a worker's result file (tagged with its job's nonce) or
    the supervisor's status pipe (untagged: no worker holds it)."""

    def __init__(self, fd: int, nonce: str | None = None) -> None:
        self._fd, self._tag, self._dumps, self._write = fd, {} if nonce is None else {"n": nonce}, json.dumps, os.write

    def line(self, kind: str, **fields: object) -> bytes:
        return self._dumps({**self._tag, "k": kind, **fields}).encode() + b"\n"

    def __call__(self, kind: str, **fields: object) -> None:
        data = self.line(kind, **fields)
        while data:
            data = data[self._write(self._fd, data) :]


# ---------------------------------------------------------------- isolation (spawner, launcher, supervisor: trusted)


_LIBC: tuple | None = None


def _libc():
    """(ctypes, libc), loaded once: the fork server preloads it so sandboxes do not pay for it."""
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


VIEW_WORKDIRS = "/sandbox"  # inside the view: where each sandbox mounts its private tmpfs for its jobs' dirs
_VIEW_DEVICES = ("null", "zero", "full", "random", "urandom")
_MNT_DETACH = 2
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, 41)  # 41: the generic table


def _view_sources() -> tuple[list[str], list[str]]:
    """(host paths the view binds read-only, paths to hide below them): the interpreter, its
    standard library (``sys.path`` of a ``-I -S`` interpreter: no site-packages), the shared
    libraries this process has mapped and the system library dirs its extension modules load more
    from; hidden: site-packages dirs. Computed once, before any sandbox (`_Spawner`)."""
    global _VIEW_SOURCES
    if _VIEW_SOURCES is None:
        import sysconfig

        multiarch = sysconfig.get_config_var("MULTIARCH")
        libs = ["/lib64", "/usr/lib64"] + ([f"/lib/{multiarch}", f"/usr/lib/{multiarch}"] if multiarch else [])
        here = os.path.dirname(os.path.abspath(__file__))  # never the checkout, even if on sys.path
        dirs = [p for p in [*sys.path, *libs] if os.path.isdir(p) and p != here]
        files = [sys.executable]
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ""
                if path.startswith("/") and os.path.isfile(path) and not path.startswith(here + "/"):
                    files.append(path)
        hide = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
        hide.update(os.path.join(d, n) for d in dirs for n in ("site-packages", "dist-packages"))
        _VIEW_SOURCES = sorted(dirs, key=len) + sorted(set(files)), sorted(p for p in hide if os.path.isdir(p))
    return _VIEW_SOURCES


_VIEW_SOURCES: tuple[list[str], list[str]] | None = None


def _mirror(root: str, path: str, depth: int = 0) -> str:
    """Create under `root` the dirs and symlinks that lead to host `path`, so that `path` resolves in
    the view as it does on the host; return `path` with its symlinks resolved (where a bind goes)."""
    parts = [p for p in path.split("/") if p]
    cur = "/"
    for i, part in enumerate(parts):
        nxt = os.path.join(cur, part)
        if os.path.islink(nxt):
            if depth > 32:
                raise OSError(40, f"too many symlinks in {path}")
            if not os.path.lexists(root + nxt):
                os.symlink(os.readlink(nxt), root + nxt)
            target = os.path.normpath(os.path.join(cur, os.readlink(nxt), *parts[i + 1 :]))
            return _mirror(root, target, depth + 1)
        cur = nxt
        if i < len(parts) - 1 and not os.path.isdir(root + cur):
            os.mkdir(root + cur, 0o755)
    return cur


def _mount_point(path: str, like: str) -> None:
    if os.path.isdir(like):
        os.makedirs(path, 0o755, exist_ok=True)
    elif not os.path.exists(path):
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def _python_view(ctypes, libc, proc: bool = False) -> None:
    """Make our (new, private) mount namespace's root a view of nothing but Python.

    The root is a fresh tmpfs holding read-only binds of the interpreter, its standard library and
    the shared libraries it needs (`_view_sources`; site-packages covered by an empty read-only
    tmpfs), the five harmless device nodes, and empty mount points for the sandbox's /proc and its
    private tmpfs (`VIEW_WORKDIRS`); then pivot_root(2) onto it and detach the host's root. The
    project checkout, /tmp, /home, /root, datasets, caches and every path-bound unix socket are not
    in the view at all -- a read-only mount hides no file and does not stop connect(2), a missing
    path does both. Binds are not recursive, so no mount below a bound dir comes along. With
    `proc`, the sandbox's /proc is mounted too (a user namespace may mount a proc only while a
    fully visible one is in its mount namespace, so it must come before the host's root goes).
    """
    _check(ctypes, libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
    sources, hide = _view_sources()
    rdonly = _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
    # sources are opened before the new root covers anything (it is mounted over the host's /tmp)
    held = [(p, os.open(p, os.O_PATH)) for p in sources]
    root = "/tmp" if os.path.isdir("/tmp") else "/mnt"
    ret = libc.mount(b"tmpfs", root.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=755,size=1m,nr_inodes=4096")
    _check(ctypes, ret, "view root tmpfs")
    try:
        bound: list[str] = []
        for path, fd in held:  # dirs (outermost first), then files
            real = _mirror(root, path)
            if any(real == b or real.startswith(b + "/") for b in bound):
                continue
            _mount_point(root + real, f"/proc/self/fd/{fd}")
            ret = libc.mount(f"/proc/self/fd/{fd}".encode(), (root + real).encode(), None, _MS_BIND, None)
            _check(ctypes, ret, f"bind {real}")
            _mount_setattr(ctypes, libc, root + real, 0, rdonly, 0)
            bound.append(real)
        for path in map(os.path.realpath, hide):
            if any(path.startswith(b + "/") for b in bound):
                ret = libc.mount(b"tmpfs", (root + path).encode(), b"tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, b"size=4k")
                _check(ctypes, ret, f"hide {path}")
        for name in _VIEW_DEVICES:
            _mount_point(f"{root}/dev/{name}", f"/dev/{name}")
            _check(ctypes, libc.mount(f"/dev/{name}".encode(), f"{root}/dev/{name}".encode(), None, _MS_BIND, None), name)
        for name in ("proc", VIEW_WORKDIRS.strip("/")):
            os.makedirs(f"{root}/{name}", 0o755, exist_ok=True)
        if proc:  # in a user namespace proc can only be mounted while the host's is still in view
            _mount_proc(ctypes, libc, f"{root}/proc")
    finally:
        for _, fd in held:
            os.close(fd)
    os.chdir(root)
    _check(ctypes, libc.syscall(_SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(ctypes, libc.umount2(b".", _MNT_DETACH), "detach the host root")
    os.chdir("/")
    _mount_setattr(ctypes, libc, "/", 0, rdonly, 0)


def _sandbox_tmpfs(ctypes, libc, path: str, uid: int | None, size: int) -> None:
    """Mount a private tmpfs of `size` bytes at `path` for the jobs' working dirs.

    `path` is the grader's (empty) base dir: the tmpfs hides nothing, keeps every other sandbox's
    files out of reach, caps what the jobs can write in total, and is gone with the mount namespace.
    """
    opts = f"mode=700,size={size},nr_inodes={_TMPFS_INODES}".encode()
    _check(ctypes, libc.mount(b"tmpfs", path.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, opts), "sandbox tmpfs")
    if uid is not None:
        os.chown(path, uid, uid)


class _MemoryGroup:
    """One sandbox's memory cgroup, lent by the spawner: open fds (its supervisor, already in the
    view, cannot open cgroupfs paths) to set its limit, join it and count its OOM kills."""

    _FILES = {
        "cgroup v2": ("memory.max", "memory.swap.max", "memory.events"),
        "cgroup v1": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.oom_control"),
    }

    def __init__(self, kind: str, path: str) -> None:
        os.mkdir(path, 0o700)
        limit, swap, events = self._FILES[kind]
        self.kind, self.path = kind, path
        self.procs = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
        self.limit = os.open(os.path.join(path, limit), os.O_WRONLY)
        self.events = os.open(os.path.join(path, events), os.O_RDONLY)
        try:  # absent where the kernel has no swap accounting
            self.swap: int | None = os.open(os.path.join(path, swap), os.O_WRONLY)
        except OSError:
            self.swap = None

    def fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.procs, self.limit, self.events, self.swap) if fd is not None)

    def join(self, limit: int) -> None:
        """Cap the group's memory (and swap: none in v2, none beyond the cap in v1) at `limit` bytes and
        move the calling process in; everything it forks from then on is charged to the group."""
        swap = b"0" if self.kind == "cgroup v2" else str(limit).encode()
        if self.swap is not None and self.kind == "cgroup v1":
            _write_either_order(self.limit, str(limit).encode(), self.swap, swap)
        else:
            os.pwrite(self.limit, str(limit).encode(), 0)
            if self.swap is not None:
                os.pwrite(self.swap, swap, 0)
        os.pwrite(self.procs, b"0", 0)

    def oom_kills(self) -> int:
        for line in os.pread(self.events, 4096, 0).decode().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def close(self) -> bool:
        """Close our fds and remove the group; False while it still holds processes (try again later)."""
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        for fd in self.fds():
            os.close(fd)
        return True


def _write_either_order(first: int, a: bytes, second: int, b: bytes) -> None:
    """v1 wants memory.limit_in_bytes <= memory.memsw.limit_in_bytes at every moment: write them in
    whichever order keeps that true (lowering: the limit first; raising: memsw first)."""
    try:
        os.pwrite(first, a, 0)
        os.pwrite(second, b, 0)
    except OSError:
        os.pwrite(second, b, 0)
        os.pwrite(first, a, 0)


def _memory_cgroup_dir() -> tuple[str, str] | None:
    """(kind, our own cgroup's dir) where we can create child groups that limit memory: cgroup v2 with
    the memory controller enabled for our children (we try to enable it), else cgroup v1's memory
    hierarchy; None where neither is mounted and writable (then `SandboxLimits.sandbox_memory_bytes`
    is not enforced: each process has RLIMIT_AS, and RLIMIT_NPROC caps how many there are)."""
    try:
        with open("/proc/self/cgroup") as fh:
            own = dict((ctrl, path) for _, ctrl, path in (line.rstrip("\n").split(":", 2) for line in fh))
        mounts: dict[str, str] = {}
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                pre, post = line.split(" - ", 1)
                fstype, _, opts = post.split()[:3]
                if fstype == "cgroup2":
                    mounts.setdefault("cgroup v2", pre.split()[4])
                elif fstype == "cgroup" and "memory" in opts.split(","):
                    mounts.setdefault("cgroup v1", pre.split()[4])
    except (OSError, ValueError):
        return None
    if "cgroup v2" in mounts and "" in own:
        path = mounts["cgroup v2"] + own[""]
        try:
            with open(os.path.join(path, "cgroup.subtree_control"), "r+") as fh:
                if "memory" not in fh.read().split():
                    fh.write("+memory")  # refused (EBUSY) where our own group holds processes
            return "cgroup v2", path
        except OSError:
            pass
    memory = next((path for ctrl, path in own.items() if "memory" in ctrl.split(",")), None)
    if "cgroup v1" in mounts and memory is not None and os.access(mounts["cgroup v1"] + memory, os.W_OK):
        return "cgroup v1", mounts["cgroup v1"] + memory
    return None


class _MemoryGroups:
    """The spawner's pool of memory cgroups, one lent to each running sandbox and reused once that
    sandbox is reaped (like its network namespace), all below a group of this process's own."""

    def __init__(self, enabled: bool) -> None:
        found = _memory_cgroup_dir() if enabled else None
        self.kind, self._base = found if found else ("rlimit", "")
        self._idle: list[_MemoryGroup] = []
        self._lent: dict[int, _MemoryGroup] = {}
        self._count = 0
        if found:
            _remove_stale_groups(self._base)
            try:
                self._base = os.path.join(self._base, f"antipasto-{os.getpid()}")
                os.mkdir(self._base, 0o700)
                if self.kind == "cgroup v2":
                    with open(os.path.join(self._base, "cgroup.subtree_control"), "w") as fh:
                        fh.write("+memory")
            except OSError:
                self.kind = "rlimit"

    def lend(self) -> _MemoryGroup | None:
        if self.kind == "rlimit":
            return None
        if self._idle:
            return self._idle.pop()
        self._count += 1
        try:
            return _MemoryGroup(self.kind, os.path.join(self._base, f"s{self._count}"))
        except OSError:
            return None

    def fds(self) -> list[int]:
        return [fd for group in (*self._idle, *self._lent.values()) for fd in group.fds()]

    def lent(self, pid: int, group: _MemoryGroup) -> None:
        self._lent[pid] = group

    def returned(self, pid: int) -> None:
        group = self._lent.pop(pid, None)
        if group is not None:
            self._idle.append(group)

    def close(self, wait_s: float = 2.0) -> None:
        """Remove every group (retrying while the last sandboxes die) and our own."""
        groups = [*self._idle, *self._lent.values()]
        deadline = time.monotonic() + wait_s
        while groups and time.monotonic() < deadline:
            _reap()
            groups = [g for g in groups if not g.close()]
            if groups:
                time.sleep(0.02)
        if self._base and not groups:
            try:
                os.rmdir(self._base)
            except OSError:
                pass


def _remove_stale_groups(parent: str) -> None:
    """Remove the (empty) groups of fork servers that were killed before they could (their pid is gone)."""
    for name in os.listdir(parent):
        pid = name.removeprefix("antipasto-")
        if name.startswith("antipasto-") and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            stale = os.path.join(parent, name)
            for sub in [os.path.join(stale, n) for n in os.listdir(stale)]:
                if os.path.isdir(sub):
                    try:
                        os.rmdir(sub)
                    except OSError:
                        pass
            try:
                os.rmdir(stale)
            except OSError:
                pass


_CGROUP: _MemoryGroup | None = None  # in a supervisor: the memory cgroup its spawner lent it


def _oom_kills(group: _MemoryGroup | None) -> int:
    return group.oom_kills() if group is not None else 0


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
    ``from __future__`` flags must not leak into the submission). Compiling never runs the code."""
    return compile(code, "<submission>", "exec", dont_inherit=True)


def _run(job: dict, out: _Out, compiled: types.CodeType | None) -> None:
    """Execute one job kind and report a "done" record; exceptions become labels, never escape.
    `compiled`: the job's code as the supervisor compiled it, if it did."""
    kind, code = job["kind"], job["code"]
    try:
        if compiled is None:
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
        os._exit(1)  # like every failure: `sandbox._parse_done` checks the record against the exit status
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


def _prepare(job: dict) -> None:
    """Set, in the supervisor, what its next worker inherits: working dir, environment, argv. A fresh
    process pays a copy-on-write fault for every page this touches; we do only on the first job."""
    os.mkdir(job["workdir"], 0o700)
    os.chdir(job["workdir"])
    _set_environ(job["env"])
    sys.argv = ["solution.py"]  # as if run as `python solution.py` (argparse / unittest.main read it)


def _worker(job: dict, stdout: int, stderr: int, result: int, ready: int, compiled: types.CodeType | None) -> None:
    """Run one job in a forked child of the supervisor (see `_prepare`). Never returns.

    "Ready" (the limits are set, the submission is next) is one byte on a pipe whose write end is
    closed before any submission code runs, so nothing the submission does can write or erase it.
    The result file (fd 3) gets the "done" record, which the grader treats as the submission's
    data (`sandbox._parse_done`): any code in this process can write there.
    """
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    os.dup2(result, 3)
    os.dup2(ready, 4)
    # everything else goes: the status pipe, the lifeline, later jobs' data and other jobs' fds
    os.closerange(5, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    uid = os.getuid()
    os.setresuid(uid, uid, uid)  # give up the supervisor's saved uid (see `_drop_privileges`)
    _set_limits(job["limits"])
    os.write(4, b"r")
    os.close(4)
    _run(job, _Out(3, job["nonce"]), compiled)
    os._exit(0)


# ---------------------------------------------------------------- launcher, supervisor and fork server


def _detach() -> None:
    """Own process group (so it can be killed as one, and no terminal's Ctrl-C reaches it), stdio on
    /dev/null: the first process of a sandbox, whoever forked it. Not setsid(2): a new session is a
    new scheduler autogroup, and moving into one stalls the process for a scheduling period."""
    os.setpgid(0, 0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


class _Spawner:
    """Starts sandboxes: the state of the fork server (or of the one-shot ``--run`` process).

    As root it prepares, once, what sandboxes can share without sharing anything a sandbox can
    change: a mount namespace holding the view of nothing but Python (each supervisor copies it with
    unshare(2) and only adds its /proc and tmpfs), and empty network namespaces, each lent to one
    running sandbox at a time and reused once every process of that sandbox is gone. Creating (and,
    asynchronously, destroying) a network namespace costs the kernel more than the rest of a
    sandbox's setup together; and nothing a sandbox did outlives its processes in one where it had no
    capability: its sockets (abstract unix names included) close with them, while interfaces,
    addresses, routes and sysctls need CAP_NET_ADMIN. The loopback device stays down.

    The fork server also keeps a *spare*: the next sandbox's supervisor, forked ahead of time into
    its fresh namespaces with its /proc mounted, waiting for the request -- so neither the fork nor
    that setup delays a sandbox (`_spare`).
    """

    def __init__(self, lifeline: int, memory_groups: bool = True) -> None:
        self._ctypes, self._libc = _libc()
        self._lifeline = lifeline
        self._root = os.geteuid() == 0
        kinds = ("mnt", "net", "pid") if self._root else ()
        self._home = {kind: os.open(f"/proc/self/ns/{kind}", os.O_RDONLY) for kind in kinds}  # where we started
        _view_sources()  # once, here: every sandbox's view (or the spawner's one) is built from it
        self._view = self._make_view() if self._root else None
        self._idle_nets: list[int] = []
        self._lent: dict[int, int] = {}  # sandbox pid -> its network namespace
        self._groups = _MemoryGroups(enabled=self._root and memory_groups)
        self._group: _MemoryGroup | None = None  # for the next child (chosen by `_place`)
        self._spares: dict[tuple, tuple[int, socket.socket]] = {}  # isolation -> (pid, socket to it)

    def _make_view(self) -> int | None:
        ctypes, libc = self._ctypes, self._libc
        try:
            _check(ctypes, libc.unshare(_CLONE_NEWNS), "unshare(mnt)")
        except OSError:
            return None
        view = os.open("/proc/self/ns/mnt", os.O_RDONLY)  # the view has no /proc of its own yet
        try:
            _python_view(ctypes, libc)
            return view
        except OSError:
            os.close(view)
            return None
        finally:
            _check(ctypes, libc.setns(self._home["mnt"], _CLONE_NEWNS), "setns(mnt)")

    def spawn(self, request: bytes, header: dict, fds: list[int], close: tuple[int, ...] = ()) -> int:
        """Start one sandbox; the pid of its first process.

        As root that is the supervisor itself: pid 1 of a fresh pid namespace, in a network namespace
        of its own and, for the view, in the view's mount namespace (which it copies) --
        the spare if one is waiting. In a user namespace it is a launcher that creates the
        namespaces and forks the supervisor. `request`: the sandbox's JSON `header`; `fds`: the
        status pipe, one job file per job, then stdout / stderr pipes and result file per job;
        `close`: our own fds no sandbox may keep.
        """
        iso = header["isolation"]
        spare = self._spares.pop(_isolation_key(iso), None)
        if spare is not None:
            pid, sock = spare
            try:
                socket.send_fds(sock, [request], fds)
            except OSError:  # it died: start one the slow way
                pid = -1
            sock.close()
            if pid > 0:
                for fd in fds:
                    os.close(fd)
                return pid
        isolate = iso["ns"] and not iso["userns"]
        net, ready = self._place_or_none(isolate, iso["mounts"])
        pid = self._fork(net, close)
        if pid == 0:
            try:
                if iso["userns"]:
                    _launcher(header, fds, self._lifeline)
                _supervisor(header, fds, self._lifeline, ready)
            finally:
                os._exit(73)
        for fd in fds:
            os.close(fd)
        return pid

    def prepare_spare(self, iso: dict, close: tuple[int, ...] = ()) -> None:
        """Fork a spare for sandboxes isolated like `iso`, unless one is waiting (root only)."""
        key = _isolation_key(iso)
        if not (self._root and iso["ns"] and not iso["userns"]) or key in self._spares:
            return
        net, ready = self._place_or_none(True, iso["mounts"])
        if not ready:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = self._fork(net, (*close, ours.fileno()))
        if pid == 0:
            try:
                _spare(iso, theirs, self._lifeline)
            finally:
                os._exit(74)
        theirs.close()
        self._spares[key] = (pid, ours)

    def _place_or_none(self, isolate: bool, view: bool) -> tuple[int | None, bool]:
        """(lent network namespace, whether the next child starts where isolation asks). Without
        root we never move: a launcher makes the namespaces, or there are none."""
        if not self._root:
            return None, True
        try:
            return self._place(isolate, view), True
        except OSError:
            return None, False  # the supervisor reports it

    def _fork(self, net: int | None, close: tuple[int, ...]) -> int:
        """Fork; the child keeps none of our fds (namespaces, other sandboxes' sockets and memory
        cgroups, `close`) but those of the memory cgroup `_place` chose for it."""
        try:
            pid = os.fork()
        except OSError:
            if net is not None:
                self._idle_nets.append(net)
            raise
        group, self._group = self._group, None
        if pid == 0:
            global _CGROUP
            _CGROUP = group
            spares = [sock.fileno() for _, sock in self._spares.values()]
            others = (*self._idle_nets, *self._lent.values(), *spares, *self._groups.fds())
            for fd in (*close, *self._home.values(), *others):
                os.close(fd)
            for fd in (self._view, net):
                if fd is not None:
                    os.close(fd)
            return pid
        if net is not None:
            self._lent[pid] = net
        if group is not None:
            self._groups.lent(pid, group)
        return pid

    def _place(self, isolate: bool, view: bool) -> int | None:
        """Stand where the next child must start. Isolated: the view's mount namespace (with `view`,
        else the host's), an unused network namespace, which is returned, and a fresh pid namespace.
        Otherwise: back where we started (never in a namespace lent to another sandbox)."""
        ctypes, libc = self._ctypes, self._libc
        if view and self._view is None:
            raise OSError("no view of nothing but Python on this machine")
        # the host's mount namespace first: the view has no /proc to name a new network namespace by,
        # and no cgroup fs to make a memory cgroup in
        _check(ctypes, libc.setns(self._home["mnt"], _CLONE_NEWNS), "setns(mnt)")
        _check(ctypes, libc.setns(self._home["pid"], _CLONE_NEWPID), "setns(pid)")
        if self._group is None:
            self._group = self._groups.lend()
        if not isolate:
            _check(ctypes, libc.setns(self._home["net"], _CLONE_NEWNET), "setns(net)")
            return None
        if self._idle_nets:
            net = self._idle_nets.pop()
            if libc.setns(net, _CLONE_NEWNET) != 0:
                os.close(net)
                raise OSError(ctypes.get_errno(), "setns(net)")
        else:
            _check(ctypes, libc.unshare(_CLONE_NEWNET), "unshare(net)")
            net = os.open("/proc/self/ns/net", os.O_RDONLY)
        if libc.unshare(_CLONE_NEWPID) != 0 or (view and libc.setns(self._view, _CLONE_NEWNS) != 0):
            self._idle_nets.append(net)
            raise OSError(ctypes.get_errno(), "unshare(pid) / setns(view)")
        return net

    def reaped(self, pid: int) -> None:
        """A sandbox's first process was reaped: as pid 1 it went only after every other one."""
        net = self._lent.pop(pid, None)
        if net is not None:
            self._idle_nets.append(net)
        self._groups.returned(pid)
        for key, (spare, sock) in list(self._spares.items()):
            if spare == pid:
                sock.close()
                del self._spares[key]


    def close(self) -> None:
        """Remove the memory cgroups once the last sandboxes are gone (from where they are visible)."""
        for _, sock in self._spares.values():
            sock.close()  # a spare reads EOF and exits
        self._spares.clear()
        if self._root:
            self._libc.setns(self._home["mnt"], _CLONE_NEWNS)
        self._groups.close()


def _isolation_key(iso: dict) -> tuple:
    return iso["ns"], iso["mounts"], iso["userns"]


def _spare(iso: dict, sock: socket.socket, lifeline: int) -> None:
    """A supervisor forked ahead of its request: enters its namespaces, then waits on `sock` for the
    sandbox's header and fds (EOF: the fork server is gone). Never returns."""
    try:
        _enter(iso, ready=True)
    except BaseException:
        os._exit(75)  # the next request finds it gone and starts its sandbox the slow way
    msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 253)
    if not msg:
        os._exit(0)
    sock.close()
    _supervisor(json.loads(msg), fds, lifeline, ready=True, entered=True)


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
        _supervisor(header, fds, lifeline, ready=True)
    for fd in fds:  # the pipes must close when the supervisor ends, not when we do
        os.close(fd)
    os.waitpid(child, 0)
    os._exit(0)


def _supervisor(header: dict, fds: list[int], lifeline: int, ready: bool, entered: bool = False) -> None:
    """The sandbox's pid 1: isolate, then run the jobs one after another (see the module doc). Never
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


def _readable(fd: int) -> bool:
    """Whether the worker wrote its byte on the ready pipe (it closed its end before any submission code)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1) == b"r"
    except BlockingIOError:
        return False


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


def _mount_proc(ctypes, libc, path: str) -> None:
    ret = libc.mount(b"proc", path.encode(), b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
    _check(ctypes, ret, f"mount {path}")


def _seal(header: dict) -> None:
    """The rest of the supervisor's setup: the sandbox tmpfs, then no privileges left."""
    ctypes, libc = _libc()
    iso = header["isolation"]
    if iso["mounts"]:
        _sandbox_tmpfs(ctypes, libc, header["dir"], iso["uid"], header["disk"])
    if _CGROUP is not None:
        _CGROUP.join(header["memory"])
    _drop_privileges(ctypes, libc, iso)


def _set_environ(env: dict[str, str]) -> None:
    """Make the environment exactly `env`, touching only what differs (os.environ is slow to rebuild)."""
    for key in [key for key in os.environ if key not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _read_job(fd: int) -> dict:
    size = os.fstat(fd).st_size
    data = b""
    while len(data) < size and (chunk := os.pread(fd, size - len(data), len(data))):
        data += chunk
    os.close(fd)
    return json.loads(data)


# Standard modules submissions commonly import (typing alone takes a fresh worker 3-9 ms): the fork
# server imports them once and every worker finds them in sys.modules. Pure modules only -- no
# process-wide state a worker would inherit (random's seed, say) -- and none heavy to fork.
_PRELOAD = ("bisect", "collections", "functools", "heapq", "itertools", "math", "operator", "re", "string", "typing")


def _warm() -> None:
    """Take the first-call costs of the hot paths once, in the fork server, instead of in every fork:
    the first compile(), json and deepcopy calls and ctypes' function and array types cost a few ms,
    and so do the imports in `_PRELOAD`."""
    for name in _PRELOAD:
        __import__(name)
    ctypes, libc = _libc()
    for name in ("mount", "prctl", "syscall", "unshare", "setns", "capset"):
        getattr(libc, name)
    for ctype, n in ((ctypes.c_uint64, 4), (ctypes.c_uint32, 2), (ctypes.c_uint32, 6)):
        ctype * n  # ctypes caches array types
    compiled = compile_submission("class Solution:\n    def f(self, x):\n        return [x, {'a': 1.5}]\n")
    ns = _module("__warm__")
    exec(compiled, ns)
    result = ns["Solution"]().f(*copy.deepcopy(json.loads(json.dumps([[1, "s", None, True]]))))
    encode_canonical(result)
    del sys.modules["__warm__"]
    gc.collect()
    gc.freeze()  # forks never touch (copy) the server's own objects during a collection
    if hasattr(libc, "malloc_trim"):  # glibc: hand the heap left over from imports back (every fork copies it)
        libc.malloc_trim(0)


def _serve(sock_fd: int, lifeline: int) -> None:
    """Fork server: one sandbox per request, so no sandbox pays for interpreter start-up, imports or
    the setup sandboxes can share (`_Spawner`).

    A request is the sandbox's JSON header plus its fds (see `_Spawner.spawn`); the reply is the pid
    of the sandbox's first process with a pidfd (opened before it can be reaped, so it can never name
    a recycled pid): killing that process ends the whole sandbox. Finished sandboxes are reaped
    between requests. EOF on the socket ends the server.
    """
    _warm()
    spawner = _Spawner(lifeline)
    sock = socket.socket(fileno=sock_fd)
    while True:
        for pid in _reap():
            spawner.reaped(pid)
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 253)
        if not msg:
            spawner.close()
            os._exit(0)
        header = json.loads(msg)
        pid = spawner.spawn(msg, header, fds, close=(sock_fd,))
        pidfd = os.pidfd_open(pid)
        socket.send_fds(sock, [str(pid).encode()], [pidfd])
        os.close(pidfd)
        spawner.prepare_spare(header["isolation"], close=(sock_fd,))  # after the reply: off this request's path


def _reap() -> list[int]:
    pids = []
    try:
        while pid := os.waitpid(-1, os.WNOHANG)[0]:
            pids.append(pid)
    except ChildProcessError:
        pass
    return pids


def main(argv: list[str]) -> None:
    """``--serve SOCK_FD LIFELINE_FD`` (fork server) or ``--run HEADER FD,FD,... LIFELINE_FD`` (one sandbox)."""
    # no Python handler anywhere in a sandbox: as pid 1 the supervisor then ignores every signal sent from inside
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if argv[1] == "--serve":
        _serve(int(argv[2]), int(argv[3]))
    elif argv[1] == "--run":
        request = argv[2].encode()
        spawner = _Spawner(int(argv[4]), memory_groups=False)  # the grader SIGKILLs us: no one would remove them
        os.waitpid(spawner.spawn(request, json.loads(request), [int(fd) for fd in argv[3].split(",")]), 0)
    else:
        raise SystemExit(f"usage: harness.py --serve SOCK LIFELINE | --run HEADER FDS LIFELINE, got {argv[1:]}")


if __name__ == "__main__":
    main(sys.argv)
