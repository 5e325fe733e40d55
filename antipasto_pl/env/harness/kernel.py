"""The kernel calls the isolation makes: the Linux constants it needs, libc through ctypes, mounts, and the
process-group and reaping helpers of a sandbox's first process and of the fork server."""

from __future__ import annotations

import os

_AT_FDCWD = -100
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


def _mount_proc(ctypes, libc, path: str) -> None:
    ret = libc.mount(b"proc", path.encode(), b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
    _check(ctypes, ret, f"mount {path}")


def _detach() -> None:
    """Own process group (so it can be killed as one, and no terminal's Ctrl-C reaches it), stdio on
    /dev/null: the first process of a sandbox, whoever forked it. Not setsid(2): a new session is a
    new scheduler autogroup, and moving into one stalls the process for a scheduling period."""
    os.setpgid(0, 0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _reap() -> list[int]:
    pids = []
    try:
        while pid := os.waitpid(-1, os.WNOHANG)[0]:
            pids.append(pid)
    except ChildProcessError:
        pass
    return pids
