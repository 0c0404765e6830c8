"""The `postgres` destination: mirrors tables (upsert) or writes change logs (append),
exactly once.

Exactly once: the checkpoint of each source lives in the target database, table
``<checkpoint_schema>.checkpoints``, and is written in the same transaction as the
data. A batch that ends inside a source transaction (``complete=False``) is applied
in a transaction left open; only the batch that completes the source transaction
writes the checkpoint and commits. A crash at any instant therefore leaves either
everything up to the old checkpoint or everything up to the new one.

Upsert mode, per table and batch (see :mod:`dataflare.sinks.sql_common` for the
coalescing): one COPY of the batch's final rows and deleted keys into a temporary
staging table (created once per connection and table layout, ``ON COMMIT DELETE
ROWS``), then ``DELETE ... USING``, the upsert (a ``MERGE``; ``INSERT ... SELECT ...
ON CONFLICT DO UPDATE`` before PostgreSQL 15 or on tables with rules) and, for
updates with unchanged TOAST columns, ``UPDATE ... FROM`` setting only the columns
that were sent. Tables without primary key get their inserts by COPY and
their updates and deletes one row at a time, each affecting exactly one row equal
to the old row.

Values are dumped by psycopg for the *target* column's type (``Copy.set_types``),
so a dict goes into jsonb as JSON and a list into ``integer[]`` as an array; enums,
domains over them and types psycopg has no dumper for travel as text. When every
column of a table is dumped as exactly its own type, the COPY is binary (the server
parses nothing); otherwise it is text.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from dataflare.cdc.codec import unpack_batch
from dataflare.cdc.errors import DataflareError, FatalError, RecordRefused, RetryableError
from dataflare.cdc.model import (
    Batch,
    Change,
    Column,
    Op,
    Position,
    Row,
    TableId,
    TableSchema,
    row_dict,
)
from dataflare.cdc.mysql import types as mysql_types
from dataflare.cdc.postgres.packed import packed_rows
from dataflare.cdc.postgres.text_rows import materialize
from dataflare.cdc.postgres.types import TEXT_FORM_OIDS
from dataflare.sinks.base import SinkContext
from dataflare.sinks.configs import PostgresSinkConfig
from dataflare.sinks.envelope import to_json
from dataflare.sinks.pg_copy_text import copy_text, packed_copy
from dataflare.sinks.sql_common import (
    InsertRows,
    KeyedSegment,
    RowChange,
    TransactionalSqlSink,
    Truncate,
    plan_batch,
)
from loguru import logger
from psycopg import abc, pq, sql
from psycopg.adapt import Dumper, PyFormat, Transformer
from psycopg.conninfo import conninfo_to_dict

TEXT_OID = 25
ANY_TEXT_OID = 705  # "unknown": only a lookup key for _AnyTextDumper (COPY text sends no oids)
INT2_OID = 21
KIND_COLUMN = "__dataflare_kind"  # staging: 0 upsert, 1 delete, 2+ partial update group
K_UPSERT, K_DELETE, K_PARTIAL = 0, 1, 2
_K_UPSERT_TEXT = str(K_UPSERT).encode()
# A type name as the source's catalog prints it (format_type): a possibly qualified,
# possibly quoted name, or one of SQL's multi-word types; modifiers; array brackets.
# Only such names are put into SQL (they are probed in the target, then used in DDL);
# anything else becomes text.
_IDENT = r'(?:"(?:[^"]|"")+"|[^\W\d][\w$]*)'
_TYPE_NAME = re.compile(
    rf"(?:{_IDENT}(?:\.{_IDENT})?(?:\(\d+(?:,\s?-?\d+)?\))?"
    r"|(?:double precision|character varying|bit varying|timestamp|time)(?:\(\d+\))?"
    r"(?: with(?:out)? time zone)?"
    r"|interval(?: (?:year|month|day|hour|minute|second)(?: to (?:month|hour|minute|second))?)?"
    r"(?:\(\d+\))?)"
    r"(?:\[\d*\])*"
)
_RETRYABLE_STATES = ("08", "40", "53", "57", "58", "55P03", "55006", "25P03")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class _TargetColumn:
    name: str
    decl: str  # format_type of the column, e.g. "numeric(12,2)", "mood", "my_domain"
    base_decl: str  # domains resolved to their base type
    base_oid: int
    typtype: str
    category: str
    elem_typtype: str
    elem_base: int


@dataclass(slots=True)
class _Table:
    """A target table prepared for one source layout."""

    schema: TableSchema
    label: str  # "schema.table" of the target, for messages
    ident: sql.Identifier
    dump_oids: list[int]
    cast_types: list[str]  # per source column: the type its parameters are cast to
    staging: sql.Identifier | None = None
    copy_staging: sql.Composed | None = None
    copy_target: sql.Composed | None = None
    delete_sql: sql.Composed | None = None
    upsert_sql: sql.Composed | None = None
    partial_sql: dict[frozenset[str], sql.Composed] = field(default_factory=dict)
    staging_ddl: sql.Composed | None = None
    tx: abc.Transformer | None = None  # dumps single rows as text (keyless and move steps)
    # Text-format COPY statements for rows that arrive as PostgreSQL text (Batch.pg_text).
    copy_staging_text: sql.Composed | None = None
    copy_target_text: sql.Composed | None = None
    # Inserts are loaded straight into the target (no staging, no conflict check)
    # unless a key turned out to exist; after such a miss, the next `direct_skip`
    # segments go through the staging upsert (doubling with each miss).
    direct_ok: bool = False  # an immediate unique index on the key guards plain loads
    # Every target column has exactly the source column's type (by name): the
    # source's text form can be COPYed as it is. Otherwise text rows are loaded first
    # and dumped for the target's types.
    text_ok: bool = False
    direct_misses: int = 0
    direct_skip: int = 0
    # The upsert as a MERGE (see PostgresSink._upsert); None where it cannot be used.
    merge_sql: sql.Composed | None = None


class _NeverDumped:
    """Registers _AnyTextDumper by oid without claiming any Python type."""


class _NeverDumpedTextForm:
    """Registers _TextFormDumper by oid without claiming any Python type."""


TEXT_FORM_KEY_OID = 2279  # a pseudo-type oid no value has: only a lookup key


class _AnyTextDumper(Dumper):
    """Text for a column that fell back to text, whatever the value's Python type
    (a domain unknown in the target arrives as its base type's value, a range as a
    Range): str as is, anything else as psycopg writes it in text form."""

    oid = ANY_TEXT_OID

    def __init__(self, cls: type, context: Any = None) -> None:
        super().__init__(cls, context)
        self._tx = Transformer(context)

    def dump(self, obj: Any) -> bytes:
        if isinstance(obj, str):
            return obj.encode()
        out = self._tx.get_dumper(obj, PyFormat.TEXT).dump(obj)
        return b"" if out is None else bytes(out)


class _TextFormDumper(_AnyTextDumper):
    """json/jsonb/interval (and arrays) columns: the postgres source sends their
    exact text form (str), written as is; other sources send Python values: a
    timedelta as an interval, anything else as JSON."""

    oid = TEXT_FORM_KEY_OID

    def dump(self, obj: Any) -> bytes:
        if isinstance(obj, str | timedelta):
            return super().dump(obj)
        return _to_json_value(obj).encode()


_STRING_TYPE = re.compile(r"(text|character|varchar|char|bpchar|name|citext)\b")


def scrub(text: str, dsn: str) -> str:
    """``text`` without the password or the DSN in it."""
    secrets = [dsn] if dsn else []
    try:
        pw = conninfo_to_dict(dsn).get("password")
        if pw:
            secrets.append(str(pw))
    except Exception:
        pass
    for s in sorted(secrets, key=len, reverse=True):
        if s:
            text = text.replace(s, "***")
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text)


class PostgresSink(TransactionalSqlSink):
    label = "postgres destination"
    # Batches may arrive still packed by a postgres source (Batch.packed): see
    # _write_packed. (Only batches of pg_text rows: upsert mode.)
    takes_packed = True

    @staticmethod
    def takes_pg_text(config: PostgresSinkConfig) -> bool:
        """Rows of PostgreSQL text (Batch.pg_text) are written as they are: text COPY."""
        return config.mode == "upsert"

    def __init__(self, name: str, config: PostgresSinkConfig, ctx: SinkContext) -> None:
        self.name = name
        self.cfg = config
        self.mode = config.mode
        self._raw = False  # the table being written has rows of PostgreSQL text
        self.ctx = ctx
        self.log = logger.bind(workflow=ctx.workflow, component=f"destination:{name}")
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._checkpoints: dict[str, Position | None] = {}
        self._tables: dict[TableId, _Table] = {}
        self._layouts: dict[TableId, TableSchema] = {}  # last layout seen per source table
        self._staging_ready: set[str] = set()  # staging tables known to exist
        self._staging_used: set[str] = set()  # staging tables holding rows in this txn
        self._partial_source: str | None = None  # source of an open, incomplete txn
        self._current = ""  # table being written, for error messages
        self._ckpt_table = sql.Identifier(config.checkpoint_schema, "checkpoints")
        self.records_written = 0
        self.transactions = 0
        self.rows_missing = 0  # keyless update/delete that found no equal row

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        self._conn = self._connect()
        try:
            self._lock()
            self._ensure_checkpoint_table()
            self._load_checkpoints()
        except psycopg.Error as e:
            err = self._failure(e, "opening")
            self.close()
            raise err from None
        except BaseException:
            self.close()
            raise

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        dsn = str(self.cfg.dsn)
        try:
            params: dict[str, Any] = conninfo_to_dict(dsn)
        except psycopg.Error:
            raise FatalError(
                f"postgres destination {self.name}: dsn is neither a libpq conninfo string "
                "nor a postgresql:// URL"
            ) from None
        params.setdefault("connect_timeout", max(1, round(self.cfg.connect_timeout)))
        params.setdefault("application_name", f"dataflare:{self.ctx.workflow}:{self.name}")
        params["client_encoding"] = "UTF8"
        try:
            conn = psycopg.connect(autocommit=False, **params)
            conn.adapters.register_dumper(_NeverDumped, _AnyTextDumper)
            conn.adapters.register_dumper(_NeverDumpedTextForm, _TextFormDumper)
            return conn
        except psycopg.Error as e:
            raise RetryableError(
                f"postgres destination {self.name}: cannot connect: {scrub(str(e), dsn)}"
            ) from None

    def _lock(self) -> None:
        """One writer per destination: a previous apply process may still be exiting."""
        conn = self._require()
        key = f"dataflare:{self.ctx.workflow}:{self.name}"
        deadline = time.monotonic() + self.cfg.lock_timeout
        while True:
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", [key]
            ).fetchone()
            conn.commit()
            if row is not None and row[0]:
                return
            if time.monotonic() > deadline:
                raise RetryableError(
                    f"postgres destination {self.name}: another process is writing to this "
                    "destination (advisory lock held)"
                )
            time.sleep(0.1)

    def _ensure_checkpoint_table(self) -> None:
        conn = self._require()
        name = f"{self.cfg.checkpoint_schema}.checkpoints"
        row = conn.execute(
            "SELECT to_regclass(%s)", [sql.Identifier(*name.split(".", 1)).as_string(conn)]
        ).fetchone()
        if row is None or row[0] is None:
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('dataflare:ddl', 0))")
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                    sql.Identifier(self.cfg.checkpoint_schema)
                )
            )
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    " workflow text NOT NULL, destination text NOT NULL, source text NOT NULL,"
                    " kind text NOT NULL, value numeric(20,0) NOT NULL, tag text NOT NULL"
                    " DEFAULT '', updated_at timestamptz NOT NULL DEFAULT now(),"
                    " PRIMARY KEY (workflow, destination, source))"
                ).format(self._ckpt_table)
            )
        conn.commit()

    def _load_checkpoints(self) -> None:
        conn = self._require()
        rows = conn.execute(
            sql.SQL(
                "SELECT source, kind, value, tag FROM {} WHERE workflow = %s AND destination = %s"
            ).format(self._ckpt_table),
            [self.ctx.workflow, self.name],
        ).fetchall()
        conn.commit()
        self._checkpoints = {s: None for s in self.ctx.sources}
        for source, kind, value, tag in rows:
            self._checkpoints[source] = Position(kind, int(value), tag)

    def checkpoint(self, source: str) -> Position | None:
        return self._checkpoints.get(source)

    def status(self) -> dict[str, Any]:
        return {
            "records_written": self.records_written,
            "transactions": self.transactions,
            "tables": len(self._tables),
            "rows_missing": self.rows_missing,
        }

    def close(self) -> None:
        conn, self._conn = self._conn, None
        # What the connection held (temp staging tables, prepared layouts, an open
        # transaction) goes with it: a reopened sink starts clean.
        self._tables.clear()
        self._staging_ready.clear()
        self._staging_used.clear()
        self._partial_source = None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()  # an open (incomplete) transaction is rolled back

    def _require(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._conn is None:
            raise RetryableError(f"postgres destination {self.name}: not connected")
        return self._conn

    # ---------------------------------------------------------------------- write

    def _adapt_batch(self, batch: Batch) -> Batch:
        if batch.last.kind == "mysql":  # MySQL type names -> PostgreSQL (issue 4)
            return mysql_types.for_postgres(batch)
        return batch

    def _commit_with_checkpoint(self, source: str, position: Position) -> None:
        self._current = ""
        self._save_checkpoint(source, position)
        self._require().commit()
        self._committed()

    @contextlib.contextmanager
    def _translate_errors(self) -> Iterator[None]:
        self._require()
        try:
            yield
        except psycopg.Error as e:
            raise self._failure(e, "writing") from None
        except DataflareError:
            self._rollback()
            raise
        except (TypeError, ValueError, OverflowError) as e:
            # psycopg could not dump a value for its target column's type.
            where = f" table {self._current}:" if self._current else ""
            self._rollback()
            raise RecordRefused(
                f"postgres destination {self.name}:{where} a value does not fit its target "
                f"column's type ({type(e).__name__}: {e}); align the target table with the source"
            ) from None

    def _save_checkpoint(self, source: str, pos: Position) -> None:
        self._require().execute(
            sql.SQL(
                "INSERT INTO {} AS c (workflow, destination, source, kind, value, tag, updated_at)"
                " VALUES (%s, %s, %s, %s, %s::numeric, %s, now())"
                " ON CONFLICT (workflow, destination, source) DO UPDATE SET kind = EXCLUDED.kind,"
                " value = EXCLUDED.value, tag = EXCLUDED.tag, updated_at = EXCLUDED.updated_at"
            ).format(self._ckpt_table),
            [self.ctx.workflow, self.name, source, pos.kind, pos.value, pos.tag],
        )

    def _committed(self) -> None:
        self.transactions += 1
        self._staging_used.clear()

    def _rollback(self) -> None:
        """Forget everything the rolled-back transaction did (DDL included)."""
        self._tables.clear()
        self._staging_ready.clear()
        self._staging_used.clear()
        self._partial_source = None
        if self._conn is not None:
            try:
                self._conn.rollback()
            except psycopg.Error:
                self.close()

    def _failure(self, e: psycopg.Error, doing: str) -> DataflareError:
        self._rollback()
        state = e.sqlstate or ""
        where = f" table {self._current}:" if self._current else ""
        primary = e.diag.message_primary if state else None
        msg = scrub(primary or str(e).strip(), str(self.cfg.dsn))
        text = f"postgres destination {self.name}:{where} {msg}"
        retryable = state.startswith(_RETRYABLE_STATES) or (
            not state and isinstance(e, psycopg.OperationalError | psycopg.InterfaceError)
        )
        if retryable:
            return RetryableError(text)
        hint = ""
        if state == "42P10":
            hint = (
                "; the target table needs a primary key or unique index on exactly the "
                "source's key columns"
            )
        elif state.startswith("23"):
            constraint = e.diag.constraint_name
            hint = (
                f" (constraint {constraint})" if constraint else ""
            ) + "; the target rejects the data: align the target table with the source"
        elif state in ("42703", "42P01", "42804"):
            hint = (
                "; the target table does not match the source layout: fix it, or set "
                "create_tables: true to let DataFlare manage it"
            )
        elif state.startswith("22"):
            hint = "; a value does not fit the target column type"
        refused = state.startswith(("22", "23"))
        cls = RecordRefused if refused else FatalError
        return cls(f"{text}{hint} (SQLSTATE {state or 'none'}, while {doing})")

    # ----------------------------------------------------------------- upsert mode

    def _write_upsert(self, batch: Batch) -> None:
        conn = self._require()
        if batch.packed is not None:
            if self._write_packed(batch):
                return
            batch = unpack_batch(batch)
        if batch.pg_text:
            layouts = batch.schema_map()
            if not all(self._prepare(layouts[tb]).text_ok for tb in batch.pg_text if tb in layouts):
                batch = materialize(batch)  # a target type differs: values, dumped for it
        plans = plan_batch(batch.changes, batch.schema_map(), self._layouts)
        for plan in plans:
            self._current = str(plan.table)
            if plan.schema is None:
                ident = sql.Identifier(self._target_schema(plan.table), plan.table.name)
                for _ in plan.steps:
                    conn.execute(sql.SQL("TRUNCATE {}").format(ident))
                continue
            t = self._prepare(plan.schema)
            self._current = t.label
            self._raw = plan.table in batch.pg_text
            for step in plan.steps:
                if isinstance(step, KeyedSegment):
                    self._apply_segment(t, step)
                elif isinstance(step, InsertRows):
                    self._copy_rows(t, False, step.rows)
                elif isinstance(step, RowChange):
                    self._apply_row(t, step.change)
                elif isinstance(step, Truncate):
                    conn.execute(sql.SQL("TRUNCATE {}").format(t.ident))

    def _write_packed(self, batch: Batch) -> bool:
        """A batch still packed as pgoutput messages (``Batch.packed``), written
        straight from them when it is the bulk of a catch-up: one keyed table, only
        inserts, or only inserts and updates of whole rows with each key once. Its
        COPY text is made from the messages in C, so no change is built per row.
        Inserts load with a plain COPY into the table where that is safe (see
        _insert_directly), the rest through staging and the upsert. False, with
        nothing written, for anything else (the general path then takes it)."""
        assert batch.packed is not None
        one = packed_rows(batch.packed.payload, batch.schemas)
        if one is None:
            return False
        schema, relid, messages = one
        if len(messages) != batch.packed.count:
            return False  # a corrupt frame: unpacking it says so
        if not schema.key or schema.table not in batch.pg_text:
            return False
        t = self._prepare(schema)
        if not t.text_ok:
            return False
        self._current = t.label
        ncols = len(schema.columns)
        if t.direct_ok and not t.direct_skip:
            data = packed_copy(messages, relid, ncols, (), None)
            if data is not None:  # only inserts
                return self._insert_directly(t, data)
        data = packed_copy(messages, relid, ncols, schema.key_indexes(), _K_UPSERT_TEXT)
        if data is None:
            return False
        if t.direct_ok and t.direct_skip:
            t.direct_skip -= 1
        self._stage(t, data)
        self._upsert(t)
        return True

    def _copy(
        self, stmt: sql.Composed | None, oids: Sequence[int], rows: Sequence[Sequence[Any]]
    ) -> None:
        assert stmt is not None
        with self._require().cursor() as cur, cur.copy(stmt) as copy:
            copy.set_types(list(oids))
            for row in rows:
                copy.write_row(row)

    def _copy_rows(self, t: _Table, staging: bool, rows: Sequence[Sequence[Any]] | bytes) -> None:
        """COPY into the target (or its staging table: rows end with the kind); rows
        as COPY text already when they are bytes."""
        if isinstance(rows, bytes) or self._raw:
            stmt = t.copy_staging_text if staging else t.copy_target_text
            assert stmt is not None
            with self._require().cursor() as cur, cur.copy(stmt) as copy:
                copy.write(rows if isinstance(rows, bytes) else copy_text(rows))
        elif staging:
            self._copy(t.copy_staging, [*t.dump_oids, INT2_OID], rows)
        else:
            self._copy(t.copy_target, t.dump_oids, rows)

    def _kind(self, k: int) -> Any:
        return str(k).encode() if self._raw else k

    def _apply_segment(self, t: _Table, seg: KeyedSegment) -> None:
        conn = self._require()
        schema = t.schema
        idx = schema.key_indexes()
        ncols = len(schema.columns)
        deletes: list[tuple[Any, ...]] = []
        kind = self._kind(K_DELETE)
        for key in seg.deletes:
            row: list[Any] = [None] * ncols
            for i, v in zip(idx, key, strict=True):
                row[i] = v
            deletes.append((*row, kind))
        upserts = seg.upserts
        if seg.inserts:
            if t.direct_skip or not t.direct_ok:
                t.direct_skip = max(0, t.direct_skip - 1)
                upserts = upserts + seg.inserts
            else:
                if deletes:  # a key deleted, then inserted again: delete first
                    self._stage(t, deletes)
                    conn.execute(t.delete_sql or sql.SQL(""))
                    deletes = []
                if not self._insert_directly(t, seg.inserts):
                    upserts = upserts + seg.inserts
        kind = self._kind(K_UPSERT)
        rows = list(deletes)
        rows.extend((*r, kind) for r in upserts)
        groups = list(seg.partial.items())
        for g, (_, prow) in enumerate(groups):
            kind = self._kind(K_PARTIAL + g)
            rows.extend((*r, kind) for r in prow)
        if not rows:
            return
        self._stage(t, rows)
        if deletes:
            conn.execute(t.delete_sql or sql.SQL(""))
        if upserts:
            self._upsert(t)
        for g, (unchanged, _) in enumerate(groups):
            conn.execute(self._partial_sql(t, unchanged), [K_PARTIAL + g])

    def _stage(self, t: _Table, rows: list[tuple[Any, ...]] | bytes) -> None:
        """Fill the table's staging table (emptied first if this transaction used it)."""
        conn = self._require()
        assert t.staging is not None and t.staging_ddl is not None
        sname = t.staging.as_string(conn)
        if sname not in self._staging_ready:
            conn.execute(t.staging_ddl)
            self._staging_ready.add(sname)
        if sname in self._staging_used:
            conn.execute(sql.SQL("TRUNCATE {}").format(t.staging))
        self._staging_used.add(sname)
        self._copy_rows(t, True, rows)

    def _insert_directly(self, t: _Table, rows: list[Row] | bytes) -> bool:
        """Load rows that were inserted at the source with a plain COPY into the
        target, inside a savepoint: the fastest path there is. False (nothing written)
        when a key exists, as after a snapshot overlap or in a target that already held
        rows: the caller then upserts them, and the next few segments of the table skip
        this attempt (twice as many after each miss)."""
        conn = self._require()
        # A savepoint by hand: conn.transaction() would commit when no transaction
        # is open yet, and this batch's data commits only with its checkpoint.
        conn.execute("SAVEPOINT dataflare_direct")
        try:
            self._copy_rows(t, False, rows)
        except psycopg.errors.UniqueViolation:
            conn.execute("ROLLBACK TO SAVEPOINT dataflare_direct")
            t.direct_misses += 1
            t.direct_skip = min(1 << t.direct_misses, 256)
            return False
        conn.execute("RELEASE SAVEPOINT dataflare_direct")
        t.direct_misses = max(0, t.direct_misses - 1)
        return True

    def _partial_sql(self, t: _Table, unchanged: frozenset[str]) -> sql.Composed:
        stmt = t.partial_sql.get(unchanged)
        if stmt is None:
            assert t.staging is not None
            key = set(t.schema.key)
            sent = [n for n in t.schema.column_names if n not in unchanged and n not in key]
            sets = sql.SQL(", ").join(
                sql.SQL("{} = s.{}").format(sql.Identifier(n), sql.Identifier(n))
                for n in sent or list(t.schema.key)[:1]
            )
            stmt = sql.SQL("UPDATE {} AS t SET {} FROM {} AS s WHERE s.{} = %s AND {}").format(
                t.ident, sets, t.staging, sql.Identifier(KIND_COLUMN), self._key_match(t.schema)
            )
            t.partial_sql[unchanged] = stmt
        return stmt

    @staticmethod
    def _key_match(schema: TableSchema) -> sql.Composable:
        return sql.SQL(" AND ").join(
            sql.SQL("t.{} = s.{}").format(sql.Identifier(k), sql.Identifier(k)) for k in schema.key
        )

    def _row_params(self, t: _Table, row: Row) -> list[str | None]:
        """Values of a row as text, dumped for the target column types."""
        if self._raw:
            return [None if v is None else bytes(v).decode() for v in row]
        tx = t.tx
        if tx is None:
            tx = t.tx = Transformer(self._require())
            tx.set_dumper_types(t.dump_oids, pq.Format.TEXT)
        dumped = tx.dump_sequence(list(row), [PyFormat.TEXT] * len(row))
        return [None if d is None else bytes(d).decode() for d in dumped]

    def _apply_row(self, t: _Table, c: Change) -> None:
        conn = self._require()
        names = t.schema.column_names
        if t.schema.key:  # primary-key update with unchanged columns: move the row
            assert c.before is not None and c.after is not None
            after = self._row_params(t, c.after)
            before = self._row_params(t, c.before)
            assigns = [
                sql.SQL("{} = %s::{}").format(sql.Identifier(n), sql.SQL(t.cast_types[i]))
                for i, n in enumerate(names)
                if n not in c.unchanged
            ]
            params = [after[i] for i, n in enumerate(names) if n not in c.unchanged]
            conds = []
            for i in t.schema.key_indexes():
                conds.append(
                    sql.SQL("{} = %s::{}").format(
                        sql.Identifier(names[i]), sql.SQL(t.cast_types[i])
                    )
                )
                params.append(before[i])
            stmt = sql.SQL("UPDATE {} SET {} WHERE {}").format(
                t.ident, sql.SQL(", ").join(assigns), sql.SQL(" AND ").join(conds)
            )
            if conn.execute(stmt, params).rowcount != 1:
                self.rows_missing += 1
            return
        # Table without primary key: affect exactly one row equal to the old row.
        assert c.before is not None
        before = self._row_params(t, c.before)
        conds = [
            sql.SQL("{}::text IS NOT DISTINCT FROM %s::{}::text").format(
                sql.Identifier(n), sql.SQL(t.cast_types[i])
            )
            for i, n in enumerate(names)
        ]
        one = sql.SQL("ctid = (SELECT ctid FROM {} WHERE {} LIMIT 1)").format(
            t.ident, sql.SQL(" AND ").join(conds)
        )
        if c.op is Op.DELETE:
            cur = conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(t.ident, one), before)
        else:
            assert c.after is not None
            after = self._row_params(t, c.after)
            cols = [i for i, n in enumerate(names) if n not in c.unchanged]
            sets = sql.SQL(", ").join(
                sql.SQL("{} = %s::{}").format(sql.Identifier(names[i]), sql.SQL(t.cast_types[i]))
                for i in cols
            )
            cur = conn.execute(
                sql.SQL("UPDATE {} SET {} WHERE {}").format(t.ident, sets, one),
                [*(after[i] for i in cols), *before],
            )
        self._count_missing(cur.rowcount, t.label, c)

    # ---------------------------------------------------------- table management

    def _target_schema(self, table: TableId) -> str:
        return self.cfg.schema or table.schema

    def _prepare(self, schema: TableSchema) -> _Table:
        """The target table for a source layout, created or altered to match it."""
        t = self._tables.get(schema.table)
        if t is not None and t.schema == schema:
            return t
        tschema, tname = self._target_schema(schema.table), schema.table.name
        label = f"{tschema}.{tname}"
        self._current = label
        cols = self._target_columns(tschema, tname)
        if not cols:
            if not self.cfg.create_tables:
                raise FatalError(
                    f"postgres destination {self.name}: target table {label} does not exist; "
                    "create it or set create_tables: true"
                )
            self._create_table(schema, tschema, tname)
            cols = self._target_columns(tschema, tname)
        else:
            self._reconcile(schema, tschema, tname, cols)
            cols = self._target_columns(tschema, tname)
        by_name = {c.name: c for c in cols}
        ident = sql.Identifier(tschema, tname)
        missing = [c.name for c in schema.columns if c.name not in by_name]
        if missing:
            raise FatalError(
                f"postgres destination {self.name}: target table {label} lacks column(s) "
                f"{', '.join(missing)}; add them or set create_tables: true"
            )
        tcols = [by_name[c.name] for c in schema.columns]
        t = _Table(
            schema,
            label,
            ident,
            [self._dump_oid(c, s) for c, s in zip(tcols, schema.columns, strict=True)],
            [c.base_decl for c in tcols],
        )
        colids = sql.SQL(", ").join(sql.Identifier(c.name) for c in schema.columns)
        # Binary COPY when every value is dumped as exactly its column's type (the
        # server then skips parsing text); text when any column falls back to text.
        binary = all(
            o == c.base_oid and self._has_dumper(o, pq.Format.BINARY)
            for o, c in zip(t.dump_oids, tcols, strict=True)
        )
        fmt = sql.SQL(" (FORMAT BINARY)" if binary else "")
        t.copy_target = sql.SQL("COPY {} ({}) FROM STDIN{}").format(ident, colids, fmt)
        t.copy_target_text = sql.SQL("COPY {} ({}) FROM STDIN").format(ident, colids)
        t.text_ok = all(
            tc.decl == sc.type_name for tc, sc in zip(tcols, schema.columns, strict=True)
        )
        if schema.key:
            layout = repr((tschema, tname, [(c.name, c.base_decl) for c in tcols], schema.key))
            digest = hashlib.sha1(layout.encode()).hexdigest()[:20]
            t.staging = sql.Identifier(f"dataflare_stg_{digest}")
            t.staging_ddl = sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS {} ({}, {} int2 NOT NULL) ON COMMIT DELETE ROWS"
            ).format(
                t.staging,
                sql.SQL(", ").join(
                    sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.base_decl))
                    for c in tcols
                ),
                sql.Identifier(KIND_COLUMN),
            )
            t.direct_ok = self._key_is_unique(ident, schema.key)
            t.copy_staging = sql.SQL("COPY {} ({}, {}) FROM STDIN{}").format(
                t.staging, colids, sql.Identifier(KIND_COLUMN), fmt
            )
            t.copy_staging_text = sql.SQL("COPY {} ({}, {}) FROM STDIN").format(
                t.staging, colids, sql.Identifier(KIND_COLUMN)
            )
            kind = sql.Identifier(KIND_COLUMN)
            t.delete_sql = sql.SQL(
                "DELETE FROM {} AS t USING {} AS s WHERE s.{} = {} AND {}"
            ).format(ident, t.staging, kind, sql.Literal(K_DELETE), self._key_match(schema))
            nonkey = [c.name for c in schema.columns if c.name not in schema.key]
            action: sql.Composable
            if nonkey:
                action = sql.SQL("DO UPDATE SET {}").format(
                    sql.SQL(", ").join(
                        sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(n), sql.Identifier(n))
                        for n in nonkey
                    )
                )
            else:
                action = sql.SQL("DO NOTHING")
            t.upsert_sql = sql.SQL(
                "INSERT INTO {} AS t ({}) SELECT {} FROM {} WHERE {} = {} ON CONFLICT ({}) {}"
            ).format(
                ident,
                colids,
                colids,
                t.staging,
                kind,
                sql.Literal(K_UPSERT),
                sql.SQL(", ").join(sql.Identifier(k) for k in schema.key),
                action,
            )
            if t.direct_ok and self._merge_ok(ident):
                t.merge_sql = self._merge_sql(t, colids, nonkey)
        self._tables[schema.table] = t
        return t

    def _merge_ok(self, ident: sql.Identifier) -> bool:
        """Can the upsert be a MERGE: PostgreSQL 15 or later, a plain or partitioned
        table without rules (MERGE refuses those)."""
        conn = self._require()
        if conn.info.server_version < 150000:
            return False
        row = conn.execute(
            "SELECT relkind IN ('r', 'p') AND NOT relhasrules FROM pg_class"
            " WHERE oid = %s::regclass",
            (ident.as_string(conn),),
        ).fetchone()
        return bool(row and row[0])

    @staticmethod
    def _merge_sql(t: _Table, colids: sql.Composable, nonkey: Sequence[str]) -> sql.Composed:
        """The upsert of the staged rows as a MERGE, in a savepoint (see _upsert),
        with joins planned as index lookups: the staging table has no statistics, and
        a hash join would read the whole target for every batch."""
        schema = t.schema
        assert t.staging is not None
        matched = (
            sql.SQL(" WHEN MATCHED THEN UPDATE SET {}").format(
                sql.SQL(", ").join(
                    sql.SQL("{} = s.{}").format(sql.Identifier(n), sql.Identifier(n))
                    for n in nonkey
                )
            )
            if nonkey
            else sql.SQL("")
        )
        return sql.SQL(
            "SAVEPOINT dataflare_merge; SET LOCAL enable_hashjoin = off; "
            "SET LOCAL enable_mergejoin = off; "
            "MERGE INTO {} AS t USING (SELECT {} FROM {} WHERE {} = {}) AS s ON {}{} "
            "WHEN NOT MATCHED THEN INSERT ({}) VALUES ({}); "
            "RELEASE SAVEPOINT dataflare_merge"
        ).format(
            t.ident,
            colids,
            t.staging,
            sql.Identifier(KIND_COLUMN),
            sql.Literal(K_UPSERT),
            PostgresSink._key_match(schema),
            matched,
            colids,
            sql.SQL(", ").join(
                sql.SQL("s.{}").format(sql.Identifier(c.name)) for c in schema.columns
            ),
        )

    def _upsert(self, t: _Table) -> None:
        """Upsert the staged rows. As a MERGE where the server has it: an update
        then locks no row first (INSERT ... ON CONFLICT writes a lock, then the new
        version: ~18% more WAL a row; updates in bench/pg_sink_bench.py: 151k ->
        166-173k rows/s). Its one weakness, a key inserted by someone else meanwhile
        (a unique violation where ON CONFLICT would update), rolls back to the
        savepoint and upserts."""
        conn = self._require()
        if t.merge_sql is not None:
            try:
                conn.execute(t.merge_sql)
                return
            except (psycopg.errors.UniqueViolation, psycopg.errors.FeatureNotSupported) as e:
                conn.execute("ROLLBACK TO SAVEPOINT dataflare_merge")
                if isinstance(e, psycopg.errors.FeatureNotSupported):
                    t.merge_sql = None  # (a rule added since): the upsert from now on
        conn.execute(t.upsert_sql or sql.SQL(""))

    def _key_is_unique(self, ident: sql.Identifier, key: Sequence[str]) -> bool:
        """Does an immediate, total unique index cover exactly the key? Only then can
        a plain COPY of inserts be trusted to fail on a key that exists."""
        conn = self._require()
        row = conn.execute(
            """
            SELECT EXISTS (
                SELECT 1 FROM pg_index i
                WHERE i.indrelid = %s::regclass AND i.indisunique AND i.indimmediate
                  AND i.indpred IS NULL AND i.indexprs IS NULL
                  AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text COLLATE "C")
                       FROM pg_attribute a
                       WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)) = %s)
            """,
            (ident.as_string(conn), sorted(key)),
        ).fetchone()
        return bool(row and row[0])

    def _target_columns(self, tschema: str, tname: str) -> list[_TargetColumn]:
        rows = (
            self._require()
            .execute(
                """
            SELECT a.attname, format_type(a.atttypid, a.atttypmod),
                   format_type(bt.oid, CASE WHEN t.typtype = 'd' THEN t.typtypmod
                                            ELSE a.atttypmod END),
                   bt.oid::int8, bt.typtype::text, bt.typcategory::text,
                   coalesce(et.typtype::text, ''),
                   coalesce(CASE WHEN et.typtype = 'd' THEN et.typbasetype ELSE et.oid END, 0)::int8
            FROM pg_attribute a
            JOIN pg_class c ON c.oid = a.attrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_type t ON t.oid = a.atttypid
            JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
            LEFT JOIN pg_type et ON et.oid = bt.typelem AND bt.typcategory = 'A'
            WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
              AND a.attnum > 0 AND NOT a.attisdropped
            ORDER BY a.attnum
            """,
                [tschema, tname],
            )
            .fetchall()
        )
        return [_TargetColumn(*r) for r in rows]

    def _has_dumper(self, oid: int, fmt: pq.Format = pq.Format.TEXT) -> bool:
        try:
            self._require().adapters.get_dumper_by_oid(oid, fmt)
        except psycopg.ProgrammingError:
            return False
        return True

    def _dump_oid(self, c: _TargetColumn, source: Column) -> int:
        """The type psycopg dumps a column's values as (text for what it cannot)."""
        if source.type_oid in TEXT_FORM_OIDS and c.base_oid == source.type_oid:
            # The postgres source hands these over in PostgreSQL's exact text form.
            return TEXT_FORM_KEY_OID
        if c.typtype == "e":
            return TEXT_OID if _STRING_TYPE.match(source.type_name) else ANY_TEXT_OID
        if c.base_oid == TEXT_OID or not (c.category == "A" or self._has_dumper(c.base_oid)):
            # text in the target (maybe a fallback), or a type psycopg cannot dump
            return TEXT_OID if _STRING_TYPE.match(source.type_name) else ANY_TEXT_OID
        if c.category == "A":
            # psycopg loads arrays of enums and domains as str, and writes lists of
            # them as text arrays: the text form serves both.
            if c.elem_typtype in ("e", "d") or not self._has_dumper(c.base_oid):
                return ANY_TEXT_OID
            return c.base_oid
        return c.base_oid

    def _canonical_types(self, names: Sequence[str]) -> dict[str, str | None]:
        """format_type of each source type name in the target, None when unknown."""
        conn = self._require()
        found: dict[str, tuple[int, int] | None] = {}
        for name in dict.fromkeys(names):
            if not _TYPE_NAME.fullmatch(name):
                found[name] = None
                continue
            try:
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute(sql.SQL("SELECT NULL::{}").format(sql.SQL(name)))
                    res = cur.pgresult
                    assert res is not None
                    found[name] = (res.ftype(0), res.fmod(0))
            except psycopg.errors.UndefinedObject:
                found[name] = None
            except (psycopg.errors.SyntaxError, psycopg.errors.InvalidParameterValue):
                found[name] = None
        out: dict[str, str | None] = {}
        for name, om in found.items():
            if om is None:
                out[name] = None
                continue
            row = conn.execute("SELECT format_type(%s::oid, %s)", [om[0], om[1]]).fetchone()
            out[name] = None if row is None else str(row[0])
        return out

    def _column_type(self, type_name: str, canonical: str | None, label: str, col: str) -> str:
        if canonical is not None:
            return type_name
        fallback = "text[]" if type_name.endswith("]") else "text"
        self.log.warning(
            "{}: column {} has type {} which the target database does not know; using {}",
            label,
            col,
            type_name,
            fallback,
        )
        return fallback

    def _create_table(self, schema: TableSchema, tschema: str, tname: str) -> None:
        conn = self._require()
        label = f"{tschema}.{tname}"
        canon = self._canonical_types([c.type_name for c in schema.columns])
        defs: list[sql.Composable] = [
            sql.SQL("{} {}").format(
                sql.Identifier(c.name),
                sql.SQL(self._column_type(c.type_name, canon[c.type_name], label, c.name)),
            )
            for c in schema.columns
        ]
        if schema.key:
            defs.append(
                sql.SQL("PRIMARY KEY ({})").format(
                    sql.SQL(", ").join(sql.Identifier(k) for k in schema.key)
                )
            )
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(tschema)))
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                sql.Identifier(tschema, tname), sql.SQL(", ").join(defs)
            )
        )
        self.log.info("{}: created target table", label)

    def _reconcile(
        self, schema: TableSchema, tschema: str, tname: str, cols: list[_TargetColumn]
    ) -> None:
        """Add columns the source has and the target lacks; convert changed types."""
        label = f"{tschema}.{tname}"
        by_name = {c.name: c for c in cols}
        extra = [c.name for c in cols if c.name not in set(schema.column_names)]
        if extra:
            self.log.warning(
                "{}: target column(s) {} are not in the source (dropped?); kept, "
                "not written any more",
                label,
                ", ".join(extra),
            )
        if not self.cfg.create_tables:
            return
        conn = self._require()
        ident = sql.Identifier(tschema, tname)
        canon = self._canonical_types([c.type_name for c in schema.columns])
        for c in schema.columns:
            want = canon[c.type_name]
            have = by_name.get(c.name)
            if have is None:
                conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                        ident,
                        sql.Identifier(c.name),
                        sql.SQL(self._column_type(c.type_name, want, label, c.name)),
                    )
                )
                self.log.info("{}: added column {} {}", label, c.name, c.type_name)
                continue
            if want is None or want in (have.decl, have.base_decl):
                continue
            self.log.warning(
                "{}: column {} changes type from {} to {}", label, c.name, have.decl, want
            )
            try:
                with conn.transaction():
                    conn.execute(
                        sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {} USING {}::{}").format(
                            ident,
                            sql.Identifier(c.name),
                            sql.SQL(c.type_name),
                            sql.Identifier(c.name),
                            sql.SQL(c.type_name),
                        )
                    )
            except psycopg.Error as e:
                if e.sqlstate and e.sqlstate.startswith(("08", "40", "57")):
                    raise
                raise FatalError(
                    f"postgres destination {self.name}: {label}: column {c.name} changed type "
                    f"from {have.decl} to {c.type_name} in the source and the target column "
                    f"cannot be converted ({e.diag.message_primary}); convert it by hand "
                    "(ALTER TABLE ... ALTER COLUMN ... TYPE ... USING ...) and restart the workflow"
                ) from None

    # ----------------------------------------------------------------- append mode

    def _write_append(self, batch: Batch) -> None:
        schemas = batch.schema_map()
        by_table: dict[TableId, list[Change]] = {}
        for c in batch.changes:
            by_table.setdefault(c.table, []).append(c)
        for table, changes in by_table.items():
            schema = schemas.get(table) or self._layouts.get(table)
            tschema = self._target_schema(table)
            tname = table.name + self.cfg.append_suffix
            self._current = f"{tschema}.{tname}"
            ident = self._prepare_log(tschema, tname)
            rows = [self._log_row(c, schema) for c in changes]
            self._copy(
                sql.SQL(
                    "COPY {} (position, op, xid, commit_ts, tag, key, before, after, unchanged)"
                    " FROM STDIN"
                ).format(ident),
                [1700, TEXT_OID, 20, 1184, TEXT_OID, TEXT_OID, TEXT_OID, TEXT_OID, 1009],
                rows,
            )

    def _prepare_log(self, tschema: str, tname: str) -> sql.Identifier:
        ident = sql.Identifier(tschema, tname)
        key = TableId(tschema, tname)
        if key in self._tables:
            return ident
        conn = self._require()
        if not self._target_columns(tschema, tname):
            if not self.cfg.create_tables:
                raise FatalError(
                    f"postgres destination {self.name}: change log table {tschema}.{tname} "
                    "does not exist; create it or set create_tables: true"
                )
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(tschema)))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    " change_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                    " position numeric(20,0) NOT NULL, op text NOT NULL, xid bigint,"
                    " commit_ts timestamptz, tag text, key jsonb, before jsonb, after jsonb,"
                    " unchanged text[])"
                ).format(ident)
            )
        dummy = TableSchema(key, (), ())
        self._tables[key] = _Table(dummy, f"{tschema}.{tname}", ident, [], [])
        return ident

    @staticmethod
    def _log_row(c: Change, schema: TableSchema | None) -> tuple[Any, ...]:
        def js(row: Row | None) -> str | None:
            if row is None or schema is None:
                return None
            d = row_dict(schema, row)
            return None if d is None else _to_json(d)

        key = None
        if schema is not None and schema.key:
            if c.key is not None:
                key = _to_json(dict(zip(schema.key, c.key, strict=True)))
            else:
                src = c.after if c.after is not None else c.before
                if src is not None:
                    idx = schema.key_indexes()
                    key = _to_json({k: src[i] for k, i in zip(schema.key, idx, strict=True)})
        ts = None if c.commit_ts_us is None else _EPOCH + timedelta(microseconds=c.commit_ts_us)
        return (
            c.position.value,
            c.op.value,
            c.xid,
            ts,
            c.position.tag or None,
            key,
            js(c.before),
            js(c.after),
            sorted(c.unchanged) if c.unchanged else None,
        )


def _json_safe(v: Any) -> Any:
    """JSON has no NaN/Infinity: such floats travel as strings, like numerics do."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return v


def _to_json_value(v: Any) -> str:
    return to_json(_json_safe(v))


def _to_json(obj: dict[str, Any]) -> str:
    return to_json({k: _json_safe(v) for k, v in obj.items()})
