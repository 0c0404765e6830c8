"""systemd's sd_notify protocol in a few lines of stdlib (no libsystemd)."""

from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Send KEY=VALUE lines to $NOTIFY_SOCKET; False when not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(path)
            s.sendall("\n".join(fields).encode())
        except OSError:
            return False
    return True
