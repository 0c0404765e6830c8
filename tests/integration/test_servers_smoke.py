"""Smoke tests of the private database servers started by tests/conftest.py."""

from __future__ import annotations

import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from tests.servers import MariaDBServer, PostgresServer, ServerStartError, pid_alive

pytestmark = pytest.mark.integration

SHARED_PORTS = {5432, 3306}


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if pid_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive


# ---------------------------------------------------------------------- PostgreSQL


def test_postgres_is_ready_for_logical_replication(pg_server: PostgresServer) -> None:
    assert pg_server.running
    assert pg_server.host == "127.0.0.1"
    assert pg_server.port not in SHARED_PORTS
    assert pg_server.execute("SHOW wal_level") == [("logical",)]
    assert int(pg_server.execute("SHOW max_replication_slots")[0][0]) >= 20
    assert int(pg_server.execute("SHOW max_wal_senders")[0][0]) >= 20
    assert pg_server.execute("SHOW listen_addresses") == [("127.0.0.1",)]
    assert pg_server.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") == [
        (True,)
    ]
    assert pg_server.execute("SELECT current_user") == [(pg_server.superuser,)]
    version = int(pg_server.execute("SHOW server_version_num")[0][0])
    assert version >= 150000

    slot = f"smoke_{uuid.uuid4().hex[:8]}"
    pg_server.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
    try:
        rows = pg_server.execute(
            "SELECT plugin, slot_type FROM pg_replication_slots WHERE slot_name = %s", [slot]
        )
        assert rows == [("pgoutput", "logical")]
    finally:
        pg_server.execute("SELECT pg_drop_replication_slot(%s)", [slot])
    assert (
        pg_server.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", [slot]) == []
    )


def test_postgres_replication_connection(pg_server: PostgresServer, pg_db: str) -> None:
    dbname = psycopg.conninfo.conninfo_to_dict(pg_db)["dbname"]
    with psycopg.connect(pg_server.dsn(str(dbname), replication="database")) as conn:
        row = conn.execute("IDENTIFY_SYSTEM").fetchone()
        assert row is not None
        assert row[3] == dbname


def test_pg_db_is_a_fresh_database(pg_db: str) -> None:
    with psycopg.connect(pg_db, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'a')")
        assert conn.execute("SELECT v FROM t").fetchall() == [("a",)]


def test_postgres_restart_keeps_data(pg_server: PostgresServer, pg_db: str) -> None:
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'kept')")
    port, old_pid = pg_server.port, pg_server.pid
    pg_server.restart()
    assert pg_server.running
    assert pg_server.port == port
    assert pg_server.pid != old_pid
    assert old_pid is not None and not pid_alive(old_pid)
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT v FROM t").fetchall() == [("kept",)]


def test_postgres_crash_then_start(pg_server: PostgresServer, pg_db: str) -> None:
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
    # an open session whose backend must also go away
    idle = psycopg.connect(pg_db, autocommit=True)
    try:
        pids = pg_server.pids()
        assert len(pids) > 2  # postmaster + children
        pg_server.crash()
        assert not pg_server.running
        assert _wait_gone(pids, timeout=0.5) == []  # crash() waited for the children
        with pytest.raises(psycopg.OperationalError):
            idle.execute("SELECT 1")
    finally:
        idle.close()
    pg_server.start()
    assert pg_server.running
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT id FROM t").fetchall() == [(1,)]
    assert "automatic recovery in progress" in pg_server.log_tail(20000)


# ------------------------------------------------------------------------- MariaDB


def _variables(server: MariaDBServer, *names: str) -> dict[str, str]:
    rows = server.execute(
        "SELECT variable_name, variable_value FROM information_schema.global_variables "
        "WHERE variable_name IN %s",
        [[n.upper() for n in names]],
    )
    return {str(k).lower(): str(v) for k, v in rows}


def test_mariadb_is_ready_for_binlog_cdc(mariadb_server: MariaDBServer) -> None:
    assert mariadb_server.running
    assert mariadb_server.port not in SHARED_PORTS
    assert (mariadb_server.user, mariadb_server.password) == ("root", "")
    assert _variables(
        mariadb_server, "log_bin", "binlog_format", "binlog_row_image", "binlog_row_metadata"
    ) == {
        "log_bin": "ON",
        "binlog_format": "ROW",
        "binlog_row_image": "FULL",
        "binlog_row_metadata": "FULL",
    }
    variables = _variables(mariadb_server, "server_id", "gtid_strict_mode", "version")
    assert int(variables["server_id"]) == mariadb_server.server_id > 0
    assert variables["gtid_strict_mode"] == "OFF"
    assert variables["version"].startswith("10.11")
    assert mariadb_server.execute("SHOW BINARY LOGS")
    status = mariadb_server.execute("SHOW MASTER STATUS")
    assert len(status) == 1
    assert str(status[0][0]).startswith("mysql-bin.")


def test_mariadb_replication_user(mariadb_server: MariaDBServer) -> None:
    user = f"cdc_{uuid.uuid4().hex[:8]}"
    mariadb_server.execute(f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY 'secret'")
    try:
        mariadb_server.execute(
            f"GRANT SELECT, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{user}'@'127.0.0.1'"
        )
        conn = mariadb_server.connect(user=user, password="secret")
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW MASTER STATUS")
                assert cur.fetchone() is not None
        finally:
            conn.close()
    finally:
        mariadb_server.execute(f"DROP USER '{user}'@'127.0.0.1'")


def test_mariadb_restart_keeps_data(mariadb_server: MariaDBServer, mariadb_db: str) -> None:
    mariadb_server.execute("CREATE TABLE t (id INT PRIMARY KEY, v TEXT)", database=mariadb_db)
    mariadb_server.execute("INSERT INTO t VALUES (1, 'kept')", database=mariadb_db)
    port, old_pid = mariadb_server.port, mariadb_server.pid
    mariadb_server.restart()
    assert mariadb_server.running
    assert mariadb_server.port == port
    assert old_pid is not None and not pid_alive(old_pid)
    assert mariadb_server.execute("SELECT v FROM t", database=mariadb_db) == [("kept",)]


def test_mariadb_crash_then_start(mariadb_server: MariaDBServer, mariadb_db: str) -> None:
    mariadb_server.execute("CREATE TABLE t (id INT PRIMARY KEY) ENGINE=InnoDB", database=mariadb_db)
    mariadb_server.execute("INSERT INTO t VALUES (1)", database=mariadb_db)
    (before,) = mariadb_server.execute("SHOW MASTER STATUS")
    pid = mariadb_server.pid
    mariadb_server.crash()
    assert not mariadb_server.running
    assert pid is not None and not pid_alive(pid)
    mariadb_server.start()
    assert mariadb_server.execute("SELECT id FROM t", database=mariadb_db) == [(1,)]
    (after,) = mariadb_server.execute("SHOW MASTER STATUS")
    assert after[0] != before[0]  # a new binlog file after recovery


# ----------------------------------------------------------- standalone (no pytest)


def test_standalone_servers_start_concurrently_and_clean_up() -> None:
    """The classes work outside fixtures (benchmarks, demo): temp dirs, concurrent
    start(), and destroy() leaves no process or directory behind."""
    pg = PostgresServer(durability="unsafe")
    my = MariaDBServer(durability="full")
    try:
        with ThreadPoolExecutor(2) as pool:
            pg_started, my_started = pool.submit(pg.start), pool.submit(my.start)
            assert pg_started.result() is pg
            assert my_started.result() is my
        assert pg.execute("SHOW synchronous_commit") == [("off",)]
        assert _variables(my, "innodb_flush_log_at_trx_commit", "sync_binlog") == {
            "innodb_flush_log_at_trx_commit": "1",
            "sync_binlog": "1",
        }
        assert pg.last_start_seconds is not None and pg.last_start_seconds < 10
        assert my.last_start_seconds is not None and my.last_start_seconds < 10
        pids = pg.pids() + my.pids()
        dirs: list[Path] = [pg.base_dir, pg.run_dir, my.base_dir]
    finally:
        pg.destroy()
        my.destroy()
    assert not pg.running and not my.running
    assert _wait_gone(pids, timeout=0.5) == []
    assert [d for d in dirs if d.exists()] == []
    with pytest.raises(RuntimeError):
        pg.start()


def test_port_taken_before_start_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone grabs the port between free_port() and the server's bind: start()
    picks another port."""
    import tests.servers as servers

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = servers.free_port
        monkeypatch.setattr(
            servers, "free_port", lambda host: next(ports, None) or real_free_port(host)
        )
        with PostgresServer() as pg:
            assert pg.port not in (taken, 0)
            assert pg.execute("SELECT 1") == [(1,)]
            assert "Address already in use" in pg.log_tail()


def test_startup_failure_reports_the_log() -> None:
    pg = PostgresServer(settings={"wal_level": "bogus"}, start_timeout=20)
    try:
        with pytest.raises(ServerStartError, match="wal_level"):
            pg.start()
        assert not pg.running
    finally:
        pg.destroy()
