"""`dataflare-tui`: the live monitor. A client of the control socket only.

Data is fetched in a worker thread (the socket client blocks); the view only
renders the snapshots it is given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from dataflare.daemon.control_client import ControlClient, DaemonNotRunning, socket_path
from textual import work
from textual.app import App, ComposeResult
from textual.widgets import DataTable, Footer, Header, Static

COLUMNS = ("workflow", "state", "in", "out", "lag s", "errors", "position")


def workflow_rows(status: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for w in status.get("workflows", []):
        lag = max((s.get("lag_seconds") or 0.0 for s in w["sources"]), default=0.0)
        pos = ", ".join(f"{s['name']}@{s.get('position') or '-'}" for s in w["sources"])
        rows.append(
            (
                str(w["name"]),
                w["state"],
                str(w["records_in"]),
                str(w["records_out"]),
                f"{lag:.1f}",
                str(w["errors"]),
                pos,
            )
        )
    return rows


class DataflareApp(App[None]):
    TITLE = "DataFlare"
    BINDINGS = [("q", "quit", "Quit")]

    def __init__(self, socket: str, interval: float = 1.0) -> None:
        super().__init__()
        self.socket = socket
        self.interval = interval

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("connecting…", id="banner")
        yield DataTable(id="workflows", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*COLUMNS)
        self.follow()

    @work(thread=True, exclusive=True)
    def follow(self) -> None:
        import time

        while True:
            try:
                with ControlClient(self.socket) as client:
                    for st in client.subscribe(self.interval):
                        self.call_from_thread(self.show, st)
            except (DaemonNotRunning, OSError) as e:
                self.call_from_thread(self.show_error, str(e))
            time.sleep(self.interval)  # reconnect when the daemon comes back

    def show(self, status: dict[str, Any]) -> None:
        d = status["daemon"]
        self.query_one("#banner", Static).update(
            f"dataflare {d['version']} · up {d['uptime_s']:.0f}s · config generation "
            f"{d['config_generation']} · {len(d.get('config_errors', []))} config error(s)"
        )
        table = self.query_one(DataTable)
        table.clear()
        for row in workflow_rows(status):
            table.add_row(*row)

    def show_error(self, message: str) -> None:
        self.query_one("#banner", Static).update(f"[red]{message}[/red] — retrying")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dataflare-tui", description="DataFlare live monitor")
    p.add_argument("--socket")
    p.add_argument("--config")
    p.add_argument("--interval", type=float, default=1.0)
    args = p.parse_args(argv)
    DataflareApp(socket_path(args.socket, args.config), args.interval).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
