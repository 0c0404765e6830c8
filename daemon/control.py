"""The control socket server: status, subscriptions and commands for CLI and TUI.

Each client gets its own task and a bounded outgoing queue: a slow or stuck client
is disconnected (with a reason, when it can still take one) rather than slowing
the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from dataflare.daemon.control_protocol import (
    MUTATING,
    PROTOCOL_VERSION,
    ProtocolError,
    pack_frame,
    read_frame,
)
from loguru import logger

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]
StatusFn = Callable[[], dict[str, Any]]
CLIENT_QUEUE = 64
_CRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    pid, uid, gid = _CRED.unpack(raw)
    return pid, uid, gid


class ControlServer:
    def __init__(self, path: str, handler: Handler, status: StatusFn) -> None:
        self.path = path
        self.handler = handler
        self.status = status
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket of a daemon that died
        old = os.umask(0o117)  # 0660 from the start: no window with a wider mode
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._clients):
                t.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _allowed_to_change(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        if sock is None:
            return False
        _, uid, gid = peer_credentials(sock)
        return uid == 0 or uid == os.getuid() or gid == os.getgid()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(CLIENT_QUEUE)
        sender = asyncio.create_task(self._send_loop(queue, writer))
        pusher: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    msg = await read_frame(reader)
                except ProtocolError as e:
                    self._offer(queue, {"v": PROTOCOL_VERSION, "ok": False, "error": str(e)})
                    break
                if msg is None:
                    break
                rid = msg.get("id")
                cmd = str(msg.get("cmd", ""))
                args = msg.get("args") or {}
                reply: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": rid}
                if msg.get("v") != PROTOCOL_VERSION:
                    reply.update(
                        ok=False,
                        error=f"unsupported protocol version {msg.get('v')!r}; "
                        f"this daemon speaks {PROTOCOL_VERSION}",
                    )
                elif cmd in MUTATING and not self._allowed_to_change(writer):
                    reply.update(
                        ok=False,
                        error=f"permission denied: {cmd} needs root or the daemon's user or group",
                    )
                elif cmd == "subscribe":
                    interval = max(0.1, float(args.get("interval", 1.0)))
                    if pusher is not None:
                        pusher.cancel()
                    pusher = asyncio.create_task(self._push_loop(queue, interval, writer))
                    reply.update(ok=True, result={"interval": interval})
                else:
                    try:
                        reply.update(ok=True, result=await self.handler(cmd, args))
                    except Exception as e:
                        reply.update(ok=False, error=str(e))
                if not self._offer(queue, reply):
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if pusher is not None:
                pusher.cancel()
            sender.cancel()
            with contextlib.suppress(Exception):
                writer.close()
            self._clients.discard(task)

    def _offer(self, queue: asyncio.Queue[bytes | None], msg: dict[str, Any]) -> bool:
        try:
            queue.put_nowait(pack_frame(msg))
            return True
        except asyncio.QueueFull:
            logger.warning(
                "control client too slow: {} frames queued; disconnecting it", CLIENT_QUEUE
            )
            return False

    async def _push_loop(
        self, queue: asyncio.Queue[bytes | None], interval: float, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            if not self._offer(
                queue, {"v": PROTOCOL_VERSION, "push": "status", "result": self.status()}
            ):
                writer.close()  # the read loop then ends and cleans up
                return
            await asyncio.sleep(interval)

    async def _send_loop(
        self, queue: asyncio.Queue[bytes | None], writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                frame = await queue.get()
                if frame is None:
                    break
                writer.write(frame)
                await asyncio.wait_for(writer.drain(), timeout=10)
        except (ConnectionError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
