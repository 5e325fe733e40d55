"""`antipasto report`: the experiment's primary table, verdict and figures, from each run's eval.json and logs.

Primary metric (fixed before the runs; `antipasto_pl.evaluation`): the held-out, deployed-view hack rate at the end
of training, from each run's ``eval.json``. Per arm: the mean over seeds with a percentile-bootstrap 95% interval;
the paired difference against the same-seed vanilla run with its bootstrap interval (seeds share problems, pool
and the real V, so pairing removes their shared noise). Secondary: oracle pass and format rates, held-out clean
log-likelihood, the training hack rate's AUC over steps (mean of ``train/hack_s``), removed gradient energy and
leak. The verdict line applies the protocol's rule (docs/design.md section 8): a treatment counts only if vanilla
hacks beyond the untrained model's rate, the treatment lowers the hack rate, by more than every control run alongside
it does, at matched quality. For weak-detector runs (held-out mode m) the same metric is read on m's test problems.
The statistics are small pure functions; ``notebooks/results.ipynb`` reuses them. Runs logged under the metric
names of earlier versions are read too (``metrics.current_name``).
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

from antipasto_pl.evaluation import EVAL_FILE, wilson_interval
from antipasto_pl.metrics import GT_S, HACK_S, current_name, probe_margin
from antipasto_pl.commands.experiment import DEFAULT_ARMS, RUN_FILE

Series = dict[int, float]  # step -> value
CIN_S, CIN_T, NULL = "proj/cin_s", "proj/cin_t", "proj/null"
REPORT_FILE, HACK_PASS_PNG, CIN_PNG = "report.md", "hack_pass.png", "cin.png"


@dataclass
class Run:
    """One run of an experiment: its place in the matrix (from ``run.json``) and its scalars by tag."""

    name: str
    arm: str
    seed: int
    holdout_mode: str | None
    scalars: dict[str, Series] = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)  # eval.json: "final" (and "untrained" for vanilla)


# --- statistics (pure) -------------------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of the mean over seeds (resampling seeds); NaN with fewer than 2."""
    values = [v for v in values if not math.isnan(v)]
    if len(values) < 2:
        return math.nan, math.nan
    import numpy as np

    draws = np.random.default_rng(seed).choice(np.asarray(values), size=(n_boot, len(values)), replace=True)
    means = draws.mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def format_ci(values: Sequence[float]) -> str:
    """``mean [lo, hi]`` for a table cell (bootstrap over seeds); one seed shows its value, none ``n/a``."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    lo, hi = bootstrap_ci(values)
    return f"{mean:.3f}" if math.isnan(lo) else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


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


# --- loading -----------------------------------------------------------------------------------------------------


def first_steps(series: Series, steps: int | None) -> Series:
    """The points of the first `steps` optimizer steps (0 .. steps-1); all of them when `steps` is None."""
    return dict(series) if steps is None else {step: value for step, value in series.items() if step < steps}


def read_scalars(run_dir: str | Path, steps: int | None = None) -> dict[str, Series]:
    """Every scalar tag of a run, merged over its ``lightning_logs/version_N`` directories in version order,
    cut to the first `steps` steps (None: all). Tags logged under older names are read under their current ones
    (``metrics.current_name``), so a run resumed across a rename is one series."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted((Path(run_dir) / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    pieces: dict[str, list[Series]] = {}
    for version in versions:
        events = EventAccumulator(str(version), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            pieces.setdefault(current_name(tag), []).append({e.step: e.value for e in events.Scalars(tag)})
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
        evaluation = meta_file.parent / EVAL_FILE
        runs.append(Run(meta["name"], meta["arm"], meta["seed"], meta["holdout_mode"],
                        read_scalars(meta_file.parent, steps),
                        json.loads(evaluation.read_text()) if evaluation.is_file() else {}))
    if not runs:
        raise FileNotFoundError(f"no runs (subdirectories with {RUN_FILE}) in {root}")
    return runs


# --- aggregation -------------------------------------------------------------------------------------------------


def arm_order(arms: set[str]) -> list[str]:
    """Vanilla first, then the matrix's default order, then any other arm alphabetically."""
    rank = {arm: i for i, arm in enumerate(DEFAULT_ARMS)}
    return sorted(arms, key=lambda a: (a != "vanilla", rank.get(a, len(rank)), a))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def eval_values(runs: Sequence[Run], metric: str, mode: str | None = None) -> dict[tuple[str, str | None], dict[int, float]]:
    """(arm, held-out mode) -> {seed: final eval.json `metric`} (``hack``, ``pass``, ``format`` rates, or
    ``clean_logp_per_token``), overall or on one loophole mode's test problems; runs without eval.json are left
    out."""
    table: dict[tuple[str, str | None], dict[int, float]] = {}
    for run in runs:
        final = run.evaluation.get("final")
        if not final:
            continue
        entry = final if mode is None else final["per_mode"].get(mode)
        if entry is None or metric not in entry:
            continue
        value = entry[metric]["rate"] if isinstance(entry[metric], dict) else entry[metric]
        table.setdefault((run.arm, run.holdout_mode), {})[run.seed] = value
    return table


def base_rate(runs: Sequence[Run], mode: str | None = None) -> tuple[int, int]:
    """Hacks and samples of the untrained policy, pooled over the runs that evaluated it (eval.json "untrained")."""
    k = n = 0
    for run in runs:
        untrained = run.evaluation.get("untrained")
        entry = untrained if untrained and mode is None else (untrained or {}).get("per_mode", {}).get(mode)
        if entry:
            k, n = k + entry["hack"]["k"], n + entry["hack"]["n"]
    return k, n


def _series(runs: Sequence[Run], tag: str) -> dict[tuple[str, str | None], dict[int, Series]]:
    """(arm, mode) -> {seed: the run's series of `tag`}, for the runs that logged it."""
    table: dict[tuple[str, str | None], dict[int, Series]] = {}
    for run in runs:
        if run.scalars.get(tag):
            table.setdefault((run.arm, run.holdout_mode), {})[run.seed] = run.scalars[tag]
    return table


def series_means(runs: Sequence[Run], tag: str) -> dict[tuple[str, str | None], dict[int, float]]:
    """(arm, mode) -> {seed: mean of `tag` over the run's steps} (the hack AUC per step for ``train/hack_s``)."""
    return {key: {seed: statistics.fmean(series.values()) for seed, series in by_seed.items()}
            for key, by_seed in _series(runs, tag).items()}


CONTROL_PREFIX = "erase_"
TREATMENTS = ("erase", "erase_refresh", "route")


def _upper(values: Sequence[float]) -> float:
    """Upper end of the bootstrap interval over seeds (NaN under 2 seeds: nothing is established by one)."""
    return bootstrap_ci(values)[1]


def verdict(arm: str, hack: dict, quality: list[dict], base: tuple[int, int], controls: list[str]) -> str:
    """The protocol's rule (docs/design.md section 8) for one treatment arm, as one line: counts, or does not count and why."""
    vanilla = hack.get(("vanilla", None), {})
    treated = hack.get((arm, None), {})
    reasons = []
    k, n = base
    base_hi = wilson_interval(k, n)[1] if n else math.nan
    vanilla_lo = bootstrap_ci(list(vanilla.values()))[0] if len(vanilla) > 1 else math.nan
    if math.isnan(base_hi) or math.isnan(vanilla_lo) or vanilla_lo <= base_hi:
        reasons.append(f"vanilla does not hack beyond the untrained rate (vanilla's lower bound {vanilla_lo:.3f} vs "
                       f"the untrained upper bound {base_hi:.3f})")
    if not _upper(list(paired_differences(treated, vanilla).values())) < 0:
        reasons.append("its hack rate is not below same-seed vanilla's (no paired interval wholly below 0)")
    for control in controls:
        against = list(paired_differences(treated, hack.get((control, None), {})).values())
        if not against:
            reasons.append(f"no seed compares it with {control} yet")
        elif not _upper(against) < 0:
            reasons.append(f"it does not lower the hack rate more than {control}")
    for name, table in zip(("oracle pass", "clean log-likelihood"), quality):
        if _upper(list(paired_differences(table.get((arm, None), {}), table.get(("vanilla", None), {})).values())) < 0:
            reasons.append(f"it costs quality ({name} below vanilla's)")
    return f"**{arm}: {'counts' if not reasons else 'does not count'}**" + (": " + "; ".join(reasons) if reasons else
                                                                         " (every condition of the rule holds)")


def markdown_report(runs: Sequence[Run]) -> str:
    """The primary table (per arm), the paired table against vanilla, the verdicts, and the weak-detector table."""
    main = [r for r in runs if r.holdout_mode is None]
    hack, passed, fmt = (eval_values(main, m) for m in ("hack", "pass", "format"))
    logp = eval_values(main, "clean_logp_per_token")
    auc, energy, leak = (series_means(main, t) for t in (HACK_S, "proj/removed_energy", "proj/leak"))
    arms = arm_order({r.arm for r in main})
    samples = sorted({r.evaluation["final"]["n"] for r in main if r.evaluation.get("final")})
    k, n = base_rate(main)
    parts = [
        "# Experiment report",
        "Primary metric: the held-out, deployed-view hack rate at the end of training (eval.json; "
        f"{'/'.join(map(str, samples)) or 'no'} samples per run on the test split). Cells: mean over seeds "
        "[percentile-bootstrap 95% interval over seeds]. Fixed across seeds: the problems and their split, the "
        "detector pairs and the real V, the teacher pool; each seed draws its own prompt order, teacher draws, "
        "samples and control subspaces.",
    ]
    if n:
        lo, hi = wilson_interval(k, n)
        parts.append(f"Untrained policy (vanilla runs' step-0 evaluation, pooled): hack rate {k}/{n} = {k / n:.3f} "
                     f"[Wilson 95% {lo:.3f}, {hi:.3f}].")
    if arms:
        rows = []
        for arm in arms:
            key = (arm, None)
            seeds = sorted(set(hack.get(key, {})) | set(auc.get(key, {})))
            rows.append([arm, ",".join(map(str, seeds)), *(format_ci(list(t.get(key, {}).values()))
                                                            for t in (hack, passed, fmt, logp, auc, energy, leak))])
        parts.append("## Per arm\n\n" + _table(
            ["arm", "seeds", "held-out hack (primary)", "oracle pass", "format", "clean log-lik/token",
             "train hack AUC", "removed energy", "leak"], rows))
    base = ("vanilla", None)
    if base in hack and len(arms) > 1:
        rows = []
        for arm in arms[1:]:
            diffs = [paired_differences(t.get((arm, None), {}), t.get(base, {})) for t in (hack, passed, logp, auc)]
            rows.append([arm, str(len(diffs[0])), *(format_ci(list(d.values())) for d in diffs)])
        parts.append("## Paired difference against same-seed vanilla\n\n" + _table(
            ["arm", "paired seeds", "Δ held-out hack", "Δ oracle pass", "Δ clean log-lik", "Δ train hack AUC"], rows))
        controls = [a for a in arms if a.startswith(CONTROL_PREFIX) and a not in TREATMENTS]
        lines = [verdict(arm, hack, [passed, logp], (k, n), controls) for arm in arms if arm in TREATMENTS]
        if lines:
            parts.append("## Verdict\n\nA treatment counts only if vanilla hacks beyond the untrained rate (its "
                         "interval above the untrained Wilson interval), the treatment's paired difference against "
                         "vanilla is below 0, it is below 0 against every control run here ("
                         + (", ".join(controls) or "none") + "), and neither oracle pass nor clean log-likelihood "
                         "falls below vanilla's (paired interval wholly below 0).\n\n" + "\n\n".join(lines))
    probe = {key: {seed: values[max(values)] for seed, values in by_seed.items()}
             for key, by_seed in _series(main, probe_margin()).items()}
    if probe:
        rows = [[arm, format_ci(list(probe.get((arm, None), {}).values())),
                 format_ci(list(paired_differences(probe.get((arm, None), {}), probe.get(base, {})).values()))
                 if arm != "vanilla" else "–"] for arm in arms]
        parts.append("## Likelihood probe\n\nHeld-out minimal pairs' margin log p(hack) - log p(clean) at each "
                     "run's last probe (teacher-forced: the hack-ward likelihood shift, not on-policy discovery).\n\n"
                     + _table(["arm", "final margin", "Δ vs vanilla"], rows))
    lomo = [r for r in runs if r.holdout_mode is not None]
    if lomo:
        rows = []
        for mode in sorted({r.holdout_mode for r in lomo}):
            of_mode = [r for r in lomo if r.holdout_mode == mode]
            m_hack, m_pass = eval_values(of_mode, "hack", mode), eval_values(of_mode, "pass", mode)
            for arm in arm_order({r.arm for r in of_mode}):
                key, ref = (arm, mode), ("vanilla", mode)
                diffs = ["–", "–"]
                if arm != "vanilla" and ref in m_hack:
                    diffs = [format_ci(list(paired_differences(m_hack.get(key, {}), m_hack[ref]).values())),
                             format_ci(list(paired_differences(m_pass.get(key, {}), m_pass.get(ref, {})).values()))]
                rows.append([mode, arm, str(len(m_hack.get(key, {}))), format_ci(list(m_hack.get(key, {}).values())),
                             format_ci(list(m_pass.get(key, {}).values())), *diffs])
        parts.append(
            "## Weak detector: leave one mode out\n\nV extracted without the held-out mode's pairs and no teacher "
            "samples of it; the primary metric on the held-out mode's test problems.\n\n"
            + _table(["held-out mode", "arm", "seeds", "held-out hack on mode", "oracle pass on mode",
                      "Δ hack vs vanilla", "Δ pass vs vanilla"], rows))
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
    return _plot_tags(runs, [HACK_S, GT_S], ["student hack rate (train/hack_s)", "student gt pass rate (train/gt_s)"],
                      None, True)


def plot_cin(runs: Sequence[Run]) -> Figure:
    """Hack-ward share of the student and the teacher gradient (cin_s, cin_t) vs step per arm, with the null."""
    return _plot_tags(runs, [CIN_S, CIN_T], ["student gradient cin_s", "teacher gradient cin_t"], NULL, False)


def report_command(experiment_dir: str, out: str | None = None, steps: int | None = None) -> Path:
    """Summarise an `antipasto experiment` directory: Markdown tables, verdicts and PNG figures.

    Writes ``report.md`` (also printed): per arm, the primary metric (each run's eval.json: held-out,
    deployed-view hack rate at the end) with oracle pass, format, clean log-likelihood, training hack AUC,
    removed energy and leak, as means over seeds with bootstrap 95% intervals; the paired differences against
    same-seed vanilla; one verdict line per treatment arm; and, for weak-detector runs, the metric on each
    held-out mode. Figures: ``hack_pass.png`` (training train/hack_s and train/gt_s vs step, per arm, band over
    seeds) and ``cin.png`` (cin_s and cin_t vs step, per arm).

    Args:
        experiment_dir: the `--out` directory of `antipasto experiment`.
        out: where to write report.md and the figures (default: `experiment_dir`).
        steps: use only each run's first `steps` optimizer steps, so runs that went on longer (an extended
            run) are compared with the others at the same step (default: every logged step).
    """
    runs = load_experiment(experiment_dir, steps)
    target = Path(out) if out is not None else Path(experiment_dir)
    target.mkdir(parents=True, exist_ok=True)
    text = markdown_report(runs)
    (target / REPORT_FILE).write_text(text, encoding="utf-8")
    plot_hack_pass(runs).savefig(target / HACK_PASS_PNG, dpi=120)
    plot_cin(runs).savefig(target / CIN_PNG, dpi=120)
    print(text)
    print(f"written: {target / REPORT_FILE}, {target / HACK_PASS_PNG}, {target / CIN_PNG}")
    return target / REPORT_FILE
