"""How the source's read pacing changes the walsender's CPU (and its own).

    .venv/bin/python bench/pg_walsender_pace.py [--rows 300000] [--pauses 0.0005,0,0.002]

One private PostgreSQL 15 server; a backlog of inserts (1000-row transactions) into
a five-column table behind one slot. For each pause (``replication.COALESCE_S``: 0
wakes the reader per packet the walsender sends), a copy of that slot is read to
the end by a packed-mode ``PostgresSource`` alone (batches encoded for the ring),
and the bench prints the source's CPU per row, the walsender's (from /proc) and the
read rate. Two rounds; compare within a round: the machine is noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataflare.cdc.codec import encode_batch
from dataflare.cdc.postgres import replication
from dataflare.cdc.postgres.config import PostgresSourceConfig
from dataflare.cdc.postgres.source import PostgresSource
from dataflare.cdc.source import SourceContext

from tests.servers import PostgresServer

TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """user + system CPU seconds of ``pid``."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def walsender_pid() -> int | None:
    """The (one) walsender streaming now."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "walsender" in cmd and "START_REPLICATION" in cmd:
                return int(d.name)
    return None


def walsender_cpu() -> float:
    """CPU seconds of the (one) walsender streaming now."""
    pid = walsender_pid()
    return cpu_of(pid) if pid is not None else 0.0


@contextlib.contextmanager
def backlog_server(prefix: str, rows: int) -> Iterator[str]:
    """A private server holding ``insert_backlog(rows)``: the database's DSN."""
    server = PostgresServer(Path(tempfile.mkdtemp(prefix=f"dataflare-{prefix}")) / "pg").start()
    try:
        dsn = server.create_database(prefix)
        insert_backlog(dsn, rows)
        yield dsn
    finally:
        server.destroy()


def insert_backlog(dsn: str, rows: int) -> None:
    """Table t (five columns), publication p, slot 'base' created before ``rows``
    inserts in 1000-row transactions (also used by pg_slot_read_modes.py)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE t (id bigint PRIMARY KEY, name text, amount numeric(12,2),"
            " qty int, ts timestamptz)"
        )
        conn.execute("CREATE PUBLICATION p FOR TABLE t")
        conn.execute("SELECT pg_create_logical_replication_slot('base', 'pgoutput')")
        for i in range(0, rows, 1000):
            conn.execute(
                "INSERT INTO t SELECT g, 'name ' || g, g * 1.25, g %% 100, now() "
                "FROM generate_series(%s::bigint, %s::bigint) g",
                (i + 1, i + 1000),
            )
        conn.execute("CHECKPOINT")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--pauses", default="0.0005,0,0.002")
    args = ap.parse_args()
    rows = args.rows
    with backlog_server("pace", rows) as dsn:
        for round_ in (1, 2):
            for pause in (float(p) for p in args.pauses.split(",")):
                replication.COALESCE_S = pause
                slot = f"r{round_}_{int(pause * 1e6)}"
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(f"SELECT pg_copy_logical_replication_slot('base', '{slot}')")
                cfg = PostgresSourceConfig(
                    dsn=dsn, tables=["t"], snapshot="never", slot=slot, publication="p"
                )
                src = PostgresSource("s", cfg, SourceContext("pace", pg_text=True))
                src.open(None)
                got, c0, t0 = 0, time.process_time(), time.perf_counter()
                while got < rows:
                    b = src.read_batch(0.5)
                    if b is not None:
                        encode_batch(b)
                        got += len(b)
                wall = time.perf_counter() - t0
                print(
                    f"round {round_}, pause {pause * 1000:.2f} ms: source "
                    f"{(time.process_time() - c0) / rows * 1e6:.2f} us/row, walsender "
                    f"{walsender_cpu() / rows * 1e6:.2f} us/row, {rows / wall:,.0f} rows/s",
                    flush=True,
                )
                src.close()


if __name__ == "__main__":
    main()
