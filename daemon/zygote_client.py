"""The supervisor's side of the zygote (see :mod:`dataflare.daemon.zygote`):
starting it, asking it for workers, and waiting for them.

Imported by the CLI before anything heavy, so that the zygote starts first thing:
asyncio is imported only where a forked worker is waited for."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from dataflare.daemon import zygote
from dataflare.daemon.zygote import (
    GO,
    LEN,
    MAX_FDS,
    PR_SET_CHILD_SUBREAPER,
    REPLY_TIMEOUT_S,
    prctl,
    recv_exact,
)

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable


class ZygoteProcess:
    """The zygote, our child by ``os.fork``, with the part of ``Popen`` we use."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG if deadline else 0)
            except ChildProcessError:
                self.returncode = 255  # reaped by someone else: known only to be gone
                break
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            elif deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"zygote {self.pid}", timeout or 0.0)
            else:
                time.sleep(0.01)
        return self.returncode


class Zygote:
    """The supervisor's handle on its zygote process."""

    def __init__(self, proc: ZygoteProcess, sock: socket.socket) -> None:
        self.proc = proc
        self._sock = sock
        self._lock = threading.Lock()
        self.broken = False

    @classmethod
    def start(cls) -> Zygote | None:
        """Fork the zygote, or None where workers must be started the plain way."""
        if sys.platform != "linux" or os.environ.get("DATAFLARE_ZYGOTE") == "0":
            return None
        if not hasattr(socket, "send_fds"):
            return None
        if threading.active_count() > 1:
            return None  # a fork would copy other threads' held locks, not the threads
        if not prctl(PR_SET_CHILD_SUBREAPER, 1):
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        supervisor = os.getpid()
        for stream in (sys.stdout, sys.stderr):  # or the child would write what we buffered
            if stream is not None:  # (None: started with that fd closed)
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return None
        if pid == 0:
            ours.close()
            zygote.run(theirs.detach(), supervisor)  # never returns
        theirs.close()
        ours.settimeout(REPLY_TIMEOUT_S)
        return cls(ZygoteProcess(pid), ours)

    def fork(self, spec: Any, fds: list[int], go: int) -> int | None:
        """Fork a worker for ``spec`` (a WorkerSpec whose fd numbers are ours, all
        listed in ``fds``): its pid, or None if the zygote cannot (then the caller
        starts the worker the plain way). The worker runs only once the write end
        of the pipe whose read end is ``go`` gets :data:`GO` (``confirm``): write
        it once the pid is waited for; close it unwritten and the worker exits.
        Blocking: call it from a thread."""
        if len(fds) + 1 > MAX_FDS:
            return None  # more than one message carries: the plain way, this once
        return self._request(pickle.dumps((list(fds), spec)), [go, *fds], lambda pid: pid > 0)

    def warm(self, log_level: str, log_format: str, implementations: list[str]) -> None:
        """Have the zygote get ready for such workers (see the zygote's protocol).
        Blocking: call it from a thread."""
        request = ("warm", log_level, log_format, implementations)
        self._request(pickle.dumps(request), [], lambda reply: reply == 0)

    def _request(self, payload: bytes, fds: list[int], ok: Callable[[int], bool]) -> int | None:
        """Send one request, the fds attached, and return the zygote's reply; None
        if the zygote is broken. A failed exchange or a reply that is not ``ok``
        breaks it (the caller then starts workers the plain way)."""
        with self._lock:
            if self.broken:
                return None
            try:
                socket.send_fds(self._sock, [LEN.pack(len(payload))], fds)
                self._sock.sendall(payload)
                (reply,) = LEN.unpack(recv_exact(self._sock, LEN.size))
            except (OSError, EOFError):
                reply = -1
            if not ok(reply):
                self._break()
                return None
            return int(reply)

    def _break(self) -> None:
        self.broken = True
        self._sock.close()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def close(self) -> None:
        """EOF ends the zygote; its workers are not its children and live on."""
        with self._lock:
            if self.broken:
                return
            self.broken = True
            self._sock.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_current: Zygote | None = None
# The supervisor's last warm request (Zygote.warm, in a thread), which forks wait
# for: sent first, it is what they inherit.
warming: asyncio.Future[None] | None = None


async def warmed() -> None:
    """Wait for the last warm request, whatever its outcome (not cancelled with
    the waiter: it would leave the request half-sent)."""
    import asyncio

    w = warming
    if w is not None and not w.done():
        with contextlib.suppress(Exception):
            await asyncio.shield(w)


def start() -> None:
    """Start the daemon's zygote (once; first thing, before the heavy imports)."""
    global _current
    if _current is None:
        _current = Zygote.start()


def current() -> Zygote | None:
    return _current if _current is not None and not _current.broken else None


def pid() -> int | None:
    """The zygote's pid while it runs (ours to wait for, not a stray)."""
    return _current.proc.pid if _current is not None else None


def confirm(go_w: int) -> None:
    """Let a forked worker run (see ``Zygote.fork``)."""
    os.write(go_w, GO)


def stop() -> None:
    global _current
    if _current is not None:
        _current.close()
        _current = None


class ForkedWorker:
    """A worker forked by the zygote and re-parented to us, with the part of
    asyncio's ``Process`` interface the supervisor uses. A thread waits for its
    exit, as asyncio's own child watcher does (a pidfd would need a syscall that
    older seccomp filters lack), without reaping it (``WNOWAIT``): the loop reaps
    it and sets ``returncode`` in one step, so until then the pid is still ours
    (a zombie at worst) and ``send_signal`` cannot reach a reused one."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        import asyncio  # here, not at the top: see the module doc

        loop = asyncio.get_running_loop()
        self._done: asyncio.Future[int] = loop.create_future()
        threading.Thread(
            target=self._wait_exit, args=(loop,), name=f"waitpid-{pid}", daemon=True
        ).start()

    def _wait_exit(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(ChildProcessError):  # not ours after all: _reap says so
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._reap)

    def _reap(self) -> None:
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # known only to be gone
            code = 255
        self.returncode = code
        if not self._done.done():
            self._done.set_result(code)

    async def wait(self) -> int:
        import asyncio

        return await asyncio.shield(self._done)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)
