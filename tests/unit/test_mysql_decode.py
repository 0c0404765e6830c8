"""Binlog value decoding (dataflare.cdc.mysql.decode) against reference encoders."""

from __future__ import annotations

from decimal import Decimal

from dataflare.cdc.mysql.decode import _decimal_reader, _time2_reader
from hypothesis import given
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
    s = draw(st.integers(0, min(p, 30)))
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
