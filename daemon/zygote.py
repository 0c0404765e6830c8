"""Worker processes forked from a pre-imported interpreter (a zygote).

A worker started as ``python -m dataflare.daemon.worker`` spends ~0.3 s of CPU
importing the data path (psycopg, codecs, sinks) before it can connect; two of
them per workflow, after the supervisor's own imports, made a daemon's start
take about a second on two cores. The supervisor starts one zygote first thing,
so its imports overlap the supervisor's; each worker is then a fork of it:
milliseconds, with the imported modules shared copy-on-write.

This module is the zygote process and its protocol, with light imports only;
:mod:`dataflare.daemon.zygote_client` is the supervisor's side. The zygote is a
child of the supervisor, forked by the CLI before anything heavy is imported
(not exec'd: that would cost an interpreter's start, ~65 ms on the critical path
of every start); it and its workers keep the CLI's command line and are named by
``comm`` instead: ``df-zygote``, ``df-source``, ``df-apply``. It forks twice per worker (the middle
process exits at once), and the supervisor is a child subreaper
(``PR_SET_CHILD_SUBREAPER``), so every worker is re-parented to the supervisor:
it waits for its workers' exit codes as for any child (``zygote_client.ForkedWorker``),
and ``PR_SET_PDEATHSIG`` still ties them to it.

The ring's eventfds and the status pipe travel to the zygote with SCM_RIGHTS.
A forked worker keeps only its own fds (stdio and what came with its request):
a stray copy of a ring's lifeline would keep a dead peer "alive".

Protocol on the socket pair (stream): request = 8-byte length + a pickled
``(parent fd numbers, WorkerSpec)``, the fds attached to the first bytes (first
the read end of a "go" pipe, then the spec's fds); reply = 8-byte pid (or -1).
EOF ends the zygote. Anything wrong (no subreaper, the zygote died, a timeout)
and the supervisor starts workers the plain way. A request without fds whose
payload is ``("warm", log level, log format, implementation paths)`` asks the
zygote to get ready for workers of that kind (their logging set up, those
source and sink classes imported): reply 0. A worker forked after it skips that
work (~10-25 ms of its start).

A forked worker waits for one byte on its go pipe before it touches anything:
the supervisor writes it once it holds the pid and waits for the process. Were
the reply lost (the zygote killed after forking, a timeout), the supervisor
would start the worker the plain way, and a second producer or consumer on the
same ring would corrupt it; instead the unconfirmed worker reads EOF and exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import pickle
import signal
import socket
import struct
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
LEN = struct.Struct("<q")
MAX_FDS = 253  # SCM_MAX_FD: the most one message can carry
REPLY_TIMEOUT_S = 60.0  # the first request waits for the zygote's imports
REPARENT_TIMEOUT_S = 5.0
# Handle keys that hold fd numbers (daemon.ring._FD_KEYS; not imported: ring
# pulls in shared memory machinery the supervisor side does not need here).
_FD_KEYS = ("data_fd", "space_fd", "ack_fd", "lifeline_fd", "peer_fd")
_EXIT_RETRYABLE = 1  # cdc.errors.EXIT_RETRYABLE: the supervisor backs off and retries
GO = b"g"
ZYGOTE_NAME = b"df-zygote"
WORKER_NAMES = {"source": b"df-source", "apply": b"df-apply"}  # (the plain way: "python")


def prctl(option: int, value: int | ctypes.c_char_p) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def stat_fields(pid: int | str = "self") -> list[str]:
    """/proc/<pid>/stat after the command name (fields[0] is the state, field 3 of
    proc(5)); raises OSError when the process is gone."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("zygote socket closed")
        buf += chunk
    return bytes(buf)


# --------------------------------------------------------------------- zygote side


def _close_other_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _remap(spec: Any, parent_fds: list[int], fds: list[int]) -> Any:
    """The spec with our fd numbers in place of the supervisor's."""
    import dataclasses  # (imported by the worker anyway; not by the CLI before the zygote)

    if len(parent_fds) != len(fds):
        raise ValueError(f"{len(fds)} fds came for {len(parent_fds)}")
    ours = dict(zip(parent_fds, fds, strict=True))
    rings = {
        name: {k: (ours[v] if k in _FD_KEYS and isinstance(v, int) else v) for k, v in h.items()}
        for name, h in spec.rings.items()
    }
    return dataclasses.replace(spec, rings=rings, status_fd=ours[spec.status_fd])


def _exit(code: int) -> NoReturn:
    """Leave a forked process: what Python buffered is written, and nothing of the
    process it was forked from runs (its atexit hooks, its objects' finalizers)."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _become_worker(payload: bytes, fds: list[int], supervisor: int, serve: Any) -> None:
    """In the grandchild: wait to be the supervisor's and for its go, then run the
    worker. Never returns."""
    rc = _EXIT_RETRYABLE
    try:
        deadline = time.monotonic() + REPARENT_TIMEOUT_S
        while os.getppid() != supervisor:
            if time.monotonic() > deadline:
                return  # the supervisor is gone, or not our subreaper (exit: finally)
            time.sleep(0.0005)
        go, fds = fds[0], fds[1:]
        if os.read(go, 1) != GO:
            return  # not confirmed: the supervisor runs no such worker
        os.close(go)
        parent_fds, spec = pickle.loads(payload)
        set_name(WORKER_NAMES.get(spec.role, b"df-worker"))
        spec = _remap(spec, parent_fds, fds)
        _close_other_fds(set(fds))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        rc = serve(spec)
    except SystemExit as e:
        rc = 0 if e.code is None else e.code if isinstance(e.code, int) else _EXIT_RETRYABLE
    except BaseException:
        traceback.print_exc()
    finally:
        _exit(rc)


def _fork(sock: socket.socket, payload: bytes, fds: list[int], supervisor: int, serve: Any) -> int:
    r, w = os.pipe()
    try:
        middle = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        raise
    if middle == 0:
        try:
            os.close(r)
            sock.close()
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _become_worker(payload, fds, supervisor, serve)
            os.write(w, LEN.pack(pid))
        finally:
            os._exit(0)
    os.close(w)
    try:
        data = os.read(r, LEN.size)
    finally:
        os.close(r)
        os.waitpid(middle, 0)
    return LEN.unpack(data)[0] if len(data) == LEN.size else -1


def set_name(name: bytes) -> None:
    """The process name ``ps -o comm``, ``top`` and /proc/<pid>/comm show (15
    bytes): a fork keeps the CLI's command line, so this tells them apart."""
    prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]))


_SUPERVISOR_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _blank_exec_environ(names: list[str]) -> None:
    """Blank ``names`` in the environment block the CLI was exec'd with: forks share
    it, /proc/<pid>/environ shows it, and unsetenv only drops the pointers to it.
    So the zygote and its workers do not show the supervisor's systemd variables
    as theirs (systemd's NotifyAccess=main: only the supervisor notifies)."""
    if not names:
        return
    try:
        fields = stat_fields()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end (proc(5) 50, 51)
        shown = Path("/proc/self/environ").read_bytes()  # what the kernel reads there
    except (OSError, IndexError, ValueError):
        return
    if not 0 < start < end or end - start != len(shown):
        return  # not the layout we know: leave it
    block = ctypes.string_at(start, end - start)
    if block != shown:
        return
    wanted = {n.encode() for n in names}
    offset = 0
    for entry in block.split(b"\0"):
        if entry.partition(b"=")[0] in wanted:
            ctypes.memset(start + offset, 0, len(entry))
        offset += len(entry) + 1


def run(sock_fd: int, supervisor: int) -> None:
    """The zygote, in the child the CLI forked first thing. Never returns."""
    code = _EXIT_RETRYABLE
    try:
        set_name(ZYGOTE_NAME)
        dropped = [k for k in _SUPERVISOR_ONLY_ENV if os.environ.pop(k, None) is not None]
        _blank_exec_environ(dropped)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        _close_other_fds({sock_fd})
        code = main(socket.socket(fileno=sock_fd), supervisor)
    except BaseException:
        traceback.print_exc()
    finally:
        _exit(code)


def main(sock: socket.socket, supervisor: int) -> int:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor:
        return _EXIT_RETRYABLE
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor ends us (EOF)
    from dataflare.daemon.worker import serve, warm  # the point: import once, fork many

    gc.collect()
    gc.freeze()  # forked workers then do not touch these objects' pages
    while True:
        try:
            head, fds, flags, _ = socket.recv_fds(sock, LEN.size, MAX_FDS)
        except OSError:
            return 0
        if not head:
            return 0
        try:
            head += recv_exact(sock, LEN.size - len(head))
            payload = recv_exact(sock, LEN.unpack(head)[0])
            if flags & socket.MSG_CTRUNC:
                raise ValueError(f"the request's fds did not all arrive ({len(fds)} did)")
            if fds:
                pid = _fork(sock, payload, fds, supervisor, serve)
            else:
                request = pickle.loads(payload)
                if not (isinstance(request, tuple) and request[:1] == ("warm",)):
                    raise ValueError("a fork request without fds")
                warm(*request[1:])
                gc.freeze()  # (what the warm-up made, as after the imports)
                pid = 0
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
            sock.sendall(LEN.pack(pid))
        except OSError:
            return 0
