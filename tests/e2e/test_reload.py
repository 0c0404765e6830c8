"""Hot reload against a running daemon while data flows (generate -> file).

Workflow files are added, changed, broken, fixed and removed under a running
daemon; a burst of writes converges on the last content; daemon settings apply
or say that they need a restart. Outputs are checked change by change at the end:
nothing lost, nothing twice.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dataflare.cdc.generate import GenerateConfig
from dataflare.cdc.generate_source import ChangePlan

from tests.e2e.daemon_harness import Daemon, cli, count_lines, wait_for, write_config

pytestmark = pytest.mark.e2e


def gen_workflow(out: Path, **gen: Any) -> dict[str, Any]:
    return {
        "sources": {"gen": {"type": "generate", "config": gen}},
        "destinations": {"out": {"type": "file", "inputs": ["gen"], "config": {"path": str(out)}}},
    }


def write_workflow(cfg: Path, name: str, body: dict[str, Any], **extra: Any) -> Path:
    path = cfg.parent / "workflows.d" / f"{name}.yaml"
    tmp = path.with_name(f".{name}.yaml.tmp")
    tmp.write_text(yaml.safe_dump({"name": name, **extra, **body}))
    os.replace(tmp, path)  # an editor's atomic save
    return path


def assert_stream(path: Path, gen: dict[str, Any], n: int | None = None) -> int:
    """Lines 1..k are changes 1..k of the generator, in order (k == n when given)."""
    plan = ChangePlan(
        GenerateConfig(**{k: v for k, v in gen.items() if k not in ("rate", "batch_size")})
    )
    size = gen.get("transaction_size", 1)
    count = gen.get("count")
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    if n is not None:
        assert len(lines) == n
    for seq, line in enumerate(lines, start=1):
        want = plan.change(seq)
        commit = ((seq - 1) // size + 1) * size
        if count is not None:
            commit = min(commit, count)
        assert line["source"]["seq"] == commit, f"line {seq}"
        assert line["op"] == want.op.value, f"line {seq}"
        row = line["after"] or line["before"]
        assert row["id"] == want.row[0], f"line {seq}"
    return len(lines)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def start(cfg: Path, daemons: list[Daemon]) -> Daemon:
    d = Daemon(cfg)
    daemons.append(d)
    d.start()
    return d


def names(d: Daemon) -> set[str]:
    return {w["name"] for w in d.status()["workflows"]}


def streaming(d: Daemon, name: str) -> bool:
    wf = next((w for w in d.status()["workflows"] if w["name"] == name), None)
    return wf is not None and wf["state"] == "streaming" and len(wf["pids"]) == 2


def test_add_change_break_fix_remove_while_data_flows(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    outdir = tmp_path / "out"
    outdir.mkdir()
    out_a, out_b, out_c = (outdir / f"{n}.jsonl" for n in "abc")
    ga = {"count": 40_000, "rate": 1500, "transaction_size": 5, "seed": 11, "batch_size": 500}
    gb = {"rate": 300, "transaction_size": 3, "seed": 12}  # the bystander: never touched
    gc = {"rate": 400, "transaction_size": 2, "seed": 13}
    cfg = write_config(tmp_path, {"a": gen_workflow(out_a, **ga), "b": gen_workflow(out_b, **gb)})
    d = start(cfg, daemons)
    wait_for(lambda: streaming(d, "a") and streaming(d, "b"), 30, "a and b streaming")
    b_pids = d.workflow("b")["pids"]

    # Add a workflow file.
    write_workflow(cfg, "c", gen_workflow(out_c, **gc))
    wait_for(lambda: streaming(d, "c"), 30, f"c added; log:\n{d.log_tail()}")
    wait_for(lambda: count_lines(out_c) > 200, 20, "c writes")

    # Change a (batching only: the stream itself stays the same).
    a_pids = d.workflow("a")["pids"]
    write_workflow(cfg, "a", gen_workflow(out_a, **{**ga, "batch_size": 200}))
    wait_for(lambda: streaming(d, "a") and d.workflow("a")["pids"] != a_pids, 30, "a restarted")
    a_pids = d.workflow("a")["pids"]
    assert "~a" in d.log.read_text()

    # Break a: rejected with file, line and key; a keeps running its last good config.
    broken = write_workflow(cfg, "a", gen_workflow(out_a, **{**ga, "rat": 9}))
    wait_for(lambda: d.status()["daemon"]["config_errors"] != [], 20, "config error shown")
    (err,) = d.status()["daemon"]["config_errors"]
    assert err["file"] == str(broken)
    line = 1 + next(i for i, t in enumerate(broken.read_text().splitlines()) if "rat:" in t)
    assert err["key"] == "sources.gen.config.rat" and err["line"] == line
    assert "did you mean 'rate'" in err["message"]
    assert f"{broken}:{line}: sources.gen.config.rat" in d.log.read_text()
    wf_a = d.workflow("a")
    assert wf_a["pids"] == a_pids and wf_a["state"] == "streaming"
    assert "last good configuration" in wf_a["note"]
    written = count_lines(out_a)
    wait_for(lambda: count_lines(out_a) > written + 300, 20, "a still flowing while broken")

    # Fix a with a change (faster, so it finishes): applied.
    write_workflow(cfg, "a", gen_workflow(out_a, **{**ga, "batch_size": 300, "rate": 5000}))
    wait_for(lambda: d.status()["daemon"]["config_errors"] == [], 20, "config error cleared")
    wait_for(lambda: d.workflow("a")["pids"] != a_pids, 20, "a restarted after the fix")
    assert d.workflow("a")["note"] == "" or "last good" not in d.workflow("a")["note"]

    # Remove c: stopped and gone from status.
    (cfg.parent / "workflows.d" / "c.yaml").unlink()
    wait_for(lambda: "c" not in names(d), 30, "c removed")
    assert "-c" in d.log.read_text()
    c_lines = count_lines(out_c)
    time.sleep(0.5)
    assert count_lines(out_c) == c_lines, "a removed workflow kept writing"

    wait_for(lambda: d.workflow("a")["state"] == "stopped", 90, "a finished")
    wf_b = d.workflow("b")
    assert wf_b["pids"] == b_pids and wf_b["restarts"] == 0 and wf_b["state"] == "streaming"
    assert d.terminate() == 0

    assert_stream(out_a, ga, 40_000)
    assert assert_stream(out_b, gb) > 0
    assert assert_stream(out_c, gc) == c_lines > 200


def test_a_burst_of_writes_converges_on_the_last_content(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    out = tmp_path / "out" / "burst.jsonl"
    out.parent.mkdir()
    g = {"rate": 300, "transaction_size": 4, "seed": 21}
    other_out = tmp_path / "out" / "other.jsonl"
    cfg = write_config(
        tmp_path,
        {"burst": gen_workflow(out, **g), "other": gen_workflow(other_out, rate=200, seed=22)},
    )
    d = start(cfg, daemons)
    wait_for(lambda: streaming(d, "burst") and streaming(d, "other"), 30, "streaming")
    other_pids = d.workflow("other")["pids"]
    generation = d.status()["daemon"]["config_generation"]
    path = cfg.parent / "workflows.d" / "burst.yaml"
    began = time.monotonic()
    for i in range(100):
        doc = {"name": "burst", "description": f"v{i}", **gen_workflow(out, **g)}
        doc["sources"]["gen"]["config"]["batch_size"] = 100 + i  # a real change each time
        text = yaml.safe_dump(doc)
        with open(path, "w") as f:  # in place: a reload may read it half-written
            f.write(text[: len(text) // 2])
            f.flush()
            time.sleep(0.002)
            f.write(text[len(text) // 2 :])
        time.sleep(0.004)
    assert time.monotonic() - began < 3.0  # ~0.7 s unloaded

    def converged() -> bool:
        st = d.status()
        wf = next(w for w in st["workflows"] if w["name"] == "burst")
        return (
            st["daemon"]["config_errors"] == []
            and wf["description"] == "v99"
            and wf["state"] == "streaming"
        )

    wait_for(converged, 30, f"converged on v99; log:\n{d.log_tail()}")
    # Quiet: no reload for 2 s (late events of the burst may still bring one or two).
    deadline = time.monotonic() + 30
    settled, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_gen = d.status()["daemon"]["config_generation"]
        if now_gen != settled:
            settled, since = now_gen, time.monotonic()
        elif time.monotonic() - since >= 2.0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"reloads kept coming; log:\n{d.log_tail()}")
    assert converged(), f"not on the last content; log:\n{d.log_tail()}"
    assert settled - generation < 50, "not debounced"  # 100 writes, far fewer reloads
    log = d.log.read_text()
    last_applied = [line for line in log.splitlines() if "applied:" in line][-1]
    assert f"config generation {settled} applied" in last_applied
    assert d.workflow("other")["pids"] == other_pids  # never paused
    progress = count_lines(out)
    wait_for(lambda: count_lines(out) > progress + 100, 20, "burst still flowing")
    assert d.terminate() == 0
    assert assert_stream(out, g) > 0


def test_daemon_settings_apply_or_need_a_restart(tmp_path: Path, daemons: list[Daemon]) -> None:
    out = tmp_path / "out.jsonl"
    cfg = write_config(tmp_path, {"g": gen_workflow(out, rate=200, seed=31)})
    original = cfg.read_text()
    d = start(cfg, daemons)
    wait_for(lambda: streaming(d, "g"), 30, "streaming")
    pids = d.workflow("g")["pids"]
    doc = yaml.safe_load(original)
    doc["daemon"].update(
        log_level="DEBUG", socket=str(tmp_path / "new.sock"), state_dir=str(tmp_path / "s2")
    )
    cfg.write_text(yaml.safe_dump(doc))
    r = cli("--socket", d.socket, "reload")  # the old socket still answers
    assert r.returncode == 0, r.stdout + r.stderr
    errors = d.status()["daemon"]["config_errors"]
    assert {e["key"] for e in errors} == {"daemon.socket", "daemon.state_dir"}
    assert all("needs a restart" in e["message"] and e["file"] == str(cfg) for e in errors)
    log = d.log.read_text()
    assert "daemon.state_dir: changed to" in log and "needs a restart" in log
    assert "reload plan:" in log  # a DEBUG line: the new log level applied at once
    assert not (tmp_path / "new.sock").exists()
    assert d.workflow("g")["pids"] == pids

    # An invalid daemon file: everything keeps running; SIGHUP takes the same path.
    generation = d.status()["daemon"]["config_generation"]
    cfg.write_text("daemon:\n  log_level: LOUD\nworkflows_dir: workflows.d\n")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: any(e["key"] == "daemon.log_level" for e in d.status()["daemon"]["config_errors"]),
        20,
        "daemon file error shown",
    )
    (err,) = d.status()["daemon"]["config_errors"]
    assert err["line"] == 2 and err["file"] == str(cfg)
    rejected = cli("--socket", d.socket, "reload")
    assert rejected.returncode == 1 and "rejected" in rejected.stdout
    assert d.status()["daemon"]["config_generation"] == generation
    assert d.workflow("g")["pids"] == pids

    cfg.write_text(original)
    wait_for(lambda: d.status()["daemon"]["config_errors"] == [], 20, "fixed")
    assert d.workflow("g")["pids"] == pids and d.workflow("g")["state"] == "streaming"
    assert d.terminate() == 0
    assert assert_stream(out, {"rate": 200, "seed": 31}) > 0
