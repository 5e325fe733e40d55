"""The harness's two modes (`main`, trusted): the fork server, or one sandbox where no fork server is possible."""

from __future__ import annotations

import copy
import gc
import json
import os
import signal
import socket
import sys

from .canonical import encode_canonical
from .kernel import _libc, _reap
from .spawner import _Spawner
from .worker import _module, compile_submission

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
        raise SystemExit(f"usage: harness/__main__.py --serve SOCK LIFELINE | --run HEADER FDS LIFELINE, got {argv[1:]}")
