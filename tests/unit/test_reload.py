"""Reload rules, the config watcher's filter and sd_notify, without a daemon."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dataflare.cdc.generate import GenerateConfig
from dataflare.cdc.registry import SOURCE_TYPES, ConnectorType
from dataflare.daemon import sdnotify
from dataflare.daemon.config import (
    ConfigIssue,
    DaemonSettings,
    ErrorHandling,
    NodeSpec,
    WorkflowConfig,
)
from dataflare.daemon.reload import (
    drop_slot_hook,
    merge_settings,
    plan_reload,
    restart_issues,
)
from dataflare.daemon.watch import ConfigWatcher, is_config_path


def wf(name: str, file: str | None = None, rate: float | None = None, **kw: Any) -> WorkflowConfig:
    gen = NodeSpec(
        "gen", "generate", (), GenerateConfig(rate=rate), ErrorHandling(), file or name, 1
    )
    return WorkflowConfig(
        name=name,
        description=kw.pop("description", ""),
        file=file or f"/etc/dataflare/workflows.d/{name}.yaml",
        sources=(gen,),
        transformations=(),
        destinations=(),
        **kw,
    )


def test_plan_start_stop_restart_unchanged() -> None:
    running = {"a": wf("a"), "b": wf("b"), "c": wf("c")}
    wanted = [wf("a", description="edited"), wf("b", rate=5), wf("d")]
    plan = plan_reload(running, wanted, [])
    assert [w.name for w in plan.start] == ["d"]
    assert [w.name for w in plan.restart] == ["b"] and plan.restart[0].sources[0].config.rate == 5
    assert [w.name for w in plan.stop] == ["c"]
    assert [w.name for w in plan.unchanged] == ["a"]  # a description is not a change
    assert plan.unchanged[0].description == "edited"
    assert plan.keep == ()
    assert plan.changes() == ["+d", "~b", "-c"]


def test_plan_keeps_a_workflow_whose_file_became_invalid() -> None:
    a = wf("a", file="/etc/dataflare/workflows.d/a.yaml")
    issue = ConfigIssue("/etc/dataflare/workflows.d/a.yaml", 3, "sources", "broken")
    plan = plan_reload({"a": a}, [], [issue])
    assert plan.keep == ("a",) and plan.stop == () and plan.changes() == ["!a"]
    # Fixed with a change: restarted with the new config.
    plan = plan_reload({"a": a}, [wf("a", file=a.file, rate=9)], [])
    assert [w.name for w in plan.restart] == ["a"]
    # Fixed as before: nothing to do.
    assert plan_reload({"a": a}, [a], []).unchanged == (a,)
    # Removed while broken: the issue is gone with the file, so it stops.
    assert [w.name for w in plan_reload({"a": a}, [], []).stop] == ["a"]


def test_plan_workflow_renamed_within_its_file() -> None:
    plan = plan_reload({"a": wf("a", file="/x/a.yaml")}, [wf("a2", file="/x/a.yaml")], [])
    assert [w.name for w in plan.stop] == ["a"] and [w.name for w in plan.start] == ["a2"]


def test_settings_reloadable_and_needing_a_restart(tmp_path: Path) -> None:
    old = DaemonSettings(state_dir="/s1", socket="/r/1.sock", log_level="INFO")
    new = dataclasses.replace(
        old, state_dir="/s2", log_level="DEBUG", log_format="text", metrics_listen="[::1]:9"
    )
    effective, changes = merge_settings(old, new)
    assert effective.log_level == "DEBUG" and effective.log_format == "text"
    assert effective.state_dir == "/s1" and effective.metrics_listen is None
    assert effective.socket == "/r/1.sock"
    pending = {c.key for c in changes if not c.applied}
    assert pending == {"state_dir", "metrics_listen"}
    assert "needs a restart" in next(c for c in changes if c.key == "state_dir").describe()
    cfg = tmp_path / "dataflare.yaml"
    cfg.write_text("daemon:\n  log_level: DEBUG\n  state_dir: /s2\nworkflows_dir: .\n")
    issues = restart_issues(str(cfg), changes)
    by_key = {i.key: i for i in issues}
    assert by_key["daemon.state_dir"].line == 3
    assert "needs a restart" in by_key["daemon.state_dir"].message
    assert by_key["daemon.metrics_listen"].line == 1  # not written: whole-section line


@pytest.mark.parametrize(
    ("path", "relevant"),
    [
        ("/etc/dataflare/dataflare.yaml", True),
        ("/etc/dataflare/other.yaml", False),
        ("/etc/dataflare/workflows.d/a.yaml", True),
        ("/etc/dataflare/workflows.d/a.yml", True),
        ("/etc/dataflare/workflows.d/.a.yaml.swp", False),
        ("/etc/dataflare/workflows.d/.#a.yaml", False),
        ("/etc/dataflare/workflows.d/a.yaml~", False),
        ("/etc/dataflare/workflows.d/4913", False),
        ("/etc/dataflare/workflows.d/sub/a.yaml", False),
        ("/etc/dataflare/workflows.d", True),
        ("/etc/dataflare/state/data.mdb", False),
    ],
)
def test_watch_filter(path: str, relevant: bool) -> None:
    got = is_config_path(path, "/etc/dataflare/dataflare.yaml", "/etc/dataflare/workflows.d")
    assert got is relevant


def test_watcher_reports_an_atomic_save_once_debounced(tmp_path: Path) -> None:
    cfg = tmp_path / "dataflare.yaml"
    cfg.write_text("workflows_dir: wf\n")
    (tmp_path / "wf").mkdir()
    (tmp_path / "noise.log").write_text("")

    async def main() -> list[list[str]]:
        seen: list[list[str]] = []
        w = ConfigWatcher(str(cfg), str(tmp_path / "wf"), seen.append, step_ms=50)
        w.start()
        await asyncio.sleep(0.5)  # let inotify arm
        target = tmp_path / "wf" / "a.yaml"
        for i in range(20):  # an editor's save, 20 times in a row: temp file + rename
            tmp = tmp_path / "wf" / ".a.yaml.tmp"
            tmp.write_text(f"name: a{i}\n")
            os.replace(tmp, target)
            (tmp_path / "noise.log").write_text(f"{i}\n")  # not config: ignored
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        await w.close()
        return seen

    seen = asyncio.run(main())
    assert seen, "no change reported"
    assert all(p == [str(tmp_path / "wf" / "a.yaml")] for p in seen), seen
    assert len(seen) <= 3  # debounced, not one call per write


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setattr(sdnotify, "_captured", None)
    yield s
    s.close()


def test_sdnotify_sends_datagrams(notify_socket: socket.socket) -> None:
    assert sdnotify.ready("2 workflow(s)")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=2 workflow(s)"
    assert sdnotify.reloading()
    msg = notify_socket.recv(4096).decode().split("\n")
    assert msg[0] == "RELOADING=1" and msg[1].startswith("MONOTONIC_USEC=")
    assert abs(int(msg[1].split("=")[1]) - sdnotify.time.monotonic_ns() // 1000) < 5_000_000
    assert sdnotify.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_sdnotify_capture_hides_the_socket_from_children(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    sdnotify.capture_environment()
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert sdnotify.watchdog_interval() == pytest.approx(0.1)
    assert sdnotify.notify("WATCHDOG=1")
    assert notify_socket.recv(4096) == b"WATCHDOG=1"


def test_sdnotify_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setattr(sdnotify, "_captured", None)
    assert not sdnotify.notify("READY=1") and sdnotify.watchdog_interval() is None
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify.sock")
    assert not sdnotify.notify("READY=1")  # never raises
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert sdnotify.watchdog_interval() is None


class _SlotSource:
    dropped: list[tuple[Any, ...]] = []

    @classmethod
    def drop_slot(cls, name: str, config: Any, *, workflow: str) -> None:
        cls.dropped.append((name, config, workflow))


def test_drop_slot_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("dataflare_test_slot_source")
    mod.SlotSource = _SlotSource  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(
        SOURCE_TYPES, "slotty", ConnectorType(GenerateConfig, f"{mod.__name__}:SlotSource")
    )
    w = wf("shop orders", drop_slot_on_remove=True)
    w = dataclasses.replace(w, sources=(dataclasses.replace(w.sources[0], type="slotty"),))
    hooks = drop_slot_hook(w)
    assert [n for n, _ in hooks] == ["gen"]
    hooks[0][1]()
    assert _SlotSource.dropped == [("gen", w.sources[0].config, "shop orders")]
    assert drop_slot_hook(wf("plain")) == []  # generate has no hook


def test_watcher_follows_a_new_workflows_dir(tmp_path: Path) -> None:
    cfg = tmp_path / "dataflare.yaml"
    cfg.write_text("workflows_dir: one\n")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()

    async def main() -> list[list[str]]:
        seen: list[list[str]] = []
        w = ConfigWatcher(str(cfg), str(tmp_path / "one"), seen.append, step_ms=50)
        w.start()
        await asyncio.sleep(0.5)
        w.set_workflows_dir(str(tmp_path / "two"))
        await asyncio.sleep(0.8)  # re-armed on the new directory
        (tmp_path / "one" / "old.yaml").write_text("name: old\n")  # no longer watched
        (tmp_path / "two" / "new.yaml").write_text("name: new\n")
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        await w.close()
        return seen

    seen = asyncio.run(main())
    assert [p for paths in seen for p in paths] == [str(tmp_path / "two" / "new.yaml")]
