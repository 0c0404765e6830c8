"""The apply process's error handling against a transactional test destination (a
plain fake of the Sink protocol, holding rows in memory with a commit/abandon
discipline like a database transaction) and a real LMDB state store."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dataflare.cdc.errors import RecordRefused, RetryableError
from dataflare.cdc.model import Batch, Change, Column, Op, Position, TableId, TableSchema
from dataflare.cdc.registry import ConnectorType
from dataflare.daemon.config import ErrorHandling, NodeSpec, WorkflowConfig
from dataflare.daemon.deadletters import DeadLetterStore
from dataflare.daemon.state import StateStore
from dataflare.daemon.worker import Applier
from dataflare.daemon.worker_spec import WorkerSpec
from dataflare.sinks.base import SinkContext
from dataflare.sinks.registry import SINK_TYPES

T = TableId("public", "t")
SCHEMA = TableSchema(T, (Column("id", "int", False), Column("n", "int")), ("id",))


class Target:
    """What the fake destination has committed, shared across its reopenings."""

    def __init__(self) -> None:
        self.rows: dict[int, int] = {}
        self.checkpoint: Position | None = None
        self.commits = 0
        self.fail_after_commit = 0  # next N complete writes commit, then "lose the connection"
        self.opens = 0


TARGET = Target()


class MemorySink:
    transactional = True

    def __init__(self, name: str, config: Any, ctx: SinkContext) -> None:
        self.ctx = ctx
        self.pending: dict[int, int] = {}

    def open(self) -> None:
        TARGET.opens += 1
        self.pending = {}

    def close(self) -> None:
        self.pending = {}  # an open transaction is abandoned

    def checkpoint(self, source: str) -> Position | None:
        return TARGET.checkpoint

    def write(self, source: str, batch: Batch) -> None:
        for c in batch.changes:
            assert c.after is not None
            # (rows of PostgreSQL text, Batch.pg_text, hold bytes: b"13")
            i, n = int(c.after[0]), int(c.after[1])
            if n == 13:
                self.pending = {}
                raise RecordRefused("n = 13 violates check constraint no_13")
            self.pending[i] = n
        if batch.complete:
            TARGET.rows.update(self.pending)
            self.pending = {}
            if not batch.replay:
                TARGET.checkpoint = batch.last
            TARGET.commits += 1
            if TARGET.fail_after_commit:
                TARGET.fail_after_commit -= 1
                raise RetryableError("connection lost after COMMIT")

    def status(self) -> dict[str, Any]:
        return {}


class TextMemorySink(MemorySink):
    """Takes rows of PostgreSQL text as they are, like the postgres destination."""

    @staticmethod
    def takes_pg_text(config: Any) -> bool:
        return True


@pytest.fixture(params=["values", "text"])
def applier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Applier]:
    global TARGET
    TARGET = Target()
    module = types.ModuleType("memory_sink_for_tests")
    module.MemorySink = TextMemorySink if request.param == "text" else MemorySink  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "memory_sink_for_tests", module)
    monkeypatch.setitem(
        SINK_TYPES, "memory", ConnectorType(object, "memory_sink_for_tests:MemorySink")
    )
    eh = ErrorHandling(on_error="dead_letter", initial_backoff=0.01, jitter=False)
    src = NodeSpec("src", "generate", (), None, eh, "wf.yaml", 1)
    dest = NodeSpec("db", "memory", ("src",), None, eh, "wf.yaml", 2)
    wf = WorkflowConfig("wf", "", "wf.yaml", (src,), (), (dest,))
    spec = WorkerSpec("apply", wf, {}, str(tmp_path / "state"), -1, 0)
    with StateStore(spec.state_dir) as state:
        a = Applier(spec, state)
        assert a.pg_text["db"] is (request.param == "text")
        TARGET_TAKES_TEXT[0] = request.param == "text"
        a.open()
        yield a
        a.close()


def batch(values: list[tuple[int, int]], at: int, complete: bool = True) -> Batch:
    """Values, or (a text destination's applier) rows of PostgreSQL text."""
    if TARGET_TAKES_TEXT[0]:
        rows = [(str(i).encode(), str(n).encode()) for i, n in values]
        changes = [Change(Op.INSERT, T, Position("g", at), r[:1], None, r) for r in rows]
        b = Batch(changes, [SCHEMA], Position("g", at), Position("g", at), complete)
        b.pg_text = {T: (23, 23)}
        return b
    changes = [Change(Op.INSERT, T, Position("g", at), (i,), None, (i, n)) for i, n in values]
    return Batch(changes, [SCHEMA], Position("g", at), Position("g", at), complete)


TARGET_TAKES_TEXT = [False]


def test_a_refused_change_becomes_a_dead_letter_and_the_rest_commit_once(
    applier: Applier,
) -> None:
    applier.apply("src", batch([(1, 1), (2, 13), (3, 3), (4, 13), (5, 5)], at=10))
    assert TARGET.rows == {1: 1, 3: 3, 5: 5} and TARGET.commits == 1
    assert TARGET.checkpoint == Position("g", 10)
    letters = applier.dlq.letters()
    assert [d.change.after for d in letters] == [(2, 13), (4, 13)]
    assert all(d.stage == "destination" and "no_13" in d.error for d in letters)


def test_refusal_inside_a_large_transaction_rewrites_its_earlier_parts(applier: Applier) -> None:
    applier.apply("src", batch([(1, 1), (2, 2)], at=20, complete=False))
    applier.apply("src", batch([(3, 13), (4, 4)], at=20, complete=True))
    assert TARGET.rows == {1: 1, 2: 2, 4: 4} and TARGET.commits == 1
    assert [d.change.after for d in applier.dlq.letters()] == [(3, 13)]


def test_refusals_in_two_parts_of_one_transaction(applier: Applier) -> None:
    """Refused, clean, refused again: the parts kept for isolating are values, and
    dead letters too, whether the rows came as values or as text."""
    applier.apply("src", batch([(1, 1)], at=30, complete=False))
    applier.apply("src", batch([(2, 13), (3, 3)], at=30, complete=False))
    applier.apply("src", batch([(4, 4)], at=30, complete=False))
    applier.apply("src", batch([(5, 13), (6, 6)], at=30, complete=True))
    assert TARGET.rows == {1: 1, 3: 3, 4: 4, 6: 6} and TARGET.commits == 1
    assert [d.change.after for d in applier.dlq.letters()] == [(2, 13), (5, 13)]


def test_a_commit_that_went_through_before_the_connection_broke_is_not_repeated(
    applier: Applier,
) -> None:
    TARGET.fail_after_commit = 1
    applier.apply("src", batch([(1, 1)], at=30))
    assert TARGET.commits == 1 and TARGET.opens == 2  # reopened, saw the checkpoint, done


def test_replay_that_is_refused_again_keeps_its_letter(applier: Applier) -> None:
    applier.apply("src", batch([(1, 1), (2, 13)], at=40))
    store: DeadLetterStore = applier.dlq
    assert len(store.letters()) == 1
    store.request_replay(None)
    applier.replay_dead_letters()
    assert store.replay_result() is not None
    assert store.replay_result()["failed"] == 1  # type: ignore[index]
    (kept,) = store.letters()
    assert kept.attempts == 2 and kept.destinations == ("db",)
    assert TARGET.rows == {1: 1}
