"""The C twins (cdc/_speedups.c) agree with their pure-Python versions, on
well-formed input and on anything at all; and packed batches cross the codec."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from dataflare.cdc import _speedups
from dataflare.cdc.codec import decode_batch, encode_batch
from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Batch, Column, Op, Packed, Position, TableId, TableSchema
from dataflare.cdc.postgres import pgoutput as po
from dataflare.cdc.postgres import source as pg_source
from dataflare.cdc.postgres.packed import DECODER, encoded_txn, pack, pack_encoded
from dataflare.sinks.pg_copy_text import copy_text, packed_copy, py_copy_text, py_packed_copy
from hypothesis import given, settings
from hypothesis import strategies as st

VALUE = st.one_of(st.none(), st.just(po.UNCHANGED), st.binary(max_size=12))


def tuple_data(values: list[Any]) -> bytes:
    out = [struct.pack(">h", len(values))]
    for v in values:
        if v is None:
            out.append(b"n")
        elif v is po.UNCHANGED:
            out.append(b"u")
        else:
            out.append(b"t" + struct.pack(">i", len(v)) + v)
    return b"".join(out)


def outcome(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except (IndexError, struct.error, ValueError):
        return "error"


def test_the_c_twins_are_in_use() -> None:
    """CI builds the extension (pip install -e .): the fast path is what runs."""
    assert po._tuple_at is _speedups.tuple_at
    assert po.decode_rows is _speedups.decode_rows
    assert copy_text is _speedups.copy_text
    assert pg_source.take_packed is _speedups.take_packed
    assert packed_copy is _speedups.packed_copy


@given(st.binary(max_size=60), st.integers(0, 64))
def test_tuple_at_agrees_on_any_bytes(buf: bytes, pos: int) -> None:
    assert outcome(_speedups.tuple_at, buf, pos, po.UNCHANGED) == outcome(
        po._py_tuple_at, buf, pos, po.UNCHANGED
    )


@given(st.lists(VALUE, max_size=10), st.binary(max_size=3), st.binary(max_size=3))
def test_tuple_at_agrees_on_tuples(values: list[Any], head: bytes, tail: bytes) -> None:
    buf = head + tuple_data(values) + tail
    got = _speedups.tuple_at(buf, len(head), po.UNCHANGED)
    assert got == po._py_tuple_at(buf, len(head), po.UNCHANGED)
    assert got == (tuple(values), len(buf) - len(tail))
    # truncated anywhere: both refuse
    for cut in range(len(head), len(buf) - len(tail)):
        assert outcome(_speedups.tuple_at, buf[:cut], len(head), 0) == "error"
        assert outcome(po._py_tuple_at, buf[:cut], len(head), 0) == "error"


ROW_MESSAGE = st.one_of(
    st.builds(
        lambda relid, new: b"I" + struct.pack(">I", relid) + b"N" + tuple_data(new),
        st.integers(0, 2**32 - 1),
        st.lists(VALUE, max_size=5),
    ),
    st.builds(
        lambda relid, kind, old, new: (
            b"U"
            + struct.pack(">I", relid)
            + (kind + tuple_data(old) if kind else b"")
            + b"N"
            + tuple_data(new)
        ),
        st.integers(0, 2**32 - 1),
        st.sampled_from([b"", b"K", b"O"]),
        st.lists(VALUE, max_size=5),
        st.lists(VALUE, max_size=5),
    ),
    st.builds(
        lambda relid, kind, old: b"D" + struct.pack(">I", relid) + kind + tuple_data(old),
        st.integers(0, 2**32 - 1),
        st.sampled_from([b"K", b"O"]),
        st.lists(VALUE, max_size=5),
    ),
)


@settings(max_examples=300)
@given(st.lists(st.one_of(ROW_MESSAGE, st.binary(max_size=30)), max_size=6), st.data())
def test_decode_rows_agrees(messages: list[bytes], data: st.DataObject) -> None:
    if messages and data.draw(st.booleans()):  # cut one message short
        i = data.draw(st.integers(0, len(messages) - 1))
        messages[i] = messages[i][: data.draw(st.integers(0, max(0, len(messages[i]) - 1)))]
    c = outcome(_speedups.decode_rows, messages, po.UNCHANGED)
    assert c == outcome(po._py_decode_rows, messages, po.UNCHANGED)
    if c != "error":  # and each record is what the message decoder reads
        for m, (tag, relid, old, new) in zip(messages, c, strict=True):
            msg: Any = po.decode(m)
            assert (tag, relid) == (m[0], msg.relid)
            assert new == (None if isinstance(msg, po.Delete) else msg.new)
            assert old == (None if isinstance(msg, po.Insert) else msg.old)


def test_decode_rows_refuses_other_messages() -> None:
    with pytest.raises(ValueError, match="message 1 is not"):
        _speedups.decode_rows([b"I\x00\x00\x00\x01N\x00\x00", b"B" + b"\x00" * 20], None)
    with pytest.raises(ValueError):
        _speedups.decode_rows(["I"], None)  # type: ignore[list-item]


def xlogdata(message: bytes) -> bytes:
    """A CopyData payload of the replication stream: 'w', start, end, clock, message."""
    return b"w" + struct.pack(">QQQ", 16, 32, 0) + message


# Mostly row messages of relations 1-3; the rest anything (keepalives, Begin, junk).
BURST_ITEM = st.one_of(
    st.builds(
        lambda tag, relid, body: xlogdata(tag + struct.pack(">I", relid) + body),
        st.sampled_from([b"I", b"U", b"D", b"B", b"R"]),
        st.integers(0, 4),
        st.binary(max_size=8),
    ),
    st.builds(xlogdata, st.binary(max_size=6)),
    st.binary(max_size=34),
)


@settings(max_examples=300)
@given(
    st.lists(BURST_ITEM, max_size=8),
    st.integers(-1, 9),
    st.booleans(),
    st.sampled_from([[], [(1 << 8 | 0x49, "one", 0)], [(9 << 8 | 0x54, "nine", 0)]]),
)
def test_take_packed_agrees(items: list[bytes], start: int, views: bool, runs: list[Any]) -> None:
    """Same stop, same runs (continuing the last one), and the messages as msgpack
    bins, whichever twin: appended to what the transaction held."""
    burst: list[Any] = [memoryview(b) for b in items] if views else list(items)
    relations = {1: "one", 2: "two", 3: "three"}
    held = b"\xc4\x01x" if runs else b""
    results = []
    for fn in (_speedups.take_packed, pg_source._py_take_packed):
        buf, out = bytearray(held), list(runs)
        results.append((fn(burst, start, relations, buf, out, len(runs)), bytes(buf), out))
    assert results[0] == results[1]
    (stop, count), buf, out = results[0]
    taken = items[max(start, 0) : stop]
    assert count == len(runs) + len(taken)
    assert buf == held + b"".join(msgpack.packb(m[25:]) for m in taken)
    # a run opens wherever relation or kind changes, at the index of its first message
    want = list(runs)
    for k, m in enumerate(taken):
        tally = struct.unpack(">I", m[26:30])[0] << 8 | m[25]
        if not want or want[-1][0] != tally:
            want.append((tally, relations[tally >> 8], len(runs) + k))
    assert out == want


def test_take_packed_encodes_messages_of_every_length() -> None:
    sizes = [5, 255, 256, 65_535, 65_536, 70_000]  # bin8, bin16, bin32 either side
    burst: list[Any] = [xlogdata(b"I" + struct.pack(">I", 1) + b"x" * (n - 5)) for n in sizes]
    burst.append(b"not a row")
    got = []
    for fn in (_speedups.take_packed, pg_source._py_take_packed):
        buf, runs = bytearray(), []
        got.append((fn(burst, 0, {1: "r"}, buf, runs, 0), bytes(buf), runs))
    assert got[0] == got[1]
    (stop, count), buf, runs = got[0]
    assert stop == count == len(sizes)
    assert buf == b"".join(msgpack.packb(m[25:]) for m in burst[:-1])
    assert runs == [(1 << 8 | 0x49, "r", 0)]


def test_encoded_transactions_are_what_pack_makes() -> None:
    """The source's payload, built where the messages arrive, is pack()'s."""
    txns: list[list[Any]] = [
        [100, "", 7, 1_000, [b"I" + bytes(30), 16384]],
        [2**40, "partial", None, None, [b"U" * 300] * 20],
        [300, "", 2**33, -5, []],
    ]
    chunks = [
        (encoded_txn(value, tag, xid, ts, len(msgs)), b"".join(msgpack.packb(m) for m in msgs))
        for value, tag, xid, ts, msgs in txns
    ]
    relids = [[16384, 0]]
    assert pack_encoded(relids, chunks) == pack(relids, txns)
    many = [[i, "", i, i, []] for i in range(70_000)]  # array16 and array32 headers
    enc = [(encoded_txn(i, "", i, i, 0), b"") for i in range(70_000)]
    assert pack_encoded(relids, enc) == pack(relids, many)
    assert pack_encoded(relids, enc[:20]) == pack(relids, many[:20])


TEXT = st.binary(max_size=12).filter(lambda b: b"\x00" not in b)  # PostgreSQL text: no NUL


@given(st.lists(st.lists(st.one_of(st.none(), TEXT), max_size=6), max_size=8))
def test_copy_text_agrees(rows: list[list[bytes | None]]) -> None:
    assert _speedups.copy_text(rows) == py_copy_text(rows)


def test_copy_text_format() -> None:
    rows = [(b"1", None, b"a\\b\tc\nd\re"), (b"",), ()]
    want = b"1\t\\N\ta\\\\b\\tc\\nd\\re\n\n\n"
    assert _speedups.copy_text(rows) == py_copy_text(rows) == want
    assert _speedups.copy_text([]) == b""
    with pytest.raises(TypeError, match="not bytes"):
        _speedups.copy_text([("text",)])


# ----------------------------------------------------------------- packed batches

T = TableId("public", "t")
SCHEMA = TableSchema(T, (Column("id", "bigint", False, 20), Column("v", "text", True, 25)), ("id",))


def packed_batch(txns: list[list[Any]], count: int, relids: Any = None) -> Batch:
    relids = [[16384, 0]] if relids is None else relids
    last = Position("postgres", txns[-1][0])
    return Batch(
        [],
        [SCHEMA],
        Position("postgres", txns[0][0]),
        last,
        pg_text={T: (20, 25)},
        packed=Packed(DECODER, count, pack(relids, txns), {(T, Op.INSERT): count}),
    )


def ins(i: int, v: bytes | None) -> bytes:
    return b"I" + struct.pack(">I", 16384) + b"N" + tuple_data([str(i).encode(), v])


def test_packed_batch_round_trip() -> None:
    upd = b"U" + struct.pack(">I", 16384) + b"K" + tuple_data([b"1", None])
    upd += b"N" + tuple_data([b"2", po.UNCHANGED])
    dele = b"D" + struct.pack(">I", 16384) + b"K" + tuple_data([b"2", None])
    b = packed_batch(
        [
            [100, "", 7, 1_000, [ins(1, b"a"), ins(3, None)]],
            [200, "", 8, 2_000, [upd, dele, 16384]],
        ],
        5,
    )
    assert len(b) == 5
    got = decode_batch(encode_batch(b))
    assert got.pg_text == {T: (20, 25)} and got.packed is None
    c = got.changes
    assert [x.op for x in c] == [Op.INSERT, Op.INSERT, Op.UPDATE, Op.DELETE, Op.TRUNCATE]
    assert c[0].after == (b"1", b"a") and c[0].key == (b"1",) and c[0].xid == 7
    assert c[1].after == (b"3", None) and c[1].position == Position("postgres", 100)
    assert c[2].before == (b"1", None) and c[2].after == (b"2", None) and c[2].key == (b"2",)
    assert c[2].unchanged == frozenset({"v"}) and c[2].commit_ts_us == 2_000
    assert c[3].before == (b"2", None) and c[3].after is None and c[3].key == (b"2",)
    assert c[4].table == T and c[4].position == Position("postgres", 200)


@pytest.mark.parametrize(
    ("txns", "count", "relids", "match"),
    [
        ([[1, "", None, None, [ins(1, b"a")]]], 2, None, "header counts 2 changes, 1 unpacked"),
        ([[1, "", None, None, [ins(1, b"a")]]], 1, [[16384, 3]], "names no table layout"),
        ([[1, "", None, None, [ins(1, b"a")]]], 1, [[99, 0]], "relation 16384"),
        ([[1, "", None, None, [ins(1, b"a")[:-1]]]], 1, None, "malformed pgoutput I message"),
        ([[1, "", None, None, [b"B" + b"\x00" * 20]]], 1, None, "not a row change"),
        ([[1, "", None, None, [77]]], 1, None, "truncate of unknown relation 77"),
        ([[1, "", "x", None, []]], 0, None, "bad xid"),
    ],
)
def test_bad_packed_batches_are_refused(
    txns: list[list[Any]], count: int, relids: Any, match: str
) -> None:
    frame = encode_batch(packed_batch(txns, count, relids))
    with pytest.raises(FatalError, match=match):
        decode_batch(frame)


NO_NUL = st.binary(max_size=6).filter(lambda b: b"\x00" not in b)  # PostgreSQL text


@st.composite
def row_message(draw: st.DrawFn) -> bytes:
    """Mostly well-formed Insert/Update messages of relation 1 with 3 columns (keys
    from a small set: some repeat); one in six is broken in one way: a Delete,
    another relation or width, an old row, a TOAST value not sent, cut short."""
    tag, relid, old = draw(st.sampled_from([b"I", b"I", b"I", b"U"])), 1, b""
    values: list[Any] = [
        draw(st.sampled_from([str(i).encode() for i in range(20)])),
        draw(st.one_of(st.none(), NO_NUL)),
        draw(st.one_of(st.none(), NO_NUL)),
    ]
    flaw = draw(st.integers(0, 35))
    if flaw == 0:
        tag = b"D"
    elif flaw == 1:
        relid = 2
    elif flaw == 2:
        values = values[:2]
    elif flaw == 3:
        old = b"K" + tuple_data([b"1", None, None])
    elif flaw == 4:
        values[2] = po.UNCHANGED
    m = tag + struct.pack(">I", relid) + old + b"N" + tuple_data(values)
    if flaw == 5:
        m = m[: draw(st.integers(0, len(m) - 1))]
    return m


@settings(max_examples=400)
@given(
    st.lists(row_message(), max_size=6),
    st.sampled_from([None, b"0"]),
    st.sampled_from([(0,), (0,), (0,), (0, 2), (), (5,)]),
    st.sampled_from([3, 3, 3, 3, 3, 2, 0]),
)
def test_packed_copy_agrees(
    messages: list[bytes], kind: bytes | None, key: tuple[int, ...], ncols: int
) -> None:
    got = _speedups.packed_copy(messages, 1, ncols, key, kind)
    assert got == py_packed_copy(messages, 1, ncols, key, kind)
    if got is not None:  # the rows the message decoder reads, as COPY text
        rows = [po.decode(m).new for m in messages]  # type: ignore[union-attr]
        assert got == copy_text([(*r, kind) if kind else r for r in rows])
