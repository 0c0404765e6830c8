"""msgpack codec: batches on the ring, and values in the state store and on the control socket.

Values
------
Native msgpack carries None, bool, int in [-2**63, 2**64-1], float (binary64, so
NaN, ±Inf and -0.0 keep their bits), str, bytes (bytearray/memoryview come back as
bytes), lists (tuples come back as lists) and maps (any hashable keys). Everything
else travels as a msgpack ext type from the registry below; each wire layout is
fixed for a code, and a code is never reused for another layout.

====  ==============  ===========================================================
code  type            ext payload
====  ==============  ===========================================================
1     int (big)       two's complement, big-endian, minimal length
2     Decimal         ``str(d)`` in ASCII (keeps digits, exponent, sign, NaN/sNaN)
3     date            ``>I`` proleptic Gregorian ordinal
4     time            ``>q`` microseconds since midnight [+ 0x01 if fold]
5     time (tz)       ``>qq`` microseconds since midnight, UTC offset in µs [+ fold]
6     datetime        ``>q`` wall-clock µs since 1970-01-01T00:00 [+ 0x01 if fold]
7     datetime (tz)   ``>qq`` wall-clock µs since 1970-01-01T00:00, UTC offset in µs
                      [+ 0x01 if fold]
8     datetime (zone) ``>qqB`` wall µs, offset µs, fold; then the IANA zone key (UTF-8)
9     time (zone)     ``>qB`` µs since midnight, fold; then the IANA zone key
10    timedelta       ``>iii`` days, seconds, microseconds (as normalised by Python)
11    UUID            the 16 bytes
12    ipaddress       one kind byte, then packed bytes (kinds 0, 1) or ``str()`` (2-6)
====  ==============  ===========================================================

Aware values with a fixed-offset tzinfo (``datetime.timezone``, or any tzinfo that
is not a :class:`zoneinfo.ZoneInfo`) come back with a ``datetime.timezone`` of the same
offset (``timezone.utc`` for zero): ``==`` holds and ``utcoffset()`` is the same, a
tzinfo's name is not kept. ZoneInfo values keep their zone (``ZoneInfo(key)``, the
cached instance), so wall-clock comparisons and fold semantics survive; if the
decoding side does not know the zone, or its tzdata gives another offset for that
instant, the value comes back with the fixed offset it was encoded with (a ``time``
with an unknown zone comes back naive: a zone gives times no offset).

Strings are UTF-8; lone surrogates are written with ``surrogatepass`` (the encoder
retries that way only when strict UTF-8 fails, which keeps the common case fast).

Batch frames
------------
::

    byte 0       format version (FORMAT_VERSION)
    bytes 1..4   header length, big-endian uint32
    header       msgpack [count, complete, first_kind, first_value, first_tag,
                          last_kind, last_value, last_tag]
    body         msgpack [schemas, extra_tables, changes, pg_text]

``schemas`` are ``[schema, name, [[column, type_name, nullable, type_oid], ...],
[key, ...], version]``; ``extra_tables`` are ``[schema, name]`` of tables that
changes touch but ``Batch.schemas`` does not describe. A change is ``[op,
table_index, key, before, after, unchanged, position_value, position_tag, xid,
commit_ts_us]`` where ``table_index`` counts the schemas' tables, then the extra
tables, and the position's kind is ``first_kind``; a change whose position has
another kind carries it as an 11th element. ``pg_text`` is ``[[table_index, [oid,
...]], ...]`` (``Batch.pg_text``); a 3-element body has none. A 5th element
``[decoder, payload]`` holds changes still packed by their source (``Batch.packed``,
``changes`` is then empty): the decoder named fills ``changes`` from the payload.
:func:`peek_batch` reads only the header. Decoding anything malformed raises :class:`FatalError`.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from functools import partial
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from typing import Any, Final
from uuid import UUID, SafeUUID
from zoneinfo import ZoneInfo

import msgpack  # type: ignore[import-untyped,unused-ignore]
from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import (
    Batch,
    Change,
    Column,
    Op,
    Packed,
    Position,
    TableId,
    TableSchema,
)
from dataflare.cdc.postgres.packed import DECODER, unpack_changes

__all__ = [
    "FORMAT_VERSION",
    "BatchHeader",
    "decode_batch",
    "decode_position",
    "encode_batch",
    "encode_position",
    "packb",
    "peek_batch",
    "unpackb",
]

FORMAT_VERSION: Final = 1

# Ext type codes: part of the wire format. Never renumber or reuse one.
EXT_BIGINT: Final = 1
EXT_DECIMAL: Final = 2
EXT_DATE: Final = 3
EXT_TIME: Final = 4
EXT_TIME_TZ: Final = 5
EXT_DATETIME: Final = 6
EXT_DATETIME_TZ: Final = 7
EXT_DATETIME_ZONE: Final = 8
EXT_TIME_ZONE: Final = 9
EXT_TIMEDELTA: Final = 10
EXT_UUID: Final = 11
EXT_IP: Final = 12

_ExtType: Any = msgpack.ExtType
# ExtType is a namedtuple whose __new__ re-validates code and data on every call;
# ours are valid by construction, and an encoder runs once per value: build the
# tuple directly. _ext((code, data)) -> ExtType.
_ext: Callable[[tuple[int, bytes]], Any] = (
    partial(tuple.__new__, _ExtType)
    if issubclass(_ExtType, tuple)
    else lambda cd: _ExtType(*cd)  # pragma: no cover - a future msgpack
)

_EPOCH: Final = datetime(1970, 1, 1)
_US: Final = timedelta(microseconds=1)
_S_q: Final = struct.Struct(">q")
_S_qq: Final = struct.Struct(">qq")
_S_qqB: Final = struct.Struct(">qqB")
_S_qB: Final = struct.Struct(">qB")
_S_I: Final = struct.Struct(">I")
_S_iii: Final = struct.Struct(">iii")
_FOLD: Final = b"\x01"
_IP_TYPES: Final[tuple[type, ...]] = (
    IPv4Address,  # 0: packed (4 bytes)
    IPv6Address,  # 1: packed (16 bytes)
    IPv6Address,  # 2: str (a scoped address, "fe80::1%eth0")
    IPv4Network,  # 3..6: str
    IPv6Network,
    IPv4Interface,
    IPv6Interface,
)
_IP_KIND: Final[dict[type, int]] = {
    IPv4Address: 0,
    IPv6Address: 1,
    IPv4Network: 3,
    IPv6Network: 4,
    IPv4Interface: 5,
    IPv6Interface: 6,
}
_CACHE_MAX: Final = 4096


# --------------------------------------------------------------------------- encoders


def _enc_bigint(v: int) -> Any:
    return _ext((EXT_BIGINT, v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True)))


def _enc_decimal(v: Decimal) -> Any:
    return _ext((EXT_DECIMAL, str(v).encode("ascii")))


def _enc_date(v: date) -> Any:
    return _ext((EXT_DATE, _S_I.pack(v.toordinal())))


def _time_us(v: time) -> int:
    return ((v.hour * 60 + v.minute) * 60 + v.second) * 1_000_000 + v.microsecond


def _enc_time(v: time) -> Any:
    tz = v.tzinfo
    if tz is not None:
        if type(tz) is ZoneInfo and tz.key is not None:
            return _ext((EXT_TIME_ZONE, _S_qB.pack(_time_us(v), v.fold) + tz.key.encode()))
        off = v.utcoffset()
        if off is not None:  # else a tzinfo with no offset for times: compares as naive
            data = _S_qq.pack(_time_us(v), off // _US)
            return _ext((EXT_TIME_TZ, data + _FOLD if v.fold else data))
    data = _S_q.pack(_time_us(v))
    return _ext((EXT_TIME, data + _FOLD if v.fold else data))


# Per tzinfo object (by id, the object kept alive and checked): the Unix epoch's
# wall clock in that zone, and the zone's fixed offset in µs (None: ask per value).
# Subtracting two datetimes that share a tzinfo object is wall-clock arithmetic and
# calls no utcoffset(), so ``(v - epoch) // _US`` is the wall clock in µs.
_tz_cache: dict[int, tuple[Any, datetime, int | None]] = {}


def _tz_info(tz: Any) -> tuple[Any, datetime, int | None]:
    epoch = _EPOCH.replace(tzinfo=tz)
    fixed: int | None = None
    if type(tz) is timezone:
        off = tz.utcoffset(None)
        fixed = off // _US
    hit = (tz, epoch, fixed)
    if len(_tz_cache) >= _CACHE_MAX:
        _tz_cache.clear()
    _tz_cache[id(tz)] = hit
    return hit


def _enc_datetime(v: datetime) -> Any:
    tz = v.tzinfo
    if tz is None:
        data = _S_q.pack((v - _EPOCH) // _US)
        return _ext((EXT_DATETIME, data + _FOLD if v.fold else data))
    hit = _tz_cache.get(id(tz))
    if hit is None or hit[0] is not tz:
        hit = _tz_info(tz)
    wall = (v - hit[1]) // _US
    off_us = hit[2]
    if off_us is None:
        off = v.utcoffset()
        if off is None:  # a tzinfo that gives no offset: compares as naive
            data = _S_q.pack(wall)
            return _ext((EXT_DATETIME, data + _FOLD if v.fold else data))
        off_us = off // _US
        if type(tz) is ZoneInfo and tz.key is not None:
            return _ext((EXT_DATETIME_ZONE, _S_qqB.pack(wall, off_us, v.fold) + tz.key.encode()))
    data = _S_qq.pack(wall, off_us)
    return _ext((EXT_DATETIME_TZ, data + _FOLD if v.fold else data))


def _enc_timedelta(v: timedelta) -> Any:
    return _ext((EXT_TIMEDELTA, _S_iii.pack(v.days, v.seconds, v.microseconds)))


def _enc_uuid(v: UUID) -> Any:
    return _ext((EXT_UUID, v.int.to_bytes(16, "big")))


def _ip_encoder(kind: int) -> Callable[[Any], Any]:
    if kind == 0:
        return lambda v: _ext((EXT_IP, b"\x00" + v.packed))
    if kind == 1:
        # A scoped address ("fe80::1%eth0") has no packed form that keeps the scope.
        return lambda v: _ext(
            (EXT_IP, b"\x01" + v.packed if v.scope_id is None else b"\x02" + str(v).encode())
        )
    prefix = bytes((kind,))
    return lambda v: _ext((EXT_IP, prefix + str(v).encode()))


_ENCODERS: dict[type, Callable[[Any], Any]] = {
    int: _enc_bigint,  # only reached for ints beyond msgpack's 64-bit range
    Decimal: _enc_decimal,
    date: _enc_date,
    time: _enc_time,
    datetime: _enc_datetime,
    timedelta: _enc_timedelta,
    UUID: _enc_uuid,
    **{t: _ip_encoder(k) for t, k in _IP_KIND.items()},
}
_BASE_ENCODERS: Final = dict(_ENCODERS)


def _default(obj: Any) -> Any:
    """msgpack's ``default=``: one dict lookup on the exact type in the common case."""
    enc = _ENCODERS.get(type(obj))
    if enc is None:
        enc = _subclass_encoder(type(obj))
    return enc(obj)


def _subclass_encoder(cls: type) -> Callable[[Any], Any]:
    # A subclass of a supported type (a datetime subclass, an IntEnum beyond 64 bits,
    # ...) is encoded as that type, and comes back as it; the choice is cached.
    for base in cls.__mro__[1:]:
        enc = _BASE_ENCODERS.get(base)
        if enc is not None:
            if len(_ENCODERS) < _CACHE_MAX:
                _ENCODERS[cls] = enc
            return enc
    raise FatalError(f"cannot encode a value of type {cls.__module__}.{cls.__qualname__}")


_PACK_OPTS: Final[dict[str, Any]] = {"default": _default, "use_bin_type": True}


def _pack(obj: Any) -> bytes:
    try:
        data: bytes = msgpack.packb(obj, **_PACK_OPTS)
        return data
    except UnicodeEncodeError:
        pass  # a str with lone surrogates: rare, and strict UTF-8 packs much faster
    except FatalError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise FatalError(f"cannot encode value: {_reason(e)}") from e
    try:
        data = msgpack.packb(obj, unicode_errors="surrogatepass", **_PACK_OPTS)
        return data
    except FatalError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise FatalError(f"cannot encode value: {_reason(e)}") from e


def packb(obj: Any) -> bytes:
    """msgpack bytes of ``obj`` with DataFlare's ext types (see the module doc).

    Raises :class:`FatalError` for a value of an unsupported type.
    """
    return _pack(obj)


# --------------------------------------------------------------------------- decoders


def _dec_bigint(data: bytes) -> int:
    if not data:
        raise ValueError("empty big integer")
    return int.from_bytes(data, "big", signed=True)


def _dec_decimal(data: bytes) -> Decimal:
    return Decimal(data.decode("ascii"))


def _dec_date(data: bytes) -> date:
    return date.fromordinal(_S_I.unpack(data)[0])


def _fold(data: bytes, size: int) -> int:
    if len(data) == size:
        return 0
    if data[size:] == _FOLD:
        return 1
    raise ValueError("bad temporal payload length")


def _time_from_us(us: int, tz: Any, fold: int) -> time:
    if not 0 <= us < 86_400_000_000:
        raise ValueError("time of day out of range")
    s, us = divmod(us, 1_000_000)
    m, s = divmod(s, 60)
    h, m = divmod(m, 60)
    return time(h, m, s, us, tz, fold=fold)


def _dec_time(data: bytes) -> time:
    return _time_from_us(_S_q.unpack_from(data)[0], None, _fold(data, 8))


_fixed_cache: dict[int, tuple[timezone, datetime]] = {}


def _fixed(off_us: int) -> tuple[timezone, datetime]:
    """A fixed-offset timezone and the Unix epoch's wall clock in it (cached)."""
    tz = timezone(_US * off_us)
    hit = (tz, _EPOCH.replace(tzinfo=tz))
    if len(_fixed_cache) >= _CACHE_MAX:
        _fixed_cache.clear()
    _fixed_cache[off_us] = hit
    return hit


_zone_cache: dict[str, ZoneInfo | None] = {}


def _zone(key: str) -> ZoneInfo | None:
    try:
        return _zone_cache[key]
    except KeyError:
        pass
    zone: ZoneInfo | None
    try:
        zone = ZoneInfo(key)
    except Exception:  # unknown zone, bad key, unreadable tzdata: use the fixed offset
        zone = None
    if len(_zone_cache) >= _CACHE_MAX:
        _zone_cache.clear()
    _zone_cache[key] = zone
    return zone


def _dec_time_tz(data: bytes) -> time:
    us: int
    off: int
    us, off = _S_qq.unpack_from(data)
    return _time_from_us(us, (_fixed_cache.get(off) or _fixed(off))[0], _fold(data, 16))


def _dec_time_zone(data: bytes) -> time:
    us, fold = _S_qB.unpack_from(data)
    if fold > 1:
        raise ValueError("bad fold")
    return _time_from_us(us, _zone(data[9:].decode()), fold)


def _dec_datetime(data: bytes) -> datetime:
    us: int = _S_q.unpack_from(data)[0]
    v = _EPOCH + _US * us
    return v if len(data) == 8 else v.replace(fold=_fold(data, 8))


def _dec_datetime_tz(data: bytes) -> datetime:
    wall: int
    off: int
    wall, off = _S_qq.unpack_from(data)
    v = (_fixed_cache.get(off) or _fixed(off))[1] + _US * wall
    return v if len(data) == 16 else v.replace(fold=_fold(data, 16))


def _dec_datetime_zone(data: bytes) -> datetime:
    wall: int
    off: int
    fold: int
    wall, off, fold = _S_qqB.unpack_from(data)
    if fold > 1:
        raise ValueError("bad fold")
    zone = _zone(data[17:].decode())
    if zone is not None:
        v = (_EPOCH + _US * wall).replace(tzinfo=zone, fold=fold)
        try:
            if v.utcoffset() == _US * off:
                return v
        except (OverflowError, ValueError):  # tzdata cannot place this instant
            pass
    v = (_fixed_cache.get(off) or _fixed(off))[1] + _US * wall
    return v.replace(fold=1) if fold else v


def _dec_timedelta(data: bytes) -> timedelta:
    days, seconds, us = _S_iii.unpack(data)
    return timedelta(days, seconds, us)


def _uuid_from_int(i: int, _new: Any = object.__new__, _set: Any = object.__setattr__) -> UUID:
    # UUID.__init__ parses five argument forms in Python; from a valid 128-bit int
    # it only sets two slots, which is what pickle's UUID.__setstate__ does too.
    u: UUID = _new(UUID)
    _set(u, "int", i)
    _set(u, "is_safe", SafeUUID.unknown)
    return u


def _check_uuid_fast_path() -> Callable[[int], UUID]:
    try:
        i = 0x12345678_9ABC_4DEF_8123_456789ABCDEF
        u = _uuid_from_int(i)
        if u == UUID(int=i) and str(u) == str(UUID(int=i)) and hash(u) == hash(UUID(int=i)):
            return _uuid_from_int
    except Exception:  # pragma: no cover - a future Python with another UUID layout
        pass
    return lambda i: UUID(int=i)  # pragma: no cover


_new_uuid: Final = _check_uuid_fast_path()


def _dec_uuid(data: bytes) -> UUID:
    if len(data) != 16:
        raise ValueError("a UUID takes 16 bytes")
    return _new_uuid(int.from_bytes(data, "big"))


def _dec_ip(data: bytes) -> Any:
    kind = data[0]
    cls = _IP_TYPES[kind]
    if kind < 2:
        if len(data) != (5 if kind == 0 else 17):
            raise ValueError("bad packed address length")
        return cls(data[1:])
    return cls(data[1:].decode())


_DECODERS: Final[dict[int, Callable[[bytes], Any]]] = {
    EXT_BIGINT: _dec_bigint,
    EXT_DECIMAL: _dec_decimal,
    EXT_DATE: _dec_date,
    EXT_TIME: _dec_time,
    EXT_TIME_TZ: _dec_time_tz,
    EXT_DATETIME: _dec_datetime,
    EXT_DATETIME_TZ: _dec_datetime_tz,
    EXT_DATETIME_ZONE: _dec_datetime_zone,
    EXT_TIME_ZONE: _dec_time_zone,
    EXT_TIMEDELTA: _dec_timedelta,
    EXT_UUID: _dec_uuid,
    EXT_IP: _dec_ip,
}


class _BadExt(Exception):
    pass


def _ext_hook(code: int, data: bytes) -> Any:
    try:
        return _DECODERS[code](data)
    except Exception as e:
        if code not in _DECODERS:
            raise _BadExt(f"unknown ext type {code}") from None
        raise _BadExt(f"bad ext type {code} payload ({_reason(e)})") from e


_UNPACK_OPTS: Final[dict[str, Any]] = {
    "ext_hook": _ext_hook,
    "raw": False,
    "use_list": True,
    "strict_map_key": False,
    "unicode_errors": "surrogatepass",
}


def _reason(e: BaseException) -> str:
    msg = str(e)
    if len(msg) > 160:
        msg = msg[:160] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _unpack(buf: Any, what: str) -> Any:
    try:
        return msgpack.unpackb(buf, **_UNPACK_OPTS)
    except _BadExt as e:
        raise FatalError(f"{what}: {e}") from e
    except Exception as e:
        raise FatalError(f"{what}: not valid msgpack ({_reason(e)})") from e


def unpackb(data: bytes | bytearray | memoryview[Any]) -> Any:
    """The value :func:`packb` encoded. Malformed input raises :class:`FatalError`."""
    return _unpack(data, "cannot decode msgpack value")


# --------------------------------------------------------------------------- positions


def encode_position(p: Position) -> list[Any]:
    """``[kind, value, tag]``: the msgpack-ready form of a position."""
    return [p.kind, p.value, p.tag]


def decode_position(obj: Any) -> Position:
    """The position :func:`encode_position` gave (a list or tuple; the tag may be left
    out); anything else raises :class:`FatalError`."""
    if (type(obj) is list or type(obj) is tuple) and 2 <= len(obj) <= 3:
        kind, value = obj[0], obj[1]
        tag = obj[2] if len(obj) == 3 else ""
        if type(kind) is str and type(value) is int and type(tag) is str:
            return Position(kind, value, tag)
    raise FatalError(f"bad position: expected [kind, value, tag?], got {type(obj).__name__}")


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True, slots=True)
class BatchHeader:
    """What :func:`peek_batch` reads without decoding any change."""

    first: Position
    last: Position
    complete: bool
    count: int  # number of changes
    version: int = FORMAT_VERSION

    def __len__(self) -> int:
        return self.count


_S_FRAME: Final = struct.Struct(">BI")
_OPS: Final[dict[Any, Op]] = {op.value: op for op in Op}
_EMPTY: Final[frozenset[str]] = frozenset()
_EMPTY_SEQ: Final[tuple[()]] = ()


def encode_batch(batch: Batch) -> bytes:
    """One ring frame for ``batch`` (see the module doc for the layout)."""
    schemas = batch.schemas
    first, last = batch.first, batch.last
    kind = first.kind
    index: dict[TableId, int] = {}
    for i, s in enumerate(schemas):
        index.setdefault(s.table, i)
    extra: list[tuple[str, str]] = []
    records: list[tuple[Any, ...]] = []
    append = records.append
    last_table: TableId | None = None
    ti = 0
    for c in batch.changes:
        t = c.table
        if t is not last_table:
            got = index.get(t)
            if got is None:
                got = index[t] = len(schemas) + len(extra)
                extra.append((t.schema, t.name))
            last_table, ti = t, got
        p = c.position
        u = c.unchanged
        rec = (
            c.op,
            ti,
            c.key,
            c.before,
            c.after,
            sorted(u) if u else _EMPTY_SEQ,
            p.value,
            p.tag,
            c.xid,
            c.commit_ts_us,
        )
        append(rec if p.kind == kind else (*rec, p.kind))
    packed = batch.packed
    header = (
        len(records) if packed is None else packed.count,
        batch.complete,
        first.kind,
        first.value,
        first.tag,
        last.kind,
        last.value,
        last.tag,
    )
    body: tuple[Any, ...] = (
        [
            (
                s.table.schema,
                s.table.name,
                [(col.name, col.type_name, col.nullable, col.type_oid) for col in s.columns],
                s.key,
                s.version,
            )
            for s in schemas
        ],
        extra,
        records,
        [(index[t], oids) for t, oids in batch.pg_text.items() if t in index],
    )
    if packed is not None:
        if records:
            raise ValueError("a batch with packed changes holds no other changes")
        body = (*body, (packed.decoder, packed.payload))
    head = _pack(header)
    return b"".join((_S_FRAME.pack(FORMAT_VERSION, len(head)), head, _pack(body)))


def _corrupt(detail: str) -> FatalError:
    return FatalError(f"corrupt batch frame: {detail}")


def _split(mv: memoryview) -> int:
    """Check the frame prefix; the header's end offset."""
    n = mv.nbytes
    if n < 1:
        raise _corrupt("empty frame")
    if mv[0] != FORMAT_VERSION:
        raise FatalError(
            f"unsupported batch format version {mv[0]} (this DataFlare reads version "
            f"{FORMAT_VERSION}); was the frame written by another release, or is it not a batch?"
        )
    if n < _S_FRAME.size:
        raise _corrupt(f"truncated prefix ({n} bytes)")
    hlen: int = _S_FRAME.unpack_from(mv)[1]
    end = _S_FRAME.size + hlen
    if end > n:
        raise _corrupt(f"header of {hlen} bytes overruns the {n}-byte frame")
    return end


def _view(data: Any) -> memoryview:
    try:
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
    except (TypeError, ValueError) as e:
        raise FatalError(f"a batch frame must be bytes, not {type(data).__name__}") from e
    return mv


def _header(mv: memoryview, end: int) -> BatchHeader:
    with mv[_S_FRAME.size : end] as part:
        h = _unpack(part, "corrupt batch frame: bad header")
    if type(h) is not list or len(h) != 8:
        raise _corrupt("header is not an 8-element array")
    count, complete, fk, fv, ft, lk, lv, lt = h
    if type(count) is not int or count < 0 or type(complete) is not bool:
        raise _corrupt("bad change count or completeness flag")
    return BatchHeader(_position(fk, fv, ft), _position(lk, lv, lt), complete, count)


def _position(kind: Any, value: Any, tag: Any) -> Position:
    if type(kind) is not str or type(value) is not int or type(tag) is not str:
        raise _corrupt("bad position")
    return Position(kind, value, tag)


def peek_batch(data: bytes | bytearray | memoryview[Any]) -> BatchHeader:
    """First and last positions, completeness and change count, decoding no change."""
    with _view(data) as mv:
        return _header(mv, _split(mv))


def decode_batch(data: bytes | bytearray | memoryview[Any], keep_packed: bool = False) -> Batch:
    """The batch :func:`encode_batch` encoded; malformed frames raise :class:`FatalError`.

    With ``keep_packed``, changes a source packed (``Batch.packed``) stay packed:
    ``changes`` is empty until :func:`unpack_batch` (a destination that writes the
    packed form as it is never builds a change per row)."""
    with _view(data) as mv:
        end = _split(mv)
        head = _header(mv, end)
        with mv[end:] as part:
            body = _unpack(part, "corrupt batch frame: bad body")
    if type(body) is not list or len(body) not in (3, 4, 5):
        raise _corrupt("body is not a 3- to 5-element array")
    raw_schemas, raw_extra, raw_changes = body[:3]
    schemas = _schemas(raw_schemas)
    tables = [s.table for s in schemas]
    if type(raw_extra) is not list:
        raise _corrupt("extra tables are not an array")
    for t in raw_extra:
        if type(t) is not list or len(t) != 2 or type(t[0]) is not str or type(t[1]) is not str:
            raise _corrupt("bad extra table")
        tables.append(TableId(t[0], t[1]))
    packed = len(body) == 5
    if type(raw_changes) is not list or len(raw_changes) != (0 if packed else head.count):
        raise _corrupt(f"header counts {head.count} changes, the body holds another number")
    pg_text = _pg_text(body[3], tables) if len(body) >= 4 else {}
    if packed:
        raw = body[4]
        if type(raw) is not list or len(raw) != 2 or type(raw[0]) is not str:
            raise _corrupt("bad packed changes")
        if raw[0] != DECODER:
            raise _corrupt(f"unknown packed-change format {raw[0]!r}")
        batch = Batch(
            [], schemas, head.first, head.last, head.complete, pg_text=pg_text,
            packed=Packed(DECODER, head.count, raw[1]),
        )  # fmt: skip
        return batch if keep_packed else unpack_batch(batch)
    try:
        changes = _changes(raw_changes, dict(enumerate(tables)), head.first.kind)
    except FatalError:
        raise
    except KeyError as e:
        raise _corrupt(f"a change has an unknown op or table index ({_reason(e)})") from e
    except Exception as e:  # a wrong type where a change field was expected
        raise _corrupt(f"bad change record ({_reason(e)})") from e
    return Batch(changes, schemas, head.first, head.last, head.complete, pg_text=pg_text)


def unpack_batch(batch: Batch) -> Batch:
    """``batch`` with changes a source packed (``decode_batch(..., keep_packed=True)``)
    decoded into ``changes``; any other batch as it is."""
    packed = batch.packed
    if packed is None:
        return batch
    try:
        changes = unpack_changes(packed.payload, batch.schemas)
    except FatalError:
        raise
    except Exception as e:
        raise _corrupt(f"bad change record ({_reason(e)})") from e
    if len(changes) != packed.count:
        raise _corrupt(f"header counts {packed.count} changes, {len(changes)} unpacked")
    return dataclasses.replace(batch, changes=changes, packed=None)


def _pg_text(raw: Any, tables: list[TableId]) -> dict[TableId, tuple[int, ...]]:
    if type(raw) is not list:
        raise _corrupt("pg_text is not an array")
    out: dict[TableId, tuple[int, ...]] = {}
    for item in raw:
        if (
            type(item) is not list
            or len(item) != 2
            or type(item[0]) is not int
            or not 0 <= item[0] < len(tables)
            or type(item[1]) is not list
            or not all(type(o) is int for o in item[1])
        ):
            raise _corrupt("bad pg_text entry")
        out[tables[item[0]]] = tuple(item[1])
    return out


def _is_str_list(v: Any) -> bool:
    return type(v) is list and all(type(x) is str for x in v)


def _schemas(raw: Any) -> list[TableSchema]:
    if type(raw) is not list:
        raise _corrupt("schemas are not an array")
    out = []
    for s in raw:
        if type(s) is not list or len(s) != 5:
            raise _corrupt("bad table schema")
        schema, name, cols, key, version = s
        if (
            type(schema) is not str
            or type(name) is not str
            or type(cols) is not list
            or not _is_str_list(key)
            or type(version) is not int
        ):
            raise _corrupt("bad table schema")
        columns = []
        for c in cols:
            if (
                type(c) is not list
                or len(c) != 4
                or type(c[0]) is not str
                or type(c[1]) is not str
                or type(c[2]) is not bool
                or type(c[3]) is not int
            ):
                raise _corrupt(f"bad column in the schema of {schema}.{name}")
            columns.append(Column(c[0], c[1], c[2], c[3]))
        out.append(TableSchema(TableId(schema, name), tuple(columns), tuple(key), version))
    return out


def _changes(raw: list[Any], tables: dict[int, TableId], kind: str) -> list[Change]:
    ops = _OPS
    changes: list[Change] = []
    append = changes.append
    pos = Position(kind, 0, "")
    pos_kind = kind
    pos_value: Any = None
    pos_tag: Any = None
    for rec in raw:
        if len(rec) == 10:
            op, ti, key, before, after, unchanged, value, tag, xid, ts = rec
            k = kind
        elif len(rec) == 11:
            op, ti, key, before, after, unchanged, value, tag, xid, ts, k = rec
        else:
            raise _corrupt("a change record is not a 10- or 11-element array")
        if value != pos_value or tag != pos_tag or k != pos_kind:
            # Changes of one transaction share their commit position: build it once.
            pos = _position(k, value, tag)
            pos_kind, pos_value, pos_tag = k, value, tag
        if key is not None:
            if type(key) is not list:
                raise _corrupt("a key is not an array")
            key = tuple(key)
        if before is not None:
            if type(before) is not list:
                raise _corrupt("a before row is not an array")
            before = tuple(before)
        if after is not None:
            if type(after) is not list:
                raise _corrupt("an after row is not an array")
            after = tuple(after)
        if unchanged:
            if not _is_str_list(unchanged):
                raise _corrupt("unchanged columns are not an array of names")
            unchanged = frozenset(unchanged)
        elif type(unchanged) is list:
            unchanged = _EMPTY
        else:
            raise _corrupt("unchanged columns are not an array of names")
        if (xid is not None and type(xid) is not int) or (ts is not None and type(ts) is not int):
            raise _corrupt("bad xid or commit timestamp")
        append(
            _new_change(Change, (ops[op], tables[ti], pos, key, before, after, unchanged, xid, ts))
        )
    return changes


_new_change = tuple.__new__  # Change is a NamedTuple: skip its Python-level __new__
