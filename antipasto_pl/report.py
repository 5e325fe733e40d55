"""`antipasto report`: the experiment's headline tables and figures, from the runs' TensorBoard logs.

Headline numbers (DESIGN section 8): the student's hack rate (``hack_s``) and oracle pass rate (``gt_s``) as
the mean over each run's last N logged steps, mean +- std over seeds per arm, and the paired difference against
the same-seed vanilla run (seeds share problems, pool and V, so pairing removes their shared noise). For the
weak-detector runs (held-out mode m): ``<m>/hack_s`` and ``<m>/gt_s`` (the oracle pass rate on m's prompts),
vanilla vs the other arms run the same way. The statistics are small pure functions; loading and plotting
build on them, and ``notebooks/results.ipynb`` reuses the same functions.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from antipasto_pl.experiment import DEFAULT_ARMS, RUN_FILE

Series = dict[int, float]  # step -> value
HACK, GT, CIN_S, CIN_T, NULL = "hack_s", "gt_s", "proj/cin_s", "proj/cin_t", "proj/null"
REPORT_FILE, HACK_PASS_PNG, CIN_PNG = "report.md", "hack_pass.png", "cin.png"


@dataclass
class Run:
    """One run of an experiment: its place in the matrix (from ``run.json``) and its scalars by tag."""

    name: str
    arm: str
    seed: int
    holdout_mode: str | None
    scalars: dict[str, Series] = field(default_factory=dict)


# --- statistics (pure) -------------------------------------------------------------------------------------------


def last_n_mean(values: Sequence[float], n: int) -> float:
    """Mean of the last `n` values (all of them when fewer); NaN when there are none."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tail = list(values)[-n:]
    return sum(tail) / len(tail) if tail else math.nan


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1); std is NaN for a single value, both are NaN for none."""
    values = list(values)
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def paired_differences(treated: dict[int, float], baseline: dict[int, float]) -> dict[int, float]:
    """Per-seed ``treated - baseline`` over the seeds both have (unpaired seeds are left out, not imputed)."""
    return {seed: treated[seed] - baseline[seed] for seed in sorted(treated.keys() & baseline.keys())}


def seed_band(series: Sequence[Series]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, mean, min and max over the seeds that logged each step (runs of unequal length still plot)."""
    steps = sorted(set().union(*series)) if series else []
    columns = [[s[step] for s in series if step in s] for step in steps]
    return steps, [statistics.fmean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def merge_versions(pieces: Sequence[Series]) -> Series:
    """One series from the pieces of a run resumed into several log versions: by step, a later piece wins
    (a resumed run repeats the steps after its last checkpoint)."""
    merged: Series = {}
    for piece in pieces:
        merged.update(piece)
    return dict(sorted(merged.items()))


def format_mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` for a table cell; a single seed shows its value alone, no seeds show ``n/a``."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


# --- loading -----------------------------------------------------------------------------------------------------


def first_steps(series: Series, steps: int | None) -> Series:
    """The points of the first `steps` optimizer steps (0 .. steps-1); all of them when `steps` is None."""
    return dict(series) if steps is None else {step: value for step, value in series.items() if step < steps}


def read_scalars(run_dir: str | Path, steps: int | None = None) -> dict[str, Series]:
    """Every scalar tag of a run, merged over its ``lightning_logs/version_N`` directories in version order,
    cut to the first `steps` steps (None: all)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted((Path(run_dir) / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    pieces: dict[str, list[Series]] = {}
    for version in versions:
        events = EventAccumulator(str(version), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            pieces.setdefault(tag, []).append({e.step: e.value for e in events.Scalars(tag)})
    return {tag: first_steps(merge_versions(parts), steps) for tag, parts in pieces.items()}


def load_experiment(experiment_dir: str | Path, steps: int | None = None) -> list[Run]:
    """The runs of an `antipasto experiment` directory (subdirectories with a ``run.json``), with their scalars
    (only the first `steps` optimizer steps of each, when given)."""
    root = Path(experiment_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"experiment directory {root} not found")
    runs = []
    for meta_file in sorted(root.glob(f"*/{RUN_FILE}")):
        meta = json.loads(meta_file.read_text())
        runs.append(Run(meta["name"], meta["arm"], meta["seed"], meta["holdout_mode"], read_scalars(meta_file.parent, steps)))
    if not runs:
        raise FileNotFoundError(f"no runs (subdirectories with {RUN_FILE}) in {root}")
    return runs


# --- aggregation -------------------------------------------------------------------------------------------------


def arm_order(arms: set[str]) -> list[str]:
    """Vanilla first, then the matrix's default order, then any other arm alphabetically."""
    rank = {arm: i for i, arm in enumerate(DEFAULT_ARMS)}
    return sorted(arms, key=lambda a: (a != "vanilla", rank.get(a, len(rank)), a))


def final_values(runs: Sequence[Run], tag: str, last_n: int) -> dict[tuple[str, str | None], dict[int, float]]:
    """(arm, held-out mode) -> {seed: last-n mean of `tag`}; runs that never logged `tag` are left out."""
    table: dict[tuple[str, str | None], dict[int, float]] = {}
    for run in runs:
        series = run.scalars.get(tag)
        if series:
            table.setdefault((run.arm, run.holdout_mode), {})[run.seed] = last_n_mean(list(series.values()), last_n)
    return table


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _paired_cell(treated: dict[int, float], baseline: dict[int, float]) -> str:
    """Mean ± std of the same-seed differences ``treated - baseline``."""
    return format_mean_std(list(paired_differences(treated, baseline).values()))


def markdown_report(runs: Sequence[Run], last_n: int = 5) -> str:
    """The three tables (per arm; paired vs vanilla; weak detector per held-out mode) as Markdown."""
    main = [r for r in runs if r.holdout_mode is None]
    hack, gt = final_values(main, HACK, last_n), final_values(main, GT, last_n)
    arms = arm_order({r.arm for r in main})
    parts = [f"# Experiment report\n\nStudent rates, mean of each run's last {last_n} logged steps; "
             "mean ± std (n-1) over seeds."]
    if arms:
        rows = [[arm, str(len(hack.get((arm, None), {}))), format_mean_std(list(hack.get((arm, None), {}).values())),
                 format_mean_std(list(gt.get((arm, None), {}).values()))] for arm in arms]
        parts.append("## Per arm\n\n" + _table(["arm", "seeds", "hack rate (hack_s)", "gt pass rate (gt_s)"], rows))
    base = ("vanilla", None)
    if base in hack and len(arms) > 1:
        rows = []
        for arm in arms[1:]:
            arm_hack, arm_gt = hack.get((arm, None), {}), gt.get((arm, None), {})
            rows.append([arm, str(len(paired_differences(arm_hack, hack[base]))), _paired_cell(arm_hack, hack[base]),
                         _paired_cell(arm_gt, gt.get(base, {}))])
        parts.append("## Paired difference against same-seed vanilla\n\n"
                     + _table(["arm", "paired seeds", "Δ hack rate", "Δ gt pass rate"], rows))
    lomo = [r for r in runs if r.holdout_mode is not None]
    if lomo:
        rows = []
        for mode in sorted({r.holdout_mode for r in lomo}):
            of_mode = [r for r in lomo if r.holdout_mode == mode]
            m_hack = final_values(of_mode, f"{mode}/hack_s", last_n)
            m_pass = final_values(of_mode, f"{mode}/gt_s", last_n)
            for arm in arm_order({r.arm for r in of_mode}):
                key, ref = (arm, mode), ("vanilla", mode)
                hacks, passes = m_hack.get(key, {}), m_pass.get(key, {})
                diffs = ["–", "–"]
                if arm != "vanilla" and ref in m_hack:
                    diffs = [_paired_cell(hacks, m_hack[ref]), _paired_cell(passes, m_pass.get(ref, {}))]
                rows.append([mode, arm, str(len(hacks)), format_mean_std(list(hacks.values())),
                             format_mean_std(list(passes.values())), *diffs])
        parts.append(
            "## Weak detector: leave one mode out\n\nV extracted without the held-out mode's pairs and no teacher "
            f"samples of it; rates on the held-out mode's prompts (mean of the last {last_n} steps that sampled it)."
            "\n\n" + _table(["held-out mode", "arm", "seeds", "hack on mode", "gt pass on mode", "Δ hack vs vanilla",
                             "Δ gt pass vs vanilla"], rows))
    return "\n\n".join(parts) + "\n"


# --- figures -----------------------------------------------------------------------------------------------------


def _plot_tags(
    runs: Sequence[Run], tags: Sequence[str], titles: Sequence[str], null_tag: str | None, rates: bool
) -> Figure:
    """One panel per tag: per arm of the main matrix, the mean over seeds and a min-max band.

    A bare Figure (no pyplot) renders with Agg when saved and inline in a notebook, and leaves no global state.
    """
    figure = Figure(figsize=(5.5 * len(tags), 4), layout="constrained")
    main = [r for r in runs if r.holdout_mode is None]
    for ax, tag, title in zip(figure.subplots(1, len(tags), squeeze=False)[0], tags, titles):
        for arm in arm_order({r.arm for r in main}):
            series = [r.scalars[tag] for r in main if r.arm == arm and r.scalars.get(tag)]
            if not series:
                continue
            steps, mean, low, high = seed_band(series)
            (line,) = ax.plot(steps, mean, label=f"{arm} (n={len(series)})")
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        nulls = [r.scalars[null_tag] for r in main if null_tag and r.scalars.get(null_tag)]
        if nulls:
            steps, mean, _, _ = seed_band(nulls)
            ax.plot(steps, mean, color="gray", linestyle=":", label="null (random V)")
        ax.set(title=title, xlabel="step")
        if rates:
            ax.set_ylim(-0.03, 1.03)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    return figure


def plot_hack_pass(runs: Sequence[Run]) -> Figure:
    """Student hack rate and oracle pass rate vs step per arm (mean over seeds, band = min-max)."""
    return _plot_tags(runs, [HACK, GT], ["student hack rate (hack_s)", "student gt pass rate (gt_s)"], None, True)


def plot_cin(runs: Sequence[Run]) -> Figure:
    """Hack-ward share of the student and the teacher gradient (cin_s, cin_t) vs step per arm, with the null."""
    return _plot_tags(runs, [CIN_S, CIN_T], ["student gradient cin_s", "teacher gradient cin_t"], NULL, False)


def report_command(experiment_dir: str, out: str | None = None, last_n: int = 5, steps: int | None = None) -> Path:
    """Summarise an `antipasto experiment` directory: Markdown tables and PNG figures from the runs' logs.

    Writes ``report.md`` (also printed): per arm, the student hack rate and gt pass rate (mean of each run's
    last `last_n` steps, mean ± std over seeds); their paired difference against the same-seed vanilla run;
    and, for weak-detector runs, hack and pass on each held-out mode. Figures: ``hack_pass.png`` (hack_s and
    gt_s vs step, per arm, band over seeds) and ``cin.png`` (cin_s and cin_t vs step, per arm).

    Args:
        experiment_dir: the `--out` directory of `antipasto experiment`.
        out: where to write report.md and the figures (default: `experiment_dir`).
        last_n: steps averaged at the end of each run for the tables.
        steps: use only each run's first `steps` optimizer steps, so runs that went on longer (an extended
            run) are compared with the others at the same step (default: every logged step).
    """
    runs = load_experiment(experiment_dir, steps)
    target = Path(out) if out is not None else Path(experiment_dir)
    target.mkdir(parents=True, exist_ok=True)
    text = markdown_report(runs, last_n)
    (target / REPORT_FILE).write_text(text, encoding="utf-8")
    plot_hack_pass(runs).savefig(target / HACK_PASS_PNG, dpi=120)
    plot_cin(runs).savefig(target / CIN_PNG, dpi=120)
    print(text)
    print(f"written: {target / REPORT_FILE}, {target / HACK_PASS_PNG}, {target / CIN_PNG}")
    return target / REPORT_FILE
