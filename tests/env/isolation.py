"""Observing what a sandboxed run left behind: processes by command line, files by content."""

from __future__ import annotations

import os
import time


def cmdlines() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as fh:
                    out[int(name)] = fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
    return out


def leftovers(*tokens: str, settle_s: float = 1.0) -> list[str]:
    """Processes whose command line carries any token, after giving SIGKILLed ones time to vanish."""
    deadline = time.monotonic() + settle_s
    while True:
        found = [f"{pid}: {cmd}" for pid, cmd in cmdlines().items() if any(t in cmd for t in tokens)]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def snapshot(root: str) -> dict[str, tuple[int, bytes]]:
    snap = {}
    for name in sorted(os.listdir(root)):
        p = os.path.join(root, name)
        with open(p, "rb") as fh:
            snap[name] = (os.stat(p).st_mode, fh.read())
    return snap
