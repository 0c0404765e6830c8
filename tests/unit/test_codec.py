"""The msgpack codec: exact value round-trips, batch frames, and malformed input."""

from __future__ import annotations

import math
import struct
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from enum import IntEnum
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_interface,
    ip_network,
)
from typing import Any
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest
from dataflare.cdc import codec
from dataflare.cdc.codec import (
    FORMAT_VERSION,
    BatchHeader,
    decode_batch,
    decode_position,
    encode_batch,
    encode_position,
    packb,
    peek_batch,
    unpackb,
)
from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Batch, Change, Column, Op, Position, TableId, TableSchema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------- equality


def assert_same(got: Any, want: Any, path: str = "value") -> None:
    """Exact equality: same types, NaN equal to NaN (with the same bits or digits),
    -0.0 distinct from 0.0, Decimal exponents kept, tzinfo and fold kept."""
    if type(want) is bytearray:
        want = bytes(want)
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, float):
        assert struct.pack(">d", got) == struct.pack(">d", want), f"{path}: {got!r} != {want!r}"
    elif isinstance(want, Decimal):
        assert got.as_tuple() == want.as_tuple(), f"{path}: {got!r} != {want!r}"
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)!r} != {list(want)!r}"
        for k, w in want.items():
            assert_same(got[k], w, f"{path}[{k!r}]")
    elif isinstance(want, datetime | time):
        assert got.replace(tzinfo=None) == want.replace(tzinfo=None), f"{path}: {got!r}"
        assert got.fold == want.fold, f"{path}: fold {got.fold} != {want.fold}"
        assert_same_tz(got.tzinfo, want.tzinfo, path)
        if isinstance(want, datetime):
            assert got == want, f"{path}: {got!r} != {want!r}"
            assert got.utcoffset() == want.utcoffset(), f"{path}: {got!r} != {want!r}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def assert_same_tz(got: tzinfo | None, want: tzinfo | None, path: str) -> None:
    if want is None or (type(want) is not ZoneInfo and want.utcoffset(None) is None):
        assert got is None, f"{path}: tzinfo {got!r}, expected none"
    elif type(want) is ZoneInfo:
        assert got is want, f"{path}: tzinfo {got!r} is not {want!r}"
    else:
        assert type(got) is timezone, f"{path}: tzinfo {got!r}"
        assert got.utcoffset(None) == want.utcoffset(None), f"{path}: {got!r} != {want!r}"


def assert_position(got: Position, want: Position, path: str) -> None:
    assert type(got) is Position
    assert (got.kind, got.value, got.tag) == (want.kind, want.value, want.tag), path


def assert_batch(got: Batch, want: Batch) -> None:
    assert type(got) is Batch
    assert got.schemas == want.schemas
    assert all(type(s) is TableSchema for s in got.schemas)
    assert_position(got.first, want.first, "first")
    assert_position(got.last, want.last, "last")
    assert got.complete is want.complete
    assert len(got.changes) == len(want.changes)
    for i, (g, w) in enumerate(zip(got.changes, want.changes, strict=True)):
        p = f"changes[{i}]"
        assert type(g) is Change, p
        assert g.op is w.op, p
        assert g.table == w.table and type(g.table) is TableId, p
        assert_position(g.position, w.position, p + ".position")
        for name in ("key", "before", "after"):
            gv, wv = getattr(g, name), getattr(w, name)
            if wv is None:
                assert gv is None, f"{p}.{name}"
            else:
                assert type(gv) is tuple, f"{p}.{name}: rows come back as tuples"
                assert_same(gv, wv, f"{p}.{name}")
        assert g.unchanged == w.unchanged and type(g.unchanged) is frozenset, p
        assert_same(g.xid, w.xid, p + ".xid")
        assert_same(g.commit_ts_us, w.commit_ts_us, p + ".commit_ts_us")


# --------------------------------------------------------------------------- strategies

MAX_OFFSET = timedelta(hours=23, minutes=59, seconds=59, microseconds=999_999)
fixed_offsets = st.builds(
    timezone, st.timedeltas(min_value=-MAX_OFFSET, max_value=MAX_OFFSET)
) | st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-MAX_OFFSET)])
zones = st.timezones()
folds = st.integers(0, 1)

ints = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(),
    st.integers(min_value=2**64, max_value=2**300),
    st.integers(min_value=-(2**300), max_value=-(2**63) - 1),
    st.sampled_from([2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 2**63, 0, -1]),
)
floats = st.floats() | st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, -0.0, 0.0])
decimals = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True),
    st.builds(
        lambda sign, digits, exp: Decimal((sign, tuple(digits), exp)),
        st.integers(0, 1),
        st.lists(st.integers(0, 9), min_size=1, max_size=60),
        st.integers(-200, 200),
    ),
    st.sampled_from(
        [Decimal(s) for s in ("NaN", "-NaN", "sNaN", "-sNaN", "NaN123", "Infinity", "-Infinity")]
        + [Decimal("-0"), Decimal("0E-30"), Decimal("1.10"), Decimal("1E+999999")]
    ),
)
texts = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=20)
binaries = st.binary(max_size=32)
naive_datetimes = st.builds(lambda d, f: d.replace(fold=f), st.datetimes(), folds)
aware_datetimes = st.datetimes(timezones=fixed_offsets | zones)
times = st.builds(lambda t, f: t.replace(fold=f), st.times(), folds) | st.times(
    timezones=fixed_offsets | zones
)
scopes = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
ips = st.one_of(
    st.ip_addresses(),
    st.builds(lambda a, s: IPv6Address(f"{a}%{s}"), st.ip_addresses(v=6), scopes),
    st.builds(
        lambda a, p: ip_network((a, p), strict=False), st.ip_addresses(v=4), st.integers(0, 32)
    ),
    st.builds(
        lambda a, p: ip_network((a, p), strict=False), st.ip_addresses(v=6), st.integers(0, 128)
    ),
    st.builds(lambda a, p: ip_interface((a, p)), st.ip_addresses(v=4), st.integers(0, 32)),
    st.builds(lambda a, p: ip_interface((a, p)), st.ip_addresses(v=6), st.integers(0, 128)),
    st.builds(
        lambda a, s, p: IPv6Interface(f"{a}%{s}/{p}"),
        st.ip_addresses(v=6),
        scopes,
        st.integers(0, 128),
    ),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    floats,
    decimals,
    texts,
    binaries,
    binaries.map(bytearray),
    st.dates(),
    times,
    naive_datetimes,
    aware_datetimes,
    st.timedeltas(),
    st.uuids(),
    ips,
)
json_docs = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
arrays = st.recursive(st.none() | scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=10)
values = scalars | json_docs | arrays

names = st.text(min_size=1, max_size=10)
table_ids = st.builds(TableId, names, names)
positions_kinds = st.sampled_from(["postgres", "mysql", "generate"])


@st.composite
def table_schemas(draw: st.DrawFn) -> TableSchema:
    cols = draw(st.lists(names, max_size=5, unique=True))
    columns = tuple(
        Column(
            n,
            draw(st.sampled_from(["bigint", "text", "numeric(10,2)", "jsonb", "int[]", "é"])),
            draw(st.booleans()),
            draw(st.integers(0, 2**32 - 1)),
        )
        for n in cols
    )
    key = tuple(draw(st.lists(st.sampled_from(cols), unique=True))) if cols else ()
    return TableSchema(draw(table_ids), columns, key, draw(st.integers(1, 2**40)))


@st.composite
def batches(draw: st.DrawFn, max_changes: int = 8) -> Batch:
    schemas = draw(st.lists(table_schemas(), max_size=3))
    twice = draw(st.booleans())
    if schemas and twice:
        schemas.append(schemas[0])  # a table described twice (not deduplicated)
    tables: list[tuple[TableId, int | None]] = [(s.table, len(s.columns)) for s in schemas]
    tables += [(t, None) for t in draw(st.lists(table_ids, max_size=2))]  # no schema sent
    kind = draw(positions_kinds)
    changes: list[Change] = []
    if tables:
        pos = Position(kind, draw(st.integers(0, 2**64 - 1)), "")
        for _ in range(draw(st.integers(0, max_changes))):
            if draw(st.integers(0, 3)) == 0:  # else: the same transaction, same position
                pos = Position(
                    draw(positions_kinds) if draw(st.integers(0, 4)) == 0 else kind,
                    draw(st.integers(0, 2**64 - 1) | ints),
                    draw(st.just("") | texts),
                )
            table, width = draw(st.sampled_from(tables))
            rows = (
                st.lists(values, min_size=width, max_size=width)
                if width is not None
                else (st.lists(values, max_size=3))
            )
            row = rows.map(tuple)
            changes.append(
                Change(
                    draw(st.sampled_from(list(Op))),
                    table,
                    pos,
                    key=draw(st.none() | st.lists(values, max_size=2).map(tuple)),
                    before=draw(st.none() | row),
                    after=draw(st.none() | row),
                    unchanged=draw(st.frozensets(names, max_size=3)),
                    xid=draw(st.none() | st.integers(0, 2**64 - 1)),
                    commit_ts_us=draw(st.none() | st.integers(-(2**63), 2**63 - 1)),
                )
            )
    first = Position(kind, draw(st.integers(0, 2**64 - 1)), draw(texts))
    last = Position(draw(st.just(kind) | positions_kinds), draw(ints), draw(texts))
    return Batch(changes, schemas, first, last, draw(st.booleans()))


# --------------------------------------------------------------------------- properties


@settings(SETTINGS, max_examples=400)
@given(values)
def test_value_roundtrip(v: Any) -> None:
    assert_same(unpackb(packb(v)), v)


@settings(SETTINGS, max_examples=100)
@given(batches())
def test_batch_roundtrip_and_peek(b: Batch) -> None:
    data = encode_batch(b)
    assert data[0] == FORMAT_VERSION
    got = decode_batch(data)
    assert_batch(got, b)
    assert_batch(decode_batch(memoryview(data)), b)
    assert_batch(decode_batch(bytearray(data)), b)
    head = peek_batch(data)
    assert head == peek_batch(memoryview(data))
    assert head.count == len(got) == len(b)
    assert head.complete is got.complete is b.complete
    assert_position(head.first, got.first, "first")
    assert_position(head.last, got.last, "last")
    assert encode_batch(b) == data  # deterministic


def expect_fatal_or_ok(fn: Any, data: Any) -> None:
    try:
        fn(data)
    except FatalError as e:
        assert str(e)


@settings(SETTINGS, max_examples=200)
@given(st.binary(max_size=200) | st.binary(max_size=50).map(lambda b: b"\x01" + b))
def test_garbage_bytes_raise_only_fatal(data: bytes) -> None:
    expect_fatal_or_ok(decode_batch, data)
    expect_fatal_or_ok(peek_batch, data)
    expect_fatal_or_ok(unpackb, data)


@settings(SETTINGS, max_examples=80)
@given(batches(max_changes=3), st.data())
def test_corrupted_frames_raise_only_fatal(b: Batch, data: st.DataObject) -> None:
    frame = bytearray(encode_batch(b))
    how = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(frame) - 1))
            frame[i] = data.draw(st.integers(0, 255))
    elif how == "truncate":
        del frame[data.draw(st.integers(0, len(frame) - 1)) :]
    else:
        frame += data.draw(st.binary(min_size=1, max_size=8))
    expect_fatal_or_ok(decode_batch, bytes(frame))
    expect_fatal_or_ok(peek_batch, bytes(frame))


def frame(header: Any, body: Any, version: int = FORMAT_VERSION) -> bytes:
    head = packb(header)
    return struct.pack(">BI", version, len(head)) + head + packb(body)


msgpack_trees = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.text(max_size=3) | st.binary(max_size=3),
    lambda inner: st.lists(inner, max_size=11),
    max_leaves=40,
)


@settings(SETTINGS, max_examples=100)
@given(msgpack_trees, msgpack_trees, st.integers(0, 3))
def test_well_formed_msgpack_of_wrong_shape_raises_only_fatal(h: Any, body: Any, n: int) -> None:
    good_header = [n, True, "postgres", 1, "", "postgres", 2, ""]
    expect_fatal_or_ok(decode_batch, frame(h, body))
    expect_fatal_or_ok(decode_batch, frame(good_header, body))
    expect_fatal_or_ok(decode_batch, frame(good_header, [[], [], body]))
    expect_fatal_or_ok(decode_batch, frame(good_header, [body, [], []]))
    expect_fatal_or_ok(decode_batch, frame(good_header, [[], [["s", "t"]], [body] * n]))
    expect_fatal_or_ok(peek_batch, frame(h, body))


def list_paths(tree: Any, path: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    out = []
    if type(tree) is list:
        for i, x in enumerate(tree):
            out.append((*path, i))
            out += list_paths(x, (*path, i))
    return out


@settings(SETTINGS, max_examples=150)
@given(batches(max_changes=3), st.data())
def test_one_wrong_field_raises_only_fatal(b: Batch, data: st.DataObject) -> None:
    # Decode a real frame to its msgpack tree (ext values left opaque), replace one
    # node anywhere in the header or body, and frame it again.
    raw = encode_batch(b)
    end = 5 + struct.unpack_from(">I", raw, 1)[0]
    opts: dict[str, Any] = {"strict_map_key": False, "unicode_errors": "surrogatepass"}
    tree = [msgpack.unpackb(raw[5:end], **opts), msgpack.unpackb(raw[end:], **opts)]
    paths = list_paths(tree)[2:]
    if paths:
        *parents, last = data.draw(st.sampled_from(paths))
        node = tree
        for i in parents:
            node = node[i]
        node[last] = data.draw(msgpack_trees | st.integers() | st.floats())
    expect_fatal_or_ok(decode_batch, frame(tree[0], tree[1]))
    expect_fatal_or_ok(peek_batch, frame(tree[0], tree[1]))


@settings(SETTINGS, max_examples=200)
@given(st.integers(-128, 127), st.binary(max_size=40) | st.text(max_size=20).map(str.encode))
def test_any_ext_payload_raises_only_fatal(code: int, payload: bytes) -> None:
    ext8 = struct.pack(">BBb", 0xC7, len(payload), code) + payload  # any code, even -1
    expect_fatal_or_ok(unpackb, ext8)


# --------------------------------------------------------------------------- examples

EDGE_VALUES = [
    2**64 - 1,
    -(2**63),
    2**64,
    -(2**63) - 1,
    10**40,
    -(10**100),
    Decimal("1234567890123456789012345678901234567890.123456789"),
    Decimal("-Infinity"),
    Decimal("Infinity"),
    Decimal("NaN"),
    Decimal("-sNaN42"),
    Decimal("1.10"),
    Decimal("-0.000"),
    Decimal("1E+999999999"),
    -0.0,
    math.nan,
    math.inf,
    -math.inf,
    date.max,
    date.min,
    time.max,
    time(0, 0),
    time(12, 30, 1, 5, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
    time(3, 4, tzinfo=ZoneInfo("Europe/Paris")),
    datetime.max,
    datetime.min,
    datetime.max.replace(tzinfo=timezone(timedelta(hours=-23))),
    datetime.min.replace(tzinfo=timezone(timedelta(hours=23))),
    datetime(2024, 2, 29, 12, 0, 0, 1, tzinfo=UTC),
    datetime(2024, 2, 29, 12, tzinfo=timezone(timedelta(seconds=1, microseconds=7))),
    datetime(2021, 11, 7, 1, 30, tzinfo=ZoneInfo("America/New_York")),
    datetime(2021, 11, 7, 1, 30, fold=1, tzinfo=ZoneInfo("America/New_York")),
    datetime(2021, 3, 14, 2, 30, tzinfo=ZoneInfo("America/New_York")),  # in the gap
    datetime(2000, 1, 1, 0, 0, fold=1),
    timedelta.min,
    timedelta.max,
    timedelta(microseconds=-1),
    UUID("00000000-0000-0000-0000-000000000000"),
    UUID("ffffffff-ffff-ffff-ffff-ffffffffffff"),
    uuid4(),
    IPv4Address("192.0.2.1"),
    IPv6Address("2001:db8::1"),
    IPv6Address("fe80::1%eth0"),
    IPv4Network("10.0.0.0/8"),
    IPv6Network("2001:db8::/32"),
    IPv4Interface("192.0.2.5/24"),
    IPv6Interface("fe80::1%eth0/64"),
    "",
    "a\ud800b\udfff",
    "\U0010ffff",
    b"",
    {"a": [1, None, {"b": [[], {}]}], "": -0.0, "n": None},
    [[1, None], [None, [2, None]], []],
]


@pytest.mark.parametrize("v", EDGE_VALUES, ids=repr)
def test_edge_values(v: Any) -> None:
    assert_same(unpackb(packb(v)), v)
    b = Batch(
        [Change(Op.INSERT, TableId("s", "t"), Position("generate", 1), key=(v,), after=(v, [v]))],
        [TableSchema(TableId("s", "t"), (Column("a", "x"), Column("b", "x[]")), ("a",))],
        Position("generate", 1),
        Position("generate", 1),
    )
    assert_batch(decode_batch(encode_batch(b)), b)


def test_specific_edges() -> None:
    assert math.copysign(1.0, unpackb(packb(-0.0))) == -1.0
    assert str(unpackb(packb(Decimal("1.10")))) == "1.10"
    assert str(unpackb(packb(Decimal("-Infinity")))) == "-Infinity"
    assert unpackb(packb(Decimal("-sNaN"))).is_snan()
    assert unpackb(packb(bytearray(b"xy"))) == b"xy"
    assert unpackb(packb((1, (2, 3)))) == [1, [2, 3]]  # tuples are msgpack arrays
    assert unpackb(packb({1: "a", b"k": None})) == {1: "a", b"k": None}
    ny = ZoneInfo("America/New_York")
    for fold in (0, 1):
        dt = datetime(2021, 11, 7, 1, 30, fold=fold, tzinfo=ny)
        got = unpackb(packb(dt))
        assert got == dt and got.utcoffset() == dt.utcoffset() and got.tzinfo is ny
    got = unpackb(packb(datetime(2020, 1, 1, tzinfo=timezone(timedelta(0)))))
    assert got.tzinfo is UTC


def test_unknown_zone_comes_back_with_its_fixed_offset() -> None:
    data = struct.pack(">qqB", 0, 3_600_000_000, 0) + b"Nowhere/Atlantis"
    got = unpackb(msgpack.packb(msgpack.ExtType(codec.EXT_DATETIME_ZONE, data)))
    assert got == datetime(1970, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    assert got.tzinfo == timezone(timedelta(hours=1))
    # a zone that exists but disagrees with the recorded offset: the offset wins
    data = struct.pack(">qqB", 0, 3_600_000_000, 0) + b"UTC"
    got = unpackb(msgpack.packb(msgpack.ExtType(codec.EXT_DATETIME_ZONE, data)))
    assert got.utcoffset() == timedelta(hours=1)


def test_subclasses_encode_as_their_base_type() -> None:
    class Stamp(datetime):
        pass

    class Big(IntEnum):
        HUGE = 2**70

    got = unpackb(packb([Stamp(2020, 1, 2, 3), Big.HUGE]))
    assert_same(got, [datetime(2020, 1, 2, 3), 2**70])


class NoOffset(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None

    def tzname(self, dt: datetime | None) -> str | None:
        return None


class Shifting(tzinfo):
    """Not a fixed-offset timezone: +1h in January, +2h otherwise."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return timedelta(hours=1 if dt is None or dt.month == 1 else 2)

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None

    def tzname(self, dt: datetime | None) -> str | None:
        return "shifting"


def test_other_tzinfo_classes() -> None:
    shifting = Shifting()
    for month, hours in ((1, 1), (6, 2)):
        dt = datetime(2024, month, 1, 12, tzinfo=shifting)
        got = unpackb(packb(dt))
        assert got == dt and got.utcoffset() == timedelta(hours=hours)
        assert type(got.tzinfo) is timezone
    got = unpackb(packb(time(5, 6, tzinfo=shifting)))
    assert got == time(5, 6, tzinfo=timezone(timedelta(hours=1)))
    # A tzinfo without an offset makes a value that compares as naive: it comes back naive.
    for v in (datetime(2024, 1, 1, 12, tzinfo=NoOffset()), time(1, tzinfo=NoOffset())):
        got = unpackb(packb(v))
        assert got == v and got.tzinfo is None


def test_frames_as_any_byte_buffer() -> None:
    data = encode_batch(sample_batch())
    for buf in (memoryview(bytearray(data)).cast("c"), memoryview(b"xx" + data)[2:]):
        assert_batch(decode_batch(buf), sample_batch())
        assert peek_batch(buf).count == 5


def test_too_deep_to_encode_is_fatal() -> None:
    deep: list[Any] = []
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(FatalError, match="cannot encode value"):
        packb(deep)


@pytest.mark.parametrize("v", [object(), {1, 2}, frozenset(), 1j, [Ellipsis]], ids=repr)
def test_unsupported_types_raise_fatal(v: Any) -> None:
    with pytest.raises(FatalError, match="cannot encode a value of type"):
        packb(v)


def sample_batch() -> Batch:
    t1, t2 = TableId("public", "orders"), TableId("public", "no_schema")
    s1 = TableSchema(t1, (Column("id", "bigint", False, 20), Column("note", "text")), ("id",), 3)
    p1, p2 = Position("postgres", 100), Position("postgres", 200)
    return Batch(
        [
            Change(Op.INSERT, t1, p1, key=(1,), after=(1, "a\ud800"), xid=7, commit_ts_us=1),
            Change(
                Op.UPDATE,
                t1,
                p1,
                (1,),
                (1, None),
                (1, "x"),
                frozenset({"note", "z"}),
                xid=7,
                commit_ts_us=1,
            ),
            Change(Op.TRUNCATE, t2, p2),
            Change(Op.DELETE, t2, Position("mysql", 5, "binlog.000001"), key=("k",)),
            Change(Op.READ, t1, Position("postgres", 2**64 - 1, "tag"), after=(2, None)),
        ],
        [s1],
        p1,
        Position("postgres", 2**64 - 1, "tag"),
        complete=False,
    )


def test_sample_batch() -> None:
    b = sample_batch()
    data = encode_batch(b)
    got = decode_batch(data)
    assert_batch(got, b)
    assert got.changes[0].position is got.changes[1].position  # built once per transaction
    assert got.changes[0].table is got.changes[1].table
    assert peek_batch(data) == BatchHeader(b.first, b.last, False, 5)
    assert len(peek_batch(data)) == 5
    assert peek_batch(data).last.tag == "tag"


def test_empty_batch() -> None:
    b = Batch([], [], Position("generate", 0), Position("generate", 0))
    assert_batch(decode_batch(encode_batch(b)), b)
    assert peek_batch(encode_batch(b)).count == 0


def test_unknown_version_is_fatal() -> None:
    data = encode_batch(sample_batch())
    for v in (0, 2, 99, 255):
        bad = bytes([v]) + data[1:]
        with pytest.raises(FatalError, match=rf"unsupported batch format version {v}\b"):
            decode_batch(bad)
        with pytest.raises(FatalError, match="version"):
            peek_batch(bad)


def one_change(**fields: Any) -> bytes:
    """A frame of one change with a well-formed layout and the given field values."""
    f: dict[str, Any] = {
        "op": "c",
        "table": 0,
        "key": [1],
        "before": None,
        "after": [1, "x"],
        "unchanged": [],
    }
    f |= {"value": 1, "tag": "", "xid": None, "ts": None, "extra": []}
    f |= fields
    rec = [f[k] for k in ("op", "table", "key", "before", "after", "unchanged", "value", "tag")]
    rec += [f["xid"], f["ts"], *f["extra"]]
    return frame([1, True, "p", 1, "", "p", 1, ""], [[], [["s", "t"]], [rec]])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty frame"),
        (b"\x01\x00", "truncated"),
        (b"\x01\x00\x00\xff\xff", "overruns"),
        (frame([1, True], []), "header is not an 8-element array"),
        (frame([-1, True, "p", 1, "", "p", 1, ""], []), "bad change count"),
        (frame([0, True, "p", 1.5, "", "p", 1, ""], []), "bad position"),
        (frame([0, True, "p", 1, "", "p", 1, ""], [[], []]), "body is not a 3- to 5-element array"),
        (frame([1, True, "p", 1, "", "p", 1, ""], [[], [], []]), "header counts 1 changes"),
        (frame([0, True, "p", 1, "", "p", 1, ""], [[["s"]], [], []]), "bad table schema"),
        (
            frame(
                [1, True, "p", 1, "", "p", 1, ""],
                [[], [["s", "t"]], [["x", 0, None, None, None, [], 1, "", None, None]]],
            ),
            "unknown op or table index",
        ),
        (one_change(key="k"), "a key is not an array"),
        (one_change(before={"a": 1}), "a before row is not an array"),
        (one_change(after=b"x"), "an after row is not an array"),
        (one_change(unchanged=["a", 1]), "unchanged columns are not an array of names"),
        (one_change(unchanged="ab"), "unchanged columns are not an array of names"),
        (one_change(unchanged=None), "unchanged columns are not an array of names"),
        (one_change(xid="7"), "bad xid or commit timestamp"),
        (one_change(ts=1.5), "bad xid or commit timestamp"),
        (one_change(ts=True), "bad xid or commit timestamp"),
        (one_change(tag=None), "bad position"),
        (one_change(op="x"), "unknown op or table index"),
        (one_change(table=-1), "unknown op or table index"),
        (one_change(extra=["k", 2]), "a change record is not a 10- or 11-element array"),
        (frame([0, True, "p", 1, "", "p", 1, ""], []) + b"\xc1", "not valid msgpack"),
        (frame([0, True, "p", 1, "", "p", 1, ""], [[], [], []]) + b"\x00", "not valid msgpack"),
    ],
)
def test_malformed_frames_have_clear_messages(data: bytes, match: str) -> None:
    with pytest.raises(FatalError, match=match):
        decode_batch(data)


def test_unknown_ext_type_and_bad_payload() -> None:
    with pytest.raises(FatalError, match="unknown ext type 99"):
        unpackb(msgpack.packb(msgpack.ExtType(99, b"")))
    with pytest.raises(FatalError, match="bad ext type 3 payload"):
        unpackb(msgpack.packb(msgpack.ExtType(codec.EXT_DATE, b"\xff\xff\xff\xff")))
    with pytest.raises(FatalError, match="bad ext type 2 payload"):
        unpackb(msgpack.packb(msgpack.ExtType(codec.EXT_DECIMAL, b"not a number")))


def test_non_bytes_input_is_fatal() -> None:
    for bad in ("text", None, 12, [1]):
        with pytest.raises(FatalError, match="must be bytes"):
            decode_batch(bad)  # type: ignore[arg-type]
        with pytest.raises(FatalError):
            peek_batch(bad)  # type: ignore[arg-type]


def test_no_buffer_export_is_left_behind() -> None:
    # A frame decoded straight from shared memory must not pin it, even on errors.
    good = bytearray(encode_batch(sample_batch()))
    with memoryview(good) as mv:
        decode_batch(mv)
        peek_batch(mv)
    good += b"\x00"  # resizing fails with BufferError while any export is alive
    with pytest.raises(FatalError):
        decode_batch(good)
    good += b"\x00"
    bad = bytearray(b"\x01\x00\x00\x00\x01\xc1rest")
    with pytest.raises(FatalError):
        decode_batch(bad)
    bad += b"\x00"


def test_positions() -> None:
    for p in (Position("postgres", 2**64 - 1), Position("mysql", 4, "mysql-bin.000003:4")):
        enc = encode_position(p)
        assert enc == [p.kind, p.value, p.tag]
        got = decode_position(unpackb(packb(enc)))
        assert_position(got, p, "position")
    assert_position(decode_position(("generate", 3)), Position("generate", 3), "2-tuple")
    for bad in (None, [], ["k"], ["k", "1"], ["k", 1, 2], [1, 1, ""], ["k", True, ""], "k"):
        with pytest.raises(FatalError, match="bad position"):
            decode_position(bad)
