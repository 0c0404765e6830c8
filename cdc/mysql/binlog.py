"""The binlog connection: the only module that imports pymysqlreplication.

:class:`BinlogStream` opens one replication connection at an explicit start (a
binlog file and position, or a MariaDB GTID ``domain-server-seq``) and yields our
own small event types. It never reconnects by itself: a lost or silent connection
raises :class:`StreamLost` and the caller reconnects, with backoff, from its own
last commit position.

Traps of mysql-replication 1.0.17 (read in its ``binlogstream.py``) and what we do:

1. With ``is_mariadb=True`` the COM_BINLOG_DUMP request declares a 14-byte payload
   but sends 15 (``__set_mariadb_settings`` counts 4+2+4+4 and then writes the
   command byte, position, flags, server id and four zero bytes of file name).
   The stray byte stays in the server's socket buffer; once the client lags the
   server reads it as the start of a packet and resets the connection, and the
   library's reconnect (trap 4) starts again from the original GTID: the same
   events are delivered again and again. :class:`_Reader` overrides that private
   method (name-mangled ``_BinLogStreamReader__set_mariadb_settings``) to send a
   correctly sized request: 11 bytes and an empty file name.
2. Under ``is_mariadb=True`` ``log_file``/``log_pos`` are ignored: the request always
   says position 4 of an empty file name. For a file+position start we use the
   MySQL form of the request (``resume_stream=True``, correct length), which
   MariaDB serves the same way; GTID starts use the fixed MariaDB form.
3. Resuming inside a transaction drops its remaining rows silently (the server
   sends from there, without the TABLE_MAP events or the GTID/BEGIN). We never do:
   the only positions handed out as resume points are transaction ends (XID, or
   COMMIT/DDL query events), see :mod:`dataflare.cdc.mysql.source`.
4. ``fetchone`` reconnects by itself on errors 2006/2013 from the ORIGINAL start
   (``auto_position``; with files, the last event's position, which may be inside
   a transaction), immediately and forever (upstream issue #367). :class:`_Reader`
   overrides the private ``__connect_to_stream`` so a second connect raises
   :class:`StreamLost` instead; reconnecting, with backoff, is the caller's.
5. No read timeout by default: a dead peer blocks ``read`` forever. We set the
   server's heartbeat period (``slave_heartbeat``) and a socket ``read_timeout``
   a few heartbeats long, so silence means a dead connection within seconds.

Row images are decoded by :mod:`dataflare.cdc.mysql.decode` (precompiled per-table
layouts), not by the library: we read the rows event's body bytes ourselves and
never touch ``event.rows``.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pymysql
from dataflare.cdc.errors import FatalError, RetryableError
from dataflare.cdc.model import Row
from dataflare.cdc.mysql.decode import ColumnSpec, Layout, ZeroDates
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import (
    FormatDescriptionEvent,
    GtidEvent,
    HeartbeatLogEvent,
    MariadbGtidEvent,
    QueryEvent,
    RotateEvent,
    XidEvent,
)
from pymysqlreplication.json_binary import parse_json
from pymysqlreplication.row_event import (
    DeleteRowsEvent,
    TableMapEvent,
    UpdateRowsEvent,
    WriteRowsEvent,
)

COM_BINLOG_DUMP = 0x12
_MBMAXLEN = {"utf8mb4": 4, "utf8mb3": 3, "utf8": 3, "ucs2": 2, "utf16": 4, "utf16le": 4,
             "utf32": 4, "big5": 2, "gbk": 2, "gb2312": 2, "sjis": 2, "cp932": 2,
             "ujis": 3, "eucjpms": 3, "euckr": 2, "gb18030": 4}  # fmt: skip


class StreamLost(RetryableError):
    """The replication connection was lost or went silent; reconnect from a commit."""


# ------------------------------------------------------------------------ our events


@dataclass(frozen=True, slots=True)
class Rotate:
    file: str
    pos: int


@dataclass(frozen=True, slots=True)
class Gtid:
    gtid: str
    end: int


@dataclass(frozen=True, slots=True)
class Query:
    schema: str
    query: str
    end: int
    timestamp: int


@dataclass(frozen=True, slots=True)
class Xid:
    xid: int
    end: int
    timestamp: int


@dataclass(frozen=True, slots=True)
class Rows:
    op: Literal["c", "u", "d"]
    schema: str
    table: str
    layout: Layout
    rows: list[tuple[Row, Row | None]]
    end: int
    timestamp: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


Event = Rotate | Gtid | Query | Xid | Rows | Heartbeat


# ------------------------------------------------------------------------ server info


@dataclass(frozen=True, slots=True)
class ServerInfo:
    server_id: int
    server_uuid: str  # MySQL @@server_uuid; empty on MariaDB
    version: str
    is_mariadb: bool
    binlog_format: str
    row_image: str
    row_metadata: str
    logs: dict[str, int]  # binary log file -> size, oldest first
    current: tuple[str, int]  # SHOW MASTER STATUS
    gtid_pos: str  # MariaDB @@gtid_binlog_pos, MySQL @@gtid_executed

    def check(self) -> None:
        """Stop with a clear message when the server cannot feed a row-based CDC."""
        if not self.logs:
            raise FatalError("the server has no binary log: start it with log_bin")
        if self.binlog_format.upper() != "ROW":
            raise FatalError(
                f"binlog_format is {self.binlog_format}: set binlog_format=ROW "
                "(SET GLOBAL binlog_format=ROW, and in the server config)"
            )
        if self.row_image.upper() != "FULL":
            raise FatalError(
                f"binlog_row_image is {self.row_image}: set binlog_row_image=FULL so "
                "updates and deletes carry whole rows"
            )
        if self.row_metadata.upper() != "FULL":
            raise FatalError(
                f"binlog_row_metadata is {self.row_metadata or 'unsupported'}: set "
                "binlog_row_metadata=FULL (MariaDB >= 10.5, MySQL >= 8.0.14) so the binlog "
                "names every column; without it columns would be guessed from the current "
                "table definition and mislabelled after ALTER TABLE"
            )


def connect(settings: dict[str, Any], **extra: Any) -> Any:
    """A plain pymysql connection (utf8mb4, autocommit, UTC session)."""
    args = {"charset": "utf8mb4", "autocommit": True, "connect_timeout": 10, **settings}
    args.update(extra)
    try:
        conn = pymysql.connect(**args, init_command="SET time_zone = '+00:00'")
    except pymysql.err.OperationalError as e:
        code = e.args[0] if e.args else 0
        if code in (1044, 1045, 1227):
            raise FatalError(f"mysql {args['host']}:{args['port']}: {e.args[-1]}") from None
        raise RetryableError(f"mysql {args['host']}:{args['port']}: {e.args[-1]}") from None
    return conn


def _one(cur: Any, sql: str) -> Any:
    cur.execute(sql)
    row = cur.fetchone()
    return None if row is None else row


def server_info(settings: dict[str, Any]) -> ServerInfo:
    conn = connect(settings)
    try:
        with conn.cursor() as cur:
            version = str(_one(cur, "SELECT VERSION()")[0])
            mariadb = "mariadb" in version.lower()
            variables: dict[str, str] = {}
            cur.execute(
                "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('server_id', 'server_uuid', "
                "'binlog_format', 'binlog_row_image', 'binlog_row_metadata', 'log_bin', "
                "'gtid_binlog_pos', 'gtid_executed')"
            )
            for name, value in cur.fetchall():
                variables[str(name).lower()] = str(value)
            logs: dict[str, int] = {}
            current: tuple[str, int] = ("", 0)
            if variables.get("log_bin", "OFF").upper() == "ON":
                try:
                    cur.execute("SHOW BINARY LOGS")
                    for row in cur.fetchall():
                        logs[str(row[0])] = int(row[1])
                    try:
                        status = _one(cur, "SHOW BINARY LOG STATUS")
                    except pymysql.err.ProgrammingError:
                        status = _one(cur, "SHOW MASTER STATUS")
                except pymysql.err.OperationalError as e:
                    raise FatalError(
                        f"cannot list binary logs ({e.args[-1]}): the user needs "
                        "REPLICATION CLIENT (MariaDB: BINLOG MONITOR)"
                    ) from None
                if status:
                    current = (str(status[0]), int(status[1]))
    finally:
        conn.close()
    return ServerInfo(
        server_id=int(variables.get("server_id", "0")),
        server_uuid=variables.get("server_uuid", ""),
        version=version,
        is_mariadb=mariadb,
        binlog_format=variables.get("binlog_format", ""),
        row_image=variables.get("binlog_row_image", ""),
        row_metadata=variables.get("binlog_row_metadata", ""),
        logs=logs,
        current=current,
        gtid_pos=variables.get("gtid_binlog_pos", variables.get("gtid_executed", "")),
    )


# ------------------------------------------------------------------------ the reader


class _Reader(BinLogStreamReader):  # type: ignore[misc]
    """BinLogStreamReader with the dump request and reconnect traps fixed (see top)."""

    _df_connected = False

    def _BinLogStreamReader__connect_to_stream(self) -> None:
        if self._df_connected:
            # The library wants to reconnect by itself from a stale position: refuse.
            raise StreamLost("binlog connection lost")
        self._df_connected = True
        BinLogStreamReader._BinLogStreamReader__connect_to_stream(self)

    def _BinLogStreamReader__set_mariadb_settings(self) -> bytes:
        cur = self._stream_connection.cursor()
        if self.auto_position is not None:
            cur.execute("SET @slave_connect_state = %s", (self.auto_position,))
        cur.execute("SET @slave_gtid_strict_mode=1")
        cur.execute("SET @slave_gtid_ignore_duplicates=0")
        cur.close()
        # https://mariadb.com/kb/en/com_binlog_dump/: command, position (4), flags (2),
        # server id (4), file name (rest of the packet; empty = start from the GTID).
        payload = struct.pack("<BIHI", COM_BINLOG_DUMP, 4, 0, self._df_server_id)
        return struct.pack("<i", len(payload)) + payload


def _pymysql_connect(**kwargs: Any) -> Any:
    """The library's connection factory: it passes the deprecated ``db=`` keyword."""
    if "db" in kwargs:
        kwargs["database"] = kwargs.pop("db")
    return pymysql.connect(**kwargs)


def _json_text(raw: bytes) -> str:
    """MySQL binary JSON -> JSON text (MariaDB's JSON is a LONGTEXT, never here)."""
    if not raw:
        return "null"
    value = parse_json(raw[0], raw[1:])

    def fix(v: Any) -> Any:
        if isinstance(v, bytes):
            return v.decode("utf-8", "replace")
        if isinstance(v, dict):
            return {fix(k): fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return json.dumps(fix(value), ensure_ascii=False, default=str)


def _spec(col: Any, nullable: bool) -> ColumnSpec:
    collation = str(getattr(col, "collation_name", None) or "")
    charset_name = collation.split("_", 1)[0] if collation else ""
    encoding = getattr(col, "character_set_name", None)
    codec: str | None
    if charset_name == "binary" or encoding == "binary":
        codec = None
    else:
        codec = str(encoding or "utf8")
        if codec in ("utf8mb4", "utf8mb3"):
            codec = "utf8"
    enum_values = tuple(getattr(col, "enum_values", None) or ())
    if enum_values and enum_values[0] == "":  # the library prepends the error value
        enum_values = enum_values[1:]
    return ColumnSpec(
        name=str(col.name),
        type_code=int(col.type),
        nullable=nullable,
        unsigned=bool(getattr(col, "unsigned", False)),
        max_length=int(getattr(col, "max_length", 0) or 0),
        length_size=int(getattr(col, "length_size", 0) or 0),
        precision=int(getattr(col, "precision", 0) or 0),
        decimals=int(getattr(col, "decimals", 0) or 0),
        fsp=int(getattr(col, "fsp", 0) or 0),
        bits=int(getattr(col, "bits", 0) or 0),
        size=int(getattr(col, "size", 0) or 0),
        charset=codec,
        mbmaxlen=_MBMAXLEN.get(charset_name, 1),
        enum_values=tuple(str(v) for v in enum_values),
        set_values=tuple(str(v) for v in (getattr(col, "set_values", None) or ())),
    )


class BinlogStream:
    """One replication connection, started at an explicit position."""

    def __init__(
        self,
        settings: dict[str, Any],
        server_id: int,
        tables: set[tuple[str, str]],
        *,
        zero_dates: ZeroDates = "null",
        heartbeat_s: float = 1.0,
        read_timeout_s: float = 5.0,
    ) -> None:
        self.settings = dict(settings)
        self.server_id = server_id
        self.tables = tables
        self.zero_dates = zero_dates
        self.heartbeat_s = heartbeat_s
        self.read_timeout_s = read_timeout_s
        self._reader: Any = None
        self._layouts: dict[int, Layout] = {}
        self._layout_cache: dict[tuple[Any, ...], Layout] = {}
        self.file = ""

    def open(
        self, *, file: str | None = None, pos: int | None = None, gtid: str | None = None
    ) -> None:
        """Start after ``file:pos`` (a transaction end) or after MariaDB ``gtid``."""
        self.close()
        conn = {**self.settings, "read_timeout": self.read_timeout_s, "connect_timeout": 10}
        conn.setdefault("charset", "utf8mb4")
        common: dict[str, Any] = {
            "connection_settings": conn,
            "server_id": self.server_id,
            "blocking": True,
            "only_events": [
                WriteRowsEvent,
                UpdateRowsEvent,
                DeleteRowsEvent,
                TableMapEvent,
                XidEvent,
                QueryEvent,
                GtidEvent,
                MariadbGtidEvent,
                RotateEvent,
                HeartbeatLogEvent,
                FormatDescriptionEvent,
            ],
            "only_schemas": sorted({s for s, _ in self.tables}) or None,
            "only_tables": sorted({t for _, t in self.tables}) or None,
            "slave_heartbeat": self.heartbeat_s,
            "enable_logging": False,
            "pymysql_wrapper": _pymysql_connect,
        }
        if gtid is not None:
            reader = _Reader(is_mariadb=True, auto_position=gtid, **common)
        elif file is not None and pos is not None:
            # The MySQL form of COM_BINLOG_DUMP: correct length, honours file and
            # position, and MariaDB serves it too (trap 2).
            reader = _Reader(resume_stream=True, log_file=file, log_pos=pos, **common)
            self.file = file
        else:
            raise ValueError("BinlogStream.open needs file and pos, or gtid")
        reader._df_server_id = self.server_id
        self._reader = reader
        self._layouts = {}

    def events(self) -> Iterator[Event]:
        """Our events, in binlog order. Raises StreamLost when the connection ends."""
        reader = self._reader
        assert reader is not None, "open() first"
        while True:
            try:
                ev = reader.fetchone()
            except StreamLost:
                raise
            except pymysql.err.MySQLError as e:
                code = e.args[0] if e.args else 0
                if code == 1236:  # ER_MASTER_FATAL_ERROR_READING_BINLOG: purged or bad position
                    raise FatalError(
                        f"the server cannot send the binlog from here: {e.args[-1]}"
                    ) from None
                raise StreamLost(f"binlog connection lost: {e}") from None
            except OSError as e:
                raise StreamLost(f"binlog connection lost: {e}") from None
            if ev is None:
                raise StreamLost("binlog stream ended")
            out = self._convert(ev)
            if out is not None:
                yield out

    def _convert(self, ev: Any) -> Event | None:
        if isinstance(ev, (WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent)):
            layout = self._layouts.get(ev.table_id)
            if layout is None or (ev.schema, ev.table) not in self.tables:
                return None
            packet = ev.packet
            body = packet.read(ev.event_size - packet.read_bytes)
            if isinstance(ev, UpdateRowsEvent):
                rows = layout.decode_rows(
                    body, ev.columns_present_bitmap, ev.columns_present_bitmap2
                )
                op: Literal["c", "u", "d"] = "u"
            else:
                rows = layout.decode_rows(body, ev.columns_present_bitmap, None)
                op = "c" if isinstance(ev, WriteRowsEvent) else "d"
            return Rows(op, ev.schema, ev.table, layout, rows, packet.log_pos, ev.timestamp)
        if isinstance(ev, TableMapEvent):
            if (ev.schema, ev.table) in self.tables:
                self._layouts[ev.table_id] = self._layout(ev)
            return None
        if isinstance(ev, XidEvent):
            return Xid(ev.xid, ev.packet.log_pos, ev.timestamp)
        if isinstance(ev, QueryEvent):
            schema = ev.schema.decode("utf-8", "replace") if isinstance(ev.schema, bytes) else ""
            return Query(schema, ev.query, ev.packet.log_pos, ev.timestamp)
        if isinstance(ev, (MariadbGtidEvent, GtidEvent)):
            return Gtid(str(ev.gtid), ev.packet.log_pos)
        if isinstance(ev, RotateEvent):
            self.file = str(ev.next_binlog)
            return Rotate(self.file, int(ev.position))
        if isinstance(ev, HeartbeatLogEvent):
            return Heartbeat()
        return None

    def _layout(self, ev: Any) -> Layout:
        cols = ev.columns
        if cols and not cols[0].name:
            raise FatalError(
                f"the binlog has no column names for {ev.schema}.{ev.table}: set "
                "binlog_row_metadata=FULL"
            )
        nullmask = bytes(ev.null_bitmask)
        specs = tuple(_spec(c, bool(nullmask[i // 8] >> (i % 8) & 1)) for i, c in enumerate(cols))
        pk = ev.table_obj.data.get("primary_key") or ()
        if isinstance(pk, str):
            pk = (pk,)
        names = [s.name for s in specs]
        key = tuple(names.index(k) for k in pk if k in names)
        sig = (ev.schema, ev.table, specs, key)
        layout = self._layout_cache.get(sig)
        if layout is None:
            layout = Layout(specs, key, self.zero_dates, _json_text)
            self._layout_cache[sig] = layout
        return layout

    def close(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):  # closing a dead connection must not raise
                self._reader.close()
            self._reader = None
