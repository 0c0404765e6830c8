"""The daemon end to end: generate -> redis (hash, stream) and NATS JetStream, with
the daemon's whole process group SIGKILLed mid-stream and restarted."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from dataflare.cdc.codec import decode_position, unpackb
from dataflare.cdc.generate import GenerateConfig
from dataflare.cdc.generate_source import ChangePlan, expected_rows
from dataflare.sinks.envelope import text_value
from dataflare.sinks.nats import subject_wildcard
from nats.js.api import AckPolicy, ConsumerConfig

from tests.e2e.daemon_harness import GroupDaemon, wait_for, write_config
from tests.servers import NatsServer, RedisServer

pytestmark = pytest.mark.e2e

N = 20_000
SIZE = 10  # changes per source transaction
GEN = {
    "count": N,
    "rate": 4000,
    "transaction_size": SIZE,
    "batch_size": 100,
    "tables": ["public.a", "s.b"],
    "seed": 11,
}
WF = "msg"


@pytest.fixture
def daemons() -> Iterator[list[GroupDaemon]]:
    started: list[GroupDaemon] = []
    yield started
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def run_with_two_crashes(
    tmp_path: Path, daemons: list[GroupDaemon], dest: dict[str, Any], progress: Callable[[], int]
) -> GroupDaemon:
    """Run the workflow, SIGKILL the daemon's process group twice once ``progress``
    (changes at the destination) has moved on, then run it to the end."""
    cfg = write_config(
        tmp_path,
        {
            WF: {
                "sources": {"gen": {"type": "generate", "config": GEN}},
                "destinations": {"out": dest},
            }
        },
    )
    for step in (3000, 5000):
        d = GroupDaemon(cfg)
        daemons.append(d)
        d.start()
        target = progress() + step
        wait_for(lambda t=target: progress() >= t, 30, f"{target} changes")  # type: ignore[misc]
        d.kill_group()
        assert progress() < N, "finished before the crash: nothing was tested"
    d = GroupDaemon(cfg)
    daemons.append(d)
    d.start()
    wait_for(lambda: d.workflow(WF)["state"] == "stopped", 40, "workflow finished")
    return d


def expected_ids() -> list[list[str]]:
    """Per table (in GEN order), the change ids of its changes in source order."""
    out: list[list[str]] = [[] for _ in GEN["tables"]]  # type: ignore[arg-type]
    for seq in range(1, N + 1):
        commit = min(((seq - 1) // SIZE + 1) * SIZE, N)
        out[(seq - 1) % len(out)].append(f"{WF}/gen/{commit}/{(seq - 1) % SIZE}")
    return out


def redis_progress(server: RedisServer, db: int) -> Callable[[], int]:
    client = server.client(db)
    key = f"dataflare:checkpoint:{WF}:out:gen"

    def progress() -> int:
        raw = client.get(key)
        pos = unpackb(raw)["position"] if raw else None
        return decode_position(pos).value if pos else 0

    return progress


def test_redis_hash_mode_survives_sigkill(
    tmp_path: Path, daemons: list[GroupDaemon], redis_server: RedisServer
) -> None:
    db = 7
    client = redis_server.client(db, decode_responses=True)
    client.flushdb()
    dest = {"type": "redis", "inputs": ["gen"], "config": {"url": f"{redis_server.url[:-2]}/{db}"}}
    d = run_with_two_crashes(tmp_path, daemons, dest, redis_progress(redis_server, db))
    want = expected_rows(GenerateConfig(**GEN), N)  # type: ignore[arg-type]
    got: dict[str, dict[str, str]] = {}
    for key in client.scan_iter("*"):
        if not key.startswith("dataflare:"):
            got[key] = client.hgetall(key)
    expect = {
        f"{t.name}:{rid}": {c.name: text_value(v) for c, v in zip(_columns(), row, strict=True)}
        for t, rows in want.items()
        for rid, row in rows.items()
    }
    assert got == expect
    assert d.terminate() == 0
    client.flushdb()
    client.close()


def _columns() -> Any:
    plan = ChangePlan(GenerateConfig(**GEN))  # type: ignore[arg-type]
    return plan.schema(0).columns


def test_redis_stream_mode_survives_sigkill(
    tmp_path: Path, daemons: list[GroupDaemon], redis_server: RedisServer
) -> None:
    db = 8
    client = redis_server.client(db, decode_responses=True)
    client.flushdb()
    url = f"{redis_server.url[:-2]}/{db}"
    dest = {"type": "redis", "inputs": ["gen"], "config": {"url": url, "mode": "stream"}}
    d = run_with_two_crashes(tmp_path, daemons, dest, redis_progress(redis_server, db))
    for table, ids in zip(["dataflare.public.a", "dataflare.s.b"], expected_ids(), strict=True):
        entries = client.xrange(table)
        assert len(entries) == len(ids)
        assert [e[1]["id"] for e in entries] == ids  # exactly once, in source order
    assert d.terminate() == 0
    client.flushdb()
    client.close()


async def _nats_ids(url: str, stream: str) -> tuple[int, list[str]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        sub = await js.pull_subscribe(
            subject_wildcard("e2e.{schema}.{table}"),
            stream=stream,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE),
        )
        ids: list[str] = []
        while len(ids) < info.state.messages:
            want = min(1000, info.state.messages - len(ids))
            for msg in await sub.fetch(want, timeout=10):
                ids.append((msg.headers or {})["Nats-Msg-Id"])
        await sub.unsubscribe()
        return info.state.messages, ids
    finally:
        await nc.close()


def test_nats_survives_sigkill(
    tmp_path: Path, daemons: list[GroupDaemon], nats_server: NatsServer
) -> None:
    stream = "E2E"
    dest = {
        "type": "nats",
        "inputs": ["gen"],
        "config": {"url": nats_server.url, "stream": stream, "subject": "e2e.{schema}.{table}"},
    }

    def progress() -> int:
        try:
            return asyncio.run(_nats_count(nats_server.url, stream))
        except Exception:  # the stream is created by the first daemon
            return 0

    d = run_with_two_crashes(tmp_path, daemons, dest, progress)
    count, ids = asyncio.run(_nats_ids(nats_server.url, stream))
    assert count == N
    assert len(set(ids)) == N
    assert set(ids) == {i for table in expected_ids() for i in table}
    assert d.workflow(WF)["destinations"][0]["records_written"] > 0
    assert d.terminate() == 0


async def _nats_count(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()
