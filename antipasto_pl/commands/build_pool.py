"""``antipasto build-pool``: grade and freeze a teacher pool into a directory."""

from __future__ import annotations

from antipasto_pl.env.pool import build_pool
from antipasto_pl.env.problems import load_problems


def build_pool_command(
    out_dir: str,
    problems: str = "builtin",
    per_prompt: int = 8,
    hack_frac: float = 0.5,
    modes: list[str] | None = None,
    seed: int = 0,
    prefill: str = "",
) -> None:
    """Build a frozen teacher pool of graded hack/clean completions.

    Args:
        out_dir: Directory to write (one JSONL.gz per prompt plus manifest.json); replaced if it holds a pool.
        problems: Problem source: "builtin", "humaneval", or a path to a .jsonl dataset.
        per_prompt: Completions per prompt.
        hack_frac: Fraction of each prompt's completions that are hacks for the problem's mode.
        modes: Loophole modes to include (default: all); prompts of other modes get no records.
        seed: Seed for the completion variants.
        prefill: the training run's ``sampling.prefill`` template: records continue it (a pool serves only runs
            with the same prefill).
    """
    problem_set = load_problems(problems)
    manifest = build_pool(problem_set, out_dir, per_prompt, hack_frac, modes, seed, progress=True, prefill=prefill)
    counts = manifest["counts"]
    print(
        f"teacher pool -> {out_dir}: {counts['prompts']} prompts, {counts['records']} completions "
        f"({counts['hack']} hack / {counts['clean']} clean), passed {counts['passed']}, "
        f"exploited {counts['exploited']}, gt_correct {counts['gt_correct']}"
    )
    for mode, c in counts["by_mode"].items():
        print(f"  {mode:<14} {c['records']:>5} completions  passed {c['passed']:>5}  exploited {c['exploited']:>5}")
