"""The `mysql` destination with sources of other databases' types, and append mode."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from dataflare.cdc.generate import GenerateConfig
from dataflare.cdc.generate_source import GenerateSource, expected_rows
from dataflare.cdc.model import Batch, Change, Column, Op, Position, TableId, TableSchema
from dataflare.sinks.base import SinkContext
from dataflare.sinks.configs import MysqlSinkConfig
from dataflare.sinks.mysql import MysqlSink, mysql_type

from tests.servers import MariaDBServer

pytestmark = pytest.mark.integration


@pytest.fixture
def target(mariadb_server: MariaDBServer, mariadb_db: str) -> Iterator[str]:
    yield mariadb_db


def sink_for(server: MariaDBServer, db: str, **kw: object) -> MysqlSink:
    cfg = MysqlSinkConfig(database=db, port=server.port, user=server.user,
                          password=server.password, **kw)  # type: ignore[arg-type]  # fmt: skip
    s = MysqlSink("out", cfg, SinkContext("wf", "out", ("gen",), None))  # type: ignore[arg-type]
    s.open()
    return s


def test_postgres_typed_changes_replicate_exactly(
    mariadb_server: MariaDBServer, target: str
) -> None:
    """The generate source speaks Postgres types (bigint, text, numeric, boolean, timestamptz)."""
    cfg = GenerateConfig(tables=["public.items"], count=3000, transaction_size=7, seed=3)
    src = GenerateSource("gen", cfg)
    src.open(None)
    sink = sink_for(mariadb_server, target)
    try:
        while not src.exhausted:
            b = src.read_batch(1.0)
            if b is not None:
                sink.write("gen", b)
        assert sink.checkpoint("gen") == Position("generate", 3000)
    finally:
        sink.close()
    want = expected_rows(cfg, 3000)[TableId("public", "items")]
    got = mariadb_server.execute(
        "SELECT id, name, amount, qty, active, updated_at FROM items ORDER BY id", database=target
    )
    assert len(got) == len(want)
    for row in got:
        w = want[row[0]]
        assert row[1:4] == w[1:4]
        assert bool(row[4]) == w[4]
        assert row[5].replace(tzinfo=UTC) == w[5]
    types = dict(
        mariadb_server.execute(
            "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'items'",
            (target,),
        )
    )
    assert types["amount"] == "decimal(12,2)" and types["updated_at"] == "datetime(6)"


def test_type_mapping_of_postgres_names() -> None:
    def m(t: str, key: bool = False) -> str:
        return mysql_type(Column("c", t, type_oid=1), key)

    assert m("text") == "longtext" and m("text", key=True) == "varchar(768)"
    assert m("numeric(20,0)") == "decimal(20,0)" and m("numeric") == "decimal(65,30)"
    assert m("timestamp(3) with time zone") == "datetime(3)"
    assert m("integer[]") == "json" and m("uuid") == "char(36)" and m("boolean") == "tinyint(1)"
    assert mysql_type(Column("c", "bigint unsigned"), False) == "bigint unsigned"


def test_append_mode_logs_every_change(mariadb_server: MariaDBServer, target: str) -> None:
    table = TableId("shop", "odd`name")
    schema = TableSchema(table, (Column("id", "int"), Column("v", "varchar(10)")), ("id",))
    p1, p2 = Position("mysql", 10, "f.000001:10"), Position("mysql", 20, "f.000001:20")
    changes = [
        Change(Op.INSERT, table, p1, (1,), None, (1, "a"), commit_ts_us=1_700_000_000_000_000),
        Change(Op.UPDATE, table, p2, (1,), (1, "a"), (1, "b")),
        Change(Op.DELETE, table, p2, (1,), (1, "b"), None),
    ]
    sink = sink_for(mariadb_server, target, mode="append")
    try:
        sink.write("gen", Batch(changes, [schema], p1, p2))
    finally:
        sink.close()
    rows = mariadb_server.execute(
        "SELECT position, op, JSON_VALUE(`after`, '$.v'), commit_ts FROM `odd``name_changes` "
        "ORDER BY change_id",
        database=target,
    )
    assert rows == [
        (Decimal(10), "c", "a", datetime(2023, 11, 14, 22, 13, 20)),
        (Decimal(20), "u", "b", None),
        (Decimal(20), "d", None, None),
    ]
