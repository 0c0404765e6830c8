"""Screenshots of the main screens from fixed status snapshots (deterministic).

Update with: pytest tests/tui/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

from typing import Any

from dataflare.tui.app import DataflareApp
from dataflare.tui.feed import FixedFeed
from textual.pilot import Pilot

from tests.tui.sample_status import snapshots


def make_app() -> DataflareApp:
    return DataflareApp(feed=FixedFeed(snapshots()))


def test_overview_80x24(snap_compare: Any) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 24))


def test_overview_wide(snap_compare: Any) -> None:
    assert snap_compare(make_app(), terminal_size=(140, 40))


def test_detail_80x24(snap_compare: Any) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 24), press=["down", "down", "enter"])


def test_detail_wide(snap_compare: Any) -> None:
    assert snap_compare(make_app(), terminal_size=(140, 48), press=["down", "down", "enter"])


def test_confirm_pause(snap_compare: Any) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 24), press=["p"])


def test_daemon_down(snap_compare: Any) -> None:
    async def go_down(pilot: Pilot[None]) -> None:
        app = pilot.app
        assert isinstance(app, DataflareApp)
        app.show_down("no daemon listening on /run/dataflare/dataflare.sock")
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=go_down)
