"""Values in transformations: text form, casts and unchanged (TOAST) columns.

The text form is what ``cast: text``, the mask methods and lookup keys use:
strings as they are, ``true``/``false``, numbers in decimal, temporal values in
ISO 8601, bytes as PostgreSQL's ``\\x`` hex, json values as compact JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Change, Column, Op, TableSchema

_new_tuple = tuple.__new__
_NO_COLUMNS: frozenset[str] = frozenset()

# PostgreSQL OIDs of the types transformations produce: sinks read ``type_oid`` to
# tell a PostgreSQL type name from a MySQL one.
TYPE_OIDS: dict[str, int] = {
    "text": 25,
    "integer": 23,
    "bigint": 20,
    "numeric": 1700,
    "double precision": 701,
    "boolean": 16,
    "date": 1082,
    "timestamp": 1114,
    "timestamptz": 1184,
    "jsonb": 3802,
}
JSON_OIDS = frozenset({114, 3802})


def column(name: str, type_name: str, nullable: bool = True) -> Column:
    return Column(name, type_name, nullable, TYPE_OIDS.get(type_name, 0))


def _json_default(v: Any) -> Any:
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, datetime | date | time):
        return v.isoformat()
    if isinstance(v, bytes | bytearray | memoryview):
        return "\\x" + bytes(v).hex()
    if isinstance(v, set | frozenset | tuple):
        return list(v)
    return str(v)


def text_form(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | Decimal):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return repr(v)
    if isinstance(v, datetime | date | time):
        return v.isoformat()
    if isinstance(v, bytes | bytearray | memoryview):
        return "\\x" + bytes(v).hex()
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"), default=_json_default, ensure_ascii=False)
    return str(v)  # UUID, ipaddress, timedelta


class CastError(FatalError):
    pass


def _fail(target: str, v: Any) -> CastError:
    # The value itself stays out of the message: it may be personal data.
    return CastError(f"cannot convert a {type(v).__name__} value to {target}")


def _to_int(bits: int) -> Callable[[Any], Any]:
    name = "integer" if bits == 32 else "bigint"
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1

    def cast(v: Any) -> Any:
        if v is None:
            return None
        try:
            if isinstance(v, bool):
                r = int(v)
            elif isinstance(v, int):
                r = v
            elif isinstance(v, float):
                r = round(v)  # half to even, as PostgreSQL's rint
            elif isinstance(v, Decimal):
                r = int(v.to_integral_value(ROUND_HALF_UP))
            elif isinstance(v, str):
                r = int(v.strip())
            else:
                raise _fail(name, v)
        except (ValueError, OverflowError, InvalidOperation):
            raise _fail(name, v) from None
        if not lo <= r <= hi:
            raise CastError(f"value out of range for {name}")
        return r

    return cast


def _to_numeric(v: Any) -> Any:
    if v is None or isinstance(v, Decimal):
        return v
    try:
        if isinstance(v, bool):
            raise _fail("numeric", v)
        if isinstance(v, int):
            return Decimal(v)
        if isinstance(v, float):
            return Decimal(repr(v)) if math.isfinite(v) else Decimal(v)
        if isinstance(v, str):
            return Decimal(v.strip())
    except InvalidOperation:
        pass
    raise _fail("numeric", v)


def _to_double(v: Any) -> Any:
    if v is None or isinstance(v, float):
        return v
    if isinstance(v, int | Decimal | str) and not isinstance(v, bool):
        try:
            return float(v)
        except (ValueError, OverflowError):
            pass
    raise _fail("double precision", v)


_TRUE = frozenset({"t", "true", "y", "yes", "on", "1"})
_FALSE = frozenset({"f", "false", "n", "no", "off", "0"})


def _to_bool(v: Any) -> Any:
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v != 0
    if isinstance(v, str):
        s = v.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
    raise _fail("boolean", v)


def _parse_datetime(v: Any, target: str) -> datetime:
    """An aware or naive datetime from a value; numbers are Unix epoch seconds."""
    if isinstance(v, datetime):
        return v
    if isinstance(v, date):
        return datetime(v.year, v.month, v.day)
    if isinstance(v, int | float | Decimal) and not isinstance(v, bool):
        try:
            return datetime.fromtimestamp(float(v), UTC)
        except (ValueError, OverflowError, OSError):
            raise _fail(target, v) from None
    if isinstance(v, str):
        try:
            return datetime.fromisoformat(v.strip())
        except ValueError:
            pass
    raise _fail(target, v)


def _to_timestamptz(v: Any) -> Any:
    if v is None:
        return None
    d = _parse_datetime(v, "timestamptz")
    return d if d.tzinfo is not None else d.replace(tzinfo=UTC)


def _to_timestamp(v: Any) -> Any:
    if v is None:
        return None
    d = _parse_datetime(v, "timestamp")
    return d if d.tzinfo is None else d.astimezone(UTC).replace(tzinfo=None)


def _to_date(v: Any) -> Any:
    if v is None or (isinstance(v, date) and not isinstance(v, datetime)):
        return v
    if isinstance(v, str):
        try:
            return date.fromisoformat(v.strip())
        except ValueError:
            pass
    d = _parse_datetime(v, "date")
    return (d.astimezone(UTC) if d.tzinfo is not None else d).date()


def _to_jsonb(v: Any) -> Any:
    # A str is JSON text (the postgres source hands json values over that way):
    # checked, then kept as it is. Other values become JSON when a sink writes them.
    if isinstance(v, str):
        try:
            json.loads(v)
        except ValueError:
            raise CastError("cannot convert a str value to jsonb: not JSON text") from None
        return v
    if isinstance(v, bytes | bytearray | memoryview | timedelta):
        raise _fail("jsonb", v)
    return v


CASTS: dict[str, Callable[[Any], Any]] = {
    "text": text_form,
    "integer": _to_int(32),
    "bigint": _to_int(64),
    "numeric": _to_numeric,
    "double precision": _to_double,
    "boolean": _to_bool,
    "date": _to_date,
    "timestamp": _to_timestamp,
    "timestamptz": _to_timestamptz,
    "jsonb": _to_jsonb,
}


def known_before(change: Change, names: Sequence[str]) -> Change:
    """``change`` with the unchanged columns that its old row holds filled in.

    With REPLICA IDENTITY FULL the old row carries every value, detoasted; a value
    left out as unchanged is never NULL (NULLs are not toasted), so a None in the
    old row means it is not known (a key-only old row)."""
    before, after = change.before, change.after
    if before is None or after is None:
        return change
    idx = {n: i for i, n in enumerate(names)}
    filled = [n for n in change.unchanged if before[idx[n]] is not None]
    if not filled:
        return change
    row = list(after)
    for n in filled:
        row[idx[n]] = before[idx[n]]
    return change._replace(after=tuple(row), unchanged=change.unchanged.difference(filled))


def read_columns(fields: frozenset[str], names: Sequence[str]) -> frozenset[str]:
    """The columns an expression reads: a dotted field (``user.email``) reads the
    longest leading part that names a column (the json column ``user``)."""
    cols = set()
    for f in fields:
        parts = f.split(".")
        for n in range(len(parts), 0, -1):
            name = ".".join(parts[:n])
            if name in names:
                cols.add(name)
                break
    return frozenset(cols)


def delete_maker(schema: TableSchema, node: str) -> Callable[[Change], Change]:
    """For a filter or route in front of a mirror: the delete that removes the row
    an update left behind (its old key, or the whole old row of a keyless table)."""
    kidx = schema.key_indexes()
    width = len(schema.columns)
    keyless = not schema.key
    table = schema.table

    def as_delete(c: Change) -> Change:
        before = c[4]
        if before is None:
            if keyless:
                raise FatalError(
                    f"{node}: an update of {table} (no primary key) came without its "
                    f"old row; set REPLICA IDENTITY FULL on {table}"
                )
            # The key did not change (else the source sends the old key): the
            # key-only old row is built from the new row.
            after = c[5]
            assert after is not None
            row: list[Any] = [None] * width
            for i in kidx:
                row[i] = after[i]
            before = tuple(row)
        key = tuple([before[i] for i in kidx]) if kidx else None
        return _new_tuple(Change, (Op.DELETE, c[1], c[2], key, before, None, _NO_COLUMNS, *c[7:]))

    return as_delete


def unknown_unchanged(node: str, table: object) -> FatalError:
    return FatalError(
        f"{node}: an update of {table} left out a column the expression reads (an "
        "unchanged TOASTed value, not sent by PostgreSQL) and its old row does not "
        f"hold it either; run ALTER TABLE {table} REPLICA IDENTITY FULL so old rows "
        "carry every column"
    )
