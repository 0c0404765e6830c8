"""Row changes that cross the ring as the pgoutput messages they arrived in.

When every destination takes rows of PostgreSQL text (``Batch.pg_text``), the source
does not decode Insert/Update/Delete messages at all: it keeps each message's bytes
with its relation and transaction (:class:`PackedRows`), the ring carries them as a
few msgpack bins, and the apply process turns them into changes here. One decode per
row instead of a decode, an encode and a decode again; and no value is loaded.

Payload: ``[[[relid, table_index], ...], blob]`` where ``blob`` is msgpack of
``[[position_value, position_tag, xid, commit_ts_us, [message, ...]], ...]``; a
message is the pgoutput bytes of an Insert, Update or Delete, or, for a truncated
table, its relid. Messages are split into values by ``pgoutput.decode_rows`` (C),
a transaction per call.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import msgpack
from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Change, Op, Position, TableId, TableSchema
from dataflare.cdc.postgres.pgoutput import PgoutputError, decode, decode_rows

DECODER = "pgoutput"
KIND = "postgres"
_NONE: frozenset[str] = frozenset()
_new = tuple.__new__  # Change is a NamedTuple: skip its Python-level __new__


def _corrupt(detail: str) -> FatalError:
    return FatalError(f"corrupt batch frame: packed pgoutput changes: {detail}")


def pack(relids: list[list[int]], txns: list[list[Any]]) -> list[Any]:
    """The payload of :class:`~dataflare.cdc.model.Packed` for the source's records."""
    return [relids, msgpack.packb(txns)]


def array_header(n: int) -> bytes:
    """msgpack's header of an array of ``n`` elements."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def bin_header(n: int) -> bytes:
    """msgpack's header of a bin of ``n`` bytes."""
    if n < 0x100:
        return bytes((0xC4, n))
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def encoded_txn(value: int, tag: str, xid: int | None, ts: int | None, count: int) -> bytes:
    """The msgpack of a transaction ``[value, tag, xid, ts, [message, ...]]`` up to its
    ``count`` messages, which follow it already encoded (the source encodes each
    where it arrives): pack()'s encoding, built in pieces."""
    fields: bytes = msgpack.packb([value, tag, xid, ts])
    return b"\x95" + fields[1:] + array_header(count)


def pack_encoded(
    relids: list[list[int]], txns: Sequence[tuple[bytes, bytes | bytearray]]
) -> list[Any]:
    """pack()'s payload from transactions already encoded: (encoded_txn header,
    its messages) each."""
    return [relids, b"".join((array_header(len(txns)), *itertools.chain.from_iterable(txns)))]


def _split(payload: Any, schemas: Sequence[TableSchema]) -> tuple[list[Any], Any]:
    """(relid, layout) of each relation of a payload, and its transactions."""
    if type(payload) is not list or len(payload) != 2 or type(payload[1]) is not bytes:
        raise _corrupt("payload is not [relations, bytes]")
    raw_rels, blob = payload
    if type(raw_rels) is not list:
        raise _corrupt("bad relations")
    rels = []
    for item in raw_rels:
        if type(item) is not list or len(item) != 2 or type(item[1]) is not int:
            raise _corrupt("bad relation entry")
        relid, ti = item
        if not 0 <= ti < len(schemas):
            raise _corrupt(f"relation {relid} names no table layout of the batch")
        rels.append((relid, schemas[ti]))
    try:
        txns = msgpack.unpackb(blob, use_list=False)
    except Exception as e:
        raise _corrupt(f"bad records ({type(e).__name__})") from None
    return rels, txns


def packed_rows(
    payload: Any, schemas: Sequence[TableSchema]
) -> tuple[TableSchema, int, list[Any]] | None:
    """(layout, relid, messages of every transaction in order) of a payload whose
    changes all belong to one relation; None for several relations, or anything
    malformed (:func:`unpack_changes` then says what)."""
    try:
        rels, txns = _split(payload, schemas)
    except FatalError:
        return None
    if len(rels) != 1 or type(rels[0][0]) is not int or type(txns) is not tuple:
        return None
    messages: list[Any] = []
    for txn in txns:
        if type(txn) is not tuple or len(txn) != 5 or type(txn[4]) is not tuple:
            return None
        messages.extend(txn[4])
    ((relid, schema),) = rels
    return schema, relid, messages


def _records(msgs: tuple[Any, ...]) -> list[Any]:
    """Row records of a transaction's messages (relids of truncates stay ints)."""
    try:
        if all(type(m) is bytes for m in msgs):
            return decode_rows(msgs, False)
        return [m if type(m) is int else decode_rows((m,), False)[0] for m in msgs]
    except (ValueError, TypeError):
        for m in msgs:  # say what is wrong with the first bad message
            if type(m) is not int:
                try:
                    decode(m)
                except PgoutputError as e:
                    raise _corrupt(str(e)) from None
        raise _corrupt("a message is not a row change") from None


def unpack_changes(payload: Any, schemas: Sequence[TableSchema]) -> list[Change]:
    """The changes of a packed payload, rows as PostgreSQL text (``Batch.pg_text``)."""
    raw_rels, txns = _split(payload, schemas)
    # relid -> (table, key indexes, column names, the key's index if it has one column)
    rels: dict[int, tuple[TableId, tuple[int, ...], tuple[str, ...], int]] = {}
    for relid, s in raw_rels:
        kidx = s.key_indexes()
        rels[relid] = (s.table, kidx, s.column_names, kidx[0] if len(kidx) == 1 else -1)
    out: list[Change] = []
    append = out.append
    insert, update, delete = Op.INSERT, Op.UPDATE, Op.DELETE
    for txn in txns:
        value, tag, xid, ts, msgs = txn
        if type(value) is not int or type(tag) is not str or type(msgs) is not tuple:
            raise _corrupt("bad transaction")
        if (xid is not None and type(xid) is not int) or (ts is not None and type(ts) is not int):
            raise _corrupt("bad xid or commit timestamp")
        pos = Position(KIND, value, tag)
        for rec in _records(msgs):
            if type(rec) is int:
                rel = rels.get(rec)
                if rel is None:
                    raise _corrupt(f"truncate of unknown relation {rec}")
                append(Change(Op.TRUNCATE, rel[0], pos, xid=xid, commit_ts_us=ts))
                continue
            rtag, relid, before, after = rec
            rel = rels.get(relid)
            if rel is None:
                raise _corrupt(f"a change of relation {relid}, which the batch does not describe")
            table, kidx, names, k0 = rel
            unchanged = _NONE
            if rtag == 0x49:
                if k0 >= 0:  # the bulk of a stream: an insert into a table with a 1-column key
                    entry = (insert, table, pos, (after[k0],), None, after, _NONE, xid, ts)
                    append(_new(Change, entry))
                    continue
                op = insert
            elif rtag == 0x55:
                op = update
                if False in after:  # unchanged TOAST values: None, and named
                    unchanged = frozenset(names[i] for i, v in enumerate(after) if v is False)
                    after = tuple([None if v is False else v for v in after])
            else:
                op = delete
            if before is not None and False in before:  # an old value not sent: unknown
                before = tuple([None if v is False else v for v in before])
            row = after if after is not None else before
            key = tuple([row[i] for i in kidx]) if (kidx and row is not None) else None
            append(_new(Change, (op, table, pos, key, before, after, unchanged, xid, ts)))
    return out
