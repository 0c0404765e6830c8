"""Pure functions from a status snapshot to what the TUI shows (no I/O, no widgets).

pg_activity's split: the data layer fetches snapshots, these turn them into rows
and text, the widgets only display what they are given.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dataflare.daemon.status_model import human_duration
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.renderables.sparkline import Sparkline

STATE_STYLES: dict[str, str] = {
    "streaming": "bold green",
    "snapshotting": "bold cyan",
    "starting": "yellow",
    "paused": "bold magenta",
    "retrying": "bold dark_orange",
    "failed": "bold white on red",
    "stopped": "dim",
}

OPS = (("c", "insert"), ("u", "update"), ("d", "delete"), ("r", "snapshot"), ("t", "truncate"))


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def state_cell(w: dict[str, Any]) -> Text:
    """The state, with the snapshot's progress while snapshotting."""
    t = state_text(w["state"])
    if w["state"] == "snapshotting":
        for s in w.get("sources", []):
            snap = s.get("snapshot")
            if isinstance(snap, dict):
                done, total = snap.get("rows_done"), snap.get("rows_total")
                if isinstance(done, int) and isinstance(total, int) and total > 0:
                    t.append(f" {done / total:.0%}", style="cyan")
                    break
    return t


def rate(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    if v >= 100_000:
        return f"{v / 1000:.0f}k"
    if v >= 10_000:
        return f"{v / 1000:.1f}k"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def count(v: Any) -> str:
    if not isinstance(v, int):
        return "-"
    if v >= 10_000_000:
        return f"{v / 1_000_000:.1f}M"
    return str(v)


def seconds(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.1f}s" if v < 100 else human_duration(v)


def size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} TiB"  # pragma: no cover


def percent(v: Any) -> str:
    return f"{v:.0%}" if isinstance(v, (int, float)) else "-"


def lag_seconds(w: dict[str, Any]) -> float | None:
    vals = [s["lag_seconds"] for s in w.get("sources", []) if s.get("lag_seconds") is not None]
    return max(vals) if vals else None


def ring_fill(w: dict[str, Any]) -> float | None:
    vals = [s["ring_fill"] for s in w.get("sources", []) if s.get("ring_fill") is not None]
    return max(vals) if vals else None


def banner(status: dict[str, Any]) -> Text:
    d = status["daemon"]
    wfs = status.get("workflows", [])
    t = Text()
    t.append(f"dataflare {d['version']}", style="bold")
    t.append(f" · up {human_duration(d['uptime_s'])} · config gen {d['config_generation']}")
    errors = d.get("config_errors") or []
    if errors:
        t.append(f" · {len(errors)} config error(s)", style="bold red")
    t.append(f" · {len(wfs)} workflow(s)")
    return t


def down_banner(message: str, dropped: bool = False) -> Text:
    head = "disconnected — reconnecting" if dropped else "daemon not running — retrying"
    t = Text(head, style="bold white on red")
    if message:
        t.append(f"  ({message})", style="red")
    return t


COMPACT_COLUMNS = ("WORKFLOW", "STATE", "IN/s", "OUT/s", "LAG", "RING", "ERR")
WIDE_COLUMNS = (*COMPACT_COLUMNS, "RECORDS OUT", "RESTARTS", "POSITION", "LAST ERROR")


def overview_rows(status: dict[str, Any], wide: bool = False) -> list[tuple[str, list[Any]]]:
    """(workflow name, cells) per workflow, for the overview table."""
    rows: list[tuple[str, list[Any]]] = []
    for w in status.get("workflows", []):
        errs = int(w.get("errors", 0))
        cells: list[Any] = [
            Text(str(w["name"]), style="bold"),
            state_cell(w),
            Text(rate(w.get("rate_in")), justify="right"),
            Text(rate(w.get("rate_out")), justify="right"),
            Text(seconds(lag_seconds(w)), justify="right"),
            Text(percent(ring_fill(w)), justify="right"),
            Text(str(errs), justify="right", style="bold red" if errs else ""),
        ]
        if wide:
            pos = ", ".join(f"{s['name']}@{s.get('position') or '-'}" for s in w["sources"])
            cells += [
                Text(count(w.get("records_out")), justify="right"),
                Text(str(w.get("restarts", 0)), justify="right"),
                Text(pos),
                Text(_one_line(w.get("last_error") or "", 40), style="red"),
            ]
        rows.append((str(w["name"]), cells))
    return rows


def _one_line(s: str, limit: int = 60) -> str:
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def chart_title(label: str, history: Sequence[float]) -> str:
    now = history[-1] if history else 0.0
    top = max(history) if history else 0.0
    return f"{label} · now {rate(now)}/s · max {rate(top)}/s"


def find_workflow(status: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    if status is None:
        return None
    return next((w for w in status.get("workflows", []) if w["name"] == name), None)


def detail_summary(w: dict[str, Any]) -> Text:
    t = Text()
    t.append(f"{w['name']}  ", style="bold")
    t.append_text(state_text(w["state"]))
    reason = w.get("state_reason")
    if reason:
        t.append(f"  {_one_line(str(reason), 100)}", style="red" if w["state"] == "failed" else "")
    if w.get("description"):
        t.append(f"\n{w['description']}", style="italic")
    t.append(
        f"\nin {count(w.get('records_in'))} ({rate(w.get('rate_in'))}/s) · "
        f"out {count(w.get('records_out'))} ({rate(w.get('rate_out'))}/s) · "
        f"batches {count(w.get('batches'))} · errors {w.get('errors', 0)} · "
        f"dead letters {w.get('dead_letters', 0)} · restarts {w.get('restarts', 0)}"
    )
    if w.get("last_error"):
        t.append(f"\nlast error: {_one_line(str(w['last_error']), 200)}", style="red")
    return t


ENDPOINT_COLUMNS = ("", "NAME", "TYPE", "POSITION", "RATE", "LAG", "RING / SNAPSHOT")


def endpoint_rows(w: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for s in w.get("sources", []):
        snap = snapshot_text(s.get("snapshot"))
        ring = f"{percent(s.get('ring_fill'))} of {size(s.get('ring_capacity'))}"
        rows.append(
            [
                "source",
                s["name"],
                s.get("type", "?"),
                str(s.get("position") or "-"),
                f"{rate(s.get('rate_in'))}/s",
                f"{seconds(s.get('lag_seconds'))} {size(s.get('lag_bytes'))}",
                f"snapshot {snap}" if snap else ring,
            ]
        )
    for name, t in (w.get("transformations") or {}).items():
        refused = int(t.get("rejected", 0))
        rows.append(
            [
                "transform",
                name,
                "",
                "",
                "",
                "",
                f"{count(t.get('records_in'))} in, {count(t.get('records_out'))} out"
                + (f", {count(refused)} refused" if refused else ""),
            ]
        )
    for d in w.get("destinations", []):
        notes = ""
        if d.get("circuit") not in (None, "closed"):
            notes += f", circuit {d['circuit']}"
        if int(d.get("rejected", 0)):
            notes += f", {count(d.get('rejected'))} refused"
        rows.append(
            [
                "dest",
                d["name"],
                d.get("type", "?"),
                str(d.get("position") or "-"),
                f"{rate(d.get('rate_out'))}/s",
                "",
                f"{count(d.get('records_written'))} written{notes}",
            ]
        )
    return rows


def snapshot_text(snap: Any) -> str:
    if not snap:
        return ""
    if isinstance(snap, dict):
        done, total = snap.get("rows_done"), snap.get("rows_total")
        if isinstance(done, int) and isinstance(total, int) and total > 0:
            table = f" {snap['table']}" if snap.get("table") else ""
            return f"{done}/{total} rows ({done / total:.0%}){table}"
        return ", ".join(f"{k}={v}" for k, v in snap.items())
    return str(snap)


TABLE_COLUMNS = ("TABLE", "INSERT", "UPDATE", "DELETE", "SNAPSHOT", "TOTAL")


def table_rows(w: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for table, ops in sorted((w.get("tables") or {}).items()):
        vals = [int(ops.get(op, 0)) for op in ("c", "u", "d", "r")]
        total = sum(int(v) for v in ops.values())
        rows.append([table, *(Text(count(v), justify="right") for v in (*vals, total))])
    return rows


def clock(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.localtime(ts))


LEVEL_STYLES = {"ERROR": "bold red", "WARNING": "yellow", "INFO": "", "DEBUG": "dim"}


def errors_text(w: dict[str, Any], limit: int = 10) -> Text:
    errs = (w.get("recent_errors") or [])[-limit:]
    if not errs:
        return Text("no errors", style="dim")
    t = Text()
    for i, e in enumerate(reversed(errs)):
        if i:
            t.append("\n")
        t.append(clock(e.get("ts")), style="dim")
        t.append(f" {e.get('component', '?')}: ", style="bold")
        t.append(str(e.get("message", "")), style="red")
    return t


def log_text(w: dict[str, Any], limit: int = 30) -> Text:
    lines = (w.get("log") or [])[-limit:]
    if not lines:
        return Text("(empty)", style="dim")
    t = Text()
    for i, e in enumerate(lines):
        if i:
            t.append("\n")
        level = str(e.get("level", "INFO"))
        t.append(clock(e.get("ts")), style="dim")
        t.append(f" {level:<7}", style=LEVEL_STYLES.get(level, ""))
        t.append(f" {e.get('component', '?')}: {e.get('message', '')}")
    return t


def per_workflow_charts(
    history: Mapping[str, Iterable[float]], status: dict[str, Any] | None, width: int
) -> RenderableType:
    """One sparkline of rows/s out per workflow (wide terminals), each scaled to its max."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=16, no_wrap=True)
    grid.add_column(width=width, no_wrap=True)
    grid.add_column(width=9, justify="right", no_wrap=True)
    for w in (status or {}).get("workflows", []):
        data = list(history.get(w["name"], []))
        now = data[-1] if data else 0.0
        name = Text(_one_line(str(w["name"]), 16), style=STATE_STYLES.get(w["state"], ""))
        spark = Sparkline(data or [0.0], width=width, summary_function=max)
        grid.add_row(name, spark, f"{rate(now)}/s")
    return Group(Text("rows/s out per workflow (each to its own scale)", style="dim"), grid)
