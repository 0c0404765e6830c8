"""MariaDB -> MariaDB (and -> Postgres) through the daemon, with SIGKILLs.

A workload of inserts, updates and deletes (>= 50k row changes, multi-row
transactions) runs on a private MariaDB while the daemon replicates it; the daemon
is SIGKILLed three times at random moments and restarted; at the end the target
equals the source row for row.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.daemon_harness import Daemon, wait_for, write_config
from tests.servers import MariaDBServer, PostgresServer

pytestmark = pytest.mark.e2e

TABLE_DDL = (
    "CREATE TABLE {db}.items (id bigint unsigned PRIMARY KEY, name varchar(40) NOT NULL,"
    " amount decimal(12,2), qty int, at datetime(6), note text)"
)


def workload(server: MariaDBServer, db: str, seed: int, stop: threading.Event) -> int:
    """~75k row changes in transactions of 50-500 rows; returns the count."""
    rng = random.Random(seed)
    conn = server.connect(db, autocommit=False)
    changes = 0
    next_id = 1
    try:
        with conn.cursor() as cur:
            for _block in range(80):
                if stop.is_set():
                    break
                n = rng.randint(200, 700)
                rows = [
                    (next_id + i, f"n{next_id + i}", Decimal(rng.randint(0, 10**6)) / 100,
                     rng.randint(-1000, 1000), f"2026-01-01 00:00:{i % 60:02d}.{i:06d}",
                     "x" * rng.randint(0, 50))
                    for i in range(n)
                ]  # fmt: skip
                cur.executemany("INSERT INTO items VALUES (%s, %s, %s, %s, %s, %s)", rows)
                conn.commit()
                changes += n
                lo = rng.randint(1, next_id + n - 1)
                changes += cur.execute(
                    "UPDATE items SET qty = qty + 1, name = CONCAT(name, 'u') "
                    "WHERE id BETWEEN %s AND %s",
                    (lo, lo + rng.randint(50, 400)),
                )
                conn.commit()
                lo = rng.randint(1, next_id + n - 1)
                changes += cur.execute(
                    "DELETE FROM items WHERE id BETWEEN %s AND %s", (lo, lo + rng.randint(10, 120))
                )
                conn.commit()
                next_id += n
                time.sleep(0.05)
    finally:
        conn.close()
    return changes


def mysql_rows(server: MariaDBServer, db: str) -> list[tuple[Any, ...]]:
    return server.execute(
        "SELECT id, name, amount, qty, at, note FROM items ORDER BY id", database=db
    )


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def run_kill_cycle(
    tmp_path: Path,
    daemons: list[Daemon],
    server: MariaDBServer,
    src_db: str,
    destination: dict[str, Any],
    target_rows: Any,
) -> None:
    server.execute(TABLE_DDL.format(db=src_db))
    wf = {
        "sources": {
            "shop": {
                "type": "mysql",
                "config": {
                    "host": server.host,
                    "port": server.port,
                    "user": server.user,
                    "password": server.password,
                    "server_id": random.randint(1000, 100000),
                    "tables": [f"{src_db}.items"],
                    "batch_size": 2000,
                },
            }
        },
        "destinations": {"out": {"inputs": ["shop"], **destination}},
    }
    cfg = write_config(tmp_path, {"maria": wf})
    stop = threading.Event()
    result: list[int] = []
    worker = threading.Thread(
        target=lambda: result.append(workload(server, src_db, 7, stop)), daemon=True
    )
    rng = random.Random(11)
    d = Daemon(cfg)
    daemons.append(d)
    d.start()
    worker.start()
    try:
        for _ in range(3):
            time.sleep(rng.uniform(1.0, 3.0))
            d.kill()
            d = Daemon(cfg)
            daemons.append(d)
            d.start()
        worker.join(180)
    finally:
        stop.set()
    assert result and result[0] >= 50_000, result
    want = mysql_rows(server, src_db)

    def caught_up() -> bool:
        try:
            return target_rows() == want
        except Exception:
            return False

    wait_for(caught_up, 120, f"target equals source; log:\n{d.log_tail()}")
    # The last daemon may have started after everything was applied (a fast
    # workload ends before the third kill): it still has to reach streaming.
    wait_for(
        lambda: d.workflow("maria")["state"] == "streaming",
        30,
        f"streaming after the last restart; log:\n{d.log_tail()}",
    )
    assert d.terminate() == 0


def test_mariadb_to_mariadb_survives_three_sigkills(
    tmp_path: Path, daemons: list[Daemon], mariadb_server: MariaDBServer, mariadb_db: str
) -> None:
    target = mariadb_db + "_dst"
    destination = {
        "type": "mysql",
        "config": {
            "host": mariadb_server.host,
            "port": mariadb_server.port,
            "user": mariadb_server.user,
            "password": mariadb_server.password,
            "database": target,
        },
    }
    try:
        run_kill_cycle(
            tmp_path,
            daemons,
            mariadb_server,
            mariadb_db,
            destination,
            lambda: mysql_rows(mariadb_server, target),
        )
    finally:
        mariadb_server.drop_database(target)


def test_mariadb_to_postgres_survives_three_sigkills(
    tmp_path: Path,
    daemons: list[Daemon],
    mariadb_server: MariaDBServer,
    mariadb_db: str,
    pg_server: PostgresServer,
    pg_db: str,
) -> None:
    dbname = pg_db.split("dbname=")[1].split()[0]
    destination = {"type": "postgres", "config": {"dsn": pg_db, "schema": "replica"}}

    def pg_rows() -> list[tuple[Any, ...]]:
        rows = pg_server.execute(
            "SELECT id, name, amount, qty, at, note FROM replica.items ORDER BY id", dbname=dbname
        )
        return [(int(r[0]), *r[1:]) for r in rows]

    run_kill_cycle(tmp_path, daemons, mariadb_server, mariadb_db, destination, pg_rows)
