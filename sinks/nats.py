"""The `nats` destination: change envelopes published to NATS JetStream.

At least once on the wire, exactly once in the stream: every message carries
``Nats-Msg-Id`` = the change's stable id (see ``envelope.change_id``), so when a
restart re-sends what was published after the last checkpoint, JetStream drops
the copies it already holds (within the stream's ``duplicate_window``) and acks
them with ``duplicate: true``; those are counted in status. A batch is published
without waiting message by message; all its acks are awaited, then the
checkpoint goes to the daemon's state store.

nats-py is asyncio-only and the apply process is synchronous: the client lives
on a private event loop in a thread of its own, so it answers the server's pings
between batches; ``write`` hands coroutines to it and waits.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from dataflare.cdc.errors import ConfigError, FatalError, RetryableError
from dataflare.cdc.model import Batch, Position, TableSchema
from dataflare.sinks.base import Rejected, SinkContext
from dataflare.sinks.configs import NatsSinkConfig
from dataflare.sinks.envelope import TxnOrdinals, change_id, encode, envelope, key_of
from loguru import logger
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck, StreamConfig

# A restart re-sends what was published since the last checkpoint after the
# supervisor's restart backoff (up to 30 s by default): a shorter dedupe window
# lets such copies through.
MIN_DUPLICATE_WINDOW_S = 60.0
RECONNECT_ATTEMPTS = 3  # also bounds the first connection attempt
MAX_IN_FLIGHT = 4000  # unacknowledged publishes at a time (nats-py's semaphore)
_FIELD = re.compile(r"\{(schema|table)\}")
_BAD_TOKEN_CHARS = re.compile(r"[.\s*>]")
T = TypeVar("T")


def redacted(url: str) -> str:
    """``url`` without user and password, for messages and logs."""
    out = []
    for one in url.split(","):
        try:
            parts = urlsplit(one.strip())
            host, port = parts.hostname or "?", f":{parts.port}" if parts.port else ""
        except ValueError:
            return "(unparsable URL)"
        out.append(f"{parts.scheme}://{host}{port}")
    return ",".join(out)


def subject_wildcard(template: str) -> str:
    """The stream subject covering every subject of ``template``: each token holding
    a ``{schema}``/``{table}`` field becomes ``*``."""
    tokens = template.split(".")
    return ".".join("*" if _FIELD.search(t) else t for t in tokens)


def subject_for(template: str, schema: TableSchema) -> str:
    def value(m: re.Match[str]) -> str:
        raw = schema.table.schema if m.group(1) == "schema" else schema.table.name
        return _BAD_TOKEN_CHARS.sub("_", raw) or "_"

    return _FIELD.sub(value, template)


class NatsSink:
    def __init__(self, name: str, config: NatsSinkConfig, ctx: SinkContext) -> None:
        if "{" in _FIELD.sub("", config.subject):
            raise ConfigError(
                f"nats destination {name}: subject {config.subject!r}: only {{schema}} and "
                "{table} can be used in the subject template"
            )
        self.name = name
        self.cfg = config
        self.ctx = ctx
        self.where = redacted(config.url)
        self.wildcard = subject_wildcard(config.subject)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._checkpoints: dict[str, Position | None] = {}
        self._ordinals: dict[str, TxnOrdinals] = {}
        self._subjects: dict[tuple[str, str], str] = {}
        self.records_written = 0
        self.duplicates = 0
        self.last_seq = 0
        self.duplicate_window: float | None = None
        self.log = logger.bind(workflow=ctx.workflow, component=f"nats:{name}")

    # ---------------------------------------------------------- event loop glue

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        assert self._loop is not None, "open() first"
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise RetryableError(
                f"nats destination {self.name}: {self.where} did not answer within {timeout:g}s"
            ) from None

    def _error(self, e: BaseException) -> Exception:
        """Our error for a nats-py one (never with the URL's credentials)."""
        if isinstance(e, nats.js.errors.NoStreamResponseError):
            return FatalError(
                f"nats destination {self.name}: no JetStream stream takes the subjects "
                f"{self.wildcard!r} (stream {self.cfg.stream!r} is missing or does not list "
                "them)"
            )
        if isinstance(e, nats.js.errors.APIError):
            if (e.code is not None and e.code >= 500) or e.err_code == 10077:  # 10077: busy
                return RetryableError(f"nats destination {self.name}: JetStream: {e.description}")
            return FatalError(f"nats destination {self.name}: JetStream refused: {e.description}")
        if isinstance(e, nats.errors.MaxPayloadError):
            return FatalError(
                f"nats destination {self.name}: a change is larger than the server's "
                "max_payload; raise max_payload on the server"
            )
        if isinstance(e, nats.errors.AuthorizationError):
            return FatalError(f"nats destination {self.name}: not authorized on {self.where}")
        if isinstance(e, nats.errors.Error | OSError | asyncio.TimeoutError):
            return RetryableError(
                f"nats destination {self.name}: {self.where} unavailable: {type(e).__name__}"
            )
        return e if isinstance(e, Exception) else RuntimeError(str(e))

    # ---------------------------------------------------------------- lifecycle

    def open(self) -> None:
        for source in self.ctx.sources:
            self._checkpoints[source] = self.ctx.state.get_checkpoint(
                self.ctx.workflow, self.name, source
            )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"nats-{self.name}", daemon=True
        )
        self._thread.start()
        try:
            self._run(self._connect(), self.cfg.ack_timeout + 10)
        except Exception as e:
            raise self._error(e) from None

    async def _connect(self) -> None:
        async def on_error(e: Exception) -> None:
            self.log.warning("nats: {}: {}", type(e).__name__, e)

        try:
            nc = await nats.connect(
                servers=[u.strip() for u in self.cfg.url.split(",")],
                connect_timeout=min(10.0, self.cfg.ack_timeout),
                # a dropped connection is re-made a few times (an idle link, a server
                # restart); beyond that the next write fails and the worker restarts
                allow_reconnect=True,
                max_reconnect_attempts=RECONNECT_ATTEMPTS,
                reconnect_time_wait=0.5,
                error_cb=on_error,
                name=f"dataflare {self.ctx.workflow}/{self.name}",
            )
        except nats.errors.NoServersError:
            raise RetryableError(
                f"nats destination {self.name}: cannot connect to {self.where}"
            ) from None
        self._nc = nc
        js = nc.jetstream(timeout=self.cfg.ack_timeout, publish_async_max_pending=MAX_IN_FLIGHT)
        self._js = js
        try:
            info = await js.stream_info(self.cfg.stream)
        except nats.js.errors.NotFoundError:
            if not self.cfg.create_stream:
                raise FatalError(
                    f"nats destination {self.name}: stream {self.cfg.stream!r} does not exist "
                    "and create_stream is false: create it (subjects "
                    f"{self.wildcard!r}, a duplicate_window) or set create_stream: true"
                ) from None
            info = await js.add_stream(
                StreamConfig(
                    name=self.cfg.stream,
                    subjects=[self.wildcard],
                    duplicate_window=self.cfg.duplicate_window,
                )
            )
            self.log.info("created stream {} (subjects {})", self.cfg.stream, self.wildcard)
        window = info.config.duplicate_window or 0.0
        self.duplicate_window = window
        if window < MIN_DUPLICATE_WINDOW_S:
            self.log.warning(
                "stream {} dedupes message ids for {:g}s only; what a restart re-sends after "
                "more than that is stored twice (raise duplicate_window to at least {:g}s)",
                self.cfg.stream,
                window,
                MIN_DUPLICATE_WINDOW_S,
            )
        self.log.info("connected to {}, stream {}", self.where, self.cfg.stream)

    def checkpoint(self, source: str) -> Position | None:
        return self._checkpoints.get(source)

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        nc = self._nc
        self._nc = self._js = None
        if nc is not None and not nc.is_closed:
            fut = asyncio.run_coroutine_threadsafe(nc.close(), loop)
            try:
                fut.result(5)
            except Exception as e:  # closing must not hide what got us here
                self.log.debug("closing the nats connection: {}", e)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if not loop.is_running():
            loop.close()

    def status(self) -> dict[str, Any]:
        return {
            "records_written": self.records_written,
            "duplicates": self.duplicates,
            "stream": self.cfg.stream,
            "subjects": self.wildcard,
            "last_seq": self.last_seq,
            "duplicate_window_s": self.duplicate_window,
        }

    # -------------------------------------------------------------------- write

    def write(self, source: str, batch: Batch) -> Sequence[Rejected] | None:
        ordinals = self._ordinals.setdefault(source, TxnOrdinals())
        saved = ordinals.state()
        try:
            messages = self._messages(source, batch, ordinals)
        except BaseException:
            ordinals.restore(saved)
            raise
        if messages:
            # every ack within ack_timeout of the last publish, plus the time to send
            timeout = self.cfg.ack_timeout * 2 + len(messages) / 2000
            try:
                acks = self._run(self._publish(messages), timeout)
            except (RetryableError, FatalError):
                ordinals.restore(saved)
                raise
            except Exception as e:
                ordinals.restore(saved)
                raise self._error(e) from None
            dups = sum(1 for a in acks if a.duplicate)
            self.duplicates += dups
            self.records_written += len(acks) - dups
            self.last_seq = max(self.last_seq, max(a.seq for a in acks))
        if batch.complete:
            self.ctx.state.put_checkpoint(self.ctx.workflow, self.name, source, batch.last)
            self._checkpoints[source] = batch.last
        return None

    def _messages(
        self, source: str, batch: Batch, ordinals: TxnOrdinals
    ) -> list[tuple[str, bytes, dict[str, str]]]:
        schemas = batch.schema_map()
        out: list[tuple[str, bytes, dict[str, str]]] = []
        ts_ms: int | None = None
        for change in batch.changes:
            schema = schemas[change.table]
            ordinal = 0 if batch.replay else ordinals.next(change)
            env = envelope(change, schema, source, ts_ms)
            ts_ms = env["ts_ms"]
            tkey = (change.table.schema, change.table.name)
            subject = self._subjects.get(tkey)
            if subject is None:
                subject = self._subjects[tkey] = subject_for(self.cfg.subject, schema)
            headers = {
                "Nats-Msg-Id": change_id(self.ctx.workflow, source, change, ordinal)
                + (f":replay:{batch.replay}" if batch.replay else ""),
                "Dataflare-Op": change.op.value,
                "Dataflare-Key": key_of(change, schema),
            }
            out.append((subject, encode(env, self.cfg.envelope), headers))
        return out

    async def _publish(self, messages: list[tuple[str, bytes, dict[str, str]]]) -> list[PubAck]:
        js = self._js
        assert js is not None
        futures: list[asyncio.Future[PubAck]] = []
        try:
            for subject, data, headers in messages:
                # in order on the wire; waits only when MAX_IN_FLIGHT acks are missing
                futures.append(
                    await js.publish_async(
                        subject,
                        data,
                        wait_stall=self.cfg.ack_timeout,
                        stream=self.cfg.stream,
                        headers=headers,
                    )
                )
            _, pending = await asyncio.wait(futures, timeout=self.cfg.ack_timeout)
            if pending:
                raise RetryableError(
                    f"nats destination {self.name}: {len(pending)} of {len(futures)} "
                    f"publishes not acknowledged within {self.cfg.ack_timeout:g}s"
                )
            errors = [e for f in futures if (e := f.exception()) is not None]
            if errors:  # every exception retrieved, so asyncio does not log them again
                raise errors[0]
            return [f.result() for f in futures]
        finally:
            for f in futures:
                if not f.done():
                    f.cancel()
