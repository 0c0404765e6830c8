"""COPY text format from rows of PostgreSQL text values (``Batch.pg_text``).

A text value of PostgreSQL never holds a NUL byte, so a batch is first joined with
NUL-led markers for field ends, NULLs and row ends, escaped in four C-speed passes
over the whole buffer, and the markers turned into tabs, ``\\N`` and newlines last:
no Python work per value beyond the join. The C twin (``cdc/_speedups.c``) is used
when built.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from dataflare.cdc.postgres.pgoutput import _py_tuple_at

_FIELD, _NULL, _ROW = b"\x00\x01", b"\x00\x02", b"\x00\x03"
_ESCAPES = ((b"\\", b"\\\\"), (b"\t", b"\\t"), (b"\n", b"\\n"), (b"\r", b"\\r"))


def py_copy_text(rows: Iterable[Sequence[Any]]) -> bytes:
    """The rows (of bytes and None) as COPY text data, each line ending in a newline."""
    null, join = _NULL, _FIELD.join
    lines = [
        join(r) if None not in r else join([null if v is None else v for v in r]) for r in rows
    ]
    if not lines:
        return b""
    buf = _ROW.join(lines)
    for raw, escaped in _ESCAPES:
        if raw in buf:
            buf = buf.replace(raw, escaped)
    return buf.replace(_FIELD, b"\t").replace(_NULL, b"\\N").replace(_ROW, b"\n") + b"\n"


copy_text: Callable[[Sequence[Sequence[Any]]], bytes]
try:
    from dataflare.cdc._speedups import copy_text
except ImportError:  # not built: the pure-Python twin
    copy_text = py_copy_text


_NOT_SENT = object()  # a TOAST value not sent ('u'): such a row is not a whole row


def py_packed_copy(
    messages: Sequence[Any], relid: int, ncols: int, key_idx: tuple[int, ...], kind: bytes | None
) -> bytes | None:
    """COPY text straight from pgoutput row messages (``Batch.packed``), no change
    objects between: Inserts of relation ``relid``, or with ``kind`` (a field added
    to each row: the staging table's) Inserts and Updates carrying only a new row,
    each key at most once. None when the messages are anything else (the caller
    then takes the general path). The C twin (``cdc/_speedups.c``) is used when
    built."""
    if not 0 < ncols <= 0x7FFF:
        return None
    rows: list[tuple[Any, ...]] = []
    seen: set[tuple[Any, ...]] = set()
    for m in messages:
        if type(m) is not bytes or len(m) < 8 or m[5] != 0x4E:  # 'N': only a new row
            return None
        if not (m[0] == 0x49 or (m[0] == 0x55 and kind is not None)):
            return None
        if int.from_bytes(m[1:5], "big") != relid or (m[6] << 8 | m[7]) != ncols:
            return None
        try:
            values, end = _py_tuple_at(m, 6, _NOT_SENT)
        except (IndexError, ValueError, struct.error):
            return None
        if end != len(m) or _NOT_SENT in values:
            return None
        if kind is not None:
            if any(not 0 <= i < ncols for i in key_idx):
                return None
            key = tuple([values[i] for i in key_idx])
            if key in seen:
                return None
            seen.add(key)
            values = (*values, kind)
        rows.append(values)
    return py_copy_text(rows)


packed_copy: Callable[[Sequence[Any], int, int, tuple[int, ...], bytes | None], bytes | None]
try:
    from dataflare.cdc._speedups import packed_copy
except ImportError:  # not built: the pure-Python twin
    packed_copy = py_packed_copy
