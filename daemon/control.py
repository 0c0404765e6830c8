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
import time
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
CLIENT_QUEUE = 64  # frames queued for one client before it is dropped as too slow
SEND_TIMEOUT_S = 10.0  # a client that reads nothing for this long is dropped as stuck
DROP_GRACE_S = 1.0  # a dropped client has this long to read the reason before a hard close
_CRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    pid, uid, gid = _CRED.unpack(raw)
    return pid, uid, gid


def peer_groups(pid: int) -> frozenset[int]:
    """Supplementary groups of a peer process (from /proc; empty when unknown)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def may_change_state(
    peer_uid: int,
    peer_gid: int,
    peer_groups: frozenset[int] = frozenset(),
    *,
    daemon_uid: int,
    daemon_gid: int,
) -> bool:
    """Whether a peer may send state-changing requests: root, the daemon's user,
    or a member of the daemon's group (primary or supplementary)."""
    return (
        peer_uid == 0
        or peer_uid == daemon_uid
        or peer_gid == daemon_gid
        or daemon_gid in peer_groups
    )


class ControlServer:
    def __init__(
        self,
        path: str,
        handler: Handler,
        status: StatusFn,
        *,
        queue_size: int = CLIENT_QUEUE,
        send_timeout: float = SEND_TIMEOUT_S,
        drop_grace: float = DROP_GRACE_S,
    ) -> None:
        self.path = path
        self.handler = handler
        self.status = status
        self.queue_size = queue_size
        self.send_timeout = send_timeout
        self.drop_grace = drop_grace
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._status_cache: tuple[float, dict[str, Any]] | None = None
        self.dropped = 0  # clients disconnected for being too slow

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
        pid, uid, gid = peer_credentials(sock)
        groups = frozenset() if uid in (0, os.getuid()) else peer_groups(pid)
        return may_change_state(uid, gid, groups, daemon_uid=os.getuid(), daemon_gid=os.getgid())

    def _cached_status(self) -> dict[str, Any]:
        """One status snapshot shared by every subscriber pushed within 50 ms."""
        now = time.monotonic()
        if self._status_cache is None or now - self._status_cache[0] > 0.05:
            self._status_cache = (now, self.status())
        return self._status_cache[1]

    def _drop(self, writer: asyncio.StreamWriter, reason: str) -> None:
        """Disconnect a client at once, dropping whatever it did not read."""
        if writer.transport.is_closing():
            return
        peer = ""
        sock = writer.get_extra_info("socket")
        with contextlib.suppress(Exception):
            if sock is not None:
                pid, uid, _ = peer_credentials(sock)
                peer = f" (pid {pid}, uid {uid})"
        logger.warning("control client{} dropped: {}", peer, reason)
        self.dropped += 1
        # The reason goes after what is queued; a client that reads again soon gets it.
        # One that does not is cut off after a short grace, its buffers freed.
        transport = writer.transport
        with contextlib.suppress(Exception):
            transport.write(pack_frame({"v": PROTOCOL_VERSION, "push": "bye", "error": reason}))
        transport.close()
        asyncio.get_running_loop().call_later(self.drop_grace, transport.abort)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(self.queue_size)
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
                    self._drop(writer, f"too slow: {self.queue_size} replies not read")
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            helpers = [sender] if pusher is None else [sender, pusher]
            for t in helpers:
                t.cancel()
            with contextlib.suppress(Exception):
                writer.close()
            await asyncio.gather(*helpers, return_exceptions=True)
            self._clients.discard(task)

    def _offer(self, queue: asyncio.Queue[bytes | None], msg: dict[str, Any]) -> bool:
        try:
            queue.put_nowait(pack_frame(msg))
            return True
        except asyncio.QueueFull:
            return False

    async def _push_loop(
        self, queue: asyncio.Queue[bytes | None], interval: float, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            if not self._offer(
                queue, {"v": PROTOCOL_VERSION, "push": "status", "result": self._cached_status()}
            ):
                # the read loop then sees the connection end and cleans up
                self._drop(writer, f"too slow: {self.queue_size} status pushes not read")
                return
            await asyncio.sleep(interval)

    async def _send_loop(
        self, queue: asyncio.Queue[bytes | None], writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                frame = await queue.get()
                if frame is None or writer.transport.is_closing():
                    break  # ended, or dropped: nothing more after the reason
                writer.write(frame)
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
                async with asyncio.timeout(self.send_timeout):
                    await writer.drain()
        except TimeoutError:
            self._drop(writer, f"stuck: nothing read for {self.send_timeout:g}s")
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
