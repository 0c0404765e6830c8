"""Where the postgres source spends its time per row (cProfile of the decode path).

    .venv/bin/python bench/pg_source_profile.py [--rows 200000] [--top 18]

One private PostgreSQL 15 server; a backlog of inserts (1000-row transactions) into
a five-column table is read by ``PostgresSource.read_batch`` and each batch encoded
for the ring, as the source worker does, under cProfile. Prints rows/s (with the
profiler's overhead, about 2x: read it as shares, not speed) and the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataflare.cdc.codec import encode_batch
from dataflare.cdc.postgres.config import PostgresSourceConfig
from dataflare.cdc.postgres.source import PostgresSource
from dataflare.cdc.source import SourceContext

from tests.servers import PostgresServer

DDL = (
    "CREATE TABLE t (id bigint PRIMARY KEY, name text, amount numeric(12,2), qty int,"
    " ts timestamptz)"
)
LOAD = (
    "INSERT INTO t SELECT g, 'name' || g, g %% 1000, g %% 7, now() "
    "FROM generate_series(%s::bigint, %s::bigint) g"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args()
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="dataflare-prof")) / "pg").start()
    try:
        dsn = server.create_database("prof")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(DDL)
        config = PostgresSourceConfig(dsn=dsn, tables=["t"], snapshot="never", batch_size=5000)
        source = PostgresSource("s", config, SourceContext("prof"))
        source.open(None)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(0, args.rows, 1000):
                conn.execute(LOAD, (i + 1, i + 1000))
        got = 0
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        while got < args.rows:
            batch = source.read_batch(0.5)
            if batch is not None:
                encode_batch(batch)
                got += len(batch.changes)
        prof.disable()
        elapsed = time.perf_counter() - start
        source.close()
        print(f"{got} rows in {elapsed:.2f}s under cProfile ({elapsed / got * 1e6:.1f} us/row)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
