"""The `mysql` destination (MySQL and MariaDB, InnoDB): upsert or append, exactly once.

Exactly-once: the checkpoint row (table ``_dataflare_checkpoints`` in the target
database) is written in the same InnoDB transaction as the data of a complete
batch; an incomplete batch (inside a large source transaction) stays in the open
transaction until the batch that completes it. A crash at any instant leaves data
and checkpoint consistent. A session lock (``GET_LOCK``) keeps two writers off one
destination.

Upsert: the batch is planned by :mod:`dataflare.sinks.sql_common` (shared with the
Postgres sink): per table, changes are coalesced by key in source order, so a key
changed several times in a batch ends in its last state; deletes are batched
``DELETE ... WHERE key IN (...)``, rows ``INSERT ... ON DUPLICATE KEY UPDATE`` in
multi-row statements. A table without primary key is mirrored as a multiset (one
row equal to the old row is updated or deleted, ``LIMIT 1``). TRUNCATE becomes
``DELETE FROM`` so it stays inside the transaction.

Append: one change-log table ``<table>_changes`` per source table (position, op,
xid, commit_ts, tag, key/before/after as JSON).

``create_tables`` creates missing databases and tables from the source layout and
adds columns a later layout has (ALTER TABLE ADD COLUMN; MySQL commits DDL
implicitly, so DDL runs before any row of the batch). Types: MySQL/MariaDB source
type names are used as they are; Postgres types are mapped (see
:func:`mysql_type` and docs/mysql.md). Identifiers are quoted with backticks
(a backtick in a name is doubled).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pymysql
from dataflare.cdc.errors import DataflareError, FatalError, RecordRefused, RetryableError
from dataflare.cdc.model import Batch, Change, Column, Op, Position, Row, TableId, TableSchema
from dataflare.sinks.base import SinkContext
from dataflare.sinks.configs import MysqlSinkConfig
from dataflare.sinks.envelope import _json_default
from dataflare.sinks.sql_common import (
    InsertRows,
    KeyedSegment,
    RowChange,
    TransactionalSqlSink,
    Truncate,
    plan_batch,
)
from loguru import logger

CHECKPOINT_TABLE = "_dataflare_checkpoints"
ROWS_PER_STATEMENT = 1000
LOCK_WAIT_S = 15
# What a change holds is refused: NULL into NOT NULL, out of range, incorrect or too
# long a value, a CHECK or foreign-key constraint.
_REFUSED_CODES = {1048, 1264, 1292, 1366, 1406, 1451, 1452, 3819, 4025}
_RETRYABLE_CODES = {
    1205,
    1213,
    2002,
    2003,
    2006,
    2013,
    2055,
    1040,
    1053,
}  # lock wait, deadlock, gone


def q(name: str) -> str:
    """A MySQL identifier in backticks (backticks doubled)."""
    return "`" + name.replace("`", "``") + "`"


# ------------------------------------------------------------------ type mapping

_PG_TYPES: dict[str, str] = {
    "smallint": "smallint",
    "int2": "smallint",
    "integer": "int",
    "int": "int",
    "int4": "int",
    "bigint": "bigint",
    "int8": "bigint",
    "real": "float",
    "float4": "float",
    "double precision": "double",
    "float8": "double",
    "boolean": "tinyint(1)",
    "bool": "tinyint(1)",
    "text": "longtext",
    "citext": "longtext",
    "bytea": "longblob",
    "date": "date",
    "uuid": "char(36)",
    "json": "json",
    "jsonb": "json",
    "inet": "varchar(43)",
    "cidr": "varchar(43)",
    "macaddr": "varchar(17)",
    "interval": "varchar(64)",
    "money": "decimal(19,2)",
    "oid": "int unsigned",
    "xml": "longtext",
}


def mysql_type(col: Column, in_key: bool, mysql_origin: bool | None = None) -> str:
    """The MySQL column type for a source column (see docs/mysql.md for the table).

    ``mysql_origin``: the layout comes from a MySQL/MariaDB source (its type names
    are used as they are); default: guessed from ``type_oid`` (Postgres sets it).
    """
    t = col.type_name.strip().lower()
    if mysql_origin is None:
        mysql_origin = col.type_oid == 0
    if mysql_origin:
        if in_key and t in ("text", "longtext", "mediumtext", "tinytext"):
            return "varchar(768)"
        if in_key and t in ("blob", "longblob", "mediumblob", "tinyblob"):
            return "varbinary(768)"
        return t
    if t.endswith("[]"):
        return "json"
    if t in _PG_TYPES:
        mapped = _PG_TYPES[t]
        if in_key and mapped == "longtext":
            return "varchar(768)"
        if in_key and mapped == "longblob":
            return "varbinary(768)"
        return mapped
    base, _, rest = t.partition("(")
    base = base.strip()
    args, _, after = rest.partition(")")
    base = f"{base} {after.strip()}".strip() if base in ("timestamp", "time") else base
    if base in ("numeric", "decimal"):
        return f"decimal({args})" if args else "decimal(65,30)"
    if base in ("character varying", "varchar"):
        return f"varchar({args})" if args else ("varchar(768)" if in_key else "longtext")
    if base in ("character", "char", "bpchar"):
        return f"char({args or 1})"
    if base in ("bit", "bit varying", "varbit"):
        return f"bit({min(int(args or 64), 64)})"
    fsp = min(int(args), 6) if args.isdigit() else 6
    if base.startswith("timestamp"):  # with or without time zone: values in UTC
        return f"datetime({fsp})"
    if base.startswith("time"):
        return f"time({fsp})"
    return "varchar(768)" if in_key else "longtext"


def _fmt_timedelta(v: timedelta) -> str:
    us = v // timedelta(microseconds=1)
    sign = "-" if us < 0 else ""
    us = abs(us)
    s, frac = divmod(us, 1_000_000)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{sign}{h:02d}:{m:02d}:{sec:02d}" + (f".{frac:06d}" if frac else "")


def to_param(v: Any) -> Any:
    """A Python value as pymysql should send it."""
    if v is None or isinstance(v, (int, str, bytes, Decimal, float)):
        return v
    if isinstance(v, datetime):
        if v.tzinfo is not None:  # TIMESTAMP / timestamptz: the session is UTC
            v = v.astimezone(UTC).replace(tzinfo=None)
        return v
    if isinstance(v, timedelta):
        return _fmt_timedelta(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=_json_default, ensure_ascii=False)
    if isinstance(v, (uuid.UUID, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(v)
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, (set, frozenset)):
        return ",".join(sorted(str(x) for x in v))
    return v


def _row(row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(to_param(v) for v in row)


# --------------------------------------------------------------- SQL literals
# pymysql's escaping is pure Python with a dispatch per value (about 6 us a value,
# the sink's main cost); rows are formatted here instead, one type lookup per value
# and str.translate for strings. The session never has NO_BACKSLASH_ESCAPES.

_ESCAPES = str.maketrans({"\0": "\\0", "\n": "\\n", "\r": "\\r", "\\": "\\\\",
                          "'": "\\'", '"': '\\"', "\x1a": "\\Z"})  # fmt: skip


def _lit_str(v: str) -> str:
    return "'" + v.translate(_ESCAPES) + "'"


def _lit_datetime(v: datetime) -> str:
    if v.tzinfo is not None:
        v = v.astimezone(UTC).replace(tzinfo=None)
    return "'" + v.isoformat(" ") + "'"


def _lit_float(v: float) -> str:
    if v != v or v in (float("inf"), float("-inf")):
        return "NULL"  # MySQL has no NaN/Infinity
    return repr(v)


_LITERALS: dict[type, Any] = {
    int: str,
    bool: lambda v: "1" if v else "0",
    str: _lit_str,
    Decimal: str,
    float: _lit_float,
    bytes: lambda v: "X'" + v.hex() + "'",
    bytearray: lambda v: "X'" + bytes(v).hex() + "'",
    memoryview: lambda v: "X'" + bytes(v).hex() + "'",
    datetime: _lit_datetime,
    timedelta: lambda v: "'" + _fmt_timedelta(v) + "'",
}


def literal(v: Any) -> str:
    """A value as a MySQL SQL literal."""
    if v is None:
        return "NULL"
    f = _LITERALS.get(type(v))
    if f is not None:
        return str(f(v))
    if isinstance(v, date):
        return "'" + v.isoformat() + "'"
    p = to_param(v)
    if type(p) is not type(v):
        return literal(p)
    return _lit_str(str(v))


def values_sql(rows: Sequence[Sequence[Any]]) -> str:
    """``(a, b), (c, d)`` for a multi-row INSERT."""
    lit = literal
    return ", ".join("(" + ", ".join([lit(v) for v in row]) + ")" for row in rows)


@dataclass
class _Table:
    schema: TableSchema
    label: str
    ident: str
    columns: set[str] = field(default_factory=set)
    insert_prefix: str = ""  # INSERT INTO t (cols) VALUES
    upsert_suffix: str = ""  # ON DUPLICATE KEY UPDATE ...


class MysqlSink(TransactionalSqlSink):
    label = "mysql destination"

    def __init__(self, name: str, config: MysqlSinkConfig, ctx: SinkContext) -> None:
        self.name = name
        self.cfg = config
        self.mode = config.mode
        self.ctx = ctx
        self._conn: Any = None
        self._checkpoints: dict[str, Position | None] = {}
        self._tables: dict[TableId, _Table] = {}
        self._layouts: dict[TableId, TableSchema] = {}
        self._partial_source: str | None = None
        self._appended: set[tuple[TableId, str]] = set()
        self._current = ""
        self.records_written = 0
        self.transactions = 0
        self.rows_missing = 0
        self.log = logger.bind(component=f"destination:{name}")

    # ------------------------------------------------------------------ connection

    def _connect(self) -> Any:
        c = self.cfg
        try:
            conn = pymysql.connect(
                host=c.host,
                port=c.port,
                user=c.user,
                password=c.password or "",
                charset="utf8mb4",
                autocommit=False,
                connect_timeout=10,
                read_timeout=600,
                write_timeout=600,
                init_command="SET time_zone = '+00:00', sql_mode = "
                "'STRICT_ALL_TABLES,NO_AUTO_VALUE_ON_ZERO,NO_ENGINE_SUBSTITUTION'",
            )
        except pymysql.err.MySQLError as e:
            raise self._failure(e, "connecting") from None
        return conn

    def _failure(self, e: Exception, doing: str) -> DataflareError:
        code = e.args[0] if e.args and isinstance(e.args[0], int) else 0
        msg = e.args[-1] if e.args else str(e)
        text = f"mysql destination {self.name}: {doing}: ({code}) {msg}"
        if code in _RETRYABLE_CODES or isinstance(e, (pymysql.err.InterfaceError, OSError)):
            return RetryableError(text)
        if isinstance(e, pymysql.err.OperationalError) and 2000 <= code < 3000:  # client errors
            return RetryableError(text)
        if code in _REFUSED_CODES or isinstance(e, pymysql.err.DataError):
            return RecordRefused(text)
        return FatalError(text)

    def _require(self) -> Any:
        if self._conn is None:
            raise RetryableError(f"mysql destination {self.name}: not connected")
        return self._conn

    def _exec(self, sql: str, args: Any = None) -> int:
        with self._require().cursor() as cur:
            return int(cur.execute(sql, args))

    def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._require().cursor() as cur:
            for i in range(0, len(rows), ROWS_PER_STATEMENT):
                cur.executemany(sql, rows[i : i + ROWS_PER_STATEMENT])

    def _insert_rows(self, prefix: str, rows: Sequence[Row], suffix: str) -> None:
        with self._require().cursor() as cur:
            for i in range(0, len(rows), ROWS_PER_STATEMENT):
                part = rows[i : i + ROWS_PER_STATEMENT]
                cur.execute(f"{prefix} {values_sql(part)}{suffix}")

    def open(self) -> None:
        self._conn = self._connect()
        try:
            lock = f"dataflare:{self.ctx.workflow}:{self.name}"[:64]
            with self._conn.cursor() as cur:
                cur.execute("SELECT GET_LOCK(%s, %s)", (lock, LOCK_WAIT_S))
                got = cur.fetchone()
            if not got or got[0] != 1:
                raise RetryableError(
                    f"mysql destination {self.name}: another writer holds lock {lock!r}"
                )
            db = self.cfg.database
            if self.cfg.create_tables:
                self._exec(f"CREATE DATABASE IF NOT EXISTS {q(db)} CHARACTER SET utf8mb4")
            self._exec(
                f"CREATE TABLE IF NOT EXISTS {q(db)}.{q(CHECKPOINT_TABLE)} ("
                " workflow varchar(255) NOT NULL, destination varchar(255) NOT NULL,"
                " source varchar(255) NOT NULL, kind varchar(32) NOT NULL,"
                " value decimal(20,0) NOT NULL, tag text NOT NULL,"
                " updated_at datetime(6) NOT NULL,"
                " PRIMARY KEY (workflow, destination, source)) ENGINE=InnoDB"
            )
            with self._conn.cursor() as cur:
                cur.execute(
                    f"SELECT source, kind, value, tag FROM {q(db)}.{q(CHECKPOINT_TABLE)} "
                    "WHERE workflow = %s AND destination = %s",
                    (self.ctx.workflow, self.name),
                )
                found = {
                    str(r[0]): Position(str(r[1]), int(r[2]), str(r[3])) for r in cur.fetchall()
                }
            self._conn.commit()
        except pymysql.err.MySQLError as e:
            raise self._failure(e, "opening") from None
        for source in self.ctx.sources:
            self._checkpoints[source] = found.get(source)

    def checkpoint(self, source: str) -> Position | None:
        return self._checkpoints.get(source)

    def status(self) -> dict[str, Any]:
        return {
            "records_written": self.records_written,
            "transactions": self.transactions,
            "rows_missing": self.rows_missing,
        }

    def close(self) -> None:
        self._tables.clear()  # prepared layouts go with the connection
        self._partial_source = None
        if self._conn is not None:
            try:
                self._conn.rollback()
                self._conn.close()
            except Exception:  # closing must not hide the error that got us here
                pass
            self._conn = None

    # ------------------------------------------------------------------ writing

    def _commit_with_checkpoint(self, source: str, position: Position) -> None:
        self._exec(
            f"INSERT INTO {q(self.cfg.database)}.{q(CHECKPOINT_TABLE)} (workflow,"
            " destination, source, kind, value, tag, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, UTC_TIMESTAMP(6)) ON DUPLICATE KEY UPDATE"
            " kind = VALUES(kind), value = VALUES(value), tag = VALUES(tag),"
            " updated_at = VALUES(updated_at)",
            (self.ctx.workflow, self.name, source, position.kind, position.value,
             position.tag),
        )  # fmt: skip
        self._require().commit()
        self.transactions += 1

    @contextlib.contextmanager
    def _translate_errors(self) -> Iterator[None]:
        self._require()
        try:
            yield
        except pymysql.err.MySQLError as e:
            self._rollback()
            raise self._failure(e, f"writing {self._current}") from None
        except DataflareError:
            self._rollback()
            raise

    def _rollback(self) -> None:
        self._tables.clear()
        self._partial_source = None
        if self._conn is not None:
            try:
                self._conn.rollback()
            except Exception:
                self._conn = None

    def _write_upsert(self, batch: Batch) -> None:
        plans = plan_batch(batch.changes, batch.schema_map(), self._layouts)
        # DDL first: MySQL commits it implicitly, so never between rows of this batch.
        origin = batch.last.kind == "mysql"
        tables = {p.table: self._prepare(p.schema, origin) for p in plans if p.schema is not None}
        for plan in plans:
            self._current = str(plan.table)
            if plan.schema is None:
                ident = f"{q(self._target_db(plan.table))}.{q(plan.table.name)}"
                self._exec(f"DELETE FROM {ident}")
                continue
            t = tables[plan.table]
            for step in plan.steps:
                if isinstance(step, KeyedSegment):
                    self._apply_segment(t, step)
                elif isinstance(step, InsertRows):
                    self._insert_rows(t.insert_prefix, step.rows, "")
                elif isinstance(step, RowChange):
                    self._apply_row(t, step.change)
                elif isinstance(step, Truncate):
                    self._exec(f"DELETE FROM {t.ident}")

    def _apply_segment(self, t: _Table, seg: KeyedSegment) -> None:
        schema = t.schema
        if seg.deletes:
            keys = [_row(k) for k in seg.deletes]
            nk = len(schema.key)
            cols = ", ".join(q(k) for k in schema.key)
            one = "(" + ", ".join(["%s"] * nk) + ")" if nk > 1 else "%s"
            for i in range(0, len(keys), ROWS_PER_STATEMENT):
                part = keys[i : i + ROWS_PER_STATEMENT]
                marks = ", ".join([one] * len(part))
                lhs = f"({cols})" if nk > 1 else cols
                self._exec(
                    f"DELETE FROM {t.ident} WHERE {lhs} IN ({marks})",
                    [v for k in part for v in k],
                )
        if seg.upserts or seg.inserts:
            self._insert_rows(t.insert_prefix, seg.inserts + seg.upserts, t.upsert_suffix)
        for unchanged, rows in seg.partial.items():
            # Columns the source did not send (Postgres TOAST): update only the sent ones.
            names = schema.column_names
            key = set(schema.key)
            sent = [i for i, n in enumerate(names) if n not in unchanged and n not in key]
            kidx = schema.key_indexes()
            if not sent:
                continue
            sets = ", ".join(f"{q(names[i])} = %s" for i in sent)
            where = " AND ".join(f"{q(names[i])} = %s" for i in kidx)
            sql = f"UPDATE {t.ident} SET {sets} WHERE {where}"
            params = [_row([r[i] for i in sent] + [r[i] for i in kidx]) for r in rows]
            with self._require().cursor() as cur:
                cur.executemany(sql, params)

    def _apply_row(self, t: _Table, c: Change) -> None:
        names = t.schema.column_names
        if t.schema.key:  # primary-key update with unchanged columns: move the row
            assert c.before is not None and c.after is not None
            cols = [i for i, n in enumerate(names) if n not in c.unchanged]
            sets = ", ".join(f"{q(names[i])} = %s" for i in cols)
            where = " AND ".join(f"{q(names[i])} = %s" for i in t.schema.key_indexes())
            params = [to_param(c.after[i]) for i in cols] + [
                to_param(c.before[i]) for i in t.schema.key_indexes()
            ]
            if self._exec(f"UPDATE {t.ident} SET {sets} WHERE {where}", params) != 1:
                self.rows_missing += 1
            return
        # Table without primary key: affect exactly one row equal to the old row.
        assert c.before is not None
        where = " AND ".join(f"{q(n)} <=> %s" for n in names)
        before = [to_param(v) for v in c.before]
        if c.op is Op.DELETE:
            n = self._exec(f"DELETE FROM {t.ident} WHERE {where} LIMIT 1", before)
        else:
            assert c.after is not None
            cols = [i for i, name in enumerate(names) if name not in c.unchanged]
            sets = ", ".join(f"{q(names[i])} = %s" for i in cols)
            n = self._exec(
                f"UPDATE {t.ident} SET {sets} WHERE {where} LIMIT 1",
                [to_param(c.after[i]) for i in cols] + before,
            )
        self._count_missing(n, t.label, c)

    # ------------------------------------------------------------------ tables

    def _target_db(self, table: TableId) -> str:
        return self.cfg.database

    def _target_columns(self, db: str, name: str) -> list[str]:
        with self._require().cursor() as cur:
            cur.execute(
                "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s "
                "AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
                (db, name),
            )
            return [str(r[0]) for r in cur.fetchall()]

    def _prepare(self, schema: TableSchema, mysql_origin: bool) -> _Table:
        """The target table for a source layout, created or altered to match it."""
        t = self._tables.get(schema.table)
        if t is not None and t.schema.columns == schema.columns and t.schema.key == schema.key:
            t.schema = schema
            return t
        db = self._target_db(schema.table)
        name = schema.table.name
        ident = f"{q(db)}.{q(name)}"
        label = f"{db}.{name}"
        existing = self._target_columns(db, name)
        key = set(schema.key)
        if not existing:
            if not self.cfg.create_tables:
                raise FatalError(
                    f"mysql destination {self.name}: table {label} does not exist; create it "
                    "or set create_tables: true"
                )
            defs = [
                f"{q(c.name)} {mysql_type(c, c.name in key, mysql_origin)}"
                + (" NOT NULL" if c.name in key or not c.nullable else " NULL")
                for c in schema.columns
            ]
            if schema.key:
                defs.append("PRIMARY KEY (" + ", ".join(q(k) for k in schema.key) + ")")
            self._exec(
                f"CREATE TABLE IF NOT EXISTS {ident} ({', '.join(defs)}) "
                "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
            )
            self.log.info("created table {}", label)
            existing = [c.name for c in schema.columns]
        else:
            missing = [c for c in schema.columns if c.name not in existing]
            if missing:
                if not self.cfg.create_tables:
                    raise FatalError(
                        f"mysql destination {self.name}: {label} lacks column(s) "
                        f"{', '.join(c.name for c in missing)} of the source; add them or set "
                        "create_tables: true"
                    )
                adds = ", ".join(
                    f"ADD COLUMN {q(c.name)} {mysql_type(c, False, mysql_origin)} NULL"
                    for c in missing
                )
                self._exec(f"ALTER TABLE {ident} {adds}")
                self.log.info("{}: added column(s) {}", label, ", ".join(c.name for c in missing))
                existing += [c.name for c in missing]
        cols = ", ".join(q(c.name) for c in schema.columns)
        updates = [c.name for c in schema.columns if c.name not in key] or list(schema.key)[:1]
        upd = ", ".join(f"{q(n)} = VALUES({q(n)})" for n in updates)
        t = _Table(schema, label, ident, set(existing), f"INSERT INTO {ident} ({cols}) VALUES",
                   f" ON DUPLICATE KEY UPDATE {upd}")  # fmt: skip
        self._tables[schema.table] = t
        return t

    # ------------------------------------------------------------------ append mode

    def _write_append(self, batch: Batch) -> None:
        schemas = batch.schema_map()
        by_table: dict[TableId, list[Change]] = {}
        for c in batch.changes:
            by_table.setdefault(c.table, []).append(c)
        for table, changes in by_table.items():
            schema = schemas.get(table) or self._layouts.get(table)
            db = self._target_db(table)
            ident = f"{q(db)}.{q(table.name + '_changes')}"
            if (table, "append") not in self._appended:
                if self.cfg.create_tables:
                    self._exec(f"CREATE DATABASE IF NOT EXISTS {q(db)} CHARACTER SET utf8mb4")
                    self._exec(
                        f"CREATE TABLE IF NOT EXISTS {ident} ("
                        " change_id bigint unsigned NOT NULL AUTO_INCREMENT PRIMARY KEY,"
                        " position decimal(20,0) NOT NULL, op char(1) NOT NULL, xid bigint NULL,"
                        " commit_ts datetime(6) NULL, tag text NULL, `key` json NULL,"
                        " `before` json NULL, `after` json NULL) ENGINE=InnoDB"
                    )
                self._appended.add((table, "append"))
            rows = [self._log_row(c, schema) for c in changes]
            self._executemany(
                f"INSERT INTO {ident} (position, op, xid, commit_ts, tag, `key`, `before`, `after`)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                rows,
            )

    @staticmethod
    def _log_row(c: Change, schema: TableSchema | None) -> tuple[Any, ...]:
        def js(row: Row | None) -> str | None:
            if row is None or schema is None:
                return None
            return json.dumps(
                dict(zip(schema.column_names, row, strict=True)),
                default=_json_default,
                ensure_ascii=False,
            )

        key = None
        if schema is not None and schema.key and c.key is not None:
            key = json.dumps(
                dict(zip(schema.key, c.key, strict=True)), default=_json_default, ensure_ascii=False
            )
        ts = None
        if c.commit_ts_us is not None:
            ts = datetime(1970, 1, 1) + timedelta(microseconds=c.commit_ts_us)
        return (c.position.value, c.op.value, c.xid, ts, c.position.tag or None, key,
                js(c.before), js(c.after))  # fmt: skip
