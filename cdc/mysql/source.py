"""The `mysql` source (MySQL and MariaDB): initial snapshot, then the binlog.

A reader thread owns the blocking replication connection
(:class:`~dataflare.cdc.mysql.binlog.BinlogStream`): it reads events, assembles
whole transactions and puts them on a bounded queue; :meth:`read_batch` takes
transactions off the queue until ``batch_size`` changes or ``batch_timeout``, so it
returns within its timeout whatever the connection does. A full queue blocks the
reader, which stops reading the socket: back-pressure reaches the server.

Positions (see :mod:`dataflare.cdc.mysql.positions`): every change carries the end
of its transaction's commit event. A transaction is handed over only when its
commit event has been read, so every resume point is a transaction boundary (trap
3 of the library). A transaction larger than ``batch_size`` is cut into batches
with ``complete=False`` except the last.

Reconnects: when the connection is lost or silent for ``read_timeout`` (the server
sends heartbeats every ``heartbeat``), the reader reconnects with exponential
backoff (0.1 s doubling to ``max_backoff``) from the end of the last transaction
it handed over: our own commit position, never the library's.

Resuming: the start position's tag names the binlog file and the server identity.
A different server (``server_id``/``server_uuid``), a purged binlog file, or a
position past the end of its file (binlog reset) stops the workflow (FatalError)
instead of silently skipping data.

Transactions touching none of the configured tables still advance the position:
an empty batch is sent at most once a second so destinations checkpoint it.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from dataflare.cdc.errors import ConfigError, DataflareError, FatalError, RetryableError
from dataflare.cdc.model import Batch, Change, Op, Position, Row, TableId, TableSchema
from dataflare.cdc.mysql import positions as P
from dataflare.cdc.mysql.binlog import (
    BinlogStream,
    Gtid,
    Heartbeat,
    Query,
    Rotate,
    Rows,
    ServerInfo,
    StreamLost,
    Xid,
    connect,
    server_info,
)
from dataflare.cdc.mysql.config import MysqlSourceConfig
from dataflare.cdc.mysql.decode import Layout, ZeroDates
from dataflare.cdc.mysql.snapshot import Snapshot, SnapshotTable
from dataflare.cdc.source import SourceContext
from loguru import logger

QUEUE_ITEMS = 64
IDLE_EMIT_S = 1.0
_OPS = {"c": Op.INSERT, "u": Op.UPDATE, "d": Op.DELETE}


_IDENT = r"(?:`(?:[^`]|``)+`|[\w$]+)"
_ALTER_ADD = re.compile(
    rf"\s*ALTER\s+(?:ONLINE\s+|IGNORE\s+)*TABLE\s+(?:IF\s+EXISTS\s+)?"
    rf"(?:(?P<db>{_IDENT})\s*\.\s*)?(?P<table>{_IDENT}).*?\bADD\s+(?!(?:INDEX|KEY|"
    r"CONSTRAINT|PRIMARY|UNIQUE|FOREIGN|FULLTEXT|SPATIAL|PARTITION|CHECK|PERIOD|SYSTEM)\b)",
    re.IGNORECASE | re.DOTALL,
)


def _unquote(name: str) -> str:
    if name.startswith("`") and name.endswith("`"):
        return name[1:-1].replace("``", "`")
    return name


def parse_table_name(text: str) -> TableId:
    """``db.table`` in SQL identifier syntax (backticks or double quotes allowed)."""
    parts: list[str] = []
    cur = ""
    quote_ch = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote_ch:
            if ch == quote_ch:
                if i + 1 < len(text) and text[i + 1] == quote_ch:
                    cur += ch
                    i += 1
                else:
                    quote_ch = ""
            else:
                cur += ch
        elif ch in '`"':
            quote_ch = ch
        elif ch == ".":
            parts.append(cur)
            cur = ""
        else:
            cur += ch.strip()
        i += 1
    parts.append(cur)
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"mysql source: table {text!r} must be written db.table")
    return TableId(parts[0], parts[1])


def _schema_record(schema: TableSchema) -> dict[str, Any]:
    return {
        "table": str(schema.table),
        "columns": [[c.name, c.type_name, c.nullable] for c in schema.columns],
        "key": list(schema.key),
        "version": schema.version,
    }


@dataclass(slots=True)
class _Txn:
    position: Position
    rows: list[tuple[str, TableId, Layout, Row, Row | None]] = field(default_factory=list)
    xid: int | None = None
    ts: int = 0
    ddl: list[tuple[str, str]] = field(default_factory=list)  # (schema, statement)


@dataclass(slots=True)
class _Chunk:
    table: SnapshotTable
    rows: list[Row]
    position: Position
    more: bool = False  # a table re-read: more chunks of this position follow
    ddl: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class _SnapshotDone:
    position: Position


@dataclass(slots=True)
class _Failed:
    error: BaseException


_Item = _Txn | _Chunk | _SnapshotDone | _Failed


class MysqlBinlogSource:
    def __init__(
        self,
        name: str,
        config: MysqlSourceConfig,
        ctx: SourceContext | None = None,
        *,
        state: Any = None,
    ) -> None:
        self.name = name
        self.cfg = config
        self.ctx = ctx
        # Snapshot progress and schema history go to the daemon's state store (LMDB)
        # when there is one: passed in (tests), or the worker's, from the context.
        self.state = state
        self.workflow = ctx.workflow if ctx else ""
        if not config.tables:
            raise ConfigError(f"mysql source {name}: tables is required (db.table entries)")
        self.tables = [parse_table_name(t) for t in config.tables]
        self.zero_dates: ZeroDates = "error" if config.zero_dates == "error" else "null"
        self.settings: dict[str, Any] = {
            "host": config.host,
            "port": config.port,
            "user": config.user,
            "password": config.password or "",
        }
        self._queue: queue.Queue[_Item] = queue.Queue(QUEUE_ITEMS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: list[Change] = []  # rest of a transaction cut by batch_size
        self._pending_schemas: list[TableSchema] = []
        self._pending_last: Position | None = None
        self._versions: dict[TableId, tuple[object, TableSchema]] = {}
        self._pending_open = False  # the pending changes end inside a table re-read
        self._head: _Item | None = None  # an item taken off the queue for the next batch
        self._idle_first: Position | None = None
        self._idle_last: Position | None = None
        self._sent: Position | None = None  # last position handed out in a batch
        self._read: Position | None = None  # last position read (possibly not yet sent)
        self._last_emit = 0.0
        self._confirmed: Position | None = None
        self._snapshot_status: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._last_commit_ts = 0
        self._reconnects = 0
        self.info: ServerInfo | None = None
        self.ident = ""

    # ------------------------------------------------------------ operators

    @classmethod
    def check(
        cls, name: str, config: MysqlSourceConfig, *, workflow: str | None = None
    ) -> list[tuple[bool, str]]:
        """`dataflare check`: each line OK or what to fix."""
        src = cls(name, config, SourceContext(workflow or name))
        target = f"{config.host}:{config.port}"
        try:
            info = server_info(src.settings)
        except (FatalError, RetryableError) as e:
            return [(False, f"connect to {target}: {e}")]
        out: list[tuple[bool, str]] = [(True, f"connect to {target} ({info.version})")]
        for label, ok, fix in (
            ("binary log on", bool(info.logs), "start the server with log_bin"),
            (
                "binlog_format ROW",
                info.binlog_format.upper() == "ROW",
                f"binlog_format is {info.binlog_format}: set binlog_format=ROW",
            ),
            (
                "binlog_row_image FULL",
                info.row_image.upper() == "FULL",
                f"binlog_row_image is {info.row_image}: set binlog_row_image=FULL",
            ),
            (
                "binlog_row_metadata FULL",
                info.row_metadata.upper() == "FULL",
                f"binlog_row_metadata is {info.row_metadata or 'unsupported'}: set "
                "binlog_row_metadata=FULL",
            ),
            (
                "server_id differs from the server's",
                config.server_id != info.server_id,
                f"server_id {config.server_id} is the server's own: pick another",
            ),
        ):
            out.append((ok, label if ok else fix))
        try:
            conn = connect(src.settings)
        except (FatalError, RetryableError) as e:
            return [*out, (False, str(e))]
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW GRANTS")
                grants = " ".join(str(r[0]).upper() for r in cur.fetchall())
                for priv in ("REPLICATION SLAVE", "REPLICATION CLIENT"):
                    alt = {
                        "REPLICATION SLAVE": "REPLICATION REPLICA",
                        "REPLICATION CLIENT": "BINLOG MONITOR",
                    }[priv]
                    ok = "ALL PRIVILEGES ON *.*" in grants or priv in grants or alt in grants
                    out.append(
                        (
                            ok,
                            f"privilege {priv}"
                            if ok
                            else f"the user lacks {priv}: GRANT {priv} ON *.* TO <user>",
                        )
                    )
                for t in src.tables:
                    cur.execute(
                        "SELECT COUNT(*), SUM(c.COLUMN_KEY = 'PRI') FROM "
                        "information_schema.COLUMNS c WHERE c.TABLE_SCHEMA = %s "
                        "AND c.TABLE_NAME = %s",
                        (t.schema, t.name),
                    )
                    ncols, npk = cur.fetchone()
                    if not ncols:
                        out.append((False, f"table {t} does not exist or is not readable"))
                    else:
                        out.append(
                            (
                                True,
                                f"table {t}"
                                + ("" if npk else " (no primary key: mirrored as a multiset)"),
                            )
                        )
        finally:
            conn.close()
        return out

    # ------------------------------------------------------------------ open

    def prepare(self) -> None:
        pass  # all of it in open()

    def open(self, start: Position | None) -> None:
        if self.state is None and self.ctx is not None:
            self.state = self.ctx.state  # opened and closed by the worker
        info = server_info(self.settings)
        info.check()
        self.info = info
        self.ident = P.identity(info.server_id, info.server_uuid)
        snapshot_from: P.Parsed | None = None
        if start is None:
            if self.cfg.snapshot == "initial":
                snapshot_from = None
                resume = None
            else:
                file, pos = info.current
                resume = (file, pos)
        else:
            parsed = P.parse(start)
            self._check_identity(parsed, info)
            if parsed.snapshot:
                snapshot_from = parsed
                resume = None
            else:
                resume = (parsed.file, parsed.pos)
            self._read = self._sent = start
        do_snapshot = (
            start is None and self.cfg.snapshot == "initial"
        ) or snapshot_from is not None
        self._thread = threading.Thread(
            target=self._run,
            args=(resume, do_snapshot, snapshot_from),
            name=f"binlog:{self.name}",
            daemon=True,
        )
        self._thread.start()

    def _check_identity(self, p: P.Parsed, info: ServerInfo) -> None:
        if p.server_id is not None and p.server_id != info.server_id:
            raise FatalError(
                f"mysql source {self.name}: the checkpoint was taken on server_id "
                f"{p.server_id} but {self.cfg.host}:{self.cfg.port} is server_id "
                f"{info.server_id}; resuming against another server would skip or repeat "
                "data. Point the source back at that server, or drop the destination's "
                "checkpoint to start over with a snapshot"
            )
        if p.server_uuid and info.server_uuid and p.server_uuid != info.server_uuid:
            raise FatalError(
                f"mysql source {self.name}: the checkpoint was taken on server_uuid "
                f"{p.server_uuid}, this server is {info.server_uuid}"
            )
        if p.file not in info.logs:
            oldest = next(iter(info.logs), "?")
            raise FatalError(
                f"mysql source {self.name}: binlog {p.file} needed to resume at {p.file}:{p.pos} "
                f"is no longer on the server (oldest is {oldest}): it was purged. Changes "
                "in it are lost to this workflow; re-snapshot (drop the destination's "
                "checkpoint) and keep binlogs longer (binlog_expire_logs_seconds)"
            )
        if p.pos > info.logs[p.file]:
            raise FatalError(
                f"mysql source {self.name}: position {p.file}:{p.pos} is past the end of that "
                f"binlog ({info.logs[p.file]} bytes): the binlog was reset or this is "
                "another server"
            )

    # ------------------------------------------------------------------ reader thread

    def _put(self, item: _Item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(
        self, resume: tuple[str, int] | None, do_snapshot: bool, snap: P.Parsed | None
    ) -> None:
        try:
            if do_snapshot:
                resume = self._snapshot(snap)
                if resume is None:
                    return
            assert resume is not None
            self._stream(resume)
        except BaseException as e:  # handed to read_batch, which raises it
            self._put(_Failed(e))

    def _snapshot(self, snap: P.Parsed | None) -> tuple[str, int] | None:
        assert self.info is not None
        snapshot = Snapshot(self.settings, self.info.is_mariadb, self.zero_dates)
        try:
            if snap is not None:
                # Resuming an interrupted snapshot: a new read view, the old binlog point.
                file, pos, chunk = snap.file, snap.pos, snap.chunk
                first_table, after = snap.table, snap.after
                if file not in self.info.logs:
                    raise FatalError(
                        f"mysql source {self.name}: binlog {file} of the interrupted snapshot "
                        "was purged; drop the destination's checkpoint to snapshot again"
                    )
            else:
                file, pos, chunk = snapshot.file, snapshot.pos, 0
                first_table, after = 0, None
            logger.info(
                "snapshot of {} table(s) at {}:{}{}",
                len(self.tables),
                file,
                pos,
                f", resuming at table {first_table}" if snap else "",
            )
            total = 0
            for ti in range(first_table, len(self.tables)):
                st = snapshot.describe(self.tables[ti])
                start_after = after if ti == first_table else None
                for rows in snapshot.chunks(st, start_after, self.cfg.snapshot_chunk_size):
                    if self._stop.is_set():
                        return None
                    chunk += 1
                    total += len(rows)
                    idx = st.schema.key_indexes()
                    last_key = tuple(rows[-1][i] for i in idx) if idx else None
                    position = P.snapshot_position(file, pos, self.ident, chunk, ti, last_key)
                    progress = {
                        "table": str(self.tables[ti]),
                        "tables_done": ti,
                        "tables": len(self.tables),
                        "rows": total,
                        "binlog": f"{file}:{pos}",
                    }
                    with self._lock:
                        self._snapshot_status = progress
                    if not self._put(_Chunk(st, rows, position)):
                        return None
                    if self.state is not None:
                        self.state.put_snapshot_progress(self.workflow, self.name, progress)
            done = P.stream_position(file, pos, "", self.ident)
            if not self._put(_SnapshotDone(done)):
                return None
            if self.state is not None:
                self.state.put_snapshot_progress(
                    self.workflow,
                    self.name,
                    {"done": True, "rows": total, "binlog": f"{file}:{pos}"},
                )
            logger.info("snapshot read: {} rows; streaming from {}:{}", total, file, pos)
            return (file, pos)
        finally:
            snapshot.close()

    def _stream(self, resume: tuple[str, int]) -> None:
        cfg = self.cfg
        stream = BinlogStream(
            self.settings,
            cfg.server_id,
            {(t.schema, t.name) for t in self.tables},
            zero_dates=self.zero_dates,
            heartbeat_s=cfg.heartbeat,
            read_timeout_s=cfg.read_timeout,
        )
        backoff = 0.1
        file, pos = resume
        watched = {t.schema for t in self.tables}
        try:
            while not self._stop.is_set():
                stream.open(file=file, pos=pos)
                cur_file = file
                txn: _Txn | None = None
                gtid = ""
                in_begin = False
                try:
                    for ev in stream.events():
                        if self._stop.is_set():
                            return
                        if isinstance(ev, Rows):
                            if txn is None:
                                txn = _Txn(Position(P.KIND, 0))
                            table = TableId(ev.schema, ev.table)
                            for first, second in ev.rows:
                                txn.rows.append((ev.op, table, ev.layout, first, second))
                            txn.ts = ev.timestamp
                            continue
                        if isinstance(ev, Gtid):
                            gtid, txn, in_begin = ev.gtid, None, False
                            continue
                        if isinstance(ev, Xid):
                            end, ts, xid = ev.end, ev.timestamp, ev.xid
                        elif isinstance(ev, Query):
                            q = ev.query.strip()
                            head = q[:16].upper()
                            if head.startswith("BEGIN") or head.startswith("XA START"):
                                in_begin = True
                                continue
                            if in_begin and not head.startswith("COMMIT"):
                                continue  # a statement inside a transaction
                            end, ts, xid = ev.end, ev.timestamp, 0
                            if not head.startswith("COMMIT"):  # DDL: its own transaction
                                txn = txn or _Txn(Position(P.KIND, 0))
                                if ev.schema in watched or any(
                                    f"{s}." in q or f"`{s}`." in q for s in watched
                                ):
                                    txn.ddl.append((ev.schema, q))
                        elif isinstance(ev, Rotate):
                            cur_file = ev.file
                            continue
                        elif isinstance(ev, Heartbeat):
                            continue
                        else:
                            continue
                        # A commit: hand over the whole transaction.
                        done = txn or _Txn(Position(P.KIND, 0))
                        done.position = P.stream_position(cur_file, end, gtid, self.ident)
                        done.xid = xid or None
                        done.ts = ts
                        txn, in_begin = None, False
                        added = self._added_columns_table(done)
                        if added is not None:
                            if not self._reread(added, done):
                                return
                        elif not self._put(done):
                            return
                        file, pos = cur_file, end  # our own resume point
                        backoff = 0.1
                except StreamLost as e:
                    if self._stop.is_set():
                        return
                    self._reconnects += 1
                    logger.warning(
                        "binlog connection lost ({}); reconnecting from {}:{} in {:.1f}s",
                        e,
                        file,
                        pos,
                        backoff,
                    )
                    stream.close()
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, cfg.max_backoff)
                    self._check_resumable(file, pos)
        finally:
            stream.close()

    def _added_columns_table(self, txn: _Txn) -> TableId | None:
        """The watched table an ``ALTER TABLE ... ADD`` of this transaction changed."""
        for schema_name, statement in txn.ddl:
            m = _ALTER_ADD.match(statement)
            if m is None:
                continue
            db = _unquote(m.group("db")) if m.group("db") else schema_name
            table = TableId(db, _unquote(m.group("table")))
            if table in self.tables:
                return table
        return None

    def _reread(self, table: TableId, txn: _Txn) -> bool:
        """After ALTER TABLE ... ADD COLUMN: existing rows got the new column's default
        without any row event, so the table is read again and its rows are sent as
        reads at the DDL's position (one transaction, in chunks; a restart before
        its end redoes it). Later binlog changes replay over it, as after a snapshot."""
        assert self.info is not None
        logger.info("{}: columns added; reading the table again to carry their values", table)
        snapshot = Snapshot(self.settings, self.info.is_mariadb, self.zero_dates, False)
        try:
            st = snapshot.describe(table)
            pending: _Chunk | None = None
            for rows in snapshot.chunks(st, None, self.cfg.snapshot_chunk_size):
                if self._stop.is_set():
                    return False
                if pending is not None:
                    pending.more = True
                    if not self._put(pending):
                        return False
                pending = _Chunk(st, rows, txn.position, ddl=[] if pending else txn.ddl)
        finally:
            snapshot.close()
        if pending is None:
            return self._put(txn)  # an empty table: just the DDL
        return self._put(pending)

    def _check_resumable(self, file: str, pos: int) -> None:
        """Before reconnecting: same server, binlog still there (else FatalError)."""
        try:
            info = server_info(self.settings)
        except RetryableError:
            return  # server still down; the next connect attempt will fail and back off
        self._check_identity(
            P.Parsed(file, pos, self.info.server_id if self.info else None, "", ""), info
        )

    # ------------------------------------------------------------------ batches

    def _schema(self, table: TableId, layout: Layout) -> TableSchema:
        known = self._versions.get(table)
        if known is not None and known[0] is layout:
            return known[1]
        version = 1 if known is None else known[1].version + 1
        key = tuple(layout.columns[i].name for i in layout.key_indexes)
        schema = TableSchema(table, layout.columns, key, version)
        self._versions[table] = (layout, schema)
        return schema

    def _record_schema(self, position: Position, record: dict[str, Any]) -> None:
        if self.state is not None:
            try:
                self.state.append_schema(self.workflow, self.name, position, record)
            except DataflareError as e:
                logger.warning("could not record schema history: {}", e)

    def _txn_changes(self, txn: _Txn, schemas: dict[TableId, TableSchema]) -> list[Change]:
        pos = txn.position
        out: list[Change] = []
        for op, table, layout, first, second in txn.rows:
            schema = schemas.get(table)
            if schema is None or self._versions[table][0] is not layout:
                before = self._versions.get(table)
                schema = self._schema(table, layout)
                schemas[table] = schema
                if before is not None and before[1].column_names != schema.column_names:
                    logger.info("{}: columns now {}", table, ", ".join(schema.column_names))
                if before is None or before[1].columns != schema.columns:
                    self._record_schema(pos, _schema_record(schema))
            kidx = layout.key_indexes
            if op == "u":
                assert second is not None
                key = tuple(first[i] for i in kidx) if kidx else None
                out.append(Change(Op.UPDATE, table, pos, key, first, second, xid=txn.xid,
                                  commit_ts_us=txn.ts * 1_000_000))  # fmt: skip
            elif op == "c":
                key = tuple(first[i] for i in kidx) if kidx else None
                out.append(Change(Op.INSERT, table, pos, key, None, first, xid=txn.xid,
                                  commit_ts_us=txn.ts * 1_000_000))  # fmt: skip
            else:
                key = tuple(first[i] for i in kidx) if kidx else None
                out.append(Change(Op.DELETE, table, pos, key, first, None, xid=txn.xid,
                                  commit_ts_us=txn.ts * 1_000_000))  # fmt: skip
        for schema_name, statement in txn.ddl:
            self._record_schema(pos, {"ddl": statement, "schema": schema_name})
            logger.info("DDL at {}: {}", pos, statement[:200])
        return out

    def _next(self, deadline: float) -> _Item | None:
        if self._head is not None:
            item, self._head = self._head, None
            return item
        wait = deadline - time.monotonic()
        try:
            return self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _conflicts(self, item: _Item, schemas: dict[TableId, TableSchema]) -> bool:
        """Would ``item`` put a second layout of a table into this batch?"""
        if isinstance(item, _Chunk):
            s = schemas.get(item.table.schema.table)
            return s is not None and s.columns != item.table.schema.columns
        if isinstance(item, _Txn):
            for _, table, layout, _, _ in item.rows:
                s = schemas.get(table)
                if s is not None and s.columns != layout.columns:
                    return True
        return False

    def _chunk_schema(self, st: SnapshotTable, position: Position) -> TableSchema:
        known = self._versions.get(st.schema.table)
        if known is not None and known[0] is st:
            return known[1]
        version = 1 if known is None else known[1].version + 1
        schema = replace(st.schema, version=version)
        self._versions[st.schema.table] = (st, schema)
        if known is None or known[1].columns != schema.columns:
            self._record_schema(position, _schema_record(schema))
        return schema

    def read_batch(self, timeout: float) -> Batch | None:
        if self._pending:
            return self._cut_pending()
        deadline = time.monotonic() + min(timeout, self.cfg.batch_timeout)
        size = self.cfg.batch_size
        changes: list[Change] = []
        schemas: dict[TableId, TableSchema] = {}
        first, last = self._idle_first, self._idle_last
        open_chunk = False  # the batch ends inside a table re-read
        while len(changes) < size:
            item = self._next(deadline)
            if item is None:
                break
            if isinstance(item, _Failed):
                if changes or last is not None:
                    self._head = item  # deliver what we have; raise on the next call
                    break
                raise item.error
            if changes and self._conflicts(item, schemas):
                self._head = item  # a layout change: the next batch starts with it
                break
            if isinstance(item, _Chunk):
                for schema_name, statement in item.ddl:
                    self._record_schema(item.position, {"ddl": statement, "schema": schema_name})
                open_chunk = item.more
                schema = self._chunk_schema(item.table, item.position)
                schemas[schema.table] = schema
                pos = item.position
                key_idx = schema.key_indexes()
                for row in item.rows:
                    key = tuple(row[i] for i in key_idx) if key_idx else None
                    changes.append(Change(Op.READ, schema.table, pos, key, None, row))
            elif isinstance(item, _SnapshotDone):
                open_chunk = False
                pos = item.position
                with self._lock:
                    self._snapshot_status = None
            else:
                open_chunk = False
                if changes and len(changes) + len(item.rows) > size:
                    self._head = item  # keep a transaction whole when it fits a batch
                    break
                pos = item.position
                changes.extend(self._txn_changes(item, schemas))
                self._last_commit_ts = item.ts
            first = first or pos
            last = pos
            self._read = pos
        if last is None or first is None:
            return None
        if not changes and time.monotonic() - self._last_emit < IDLE_EMIT_S:
            # only position advances (other tables' transactions): send them now and then
            self._idle_first, self._idle_last = first, last
            return None
        self._idle_first = self._idle_last = None
        self._last_emit = time.monotonic()
        touched = {c.table for c in changes}
        if len(changes) > size:  # one transaction larger than batch_size: cut it
            self._pending = changes
            self._pending_last = last
            self._pending_open = open_chunk
            self._pending_schemas = [schemas[t] for t in touched]
            return self._cut_pending()
        if not open_chunk:
            self._sent = last
        return Batch(changes, [schemas[t] for t in touched], first, last, complete=not open_chunk)

    def _cut_pending(self) -> Batch:
        size = self.cfg.batch_size
        part, self._pending = self._pending[:size], self._pending[size:]
        assert self._pending_last is not None
        touched = {c.table for c in part}
        schemas = [s for s in self._pending_schemas if s.table in touched]
        complete = not self._pending and not self._pending_open
        if complete:
            self._sent = self._pending_last
            self._last_emit = time.monotonic()
        return Batch(part, schemas, part[0].position, part[-1].position, complete=complete)

    # ------------------------------------------------------------------ protocol

    def confirm(self, position: Position) -> None:
        # MySQL keeps no replication slot: nothing to tell the server. The confirmed
        # position is what a restart resumes from (the destinations' checkpoints).
        self._confirmed = position

    @property
    def exhausted(self) -> bool:
        return False

    def status(self) -> dict[str, Any]:
        with self._lock:
            snap = dict(self._snapshot_status) if self._snapshot_status else None
        lag = 0.0
        if self._last_commit_ts and not self._queue.empty():
            lag = max(0.0, time.time() - self._last_commit_ts)
        return {
            "position": str(self._read) if self._read else None,
            "confirmed": str(self._confirmed) if self._confirmed else None,
            "lag_bytes": 0,
            "lag_seconds": lag,
            "snapshot": snap,
            "reconnects": self._reconnects,
            "server": self.ident,
        }

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
