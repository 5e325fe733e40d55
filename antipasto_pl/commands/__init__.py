"""The project subcommands of ``antipasto`` (next to Lightning's fit / validate / test / predict).

Each module holds one command as a plain typed function whose signature and docstring become its command line
(``antipasto_pl.cli`` registers them). Commands sit on top of the library: they may import any module, and no
library module imports them or the CLI.
"""

from __future__ import annotations

from pathlib import Path

# The presets, arms and experiment overlays, installed with the package (the repository's configs/ links here).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def resolve_config(path: str) -> str:
    """`path` if it is a file; else the installed config it names (``configs/cpu.yaml``, ``arms/erase.yaml``,
    ``cpu``), so the README's commands work from any directory; else `path` unchanged (to be reported missing)."""
    if Path(path).is_file():
        return path
    name = path.removeprefix("configs/")
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    return path
