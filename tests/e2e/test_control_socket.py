"""The control socket: many clients, slow clients, peer credentials, mode; and the
status model, metrics and CLI against a real daemon running a generate workflow."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from dataflare.daemon.control import ControlServer
from dataflare.daemon.control_client import ControlClient, DaemonNotRunning, RequestFailed
from dataflare.daemon.control_protocol import PROTOCOL_VERSION, pack_frame, recv_frame

from tests.e2e.daemon_harness import REPO, Daemon, cli, count_lines, wait_for, write_config

pytestmark = pytest.mark.e2e


# --------------------------------------------------------------- in-process server


class ServerThread:
    """A ControlServer on its own event loop in a thread (the daemon's shape)."""

    def __init__(self, path: str, status_size: int = 100, **kw: Any) -> None:
        self.path = path
        self.kw = kw
        self.payload = "x" * status_size
        self.calls: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.server: ControlServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def status(self) -> dict[str, Any]:
        return {"daemon": {"version": "t"}, "workflows": [], "pad": self.payload}

    async def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        self.calls.append(cmd)
        if cmd == "status":
            return self.status()
        if cmd == "pause":
            return {"name": args.get("workflow"), "state": "paused"}
        raise ValueError(f"unknown command {cmd!r}")

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.server = ControlServer(self.path, self.handle, self.status, **self.kw)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="df-ctl-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_socket_mode_0660_and_stale_socket_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "df.sock")
    os.makedirs(os.path.dirname(path))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # a socket file left by a daemon that died
    stale.close()
    with ServerThread(path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        with ControlClient(path) as c:
            assert c.request("status")["daemon"]["version"] == "t"
    assert not os.path.exists(path)  # removed on close


def test_protocol_version_and_unknown_command(tmp_path: Path) -> None:
    path = str(tmp_path / "df.sock")
    with ServerThread(path):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(path)
        s.sendall(pack_frame({"v": 99, "id": 1, "cmd": "status", "args": {}}))
        reply = recv_frame(s)
        assert reply is not None and reply["ok"] is False
        assert "unsupported protocol version 99" in reply["error"]
        s.close()
        with ControlClient(path) as c, pytest.raises(RequestFailed, match="unknown command"):
            c.request("frobnicate")


def test_many_clients_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "df.sock")

    def one_client(i: int) -> int:
        with ControlClient(path) as c:
            got = 0
            for _ in c.subscribe(0.1):
                got += 1
                if got == 3:
                    break
            assert c.request("status")["daemon"]["version"] == "t"  # same connection
            return got

    with ServerThread(path), ThreadPoolExecutor(max_workers=40) as pool:
        t0 = time.monotonic()
        results = list(pool.map(one_client, range(40)))
        elapsed = time.monotonic() - t0
    assert results == [3] * 40
    assert elapsed < 10, elapsed


def test_stuck_client_is_dropped_and_others_served_promptly(tmp_path: Path) -> None:
    path = str(tmp_path / "df.sock")
    # large status frames fill the socket buffers at once; a small queue and send timeout
    with ServerThread(
        path, status_size=256 * 1024, queue_size=4, send_timeout=1.0, drop_grace=1.0
    ) as srv:
        stuck = socket.socket(socket.AF_UNIX)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(path)
        stuck.sendall(
            pack_frame(
                {"v": PROTOCOL_VERSION, "id": 1, "cmd": "subscribe", "args": {"interval": 0.1}}
            )
        )
        # it never reads; meanwhile another client gets every answer quickly
        worst = 0.0
        deadline = time.monotonic() + 4
        with ControlClient(path) as fast:
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                fast.request("status")
                worst = max(worst, time.monotonic() - t0)
                time.sleep(0.05)
        assert worst < 0.5, worst
        assert srv.server is not None
        wait_for(
            lambda: srv.server is not None and srv.server.dropped == 1, 10, "stuck client dropped"
        )
        # it never read again: cut off after the grace, its connection ends
        time.sleep(1.5)
        stuck.settimeout(5)
        with pytest.raises((ConnectionError, OSError)):
            while stuck.recv(1 << 20):
                pass
            raise ConnectionResetError("closed")
        stuck.close()


def test_dropped_client_that_reads_again_gets_the_reason(tmp_path: Path) -> None:
    path = str(tmp_path / "df.sock")
    with ServerThread(
        path, status_size=256 * 1024, queue_size=2, send_timeout=30, drop_grace=30
    ) as srv:
        slow = socket.socket(socket.AF_UNIX)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(path)
        slow.sendall(
            pack_frame(
                {"v": PROTOCOL_VERSION, "id": 1, "cmd": "subscribe", "args": {"interval": 0.1}}
            )
        )
        wait_for(lambda: srv.server is not None and srv.server.dropped == 1, 10, "dropped")
        slow.settimeout(10)
        frames = []
        while (msg := recv_frame(slow)) is not None:
            frames.append(msg)
        slow.close()
    assert frames[-1]["push"] == "bye"
    assert "too slow: 2 status pushes not read" in frames[-1]["error"]
    assert all(f.get("push") != "status" or "result" in f for f in frames[:-1])


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            sys.executable,
            "-m",
            "dataflare.daemon.cli",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to connect as another user",
)


@needs_root
def test_other_users_may_read_but_not_change_state(open_dir: Path) -> None:
    path = str(open_dir / "df.sock")
    with ServerThread(path) as srv:
        # mode 0660 owned by root:root: nobody cannot even connect
        r = _as_nobody("--socket", path, "status")
        assert r.returncode == 1 and "permission denied" in r.stderr, r
        # with the socket opened up (an ACL, a chmod), it may read but not change anything
        os.chmod(path, 0o666)
        r = _as_nobody("--socket", path, "status", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["daemon"]["version"] == "t"
        r = _as_nobody("--socket", path, "pause", "wf")
        assert r.returncode == 1
        assert "permission denied: pause needs root or the daemon's user or group" in r.stderr
        assert "pause" not in srv.calls
        with ControlClient(path) as c:  # root may
            assert c.request("pause", workflow="wf")["state"] == "paused"


# ----------------------------------------------------------------- a real daemon


def gen_workflow(out: Path, **gen: Any) -> dict[str, Any]:
    return {
        "sources": {"gen": {"type": "generate", "config": gen}},
        "destinations": {"out": {"type": "file", "inputs": ["gen"], "config": {"path": str(out)}}},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    port = free_port()
    cfg = write_config(
        tmp_path,
        {"gen": gen_workflow(tmp_path / "out.jsonl", rate=400, tables=["public.a", "s.b"], seed=1)},
        metrics_listen=f"127.0.0.1:{port}",
    )
    d = Daemon(cfg)
    d.metrics_port = port  # type: ignore[attr-defined]
    d.start()
    try:
        yield d
    finally:
        d.stop()


def test_status_model_of_a_running_workflow(daemon: Daemon) -> None:
    wait_for(
        lambda: min(daemon.workflow("gen")[k] for k in ("rate_in", "rate_out")) > 100,
        30,
        "throughput shows",
    )
    st = daemon.status()
    d = st["daemon"]
    assert d["version"] and d["uptime_s"] >= 0 and d["config_generation"] == 1
    assert d["config_errors"] == []
    w = st["workflows"][0]
    assert w["state"] == "streaming" and w["state_reason"] is None
    assert 100 < w["rate_in"] < 1000 and 100 < w["rate_out"] < 1000
    assert w["batches"] > 0 and w["errors"] == 0 and w["dead_letters"] == 0
    src = w["sources"][0]
    assert src["ring_capacity"] > 0 and 0 <= src["ring_fill"] <= 1
    assert src["batches"] > 0 and src["rate_in"] > 0
    assert set(w["tables"]) == {"public.a", "s.b"}
    assert sum(sum(ops.values()) for ops in w["tables"].values()) > 0
    assert set(w["tables"]["public.a"]) <= {"c", "u", "d"}
    assert w["destinations"][0]["rate_out"] > 0
    assert any("streaming" in e["message"] for e in w["log"])
    assert w["recent_errors"] == []
    # the readable table
    r = cli("--socket", daemon.socket, "status")
    assert r.returncode == 0 and "streaming" in r.stdout and "OUT/s" in r.stdout
    r = cli("--socket", daemon.socket, "status", "gen")
    assert r.returncode == 0 and "public.a" in r.stdout and "log:" in r.stdout


def test_pause_resume_restart_show_in_status_and_log(daemon: Daemon, tmp_path: Path) -> None:
    wait_for(lambda: daemon.workflow("gen")["state"] == "streaming", 20, "streaming")
    assert cli("--socket", daemon.socket, "pause", "gen").returncode == 0
    assert daemon.workflow("gen")["state"] == "paused"
    wait_for(lambda: daemon.workflow("gen")["rate_out"] == 0.0, 10, "rate falls to 0")
    assert cli("--socket", daemon.socket, "resume", "gen").returncode == 0
    wait_for(lambda: daemon.workflow("gen")["state"] == "streaming", 20, "streaming again")
    r = cli("--socket", daemon.socket, "restart", "gen")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: daemon.workflow("gen")["state"] == "streaming", 20, "streaming again")
    log = [e["message"] for e in daemon.workflow("gen")["log"]]
    assert "state streaming -> paused" in log
    # totals survive the restart of the workflow's processes
    tables = daemon.workflow("gen")["tables"]
    total = sum(sum(ops.values()) for ops in tables.values())
    assert total >= daemon.workflow("gen")["records_in"] * 0.9
    r = cli("--socket", daemon.socket, "reload")
    assert r.returncode == 0 and "configuration generation 2 applied" in r.stdout


def test_metrics_endpoint(daemon: Daemon) -> None:
    port = daemon.metrics_port  # type: ignore[attr-defined]
    wait_for(lambda: daemon.workflow("gen")["records_out"] > 0, 20, "records out")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    assert "dataflare_up 1" in text
    assert 'dataflare_workflow_state{workflow="gen",state="streaming"} 1' in text
    assert "# TYPE dataflare_records_in_total counter" in text
    assert 'dataflare_records_in_total{workflow="gen",source="gen"}' in text
    assert 'dataflare_records_out_total{workflow="gen",destination="out"}' in text
    assert 'dataflare_lag_seconds{workflow="gen",source="gen"} 0.0' in text
    assert 'dataflare_restarts_total{workflow="gen"} 0' in text
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
    assert e.value.code == 404
    e.value.close()


def test_many_clients_and_a_stuck_one_against_the_daemon(daemon: Daemon) -> None:
    stuck = socket.socket(socket.AF_UNIX)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(daemon.socket)
    stuck.sendall(
        pack_frame({"v": PROTOCOL_VERSION, "id": 1, "cmd": "subscribe", "args": {"interval": 0.1}})
    )
    out = daemon.config.parent / "out.jsonl"
    before = count_lines(out)

    def client(i: int) -> float:
        t0 = time.monotonic()
        with ControlClient(daemon.socket) as c:
            for n, st in enumerate(c.subscribe(0.2)):
                assert st["workflows"][0]["name"] == "gen"
                if n == 2:
                    break
        return time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=25) as pool:
        times = list(pool.map(client, range(25)))
    assert max(times) < 5, times
    wait_for(lambda: count_lines(out) > before + 200, 20, "replication goes on")
    stuck.close()


def test_check_and_plan_of_the_daemons_workflow(daemon: Daemon) -> None:
    r = cli("--config", str(daemon.config), "check", "gen")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK    synthetic source" in r.stdout and "is writable" in r.stdout
    r = cli("--config", str(daemon.config), "plan", "gen")
    assert r.returncode == 0 and "└─▶ out [file destination]" in r.stdout


def test_cli_and_client_when_daemon_stops(daemon: Daemon) -> None:
    assert daemon.terminate() == 0
    r = cli("--socket", daemon.socket, "status", "--json")
    assert r.returncode == 3 and "daemon not running" in r.stderr
    with pytest.raises(DaemonNotRunning):
        ControlClient(daemon.socket).connect()
