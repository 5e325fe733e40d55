"""Record channels: JSON lines a worker or a supervisor writes (who can write which: see the package doc)."""

from __future__ import annotations

import json
import os


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
