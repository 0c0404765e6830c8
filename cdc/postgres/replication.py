"""A logical replication connection driven through psycopg's libpq layer.

psycopg 3's high-level cursors cannot read or write a COPY_BOTH stream, so this
module speaks to libpq directly (``psycopg.pq``): replication commands with
``exec_``, then ``get_copy_data``/``put_copy_data`` for XLogData, keepalives and
standby status updates. The session pins DateStyle, IntervalStyle and
extra_float_digits: pgoutput's text values follow them.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import select
import socket
import struct
import termios
import time
from collections.abc import Callable
from typing import Any

from dataflare.cdc.errors import FatalError, RetryableError
from dataflare.cdc.postgres.pgoutput import format_lsn, standby_status
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# Flow control of the stream's reader (see ReplicationConnection.read_many).
#
# The walsender sends each message as it is decoded. When our receive window is
# open, every send leaves as its own loopback segment, with the whole TCP path
# and a wakeup behind it: 3.4-5.9 us a row for the walsender. When the window is
# closed, a send only appends to its socket's queue, and the queue leaves in
# large segments as we read: 2.6-2.8 us a row, as for native replication, whose
# apply worker reads no faster than the walsender sends. Our reader is several
# times faster than the walsender; left to itself it keeps the window open.
#
# How long a read pauses while the stream flows and little is waiting: long
# enough for the walsender to fill the receive window. Longer pauses starved it
# (8 ms, 20 ms). Adds at most this much latency.
COALESCE_S = 0.005
# The receive buffer, fixed (no autotuning, which grew it to ~540 KB that 5 ms of
# the walsender's output did not fill): small enough to be full within the pause.
# Catching up on 1M inserts (bench/pg_cpu_split.py, 1000000 rows, per run): 64 KB
# 3.1 us a row for the walsender, 192 KB 2.6-2.7, 256 KB 5.2-5.5, autotuned 3.4-4.9.
RCVBUF = 192 * 1024
# ... but only where the server is near: a 192 KB window across a 50 ms link would
# cap the stream at ~4 MB/s. Up to this round trip, 192 KB carries ~100 MB/s.
NEAR_RTT_US = 2000
# With this much waiting in the socket the server is ahead: read on, no pause.
# (Higher thresholds were rarely reached with this buffer and left the reader
# pausing while behind: 64 KB halved the rate, 128 KB quartered it.)
BEHIND_BYTES = 32 * 1024
# Messages this large (sampled per burst) are few per segment anyway: no pause for
# them. Paused, rows of 1 KB caught up at 40k rows/s; unpaused, 80k+ (bounded by
# the destination's COPY parsing).
SMALL_MSG = 400
PINNED_OPTIONS = "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3"


@functools.cache
def _copy_reader() -> tuple[Callable[..., int], int, int] | None:
    """The C loop over libpq's buffered CopyData (``_speedups.read_copy``) with
    the addresses of PQgetCopyData and PQfreemem in the libpq psycopg drives, or
    None (not built, or not exactly one libpq loaded: then psycopg's call per
    message, ~1 us a row)."""
    try:
        from dataflare.cdc._speedups import read_copy
    except ImportError:
        return None
    paths = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.rstrip("\n").split(None, 5)
                if len(parts) == 6 and "/libpq" in parts[5] and ".so" in parts[5]:
                    paths.add(parts[5])
        if len(paths) != 1:
            return None
        lib = ctypes.CDLL(paths.pop())
        get = ctypes.cast(lib.PQgetCopyData, ctypes.c_void_p).value
        free = ctypes.cast(lib.PQfreemem, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    if not get or not free:
        return None
    return read_copy, get, free


def replication_conninfo(dsn: str, connect_timeout: float = 10.0) -> str:
    params = conninfo_to_dict(dsn)
    opts = str(params.get("options") or "")
    params["options"] = f"{opts} {PINNED_OPTIONS}".strip()
    params["replication"] = "database"
    params["client_encoding"] = "UTF8"  # text values pass on as UTF-8 (Batch.pg_text)
    params.setdefault("connect_timeout", str(max(1, int(connect_timeout))))
    params.setdefault("application_name", "dataflare")
    return make_conninfo("", **params)


def safe_target(dsn: str) -> str:
    """host:port/dbname of a DSN, for messages: never the password."""
    try:
        p = conninfo_to_dict(dsn)
    except Exception:
        return "(unparsable DSN)"
    return f"{p.get('host', 'localhost')}:{p.get('port', 5432)}/{p.get('dbname', '')}"


def _msg(pgconn: pq.abc.PGconn | None) -> str:
    if pgconn is None:
        return ""
    return pgconn.error_message.decode(errors="replace").strip()


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def fix_window(rtt_us: int | None) -> bool:
    """Fix the receive buffer at RCVBUF for a TCP connection with this smoothed
    round trip (None: unknown, left to autotuning)?"""
    return rtt_us is not None and rtt_us <= NEAR_RTT_US


def _rtt_us(sock: socket.socket) -> int | None:
    """The connection's smoothed round trip in us (Linux TCP_INFO tcpi_rtt)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return None
    return int(struct.unpack_from("I", info, 68)[0]) if len(info) >= 72 else None


def _queued(sock: int) -> int:
    """Bytes waiting in a socket's receive queue (FIONREAD); 0 if it cannot say."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0])
    except OSError:
        return 0


class ReplicationConnection:
    def __init__(self, dsn: str, connect_timeout: float = 10.0) -> None:
        self.target = safe_target(dsn)
        self._conninfo = replication_conninfo(dsn, connect_timeout)
        self.pgconn: pq.abc.PGconn | None = None
        self.streaming = False
        self._flowing = False  # the last read_many returned messages
        self._small = True  # ... and they were small

    def connect(self) -> None:
        pgconn = pq.PGconn.connect(self._conninfo.encode())
        if pgconn.status != pq.ConnStatus.OK:
            message = _msg(pgconn)
            pgconn.finish()
            if (
                "no pg_hba.conf entry for replication" in message
                or "must be superuser or replication" in message
                or "permission denied to start WAL sender" in message
            ):
                raise FatalError(
                    f"postgres {self.target}: the user may not replicate ({message}); grant it: "
                    "ALTER ROLE <user> REPLICATION, and allow `replication` connections in "
                    "pg_hba.conf"
                )
            raise RetryableError(
                f"postgres {self.target}: replication connection failed: {message}"
            )
        self.pgconn = pgconn

    def command(self, sql: str) -> list[tuple[str | None, ...]]:
        """Run a replication command; rows as text."""
        assert self.pgconn is not None
        res = self.pgconn.exec_(sql.encode())
        if res.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
            message = res.error_message.decode(errors="replace").strip() or _msg(self.pgconn)
            state = res.error_field(pq.DiagnosticField.SQLSTATE)
            res.clear()
            raise CommandError(message, state.decode() if state else "")
        rows = []
        for i in range(res.ntuples):
            rows.append(
                tuple(
                    None if (v := res.get_value(i, j)) is None else bytes(v).decode()
                    for j in range(res.nfields)
                )
            )
        res.clear()
        return rows

    def start(self, slot: str, start_lsn: int, publication: str) -> None:
        assert self.pgconn is not None
        pub = publication.replace("'", "''")
        sql = (
            f"START_REPLICATION SLOT {quote_ident(slot)} LOGICAL {format_lsn(start_lsn)} "
            f"(proto_version '1', publication_names '{quote_ident(pub)}')"
        )
        self.pgconn.send_query(sql.encode())
        res = self.pgconn.get_result()
        if res is None or res.status != pq.ExecStatus.COPY_BOTH:
            message = (
                res.error_message.decode(errors="replace").strip() if res else _msg(self.pgconn)
            )
            state = res.error_field(pq.DiagnosticField.SQLSTATE) if res else None
            raise CommandError(message, state.decode() if state else "")
        self.pgconn.nonblocking = 1
        self.streaming = True
        with contextlib.suppress(OSError):
            sock = socket.socket(fileno=self.pgconn.socket)
            try:
                if sock.family in (socket.AF_INET, socket.AF_INET6) and fix_window(_rtt_us(sock)):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            finally:
                sock.detach()

    def read_many(self, timeout: float, limit: int) -> list[Any]:
        """Up to ``limit`` CopyData payloads: waits up to ``timeout`` for the first,
        then takes what has arrived (one wait per burst, not per message).

        libpq reads at most ~16 KB at a time; while at least BEHIND_BYTES wait in
        the socket, it reads on. With less waiting: a call that already has messages
        hands them over; one that has none, while the stream flows with small
        messages, pauses COALESCE_S first so the walsender's sends fill the window
        and coalesce (see the constants). An idle stream waits without the pause."""
        pg = self.pgconn
        assert pg is not None
        out: list[Any] = []  # bytes (the C loop) or memoryviews (psycopg's call)
        waited = False  # (the pause comes once, before the first wait)
        # Reading on while behind is bounded too: a message of hundreds of MB keeps
        # the socket full for its whole arrival, and the caller must still send its
        # status in time (the server's wal_sender_timeout).
        until = time.monotonic() + timeout
        ptr: int | None = getattr(pg, "pgconn_ptr", None)  # (not in pq.abc.PGconn)
        fast = _copy_reader() if ptr else None
        while len(out) < limit:
            if fast is not None:
                read_copy, get, free = fast
                n = read_copy(ptr, get, free, limit - len(out), out)
                if n > 0:
                    continue
            else:
                n, data = pg.get_copy_data(1)
                if n > 0:
                    out.append(data)
                    continue
            if n == -1:
                if out:
                    return out  # deliver what came before the end; the next call raises
                self._finish_copy()
                raise RetryableError(
                    f"postgres {self.target}: the server ended the replication stream"
                )
            if n < -1:
                raise RetryableError(
                    f"postgres {self.target}: replication stream error: {_msg(pg)}"
                )
            # Nothing complete in libpq's buffer.
            try:
                fd = pg.socket
            except Exception:  # libpq dropped the socket: the connection is gone
                raise RetryableError(
                    f"postgres {self.target}: connection lost: {_msg(pg)}"
                ) from None
            if _queued(fd) >= BEHIND_BYTES and time.monotonic() < until:
                try:
                    self._consume()  # the server is ahead: read on
                except RetryableError:
                    if out:
                        return out  # deliver what came first; the next call fails
                    raise
                continue
            if out:
                break  # little waiting: hand over what came
            if not waited:
                waited = True
                if self._flowing and self._small:
                    self._flowing = False
                    time.sleep(max(0.0, min(COALESCE_S, timeout)))  # let the window fill
                    self._consume()
                    continue
            remaining = until - time.monotonic()
            if remaining <= 0:
                return out
            r, _, _ = select.select([fd], [], [], remaining)
            if r:
                self._consume()
        self._flowing = bool(out)
        if out:
            # (a sample: the stream's messages are mostly one table's rows)
            self._small = len(out[0]) + len(out[len(out) // 2]) + len(out[-1]) < 3 * SMALL_MSG
        return out

    def _consume(self) -> None:
        assert self.pgconn is not None
        try:
            self.pgconn.consume_input()
        except Exception:
            raise RetryableError(
                f"postgres {self.target}: connection lost: {_msg(self.pgconn)}"
            ) from None

    def send_status(self, flush_lsn: int, reply: bool = False) -> None:
        assert self.pgconn is not None
        msg = standby_status(flush_lsn, time.time_ns() // 1000, reply)
        try:
            if self.pgconn.put_copy_data(msg) != 1:
                raise RetryableError(
                    f"postgres {self.target}: cannot send standby status: {_msg(self.pgconn)}"
                )
            while self.pgconn.flush() == 1:
                select.select([], [self.pgconn.socket], [], 1.0)
        except RetryableError:
            raise
        except Exception:
            raise RetryableError(
                f"postgres {self.target}: connection lost: {_msg(self.pgconn)}"
            ) from None

    def _finish_copy(self) -> None:
        # After CopyDone the server may still send in-flight data, then results.
        assert self.pgconn is not None
        self.streaming = False
        for _ in range(4):
            res = self.pgconn.get_result()
            if res is None:
                break

    def close(self) -> None:
        if self.pgconn is None:
            return
        try:
            if self.streaming:
                self.pgconn.put_copy_end()
                self.pgconn.flush()
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    n, _ = self.pgconn.get_copy_data(1)
                    if n == -1:
                        break
                    if n == 0:
                        select.select([self.pgconn.socket], [], [], 0.2)
                        self.pgconn.consume_input()
                    elif n < -1:
                        break
                self._finish_copy()
        except Exception:
            pass
        finally:
            self.pgconn.finish()
            self.pgconn = None


class CommandError(RetryableError):
    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
