"""The supervisor: the daemon's main process.

It loads the configuration, runs each workflow as one apply process plus one
source process per source (joined by shared-memory rings), restarts them with
exponential backoff when they fail, serves the control socket, and drains on
SIGTERM/SIGINT. Signal handlers only set flags or schedule coroutines; the event
loop never blocks (the workers do the blocking work).

A workflow's ring contents are never trusted across a restart: on any failure both
halves are restarted and resume from the destinations' checkpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import pickle
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from dataflare.cdc.errors import EXIT_CONFIG, EXIT_FATAL, EXIT_OK
from dataflare.cdc.registry import SOURCE_TYPES
from dataflare.daemon import logs, sdnotify, zygote_client
from dataflare.daemon.config import (
    ConfigInvalid,
    ConfigIssue,
    DaemonConfig,
    WorkflowConfig,
    load_daemon_config,
)
from dataflare.daemon.reload import (
    ReloadPlan,
    drop_slot_hook,
    effective_config,
    plan_reload,
    restart_issues,
)
from dataflare.daemon.ring import RingOwner
from dataflare.daemon.status_model import WorkflowObserver, merge_table_counts, ring_fill
from dataflare.daemon.watch import ConfigWatcher
from dataflare.daemon.worker_spec import WorkerSpec
from dataflare.daemon.zygote import stat_fields
from dataflare.daemon.zygote_client import ForkedWorker
from dataflare.sinks.registry import SINK_TYPES
from loguru import logger

# A worker: started the plain way, or forked by the zygote.
WorkerProcess = asyncio.subprocess.Process | ForkedWorker

VERSION = "0.1.0"
RING_CAPACITY = 32 * 1024 * 1024
DRAIN_TIMEOUT_S = 20.0  # SIGTERM: sources stop, the apply process drains, all exit within this
KILL_GRACE_S = 3.0
STRAY_CHECK_S = 30.0  # how often exited children nothing waits for are looked for
HEALTHY_AFTER_S = 60.0  # a run this long resets the restart backoff
SHM_PREFIX = "dataflare"
_KEPT_NOTE = "config file invalid: running the last good configuration"


def warm_zygote(config: DaemonConfig) -> None:
    """Have the zygote get ready for this configuration's workers (their logging,
    their source and sink classes), once, rather than each forked worker itself.
    Runs in the background; forks wait for it (zygote_client.warmed)."""
    z = zygote_client.current()
    if z is None:
        return
    paths = {SOURCE_TYPES[n.type].implementation for wf in config.workflows for n in wf.sources}
    paths |= {SINK_TYPES[n.type].implementation for wf in config.workflows for n in wf.destinations}
    d = config.daemon
    zygote_client.warming = asyncio.ensure_future(
        asyncio.to_thread(z.warm, d.log_level, d.log_format, sorted(paths))
    )


class WorkflowState(enum.StrEnum):
    STARTING = "starting"
    SNAPSHOTTING = "snapshotting"
    STREAMING = "streaming"
    PAUSED = "paused"
    RETRYING = "retrying"
    FAILED = "failed"
    STOPPED = "stopped"


class Outcome(enum.Enum):
    FINISHED = "finished"  # every source ended and everything was applied
    STOPPED = "stopped"  # we asked it to stop
    RETRY = "retry"
    FATAL = "fatal"


class _Proc:
    """A worker process and the JSON status lines it sends."""

    def __init__(self, role: str, proc: WorkerProcess, reader_task: asyncio.Task[None]):
        self.role = role
        self.proc = proc
        self.reader_task = reader_task


class WorkflowRunner:
    def __init__(self, cfg: WorkflowConfig, daemon: DaemonConfig) -> None:
        self.cfg = cfg
        self.daemon = daemon
        self.state = WorkflowState.STOPPED
        self.desired = "run"  # run | pause | stop
        self.last_error: str | None = None
        self.errors = 0
        self.restarts = 0
        self.note = ""
        self.started_at: float | None = None
        self.log = logger.bind(workflow=cfg.name, component="supervisor")
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._procs: list[_Proc] = []
        self._source_status: dict[str, dict[str, Any]] = {}
        self._worker_state: dict[str, str] = {}
        self._apply_status: dict[str, Any] = {}
        self._base_in = 0
        self._base_out = 0
        self._base_written: dict[str, int] = {}

    # ---------------------------------------------------------------- control

    def start(self) -> None:
        self.desired = "run"
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._main(), name=f"workflow:{self.cfg.name}")

    async def stop(self, desired: str = "stop") -> None:
        self.desired = desired
        self._wake.set()
        if self._task is not None:
            await asyncio.shield(self._task)
        self.state = WorkflowState.PAUSED if desired == "pause" else WorkflowState.STOPPED

    async def restart(self) -> None:
        await self.stop()
        self.start()

    # ---------------------------------------------------------------- main loop

    async def _main(self) -> None:
        eh = self.cfg.sources[0].error_handling if self.cfg.sources else None
        initial = eh.initial_backoff if eh else 0.1
        maximum = eh.max_backoff if eh else 30.0
        backoff = initial
        while self.desired == "run":
            self.state = WorkflowState.STARTING
            began = time.monotonic()
            self.started_at = time.time()
            try:
                outcome = await self._run_once()
            except Exception as e:  # never let one workflow take the daemon down
                self.log.exception("workflow run failed: {}", e)
                self.last_error = f"{type(e).__name__}: {e}"
                self.errors += 1
                outcome = Outcome.RETRY
            if outcome is Outcome.FINISHED:
                self.state = WorkflowState.STOPPED
                self.note = "all sources finished"
                self.log.info("workflow finished: every source ended and was applied")
                return
            if outcome is Outcome.STOPPED or self.desired != "run":
                break
            if outcome is Outcome.FATAL:
                self.state = WorkflowState.FAILED
                self.log.error("workflow failed: {}", self.last_error)
                return
            if time.monotonic() - began > HEALTHY_AFTER_S:
                backoff = initial
            self.state = WorkflowState.RETRYING
            self.restarts += 1
            self.log.warning(
                "restarting in {:.1f}s (restart #{}): {}", backoff, self.restarts, self.last_error
            )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)
            backoff = min(backoff * 2, maximum)
        self.state = WorkflowState.PAUSED if self.desired == "pause" else WorkflowState.STOPPED

    async def _run_once(self) -> Outcome:
        rings: dict[str, RingOwner] = {}
        self._procs = []
        self._worker_state = {}
        self._worker_errors: dict[str, str] = {}
        try:
            for s in self.cfg.sources:
                rings[s.name] = RingOwner.create(
                    RING_CAPACITY, name_prefix=f"{SHM_PREFIX}.{os.getpid()}"
                )
            apply = await self._spawn(
                "apply",
                "",
                {n: r.consumer_handles() for n, r in rings.items()},
                [fd for r in rings.values() for fd in r.consumer_fds()],
            )
            sources = [
                await self._spawn("source", n, {n: r.producer_handles()}, r.producer_fds())
                for n, r in rings.items()
            ]
            for r in rings.values():
                r.close_child_ends()
            self.log.info(
                "started: apply pid {}, source pids {}",
                apply.proc.pid,
                [p.proc.pid for p in sources],
            )
            return await self._watch(apply, sources)
        finally:
            await self._reap_all()
            for r in rings.values():
                r.destroy()
            self._fold_counters()

    async def _watch(self, apply: _Proc, sources: list[_Proc]) -> Outcome:
        waits: dict[asyncio.Task[int], _Proc] = {
            asyncio.create_task(p.proc.wait()): p for p in (apply, *sources)
        }
        self._wake.clear()
        wake = asyncio.create_task(self._wake.wait())
        if self.desired != "run":
            self._wake.set()  # stop() came while the workers were being spawned
        try:
            while True:
                done, _ = await asyncio.wait({*waits, wake}, return_when=asyncio.FIRST_COMPLETED)
                if wake in done:
                    if self.desired != "run":
                        await self._drain(apply, sources)
                        return Outcome.STOPPED
                    self._wake.clear()
                    wake = asyncio.create_task(self._wake.wait())
                for t in done - {wake}:
                    p = waits.pop(t)
                    rc = t.result()
                    await p.reader_task
                    if rc == EXIT_OK and p is not apply:
                        continue  # a source ended its ring; the apply process drains it
                    if rc == EXIT_OK and waits:
                        # The apply process finished after the sources ended, but their
                        # exits may not have been reaped yet: give them a moment.
                        await asyncio.wait(waits.keys(), timeout=KILL_GRACE_S)
                        for t2 in [t2 for t2 in waits if t2.done() and t2.result() == EXIT_OK]:
                            await waits.pop(t2).reader_task
                    if rc == EXIT_OK and not any(q is not apply for q in waits.values()):
                        return Outcome.FINISHED
                    if rc == EXIT_OK:
                        self.last_error = "apply process exited while sources were running"
                    else:
                        self.last_error = await self._root_cause(p, rc, waits)
                    self.errors += 1
                    self.log.warning("{} exited with {}", p.role, _describe_rc(rc))
                    return Outcome.FATAL if rc in (EXIT_FATAL, EXIT_CONFIG) else Outcome.RETRY
        finally:
            wake.cancel()
            for t in waits:
                t.cancel()

    async def _root_cause(
        self, first: _Proc, rc: int, others: dict[asyncio.Task[int], _Proc]
    ) -> str:
        """Why the run failed. When one worker dies its peers fail too ("the other
        side of the ring died"); the process that died without saying why (killed,
        crashed) is the cause, else the first one's own message."""
        if others:
            await asyncio.wait(others.keys(), timeout=KILL_GRACE_S)
        ended = [(first, rc)] + [(q, t.result()) for t, q in others.items() if t.done()]
        for q, code in ended:
            if code != EXIT_OK and q.role not in self._worker_errors:
                return f"{q.role} process exited with {_describe_rc(code)}"
        return self._worker_errors.get(first.role) or f"{first.role} exited with {_describe_rc(rc)}"

    async def _drain(self, apply: _Proc, sources: list[_Proc]) -> None:
        """Stop reading, let the apply process apply what is in the rings, exit."""
        self.log.info("draining")
        for p in sources:
            _signal(p.proc, signal.SIGTERM)
        _signal(apply.proc, signal.SIGTERM)
        procs = [apply.proc, *(p.proc for p in sources)]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), DRAIN_TIMEOUT_S)
        except TimeoutError:
            self.log.error("drain took longer than {}s; killing workers", DRAIN_TIMEOUT_S)
        self.log.info("drained")

    def worker_pids(self) -> list[int]:
        """Every worker process of this run, exited or not (their waiters reap them)."""
        return [p.proc.pid for p in self._procs]

    async def _reap_all(self) -> None:
        for p in self._procs:
            if p.proc.returncode is None:
                _signal(p.proc, signal.SIGTERM)
        for p in self._procs:
            try:
                await asyncio.wait_for(p.proc.wait(), KILL_GRACE_S)
            except TimeoutError:
                _signal(p.proc, signal.SIGKILL)
                await p.proc.wait()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.reader_task, KILL_GRACE_S)

    async def _spawn(
        self, role: str, source: str, rings: dict[str, dict[str, int | str]], fds: list[int]
    ) -> _Proc:
        r, w = os.pipe()
        spec = WorkerSpec(
            role="source" if role == "source" else "apply",
            workflow=self.cfg,
            rings=rings,
            state_dir=self.daemon.daemon.state_dir,
            status_fd=w,
            parent_pid=os.getpid(),
            source=source,
            log_level=self.daemon.daemon.log_level,
            log_format=self.daemon.daemon.log_format,
        )
        try:
            proc: WorkerProcess | None = None
            if (z := zygote_client.current()) is not None:
                proc = await self._fork_worker(z, spec, [w, *fds])
            if proc is None:
                proc = await self._exec_worker(spec, [w, *fds])
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        label = f"source:{source}" if role == "source" else "apply"
        p = _Proc(label, proc, asyncio.create_task(self._read_status(label, r)))
        self._procs.append(p)
        return p

    async def _fork_worker(
        self, z: zygote_client.Zygote, spec: WorkerSpec, fds: list[int]
    ) -> ForkedWorker | None:
        """The worker forked by the zygote, or None (then the plain way)."""
        await zygote_client.warmed()
        go_r, go_w = os.pipe()
        try:
            forking = asyncio.ensure_future(asyncio.to_thread(z.fork, spec, fds, go_r))
            try:
                pid = await asyncio.shield(forking)
            except asyncio.CancelledError:
                # The thread still sends our fds: they stay open until it is done (even
                # if cancelled again), and the worker it may fork never gets its go.
                while not forking.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait({forking})
                raise
            if pid is None:
                self.log.warning("the zygote could not fork a worker: starting it the plain way")
                return None
            proc = ForkedWorker(pid)
            zygote_client.confirm(go_w)
            return proc
        finally:
            os.close(go_r)
            os.close(go_w)

    @staticmethod
    async def _exec_worker(spec: WorkerSpec, fds: list[int]) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dataflare.daemon.worker",
            stdin=asyncio.subprocess.PIPE,
            pass_fds=fds,
        )
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(spec))
        await proc.stdin.drain()
        proc.stdin.close()
        return proc

    async def _read_status(self, label: str, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            async for line in reader:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                self._on_status(label, msg)
        finally:
            transport.close()

    def _on_status(self, label: str, msg: dict[str, Any]) -> None:
        kind = msg.get("t")
        obs = self._observer()
        obs.observe(self.state.value, self.restarts, self.last_error)
        if kind == "state":
            self._worker_state[label] = str(msg.get("state"))
            obs.note("INFO", label, f"{label} {msg.get('state')}")
            if msg.get("state") == "starting" and label.startswith("source:"):
                # a new source process counts its tables from 0: keep the old totals
                prev = self._source_status.get(label.partition(":")[2], {})
                merge_table_counts(self._table_base(), prev.pop("tables", None) or {})
            states = set(self._worker_state.values())
            if (
                len(self._worker_state) == len(self._procs)
                and self.state is not WorkflowState.RETRYING
            ):
                if "snapshotting" in states:
                    self.state = WorkflowState.SNAPSHOTTING
                elif states == {"streaming"}:
                    self.state = WorkflowState.STREAMING
        elif kind == "status":
            if msg.get("role") == "source":
                self._source_status[str(msg.get("source"))] = msg
            else:
                self._apply_status = msg
            obs.rates.sample(self._counters())
        elif kind == "error":
            self._worker_errors[label] = str(msg.get("message"))
            obs.error(label, str(msg.get("message")), bool(msg.get("fatal")))
        obs.observe(self.state.value, self.restarts, self.last_error)

    def _fold_counters(self) -> None:
        """Keep totals across restarts: add this run's counters to the base."""
        self._base_in += sum(int(s.get("records_in", 0)) for s in self._source_status.values())
        self._base_out += int(self._apply_status.get("records_out", 0))
        for name, d in (self._apply_status.get("destinations") or {}).items():
            self._base_written[name] = self._base_written.get(name, 0) + int(
                d.get("records_written", 0)
            )
        for s in self._source_status.values():
            s["records_in"] = 0
        self._apply_status = {
            **self._apply_status,
            "records_out": 0,
            "destinations": {
                n: {**d, "records_written": 0}
                for n, d in (self._apply_status.get("destinations") or {}).items()
            },
        }

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        obs = self._observer()
        obs.observe(self.state.value, self.restarts, self.last_error)
        rates = obs.rates
        sources = []
        tables = merge_table_counts({}, self._table_base())
        batches = int(self._apply_status.get("batches", 0))
        for s in self.cfg.sources:
            st = self._source_status.get(s.name, {})
            merge_table_counts(tables, st.get("tables") or {})
            sources.append(
                {
                    "name": s.name,
                    "type": s.type,
                    "position": st.get("position"),
                    "confirmed": st.get("confirmed"),
                    "lag_bytes": st.get("lag_bytes"),
                    "lag_seconds": st.get("lag_seconds"),
                    "snapshot": st.get("snapshot"),
                    "records_in": self._base_in_for(s.name) + int(st.get("records_in", 0)),
                    "rate_in": round(rates.rate(f"in:{s.name}"), 1),
                    "batches": int(st.get("batches", 0)),
                    "ring_used": st.get("ring_used"),
                    "ring_capacity": st.get("ring_capacity"),
                    "ring_fill": ring_fill(st.get("ring_used"), st.get("ring_capacity")),
                    "tables": st.get("tables") or {},
                }
            )
        dest_status = self._apply_status.get("destinations") or {}
        destinations = []
        for d in self.cfg.destinations:
            st = dest_status.get(d.name, {})
            destinations.append(
                {
                    **st,  # destination-specific keys (duplicates, stream, ...); these win
                    "name": d.name,
                    "type": d.type,
                    "position": st.get("position"),
                    "records_written": self._base_written.get(d.name, 0)
                    + int(st.get("records_written", 0)),
                    "rate_out": round(rates.rate(f"out:{d.name}"), 1),
                    "errors": int(st.get("errors", 0)),
                    "dead_letters": int(st.get("dead_letters", 0)),
                    "rejected": int(st.get("rejected", 0)),
                    "circuit": st.get("circuit", "closed"),
                }
            )
        counters = self._counters()
        failing = self.state in (WorkflowState.FAILED, WorkflowState.RETRYING)
        return {
            "name": self.cfg.name,
            "description": self.cfg.description,
            "state": self.state.value,
            "state_reason": (self.last_error if failing else self.note) or None,
            "sources": sources,
            "destinations": destinations,
            "records_in": counters["in"],
            "records_out": counters["out"],
            "rate_in": round(rates.rate("in"), 1),
            "rate_out": round(rates.rate("out"), 1),
            "batches": batches,
            "errors": self.errors,
            "dead_letters": int(
                self._apply_status.get("dead_letters")
                or sum(d["dead_letters"] for d in destinations)
            ),
            "transformations": self._apply_status.get("transformations") or {},
            "last_error": self.last_error,
            "restarts": self.restarts,
            "note": self.note,
            "started_at": self.started_at,
            "pids": [p.proc.pid for p in self._procs if p.proc.returncode is None],
            "tables": tables,
            "recent_errors": list(obs.recent_errors),
            "log": list(obs.log),
        }

    def _observer(self) -> WorkflowObserver:
        """Rates, recent errors and the log tail (created on first use)."""
        obs: WorkflowObserver | None = getattr(self, "_obs", None)
        if obs is None:
            obs = self._obs = WorkflowObserver()
        return obs

    def _table_base(self) -> dict[str, dict[str, int]]:
        """Per-table counts of earlier source processes of this workflow."""
        base: dict[str, dict[str, int]] | None = getattr(self, "_tables_base", None)
        if base is None:
            base = {}
            self._tables_base: dict[str, dict[str, int]] = base
        return base

    def _counters(self) -> dict[str, int]:
        """Cumulative counters (across restarts) that rates are computed from."""
        out: dict[str, int] = {
            "in": self._base_in
            + sum(int(s.get("records_in", 0)) for s in self._source_status.values()),
            "out": self._base_out + int(self._apply_status.get("records_out", 0)),
        }
        for s in self.cfg.sources:
            st = self._source_status.get(s.name, {})
            out[f"in:{s.name}"] = self._base_in_for(s.name) + int(st.get("records_in", 0))
        for name, d in (self._apply_status.get("destinations") or {}).items():
            out[f"out:{name}"] = self._base_written.get(name, 0) + int(d.get("records_written", 0))
        return out

    def _base_in_for(self, source: str) -> int:
        return self._base_in if len(self.cfg.sources) == 1 else 0


def _signal(proc: WorkerProcess, sig: int) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _describe_rc(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


def exited_children(known: set[int]) -> set[int]:
    """Our children that have exited (zombies) and are not in ``known``."""
    me = os.getpid()
    out: set[int] = set()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in known:
            try:
                fields = stat_fields(name)
            except (OSError, IndexError):
                continue
            if fields[0] == "Z" and int(fields[1]) == me:
                out.add(int(name))
    return out


def reap_strays(known: set[int], seen_before: set[int]) -> tuple[int, set[int]]:
    """Reap the exited children that nothing waits for, as a child subreaper inherits
    them: forks whose pid never reached us (a worker whose go never came, a middle
    process left by a zygote killed mid-fork). One is reaped only when it was already
    a zombie at the previous check (``seen_before``), so a worker's own waiter, about
    to reap it, is never raced. Returns (reaped, the zombies to remember)."""
    now = exited_children(known)
    reaped = 0
    for pid in now & seen_before:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0]:
                reaped += 1
    return reaped, now - seen_before


def cleanup_stale_rings(shm_dir: str = "/dev/shm") -> int:
    """Unlink rings left by a daemon that was killed (its pid is in the name)."""
    removed = 0
    pat = re.compile(rf"^{SHM_PREFIX}\.(\d+)\.")
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(shm_dir):
            m = pat.match(name)
            if not m or int(m.group(1)) == os.getpid():
                continue
            try:
                os.kill(int(m.group(1)), 0)
                continue  # that daemon is alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(shm_dir, name))
                removed += 1
    return removed


class Supervisor:
    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self.config: DaemonConfig | None = None
        self.config_errors: list[ConfigIssue] = []
        self.config_generation = 0
        self.runners: dict[str, WorkflowRunner] = {}
        self.started = time.time()
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._reload_wanted = asyncio.Event()
        self._reload_reasons: list[str] = []
        self._control: Any = None
        self._watcher: ConfigWatcher | None = None
        self._background: list[asyncio.Task[None]] = []
        # Daemon settings changed in the file that wait for a restart (descriptions).
        self.pending_restart: list[str] = []

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> int:
        try:
            config, issues = load_daemon_config(self.config_path)
        except ConfigInvalid as e:
            logs.configure("INFO", "text")
            for issue in e.issues:
                logger.error("config: {}", issue)
            return EXIT_CONFIG
        sdnotify.capture_environment()  # workers must not inherit NOTIFY_SOCKET
        self.config = config
        self.config_errors = list(issues)
        self.config_generation = 1
        d = config.daemon
        logs.configure(d.log_level, d.log_format, component="supervisor")
        for issue in issues:
            logger.error("config: {} (workflow left out)", issue)
        os.makedirs(d.state_dir, mode=0o700, exist_ok=True)
        if cleaned := cleanup_stale_rings():
            logger.info("removed {} ring(s) left by a killed daemon", cleaned)
        from dataflare.daemon.control import ControlServer

        self._control = ControlServer(d.socket, self.handle, self.status)
        await self._control.start()
        self._metrics = await self._start_metrics(d.metrics_listen)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        # Handlers only set flags; the reload loop does the work (one path for all).
        loop.add_signal_handler(signal.SIGHUP, self.request_reload, "SIGHUP")
        logger.info(
            "dataflare {} started: {} workflow(s), socket {}",
            VERSION,
            len(config.workflows),
            d.socket,
        )
        try:
            warm_zygote(config)
            for wf in config.workflows:
                self._start_workflow(wf)
            self._start_background(config)
            sdnotify.ready(self._status_line())
            await self._stop.wait()
            sdnotify.stopping(f"draining {len(self.runners)} workflow(s)")
            logger.info("stopping: draining {} workflow(s)", len(self.runners))
        finally:
            self._stop.set()  # a reload that has not started yet does nothing now
            await self._stop_background()
            with contextlib.suppress(TimeoutError):  # let a reload in progress finish
                await asyncio.wait_for(self._reload_lock.acquire(), DRAIN_TIMEOUT_S + KILL_GRACE_S)
            await asyncio.gather(*(r.stop() for r in self.runners.values()), return_exceptions=True)
            await self._control.close()
            if self._metrics is not None:
                await self._metrics.close()
            logger.info("stopped")
        return EXIT_OK

    async def _start_metrics(self, listen: str | None) -> Any:
        """The Prometheus endpoint when ``daemon.metrics_listen`` is set (None if not,
        or if it cannot listen: metrics are not worth refusing to replicate for)."""
        if not listen:
            return None
        from dataflare.daemon.metrics import MetricsServer

        server = MetricsServer(listen, self.status)
        try:
            await server.start()
        except (OSError, ValueError) as e:
            logger.error("metrics: cannot listen on {}: {}", listen, e)
            return None
        return server

    def request_stop(self) -> None:
        self._stop.set()

    def _start_background(self, config: DaemonConfig) -> None:
        """The reload loop, the config watcher, the systemd watchdog, STATUS= and
        the reaper of stray children."""
        self._background.append(asyncio.create_task(self._reload_loop(), name="reload"))
        self._background.append(asyncio.create_task(self._reap_strays(), name="reap-strays"))
        self._watcher = ConfigWatcher(
            self.config_path,
            config.workflows_dir,
            lambda paths: self.request_reload(
                "file change: " + ", ".join(os.path.basename(p) for p in paths)
            ),
        )
        self._watcher.start()
        interval = sdnotify.watchdog_interval()
        if interval is not None:
            logger.info("systemd watchdog: pinging every {:.3f}s", interval)
            self._background.append(
                asyncio.create_task(sdnotify.watchdog_loop(interval), name="watchdog")
            )
        if sdnotify.enabled():
            self._background.append(asyncio.create_task(self._status_loop(), name="sd-status"))

    async def _reap_strays(self) -> None:
        seen: set[int] = set()
        while True:
            await asyncio.sleep(STRAY_CHECK_S)
            known = {pid for r in self.runners.values() for pid in r.worker_pids()}
            if (z := zygote_client.pid()) is not None:
                known.add(z)
            reaped, seen = reap_strays(known, seen)
            if reaped:
                logger.info("reaped {} exited process(es) no worker waited for", reaped)

    async def _stop_background(self) -> None:
        if self._watcher is not None:
            await self._watcher.close()
        for t in self._background:
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()

    async def _status_loop(self) -> None:
        """Keep systemd's STATUS= line (`systemctl status`) current."""
        last = ""
        while True:
            line = self._status_line()
            if line != last:
                sdnotify.status(line)
                last = line
            await asyncio.sleep(2.0)

    def request_reload(self, reason: str) -> None:
        """Ask for a reload (SIGHUP, the watcher); requests during one are merged."""
        self._reload_reasons.append(reason)
        self._reload_wanted.set()

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            reasons, self._reload_reasons = self._reload_reasons, []
            try:
                await self.reload("; ".join(dict.fromkeys(reasons)) or "request")
            except Exception as e:  # a reload never takes the daemon down
                logger.exception("reload failed: {}", e)

    def _start_workflow(self, wf: WorkflowConfig) -> None:
        assert self.config is not None
        runner = WorkflowRunner(wf, self.config)
        self.runners[wf.name] = runner
        runner.start()

    def _status_line(self) -> str:
        states = [r.state.value for r in self.runners.values()]
        line = f"{len(states)} workflow(s): " + ", ".join(
            f"{states.count(s)} {s}" for s in sorted(set(states))
        )
        if self.config_errors:
            line += f"; {len(self.config_errors)} config error(s)"
        return line

    # ---------------------------------------------------------------- reload

    async def reload(self, reason: str = "dataflare reload") -> dict[str, Any]:
        """The one reload path (file change, SIGHUP, `dataflare reload`): parse,
        validate, diff per workflow (see dataflare.daemon.reload).

        An invalid daemon file keeps the whole running configuration; an invalid
        workflow file keeps that workflow on its last good configuration. Unchanged
        workflows are not touched."""
        async with self._reload_lock:
            if self._stop.is_set():
                return {"applied": False, "errors": ["the daemon is stopping"], "warnings": []}
            sdnotify.reloading(f"reloading ({reason})")
            try:
                return await self._reload(reason)
            finally:
                if not self._stop.is_set():  # after STOPPING=1, READY=1 would mislead
                    sdnotify.ready(self._status_line())

    async def _reload(self, reason: str) -> dict[str, Any]:
        logger.info("reloading the configuration ({})", reason)
        try:
            configured, issues = await asyncio.to_thread(load_daemon_config, self.config_path)
        except ConfigInvalid as e:
            self.config_errors = list(e.issues)
            for issue in e.issues:
                logger.error("config rejected, keeping the running one: {}", issue)
            return {"applied": False, "errors": [str(i) for i in e.issues], "warnings": []}
        old = self.config
        config, setting_changes = effective_config(old, configured)
        for c in setting_changes:
            (logger.info if c.applied else logger.warning)("config: {}", c.describe())
        self.pending_restart = [c.describe() for c in setting_changes if not c.applied]
        plan = plan_reload({n: r.cfg for n, r in self.runners.items()}, config.workflows, issues)
        self.config = config
        self.config_errors = list(issues) + restart_issues(self.config_path, setting_changes)
        self.config_generation += 1
        if old is None or (old.daemon.log_level, old.daemon.log_format) != (
            config.daemon.log_level,
            config.daemon.log_format,
        ):
            logs.configure(config.daemon.log_level, config.daemon.log_format, "supervisor")
        for issue in issues:
            logger.error("config: {}", issue)
        logger.debug(
            "reload plan: start {} restart {} stop {} keep {} unchanged {}",
            [w.name for w in plan.start],
            [w.name for w in plan.restart],
            [w.name for w in plan.stop],
            list(plan.keep),
            [w.name for w in plan.unchanged],
        )
        if self._watcher is not None:
            self._watcher.set_workflows_dir(config.workflows_dir)
        await self._apply_plan(plan, config)
        changes = plan.changes()
        logger.info(
            "config generation {} applied: {}",
            self.config_generation,
            " ".join(changes) or "no workflow changed",
        )
        return {
            "applied": True,
            "generation": self.config_generation,
            "changes": changes,
            "errors": [str(i) for i in issues],
            "warnings": self.pending_restart,
        }

    async def _apply_plan(self, plan: ReloadPlan, config: DaemonConfig) -> None:
        if plan.start or plan.restart:
            warm_zygote(config)
        for wf in plan.unchanged:
            runner = self.runners[wf.name]
            runner.cfg = wf  # same fingerprint: only description or file may differ
            runner.daemon = config  # log settings for its next start; no pause
            if runner.note.startswith(_KEPT_NOTE):
                runner.note = ""
        for name in plan.keep:
            runner = self.runners[name]
            runner.note = f"{_KEPT_NOTE} ({runner.cfg.file})"
            logger.bind(workflow=name).warning(
                "{} is invalid: keeping the last good configuration running", runner.cfg.file
            )

        async def stop_removed(wf: WorkflowConfig) -> None:
            runner = self.runners[wf.name]
            await runner.stop()
            del self.runners[wf.name]
            runner.log.info("workflow removed: stopped")
            if wf.drop_slot_on_remove:
                await self._drop_slots(wf)

        async def restart_changed(wf: WorkflowConfig) -> None:
            runner = self.runners[wf.name]
            paused = runner.desired == "pause"
            runner.log.info("workflow changed: draining, then restarting with the new config")
            await runner.stop("pause" if paused else "stop")
            runner.cfg = wf
            runner.daemon = config
            runner.note = ""
            if not paused:
                runner.start()

        # Drains run side by side: one slow workflow does not hold up the others.
        results = await asyncio.gather(
            *(stop_removed(w) for w in plan.stop),
            *(restart_changed(w) for w in plan.restart),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                logger.opt(exception=r).error("reload: a workflow failed to stop or restart")
        for wf in plan.start:
            self._start_workflow(wf)

    async def _drop_slots(self, wf: WorkflowConfig) -> None:
        """drop_slot_on_remove: call the source classes' optional drop_slot hook."""
        log = logger.bind(workflow=wf.name)
        try:
            hooks = drop_slot_hook(wf)
        except Exception as e:
            log.error("drop_slot_on_remove: cannot load the source: {}", e)
            return
        for source, call in hooks:
            try:
                await asyncio.wait_for(asyncio.to_thread(call), DRAIN_TIMEOUT_S)
                log.info("source {}: replication slot dropped (drop_slot_on_remove)", source)
            except Exception as e:
                log.error("source {}: could not drop the slot: {}", source, e)

    # ---------------------------------------------------------------- control socket

    async def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "status":
            return self.status()
        if cmd == "ping":
            return {"version": VERSION}
        if cmd == "workflow":
            name = str(args.get("workflow", ""))
            if name not in self.runners:
                raise KeyError(f"no workflow named {name!r}")
            return self.runners[name].status()
        if cmd == "reload":
            return await self.reload()
        if cmd in ("pause", "resume", "restart"):
            name = str(args.get("workflow", ""))
            runner = self.runners.get(name)
            if runner is None:
                raise KeyError(f"no workflow named {name!r}")
            if cmd == "pause":
                await runner.stop("pause")
            elif cmd == "resume":
                runner.start()
            else:
                await runner.restart()
            return runner.status()
        if cmd in ("dlq_list", "dlq_show", "dlq_replay", "dlq_purge"):
            return await self._dead_letters(cmd, args)
        raise ValueError(f"unknown command {cmd!r}")

    async def _dead_letters(self, cmd: str, args: dict[str, Any]) -> Any:
        from dataflare.daemon.deadletters import DeadLetterStore
        from dataflare.daemon.dlq_view import letter_detail
        from dataflare.daemon.state import StateStore

        name = str(args.get("workflow", ""))
        runner = self.runners.get(name)
        if runner is None:
            raise KeyError(f"no workflow named {name!r}")
        assert self.config is not None
        state_dir = self.config.daemon.state_dir
        raw_ids = args.get("ids")
        ids = None if not raw_ids else [int(i) for i in raw_ids]

        def run() -> Any:
            with StateStore(state_dir) as state:
                store = DeadLetterStore(state, name)
                if cmd == "dlq_list":
                    limit = int(args.get("limit") or 1000)
                    return {
                        "count": store.count(),
                        "letters": [d.summary() for d in store.letters(limit)],
                    }
                if cmd == "dlq_show":
                    found = [store.get(i) for i in ids or []]
                    missing = [i for i, d in zip(ids or [], found, strict=True) if d is None]
                    if missing:
                        raise KeyError(f"no dead letter {missing[0]} in workflow {name!r}")
                    return {"letters": [letter_detail(d) for d in found if d is not None]}
                if cmd == "dlq_purge":
                    return {"purged": store.purge(ids)}
                store.request_replay(ids)
                return {"requested": store.count() if ids is None else len(ids)}

        result = await asyncio.to_thread(run)
        if cmd == "dlq_replay":
            if runner.state not in (WorkflowState.STREAMING, WorkflowState.SNAPSHOTTING):
                result["note"] = (
                    f"workflow {name} is {runner.state.value}: the replay runs when it streams"
                )
            wait = float(args.get("wait") or 0)
            deadline = time.monotonic() + wait
            while wait and time.monotonic() < deadline:
                await asyncio.sleep(0.2)

                def outcome() -> Any:
                    with StateStore(state_dir) as state:
                        return DeadLetterStore(state, name).replay_result()

                done = await asyncio.to_thread(outcome)
                if done:
                    result.update(done)
                    break
        return result

    def status(self) -> dict[str, Any]:
        return {
            "daemon": {
                "version": VERSION,
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 1),
                "config_generation": self.config_generation,
                "config_file": self.config_path,
                "started_at": self.started,
                "socket": self.config.daemon.socket if self.config else None,
                "metrics_listen": self.config.daemon.metrics_listen if self.config else None,
                "config_errors": [
                    {"file": i.file, "line": i.line, "key": i.key, "message": i.message}
                    for i in self.config_errors
                ],
            },
            "workflows": [r.status() for r in self.runners.values()],
        }


def run_daemon(config_path: str, on_ready: Callable[[Supervisor], None] | None = None) -> int:
    zygote_client.start()  # no-op if the CLI started it already, before importing us
    try:
        sup = Supervisor(config_path)
        if on_ready:
            on_ready(sup)
        return asyncio.run(sup.run())
    finally:
        zygote_client.stop()
