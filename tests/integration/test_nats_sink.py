"""The `nats` destination against a private NATS server with JetStream."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from dataflare.cdc.errors import FatalError, RetryableError
from dataflare.cdc.model import Batch, Change, Column, Op, Position, TableId, TableSchema
from dataflare.daemon.state import StateStore
from dataflare.sinks.base import SinkContext
from dataflare.sinks.configs import NatsSinkConfig
from dataflare.sinks.envelope import from_msgpack
from dataflare.sinks.nats import NatsSink, subject_wildcard
from nats.js.api import StreamConfig

from tests.servers import NatsServer, free_port

pytestmark = pytest.mark.integration

ITEMS = TableId("shop", "items")
SCHEMA = TableSchema(
    ITEMS,
    (Column("id", "bigint", False), Column("name", "text"), Column("qty", "integer")),
    ("id",),
)


def pos(v: int) -> Position:
    return Position("generate", v)


def ins(p: int, i: int, name: str | None = "x") -> Change:
    return Change(Op.INSERT, ITEMS, pos(p), (i,), None, (i, name, i), xid=p)


def batch(*changes: Change, complete: bool = True) -> Batch:
    return Batch(list(changes), [SCHEMA], changes[0].position, changes[-1].position, complete)


async def _stream_messages(url: str, stream: str) -> list[tuple[str, dict[str, str], bytes]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            out.append((msg.subject, dict(msg.headers or {}), msg.data or b""))
        return out
    finally:
        await nc.close()


def stream_messages(url: str, stream: str) -> list[tuple[str, dict[str, str], bytes]]:
    return asyncio.run(_stream_messages(url, stream))


SinkFactory = Callable[..., NatsSink]


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore(str(tmp_path / "state"))
    yield s
    s.close()


@pytest.fixture
def stream_name() -> str:
    return f"T{uuid.uuid4().hex[:10].upper()}"


@pytest.fixture
def make_sink(
    nats_server: NatsServer, state: StateStore, stream_name: str
) -> Iterator[SinkFactory]:
    opened: list[NatsSink] = []

    def make(**cfg: Any) -> NatsSink:
        cfg.setdefault("url", nats_server.url)
        cfg.setdefault("stream", stream_name)
        cfg.setdefault("subject", f"{stream_name.lower()}.{{schema}}.{{table}}")
        sink = NatsSink("bus", NatsSinkConfig(**cfg), SinkContext("wf", "bus", ("src",), state))
        opened.append(sink)
        sink.open()
        return sink

    yield make
    for s in opened:
        s.close()


def test_publishes_envelopes_with_ids_and_checkpoints(
    make_sink: SinkFactory, nats_server: NatsServer, state: StateStore, stream_name: str
) -> None:
    sink = make_sink()
    sink.write("src", batch(ins(3, 1), ins(3, 2, None), ins(3, 3)))
    assert state.get_checkpoint("wf", "bus", "src") == pos(3)
    msgs = stream_messages(nats_server.url, stream_name)
    assert [m[0] for m in msgs] == [f"{stream_name.lower()}.shop.items"] * 3
    assert [m[1]["Nats-Msg-Id"] for m in msgs] == ["wf/src/3/0", "wf/src/3/1", "wf/src/3/2"]
    assert msgs[1][1]["Dataflare-Key"] == '{"id":2}'
    env = json.loads(msgs[1][2])
    assert env["after"] == {"id": 2, "name": None, "qty": 2} and env["op"] == "c"
    assert env["source"]["table"] == "items"
    st = sink.status()
    assert st["records_written"] == 3 and st["duplicates"] == 0 and st["stream"] == stream_name


def test_replay_after_a_crash_is_dropped_by_jetstream(
    make_sink: SinkFactory, nats_server: NatsServer, state: StateStore, stream_name: str
) -> None:
    b1 = batch(ins(2, 1), ins(2, 2))
    part = batch(ins(5, 3), ins(5, 4), complete=False)
    end = batch(ins(5, 5))
    sink = make_sink()
    sink.write("src", b1)
    sink.write("src", part)  # published, not checkpointed: crash now
    sink.close()
    assert state.get_checkpoint("wf", "bus", "src") == pos(2)
    again = make_sink()
    assert again.checkpoint("src") == pos(2)
    again.write("src", part)  # the source re-sends the open transaction
    again.write("src", end)
    again.write("src", b1)  # and a batch it already had: nothing new either
    msgs = stream_messages(nats_server.url, stream_name)
    ids = [m[1]["Nats-Msg-Id"] for m in msgs]
    assert ids == ["wf/src/2/0", "wf/src/2/1", "wf/src/5/0", "wf/src/5/1", "wf/src/5/2"]
    st = again.status()
    assert st["duplicates"] == 4 and st["records_written"] == 1


def test_msgpack_envelope(
    make_sink: SinkFactory, nats_server: NatsServer, stream_name: str
) -> None:
    make_sink(envelope="msgpack").write("src", batch(ins(1, 7)))
    (msg,) = stream_messages(nats_server.url, stream_name)
    assert from_msgpack(msg[2])["after"] == {"id": 7, "name": "x", "qty": 7}


def test_missing_stream_without_create_is_fatal(make_sink: SinkFactory) -> None:
    with pytest.raises(FatalError, match="does not exist and create_stream is false"):
        make_sink(create_stream=False)


def test_existing_stream_with_short_window_warns(
    make_sink: SinkFactory, nats_server: NatsServer, stream_name: str
) -> None:
    async def create() -> None:
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().add_stream(
            StreamConfig(
                name=stream_name,
                subjects=[subject_wildcard(f"{stream_name.lower()}.{{schema}}.{{table}}")],
                duplicate_window=5,
            )
        )
        await nc.close()

    asyncio.run(create())
    lines: list[str] = []
    from loguru import logger

    handler = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        sink = make_sink(create_stream=False)
    finally:
        logger.remove(handler)
    assert sink.status()["duplicate_window_s"] == 5
    assert any("dedupes message ids for 5s only" in line for line in lines)


def test_subject_outside_the_stream_is_fatal(make_sink: SinkFactory, stream_name: str) -> None:
    make_sink()  # creates the stream for <stream>.*.*
    other = make_sink(subject="elsewhere.{table}")
    with pytest.raises(FatalError, match="no JetStream stream takes"):
        other.write("src", batch(ins(1, 1)))


def test_unreachable_server_is_retryable_without_the_password(state: StateStore) -> None:
    port = free_port()
    sink = NatsSink(
        "bus",
        NatsSinkConfig(url=f"nats://me:s3cret@127.0.0.1:{port}", ack_timeout=2),
        SinkContext("wf", "bus", ("src",), state),
    )
    with pytest.raises(RetryableError) as err:
        sink.open()
    sink.close()
    assert "s3cret" not in str(err.value) and f"127.0.0.1:{port}" in str(err.value)
