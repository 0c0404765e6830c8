"""Prometheus metrics: the status model in the text exposition format (0.0.4).

``daemon.metrics_listen: host:port`` starts a tiny asyncio HTTP server in the
supervisor process that serves ``GET /metrics``. Rendering is a pure function of a
status snapshot, so it is tested without a daemon. No dependency beyond stdlib.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from loguru import logger

STATES = ("starting", "snapshotting", "streaming", "paused", "retrying", "failed", "stopped")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_REQUEST_TIMEOUT_S = 5.0
_MAX_HEADER = 16 * 1024

StatusFn = Callable[[], dict[str, Any]]


def escape_label(value: object) -> str:
    """A label value as the exposition format wants it: \\ " and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, object]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items()) + "}"


def _num(v: float | int) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if v != v:  # NaN
        return "NaN"
    return repr(float(v))


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.samples: list[tuple[dict[str, object], float | int]] = []

    def add(self, value: Any, **labels: object) -> None:
        if value is None or not isinstance(value, (int, float)):
            return
        self.samples.append((labels, value))

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in self.samples:
            yield f"{self.name}{_labels(labels)} {_num(value)}"


def render_metrics(status: dict[str, Any]) -> str:
    """The exposition text of one status snapshot."""
    fams: dict[str, _Family] = {}

    def fam(name: str, kind: str, help_text: str) -> _Family:
        if name not in fams:
            fams[name] = _Family(name, kind, help_text)
        return fams[name]

    d = status.get("daemon", {})
    fam("dataflare_up", "gauge", "1 while the daemon serves metrics.").add(1)
    fam("dataflare_info", "gauge", "Daemon version (always 1).").add(1, version=d.get("version"))
    fam("dataflare_uptime_seconds", "gauge", "Seconds since the daemon started.").add(
        d.get("uptime_s")
    )
    fam(
        "dataflare_config_generation", "gauge", "Configuration generation (reloads applied + 1)."
    ).add(d.get("config_generation"))
    fam("dataflare_config_errors", "gauge", "Configuration errors of the last load.").add(
        len(d.get("config_errors") or [])
    )
    for w in status.get("workflows", []):
        wf = w["name"]
        state_fam = fam(
            "dataflare_workflow_state", "gauge", "1 for the workflow's current state, else 0."
        )
        for s in STATES:
            state_fam.add(1 if w.get("state") == s else 0, workflow=wf, state=s)
        fam(
            "dataflare_workflow_records_in_total",
            "counter",
            "Changes read by all sources of the workflow.",
        ).add(w.get("records_in"), workflow=wf)
        fam(
            "dataflare_workflow_records_out_total",
            "counter",
            "Changes applied to the workflow's destinations (one per destination).",
        ).add(w.get("records_out"), workflow=wf)
        fam("dataflare_errors_total", "counter", "Errors of the workflow (failed runs).").add(
            w.get("errors"), workflow=wf
        )
        fam("dataflare_restarts_total", "counter", "Restarts of the workflow's processes.").add(
            w.get("restarts"), workflow=wf
        )
        fam(
            "dataflare_dead_letters_total", "counter", "Changes sent to the dead-letter queue."
        ).add(w.get("dead_letters"), workflow=wf)
        fam("dataflare_batches_total", "counter", "Batches applied by the workflow.").add(
            w.get("batches"), workflow=wf
        )
        for s in w.get("sources", []):
            lab = {"workflow": wf, "source": s["name"]}
            fam("dataflare_records_in_total", "counter", "Changes read by a source.").add(
                s.get("records_in"), **lab
            )
            fam("dataflare_source_batches_total", "counter", "Batches sent by a source.").add(
                s.get("batches"), **lab
            )
            fam("dataflare_lag_seconds", "gauge", "Replication lag of a source in seconds.").add(
                s.get("lag_seconds"), **lab
            )
            fam("dataflare_lag_bytes", "gauge", "Replication lag of a source in bytes.").add(
                s.get("lag_bytes"), **lab
            )
            fam("dataflare_ring_used_bytes", "gauge", "Bytes in use in a source's ring.").add(
                s.get("ring_used"), **lab
            )
            fam("dataflare_ring_capacity_bytes", "gauge", "Capacity of a source's ring.").add(
                s.get("ring_capacity"), **lab
            )
            for table, ops in sorted((s.get("tables") or {}).items()):
                tfam = fam(
                    "dataflare_table_changes_total",
                    "counter",
                    "Changes read per table and operation (since the source process started).",
                )
                for op, n in sorted(ops.items()):
                    tfam.add(n, **lab, table=table, op=op)
        for dst in w.get("destinations", []):
            lab = {"workflow": wf, "destination": dst["name"]}
            fam("dataflare_records_out_total", "counter", "Changes written by a destination.").add(
                dst.get("records_written"), **lab
            )
    lines: list[str] = []
    for f in fams.values():
        lines.extend(f.lines())
    return "\n".join(lines) + "\n"


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class MetricsServer:
    """``GET /metrics`` over plain HTTP/1.0-style request/response, one per connection."""

    def __init__(self, listen: str, status: StatusFn) -> None:
        self.listen = listen
        self.status = status
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        host, port = parse_listen(self.listen)
        self._server = await asyncio.start_server(self._serve, host, port)
        logger.info("metrics on http://{}:{}/metrics", host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT_S)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                code, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path == "/metrics":
                code, ctype = "200 OK", CONTENT_TYPE
                body = render_metrics(self.status()).encode()
            elif path == "/":
                code, ctype = "200 OK", "text/plain"
                body = b"dataflare: metrics at /metrics\n"
            else:
                code, body, ctype = "404 Not Found", b"not found\n", "text/plain"
            head_out = (
                f"HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head_out + (b"" if method == "HEAD" else body))
            await asyncio.wait_for(writer.drain(), _REQUEST_TIMEOUT_S)
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        except Exception as e:  # a metrics bug must never take the daemon down
            logger.warning("metrics request failed: {}", e)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
