"""Row-image decoding for binlog ROWS events, with a precompiled layout per table.

pymysqlreplication decodes row images in pure Python with a long ``if/elif`` chain
per value (about 9 us a value) and gets several types wrong for us (TIMESTAMP through
the deprecated ``utcfromtimestamp``, zero dates, BIT as a bit string, SET as a Python
set). The library still owns the connection and the event framing (see
:mod:`dataflare.cdc.mysql.binlog`); the bytes of the row images are decoded here,
by a :class:`Layout` compiled once per table layout: a tuple of one small function
per column, so decoding a row is a loop over those functions.

This module is pure: it never imports the replication library.

Binlog value formats: MySQL ``sql/log_event.cc`` ``log_event_print_value`` and
``mysys/my_time.cc`` (``my_datetime_packed_from_binary`` and friends).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Column, Row

# MySQL FIELD_TYPE codes (include/field_types.h)
DECIMAL = 0
TINY = 1
SHORT = 2
LONG = 3
FLOAT = 4
DOUBLE = 5
NULL = 6
TIMESTAMP = 7
LONGLONG = 8
INT24 = 9
DATE = 10
TIME = 11
DATETIME = 12
YEAR = 13
NEWDATE = 14
VARCHAR = 15
BIT = 16
TIMESTAMP2 = 17
DATETIME2 = 18
TIME2 = 19
JSON = 245
NEWDECIMAL = 246
ENUM = 247
SET = 248
TINY_BLOB = 249
MEDIUM_BLOB = 250
LONG_BLOB = 251
BLOB = 252
VAR_STRING = 253
STRING = 254
GEOMETRY = 255

ZeroDates = Literal["null", "error"]


class DecodeError(FatalError):
    """A row image could not be decoded (bad data, or a value the config refuses)."""


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """What the TABLE_MAP event (with binlog_row_metadata=FULL) says about a column."""

    name: str
    type_code: int
    nullable: bool = True
    unsigned: bool = False
    max_length: int = 0  # VARCHAR/STRING: bytes
    length_size: int = 0  # BLOB/JSON/GEOMETRY: bytes of the length prefix
    precision: int = 0  # NEWDECIMAL
    decimals: int = 0  # NEWDECIMAL
    fsp: int = 0  # TIME2/DATETIME2/TIMESTAMP2 fractional digits
    bits: int = 0  # BIT
    size: int = 0  # ENUM/SET: bytes of the stored value
    charset: str | None = None  # Python codec; None means binary (bytes)
    mbmaxlen: int = 1  # bytes per character of the column's charset
    enum_values: tuple[str, ...] = ()
    set_values: tuple[str, ...] = ()


Reader = Callable[[bytes, int], tuple[Any, int]]

_DIG2BYTES = (0, 1, 1, 2, 2, 3, 3, 4, 4, 4)
_c_decimal: Callable[[bytes, int, int, int], tuple[Any, int] | None] | None
_c_datetime2: Callable[[bytes, int, int], tuple[Any, int] | None] | None
try:
    from dataflare.cdc._speedups import my_datetime2 as _c_datetime2
    from dataflare.cdc._speedups import my_decimal as _c_decimal
except ImportError:  # not built: the pure-Python readers
    _c_decimal = _c_datetime2 = None
_u16 = struct.Struct("<H").unpack_from
_i16 = struct.Struct("<h").unpack_from
_u32 = struct.Struct("<I").unpack_from
_i32 = struct.Struct("<i").unpack_from
_u64 = struct.Struct("<Q").unpack_from
_i64 = struct.Struct("<q").unpack_from
_f32 = struct.Struct("<f").unpack_from
_f64 = struct.Struct("<d").unpack_from
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# ------------------------------------------------------------------------ type names


def type_name(c: ColumnSpec) -> str:
    """A MySQL type name for a column as the binlog describes it."""
    t = c.type_code
    uns = " unsigned" if c.unsigned else ""
    ints = {TINY: "tinyint", SHORT: "smallint", INT24: "mediumint", LONG: "int", LONGLONG: "bigint"}
    if t in ints:
        return ints[t] + uns
    if t == FLOAT:
        return "float"
    if t == DOUBLE:
        return "double"
    if t in (NEWDECIMAL, DECIMAL):
        return f"decimal({c.precision},{c.decimals})" + uns
    if t in (DATE, NEWDATE):
        return "date"
    if t in (TIME, TIME2):
        return f"time({c.fsp})" if c.fsp else "time"
    if t in (DATETIME, DATETIME2):
        return f"datetime({c.fsp})" if c.fsp else "datetime"
    if t in (TIMESTAMP, TIMESTAMP2):
        return f"timestamp({c.fsp})" if c.fsp else "timestamp"
    if t == YEAR:
        return "year"
    if t == BIT:
        return f"bit({c.bits})"
    if t == ENUM:
        return "enum(" + ",".join(_sql_str(v) for v in c.enum_values) + ")"
    if t == SET:
        return "set(" + ",".join(_sql_str(v) for v in c.set_values) + ")"
    if t == JSON:
        return "json"
    if t == GEOMETRY:
        return "geometry"
    if t in (VARCHAR, VAR_STRING):
        n = max(1, c.max_length // max(1, c.mbmaxlen))
        return f"varbinary({n})" if c.charset is None else f"varchar({n})"
    if t == STRING:
        n = max(1, c.max_length // max(1, c.mbmaxlen))
        return f"binary({n})" if c.charset is None else f"char({n})"
    if t in (BLOB, TINY_BLOB, MEDIUM_BLOB, LONG_BLOB):
        size = {1: "tiny", 2: "", 3: "medium", 4: "long"}.get(c.length_size, "long")
        return f"{size}blob" if c.charset is None else f"{size}text"
    return f"unknown({t})"


def _sql_str(v: str) -> str:
    return "'" + v.replace("\\", "\\\\").replace("'", "''") + "'"


def to_column(c: ColumnSpec) -> Column:
    return Column(c.name, type_name(c), c.nullable)


# ------------------------------------------------------------------------ readers


def _zero(policy: ZeroDates, what: str, col: str) -> None:
    if policy == "error":
        raise DecodeError(
            f"column {col}: zero or invalid {what} in the binlog; set zero_dates: null "
            "in the source config to replicate it as NULL"
        )


def _decimal_reader(precision: int, scale: int) -> Reader:
    """MySQL's binary DECIMAL; the C twin (``cdc/_speedups.c``) when built, this
    module's Python reader for what it leaves (a value past the end, digit groups
    out of range: a corrupt image either way)."""
    py_read = _py_decimal_reader(precision, scale)
    if _c_decimal is None:
        return py_read
    c_read = _c_decimal

    def read(buf: bytes, off: int) -> tuple[Any, int]:
        got = c_read(buf, off, precision, scale)
        return got if got is not None else py_read(buf, off)

    return read


def _py_decimal_reader(precision: int, scale: int) -> Reader:
    """MySQL's binary DECIMAL: 9 digits per 4 big-endian bytes, a shorter leading and
    trailing group, the sign in the top bit (negative values stored inverted)."""
    intg = precision - scale
    intg0, intg0x = divmod(intg, 9)
    frac0, frac0x = divmod(scale, 9)
    lead = _DIG2BYTES[intg0x]
    tail = _DIG2BYTES[frac0x]
    size = lead + intg0 * 4 + frac0 * 4 + tail
    bits = size * 8
    sign_bit = 1 << (bits - 1)
    negate = ((1 << bits) - 1) ^ sign_bit
    # (shift, mask) of each group, most significant first
    fields: list[tuple[int, int]] = []
    at = bits
    for nbytes in [lead] * bool(lead) + [4] * intg0:
        at -= nbytes * 8
        fields.append((at, (1 << nbytes * 8) - 1))
    int_fields = tuple(fields)
    fields = []
    for nbytes in [4] * frac0 + [tail] * bool(tail):
        at -= nbytes * 8
        fields.append((at, (1 << nbytes * 8) - 1))
    frac_fields = tuple(fields)
    frac_tail_mult = 10**frac0x
    from_bytes = int.from_bytes

    def read(buf: bytes, off: int) -> tuple[Any, int]:
        v = from_bytes(buf[off : off + size], "big")
        if v & sign_bit:
            v ^= sign_bit
            sign = ""
        else:
            v ^= negate
            sign = "-"
        ip = 0
        for shift, mask in int_fields:
            ip = ip * 1_000_000_000 + (v >> shift & mask)
        if not scale:
            return Decimal(f"{sign}{ip}"), off + size
        fp = 0
        n = len(frac_fields)
        for i, (shift, mask) in enumerate(frac_fields):
            g = v >> shift & mask
            fp = fp * (frac_tail_mult if (tail and i == n - 1) else 1_000_000_000) + g
        return Decimal(f"{sign}{ip}.{fp:0{scale}d}"), off + size

    return read


def _frac(fsp: int) -> tuple[int, int]:
    """(bytes, multiplier to microseconds) of a fractional-seconds part."""
    n = (fsp + 1) // 2
    return n, (1, 10_000, 100, 1)[n]


def _datetime2_reader(fsp: int, policy: ZeroDates, col: str) -> Reader:
    """DATETIME(fsp); the C twin when built (a date that does not exist, or a value
    past the end, goes to the Python reader: the zero-date policy applies there)."""
    py_read = _py_datetime2_reader(fsp, policy, col)
    if _c_datetime2 is None:
        return py_read
    c_read = _c_datetime2

    def read(buf: bytes, off: int) -> tuple[Any, int]:
        got = c_read(buf, off, fsp)
        return got if got is not None and got[0] is not None else py_read(buf, off)

    return read


def _py_datetime2_reader(fsp: int, policy: ZeroDates, col: str) -> Reader:
    nfrac, mult = _frac(fsp)
    size = 5 + nfrac

    def read(buf: bytes, off: int) -> tuple[Any, int]:
        v = int.from_bytes(buf[off : off + 5], "big") - 0x8000000000
        us = int.from_bytes(buf[off + 5 : off + size], "big") * mult if nfrac else 0
        ymd = v >> 17
        ym = ymd >> 5
        hms = v & 0x1FFFF
        year, month, day = ym // 13, ym % 13, ymd & 31
        try:
            value: Any = datetime(year, month, day, hms >> 12, (hms >> 6) & 63, hms & 63, us)
        except ValueError:
            _zero(policy, "datetime", col)
            value = None
        return value, off + size

    return read


def _timestamp2_reader(fsp: int, policy: ZeroDates, col: str) -> Reader:
    nfrac, mult = _frac(fsp)
    size = 4 + nfrac

    def read(buf: bytes, off: int) -> tuple[Any, int]:
        sec = int.from_bytes(buf[off : off + 4], "big")
        us = int.from_bytes(buf[off + 4 : off + size], "big") * mult if nfrac else 0
        if sec == 0 and us == 0:
            _zero(policy, "timestamp", col)
            return None, off + size
        return _EPOCH + timedelta(seconds=sec, microseconds=us), off + size

    return read


def _time2_reader(fsp: int) -> Reader:
    nfrac = (fsp + 1) // 2
    size = 3 + nfrac

    def read(buf: bytes, off: int) -> tuple[Any, int]:
        if nfrac == 0:
            packed = (int.from_bytes(buf[off : off + 3], "big") - 0x800000) << 24
        elif nfrac == 1:
            intpart = int.from_bytes(buf[off : off + 3], "big") - 0x800000
            frac = int.from_bytes(buf[off + 3 : off + 4], "big", signed=True)
            if intpart < 0 and frac:
                intpart += 1
                frac -= 0x100
            packed = (intpart << 24) + frac * 10_000
        elif nfrac == 2:
            intpart = int.from_bytes(buf[off : off + 3], "big") - 0x800000
            frac = int.from_bytes(buf[off + 3 : off + 5], "big", signed=True)
            if intpart < 0 and frac:
                intpart += 1
                frac -= 0x10000
            packed = (intpart << 24) + frac * 100
        else:
            packed = int.from_bytes(buf[off : off + 6], "big") - 0x800000000000
        sign = -1 if packed < 0 else 1
        packed = abs(packed)
        hms, us = packed >> 24, packed & 0xFFFFFF
        h, m, s = (hms >> 12) & 0x3FF, (hms >> 6) & 63, hms & 63
        return sign * timedelta(hours=h, minutes=m, seconds=s, microseconds=us), off + size

    return read


def _date_reader(policy: ZeroDates, col: str) -> Reader:
    def read(buf: bytes, off: int) -> tuple[Any, int]:
        v = buf[off] | buf[off + 1] << 8 | buf[off + 2] << 16
        try:
            value: Any = date(v >> 9, (v >> 5) & 15, v & 31)
        except ValueError:
            _zero(policy, "date", col)
            value = None
        return value, off + 3

    return read


def _old_time(buf: bytes, off: int) -> tuple[Any, int]:
    v = int.from_bytes(buf[off : off + 3], "little", signed=True)
    sign = -1 if v < 0 else 1
    v = abs(v)
    return sign * timedelta(hours=v // 10000, minutes=v // 100 % 100, seconds=v % 100), off + 3


def _old_datetime_reader(policy: ZeroDates, col: str) -> Reader:
    def read(buf: bytes, off: int) -> tuple[Any, int]:
        v = _u64(buf, off)[0]
        d, t = divmod(v, 1_000_000)
        try:
            value: Any = datetime(
                d // 10000, d // 100 % 100, d % 100, t // 10000, t // 100 % 100, t % 100
            )
        except ValueError:
            _zero(policy, "datetime", col)
            value = None
        return value, off + 8

    return read


def _old_timestamp_reader(policy: ZeroDates, col: str) -> Reader:
    def read(buf: bytes, off: int) -> tuple[Any, int]:
        sec = _u32(buf, off)[0]
        if sec == 0:
            _zero(policy, "timestamp", col)
            return None, off + 4
        return _EPOCH + timedelta(seconds=sec), off + 4

    return read


def _fixed(unpack: Callable[[bytes, int], tuple[Any, ...]], size: int) -> Reader:
    def read(buf: bytes, off: int) -> tuple[Any, int]:
        return unpack(buf, off)[0], off + size

    return read


def _int_reader(size: int, signed: bool) -> Reader:
    if size == 1:
        if signed:
            return lambda buf, off: (buf[off] - 256 if buf[off] > 127 else buf[off], off + 1)
        return lambda buf, off: (buf[off], off + 1)
    table = {
        (2, True): _i16,
        (2, False): _u16,
        (4, True): _i32,
        (4, False): _u32,
        (8, True): _i64,
        (8, False): _u64,
    }
    if (size, signed) in table:
        return _fixed(table[(size, signed)], size)

    def read(buf: bytes, off: int) -> tuple[Any, int]:
        return int.from_bytes(buf[off : off + size], "little", signed=signed), off + size

    return read


def _lenenc_reader(prefix: int, codec: str | None, pad_to: int = 0) -> Reader:
    """A value with a little-endian length prefix of ``prefix`` bytes."""

    def read(buf: bytes, off: int) -> tuple[Any, int]:
        if prefix == 1:
            n = buf[off]
        elif prefix == 2:
            n = buf[off] | buf[off + 1] << 8
        else:
            n = int.from_bytes(buf[off : off + prefix], "little")
        start = off + prefix
        raw = buf[start : start + n]
        if codec is None:
            if pad_to and n < pad_to:  # BINARY(n): the binlog drops trailing zero bytes
                raw = raw + b"\x00" * (pad_to - n)
            return raw, start + n
        return raw.decode(codec), start + n

    return read


def _enum_reader(size: int, values: Sequence[str]) -> Reader:
    def read(buf: bytes, off: int) -> tuple[Any, int]:
        i = int.from_bytes(buf[off : off + size], "little")
        return (values[i - 1] if 0 < i <= len(values) else ""), off + size

    return read


def _set_reader(size: int, values: Sequence[str]) -> Reader:
    def read(buf: bytes, off: int) -> tuple[Any, int]:
        bits = int.from_bytes(buf[off : off + size], "little")
        chosen = [v for i, v in enumerate(values) if bits >> i & 1]
        return ",".join(chosen), off + size

    return read


def _bit_reader(nbits: int) -> Reader:
    size = (nbits + 7) // 8

    def read(buf: bytes, off: int) -> tuple[Any, int]:
        return int.from_bytes(buf[off : off + size], "big"), off + size

    return read


def _year(buf: bytes, off: int) -> tuple[Any, int]:
    v = buf[off]
    return (1900 + v if v else 0), off + 1


def compile_reader(
    c: ColumnSpec, zero_dates: ZeroDates, json_decoder: Callable[[bytes], str] | None
) -> Reader:
    t = c.type_code
    signed = not c.unsigned
    if t == TINY:
        return _int_reader(1, signed)
    if t == SHORT:
        return _int_reader(2, signed)
    if t == INT24:
        return _int_reader(3, signed)
    if t == LONG:
        return _int_reader(4, signed)
    if t == LONGLONG:
        return _int_reader(8, signed)
    if t == FLOAT:
        return _fixed(_f32, 4)
    if t == DOUBLE:
        return _fixed(_f64, 8)
    if t == NEWDECIMAL:
        return _decimal_reader(c.precision, c.decimals)
    if t == DATETIME2:
        return _datetime2_reader(c.fsp, zero_dates, c.name)
    if t == TIMESTAMP2:
        return _timestamp2_reader(c.fsp, zero_dates, c.name)
    if t == TIME2:
        return _time2_reader(c.fsp)
    if t in (DATE, NEWDATE):
        return _date_reader(zero_dates, c.name)
    if t == TIME:
        return _old_time
    if t == DATETIME:
        return _old_datetime_reader(zero_dates, c.name)
    if t == TIMESTAMP:
        return _old_timestamp_reader(zero_dates, c.name)
    if t == YEAR:
        return _year
    if t == BIT:
        return _bit_reader(c.bits)
    if t == ENUM:
        return _enum_reader(c.size, c.enum_values)
    if t == SET:
        return _set_reader(c.size, c.set_values)
    if t in (VARCHAR, VAR_STRING):
        return _lenenc_reader(1 if c.max_length < 256 else 2, c.charset)
    if t == STRING:
        return _lenenc_reader(1 if c.max_length < 256 else 2, c.charset, pad_to=c.max_length)
    if t in (BLOB, TINY_BLOB, MEDIUM_BLOB, LONG_BLOB, GEOMETRY):
        return _lenenc_reader(c.length_size, c.charset)
    if t == JSON:
        inner = _lenenc_reader(c.length_size, None)
        if json_decoder is None:
            return inner
        decode = json_decoder

        def read_json(buf: bytes, off: int) -> tuple[Any, int]:
            raw, end = inner(buf, off)
            return decode(raw), end

        return read_json
    raise DecodeError(f"column {c.name}: binlog type {t} is not supported")


class Layout:
    """The compiled decoder of one table layout."""

    __slots__ = ("_full", "columns", "key_indexes", "ncols", "readers", "specs")

    def __init__(
        self,
        specs: Sequence[ColumnSpec],
        key_indexes: Sequence[int],
        zero_dates: ZeroDates = "null",
        json_decoder: Callable[[bytes], str] | None = None,
    ) -> None:
        self.specs = tuple(specs)
        self.ncols = len(self.specs)
        self.readers = tuple(compile_reader(c, zero_dates, json_decoder) for c in self.specs)
        self.columns = tuple(to_column(c) for c in self.specs)
        self.key_indexes = tuple(key_indexes)
        self._full = _generate_full_decoder(self.specs, self.readers)

    def decode_image(self, buf: bytes, off: int, present: bytes) -> tuple[Row, int]:
        """One row image at ``off`` (null bitmap then values); the row and the next offset.

        ``present`` is the columns-present bitmap; a column not present (MINIMAL row
        image) decodes as None.
        """
        readers = self.readers
        n = self.ncols
        if self._is_full(present):
            nbytes = (n + 7) // 8
            nulls = int.from_bytes(buf[off : off + nbytes], "little")
            off += nbytes
            row: list[Any] = [None] * n
            for i in range(n):
                if not nulls >> i & 1:
                    row[i], off = readers[i](buf, off)
            return tuple(row), off
        idx = [i for i in range(n) if present[i // 8] >> (i % 8) & 1]
        nbytes = (len(idx) + 7) // 8
        nulls = int.from_bytes(buf[off : off + nbytes], "little")
        off += nbytes
        row = [None] * n
        for j, i in enumerate(idx):
            if not nulls >> j & 1:
                row[i], off = readers[i](buf, off)
        return tuple(row), off

    def _is_full(self, present: bytes) -> bool:
        n = self.ncols
        return all(b == 0xFF for b in present[: n // 8]) and (
            n % 8 == 0 or present[n // 8] & ((1 << (n % 8)) - 1) == (1 << (n % 8)) - 1
        )

    def _decode_full(self, buf: bytes, off: int) -> tuple[Row, int]:
        return self._full(buf, off)

    def _decode_full_loop(self, buf: bytes, off: int) -> tuple[Row, int]:
        """The generic loop the generated decoder replaces (kept for tests)."""
        readers = self.readers
        n = self.ncols
        nbytes = (n + 7) >> 3
        nulls = int.from_bytes(buf[off : off + nbytes], "little")
        off += nbytes
        if not nulls:
            row: list[Any] = []
            append = row.append
            for read in readers:
                value, off = read(buf, off)
                append(value)
            return tuple(row), off
        row = [None] * n
        for i in range(n):
            if not nulls >> i & 1:
                row[i], off = readers[i](buf, off)
        return tuple(row), off

    def decode_rows(
        self, buf: bytes, present: bytes, present2: bytes | None
    ) -> list[tuple[Row, Row | None]]:
        """Every row of a ROWS event body: (image, None) for writes and deletes,
        (before, after) for updates."""
        out: list[tuple[Row, Row | None]] = []
        off = 0
        end = len(buf)
        if self._is_full(present) and (present2 is None or self._is_full(present2)):
            full = self._full
            if present2 is None:
                while off < end:
                    first, off = full(buf, off)
                    out.append((first, None))
            else:
                while off < end:
                    first, off = full(buf, off)
                    second, off = full(buf, off)
                    out.append((first, second))
            return out
        while off < end:
            first, off = self.decode_image(buf, off, present)
            if present2 is not None:
                second, off = self.decode_image(buf, off, present2)
                out.append((first, second))
            else:
                out.append((first, None))
        return out


# ------------------------------------------------------------ generated decoders

_INLINE_INTS = {
    (TINY, True): ("{v} = buf[off]", 1),
    (SHORT, False): ("{v} = _i16(buf, off)[0]", 2),
    (SHORT, True): ("{v} = _u16(buf, off)[0]", 2),
    (LONG, False): ("{v} = _i32(buf, off)[0]", 4),
    (LONG, True): ("{v} = _u32(buf, off)[0]", 4),
    (LONGLONG, False): ("{v} = _i64(buf, off)[0]", 8),
    (LONGLONG, True): ("{v} = _u64(buf, off)[0]", 8),
    (DOUBLE, False): ("{v} = _f64(buf, off)[0]", 8),
    (DOUBLE, True): ("{v} = _f64(buf, off)[0]", 8),
}


def _c_call(c: ColumnSpec) -> str | None:
    """The C reader call for a column the generated decoder reads through C."""
    if c.type_code == NEWDECIMAL and _c_decimal is not None:
        return f"_dec(buf, off, {c.precision}, {c.decimals})"
    if c.type_code == DATETIME2 and _c_datetime2 is not None:
        return f"_dt2(buf, off, {c.fsp})"
    return None


def _generate_full_decoder(
    specs: Sequence[ColumnSpec], readers: Sequence[Reader]
) -> Callable[[bytes, int], tuple[Row, int]]:
    """Python source for one row image of this layout with every column present:
    fixed-width integers and short strings inline, other types through their
    reader; compiled once per layout. Removes a call and a tuple per simple value."""
    n = len(specs)
    nbytes = (n + 7) // 8
    env: dict[str, Any] = {"_i16": _i16, "_u16": _u16, "_i32": _i32, "_u32": _u32,
                           "_i64": _i64, "_u64": _u64, "_f64": _f64,
                           "_dec": _c_decimal, "_dt2": _c_datetime2}  # fmt: skip
    lines = [
        "def decode(buf, off):",
        f"    nulls = int.from_bytes(buf[off:off + {nbytes}], 'little')",
        f"    off += {nbytes}",
    ]
    for i, c in enumerate(specs):
        v = f"v{i}"
        body: list[str] = []
        inline = _INLINE_INTS.get((c.type_code, c.unsigned))
        if inline is not None:
            code, size = inline
            body = [code.format(v=v), f"off += {size}"]
        elif c.type_code == TINY:  # signed
            body = [f"{v} = buf[off]", f"if {v} > 127: {v} -= 256", "off += 1"]
        elif c.type_code in (VARCHAR, VAR_STRING) and c.charset is not None and c.max_length < 256:
            env[f"c{i}"] = c.charset
            body = [
                "ln = buf[off]",
                f"{v} = buf[off + 1:off + 1 + ln].decode(c{i})",
                "off += 1 + ln",
            ]
        elif c.type_code in (VARCHAR, VAR_STRING) and c.charset is not None:
            env[f"c{i}"] = c.charset
            body = [
                "ln = buf[off] | buf[off + 1] << 8",
                f"{v} = buf[off + 2:off + 2 + ln].decode(c{i})",
                "off += 2 + ln",
            ]
        elif (call := _c_call(c)) is not None:
            # C straight from the decoder (no reader frame); the reader for what C
            # leaves (None: past the end, out of range; a value of None: a zero date)
            env[f"r{i}"] = readers[i]
            body = [
                f"t = {call}",
                f"{v}, off = t if t is not None and t[0] is not None else r{i}(buf, off)",
            ]
        else:
            env[f"r{i}"] = readers[i]
            body = [f"{v}, off = r{i}(buf, off)"]
        if c.nullable:
            lines.append(f"    if nulls >> {i} & 1:")
            lines.append(f"        {v} = None")
            lines.append("    else:")
            lines.extend("        " + b for b in body)
        else:
            lines.extend("    " + b for b in body)
    values = ", ".join(f"v{i}" for i in range(n))
    lines.append(f"    return ({values}{',' if n == 1 else ''}), off")
    exec(compile("\n".join(lines), "<binlog row decoder>", "exec"), env)
    decode: Callable[[bytes, int], tuple[Row, int]] = env["decode"]
    return decode
