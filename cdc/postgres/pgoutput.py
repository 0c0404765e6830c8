"""Decoder of the pgoutput logical replication protocol (protocol version 1).

Pure functions from bytes to message tuples. Tuple values stay as the server's text
bytes (or None / UNCHANGED); converting them to Python objects is the caller's
choice, once per row, with psycopg's loaders. Malformed input raises
:class:`PgoutputError` (a FatalError) naming the message and offset, never
another exception type.

Reference: PostgreSQL docs, "Logical Replication Message Formats".
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from dataflare.cdc.errors import FatalError

PG_EPOCH_US: Final = 946_684_800_000_000  # 2000-01-01 in Unix microseconds


class PgoutputError(FatalError):
    pass


class _Unchanged:
    """An unchanged TOASTed value the server did not send ('u')."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()
TupleValue = bytes | None | _Unchanged
TupleData = tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int  # LSN of the commit record
    commit_ts_us: int  # Unix microseconds
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int  # end of the commit record: the position to acknowledge
    commit_ts_us: int


@dataclass(frozen=True, slots=True)
class Origin:
    lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class RelationColumn:
    is_key: bool
    name: str
    type_oid: int
    typmod: int


@dataclass(frozen=True, slots=True)
class Relation:
    relid: int
    namespace: str
    name: str
    replica_identity: str  # d default, n nothing, f full, i index
    columns: tuple[RelationColumn, ...]


@dataclass(frozen=True, slots=True)
class TypeMsg:
    oid: int
    namespace: str
    name: str


class Insert(NamedTuple):
    relid: int
    new: TupleData


class Update(NamedTuple):
    relid: int
    old: TupleData | None  # key columns ('K') or the full old row ('O'), if sent
    old_is_key: bool
    new: TupleData


class Delete(NamedTuple):
    relid: int
    old: TupleData
    old_is_key: bool


@dataclass(frozen=True, slots=True)
class Truncate:
    options: int  # 1 CASCADE, 2 RESTART IDENTITY
    relids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = (
    Begin
    | Commit
    | Origin
    | Relation
    | TypeMsg
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
)

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">BQQq")


class _Reader:
    __slots__ = ("buf", "kind", "pos")

    def __init__(self, buf: bytes, kind: str) -> None:
        self.buf = buf
        self.pos = 1
        self.kind = kind

    def fail(self, what: str) -> PgoutputError:
        return PgoutputError(
            f"malformed pgoutput {self.kind} message: {what} at offset {self.pos} "
            f"of {len(self.buf)} bytes"
        )

    def take(self, s: struct.Struct) -> tuple[int, ...]:
        end = self.pos + s.size
        if end > len(self.buf):
            raise self.fail("truncated")
        v = s.unpack_from(self.buf, self.pos)
        self.pos = end
        return v

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise self.fail("truncated")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def string(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise self.fail("unterminated string")
        try:
            s = self.buf[self.pos : end].decode()
        except UnicodeDecodeError:
            raise self.fail("string is not UTF-8") from None
        self.pos = end + 1
        return s

    def tuple_data(self) -> TupleData:
        (n,) = self.take(_I16)
        if n < 0:
            raise self.fail("negative column count")
        buf = self.buf
        pos = self.pos
        size = len(buf)
        out: list[TupleValue] = []
        append = out.append
        for _ in range(n):
            if pos >= size:
                self.pos = pos
                raise self.fail("truncated tuple")
            kind = buf[pos]
            pos += 1
            if kind == 0x74 or kind == 0x62:  # 't' text, 'b' binary
                if pos + 4 > size:
                    self.pos = pos
                    raise self.fail("truncated value length")
                (length,) = _I32.unpack_from(buf, pos)
                pos += 4
                if length < 0 or pos + length > size:
                    self.pos = pos
                    raise self.fail("value length out of range")
                append(buf[pos : pos + length])
                pos += length
            elif kind == 0x6E:  # 'n'
                append(None)
            elif kind == 0x75:  # 'u'
                append(UNCHANGED)
            else:
                self.pos = pos
                raise self.fail(f"unknown tuple value kind {kind!r}")
        self.pos = pos
        return tuple(out)

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise self.fail(f"{len(self.buf) - self.pos} trailing bytes")


def _relation(r: _Reader) -> Relation:
    (relid,) = r.take(_U32)
    namespace = r.string()
    name = r.string()
    ident = chr(r.byte())
    (ncols,) = r.take(_I16)
    if ncols < 0:
        raise r.fail("negative column count")
    cols = []
    for _ in range(ncols):
        flags = r.byte()
        cname = r.string()
        oid, typmod = r.take(_I32_PAIR)
        cols.append(RelationColumn(bool(flags & 1), cname, oid & 0xFFFFFFFF, typmod))
    return Relation(relid, namespace or "pg_catalog", name, ident, tuple(cols))


_I32_PAIR = struct.Struct(">ii")


def _py_tuple_at(
    buf: bytes | memoryview, pos: int, unchanged: Any = UNCHANGED
) -> tuple[TupleData, int]:
    """TupleData at ``pos`` -> (values, end). Raises IndexError/struct.error/ValueError
    on malformed input (the caller re-decodes slowly for a precise message). The C
    twin (``cdc/_speedups.c``) is used when built."""
    if type(buf) is not bytes:
        buf = bytes(buf)
    n = (buf[pos] << 8) | buf[pos + 1]
    if n & 0x8000:
        raise ValueError
    pos += 2
    out: list[TupleValue] = []
    append = out.append
    unpack = _I32.unpack_from
    for _ in range(n):
        kind = buf[pos]
        if kind == 0x74:  # 't'
            (length,) = unpack(buf, pos + 1)
            start = pos + 5
            pos = start + length
            if length < 0 or pos > len(buf):
                raise ValueError
            append(buf[start:pos])
        elif kind == 0x6E:  # 'n'
            append(None)
            pos += 1
        elif kind == 0x75:  # 'u'
            append(unchanged)
            pos += 1
        else:
            raise ValueError
    return tuple(out), pos


_tuple_at: Callable[[bytes | memoryview, int, Any], tuple[TupleData, int]]
try:
    from dataflare.cdc._speedups import tuple_at as _tuple_at
except ImportError:  # not built: the pure-Python twin
    _tuple_at = _py_tuple_at


_U32_AT = _U32.unpack_from
_new = tuple.__new__


def decode(data: bytes | bytearray | memoryview) -> Message:
    """One pgoutput message (the payload of an XLogData 'w' message)."""
    buf = data if type(data) is bytes else bytes(data)
    # Fast path for row changes, the bulk of the stream; anything odd (including
    # malformed input) falls through to the careful decoder below.
    rec = decode_row(buf, 0)
    if rec is not None:
        tag, relid, old, new = rec
        if tag == 0x49:
            return _new(Insert, (relid, new))
        if tag == 0x55:
            return _new(Update, (relid, old, buf[5] == 0x4B, new))
        return _new(Delete, (relid, old, buf[5] == 0x4B))
    return _decode_careful(buf)


# (tag, relid, old, new); in packed records a False in `new` marks an unchanged value
RowRecord = tuple[int, int, tuple[Any, ...] | None, tuple[Any, ...] | None]


def decode_row(buf: bytes | memoryview, start: int, unchanged: Any = UNCHANGED) -> RowRecord | None:
    """The Insert, Update or Delete at ``buf[start:]`` as ``(tag, relid, old, new)``
    (old: the key or old row if sent; new: None for a delete), without a message
    object; None when it is not such a message or is malformed (:func:`decode`
    then says what is wrong)."""
    try:
        tag = buf[start]
        relid = _U32_AT(buf, start + 1)[0]
        kind = buf[start + 5]
        if tag == 0x49 and kind == 0x4E:  # 'I' ... 'N'
            new, end = _tuple_at(buf, start + 6, unchanged)
            if end == len(buf):
                return (tag, relid, None, new)
        elif tag == 0x55:  # 'U'
            if kind == 0x4E:
                new, end = _tuple_at(buf, start + 6, unchanged)
                if end == len(buf):
                    return (tag, relid, None, new)
            elif kind in (0x4B, 0x4F):
                old, end = _tuple_at(buf, start + 6, unchanged)
                if buf[end] == 0x4E:
                    new, end = _tuple_at(buf, end + 1, unchanged)
                    if end == len(buf):
                        return (tag, relid, old, new)
        elif tag == 0x44 and kind in (0x4B, 0x4F):  # 'D'
            old, end = _tuple_at(buf, start + 6, unchanged)
            if end == len(buf):
                return (tag, relid, old, None)
    except (IndexError, struct.error, ValueError):
        pass
    return None


def _py_decode_rows(messages: Sequence[bytes], unchanged: Any) -> list[RowRecord]:
    """Insert/Update/Delete messages as records (the C twin's contract)."""
    out = []
    for i, m in enumerate(messages):
        rec = decode_row(m, 0, unchanged) if type(m) is bytes else None
        if rec is None:
            raise ValueError(f"message {i} is not a well-formed row change")
        out.append(rec)
    return out


decode_rows: Callable[[Sequence[bytes], Any], list[RowRecord]]
try:
    from dataflare.cdc._speedups import decode_rows
except ImportError:  # not built: the pure-Python twin
    decode_rows = _py_decode_rows


def _decode_careful(buf: bytes) -> Message:
    if not buf:
        raise PgoutputError("empty pgoutput message")
    tag = buf[0]
    r = _Reader(buf, chr(tag) if 32 <= tag < 127 else f"0x{tag:02x}")
    msg: Message
    if tag == 0x49:  # 'I'
        (relid,) = r.take(_U32)
        if r.byte() != 0x4E:
            raise r.fail("expected 'N'")
        msg = Insert(relid, r.tuple_data())
    elif tag == 0x55:  # 'U'
        (relid,) = r.take(_U32)
        kind = r.byte()
        old: TupleData | None = None
        old_is_key = False
        if kind in (0x4B, 0x4F):  # 'K' / 'O'
            old_is_key = kind == 0x4B
            old = r.tuple_data()
            kind = r.byte()
        if kind != 0x4E:
            raise r.fail("expected 'N'")
        msg = Update(relid, old, old_is_key, r.tuple_data())
    elif tag == 0x44:  # 'D'
        (relid,) = r.take(_U32)
        kind = r.byte()
        if kind not in (0x4B, 0x4F):
            raise r.fail("expected 'K' or 'O'")
        msg = Delete(relid, r.tuple_data(), kind == 0x4B)
    elif tag == 0x42:  # 'B'
        final_lsn, ts, xid = r.take(_BEGIN)
        msg = Begin(final_lsn, ts + PG_EPOCH_US, xid)
    elif tag == 0x43:  # 'C'
        flags, commit_lsn, end_lsn, ts = r.take(_COMMIT)
        msg = Commit(flags, commit_lsn, end_lsn, ts + PG_EPOCH_US)
    elif tag == 0x52:  # 'R'
        msg = _relation(r)
    elif tag == 0x59:  # 'Y'
        (oid,) = r.take(_U32)
        msg = TypeMsg(oid, r.string(), r.string())
    elif tag == 0x4F:  # 'O'
        (lsn,) = r.take(_U64)
        msg = Origin(lsn, r.string())
    elif tag == 0x54:  # 'T'
        (n,) = r.take(_I32)
        if n < 0:
            raise r.fail("negative relation count")
        options = r.byte()
        relids = tuple(r.take(_U32)[0] for _ in range(n))
        msg = Truncate(options, relids)
    elif tag == 0x4D:  # 'M'
        flags = r.byte()
        (lsn,) = r.take(_U64)
        prefix = r.string()
        (length,) = r.take(_I32)
        if length < 0 or r.pos + length > len(buf):
            raise r.fail("content length out of range")
        content = buf[r.pos : r.pos + length]
        r.pos += length
        msg = LogicalMessage(bool(flags & 1), lsn, prefix, content)
    else:
        raise PgoutputError(f"unknown pgoutput message type {r.kind!r}")
    r.done()
    return msg


# --- the replication stream's own framing (CopyData payloads) ---------------------

_XLOGDATA = struct.Struct(">QQq")
_KEEPALIVE = struct.Struct(">QqB")
_STATUS = struct.Struct(">cQQQqB")


@dataclass(frozen=True, slots=True)
class XLogData:
    wal_start: int
    wal_end: int
    send_time: int
    payload: memoryview


@dataclass(frozen=True, slots=True)
class Keepalive:
    wal_end: int
    send_time: int
    reply_requested: bool


def decode_copy(data: memoryview) -> XLogData | Keepalive:
    """A CopyData message of a START_REPLICATION stream."""
    if len(data) < 1:
        raise PgoutputError("empty replication message")
    tag = data[0]
    if tag == 0x77:  # 'w'
        if len(data) < 1 + _XLOGDATA.size:
            raise PgoutputError("truncated XLogData header")
        start, end, ts = _XLOGDATA.unpack_from(data, 1)
        return XLogData(start, end, ts, data[1 + _XLOGDATA.size :])
    if tag == 0x6B:  # 'k'
        if len(data) < 1 + _KEEPALIVE.size:
            raise PgoutputError("truncated keepalive")
        end, ts, reply = _KEEPALIVE.unpack_from(data, 1)
        return Keepalive(end, ts, bool(reply))
    raise PgoutputError(f"unknown replication message type 0x{tag:02x}")


def standby_status(flush_lsn: int, now_us: int, reply: bool = False) -> bytes:
    """Standby status update ('r'): written = flushed = applied = flush_lsn."""
    return _STATUS.pack(b"r", flush_lsn, flush_lsn, flush_lsn, now_us - PG_EPOCH_US, int(reply))


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, sep, lo = text.partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)
