"""`dataflare-tui`: the live monitor. A client of the control socket only.

Status snapshots are fetched in a worker thread (the socket client blocks) and
handed to the widgets with ``call_from_thread``; views never do I/O (dolphie's
split). Keys: Enter details, p/r/R pause/resume/restart the selected workflow,
l reload the configuration (each with a confirmation), Esc back, q quit. When the
daemon goes away the app says so and reconnects by itself.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from dataflare.daemon.control_client import (
    DaemonNotRunning,
    Dropped,
    RequestFailed,
    socket_path,
)
from dataflare.daemon.control_protocol import ProtocolError
from dataflare.tui import views
from dataflare.tui.feed import Feed, FixedFeed, SocketFeed
from textual import events, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Header, Label, Sparkline, Static

HISTORY = 300  # points of throughput history (5 minutes at the default 1 s interval)
WIDE_AT = 120  # columns from which the overview shows more columns

ACTIONS = {
    "pause": "Pause",
    "resume": "Resume",
    "restart": "Restart",
}


class History:
    """Throughput history per workflow and in total, one point per snapshot."""

    def __init__(self, size: int = HISTORY) -> None:
        self.size = size
        self.total_in: deque[float] = deque([0.0] * size, maxlen=size)
        self.total_out: deque[float] = deque([0.0] * size, maxlen=size)
        self.per_out: dict[str, deque[float]] = {}
        self.points = 0

    def add(self, status: dict[str, Any]) -> None:
        wfs = status.get("workflows", [])
        self.total_in.append(sum(float(w.get("rate_in") or 0.0) for w in wfs))
        self.total_out.append(sum(float(w.get("rate_out") or 0.0) for w in wfs))
        seen = set()
        for w in wfs:
            seen.add(w["name"])
            d = self.per_out.setdefault(w["name"], deque([0.0] * self.size, maxlen=self.size))
            d.append(float(w.get("rate_out") or 0.0))
        for name in list(self.per_out):
            if name not in seen:
                del self.per_out[name]
        self.points += 1

    def workflow(self, name: str) -> list[float]:
        return list(self.per_out.get(name, [0.0] * self.size))


class WorkflowTable(DataTable[Any]):
    """The overview table; Enter opens the selected workflow's details."""

    BINDINGS = [Binding("enter", "select_cursor", "Details")]


class ConfirmScreen(ModalScreen[bool]):
    """Yes/no before anything that changes the daemon's state."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "Cancel"),
    ]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Grid {
        grid-size: 2; grid-gutter: 1 2; grid-rows: auto 3;
        padding: 1 2; width: 60; max-width: 90%; height: auto;
        border: thick $warning; background: $surface;
    }
    ConfirmScreen #question { column-span: 2; width: 100%; content-align: center middle; }
    ConfirmScreen Button { width: 100%; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Grid():
            yield Label(self.question, id="question")
            yield Button("Yes (y)", variant="warning", id="yes")
            yield Button("No (n)", variant="primary", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class DetailScreen(Screen[None]):
    """One workflow: endpoints, per-table counters, errors, log tail."""

    BINDINGS = [
        Binding("escape,backspace", "app.pop_screen", "Back"),
        Binding("p", "app.command('pause')", "Pause"),
        Binding("r", "app.command('resume')", "Resume"),
        Binding("R", "app.command('restart')", "Restart"),
        Binding("l", "app.reload", "Reload"),
        Binding("q", "app.quit", "Quit"),
    ]
    DEFAULT_CSS = """
    DetailScreen #summary { padding: 0 1; height: auto; }
    DetailScreen .title {
        padding: 0 1; color: $accent; text-style: bold; height: 1; margin-top: 1;
    }
    DetailScreen #wf-spark { height: 3; margin: 0 1; }
    DetailScreen DataTable { height: auto; max-height: 12; margin: 0 1; }
    DetailScreen #errors, DetailScreen #log { padding: 0 1; height: auto; }
    """

    def __init__(self, workflow: str) -> None:
        super().__init__()
        self.workflow = workflow

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="detail"):
            yield Static(id="summary")
            yield Label("throughput out (rows/s)", id="wf-spark-title", classes="title")
            yield Sparkline([], id="wf-spark", summary_function=max)
            yield Label("sources and destinations", classes="title")
            yield DataTable(id="endpoints", cursor_type="none", zebra_stripes=True)
            yield Label("tables (changes read)", classes="title")
            yield DataTable(id="tables", cursor_type="none", zebra_stripes=True)
            yield Label("recent errors", classes="title")
            yield Static(id="errors")
            yield Label("log", classes="title")
            yield Static(id="log")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#endpoints", DataTable).add_columns(*views.ENDPOINT_COLUMNS)
        self.query_one("#tables", DataTable).add_columns(*views.TABLE_COLUMNS)
        for table in self.query(DataTable):
            table.can_focus = False  # arrows and page keys scroll the whole screen
        self.query_one("#detail", VerticalScroll).focus()
        app = self.app
        if isinstance(app, DataflareApp):
            self.update_status(app.last_status, app.history)

    def update_status(self, status: dict[str, Any] | None, history: History) -> None:
        w = views.find_workflow(status, self.workflow)
        summary = self.query_one("#summary", Static)
        if w is None:
            summary.update(f"{self.workflow}: no such workflow (removed?)")
            return
        summary.update(views.detail_summary(w))
        data = history.workflow(self.workflow)
        self.query_one("#wf-spark", Sparkline).data = data
        self.query_one("#wf-spark-title", Label).update(
            views.chart_title("throughput out", data[-HISTORY:])
        )
        endpoints = self.query_one("#endpoints", DataTable)
        endpoints.clear()
        for row in views.endpoint_rows(w):
            endpoints.add_row(*row)
        tables = self.query_one("#tables", DataTable)
        tables.clear()
        for row in views.table_rows(w):
            tables.add_row(*row)
        self.query_one("#errors", Static).update(views.errors_text(w))
        self.query_one("#log", Static).update(views.log_text(w))


class DataflareApp(App[None]):
    TITLE = "DataFlare"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("p", "command('pause')", "Pause"),
        Binding("r", "command('resume')", "Resume"),
        Binding("R", "command('restart')", "Restart"),
        Binding("l", "reload", "Reload"),
    ]
    CSS = """
    #banner { height: 1; padding: 0 1; }
    #workflows { height: auto; max-height: 60%; min-height: 4; }
    #charts { height: 1fr; min-height: 6; }
    .chart-title { height: 1; padding: 0 1; color: $text-muted; }
    #charts Sparkline { height: 1fr; margin: 0 1; }
    #per-workflow {
        display: none; width: 1fr; height: 100%; padding: 0 1; border-left: solid $primary;
    }
    #charts.wide #per-workflow { display: block; }
    #spark-in > .sparkline--max-color { color: $accent; }
    #spark-in > .sparkline--min-color { color: $accent 30%; }
    """

    def __init__(
        self,
        socket: str | None = None,
        interval: float = 1.0,
        feed: Feed | None = None,
    ) -> None:
        super().__init__()
        if feed is None:
            if socket is None:
                raise ValueError("a socket path or a feed is needed")
            feed = SocketFeed(socket)
        self.feed = feed
        self.interval = interval
        self.history = History()
        self.last_status: dict[str, Any] | None = None
        self.connected = False
        self.wide = False
        self._stop = threading.Event()
        self.sub_title = socket or "fixed snapshot"

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("connecting…", id="banner")
        yield WorkflowTable(id="workflows", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="charts"):
            with Vertical(id="totals"):
                yield Label("rows/s in", id="spark-in-title", classes="chart-title")
                yield Sparkline(list(self.history.total_in), id="spark-in", summary_function=max)
                yield Label("rows/s out", id="spark-out-title", classes="chart-title")
                yield Sparkline(list(self.history.total_out), id="spark-out", summary_function=max)
            yield Static(id="per-workflow")
        yield Footer()

    def on_mount(self) -> None:
        self.wide = self.size.width >= WIDE_AT
        self._set_columns()
        if self.feed.live:
            self.follow()
        else:  # fixed snapshots: shown at once, no thread (deterministic screenshots)
            for st in self.feed.follow(self.interval):
                self.show(st)

    def on_resize(self, event: events.Resize) -> None:
        wide = event.size.width >= WIDE_AT
        if wide != self.wide:
            self.wide = wide
            self._set_columns()
            if self.last_status is not None:
                self._fill_table(self.last_status)
        if self.last_status is not None:
            self.call_after_refresh(self._fill_charts)  # the per-workflow panel's width

    def _set_columns(self) -> None:
        self.query_one("#charts").set_class(self.wide, "wide")
        table = self.query_one("#workflows", DataTable)
        table.clear(columns=True)
        for name in views.WIDE_COLUMNS if self.wide else views.COMPACT_COLUMNS:
            table.add_column(name, key=name)

    def on_unmount(self) -> None:
        self._stop.set()
        self.feed.close()

    # ------------------------------------------------------------------ data (thread)

    @work(thread=True, exclusive=True, group="follow")
    def follow(self) -> None:
        while not self._stop.is_set():
            try:
                for st in self.feed.follow(self.interval):
                    if self._stop.is_set():
                        return
                    self._post(self.show, st)
            except Dropped as e:  # too slow (a very busy terminal): reconnect
                self._post(self.show_down, str(e), True)
            except (DaemonNotRunning, RequestFailed, ProtocolError, OSError) as e:
                if self._stop.is_set():
                    return
                self._post(self.show_down, str(e))
            else:
                if self._stop.is_set():
                    return
                self._post(self.show_down, "connection closed")
            self._stop.wait(self.interval)  # then reconnect

    def _post(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            self.call_from_thread(fn, *args, **kwargs)
        except RuntimeError:  # the app is shutting down
            self._stop.set()

    @work(thread=True, group="commands")
    def run_command(self, cmd: str, args: dict[str, Any]) -> None:
        try:
            res = self.feed.command(cmd, **args)
        except (DaemonNotRunning, RequestFailed, ProtocolError, OSError) as e:
            self._post(self.notify, f"{cmd} failed: {e}", severity="error", timeout=8)
            return
        if cmd == "reload":
            if res.get("applied"):
                changes = " ".join(res.get("changes") or []) or "no workflow changed"
                msg = f"configuration generation {res.get('generation')} applied: {changes}"
                self._post(self.notify, msg)
            else:
                errors = "\n".join(res.get("errors") or [])
                self._post(
                    self.notify, f"configuration rejected:\n{errors}", severity="error", timeout=10
                )
        else:
            self._post(self.notify, f"{res.get('name')}: {res.get('state')}")

    # ------------------------------------------------------------------ view

    def show(self, status: dict[str, Any]) -> None:
        self.connected = True
        self.last_status = status
        self.history.add(status)
        self.query_one("#banner", Static).update(views.banner(status))
        self._fill_table(status)
        self._fill_charts()
        if isinstance(self.screen, DetailScreen):
            self.screen.update_status(status, self.history)

    def show_down(self, message: str, dropped: bool = False) -> None:
        self.connected = False
        text = views.down_banner(message, dropped)
        self.query_one("#banner", Static).update(text)
        if isinstance(self.screen, DetailScreen):
            self.screen.query_one("#summary", Static).update(text)

    def _fill_table(self, status: dict[str, Any]) -> None:
        table = self.query_one("#workflows", DataTable)
        selected = self.selected_workflow()
        table.clear()
        rows = views.overview_rows(status, wide=self.wide)
        for key, cells in rows:
            table.add_row(*cells, key=key)
        names = [k for k, _ in rows]
        if selected in names:
            table.move_cursor(row=names.index(selected), animate=False)

    def _fill_charts(self) -> None:
        spark_in = list(self.history.total_in)
        spark_out = list(self.history.total_out)
        self.query_one("#spark-in", Sparkline).data = spark_in
        self.query_one("#spark-out", Sparkline).data = spark_out
        minutes = max(1, round(HISTORY * self.interval / 60))
        self.query_one("#spark-in-title", Label).update(
            views.chart_title(f"rows/s in, last {minutes} min", spark_in)
        )
        self.query_one("#spark-out-title", Label).update(
            views.chart_title(f"rows/s out, last {minutes} min", spark_out)
        )
        if self.wide:
            panel = self.query_one("#per-workflow", Static)
            width = max(10, panel.size.width - 30) if panel.size.width else 40
            panel.update(views.per_workflow_charts(self.history.per_out, self.last_status, width))

    def selected_workflow(self) -> str | None:
        if isinstance(self.screen, DetailScreen):
            return self.screen.workflow
        table = self.query_one("#workflows", DataTable)
        if table.row_count == 0:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        except Exception:
            return None
        return None if key.value is None else str(key.value)

    # ------------------------------------------------------------------ actions

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "workflows" and event.row_key.value is not None:
            self.push_screen(DetailScreen(str(event.row_key.value)))

    def action_command(self, cmd: str) -> None:
        name = self.selected_workflow()
        if name is None:
            self.notify("no workflow selected", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_command(cmd, {"workflow": name})

        self.push_screen(ConfirmScreen(f"{ACTIONS[cmd]} workflow {name}?"), answered)

    def action_reload(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.run_command("reload", {})

        self.push_screen(ConfirmScreen("Reload the daemon's configuration?"), answered)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dataflare-tui", description="DataFlare live monitor")
    p.add_argument("--socket", help="control socket (default $DATAFLARE_SOCKET or daemon.socket)")
    p.add_argument("--config", help="daemon config file, to find the socket")
    p.add_argument("--interval", type=float, default=1.0, help="refresh interval in seconds")
    args = p.parse_args(argv)
    DataflareApp(socket_path(args.socket, args.config), args.interval).run()
    return 0


__all__ = ["DataflareApp", "FixedFeed", "History", "main"]

if __name__ == "__main__":
    sys.exit(main())
