"""Encode/decode throughput of a 5000-change batch of typical rows.

    .venv/bin/python bench/codec_bench.py [--changes N] [--repeat R]

Rows of an ``orders`` table (bigint, uuid, varchar, numeric, int, float8,
two timestamptz, nullable text, bool, text[]): 60% inserts, 30% updates with the
old row, 10% deletes; 10 changes per transaction. Prints the best of R runs.
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from dataflare.cdc.codec import decode_batch, encode_batch, peek_batch
from dataflare.cdc.model import Batch, Change, Column, Op, Position, TableId, TableSchema

TABLE = TableId("public", "orders")
SCHEMA = TableSchema(
    TABLE,
    (
        Column("id", "bigint", False, 20),
        Column("customer_id", "uuid", False, 2950),
        Column("status", "varchar(20)", False, 1043),
        Column("amount", "numeric(12,2)", False, 1700),
        Column("quantity", "integer", False, 23),
        Column("weight", "double precision", True, 701),
        Column("created_at", "timestamptz", False, 1184),
        Column("updated_at", "timestamptz", False, 1184),
        Column("note", "text", True, 25),
        Column("paid", "boolean", False, 16),
        Column("tags", "text[]", True, 1009),
    ),
    ("id",),
)
STATUSES = ("new", "paid", "shipped", "delivered", "cancelled")


def make_row(rng: random.Random, i: int) -> tuple[object, ...]:
    created = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(10**8))
    return (
        i,
        uuid.UUID(int=rng.getrandbits(128)),
        rng.choice(STATUSES),
        Decimal(rng.randrange(10**7)).scaleb(-2),
        rng.randrange(1, 100),
        rng.random() * 50 if rng.random() < 0.9 else None,
        created,
        created + timedelta(microseconds=rng.randrange(10**10)),
        f"customer note {rng.randrange(10**6)}" if rng.random() < 0.3 else None,
        rng.random() < 0.5,
        ["gift", "express"] if rng.random() < 0.2 else [],
    )


def make_batch(n: int, seed: int = 1) -> Batch:
    rng = random.Random(seed)
    changes = []
    lsn = 0x16_B374_D848
    for i in range(n):
        if i % 10 == 0:
            lsn += 4096
        pos = Position("postgres", lsn)
        r = rng.random()
        row = make_row(rng, i)
        xid, ts = 1000 + i // 10, 1_700_000_000_000_000 + i * 100
        if r < 0.6:
            c = Change(Op.INSERT, TABLE, pos, key=(i,), after=row, xid=xid, commit_ts_us=ts)
        elif r < 0.9:
            c = Change(
                Op.UPDATE,
                TABLE,
                pos,
                key=(i,),
                before=row,
                after=make_row(rng, i),
                xid=xid,
                commit_ts_us=ts,
            )
        else:
            c = Change(Op.DELETE, TABLE, pos, key=(i,), before=row, xid=xid, commit_ts_us=ts)
        changes.append(c)
    return Batch(changes, [SCHEMA], changes[0].position, changes[-1].position)


def best(fn: object, repeat: int) -> float:
    assert callable(fn)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--changes", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    batch = make_batch(args.changes)
    data = encode_batch(batch)
    assert decode_batch(data) == batch
    n = len(batch)
    t_enc = best(lambda: encode_batch(batch), args.repeat)
    t_dec = best(lambda: decode_batch(data), args.repeat)
    t_peek = best(lambda: peek_batch(data), args.repeat)
    print(f"batch: {n} changes, {len(data)} bytes ({len(data) / n:.0f} B/change)")
    print(f"encode: {t_enc * 1e3:7.2f} ms  {n / t_enc:12,.0f} changes/s")
    print(f"decode: {t_dec * 1e3:7.2f} ms  {n / t_dec:12,.0f} changes/s")
    print(f"peek:   {t_peek * 1e6:7.2f} µs")


if __name__ == "__main__":
    main()
