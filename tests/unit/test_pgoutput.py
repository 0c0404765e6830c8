"""pgoutput decoder: exact decoding of well-formed messages, a clean error on anything else."""

from __future__ import annotations

import contextlib
import struct

from dataflare.cdc.postgres import pgoutput as po
from hypothesis import given, settings
from hypothesis import strategies as st

names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20)
values = st.one_of(st.none(), st.just(po.UNCHANGED), st.binary(max_size=40))


def tuple_bytes(vals: tuple[po.TupleValue, ...]) -> bytes:
    out = struct.pack(">h", len(vals))
    for v in vals:
        if v is None:
            out += b"n"
        elif v is po.UNCHANGED:
            out += b"u"
        else:
            assert isinstance(v, bytes)
            out += b"t" + struct.pack(">i", len(v)) + v
    return out


def cstr(s: str) -> bytes:
    return s.encode() + b"\0"


@given(st.integers(0, 2**32 - 1), st.lists(values, max_size=12).map(tuple))
def test_insert(relid: int, vals: tuple[po.TupleValue, ...]) -> None:
    assert po.decode(b"I" + struct.pack(">I", relid) + b"N" + tuple_bytes(vals)) == po.Insert(
        relid, vals
    )


@given(
    st.integers(0, 2**32 - 1),
    st.lists(values, max_size=6).map(tuple),
    st.lists(values, max_size=6).map(tuple),
    st.sampled_from([b"K", b"O", b""]),
)
def test_update(
    relid: int, old: tuple[po.TupleValue, ...], new: tuple[po.TupleValue, ...], kind: bytes
) -> None:
    body = b"U" + struct.pack(">I", relid)
    if kind:
        body += kind + tuple_bytes(old)
    msg = po.decode(body + b"N" + tuple_bytes(new))
    assert msg == po.Update(relid, old if kind else None, kind == b"K", new)


@given(st.integers(0, 2**64 - 1), st.integers(-(2**62), 2**62), st.integers(0, 2**32 - 1))
def test_begin_commit(lsn: int, ts: int, xid: int) -> None:
    assert po.decode(b"B" + struct.pack(">QqI", lsn, ts, xid)) == po.Begin(
        lsn, ts + po.PG_EPOCH_US, xid
    )
    c = po.decode(b"C" + struct.pack(">BQQq", 0, lsn, lsn, ts))
    assert c == po.Commit(0, lsn, lsn, ts + po.PG_EPOCH_US)


@given(
    names,
    names,
    st.lists(
        st.tuples(st.booleans(), names, st.integers(0, 2**32 - 1), st.integers(-1, 2**31 - 1)),
        max_size=8,
    ),
)
def test_relation(ns: str, rel: str, cols: list[tuple[bool, str, int, int]]) -> None:
    body = b"R" + struct.pack(">I", 42) + cstr(ns) + cstr(rel) + b"f" + struct.pack(">h", len(cols))
    for key, name, oid, typmod in cols:
        body += bytes([int(key)]) + cstr(name) + struct.pack(">Ii", oid, typmod)
    msg = po.decode(body)
    assert isinstance(msg, po.Relation)
    assert msg.name == rel and msg.replica_identity == "f"
    assert [(c.is_key, c.name, c.type_oid, c.typmod) for c in msg.columns] == cols


def test_truncate_message_type_origin() -> None:
    assert po.decode(b"T" + struct.pack(">iBII", 2, 1, 5, 6)) == po.Truncate(1, (5, 6))
    assert po.decode(
        b"M\x01" + struct.pack(">Q", 7) + cstr("p") + struct.pack(">i", 2) + b"hi"
    ) == po.LogicalMessage(True, 7, "p", b"hi")
    assert po.decode(b"Y" + struct.pack(">I", 9) + cstr("public") + cstr("mood")) == po.TypeMsg(
        9, "public", "mood"
    )
    assert po.decode(b"O" + struct.pack(">Q", 3) + cstr("node1")) == po.Origin(3, "node1")


@settings(max_examples=3000)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(po.PgoutputError):
        po.decode(data)


@settings(max_examples=1000)
@given(st.sampled_from(b"IUDBCRYOTM"), st.binary(max_size=48))
def test_arbitrary_bodies_never_crash(tag: int, body: bytes) -> None:
    try:
        po.decode(bytes([tag]) + body)
    except po.PgoutputError as e:
        assert "pgoutput" in str(e)


@given(st.binary(max_size=40))
def test_copy_framing_never_crashes(data: bytes) -> None:
    with contextlib.suppress(po.PgoutputError):
        po.decode_copy(memoryview(data))


def test_lsn_text_round_trip() -> None:
    assert po.format_lsn(po.parse_lsn("16/B374D848")) == "16/B374D848"
    status = po.standby_status(0x10, po.PG_EPOCH_US + 5)
    assert status[:1] == b"r" and struct.unpack(">QQQqB", status[1:]) == (16, 16, 16, 5, 0)
