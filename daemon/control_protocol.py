"""Control-socket wire format, shared by the daemon, the CLI and the TUI.

Frames are a 4-byte big-endian length then a msgpack map. A request is
``{"v": 1, "id": n, "cmd": str, "args": {...}}``; the response carries the same
``id`` with ``ok`` and ``result`` or ``error``. After ``subscribe`` the server also
pushes ``{"v": 1, "push": "status", "result": {...}}`` frames at the asked interval.
A client the server drops for being too slow gets ``{"v": 1, "push": "bye",
"error": reason}`` when it can still take one.
Only stdlib and msgpack here: the TUI imports this module and nothing heavier.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
MAX_FRAME = 16 * 1024 * 1024
_LEN = struct.Struct(">I")

# Requests that change the daemon's state: refused to peers other than root and
# the daemon's own user or group (SO_PEERCRED).
MUTATING = frozenset({"pause", "resume", "restart", "reload", "dlq_replay", "dlq_purge"})


class ProtocolError(Exception):
    pass


def pack_frame(msg: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(msg, use_bin_type=True, default=str)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def unpack_body(body: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as e:
        raise ProtocolError(f"undecodable frame: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a frame must be a map")
    return msg


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next frame, or None at a clean end of stream."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ProtocolError("connection closed inside a frame header") from None
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    try:
        return unpack_body(await reader.readexactly(n))
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed inside a frame") from None


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    body = _recv_exact(sock, n)
    if body is None:
        raise ProtocolError("connection closed inside a frame")
    return unpack_body(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if buf:
                raise ProtocolError("connection closed inside a frame")
            return None
        buf += chunk
    return bytes(buf)
