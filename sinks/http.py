"""The `http` destination: changes POSTed as JSON to a webhook, at least once.

Each batch goes out in requests of ``batch_size`` changes, body ``{"changes":
[envelope + "id"]}``; ``id`` is a stable per-change id and the ``Idempotency-Key``
header a hash of the destination name and the chunk's change ids, so a chunk sent
again after a crash carries the same key (see docs/sinks-files.md for exactly what
may repeat). The checkpoint (state store) is written once every request of a
complete batch was answered 2xx (or refused with a 4xx and handed back as
``Rejected``); 5xx, 408, 429, timeouts and connection errors are retried with
exponential backoff and jitter, then raised as ``RetryableError``.

Stdlib ``http.client`` (one keep-alive connection): urllib3 is not a dependency.
Secrets: the URL (userinfo, query) and header values are never logged; logs and
errors name the endpoint as scheme://host:port/path.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import random
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from dataflare.cdc.errors import ConfigError, FatalError, RetryableError
from dataflare.cdc.model import Batch, Change, Position
from dataflare.sinks.base import Rejected, SinkContext
from dataflare.sinks.configs import HttpSinkConfig
from dataflare.sinks.envelope import envelope, to_json
from loguru import logger

RETRY_AFTER_CAP_S = 60.0  # a Retry-After longer than this (or max_backoff) is cut down
BODY_SNIPPET = 200
# The endpoint or the credentials are wrong: every request would get the same
# answer, so these stop the workflow whatever on_error says.
CONFIG_STATUSES = frozenset({401, 403, 404, 405, 407})
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    target: str  # path and query, as sent in the request line
    display: str  # scheme://host:port/path: no userinfo, no query (may hold tokens)
    authorization: str | None  # Basic credentials from the URL's userinfo

    @classmethod
    def parse(cls, url: str, destination: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"http destination {destination}: url must be http://host/... or "
                f"https://host/... (got scheme {parts.scheme or 'none'!r})"
            )
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ConfigError(f"http destination {destination}: url has an invalid port") from None
        path = parts.path or "/"
        target = path + (f"?{parts.query}" if parts.query else "")
        auth = None
        if parts.username is not None:
            raw = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            auth = "Basic " + base64.b64encode(raw.encode()).decode("ascii")
        display = f"{parts.scheme}://{parts.hostname}:{port}{path}"
        return cls(parts.scheme, parts.hostname, port, target, display, auth)


def tls_context(cfg: HttpSinkConfig, destination: str) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=cfg.tls_ca_file)
        if not cfg.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cfg.tls_client_cert:
            ctx.load_cert_chain(cfg.tls_client_cert, cfg.tls_client_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"http destination {destination}: cannot load TLS files (tls_ca_file "
            f"{cfg.tls_ca_file!r}, tls_client_cert {cfg.tls_client_cert!r}, tls_client_key "
            f"{cfg.tls_client_key!r}): {e}"
        ) from None
    return ctx


@dataclass(frozen=True)
class TxnCursor:
    """Where change numbering stands in a source's stream: the position value of the
    transaction in progress, the next ordinal in it, and whether the last batch
    ended inside it (a large transaction spans batches)."""

    value: int | None = None
    next: int = 0
    carry: bool = False


def change_ids(
    workflow: str, source: str, batch: Batch, cursor: TxnCursor
) -> tuple[list[str], TxnCursor]:
    """``workflow:source:position.value:ordinal`` of each change, the ordinal counting
    the changes of one source transaction, continued across its incomplete batches.

    A restart resumes at a checkpoint (a transaction boundary) with a fresh cursor,
    so a re-sent change gets the id it had before. (A private equivalent of
    ``envelope.change_id``, which is being added to dataflare.sinks.envelope.)
    """
    value, n, carry = cursor.value, cursor.next, cursor.carry
    ids = []
    for c in batch.changes:
        v = c.position.value
        if carry:
            carry = False  # the rest of the transaction (its commit may move the position)
        elif v != value:
            n = 0  # a new transaction
        value = v
        ids.append(f"{workflow}:{source}:{v}:{n}")
        n += 1
    if batch.complete:
        carry = False  # a complete batch ends on a transaction boundary
    elif batch.changes:
        carry = True
    return ids, TxnCursor(value, n, carry)


def idempotency_key(destination: str, ids: Sequence[str]) -> str:
    h = hashlib.sha256(destination.encode())
    for i in ids:
        h.update(b"\n" + i.encode())
    return h.hexdigest()


class HttpSink:
    def __init__(self, name: str, config: HttpSinkConfig, ctx: SinkContext) -> None:
        if config.batch_size < 1:
            raise ConfigError(f"http destination {name}: batch_size must be at least 1")
        self.name = name
        self.cfg = config
        self.ctx = ctx
        self.endpoint = Endpoint.parse(config.url, name)
        self.log = logger.bind(workflow=ctx.workflow, component=f"destination:{name}")
        self._ssl: ssl.SSLContext | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._checkpoints: dict[str, Position | None] = {}
        self._cursors: dict[str, TxnCursor] = {}
        self.records_written = 0
        self.requests = 0
        self.retries = 0
        self.rejected = 0

    def open(self) -> None:
        if self.endpoint.scheme == "https":
            self._ssl = tls_context(self.cfg, self.name)
        for source in self.ctx.sources:
            self._checkpoints[source] = self.ctx.state.get_checkpoint(
                self.ctx.workflow, self.name, source
            )

    def checkpoint(self, source: str) -> Position | None:
        return self._checkpoints.get(source)

    # ----------------------------------------------------------------- write

    def write(self, source: str, batch: Batch) -> list[Rejected] | None:
        ids, cursor = change_ids(
            self.ctx.workflow, source, batch, self._cursors.get(source, TxnCursor())
        )
        if batch.replay:  # a dead letter sent again: ids of its own, live ordinals untouched
            ids = [f"{i}:replay:{batch.replay}" for i in ids]
            cursor = self._cursors.get(source, TxnCursor())
        schemas = batch.schema_map()
        rejected: list[Rejected] = []
        size = self.cfg.batch_size
        for i in range(0, len(batch.changes), size):
            chunk = batch.changes[i : i + size]
            chunk_ids = ids[i : i + size]
            docs = []
            for c, cid in zip(chunk, chunk_ids, strict=True):
                doc = envelope(c, schemas[c.table], source)
                doc["id"] = cid
                docs.append(doc)
            body = to_json({"changes": docs}).encode()
            status, reply = self._post(body, idempotency_key(self.name, chunk_ids))
            if 200 <= status < 300:
                self.records_written += len(chunk)
            else:
                rejected.extend(self._refused(status, reply, chunk))
        self._cursors[source] = cursor  # only once the whole batch went out
        if rejected:
            self.ctx.reject(source, rejected)  # durable (dead letters) before the checkpoint
        if batch.complete:
            self.ctx.state.put_checkpoint(self.ctx.workflow, self.name, source, batch.last)
            self._checkpoints[source] = batch.last
        return rejected or None

    def _refused(self, status: int, reply: bytes, chunk: Sequence[Change]) -> list[Rejected]:
        snippet = " ".join(reply.decode("utf-8", "replace").split())[:BODY_SNIPPET]
        where = f"http destination {self.name}: {self.endpoint.display} answered HTTP {status}"
        if 300 <= status < 400:
            raise FatalError(f"{where} (a redirect, not followed): configure the final URL")
        if status in CONFIG_STATUSES:
            raise FatalError(f"{where}: check url and headers (credentials): {snippet}")
        if self.ctx.on_error == "fail":
            raise FatalError(f"{where} for a request of {len(chunk)} changes: {snippet}")
        self.rejected += len(chunk)
        self.log.warning("HTTP {} for {} changes: handed to on_error", status, len(chunk))
        return [Rejected(c, f"HTTP {status}: {snippet}") for c in chunk]

    # ------------------------------------------------------------------ HTTP

    def _post(self, body: bytes, key: str) -> tuple[int, bytes]:
        """POST with retries; returns a 2xx, 3xx or refusing 4xx (status, body)."""
        attempt = 0
        while True:
            wait: float | None = None
            try:
                status, retry_after, reply = self._request(body, key)
            except ssl.SSLCertVerificationError as e:
                self._disconnect()
                raise FatalError(
                    f"http destination {self.name}: TLS certificate of {self.endpoint.display} "
                    f"not trusted ({e.verify_message}): set tls_ca_file, or tls_verify: false"
                ) from None
            except (OSError, http.client.HTTPException) as e:
                self._disconnect()
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if status not in (408, 429) and status < 500:
                    return status, reply
                problem = f"HTTP {status}"
                wait = retry_after
            if attempt >= self.cfg.retry_count:
                raise RetryableError(
                    f"http destination {self.name}: {problem} from {self.endpoint.display} "
                    f"after {attempt + 1} attempts"
                )
            delay = self._backoff(attempt) if wait is None else wait
            self.log.warning(
                "{} from {}; retry {}/{} in {:.2f}s",
                problem,
                self.endpoint.display,
                attempt + 1,
                self.cfg.retry_count,
                delay,
            )
            self.retries += 1
            deadline = time.monotonic() + delay
            while (left := deadline - time.monotonic()) > 0:
                if self.ctx.stopping():
                    raise RetryableError(f"http destination {self.name}: stopping ({problem})")
                time.sleep(min(0.2, left))
            attempt += 1

    def _backoff(self, attempt: int) -> float:
        full: float = min(self.cfg.max_backoff, self.cfg.initial_backoff * (1 << attempt))
        return full / 2 + random.uniform(0, full / 2)  # jitter: no herd of retries

    def _request(self, body: bytes, key: str) -> tuple[int, float | None, bytes]:
        headers = {
            **self.cfg.headers,
            "Content-Type": "application/json",
            "Idempotency-Key": key,
        }
        if self.endpoint.authorization and not any(
            h.lower() == "authorization" for h in self.cfg.headers
        ):
            headers["Authorization"] = self.endpoint.authorization
        reused = self._conn is not None
        conn = self._connection()
        try:
            conn.request("POST", self.endpoint.target, body=body, headers=headers)
            resp = conn.getresponse()
        except _STALE:
            if not reused:
                raise
            # The server closed an idle keep-alive connection: one more go on a new one.
            self._disconnect()
            conn = self._connection()
            conn.request("POST", self.endpoint.target, body=body, headers=headers)
            resp = conn.getresponse()
        reply = resp.read()
        self.requests += 1
        if resp.will_close:
            self._disconnect()
        retry_after = None
        if resp.status in (429, 503):
            retry_after = parse_retry_after(resp.getheader("Retry-After"))
            if retry_after is not None:
                retry_after = min(retry_after, max(RETRY_AFTER_CAP_S, self.cfg.max_backoff))
        return resp.status, retry_after, reply

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            ep = self.endpoint
            if ep.scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    ep.host, ep.port, timeout=self.cfg.timeout, context=self._ssl
                )
            else:
                self._conn = http.client.HTTPConnection(ep.host, ep.port, timeout=self.cfg.timeout)
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        return {
            "records_written": self.records_written,
            "requests": self.requests,
            "retries": self.retries,
            "rejected": self.rejected,
        }

    def close(self) -> None:
        self._disconnect()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
