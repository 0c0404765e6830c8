"""Two ways to read a logical slot's backlog, side by side: the walsender's stream
(START_REPLICATION, what the source uses) and the SQL functions
(``pg_logical_slot_get_binary_changes`` in chunks, streamed with COPY; and
``pg_logical_slot_peek_binary_changes`` + ``pg_replication_slot_advance``, the
variant that consumes only once the destinations have applied).

    .venv/bin/python bench/pg_slot_read_modes.py [--rows 300000] [--chunk 20000] [--rounds 3]

One private PostgreSQL 15 server; a backlog of inserts (1000-row transactions) into a
five-column table behind one slot. Each round reads a copy of that slot to the end
in each mode, in alternating order, and prints the server process's CPU per row
(walsender, or the backend running the function), the reader's CPU per row and the
rate; then the medians. The reader only takes the pgoutput messages off the wire
(the stream: the source's packed reader; SQL: binary COPY rows), so what differs is
how the server produces and sends them: the walsender sends each message as it is
decoded, a query's backend decodes a chunk into a tuplestore and sends it in full
buffers.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataflare.cdc.postgres.config import PostgresSourceConfig
from dataflare.cdc.postgres.source import PostgresSource
from dataflare.cdc.source import SourceContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pg_walsender_pace import (  # type: ignore[import-not-found]
    backlog_server,
    cpu_of,
    walsender_pid,
)

OPTIONS = "'proto_version', '1', 'publication_names', 'p'"


def copy_slot(dsn: str, name: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SELECT pg_copy_logical_replication_slot('base', '{name}')")


def drop_slot(dsn: str, name: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SELECT pg_drop_replication_slot('{name}')")


def read_stream(dsn: str, slot: str, rows: int) -> tuple[float, float, float]:
    """(server CPU s, reader CPU s, wall s): the source's packed reader on the stream."""
    cfg = PostgresSourceConfig(dsn=dsn, tables=["t"], snapshot="never", slot=slot, publication="p")
    src = PostgresSource("s", cfg, SourceContext("modes", pg_text=True))
    src.open(None)
    server = walsender_pid()
    if server is None:
        raise RuntimeError("no streaming walsender")
    s0, c0, t0 = cpu_of(server), time.process_time(), time.perf_counter()
    got = 0
    while got < rows:
        b = src.read_batch(0.5)
        if b is not None:
            got += len(b)
    wall = time.perf_counter() - t0
    out = (cpu_of(server) - s0, time.process_time() - c0, wall)
    src.close()
    return out


_FIELDS = struct.Struct("!h")


def read_sql(dsn: str, slot: str, rows: int, chunk: int, peek: bool) -> tuple[float, float, float]:
    """(server CPU s, reader CPU s, wall s): chunks of ``get`` (consuming) or ``peek``
    then ``pg_replication_slot_advance`` to the chunk's last commit."""
    fn = "pg_logical_slot_peek_binary_changes" if peek else "pg_logical_slot_get_binary_changes"
    query = (
        f"COPY (SELECT lsn, data FROM {fn}('{slot}', NULL, {chunk}, {OPTIONS})) "
        "TO STDOUT (FORMAT binary)"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        server = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        s0, c0, t0 = cpu_of(server), time.process_time(), time.perf_counter()
        got = 0
        while got < rows:
            buf = bytearray()
            with conn.cursor().copy(query) as cp:
                for block in cp:
                    buf += block
            pos = 19  # binary COPY header
            if len(buf) <= pos:
                raise RuntimeError("the slot ran dry before the backlog was read")
            last_lsn = None
            while True:
                (fields,) = _FIELDS.unpack_from(buf, pos)
                if fields == -1:
                    break
                (lsn_len,) = struct.unpack_from("!i", buf, pos + 2)
                (data_len,) = struct.unpack_from("!i", buf, pos + 6 + lsn_len)
                data_at = pos + 10 + lsn_len
                got += buf[data_at] == 0x49
                if buf[data_at] == 0x43:  # b"C": Commit; its end LSN is at 9..17
                    last_lsn = struct.unpack_from("!q", buf, data_at + 10)[0]
                pos = data_at + data_len
            if peek and last_lsn is not None:
                lsn_text = f"{last_lsn >> 32:X}/{last_lsn & 0xFFFFFFFF:X}"
                conn.execute(f"SELECT pg_replication_slot_advance('{slot}', '{lsn_text}')")
        wall = time.perf_counter() - t0
        return cpu_of(server) - s0, time.process_time() - c0, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--chunk", type=int, default=20_000, help="upto_nchanges per SQL call")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = args.rows
    with backlog_server("modes", rows) as dsn:
        modes: dict[str, Callable[[str], tuple[float, float, float]]] = {
            "stream (walsender)": lambda s: read_stream(dsn, s, rows),
            f"get_changes x{args.chunk}": lambda s: read_sql(dsn, s, rows, args.chunk, False),
            f"peek+advance x{args.chunk}": lambda s: read_sql(dsn, s, rows, args.chunk, True),
        }
        results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
        names = list(modes)
        for r in range(args.rounds):
            for i, name in enumerate(names if r % 2 == 0 else names[::-1]):
                slot = f"r{r}_{i}"
                copy_slot(dsn, slot)
                res = modes[name](slot)
                drop_slot(dsn, slot)
                results[name].append(res)
                srv, rd, wall = res
                print(
                    f"round {r + 1} {name:24} server {srv / rows * 1e6:5.2f} us/row, reader "
                    f"{rd / rows * 1e6:5.2f} us/row, {rows / wall:,.0f} rows/s",
                    flush=True,
                )
        print(f"\nmedians over {args.rounds} rounds, {rows:,} rows:")
        for name, rs in results.items():
            srv = statistics.median(x[0] for x in rs) / rows * 1e6
            rd = statistics.median(x[1] for x in rs) / rows * 1e6
            rate = statistics.median(rows / x[2] for x in rs)
            print(
                f"  {name:24} server {srv:5.2f} us/row  reader {rd:5.2f} us/row  "
                f"{rate:10,.0f} rows/s"
            )


if __name__ == "__main__":
    main()
