"""Postgres -> Postgres through the daemon, with SIGKILLs mid-workload."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.e2e.daemon_harness import Daemon, wait_for, write_config
from tests.servers import PostgresServer

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SOURCE_DDL = [
    """CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance numeric(14,2),
       tags text[], meta jsonb, updated timestamptz DEFAULT now())""",
    """CREATE TABLE "Order Items" (order_id int, line int, sku text, qty int,
       PRIMARY KEY (order_id, line))""",
    "INSERT INTO accounts SELECT g, 'o' || g, g, ARRAY['a', g::text], jsonb_build_object('g', g) "
    "FROM generate_series(1, 3000) g",
]


def snapshot_rows(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(dsn) as conn:
        return {
            "accounts": conn.execute(
                "SELECT id, owner, balance, tags, meta FROM accounts ORDER BY id"
            ).fetchall(),
            "items": conn.execute(
                'SELECT order_id, line, sku, qty FROM "Order Items" ORDER BY 1, 2'
            ).fetchall(),
        }


class Workload(threading.Thread):
    """Mixed inserts, updates and deletes in small transactions until ``changes`` are done."""

    def __init__(self, dsn: str, changes: int, seed: int = 7) -> None:
        super().__init__(daemon=True)
        self.dsn, self.target, self.rng = dsn, changes, random.Random(seed)
        self.done = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                next_id, order = 100_000, 1
                while self.done < self.target:
                    with conn.transaction():
                        conn.execute(
                            "INSERT INTO accounts (id, owner, balance, tags, meta) "
                            "SELECT g, 'n' || g, "
                            "g %% 1000, ARRAY[g::text], jsonb_build_object('n', g) "
                            "FROM generate_series(%s, %s) g",
                            (next_id, next_id + 29),
                        )
                        next_id += 30
                        lo = self.rng.randint(1, next_id - 40)
                        cur = conn.execute(
                            "UPDATE accounts SET balance = balance + 1, "
                            "meta = meta || '{\"u\": 1}' "
                            "WHERE id BETWEEN %s AND %s",
                            (lo, lo + 14),
                        )
                        n_upd = cur.rowcount
                        cur = conn.execute(
                            "DELETE FROM accounts WHERE id IN "
                            "(SELECT id FROM accounts WHERE id > %s "
                            "ORDER BY id LIMIT 5)",
                            (self.rng.randint(1, next_id - 10),),
                        )
                        n_del = cur.rowcount
                        conn.execute(
                            "INSERT INTO \"Order Items\" SELECT %s, l, 'sku' || l, l FROM "
                            "generate_series(1, 4) l",
                            (order,),
                        )
                        conn.execute(
                            'UPDATE "Order Items" SET qty = qty * 2 WHERE order_id = %s', (order,)
                        )
                        order += 1
                    self.done += 30 + n_upd + n_del + 8
        except BaseException as e:  # surfaced by the test
            self.error = e


@pytest.fixture
def two_dbs(pg_server: PostgresServer) -> Iterator[tuple[str, str]]:
    tag = f"{int(time.time() * 1000) % 10**8}"
    src = pg_server.create_database(f"e2e_src_{tag}")
    dst = pg_server.create_database(f"e2e_dst_{tag}")
    yield src, dst
    for name in (f"e2e_src_{tag}", f"e2e_dst_{tag}"):
        if pg_server.running:
            pg_server.drop_database(name)


def test_sigkill_three_times_sink_equals_source(tmp_path: Path, two_dbs: tuple[str, str]) -> None:
    src, dst = two_dbs
    with psycopg.connect(src, autocommit=True) as conn:
        for stmt in SOURCE_DDL:
            conn.execute(stmt)
    wf = {
        "sources": {
            "shop": {
                "type": "postgres",
                "config": {
                    "dsn": src,
                    "tables": ["public.accounts", 'public."Order Items"'],
                    "batch_size": 2000,
                },
            }
        },
        "destinations": {
            "mirror": {
                "type": "postgres",
                "inputs": ["shop"],
                "config": {"dsn": dst, "schema": "public"},
            }
        },
    }
    cfg = write_config(tmp_path, {"pgmirror": wf})
    load = Workload(src, 100_000)
    d = Daemon(cfg)
    d.start()
    try:
        load.start()
        rng = random.Random(11)
        for _ in range(3):
            wait_for(lambda: load.done >= 0 and not load.error, 1)
            time.sleep(rng.uniform(1.0, 3.5))
            d.kill()
            d = Daemon(cfg)
            d.start()
        load.join(300)
        assert load.error is None, load.error
        assert load.done >= 100_000
        expected = snapshot_rows(src)
        wait_for(
            lambda: snapshot_rows(dst) == expected,
            180,
            f"sink equal to source; log:\n{d.log_tail()}",
        )
        # The slot's confirmed position catches up with the source's WAL.
        with psycopg.connect(src, autocommit=True) as conn:
            current = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]

            def caught_up() -> bool:
                row = conn.execute(
                    "SELECT confirmed_flush_lsn >= %s FROM pg_replication_slots "
                    "WHERE slot_name = 'dataflare_pgmirror'",
                    (current,),
                ).fetchone()
                return bool(row and row[0])

            wait_for(caught_up, 30, "slot confirmed position caught up")
        wf_status = d.workflow("pgmirror")
        assert wf_status["state"] == "streaming"
        assert wf_status["sources"][0]["lag_bytes"] is not None
    finally:
        d.stop()


def test_source_server_crash_and_schema_change(tmp_path: Path, pg_server: PostgresServer) -> None:
    """The source server crashes mid-stream (its slot's confirmed position may go back)
    and a column is added mid-stream: the sink still ends equal to the source."""
    src_pg = PostgresServer(tmp_path / "src-pg").start()
    try:
        src = src_pg.create_database("shop")
        dst = pg_server.create_database(f"crash_dst_{int(time.time() * 1000) % 10**8}")
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 500) g")
        wf = {
            "sources": {"s": {"type": "postgres", "config": {"dsn": src, "tables": ["t"]}}},
            "destinations": {
                "d": {
                    "type": "postgres",
                    "inputs": ["s"],
                    "config": {"dsn": dst, "schema": "public"},
                }
            },
        }
        cfg = write_config(tmp_path / "daemon", {"crashy": wf})
        d = Daemon(cfg)
        d.start()
        try:

            def rows(dsn: str) -> list[tuple[Any, ...]]:
                with psycopg.connect(dsn) as conn:
                    try:
                        return conn.execute("SELECT * FROM t ORDER BY id").fetchall()
                    except psycopg.errors.UndefinedTable:
                        return []

            wait_for(lambda: len(rows(dst)) == 500, 60, "snapshot applied")
            with psycopg.connect(src, autocommit=True) as conn:
                for i in range(501, 1501):
                    conn.execute("INSERT INTO t VALUES (%s, %s)", (i, f"v{i}"))
            src_pg.crash()
            src_pg.start()
            with psycopg.connect(src, autocommit=True) as conn:
                conn.execute("UPDATE t SET v = v || '!' WHERE id % 7 = 0")
                conn.execute("ALTER TABLE t ADD COLUMN extra numeric")
                conn.execute(
                    "INSERT INTO t SELECT g, 'w', g / 3.0 FROM generate_series(2000, 2100) g"
                )
                conn.execute("UPDATE t SET extra = 1.5 WHERE id < 10")
            want = rows(src)
            wait_for(lambda: rows(dst) == want, 120, f"sink equal to source; log:\n{d.log_tail()}")
        finally:
            d.stop()
    finally:
        src_pg.destroy()
