"""Throughput of compiled expressions over batches of row tuples.

    .venv/bin/python bench/expr_bench.py [--rows N] [--repeat R]

Rows of six columns (id bigint, status text, region text, amount numeric,
email text, created_at timestamptz), in batches of 5000 rows. Prints rows/s of
a three-clause filter and of a computed field, the median of R runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from dataflare.daemon.transforms.expr import parse

COLUMNS = ("id", "status", "region", "amount", "email", "created_at")
STATUSES = ("active", "inactive", "pending", "active", "closed")
REGIONS = ("eu", "us", "apac", "latam")
FILTER = "status == 'active' and amount > 100 and region in ('eu', 'us')"
COMPUTED = "lower(email) + '-' + str(id)"
BATCH = 5000


def make_rows(n: int, seed: int = 7) -> list[tuple[Any, ...]]:
    rng = random.Random(seed)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    return [
        (
            i,
            rng.choice(STATUSES),
            rng.choice(REGIONS),
            Decimal(rng.randrange(0, 50_000)).scaleb(-2),
            f"User{i}@Example.com",
            start + timedelta(seconds=rng.randrange(10**7)),
        )
        for i in range(n)
    ]


def rows_per_second(
    fn: Callable[[Sequence[tuple[Any, ...] | None]], list[Any]],
    batches: list[list[tuple[Any, ...]]],
    repeat: int,
) -> float:
    total = sum(len(b) for b in batches)
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for batch in batches:
            fn(batch)
        runs.append(total / (time.perf_counter() - t0))
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rows = make_rows(args.rows)
    batches = [rows[i : i + BATCH] for i in range(0, len(rows), BATCH)]
    keep = parse(FILTER).predicate(COLUMNS)
    share = sum(keep(rows)) / len(rows)
    print(f"filter   {FILTER}")
    print(f"         {rows_per_second(keep, batches, args.repeat):,.0f} rows/s ({share:.0%} pass)")
    value = parse(COMPUTED).values(COLUMNS)
    print(f"computed {COMPUTED}")
    print(f"         {rows_per_second(value, batches, args.repeat):,.0f} rows/s")


if __name__ == "__main__":
    main()
