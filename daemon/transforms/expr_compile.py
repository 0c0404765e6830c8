"""Code generation for the expression language, and the runtime it calls.

Python source is generated from the validated tree only: a field becomes a tuple
index (``r[3]``), every literal other than an int, bool or None is a name in a
constants namespace, every function is a helper from the fixed table below.
The source is compiled once per (expression, columns) and executed with empty
``__builtins__``: user text never reaches ``compile()``.

Each boolean node is generated in three modes so that SQL's three-valued logic
stays exact without a per-row function call: ``truth`` (an expression that is
truthy iff the node is true), ``falsity`` (iff it is false) and ``value`` (True,
False or None). ``not`` swaps truth and falsity; ``and``/``or`` join them.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from dataflare.cdc.errors import FatalError
from dataflare.daemon.transforms.expr_parse import (
    ISO_DATE,
    TEMPORAL,
    Arith,
    Call,
    Cmp,
    Field,
    InList,
    Lit,
    Logic,
    Match,
    Neg,
    Node,
    Not,
    looks_temporal,
    parse_iso,
)

Row = tuple[Any, ...]
BatchFn = Callable[[Sequence[Row | None], datetime | None], list[Any]]


class UnknownField(FatalError):
    """A field of an expression matches no column of the table it is applied to."""


class EvaluationError(FatalError):
    """An expression failed on a row (types that do not fit, division by zero).
    The message names the expression and the types, never a row value."""


class Fail(Exception):
    """Raised by helpers; turned into EvaluationError with the expression text."""


# -- runtime helpers -------------------------------------------------------------

_DEC = Context(prec=38)  # private: the thread's decimal context is left alone
_TYPE_NAMES = {
    "str": "string",
    "int": "integer",
    "float": "float",
    "Decimal": "decimal",
    "bool": "bool",
    "datetime": "timestamp",
    "date": "date",
    "NoneType": "null",
    "dict": "object",
    "list": "array",
}


def type_name(name: str) -> str:
    return _TYPE_NAMES.get(name, name)


def _tname(v: Any) -> str:
    return type_name(type(v).__name__)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float | Decimal) and not isinstance(v, bool)


def _num_pair(sym: str, a: Any, b: Any) -> tuple[Any, Any]:
    if not (_is_num(a) and _is_num(b)):
        raise Fail(f"cannot apply {sym!r} to {_tname(a)} and {_tname(b)}")
    if isinstance(a, float) and isinstance(b, Decimal):
        return Decimal(repr(a)), b  # repr: the shortest text that reads back as a
    if isinstance(b, float) and isinstance(a, Decimal):
        return a, Decimal(repr(b))
    return a, b


def h_add(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return None
    if isinstance(a, str) and isinstance(b, str):
        return a + b
    a, b = _num_pair("+", a, b)
    return _DEC.add(a, b) if isinstance(a, Decimal) or isinstance(b, Decimal) else a + b


def h_sub(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return None
    a, b = _num_pair("-", a, b)
    return _DEC.subtract(a, b) if isinstance(a, Decimal) or isinstance(b, Decimal) else a - b


def h_mul(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return None
    a, b = _num_pair("*", a, b)
    return _DEC.multiply(a, b) if isinstance(a, Decimal) or isinstance(b, Decimal) else a * b


def h_div(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return None
    a, b = _num_pair("/", a, b)
    if b == 0:
        raise Fail("division by zero")
    if isinstance(a, float) or isinstance(b, float):
        return a / b
    return _DEC.divide(Decimal(a), Decimal(b))  # int / int is exact as far as it can be


def h_mod(a: Any, b: Any) -> Any:
    """Remainder with the sign of the dividend, as in SQL (-7 % 3 == -1)."""
    if a is None or b is None:
        return None
    a, b = _num_pair("%", a, b)
    if b == 0:
        raise Fail("division by zero")
    if isinstance(a, Decimal) or isinstance(b, Decimal):
        return _DEC.remainder(Decimal(a), Decimal(b))
    if isinstance(a, float) or isinstance(b, float):
        return math.fmod(a, b)
    r = abs(a) % abs(b)
    return -r if a < 0 else r


def h_neg(a: Any) -> Any:
    if a is None:
        return None
    if not _is_num(a):
        raise Fail(f"cannot negate {_tname(a)}")
    return a.copy_negate() if isinstance(a, Decimal) else -a


@lru_cache(maxsize=256)
def _iso(s: str) -> date | datetime:
    try:
        return parse_iso(s)
    except ValueError:
        raise Fail("a string that is not an ISO 8601 date/time was compared with one") from None


def _align(a: Any, b: Any) -> tuple[Any, Any]:
    """Operands of different types made comparable where that is meaningful."""
    if isinstance(a, str) and isinstance(b, date):
        a = _iso(a)
    elif isinstance(b, str) and isinstance(a, date):
        b = _iso(b)
    if isinstance(a, date) and isinstance(b, date):
        if isinstance(a, datetime) and not isinstance(b, datetime):
            b = datetime(b.year, b.month, b.day, tzinfo=a.tzinfo)
        elif isinstance(b, datetime) and not isinstance(a, datetime):
            a = datetime(a.year, a.month, a.day, tzinfo=b.tzinfo)
        if isinstance(a, datetime) and isinstance(b, datetime):
            a_naive, b_naive = a.utcoffset() is None, b.utcoffset() is None
            if a_naive and not b_naive:
                a = a.replace(tzinfo=UTC)  # a timestamp without time zone is taken as UTC
            elif b_naive and not a_naive:
                b = b.replace(tzinfo=UTC)
        return a, b
    if isinstance(a, float) and isinstance(b, Decimal):
        return Decimal(repr(a)), b
    if isinstance(b, float) and isinstance(a, Decimal):
        return a, Decimal(repr(b))
    return a, b


def h_cmp(fn: Callable[[Any, Any], bool], a: Any, b: Any) -> bool:
    """A comparison of two non-null values whose types are not known statically."""
    if a.__class__ is not b.__class__ or isinstance(a, datetime):  # naive with aware
        a, b = _align(a, b)
    try:
        return fn(a, b)
    except TypeError:
        raise Fail(f"cannot compare {_tname(a)} with {_tname(b)}") from None


def _str_arg(fname: str, v: Any) -> str:
    if not isinstance(v, str):
        raise Fail(f"{fname}() needs a string, got {_tname(v)}")
    return v


def _int_arg(fname: str, v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, float | Decimal) and v == v and v not in (math.inf, -math.inf) and v == int(v):
        return int(v)
    raise Fail(f"{fname}() needs a whole number, got {_tname(v)}")


def f_upper(s: Any) -> Any:
    return None if s is None else _str_arg("upper", s).upper()


def f_lower(s: Any) -> Any:
    return None if s is None else _str_arg("lower", s).lower()


def f_trim(s: Any) -> Any:
    return None if s is None else _str_arg("trim", s).strip()


def f_length(s: Any) -> Any:
    return None if s is None else len(_str_arg("length", s))


def f_substr(s: Any, start: Any, length: Any = ...) -> Any:
    """SQL substr: 1-based ``start`` (may be 0 or negative), optional length."""
    if s is None or start is None or length is None:
        return None
    text = _str_arg("substr", s)
    begin = _int_arg("substr", start) - 1
    if length is ...:
        return text[max(begin, 0) :]
    count = _int_arg("substr", length)
    if count < 0:
        raise Fail("substr() needs a length of 0 or more")
    return text[max(begin, 0) : max(begin + count, 0)]


def f_replace(s: Any, old: Any, new: Any) -> Any:
    if s is None or old is None or new is None:
        return None
    text, old, new = _str_arg("replace", s), _str_arg("replace", old), _str_arg("replace", new)
    return text.replace(old, new) if old else text


def f_starts_with(s: Any, p: Any) -> Any:
    if s is None or p is None:
        return None
    return _str_arg("starts_with", s).startswith(_str_arg("starts_with", p))


def f_ends_with(s: Any, p: Any) -> Any:
    if s is None or p is None:
        return None
    return _str_arg("ends_with", s).endswith(_str_arg("ends_with", p))


def f_contains(s: Any, p: Any) -> Any:
    if s is None or p is None:
        return None
    return _str_arg("contains", p) in _str_arg("contains", s)


def h_match(search: Callable[[str], Any], s: Any, negated: bool) -> Any:
    if s is None:
        return None
    if not isinstance(s, str):
        raise Fail(f"a regular expression needs a string, got {_tname(s)}")
    return (search(s) is None) if negated else (search(s) is not None)


def _json_default(v: Any) -> Any:
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, date | time):
        return v.isoformat()
    if isinstance(v, bytes | bytearray | memoryview):
        return "\\x" + bytes(v).hex()
    if isinstance(v, set | frozenset):
        return list(v)
    return str(v)


def to_text(v: Any) -> str:
    """The text form used by str() and concat(): ISO 8601 dates, plain decimals,
    true/false, compact JSON for objects and arrays, PostgreSQL hex for bytes."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, Decimal):
        return format(v, "f") if v.is_finite() and -100 < v.adjusted() < 100 else str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, date | time):
        return v.isoformat()
    if isinstance(v, bytes | bytearray | memoryview):
        return "\\x" + bytes(v).hex()
    if isinstance(v, dict | list | tuple):
        return json.dumps(v, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    return str(v)


def f_concat(*parts: Any) -> Any:
    return "".join("" if p is None else to_text(p) for p in parts)


def f_abs(x: Any) -> Any:
    if x is None:
        return None
    if not _is_num(x):
        raise Fail(f"abs() needs a number, got {_tname(x)}")
    return x.copy_abs() if isinstance(x, Decimal) else abs(x)


def f_round(x: Any, digits: Any = 0) -> Any:
    """Half away from zero, as SQL rounds; keeps the type of ``x``."""
    if x is None or digits is None:
        return None
    if not _is_num(x):
        raise Fail(f"round() needs a number, got {_tname(x)}")
    n = _int_arg("round", digits)
    if isinstance(x, int) and n >= 0:
        return x
    if isinstance(x, float) and not math.isfinite(x):
        return x
    d = x if isinstance(x, Decimal) else Decimal(repr(x)) if isinstance(x, float) else Decimal(x)
    if not d.is_finite():
        return x
    out = d.quantize(Decimal(1).scaleb(-n), rounding=ROUND_HALF_UP, context=_DEC)
    if isinstance(x, int):
        return int(out)
    return float(out) if isinstance(x, float) else out


def f_floor(x: Any) -> Any:
    if x is None:
        return None
    if not _is_num(x):
        raise Fail(f"floor() needs a number, got {_tname(x)}")
    return math.floor(x)


def f_ceil(x: Any) -> Any:
    if x is None:
        return None
    if not _is_num(x):
        raise Fail(f"ceil() needs a number, got {_tname(x)}")
    return math.ceil(x)


def f_int(x: Any) -> Any:
    if x is None or (isinstance(x, int) and not isinstance(x, bool)):
        return x
    if isinstance(x, bool | float | Decimal):
        return int(x)  # truncates toward zero; nan/inf raise and become EvaluationError
    if isinstance(x, str):
        try:
            return int(x.strip())
        except ValueError:
            raise Fail("int() got a string that is not a whole number") from None
    raise Fail(f"int() cannot convert {_tname(x)}")


def f_float(x: Any) -> Any:
    if x is None or isinstance(x, float):
        return x
    if isinstance(x, int | Decimal):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x.strip())
        except ValueError:
            raise Fail("float() got a string that is not a number") from None
    raise Fail(f"float() cannot convert {_tname(x)}")


def f_decimal(x: Any) -> Any:
    if x is None or isinstance(x, Decimal):
        return x
    if isinstance(x, bool):
        return Decimal(int(x))
    if isinstance(x, int):
        return Decimal(x)
    if isinstance(x, float):
        return Decimal(repr(x))
    if isinstance(x, str):
        try:
            return Decimal(x.strip())
        except InvalidOperation:
            raise Fail("decimal() got a string that is not a number") from None
    raise Fail(f"decimal() cannot convert {_tname(x)}")


def f_str(x: Any) -> Any:
    return None if x is None else to_text(x)


_TRUE = frozenset({"true", "t", "yes", "y", "on", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "off", "0"})


def f_bool(x: Any) -> Any:
    if x is None or isinstance(x, bool):
        return x
    if _is_num(x):
        return x != 0
    if isinstance(x, str):
        word = x.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise Fail("bool() got a string that is not true/false/yes/no/on/off/1/0")
    raise Fail(f"bool() cannot convert {_tname(x)}")


def f_date(x: Any) -> Any:
    if x is None:
        return None
    if isinstance(x, datetime):
        return x.date()
    if isinstance(x, date):
        return x
    if isinstance(x, str):
        v = _iso(x)
        return v.date() if isinstance(v, datetime) else v
    raise Fail(f"date() cannot convert {_tname(x)}")


def f_timestamp(x: Any) -> Any:
    """Always timezone-aware: a value without time zone is taken as UTC."""
    if x is None:
        return None
    if isinstance(x, str):
        x = _iso(x)
    if isinstance(x, datetime):
        return x if x.utcoffset() is not None else x.replace(tzinfo=UTC)
    if isinstance(x, date):
        return datetime(x.year, x.month, x.day, tzinfo=UTC)
    if _is_num(x):
        try:
            return datetime.fromtimestamp(float(x), UTC)  # seconds since the Unix epoch
        except (OverflowError, OSError, ValueError):
            raise Fail("timestamp() got a number of seconds out of range") from None
    raise Fail(f"timestamp() cannot convert {_tname(x)}")


def h_path(v: Any, keys: tuple[str, ...]) -> Any:
    """``col.a.b``: keys into a dict, or into a JSON object held as text."""
    if isinstance(v, str | bytes | bytearray):
        try:
            v = json.loads(v, parse_float=Decimal)
        except ValueError:
            raise Fail("a field path goes into a column whose value is not JSON") from None
    for key in keys:
        if not isinstance(v, dict):
            return None
        v = v.get(key)
    return v


# name in the language -> helper (the generated code refers to these names only)
FUNCTION_IMPLS: dict[str, Callable[..., Any]] = {
    "upper": f_upper,
    "lower": f_lower,
    "trim": f_trim,
    "length": f_length,
    "substr": f_substr,
    "replace": f_replace,
    "starts_with": f_starts_with,
    "ends_with": f_ends_with,
    "contains": f_contains,
    "concat": f_concat,
    "abs": f_abs,
    "round": f_round,
    "floor": f_floor,
    "ceil": f_ceil,
    "int": f_int,
    "float": f_float,
    "decimal": f_decimal,
    "str": f_str,
    "bool": f_bool,
    "date": f_date,
    "timestamp": f_timestamp,
}
_ARITH = {"+": h_add, "-": h_sub, "*": h_mul, "/": h_div, "%": h_mod}
_PY_CMP = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_CMP_FN: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
HELPERS: dict[str, Any] = {
    "_float": float,
    "_h_cmp": h_cmp,
    "_h_match": h_match,
    "_h_path": h_path,
    "_h_neg": h_neg,
    **{f"_h_arith{i}": fn for i, fn in enumerate(_ARITH.values())},
    **{f"_f_{name}": fn for name, fn in FUNCTION_IMPLS.items()},
}
_ARITH_NAMES = {op: f"_h_arith{i}" for i, op in enumerate(_ARITH)}
_FUNC_NAMES = {name: f"_f_{name}" for name in FUNCTION_IMPLS}


# -- code generation ----------------------------------------------------------------


class Generator:
    """Python source for one tree bound to one column layout."""

    def __init__(self, text: str, fields: dict[str, tuple[int, tuple[str, ...]]]) -> None:
        self.text = text
        self.fields = fields  # field name -> (column index, path into its value)
        self.namespace: dict[str, Any] = {"__builtins__": {}, **HELPERS}
        self.n_consts = 0
        self.n_vars = 0
        self.uses_now = False

    def const(self, value: Any) -> str:
        if value is None or type(value) is bool:
            return repr(value)
        if type(value) is int:
            return f"({value!r})"  # only digits and a sign
        self.n_consts += 1
        name = f"_k{self.n_consts}"
        self.namespace[name] = value
        return name

    def tmp(self) -> str:
        self.n_vars += 1
        return f"_v{self.n_vars}"

    def source(self, root: Node, predicate: bool) -> str:
        body = (
            f"r is not None and {self.truth(root)}"
            if predicate
            else (f"None if r is None else {self.value(root)}")
        )
        return f"def _batch(rows, _now):\n    return [{body} for r in rows]\n"

    # -- an operand used after a null check: (check or None, code)
    def operand(self, node: Node) -> tuple[str | None, str]:
        if isinstance(node, Lit):
            return None, self.const(node.value)
        if isinstance(node, Field) and not self.fields[node.name][1]:
            code = f"r[{self.fields[node.name][0]}]"  # a second subscript is as cheap as a name
            return f"{code} is not None", code
        var = self.tmp()
        return f"({var} := {self.value(node)}) is not None", var

    @staticmethod
    def _guarded(checks: list[str | None], expr: str) -> str:
        parts = [c for c in checks if c is not None]
        return "(" + " and ".join([*parts, expr]) + ")"

    # -- truth / falsity of boolean nodes
    def truth(self, node: Node) -> str:
        if isinstance(node, Logic):
            sep = " and " if node.op == "and" else " or "
            return "(" + sep.join(self.truth(x) for x in node.operands) + ")"
        if isinstance(node, Not):
            return self.falsity(node.operand)
        if isinstance(node, Cmp | InList | Match):
            return self.predicate(node, True)
        return self.identity(node, "is", True)

    def falsity(self, node: Node) -> str:
        if isinstance(node, Logic):
            sep = " or " if node.op == "and" else " and "
            return "(" + sep.join(self.falsity(x) for x in node.operands) + ")"
        if isinstance(node, Not):
            return self.truth(node.operand)
        if isinstance(node, Cmp | InList | Match):
            return self.predicate(node, False)
        return self.identity(node, "is", False)

    def identity(self, node: Node, is_: str, singleton: bool | None) -> str:
        """``node is singleton``; folded for a literal (``5 is None`` warns in Python)."""
        if isinstance(node, Lit):
            return repr((node.value is singleton) == (is_ == "is"))
        return f"({self.value(node)} {is_} {singleton!r})"

    def predicate(self, node: Cmp | InList | Match, want: bool) -> str:
        """Truthy iff the comparison is ``want`` (never for a null operand)."""
        if isinstance(node, InList):
            values = _list_values(node.values)
            k = self.const(frozenset(values))
            positive = want != node.negated
            if positive:  # None is never in the set: no null check needed
                return f"({self.value(node.operand)} in {k})"
            check, code = self.operand(node.operand)
            return self._guarded([check], f"{code} not in {k}")
        if isinstance(node, Match):
            search = self.const(node.pattern.search)
            check, code = self.operand(node.operand)
            is_ = "is not" if want != node.negated else "is"
            return self._guarded([check], f"{search}({code}) {is_} None")
        return self.compare(node, want)

    def compare(self, node: Cmp, want: bool) -> str:
        op = node.op if want else _NEGATED[node.op]
        left, right = node.left, node.right
        null_side = _null_literal(left) or _null_literal(right)
        if null_side:
            if _null_literal(left) and _null_literal(right):
                return "True" if op == "==" else "False"
            other = right if _null_literal(left) else left
            return self.identity(other, "is" if op == "==" else "is not", None)
        lk, rk = _kind(left, right), _kind(right, left)
        if "plain" in (lk, rk):
            if op == "==":  # None never equals a literal: no null check needed
                a, b = self.value(left), self.value(right)
                return f"({a} == {b})"
            (lc, a), (rc, b) = self.operand(left), self.operand(right)
            return self._guarded([lc, rc], f"{a} {_PY_CMP[op]} {b}")
        (lc, a), (rc, b) = self.operand(left), self.operand(right)
        if "dec" in (lk, rk):  # a float compares with the float nearest to the literal
            lit = left if lk == "dec" else right
            other_code = b if lk == "dec" else a
            assert isinstance(lit, Lit)
            kf = self.const(float(lit.value))
            exact = f"{a} {_PY_CMP[op]} {b}"
            as_float = f"{kf} {_PY_CMP[op]} {b}" if lk == "dec" else f"{a} {_PY_CMP[op]} {kf}"
            expr = f"({exact} if {other_code}.__class__ is not _float else {as_float})"
            return self._guarded([lc, rc], expr)
        fn = self.const(_CMP_FN[op])
        return self._guarded([lc, rc], f"_h_cmp({fn}, {a}, {b})")

    # -- values
    def value(self, node: Node) -> str:
        if isinstance(node, Lit):
            return self.const(node.value)
        if isinstance(node, Field):
            index, path = self.fields[node.name]
            if not path:
                return f"r[{index}]"
            return f"_h_path(r[{index}], {self.const(path)})"
        if isinstance(node, Neg):
            return f"_h_neg({self.value(node.operand)})"
        if isinstance(node, Arith):
            return f"{_ARITH_NAMES[node.op]}({self.value(node.left)}, {self.value(node.right)})"
        if isinstance(node, Cmp | InList):
            t, f = self.predicate(node, True), self.predicate(node, False)
            return f"(True if {t} else False if {f} else None)"
        if isinstance(node, Match):
            search = self.const(node.pattern.search)
            return f"_h_match({search}, {self.value(node.operand)}, {node.negated!r})"
        if isinstance(node, Not):
            var = self.tmp()
            inner = self.value(node.operand)
            return f"(False if ({var} := {inner}) is True else True if {var} is False else None)"
        if isinstance(node, Logic):
            return self.logic_value(node)
        if isinstance(node, Call):
            return self.call(node)
        raise AssertionError(f"unknown node {type(node).__name__}")

    def logic_value(self, node: Logic) -> str:
        # and: false if any is false, else null if any is null; or: the dual
        stop, other = (False, True) if node.op == "and" else (True, False)
        names = [self.tmp() for _ in node.operands]
        first = " or ".join(
            f"({v} := {self.value(x)}) is {stop}" for v, x in zip(names, node.operands, strict=True)
        )
        rest = " and ".join(f"{v} is {other}" for v in names)
        return f"({stop} if {first} else {other} if {rest} else None)"

    def call(self, node: Call) -> str:
        name, args = node.name, node.args
        if name == "now":
            self.uses_now = True
            return "_now"
        if name == "is_null":
            return self.identity(args[0], "is", None)
        if name == "if":
            cond, a, b = args
            return f"({self.value(a)} if {self.truth(cond)} else {self.value(b)})"
        if name == "coalesce":
            code = self.value(args[-1])
            for arg in reversed(args[:-1]):
                var = self.tmp()
                code = f"({var} if ({var} := {self.value(arg)}) is not None else {code})"
            return code
        parts = ", ".join(self.value(a) for a in args)
        return f"{_FUNC_NAMES[name]}({parts})"


def _list_values(items: frozenset[Any]) -> frozenset[Any]:
    """An 'in' list with the equivalents a row value may hold: the float nearest
    to a decimal, the date or date-time an ISO 8601 string reads as."""
    out = set(items)
    for v in items:
        if isinstance(v, Decimal):
            out.add(float(v))
        elif isinstance(v, str) and ISO_DATE.match(v):
            try:
                t = parse_iso(v)
            except ValueError:
                continue
            out.add(t)
            if isinstance(t, datetime) and t.utcoffset() is None:
                out.add(t.replace(tzinfo=UTC))  # the same instant in a timestamptz column
    return frozenset(out)


_NEGATED = {"==": "!=", "!=": "==", "<": ">=", "<=": ">", ">": "<=", ">=": "<"}


def _null_literal(node: Node) -> bool:
    return isinstance(node, Lit) and node.value is None


def _kind(node: Node, other: Node) -> str:
    """How a comparison operand can be compiled: "plain" (a literal Python compares
    directly), "dec" (a decimal literal: floats need care) or "expr"."""
    if not isinstance(node, Lit):
        return "expr"
    if isinstance(node.value, Decimal):
        return "dec"
    if isinstance(node.value, str) and (looks_temporal(node) or other.ty in TEMPORAL):
        return "expr"  # may meet a date/time at runtime: aligned by h_cmp
    return "plain"


# -- errors raised inside generated code ---------------------------------------------

_QUOTED = re.compile(r"'(?:\w+\.)*(\w+)'")  # 'datetime.datetime' -> datetime
_BETWEEN = re.compile(r"instances of '(?:\w+\.)*(\w+)' and '(?:\w+\.)*(\w+)'")


def describe_failure(e: BaseException) -> str:
    """What went wrong, without the row values an exception's text may hold."""
    if isinstance(e, Fail):
        return str(e)
    if isinstance(e, ZeroDivisionError):
        return "division by zero"
    if isinstance(e, IndexError):
        return "the row has fewer values than the table has columns"
    if isinstance(e, TypeError):
        msg = str(e)
        between = _BETWEEN.search(msg)
        if between:
            return f"cannot compare {type_name(between[1])} with {type_name(between[2])}"
        names = [type_name(n) for n in _QUOTED.findall(msg)]
        if "unhashable type" in msg and names:
            return f"cannot look up a {names[0]} value in an 'in' list"
        if "expected string" in msg:
            return (
                f"a regular expression needs a string, got {names[-1] if names else 'another type'}"
            )
        return "operand types do not fit" + (f" ({', '.join(names)})" if names else "")
    if isinstance(e, RecursionError):
        return "a value is nested too deeply"
    return f"{type(e).__name__} while evaluating"


def compile_batch(gen: Generator, root: Node, predicate: bool) -> BatchFn:
    source = gen.source(root, predicate)
    code = compile(source, "<expression>", "exec")
    exec(code, gen.namespace)  # generated from the validated tree, see the module doc
    fn: BatchFn = gen.namespace["_batch"]
    return fn
