"""Transformations through a running daemon: filter, mapping, mask and route in front
of mirrors, and dead letters (refuse, inspect, fix, replay, arrives once)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.e2e.daemon_harness import Daemon, cli, wait_for, write_config
from tests.servers import PostgresServer

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture
def two_dbs(pg_server: PostgresServer) -> Iterator[tuple[str, str]]:
    tag = f"{int(time.time() * 1000) % 10**8}"
    src = pg_server.create_database(f"tx_src_{tag}")
    dst = pg_server.create_database(f"tx_dst_{tag}")
    yield src, dst
    for name in (f"tx_src_{tag}", f"tx_dst_{tag}"):
        if pg_server.running:
            pg_server.drop_database(name)


def rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        try:
            return conn.execute(query).fetchall()
        except psycopg.errors.UndefinedTable:
            return []


def expected_split(src: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """What filter+mapping+mask+route should leave in each mirror."""
    eu, rest = [], []
    for id_, name, email, status, region, amount in rows(
        src, "SELECT id, name, email, status, region, amount FROM customers ORDER BY id"
    ):
        if not (status == "active" and amount is not None and amount > 100):
            continue
        masked = None if email is None else (email[:2] + "***" if len(email) > 2 else "***")
        code = None if region is None else region.upper()
        row = (id_, masked, code, {"name": name}, amount)
        (eu if code == "EU" else rest).append(row)
    return eu, rest


MIRROR_QUERY = (
    "SELECT id, contact_email, region_code, profile, amount FROM {}.customers ORDER BY id"
)


def test_filter_mapping_mask_route_keep_mirrors_right(
    tmp_path: Path, two_dbs: tuple[str, str]
) -> None:
    src, dst = two_dbs
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE customers (id int PRIMARY KEY, name text, email text, status text,"
            " region text, amount numeric(10,2), notes text)"
        )
        # Snapshot rows: a mix of matching and not matching.
        conn.execute(
            "INSERT INTO customers SELECT g, 'n' || g, 'user' || g || '@x.org',"
            " CASE WHEN g % 3 = 0 THEN 'inactive' ELSE 'active' END,"
            " CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, g * 10, 'secret' "
            "FROM generate_series(1, 60) g"
        )
    wf = {
        "sources": {"crm": {"type": "postgres", "config": {"dsn": src, "tables": ["customers"]}}},
        "transformations": {
            "active": {
                "type": "filter",
                "inputs": ["crm"],
                "config": {"condition": "status == 'active' and amount > 100"},
            },
            "shape": {
                "type": "mapping",
                "inputs": ["active"],
                "config": {
                    "mappings": [
                        {"source": "email", "destination": "contact_email"},
                        {"expression": "upper(region)", "destination": "region_code"},
                        {"source": "name", "destination": "profile.name"},
                    ],
                    "drop": ["notes", "status", "region"],
                },
            },
            "masked": {
                "type": "mask",
                "inputs": ["shape"],
                "config": {
                    "rules": [
                        {
                            "field": "contact_email",
                            "method": "partial",
                            "show_chars": 2,
                            "replacement": "***",
                        }
                    ]
                },
            },
            "split": {
                "type": "route",
                "inputs": ["masked"],
                "config": {
                    "routes": [{"condition": "region_code == 'EU'", "to": ["eu"]}],
                    "default": ["rest"],
                },
            },
        },
        "destinations": {
            "eu": {"type": "postgres", "inputs": ["split"], "config": {"dsn": dst, "schema": "eu"}},
            "rest": {
                "type": "postgres",
                "inputs": ["split"],
                "config": {"dsn": dst, "schema": "rest"},
            },
        },
    }
    cfg = write_config(tmp_path, {"crm": wf})
    d = Daemon(cfg)
    d.start()
    try:

        def converged() -> bool:
            eu, rest = expected_split(src)
            got_eu = rows(dst, MIRROR_QUERY.format("eu"))
            got_rest = rows(dst, MIRROR_QUERY.format("rest"))
            return got_eu == eu and got_rest == rest

        wait_for(converged, 60, f"snapshot through the transformations; log:\n{d.log_tail()}")
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute("UPDATE customers SET status = 'inactive' WHERE id IN (20, 22, 25)")
            conn.execute("UPDATE customers SET status = 'active' WHERE id IN (21, 24, 27)")
            conn.execute("UPDATE customers SET region = 'us' WHERE id IN (26, 28)")
            conn.execute("UPDATE customers SET region = 'eu' WHERE id IN (29, 31)")
            conn.execute("UPDATE customers SET amount = 5 WHERE id = 32")
            conn.execute("DELETE FROM customers WHERE id IN (34, 35, 36)")
            conn.execute(
                "INSERT INTO customers VALUES (100, 'new', 'z@y.eu', 'active', 'eu', 999.5, 'n'),"
                " (101, 'low', 'q@y.eu', 'active', 'eu', 50, 'n'),"
                " (102, 'nul', NULL, 'active', NULL, 500, NULL)"
            )
        wait_for(converged, 60, f"streamed changes keep both mirrors right; log:\n{d.log_tail()}")
        eu, rest = expected_split(src)
        assert (100, "z@***", "EU", {"name": "new"}, Decimal("999.50")) in eu
        assert any(r[0] == 102 and r[1] is None and r[2] is None for r in rest)
        assert not [r for r in rows(dst, MIRROR_QUERY.format("eu")) if r[0] in (20, 26, 28)]
        st = d.workflow("crm")
        assert st["state"] == "streaming"
    finally:
        d.stop()


def dlq(cfg: Path, *args: str, exit_code: int = 0) -> Any:
    r = cli("--config", str(cfg), "dlq", *args, "--json", timeout=60)
    assert r.returncode == exit_code, r.stderr + r.stdout
    return json.loads(r.stdout)


def test_dead_letter_round_trip_destination(tmp_path: Path, two_dbs: tuple[str, str]) -> None:
    """A row the target refuses (CHECK constraint) becomes a dead letter, the rows
    around it arrive; after the target is fixed, a replay delivers it once."""
    src, dst = two_dbs
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, qty int)")
    with psycopg.connect(dst, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA m")
        conn.execute(
            "CREATE TABLE m.t (id int PRIMARY KEY,"
            " qty int CONSTRAINT qty_positive CHECK (qty >= 0))"
        )
    wf = {
        "sources": {"s": {"type": "postgres", "config": {"dsn": src, "tables": ["t"]}}},
        "destinations": {
            "mirror": {
                "type": "postgres",
                "inputs": ["s"],
                "config": {"dsn": dst, "schema": "m"},
                "error_handling": {"on_error": "dead_letter"},
            }
        },
    }
    cfg = write_config(tmp_path, {"dl": wf})
    d = Daemon(cfg)
    d.start()
    try:
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO t SELECT g, CASE WHEN g = 25 THEN -1 ELSE g END "
                "FROM generate_series(1, 50) g"
            )
        wait_for(
            lambda: len(rows(dst, "SELECT id FROM m.t")) == 49,
            60,
            f"the rows around the refused one arrive; log:\n{d.log_tail()}",
        )
        listing = dlq(cfg, "list", "dl")
        assert listing["count"] == 1
        (letter,) = listing["letters"]
        assert letter["node"] == "mirror" and letter["stage"] == "destination"
        assert letter["table"] == "public.t" and letter["op"] in ("r", "c")
        assert "qty_positive" in letter["error"]
        # (the rows went packed, as text: isolating the refused one loaded them)
        assert "rows packed as PostgreSQL text" in d.log.read_text()
        shown = dlq(cfg, "show", "dl", str(letter["id"]))
        assert shown["change"]["after"] == {"id": 25, "qty": -1}
        # Status counts it once the apply process next reports (every STATUS_INTERVAL_S).
        wait_for(lambda: d.workflow("dl")["dead_letters"] == 1, 10, "dead_letters in status")

        # Replayed before the fix: refused again, the letter stays.
        res = dlq(cfg, "replay", "dl", exit_code=1)  # 1: some still failing
        assert res["replayed"] == 0 and res["failed"] == 1
        assert dlq(cfg, "list", "dl")["letters"][0]["attempts"] == 2
        with psycopg.connect(dst, autocommit=True) as conn:
            conn.execute("ALTER TABLE m.t DROP CONSTRAINT qty_positive")
        res = dlq(cfg, "replay", "dl")
        assert res["replayed"] == 1 and res["failed"] == 0
        assert rows(dst, "SELECT id, qty FROM m.t WHERE id = 25") == [(25, -1)]
        assert dlq(cfg, "list", "dl")["count"] == 0
        # Streaming goes on from where it was: the replay did not move the checkpoint back.
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (51, 51)")
        wait_for(lambda: len(rows(dst, "SELECT id FROM m.t")) == 51, 30, "later rows arrive")
    finally:
        d.stop()


def test_dead_letter_round_trip_transformation(tmp_path: Path, two_dbs: tuple[str, str]) -> None:
    """A change a filter cannot evaluate is kept aside while the others pass; the
    filter is fixed by a config reload, the replay delivers the change exactly once."""
    src, _ = two_dbs
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, code text)")
    out = tmp_path / "out.jsonl"
    wf: dict[str, Any] = {
        "sources": {"s": {"type": "postgres", "config": {"dsn": src, "tables": ["t"]}}},
        "transformations": {
            "numeric": {
                "type": "filter",
                "inputs": ["s"],
                "config": {"condition": "int(code) > 0"},
                "error_handling": {"on_error": "dead_letter"},
            }
        },
        "destinations": {
            "log": {"type": "file", "inputs": ["numeric"], "config": {"path": str(out)}}
        },
    }
    cfg = write_config(tmp_path, {"tdl": wf})
    d = Daemon(cfg)
    d.start()

    def ids_in_file() -> list[int]:
        if not out.exists():
            return []
        return [json.loads(line)["after"]["id"] for line in out.read_text().splitlines()]

    try:
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO t SELECT g, CASE WHEN g = 7 THEN 'seven' ELSE g::text END "
                "FROM generate_series(1, 20) g"
            )
        wait_for(lambda: len(ids_in_file()) == 19, 60, f"others pass; log:\n{d.log_tail()}")
        assert 7 not in ids_in_file()
        (letter,) = dlq(cfg, "list", "tdl")["letters"]
        assert letter["node"] == "numeric" and letter["stage"] == "transform"
        assert letter["destinations"] == ["log"]

        # The fix: a condition that copes with non-numeric codes; reload, then replay.
        wf["transformations"]["numeric"]["config"]["condition"] = (
            "code !~ '^[0-9]+$' or int(code) > 0"
        )
        (tmp_path / "workflows.d" / "tdl.yaml").write_text(yaml.safe_dump({"name": "tdl", **wf}))
        r = cli("--config", str(cfg), "reload")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: d.workflow("tdl")["state"] == "streaming", 30, "restarted")
        res = dlq(cfg, "replay", "tdl")
        assert res["replayed"] == 1, res
        ids = ids_in_file()
        assert sorted(ids) == list(range(1, 21)) and ids.count(7) == 1
        assert dlq(cfg, "list", "tdl")["count"] == 0
    finally:
        d.stop()


def test_lookup_and_rename_through_the_daemon(
    tmp_path: Path, two_dbs: tuple[str, str], redis_server: Any
) -> None:
    """Orders enriched with the customer's name from Redis, written under a
    prefixed table name in another schema."""
    import redis

    src, dst = two_dbs
    r = redis.Redis.from_url(redis_server.url)
    r.hset("tx-customer:1", mapping={"name": "Ada", "tier": "gold"})
    r.hset("tx-customer:2", mapping={"name": "Bob"})
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, customer_id int, total int)")
        conn.execute("INSERT INTO orders VALUES (1, 1, 10), (2, 2, 20)")
    wf = {
        "sources": {"shop": {"type": "postgres", "config": {"dsn": src, "tables": ["orders"]}}},
        "transformations": {
            "enrich": {
                "type": "lookup",
                "inputs": ["shop"],
                "config": {
                    "source": {"type": "redis", "url": redis_server.url, "key": "tx-customer:{}"},
                    "mapping": {
                        "key": "customer_id",
                        "fields": {"name": "customer", "tier": "tier"},
                    },
                },
            },
            "named": {
                "type": "rename",
                "inputs": ["enrich"],
                "config": {"schema": "reporting", "prefix": "shop_"},
            },
        },
        "destinations": {
            "rep": {"type": "postgres", "inputs": ["named"], "config": {"dsn": dst}},
        },
    }
    cfg = write_config(tmp_path, {"enrich": wf})
    d = Daemon(cfg)
    d.start()
    query = "SELECT id, customer_id, total, customer, tier FROM reporting.shop_orders ORDER BY id"
    try:
        wait_for(
            lambda: rows(dst, query) == [(1, 1, 10, "Ada", "gold"), (2, 2, 20, "Bob", None)],
            60,
            "snapshot rows enriched",
        )
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute("INSERT INTO orders VALUES (3, 1, 30), (4, 9, 40)")
            conn.execute("UPDATE orders SET customer_id = 1 WHERE id = 2")
        wait_for(
            lambda: (
                rows(dst, query)
                == [
                    (1, 1, 10, "Ada", "gold"),
                    (2, 1, 20, "Ada", "gold"),
                    (3, 1, 30, "Ada", "gold"),
                    (4, 9, 40, None, None),  # no such customer: on_missing null
                ]
            ),
            60,
            "streamed rows enriched",
        )
        # Customer 1 was fetched once by the snapshot: later rows hit the cache.
        wait_for(
            lambda: d.workflow("enrich")["transformations"]["enrich"].get("cache_hits", 0) > 0,
            10,
            "cache hits in status",
        )
        assert d.workflow("enrich")["transformations"]["enrich"]["records_in"] >= 5
    finally:
        d.stop()
