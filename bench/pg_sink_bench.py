"""Throughput of the `postgres` destination's write() (upsert mode), one process.

Starts a private PostgreSQL server (tests.servers, durability "fast": fsync off),
then drives PostgresSink.write() directly with 5000-row batches, one source
transaction per batch (so one commit with the checkpoint per batch):

- insert: N new rows;
- update: N updates of those rows (every column but the key changes);
- mixed: N changes, 60% inserts of new rows, 30% updates and 10% deletes of
  existing rows (no key repeats within a batch, so nothing coalesces away).

Rows look like the generate source's (bigint key, text, numeric(12,2), integer,
boolean, timestamptz). Prints rows/s per workload (median of --repeat runs).

    .venv/bin/python bench/pg_sink_bench.py [--rows 100000] [--batch 5000] [--repeat 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataflare.cdc.model import Batch, Change, Column, Op, Position, TableId, TableSchema
from dataflare.sinks.base import SinkContext
from dataflare.sinks.configs import PostgresSinkConfig
from dataflare.sinks.postgres import PostgresSink

from tests.servers import PostgresServer

TABLE = TableId("public", "items")
SCHEMA = TableSchema(
    TABLE,
    (
        Column("id", "bigint", False),
        Column("name", "text"),
        Column("amount", "numeric(12,2)"),
        Column("qty", "integer"),
        Column("active", "boolean"),
        Column("updated_at", "timestamp with time zone"),
    ),
    ("id",),
)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class _NoState:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError("not used by the postgres sink")


def row(i: int, v: int) -> tuple[Any, ...]:
    return (i, f"item-{i}-{v}", Decimal(i * 7 + v).scaleb(-2), v, bool(v & 1),
            T0 + timedelta(seconds=v))  # fmt: skip


def batches(kind: str, n: int, size: int, lsn: int) -> list[Batch]:
    out = []
    for start in range(0, n, size):
        lsn += 1
        p = Position("postgres", lsn)
        ids = range(start + 1, min(start + size, n) + 1)
        if kind == "insert":
            ch = [Change(Op.INSERT, TABLE, p, key=(i,), after=row(i, 0)) for i in ids]
        elif kind == "update":
            ch = [Change(Op.UPDATE, TABLE, p, key=(i,), after=row(i, 1)) for i in ids]
        else:  # mixed: new keys above the first N, updates and deletes of the first N
            ch = []
            for i in ids:
                m = i % 10
                if m < 6:
                    ch.append(Change(Op.INSERT, TABLE, p, key=(n + i,), after=row(n + i, 0)))
                elif m < 9:
                    ch.append(Change(Op.UPDATE, TABLE, p, key=(i,), after=row(i, 2)))
                else:
                    ch.append(Change(Op.DELETE, TABLE, p, key=(i,),
                                     before=(i, None, None, None, None, None)))  # fmt: skip
        out.append(Batch(ch, [SCHEMA], p, p, True))
    return out


def run(dsn: str, n: int, size: int) -> dict[str, float]:
    sink = PostgresSink(
        "bench", PostgresSinkConfig(dsn=dsn), SinkContext("bench", "bench", ("s",), _NoState())
    )
    sink.open()
    rates = {}
    try:
        lsn = 0
        for kind in ("insert", "update", "mixed"):
            work = batches(kind, n, size, lsn)
            lsn = work[-1].last.value
            t = time.perf_counter()
            for b in work:
                sink.write("s", b)
            rates[kind] = n / (time.perf_counter() - t)
    finally:
        sink.close()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    results: dict[str, list[float]] = {}
    with PostgresServer() as pg:
        for r in range(args.repeat):
            dsn = pg.create_database(f"bench_{r}")
            for k, v in run(dsn, args.rows, args.batch).items():
                results.setdefault(k, []).append(v)
    for k, v in results.items():
        runs = ", ".join(f"{x:,.0f}" for x in v)
        print(f"{k:7s} {args.rows} rows, batches of {args.batch}: "
              f"{statistics.median(v):,.0f} rows/s (runs: {runs})")  # fmt: skip


if __name__ == "__main__":
    main()
