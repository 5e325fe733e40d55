"""Memory cgroups (trusted): the spawner lends each sandbox one, which bounds all its processes and its
tmpfs together and counts its OOM kills."""

from __future__ import annotations

import os
import time

from .kernel import _reap


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
