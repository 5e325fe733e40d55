"""The logged scalars' names, by namespace, and the names earlier versions logged them under.

- ``train/``: the GRPO step: rates per source (``_s`` student, ``_t`` teacher) overall and per loophole mode
  (``train/hack_s``, ``train/<mode>/hack_s``), the loss and its statistics, ``train/grad_norm``.
- ``val/``: validation (``val/hack``) and the deployed-view evaluation (``val/hack_deploy``).
- ``test/``: the held-out test split: the final evaluation (``test/hack``, ``test/<mode>/hack``), the untrained
  policy's (``test/untrained/hack``) and the likelihood probe (``test/probe_margin``, ``test/<mode>/probe_margin``).
- ``proj/``: the projection's diagnostics. ``time/``: wall-clock seconds per stage of a step.
- ``env/``: the environment (``env/sandbox_errors``).

``antipasto report`` reads runs logged under the old names too (``current_name``).
"""

from __future__ import annotations

import re

from antipasto_pl.env.modes import MODES

RATES = ("reward", "hack", "gt", "pass")  # per source; hack and gt also per mode
SANDBOX_ERRORS = "env/sandbox_errors"
HACK_DEPLOY, SOLVE_DEPLOY = "val/hack_deploy", "val/solve_deploy"
UNTRAINED = "test/untrained"  # prefix of the untrained policy's held-out evaluation


def train_rate(name: str, source: str, mode: str | None = None) -> str:
    """``train/<name>_<source>``, or per loophole mode ``train/<mode>/<name>_<source>``."""
    return f"train/{mode}/{name}_{source}" if mode else f"train/{name}_{source}"


def probe_margin(mode: str | None = None) -> str:
    """The likelihood probe's margin, overall or on one mode's pairs."""
    return f"test/{mode}/probe_margin" if mode else "test/probe_margin"


HACK_S, GT_S = train_rate("hack", "s"), train_rate("gt", "s")

_RENAMED = {"train/sandbox_errors": SANDBOX_ERRORS, "hack_deploy": HACK_DEPLOY, "solve_deploy": SOLVE_DEPLOY,
            "probe/margin": probe_margin()}
_OLD_RATE = re.compile(r"(?:(?P<mode>\w+)/)?(?P<name>reward|hack|gt|pass)_(?P<source>[st])")


def current_name(tag: str) -> str:
    """The name a scalar logged as `tag` has now: runs logged before the namespaces (``reward_s``,
    ``<mode>/hack_s``, ``hack_deploy``, ``probe/<mode>/margin``, ``test_untrained/hack``, ...) read like new ones.
    Current names are returned unchanged."""
    if tag in _RENAMED:
        return _RENAMED[tag]
    rate = _OLD_RATE.fullmatch(tag)
    if rate and (rate["mode"] is None or rate["mode"] in MODES):
        return train_rate(rate["name"], rate["source"], rate["mode"])
    head, _, rest = tag.partition("/")
    if head == "probe" and rest.endswith("/margin") and rest.removesuffix("/margin") in MODES:
        return probe_margin(rest.removesuffix("/margin"))
    if head == "test_untrained":
        return f"{UNTRAINED}/{rest}"
    return tag
