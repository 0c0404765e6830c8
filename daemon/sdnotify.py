"""systemd's sd_notify protocol in stdlib (no libsystemd).

``notify("READY=1", "STATUS=...")`` sends one datagram of newline-separated
``KEY=VALUE`` lines to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace). Outside systemd (no ``$NOTIFY_SOCKET``) every call is a cheap no-op.

The watchdog: when the unit sets ``WatchdogSec=``, systemd passes
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process that must ping). The
supervisor pings ``WATCHDOG=1`` every half of that period from a task on its
event loop (``watchdog_loop``), so a loop that is stuck stops pinging and systemd
restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

_captured: dict[str, str] | None = None


def capture_environment() -> None:
    """Take NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID out of the environment
    (like sd_notify's ``unset_environment``) and keep them for this process only,
    so worker processes neither inherit nor use them (NotifyAccess=main)."""
    global _captured
    if _captured is None:
        _captured = {}
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            value = os.environ.pop(key, None)
            if value is not None:
                _captured[key] = value


def _env(key: str) -> str | None:
    if _captured is not None:
        return _captured.get(key)
    return os.environ.get(key)


def _address() -> str | None:
    path = _env("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract namespace
    return path


def notify(*fields: str) -> bool:
    """Send KEY=VALUE lines to $NOTIFY_SOCKET; False when not under systemd or on error.

    Never raises and never blocks (a datagram to a full queue is dropped: systemd's
    notification socket is not a place to wait on).
    """
    address = _address()
    if address is None or not fields:
        return False
    data = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.setblocking(False)
            s.sendto(data, address)
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading(status: str | None = None) -> bool:
    """RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC, as Type=notify-reload wants)."""
    fields = ["RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}"]
    return notify(*fields, *([f"STATUS={status}"] if status else []))


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when the
    watchdog is off or meant for another process (WATCHDOG_PID)."""
    if _address() is None:
        return None
    pid = _env("WATCHDOG_PID")
    if pid and pid.strip().isdigit() and int(pid) != os.getpid():
        return None
    try:
        usec = int(_env("WATCHDOG_USEC") or "")
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


async def watchdog_loop(interval: float) -> None:
    """Ping WATCHDOG=1 every ``interval`` seconds from the event loop until cancelled."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def enabled() -> bool:
    """Whether this process runs under systemd with a notification socket."""
    return _address() is not None
