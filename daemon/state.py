"""The daemon's durable state: one LMDB environment under ``state_dir``.

Every process of the daemon (the supervisor, each source process, each apply
process) opens the same environment on its own; LMDB serialises writers across
processes and gives readers consistent snapshots.  Named sub-databases:

``checkpoints``
    the position (and sink-specific extra) each destination durably applied,
    key ``S(workflow) S(destination) S(source)``
``snapshots``
    initial-snapshot progress, key ``S(workflow) S(source)``
``schemas``
    append-only schema history, key ``S(workflow) S(source) U64(position.value) U32(seq)``
``dead_letters``
    key ``S(workflow) U64(id)``
``meta``
    user keys ``b"u" + utf8(key)``; per-workflow dead-letter id high-water marks
    ``b"d" + S(workflow)``

``S(x)`` is a 2-byte big-endian length followed by the UTF-8 bytes of ``x``, so
keys are unambiguous for names holding any character and ``S(workflow)`` is an
exact prefix of the workflow's keys; integers are big-endian fixed width so keys
sort numerically.  Values are msgpack, zstd-compressed when the msgpack form is
larger than 1 KiB (a one-byte prefix tells which); a position is ``[kind, value,
tag]``.

Durability: ``sync=True`` and ``metasync=True``, so a committed transaction is on
disk when ``commit`` returns (data pages, then the meta page, each fsynced) and
survives SIGKILL and power loss; a killed writer leaves at most an uncommitted
transaction, which LMDB ignores.  ``writemap`` is off: it would let a stray write
through the writable map corrupt the database, and its speed-up does not matter
for a store this small.  A read-only store opened in a process that already has
the environment open for writing shares it (read-only is then enforced here).

The map starts at 64 MiB and doubles whenever a write transaction runs out of
room (the transaction is aborted, the map grown and the transaction run again).
When another process grew the map, ``MapResizedError`` is handled by adopting the
new size.  LMDB forbids opening one environment twice in a process, so every
:class:`StateStore` of a process on the same ``state_dir`` shares one environment
(reference counted, closed with the last store).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final, TypeAlias, TypeVar, cast

import lmdb
import msgpack  # type: ignore[import-untyped, unused-ignore]
import zstandard
from dataflare.cdc.errors import FatalError, RetryableError
from dataflare.cdc.model import Position

__all__ = [
    "COMPRESS_THRESHOLD",
    "DEFAULT_MAP_SIZE",
    "StateConflictError",
    "StateError",
    "StateStore",
    "StateTxn",
]

DEFAULT_MAP_SIZE: Final = 64 << 20
MAX_MAP_SIZE: Final = 1 << 40  # growth stops here: something is writing without bound
COMPRESS_THRESHOLD: Final = 1024
_ZSTD_LEVEL: Final = 3
_RAW: Final = b"\x00"
_ZSTD: Final = b"\x01"
_U64_MAX: Final = (1 << 64) - 1
_U32_MAX: Final = (1 << 32) - 1

_DB_NAMES: Final = ("checkpoints", "snapshots", "schemas", "dead_letters", "meta")
_MAX_DBS: Final = 16  # room for sub-databases added later

_T = TypeVar("_T")
_Txn: TypeAlias = "lmdb.Transaction[bytes]"


class StateError(FatalError):
    """The state store cannot be opened or used (missing, corrupt, misused)."""


class StateConflictError(RetryableError):
    """A transaction had to be re-run after growing the map and came out different.

    Only possible when another process changed the same dead letters in between;
    the map has grown, so running the transaction again succeeds.
    """


# --- encoding ---------------------------------------------------------------------------


def _pack(obj: object) -> bytes:
    data = cast(bytes, msgpack.packb(obj, use_bin_type=True))
    if len(data) > COMPRESS_THRESHOLD:
        compressed = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data)
        if len(compressed) < len(data):
            return _ZSTD + compressed
    return _RAW + data


def _unpack(raw: bytes) -> Any:
    try:
        tag, body = raw[:1], raw[1:]
        if tag == _ZSTD:
            body = zstandard.ZstdDecompressor().decompress(body)
        elif tag != _RAW:
            raise ValueError(f"unknown value encoding {tag!r}")
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:
        raise StateError(f"corrupt value in the state store: {exc}") from exc


def _pack_position(position: Position) -> list[object]:
    _u64(position.value)  # validates the range once, for values and keys alike
    return [position.kind, position.value, position.tag]


def _unpack_position(obj: object) -> Position:
    if isinstance(obj, list) and len(obj) == 3:
        kind, value, tag = obj
        if isinstance(kind, str) and isinstance(value, int) and isinstance(tag, str):
            return Position(kind, value, tag)
    raise StateError(f"corrupt position in the state store: {obj!r}")


def _dict(obj: object) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise StateError(f"corrupt record in the state store: {obj!r}")
    return obj


def _s(part: str) -> bytes:
    data = part.encode("utf-8", "surrogatepass")
    if len(data) > 0xFFFF:
        raise ValueError(f"name too long for the state store: {part[:40]!r}...")
    return len(data).to_bytes(2, "big") + data


def _split(key: bytes, count: int) -> tuple[list[str], bytes]:
    """The first ``count`` ``S(...)`` parts of ``key`` and the rest."""
    parts: list[str] = []
    at = 0
    for _ in range(count):
        size = int.from_bytes(key[at : at + 2], "big")
        parts.append(key[at + 2 : at + 2 + size].decode("utf-8", "surrogatepass"))
        at += 2 + size
    return parts, key[at:]


def _u64(value: int) -> bytes:
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"{value} is outside the unsigned 64-bit range the state store keeps")
    return value.to_bytes(8, "big")


def _meta_key(key: str) -> bytes:
    return b"u" + key.encode("utf-8", "surrogatepass")


def _dl_counter_key(workflow: str) -> bytes:
    return b"d" + _s(workflow)


# --- operations inside one LMDB transaction ---------------------------------------------


class _Ops:
    """Reads and writes of encoded keys and values within one LMDB transaction."""

    __slots__ = ("_dbs", "_max_key", "txn", "write")

    def __init__(
        self, txn: _Txn, write: bool, dbs: Mapping[str, lmdb._Database | None], max_key: int
    ) -> None:
        self.txn = txn
        self.write = write
        self._dbs = dbs
        self._max_key = max_key

    def _db(self, name: str) -> lmdb._Database | None:
        return self._dbs[name]

    def _wdb(self, name: str) -> lmdb._Database:
        db = self._dbs[name]
        if db is None:  # only read-only stores lack sub-databases
            raise StateError("the state store is read-only")
        return db

    def get(self, name: str, key: bytes) -> bytes | None:
        db = self._db(name)
        if db is None or len(key) > self._max_key:
            return None
        return self.txn.get(key, db=db)

    def put(self, name: str, key: bytes, value: bytes) -> None:
        if len(key) > self._max_key:
            raise ValueError(f"names too long for the state store (key of {len(key)} bytes)")
        self.txn.put(key, value, db=self._wdb(name))

    def delete(self, name: str, key: bytes) -> bool:
        if len(key) > self._max_key:
            return False
        return self.txn.delete(key, db=self._wdb(name))

    def scan(self, name: str, prefix: bytes, limit: int | None = None) -> list[tuple[bytes, bytes]]:
        db = self._db(name)
        out: list[tuple[bytes, bytes]] = []
        if db is None or (limit is not None and limit <= 0):
            return out
        with self.txn.cursor(db=db) as cur:
            if not cur.set_range(prefix):
                return out
            for key, value in cur:
                if not key.startswith(prefix):
                    break
                out.append((key, value))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def count(self, name: str, prefix: bytes) -> int:
        db = self._db(name)
        if db is None:
            return 0
        n = 0
        with self.txn.cursor(db=db) as cur:
            if not cur.set_range(prefix):
                return 0
            for key in cur.iternext(keys=True, values=False):
                if not key.startswith(prefix):
                    break
                n += 1
        return n

    def last_key(self, name: str, prefix: bytes) -> bytes | None:
        db = self._db(name)
        if db is None:
            return None
        with self.txn.cursor(db=db) as cur:
            # Keys of this prefix sort before prefix + 0xFF...; step back from there.
            found = cur.set_range(prefix + b"\xff" * 16)
            moved = cur.prev() if found else cur.last()
            if moved and cur.key().startswith(prefix):
                return cur.key()
        return None

    def delete_prefix(self, name: str, prefix: bytes) -> int:
        db = self._wdb(name)
        n = 0
        with self.txn.cursor(db=db) as cur:
            if not cur.set_range(prefix):
                return 0
            while cur.key().startswith(prefix):
                n += 1
                if not cur.delete():  # moves to the next record; False at the end
                    break
        return n

    # composite operations (deterministic given the database state: re-run on retry)

    def append_schema(self, prefix: bytes, value: bytes) -> None:
        decoded = _unpack(value)
        entries = self.scan("schemas", prefix)
        if any(_unpack(v) == decoded for _, v in entries):
            return  # the same record at the same position: a replay after a restart
        seq = 0
        if entries:
            seq = int.from_bytes(entries[-1][0][len(prefix) :], "big") + 1
        if seq > _U32_MAX:
            raise StateError("too many schema records at one position")
        self.put("schemas", prefix + seq.to_bytes(4, "big"), value)

    def put_dead_letter(self, workflow: str, value: bytes) -> int:
        prefix = _s(workflow)
        counter_key = _dl_counter_key(workflow)
        raw = self.get("meta", counter_key)
        last = int.from_bytes(raw, "big") if raw is not None else 0
        last_key = self.last_key("dead_letters", prefix)
        if last_key is not None:
            last = max(last, int.from_bytes(last_key[len(prefix) :], "big"))
        letter_id = last + 1
        self.put("meta", counter_key, _u64(letter_id))
        self.put("dead_letters", prefix + _u64(letter_id), value)
        return letter_id

    def delete_workflow(self, workflow: str) -> None:
        prefix = _s(workflow)
        for name in ("checkpoints", "snapshots", "schemas", "dead_letters"):
            self.delete_prefix(name, prefix)
        self.delete("meta", _dl_counter_key(workflow))


# --- write requests: encoded eagerly, so a retried transaction writes the same bytes ----


def _checkpoint_key(workflow: str, destination: str, source: str) -> bytes:
    return _s(workflow) + _s(destination) + _s(source)


def _req_put_checkpoint(
    workflow: str,
    destination: str,
    source: str,
    position: Position,
    extra: Mapping[str, Any] | None,
) -> Callable[[_Ops], None]:
    key = _checkpoint_key(workflow, destination, source)
    value = _pack({"p": _pack_position(position), "x": None if extra is None else dict(extra)})
    return lambda ops: ops.put("checkpoints", key, value)


def _req_put_snapshot_progress(
    workflow: str, source: str, progress: Mapping[str, Any]
) -> Callable[[_Ops], None]:
    key = _s(workflow) + _s(source)
    value = _pack(dict(progress))
    return lambda ops: ops.put("snapshots", key, value)


def _req_append_schema(
    workflow: str, source: str, position: Position, schema_record: Mapping[str, Any]
) -> Callable[[_Ops], None]:
    prefix = _s(workflow) + _s(source) + _u64(position.value)
    value = _pack({"p": _pack_position(position), "r": dict(schema_record)})
    return lambda ops: ops.append_schema(prefix, value)


def _req_put_dead_letter(workflow: str, record: Mapping[str, Any]) -> Callable[[_Ops], int]:
    value = _pack(dict(record))
    return lambda ops: ops.put_dead_letter(workflow, value)


def _req_delete_dead_letter(workflow: str, letter_id: int) -> Callable[[_Ops], bool]:
    if not 0 <= letter_id <= _U64_MAX:
        return lambda ops: False
    key = _s(workflow) + _u64(letter_id)
    return lambda ops: ops.delete("dead_letters", key)


def _req_put_meta(key: str, value: Any) -> Callable[[_Ops], None]:
    raw_key = _meta_key(key)
    raw = _pack(value)
    return lambda ops: ops.put("meta", raw_key, raw)


def _req_delete_workflow(workflow: str) -> Callable[[_Ops], None]:
    return lambda ops: ops.delete_workflow(workflow)


# --- the environment, shared by the stores of one process -------------------------------


class _Env:
    """One open LMDB environment; at most one per state directory per process."""

    def __init__(self, path: str, readonly: bool, map_size: int) -> None:
        self.path = path
        self.readonly = readonly
        self.pid = os.getpid()
        self.refs = 0
        # Serialises this process's use of the environment: set_mapsize needs no
        # transaction open in the process, and a thread must not begin a second
        # write transaction while it holds one (LMDB's writer lock would deadlock).
        self.lock = threading.RLock()
        self.active = 0  # LMDB transactions open in this process
        self.writer: int | None = None  # thread holding the write transaction
        fresh = not readonly and not os.path.exists(os.path.join(path, "data.mdb"))
        try:
            self.env = lmdb.open(
                path,
                map_size=map_size,
                subdir=True,
                readonly=readonly,
                create=not readonly,
                mode=0o600,
                metasync=True,
                sync=True,
                map_async=False,
                writemap=False,
                lock=True,
                max_dbs=_MAX_DBS,
            )
        except lmdb.Error as exc:
            raise StateError(f"cannot open the state store in {path}: {exc}") from exc
        try:
            # Free reader slots left by processes that died (SIGKILL): a stale
            # reader pins old pages and makes the file grow without bound.
            self.env.reader_check()
            self.max_key = self.env.max_key_size()
            self.dbs: dict[str, lmdb._Database | None] = {}
            if readonly:
                for name in _DB_NAMES:
                    try:
                        self.dbs[name] = self.env.open_db(name.encode(), create=False)
                    except lmdb.NotFoundError:
                        self.dbs[name] = None  # never written: reads see it empty
            else:
                self._create_dbs()
            if fresh:
                _fsync_dir(path)  # LMDB syncs its files, not the directory naming them
        except BaseException:
            self.env.close()
            raise

    def _create_dbs(self) -> None:
        while True:
            ops = self.begin(write=True)
            try:
                try:
                    for name in _DB_NAMES:
                        self.dbs[name] = self.env.open_db(name.encode(), txn=ops.txn, create=True)
                except BaseException:
                    self.end(ops, commit=False)
                    raise
                self.end(ops, commit=True)
                return
            except lmdb.MapFullError:
                self.grow()

    def _adopt_map_size(self) -> None:
        self.env.set_mapsize(0)  # LMDB: zero adopts the size another process set

    def close(self) -> None:
        self.env.close()

    def grow(self) -> None:
        """Double the map.  Needs no transaction open in this process."""
        if self.active:
            raise StateError("cannot grow the state store's map inside a transaction")
        size = self.env.info()["map_size"]
        if size >= MAX_MAP_SIZE:
            raise StateError(f"the state store in {self.path} reached {size} bytes")
        self.env.set_mapsize(min(size * 2, MAX_MAP_SIZE))

    def begin(self, write: bool) -> _Ops:
        """A new transaction (the caller holds ``lock``); adopts a map grown elsewhere."""
        if write and self.writer == threading.get_ident():
            raise StateError("a write inside StateStore.transaction() must go through its StateTxn")
        for attempt in range(3):
            try:
                txn = self.env.begin(write=write)
            except lmdb.MapResizedError:
                if self.active or attempt == 2:
                    raise StateError(
                        "the state store's map was grown by another process during a transaction"
                    ) from None
                self._adopt_map_size()
                continue
            self.active += 1
            if write:
                self.writer = threading.get_ident()
            return _Ops(txn, write, self.dbs, self.max_key)
        raise AssertionError("unreachable")

    def end(self, ops: _Ops, commit: bool) -> None:
        """Commit or abort; the transaction is finished either way."""
        try:
            if commit:
                ops.txn.commit()
            else:
                ops.txn.abort()
        finally:
            ops.txn.abort()  # no-op after a successful commit; frees a failed one
            self.active -= 1
            if ops.write:
                self.writer = None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_envs: dict[str, _Env] = {}
_envs_lock = threading.Lock()


def _acquire_env(state_dir: str, readonly: bool, map_size: int) -> _Env:
    path = os.path.realpath(state_dir)
    with _envs_lock:
        env = _envs.get(path)
        if env is not None and env.pid != os.getpid():
            # Inherited through fork: LMDB environments must not cross a fork, and
            # closing it here could disturb the parent's; let it be.
            del _envs[path]
            env = None
        if env is None:
            if not readonly and not os.path.isdir(path):
                os.makedirs(path, mode=0o700, exist_ok=True)
                os.chmod(path, 0o700)  # makedirs' mode is filtered by the umask
                _fsync_dir(os.path.dirname(path))
            env = _Env(path, readonly, map_size)
            _envs[path] = env
        elif env.readonly and not readonly:
            raise StateError(f"the state store in {path} is already open read-only in this process")
        env.refs += 1
        return env


def _release_env(env: _Env) -> None:
    with _envs_lock:
        env.refs -= 1
        if env.refs == 0:
            if _envs.get(env.path) is env:
                del _envs[env.path]
            if env.pid == os.getpid():
                with env.lock:  # not under a transaction of another thread
                    env.close()


# --- public API -------------------------------------------------------------------------


class StateTxn:
    """Writes that commit together; obtained from :meth:`StateStore.transaction`.

    Every write runs at once in an LMDB write transaction and is remembered; if the
    map fills up, the transaction is aborted, the map grown and the remembered
    writes run again.  There are no reads here, so a re-run cannot invalidate a
    decision taken inside the ``with`` block; read through the store beforehand.
    """

    def __init__(self, env: _Env, ops: _Ops) -> None:
        self._env = env
        self._ops: _Ops | None = ops
        self._done: list[tuple[Callable[[_Ops], object], object]] = []

    def put_checkpoint(
        self,
        workflow: str,
        destination: str,
        source: str,
        position: Position,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self._run(_req_put_checkpoint(workflow, destination, source, position, extra))

    def put_snapshot_progress(
        self, workflow: str, source: str, progress: Mapping[str, Any]
    ) -> None:
        self._run(_req_put_snapshot_progress(workflow, source, progress))

    def append_schema(
        self, workflow: str, source: str, position: Position, schema_record: Mapping[str, Any]
    ) -> None:
        self._run(_req_append_schema(workflow, source, position, schema_record))

    def put_dead_letter(self, workflow: str, record: Mapping[str, Any]) -> int:
        return self._run(_req_put_dead_letter(workflow, record))

    def delete_dead_letter(self, workflow: str, letter_id: int) -> bool:
        return self._run(_req_delete_dead_letter(workflow, letter_id))

    def put_meta(self, key: str, value: Any) -> None:
        self._run(_req_put_meta(key, value))

    def delete_workflow(self, workflow: str) -> None:
        self._run(_req_delete_workflow(workflow))

    # internals

    def _current(self) -> _Ops:
        if self._ops is None:
            raise StateError("the transaction is finished")
        return self._ops

    def _run(self, request: Callable[[_Ops], _T]) -> _T:
        while True:
            ops = self._current()
            try:
                result = request(ops)
            except lmdb.MapFullError:
                self._regrow()
                continue
            except lmdb.Error as exc:
                raise StateError(f"state store {self._env.path}: {exc}") from exc
            self._done.append((request, result))
            return result

    def _regrow(self) -> None:
        """Abort, grow the map and re-run the writes done so far."""
        while True:
            self._env.end(self._current(), commit=False)
            self._ops = None
            self._env.grow()
            ops = self._ops = self._env.begin(write=True)
            try:
                for request, result in self._done:
                    if request(ops) != result:
                        raise StateConflictError(
                            "dead letters changed while the state store's map was grown;"
                            " run the transaction again"
                        )
                return
            except lmdb.MapFullError:
                continue

    def _commit(self) -> None:
        while True:
            ops = self._current()
            try:
                ops.txn.commit()
            except lmdb.MapFullError:  # freelist pages at commit time
                self._regrow()
                continue
            self._env.end(ops, commit=False)  # bookkeeping only: already committed
            self._ops = None
            return

    def _abort(self) -> None:
        if self._ops is not None:
            self._env.end(self._ops, commit=False)
            self._ops = None


class StateStore:
    """The daemon's durable state in LMDB under ``state_dir``.

    Safe to open from several processes at once and to use from several threads
    (uses within a process are serialised).  Values must be msgpack-native (None,
    bool, int, float, str, bytes, list, tuple, dict); tuples read back as lists.
    """

    def __init__(
        self,
        state_dir: str,
        *,
        readonly: bool = False,
        initial_map_size: int = DEFAULT_MAP_SIZE,
    ) -> None:
        self._readonly = readonly
        self._env: _Env | None = _acquire_env(state_dir, readonly, initial_map_size)
        self.path = self._env.path

    # lifecycle

    @property
    def readonly(self) -> bool:
        return self._readonly

    def close(self) -> None:
        env, self._env = self._env, None
        if env is not None:
            _release_env(env)

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _live_env(self) -> _Env:
        env = self._env
        if env is None:
            raise StateError("the state store is closed")
        if env.pid != os.getpid():
            raise StateError("a state store cannot be used across fork(); open it in the child")
        return env

    def _read(self, fn: Callable[[_Ops], _T]) -> _T:
        env = self._live_env()
        with env.lock:
            try:
                ops = env.begin(write=False)
                try:
                    return fn(ops)
                finally:
                    env.end(ops, commit=False)
            except lmdb.Error as exc:
                raise StateError(f"state store {self.path}: {exc}") from exc

    def _write(self, request: Callable[[_Ops], _T]) -> _T:
        env = self._live_env()
        if self._readonly:
            raise StateError("the state store is read-only")
        with env.lock:
            try:
                while True:
                    ops = env.begin(write=True)
                    try:
                        try:
                            result = request(ops)
                        except BaseException:
                            env.end(ops, commit=False)
                            raise
                        env.end(ops, commit=True)
                        return result
                    except lmdb.MapFullError:
                        env.grow()  # the transaction is aborted: run it again in a larger map
            except lmdb.Error as exc:
                raise StateError(f"state store {self.path}: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[StateTxn]:
        """Several writes committed atomically at the end of the ``with`` block.

        An exception in the block aborts all of them.  Do not call the store's own
        write methods inside the block (use the :class:`StateTxn`); reads through the
        store see the state before the transaction.
        """
        env = self._live_env()
        if self._readonly:
            raise StateError("the state store is read-only")
        with env.lock:
            try:
                stxn = StateTxn(env, env.begin(write=True))
            except lmdb.Error as exc:
                raise StateError(f"state store {self.path}: {exc}") from exc
            try:
                yield stxn
                stxn._commit()
            except lmdb.Error as exc:
                stxn._abort()
                raise StateError(f"state store {self.path}: {exc}") from exc
            except BaseException:
                stxn._abort()
                raise

    # checkpoints

    def get_checkpoint(self, workflow: str, destination: str, source: str) -> Position | None:
        entry = self.get_checkpoint_entry(workflow, destination, source)
        return None if entry is None else entry[0]

    def get_checkpoint_extra(
        self, workflow: str, destination: str, source: str
    ) -> dict[str, Any] | None:
        entry = self.get_checkpoint_entry(workflow, destination, source)
        return None if entry is None else entry[1]

    def get_checkpoint_entry(
        self, workflow: str, destination: str, source: str
    ) -> tuple[Position, dict[str, Any] | None] | None:
        """Position and extra of one checkpoint, read together (one snapshot)."""
        key = _checkpoint_key(workflow, destination, source)
        raw = self._read(lambda ops: ops.get("checkpoints", key))
        if raw is None:
            return None
        value = _dict(_unpack(raw))
        extra = value.get("x")
        return _unpack_position(value.get("p")), None if extra is None else _dict(extra)

    def put_checkpoint(
        self,
        workflow: str,
        destination: str,
        source: str,
        position: Position,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self._write(_req_put_checkpoint(workflow, destination, source, position, extra))

    def checkpoints(self, workflow: str) -> dict[tuple[str, str], Position]:
        prefix = _s(workflow)
        out: dict[tuple[str, str], Position] = {}
        for key, raw in self._read(lambda ops: ops.scan("checkpoints", prefix)):
            (destination, source), _ = _split(key[len(prefix) :], 2)
            out[destination, source] = _unpack_position(_dict(_unpack(raw)).get("p"))
        return out

    def delete_workflow(self, workflow: str) -> None:
        """Drop the workflow's checkpoints, snapshot progress, schemas and dead letters."""
        self._write(_req_delete_workflow(workflow))

    # snapshots

    def get_snapshot_progress(self, workflow: str, source: str) -> dict[str, Any] | None:
        key = _s(workflow) + _s(source)
        raw = self._read(lambda ops: ops.get("snapshots", key))
        return None if raw is None else _dict(_unpack(raw))

    def put_snapshot_progress(
        self, workflow: str, source: str, progress: Mapping[str, Any]
    ) -> None:
        self._write(_req_put_snapshot_progress(workflow, source, progress))

    # schema history

    def append_schema(
        self, workflow: str, source: str, position: Position, schema_record: Mapping[str, Any]
    ) -> None:
        """Append a record; records at one position keep their order.

        Appending a record equal to one already stored at the same position (a
        source replaying after a restart) changes nothing.
        """
        self._write(_req_append_schema(workflow, source, position, schema_record))

    def schema_history(self, workflow: str, source: str) -> list[tuple[Position, dict[str, Any]]]:
        prefix = _s(workflow) + _s(source)
        out: list[tuple[Position, dict[str, Any]]] = []
        for _, raw in self._read(lambda ops: ops.scan("schemas", prefix)):
            value = _dict(_unpack(raw))
            out.append((_unpack_position(value.get("p")), _dict(value.get("r"))))
        return out

    # dead letters

    def put_dead_letter(self, workflow: str, record: Mapping[str, Any]) -> int:
        """Store a record; returns its id, greater than every id the workflow had."""
        return self._write(_req_put_dead_letter(workflow, record))

    def dead_letters(
        self, workflow: str, limit: int | None = None
    ) -> list[tuple[int, dict[str, Any]]]:
        """The oldest ``limit`` (default all) dead letters, by increasing id."""
        prefix = _s(workflow)
        rows = self._read(lambda ops: ops.scan("dead_letters", prefix, limit))
        return [
            (int.from_bytes(key[len(prefix) :], "big"), _dict(_unpack(raw))) for key, raw in rows
        ]

    def delete_dead_letter(self, workflow: str, letter_id: int) -> bool:
        return self._write(_req_delete_dead_letter(workflow, letter_id))

    def get_dead_letter(self, workflow: str, letter_id: int) -> dict[str, Any] | None:
        key = _s(workflow) + _u64(letter_id)
        raw = self._read(lambda ops: ops.get("dead_letters", key))
        return None if raw is None else _dict(_unpack(raw))

    def count_dead_letters(self, workflow: str) -> int:
        prefix = _s(workflow)
        return self._read(lambda ops: ops.count("dead_letters", prefix))

    # generic

    def get_meta(self, key: str) -> Any:
        """The value stored under ``key``, or None."""
        raw_key = _meta_key(key)
        raw = self._read(lambda ops: ops.get("meta", raw_key))
        return None if raw is None else _unpack(raw)

    def put_meta(self, key: str, value: Any) -> None:
        self._write(_req_put_meta(key, value))

    # diagnostics

    def map_size(self) -> int:
        """The current size of the memory map (grows on demand)."""
        return self._live_env().env.info()["map_size"]
