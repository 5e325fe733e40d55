"""`antipasto`: LightningCLI for fit/validate/test/predict, plus project subcommands.

Extra subcommands (`antipasto build-pool ...`, ...) are plain typed functions turned
into CLIs by jsonargparse, registered in ``EXTRA_COMMANDS`` as "module:function".
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

EXTRA_COMMANDS: dict[str, str] = {}


def _load(target: str) -> Callable:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in EXTRA_COMMANDS:
        from jsonargparse import auto_cli

        auto_cli(_load(EXTRA_COMMANDS[args[0]]), args=args[1:], as_positional=False)
        return
    raise SystemExit("LightningCLI not wired yet")


if __name__ == "__main__":
    main()
