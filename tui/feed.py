"""Where the TUI's status snapshots come from: the daemon's socket, or a fixed list.

A feed is used from a worker thread only (it blocks); ``close`` may be called from
any thread and wakes a blocked ``follow``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Protocol

from dataflare.daemon.control_client import ControlClient, DaemonNotRunning


class Feed(Protocol):
    live: bool

    def follow(self, interval: float) -> Iterator[dict[str, Any]]: ...

    def command(self, cmd: str, **args: Any) -> Any: ...

    def close(self) -> None: ...


class SocketFeed:
    """Status pushed by the daemon over the control socket."""

    live = True

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._client: ControlClient | None = None
        self.closed = threading.Event()

    def follow(self, interval: float) -> Iterator[dict[str, Any]]:
        if self.closed.is_set():
            return
        client = ControlClient(self.path, timeout=5.0)
        client.connect()
        with self._lock:
            self._client = client
        try:
            yield from client.subscribe(interval)
        finally:
            with self._lock:
                self._client = None
            client.close()

    def command(self, cmd: str, **args: Any) -> Any:
        """A request on its own connection (the subscription's is busy)."""
        with ControlClient(self.path, timeout=30.0) as client:
            return client.request(cmd, **args)

    def close(self) -> None:
        self.closed.set()
        with self._lock:
            client = self._client
        if client is not None:
            client.shutdown()  # wakes a blocked recv


class FixedFeed:
    """Snapshots given up front (tests, screenshots). Commands are recorded."""

    live = False

    def __init__(self, snapshots: list[dict[str, Any]]) -> None:
        self.snapshots = snapshots
        self.commands: list[tuple[str, dict[str, Any]]] = []

    def follow(self, interval: float) -> Iterator[dict[str, Any]]:
        yield from self.snapshots

    def command(self, cmd: str, **args: Any) -> Any:
        self.commands.append((cmd, args))
        if cmd == "reload":
            return {"applied": True, "generation": 0, "changes": [], "errors": []}
        return {"name": args.get("workflow", ""), "state": {"pause": "paused"}.get(cmd, "starting")}

    def close(self) -> None:
        pass


__all__ = ["DaemonNotRunning", "Feed", "FixedFeed", "SocketFeed"]
