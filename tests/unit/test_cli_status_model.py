"""Pure parts behind `dataflare status` and the metrics: rates, observer, exposition,
the peer-credential decision."""

from __future__ import annotations

import re

from dataflare.daemon.control import may_change_state
from dataflare.daemon.metrics import escape_label, parse_listen, render_metrics
from dataflare.daemon.status_model import RateWindow, WorkflowObserver, ring_fill

from tests.tui.sample_status import snapshot


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rate_window_over_sliding_window() -> None:
    clock = Clock()
    w = RateWindow(window=10, clock=clock)
    assert w.rate("in") == 0.0
    for i in range(30):  # 100 rows/s for 30 s
        w.sample({"in": 100 * i})
        clock.t += 1
    clock.t -= 1
    assert w.rate("in") == 100.0
    for i in range(30, 40):  # then 300 rows/s: after a full window the rate is 300
        clock.t += 1
        w.sample({"in": 2900 + 300 * (i - 29)})
    assert w.rate("in") == 300.0
    clock.t += 5  # no sample for 5 s: paused or stopped, the rate is 0
    assert w.rate("in") == 0.0
    assert w.rate("unknown") == 0.0


def test_rate_window_needs_a_second_of_samples() -> None:
    clock = Clock()
    w = RateWindow(window=10, clock=clock)
    w.sample({"in": 0})
    clock.t += 0.05
    w.sample({"in": 100})  # 2000/s over 50 ms would be a start-up spike
    assert w.rate("in") == 0.0
    clock.t += 1
    w.sample({"in": 200})
    assert round(w.rate("in")) == 190


def test_rate_window_never_negative() -> None:
    clock = Clock()
    w = RateWindow(window=10, clock=clock)
    w.sample({"in": 500})
    clock.t += 2
    w.sample({"in": 10})  # a counter reset (per-source counter after a restart)
    assert w.rate("in") == 0.0


def test_observer_logs_state_changes_restarts_and_errors() -> None:
    clock = Clock()
    obs = WorkflowObserver(clock=clock)
    obs.observe("starting", 0, None)
    obs.observe("streaming", 0, None)
    obs.error("apply", "boom", fatal=False)
    obs.observe("retrying", 1, "boom")  # same message as the worker's: not twice
    obs.observe("streaming", 1, "boom")
    messages = [e["message"] for e in obs.log]
    assert messages == [
        "state starting",
        "state starting -> streaming",
        "boom",
        "restart #1: boom",
        "state streaming -> retrying",
        "state retrying -> streaming",
    ]
    assert [e["message"] for e in obs.recent_errors] == ["boom"]
    obs.observe("failed", 1, "slot dropped")
    assert [e["message"] for e in obs.recent_errors] == ["boom", "slot dropped"]


def test_ring_fill() -> None:
    assert ring_fill(None, 10) is None
    assert ring_fill(5, 0) is None
    assert ring_fill(8 * 1024 * 1024, 32 * 1024 * 1024) == 0.25


def test_metrics_exposition() -> None:
    text = render_metrics(snapshot(3))
    assert text.endswith("\n")
    assert "# HELP dataflare_up " in text and "# TYPE dataflare_up gauge\ndataflare_up 1\n" in text
    assert "# TYPE dataflare_records_in_total counter" in text
    assert 'dataflare_records_in_total{workflow="orders-replica",source="shop"} 123000' in text
    assert (
        'dataflare_records_out_total{workflow="orders-replica",destination="reporting"} 122500'
        in text
    )
    assert 'dataflare_workflow_state{workflow="legacy-import",state="retrying"} 1' in text
    assert 'dataflare_workflow_state{workflow="legacy-import",state="streaming"} 0' in text
    assert 'dataflare_errors_total{workflow="legacy-import"} 4' in text
    assert 'dataflare_restarts_total{workflow="legacy-import"} 4' in text
    assert 'dataflare_lag_seconds{workflow="orders-replica",source="shop"} 0.7' in text
    assert 'dataflare_ring_used_bytes{workflow="orders-replica",source="shop"}' in text
    # no lag reported (None): the sample is left out rather than faked
    assert 'dataflare_lag_seconds{workflow="snapshot-users"' not in text
    # every family is declared once, before its samples
    names = re.findall(r"^# TYPE (\S+) ", text, re.M)
    assert len(names) == len(set(names))
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? -?[0-9.e+-]+$')
    for line in text.splitlines():
        assert line.startswith("# ") or sample.match(line), line


def test_metrics_label_escaping() -> None:
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    st = snapshot(0)
    st["workflows"][0]["name"] = 'we"ird\\name\n'
    text = render_metrics(st)
    assert 'dataflare_errors_total{workflow="we\\"ird\\\\name\\n"} 0' in text


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9187") == ("127.0.0.1", 9187)
    assert parse_listen("[::1]:9187") == ("::1", 9187)
    assert parse_listen(":9187") == ("127.0.0.1", 9187)


def test_peer_credential_decision() -> None:
    daemon = {"daemon_uid": 998, "daemon_gid": 997}
    assert may_change_state(0, 0, **daemon)  # root
    assert may_change_state(998, 100, **daemon)  # the daemon's user
    assert may_change_state(1000, 997, **daemon)  # primary group
    assert may_change_state(1000, 1000, frozenset({27, 997}), **daemon)  # supplementary group
    assert not may_change_state(1000, 1000, frozenset({27}), **daemon)
    assert not may_change_state(65534, 65534, **daemon)  # nobody
