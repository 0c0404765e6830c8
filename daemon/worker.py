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

import contextlib
import ctypes
import functools
import gc
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
from collections.abc import Sequence
from typing import Any

from dataflare.cdc.codec import (
    decode_batch,
    decode_position,
    encode_batch,
    encode_position,
    packb,
    unpack_batch,
    unpackb,
)
from dataflare.cdc.errors import (
    EXIT_FATAL,
    EXIT_OK,
    EXIT_RETRYABLE,
    DataflareError,
    FatalError,
    PeerDied,
    RecordRefused,
    RetryableError,
    RingClosed,
)
from dataflare.cdc.model import Batch, Change, Op, Position, TableId, TableSchema
from dataflare.cdc.postgres.text_rows import materialize
from dataflare.cdc.registry import SOURCE_TYPES
from dataflare.cdc.source import SourceContext
from dataflare.daemon import logs
from dataflare.daemon.config import WorkflowConfig
from dataflare.daemon.dag import destinations_by_source
from dataflare.daemon.deadletters import DeadLetter, DeadLetterStore
from dataflare.daemon.retry import CircuitBreaker, backoff_delay
from dataflare.daemon.ring import RingConsumer, RingProducer
from dataflare.daemon.state import StateStore
from dataflare.daemon.transform_registry import TRANSFORM_TYPES
from dataflare.daemon.transforms.base import TransformContext
from dataflare.daemon.transforms.pipeline import Failure, NodeUnavailable, Pipeline
from dataflare.daemon.worker_spec import WorkerSpec, load_class
from dataflare.sinks.base import Rejected, Sink, SinkContext
from dataflare.sinks.registry import SINK_TYPES
from loguru import logger

STATUS_INTERVAL_S = 1.0
# Refusal isolation: changes of one open source transaction kept in memory per
# destination, and refused changes of one batch before giving up.
MAX_KEPT_CHANGES = 200_000
MAX_REFUSED_PER_BATCH = 100
_PR_SET_PDEATHSIG = 1


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


def takes_pg_text(wf: WorkflowConfig, dest: str) -> bool:
    """Does ``dest`` take rows as PostgreSQL text (``Batch.pg_text``) as they are?
    Only with no transformation in the workflow. (Refused changes are isolated and
    dead-lettered as values: the parts involved are materialized then.)"""
    if wf.transformations:
        return False
    node = next(d for d in wf.destinations if d.name == dest)
    check = getattr(load_class(SINK_TYPES[node.type].implementation), "takes_pg_text", None)
    return bool(check and check(node.config))


def warm(log_level: str, log_format: str, implementations: Sequence[str]) -> None:
    """In the zygote: get ready for workers of a configuration, so its forks skip
    it: logging set up as theirs will be, their source and sink classes imported.
    A class that fails to import is left to the worker, which reports it."""
    logs.configure(log_level, log_format, component="zygote")
    for path in implementations:
        with contextlib.suppress(Exception):
            load_class(path)


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
        pg_text=all(takes_pg_text(wf, d) for d in destinations_by_source(wf)[node.name]),
    )
    source = load_class(SOURCE_TYPES[node.type].implementation)(node.name, node.config, ctx)
    try:
        status.send("state", state="starting")
        if not stop.requested:
            source.prepare()  # while the apply process opens the destinations
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
                    if batch.packed is not None:
                        tally.update(batch.packed.counts)
                    else:
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
    """Applies batches of every source, through the transformations, to the
    destinations they reach; retries, circuit breakers and dead letters."""

    def __init__(self, spec: WorkerSpec, state: StateStore, stop: StopSignal | None = None) -> None:
        wf = spec.workflow
        self.wf = wf
        self.stop = stop
        self.log = logger.bind(workflow=wf.name, component="apply")
        self.routes = destinations_by_source(wf)  # source -> destination names
        reached_by: dict[str, list[str]] = {d.name: [] for d in wf.destinations}
        for src, dests in self.routes.items():
            for d in dests:
                reached_by[d].append(src)
        self.handling = {n.name: n.error_handling for n in (*wf.transformations, *wf.destinations)}
        self.dlq = DeadLetterStore(state, wf.name)
        self._letters: list[dict[str, Any]] = []  # refused changes, stored before checkpoints
        self.sinks: dict[str, Sink] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self.counts: dict[str, Counter[str]] = {}
        for node in wf.destinations:
            eh = node.error_handling
            ctx = SinkContext(
                wf.name,
                node.name,
                tuple(reached_by[node.name]),
                state,
                on_error=eh.on_error,
                reject=functools.partial(self._sink_rejected, node.name),
                stopping=self._stopping,
            )
            self.sinks[node.name] = load_class(SINK_TYPES[node.type].implementation)(
                node.name, node.config, ctx
            )
            self.breakers[node.name] = CircuitBreaker.of(eh)
            self.counts[node.name] = Counter()
        transforms: dict[str, Any] = {}
        for node in wf.transformations:
            tctx = TransformContext(wf.name, node.name)
            impl = load_class(TRANSFORM_TYPES[node.type].implementation)
            transforms[node.name] = impl(node.name, node.config, tctx)
            self.counts[node.name] = Counter()
        self.pipeline: Pipeline | None = None
        if transforms:
            policies = {n.name: n.error_handling.on_error for n in wf.transformations}
            self.pipeline = Pipeline(wf, transforms, policies, self._transform_rejected)
        self.checkpoints: dict[str, dict[str, Position | None]] = {}
        self._open_txn: dict[str, str | None] = {d.name: None for d in wf.destinations}
        # Parts of an open source transaction already written to a transactional
        # destination that refuses records (on_error skip/dead_letter): kept so a
        # refusal inside a large transaction or the snapshot can still be isolated.
        # (changes as values, layouts)
        self._txn_parts: dict[str, tuple[list[Change], list[TableSchema]]] = {}
        self._txn_overflow: set[str] = set()
        self._replaying = False  # destinations whose open transaction outgrew it
        self.records_out = 0
        self.batches = 0
        self.last_errors: dict[str, str] = {}
        self._writing: dict[TableId, TableSchema] = {}
        self.pg_text = {d.name: takes_pg_text(wf, d.name) for d in wf.destinations}
        self._keeps_packed: dict[str, bool] = {}

    def open(self) -> None:
        if self.pipeline is not None:
            for t in self.pipeline.transforms.values():
                t.open()
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

    # -------------------------------------------------------------------- apply

    def keeps_packed(self, source: str) -> bool:
        """May batches of ``source`` reach its destinations still packed (as their
        source's wire form, ``Batch.packed``)? Only when nothing between needs
        changes: no transformation, and every destination writes the packed form
        itself (``takes_packed``) and does not isolate refused records. (Fixed for
        the life of the process: asked per batch, worked out once.)"""
        keeps = self._keeps_packed.get(source)
        if keeps is None:
            keeps = self._keeps_packed[source] = self.pipeline is None and all(
                self.pg_text[d]
                and getattr(self.sinks[d], "takes_packed", False)
                and not self._isolating(d)
                for d in self.routes[source]
            )
        return keeps

    def apply(self, source: str, batch: Batch) -> None:
        dests = self.routes[source]
        if batch.packed is not None and not (
            self.keeps_packed(source)
            and not batch.replay
            and all(  # no destination has part of it already (a re-sent window)
                (done := self.checkpoints[d][source]) is None or batch.first > done for d in dests
            )
        ):
            batch = unpack_batch(batch)
        if batch.pg_text and not all(self.pg_text[d] for d in dests):
            batch = materialize(batch)
        changes = batch.changes
        # Every destination already has a prefix of this batch (a re-sent window):
        # transform only what some destination still lacks.
        floor = self.start_position(source)
        if floor is not None and batch.first <= floor:
            if batch.complete and batch.last <= floor:
                self.batches += 1
                return
            changes = [c for c in changes if c.position > floor]
        outputs: dict[str, tuple[list[Change], dict[TableId, TableSchema] | None]]
        if self.pipeline is None:
            outputs = {d: (changes, None) for d in dests}
        else:
            outputs = self._run_pipeline(source, changes, batch.schema_map())
        self._flush_letters()  # refused changes are durable before any checkpoint passes them
        for dest in dests:
            done = self.checkpoints[dest][source]
            if done is not None and batch.complete and batch.last <= done:
                continue  # re-sent window this destination already has
            part_changes, schemas = outputs.get(dest, ([], {}))
            if done is not None and batch.first <= done:
                part_changes = [c for c in part_changes if c.position > done]
            part = (
                batch
                if batch.packed is not None
                else Batch(
                    part_changes,
                    batch.schemas if schemas is None else list(schemas.values()),
                    batch.first,
                    batch.last,
                    batch.complete,
                    pg_text=batch.pg_text,
                )
            )
            self._write(dest, source, part)
            self.records_out += len(part)
            if batch.complete:
                self.checkpoints[dest][source] = batch.last
        self.batches += 1

    def _run_pipeline(
        self, source: str, changes: list[Change], schemas: dict[TableId, TableSchema]
    ) -> dict[str, tuple[list[Change], dict[TableId, TableSchema] | None]]:
        assert self.pipeline is not None
        attempt = 0
        while True:
            try:
                out = self.pipeline.run(source, changes, schemas)
                return {d: (c, s) for d, (c, s) in out.items()}
            except NodeUnavailable as e:
                self._letters.clear()  # the batch is run again from the start
                attempt += 1
                eh = self.handling[e.node]
                self.counts[e.node]["errors"] += 1
                self.last_errors[e.node] = str(e)
                if attempt > eh.retry_count:
                    raise
                delay = backoff_delay(eh, attempt)
                self.log.warning("{}; retry {} in {:.2f}s", e, attempt, delay)
                self._sleep(delay)

    def _write(self, dest: str, source: str, part: Batch) -> None:
        """Write with retries (reopening the destination) and the circuit breaker."""
        sink = self.sinks[dest]
        eh = self.handling[dest]
        breaker = self.breakers[dest]
        self._writing = part.schema_map()  # layouts of what a destination may refuse
        attempt = 0
        closed = False  # the last reopen failed: open before writing
        while True:
            wait = breaker.wait_s()
            if wait > 0:
                self._sleep(wait)
            try:
                if closed:
                    sink.open()
                    closed = False
                    if self._already_applied(dest, source, part):
                        breaker.success()
                        return
                sink.write(source, part)
                breaker.success()
                self._open_txn[dest] = None if part.complete else source
                self._keep_part(dest, part)
                return
            except RetryableError as e:
                attempt += 1
                self.counts[dest]["errors"] += 1
                self.last_errors[dest] = str(e)
                if self._open_txn[dest] is not None:
                    raise  # earlier parts of this transaction were lost with the connection
                opened = breaker.failure()
                if not opened and attempt > eh.retry_count:
                    raise
                delay = breaker.wait_s() if opened else backoff_delay(eh, attempt)
                self.log.warning(
                    "destination {}: {}; {} in {:.2f}s",
                    dest,
                    e,
                    "circuit open, next attempt" if opened else f"retry {attempt}",
                    delay,
                )
                self._sleep(delay)
                if not self._reopen(dest):
                    closed = True
                elif self._already_applied(dest, source, part):
                    breaker.success()  # the commit went through before the connection broke
                    return
            except RecordRefused as e:
                earlier, layouts = self._txn_parts.get(dest, ([], []))
                merged = {s.table: s for s in (*layouts, *part.schemas)}
                if (
                    not self._isolating(dest)
                    or not part.changes
                    or dest in self._txn_overflow
                    or len(merged) != len({(s.table, s) for s in (*layouts, *part.schemas)})
                ):
                    raise
                self.counts[dest]["errors"] += 1
                self.last_errors[dest] = str(e)
                self._reopen(dest)
                # Refused changes are isolated, and dead-lettered, as values.
                part = materialize(part)
                self._isolate(dest, source, part, earlier, list(merged.values()), str(e))
                return

    def _already_applied(self, dest: str, source: str, part: Batch) -> bool:
        """After a reopen: did the failed attempt commit after all (the connection
        broke after COMMIT reached the server)? Then writing again would duplicate."""
        if not part.complete or part.replay:
            return False
        now = self.sinks[dest].checkpoint(source)
        if now is not None and now >= part.last:
            self._open_txn[dest] = None
            self._txn_parts.pop(dest, None)
            return True
        return False

    def _isolating(self, dest: str) -> bool:
        return self.handling[dest].on_error != "fail" and bool(
            getattr(self.sinks[dest], "transactional", False)
        )

    def _keep_part(self, dest: str, part: Batch) -> None:
        if part.complete:
            self._txn_parts.pop(dest, None)
            self._txn_overflow.discard(dest)
        elif self._isolating(dest) and dest not in self._txn_overflow:
            changes, layouts = self._txn_parts.setdefault(dest, ([], []))
            # Kept as values (isolating works on them): loaded now if they came as text.
            changes.extend(materialize(part).changes)
            layouts.extend(s for s in part.schemas if s not in layouts)
            if len(changes) > MAX_KEPT_CHANGES:  # memory: give up isolating this one
                self._txn_parts.pop(dest, None)
                self._txn_overflow.add(dest)
                self.log.warning(
                    "destination {}: a source transaction of more than {} changes: a change "
                    "refused inside it will stop the workflow instead of being set aside",
                    dest,
                    MAX_KEPT_CHANGES,
                )

    def _isolate(
        self,
        dest: str,
        source: str,
        part: Batch,
        earlier: list[Change],
        layouts: list[TableSchema],
        first_error: str,
    ) -> None:
        """Find the changes a transactional destination refuses (bisecting in open
        transactions that are then abandoned), refuse them, and write the rest (with
        the checkpoint when ``part`` completes the source transaction): nothing is
        committed before the refused changes are known. ``earlier``: the parts of
        this source transaction written before, lost with the abandoned transaction."""
        sink = self.sinks[dest]
        schemas = {s.table: s for s in layouts}
        good: list[Change] = []
        rest = [*earlier, *part.changes]
        error = first_error
        refused = 0

        def probe(changes: list[Change]) -> str | None:
            """The refusal writing ``changes`` meets, None if none; always abandoned."""
            try:
                sink.write(source, Batch(changes, layouts, part.first, part.last, False))
                return None
            except RecordRefused as e:
                return str(e)
            finally:
                if not self._reopen(dest):
                    raise RetryableError(f"destination {dest}: reopening failed while probing")

        while True:
            if probe(good + rest) is None:
                # Every change goes in; the refusal comes at commit (a deferred
                # constraint): no change can be blamed.
                raise RecordRefused(f"{error} (refused at commit: no single change to blame)")
            lo, hi = 1, len(rest)
            while lo < hi:  # the smallest prefix of `rest` that is refused after `good`
                mid = (lo + hi) // 2
                found = probe(good + rest[:mid])
                if found is None:
                    lo = mid + 1
                else:
                    hi, error = mid, found
            refused += 1
            if refused > MAX_REFUSED_PER_BATCH:
                raise RecordRefused(
                    f"{error} (more than {MAX_REFUSED_PER_BATCH} changes of one batch refused: "
                    "fix the destination rather than set them all aside)"
                )
            self._sink_rejected(dest, source, [Rejected(rest[lo - 1], error)], schemas)
            good.extend(rest[: lo - 1])
            rest = rest[lo:]
            self._flush_letters()
            final = Batch(good + rest, layouts, part.first, part.last, part.complete)
            try:
                sink.write(source, final)
                self._open_txn[dest] = None if part.complete else source
                self._txn_parts.pop(dest, None)
                self._keep_part(dest, final)
                return
            except RecordRefused as e:
                error = str(e)
                if not self._reopen(dest):
                    raise RetryableError(
                        f"destination {dest}: reopening failed while isolating"
                    ) from e

    def _reopen(self, dest: str) -> bool:
        """Close and open a destination (dropping what a failed write left); False
        when it could not be opened (it is then closed)."""
        sink = self.sinks[dest]
        try:
            sink.close()
        except Exception as e:
            self.log.debug("closing destination {} for a retry: {}", dest, e)
        try:
            sink.open()
            return True
        except RetryableError as e:
            self.log.warning("destination {}: reopening failed: {}", dest, e)
            return False

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.requested

    def _sleep(self, seconds: float) -> None:
        """Wait, but give up (retryably) when asked to stop: nothing is lost, the
        checkpoints have not moved."""
        if self.stop is None:
            time.sleep(seconds)
            return
        if not self.stop.requested:
            ready, _, _ = select.select([self.stop.fd], [], [], seconds)
            if ready:
                self.stop.drain()
        if self.stop.requested:
            raise RetryableError("stopping while waiting to retry")

    # ---------------------------------------------------------------- refusals

    def _transform_rejected(self, failure: Failure) -> None:
        policy = self.handling[failure.node].on_error
        self.counts[failure.node]["rejected"] += 1
        self.last_errors[failure.node] = failure.error
        if policy == "dead_letter":
            self._letters.append(
                self.dlq.record(
                    failure.node,
                    "transform",
                    failure.source,
                    failure.change,
                    failure.schema,
                    failure.error,
                    failure.destinations,
                )
            )
        else:
            self.counts[failure.node]["skipped"] += 1
        self.log.warning(
            "transformation {}: a change of {} at {} refused ({}): {}",
            failure.node,
            failure.change.table,
            failure.change.position,
            "dead letter" if policy == "dead_letter" else "skipped",
            failure.error,
        )

    def _sink_rejected(
        self,
        dest: str,
        source: str,
        rejected: Sequence[Rejected],
        schemas: dict[TableId, TableSchema] | None = None,
    ) -> None:
        if self._replaying:  # refused again: the replay fails and the letter stays
            raise RecordRefused(rejected[0].error if rejected else "refused")
        policy = self.handling[dest].on_error
        for r in rejected:
            self.counts[dest]["rejected"] += 1
            self.last_errors[dest] = r.error
            schema = (schemas or self._writing).get(r.change.table)
            if policy == "dead_letter" and schema is not None:
                self._letters.append(
                    self.dlq.record(dest, "destination", source, r.change, schema, r.error, [dest])
                )
            else:
                self.counts[dest]["skipped"] += 1
        self.log.warning(
            "destination {}: {} change(s) refused ({}): {}",
            dest,
            len(rejected),
            "dead letters" if policy == "dead_letter" else "skipped",
            rejected[0].error if rejected else "",
        )
        self._flush_letters()

    def _flush_letters(self) -> None:
        if self._letters:
            letters, self._letters = self._letters, []
            self.dlq.put_many(letters)

    # ------------------------------------------------------------------- replay

    def replay_dead_letters(self) -> None:
        """Serve a `dataflare dlq replay` request, between batches."""
        asked, ids = self.dlq.take_replay_request()
        if not asked:
            return
        letters = (
            self.dlq.letters()
            if ids is None
            else [d for d in (self.dlq.get(i) for i in ids) if d is not None]
        )
        replayed = failed = 0
        for letter in letters:
            pending = list(letter.destinations)
            try:
                self._replay(letter, pending)
            except Exception as e:  # the letter stays, with its new error
                if isinstance(e, RetryableError) and self.stop is not None and self.stop.requested:
                    raise
                failed += 1
                self.dlq.update_failed(letter, str(e), pending)
                continue
            self.dlq.delete(letter.id)
            replayed += 1
        self.log.info("dead letters replayed: {} ok, {} still failing", replayed, failed)
        self.dlq.put_replay_result({"replayed": replayed, "failed": failed})

    def _replay(self, letter: DeadLetter, pending: list[str]) -> None:
        """Send a letter through its node and on; ``pending`` loses each destination
        that took it (a later retry must not write it there twice)."""
        if letter.stage == "destination":
            outputs = {letter.node: ([letter.change], {letter.schema.table: letter.schema})}
        else:
            if self.pipeline is None:
                raise FatalError(f"transformation {letter.node} is no longer in the workflow")
            failures: list[Failure] = []
            saved = self.pipeline.reject
            self.pipeline.reject = failures.append
            saved_policy = self.pipeline.policies.get(letter.node)
            self.pipeline.policies[letter.node] = "fail"  # a replay that fails keeps its letter
            try:
                outputs = self.pipeline.run_from(
                    letter.node, letter.source, letter.change, letter.schema
                )
            finally:
                self.pipeline.reject = saved
                if saved_policy is not None:
                    self.pipeline.policies[letter.node] = saved_policy
            if failures:
                raise FatalError(failures[0].error)
        for dest in list(pending):
            if dest not in self.sinks:
                raise FatalError(f"destination {dest} is no longer in the workflow")
            changes, schemas = outputs.get(dest, ([], {}))
            if changes:  # (none: the node now routes or filters it elsewhere)
                at = self.checkpoints.get(dest, {}).get(letter.source)
                if at is None:  # nothing committed yet (a snapshot in progress): later
                    raise FatalError(f"destination {dest} has no checkpoint yet; replay later")
                # Checkpoint unchanged: the replayed change is old, the destination is not.
                part = Batch(changes, list(schemas.values()), at, at, True, str(letter.id))
                self._replaying = True
                try:
                    self._write(dest, letter.source, part)
                finally:
                    self._replaying = False
                self.records_out += len(changes)
            pending.remove(dest)

    # ------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        dests = {}
        letters = self.dlq.count()
        for name, sink in self.sinks.items():
            pos = [p for p in self.checkpoints.get(name, {}).values() if p is not None]
            c = self.counts[name]
            dests[name] = {
                "position": str(max(pos)) if pos else None,
                "errors": c["errors"],
                "rejected": c["rejected"],
                "skipped": c["skipped"],
                "circuit": self.breakers[name].state,
                **sink.status(),
            }
        out: dict[str, Any] = {
            "records_out": self.records_out,
            "batches": self.batches,
            "destinations": dests,
            "dead_letters": letters,
        }
        if self.pipeline is not None:
            nodes = self.pipeline.status()
            for name, st in nodes.items():
                c = self.counts[name]
                st.update(errors=c["errors"], skipped=c["skipped"])
            out["transformations"] = nodes
        if self.last_errors:
            out["node_errors"] = dict(self.last_errors)
        return out

    def close(self) -> None:
        for sink in self.sinks.values():
            try:
                sink.close()
            except Exception as e:  # closing must not hide the error that got us here
                logger.warning("closing a destination failed: {}", e)
        if self.pipeline is not None:
            for t in self.pipeline.transforms.values():
                try:
                    t.close()
                except Exception as e:
                    logger.warning("closing a transformation failed: {}", e)


def run_apply(spec: WorkerSpec, status: StatusPipe, stop: StopSignal) -> int:
    wf = spec.workflow
    log = logger.bind(workflow=wf.name, component="apply")
    consumers = {s: RingConsumer.attach(h) for s, h in spec.rings.items()}
    state = StateStore(spec.state_dir)
    applier = Applier(spec, state, stop)
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
                batch = decode_batch(frame, keep_packed=applier.keeps_packed(name))
                applier.apply(name, batch)
                if batch.complete:
                    sticky = None
                    consumer.set_ack(encode_ack(applier.start_position(name)))
                else:
                    sticky = name
        if status.due():
            if sticky is None:
                applier.replay_dead_letters()
            status.send("status", role="apply", **applier.status())


# ----------------------------------------------------------------------------- main


def main() -> int:
    """A worker started the plain way: its spec comes pickled on stdin."""
    spec: WorkerSpec = pickle.load(sys.stdin.buffer)
    return serve(spec)


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TRIM_THRESHOLD = 64 << 20
MMAP_THRESHOLD = 32 << 20  # glibc's largest


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep what a batch freed for the next batch.

    Every batch allocates buffers of hundreds of KB (a frame, its msgpack) and frees
    them. By default glibc maps such blocks afresh or returns the top of the heap
    once over 2x its adaptive threshold, so the next batch faulted the same pages in
    again, zeroed: page faults were a fifth of the source's CPU while catching up
    (perf), 17 per 1000 rows in the apply. Held memory stays bounded by the largest
    batch; a block over 32 MB is still mapped and unmapped. No-op off glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def serve(spec: WorkerSpec) -> int:
    """Run one worker (also the entry of a worker forked by the zygote)."""
    # Each row makes several tuples; with the default threshold (700) the cyclic GC
    # runs every few rows. The hot path makes no reference cycles, so collect rarely.
    gc.freeze()
    gc.set_threshold(50_000, 50, 50)
    # Catching up is batch work on cores the databases share. Our workers wake often
    # (the source ~7 times, the apply ~5 per 1000 rows), and as SCHED_OTHER a wakeup
    # preempted the walsender or the sink's backend mid-work: 3 and 8 involuntary
    # switches per 1000 rows, against 1 each as SCHED_BATCH, whose wakeups never
    # preempt (bench/pg_cpu_split.py). Unprivileged; where refused, no matter.
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    _keep_freed_memory()
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
