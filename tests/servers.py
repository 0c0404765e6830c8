"""Private PostgreSQL and MariaDB servers for tests, benchmarks and demos.

Each server lives in its own directory, listens only on 127.0.0.1 on a free port
(plus a Unix socket in a private directory) and is configured for change data
capture. Nothing here touches the machine's shared database services.

Usage outside pytest::

    from tests.servers import MariaDBServer, NatsServer, PostgresServer, RedisServer

    with PostgresServer() as pg, MariaDBServer() as my:   # start() ... destroy()
        print(pg.dsn(), my.url())

    with RedisServer() as redis, NatsServer() as nats:  # no persistence / JetStream
        print(redis.url, nats.url)

``PostgresServer(base_dir)`` / ``MariaDBServer(base_dir)`` keep their data in
``base_dir`` (a fresh temporary directory when ``None``, removed by ``destroy()``).
``stop()`` keeps the data, so ``start()`` after ``stop()`` or ``crash()`` reopens the
same cluster on the same port. As safety nets, an ``atexit`` hook destroys every
server not yet destroyed, and each running server has a tiny watchdog process that
stops it when the process that started it dies without doing so (even by SIGKILL).

Durability (constructor option ``durability``):

* ``"fast"`` (default): survives a crash of the server *process* (``crash()``,
  SIGKILL) without losing a committed transaction, but not an OS crash or power
  loss. PostgreSQL: ``fsync=off`` (``full_page_writes`` stays on: a SIGKILL in the
  middle of a write can tear a page); MariaDB: ``innodb_flush_log_at_trx_commit=2``,
  ``sync_binlog=0``, ``innodb_log_file_buffering=ON``.
* ``"full"``: the servers' own defaults (fsync at every commit).
* ``"unsafe"``: fastest, for benchmarks only; ``crash()`` may lose the last
  commits. PostgreSQL also ``synchronous_commit=off``, ``full_page_writes=off``;
  MariaDB ``innodb_flush_log_at_trx_commit=0``, ``innodb_doublewrite=OFF``.

PostgreSQL refuses to run as root: when this process is root, ``initdb`` and
``postgres`` run as the ``postgres`` system user (created as ``dataflare-pg`` with
``useradd`` when no such user exists). If that user cannot reach ``base_dir``
(pytest's temporary directories are private to root), the cluster lives in a
private directory under ``/tmp`` owned by that user (``base_dir/data`` links to it;
``destroy()`` removes it); logs stay in ``base_dir``.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Self, get_args

import psycopg
import pymysql
from psycopg import sql
from psycopg.conninfo import make_conninfo

__all__ = [
    "HOST",
    "Durability",
    "MariaDBServer",
    "NatsServer",
    "PostgresServer",
    "RedisServer",
    "ServerError",
    "ServerStartError",
    "find_mariadb_binaries",
    "find_pg_bindir",
    "free_port",
    "pid_alive",
]

HOST = "127.0.0.1"
Durability = Literal["full", "fast", "unsafe"]

_SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes; keep a margin
_POLL = 0.05
_PG_FALLBACK_USER = "dataflare-pg"


class ServerError(RuntimeError):
    """A private database server could not be managed as asked."""


class ServerStartError(ServerError):
    """A private database server did not start; the message has its log's tail."""


class _AddressInUse(ServerStartError):
    pass


# --------------------------------------------------------------------------- helpers


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) of a process from /proc, or None when it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists and is not a zombie."""
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _children(pid: int) -> list[tuple[int, int]]:
    """Direct children of ``pid`` as (pid, starttime)."""
    found: list[tuple[int, int]] = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st is not None and st[1] == pid:
                found.append((int(name), st[2]))
    return found


def _same_process_alive(pid: int, starttime: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[2] == starttime and st[0] not in ("Z", "X")


def _kill_tree(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGKILL ``proc`` by pid, reap it and wait until its children have exited.

    The process is stopped first so that it cannot fork while its children are
    listed. PostgreSQL backends exit on their own once the postmaster is gone;
    children still alive after ``timeout`` get SIGKILL too (matched by pid and
    start time, so a reused pid is never hit).
    """
    children: list[tuple[int, int]] = []
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                st = _proc_stat(proc.pid)
                if st is None or st[0] in ("T", "t", "Z", "X"):
                    break
                time.sleep(0.005)
            children = _children(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + timeout
    killed = False
    while children := [c for c in children if _same_process_alive(*c)]:
        if time.monotonic() > deadline:
            if killed:
                raise ServerError(f"processes {[p for p, _ in children]} did not exit")
            for pid, start in children:
                if _same_process_alive(pid, start):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            killed = True
            deadline = time.monotonic() + 10.0
        time.sleep(0.01)


def _tail(path: Path, offset: int = 0, max_bytes: int = 6000) -> str:
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - max_bytes))
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return "(no log file)"


def _traversable(path: Path, uid: int, gids: Sequence[int]) -> bool:
    """Whether a user can reach ``path`` (search permission on it and every parent)."""
    for p in [path, *path.parents]:
        try:
            st = p.stat()
        except OSError:
            return False
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _which(name: str, *extra_dirs: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in (*extra_dirs, "/usr/sbin", "/usr/local/sbin", "/usr/libexec", "/sbin"):
        candidate = os.path.join(d, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_pg_bindir() -> Path:
    """PostgreSQL's bin directory: ``$DATAFLARE_PG_BINDIR``, ``pg_config --bindir``
    or the newest ``/usr/lib/postgresql/*/bin`` (15 preferred)."""
    env = os.environ.get("DATAFLARE_PG_BINDIR")
    candidates: list[Path] = [Path(env)] if env else []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            candidates.append(Path(out))
        except (subprocess.SubprocessError, OSError):
            pass
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: (p.split("/")[-2] != "15", -int(re.sub(r"\D", "", p) or 0)),
    )
    candidates += [Path(p) for p in versions]
    for c in candidates:
        if (c / "postgres").is_file() and (c / "initdb").is_file():
            return c
    raise ServerError(
        "PostgreSQL server binaries not found (pg_config --bindir, /usr/lib/postgresql/*/bin); "
        "run scripts/ensure-servers.sh"
    )


def find_mariadb_binaries() -> tuple[str, str]:
    """Paths of ``mariadbd`` and ``mariadb-install-db``."""
    server = _which("mariadbd") or _which("mysqld")
    install = _which("mariadb-install-db", "/usr/bin") or _which("mysql_install_db", "/usr/bin")
    if not server or not install:
        raise ServerError("mariadbd / mariadb-install-db not found; run scripts/ensure-servers.sh")
    return server, install


@contextlib.contextmanager
def _scratch(prefix: str, owner: pwd.struct_passwd | None) -> Iterator[Path | None]:
    """A temporary directory on tmpfs (/dev/shm) owned by ``owner``, or None.

    mariadb-install-db runs there and the result is copied into place: its
    bootstrap does hundreds of fsyncs, which take seconds on a busy disk.
    """
    parent = Path("/dev/shm")
    uid, gids = _uid_gids(owner)
    try:
        st = os.statvfs(parent)
        usable = st.f_bavail * st.f_frsize > (1 << 30) and _traversable(parent, uid, gids)
        usable = usable and os.access(parent, os.W_OK)
    except OSError:
        usable = False
    if not usable:
        yield None
        return
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        if owner is not None:
            os.chown(d, owner.pw_uid, owner.pw_gid)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a data directory keeping modes and owners (``cp -a``)."""
    done = subprocess.run(
        ["cp", "-a", "--", str(src), str(dst)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise ServerStartError(f"copying {src} to {dst} failed: {done.stderr.strip()}")


def _uid_gids(owner: pwd.struct_passwd | None) -> tuple[int, list[int]]:
    if owner is None:
        return os.geteuid(), os.getgroups()
    return owner.pw_uid, os.getgrouplist(owner.pw_name, owner.pw_gid)


_USER_LOCK = threading.Lock()


def _pg_os_user(requested: str | None) -> pwd.struct_passwd | None:
    """The OS user to run PostgreSQL as, or None to run as the current user."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        if requested not in (None, me):
            raise ServerError(f"cannot run PostgreSQL as {requested!r} without root")
        return None
    names = [requested] if requested else ["postgres", _PG_FALLBACK_USER]
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    if requested:
        raise ServerError(f"no such user: {requested!r}")
    with _USER_LOCK:
        useradd = _which("useradd") or "useradd"
        subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", _PG_FALLBACK_USER],
            capture_output=True, check=False, timeout=60,
        )  # fmt: skip
        try:
            return pwd.getpwnam(_PG_FALLBACK_USER)
        except KeyError:
            raise ServerError(f"could not create the system user {_PG_FALLBACK_USER!r}") from None


# ------------------------------------------------------------------------- watchdog

# A tiny process per running server that waits for EOF on its stdin, i.e. for this
# process to stop the server or to die by any means (even SIGKILL, when neither
# fixture finalizers nor atexit run). On EOF it stops the server if it still runs
# (matched by pid and start time), SIGKILL after 15 s.
_WATCHDOG_CODE = r"""
import os, signal, sys, time
pid, start, sig = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def alive():
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return False
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0] not in ("Z", "X") and int(fields[19]) == start
try:
    sys.stdin.buffer.read()
except BaseException:
    pass
for s, wait in ((sig, 15.0), (signal.SIGKILL, 5.0)):
    if not alive():
        break
    try:
        os.kill(pid, s)
    except OSError:
        pass
    deadline = time.monotonic() + wait
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
"""


def _spawn_watchdog(proc: subprocess.Popen[bytes], sig: int) -> subprocess.Popen[bytes] | None:
    st = _proc_stat(proc.pid)
    if st is None:
        return None
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _WATCHDOG_CODE,
         str(proc.pid), str(st[2]), str(int(sig))],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def _release_watchdog(watchdog: subprocess.Popen[bytes]) -> None:
    """The server is stopped: end its watchdog (a forked child of this process may
    still hold the pipe open, so do not wait for EOF to reach it)."""
    if watchdog.stdin is not None:
        watchdog.stdin.close()
    if watchdog.poll() is None:
        watchdog.kill()
    watchdog.wait()


# ------------------------------------------------------------------ process registry

_LIVE: set[_Server] = set()
_LIVE_LOCK = threading.Lock()
_OWNER_PID = os.getpid()


def _close_watchdog_pipes_in_child() -> None:
    # after os.fork(): the child must not keep the watchdogs' pipes open
    for server in list(_LIVE):
        watchdog = server._watchdog
        if watchdog is not None and watchdog.stdin is not None:
            with contextlib.suppress(OSError):
                watchdog.stdin.close()


os.register_at_fork(after_in_child=_close_watchdog_pipes_in_child)


@atexit.register
def _destroy_all() -> None:
    if os.getpid() != _OWNER_PID:  # a forked child must not stop its parent's servers
        return
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.destroy(timeout=10.0)


# ----------------------------------------------------------------------- base class


class _Server:
    kind: ClassVar[str] = "server"
    #: what the watchdog sends first when this process dies without stopping the server
    _watchdog_signal: ClassVar[int] = signal.SIGTERM
    host: str = HOST

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None,
        *,
        durability: Durability,
        port: int | None,
        start_timeout: float,
    ) -> None:
        if durability not in get_args(Durability):
            raise ValueError(f"durability must be one of {get_args(Durability)}")
        if base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix=f"dataflare-{self.kind}-"))
            self.base_dir.chmod(0o755)
            self._owns_base_dir = True
        else:
            self.base_dir = Path(base_dir).absolute()
            self.base_dir.mkdir(parents=True, exist_ok=True)
            self._owns_base_dir = False
        self.durability: Durability = durability
        self.port: int = port or 0
        self.start_timeout = start_timeout
        self.log_path = self.base_dir / f"{self.kind}.log"
        #: seconds the last start() took (including initialisation on the first one)
        self.last_start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._initialized = False
        self._started_once = port is not None  # a fixed port is never replaced
        self._destroyed = False
        self._extra_dirs: list[Path] = []  # private dirs outside base_dir, removed by destroy()
        self._lock = threading.RLock()
        with _LIVE_LOCK:
            _LIVE.add(self)

    # -- subclass hooks
    def _init_data(self) -> None:
        raise NotImplementedError

    def _launch(self, log: Any) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _ping(self, proc: subprocess.Popen[bytes]) -> bool:
        """Whether ``proc`` (and not some server that took the port) accepts connections."""
        raise NotImplementedError

    def _shutdown(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        raise NotImplementedError

    # -- state
    @property
    def pid(self) -> int | None:
        """Pid of the server's main process (postmaster / mariadbd) while running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def pids(self) -> list[int]:
        """The main process and its direct children (PostgreSQL backends, workers)."""
        pid = self.pid
        return [] if pid is None else [pid, *(c for c, _ in _children(pid))]

    def log_tail(self, max_bytes: int = 6000) -> str:
        return _tail(self.log_path, 0, max_bytes)

    # -- lifecycle
    def start(self) -> Self:
        """Start the server (initialising its data directory the first time) and
        wait until it accepts connections. A no-op while running."""
        with self._lock:
            if self._destroyed:
                raise ServerError(f"{self!r} was destroyed")
            if self.running:
                return self
            if self._proc is not None:  # died on its own: reap
                self._proc.wait()
                self._forget_proc()
            t0 = time.monotonic()
            deadline = t0 + self.start_timeout
            if not self._initialized:
                self._init_data()
                self._initialized = True
            new_ports = 0
            while True:
                if not self.port:
                    self.port = free_port(self.host)
                try:
                    self._start_once(deadline)
                    break
                except _AddressInUse:
                    if not self._started_once and new_ports < 10:
                        new_ports += 1  # raced with someone for the port: pick another
                        self.port = 0
                        continue
                    if time.monotonic() < deadline:  # keep the port a restarted server had
                        time.sleep(0.25)
                        continue
                    raise
            self._started_once = True
            self.last_start_seconds = time.monotonic() - t0
            return self

    def _start_once(self, deadline: float) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n===== dataflare: {self.kind} on port {self.port} {stamp}\n".encode())
            log.flush()
            offset = log.tell()
            proc = self._launch(log)
        self._proc = proc
        try:
            self._watchdog = _spawn_watchdog(proc, self._watchdog_signal)
            while True:
                rc = proc.poll()
                if rc is not None:
                    output = _tail(self.log_path, offset)
                    self._forget_proc()
                    if "Address already in use" in output:
                        raise _AddressInUse(
                            f"{self.kind}: address in use (port {self.port}):\n{output}"
                        )
                    raise ServerStartError(
                        f"{self.kind} exited with status {rc} during startup "
                        f"(log {self.log_path}):\n{output}"
                    )
                if self._ping(proc):
                    return
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"{self.kind} did not accept connections on {self.host}:{self.port} "
                        f"within {self.start_timeout:g}s (log {self.log_path}):\n"
                        f"{_tail(self.log_path, offset)}"
                    )
                time.sleep(_POLL)
        except BaseException:
            if self._proc is not None:
                _kill_tree(self._proc)
                self._forget_proc()
            raise

    def _forget_proc(self) -> None:
        """The server process is gone (and reaped): let its watchdog go too."""
        self._proc = None
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            _release_watchdog(watchdog)

    def stop(self, timeout: float = 60.0) -> None:
        """Shut down cleanly (kill if that takes longer than ``timeout``); data is kept."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            try:
                if proc.poll() is None:
                    self._shutdown(proc, timeout)
                if proc.poll() is None:
                    _kill_tree(proc)
                proc.wait()
            finally:
                self._forget_proc()

    def crash(self) -> None:
        """SIGKILL the server's main process by pid and wait until it and its children
        are gone. ``start()`` then runs crash recovery on the same data and port."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise ServerError(f"{self!r} is not running")
            try:
                _kill_tree(proc)
            finally:
                self._forget_proc()

    def restart(self) -> Self:
        """Clean stop then start; the data directory and the port are kept."""
        with self._lock:
            self.stop()
            return self.start()

    def destroy(self, timeout: float = 60.0) -> None:
        """Stop the server and remove its temporary directories (``base_dir`` only
        when it was created here). The server cannot be started again."""
        with self._lock:
            try:
                self.stop(timeout)
            finally:
                self._destroyed = True
                for d in self._extra_dirs:
                    shutil.rmtree(d, ignore_errors=True)
                if self._owns_base_dir:
                    shutil.rmtree(self.base_dir, ignore_errors=True)
                with _LIVE_LOCK:
                    _LIVE.discard(self)

    close = destroy

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state} {self.base_dir}>"

    def _private_dir(self, prefix: str, owner: pwd.struct_passwd | None) -> Path:
        """A fresh directory under a world-traversable temp dir, owned by ``owner``."""
        uid, gids = _uid_gids(owner)
        for parent in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):
            if os.path.isdir(parent) and _traversable(Path(parent), uid, gids):
                break
        else:
            raise ServerError("no temporary directory that the server's user can reach")
        d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        if owner is not None:
            os.chown(d, owner.pw_uid, owner.pw_gid)
        self._extra_dirs.append(d)
        return d


# ------------------------------------------------------------------------ PostgreSQL

_PG_DURABILITY: dict[str, dict[str, str | int | bool]] = {
    "full": {},
    "fast": {"fsync": False},
    "unsafe": {"fsync": False, "synchronous_commit": False, "full_page_writes": False},
}


def _pg_conf_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class PostgresServer(_Server):
    """A private PostgreSQL cluster with ``wal_level=logical`` on 127.0.0.1.

    Trust authentication over TCP (127.0.0.1) and the Unix socket in
    ``socket_dir``; ``superuser`` is the cluster's bootstrap superuser.
    ``settings`` are extra ``postgresql.conf`` settings (they override the
    defaults here). ``postgresql.conf`` is written once, so ``ALTER SYSTEM`` +
    ``restart()`` works as usual.
    """

    kind = "postgres"
    _watchdog_signal = signal.SIGINT  # fast shutdown

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        durability: Durability = "fast",
        superuser: str = "postgres",
        port: int | None = None,
        settings: Mapping[str, str | int | float | bool] | None = None,
        os_user: str | None = None,
        bindir: str | os.PathLike[str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.bindir = Path(bindir) if bindir else find_pg_bindir()
        super().__init__(base_dir, durability=durability, port=port, start_timeout=start_timeout)
        self.superuser = superuser
        self.settings: dict[str, str | int | float | bool] = {
            "listen_addresses": HOST,
            "wal_level": "logical",
            "max_replication_slots": 32,
            "max_wal_senders": 32,
            "max_connections": 200,
            "timezone": "UTC",
            "log_timezone": "UTC",
            "lc_messages": "C",
            "cluster_name": "dataflare-test",  # shows in ps: "postgres: dataflare-test: …"
            **_PG_DURABILITY[durability],
            **(settings or {}),
        }
        self._os_user = _pg_os_user(os_user)
        uid, gids = _uid_gids(self._os_user)
        if _traversable(self.base_dir, uid, gids):
            self.run_dir = self.base_dir / "run"
            self.run_dir.mkdir(mode=0o700, exist_ok=True)
            if self._os_user is not None:
                os.chown(self.run_dir, self._os_user.pw_uid, self._os_user.pw_gid)
        else:
            self.run_dir = self._private_dir("dataflare-pg-", self._os_user)
        #: the cluster (PGDATA)
        self.data_dir = self.run_dir / "data"
        #: directory of the Unix socket (``host=`` for a socket connection)
        self.socket_dir = self.run_dir
        if len(str(self.socket_dir)) + len("/.s.PGSQL.65535.lock") > _SUN_PATH_MAX:
            self.socket_dir = self._private_dir("dfpg-", self._os_user)
        self.settings.setdefault("unix_socket_directories", str(self.socket_dir))
        link = self.base_dir / "data"
        if self.run_dir.parent != self.base_dir:  # make the cluster easy to find
            if link.is_symlink():
                link.unlink()
            if not link.exists():
                link.symlink_to(self.data_dir)

    # -- process management
    def _user_kwargs(self) -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", HOME=str(self.run_dir))
        kwargs: dict[str, Any] = {"env": env, "cwd": str(self.run_dir)}
        if self._os_user is not None:
            kwargs.update(user=self._os_user.pw_uid, group=self._os_user.pw_gid, extra_groups=[])
        return kwargs

    def _init_data(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        log_path = self.base_dir / "initdb.log"
        # straight into place: with --no-sync, initdb is as fast as a copy from tmpfs
        cmd = [
            str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", self.superuser,
            "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions",
        ]  # fmt: skip
        with log_path.open("wb") as log:
            rc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                timeout=self.start_timeout, check=False, **self._user_kwargs(),
            ).returncode  # fmt: skip
        if rc != 0:
            raise ServerStartError(f"initdb failed ({rc}):\n{_tail(log_path)}")
        lines = [f"{k} = {_pg_conf_value(v)}" for k, v in self.settings.items()]
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# ---- DataFlare private test server ----\n" + "\n".join(lines) + "\n")

    def _launch(self, log: Any) -> subprocess.Popen[bytes]:
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, **self._user_kwargs(),
        )  # fmt: skip

    def _ping(self, proc: subprocess.Popen[bytes]) -> bool:
        try:
            with psycopg.connect(self.dsn(connect_timeout=2)) as conn:
                row = conn.execute("SELECT pg_backend_pid()").fetchone()
                st = _proc_stat(int(row[0])) if row else None
                return st is not None and st[1] == proc.pid  # a backend of our postmaster
        except psycopg.Error:
            return False

    def _shutdown(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        cmd = [str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast",
               "-w", "-t", str(max(1, int(timeout))), "-s"]  # fmt: skip
        try:
            subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout + 5,
                check=False, **self._user_kwargs(),
            )  # fmt: skip
            proc.wait(timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            if proc.poll() is None:
                _kill_tree(proc)

    # -- client helpers
    def dsn(self, dbname: str = "postgres", user: str | None = None, **params: Any) -> str:
        """libpq conninfo string (TCP), e.g. ``host=127.0.0.1 port=… dbname=… user=…``.
        Extra ``params`` are added (``replication="database"``, ``connect_timeout=5``…)."""
        if not self.port:
            raise ServerError("server not started yet: no port")
        return make_conninfo(
            host=self.host, port=self.port, dbname=dbname, user=user or self.superuser, **params
        )

    def url(self, dbname: str = "postgres", user: str | None = None) -> str:
        """``postgresql://user@127.0.0.1:port/dbname``."""
        from urllib.parse import quote

        if not self.port:
            raise ServerError("server not started yet: no port")
        user = quote(user or self.superuser, safe="")
        return f"postgresql://{user}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def connect(
        self, dbname: str = "postgres", *, autocommit: bool = True, **kwargs: Any
    ) -> psycopg.Connection[tuple[Any, ...]]:
        """A new psycopg connection (autocommit by default); close it (``with``)."""
        return psycopg.connect(self.dsn(dbname), autocommit=autocommit, **kwargs)

    def execute(
        self,
        query: str | bytes | sql.SQL | sql.Composed,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        dbname: str = "postgres",
    ) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode on a fresh connection; the rows it
        returned (``[]`` for statements without a result)."""
        with self.connect(dbname) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """``CREATE DATABASE name``; returns its :meth:`dsn`."""
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            stmt = sql.SQL("{} TEMPLATE {}").format(stmt, sql.Identifier(template))
        self.execute(stmt)
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, its connections and its (logical) replication slots."""
        self.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            [name],
        )
        deadline = time.monotonic() + 10
        while True:
            rows = self.execute(
                "SELECT slot_name, active FROM pg_replication_slots WHERE database = %s", [name]
            )
            for slot, active in rows:
                if not active:
                    with contextlib.suppress(
                        psycopg.errors.ObjectInUse, psycopg.errors.UndefinedObject
                    ):
                        self.execute("SELECT pg_drop_replication_slot(%s)", [slot])
            if not rows or time.monotonic() > deadline:
                break
            time.sleep(_POLL)
        self.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


# --------------------------------------------------------------------------- MariaDB

# innodb_log_file_buffering=ON: redo log writes go through the page cache instead of
# O_DIRECT, so a commit does not wait for the disk (safe against a process crash).
_MARIADB_DURABILITY: dict[str, dict[str, str]] = {
    "full": {"innodb-flush-log-at-trx-commit": "1", "sync-binlog": "1"},
    "fast": {
        "innodb-flush-log-at-trx-commit": "2",
        "sync-binlog": "0",
        "innodb-log-file-buffering": "ON",
    },
    "unsafe": {
        "innodb-flush-log-at-trx-commit": "0",
        "sync-binlog": "0",
        "innodb-log-file-buffering": "ON",
        "innodb-doublewrite": "OFF",
    },
}
# mariadb-install-db: the bootstrap's own durability does not matter
_MARIADB_BOOTSTRAP = [
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-log-file-buffering=ON",
    "--innodb-doublewrite=OFF",
]
_server_ids = itertools.count(1)


class MariaDBServer(_Server):
    """A private MariaDB server with a row-based binlog (FULL image and metadata).

    ``root`` has an empty password (TCP from 127.0.0.1 and the Unix socket); real
    grant tables are in place, so users with ``REPLICATION SLAVE`` etc. can be
    created. ``options`` are extra ``mariadbd`` command-line options
    (``{"max-connections": "500", "skip-log-bin": None}``) overriding the defaults.
    ``server_id`` defaults to 1, 2, 3… per process.
    """

    kind = "mariadb"
    user: str = "root"
    password: str = ""

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        durability: Durability = "fast",
        server_id: int | None = None,
        port: int | None = None,
        options: Mapping[str, str | int | None] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.mariadbd, self.install_db = find_mariadb_binaries()
        super().__init__(base_dir, durability=durability, port=port, start_timeout=start_timeout)
        self.server_id = server_id if server_id is not None else next(_server_ids)
        self.data_dir = self.base_dir / "data"
        self.pid_file = self.base_dir / "mariadbd.pid"
        self.tmp_dir = self.base_dir / "tmp"
        socket_dir = self.base_dir
        if len(str(socket_dir)) + len("/mariadbd.sock") > _SUN_PATH_MAX:
            socket_dir = self._private_dir("dfmy-", None)
        self.socket_path = socket_dir / "mariadbd.sock"
        self.options: dict[str, str | None] = {
            "innodb-buffer-pool-size": "64M",
            "innodb-log-file-size": "32M",
            "log-bin": "mysql-bin",
            "binlog-format": "ROW",
            "binlog-row-image": "FULL",
            "binlog-row-metadata": "FULL",
            "server-id": str(self.server_id),
            "gtid-strict-mode": "OFF",
            "character-set-server": "utf8mb4",
            "collation-server": "utf8mb4_general_ci",
            "default-time-zone": "+00:00",
            "max-connections": "200",
            "max-allowed-packet": "64M",
            **_MARIADB_DURABILITY[durability],
        }
        for key, value in (options or {}).items():
            self.options[key.lstrip("-").replace("_", "-")] = None if value is None else str(value)

    def _common_args(self, data_dir: Path) -> list[str]:
        args = [f"--datadir={data_dir}", "--skip-name-resolve"]
        if os.geteuid() == 0:
            args.append("--user=root")
        return args

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("MYSQL")}

    def _init_data(self) -> None:
        if (self.data_dir / "mysql").is_dir():
            return
        self.tmp_dir.mkdir(exist_ok=True)
        log_path = self.base_dir / "install-db.log"
        with _scratch("dataflare-install-db-", None) as scratch:
            target = scratch / "data" if scratch else self.data_dir
            cmd = [
                self.install_db, "--no-defaults", *self._common_args(target),
                "--auth-root-authentication-method=normal", "--skip-test-db",
                f"--innodb-log-file-size={self.options['innodb-log-file-size']}",
                f"--innodb-buffer-pool-size={self.options['innodb-buffer-pool-size']}",
                *_MARIADB_BOOTSTRAP,
            ]  # fmt: skip
            with log_path.open("wb") as log:
                rc = subprocess.run(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=self.base_dir, env=self._env(), timeout=self.start_timeout, check=False,
                ).returncode  # fmt: skip
            if rc != 0:
                raise ServerStartError(f"mariadb-install-db failed ({rc}):\n{_tail(log_path)}")
            if target != self.data_dir:
                _copy_tree(target, self.data_dir)

    def _launch(self, log: Any) -> subprocess.Popen[bytes]:
        self.tmp_dir.mkdir(exist_ok=True)
        cmd = [
            self.mariadbd, "--no-defaults", *self._common_args(self.data_dir),
            f"--port={self.port}", f"--bind-address={self.host}",
            f"--socket={self.socket_path}", f"--pid-file={self.pid_file}",
            f"--tmpdir={self.tmp_dir}",
            *(f"--{k}" if v is None else f"--{k}={v}" for k, v in self.options.items()),
        ]  # fmt: skip
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=self.base_dir, env=self._env(), start_new_session=True,
        )  # fmt: skip

    def _ping(self, proc: subprocess.Popen[bytes]) -> bool:
        try:
            conn = pymysql.connect(**self.connect_args(), connect_timeout=2)
        except pymysql.err.MySQLError:
            return False
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT @@socket")
                row = cur.fetchone()
            return row is not None and row[0] == str(self.socket_path)  # ours
        except pymysql.err.MySQLError:
            return False
        finally:
            conn.close()

    def _shutdown(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)

    # -- client helpers
    def connect_args(self, database: str | None = None) -> dict[str, Any]:
        """Keyword arguments for ``pymysql.connect`` (and pymysqlreplication's
        ``connection_settings``): host, port, user, password[, database]."""
        if not self.port:
            raise ServerError("server not started yet: no port")
        args: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
        }
        if database is not None:
            args["database"] = database
        return args

    def url(self, database: str | None = None) -> str:
        """``mysql://root@127.0.0.1:port[/database]``."""
        if not self.port:
            raise ServerError("server not started yet: no port")
        return f"mysql://{self.user}@{self.host}:{self.port}/{database or ''}".rstrip("/")

    def connect(self, database: str | None = None, **kwargs: Any) -> Any:
        """A new pymysql connection (utf8mb4, autocommit by default); close it."""
        args: dict[str, Any] = {"charset": "utf8mb4", "autocommit": True}
        args.update(self.connect_args(database))
        args.update(kwargs)
        return pymysql.connect(**args)

    def execute(
        self,
        query: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        database: str | None = None,
    ) -> list[tuple[Any, ...]]:
        """Run one statement (autocommit) on a fresh connection; the rows it returned."""
        conn = self.connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return list(cur.fetchall()) if cur.description is not None else []
        finally:
            conn.close()

    @staticmethod
    def quote_name(name: str) -> str:
        return "`" + name.replace("`", "``") + "`"

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name`` (utf8mb4); returns the name."""
        self.execute(f"CREATE DATABASE {self.quote_name(name)} CHARACTER SET utf8mb4")
        return name

    def drop_database(self, name: str) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {self.quote_name(name)}")


# ------------------------------------------------------------------- Redis and NATS


def _owns_listener(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the socket listening on TCP ``port`` (so a
    server that raced us for the port is never taken for ours)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT, state 0A is LISTEN
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
    return False


class RedisServer(_Server):
    """A private Redis without persistence (``--save '' --appendonly no``) on
    127.0.0.1, no password. ``url`` is ``redis://127.0.0.1:port/0``."""

    kind = "redis"

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        binary = _which("redis-server")
        if binary is None:
            raise ServerError("redis-server not found; install the redis-server package")
        self.binary = binary
        super().__init__(base_dir, durability="fast", port=port, start_timeout=start_timeout)

    def _init_data(self) -> None:
        pass  # nothing persists

    def _launch(self, log: Any) -> subprocess.Popen[bytes]:
        cmd = [self.binary, "--port", str(self.port), "--bind", self.host, "--save", "",
               "--appendonly", "no", "--dir", str(self.base_dir), "--daemonize", "no"]  # fmt: skip
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=self.base_dir, start_new_session=True,
        )  # fmt: skip

    def _ping(self, proc: subprocess.Popen[bytes]) -> bool:
        import redis

        try:
            with redis.Redis(host=self.host, port=self.port, socket_timeout=2) as client:
                return int(client.info("server")["process_id"]) == proc.pid
        except (redis.RedisError, OSError):
            return False

    def _shutdown(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:port/0``."""
        if not self.port:
            raise ServerError("server not started yet: no port")
        return f"redis://{self.host}:{self.port}/0"

    def client(self, db: int = 0, **kwargs: Any) -> Any:
        """A new ``redis.Redis`` client (bytes replies unless ``decode_responses``)."""
        import redis

        if not self.port:
            raise ServerError("server not started yet: no port")
        return redis.Redis(host=self.host, port=self.port, db=db, **kwargs)


class NatsServer(_Server):
    """A private NATS server with JetStream (store in ``base_dir/jetstream``) on
    127.0.0.1, no auth. ``url`` is ``nats://127.0.0.1:port``."""

    kind = "nats"

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        binary = _which("nats-server")
        if binary is None:
            raise ServerError("nats-server not found; install the nats-server package")
        self.binary = binary
        super().__init__(base_dir, durability="fast", port=port, start_timeout=start_timeout)
        self.store_dir = self.base_dir / "jetstream"

    def _init_data(self) -> None:
        self.store_dir.mkdir(exist_ok=True)

    def _launch(self, log: Any) -> subprocess.Popen[bytes]:
        cmd = [
            self.binary,
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir),
        ]
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=self.base_dir, start_new_session=True,
        )  # fmt: skip

    def _start_once(self, deadline: float) -> None:
        try:
            super()._start_once(deadline)
        except ServerStartError as exc:
            # nats-server says "address already in use" (lower case): retry on another port
            if not isinstance(exc, _AddressInUse) and "address already in use" in str(exc):
                raise _AddressInUse(str(exc)) from None
            raise

    def _ping(self, proc: subprocess.Popen[bytes]) -> bool:
        import json

        try:
            with socket.create_connection((self.host, self.port), timeout=2) as sock:
                line = sock.makefile("rb").readline()  # the server greets with INFO {...}
        except OSError:
            return False
        if not line.startswith(b"INFO "):
            return False
        info = json.loads(line[5:])
        return bool(info.get("jetstream")) and _owns_listener(proc.pid, self.port)

    def _shutdown(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:port``."""
        if not self.port:
            raise ServerError("server not started yet: no port")
        return f"nats://{self.host}:{self.port}"
