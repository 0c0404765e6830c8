"""The change envelope: Debezium shape, msgpack form, change ids and keys."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime
from decimal import Decimal

from dataflare.cdc.model import Change, Column, Op, Position, TableId, TableSchema
from dataflare.cdc.mysql.positions import stream_position
from dataflare.sinks.envelope import (
    TxnOrdinals,
    change_id,
    envelope,
    from_msgpack,
    key_of,
    text_value,
    to_json,
    to_msgpack,
)

T = TableId("public", "orders")
SCHEMA = TableSchema(
    T,
    (
        Column("id", "bigint", False),
        Column("region", "text", False),
        Column("amount", "numeric"),
        Column("at", "timestamptz"),
        Column("blob", "bytea"),
        Column("ratio", "double precision"),
    ),
    ("id", "region"),
)
AT = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
ROW = (5, "eu", Decimal("12.50"), AT, b"\x00\xff", 0.5)


def pg_change(op: Op = Op.UPDATE, lsn: int = 0x16B3748, **kw: object) -> Change:
    args: dict[str, object] = {
        "op": op,
        "table": T,
        "position": Position("postgres", lsn),
        "key": (5, "eu"),
        "before": (5, "eu", None, None, None, None),
        "after": ROW,
        "xid": 777,
        "commit_ts_us": 1_700_000_000_123_456,
    }
    args.update(kw)
    return Change(**args)  # type: ignore[arg-type]


def test_debezium_shape_for_postgres() -> None:
    env = envelope(pg_change(), SCHEMA, "shop", ts_ms=42)
    assert set(env) == {"before", "after", "op", "ts_ms", "source"}
    assert env["op"] == "u" and env["ts_ms"] == 42
    assert env["after"] == dict(zip(SCHEMA.column_names, ROW, strict=True))
    assert env["before"]["amount"] is None
    src = env["source"]
    assert src["connector"] == "postgresql"
    assert src["name"] == "shop"
    assert src["db"] is None  # a pgoutput change does not name its database
    assert (src["schema"], src["table"]) == ("public", "orders")
    assert src["lsn"] == 0x16B3748 and src["position"] == "0/16B3748"
    assert src["ts_ms"] == 1_700_000_000_123 and src["txId"] == 777
    assert src["snapshot"] is False


def test_json_form() -> None:
    nan_row = (*ROW[:5], math.nan)
    line = json.loads(to_json(envelope(pg_change(after=nan_row), SCHEMA, "shop")))
    after = line["after"]
    assert after["amount"] == "12.50"
    assert after["at"] == "2026-01-02T03:04:05.600000+00:00"
    assert after["blob"] == "AP8="
    assert after["ratio"] == "nan"


def test_mysql_source_block() -> None:
    pos = stream_position("mysql-bin.000003", 1234, "0-1-57", "server_id=1")
    c = Change(Op.INSERT, TableId("shop", "orders"), pos, (5, "eu"), None, ROW, xid=9)
    src = envelope(c, SCHEMA, "my")["source"]
    assert src["connector"] == "mysql"
    assert src["db"] == "shop"
    assert (src["file"], src["pos"], src["gtid"], src["server_id"]) == (
        "mysql-bin.000003",
        1234,
        "0-1-57",
        1,
    )
    assert src["seq"] == pos.value


def test_generate_keeps_seq() -> None:
    c = Change(Op.READ, T, Position("generate", 70), (5, "eu"), None, ROW, xid=7)
    src = envelope(c, SCHEMA, "gen")["source"]
    assert src["connector"] == "generate" and src["seq"] == 70 and src["db"] is None
    assert src["snapshot"] is True


def test_msgpack_round_trip_keeps_native_values() -> None:
    env = envelope(pg_change(), SCHEMA, "shop", ts_ms=1)
    back = from_msgpack(to_msgpack(env))
    assert back["after"]["id"] == 5
    assert back["after"]["blob"] == b"\x00\xff"  # bytes stay bytes
    assert back["after"]["ratio"] == 0.5
    assert back["after"]["amount"] == "12.50"
    assert back["after"]["at"] == AT.isoformat()
    assert back["source"] == json.loads(to_json(env["source"]))
    # beyond 64 bits: a string, like numerics
    big = envelope(pg_change(after=(1 << 70, *ROW[1:])), SCHEMA, "shop", ts_ms=1)
    assert from_msgpack(to_msgpack(big))["after"]["id"] == str(1 << 70)
    # smaller than JSON for the same envelope
    assert len(to_msgpack(env)) < len(to_json(env).encode())


def test_change_id_is_stable_and_unique() -> None:
    changes = [pg_change(lsn=100, key=(i, "eu")) for i in range(3)]
    changes += [pg_change(lsn=200, key=(i, "eu"), xid=778) for i in range(2)]

    def ids() -> list[str]:
        o = TxnOrdinals()
        return [change_id("wf", "shop", c, o.next(c)) for c in changes]

    first = ids()
    assert first == ids()  # a replay from the same transaction boundary
    assert first[0] == "wf/shop/100/0"
    assert first[2] == "wf/shop/100/2" and first[3] == "wf/shop/200/0"
    assert len(set(first)) == len(first)


def test_ordinals_continue_across_batches_and_partial_parts() -> None:
    o = TxnOrdinals()
    partial = Position("postgres", 501, "partial")
    spilled = [pg_change(position=partial, xid=9) for _ in range(3)]
    rest = [pg_change(position=Position("postgres", 640), xid=9) for _ in range(2)]
    after = pg_change(position=Position("postgres", 700), xid=10)
    assert [o.next(c) for c in spilled[:2]] == [0, 1]  # first incomplete batch
    assert [o.next(c) for c in spilled[2:]] == [2]  # second incomplete batch
    assert [o.next(c) for c in rest] == [3, 4]  # the commit's batch
    assert o.next(after) == 0
    saved = o.state()
    assert o.next(after) == 1
    o.restore(saved)
    assert o.next(after) == 1


def test_key_of() -> None:
    assert key_of(pg_change(), SCHEMA) == '{"id":5,"region":"eu"}'
    deleted = pg_change(Op.DELETE, key=None, before=ROW, after=None)
    assert key_of(deleted, SCHEMA) == '{"id":5,"region":"eu"}'
    keyless = TableSchema(T, SCHEMA.columns, ())
    assert key_of(pg_change(), keyless) == ""


def test_text_values() -> None:
    assert text_value(True) == "true"
    assert text_value(Decimal("1.10")) == "1.10"
    assert text_value(date(2026, 1, 2)) == "2026-01-02"
    assert text_value({"a": [1, 2]}) == '{"a":[1,2]}'
    assert text_value(b"\x00") == "AA=="
