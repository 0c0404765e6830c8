"""Positions of the `mysql` source: pure functions, no driver.

A stream position is the end of a transaction's commit event (XID, or the COMMIT /
DDL query event) in the binlog::

    Position("mysql", value=(file_index << 32) | end_pos,
             tag="mysql-bin.000003:1234 gtid=0-1-57 server_id=1")

``file_index`` is the numeric extension of the binlog file name, so values order
positions across file rotations. The tag keeps what the value cannot: the file
name, the transaction's GTID (MariaDB ``domain-server-seq`` or MySQL ``uuid:n``)
and the identity of the server (``server_id``, and ``server_uuid`` on MySQL) that
was read, checked on every resume.

Initial-snapshot chunks get positions just below the snapshot's binlog point P0,
``value = P0 - 2**32 + k`` for chunk ``k`` (1, 2, ...), with a tag
``snapshot <file>:<pos> server_id=<id> table=<i> after=<base64 msgpack of the
last key>``; the final snapshot batch is checkpointed at P0 itself, so the stream
resumes exactly there. A destination's checkpoint therefore says how far the
snapshot got, and a restart resumes the snapshot after the last applied chunk.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from dataflare.cdc.codec import packb, unpackb
from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Position

KIND = "mysql"
SNAPSHOT_SPAN = 1 << 32


def file_index(file: str) -> int:
    try:
        return int(file.rsplit(".", 1)[1])
    except (IndexError, ValueError):
        raise FatalError(f"unexpected binlog file name {file!r}") from None


def identity(server_id: int, server_uuid: str = "") -> str:
    return f"server_id={server_id}" + (f" server_uuid={server_uuid}" if server_uuid else "")


def stream_position(file: str, end: int, gtid: str, ident: str) -> Position:
    tag = f"{file}:{end}" + (f" gtid={gtid}" if gtid else "") + f" {ident}"
    return Position(KIND, (file_index(file) << 32) | end, tag)


@dataclass(frozen=True, slots=True)
class Parsed:
    file: str
    pos: int
    server_id: int | None
    server_uuid: str
    gtid: str
    snapshot: bool = False
    table: int = 0  # snapshot: index of the table in progress
    after: tuple[Any, ...] | None = None  # snapshot: last key applied in that table
    chunk: int = 0  # snapshot: chunk number of this position


def snapshot_position(
    file: str, pos: int, ident: str, chunk: int, table: int, after: tuple[Any, ...] | None
) -> Position:
    base = ((file_index(file) << 32) | pos) - SNAPSHOT_SPAN
    key = "-" if after is None else base64.b64encode(packb(list(after))).decode("ascii")
    return Position(KIND, base + chunk, f"snapshot {file}:{pos} {ident} table={table} after={key}")


def parse(p: Position) -> Parsed:
    if p.kind != KIND:
        raise FatalError(f"cannot resume a mysql source from a {p.kind} position ({p})")
    words = p.tag.split()
    snapshot = bool(words) and words[0] == "snapshot"
    if snapshot:
        words = words[1:]
    if not words or ":" not in words[0]:
        raise FatalError(f"mysql position {p} has no binlog file:pos in its tag")
    file, _, pos_s = words[0].rpartition(":")
    fields = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    sid = int(fields["server_id"]) if "server_id" in fields else None
    after: tuple[Any, ...] | None = None
    if snapshot and fields.get("after", "-") != "-":
        after = tuple(unpackb(base64.b64decode(fields["after"])))
    chunk = 0
    if snapshot:
        chunk = p.value - (((file_index(file) << 32) | int(pos_s)) - SNAPSHOT_SPAN)
    return Parsed(
        file=file,
        pos=int(pos_s),
        server_id=sid,
        server_uuid=fields.get("server_uuid", ""),
        gtid=fields.get("gtid", ""),
        snapshot=snapshot,
        table=int(fields.get("table", "0")),
        after=after,
        chunk=chunk,
    )
