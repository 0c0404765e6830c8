"""A blocking client of the control socket (used by the CLI and the TUI)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

from dataflare.daemon.control_protocol import PROTOCOL_VERSION, pack_frame, recv_frame

DEFAULT_SOCKET = "/run/dataflare/dataflare.sock"


class DaemonNotRunning(Exception):
    def __init__(self, path: str) -> None:
        super().__init__(f"daemon not running (no daemon listening on {path})")
        self.path = path


class RequestFailed(Exception):
    pass


class Dropped(RequestFailed):
    """The daemon disconnected this client (too slow), saying why."""


class ControlClient:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._next_id = 1

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError, PermissionError, OSError) as e:
            s.close()
            if isinstance(e, PermissionError):
                raise RequestFailed(f"permission denied on {self.path}") from None
            raise DaemonNotRunning(self.path) from None
        self._sock = s

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def shutdown(self) -> None:
        """Wake a thread blocked reading this connection (it then sees end of stream).
        Safe to call from any thread."""
        s = self._sock
        if s is not None:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> ControlClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, cmd: str, **args: Any) -> Any:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        rid = self._next_id
        self._next_id += 1
        self._sock.sendall(pack_frame({"v": PROTOCOL_VERSION, "id": rid, "cmd": cmd, "args": args}))
        while True:
            msg = recv_frame(self._sock)
            if msg is None:
                raise DaemonNotRunning(self.path)
            if msg.get("push") == "bye":
                raise Dropped(f"disconnected by the daemon: {msg.get('error')}")
            if msg.get("id") != rid:
                continue  # a push frame of an earlier subscription
            if not msg.get("ok"):
                raise RequestFailed(str(msg.get("error", "request failed")))
            return msg.get("result")

    def subscribe(self, interval: float = 1.0) -> Iterator[dict[str, Any]]:
        """Status snapshots pushed by the daemon every ``interval`` seconds."""
        self.request("subscribe", interval=interval)
        assert self._sock is not None
        self._sock.settimeout(max(5.0, interval * 5))
        while True:
            msg = recv_frame(self._sock)
            if msg is None:
                raise DaemonNotRunning(self.path)
            if msg.get("push") == "status":
                yield msg["result"]
            elif msg.get("push") == "bye":
                raise Dropped(f"disconnected by the daemon: {msg.get('error')}")


def socket_path(explicit: str | None = None, config_path: str | None = None) -> str:
    """--socket, then $DATAFLARE_SOCKET, then daemon.socket in the config file."""
    if explicit:
        return explicit
    env = os.environ.get("DATAFLARE_SOCKET")
    if env:
        return env
    path = config_path or os.environ.get("DATAFLARE_CONFIG") or "/etc/dataflare/dataflare.yaml"
    try:
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f) or {}
        sock = (data.get("daemon") or {}).get("socket")
        if isinstance(sock, str) and sock:
            if not os.path.isabs(sock):
                sock = os.path.join(os.path.dirname(os.path.abspath(path)), sock)
            return sock
    except (OSError, ValueError, AttributeError, ImportError):
        pass
    except Exception:  # a broken YAML file: fall back to the default path
        pass
    return DEFAULT_SOCKET
