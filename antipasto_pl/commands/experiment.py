"""`antipasto experiment`: run a matrix of arms x seeds (plus leave-one-mode-out weak-detector runs) from one config.

Each run is a separate `antipasto fit` process in its own directory ``<out>/<run>/``: a crash (or an out-of-memory
kill) of one run is reported instead of ending the matrix, and runs share no memory or RNG state. A run directory
holds ``run.json`` (what the run is, for `antipasto report`), ``train.log`` (the process's output, appended on
resume), Lightning's ``lightning_logs/version_N/`` (TensorBoard events and the resolved ``config.yaml``),
``checkpoints/last.ckpt`` and, once the process has finished, ``DONE``. Rerunning the same command skips finished
runs and resumes interrupted ones from their last checkpoint, so an experiment is restarted by repeating it.

Only ``seed_everything`` varies across seeds. ``data.seed`` (the problem split and the pairs, hence the real V) and
``data.pool_seed`` come from the config, so every arm and seed shares problems, pairs, V and teacher pool; the run
seed draws the prompt order, the teacher draws, the samples and the control subspaces (`antipasto_pl.seeds`). Each
run ends with the held-out evaluation (its ``eval.json``), the primary metric `antipasto report` compares.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from antipasto_pl.commands import CONFIG_DIR, resolve_config
from antipasto_pl.env.modes import MODES, check_mode

ARMS_DIR = CONFIG_DIR / "arms"
DEFAULT_ARMS = ["vanilla", "erase", "erase_refresh", "route", "erase_random", "erase_random_matched", "erase_stub",
                "erase_nonhack"]
# The likelihood-probe proxy: groups of demonstrations only (hacks against stubs without exploit, so the advantage
# is the exploit's), no sampling, the probe every step, no sampled evaluation.
PROBE_OVERRIDES = ["model.mix_ratio=1.0", "model.probe_every=1", "model.heldout.samples=0",
                   "data.pool_hack_frac=0.5", "data.pool_stub_frac=0.5"]
DEFAULT_LOMO_ARMS = ["vanilla", "erase"]
RUN_FILE = "run.json"
DONE_FILE = "DONE"
LOG_FILE = "train.log"
LAST_CKPT = Path("checkpoints") / "last.ckpt"

RunState = Literal["new", "resume", "done"]


@dataclass(frozen=True)
class RunSpec:
    """One cell of the matrix: which arm, seed and (for weak-detector runs) held-out mode, and the fit arguments."""

    name: str
    arm: str
    seed: int
    holdout_mode: str | None
    max_steps: int | None
    args: list[str] = field(default_factory=list)

    def command(self, run_dir: Path, resume: bool) -> list[str]:
        """The `antipasto fit` process for this run (``--ckpt_path last`` continues an interrupted one)."""
        tail = ["--ckpt_path", "last"] if resume else []
        return [sys.executable, "-m", "antipasto_pl.cli", "fit", *self.args,
                f"--trainer.default_root_dir={run_dir}", *tail]


def arm_config(arm: str) -> tuple[str, Path]:
    """(name, YAML path) of an arm given by name (an installed ``configs/arms/<name>.yaml``) or by path (named by
    its stem)."""
    path = Path(arm)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"arm config {arm} not found")
        return path.stem, path
    path = ARMS_DIR / f"{arm}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in ARMS_DIR.glob("*.yaml")))
        raise ValueError(f"unknown arm {arm!r}; expected one of {known}, or a path to an arm YAML file")
    return arm, path


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """``key=value`` pairs (a leading ``--`` on the key is allowed), checked early so a typo fails before any run."""
    pairs = []
    for item in overrides:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. model.learning_rate=3e-3)")
        pairs.append((key, value))
    return pairs


def config_value(configs: list[str], overrides: list[tuple[str, str]], key: str) -> Any:
    """The value of a dotted `key` after the YAML files and overrides are applied in order (None when unset).

    The runner needs only a few settings (max_steps to decide if a run is finished, data.modes for the
    held-out modes); reading them from the YAML avoids importing the trainer for a plain skip.
    """
    value = None
    for path in configs:
        node: Any = yaml.safe_load(Path(path).read_text()) or {}
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            value = node
    for name, text in overrides:
        if name == key:
            value = yaml.safe_load(text)
    return value


def plan_runs(
    configs: list[str],
    arms: list[str],
    seeds: list[int],
    leave_one_mode_out: bool = False,
    holdout_modes: list[str] | None = None,
    lomo_arms: list[str] = DEFAULT_LOMO_ARMS,
    max_steps: int | None = None,
    override: list[str] | None = None,
) -> list[RunSpec]:
    """The matrix: every arm x seed, then (with `leave_one_mode_out`) every held-out mode x lomo arm x seed.

    A weak-detector run holding out mode m extracts V from pairs of the other training modes only
    (``data.known_modes``) and serves teacher samples of the other modes only (``data.pool_modes``), while the
    student still trains on m's problems: comparing ``train/<m>/hack_s`` of erase against vanilla run the same way
    tells whether erasing a V that never saw m still suppresses m.
    """
    overrides = parse_overrides(override or [])
    base = [arg for path in configs for arg in ("--config", str(Path(path).resolve()))]
    tail = ([f"--trainer.max_steps={max_steps}"] if max_steps is not None else []) + [
        f"--{key}={value}" for key, value in overrides]
    steps = max_steps if max_steps is not None else config_value(configs, overrides, "trainer.max_steps")
    lomo = lomo_arms if leave_one_mode_out else []
    training_modes = [check_mode(m) for m in config_value(configs, overrides, "data.modes") or MODES]
    held_out = [check_mode(m) for m in holdout_modes] if holdout_modes is not None else training_modes
    if leave_one_mode_out and not set(held_out) <= set(training_modes):
        raise ValueError(f"held-out modes {held_out} must be among the training modes {training_modes}")

    def spec(arm: str, seed: int, mode: str | None) -> RunSpec:
        name, path = arm_config(arm)
        args = [*base, "--config", str(path), f"--seed_everything={seed}", "--trainer.enable_progress_bar=false"]
        run_name = f"{name}-s{seed}"
        if mode is not None:
            rest = json.dumps([m for m in training_modes if m != mode], separators=(",", ":"))
            args += [f"--data.known_modes={rest}", f"--data.pool_modes={rest}"]
            run_name = f"{name}-lomo_{mode}-s{seed}"
        return RunSpec(run_name, name, seed, mode, steps, args + tail)

    runs = [spec(arm, seed, None) for arm in arms for seed in seeds]
    runs += [spec(arm, seed, mode) for mode in held_out for arm in lomo for seed in seeds]
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"the matrix names these runs twice: {duplicates} (arms or seeds repeated?)")
    return runs


def run_state(run_dir: Path, max_steps: int | None) -> RunState:
    """Finished (``DONE`` records a max_steps at least the one asked for), resumable (a checkpoint exists), or new.

    A finished run asked for more steps than it was run for is resumed, so an experiment can be extended.
    """
    done = run_dir / DONE_FILE
    if done.is_file():
        finished = json.loads(done.read_text()).get("max_steps")
        if finished == max_steps or (None not in (finished, max_steps) and finished >= max_steps):
            return "done"
    return "resume" if (run_dir / LAST_CKPT).is_file() else "new"


def launch(spec: RunSpec, run_dir: Path, state: RunState) -> int:
    """Run one fit process to completion, output appended to ``train.log``; ``DONE`` is written on success."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DONE_FILE).unlink(missing_ok=True)
    (run_dir / RUN_FILE).write_text(json.dumps(asdict(spec), indent=2) + "\n")
    command = spec.command(run_dir, resume=state == "resume")
    with open(run_dir / LOG_FILE, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if code == 0:
        (run_dir / DONE_FILE).write_text(json.dumps({"max_steps": spec.max_steps}) + "\n")
    return code


def experiment_command(
    config: list[str] = ["configs/cpu.yaml"],
    out: str = "runs/experiment",
    arms: list[str] = DEFAULT_ARMS,
    seeds: list[int] = [0, 1, 2],
    leave_one_mode_out: bool = False,
    holdout_modes: list[str] | None = None,
    lomo_arms: list[str] = DEFAULT_LOMO_ARMS,
    max_steps: int | None = None,
    override: list[str] = [],
    probe: bool = False,
    dry_run: bool = False,
) -> list[Path]:
    """Run every arm x seed of an experiment (and the weak-detector runs), each as its own `antipasto fit` process.

    Runs go to ``<out>/<arm>-s<seed>/`` (weak-detector runs to ``<out>/<arm>-lomo_<mode>-s<seed>/``), each with its
    TensorBoard logs and resolved config.yaml under ``lightning_logs/``, its output in ``train.log`` and a ``DONE``
    marker once finished. Repeating the command skips finished runs and resumes interrupted ones from
    ``checkpoints/last.ckpt``. A failed run does not stop the others; the command lists the failures with their
    logs and exits non-zero. Summarise with `antipasto report --experiment_dir <out>`. The command's own options may also come from
    a YAML file (`--command_config experiment.yaml`).

    Args:
        config: training YAML files applied in order, as for fit (a preset and overlays:
            `--config configs/cpu.yaml --config my.yaml`); every run gets them, then its arm. Default: the cpu
            preset. A `configs/...` path that is not a file here names the installed one.
        out: experiment directory; one subdirectory per run.
        arms: arms to run: names of the installed `configs/arms/<name>.yaml` (vanilla, erase, erase_refresh, route, and the
            controls erase_random, erase_random_matched, erase_stub, erase_nonhack, erase_shuffled) or paths to arm
            YAML files.
        seeds: values of `seed_everything`, one run per arm per seed (data.seed stays as configured, so all runs
            share problems, pairs, V and teacher pool; the seed draws prompt order, teacher draws and controls).
        leave_one_mode_out: also run the weak-detector test: for each held-out mode m, each of `lomo_arms` with
            V extracted from pairs of the other modes only (data.known_modes) and no teacher samples of m
            (data.pool_modes); `antipasto report` then compares hack and pass on m.
        holdout_modes: modes to hold out, one set of weak-detector runs each (default: every training mode,
            i.e. data.modes of the config, or all six loophole modes).
        lomo_arms: arms of the weak-detector runs; vanilla is the same-seed baseline the others are compared to.
        max_steps: override trainer.max_steps for every run; raising it extends finished runs by resuming them
            (the step count continues, but Lightning counts a run stopped at max_steps as a finished epoch, so
            the extension draws prompts in the next epoch's order; an interrupted run resumes exactly).
        override: further `antipasto fit` options as key=value, applied to every run after the configs
            (e.g. `--override '[model.learning_rate=3e-3, data.prompts_per_step=4]'`).
        probe: run the likelihood-probe proxy instead of on-policy RL: every group from demonstrations (hacks and
            stubs without exploit, so the advantage is the exploit's; no sampling), the held-out minimal pairs'
            margin logged every step, no sampled evaluation. Cheap
            enough for many seeds and every control; it measures the hack-ward likelihood shift, not discovery.
        dry_run: print the matrix (run, state, command) and start nothing.

    Returns:
        The run directories, in matrix order.
    """
    from tqdm import tqdm

    configs = [resolve_config(path) for path in config]
    if not configs:
        raise ValueError("antipasto experiment needs a training config: --config configs/<preset>.yaml")
    for path in configs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"training config {path} not found")
    overrides = [*(PROBE_OVERRIDES if probe else []), *override]
    runs = plan_runs(configs, arms, seeds, leave_one_mode_out, holdout_modes, lomo_arms, max_steps, overrides)
    root = Path(out).resolve()
    dirs = [root / spec.name for spec in runs]
    states = [run_state(d, spec.max_steps) for spec, d in zip(runs, dirs)]
    if dry_run:
        for spec, run_dir, state in zip(runs, dirs, states):
            print(f"{spec.name:<40} {state:<7} {shlex.join(spec.command(run_dir, state == 'resume'))}")
        return dirs

    failed: list[tuple[str, Path]] = []
    counts = {"done": 0, "skipped": 0}
    bar = tqdm(total=len(runs), desc="experiment", unit="run", file=sys.stderr, dynamic_ncols=True)
    for spec, run_dir, state in zip(runs, dirs, states):
        bar.set_postfix_str(f"{spec.name} ({state}) | done {counts['done']} skipped {counts['skipped']} "
                            f"failed {len(failed)}")
        if state == "done":
            counts["skipped"] += 1
            bar.update()
            continue
        code = launch(spec, run_dir, state)
        if code == 0:
            counts["done"] += 1
            bar.write(f"{spec.name}: finished ({'resumed' if state == 'resume' else 'new'})")
        elif code - 128 in (signal.SIGINT, signal.SIGTERM):  # the fit stopped at a checkpoint: so does the matrix
            bar.close()
            raise SystemExit(f"{spec.name}: stopped by {signal.Signals(code - 128).name} at its last checkpoint; "
                             "rerun the command to resume the experiment")
        else:
            failed.append((spec.name, run_dir / LOG_FILE))
            bar.write(f"{spec.name}: FAILED, see {run_dir / LOG_FILE}")
        bar.update()
    bar.set_postfix_str(f"done {counts['done']} skipped {counts['skipped']} failed {len(failed)}")
    bar.close()
    if failed:
        listing = "\n".join(f"  {name}: {log}" for name, log in failed)
        raise SystemExit(f"{len(failed)} of {len(runs)} runs failed (rerun the command to retry them):\n{listing}")
    return dirs
