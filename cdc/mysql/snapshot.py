"""Consistent initial snapshot of MySQL/MariaDB tables, chunked by primary key.

MariaDB: ``START TRANSACTION WITH CONSISTENT SNAPSHOT`` then ``SHOW STATUS LIKE
'binlog_snapshot_%'`` gives the binlog file and position the read view corresponds
to, without any lock (only SELECT is needed). MySQL: a brief ``FLUSH TABLES WITH
READ LOCK`` around opening the read view and ``SHOW MASTER STATUS``.

Each table is read in primary-key order, ``snapshot_chunk_size`` rows per query
(``WHERE (pk) > (last) ORDER BY pk LIMIT n``) inside that one transaction. Values
are normalised to what the binlog decoder produces (TIMESTAMP as aware UTC, BIT as
int, SET as comma-joined text, zero dates as None or an error).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Column, Row, TableId, TableSchema
from dataflare.cdc.mysql.binlog import connect
from dataflare.cdc.mysql.decode import DecodeError, ZeroDates

_INT_WIDTH = re.compile(r"^(tinyint|smallint|mediumint|int|bigint|year)\(\d+\)")


def quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def normalise_type(column_type: str) -> str:
    """information_schema COLUMN_TYPE -> the binlog decoder's type name."""
    return _INT_WIDTH.sub(r"\1", column_type.lower())


@dataclass(frozen=True)
class SnapshotTable:
    schema: TableSchema
    kinds: tuple[str, ...]  # DATA_TYPE per column


class Snapshot:
    """One consistent read view; tables are read chunk by chunk."""

    def __init__(
        self,
        settings: dict[str, Any],
        is_mariadb: bool,
        zero_dates: ZeroDates,
        binlog_point: bool = True,
    ) -> None:
        self.conn = connect(settings, autocommit=False, read_timeout=600)
        self.zero_dates = zero_dates
        cur = self.conn.cursor()
        cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        self.file, self.pos = "", 0
        if not binlog_point:  # a plain read view (a table re-read after ALTER TABLE)
            cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            cur.close()
            return
        if is_mariadb:
            cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            cur.execute("SHOW STATUS LIKE 'binlog_snapshot_%'")
            status = {str(k).lower(): str(v) for k, v in cur.fetchall()}
            self.file = status.get("binlog_snapshot_file", "")
            self.pos = int(status.get("binlog_snapshot_position", "0"))
        else:
            cur.execute("FLUSH TABLES WITH READ LOCK")
            try:
                cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                try:
                    cur.execute("SHOW BINARY LOG STATUS")
                except Exception:
                    cur.execute("SHOW MASTER STATUS")
                row = cur.fetchone()
                self.file, self.pos = str(row[0]), int(row[1])
            finally:
                cur.execute("UNLOCK TABLES")
        cur.close()
        if not self.file:
            raise FatalError("the server did not report a binlog position for the snapshot")

    def describe(self, table: TableId) -> SnapshotTable:
        cur = self.conn.cursor()
        cur.execute(
            "SELECT COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, DATA_TYPE, COLUMN_KEY "
            "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s "
            "ORDER BY ORDINAL_POSITION",
            (table.schema, table.name),
        )
        rows = cur.fetchall()
        if not rows:
            raise FatalError(f"table {table} does not exist (or the user cannot see it)")
        cur.execute(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s AND CONSTRAINT_NAME = 'PRIMARY' "
            "ORDER BY ORDINAL_POSITION",
            (table.schema, table.name),
        )
        key = tuple(str(r[0]) for r in cur.fetchall())
        cur.close()
        columns = tuple(
            Column(str(r[0]), normalise_type(str(r[1])), str(r[2]) == "YES") for r in rows
        )
        return SnapshotTable(TableSchema(table, columns, key), tuple(str(r[3]) for r in rows))

    def chunks(
        self, st: SnapshotTable, after: tuple[Any, ...] | None, size: int
    ) -> Iterator[list[Row]]:
        """Rows in key order after ``after``, ``size`` at a time."""
        schema = st.schema
        cols = ", ".join(quote(c.name) for c in schema.columns)
        name = f"{quote(schema.table.schema)}.{quote(schema.table.name)}"
        fix = self._fixers(st)
        if not schema.key:
            if after is not None:
                return
            cur = self.conn.cursor()
            cur.execute(f"SELECT {cols} FROM {name}")
            while True:
                part = cur.fetchmany(size)
                if not part:
                    break
                yield [self._row(r, fix) for r in part]
            cur.close()
            return
        keys = ", ".join(quote(k) for k in schema.key)
        idx = schema.key_indexes()
        while True:
            cur = self.conn.cursor()
            if after is None:
                cur.execute(f"SELECT {cols} FROM {name} ORDER BY {keys} LIMIT {int(size)}")
            else:
                marks = ", ".join(["%s"] * len(schema.key))
                cur.execute(
                    f"SELECT {cols} FROM {name} WHERE ({keys}) > ({marks}) "
                    f"ORDER BY {keys} LIMIT {int(size)}",
                    list(after),
                )
            raw = cur.fetchall()
            cur.close()
            if not raw:
                return
            # The key for the next query is taken from the raw (driver) values.
            after = tuple(raw[-1][i] for i in idx)
            yield [self._row(r, fix) for r in raw]
            if len(raw) < size:
                return

    def _fixers(self, st: SnapshotTable) -> list[Any]:
        policy = self.zero_dates
        out: list[Any] = []
        for col, kind in zip(st.schema.columns, st.kinds, strict=True):
            if kind == "timestamp":
                out.append(lambda v, c=col.name: _ts(v, policy, c))
            elif kind in ("datetime", "date"):
                out.append(lambda v, c=col.name: _dt(v, policy, c))
            elif kind == "bit":
                out.append(lambda v: int.from_bytes(v, "big") if isinstance(v, bytes) else v)
            elif kind == "set":
                out.append(lambda v: ",".join(sorted(v)) if isinstance(v, (set, frozenset)) else v)
            else:
                out.append(None)
        return out

    @staticmethod
    def _row(raw: Sequence[Any], fix: list[Any]) -> Row:
        return tuple(v if f is None or v is None else f(v) for v, f in zip(raw, fix, strict=True))

    def close(self) -> None:
        try:
            self.conn.rollback()
            self.conn.close()
        except Exception:
            pass


def _zero(policy: ZeroDates, col: str) -> None:
    if policy == "error":
        raise DecodeError(
            f"column {col}: zero or invalid date in the snapshot; set zero_dates: null to "
            "replicate it as NULL"
        )


def _ts(v: Any, policy: ZeroDates, col: str) -> Any:
    if isinstance(v, datetime):
        return v.replace(tzinfo=UTC)
    _zero(policy, col)  # '0000-00-00 00:00:00' comes back as text
    return None


def _dt(v: Any, policy: ZeroDates, col: str) -> Any:
    if isinstance(v, (datetime, date)):
        return v
    _zero(policy, col)
    return None
