"""The `postgres` source: pgoutput logical replication with an initial snapshot.

Positions: every change carries the end LSN of its transaction's commit record
(what START_REPLICATION resumes after and what the standby status confirms), so a
restart from a destination checkpoint neither skips nor repeats a transaction. A
transaction larger than ``batch_size * SPILL_FACTOR`` rows is sent in parts marked
incomplete; their changes carry the commit record's start LSN + 1, which still
sorts after every earlier transaction and before this one's end.

The initial snapshot reads every table in the slot's exported snapshot (REPEATABLE
READ + SET TRANSACTION SNAPSHOT) as ``r`` changes, in batches marked incomplete,
and ends with a complete batch at the slot's consistent point: destinations commit
the snapshot as one unit, and streaming continues from exactly that point. A
snapshot interrupted by a crash is started again with a new slot (no destination
has checkpointed any of it).
"""

from __future__ import annotations

import contextlib
import operator
import struct
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import psycopg
from dataflare.cdc.errors import ConfigError, FatalError, RetryableError
from dataflare.cdc.model import (
    Batch,
    Change,
    Column,
    Op,
    Packed,
    Position,
    Row,
    TableId,
    TableSchema,
)
from dataflare.cdc.postgres import pgoutput as po
from dataflare.cdc.postgres.config import PostgresSourceConfig
from dataflare.cdc.postgres.packed import DECODER as PACKED_DECODER
from dataflare.cdc.postgres.packed import bin_header, encoded_txn, pack_encoded
from dataflare.cdc.postgres.replication import (
    PINNED_OPTIONS,
    CommandError,
    ReplicationConnection,
    safe_target,
)
from dataflare.cdc.postgres.types import configure_loaders, load_row
from dataflare.cdc.source import SourceContext
from loguru import logger
from psycopg import abc, pq, sql
from psycopg.adapt import Transformer

KIND = "postgres"
SPILL_FACTOR = 4  # a transaction above batch_size * this many rows is sent in parts
READ_BURST = 512  # messages taken from libpq between clock and status checks
_U64_AT = struct.Struct(">Q").unpack_from
_new_tuple = tuple.__new__  # Change is a NamedTuple: skip its Python-level __new__
_NONE: frozenset[str] = frozenset()
_U32_AT = struct.Struct(">I").unpack_from
# Packed mode (Batch.packed): row messages kept as bytes, keyed by their tag byte.
_ROW_TAGS = frozenset((0x49, 0x55, 0x44))  # 'I', 'U', 'D'
_TRUNCATE_TAG = 0x54
_OP_OF_TAG = {0x49: Op.INSERT, 0x55: Op.UPDATE, 0x44: Op.DELETE, _TRUNCATE_TAG: Op.TRUNCATE}
_REL = operator.itemgetter(1)


def _py_take_packed(
    burst: list[Any],
    start: int,
    relations: dict[int, Any],
    buf: bytearray,
    runs: list[Any],
    count: int,
) -> tuple[int, int]:
    """Packed mode's per-message work on a burst of the stream: each XLogData that
    carries an Insert, Update or Delete of a known relation has its message appended
    to ``buf`` as a msgpack bin, and opens a run (tally key relid << 8 | tag,
    relation, index of its first message) in ``runs`` where the last run's key
    differs; up to the first payload that is anything else (the caller's to
    handle). Its index, or ``len(burst)``, and the count of messages in ``buf``.
    The C twin (``cdc/_speedups.c``) is used when built."""
    i, n = max(start, 0), len(burst)
    last = runs[-1][0] if runs else -1
    while i < n:
        data = burst[i]
        if len(data) < 30 or data[0] != 0x77 or data[25] not in _ROW_TAGS:
            break
        relid = _U32_AT(data, 26)[0]
        rel = relations.get(relid)
        if rel is None:
            break
        tally = relid << 8 | data[25]
        if tally != last:
            runs.append((tally, rel, count))
            last = tally
        buf += bin_header(len(data) - 25)
        buf += data[25:]
        count += 1
        i += 1
    return i, count


take_packed: Any
try:
    from dataflare.cdc._speedups import take_packed
except ImportError:  # not built: the pure-Python twin
    take_packed = _py_take_packed


class _PackedTxn:
    """Packed mode's open transaction: its messages encoded as msgpack where they
    arrived (a bin per row message, an int per truncated relid), one after another,
    and its runs of one relation and kind: (tally key relid << 8 | tag, relation,
    index of the run's first message)."""

    __slots__ = ("buf", "n", "runs")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.runs: list[tuple[int, _Relation, int]] = []
        self.n = 0

    def add_truncate(self, relid: int, rel: _Relation) -> None:
        tally = relid << 8 | _TRUNCATE_TAG
        if not self.runs or self.runs[-1][0] != tally:
            self.runs.append((tally, rel, self.n))
        self.buf += msgpack.packb(relid)
        self.n += 1

    def counts(self) -> Counter[int]:
        """Messages by tally key."""
        runs, out = self.runs, Counter[int]()
        for j, (tally, _, first) in enumerate(runs):
            out[tally] += (runs[j + 1][2] if j + 1 < len(runs) else self.n) - first
        return out

    def relations(self) -> Iterator[_Relation]:
        return (rel for _, rel, _ in self.runs)

    def encoded(
        self, value: int, tag: str, xid: int | None, ts: int | None
    ) -> tuple[bytes, bytearray]:
        """This transaction as packed.pack encodes one: its header, its messages."""
        return encoded_txn(value, tag, xid, ts, self.n), self.buf


@dataclass
class _Relation:
    schema: TableSchema
    oids: list[int]
    tx: abc.Transformer
    key_idx: tuple[int, ...]
    loader_oids: list[int]
    relid: int = 0


class _Pending(NamedTuple):
    """A change of the open transaction (packed mode keeps a _PackedTxn instead)."""

    op: Op
    rel: _Relation
    before: Row | None
    after: Row | None
    unchanged: frozenset[str]


def parse_table_name(text: str) -> TableId:
    """`schema.table` in SQL identifier syntax (quotes, "a.b", ""), default schema public."""
    parts: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == '"':
            j, buf = i + 1, []
            while True:
                if j >= n:
                    raise ConfigError(f"unterminated quoted identifier in {text!r}")
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            parts.append("".join(buf))
            i = j + 1
        else:
            j = text.find(".", i)
            j = n if j < 0 else j
            parts.append(text[i:j].strip().lower())
            i = j
        if i < n:
            if text[i] != ".":
                raise ConfigError(f"bad table name {text!r}")
            i += 1
    if len(parts) == 1:
        return TableId("public", parts[0])
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"bad table name {text!r}: expected schema.table")
    return TableId(parts[0], parts[1])


def catalog_connect(dsn: str, timeout: float = 10.0) -> psycopg.Connection[Any]:
    try:
        conn = psycopg.connect(
            dsn,
            autocommit=True,
            options=PINNED_OPTIONS,
            connect_timeout=max(1, int(timeout)),
            application_name="dataflare",
            # Its loaders decode the replication stream's values, which come as UTF-8.
            client_encoding="UTF8",
        )
    except psycopg.OperationalError as e:
        raise RetryableError(
            f"postgres {safe_target(dsn)}: cannot connect: {_first_line(e)}"
        ) from None
    configure_loaders(conn, fallbacks=False)
    return conn


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


_COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid::int, NOT a.attnotnull,
       coalesce(a.attnum = ANY(i.indkey), false)
FROM pg_attribute a
LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attnum
"""


class PostgresSource:
    def __init__(
        self, name: str, config: PostgresSourceConfig, ctx: SourceContext | None = None
    ) -> None:
        self.name = name
        self.cfg = config
        self.ctx = ctx or SourceContext(workflow=name)
        self.slot = config.slot or self.ctx.default_slot
        self.publication = config.publication or self.ctx.default_slot
        self.target = safe_target(config.dsn)
        self.log = logger.bind(workflow=self.ctx.workflow, component=f"source:{name}")
        self._catalog: psycopg.Connection[Any] | None = None
        self._repl: ReplicationConnection | None = None
        self._prepared: tuple[list[TableId], dict[str, Any] | None] | None = None
        self._relations: dict[int, _Relation] = {}
        self._schema_versions: dict[TableId, TableSchema] = {}
        # streaming state
        self._begin: po.Begin | None = None
        self._txn: list[_Pending] = []
        self._ptxn = _PackedTxn()  # packed mode's open transaction (_txn stays empty)
        self._ready: list[Change] = []
        self._ready_count = 0  # changes ready (in _ready, or packed in _ready_txns)
        self._ready_txns: list[tuple[bytes, bytearray]] = []  # packed: _PackedTxn.encoded
        self._ready_first_end = 0  # packed: the end LSN of the first ready transaction
        self._ready_counts: Counter[int] = Counter()  # packed: by tally key
        self._ready_last: Position | None = None  # set while a complete batch is ready
        self._spilled = False  # the open transaction was partly sent already
        self._ready_rels: dict[TableId, _Relation] = {}  # layouts of the ready changes
        # Rows travel as pgoutput text (Batch.pg_text) when every destination takes them.
        self._pg_text = self.ctx.pg_text
        self._queue: deque[Batch] = deque()  # batches cut at a layout change, sent first
        self._sent_txns: deque[tuple[int, int]] = deque()  # (end_lsn, commit_ts_us) not confirmed
        self._last_sent_end = 0
        self._confirmed = 0
        self._server_wal_end = 0
        self._keepalive_end = 0
        self._next_status = 0.0
        self._start_lsn = 0
        # snapshot state
        self._snap_tables: list[TableId] = []
        self._snap_conn: psycopg.Connection[Any] | None = None
        self._snap_cursor: psycopg.Cursor[Any] | None = None
        self._snap_table_idx = 0
        self._snap_schema: TableSchema | None = None
        self._snap_consistent = 0
        self._snapshot: dict[str, Any] | None = None

    # ------------------------------------------------------------ operators

    @classmethod
    def check(
        cls,
        name: str,
        config: PostgresSourceConfig,
        ctx: SourceContext | None = None,
        *,
        workflow: str | None = None,
    ) -> list[tuple[bool, str]]:
        """`dataflare check`: each line OK or what to fix."""
        src = cls(name, config, ctx or (SourceContext(workflow) if workflow else None))
        out: list[tuple[bool, str]] = []
        try:
            src._catalog = catalog_connect(config.dsn, config.connect_timeout)
            out.append((True, f"connect to {src.target}"))
        except RetryableError as e:
            return [(False, str(e))]
        steps = [("wal_level logical and REPLICATION privilege", src._preflight)]
        try:
            for label, step in steps:
                try:
                    step()
                    out.append((True, label))
                except (FatalError, RetryableError) as e:
                    out.append((False, str(e)))
            try:
                tables = (
                    src._publication_tables()
                    if not config.tables
                    else [parse_table_name(t) for t in config.tables]
                )
                src._check_replica_identity(tables)
                out.append((True, f"replica identity of {len(tables)} table(s)"))
            except (FatalError, RetryableError) as e:
                out.append((False, str(e)))
            try:
                slot = src._slot_info()
                out.append(
                    (
                        True,
                        f"slot {src.slot}: "
                        + (
                            "will be created"
                            if slot is None
                            else f"confirmed at {slot['confirmed_flush']}"
                        ),
                    )
                )
            except (FatalError, RetryableError) as e:
                out.append((False, str(e)))
            repl = ReplicationConnection(config.dsn, config.connect_timeout)
            try:
                repl.connect()
                out.append((True, "replication connection"))
            except (FatalError, RetryableError) as e:
                out.append((False, str(e)))
            finally:
                repl.close()
        finally:
            src.close()
        return out

    @classmethod
    def drop_slot(
        cls,
        name: str,
        config: PostgresSourceConfig,
        ctx: SourceContext | None = None,
        *,
        workflow: str | None = None,
    ) -> bool:
        """Drop the workflow's slot (a removed workflow with drop_slot_on_remove)."""
        src = cls(name, config, ctx or (SourceContext(workflow) if workflow else None))
        try:
            src._catalog = catalog_connect(config.dsn, config.connect_timeout)
            row = src._catalog.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = %s AND active_pid IS NULL",
                (src.slot,),
            ).fetchone()
            return row is not None
        finally:
            src.close()

    # ------------------------------------------------------------------ open

    def prepare(self) -> None:
        if self._prepared is None:
            self._prepared = self._prepare()

    def _prepare(self) -> tuple[list[TableId], dict[str, Any] | None]:
        """Connect, check the server, make the publication, look up the slot and
        open the replication connection: all that needs no start position."""
        self._catalog = catalog_connect(self.cfg.dsn, self.cfg.connect_timeout)
        self._preflight()
        tables = self._ensure_publication()
        slot = self._slot_info()
        self._repl = ReplicationConnection(self.cfg.dsn, self.cfg.connect_timeout)
        self._repl.connect()
        return tables, slot

    def open(self, start: Position | None) -> None:
        if start is not None and start.kind != KIND:
            raise FatalError(
                f"postgres source {self.name}: cannot resume from a {start.kind} position"
            )
        tables, slot = self._prepared or self._prepare()
        self._prepared = None
        if start is not None:
            if slot is None:
                raise FatalError(
                    f"postgres source {self.name}: replication slot {self.slot!r} is gone but the "
                    f"destinations are at {start}: changes since then are lost. Recreate the "
                    "workflow's state (a new initial snapshot) deliberately: drop the destination "
                    "checkpoints and restart"
                )
            self._start_streaming(start.value)
            return
        if self.cfg.snapshot == "initial":
            if slot is not None:
                self.log.warning(
                    "slot {} exists but no destination has a checkpoint: dropping it "
                    "and taking the initial snapshot again",
                    self.slot,
                )
                self._drop_slot()
            consistent, snapshot_name = self._create_slot(export=True)
            self._begin_snapshot(tables, snapshot_name, consistent)
            return
        if slot is None:
            self._create_slot(export=False)
        self._start_streaming(0)

    def _preflight(self) -> None:
        assert self._catalog is not None
        row = self._catalog.execute(
            "SELECT current_setting('wal_level'), r.rolreplication OR r.rolsuper "
            "FROM pg_roles r WHERE r.rolname = current_user"
        ).fetchone()
        assert row is not None
        if row[0] != "logical":
            raise FatalError(
                f"postgres {self.target}: wal_level is {row[0]}; logical replication needs "
                "`ALTER SYSTEM SET wal_level = logical` and a server restart"
            )
        if not row[1]:
            raise FatalError(
                f"postgres {self.target}: the user lacks the REPLICATION attribute; run "
                "`ALTER ROLE <user> REPLICATION`"
            )

    def _ensure_publication(self) -> list[TableId]:
        assert self._catalog is not None
        cur = self._catalog.cursor()
        exists = cur.execute(
            "SELECT puballtables FROM pg_publication WHERE pubname = %s", (self.publication,)
        ).fetchone()
        if self.cfg.tables:
            wanted = [parse_table_name(t) for t in self.cfg.tables]
            for t in wanted:
                if cur.execute(
                    "SELECT to_regclass(%s)",
                    (sql.Identifier(t.schema, t.name).as_string(self._catalog),),
                ).fetchone() == (None,):
                    raise FatalError(f"postgres source {self.name}: table {t} does not exist")
            idents = sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in wanted)
            if exists is None:
                cur.execute(
                    sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                        sql.Identifier(self.publication), idents
                    )
                )
                self.log.info(
                    "created publication {} for {} table(s)", self.publication, len(wanted)
                )
            elif set(self._publication_tables()) != set(wanted):
                cur.execute(
                    sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(
                        sql.Identifier(self.publication), idents
                    )
                )
                self.log.info("publication {} now covers the configured tables", self.publication)
        elif exists is None:
            raise ConfigError(
                f"postgres source {self.name}: publication {self.publication!r} does not exist; "
                "create it or list `tables` so DataFlare creates it"
            )
        tables = self._publication_tables()
        self._check_replica_identity(tables)
        return tables

    def _publication_tables(self) -> list[TableId]:
        assert self._catalog is not None
        rows = self._catalog.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s "
            "ORDER BY 1, 2",
            (self.publication,),
        ).fetchall()
        return [TableId(s, t) for s, t in rows]

    def _check_replica_identity(self, tables: list[TableId]) -> None:
        assert self._catalog is not None
        bad = []
        for t in tables:
            row = self._catalog.execute(
                "SELECT c.relreplident, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid "
                "AND (i.indisprimary OR i.indisreplident)) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relname = %s",
                (t.schema, t.name),
            ).fetchone()
            if row and row[0] in ("d", "n") and (row[0] == "n" or not row[1]):
                bad.append(t)
        if bad:
            names = ", ".join(str(t) for t in bad)
            fix = "; ".join(
                f"ALTER TABLE {sql.Identifier(t.schema, t.name).as_string(self._catalog)} "
                "REPLICA IDENTITY FULL"
                for t in bad
            )
            raise FatalError(
                f"postgres source {self.name}: {names} cannot have updates or deletes replicated "
                "(no primary key and REPLICA IDENTITY DEFAULT/NOTHING). "
                f"Add a primary key, or: {fix}"
            )

    def _slot_info(self) -> dict[str, Any] | None:
        assert self._catalog is not None
        row = self._catalog.execute(
            "SELECT plugin, active_pid, wal_status, confirmed_flush_lsn::text, database "
            "FROM pg_replication_slots WHERE slot_name = %s",
            (self.slot,),
        ).fetchone()
        if row is None:
            return None
        plugin, active_pid, wal_status, confirmed, database = row
        if plugin != "pgoutput":
            raise FatalError(
                f"postgres source {self.name}: slot {self.slot!r} uses plugin "
                f"{plugin!r}, not pgoutput; pick another `slot` name"
            )
        if wal_status == "lost":
            raise FatalError(
                f"postgres source {self.name}: slot {self.slot!r} was invalidated "
                "(wal_status lost: "
                "WAL it needed was removed, see max_slot_wal_keep_size); changes are lost. Drop "
                "the slot and the destination checkpoints to start over with a new snapshot"
            )
        if active_pid is not None:
            raise RetryableError(
                f"postgres source {self.name}: slot {self.slot!r} is in use by "
                f"server process {active_pid} (another DataFlare?)"
            )
        return {"confirmed_flush": confirmed, "database": database}

    def _create_slot(self, export: bool) -> tuple[int, str | None]:
        assert self._repl is not None
        mode = "EXPORT_SNAPSHOT" if export else "NOEXPORT_SNAPSHOT"
        try:
            rows = self._repl.command(
                f'CREATE_REPLICATION_SLOT "{self.slot.replace(chr(34), chr(34) * 2)}" '
                f"LOGICAL pgoutput {mode}"
            )
        except CommandError as e:
            raise RetryableError(
                f"postgres source {self.name}: cannot create slot {self.slot!r}: {e}"
            ) from None
        _, consistent, snapshot_name, _ = rows[0]
        assert consistent is not None
        self.log.info("created replication slot {} at {}", self.slot, consistent)
        return po.parse_lsn(consistent), snapshot_name

    def _drop_slot(self) -> None:
        assert self._catalog is not None
        self._catalog.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))

    def _start_streaming(self, lsn: int) -> None:
        assert self._repl is not None
        try:
            self._repl.start(self.slot, lsn, self.publication)
        except CommandError as e:
            if e.sqlstate == "55006":  # object_in_use
                raise RetryableError(
                    f"postgres source {self.name}: slot {self.slot!r} is active in another process"
                ) from None
            if e.sqlstate == "42704":  # undefined_object
                raise FatalError(f"postgres source {self.name}: {e}") from None
            raise
        self._start_lsn = lsn
        self._confirmed = max(self._confirmed, lsn)
        self._last_sent_end = max(self._last_sent_end, lsn)
        self.log.info(
            "streaming from slot {} after {}{}",
            self.slot,
            po.format_lsn(lsn),
            ", rows packed as PostgreSQL text" if self._pg_text else "",
        )

    # -------------------------------------------------------------- snapshot

    def _begin_snapshot(
        self, tables: list[TableId], snapshot_name: str | None, consistent: int
    ) -> None:
        conn = psycopg.connect(
            self.cfg.dsn, options=PINNED_OPTIONS, application_name="dataflare-snapshot"
        )
        configure_loaders(conn)
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
        estimates: dict[str, int | None] = {}
        for t in tables:
            row = conn.execute(
                "SELECT c.reltuples::bigint FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
                (t.schema, t.name),
            ).fetchone()
            # reltuples is -1 for a table never vacuumed or analyzed: unknown, not 0
            estimates[str(t)] = int(row[0]) if row and row[0] >= 0 else None
        self._snap_conn = conn
        self._snap_tables = tables
        self._snap_table_idx = -1
        self._snap_consistent = consistent
        self._snapshot = {
            "state": "running",
            "tables_total": len(tables),
            "tables_done": 0,
            "rows_done": 0,
            # an estimate (pg_class.reltuples); None when a table was never analyzed
            "rows_total": None
            if None in estimates.values()
            else sum(v for v in estimates.values() if v is not None),
            "table": None,
            "estimates": estimates,
        }
        self.log.info(
            "initial snapshot of {} table(s) at {}", len(tables), po.format_lsn(consistent)
        )

    def _next_snapshot_table(self) -> bool:
        assert self._snap_conn is not None
        if self._snap_cursor is not None:
            self._snap_cursor.close()
            self._snap_cursor = None
            assert self._snapshot is not None
            self._snapshot["tables_done"] += 1
        self._snap_table_idx += 1
        if self._snap_table_idx >= len(self._snap_tables):
            return False
        t = self._snap_tables[self._snap_table_idx]
        schema = self._table_schema_by_name(t, self._snap_conn)
        self._snap_schema = schema
        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in schema.columns)
        cur = self._snap_conn.cursor(name=f"dataflare_snapshot_{self._snap_table_idx}")
        cur.itersize = self.cfg.batch_size
        cur.execute(sql.SQL("SELECT {} FROM {}").format(cols, sql.Identifier(t.schema, t.name)))
        self._snap_cursor = cur
        assert self._snapshot is not None
        self._snapshot["table"] = str(t)
        return True

    def _snapshot_batch(self) -> Batch:
        assert self._snapshot is not None
        pos = Position(KIND, self._snap_consistent, "snapshot")
        while True:
            if self._snap_cursor is None and not self._next_snapshot_table():
                return self._finish_snapshot(pos)
            assert self._snap_cursor is not None and self._snap_schema is not None
            rows = self._snap_cursor.fetchmany(self.cfg.batch_size)
            if not rows:
                self._next_snapshot_table()
                continue
            schema = self._snap_schema
            kidx = schema.key_indexes()
            changes = [
                Change(
                    Op.READ,
                    schema.table,
                    pos,
                    key=tuple(r[i] for i in kidx) if kidx else None,
                    after=tuple(r),
                )
                for r in rows
            ]
            self._snapshot["rows_done"] += len(rows)
            return Batch(changes, [schema], pos, pos, complete=False)

    def _finish_snapshot(self, pos: Position) -> Batch:
        assert self._snap_conn is not None and self._snapshot is not None
        self._snap_conn.execute("COMMIT")
        self._snap_conn.close()
        self._snap_conn = None
        self._snapshot["state"] = "done"
        self._snapshot["table"] = None
        self.log.info("initial snapshot done: {} rows", self._snapshot["rows_done"])
        self._start_streaming(self._snap_consistent)
        # The complete, empty batch that lets destinations commit the snapshot.
        return Batch([], [], pos, Position(KIND, self._snap_consistent), complete=True)

    # ------------------------------------------------------------- relations

    def _table_schema_by_name(self, t: TableId, conn: psycopg.Connection[Any]) -> TableSchema:
        row = conn.execute(
            "SELECT c.oid::int FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s",
            (t.schema, t.name),
        ).fetchone()
        if row is None:
            raise FatalError(f"postgres source {self.name}: table {t} disappeared")
        return self._table_schema(t, row[0], conn)[0]

    def _table_schema(
        self, t: TableId, relid: int, conn: psycopg.Connection[Any]
    ) -> tuple[TableSchema, list[int]]:
        rows = conn.execute(_COLUMNS_SQL, (relid,)).fetchall()
        columns = tuple(
            Column(name, tname, nullable, oid) for name, tname, oid, nullable, _ in rows
        )
        key = tuple(name for name, _, _, _, pk in rows if pk)
        schema = TableSchema(t, columns, key)
        prev = self._schema_versions.get(t)
        if prev is not None and (prev.columns, prev.key) != (columns, key):
            schema = TableSchema(t, columns, key, prev.version + 1)
            self.log.info("schema of {} changed (version {})", t, schema.version)
        elif prev is not None:
            schema = prev
        self._schema_versions[t] = schema
        return schema, [oid for _, _, oid, _, _ in rows]

    def _on_relation(self, msg: po.Relation) -> None:
        """A table's layout as the following tuples carry it (the historic one while
        catching up); the current catalog adds type names with modifiers and the key."""
        assert self._catalog is not None
        t = TableId(msg.namespace, msg.name)
        catalog = {
            name: (tname, oid, nullable, pk)
            for name, tname, oid, nullable, pk in self._catalog.execute(
                _COLUMNS_SQL, (msg.relid,)
            ).fetchall()
        }
        columns = []
        for c in msg.columns:
            known = catalog.get(c.name)
            same = known is not None and known[1] == c.type_oid
            tname = known[0] if same and known else self._format_type(c)
            columns.append(Column(c.name, tname, known[2] if known else True, c.type_oid))
        if msg.replica_identity == "i":  # REPLICA IDENTITY USING INDEX: that index is the key
            key = tuple(c.name for c in msg.columns if c.is_key)
        else:
            key = tuple(c.name for c in msg.columns if c.name in catalog and catalog[c.name][3])
        prev = self._schema_versions.get(t)
        if prev is not None and (prev.columns, prev.key) == (tuple(columns), key):
            schema = prev
        else:
            schema = TableSchema(t, tuple(columns), key, prev.version + 1 if prev else 1)
            if prev is not None:
                self.log.info("layout of {} changed (version {})", t, schema.version)
        self._schema_versions[t] = schema
        old = self._relations.get(msg.relid)
        if old is not None and old.schema is not schema:
            self._cut_at_layout_change(t)
            if old.schema.table != t:  # renamed: its earlier changes go under the old name
                self._cut_at_layout_change(old.schema.table)
        if any(r.schema.table == t for rid, r in self._relations.items() if rid != msg.relid):
            # Another relation had this name (dropped and created again, or renamed
            # away and another renamed in): a batch maps each name to one relation.
            self._cut_at_layout_change(t)
        tx = Transformer(self._catalog)
        oids = [c.type_oid for c in msg.columns]
        loader_oids = self._loader_oids(oids)
        tx.set_loader_types(loader_oids, pq.Format.TEXT)
        names = schema.column_names
        self._relations[msg.relid] = _Relation(
            schema, oids, tx, tuple(names.index(k) for k in key), loader_oids, msg.relid
        )

    def _cut_at_layout_change(self, table: TableId) -> None:
        """A batch has one layout per table: changes buffered under the old layout
        leave in batches of their own before any change in the new one."""
        in_txn = any(r.schema.table == table for r in self._ptxn.relations()) or any(
            p[1].schema.table == table for p in self._txn
        )
        in_ready = table in self._ready_rels
        if (in_txn or in_ready) and self._ready_last is not None:
            self._queue.append(self._take_ready())
        if in_txn:  # DDL inside the transaction: its first part goes out incomplete
            self._queue.append(self._spill())

    def _loader_oids(self, oids: list[int]) -> list[int]:
        """Domains load as their base type (psycopg has no loader for a domain's OID)."""
        assert self._catalog is not None
        resolved = list(oids)
        for _ in range(8):  # domains over domains: follow a few levels
            rows = self._catalog.execute(
                "SELECT oid::int, typbasetype::int FROM pg_type "
                "WHERE typtype = 'd' AND oid = ANY(%s)",
                (resolved,),
            ).fetchall()
            if not rows:
                break
            base = dict(rows)
            resolved = [base.get(o, o) for o in resolved]
        return resolved

    def _format_type(self, c: po.RelationColumn) -> str:
        assert self._catalog is not None
        row = self._catalog.execute("SELECT format_type(%s, %s)", (c.type_oid, c.typmod)).fetchone()
        return str(row[0]) if row else "text"

    def _load(self, rel: _Relation, data: po.TupleData) -> tuple[Row, frozenset[str]]:
        unchanged: frozenset[str] = _NONE
        values: Any = data
        if po.UNCHANGED in data:
            names = rel.schema.column_names
            unchanged = frozenset(names[i] for i, v in enumerate(data) if v is po.UNCHANGED)
            values = [v if isinstance(v, bytes) else None for v in data]
        if self._pg_text:  # the text form travels as it is (Batch.pg_text)
            return tuple(values), unchanged
        return load_row(rel.tx, rel.loader_oids, values), unchanged

    # ------------------------------------------------------------- streaming

    def read_batch(self, timeout: float) -> Batch | None:
        if self._snapshot is not None and self._snapshot["state"] == "running":
            return self._snapshot_batch()
        assert self._repl is not None
        now = time.monotonic()
        end = now + timeout
        first_at: float | None = time.monotonic() if self._ready_last else None
        spill = self.cfg.batch_size * SPILL_FACTOR
        while True:
            if self._queue:
                return self._queue.popleft()
            now = time.monotonic()
            self._maybe_send_status(now)
            if self._ready_last is not None and (
                self._ready_count >= self.cfg.batch_size
                or (first_at is not None and now - first_at >= self.cfg.batch_timeout)
            ):
                return self._take_ready()
            if len(self._txn) >= spill or self._ptxn.n >= spill:
                # Memory stays bounded however fast a large transaction arrives:
                # what is ready goes first, then the transaction's part.
                return self._take_ready() if self._ready_last is not None else self._spill()
            wait = end - now
            if first_at is not None:
                wait = min(wait, first_at + self.cfg.batch_timeout - now)
            if wait <= 0:
                return self._take_ready() if self._ready_last is not None else None
            handle = self._handle
            decode = po.decode
            raw = self._pg_text
            relations = self._relations
            burst = self._repl.read_many(min(wait, self.cfg.status_interval), READ_BURST)
            i, n = 0, len(burst)
            while i < n:
                if raw:
                    # Row changes are kept as the server sent them, split by the apply
                    # process (cdc.postgres.packed); a C loop over the burst encodes
                    # them up to the next message of another kind. (self._ptxn is
                    # swapped by a Begin, a commit or a layout change's spill.)
                    ptxn = self._ptxn
                    i, ptxn.n = take_packed(burst, i, relations, ptxn.buf, ptxn.runs, ptxn.n)
                    if i == n:
                        break
                data = burst[i]
                i += 1
                tag = data[0]
                if tag == 0x77:  # XLogData: start, end, send time, then one pgoutput message
                    if raw and len(data) >= 30 and data[25] in _ROW_TAGS:
                        self._rel(_U32_AT(data, 26)[0])  # not taken: the relation is unknown
                    committed = handle(decode(data[25:]))
                    if committed and first_at is None:
                        first_at = time.monotonic()
                else:
                    msg = po.decode_copy(data)
                    if isinstance(msg, po.Keepalive):
                        self._server_wal_end = max(self._server_wal_end, msg.wal_end)
                        self._keepalive_end = max(self._keepalive_end, msg.wal_end)
                        if msg.reply_requested:
                            self._next_status = 0.0
            for data in reversed(burst):  # the server's WAL end, for lag in bytes
                if data[0] == 0x77:
                    self._server_wal_end = max(self._server_wal_end, _U64_AT(data, 9)[0])
                    break
            if (
                burst
                and len(burst) < READ_BURST
                and self._ready_last is not None
                and self.ctx.downstream_idle()
            ):
                # Drained what the server had sent and the apply side is idle: ship
                # now rather than wait out batch_timeout (low latency when tailing).
                # While the apply side is busy, keep filling: bigger batches then.
                # Batches cut at a layout change go first: order is everything.
                self._queue.append(self._take_ready())
                return self._queue.popleft()

    def _handle(self, msg: po.Message) -> bool:
        """Apply one message to the transaction buffer; True when a commit made changes ready."""
        if isinstance(msg, po.Insert):
            rel = self._rel(msg.relid)
            after, _ = self._load(rel, msg.new)
            self._txn.append(_new_tuple(_Pending, (Op.INSERT, rel, None, after, _NONE)))
        elif isinstance(msg, po.Update):
            rel = self._rel(msg.relid)
            after, unchanged = self._load(rel, msg.new)
            before = self._load(rel, msg.old)[0] if msg.old is not None else None
            self._txn.append(_Pending(Op.UPDATE, rel, before, after, unchanged))
        elif isinstance(msg, po.Delete):
            rel = self._rel(msg.relid)
            before, _ = self._load(rel, msg.old)
            self._txn.append(_Pending(Op.DELETE, rel, before, None, frozenset()))
        elif isinstance(msg, po.Begin):
            self._begin = msg
            self._txn = []
            self._ptxn = _PackedTxn()
        elif isinstance(msg, po.Commit):
            return self._commit(msg)
        elif isinstance(msg, po.Relation):
            self._on_relation(msg)
        elif isinstance(msg, po.Truncate):
            for relid in msg.relids:
                rel = self._rel(relid)
                if self._pg_text:
                    self._ptxn.add_truncate(relid, rel)
                else:
                    self._txn.append(_Pending(Op.TRUNCATE, rel, None, None, frozenset()))
        return False

    def _rel(self, relid: int) -> _Relation:
        rel = self._relations.get(relid)
        if rel is None:
            raise FatalError(
                f"postgres source {self.name}: change for relation {relid} before its "
                "Relation message (protocol violation)"
            )
        return rel

    def _changes(
        self, pending: list[_Pending], pos: Position, xid: int | None, ts: int | None
    ) -> list[Change]:
        out: list[Change] = []
        append = out.append
        new = _new_tuple
        for op, rel, before, after, unchanged in pending:
            kidx = rel.key_idx
            row = after if after is not None else before
            key = tuple([row[i] for i in kidx]) if (kidx and row is not None) else None
            append(new(Change, (op, rel.schema.table, pos, key, before, after, unchanged, xid, ts)))
        return out

    def _commit(self, msg: po.Commit) -> bool:
        begin = self._begin
        self._begin = None
        pending, self._txn = self._txn, []
        ptxn, self._ptxn = self._ptxn, _PackedTxn()
        spilled, self._spilled = self._spilled, False
        if not pending and not ptxn.n and not spilled:
            return False  # nothing published in it; the keepalive heartbeat covers it
        # A spilled transaction always ends with a complete batch, even an empty one.
        pos = Position(KIND, msg.end_lsn)
        xid = begin.xid if begin else None
        if self._pg_text:
            # (a layout change inside the transaction spilled what came before it, so
            # each run's relation is the current one)
            for rel in ptxn.relations():
                self._ready_rels[rel.schema.table] = rel
            if not self._ready_txns:
                self._ready_first_end = msg.end_lsn
            self._ready_txns.append(ptxn.encoded(msg.end_lsn, "", xid, msg.commit_ts_us))
            self._ready_counts.update(ptxn.counts())
            self._ready_count += ptxn.n
        else:
            # Relations by id (hashing a _Relation's TableId per change would cost more).
            for rel in {id(r): r for r in map(_REL, pending)}.values():
                self._ready_rels[rel.schema.table] = rel
            self._ready.extend(self._changes(pending, pos, xid, msg.commit_ts_us))
            self._ready_count += len(pending)
        self._ready_last = pos
        self._sent_txns.append((msg.end_lsn, msg.commit_ts_us))
        return True

    def _take_ready(self) -> Batch:
        changes, self._ready = self._ready, []
        assert self._ready_last is not None
        last, self._ready_last = self._ready_last, None
        self._last_sent_end = max(self._last_sent_end, last.value)
        rels = [r for _, r in sorted(self._ready_rels.items())]
        self._ready_rels = {}
        count, self._ready_count = self._ready_count, 0
        schemas = [r.schema for r in rels]
        if self._pg_text:
            txns, self._ready_txns = self._ready_txns, []
            counts, self._ready_counts = self._ready_counts, Counter()
            first = Position(KIND, self._ready_first_end) if txns else last
            packed = self._pack(rels, schemas, txns, count, counts)
            return Batch([], schemas, first, last, True, pg_text=self._texts(rels), packed=packed)
        first = changes[0].position if changes else last
        return Batch(changes, schemas, first, last, complete=True)

    @staticmethod
    def _pack(
        rels: list[_Relation],
        schemas: list[TableSchema],
        txns: list[tuple[bytes, bytearray]],
        count: int,
        counts: Counter[int],
    ) -> Packed:
        index = {s.table: i for i, s in enumerate(schemas)}
        relids = [[r.relid, index[r.schema.table]] for r in rels]
        tables = {r.relid: r.schema.table for r in rels}
        tally: dict[tuple[TableId, Op], int] = {}
        for key, n in counts.items():
            k = (tables[key >> 8], _OP_OF_TAG[key & 0xFF])
            tally[k] = tally.get(k, 0) + n
        return Packed(PACKED_DECODER, count, pack_encoded(relids, txns), tally)

    def _texts(self, rels: Iterable[_Relation]) -> dict[TableId, tuple[int, ...]]:
        if not self._pg_text:
            return {}
        return {r.schema.table: tuple(r.loader_oids) for r in rels}

    def _spill(self) -> Batch:
        """Part of a transaction too large to hold: sent as an incomplete batch."""
        assert self._begin is not None
        pending, self._txn = self._txn, []
        ptxn, self._ptxn = self._ptxn, _PackedTxn()
        self._spilled = True
        pos = Position(KIND, self._begin.final_lsn + 1, "partial")
        xid, ts = self._begin.xid, self._begin.commit_ts_us
        if self._pg_text:
            rels = [r for _, r in sorted({r.schema.table: r for r in ptxn.relations()}.items())]
            schemas = [r.schema for r in rels]
            txn = ptxn.encoded(pos.value, pos.tag, xid, ts)
            packed_rows = self._pack(rels, schemas, [txn], ptxn.n, ptxn.counts())
            return Batch(
                [], schemas, pos, pos, False, pg_text=self._texts(rels), packed=packed_rows
            )
        rels = [r for _, r in sorted({p[1].schema.table: p[1] for p in pending}.items())]
        schemas = [r.schema for r in rels]
        changes = self._changes(pending, pos, xid, ts)
        return Batch(changes, schemas, pos, pos, complete=False)

    def _idle(self) -> bool:
        return (
            self._begin is None
            and self._ready_last is None
            and not self._queue
            and self._last_sent_end <= self._confirmed
        )

    def _maybe_send_status(self, now: float) -> None:
        if now < self._next_status or self._repl is None or not self._repl.streaming:
            return
        flush = self._confirmed
        if self._idle():
            # Nothing in flight: transactions up to the keepalive's WAL end were all
            # delivered or touched no published table, so confirming it frees WAL.
            flush = max(flush, self._keepalive_end)
        self._repl.send_status(flush)
        self._next_status = now + self.cfg.status_interval

    def confirm(self, position: Position) -> None:
        if position.kind != KIND:
            return
        if position.value > self._confirmed:
            self._confirmed = position.value
            while self._sent_txns and self._sent_txns[0][0] <= self._confirmed:
                self._sent_txns.popleft()

    @property
    def exhausted(self) -> bool:
        return False

    def status(self) -> dict[str, Any]:
        lag_seconds = 0.0
        if self._sent_txns and self._sent_txns[0][0] > self._confirmed:
            lag_seconds = max(0.0, time.time() - self._sent_txns[0][1] / 1e6)
        snapshot = None
        if self._snapshot is not None:
            snapshot = {k: v for k, v in self._snapshot.items() if k != "estimates"}
        return {
            "position": po.format_lsn(max(self._last_sent_end, self._start_lsn)),
            "confirmed": po.format_lsn(self._confirmed),
            "server_wal_end": po.format_lsn(self._server_wal_end),
            "lag_bytes": max(0, self._server_wal_end - self._confirmed)
            if self._server_wal_end
            else 0,
            "lag_seconds": round(lag_seconds, 3),
            "snapshot": snapshot,
            "slot": self.slot,
        }

    def close(self) -> None:
        self._prepared = None
        if self._repl is not None:
            if self._repl.streaming:
                with contextlib.suppress(RetryableError):
                    self._repl.send_status(self._confirmed)
            self._repl.close()
            self._repl = None
        for c in (self._snap_conn, self._catalog):
            if c is not None:
                c.close()
        self._snap_conn = self._catalog = None
