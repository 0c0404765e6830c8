"""The two halves of a running workflow, each its own OS process.

A source process reads its source in batches and sends each encoded batch as one
frame into its ring; an apply process takes frames from every ring of the
workflow, writes them to the destinations and publishes, in each ring's ack area,
the position every destination has durably applied. The source confirms only that
position upstream. Version 1 of the ack is the start position: the apply process
reads the destinations' checkpoints and tells the source where to resume.

The supervisor starts ``python -m dataflare.daemon.worker`` and writes a pickled
:class:`WorkerSpec` to its stdin (never argv: the config holds secrets). Workers
report to the supervisor with JSON lines on ``status_fd``; logs go to stderr.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import operator
import os
import pickle
import select
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from dataflare.cdc.codec import (
    decode_batch,
    decode_position,
    encode_batch,
    encode_position,
    packb,
    unpackb,
)
from dataflare.cdc.errors import (
    EXIT_FATAL,
    EXIT_OK,
    EXIT_RETRYABLE,
    DataflareError,
    PeerDied,
    RingClosed,
)
from dataflare.cdc.model import Batch, Op, Position, TableId
from dataflare.cdc.registry import SOURCE_TYPES
from dataflare.cdc.source import SourceContext
from dataflare.daemon import logs
from dataflare.daemon.config import WorkflowConfig
from dataflare.daemon.dag import destinations_by_source
from dataflare.daemon.ring import RingConsumer, RingProducer
from dataflare.daemon.state import StateStore
from dataflare.sinks.base import Sink, SinkContext
from dataflare.sinks.registry import SINK_TYPES
from loguru import logger

STATUS_INTERVAL_S = 1.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerSpec:
    role: Literal["source", "apply"]
    workflow: WorkflowConfig
    rings: dict[str, dict[str, int | str]]  # source name -> producer/consumer handles
    state_dir: str
    status_fd: int
    parent_pid: int
    source: str = ""  # role "source": which source of the workflow
    log_level: str = "INFO"
    log_format: str = "json"
    extra: dict[str, Any] = field(default_factory=dict)


def load_class(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    cls: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return cls


def encode_ack(p: Position | None) -> bytes:
    return packb(None if p is None else encode_position(p))


def decode_ack(data: bytes) -> Position | None:
    raw = unpackb(data)
    return None if raw is None else decode_position(raw)


class StatusPipe:
    """JSON lines to the supervisor. A dead supervisor means we should go too."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._last = 0.0

    def send(self, kind: str, **fields: Any) -> None:
        line = (json.dumps({"t": kind, **fields}, default=str) + "\n").encode()
        try:
            os.write(self.fd, line)
        except BrokenPipeError:
            os._exit(EXIT_RETRYABLE)

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last >= STATUS_INTERVAL_S:
            self._last = now
            return True
        return False


class StopSignal:
    """SIGTERM/SIGINT set a flag and wake any ring wait through a self-pipe."""

    def __init__(self) -> None:
        self.requested = False
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.fd = r
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def drain(self) -> None:
        try:
            while os.read(self.fd, 512):
                pass
        except BlockingIOError:
            pass


def _die_with_parent(parent_pid: int) -> None:
    # If the supervisor is SIGKILLed its workers must not live on as orphans
    # writing to the same files as the next daemon.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass
    if os.getppid() != parent_pid:
        os._exit(EXIT_RETRYABLE)


# --------------------------------------------------------------------------- source


def run_source(spec: WorkerSpec, status: StatusPipe, stop: StopSignal) -> int:
    wf = spec.workflow
    node = next(n for n in wf.sources if n.name == spec.source)
    log = logger.bind(workflow=wf.name, component=f"source:{node.name}")
    producer = RingProducer.attach(spec.rings[node.name])
    state = StateStore(spec.state_dir)
    ctx = SourceContext(
        workflow=wf.name,
        state_dir=spec.state_dir,
        downstream_idle=lambda: producer.stats().used == 0,
        state=state,
    )
    source = load_class(SOURCE_TYPES[node.type].implementation)(node.name, node.config, ctx)
    try:
        status.send("state", state="starting")
        ack = producer.wait_ack(1, wake_fds=[stop.fd])
        if ack is None:
            log.info("stopped before start")
            return EXIT_OK
        seen_version, data = ack
        start = decode_ack(data)
        source.open(start)
        log.info("source open, resuming after {}", start if start else "the beginning")
        status.send("state", state="streaming")
        records = batches = 0
        tally: Counter[tuple[TableId, Op]] = Counter()  # (table, op) -> changes sent
        while not stop.requested:
            batch: Batch | None = source.read_batch(0.25)
            if batch is not None:
                frame = encode_batch(batch)
                while not producer.send(frame, timeout=1.0, wake_fds=[stop.fd]):
                    stop.drain()
                    if stop.requested:
                        break
                else:
                    records += len(batch)
                    batches += 1
                    # Counted in C: Change is a tuple (op, table, ...); named once per status.
                    changes = batch.changes
                    tally.update(zip(map(_TABLE, changes), map(_OP, changes), strict=True))
            version, data = producer.ack()
            if version != seen_version:
                seen_version = version
                confirmed = decode_ack(data)
                if confirmed is not None:
                    source.confirm(confirmed)
            if status.due():
                st = producer.stats()
                status.send(
                    "status",
                    role="source",
                    source=node.name,
                    records_in=records,
                    batches=batches,
                    ring_used=st.used,
                    ring_capacity=st.capacity,
                    tables=_table_counts(tally),
                    **source.status(),
                )
            if source.exhausted:
                log.info("source finished after {} records", records)
                break
        st = producer.stats()
        status.send(
            "status",
            role="source",
            source=node.name,
            records_in=records,
            batches=batches,
            ring_used=st.used,
            ring_capacity=st.capacity,
            tables=_table_counts(tally),
            **source.status(),
        )
        log.info("source stopping: {} records in {} batches", records, batches)
        return EXIT_OK
    finally:
        source.close()
        producer.close()
        state.close()


_OP = operator.itemgetter(0)
_TABLE = operator.itemgetter(1)


def _table_counts(tally: Counter[tuple[TableId, Op]]) -> dict[str, dict[str, int]]:
    """{table: {op: changes}} for the status line (op letters as in the change model)."""
    out: dict[str, dict[str, int]] = {}
    for (table, op), n in tally.items():
        out.setdefault(str(table), {})[op.value] = n
    return out


# ---------------------------------------------------------------------------- apply


class Applier:
    """Applies batches of every source to the destinations they reach."""

    def __init__(self, spec: WorkerSpec, state: StateStore) -> None:
        wf = spec.workflow
        self.wf = wf
        self.routes = destinations_by_source(wf)  # source -> destination names
        reached_by: dict[str, list[str]] = {d.name: [] for d in wf.destinations}
        for src, dests in self.routes.items():
            for d in dests:
                reached_by[d].append(src)
        self.sinks: dict[str, Sink] = {}
        for node in wf.destinations:
            ctx = SinkContext(wf.name, node.name, tuple(reached_by[node.name]), state)
            self.sinks[node.name] = load_class(SINK_TYPES[node.type].implementation)(
                node.name, node.config, ctx
            )
        self.checkpoints: dict[str, dict[str, Position | None]] = {}
        self.records_out = 0
        self.batches = 0

    def open(self) -> None:
        for name, sink in self.sinks.items():
            sink.open()
            self.checkpoints[name] = {
                s: sink.checkpoint(s) for s in self.routes if name in self.routes[s]
            }

    def start_position(self, source: str) -> Position | None:
        """Resume point of a source: the oldest checkpoint among its destinations."""
        points = [self.checkpoints[d][source] for d in self.routes[source]]
        if not points or any(p is None for p in points):
            return None
        return min(p for p in points if p is not None)

    def apply(self, source: str, batch: Batch) -> None:
        for dest in self.routes[source]:
            done = self.checkpoints[dest][source]
            part = batch
            if done is not None and batch.first <= done:
                if batch.complete and batch.last <= done:
                    continue  # re-sent window this destination already has
                part = Batch(
                    [c for c in batch.changes if c.position > done],
                    batch.schemas,
                    batch.first,
                    batch.last,
                    batch.complete,
                )
            self.sinks[dest].write(source, part)
            self.records_out += len(part.changes)
            if batch.complete:
                self.checkpoints[dest][source] = batch.last
        self.batches += 1

    def status(self) -> dict[str, Any]:
        dests = {}
        for name, sink in self.sinks.items():
            pos = [p for p in self.checkpoints.get(name, {}).values() if p is not None]
            dests[name] = {"position": str(max(pos)) if pos else None, **sink.status()}
        return {"records_out": self.records_out, "batches": self.batches, "destinations": dests}

    def close(self) -> None:
        for sink in self.sinks.values():
            try:
                sink.close()
            except Exception as e:  # closing must not hide the error that got us here
                logger.warning("closing a destination failed: {}", e)


def run_apply(spec: WorkerSpec, status: StatusPipe, stop: StopSignal) -> int:
    wf = spec.workflow
    log = logger.bind(workflow=wf.name, component="apply")
    consumers = {s: RingConsumer.attach(h) for s, h in spec.rings.items()}
    state = StateStore(spec.state_dir)
    applier = Applier(spec, state)
    try:
        status.send("state", state="starting")
        applier.open()
        for name, consumer in consumers.items():
            start = applier.start_position(name)
            consumer.set_ack(encode_ack(start))
        log.info("destinations open; {} source(s)", len(consumers))
        status.send("state", state="streaming")
        _apply_loop(applier, consumers, status, stop)
        status.send("status", role="apply", **applier.status())
        log.info("apply finished: {} records in {} batches", applier.records_out, applier.batches)
        return EXIT_OK
    finally:
        applier.close()
        for c in consumers.values():
            c.close()
        state.close()


def _apply_loop(
    applier: Applier, consumers: dict[str, RingConsumer], status: StatusPipe, stop: StopSignal
) -> None:
    """Drain every ring until each producer has closed it. SIGTERM is only noted:
    the sources stop on their own signal and end their rings, and what they sent
    is applied before we exit (drain)."""
    open_rings = dict(consumers)
    by_fd = {c.fileno(): name for name, c in consumers.items()}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    poller.register(stop.fd, select.POLLIN)
    sticky: str | None = None  # a source whose incomplete batch (large txn) is in flight
    while open_rings:
        if sticky is not None:
            ready = [sticky]
        else:
            events = poller.poll(STATUS_INTERVAL_S * 1000)
            ready = [by_fd[fd] for fd, _ in events if fd in by_fd]
            if any(fd == stop.fd for fd, _ in events):
                stop.drain()
        for name in ready:
            if name not in open_rings:
                continue
            consumer = open_rings[name]
            for _ in range(64):  # bounded, so one busy source cannot starve another
                try:
                    frame = consumer.recv(timeout=None if sticky == name else 0)
                except PeerDied:
                    raise
                except RingClosed:
                    del open_rings[name]
                    poller.unregister(consumer.fileno())
                    sticky = None if sticky == name else sticky
                    break
                if frame is None:
                    break
                batch = decode_batch(frame)
                applier.apply(name, batch)
                if batch.complete:
                    sticky = None
                    consumer.set_ack(encode_ack(applier.start_position(name)))
                else:
                    sticky = name
        if status.due():
            status.send("status", role="apply", **applier.status())


# ----------------------------------------------------------------------------- main


def main() -> int:
    # Each row makes several tuples; with the default threshold (700) the cyclic GC
    # runs every few rows. The hot path makes no reference cycles, so collect rarely.
    gc.freeze()
    gc.set_threshold(50_000, 50, 50)
    spec: WorkerSpec = pickle.load(sys.stdin.buffer)
    _die_with_parent(spec.parent_pid)
    role = f"{spec.role}:{spec.source}" if spec.role == "source" else "apply"
    logs.configure(spec.log_level, spec.log_format, component=role)
    status = StatusPipe(spec.status_fd)
    stop = StopSignal()
    try:
        if spec.role == "source":
            return run_source(spec, status, stop)
        return run_apply(spec, status, stop)
    except PeerDied as e:
        status.send("error", message=f"{role}: the other side of the ring died ({e})", fatal=False)
        logger.bind(workflow=spec.workflow.name).warning("{}: peer died: {}", role, e)
        return EXIT_RETRYABLE
    except DataflareError as e:
        fatal = not e.retryable
        status.send("error", message=str(e), fatal=fatal)
        logger.bind(workflow=spec.workflow.name).error("{} failed: {}", role, e)
        return EXIT_FATAL if fatal else EXIT_RETRYABLE
    except Exception as e:
        # Unexpected: treat as retryable (the supervisor backs off), keep the trace in the log.
        status.send("error", message=f"{type(e).__name__}: {e}", fatal=False)
        logger.bind(workflow=spec.workflow.name).error(
            "{} crashed: {}\n{}", role, e, traceback.format_exc()
        )
        return EXIT_RETRYABLE


if __name__ == "__main__":
    sys.exit(main())
