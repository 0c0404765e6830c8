"""The change model: what every source produces and every sink consumes.

Rows are tuples aligned with their table's column list; the layout (names, types,
key) travels in-band as a :class:`TableSchema` so a consumer never guesses it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

Row = tuple[Any, ...]


class Op(enum.StrEnum):
    INSERT = "c"
    UPDATE = "u"
    DELETE = "d"
    READ = "r"  # a row of the initial snapshot
    TRUNCATE = "t"


@dataclass(frozen=True, order=True, slots=True)
class TableId:
    schema: str  # Postgres schema or MySQL database
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """A point in one source's change stream.

    ``value`` orders positions of one source (Postgres LSN, binlog offset, generator
    sequence); ``tag`` carries what cannot be ordered as an int (a GTID set, a binlog
    file name) and takes no part in comparisons.
    """

    kind: str
    value: int
    tag: str = field(default="", compare=False)

    def __str__(self) -> str:
        if self.kind == "postgres":
            return f"{self.value >> 32:X}/{self.value & 0xFFFFFFFF:X}"
        return f"{self.value}" + (f" {self.tag}" if self.tag else "")


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_name: str  # the source's type name, e.g. "numeric(10,2)", "bigint", "varchar(20)"
    nullable: bool = True
    type_oid: int = 0  # Postgres type OID where known


@dataclass(frozen=True, slots=True)
class TableSchema:
    table: TableId
    columns: tuple[Column, ...]
    key: tuple[str, ...]  # primary-key column names; empty for REPLICA IDENTITY FULL tables
    version: int = 1  # bumped by the source on every layout change

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def key_indexes(self) -> tuple[int, ...]:
        names = self.column_names
        return tuple(names.index(k) for k in self.key)


class Change(NamedTuple):
    """One row change. A NamedTuple, not a dataclass: millions are made per minute
    and a tuple is several times cheaper to build (and still immutable)."""

    op: Op
    table: TableId
    position: Position
    key: Row | None = None  # key values in TableSchema.key order
    before: Row | None = None  # old row (full, or only key columns with others None)
    after: Row | None = None  # new row
    unchanged: frozenset[str] = frozenset()  # columns not sent (unchanged TOAST values)
    xid: int | None = None
    commit_ts_us: int | None = None  # commit time, microseconds since the Unix epoch


@dataclass(slots=True)
class Packed:
    """Changes still in their source's wire form, decoded by the process that
    receives the batch (see ``cdc.postgres.packed``): ``decoder`` names the format,
    ``payload`` is msgpack-able, ``counts`` tallies changes per (table, op)."""

    decoder: str
    count: int
    payload: Any
    counts: dict[tuple[TableId, Op], int] = field(default_factory=dict)


@dataclass(slots=True)
class Batch:
    """Changes of one or more whole source transactions, or part of a large one.

    ``complete`` is False when the batch ends inside a transaction: a sink may apply
    it but must not checkpoint ``last`` until a complete batch arrives.
    """

    changes: list[Change]
    schemas: list[TableSchema]  # layouts of every table the batch touches
    first: Position
    last: Position
    complete: bool = True
    # A dead letter sent again (``dataflare dlq replay``): a token unique to it. Its
    # old changes are applied although the checkpoint is past them, under ids of
    # their own (``<change id>:replay:<token>``), without touching per-transaction
    # ordinals.
    replay: str = ""
    # Tables whose rows (key, before, after) hold each value as the bytes of its
    # PostgreSQL text output rather than a Python value, mapped to the type OIDs the
    # values load as. A postgres source sends rows so when every destination writes
    # them as they are (text COPY); ``cdc.postgres.text_rows.materialize`` turns them
    # into values for anything else.
    pg_text: dict[TableId, tuple[int, ...]] = field(default_factory=dict)
    # Set by a source instead of ``changes`` (left empty): decoded on the ring's far
    # side, where the batch arrives with ``changes`` filled.
    packed: Packed | None = None

    def __len__(self) -> int:
        return self.packed.count if self.packed is not None else len(self.changes)

    def __iter__(self) -> Iterator[Change]:
        return iter(self.changes)

    def schema_map(self) -> dict[TableId, TableSchema]:
        return {s.table: s for s in self.schemas}


def row_dict(schema: TableSchema, row: Sequence[Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return dict(zip(schema.column_names, row, strict=True))
