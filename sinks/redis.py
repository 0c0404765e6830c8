"""The `redis` destination: rows mirrored as hashes, or change envelopes in streams.

Exactly once: the commands of a batch and the source's checkpoint go to Redis in
one MULTI/EXEC transaction, and the checkpoint is read back from Redis on open
(not from the daemon's state store). A crash before EXEC leaves nothing; after
it, everything including the checkpoint, so a replay starts right after the
batch. The client never retries a command on its own: an EXEC whose reply was
lost must not run twice.

Incomplete batches (a source transaction larger than a batch) are buffered and
written with the batch that completes the transaction. Past ``BUFFER_LIMIT``
bytes the buffer is written without advancing the checkpoint, and the checkpoint
key records how many changes after the checkpoint are already in Redis; a replay
skips exactly that many, so no stream entry is added twice.

See docs/sinks-messages.md for modes, templates and limits.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis
from dataflare.cdc.codec import decode_position, encode_position, packb, unpackb
from dataflare.cdc.errors import FatalError, RetryableError
from dataflare.cdc.model import Batch, Change, Op, Position, TableSchema
from dataflare.sinks.base import Rejected, SinkContext
from dataflare.sinks.configs import RedisSinkConfig
from dataflare.sinks.envelope import (
    TxnOrdinals,
    change_id,
    encode,
    envelope,
    key_of,
    key_values,
    text_value,
)
from loguru import logger
from redis.backoff import NoBackoff
from redis.retry import Retry

BUFFER_LIMIT = 64 << 20  # bytes of buffered commands of one open source transaction
CHECKPOINT_PREFIX = "dataflare:checkpoint"
# Deletes the keys matching ARGV[1] (a truncate in hash mode). SCAN in a script is
# allowed since Redis 5 (effects replication); it runs inside the batch's MULTI.
_DELETE_MATCHING = """
local cursor = "0"
local n = 0
repeat
  local r = redis.call("SCAN", cursor, "MATCH", ARGV[1], "COUNT", 1000)
  cursor = r[1]
  for _, k in ipairs(r[2]) do n = n + redis.call("DEL", k) end
until cursor == "0"
return n
"""
_FIELD = re.compile(r"\{([^{}]+)\}")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
Args = tuple[Any, ...]


def redacted(url: str) -> str:
    """``url`` without user and password, for messages and logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparsable URL)"
    return f"{parts.scheme}://{host}{port}{parts.path}"


class _Unrenderable(Exception):
    """A template column has no value in this change (NULL or not sent)."""


class Template:
    """A key or stream-name template: ``{schema}``, ``{table}``, ``{key}`` (key values
    joined by ':') or ``{<column>}``; anything else is literal."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.parts: list[tuple[bool, str]] = []  # (is_field, literal or field name)
        pos = 0
        for m in _FIELD.finditer(text):
            if m.start() > pos:
                self.parts.append((False, text[pos : m.start()]))
            self.parts.append((True, m.group(1)))
            pos = m.end()
        if pos < len(text):
            self.parts.append((False, text[pos:]))
        self.row_fields = {p for f, p in self.parts if f and p not in ("schema", "table")}

    def render(self, schema: TableSchema, lookup: Callable[[str], str]) -> str:
        out: list[str] = []
        for is_field, part in self.parts:
            if not is_field:
                out.append(part)
            elif part == "schema":
                out.append(schema.table.schema)
            elif part == "table":
                out.append(schema.table.name)
            else:
                out.append(lookup(part))
        return "".join(out)

    def pattern(self, schema: TableSchema) -> str:
        """A SCAN MATCH glob for every key of one table (row fields as ``*``)."""
        out: list[str] = []
        for is_field, part in self.parts:
            if not is_field:
                out.append(_GLOB_SPECIAL.sub(r"\\\1", part))
            elif part == "schema":
                out.append(_GLOB_SPECIAL.sub(r"\\\1", schema.table.schema))
            elif part == "table":
                out.append(_GLOB_SPECIAL.sub(r"\\\1", schema.table.name))
            else:
                out.append("*")
        return "".join(out)

    def check(self, schema: TableSchema) -> None:
        names = set(schema.column_names)
        missing = sorted(f for f in self.row_fields if f != "key" and f not in names)
        if missing:
            raise FatalError(
                f"template {self.text!r} names {', '.join(missing)}, which table "
                f"{schema.table} does not have (fields: {{schema}}, {{table}}, {{key}}, a column)"
            )


def _lookup(schema: TableSchema, change: Change, row: Sequence[Any] | None) -> Callable[[str], str]:
    names = schema.column_names

    def get(name: str) -> str:
        if name == "key":
            values = key_values(change, schema)
            if values is None or any(v is None for v in values):
                raise _Unrenderable("key")
            return ":".join(text_value(v) for v in values)
        if row is None or name in change.unchanged:
            raise _Unrenderable(name)
        v = row[names.index(name)]
        if v is None:
            raise _Unrenderable(name)
        return text_value(v)

    return get


@dataclass
class _SourceState:
    checkpoint: Position | None = None
    ordinals: TxnOrdinals = field(default_factory=TxnOrdinals)
    buffer: list[Args] = field(default_factory=list)
    buffered_bytes: int = 0
    buffered_changes: int = 0
    since_checkpoint: int = 0  # changes after the checkpoint processed (in Redis or buffered)
    skip: int = 0  # replayed changes already in Redis (a flushed part of a big transaction)
    skip_last_id: str | None = None
    last_id: str | None = None  # id of the last change processed


class RedisSink:
    def __init__(self, name: str, config: RedisSinkConfig, ctx: SinkContext) -> None:
        self.name = name
        self.cfg = config
        self.ctx = ctx
        self.where = redacted(config.url)
        self.key_template = Template(config.key)
        self.stream_template = Template(config.stream)
        self._client: redis.Redis | None = None
        self._sources: dict[str, _SourceState] = {}
        self._checked: set[tuple[str, str, int]] = set()  # (schema, table, version)
        self.records_written = 0
        self.replayed_skipped = 0
        self.partial_flushes = 0
        self.transactions = 0
        self.log = logger.bind(workflow=ctx.workflow, component=f"redis:{name}")

    # ---------------------------------------------------------------- lifecycle

    def _checkpoint_key(self, source: str) -> str:
        return f"{CHECKPOINT_PREFIX}:{self.ctx.workflow}:{self.name}:{source}"

    def open(self) -> None:
        try:
            client = redis.Redis.from_url(
                self.cfg.url,
                socket_connect_timeout=self.cfg.connect_timeout,
                socket_timeout=max(60.0, self.cfg.connect_timeout),
                retry=Retry(NoBackoff(), 0),  # never re-run an EXEC on our behalf
                retry_on_timeout=False,
            )
        except ValueError as e:
            raise FatalError(f"redis destination {self.name}: bad url: {e}") from None
        self._client = client
        keys = [self._checkpoint_key(s) for s in self.ctx.sources]
        values = self._call(lambda: client.mget(keys) if keys else [])
        for source, raw in zip(self.ctx.sources, values, strict=True):
            st = _SourceState()
            if raw is not None:
                saved = unpackb(raw)
                pos = saved.get("position")
                st.checkpoint = decode_position(pos) if pos is not None else None
                st.skip = st.since_checkpoint = int(saved.get("written", 0))
                st.skip_last_id = saved.get("last_id")
                if st.skip:
                    self.log.info(
                        "{} change(s) of an open transaction of {} are already in Redis; "
                        "the replay skips them",
                        st.skip,
                        source,
                    )
            self._sources[source] = st
        self.log.info("connected to {} (mode {})", self.where, self.cfg.mode)

    def checkpoint(self, source: str) -> Position | None:
        st = self._sources.get(source)
        return st.checkpoint if st else None

    def close(self) -> None:
        self._sources.clear()  # buffers of an abandoned attempt: open() reads them back
        if self._client is not None:
            self._client.close()
            self._client = None

    def status(self) -> dict[str, Any]:
        buffered = sum(s.buffered_changes for s in self._sources.values())
        st: dict[str, Any] = {
            "records_written": self.records_written,
            "mode": self.cfg.mode,
            "transactions": self.transactions,
            "buffered": buffered,
            "replayed_skipped": self.replayed_skipped,
            "partial_flushes": self.partial_flushes,
        }
        st["target"] = self.cfg.stream if self.cfg.mode == "stream" else self.cfg.key
        return st

    # -------------------------------------------------------------------- write

    def write(self, source: str, batch: Batch) -> Sequence[Rejected] | None:
        st = self._sources.setdefault(source, _SourceState())
        done = st.checkpoint
        if done is not None and batch.first <= done and not batch.replay:
            # already applied (the apply process filters too; a direct replay must not
            # add stream entries twice)
            if batch.complete and batch.last <= done:
                return None
            batch = Batch(
                [c for c in batch.changes if c.position > done],
                batch.schemas,
                batch.first,
                batch.last,
                batch.complete,
            )
        if batch.replay and (st.skip or st.buffer):
            raise RetryableError(
                f"redis destination {self.name}: a dead-letter replay waits for the source "
                "transaction in flight"
            )
        saved = st.ordinals.state()
        counters = (st.since_checkpoint, st.last_id)
        rejected: list[Rejected] = []
        try:
            cmds, nbytes, count = self._commands(source, st, batch, rejected)
        except BaseException:
            st.ordinals.restore(saved)
            st.since_checkpoint, st.last_id = counters
            raise
        if batch.replay:  # per-transaction state belongs to the live stream only
            st.ordinals.restore(saved)
            st.since_checkpoint, st.last_id = counters
        if rejected:
            self.ctx.reject(source, rejected)  # durable (dead letters) before the checkpoint
        st.buffer.extend(cmds)
        st.buffered_bytes += nbytes
        st.buffered_changes += count
        if batch.complete:
            self._flush(source, st, batch.last)
        elif st.buffered_bytes > BUFFER_LIMIT:
            self._flush(source, st, None)
        return rejected

    def _commands(
        self, source: str, st: _SourceState, batch: Batch, rejected: list[Rejected]
    ) -> tuple[list[Args], int, int]:
        schemas = batch.schema_map()
        cmds: list[Args] = []
        count = 0
        ts_ms: int | None = None
        for change in batch.changes:
            ordinal = st.ordinals.next(change)
            st.since_checkpoint += 1
            st.last_id = change_id(self.ctx.workflow, source, change, ordinal)
            if st.skip:
                st.skip -= 1
                self.replayed_skipped += 1
                if not st.skip:
                    self._check_skipped(source, st)
                continue
            schema = schemas[change.table]
            try:
                if self.cfg.mode == "hash":
                    self._hash_commands(change, schema, cmds)
                else:
                    if ts_ms is None:
                        ts_ms = _now_ms()
                    cmds.append(self._xadd(source, change, schema, ordinal, ts_ms, batch.replay))
                count += 1
            except _Unrenderable as e:
                error = (
                    f"{change.op.value} on {change.table}: template column {e} has no value "
                    "(NULL, or not in a delete's old row: use key columns in templates)"
                )
                if self.ctx.on_error == "fail":
                    raise FatalError(f"redis destination {self.name}: {error}") from None
                rejected.append(Rejected(change, error))
        return cmds, sum(_size(c) for c in cmds), count

    def _check_skipped(self, source: str, st: _SourceState) -> None:
        got = st.last_id
        if st.skip_last_id is not None and got != st.skip_last_id:
            self.log.warning(
                "replay of {} differs from what was written before the restart (last change "
                "written: {}, replayed: {}); the source did not re-send the same transaction",
                source,
                st.skip_last_id,
                got,
            )

    def _check_table(self, schema: TableSchema, template: Template) -> None:
        tag = (schema.table.schema, schema.table.name, schema.version)
        if tag in self._checked:
            return
        template.check(schema)
        if self.cfg.mode == "hash" and not schema.key:
            raise FatalError(
                f"redis destination {self.name}: table {schema.table} has no primary key; "
                "hash mode needs one to name each row's hash (use mode: stream, or add a "
                "primary key)"
            )
        self._checked.add(tag)

    def _hash_commands(self, change: Change, schema: TableSchema, out: list[Args]) -> None:
        tpl = self.key_template
        self._check_table(schema, tpl)
        op = change.op
        if op is Op.TRUNCATE:
            if "table" not in {p for f, p in tpl.parts if f}:
                raise FatalError(
                    f"redis destination {self.name}: truncate of {schema.table} but the key "
                    f"template {tpl.text!r} has no {{table}}: its keys cannot be told apart"
                )
            out.append(("EVAL", _DELETE_MATCHING, 0, tpl.pattern(schema)))
            return
        if op is Op.DELETE:
            row = change.before if change.before is not None else None
            out.append(("DEL", tpl.render(schema, _lookup(schema, change, row))))
            return
        assert change.after is not None
        key = tpl.render(schema, _lookup(schema, change, change.after))
        names = schema.column_names
        if op is Op.UPDATE and change.before is not None:
            old = self._old_key(schema, change)
            if old is not None and old != key:
                # keeps fields the update did not send (unchanged TOAST values)
                out.append(("COPY", old, key, "REPLACE"))
                out.append(("DEL", old))
        elif op is not Op.UPDATE:
            out.append(("DEL", key))  # an insert or snapshot row replaces any stale hash
        values: list[Any] = []
        nulls: list[str] = []
        for name, v in zip(names, change.after, strict=True):
            if name in change.unchanged:
                continue
            if v is None:
                nulls.append(name)
            else:
                values += (name, text_value(v))
        if nulls and op is Op.UPDATE:
            out.append(("HDEL", key, *nulls))
        if values:
            out.append(("HSET", key, *values))

    def _old_key(self, schema: TableSchema, change: Change) -> str | None:
        # The old row may hold only the key columns (others None): a template column
        # outside the key is then unknown and the hash is updated in place.
        before = change.before
        assert before is not None
        old = Change(change.op, change.table, change.position, None, before, None)
        try:
            return self.key_template.render(schema, _lookup(schema, old, before))
        except _Unrenderable:
            return None

    def _xadd(
        self,
        source: str,
        change: Change,
        schema: TableSchema,
        ordinal: int,
        ts_ms: int,
        replay: str = "",
    ) -> Args:
        self._check_table(schema, self.stream_template)
        row = change.after if change.after is not None else change.before
        stream = self.stream_template.render(schema, _lookup(schema, change, row))
        value = encode(envelope(change, schema, source, ts_ms), self.cfg.envelope)
        trim: tuple[Any, ...] = ()
        if self.cfg.stream_maxlen is not None:
            trim = ("MAXLEN", "~", self.cfg.stream_maxlen)
        cid = change_id(self.ctx.workflow, source, change, ordinal)
        if replay:
            cid += f":replay:{replay}"
        return ("XADD", stream, *trim, "*", "id", cid, "op", change.op.value,
                "key", key_of(change, schema), "value", value)  # fmt: skip

    def _flush(self, source: str, st: _SourceState, last: Position | None) -> None:
        """One MULTI/EXEC: the buffered commands and the checkpoint. ``last`` None:
        part of an open transaction, checkpoint kept, its written count recorded."""
        client = self._client
        assert client is not None, "open() first"
        if last is not None:
            saved: dict[str, Any] = {"position": encode_position(last), "written": 0}
        else:
            pos = st.checkpoint
            saved = {
                "position": encode_position(pos) if pos is not None else None,
                "written": st.since_checkpoint,
                "last_id": st.last_id,
            }
        cmds = st.buffer
        before = self._call(lambda: client.get(self._checkpoint_key(source)))

        def run() -> list[Any]:
            pipe = client.pipeline(transaction=True)
            for args in cmds:
                pipe.execute_command(*args)  # type: ignore[no-untyped-call]
            pipe.set(self._checkpoint_key(source), packb(saved))
            return pipe.execute(raise_on_error=False)

        results = self._call(run)
        errors = [
            (args, r) for args, r in zip(cmds, results, strict=False) if isinstance(r, Exception)
        ]
        if errors or isinstance(results[-1], Exception):
            args, err = (
                errors[0] if errors else (("SET", self._checkpoint_key(source)), results[-1])
            )
            # Redis applied the other commands; put the checkpoint back so the batch is
            # sent again after the fix (hash mode: idempotent; stream mode: its entries
            # that went in appear twice, which beats losing the refused one).
            key = self._checkpoint_key(source)
            self._call(lambda: client.set(key, before) if before else client.delete(key))
            raise FatalError(
                f"redis destination {self.name}: {args[0]} {args[1]} failed: {err} "
                "(Redis applies the other commands of a transaction anyway; fix the key, "
                "then restart the workflow)"
            )
        self.records_written += st.buffered_changes
        self.transactions += 1
        st.buffer, st.buffered_bytes, st.buffered_changes = [], 0, 0
        if last is not None:
            st.checkpoint, st.since_checkpoint = last, 0
        else:
            self.partial_flushes += 1
            self.log.info(
                "source transaction of {} larger than {} MB: {} change(s) written ahead of its "
                "commit",
                source,
                BUFFER_LIMIT >> 20,
                st.since_checkpoint,
            )

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except redis.AuthenticationError:  # a ConnectionError subclass: first
            raise FatalError(
                f"redis destination {self.name}: authentication to {self.where} failed"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise RetryableError(
                f"redis destination {self.name}: {self.where} unavailable: {type(e).__name__}"
            ) from None
        except redis.ResponseError as e:
            if str(e).startswith(("OOM", "LOADING", "BUSY", "MASTERDOWN", "READONLY")):
                raise RetryableError(f"redis destination {self.name}: {self.where}: {e}") from None
            raise FatalError(f"redis destination {self.name}: {self.where}: {e}") from None


def _size(args: Args) -> int:
    return sum(len(a) if isinstance(a, str | bytes) else 8 for a in args)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
