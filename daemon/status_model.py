"""What the supervisor derives from its workers' status lines for the status model.

Workers report cumulative counters once a second; rates (records/s) are computed
here over a sliding window, and the supervisor keeps the last errors and a short
log tail per workflow (from the workers' state and error messages, never by
parsing their stderr). Stdlib only: cheap to import anywhere.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

RATE_WINDOW_S = 10.0  # rows/s are averaged over this many seconds
STALE_AFTER_S = 3.0  # no counter sample for this long: the rate is 0 (paused, stopped)
MIN_SPAN_S = 1.0  # samples closer than this give no rate yet (no start-up spikes)
RECENT_ERRORS = 20
LOG_TAIL = 50


class RateWindow:
    """Per-second rates of monotonic counters over a sliding window."""

    def __init__(
        self,
        window: float = RATE_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.clock = clock
        self._samples: deque[tuple[float, dict[str, int]]] = deque()

    def sample(self, counters: Mapping[str, int]) -> None:
        now = self.clock()
        self._samples.append((now, dict(counters)))
        # keep one sample at or before the window's start so the rate covers it all
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def rate(self, key: str) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        if self.clock() - t1 > STALE_AFTER_S or t1 - t0 < MIN_SPAN_S:
            return 0.0
        delta = c1.get(key, 0) - c0.get(key, 0)
        return max(0.0, delta / (t1 - t0))

    def reset(self) -> None:
        self._samples.clear()


class WorkflowObserver:
    """Rates, recent errors and a log tail of one workflow, kept by the supervisor."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.rates = RateWindow()
        self.recent_errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_TAIL)
        self._last_state: str | None = None
        self._last_restarts = 0
        self._last_error: str | None = None

    def note(self, level: str, component: str, message: str) -> None:
        self.log.append(
            {
                "ts": round(self.clock(), 3),
                "level": level,
                "component": component,
                "message": message,
            }
        )

    def error(self, component: str, message: str, fatal: bool = False) -> None:
        entry = {
            "ts": round(self.clock(), 3),
            "component": component,
            "message": message,
            "fatal": fatal,
        }
        self.recent_errors.append(entry)
        self.note("ERROR" if fatal else "WARNING", component, message)

    def observe(self, state: str, restarts: int, last_error: str | None) -> None:
        """Turn changes seen between two status calls into log lines and errors."""
        if (
            last_error
            and last_error != self._last_error
            and not any(e["message"] == last_error for e in list(self.recent_errors)[-3:])
        ):
            self.error("supervisor", last_error)
        self._last_error = last_error
        if restarts > self._last_restarts:
            self.note("WARNING", "supervisor", f"restart #{restarts}: {last_error or '?'}")
        self._last_restarts = restarts
        if state != self._last_state:
            if self._last_state is not None:
                self.note("INFO", "supervisor", f"state {self._last_state} -> {state}")
            else:
                self.note("INFO", "supervisor", f"state {state}")
            self._last_state = state


def ring_fill(used: Any, capacity: Any) -> float | None:
    """Fraction of a ring in use (0..1), or None when not reported yet."""
    if not isinstance(used, int) or not isinstance(capacity, int) or capacity <= 0:
        return None
    return round(used / capacity, 4)


def merge_table_counts(
    into: dict[str, dict[str, int]], tables: Mapping[str, Mapping[str, int]]
) -> dict[str, dict[str, int]]:
    """Add per-table per-op counts (``{table: {op: n}}``) into ``into``."""
    for table, ops in tables.items():
        row = into.setdefault(table, {})
        for op, n in ops.items():
            row[op] = row.get(op, 0) + int(n)
    return into


def human_duration(seconds: float | None) -> str:
    """45s, 3m07s, 2h05m, 1d03h: uptimes and lags for people (CLI and TUI)."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
