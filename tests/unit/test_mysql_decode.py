"""Binlog value decoding (dataflare.cdc.mysql.decode) against reference encoders."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from dataflare.cdc import _speedups
from dataflare.cdc.mysql import decode
from dataflare.cdc.mysql.decode import _decimal_reader, _time2_reader
from hypothesis import given, settings
from hypothesis import strategies as st

_DIG2 = (0, 1, 1, 2, 2, 3, 3, 4, 4, 4)


def encode_decimal(d: Decimal, p: int, s: int) -> bytes:
    """MySQL decimal2bin."""
    neg = d.is_signed()
    ip, _, fp = format(d.copy_abs(), f".{s}f").partition(".")
    intg = p - s
    ip = ip.rjust(intg, "0")[-intg:] if intg else ""
    i0, i0x = divmod(intg, 9)
    out = int(ip[:i0x]).to_bytes(_DIG2[i0x], "big") if i0x else b""
    for k in range(i0):
        out += int(ip[i0x + 9 * k : i0x + 9 * k + 9]).to_bytes(4, "big")
    f0, f0x = divmod(s, 9)
    for k in range(f0):
        out += int(fp[9 * k : 9 * k + 9]).to_bytes(4, "big")
    if f0x:
        out += int(fp[9 * f0 :]).to_bytes(_DIG2[f0x], "big")
    b = bytearray(out)
    if neg:
        b = bytearray(x ^ 0xFF for x in b)
    b[0] ^= 0x80
    return bytes(b)


@st.composite
def decimals(draw: st.DrawFn) -> tuple[Decimal, int, int]:
    p = draw(st.integers(1, 65))
    s = draw(st.integers(0, min(p, 38)))  # MariaDB allows a scale up to 38
    ip = draw(st.integers(0, 10 ** (p - s) - 1)) if p > s else 0
    fp = draw(st.integers(0, 10**s - 1)) if s else 0
    sign = "-" if draw(st.booleans()) else ""
    text = f"{sign}{ip}" + (f".{fp:0{s}d}" if s else "")
    return Decimal(text), p, s


@given(decimals())
def test_decimal_roundtrip(case: tuple[Decimal, int, int]) -> None:
    d, p, s = case
    raw = encode_decimal(d, p, s)
    value, end = _decimal_reader(p, s)(b"xx" + raw + b"yy", 2)
    assert value == d and end == 2 + len(raw)
    assert value.as_tuple().exponent == -s  # the scale is kept


def outcome(read: Any, buf: bytes, off: int) -> Any:
    try:
        return repr(read(buf, off))  # repr: Decimal('-0.00') is not Decimal('0.00')
    except Exception as e:
        return type(e).__name__


def test_decimal_without_integer_digits_and_scale_above_30() -> None:
    """DECIMAL(5,5) negatives (no integer digit before the point) and MariaDB's
    scales 31-38 read as the Python reader reads them."""
    for d, p, s in [
        (Decimal("-0.12345"), 5, 5),
        (Decimal("0.00000"), 5, 5),
        (Decimal("-1." + "7" * 37), 38, 37),
        (Decimal("12345678901234567890123456." + "9" * 38), 64, 38),
        (Decimal("-" + "0." + "0" * 37 + "1"), 38, 38),
    ]:
        raw = encode_decimal(d, p, s)
        got = _decimal_reader(p, s)(raw, 0)
        assert repr(got) == repr(decode._py_decimal_reader(p, s)(raw, 0)) == repr((d, len(raw)))


def test_the_c_readers_are_in_use() -> None:
    assert decode._c_decimal is _speedups.my_decimal
    assert decode._c_datetime2 is _speedups.my_datetime2


@given(decimals(), st.binary(max_size=3))
def test_decimal_c_and_python_agree(case: tuple[Decimal, int, int], head: bytes) -> None:
    d, p, s = case
    buf = head + encode_decimal(d, p, s)
    got = _speedups.my_decimal(buf, len(head), p, s)
    assert got is not None and repr(got) == repr(decode._py_decimal_reader(p, s)(buf, len(head)))
    for cut in range(len(head), len(buf)):  # past the end: the Python reader decides
        assert _speedups.my_decimal(buf[:cut], len(head), p, s) is None


@settings(max_examples=300)
@given(st.integers(1, 65), st.data(), st.binary(max_size=40), st.integers(0, 4))
def test_decimal_readers_agree_on_any_bytes(p: int, data: Any, buf: bytes, off: int) -> None:
    s = data.draw(st.integers(0, min(p, 38)))
    fast = _decimal_reader(p, s)
    assert outcome(fast, buf, off) == outcome(decode._py_decimal_reader(p, s), buf, off)


def encode_datetime2(v: datetime, fsp: int) -> bytes:
    """MySQL's DATETIME2: 40 bits of packed fields + 0x8000000000, then the fraction."""
    ym = v.year * 13 + v.month
    packed = ym << 22 | v.day << 17 | v.hour << 12 | v.minute << 6 | v.second
    nfrac = (fsp + 1) // 2
    frac = v.microsecond // (1, 10_000, 100, 1)[nfrac]
    return (packed + 0x8000000000).to_bytes(5, "big") + frac.to_bytes(nfrac, "big")


@given(st.datetimes(), st.integers(0, 6))
def test_datetime2_c_and_python_agree(v: datetime, fsp: int) -> None:
    v = v.replace(microsecond=v.microsecond // 10 ** (6 - fsp) * 10 ** (6 - fsp))
    buf = b"x" + encode_datetime2(v, fsp)
    got = _speedups.my_datetime2(buf, 1, fsp)
    assert got == (v, len(buf))
    assert decode._datetime2_reader(fsp, "error", "c")(buf, 1) == got
    assert decode._py_datetime2_reader(fsp, "error", "c")(buf, 1) == got


@settings(max_examples=300)
@given(
    st.binary(max_size=12), st.integers(0, 3), st.integers(0, 6), st.sampled_from(["null", "error"])
)
def test_datetime2_readers_agree_on_any_bytes(buf: bytes, off: int, fsp: int, policy: Any) -> None:
    fast = decode._datetime2_reader(fsp, policy, "c")
    assert outcome(fast, buf, off) == outcome(
        decode._py_datetime2_reader(fsp, policy, "c"), buf, off
    )


def test_zero_datetime_follows_the_policy() -> None:
    zero = (0x8000000000).to_bytes(5, "big")
    assert _speedups.my_datetime2(zero, 0, 0) == (None, 5)
    assert decode._datetime2_reader(0, "null", "c")(zero, 0) == (None, 5)
    try:
        decode._datetime2_reader(0, "error", "c")(zero, 0)
    except decode.DecodeError as e:
        assert "zero_dates: null" in str(e)
    else:
        raise AssertionError("a zero date passed under zero_dates: error")


def encode_time2(us_total: int) -> bytes:
    """MySQL my_time_packed_to_binary for TIME2 with 6 fractional digits."""
    a = abs(us_total)
    sec, us = divmod(a, 1_000_000)
    h, rem = divmod(sec, 3600)
    m, s = divmod(rem, 60)
    packed = ((h << 12) | (m << 6) | s) << 24 | us
    if us_total < 0:
        packed = -packed
    return (packed + 0x800000000000).to_bytes(6, "big")


def test_time2_negative_and_beyond_a_day() -> None:
    from datetime import timedelta

    r = _time2_reader(6)
    for us in (0, 1, -1, 90_000_000_000, -(838 * 3600 + 59 * 60 + 59) * 1_000_000, -500_000):
        value, _ = r(encode_time2(us), 0)
        assert value == timedelta(microseconds=us)


def test_generated_row_decoder_matches_the_generic_loop() -> None:
    import struct

    from dataflare.cdc.mysql.decode import LONG, LONGLONG, TINY, VARCHAR, ColumnSpec, Layout

    specs = [
        ColumnSpec("id", LONGLONG, nullable=False),
        ColumnSpec("s", VARCHAR, max_length=160, charset="utf8"),
        ColumnSpec("t", TINY),
        ColumnSpec("u", TINY, unsigned=True),
        ColumnSpec("x", LONG),
    ]
    layout = Layout(specs, (0,))
    for nulls in (0, 2, 4 | 16, 30):
        raw = bytes([nulls]) + struct.pack("<q", -5)
        if not nulls & 2:
            raw += bytes([6]) + "héllo".encode()
        if not nulls & 4:
            raw += struct.pack("<b", -3)
        if not nulls & 8:
            raw += struct.pack("<B", 250)
        if not nulls & 16:
            raw += struct.pack("<i", -70000)
        assert layout._decode_full(raw, 0) == layout._decode_full_loop(raw, 0)
        assert layout._decode_full(raw, 0)[1] == len(raw)


@given(
    st.integers(0, 15),
    st.text(max_size=90),
    decimals(),
    st.datetimes(),
    st.booleans(),
)
def test_generated_decoder_with_c_readers_matches_the_generic_loop(
    nulls: int, text: str, dec: tuple[Decimal, int, int], when: datetime, zero: bool
) -> None:
    """Long strings (2-byte length), DECIMAL and DATETIME(6) inline in the
    generated decoder (C readers) read what the per-column readers read; a zero
    datetime goes through its reader's policy."""
    import struct

    from dataflare.cdc.mysql.decode import (
        DATETIME2,
        LONGLONG,
        NEWDECIMAL,
        VARCHAR,
        ColumnSpec,
        Layout,
    )

    d, p, s = dec
    specs = [
        ColumnSpec("id", LONGLONG, nullable=False),
        ColumnSpec("s", VARCHAR, max_length=400, charset="utf8"),
        ColumnSpec("n", NEWDECIMAL, precision=p, decimals=s),
        ColumnSpec("at", DATETIME2, fsp=6),
        ColumnSpec("t", VARCHAR, max_length=40, charset="utf8"),
    ]
    layout = Layout(specs, (0,))
    raw = bytes([nulls << 1]) + struct.pack("<q", 7)
    if not nulls & 1:
        b = text.encode()
        raw += struct.pack("<H", len(b)) + b
    if not nulls & 2:
        raw += encode_decimal(d, p, s)
    if not nulls & 4:
        raw += (0x8000000000).to_bytes(5, "big") + bytes(3) if zero else encode_datetime2(when, 6)
    if not nulls & 8:
        raw += bytes([2]) + b"ok"
    got = layout._decode_full(raw, 0)
    assert repr(got) == repr(layout._decode_full_loop(raw, 0))
    assert got[1] == len(raw)
    assert got[0][1] == (None if nulls & 1 else text)
    assert got[0][3] == (None if nulls & 4 or zero else when)
