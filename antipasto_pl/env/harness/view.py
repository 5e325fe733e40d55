"""The view of nothing but Python: the mount namespace a sandbox's supervisor and workers see (trusted).

It holds what this interpreter needs and nothing of the checkout -- not even this package: every
harness module is imported before a sandbox enters its view (see `__main__`).
"""

from __future__ import annotations

import os
import sys

from .kernel import (
    _MOUNT_ATTR_NODEV,
    _MOUNT_ATTR_NOSUID,
    _MOUNT_ATTR_RDONLY,
    _MS_BIND,
    _MS_NODEV,
    _MS_NOSUID,
    _MS_PRIVATE,
    _MS_RDONLY,
    _MS_REC,
    _check,
    _mount_proc,
    _mount_setattr,
)

_TMPFS_INODES = 1 << 14  # files + dirs all jobs of one sandbox may create
VIEW_WORKDIRS = "/sandbox"  # inside the view: where each sandbox mounts its private tmpfs for its jobs' dirs
_VIEW_DEVICES = ("null", "zero", "full", "random", "urandom")
_MNT_DETACH = 2
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, 41)  # 41: the generic table


def _view_sources() -> tuple[list[str], list[str]]:
    """(host paths the view binds read-only, paths to hide below them): the interpreter, its
    standard library (``sys.path`` of a ``-I -S`` interpreter: no site-packages), the shared
    libraries this process has mapped and the system library dirs its extension modules load more
    from; hidden: site-packages dirs. Computed once, before any sandbox (`spawner._Spawner`)."""
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
