"""Small helpers shared by the benchmarks (timing, tables, memory). Not part of the package."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from antipasto_pl.cli import LIGHTNING_NOISE

SMOLLM2 = "smollm2-135m-instruct"

# Intentional choices Lightning warns about on every run (antipasto_pl.cli's), and the short benchmark fits'.
for _message in (*LIGHTNING_NOISE, "The number of training batches", ".*does not have many workers.*",
                 ".*is deprecated.*"):
    warnings.filterwarnings("ignore", message=_message)


def quiet_logs() -> None:
    """Keep benchmark output to the tables: no weight-loading progress bars, no Lightning banners."""
    import logging

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - older transformers
        pass
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Add the shared ``--threads`` option, parse, and apply it before any torch work."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, one per core); on a machine shared "
                             "with other jobs, 1 avoids OpenMP threads spinning against each other")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def machine_line() -> str:
    """One line naming what the numbers were taken on."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load average {load:.2f}")


def timed(fn: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
    """``fn`` wrapped so that every call's wall time is appended to ``into``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - start)

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_s(values: Sequence[float]) -> str:
    """``median s (min-max, n)`` of a list of seconds."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f} s (n=1)"
    return f"{median(values):.3f} s ({min(values):.3f}-{max(values):.3f}, n={len(values)})"


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain fixed-width table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    return f"{'meets' if ok else 'MISSES'} target {'>=' if higher_is_better else '<='} {target:g}"


# --- memory -------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident set size (MiB)."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import psutil  # pragma: no cover - non-Linux

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process since start or the last ``reset_peak_rss`` (MiB)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (Linux: write 5 to /proc/self/clear_refs). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
