"""The change envelope of message and file sinks (Debezium-style).

``{"before", "after", "op", "ts_ms", "source": {"connector", "name", "schema",
"table", "position", "lsn" | "seq", "ts_ms", "txId"}}``; values in JSON form:
numerics that JSON floats would round (Decimal, NaN, Infinity) as strings,
temporal values in ISO 8601, bytes in base64.
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

from dataflare.cdc.model import Change, TableSchema, row_dict


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


def envelope(change: Change, schema: TableSchema, source_name: str) -> dict[str, Any]:
    pos = change.position
    src: dict[str, Any] = {
        "connector": pos.kind,
        "name": source_name,
        "schema": change.table.schema,
        "table": change.table.name,
        "position": str(pos),
        "ts_ms": change.commit_ts_us // 1000 if change.commit_ts_us is not None else None,
        "txId": change.xid,
    }
    src["lsn" if pos.kind == "postgres" else "seq"] = pos.value
    if pos.tag:
        src["tag"] = pos.tag
    return {
        "before": _safe_floats(row_dict(schema, change.before)),
        "after": _safe_floats(row_dict(schema, change.after)),
        "op": change.op.value,
        "ts_ms": time.time_ns() // 1_000_000,
        "source": src,
    }


def to_json(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, ensure_ascii=False, separators=(",", ":"))
