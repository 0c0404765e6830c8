"""Throughput of the transformation pipeline in the apply process (no database).

    .venv/bin/python bench/transform_bench.py [--rows N] [--repeat R]

Batches of 5000 changes (inserts and updates of a six-column table) through
``Pipeline.run`` for: a filter alone, the fused chain filter -> mapping -> mask,
and a route; the median rows/s of R runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from dataflare.cdc.model import Change, Column, Op, Position, TableId, TableSchema
from dataflare.daemon.config import ErrorHandling, NodeSpec, WorkflowConfig
from dataflare.daemon.transforms.base import TransformContext
from dataflare.daemon.transforms.configs import (
    FieldMapping,
    FilterConfig,
    MappingConfig,
    MaskConfig,
    MaskRule,
    Route,
    RouteConfig,
)
from dataflare.daemon.transforms.filter import FilterTransform
from dataflare.daemon.transforms.mapping import MappingTransform
from dataflare.daemon.transforms.mask import MaskTransform
from dataflare.daemon.transforms.pipeline import Pipeline
from dataflare.daemon.transforms.route import RouteTransform

TABLE = TableId("public", "customers")
SCHEMA = TableSchema(
    TABLE,
    (
        Column("id", "bigint", False),
        Column("status", "text"),
        Column("region", "text"),
        Column("amount", "numeric(12,2)"),
        Column("email", "text"),
        Column("created_at", "timestamptz"),
    ),
    ("id",),
)
BATCH = 5000


def make_changes(n: int) -> list[Change]:
    rng = random.Random(3)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    out = []
    for i in range(n):
        row = (
            i,
            rng.choice(("active", "inactive", "active", "pending")),
            rng.choice(("eu", "us", "apac")),
            Decimal(rng.randrange(0, 50_000)).scaleb(-2),
            f"user{i}@example.com",
            start + timedelta(seconds=i),
        )
        op = Op.UPDATE if i % 3 == 0 else Op.INSERT
        out.append(Change(op, TABLE, Position("bench", i // 10 + 1), (i,), None, row))
    return out


def spec(name: str, inputs: tuple[str, ...]) -> NodeSpec:
    return NodeSpec(name, "x", inputs, None, ErrorHandling(), "bench", 1)


def ctx(name: str) -> TransformContext:
    return TransformContext("bench", name)


def pipelines() -> dict[str, Pipeline]:
    src = (spec("src", ()),)
    cond = "status == 'active' and amount > 100"
    out: dict[str, Pipeline] = {}
    wf = WorkflowConfig("b", "", "b", src, (spec("f", ("src",)),), (spec("d", ("f",)),))
    out["filter"] = Pipeline(
        wf, {"f": FilterTransform("f", FilterConfig(cond), ctx("f"))}, {}, print
    )
    chain = (spec("f", ("src",)), spec("m", ("f",)), spec("k", ("m",)))
    wf = WorkflowConfig("b", "", "b", src, chain, (spec("d", ("k",)),))
    mapping = MappingConfig(
        [
            FieldMapping("contact", source="email"),
            FieldMapping("region_code", expression="upper(region)"),
        ],
        drop=["created_at"],
    )
    mask = MaskConfig([MaskRule("contact", "partial", 3)], salt="s")
    out["filter -> mapping -> mask (fused)"] = Pipeline(
        wf,
        {
            "f": FilterTransform("f", FilterConfig(cond), ctx("f")),
            "m": MappingTransform("m", mapping, ctx("m")),
            "k": MaskTransform("k", mask, ctx("k")),
        },
        {},
        print,
    )
    route = RouteConfig([Route(["eu"], condition="region == 'eu'")], default=["rest"])
    wf = WorkflowConfig(
        "b", "", "b", src, (spec("r", ("src",)),), (spec("eu", ("r",)), spec("rest", ("r",)))
    )
    out["route"] = Pipeline(wf, {"r": RouteTransform("r", route, ctx("r"))}, {}, print)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    changes = make_changes(args.rows)
    batches = [changes[i : i + BATCH] for i in range(0, len(changes), BATCH)]
    schemas = {TABLE: SCHEMA}
    print(f"{'pipeline':36} {'rows/s':>12}")
    for name, p in pipelines().items():
        runs = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            for b in batches:
                p.run("src", b, schemas)
            runs.append(args.rows / (time.perf_counter() - t))
        print(f"{name:36} {statistics.median(runs):12,.0f}")


if __name__ == "__main__":
    main()
