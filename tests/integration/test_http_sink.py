"""The `http` destination against a real local webhook (ThreadingHTTPServer).

The server records every request and can be told to answer 5xx a few times, 429
with Retry-After, 4xx for requests holding a given change, or to hang past the
client's timeout. TLS: certificates made with the openssl CLI in a temp dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from dataflare.cdc.errors import ConfigError, FatalError, RetryableError
from dataflare.cdc.generate import GenerateConfig
from dataflare.cdc.generate_source import GenerateSource
from dataflare.cdc.model import Batch, Position
from dataflare.daemon.state import StateStore
from dataflare.sinks.base import SinkContext
from dataflare.sinks.configs import HttpSinkConfig
from dataflare.sinks.http import HttpSink, change_ids, idempotency_key, parse_retry_after
from dataflare.sinks.registry import SINK_TYPES
from loguru import logger

pytestmark = pytest.mark.integration

WF, DEST, SRC = "wf", "hook", "gen"
FAST = {"initial_backoff": 0.01, "max_backoff": 0.05}


@dataclass
class Seen:
    key: str
    ids: list[str]
    headers: dict[str, str]
    path: str
    peer_port: int


@dataclass
class Script:
    """What the webhook answers; counters go down as they are used."""

    fail: int = 0  # answer `fail_status` this many times
    fail_status: int = 500
    retry_after: str | None = None
    hang: int = 0  # sleep `hang_s` this many times before answering
    hang_s: float = 1.0
    refuse: dict[str, int] = field(default_factory=dict)  # change id -> status
    refusal_body: str = "bad change"


class Webhook(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: list[Seen] = []
        self.script = Script()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        scheme = "https" if isinstance(self.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self.server_address[1]}/hook?token=s3cr3t-query"

    def answer(self, ids: list[str]) -> tuple[int, dict[str, str], str]:
        s = self.script
        with self.lock:
            if s.hang:
                s.hang -= 1
                hang = True
            else:
                hang = False
            if not hang and s.fail:
                s.fail -= 1
                extra = {"Retry-After": s.retry_after} if s.retry_after else {}
                return s.fail_status, extra, "try later"
        if hang:
            time.sleep(s.hang_s)
        for i in ids:
            if i in s.refuse:
                return s.refuse[i], {}, s.refusal_body
        return 200, {}, '{"ok":true}'


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: Webhook

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ids = [c["id"] for c in body["changes"]]
        self.server.seen.append(
            Seen(
                self.headers.get("Idempotency-Key", ""),
                ids,
                dict(self.headers.items()),
                self.path,
                self.client_address[1],
            )
        )
        self.server.last_body = body  # type: ignore[attr-defined]
        status, headers, text = self.server.answer(ids)
        data = text.encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up (timeout test)
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(server: Webhook) -> Iterator[Webhook]:
    t = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hook() -> Iterator[Webhook]:
    yield from serve(Webhook())


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(str(tmp_path / "state")) as s:
        yield s


@pytest.fixture
def logs() -> Iterator[list[str]]:
    lines: list[str] = []
    handler = logger.add(lambda m: lines.append(str(m)), level="DEBUG")
    yield lines
    logger.remove(handler)


OPENED: list[HttpSink] = []


@pytest.fixture(autouse=True)
def close_sinks() -> Iterator[None]:
    yield
    while OPENED:
        OPENED.pop().close()


def make_sink(state: StateStore, on_error: Any = "fail", **cfg: Any) -> HttpSink:
    ctx = SinkContext(WF, DEST, (SRC,), state, on_error=on_error)
    sink = HttpSink(DEST, HttpSinkConfig(**cfg), ctx)
    OPENED.append(sink)
    sink.open()
    return sink


def batches(count: int, start: Position | None = None, **gen: Any) -> list[Batch]:
    cfg = {"count": count, "transaction_size": 5, "batch_size": 1000, **gen}
    src = GenerateSource(SRC, GenerateConfig(**cfg))
    src.open(start)
    out = []
    while not src.exhausted:
        b = src.read_batch(1.0)
        if b is not None:
            out.append(b)
    return out


def test_registry_points_here() -> None:
    assert SINK_TYPES["http"].implementation == "dataflare.sinks.http:HttpSink"


def test_chunks_ids_headers_keepalive_and_checkpoint(hook: Webhook, state: StateStore) -> None:
    url = hook.url.replace("http://", "http://user:p%40ss@")
    sink = make_sink(state, url=url, batch_size=7, headers={"X-Token": "hdr-secret"})
    (batch,) = batches(30)
    assert sink.write(SRC, batch) is None
    assert [len(s.ids) for s in hook.seen] == [7, 7, 7, 7, 2]
    ids = [i for s in hook.seen for i in s.ids]
    # id = workflow:source:position:ordinal within the transaction (5 changes each)
    assert ids[:6] == [
        "wf:gen:5:0",
        "wf:gen:5:1",
        "wf:gen:5:2",
        "wf:gen:5:3",
        "wf:gen:5:4",
        "wf:gen:10:0",
    ]
    assert len(set(ids)) == 30
    for s in hook.seen:
        assert s.key == idempotency_key(DEST, s.ids)
        assert s.key == hashlib.sha256(("\n".join([DEST, *s.ids])).encode()).hexdigest()
        assert s.headers["Content-Type"] == "application/json"
        assert s.headers["X-Token"] == "hdr-secret"
        assert s.headers["Authorization"] == "Basic dXNlcjpwQHNz"  # user:p@ss
        assert s.path == "/hook?token=s3cr3t-query"
    assert len({s.peer_port for s in hook.seen}) == 1  # one keep-alive connection
    body = hook.last_body  # type: ignore[attr-defined]
    change = body["changes"][0]
    assert set(change) >= {"before", "after", "op", "ts_ms", "source", "id"}
    assert change["id"] == "wf:gen:30:3" and change["source"]["seq"] == 30
    assert state.get_checkpoint(WF, DEST, SRC) == batch.last
    assert sink.checkpoint(SRC) == batch.last
    assert sink.status()["records_written"] == 30
    sink.close()


def test_5xx_retried_then_accepted(hook: Webhook, state: StateStore, logs: list[str]) -> None:
    hook.script.fail = 2
    sink = make_sink(
        state, url=hook.url, batch_size=50, retry_count=3, headers={"X-K": "v4lue"}, **FAST
    )
    (batch,) = batches(20)
    sink.write(SRC, batch)
    assert len(hook.seen) == 3
    assert len({s.key for s in hook.seen}) == 1 and hook.seen[0].ids == hook.seen[2].ids
    assert sink.status()["retries"] == 2
    assert state.get_checkpoint(WF, DEST, SRC) == batch.last
    warnings = [line for line in logs if "HTTP 500" in line]
    assert len(warnings) == 2
    text = "\n".join(logs)
    assert "s3cr3t-query" not in text and "v4lue" not in text
    assert f"http://127.0.0.1:{hook.server_address[1]}/hook" in warnings[0]


def test_429_honours_retry_after(hook: Webhook, state: StateStore) -> None:
    hook.script.fail, hook.script.fail_status, hook.script.retry_after = 1, 429, "1"
    sink = make_sink(state, url=hook.url, retry_count=2, **FAST)
    (batch,) = batches(5)
    t0 = time.monotonic()
    sink.write(SRC, batch)
    assert time.monotonic() - t0 >= 0.95  # not the 10-50 ms backoff
    assert len(hook.seen) == 2
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None


def test_a_stop_request_cuts_a_retry_wait_short(hook: Webhook, state: StateStore) -> None:
    hook.script.fail, hook.script.fail_status, hook.script.retry_after = 1, 503, "30"
    stopping = [False]
    ctx = SinkContext(WF, DEST, (SRC,), state, stopping=lambda: stopping[0])
    sink = HttpSink(DEST, HttpSinkConfig(url=hook.url, retry_count=2, **FAST), ctx)
    OPENED.append(sink)
    sink.open()
    (batch,) = batches(5)
    threading.Timer(0.3, lambda: stopping.__setitem__(0, True)).start()
    t0 = time.monotonic()
    with pytest.raises(RetryableError, match="stopping"):
        sink.write(SRC, batch)
    assert time.monotonic() - t0 < 5  # not the 30 s Retry-After
    assert sink.checkpoint(SRC) is None


def test_retries_exhausted_raise_retryable_and_checkpoint_nothing(
    hook: Webhook, state: StateStore
) -> None:
    hook.script.fail, hook.script.fail_status = 100, 503
    url = hook.url.replace("http://", "http://user:pw-secret@")
    sink = make_sink(state, url=url, retry_count=2, **FAST)
    (batch,) = batches(5)
    with pytest.raises(RetryableError, match=r"HTTP 503 .* after 3 attempts") as e:
        sink.write(SRC, batch)
    assert "pw-secret" not in str(e.value) and "s3cr3t" not in str(e.value)
    assert len(hook.seen) == 3
    assert state.get_checkpoint(WF, DEST, SRC) is None


def test_timeout_retried(hook: Webhook, state: StateStore) -> None:
    hook.script.hang, hook.script.hang_s = 1, 1.5
    sink = make_sink(state, url=hook.url, timeout=0.3, retry_count=2, **FAST)
    (batch,) = batches(5)
    sink.write(SRC, batch)
    assert len(hook.seen) == 2 and hook.seen[0].key == hook.seen[1].key
    assert state.get_checkpoint(WF, DEST, SRC) == batch.last


def test_connection_refused_is_retryable(state: StateStore) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    sink = make_sink(state, url=f"http://127.0.0.1:{port}/", retry_count=1, **FAST)
    with pytest.raises(RetryableError, match=r"ConnectionRefusedError.*after 2 attempts"):
        sink.write(SRC, batches(5)[0])


def test_4xx_dead_letter_returns_the_chunk_as_rejected(hook: Webhook, state: StateStore) -> None:
    hook.script.refuse = {"wf:gen:15:2": 422}
    sink = make_sink(state, on_error="dead_letter", url=hook.url, batch_size=4)
    (batch,) = batches(30)
    rejected = sink.write(SRC, batch)
    assert rejected is not None
    refused_chunk = next(s for s in hook.seen if "wf:gen:15:2" in s.ids)
    assert len(rejected) == len(refused_chunk.ids) == 4
    assert [r.change for r in rejected] == batch.changes[12:16]
    assert rejected[0].error.startswith("HTTP 422: bad change")
    assert len(hook.seen) == 8  # every other chunk went out
    assert state.get_checkpoint(WF, DEST, SRC) == batch.last
    assert sink.status()["rejected"] == 4


def test_4xx_on_error_fail_is_fatal_with_status_and_body(hook: Webhook, state: StateStore) -> None:
    hook.script.refuse = {"wf:gen:5:0": 400}
    hook.script.refusal_body = "field amount: " + "x" * 500
    sink = make_sink(state, url=hook.url)
    with pytest.raises(FatalError, match="HTTP 400") as e:
        sink.write(SRC, batches(10)[0])
    msg = str(e.value)
    assert "field amount: xxx" in msg and "x" * 186 in msg and "x" * 187 not in msg
    assert state.get_checkpoint(WF, DEST, SRC) is None


def test_401_is_fatal_whatever_on_error(hook: Webhook, state: StateStore) -> None:
    hook.script.refuse = {"wf:gen:5:0": 401}
    sink = make_sink(state, on_error="dead_letter", url=hook.url)
    with pytest.raises(FatalError, match="HTTP 401: check url and headers"):
        sink.write(SRC, batches(5)[0])


def test_idempotency_keys_stable_across_a_replay(tmp_path: Path, hook: Webhook) -> None:
    """A restart re-sends from the checkpoint: the same chunks get the same keys,
    ordinals continuing across the incomplete batches of one large transaction."""
    (whole,) = batches(40, transaction_size=20)
    pos, final = whole.changes[0].position, whole.changes[-1].position
    # Transaction 1 (20 changes) arrives as two incomplete parts and a complete end.
    parts = [
        Batch(whole.changes[0:8], whole.schemas, pos, pos, complete=False),
        Batch(whole.changes[8:14], whole.schemas, pos, pos, complete=False),
        Batch(whole.changes[14:40], whole.schemas, pos, final, complete=True),
    ]
    runs = []
    for run in range(2):
        with StateStore(str(tmp_path / f"state{run}")) as state:
            sink = make_sink(state, url=hook.url, batch_size=6)
            for p in parts:
                sink.write(SRC, p)
            sink.close()
        runs.append([(s.key, s.ids) for s in hook.seen])
        hook.seen.clear()
    assert runs[0] == runs[1]
    ids = [i for _, chunk in runs[0] for i in chunk]
    assert ids[:20] == [f"wf:gen:20:{n}" for n in range(20)]
    assert ids[20:] == [f"wf:gen:40:{n}" for n in range(20)]
    # An incomplete batch is sent but not checkpointed.
    with StateStore(str(tmp_path / "state3")) as state:
        sink = make_sink(state, url=hook.url)
        sink.write(SRC, parts[0])
        assert state.get_checkpoint(WF, DEST, SRC) is None


def test_change_ids_cursor_is_pure() -> None:
    (b,) = batches(10)
    from dataflare.sinks.http import TxnCursor

    ids1, c1 = change_ids(WF, SRC, b, TxnCursor())
    ids2, c2 = change_ids(WF, SRC, b, TxnCursor())
    assert ids1 == ids2 and c1 == c2 and not c1.carry


def test_bad_url_is_a_config_error(state: StateStore) -> None:
    with pytest.raises(ConfigError, match="url must be http"):
        make_sink(state, url="ftp://user:secret@host/x")
    with pytest.raises(ConfigError) as e:
        make_sink(state, url="ftp://user:secret@host/x")
    assert "secret" not in str(e.value)


# ------------------------------------------------------------------------------ TLS


@dataclass
class Certs:
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def openssl_cert(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    return Certs(*openssl_cert(d, "server"), *openssl_cert(d, "client"))


def tls_hook(certs: Certs, client_ca: Path | None = None) -> Iterator[Webhook]:
    server = Webhook()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.server_cert, certs.server_key)
    if client_ca is not None:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    yield from serve(server)


def test_tls_ca_file_and_verify(certs: Certs, state: StateStore) -> None:
    for server in tls_hook(certs):
        sink = make_sink(state, url=server.url, tls_ca_file=str(certs.server_cert))
        sink.write(SRC, batches(5)[0])
        assert len(server.seen) == 1
        sink.close()
        untrusted = make_sink(state, url=server.url, **FAST)
        with pytest.raises(FatalError, match=r"not trusted.*tls_ca_file"):
            untrusted.write(SRC, batches(5)[0])
        insecure = make_sink(state, url=server.url, tls_verify=False)
        insecure.write(SRC, batches(5)[0])
        assert len(server.seen) == 2


def test_tls_client_certificate(certs: Certs, state: StateStore) -> None:
    for server in tls_hook(certs, client_ca=certs.client_cert):
        sink = make_sink(
            state,
            url=server.url,
            tls_ca_file=str(certs.server_cert),
            tls_client_cert=str(certs.client_cert),
            tls_client_key=str(certs.client_key),
        )
        sink.write(SRC, batches(5)[0])
        assert len(server.seen) == 1
        anonymous = make_sink(
            state, url=server.url, tls_ca_file=str(certs.server_cert), retry_count=1, **FAST
        )
        with pytest.raises(RetryableError):
            anonymous.write(SRC, batches(5)[0])
        assert len(server.seen) == 1
    with pytest.raises(ConfigError, match="cannot load TLS files"):
        make_sink(state, url="https://127.0.0.1:1/", tls_ca_file="/nonexistent/ca.pem")
