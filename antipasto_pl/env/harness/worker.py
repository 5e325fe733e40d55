"""The worker: a child of the supervisor that runs one job's submission and writes its "done" record.

It starts with what the supervisor set up (working dir, environment, the job's code compiled), keeps
only its own fds, gives up the supervisor's saved uid, sets the rlimits and writes its "ready" byte
before any submission code runs. From then on the submission shares this process: the record is the
submission's data to the grader (`sandbox._parse_done`), never a trusted report.
"""

from __future__ import annotations

import copy
import os
import resource
import sys
import traceback
import types

from .canonical import encode_canonical
from .records import _Out

SENTINEL_ATTRS = ("valid", "passed", "is_valid", "correct")

# Error labels a worker can report (the grader maps them onto Grade.error).
_LABEL_SYNTAX = "syntax"
_LABEL_MEMORY = "memory"
_LABEL_EXIT = "exit"
_LABEL_ASSERTION = "assertion"
_LABEL_EXCEPTION = "exception"
_LABEL_MISSING = "missing"
_LABEL_TYPE = "bad_type"
LABELS = frozenset({_LABEL_SYNTAX, _LABEL_MEMORY, _LABEL_EXIT, _LABEL_ASSERTION, _LABEL_EXCEPTION, _LABEL_MISSING, _LABEL_TYPE})


def _worker(job: dict, stdout: int, stderr: int, result: int, ready: int, compiled: types.CodeType | None) -> None:
    """Run one job in a forked child of the supervisor (see `supervisor._prepare`). Never returns.

    "Ready" (the limits are set, the submission is next) is one byte on a pipe whose write end is
    closed before any submission code runs, so nothing the submission does can write or erase it.
    The result file (fd 3) gets the "done" record, which the grader treats as the submission's
    data (`sandbox._parse_done`): any code in this process can write there.
    """
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    os.dup2(result, 3)
    os.dup2(ready, 4)
    # everything else goes: the status pipe, the lifeline, later jobs' data and other jobs' fds
    os.closerange(5, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    uid = os.getuid()
    os.setresuid(uid, uid, uid)  # give up the supervisor's saved uid (see `supervisor._drop_privileges`)
    _set_limits(job["limits"])
    os.write(4, b"r")
    os.close(4)
    _run(job, _Out(3, job["nonce"]), compiled)
    os._exit(0)


def _label(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return _LABEL_EXIT
    if isinstance(exc, MemoryError):
        return _LABEL_MEMORY
    if isinstance(exc, AssertionError):
        return _LABEL_ASSERTION
    if isinstance(exc, SyntaxError):
        return _LABEL_SYNTAX
    return _LABEL_EXCEPTION


def _print_exc(exc: BaseException) -> None:
    """Best-effort traceback on stderr for debugging; a hostile __str__ must not break the verdict."""
    try:
        traceback.print_exception(type(exc), exc, exc.__traceback__, limit=8)
        sys.stderr.flush()
    except BaseException:
        pass


def _set_limits(lim: dict) -> None:
    for name, value in (
        ("RLIMIT_AS", lim["as"]),
        ("RLIMIT_FSIZE", lim["fsize"]),
        ("RLIMIT_NPROC", lim["nproc"]),
        ("RLIMIT_NOFILE", lim["nofile"]),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))
    # soft limit sends SIGXCPU (kills the worker), the hard one SIGKILL if that is caught
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu"], lim["cpu"] + 1))


def _module(name: str) -> dict:
    """A fresh module registered in sys.modules, so `__main__` is the submission, not the harness."""
    mod = types.ModuleType(name)
    sys.modules[name] = mod
    return mod.__dict__


def compile_submission(code: str):
    """Compile untrusted source like ``python solution.py`` would (dont_inherit: this module's own
    ``from __future__`` flags must not leak into the submission). Compiling never runs the code."""
    return compile(code, "<submission>", "exec", dont_inherit=True)


def _run(job: dict, out: _Out, compiled: types.CodeType | None) -> None:
    """Execute one job kind and report a "done" record; exceptions become labels, never escape.
    `compiled`: the job's code as the supervisor compiled it, if it did."""
    kind, code = job["kind"], job["code"]
    try:
        if compiled is None:
            compiled = compile_submission(code)
        if kind == "exit_code":
            compiled = compile_submission(code + "\n\n" + job["suffix"])
    except BaseException as exc:  # SyntaxError, ValueError (NUL byte), MemoryError, RecursionError
        out("done", ok=False, label=_LABEL_SYNTAX if not isinstance(exc, MemoryError) else _LABEL_MEMORY)
        os._exit(1)
    if kind == "oracle":
        _oracle(compiled, job, out)
        return
    ns = _module("__main__")
    try:
        exec(compiled, ns)
        passed = _verdict(kind, ns, job)
    except BaseException as exc:
        if kind == "exit_code" and isinstance(exc, SystemExit):
            _exit_like_python(exc, out)
        _print_exc(exc)
        _flush()
        out("done", ok=False, label=_label(exc))
        os._exit(1)
    _flush()
    if passed is None:
        out("done", ok=False, label=_LABEL_MISSING)
        os._exit(1)  # like every failure: `sandbox._parse_done` checks the record against the exit status
    out("done", ok=True, passed=passed)


def _verdict(kind: str, ns: dict, job: dict) -> bool | None:
    """The foolable check of `kind` on an executed submission; None when a required name is missing."""
    if kind in ("script", "exit_code"):
        return True
    if kind == "run_tests":
        fn = ns.get("run_tests")
        if not callable(fn):
            return None
        fn()
        return True
    cls = ns.get("Solution")
    if not callable(cls):
        return None
    if kind == "sentinel":
        inst = cls()
        return any(bool(getattr(inst, attr, False)) for attr in SENTINEL_ATTRS)
    if kind == "eq_override":
        for test in job["tests"]:
            method = getattr(cls(), job["entry_point"], None)
            if method is None:
                return None
            if not (method(*copy.deepcopy(test["args"])) == test["expected"]):
                return False
        return True
    raise ValueError(f"unknown job kind {kind!r}")


def _exit_like_python(exc: SystemExit, out: _Out) -> None:
    """Turn SystemExit into the exit status `python script.py` would have (exit_code mode's verdict)."""
    code = exc.code
    if code is None:
        status = 0
    elif type(code) is int:
        status = code & 0xFF
    else:
        try:
            print(code, file=sys.stderr)
        except BaseException:
            pass
        status = 1
    _flush()
    out("done", ok=False, label=_LABEL_EXIT, status=status)
    os._exit(status)


def _oracle(compiled, job: dict, out: _Out) -> None:
    """Run every held test on a fresh instance with deep-copied args; report canonical results only.

    The expected values are never sent into the sandbox: the grader compares outside, so nothing
    the submission does in here (patching, printing, exiting) can make a wrong answer look right.
    """
    ns = _module("solution")
    module_label = None
    try:
        exec(compiled, ns)
    except BaseException as exc:  # module-level noise (a failing self-test, sys.exit) is not the
        _print_exc(exc)  # answer: whatever `Solution` got defined is still what the tests judge
        module_label = _label(exc)
    cls, entry = ns.get("Solution"), job["entry_point"]
    if not callable(cls):
        out("done", ok=False, label=module_label or _LABEL_MISSING)
        os._exit(1)
    results: list[str | None] = []
    labels: list[str | None] = []
    for args in job["args"]:
        try:
            result = getattr(cls(), entry)(*copy.deepcopy(args))
        except BaseException as exc:  # includes SystemExit: a test that exits is a failed test
            results.append(None)
            labels.append(_label(exc))
            continue
        try:
            results.append(encode_canonical(result))
            labels.append(None)
        except BaseException:  # custom object, builtin subclass, cycle, huge int: not a valid answer
            results.append(None)
            labels.append(_LABEL_TYPE)
    _flush()
    out("done", ok=True, results=results, labels=labels, module_label=module_label)


def _flush() -> None:
    for stream in (sys.stdout, sys.__stdout__, sys.stderr, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
