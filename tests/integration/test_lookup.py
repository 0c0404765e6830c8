"""The `lookup` transformation against real Redis, PostgreSQL and MariaDB servers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from dataflare.cdc.errors import FatalError, RetryableError
from dataflare.cdc.model import Change, Column, Op, Position, TableId, TableSchema
from dataflare.daemon.transforms.base import TransformContext
from dataflare.daemon.transforms.configs import LookupConfig, LookupMapping, LookupSource
from dataflare.daemon.transforms.lookup import LookupTransform

from tests.servers import MariaDBServer, RedisServer, free_port

pytestmark = pytest.mark.integration

ORDERS = TableSchema(
    TableId("shop", "orders"),
    (Column("id", "bigint", False, 20), Column("customer_id", "bigint", True, 20)),
    ("id",),
)


def changes(*customer_ids: int | None, op: Op = Op.INSERT) -> list[Change]:
    return [
        Change(op, ORDERS.table, Position("g", i), (i,), None, (i, cid))
        for i, cid in enumerate(customer_ids, 1)
    ]


def lookup(source: LookupSource, fields: Any, **kw: Any) -> LookupTransform:
    cfg = LookupConfig(source=source, mapping=LookupMapping(key="customer_id", fields=fields), **kw)
    t = LookupTransform("customers", cfg, TransformContext("wf", "customers"))
    t.open()
    return t


# ---------------------------------------------------------------- redis


@pytest.fixture
def redis_prefix(redis_server: RedisServer) -> Iterator[str]:
    prefix = f"t{uuid.uuid4().hex[:8]}:customer:"
    client = redis_server.client()
    client.hset(prefix + "1", mapping={"name": "Ann", "tier": "gold"})
    client.hset(prefix + "2", mapping={"name": "Bob"})
    client.config_resetstat()
    yield prefix
    client.delete(prefix + "1", prefix + "2")
    client.close()


def hmget_calls(redis_server: RedisServer) -> int:
    client = redis_server.client()
    try:
        return int(client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))
    finally:
        client.close()


def test_redis_lookup_one_round_trip_and_cache(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    src = LookupSource(type="redis", url=redis_server.url, key=redis_prefix + "{}")
    t = lookup(src, {"name": "customer_name", "tier": "customer_tier"})
    try:
        plan = t.plan(ORDERS)
        assert plan.schema.column_names == ("id", "customer_id", "customer_name", "customer_tier")
        assert plan.schema.columns[2].type_name == "text"
        out = plan.apply(changes(1, 2, 1, 3, None))
        assert [c.after for c in out] == [
            (1, 1, "Ann", "gold"),
            (2, 2, "Bob", None),
            (3, 1, "Ann", "gold"),
            (4, 3, None, None),  # not found: on_missing null
            (5, None, None, None),
        ]
        assert t.status()["queries"] == 1
        assert hmget_calls(redis_server) == 3  # keys 1, 2, 3 once each, one pipeline
        plan.apply(changes(2, 1, 3))  # all cached, misses included
        assert t.status()["queries"] == 1 and hmget_calls(redis_server) == 3
        assert t.status()["cache_hits"] == 3 and t.status()["cache_misses"] == 3
    finally:
        t.close()


def test_redis_unreachable_is_retryable() -> None:
    src = LookupSource(type="redis", url=f"redis://127.0.0.1:{free_port()}/0")
    t = LookupTransform(
        "customers",
        LookupConfig(source=src, mapping=LookupMapping(key="customer_id", fields=["name"])),
        TransformContext("wf", "customers"),
    )
    with pytest.raises(RetryableError):
        t.open()


# ---------------------------------------------------------------- postgres


@pytest.fixture
def pg_customers(pg_db: str) -> str:
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute(
            'CREATE TABLE "Customers" (id bigint PRIMARY KEY, name text, '
            "credit numeric(10,2), vip boolean)"
        )
        conn.execute(
            "INSERT INTO \"Customers\" VALUES (1, 'Ann', 10.50, true), (2, 'Bob', NULL, false)"
        )
        # Every statement that reads the view bumps the sequence once: a server-side
        # count of queries.
        conn.execute("CREATE SEQUENCE reads")
        conn.execute(
            "CREATE VIEW counted AS WITH s AS MATERIALIZED (SELECT nextval('reads')) "
            'SELECT c.* FROM "Customers" c, s'
        )
    return pg_db


def pg_reads(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM reads")
        got = row.fetchone()
        assert got is not None
        return int(got[0])


def test_postgres_lookup_one_query_per_run(pg_customers: str) -> None:
    src = LookupSource(type="postgres", dsn=pg_customers, table="public.counted", key_column="id")
    t = lookup(src, {"name": "customer", "credit": "credit", "vip": "vip"})
    try:
        plan = t.plan(ORDERS)
        types = [(c.name, c.type_name, c.type_oid) for c in plan.schema.columns[2:]]
        assert types == [("customer", "text", 25), ("credit", "numeric(10,2)", 1700),
                         ("vip", "boolean", 16)]  # fmt: skip
        out = plan.apply(changes(1, 2, 7, 1))
        assert [c.after[2:] for c in out] == [
            ("Ann", Decimal("10.50"), True),
            ("Bob", None, False),
            (None, None, None),
            ("Ann", Decimal("10.50"), True),
        ]
        assert pg_reads(pg_customers) == 1 and t.status()["queries"] == 1
        plan.apply(changes(2, 7))
        assert pg_reads(pg_customers) == 1
    finally:
        t.close()


def test_postgres_cache_ttl_and_lru(pg_customers: str) -> None:
    src = LookupSource(type="postgres", dsn=pg_customers, table='"Customers"', key_column="id")
    t = lookup(src, ["name"], cache_ttl=60, cache_size=1)
    try:
        clock = [1000.0]
        t.cache.clock = lambda: clock[0]
        plan = t.plan(ORDERS)
        plan.apply(changes(1))
        plan.apply(changes(1))
        assert t.status()["queries"] == 1
        plan.apply(changes(2))  # size 1: key 1 is evicted
        plan.apply(changes(1))
        assert t.status()["queries"] == 3
        with psycopg.connect(pg_customers, autocommit=True) as conn:
            conn.execute("UPDATE \"Customers\" SET name = 'Anna' WHERE id = 1")
        (c,) = plan.apply(changes(1))
        assert c.after[2] == "Ann" and t.status()["queries"] == 3  # still cached
        clock[0] += 61
        (c,) = plan.apply(changes(1))
        assert c.after[2] == "Anna" and t.status()["queries"] == 4
    finally:
        t.close()


def test_postgres_missing_is_an_error_and_reconnects(pg_customers: str) -> None:
    src = LookupSource(type="postgres", dsn=pg_customers, table='"Customers"', key_column="id")
    t = lookup(src, ["name"], on_missing="error")
    try:
        plan = t.plan(ORDERS)
        with pytest.raises(FatalError, match="no match") as e:
            plan.apply(changes(1, 99))
        assert "99" not in str(e.value)
        with psycopg.connect(pg_customers, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE 'dataflare:lookup:%%' AND datname = current_database()"
            )
        with pytest.raises(RetryableError):
            plan.apply(changes(2))
        (c,) = plan.apply(changes(2))  # reconnected
        assert c.after == (1, 2, "Bob")
    finally:
        t.close()


def test_postgres_bad_config_is_fatal(pg_customers: str) -> None:
    for table, field in [("nosuch", "name"), ('"Customers"', "nosuch")]:
        src = LookupSource(type="postgres", dsn=pg_customers, table=table, key_column="id")
        with pytest.raises(FatalError, match="nosuch"):
            lookup(src, [field])


# ---------------------------------------------------------------- mysql


def test_mysql_lookup(mariadb_server: MariaDBServer, mariadb_db: str) -> None:
    mariadb_server.execute(
        "CREATE TABLE customers (id varchar(20) PRIMARY KEY, name varchar(50), score int)",
        database=mariadb_db,
    )
    mariadb_server.execute(
        "INSERT INTO customers VALUES ('1', 'Ann', 5), ('2', 'Bob', NULL)", database=mariadb_db
    )
    src = LookupSource(type="mysql", host=mariadb_server.host, port=mariadb_server.port,
                       user=mariadb_server.user, password=mariadb_server.password,
                       database=mariadb_db, table="customers", key_column="id")  # fmt: skip
    t = lookup(src, {"name": "customer", "score": "score"}, on_missing="null")
    try:
        conn = t.backend._conn  # type: ignore[attr-defined]

        def selects() -> int:
            with conn.cursor() as cur:
                cur.execute("SHOW SESSION STATUS LIKE 'Com_select'")
                return int(cur.fetchone()[1])

        plan = t.plan(ORDERS)
        assert [(c.name, c.type_name) for c in plan.schema.columns[2:]] == [
            ("customer", "varchar(50)"),
            ("score", "int(11)"),
        ]
        base = selects()
        out = plan.apply(changes(1, 2, 3, 1))
        assert [c.after[2:] for c in out] == [("Ann", 5), ("Bob", None), (None, None), ("Ann", 5)]
        assert selects() - base == 1
        plan.apply(changes(1, 2, 3))
        assert selects() - base == 1 and t.status()["queries"] == 1
    finally:
        t.close()
