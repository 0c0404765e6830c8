"""Worker processes forked from a pre-imported interpreter (a zygote).

A worker started as ``python -m dataflare.daemon.worker`` spends ~0.3 s of CPU
importing the data path (psycopg, codecs, sinks) before it can connect; two of
them per workflow, after the supervisor's own imports, made a daemon's start
take about a second on two cores. The supervisor starts one zygote first thing,
so its imports overlap the supervisor's; each worker is then a fork of it:
milliseconds, with the imported modules shared copy-on-write.

The zygote is a child of the supervisor. It forks twice per worker (the middle
process exits at once), and the supervisor is a child subreaper
(``PR_SET_CHILD_SUBREAPER``), so every worker is re-parented to the supervisor:
it waits for its workers' exit codes as for any child (:class:`ForkedWorker`),
and ``PR_SET_PDEATHSIG`` still ties them to it.

The ring's eventfds and the status pipe travel to the zygote with SCM_RIGHTS.
A forked worker keeps only its own fds (stdio and what came with its request):
a stray copy of a ring's lifeline would keep a dead peer "alive".

Protocol on the socket pair (stream): request = 8-byte length + a pickled
``(parent fd numbers, WorkerSpec)``, the fds attached to the first bytes; reply
= 8-byte pid (or -1). EOF ends the zygote. Anything wrong (no subreaper, the
zygote died, a timeout) and the supervisor starts workers the plain way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_LEN = struct.Struct("<q")
MAX_FDS = 64
REPLY_TIMEOUT_S = 60.0  # the first request waits for the zygote's imports
REPARENT_TIMEOUT_S = 5.0
# Handle keys that hold fd numbers (daemon.ring._FD_KEYS; not imported: ring
# pulls in shared memory machinery the supervisor side does not need here).
_FD_KEYS = ("data_fd", "space_fd", "ack_fd", "lifeline_fd", "peer_fd")
_EXIT_RETRYABLE = 1  # cdc.errors.EXIT_RETRYABLE: the supervisor backs off and retries


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("zygote socket closed")
        buf += chunk
    return bytes(buf)


# ------------------------------------------------------------------ supervisor side


class Zygote:
    """The supervisor's handle on its zygote process."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self._sock = sock
        self._lock = threading.Lock()
        self.broken = False

    @classmethod
    def start(cls) -> Zygote | None:
        """Start the zygote, or None where workers must be started the plain way."""
        if sys.platform != "linux" or os.environ.get("DATAFLARE_ZYGOTE") == "0":
            return None
        if not hasattr(socket, "send_fds"):
            return None
        if not _prctl(_PR_SET_CHILD_SUBREAPER, 1):
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dataflare.daemon.zygote",
                    str(theirs.fileno()),
                    str(os.getpid()),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError:
            ours.close()
            return None
        finally:
            theirs.close()
        ours.settimeout(REPLY_TIMEOUT_S)
        return cls(proc, ours)

    def fork(self, spec: Any, fds: list[int]) -> int | None:
        """Fork a worker for ``spec`` (a WorkerSpec whose fd numbers are ours, all
        listed in ``fds``): its pid, or None if the zygote cannot (then it is
        stopped and the caller starts the worker the plain way). Blocking: call
        it from a thread."""
        with self._lock:
            if self.broken:
                return None
            payload = pickle.dumps((list(fds), spec))
            try:
                socket.send_fds(self._sock, [_LEN.pack(len(payload))], fds)
                self._sock.sendall(payload)
                (pid,) = _LEN.unpack(_recv_exact(self._sock, _LEN.size))
            except (OSError, EOFError):
                pid = -1
            if pid <= 0:
                self._break()
                return None
            return int(pid)

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


def start() -> None:
    """Start the daemon's zygote (once; first thing, before the heavy imports)."""
    global _current
    if _current is None:
        _current = Zygote.start()


def current() -> Zygote | None:
    return _current if _current is not None and not _current.broken else None


def stop() -> None:
    global _current
    if _current is not None:
        _current.close()
        _current = None


class ForkedWorker:
    """A worker forked by the zygote and re-parented to us, with the part of
    asyncio's ``Process`` interface the supervisor uses. A thread waits for its
    exit, as asyncio's own child watcher does (a pidfd would need a syscall that
    older seccomp filters lack). Being our child, its pid cannot be reused before
    that thread reaps it, so signalling it by pid is safe until then."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        loop = asyncio.get_running_loop()
        self._done: asyncio.Future[int] = loop.create_future()
        threading.Thread(
            target=self._reap, args=(loop,), name=f"waitpid-{pid}", daemon=True
        ).start()

    def _reap(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # not ours after all: known only to be gone
            code = 255
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._exited, code)

    def _exited(self, code: int) -> None:
        self.returncode = code
        if not self._done.done():
            self._done.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._done)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)


# --------------------------------------------------------------------- zygote side


def _close_other_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _remap(spec: Any, parent_fds: list[int], fds: list[int]) -> Any:
    """The spec with our fd numbers in place of the supervisor's."""
    if len(parent_fds) != len(fds):
        raise ValueError(f"{len(fds)} fds came for {len(parent_fds)}")
    ours = dict(zip(parent_fds, fds, strict=True))
    rings = {
        name: {k: (ours[v] if k in _FD_KEYS and isinstance(v, int) else v) for k, v in h.items()}
        for name, h in spec.rings.items()
    }
    return dataclasses.replace(spec, rings=rings, status_fd=ours[spec.status_fd])


def _become_worker(payload: bytes, fds: list[int], supervisor: int, serve: Any) -> None:
    """In the grandchild: wait to be the supervisor's, then run the worker. Never returns."""
    rc = _EXIT_RETRYABLE
    try:
        deadline = time.monotonic() + REPARENT_TIMEOUT_S
        while os.getppid() != supervisor:
            if time.monotonic() > deadline:
                os._exit(_EXIT_RETRYABLE)  # the supervisor is gone, or not our subreaper
            time.sleep(0.0005)
        parent_fds, spec = pickle.loads(payload)
        spec = _remap(spec, parent_fds, fds)
        _close_other_fds(set(fds))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        rc = serve(spec)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else _EXIT_RETRYABLE
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc)


def _fork(sock: socket.socket, payload: bytes, fds: list[int], supervisor: int, serve: Any) -> int:
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(r)
            sock.close()
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _become_worker(payload, fds, supervisor, serve)
            os.write(w, _LEN.pack(pid))
        finally:
            os._exit(0)
    os.close(w)
    try:
        data = os.read(r, _LEN.size)
    finally:
        os.close(r)
        os.waitpid(middle, 0)
    return _LEN.unpack(data)[0] if len(data) == _LEN.size else -1


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    supervisor = int(argv[1])
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor:
        return _EXIT_RETRYABLE
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor ends us (EOF)
    from dataflare.daemon.worker import serve  # the point: import once, fork many

    gc.collect()
    gc.freeze()  # forked workers then do not touch these objects' pages
    while True:
        try:
            head, fds, _, _ = socket.recv_fds(sock, _LEN.size, MAX_FDS)
        except OSError:
            return 0
        if not head:
            return 0
        try:
            head += _recv_exact(sock, _LEN.size - len(head))
            payload = _recv_exact(sock, _LEN.unpack(head)[0])
            pid = _fork(sock, payload, fds, supervisor, serve)
        except EOFError:
            return 0
        except Exception:
            traceback.print_exc()
            pid = -1
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        try:
            sock.sendall(_LEN.pack(pid))
        except OSError:
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
