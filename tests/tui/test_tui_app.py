"""The TUI's behaviour: key bindings with Pilot (fixed data and a real daemon),
reconnection, and the import boundary (only the socket client and protocol)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dataflare.tui import views
from dataflare.tui.app import ConfirmScreen, DataflareApp, DetailScreen, History
from dataflare.tui.feed import FixedFeed
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from tests.e2e.daemon_harness import REPO, Daemon, write_config
from tests.tui.sample_status import snapshot, snapshots


def test_tui_imports_only_the_socket_client() -> None:
    code = (
        "import sys, json; import dataflare.tui.app; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('dataflare', "
        "'psycopg', 'lmdb', 'pymysql', 'pymysqlreplication', 'zstandard', 'watchfiles', "
        "'loguru', 'yaml')))))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    loaded = set(json.loads(r.stdout))
    for heavy in ("psycopg", "lmdb", "pymysqlreplication", "pymysql", "watchfiles", "loguru"):
        assert heavy not in loaded, loaded
    for internal in (
        "dataflare.daemon.supervisor",
        "dataflare.daemon.worker",
        "dataflare.daemon.state",
        "dataflare.daemon.config",
        "dataflare.daemon.control",
        "dataflare.cdc.model",
    ):
        assert internal not in loaded, loaded
    assert "dataflare.daemon.control_client" in loaded


def test_views_are_pure_functions_of_a_snapshot() -> None:
    st = snapshot(0)
    rows = views.overview_rows(st)
    assert [name for name, _ in rows] == [
        "orders-replica",
        "audit-archive",
        "legacy-import",
        "snapshot-users",
    ]
    assert len(rows[0][1]) == len(views.COMPACT_COLUMNS)
    assert len(views.overview_rows(st, wide=True)[0][1]) == len(views.WIDE_COLUMNS)
    assert rows[2][1][1].style == views.STATE_STYLES["retrying"]
    assert views.rate(2949.3) == "2949" and views.rate(12.34) == "12.3"
    assert views.rate(123_456) == "123k" and views.size(33_554_432) == "32.0 MiB"
    assert views.snapshot_text({"rows_done": 1, "rows_total": 4, "table": "t"}) == (
        "1/4 rows (25%) t"
    )
    h = History(size=5)
    for i in range(7):
        h.add(snapshot(i))
    assert len(h.total_out) == 5 and h.points == 7
    assert h.workflow("audit-archive") == [0.0] * 5
    assert h.workflow("orders-replica")[-1] == snapshot(6)["workflows"][0]["rate_out"]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def wait_until(
    pilot: Pilot[None], cond: Callable[[], bool], timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


def test_keys_with_fixed_data() -> None:
    feed = FixedFeed(snapshots(10))

    async def scenario() -> None:
        app = DataflareApp(feed=feed)
        async with app.run_test(size=(80, 24)) as pilot:
            table = app.query_one("#workflows", DataTable)
            assert table.row_count == 4
            assert app.selected_workflow() == "orders-replica"
            # p asks first; n cancels
            await pilot.press("p")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")
            assert not isinstance(app.screen, ConfirmScreen)
            assert feed.commands == []
            # p then y pauses the selected workflow
            await pilot.press("p", "y")
            await wait_until(pilot, lambda: len(feed.commands) == 1, 5, "pause sent")
            assert feed.commands[-1] == ("pause", {"workflow": "orders-replica"})
            # move down and restart (R), resume (r)
            await pilot.press("down", "R", "y")
            await wait_until(pilot, lambda: len(feed.commands) == 2, 5, "restart sent")
            assert feed.commands[-1] == ("restart", {"workflow": "audit-archive"})
            await pilot.press("r", "y")
            await wait_until(pilot, lambda: len(feed.commands) == 3, 5, "resume sent")
            assert feed.commands[-1] == ("resume", {"workflow": "audit-archive"})
            # l reloads (with confirmation; escape cancels)
            await pilot.press("l", "escape")
            assert len(feed.commands) == 3
            await pilot.press("l", "y")
            await wait_until(pilot, lambda: len(feed.commands) == 4, 5, "reload sent")
            assert feed.commands[-1] == ("reload", {})
            # enter opens the details, keys act on that workflow, escape goes back
            await pilot.press("enter")
            assert isinstance(app.screen, DetailScreen)
            assert app.screen.workflow == "audit-archive"
            await pilot.press("p", "y")
            await wait_until(pilot, lambda: len(feed.commands) == 5, 5, "pause from details")
            assert feed.commands[-1] == ("pause", {"workflow": "audit-archive"})
            await pilot.press("escape")
            assert not isinstance(app.screen, DetailScreen)
            await pilot.press("q")
        assert app.return_code == 0

    run(scenario())


def test_resizes_between_compact_and_wide() -> None:
    async def scenario() -> None:
        app = DataflareApp(feed=FixedFeed(snapshots(3)))
        async with app.run_test(size=(80, 24)) as pilot:
            table = app.query_one("#workflows", DataTable)
            assert len(table.columns) == len(views.COMPACT_COLUMNS)
            await pilot.resize_terminal(160, 50)
            await pilot.pause()
            assert len(table.columns) == len(views.WIDE_COLUMNS)
            assert table.row_count == 4

    run(scenario())


@pytest.mark.e2e
def test_against_a_real_daemon_reconnects_and_pauses(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    cfg = write_config(
        tmp_path,
        {
            "gen": {
                "sources": {"gen": {"type": "generate", "config": {"rate": 300}}},
                "destinations": {
                    "out": {"type": "file", "inputs": ["gen"], "config": {"path": str(out)}}
                },
            }
        },
    )
    d = Daemon(cfg)

    def banner(app: DataflareApp) -> str:
        return str(app.query_one("#banner", Static).render())

    async def scenario() -> None:
        app = DataflareApp(d.socket, interval=0.3)
        async with app.run_test(size=(80, 24)) as pilot:
            # no daemon yet: says so and keeps trying
            await wait_until(pilot, lambda: "daemon not running" in banner(app), 10, "down banner")
            await asyncio.to_thread(d.start)
            await wait_until(pilot, lambda: app.connected, 15, "connected")
            await wait_until(
                pilot,
                lambda: (
                    app.last_status is not None
                    and app.last_status["workflows"][0]["state"] == "streaming"
                ),
                20,
                "streaming",
            )
            assert "dataflare 0.1.0" in banner(app)
            # pause through the TUI: the real daemon's workflow is paused
            await pilot.press("p", "y")
            await wait_until(
                pilot,
                lambda: (
                    app.last_status is not None
                    and app.last_status["workflows"][0]["state"] == "paused"
                ),
                30,
                "paused shown",
            )
            assert (await asyncio.to_thread(d.workflow, "gen"))["state"] == "paused"
            await pilot.press("r", "y")
            await wait_until(
                pilot,
                lambda: (
                    app.last_status is not None
                    and app.last_status["workflows"][0]["state"] == "streaming"
                ),
                30,
                "streaming again",
            )
            # the chart moves
            await wait_until(pilot, lambda: max(app.history.total_out) > 100, 15, "throughput")
            # the daemon restarts: the app notices and reconnects by itself
            await asyncio.to_thread(d.stop)
            await wait_until(pilot, lambda: not app.connected, 15, "disconnected")
            assert "daemon not running" in banner(app)
            d2 = Daemon(cfg)
            await asyncio.to_thread(d2.start)
            try:
                await wait_until(pilot, lambda: app.connected, 15, "reconnected")
            finally:
                await asyncio.to_thread(d2.stop)
            await pilot.press("q")

    try:
        run(scenario())
    finally:
        d.stop()
