"""The postgres source against a private PostgreSQL 15: snapshot, stream, resume."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from dataflare.cdc.codec import decode_batch, encode_batch
from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Batch, Change, Op, Position
from dataflare.cdc.postgres.config import PostgresSourceConfig
from dataflare.cdc.postgres.pgoutput import parse_lsn
from dataflare.cdc.postgres.source import PostgresSource, parse_table_name
from dataflare.cdc.postgres.text_rows import materialize
from dataflare.cdc.source import SourceContext
from psycopg import sql

from tests.servers import PostgresServer

pytestmark = pytest.mark.integration


def make_source(dsn: str, **cfg: Any) -> PostgresSource:
    cfg.setdefault("tables", ["public.items"])
    cfg.setdefault("batch_timeout", 0.01)
    cfg.setdefault("status_interval", 0.2)
    return PostgresSource("src", PostgresSourceConfig(dsn=dsn, **cfg), SourceContext("wf test"))


def drain(src: PostgresSource, want: int, timeout: float = 15) -> list[Batch]:
    """Batches until ``want`` changes arrived (snapshot or stream)."""
    out: list[Batch] = []
    got = 0
    deadline = time.monotonic() + timeout
    while got < want:
        assert time.monotonic() < deadline, f"only {got} of {want} changes arrived"
        b = src.read_batch(0.2)
        if b is not None:
            out.append(b)
            got += len(b)
    # Whatever the batching, the stream never goes back (snapshot rows share one position).
    seq = [c.position.value for b in out for c in b.changes]
    assert seq == sorted(seq), "changes out of order across batches"
    return out


def changes(batches: list[Batch]) -> list[Change]:
    return [c for b in batches for c in b.changes]


def read_both(
    typed: PostgresSource, packed: PostgresSource, want: int
) -> tuple[list[Change], list[Batch]]:
    """One WAL read by a value-loading source and by a packed one: the first's
    changes, and the second's batches after crossing the ring (codec)."""
    loaded = changes(drain(typed, want))
    return loaded, [decode_batch(encode_batch(b)) for b in drain(packed, want)]


def materialized(batches: list[Batch]) -> list[Change]:
    return [c for b in batches for c in materialize(b).changes]


def run(dsn: str, *stmts: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in stmts:
            conn.execute(s)


@pytest.fixture
def items_db(pg_db: str) -> Iterator[str]:
    run(
        pg_db,
        "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2))",
        "INSERT INTO items SELECT g, 'n' || g, g * 1.5 FROM generate_series(1, 250) g",
        "ANALYZE items",
    )
    yield pg_db


def test_snapshot_then_stream_without_gap_or_overlap(items_db: str) -> None:
    src = make_source(items_db, batch_size=100)
    try:
        src.open(None)
        # A change committed after the slot's snapshot must come from the stream only.
        run(
            items_db,
            "INSERT INTO items VALUES (1000, 'late', 1)",
            "UPDATE items SET name='x' WHERE id=1",
        )
        snap = drain(src, 250)
        assert all(not b.complete for b in snap)
        assert sorted(c.after[0] for c in changes(snap)) == list(range(1, 251))  # type: ignore[index]
        assert all(c.op is Op.READ for c in changes(snap))
        done = src.read_batch(1.0)
        assert done is not None and done.complete and not done.changes
        consistent = done.last
        stream = drain(src, 2)
        ops = [(c.op, c.after) for c in changes(stream)]
        assert ops == [
            (Op.INSERT, (1000, "late", Decimal("1.00"))),
            (Op.UPDATE, (1, "x", Decimal("1.50"))),
        ]
        assert all(c.position > consistent for c in changes(stream))
        assert src.status()["snapshot"]["state"] == "done"
        assert src.status()["snapshot"]["rows_done"] == 250
        assert src.status()["snapshot"]["rows_total"] == 250  # the fixture ANALYZEd it
    finally:
        src.close()


def test_positions_are_commit_end_lsns_and_resume_skips_applied(items_db: str) -> None:
    src = make_source(items_db, snapshot="never")
    try:
        src.open(None)
        for i in range(5):
            run(items_db, f"INSERT INTO items VALUES ({2000 + i}, 't{i}', {i})")
        got = changes(drain(src, 5))
        positions = [c.position.value for c in got]
        assert positions == sorted(positions) and len(set(positions)) == 5
        resume_after = got[2].position
        src.confirm(resume_after)
    finally:
        src.close()
    # A new session resumes after the third transaction: exactly the last two come again.
    src2 = make_source(items_db, snapshot="never")
    try:
        src2.open(resume_after)
        again = changes(drain(src2, 2))
        assert [c.after[0] for c in again] == [2003, 2004]  # type: ignore[index]
        time.sleep(0.5)
        assert src2.read_batch(0.3) is None
    finally:
        src2.close()


def test_confirmed_position_reaches_the_slot_and_idle_heartbeat(items_db: str) -> None:
    src = make_source(items_db, snapshot="never")
    try:
        src.open(None)
        run(items_db, "INSERT INTO items VALUES (3000, 'a', 1)")
        batch = drain(src, 1)[0]
        src.confirm(batch.last)
        # Unrelated WAL (a table outside the publication) must not hold the slot back.
        run(
            items_db,
            "CREATE TABLE other (x int)",
            "INSERT INTO other SELECT generate_series(1, 1000)",
        )
        with psycopg.connect(items_db, autocommit=True) as conn:
            current = parse_lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]
            deadline = time.monotonic() + 15
            confirmed = 0
            while time.monotonic() < deadline:
                src.read_batch(0.3)
                row = conn.execute(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                    "WHERE slot_name = 'dataflare_wf_test'"
                ).fetchone()
                confirmed = parse_lsn(row[0])  # type: ignore[index]
                if confirmed >= current:
                    break
            assert confirmed >= current > batch.last.value
        st = src.status()
        assert st["lag_bytes"] >= 0 and st["lag_seconds"] == 0.0
    finally:
        src.close()


def test_types_toast_identity_full_and_truncate(pg_db: str) -> None:
    run(
        pg_db,
        "CREATE TYPE mood AS ENUM ('sad', 'happy')",
        "CREATE DOMAIN posint AS int CHECK (VALUE > 0)",
        """CREATE TABLE t (id bigint PRIMARY KEY, n numeric, f float8, ts timestamptz,
           iv interval, arr int[], j jsonb, b bytea, u uuid, m mood, d posint, ip inet,
           big text)""",
        "ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL",
        "CREATE TABLE nokey (a int, b text)",
        "ALTER TABLE nokey REPLICA IDENTITY FULL",
    )
    src = make_source(pg_db, tables=["public.t", "nokey"], snapshot="never")
    # Out-of-line TOAST (incompressible), left unchanged by the update below.
    big = "".join(__import__("hashlib").sha256(str(i).encode()).hexdigest() for i in range(800))
    try:
        src.open(None)
        run(
            pg_db,
            f"""INSERT INTO t VALUES (1, 'NaN', '-Infinity', '2026-01-02 03:04:05.123456+02',
               '1 mon 2 days 03:04:05', '{{1,NULL,3}}', '{{"a": [1, 2.5]}}', '\\x00ff',
               'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy', 7, '10.1.2.3/16', '{big}')""",
            "UPDATE t SET n = 12345678901234567890.123456789 WHERE id = 1",
            "INSERT INTO nokey VALUES (1, 'a'), (1, 'a')",
            "DELETE FROM nokey WHERE ctid = (SELECT ctid FROM nokey LIMIT 1)",
            "TRUNCATE nokey",
        )
        got = changes(drain(src, 6))
    finally:
        src.close()
    ins, upd = got[0], got[1]
    assert ins.op is Op.INSERT and ins.key == (1,)
    row = ins.after
    assert row is not None
    assert row[1].is_nan() and row[2] == float("-inf")
    assert row[3].isoformat() == "2026-01-02T01:04:05.123456+00:00"
    # json/jsonb and interval travel in their exact text form (see cdc/postgres/types.py)
    assert row[4] == "1 mon 2 days 03:04:05"
    assert row[5] == [1, None, 3] and row[6] == '{"a": [1, 2.5]}' and row[7] == b"\x00\xff"
    assert str(row[8]) == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11" and row[9] == "happy"
    assert row[10] == 7 and str(row[11]) == "10.1.2.3/16" and row[12] == big
    assert upd.op is Op.UPDATE and upd.unchanged == frozenset({"big"})
    assert upd.after is not None and upd.after[1] == Decimal("12345678901234567890.123456789")
    ins2 = [c for c in got if c.table.name == "nokey"]
    assert [c.op for c in ins2] == [Op.INSERT, Op.INSERT, Op.DELETE, Op.TRUNCATE]
    assert ins2[2].before == (1, "a") and ins2[2].key is None
    schemas = {c.table.name for c in got}
    assert schemas == {"t", "nokey"}


def test_packed_text_rows_equal_loaded_rows(pg_db: str) -> None:
    """Packed mode (every destination takes PostgreSQL text): the same WAL read by a
    source that loads values and by one that packs pgoutput messages gives, after
    the ring and ``materialize``, the same changes: every type, TOAST values not
    sent, old rows of REPLICA IDENTITY FULL, primary-key updates, truncates, and a
    transaction spilled in parts."""
    run(
        pg_db,
        "CREATE TYPE mood AS ENUM ('sad', 'happy')",
        "CREATE DOMAIN posint AS int CHECK (VALUE > 0)",
        """CREATE TABLE t (id bigint PRIMARY KEY, n numeric, f float8, ts timestamptz,
           iv interval, arr int[], j jsonb, b bytea, u uuid, m mood, d posint, ip inet,
           dt date, tx text, big text)""",
        "ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL",
        "CREATE TABLE nokey (a int, b text)",
        "ALTER TABLE nokey REPLICA IDENTITY FULL",
    )
    big = "".join(__import__("hashlib").sha256(str(i).encode()).hexdigest() for i in range(800))
    typed = make_source(pg_db, tables=["public.t", "nokey"], snapshot="never", slot="typed")
    packed = PostgresSource(
        "src",
        PostgresSourceConfig(
            dsn=pg_db, tables=["public.t", "nokey"], snapshot="never", slot="packed",
            batch_timeout=0.01, status_interval=0.2, batch_size=50,
        ),
        SourceContext("wf test", pg_text=True),
    )  # fmt: skip
    try:
        typed.open(None)
        packed.open(None)
        run(
            pg_db,
            f"""INSERT INTO t VALUES (1, 'NaN', '-Infinity', '2026-01-02 03:04:05.123456+02',
               '1 mon 2 days 03:04:05', '{{1,NULL,3}}', '{{"a": [1, 2.5]}}', '\\x00ff',
               'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy', 7, '10.1.2.3/16',
               'infinity', E'tab\\there\\nnew \\\\ line', '{big}')""",
            "UPDATE t SET n = 12345678901234567890.123456789 WHERE id = 1",
            "UPDATE t SET id = 2, dt = '2026-02-03' WHERE id = 1",
            "INSERT INTO t (id, tx) SELECT g, 'row ' || g FROM generate_series(10, 1600) g",
            "INSERT INTO nokey VALUES (1, 'a'), (1, 'a'), (2, NULL)",
            "UPDATE nokey SET b = 'z' WHERE a = 2",
            "DELETE FROM nokey WHERE ctid = (SELECT ctid FROM nokey LIMIT 1)",
            "DELETE FROM t WHERE id BETWEEN 10 AND 20",
            "TRUNCATE nokey",
        )
        want = 1 + 1 + 1 + 1591 + 3 + 1 + 1 + 11 + 1
        loaded, batches = read_both(typed, packed, want)
    finally:
        typed.close()
        packed.close()
    assert all(b.pg_text for b in batches)
    assert any(not b.complete for b in batches)  # the 1591-row transaction went in parts
    assert isinstance(batches[0].changes[0].after[1], bytes)  # type: ignore[index]
    got = materialized(batches)
    assert len(got) == len(loaded)
    for g, w in zip(got, loaded, strict=True):
        # (repr: NaN is not equal to itself; parts of a spilled transaction carry
        # the position "partial", the last part the commit's)
        assert repr(g._replace(position=None)) == repr(w._replace(position=None))
        assert g.position == w.position or g.position.tag == "partial"
    assert got[0].after[14] == big and got[1].unchanged == frozenset({"big"})  # type: ignore[index]
    assert got[0].after[12] == "infinity"  # type: ignore[index]


def test_packed_mode_follows_layout_changes_and_renames(pg_db: str) -> None:
    """DDL inside a transaction (the open part is cut and sent, the rest follows in
    the new layout) and a rename (changes before it keep the old name): the packed
    source gives what the loading source gives."""
    run(pg_db, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    typed = make_source(pg_db, tables=["public.t"], snapshot="never", slot="typed")
    packed = PostgresSource(
        "src",
        PostgresSourceConfig(
            dsn=pg_db, tables=["public.t"], snapshot="never", slot="packed",
            batch_timeout=0.01, status_interval=0.2,
        ),
        SourceContext("wf test", pg_text=True),
    )  # fmt: skip
    try:
        typed.open(None)
        packed.open(None)
        with psycopg.connect(pg_db) as conn:  # one transaction
            conn.execute("INSERT INTO t VALUES (1, 'a')")
            conn.execute("ALTER TABLE t ADD COLUMN x int")
            conn.execute("INSERT INTO t VALUES (2, 'b', 20), (3, 'c', 30)")
        with psycopg.connect(pg_db) as conn:
            conn.execute("INSERT INTO t VALUES (4, 'd', 40)")
            conn.execute("ALTER TABLE t RENAME TO a")
            conn.execute("INSERT INTO a VALUES (5, 'e', 50)")
        run(pg_db, "INSERT INTO a VALUES (6, 'f', 60)")
        loaded, batches = read_both(typed, packed, 6)
    finally:
        typed.close()
        packed.close()
    got = materialized(batches)
    assert [(c.table.name, c.after) for c in got] == [
        ("t", (1, "a")),
        ("t", (2, "b", 20)),
        ("t", (3, "c", 30)),
        ("t", (4, "d", 40)),
        ("a", (5, "e", 50)),
        ("a", (6, "f", 60)),
    ]
    assert [(c.table, c.after) for c in got] == [(c.table, c.after) for c in loaded]
    for b in batches:  # a batch has one layout per table
        assert len({s.table for s in b.schemas}) == len(b.schemas)


def test_packed_mode_table_dropped_and_created_again(pg_db: str) -> None:
    """A new relation under a name another one had (FOR ALL TABLES): the batch is
    cut there, each batch maps a name to one relation, and the packed source gives
    what the loading source gives."""
    run(
        pg_db,
        "CREATE PUBLICATION allpub FOR ALL TABLES",
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
    )
    common = {"tables": [], "publication": "allpub", "snapshot": "never"}
    typed = make_source(pg_db, slot="typed", **common)
    packed = PostgresSource(
        "src",
        PostgresSourceConfig(
            dsn=pg_db, slot="packed", batch_timeout=0.5, status_interval=0.2, **common
        ),
        # (the apply side "busy": batches fill for batch_timeout, across transactions)
        SourceContext("wf test", downstream_idle=lambda: False, pg_text=True),
    )
    try:
        typed.open(None)
        packed.open(None)
        run(
            pg_db,
            "INSERT INTO t VALUES (1, 'a')",
            "DROP TABLE t",
            "CREATE TABLE t (id bigint PRIMARY KEY, w int, v text)",
            "INSERT INTO t VALUES (2, 20, 'b')",
        )
        loaded, batches = read_both(typed, packed, 2)
    finally:
        typed.close()
        packed.close()
    got = materialized(batches)
    assert [c.after for c in got] == [(1, "a"), (2, 20, "b")] == [c.after for c in loaded]
    assert len(batches) == 2  # cut at the second relation named t


def test_latin1_database_streams_the_same_text_both_ways(pg_server: PostgresServer) -> None:
    """The replication connection asks for UTF-8; the loaders that decode its values
    must too, or a LATIN1 database streams mojibake (the snapshot never did)."""
    name = "latin1_stream"
    pg_server.execute(
        sql.SQL(
            "CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ).format(sql.Identifier(name))
    )
    dsn = pg_server.dsn(name)
    try:
        run(dsn, "CREATE TABLE t (id int PRIMARY KEY, v text)")
        src = make_source(dsn, tables=["public.t"], snapshot="never")
        try:
            src.open(None)
            run(dsn, "INSERT INTO t VALUES (1, 'caf\u00e9 \u00a3')")
            (c,) = changes(drain(src, 1))
        finally:
            src.close()
        assert c.after == (1, "caf\u00e9 \u00a3")
    finally:
        pg_server.drop_database(name)


def test_large_transaction_is_spilled_in_incomplete_batches(items_db: str) -> None:
    src = make_source(items_db, snapshot="never", batch_size=100)
    try:
        src.open(None)
        run(items_db, "INSERT INTO items SELECT g, 'big', 1 FROM generate_series(10000, 11999) g")
        batches = drain(src, 2000)
        deadline = time.monotonic() + 10
        while not batches[-1].complete and time.monotonic() < deadline:
            b = src.read_batch(0.2)
            if b is not None:
                batches.append(b)
    finally:
        src.close()
    assert not batches[0].complete
    assert batches[-1].complete
    assert sum(len(b) for b in batches) == 2000
    assert all(b.last <= batches[-1].last for b in batches)
    assert all(c.position <= batches[-1].last for b in batches for c in b.changes)


def backlog_source(db: str, name: str, *load: str) -> PostgresSource:
    """A packed-mode source of items on a slot made before ``load`` ran: a backlog
    bigger than the socket buffers hold is then read as when catching up."""
    run(
        db,
        f"CREATE PUBLICATION {name}_pub FOR TABLE items",
        f"SELECT pg_create_logical_replication_slot('{name}_slot', 'pgoutput')",
        *load,
    )
    cfg = PostgresSourceConfig(
        dsn=db,
        tables=["public.items"],
        snapshot="never",
        slot=f"{name}_slot",
        publication=f"{name}_pub",
    )
    return PostgresSource("src", cfg, SourceContext("wf test", pg_text=True))


def counted(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    """Count the calls of ``owner.name`` for the test: a one-item list, updated."""
    calls = [0]
    real = getattr(owner, name)

    def counting(*args: Any) -> Any:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(owner, name, counting)
    return calls


def test_a_flowing_stream_is_read_in_bursts(items_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walsender sends each message as its own packet; woken per packet, the
    source spent most of its CPU in system calls (about 2 messages per wait). While
    the stream flows, a read pauses briefly first and takes what gathered, reading
    the socket again only while a read brings plenty."""
    from dataflare.cdc.postgres import replication

    # A backlog made before the source starts, bigger than the socket buffers hold:
    # the source then reads as fast as the walsender sends, as when catching up.
    rows = 60_000
    src = backlog_source(
        items_db,
        "burst",
        *(
            f"INSERT INTO items SELECT g, 'n', 1 FROM generate_series({start}, {start + 4999}) g"
            for start in range(10_000, 10_000 + rows, 5000)
        ),
    )
    waits = counted(monkeypatch, replication.select, "select")
    reads = counted(monkeypatch, replication.ReplicationConnection, "_consume")
    try:
        src.open(None)
        got = sum(len(b) for b in drain(src, rows, timeout=60))
    finally:
        src.close()
    assert got == rows
    # neither waits nor reads from the socket per packet (each was ~1 per 2 rows)
    assert waits[0] < rows / 20, f"{waits[0]} waits for {got} messages"
    assert reads[0] < rows / 20, f"{reads[0]} socket reads for {got} messages"


def test_wide_rows_are_read_without_pauses_and_the_window_is_fixed(
    items_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read pause is for small messages (it lets the walsender's sends
    coalesce); rows of ~1 KB were read 16 KB per 5 ms pause (3 MB/s). And the
    receive buffer is fixed, small enough to fill within a pause."""
    import socket

    from dataflare.cdc.postgres import replication

    rows = 6000
    src = backlog_source(
        items_db,
        "wide",
        "INSERT INTO items SELECT g, repeat(md5(g::text), 32), 1 "
        f"FROM generate_series(10000, {10_000 + rows - 1}) g",
    )
    sleeps = counted(monkeypatch, replication.time, "sleep")
    try:
        src.open(None)
        assert src._repl is not None and src._repl.pgconn is not None
        sock = socket.socket(fileno=src._repl.pgconn.socket)
        try:
            rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        finally:
            sock.detach()
        got = sum(len(b) for b in drain(src, rows, timeout=60))
    finally:
        src.close()
    assert got == rows
    assert rcvbuf == 2 * replication.RCVBUF  # (Linux doubles what is asked for)
    # 6 MB of rows: ~380 reads of 16 KB, each once followed by a pause before
    assert sleeps[0] < 10, f"{sleeps[0]} pauses for {rows} rows of 1 KB"


def test_the_c_copy_reader_reads_what_psycopgs_call_reads(
    items_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_many takes libpq's buffered CopyData in one C loop (PQgetCopyData of
    psycopg's own libpq): the same stream read with psycopg's call per message
    gives the same pgoutput messages, in the same order."""
    from dataflare.cdc.postgres import replication

    assert replication._copy_reader() is not None  # the fast path is what runs here
    run(
        items_db,
        "CREATE PUBLICATION cr_pub FOR TABLE items",
        "SELECT pg_create_logical_replication_slot('cr_a', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('cr_b', 'pgoutput')",
    )
    rows = 20_000
    for start in range(10_000, 10_000 + rows, 5000):
        run(
            items_db,
            "INSERT INTO items SELECT g, 'n' || g, g "
            f"FROM generate_series({start}, {start + 4999}) g",
            f"UPDATE items SET name = name || 'u' WHERE id BETWEEN {start} AND {start + 99}",
            f"DELETE FROM items WHERE id BETWEEN {start + 100} AND {start + 109}",
        )
    # the row changes, a Begin and a Commit per transaction, the table's Relation
    want = rows + 4 * 110 + 4 * 3 * 2 + 1

    def stream(slot: str) -> list[bytes]:
        conn = replication.ReplicationConnection(items_db)
        conn.connect()
        try:
            conn.start(slot, 0, "cr_pub")
            got: list[bytes] = []
            deadline = time.monotonic() + 60
            while len(got) < want and time.monotonic() < deadline:
                for data in conn.read_many(0.5, 512):
                    assert isinstance(data, bytes | memoryview)
                    if data[0] == 0x77:  # XLogData; the header's send time differs
                        got.append(bytes(data[25:]))
            return got
        finally:
            conn.close()

    fast = stream("cr_a")
    monkeypatch.setattr(replication, "_copy_reader", lambda: None)
    slow = stream("cr_b")
    assert len(fast) == len(slow) == want
    assert fast == slow
    assert sum(m[0] in b"IUD" for m in fast) == rows + 4 * 110


def test_table_without_key_under_default_identity_is_refused(pg_db: str) -> None:
    run(pg_db, "CREATE TABLE bare (a int)")
    src = make_source(pg_db, tables=["bare"])
    with pytest.raises(FatalError, match="REPLICA IDENTITY FULL"):
        src.open(None)
    src.close()


def test_dropped_slot_with_a_checkpoint_is_fatal(items_db: str) -> None:
    src = make_source(items_db, snapshot="never")
    src.open(None)
    src.close()
    run(items_db, "SELECT pg_drop_replication_slot('dataflare_wf_test')")
    again = make_source(items_db, snapshot="never")
    with pytest.raises(FatalError, match="is gone"):
        again.open(Position("postgres", 1))
    again.close()


def test_parse_table_name() -> None:
    assert str(parse_table_name('public."Order Items"')) == "public.Order Items"
    assert parse_table_name("Items").name == "items"
    assert parse_table_name('"we""ird"."a.b"').name == "a.b"
    assert parse_table_name('"we""ird"."a.b"').schema == 'we"ird'


def test_check_and_drop_slot_hooks(items_db: str) -> None:
    cfg = PostgresSourceConfig(dsn=items_db, tables=["items"], snapshot="never")
    ctx = SourceContext("wf test")
    lines = PostgresSource.check("src", cfg, ctx)
    assert all(ok for ok, _ in lines), lines
    assert any("will be created" in text for _, text in lines)
    src = PostgresSource("src", cfg, ctx)
    src.open(None)
    src.close()
    assert PostgresSource.drop_slot("src", cfg, workflow="wf test") is True
    assert PostgresSource.drop_slot("src", cfg, ctx) is False
    bad = PostgresSource.check("src", PostgresSourceConfig(dsn=items_db + " port=1"), ctx)
    assert bad[0][0] is False and "cannot connect" in bad[0][1]


def test_text_values_do_not_follow_the_users_datestyle(pg_db: str) -> None:
    """pgoutput's text values follow the walsender session's DateStyle/IntervalStyle:
    the source pins ISO/postgres, whatever the role or database default is."""
    dbname = psycopg.conninfo.conninfo_to_dict(pg_db)["dbname"]
    run(
        pg_db,
        f"ALTER DATABASE \"{dbname}\" SET datestyle = 'SQL, DMY'",
        f"ALTER DATABASE \"{dbname}\" SET intervalstyle = 'sql_standard'",
        f'ALTER DATABASE "{dbname}" SET extra_float_digits = 0',
        "CREATE TABLE d (id int PRIMARY KEY, day date, ts timestamp, iv interval, f float8)",
    )
    src = make_source(pg_db, tables=["d"], snapshot="never")
    try:
        src.open(None)
        run(
            pg_db,
            "INSERT INTO d VALUES (1, '2026-02-03', '2026-02-03 04:05:06.5', "
            "'1 day 02:03:04', 0.1::float8 + 0.2::float8)",
            "INSERT INTO d VALUES (2, 'infinity', '0044-03-15 12:00:00 BC', '1 mon', 3)",
        )
        got = changes(drain(src, 2))
        row = got[0].after
        # Values Python cannot hold stay in their text form instead of stopping the stream.
        assert got[1].after == (2, "infinity", "0044-03-15 12:00:00 BC", "1 mon", 3.0)
    finally:
        src.close()
    assert row is not None
    assert str(row[1]) == "2026-02-03" and str(row[2]) == "2026-02-03 04:05:06.500000"
    assert row[3] == "1 day 02:03:04" and row[4] == 0.1 + 0.2


def test_layout_change_cuts_batches(items_db: str) -> None:
    """Rows before and after ALTER TABLE never share a batch (one layout per table)."""
    src = make_source(items_db, snapshot="never", batch_size=1000, batch_timeout=0.5)
    try:
        src.open(None)
        run(
            items_db,
            "INSERT INTO items VALUES (5001, 'a', 1)",
            "ALTER TABLE items ADD COLUMN note text",
            "INSERT INTO items VALUES (5002, 'b', 2, 'n')",
        )
        with psycopg.connect(items_db) as conn:  # DDL inside one transaction
            conn.execute("INSERT INTO items VALUES (5003, 'c', 3, 'x')")
            conn.execute("ALTER TABLE items DROP COLUMN price")
            conn.execute("INSERT INTO items VALUES (5004, 'd', 'y')")
        batches = drain(src, 4)
        deadline = time.monotonic() + 5
        while not batches[-1].complete and time.monotonic() < deadline:
            b = src.read_batch(0.2)
            if b is not None:
                batches.append(b)
    finally:
        src.close()
    for b in batches:
        layout = {s.table: s for s in b.schemas}
        for c in b.changes:
            assert c.after is not None
            assert len(c.after) == len(layout[c.table].columns), (c, layout[c.table])
    widths = [len(c.after) for b in batches for c in b.changes]  # type: ignore[arg-type]
    assert widths == [3, 4, 4, 3]
    assert batches[-1].complete


def test_slot_in_use_by_another_process_is_retryable(items_db: str) -> None:
    """A second reader of the same slot (say, a daemon that has not exited yet) is told
    to retry rather than failing the workflow for good."""
    from dataflare.cdc.errors import RetryableError

    first = make_source(items_db, snapshot="never")
    second = make_source(items_db, snapshot="never")
    try:
        first.open(None)
        with pytest.raises(RetryableError, match=r"in use|active"):
            second.open(Position("postgres", 1))
    finally:
        second.close()
        first.close()
