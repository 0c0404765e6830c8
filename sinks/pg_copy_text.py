"""COPY text format from rows of PostgreSQL text values (``Batch.pg_text``).

A text value of PostgreSQL never holds a NUL byte, so a batch is first joined with
NUL-led markers for field ends, NULLs and row ends, escaped in four C-speed passes
over the whole buffer, and the markers turned into tabs, ``\\N`` and newlines last:
no Python work per value beyond the join. The C twin (``cdc/_speedups.c``) is used
when built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

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
