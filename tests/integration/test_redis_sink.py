"""The `redis` destination against a private Redis server."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from dataflare.cdc.errors import FatalError, RetryableError
from dataflare.cdc.model import Batch, Change, Column, Op, Position, TableId, TableSchema
from dataflare.sinks import redis as redis_sink
from dataflare.sinks.base import SinkContext
from dataflare.sinks.configs import RedisSinkConfig
from dataflare.sinks.envelope import from_msgpack
from dataflare.sinks.redis import RedisSink

from tests.fakes import NoState
from tests.servers import RedisServer, free_port

pytestmark = pytest.mark.integration

ITEMS = TableId("shop", "items")
SCHEMA = TableSchema(
    ITEMS,
    (
        Column("id", "bigint", False),
        Column("region", "text"),
        Column("price", "numeric"),
        Column("qty", "integer"),
    ),
    ("id",),
)
KEYLESS = TableSchema(TableId("shop", "log"), (Column("line", "text"),), ())


def pos(v: int, tag: str = "") -> Position:
    return Position("generate", v, tag)


def ins(p: int, row: tuple[Any, ...], xid: int | None = None) -> Change:
    return Change(Op.INSERT, ITEMS, pos(p), (row[0],), None, row, xid=xid or p)


def upd(p: int, row: tuple[Any, ...]) -> Change:
    return Change(Op.UPDATE, ITEMS, pos(p), (row[0],), None, row, xid=p)


def dele(p: int, key: int) -> Change:
    return Change(Op.DELETE, ITEMS, pos(p), (key,), (key, None, None, None), None, xid=p)


def batch(
    *changes: Change, complete: bool = True, schemas: list[TableSchema] | None = None
) -> Batch:
    return Batch(
        list(changes), schemas or [SCHEMA], changes[0].position, changes[-1].position, complete
    )


SinkFactory = Callable[..., RedisSink]


@pytest.fixture
def db(redis_server: RedisServer) -> Iterator[int]:
    """A Redis database number of its own per test (flushed before use)."""
    n = uuid.uuid4().int % 15 + 1
    client = redis_server.client(n)
    client.flushdb()
    yield n
    client.flushdb()
    client.close()


@pytest.fixture
def make_sink(redis_server: RedisServer, db: int) -> Iterator[SinkFactory]:
    opened: list[RedisSink] = []

    def make(**cfg: Any) -> RedisSink:
        cfg.setdefault("url", f"redis://127.0.0.1:{redis_server.port}/{db}")
        sink = RedisSink(
            "cache",
            RedisSinkConfig(**cfg),
            SinkContext("wf", "cache", ("src",), NoState("the redis sink")),
        )
        sink.open()
        opened.append(sink)
        return sink

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def client(redis_server: RedisServer, db: int) -> Any:
    c = redis_server.client(db, decode_responses=True)
    yield c
    c.close()


def test_hash_mode_mirrors_rows(make_sink: SinkFactory, client: Any) -> None:
    sink = make_sink()
    assert sink.checkpoint("src") is None
    sink.write("src", batch(ins(1, (1, "eu", Decimal("9.90"), None)), ins(1, (2, "us", None, 3))))
    assert client.hgetall("items:1") == {"id": "1", "region": "eu", "price": "9.90"}  # no qty
    assert client.hgetall("items:2") == {"id": "2", "region": "us", "qty": "3"}
    # an update that sets a column NULL removes its field; a delete removes the hash
    sink.write("src", batch(upd(2, (1, None, Decimal("1.00"), 7)), dele(2, 2)))
    assert client.hgetall("items:1") == {"id": "1", "price": "1.00", "qty": "7"}
    assert client.exists("items:2") == 0
    assert sink.checkpoint("src") == pos(2)
    assert sink.status()["records_written"] == 4


def test_replaying_a_batch_has_no_further_effect(make_sink: SinkFactory, client: Any) -> None:
    b1 = batch(ins(1, (1, "eu", None, 1)), ins(1, (2, "eu", None, 2)))
    b2 = batch(upd(2, (1, "eu", None, 10)), dele(2, 2))
    for mode in ("hash", "stream"):
        client.flushdb()
        sink = make_sink(mode=mode)
        sink.write("src", b1)
        sink.write("src", b2)
        before = {k: client.type(k) for k in client.keys("*")}
        dump = {k: client.dump(k) for k in before if not k.startswith("dataflare:")}
        # a restarted apply process reads the checkpoint back from Redis
        again = make_sink(mode=mode)
        assert again.checkpoint("src") == pos(2)
        again.write("src", b1)
        again.write("src", b2)
        assert {k: client.dump(k) for k in dump} == dump
        assert again.status()["records_written"] == 0
        if mode == "stream":
            assert client.xlen("dataflare.shop.items") == 4


def test_a_dead_letter_replay_is_applied_behind_the_checkpoint(
    make_sink: SinkFactory, client: Any
) -> None:
    sink = make_sink()
    sink.write("src", batch(ins(5, (1, "eu", None, 1))))
    # A change of position 3 comes back from the dead letters: the checkpoint stays at 5.
    old = ins(3, (2, "us", None, 2))
    sink.write("src", Batch([old], [SCHEMA], pos(5), pos(5), True, replay=True))
    assert client.hgetall("items:2") == {"id": "2", "region": "us", "qty": "2"}
    assert sink.checkpoint("src") == pos(5)


def test_key_template_with_a_column(make_sink: SinkFactory, client: Any) -> None:
    sink = make_sink(key="{region}/{table}/{key}")
    sink.write("src", batch(ins(1, (1, "eu", None, 1)), ins(1, (2, "us", None, 2))))
    assert client.hget("eu/items/1", "qty") == "1"
    assert client.hget("us/items/2", "qty") == "2"
    # the region changes: the hash moves to its new key
    sink.write(
        "src",
        batch(
            Change(Op.UPDATE, ITEMS, pos(2), (1,), (1, "eu", None, 1), (1, "us", None, 5), xid=2)
        ),
    )
    assert client.exists("eu/items/1") == 0
    assert client.hgetall("us/items/1") == {"id": "1", "region": "us", "qty": "5"}
    # a delete carrying only the key cannot name a key built from another column
    with pytest.raises(FatalError, match="template column region"):
        sink.write("src", batch(dele(3, 1)))


def test_truncate_deletes_only_that_tables_keys(make_sink: SinkFactory, client: Any) -> None:
    other = TableSchema(TableId("shop", "items2"), SCHEMA.columns, ("id",))
    sink = make_sink()
    sink.write(
        "src",
        batch(
            ins(1, (1, "eu", None, 1)),
            ins(1, (2, "eu", None, 1)),
            Change(Op.INSERT, other.table, pos(1), (1,), None, (1, "x", None, 1), xid=1),
            schemas=[SCHEMA, other],
        ),
    )
    client.set("items-other", "kept")
    trunc = Change(Op.TRUNCATE, ITEMS, pos(2), None, None, None, xid=2)
    sink.write("src", batch(trunc))
    assert sorted(client.keys("items*")) == ["items-other", "items2:1"]


def test_table_without_primary_key_is_refused_in_hash_mode(make_sink: SinkFactory) -> None:
    c = Change(Op.INSERT, KEYLESS.table, pos(1), None, None, ("hello",), xid=1)
    with pytest.raises(FatalError, match="has no primary key"):
        make_sink().write("src", batch(c, schemas=[KEYLESS]))
    stream = make_sink(mode="stream")
    stream.write("src", batch(c, schemas=[KEYLESS]))  # fine as a change log
    assert stream.status()["records_written"] == 1


def test_stream_mode_entries(make_sink: SinkFactory, redis_server: RedisServer, db: int) -> None:
    sink = make_sink(mode="stream", stream="cdc:{table}", envelope="msgpack")
    sink.write("src", batch(ins(5, (1, "eu", Decimal("2.50"), 1)), dele(5, 9)))
    binary = redis_server.client(db)  # msgpack values: no decoding
    entries = [e[1] for e in binary.xrange("cdc:items")]
    binary.close()
    assert [e[b"id"] for e in entries] == [b"wf/src/5/0", b"wf/src/5/1"]
    assert [e[b"op"] for e in entries] == [b"c", b"d"]
    assert json.loads(entries[0][b"key"]) == {"id": 1}
    env = from_msgpack(entries[0][b"value"])
    assert env["after"]["price"] == "2.50" and env["source"]["seq"] == 5
    assert env["after"]["qty"] == 1 and from_msgpack(entries[1][b"value"])["op"] == "d"


def test_stream_maxlen_trims(make_sink: SinkFactory, client: Any) -> None:
    sink = make_sink(mode="stream", stream_maxlen=10)
    for p in range(1, 40):
        sink.write("src", batch(*(ins(p, (i, "eu", None, i)) for i in range(10))))
    assert client.xlen("dataflare.shop.items") < 390  # approximate trimming


def test_incomplete_batches_are_written_with_their_commit(
    make_sink: SinkFactory, client: Any
) -> None:
    sink = make_sink(mode="stream")
    sink.write("src", batch(ins(9, (1, "eu", None, 1), xid=3), complete=False))
    assert client.xlen("dataflare.shop.items") == 0
    assert sink.status()["buffered"] == 1
    sink.write("src", batch(ins(9, (2, "eu", None, 1), xid=3)))
    ids = [e[1]["id"] for e in client.xrange("dataflare.shop.items")]
    assert ids == ["wf/src/9/0", "wf/src/9/1"]  # ordinals continue across the parts


def test_oversized_transaction_is_not_duplicated_after_a_crash(
    make_sink: SinkFactory, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_sink, "BUFFER_LIMIT", 200)
    parts = [
        batch(*(ins(20, (i, "eu", None, i), xid=4) for i in range(k, k + 5)), complete=False)
        for k in range(0, 15, 5)
    ]
    commit = batch(*(ins(20, (i, "eu", None, i), xid=4) for i in range(15, 18)))
    sink = make_sink(mode="stream")
    sink.write("src", batch(ins(10, (100, "eu", None, 0))))
    for part in parts[:2]:
        sink.write("src", part)
    written = client.xlen("dataflare.shop.items")
    assert written > 1 and sink.status()["partial_flushes"] >= 1  # crash now
    again = make_sink(mode="stream")
    assert again.checkpoint("src") == pos(10)
    for b in [*parts, commit]:  # the source re-sends the whole transaction
        again.write("src", b)
    ids = [e[1]["id"] for e in client.xrange("dataflare.shop.items")]
    assert ids == ["wf/src/10/0", *(f"wf/src/20/{i}" for i in range(18))]
    assert again.status()["replayed_skipped"] == written - 1
    assert again.checkpoint("src") == pos(20)


def test_unreachable_redis_is_retryable_without_the_password() -> None:
    port = free_port()
    sink = RedisSink(
        "cache",
        RedisSinkConfig(url=f"redis://user:s3cret@127.0.0.1:{port}/0", connect_timeout=1),
        SinkContext("wf", "cache", ("src",), NoState("the redis sink")),
    )
    with pytest.raises(RetryableError) as err:
        sink.open()
    assert "s3cret" not in str(err.value) and f"127.0.0.1:{port}" in str(err.value)
    sink.close()
