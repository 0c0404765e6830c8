"""The daemon end to end into the file (zstd, rotating) and http destinations,
SIGKILLed (its whole process group: supervisor, source and apply processes) twice
mid-stream and restarted: every change must arrive exactly once (file) or at least
once with a stable id, repeats only as documented in docs/sinks-files.md (http).
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import zstandard
from dataflare.cdc.generate import GenerateConfig
from dataflare.cdc.generate_source import ChangePlan
from dataflare.sinks.http import idempotency_key

from tests.e2e.daemon_harness import GroupDaemon, wait_for, write_config

pytestmark = pytest.mark.e2e

N = 20_000
TXN, BATCH = 10, 50
# Batches of exactly 50 changes (filled in 20 ms, long before the 250 ms read
# deadline), so a restart from a checkpoint re-reads the same batches: the http
# chunks (20, 20, 10) and so their Idempotency-Keys come out the same.
GEN: dict[str, Any] = {
    "count": N,
    "rate": 2500,
    "transaction_size": TXN,
    "batch_size": BATCH,
    "batch_timeout": "1s",
    "seed": 11,
}


@pytest.fixture
def daemons() -> Iterator[list[GroupDaemon]]:
    started: list[GroupDaemon] = []
    yield started
    for d in started:
        d.stop()


def crash_twice_then_finish(
    cfg: Path,
    daemons: list[GroupDaemon],
    crash: Callable[[GroupDaemon, int], None],
    workflow: str,
) -> GroupDaemon:
    """Start, let ``crash`` SIGKILL the group, twice; then restart and finish."""
    for round_ in range(2):
        d = GroupDaemon(cfg)
        daemons.append(d)
        d.start()
        crash(d, round_)
        d.kill_group()
    d = GroupDaemon(cfg)
    daemons.append(d)
    d.start()
    wait_for(lambda: d.workflow(workflow)["state"] == "stopped", 40, "workflow finished")
    return d


def expected_id(workflow: str, seq: int) -> str:
    commit = min(((seq - 1) // TXN + 1) * TXN, N)
    return f"{workflow}:gen:{commit}:{(seq - 1) % TXN}"


# ----------------------------------------------------------------------------- file


def test_file_zstd_rotating_exactly_once_across_sigkills(
    tmp_path: Path, daemons: list[GroupDaemon]
) -> None:
    outdir = tmp_path / "out"
    dest = {"path": str(outdir / "changes.jsonl"), "compression": "zstd", "rotate_bytes": 48_000}
    wf = {
        "sources": {"gen": {"type": "generate", "config": GEN}},
        "destinations": {"files": {"type": "file", "inputs": ["gen"], "config": dest}},
    }
    cfg = write_config(tmp_path, {"gen": wf})
    rng = random.Random(7)

    def written() -> int:
        return sum(f.stat().st_size for f in outdir.glob("changes.*"))

    marks = (rng.randint(100_000, 200_000), rng.randint(280_000, 380_000))

    def crash(d: GroupDaemon, round_: int) -> None:
        wait_for(lambda: written() >= marks[round_], 30, f"{marks[round_]} bytes written")

    d = crash_twice_then_finish(cfg, daemons, crash, "gen")
    files = sorted(outdir.glob("changes.0*.jsonl.zst"))
    assert len(files) >= 8, "several rotations"
    assert [f.name for f in files] == [
        f"changes.{i:06d}.jsonl.zst" for i in range(1, len(files) + 1)
    ]
    files.append(outdir / "changes.jsonl.zst")  # the live file comes last
    lines: list[str] = []
    for f in files:
        with zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(f.read_bytes()), read_across_frames=True
        ) as r:
            lines.extend(r.read().decode().splitlines())
        assert subprocess.run(["zstd", "-tq", str(f)]).returncode == 0, f
    plan = ChangePlan(GenerateConfig(**{k: v for k, v in GEN.items() if k != "rate"}))
    assert len(lines) == N
    for seq, line in enumerate(lines, start=1):
        env = json.loads(line)
        want = plan.change(seq)
        assert expected_id("gen", seq).split(":")[2] == str(env["source"]["seq"]), f"line {seq}"
        assert env["op"] == want.op.value, f"line {seq}"
        assert (env["after"] or env["before"])["id"] == want.row[0], f"line {seq}"
    assert d.terminate() == 0


# ----------------------------------------------------------------------------- http


class Consumer(ThreadingHTTPServer):
    """A webhook that keeps every request (key, change ids) in arrival order and,
    when armed, SIGKILLs the daemon's process group while a request is in flight:
    received, never answered."""

    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ConsumerHandler)
        self.requests: list[tuple[str, list[str], dict[str, str]]] = []
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        self.kill_at: tuple[int, int] | None = None  # (changes seen, process group)
        self.killed = threading.Event()


class ConsumerHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Consumer

    def do_POST(self) -> None:
        try:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            ids = [c["id"] for c in json.loads(raw)["changes"]]
        except (OSError, ValueError):
            return  # the daemon died mid-request: nothing was delivered
        srv = self.server
        with srv.lock:
            srv.requests.append((self.headers["Idempotency-Key"], ids, dict(self.headers)))
            srv.seen.update(ids)
            kill = srv.kill_at is not None and len(srv.seen) >= srv.kill_at[0]
            if kill and srv.kill_at is not None:
                os.killpg(srv.kill_at[1], signal.SIGKILL)
                srv.kill_at = None
                srv.killed.set()
        if kill:
            return  # delivered, but the sender never hears back
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_http_at_least_once_stable_keys_across_sigkills(
    tmp_path: Path, daemons: list[GroupDaemon]
) -> None:
    server = Consumer()
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ingest"
        dest = {"url": url, "batch_size": 20, "headers": {"X-Source": "e2e"}}
        wf = {
            "sources": {"gen": {"type": "generate", "config": GEN}},
            "destinations": {"hook": {"type": "http", "inputs": ["gen"], "config": dest}},
        }
        cfg = write_config(tmp_path, {"hooked": wf})
        rng = random.Random(5)
        marks = (rng.randint(3000, 6000), rng.randint(10_000, 14_000))

        def crash(d: GroupDaemon, round_: int) -> None:
            assert d.proc is not None
            server.killed.clear()
            with server.lock:
                server.kill_at = (marks[round_], d.proc.pid)
            assert server.killed.wait(30), f"no kill at {marks[round_]} changes"

        d = crash_twice_then_finish(cfg, daemons, crash, "hooked")
        assert d.terminate() == 0
    finally:
        server.shutdown()
        server.server_close()
    first: list[str] = []
    first_key: dict[str, str] = {}
    by_key: dict[str, list[str]] = {}
    copies = repeated_requests = 0
    for key, ids, headers in server.requests:
        assert headers["Content-Type"] == "application/json" and headers["X-Source"] == "e2e"
        # The key is a function of the chunk's changes: a repeated key repeats them all.
        assert key == idempotency_key("hook", ids)
        repeated_requests += key in by_key
        assert by_key.setdefault(key, ids) == ids
        for i in ids:
            if i in first_key:
                copies += 1
                # A change arrives again only in a chunk the receiver has seen, same key.
                assert first_key[i] == key, i
            else:
                first_key[i] = key
                first.append(i)
    # Every change arrived, first arrivals in stream order.
    assert first == [expected_id("hooked", s) for s in range(1, N + 1)]
    # The two requests in flight at the kills were sent again; nothing before the
    # last checkpoint was: at most one source batch (50 changes) per crash.
    assert repeated_requests >= 2
    assert 2 <= copies <= 2 * BATCH, copies
