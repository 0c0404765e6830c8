"""The change envelope of message and file sinks (Debezium-style), its encodings,
and the stable change ids and message keys of message sinks.

Envelope (see docs/sinks-messages.md)::

    {"before", "after", "op", "ts_ms",
     "source": {"connector", "name", "db", "schema", "table", "position",
                "lsn" (postgres) | "seq" (others) | "gtid", "file", "pos",
                "server_id" (mysql), "snapshot", "ts_ms", "txId"}}

JSON form (``to_json``): numerics that JSON floats would round (Decimal, NaN,
Infinity) as strings, temporal values in ISO 8601, bytes in base64. The msgpack
form (``to_msgpack``) keeps ints, floats, str, bytes, bool and None native and
turns everything else into the same strings as the JSON form.
"""

from __future__ import annotations

import base64
import json
import math
import time
from datetime import date, datetime, timedelta
from datetime import time as dtime
from decimal import Decimal
from typing import Any

import msgpack
from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Change, Position, TableSchema, row_dict

# Debezium's connector names where ours differ
_CONNECTORS = {"postgres": "postgresql"}
_INT64_MIN, _UINT64_MAX = -(1 << 63), (1 << 64) - 1


def _json_default(v: Any) -> Any:
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, datetime | date | dtime):
        return v.isoformat()
    if isinstance(v, timedelta):
        return v.total_seconds()
    if isinstance(v, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(v)).decode("ascii")
    if isinstance(v, set | frozenset | tuple):
        return list(v)
    return str(v)  # UUID, ipaddress, enum values


def _safe_floats(row: dict[str, Any] | None) -> dict[str, Any] | None:
    # JSON has no NaN/Infinity: those floats travel as strings like numerics do.
    if row is None:
        return None
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            row[k] = str(v)
    return row


def _mysql_fields(pos: Position) -> dict[str, Any]:
    """``file``, ``pos``, ``gtid``, ``server_id`` from a mysql position's tag."""
    from dataflare.cdc.mysql.positions import parse

    try:
        p = parse(pos)
    except FatalError:  # a position without a binlog coordinate (none yet)
        return {"file": None, "pos": None, "gtid": None}
    return {"file": p.file, "pos": p.pos, "gtid": p.gtid or None, "server_id": p.server_id}


def source_info(change: Change, source_name: str) -> dict[str, Any]:
    """The envelope's ``source`` block.

    ``db`` is the database when the change names it: MySQL's schema is its
    database; a PostgreSQL change does not carry its database name, so ``db`` is
    None there (``name`` is the workflow's source name).
    """
    pos = change.position
    src: dict[str, Any] = {
        "connector": _CONNECTORS.get(pos.kind, pos.kind),
        "name": source_name,
        "db": change.table.schema if pos.kind == "mysql" else None,
        "schema": change.table.schema,
        "table": change.table.name,
        "position": str(pos),
        "snapshot": change.op.value == "r",
        "ts_ms": change.commit_ts_us // 1000 if change.commit_ts_us is not None else None,
        "txId": change.xid,
    }
    if pos.kind == "postgres":
        src["lsn"] = pos.value
    else:
        src["seq"] = pos.value
    if pos.kind == "mysql":
        src.update(_mysql_fields(pos))
    elif pos.tag:
        src["tag"] = pos.tag
    return src


def envelope(
    change: Change, schema: TableSchema, source_name: str, ts_ms: int | None = None
) -> dict[str, Any]:
    """The Debezium-style envelope of one change; ``ts_ms`` is when DataFlare
    handled it (now, unless given)."""
    return {
        "before": _safe_floats(row_dict(schema, change.before)),
        "after": _safe_floats(row_dict(schema, change.after)),
        "op": change.op.value,
        "ts_ms": time.time_ns() // 1_000_000 if ts_ms is None else ts_ms,
        "source": source_info(change, source_name),
    }


def to_json(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, ensure_ascii=False, separators=(",", ":"))


def _msgpack_default(v: Any) -> Any:
    if isinstance(v, int):  # beyond 64 bits
        return str(v)
    if isinstance(v, bytearray | memoryview):
        return bytes(v)
    if isinstance(v, bytes):
        return v
    return _json_default(v)


def _native(v: Any) -> Any:
    # msgpack raises OverflowError (never calls ``default``) for ints beyond 64 bits
    if isinstance(v, int) and not isinstance(v, bool) and not _INT64_MIN <= v <= _UINT64_MAX:
        return str(v)
    if isinstance(v, dict):
        return {k: _native(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_native(x) for x in v]
    return v


def to_msgpack(env: dict[str, Any]) -> bytes:
    """The compact form of an envelope: same keys, values native where msgpack
    has a type for them (bytes stay bytes), else their JSON-form strings."""
    try:
        packed = msgpack.packb(env, default=_msgpack_default, use_bin_type=True)
    except OverflowError:
        packed = msgpack.packb(_native(env), default=_msgpack_default, use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


def from_msgpack(data: bytes) -> Any:
    """Decode ``to_msgpack`` output (for consumers and tests)."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def encode(env: dict[str, Any], fmt: str) -> bytes:
    """An envelope as ``json`` (UTF-8) or ``msgpack`` bytes."""
    return to_msgpack(env) if fmt == "msgpack" else to_json(env).encode()


# ------------------------------------------------------------------ ids and keys


def change_id(workflow: str, source: str, change: Change, ordinal: int) -> str:
    """A stable id of one change: ``<workflow>/<source>/<position value>/<ordinal>``,
    ``ordinal`` counting the changes of its source transaction from 0 (see
    :class:`TxnOrdinals`). A replay re-reads whole transactions from the same
    positions, so it reproduces the same ids (JetStream ``Nats-Msg-Id``)."""
    return f"{workflow}/{source}/{change.position.value}/{ordinal}"


class TxnOrdinals:
    """Numbers the changes of each source transaction 0, 1, 2… across batches.

    All changes of a transaction carry the same position (its commit), so a new
    position starts a new transaction. A PostgreSQL transaction too large to hold
    is sent in parts tagged ``partial`` (position: BEGIN's final LSN + 1) before
    its commit position: a change with the same ``xid`` right after a ``partial``
    one continues the count. A tracker starts fresh with each apply process, whose
    first change is always the start of a transaction (resume points are
    transaction boundaries), so counts are the same on every replay.
    """

    __slots__ = ("_last", "_next", "_partial")

    def __init__(self) -> None:
        self._last: tuple[int | None, int] | None = None  # (xid, position value)
        self._next = 0
        self._partial = False

    def state(self) -> tuple[Any, ...]:
        return (self._last, self._next, self._partial)

    def restore(self, state: tuple[Any, ...]) -> None:
        """Roll back to a ``state()`` (a batch that was not written after all)."""
        self._last, self._next, self._partial = state

    def next(self, change: Change) -> int:
        ident = (change.xid, change.position.value)
        last = self._last
        same = ident == last or (
            self._partial and last is not None and change.xid is not None and change.xid == last[0]
        )
        if not same:
            self._next = 0
        self._last, self._partial = ident, change.position.tag == "partial"
        n = self._next
        self._next += 1
        return n


def key_values(change: Change, schema: TableSchema) -> tuple[Any, ...] | None:
    """The primary-key values of a change (from ``key``, else the row), None
    for a table without primary key."""
    if not schema.key:
        return None
    if change.key is not None:
        return tuple(change.key)
    row = change.after if change.after is not None else change.before
    if row is None:
        return None
    return tuple(row[i] for i in schema.key_indexes())


def key_of(change: Change, schema: TableSchema) -> str:
    """The message key: a JSON object of the primary-key columns, such as
    ``{"id":5}`` (Debezium's key struct), or "" for a table without primary key
    and for a truncate."""
    values = key_values(change, schema)
    if values is None:
        return ""
    return to_json(dict(zip(schema.key, values, strict=True)))


def text_value(v: Any) -> str:
    """A value in the text form of Redis hash fields: the envelope's JSON form
    without quotes (``true``/``false``, ISO 8601, base64 bytes, JSON for arrays and
    documents)."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float | Decimal):
        return str(v)
    if isinstance(v, dict | list | tuple):
        return to_json(v)
    out = _json_default(v)
    return out if isinstance(out, str) else str(out)
