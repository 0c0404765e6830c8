"""Fixed status snapshots for deterministic TUI screenshots (no daemon)."""

from __future__ import annotations

import math
from typing import Any

T0 = 1_790_000_000.0  # a fixed clock: screenshots never depend on "now"


def _workflow(i: int, k: int, name: str, state: str, rate: float, **extra: Any) -> dict[str, Any]:
    done = 1000 * i + 77_777 * k
    w: dict[str, Any] = {
        "name": name,
        "description": f"{name} into the reporting database",
        "state": state,
        "state_reason": None,
        "sources": [
            {
                "name": "shop",
                "type": "postgres",
                "position": f"0/{0x1A2B3C00 + done:X}",
                "confirmed": f"0/{0x1A2B3000 + done:X}",
                "lag_bytes": 4096 * ((i + k) % 7),
                "lag_seconds": round(0.4 + ((i + 3 * k) % 5) / 10 + 30 * (k == 2), 1),
                "snapshot": None,
                "records_in": 120_000 + done,
                "rate_in": rate,
                "batches": 2400 + i,
                "ring_used": ((i + 3 * k) % 10) * 1_000_000,
                "ring_capacity": 33_554_432,
                "ring_fill": round(((i + 3 * k) % 10) * 1_000_000 / 33_554_432, 4),
                "tables": {},
            }
        ],
        "destinations": [
            {
                "name": "reporting",
                "type": "postgres",
                "position": f"0/{0x1A2B3000 + done:X}",
                "records_written": 119_500 + done,
                "rate_out": rate,
                "errors": 0,
                "dead_letters": 0,
            }
        ],
        "records_in": 120_000 + done,
        "records_out": 119_500 + done,
        "rate_in": rate,
        "rate_out": rate,
        "batches": 2400 + i,
        "errors": 0,
        "dead_letters": 0,
        "last_error": None,
        "restarts": 0,
        "note": "",
        "started_at": T0,
        "pids": [100, 101],
        "tables": {
            "public.orders": {"c": 60_000 + done, "u": 30_000, "d": 10_000},
            "public.customers": {"c": 15_000, "u": 4_000, "d": 1_000, "r": 500},
        },
        "recent_errors": [],
        "log": [
            {"ts": T0 + 1, "level": "INFO", "component": "supervisor", "message": "state starting"},
            {"ts": T0 + 2, "level": "INFO", "component": "apply", "message": "apply streaming"},
            {
                "ts": T0 + 2,
                "level": "INFO",
                "component": "source:shop",
                "message": "source:shop streaming",
            },
        ],
    }
    w.update(extra)
    return w


def snapshot(i: int) -> dict[str, Any]:
    """Snapshot number i (one a second): throughput follows a smooth curve."""
    wave = 1 + math.sin(i / 9)
    failed_error = "source:legacy: connection refused (mysql 10.0.0.7:3306)"
    return {
        "daemon": {
            "version": "0.1.0",
            "pid": 4242,
            "uptime_s": 3600 + i,
            "config_generation": 3,
            "config_file": "/etc/dataflare/dataflare.yaml",
            "config_errors": [],
        },
        "workflows": [
            _workflow(i, 0, "orders-replica", "streaming", round(1500 + 900 * wave, 1)),
            _workflow(i, 1, "audit-archive", "paused", 0.0),
            _workflow(
                i,
                2,
                "legacy-import",
                "retrying",
                0.0,
                state_reason=failed_error,
                errors=4,
                restarts=4,
                last_error=failed_error,
                recent_errors=[
                    {
                        "ts": T0 + 60 * k,
                        "component": "source:legacy",
                        "message": "connection refused (mysql 10.0.0.7:3306)",
                        "fatal": False,
                    }
                    for k in range(1, 5)
                ],
            ),
            _workflow(
                i,
                3,
                "snapshot-users",
                "snapshotting",
                round(4000 + 300 * wave, 1),
                sources=[
                    {
                        "name": "users",
                        "type": "mysql",
                        "position": "binlog.000042:9913",
                        "lag_bytes": None,
                        "lag_seconds": None,
                        "snapshot": {
                            "table": "app.users",
                            "rows_done": 61_000 + 100 * i,
                            "rows_total": 250_000,
                        },
                        "records_in": 61_000 + 100 * i,
                        "rate_in": round(4000 + 300 * wave, 1),
                        "ring_used": 0,
                        "ring_capacity": 33_554_432,
                        "ring_fill": 0.0,
                        "tables": {},
                    }
                ],
            ),
        ],
    }


def snapshots(n: int = 120) -> list[dict[str, Any]]:
    return [snapshot(i) for i in range(n)]
