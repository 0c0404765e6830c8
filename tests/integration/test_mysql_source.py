"""The `mysql` source and sink against a private MariaDB 10.11, and the library's traps.

Each trap of mysql-replication 1.0.17 named in issue 4 has a test here that shows
what we do about it (see dataflare.cdc.mysql.binlog for the list).
"""

from __future__ import annotations

import contextlib
import itertools
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Batch, Op, Position
from dataflare.cdc.mysql import positions as P
from dataflare.cdc.mysql.binlog import (
    BinlogStream,
    Gtid,
    Rows,
    StreamLost,
    Xid,
    _Reader,
    server_info,
)
from dataflare.cdc.mysql.config import MysqlSourceConfig
from dataflare.cdc.mysql.source import MysqlBinlogSource
from dataflare.daemon.state import StateStore
from dataflare.sinks.base import SinkContext
from dataflare.sinks.configs import MysqlSinkConfig
from dataflare.sinks.mysql import MysqlSink

from tests.servers import MariaDBServer

pytestmark = pytest.mark.integration


def make_source(server: MariaDBServer, db: str, table: str = "t", **kw: Any) -> MysqlBinlogSource:
    cfg = MysqlSourceConfig(
        server_id=kw.pop("server_id", 5000 + int(time.time() * 1000) % 50000),
        tables=[f"{db}.{table}"],
        port=server.port,
        user=server.user,
        password=server.password,
        **kw,
    )
    return MysqlBinlogSource("src", cfg)


def drain(src: MysqlBinlogSource, seconds: float = 1.5, until: int | None = None) -> list[Batch]:
    out: list[Batch] = []
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        b = src.read_batch(0.25)
        if b is not None:
            out.append(b)
            n += len(b)
            if until is not None and n >= until:
                break
    return out


def current(server: MariaDBServer) -> Position:
    info = server_info(server.connect_args())
    f, p = info.current
    return P.stream_position(f, p, "", P.identity(info.server_id))


# ------------------------------------------------------------------------------ types

TYPES_DDL = """CREATE TABLE {db}.t (
  id bigint unsigned PRIMARY KEY, d decimal(30,10), dneg decimal(5,2), dt datetime(6),
  ts timestamp(3) NULL, dd date, tm time(6), y year, b bit(10), b64 bit(64),
  e enum('a','b c'), st set('x','y','z'), j json, bl blob, bn binary(4), vb varbinary(10),
  u varchar(20), c char(5), f double, ti tinyint, si smallint unsigned, txt text, nul int)"""

ROW = (
    18446744073709551615,
    Decimal("-12345678901234567890.0123456789"),
    Decimal("-1.50"),
    datetime(2024, 2, 29, 23, 59, 59, 123456),
    datetime(2024, 1, 1, 0, 0, 0, 500000, tzinfo=UTC),
    date(1999, 12, 31),
    -timedelta(hours=838, minutes=59, seconds=59),
    2155,
    0b1010101010,
    2**64 - 1,
    "b c",
    "x,z",
    '{"k": [1, 2]}',
    b"\x00\xff\x00",
    b"\x01\x02\x00\x00",
    b"\x00\x00\xff",
    "héllo 😀",
    "ab",
    2.25,
    -128,
    65535,
    "long text",
    None,
)


def insert_types_row(server: MariaDBServer, db: str) -> None:
    server.execute(
        "INSERT INTO t VALUES (%s, %s, %s, %s, %s, %s, '-838:59:59', %s, b'1010101010', "
        "18446744073709551615, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, NULL)",
        (ROW[0], ROW[1], ROW[2], ROW[3], "2024-01-01 00:00:00.5", ROW[5], ROW[7], *ROW[10:22]),
        database=db,
    )


def test_exact_types_stream_and_snapshot_agree(
    mariadb_server: MariaDBServer, mariadb_db: str
) -> None:
    mariadb_server.execute(TYPES_DDL.format(db=mariadb_db))
    insert_types_row(mariadb_server, mariadb_db)  # seen by the snapshot
    src = make_source(mariadb_server, mariadb_db)
    src.open(None)
    try:
        snap = drain(src, 1.0, until=1)
        mariadb_server.execute("UPDATE t SET id = 1 WHERE id = %s", (ROW[0],), database=mariadb_db)
        mariadb_server.execute("DELETE FROM t", database=mariadb_db)
        insert_types_row(mariadb_server, mariadb_db)  # seen by the stream
        stream = drain(src, 2.0, until=3)
    finally:
        src.close()
    snap_rows = [c.after for b in snap for c in b if c.op is Op.READ]
    assert snap_rows == [ROW]
    changes = [c for b in stream for c in b]
    assert [c.op for c in changes] == [Op.UPDATE, Op.DELETE, Op.INSERT]
    assert changes[-1].after == ROW
    assert changes[0].before == ROW and changes[0].key == (ROW[0],)
    schema = stream[0].schema_map()[changes[0].table]
    types = dict(zip(schema.column_names, (c.type_name for c in schema.columns), strict=True))
    assert types["id"] == "bigint unsigned" and types["ts"] == "timestamp(3)"
    assert types["tm"] == "time(6)" and types["d"] == "decimal(30,10)"
    # TIME beyond 24 h and positive
    assert isinstance(ROW[6], timedelta)


def test_zero_dates_null_or_error(mariadb_server: MariaDBServer, mariadb_db: str) -> None:
    mariadb_server.execute(f"CREATE TABLE {mariadb_db}.t (id int PRIMARY KEY, d date, dt datetime)")
    for n, policy in enumerate(("null", "error")):
        src = make_source(mariadb_server, mariadb_db, snapshot="never", zero_dates=policy)
        src.open(None)
        try:
            time.sleep(0.3)
            conn = mariadb_server.connect(mariadb_db)
            with conn.cursor() as cur:
                cur.execute("SET SESSION sql_mode = ''")
                cur.execute("INSERT INTO t VALUES (%s, '0000-00-00', '0000-00-00 00:00:00')", (n,))
            conn.close()
            if policy == "null":
                batches = drain(src, 1.5, until=1)
                assert [c.after for b in batches for c in b] == [(0, None, None)]
            else:
                with pytest.raises(FatalError, match="zero_dates"):
                    drain(src, 1.5)
        finally:
            src.close()


# ----------------------------------------------------------------------------- traps


def test_trap1_mariadb_dump_request_has_the_right_length() -> None:
    """The library declares 14 payload bytes and sends 15; ours declares what it sends."""

    class FakeCursor:
        def execute(self, *a: Any) -> None:
            pass

        def close(self) -> None:
            pass

    class FakeConn:
        def cursor(self) -> FakeCursor:
            return FakeCursor()

    from pymysqlreplication import BinLogStreamReader

    theirs = BinLogStreamReader({}, 7, is_mariadb=True, auto_position="0-1-1", enable_logging=False)
    theirs._stream_connection = FakeConn()
    raw = theirs._BinLogStreamReader__set_mariadb_settings()
    assert struct.unpack("<i", raw[:4])[0] & 0xFFFFFF == 14 and len(raw) - 4 == 15  # the bug

    ours = _Reader({}, 7, is_mariadb=True, auto_position="0-1-1", enable_logging=False)
    ours._df_server_id = 7
    ours._stream_connection = FakeConn()
    raw = ours._BinLogStreamReader__set_mariadb_settings()
    assert struct.unpack("<i", raw[:4])[0] & 0xFFFFFF == len(raw) - 4 == 11


def test_trap1_gtid_start_with_a_lagging_client_delivers_each_event_once(
    mariadb_server: MariaDBServer, mariadb_db: str
) -> None:
    mariadb_server.execute(f"CREATE TABLE {mariadb_db}.t (id int PRIMARY KEY, pad text)")
    gtid = server_info(mariadb_server.connect_args()).gtid_pos
    conn = mariadb_server.connect(mariadb_db, autocommit=False)
    with conn.cursor() as cur:
        for i in range(40):  # ~2 MB of binlog: far more than the server's socket buffer
            cur.executemany(
                "INSERT INTO t VALUES (%s, %s)", [(i * 100 + k, "p" * 500) for k in range(100)]
            )
            conn.commit()
    conn.close()
    stream = BinlogStream(mariadb_server.connect_args(), 6101, {(mariadb_db, "t")})
    stream.open(gtid=gtid)
    seen: list[str] = []
    rows = 0
    try:
        for ev in stream.events():
            if isinstance(ev, Gtid):
                seen.append(ev.gtid)
                time.sleep(0.01)  # a slow client: the server runs ahead
            elif isinstance(ev, Rows):
                rows += len(ev.rows)
            elif isinstance(ev, Xid) and rows >= 4000:
                break
    finally:
        stream.close()
    assert rows == 4000
    assert len(seen) == len(set(seen)), "an event was delivered twice"


def test_trap2_file_and_position_are_honoured(
    mariadb_server: MariaDBServer, mariadb_db: str
) -> None:
    mariadb_server.execute(f"CREATE TABLE {mariadb_db}.t (id int PRIMARY KEY)")
    mariadb_server.execute("INSERT INTO t VALUES (1)", database=mariadb_db)
    start = P.parse(current(mariadb_server))
    mariadb_server.execute("INSERT INTO t VALUES (2)", database=mariadb_db)
    stream = BinlogStream(mariadb_server.connect_args(), 6102, {(mariadb_db, "t")})
    stream.open(file=start.file, pos=start.pos)
    try:
        first = next(ev for ev in stream.events() if isinstance(ev, Rows))
    finally:
        stream.close()
    assert first.rows[0][0] == (2,)  # not row 1: the position was not ignored


def test_trap3_positions_are_transaction_ends(
    mariadb_server: MariaDBServer, mariadb_db: str
) -> None:
    """Resuming from any position we hand out yields whole transactions only."""
    mariadb_server.execute(f"CREATE TABLE {mariadb_db}.t (id int PRIMARY KEY)")
    src = make_source(mariadb_server, mariadb_db, snapshot="never", batch_size=7)
    src.open(None)
    time.sleep(0.3)
    conn = mariadb_server.connect(mariadb_db, autocommit=False)
    with conn.cursor() as cur:
        for txn in range(5):
            for k in range(10):  # ten rows events per transaction
                cur.execute("INSERT INTO t VALUES (%s)", (txn * 10 + k,))
            conn.commit()
    conn.close()
    try:
        batches = drain(src, 2.0, until=50)
    finally:
        src.close()
    changes = [c for b in batches for c in b]
    assert len(changes) == 50
    by_pos: dict[Position, list[int]] = {}
    for c in changes:
        assert c.after is not None
        by_pos.setdefault(c.position, []).append(c.after[0])
    assert [sorted(v) for v in by_pos.values()] == [
        list(range(t * 10, t * 10 + 10)) for t in range(5)
    ]
    # batches cut inside a transaction are marked incomplete, never checkpointable
    for b in batches:
        if len({c.position for c in b}) == 1 and b.complete:
            assert b.last == b.changes[-1].position
    # resume after the second transaction: exactly transactions 3..5
    resume_at = list(by_pos)[1]
    src2 = make_source(mariadb_server, mariadb_db, snapshot="never")
    src2.open(resume_at)
    try:
        again = [c.after[0] for b in drain(src2, 1.5, until=30) for c in b if c.after]
    finally:
        src2.close()
    assert again == list(range(20, 50))


def _dump_threads(server: MariaDBServer, server_id: int) -> list[int]:
    rows = server.execute(
        "SELECT ID FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Binlog Dump%'"
    )
    return [int(r[0]) for r in rows]


def test_trap4_reconnects_from_our_commit_with_backoff(
    mariadb_server: MariaDBServer, mariadb_db: str
) -> None:
    mariadb_server.execute(f"CREATE TABLE {mariadb_db}.t (id int PRIMARY KEY, v int)")
    src = make_source(mariadb_server, mariadb_db, snapshot="never", server_id=6104)
    src.open(None)
    got: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        conn = mariadb_server.connect(mariadb_db, autocommit=False)
        with conn.cursor() as cur:
            for i in range(300):
                if stop.is_set():
                    break
                cur.executemany(
                    "INSERT INTO t VALUES (%s, %s)", [(i * 10 + k, i) for k in range(10)]
                )
                conn.commit()
                time.sleep(0.005)
        conn.close()

    w = threading.Thread(target=writer)
    w.start()
    try:
        end = time.monotonic() + 20
        kills = 0
        while time.monotonic() < end and len(got) < 3000:
            b = src.read_batch(0.25)
            if b is not None:
                got.extend(c.after[0] for c in b if c.after)
            if kills < 2 and len(got) > 600 * (kills + 1):
                for tid in _dump_threads(mariadb_server, 6104):
                    mariadb_server.execute(f"KILL CONNECTION {tid}")
                kills += 1
    finally:
        stop.set()
        w.join()
        src.close()
    assert src.status()["reconnects"] >= 2
    assert got == list(range(3000)), "rows lost or repeated across reconnects"


def test_trap4_library_reconnect_is_refused() -> None:
    r = _Reader({}, 7, enable_logging=False)
    r._df_connected = True  # as after the first connect
    with pytest.raises(StreamLost):
        r._BinLogStreamReader__connect_to_stream()


# ------------------------------------------------------------------------ identity


def test_resume_on_another_server_or_purged_binlog_is_fatal(
    mariadb_server: MariaDBServer, mariadb_db: str
) -> None:
    mariadb_server.execute(f"CREATE TABLE {mariadb_db}.t (id int PRIMARY KEY)")
    here = P.parse(current(mariadb_server))
    other = P.stream_position(here.file, here.pos, "", "server_id=424242")
    src = make_source(mariadb_server, mariadb_db)
    with pytest.raises(FatalError, match="server_id 424242"):
        src.open(other)
    purged = P.stream_position("mysql-bin.000000", 4, "", P.identity(here.server_id or 0))
    src = make_source(mariadb_server, mariadb_db)
    with pytest.raises(FatalError, match="purged"):
        src.open(purged)


def test_row_metadata_minimal_is_refused(mariadb_server: MariaDBServer, mariadb_db: str) -> None:
    mariadb_server.execute("SET GLOBAL binlog_row_metadata = MINIMAL")
    try:
        src = make_source(mariadb_server, mariadb_db)
        with pytest.raises(FatalError, match="binlog_row_metadata"):
            src.open(None)
    finally:
        mariadb_server.execute("SET GLOBAL binlog_row_metadata = FULL")


# ----------------------------------------------------------------------- with the sink


@pytest.fixture
def target_db(mariadb_server: MariaDBServer, mariadb_db: str) -> Iterator[str]:
    name = mariadb_db + "_out"
    yield name
    mariadb_server.drop_database(name)


def make_sink(server: MariaDBServer, database: str) -> MysqlSink:
    cfg = MysqlSinkConfig(database=database, port=server.port, user=server.user,
                          password=server.password)  # fmt: skip
    sink = MysqlSink("out", cfg, SinkContext("wf", "out", ("src",), None))  # type: ignore[arg-type]
    sink.open()
    return sink


def pump(src: MysqlBinlogSource, sink: MysqlSink, seconds: float) -> None:
    for b in drain(src, seconds):
        done = sink.checkpoint("src")
        if done is not None and b.complete and b.last <= done:
            continue
        sink.write("src", b)


def test_alter_table_add_column_mid_stream(
    mariadb_server: MariaDBServer, mariadb_db: str, target_db: str, tmp_path: Path
) -> None:
    mariadb_server.execute(f"CREATE TABLE {mariadb_db}.t (id int PRIMARY KEY, `we``ird` text)")
    mariadb_server.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')", database=mariadb_db)
    sink = make_sink(mariadb_server, target_db)
    state = StateStore(str(tmp_path / "state"))
    src = make_source(mariadb_server, mariadb_db)
    src.state, src.workflow = state, "wf"
    src.open(sink.checkpoint("src"))
    try:
        pump(src, sink, 1.0)
        mariadb_server.execute("INSERT INTO t VALUES (3, 'c')", database=mariadb_db)
        mariadb_server.execute("ALTER TABLE t ADD COLUMN n int AFTER id", database=mariadb_db)
        mariadb_server.execute("INSERT INTO t VALUES (4, 40, 'd')", database=mariadb_db)
        mariadb_server.execute("UPDATE t SET n = 10 WHERE id = 1", database=mariadb_db)
        mariadb_server.execute("ALTER TABLE t DROP COLUMN n", database=mariadb_db)
        mariadb_server.execute("ALTER TABLE t ADD COLUMN m varchar(5)", database=mariadb_db)
        mariadb_server.execute("INSERT INTO t VALUES (5, 'e', 'mm')", database=mariadb_db)
        pump(src, sink, 2.0)
    finally:
        src.close()
        sink.close()
    history = state.schema_history("wf", "src")
    state.close()
    layouts = [r["columns"] for _, r in history if "columns" in r]
    assert [[c[0] for c in cols] for cols in layouts] == [
        ["id", "we`ird"],  # the snapshot's
        ["id", "n", "we`ird"],
        ["id", "we`ird", "m"],  # (no row was written between DROP n and ADD m)
    ]
    ddl = [r["ddl"] for _, r in history if "ddl" in r]
    assert len(ddl) == 3 and ddl[0].startswith("ALTER TABLE t ADD COLUMN n")
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(history))
    got = mariadb_server.execute(
        "SELECT id, n, `we``ird`, m FROM t ORDER BY id", database=target_db
    )
    assert got == [
        (1, 10, "a", None),
        (2, None, "b", None),
        (3, None, "c", None),
        (4, 40, "d", None),
        (5, None, "e", "mm"),
    ]


def test_snapshot_resumes_after_the_last_applied_chunk(
    mariadb_server: MariaDBServer, mariadb_db: str, target_db: str
) -> None:
    mariadb_server.execute(f"CREATE TABLE {mariadb_db}.t (id int PRIMARY KEY, v int)")
    conn = mariadb_server.connect(mariadb_db)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO t VALUES (%s, %s)", [(i, i) for i in range(1000)])
    conn.close()
    sink = make_sink(mariadb_server, target_db)
    src = make_source(mariadb_server, mariadb_db, snapshot_chunk_size=100, batch_size=100)
    src.open(None)
    applied = 0
    try:
        while applied < 3:  # three chunks applied, then a "crash"
            b = src.read_batch(0.25)
            if b is not None:
                sink.write("src", b)
                applied += 1
    finally:
        src.close()
    ck = sink.checkpoint("src")
    assert ck is not None and P.parse(ck).snapshot and P.parse(ck).after == (299,)
    mariadb_server.execute("UPDATE t SET v = -1 WHERE id IN (5, 500)", database=mariadb_db)
    src = make_source(mariadb_server, mariadb_db, snapshot_chunk_size=100, batch_size=100)
    src.open(ck)
    try:
        first = None
        deadline = time.monotonic() + 5
        while first is None and time.monotonic() < deadline:
            first = src.read_batch(0.25)
        assert first is not None and first.changes[0].after == (300, 300)
        sink.write("src", first)
        pump(src, sink, 2.0)
    finally:
        src.close()
        sink.close()
    got = mariadb_server.execute("SELECT id, v FROM t ORDER BY id", database=target_db)
    want = mariadb_server.execute("SELECT id, v FROM t ORDER BY id", database=mariadb_db)
    assert got == want


def test_sink_keeps_source_order_of_one_key_within_a_batch(
    mariadb_server: MariaDBServer, mariadb_db: str, target_db: str
) -> None:
    mariadb_server.execute(f"CREATE TABLE {mariadb_db}.t (id int PRIMARY KEY, v int)")
    sink = make_sink(mariadb_server, target_db)
    src = make_source(mariadb_server, mariadb_db, batch_size=1000, batch_timeout=0.5)
    src.open(None)
    try:
        drain(src, 0.5)
        conn = mariadb_server.connect(mariadb_db, autocommit=False)
        with conn.cursor() as cur:
            cur.execute("INSERT INTO t VALUES (1, 1)")
            cur.execute("UPDATE t SET v = 2 WHERE id = 1")
            cur.execute("DELETE FROM t WHERE id = 1")
            cur.execute("INSERT INTO t VALUES (1, 3)")
            cur.execute("INSERT INTO t VALUES (2, 1)")
            cur.execute("DELETE FROM t WHERE id = 2")
            conn.commit()
        conn.close()
        pump(src, sink, 1.5)
    finally:
        src.close()
        sink.close()
    assert mariadb_server.execute("SELECT id, v FROM t", database=target_db) == [(1, 3)]


class FreezableProxy:
    """A TCP proxy whose traffic can be frozen (a dead peer that keeps the socket open)."""

    def __init__(self, port: int) -> None:
        import socket

        self.target = port
        self.frozen = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: Any, b: Any) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                while self.frozen.is_set():
                    time.sleep(0.05)
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def test_dead_connection_is_noticed_within_seconds(
    mariadb_server: MariaDBServer, mariadb_db: str
) -> None:
    mariadb_server.execute(f"CREATE TABLE {mariadb_db}.t (id int PRIMARY KEY)")
    proxy = FreezableProxy(mariadb_server.port)
    cfg = MysqlSourceConfig(
        server_id=6105, tables=[f"{mariadb_db}.t"], port=proxy.port, snapshot="never",
        heartbeat=0.5, read_timeout=2.0,
    )  # fmt: skip
    src = MysqlBinlogSource("src", cfg)
    src.open(None)
    try:
        mariadb_server.execute("INSERT INTO t VALUES (1)", database=mariadb_db)
        assert [c.after for b in drain(src, 2, until=1) for c in b] == [(1,)]
        proxy.frozen.set()  # the connection goes silent, nothing closes it
        mariadb_server.execute("INSERT INTO t VALUES (2)", database=mariadb_db)
        time.sleep(3.0)
        proxy.frozen.clear()
        got = [c.after for b in drain(src, 6, until=1) for c in b]
        assert got == [(2,)]
        assert src.status()["reconnects"] >= 1
    finally:
        src.close()
        proxy.close()


def test_idle_source_still_advances_its_position(
    mariadb_server: MariaDBServer, mariadb_db: str
) -> None:
    mariadb_server.execute(f"CREATE TABLE {mariadb_db}.t (id int PRIMARY KEY)")
    mariadb_server.execute(f"CREATE TABLE {mariadb_db}.other (id int PRIMARY KEY)")
    src = make_source(mariadb_server, mariadb_db, snapshot="never")
    src.open(None)
    try:
        time.sleep(0.3)
        for i in range(3):
            mariadb_server.execute("INSERT INTO other VALUES (%s)", (i,), database=mariadb_db)
        batches = drain(src, 2.5)
    finally:
        src.close()
    assert batches and all(len(b) == 0 and b.complete for b in batches)
    assert batches[-1].last >= current(mariadb_server)


def test_least_privileges_are_enough(mariadb_server: MariaDBServer, mariadb_db: str) -> None:
    """REPLICATION SLAVE, REPLICATION CLIENT and SELECT: snapshot and stream, no locks."""
    mariadb_server.execute(f"CREATE TABLE {mariadb_db}.t (id int PRIMARY KEY)")
    mariadb_server.execute("INSERT INTO t VALUES (1)", database=mariadb_db)
    user = f"cdc_{mariadb_db[-8:]}"
    mariadb_server.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'")
    try:
        mariadb_server.execute(
            f"GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{user}'@'%'"
        )
        mariadb_server.execute(f"GRANT SELECT ON `{mariadb_db}`.* TO '{user}'@'%'")
        cfg = MysqlSourceConfig(
            server_id=6106, tables=[f"{mariadb_db}.t"], port=mariadb_server.port,
            user=user, password="pw",
        )  # fmt: skip
        src = MysqlBinlogSource("src", cfg)
        src.open(None)
        try:
            snap = drain(src, 1.5, until=1)
            mariadb_server.execute("INSERT INTO t VALUES (2)", database=mariadb_db)
            stream = drain(src, 2.0, until=1)
        finally:
            src.close()
        assert [(c.op, c.after) for b in snap + stream for c in b] == [
            (Op.READ, (1,)),
            (Op.INSERT, (2,)),
        ]
    finally:
        mariadb_server.execute(f"DROP USER '{user}'@'%'")


def test_add_column_with_default_reaches_untouched_rows(
    mariadb_server: MariaDBServer, mariadb_db: str, target_db: str
) -> None:
    """Existing rows get the default without row events: the source reads them again."""
    mariadb_server.execute(f"CREATE TABLE {mariadb_db}.t (id int PRIMARY KEY, v int)")
    conn = mariadb_server.connect(mariadb_db)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO t VALUES (%s, %s)", [(i, i) for i in range(7)])
    conn.close()
    sink = make_sink(mariadb_server, target_db)
    src = make_source(mariadb_server, mariadb_db, snapshot_chunk_size=2, batch_size=3)
    src.open(sink.checkpoint("src"))
    try:
        pump(src, sink, 1.0)
        mariadb_server.execute(
            "ALTER TABLE t ADD COLUMN d int NOT NULL DEFAULT 5", database=mariadb_db
        )
        mariadb_server.execute("UPDATE t SET d = 9 WHERE id = 3", database=mariadb_db)
        mariadb_server.execute("ALTER TABLE t ADD INDEX iv (v)", database=mariadb_db)
        batches = drain(src, 2.0)
        for b in batches:
            sink.write("src", b)
        reread = [b for b in batches if any(c.op is Op.READ for c in b)]
        assert sum(len(b) for b in reread) == 7
        assert [b.complete for b in reread] == [False] * (len(reread) - 1) + [True]
    finally:
        src.close()
        sink.close()
    want = mariadb_server.execute("SELECT id, v, d FROM t ORDER BY id", database=mariadb_db)
    got = mariadb_server.execute("SELECT id, v, d FROM t ORDER BY id", database=target_db)
    assert got == want
    assert [r[2] for r in got] == [5, 5, 5, 9, 5, 5, 5]


def test_check_lines_say_what_to_fix(mariadb_server: MariaDBServer, mariadb_db: str) -> None:
    mariadb_server.execute(f"CREATE TABLE `{mariadb_db}`.`t` (id int PRIMARY KEY, v text)")
    mariadb_server.execute(f"CREATE TABLE `{mariadb_db}`.`bare` (v text)")
    cfg = make_source(mariadb_server, mariadb_db).cfg
    lines = MysqlBinlogSource.check("src", cfg, workflow="wf")
    assert all(ok for ok, _ in lines), lines
    assert any(text == "binlog_row_metadata FULL" for _, text in lines)
    cfg2 = replace(cfg, tables=[f"{mariadb_db}.bare", f"{mariadb_db}.missing"])
    lines2 = MysqlBinlogSource.check("src", cfg2)
    assert any(ok and "no primary key" in text for ok, text in lines2)
    assert any(not ok and "missing does not exist" in text for ok, text in lines2)
    down = MysqlBinlogSource.check("src", replace(cfg, port=1))
    assert down == [(False, down[0][1])] and "connect to" in down[0][1]
