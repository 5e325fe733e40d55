"""The strict canonical form of the oracle's results: encoded in the sandbox, compared in the grader, so that
expected values and results are treated exactly alike."""

from __future__ import annotations

import json
import math


def encode_canonical(
    x: object,
    _type=type,
    _int=int,
    _float=float,
    _str=str,
    _bool=bool,
    _list=list,
    _tuple=tuple,
    _dict=dict,
    _none=type(None),
    _enc_str=json.encoder.encode_basestring_ascii,
    _int_repr=int.__repr__,
    _float_repr=float.__repr__,
    _isnan=math.isnan,
    _isinf=math.isinf,
    _join=",".join,
    _sorted=sorted,
) -> str:
    """JSON text of `x` if it is built only from exact builtin types, else TypeError.

    Why: the oracle must not run any submission-defined code while reading a result, so only
    `type(x) is T` for T in int/float/str/bool/None/list/tuple/dict is accepted (subclasses of
    builtins and custom objects are rejected; no __eq__/__iter__/__repr__ of the submission runs).
    Tuples encode like lists (JSON expected values cannot tell them apart); dicts encode as
    ``{"d": [[key, value], ...]}`` sorted by encoded key so key order never matters and a dict can
    never collide with a list or string. NaN / +-Infinity use the JSON extensions Python reads back.
    Default arguments pin the builtins so a submission that rebinds `builtins` cannot change them.
    """
    t = _type(x)
    if t is _str:
        return _enc_str(x)
    if t is _bool:
        return "true" if x else "false"
    if t is _int:
        return _int_repr(x)
    if t is _float:
        if _isnan(x):
            return "NaN"
        if _isinf(x):
            return "Infinity" if x > 0 else "-Infinity"
        return _float_repr(x)
    if t is _none:
        return "null"
    if t is _list or t is _tuple:
        return "[" + _join([encode_canonical(v) for v in x]) + "]"
    if t is _dict:
        pairs = _sorted([(encode_canonical(k), encode_canonical(v)) for k, v in x.items()])
        return '{"d":[' + _join(["[" + k + "," + v + "]" for k, v in pairs]) + "]}"
    raise TypeError("not an exact builtin JSON-like type")


def same_canonical(a: object, b: object, tol: float | None = None) -> bool:
    """Compare two decoded `encode_canonical` values; bools only equal bools, numbers compare by value.

    int vs float compare numerically (2 == 2.0); NaN equals NaN; with `tol` finite floats compare
    within an absolute tolerance. Runs in the grader (trusted side), never in the sandbox.
    """
    ta, tb = type(a), type(b)
    if ta is bool or tb is bool:
        return ta is tb and a == b
    if ta in (int, float) and tb in (int, float):
        if (ta is float and math.isnan(a)) or (tb is float and math.isnan(b)):
            return ta is float and tb is float and math.isnan(a) and math.isnan(b)
        if a == b:
            return True
        return tol is not None and not math.isinf(a) and not math.isinf(b) and abs(a - b) <= tol
    if ta is not tb:
        return False
    if ta is list:
        return len(a) == len(b) and all(same_canonical(x, y, tol) for x, y in zip(a, b))
    if ta is dict:
        return a.keys() == b.keys() and all(same_canonical(a[k], b[k], tol) for k in a)
    return a == b
