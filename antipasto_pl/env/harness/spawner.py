"""The spawner (trusted): starts sandboxes, in the fork server or in the one-shot ``--run`` process.

A sandbox's first process is its supervisor, forked straight into its namespaces (as root), forked
ahead of its request (a *spare*, as root), or a *launcher* that makes the namespaces from inside a user
namespace and forks the supervisor (without root).
"""

from __future__ import annotations

import json
import os
import signal
import socket

from . import supervisor
from .kernel import (
    _CLONE_NEWIPC,
    _CLONE_NEWNET,
    _CLONE_NEWNS,
    _CLONE_NEWPID,
    _CLONE_NEWUSER,
    _CLONE_NEWUTS,
    _PR_SET_PDEATHSIG,
    _check,
    _detach,
    _libc,
)
from .memory import _MemoryGroup, _MemoryGroups
from .records import _Out
from .supervisor import _enter, _supervisor
from .view import _python_view, _view_sources


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
            supervisor._CGROUP = group
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
