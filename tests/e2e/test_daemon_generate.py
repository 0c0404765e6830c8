"""The daemon end to end: generate -> file through rings, with crashes."""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dataflare.cdc.generate import GenerateConfig
from dataflare.cdc.generate_source import ChangePlan

from tests.e2e.daemon_harness import Daemon, cli, count_lines, wait_for, write_config

pytestmark = pytest.mark.e2e


def gen_workflow(out: Path, **gen: Any) -> dict[str, Any]:
    return {
        "sources": {"gen": {"type": "generate", "config": gen}},
        "destinations": {"out": {"type": "file", "inputs": ["gen"], "config": {"path": str(out)}}},
    }


def assert_exact_stream(path: Path, gen: dict[str, Any], n: int) -> None:
    """Every line is change 1..n of the generator, in order: none lost, none twice."""
    plan = ChangePlan(GenerateConfig(**{k: v for k, v in gen.items() if k != "rate"}))
    size = gen.get("transaction_size", 1)
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == n
    for seq, line in enumerate(lines, start=1):
        want = plan.change(seq)
        commit = min(((seq - 1) // size + 1) * size, n)
        assert line["source"]["seq"] == commit, f"line {seq}"
        assert line["op"] == want.op.value, f"line {seq}"
        row = line["after"] or line["before"]
        assert row["id"] == want.row[0], f"line {seq}"
        assert line["source"]["table"] == plan.tables[want.table_index].name


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def test_sigkill_three_times_writes_exactly_n_lines(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    n = 30_000
    gen = {
        "count": n,
        "rate": 5000,
        "transaction_size": 7,
        "tables": ["public.a", "s.b"],
        "seed": 3,
    }
    out = tmp_path / "out.jsonl"
    cfg = write_config(tmp_path, {"gen": gen_workflow(out, **gen)})
    rng = random.Random(42)
    for _ in range(3):
        d = Daemon(cfg)
        daemon_factory.append(d)
        d.start()
        floor = count_lines(out)
        target = floor + rng.randint(500, 6000)
        wait_for(lambda t=target: count_lines(out) >= t, 30, f"{target} lines")  # type: ignore[misc]
        d.kill()  # SIGKILL the supervisor: its workers die with it (PDEATHSIG)
    d = Daemon(cfg)
    daemon_factory.append(d)
    d.start()
    wait_for(lambda: d.workflow("gen")["state"] == "stopped", 60, "workflow finished")
    assert d.workflow("gen")["records_out"] > 0
    assert_exact_stream(out, gen, n)
    assert d.terminate() == 0
    leftovers = [f for f in os.listdir("/dev/shm") if f.startswith(f"dataflare.{d.proc.pid}.")]  # type: ignore[union-attr]
    assert leftovers == []


def test_sigterm_drains_and_resumes(tmp_path: Path, daemon_factory: list[Daemon]) -> None:
    n = 20_000
    gen = {"count": n, "rate": 4000, "transaction_size": 3, "seed": 5}
    out = tmp_path / "out.jsonl"
    cfg = write_config(tmp_path, {"gen": gen_workflow(out, **gen)})
    d = Daemon(cfg)
    daemon_factory.append(d)
    d.start()
    wait_for(lambda: count_lines(out) >= 2000, 30, "2000 lines")
    assert d.terminate(timeout=30) == 0
    assert "drained" in d.log.read_text()
    written = count_lines(out)
    assert 2000 <= written < n
    d2 = Daemon(cfg)
    daemon_factory.append(d2)
    d2.start()
    wait_for(lambda: d2.workflow("gen")["state"] == "stopped", 60, "workflow finished")
    assert_exact_stream(out, gen, n)


def test_worker_crash_restarts_with_reason(tmp_path: Path, daemon_factory: list[Daemon]) -> None:
    n = 15_000
    gen = {"count": n, "rate": 3000, "transaction_size": 4, "seed": 9}
    out = tmp_path / "out.jsonl"
    cfg = write_config(tmp_path, {"gen": gen_workflow(out, **gen)})
    d = Daemon(cfg)
    daemon_factory.append(d)
    d.start()
    wait_for(lambda: count_lines(out) >= 1500, 30, "1500 lines")
    pids = d.workflow("gen")["pids"]
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)  # the apply process (spawned first)
    wait_for(lambda: d.workflow("gen")["restarts"] >= 1, 20, "a restart")
    wf = d.workflow("gen")
    assert "SIGKILL" in (wf["last_error"] or ""), wf
    assert wf["errors"] >= 1
    wait_for(lambda: d.workflow("gen")["state"] == "stopped", 60, "workflow finished")
    assert_exact_stream(out, gen, n)


def test_status_contract_and_control_commands(tmp_path: Path, daemon_factory: list[Daemon]) -> None:
    out = tmp_path / "out.jsonl"
    cfg = write_config(tmp_path, {"gen": gen_workflow(out, rate=500)})
    d = Daemon(cfg)
    daemon_factory.append(d)
    d.start()
    wait_for(lambda: d.workflow("gen")["state"] == "streaming", 20, "streaming")
    st = d.status()
    assert set(st["daemon"]) >= {"version", "uptime_s", "config_generation", "config_errors"}
    wf = st["workflows"][0]
    assert set(wf) >= {
        "name",
        "state",
        "sources",
        "destinations",
        "records_in",
        "records_out",
        "errors",
        "dead_letters",
        "last_error",
    }
    assert set(wf["sources"][0]) >= {"name", "position", "lag_bytes", "lag_seconds", "snapshot"}
    assert set(wf["destinations"][0]) >= {"name", "position", "records_written"}
    text = cli("--socket", d.socket, "status")
    assert text.returncode == 0 and "gen" in text.stdout and "streaming" in text.stdout
    assert cli("--socket", d.socket, "pause", "gen").returncode == 0
    assert d.workflow("gen")["state"] == "paused"
    paused_at = count_lines(out)
    assert cli("--socket", d.socket, "resume", "gen").returncode == 0
    wait_for(lambda: count_lines(out) > paused_at + 100, 20, "progress after resume")
    bad = cli("--socket", d.socket, "pause", "nope")
    assert bad.returncode == 1 and "no workflow named" in bad.stderr
    assert d.terminate() == 0


def test_cli_without_daemon_says_not_running(tmp_path: Path) -> None:
    r = cli("--socket", str(tmp_path / "absent.sock"), "status")
    assert r.returncode == 3
    assert "daemon not running" in r.stderr
