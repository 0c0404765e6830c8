"""The transformation pipeline, routes, retries, circuit breaker and dead letters
(no servers: real transformations on real batches, a real LMDB state store)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from dataflare.cdc.errors import FatalError, RetryableError
from dataflare.cdc.model import Change, Column, Op, Position, TableId, TableSchema
from dataflare.daemon.config import ErrorHandling, NodeSpec, WorkflowConfig
from dataflare.daemon.deadletters import DeadLetterStore
from dataflare.daemon.retry import CircuitBreaker, backoff_delay
from dataflare.daemon.state import StateStore
from dataflare.daemon.transforms.base import TablePlan, TransformContext
from dataflare.daemon.transforms.configs import FilterConfig, Route, RouteConfig
from dataflare.daemon.transforms.filter import FilterTransform
from dataflare.daemon.transforms.pipeline import (
    Failure,
    NodeUnavailable,
    Pipeline,
    TransformFailed,
)
from dataflare.daemon.transforms.route import RouteTransform

T = TableId("public", "t")
SCHEMA = TableSchema(
    T, (Column("id", "int", False), Column("status", "text"), Column("n", "int")), ("id",)
)


def pos(v: int) -> Position:
    return Position("generate", v)


def ins(i: int, status: str, n: int = 0, at: int = 1) -> Change:
    return Change(Op.INSERT, T, pos(at), (i,), None, (i, status, n))


def upd(i: int, status: str, n: int = 0, at: int = 1) -> Change:
    return Change(Op.UPDATE, T, pos(at), (i,), None, (i, status, n))


def node(name: str, inputs: tuple[str, ...], on_error: str = "fail") -> NodeSpec:
    return NodeSpec(name, "x", inputs, None, ErrorHandling(on_error=on_error), "wf.yaml", 1)  # type: ignore[arg-type]


def workflow(transforms: list[NodeSpec], dests: list[NodeSpec]) -> WorkflowConfig:
    return WorkflowConfig("wf", "", "wf.yaml", (node("src", ()),), tuple(transforms), tuple(dests))


class Doubler:
    """A stateless test transformation: n -> 2n; raises on n == 13 (a poison row)."""

    def __init__(self, calls: list[int]) -> None:
        self.calls = calls

    def open(self) -> None: ...

    def close(self) -> None: ...

    def status(self) -> dict[str, Any]:
        return {}

    def plan(self, schema: TableSchema) -> TablePlan:
        def apply(run: list[Change]) -> list[Change]:
            self.calls.append(len(run))
            out = []
            for c in run:
                assert c.after is not None
                if c.after[2] == 13:
                    raise FatalError("thirteen is refused")
                out.append(c._replace(after=(c.after[0], c.after[1], c.after[2] * 2)))
            return out

        return TablePlan(schema, apply)


def filt(condition: str) -> FilterTransform:
    return FilterTransform("f", FilterConfig(condition), TransformContext("wf", "f"))


def test_filter_keeps_the_mirror_right() -> None:
    wf = workflow([node("f", ("src",))], [node("d", ("f",))])
    p = Pipeline(wf, {"f": filt("status == 'active'")}, {}, lambda f: None)
    out = p.run(
        "src", [ins(1, "active"), ins(2, "gone"), upd(1, "gone"), upd(2, "active")], {T: SCHEMA}
    )
    changes, schemas = out["d"]
    assert [(c.op, c.key) for c in changes] == [
        (Op.INSERT, (1,)),
        (Op.DELETE, (1,)),
        (Op.UPDATE, (2,)),
    ]
    assert schemas == {T: SCHEMA}


def test_chain_is_fused_and_a_poison_change_is_dead_lettered() -> None:
    calls: list[int] = []
    failures: list[Failure] = []
    wf = workflow(
        [node("f", ("src",)), node("x2", ("f",), on_error="dead_letter")],
        [node("d", ("x2",)), node("raw", ("src",))],
    )
    p = Pipeline(
        wf, {"f": filt("n != 7"), "x2": Doubler(calls)}, {"x2": "dead_letter"}, failures.append
    )
    assert p._next == {"f": "x2"}  # one pass through both
    changes = [ins(i, "a", n=i) for i in (5, 7, 13, 20)]
    out = p.run("src", changes, {T: SCHEMA})
    assert [c.after for c in out["d"][0]] == [(5, "a", 10), (20, "a", 40)]
    assert out["raw"][0] == changes  # the untransformed branch gets everything
    (failure,) = failures
    assert failure.node == "x2" and failure.change.after == (13, "a", 13)
    assert failure.destinations == ("d",) and "thirteen" in failure.error
    assert calls == [3, 1, 1, 1]  # the run, then one change at a time to find the poison
    assert p.status()["x2"]["rejected"] == 1


def test_on_error_fail_stops_with_the_node_named() -> None:
    wf = workflow([node("x2", ("src",))], [node("d", ("x2",))])
    p = Pipeline(wf, {"x2": Doubler([])}, {"x2": "fail"}, lambda f: None)
    with pytest.raises(TransformFailed, match=r"transformation x2 failed .* thirteen"):
        p.run("src", [ins(1, "a", 13)], {T: SCHEMA})


def test_unavailable_lookup_is_retryable_not_a_poison_change() -> None:
    class Away(Doubler):
        def plan(self, schema: TableSchema) -> TablePlan:
            def apply(run: list[Change]) -> list[Change]:
                raise RetryableError("redis: connection refused")

            return TablePlan(schema, apply)

    failures: list[Failure] = []
    wf = workflow([node("lk", ("src",))], [node("d", ("lk",))])
    p = Pipeline(wf, {"lk": Away([])}, {"lk": "dead_letter"}, failures.append)
    with pytest.raises(NodeUnavailable) as e:
        p.run("src", [ins(1, "a")], {T: SCHEMA})
    assert e.value.node == "lk" and failures == []


def test_route_moves_rows_between_mirrors() -> None:
    cfg = RouteConfig([Route(["eu"], condition="status == 'eu'")], default=["rest"])
    wf = workflow([node("r", ("src",))], [node("eu", ("r",)), node("rest", ("r",))])
    p = Pipeline(wf, {"r": RouteTransform("r", cfg, TransformContext("wf", "r"))}, {}, print)
    delete = Change(Op.DELETE, T, pos(1), (3,), (3, None, None), None)
    out = p.run("src", [ins(1, "eu"), ins(2, "us"), upd(1, "us"), delete], {T: SCHEMA})
    assert [(c.op, c.key) for c in out["eu"][0]] == [
        (Op.INSERT, (1,)),
        (Op.DELETE, (1,)),  # row 1 left the eu route
        (Op.DELETE, (3,)),  # deletes reach every possible mirror
    ]
    assert [(c.op, c.key) for c in out["rest"][0]] == [
        (Op.INSERT, (2,)),
        (Op.UPDATE, (1,)),
        (Op.DELETE, (3,)),
    ]


def test_replay_from_a_node() -> None:
    wf = workflow([node("f", ("src",)), node("x2", ("f",))], [node("d", ("x2",))])
    p = Pipeline(wf, {"f": filt("n > 0"), "x2": Doubler([])}, {}, print)
    out = p.run_from("x2", "src", ins(4, "a", 4), SCHEMA)
    assert [c.after for c in out["d"][0]] == [(4, "a", 8)]  # the filter before it is not rerun
    with pytest.raises(FatalError, match="no transformation or destination named 'gone'"):
        p.run_from("gone", "src", ins(4, "a", 4), SCHEMA)


def test_backoff_doubles_with_jitter_and_caps() -> None:
    eh = ErrorHandling(initial_backoff=0.1, max_backoff=1.0, jitter=False)
    assert [backoff_delay(eh, a) for a in (1, 2, 3, 4, 5, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    jittered = ErrorHandling(initial_backoff=0.1, max_backoff=1.0)
    rng = random.Random(3)
    waits = [backoff_delay(jittered, 4, rng) for _ in range(200)]
    assert all(0.4 <= w <= 0.8 for w in waits) and max(waits) - min(waits) > 0.2
    assert backoff_delay(ErrorHandling(backoff="fixed", initial_backoff=0.3), 9) == 0.3


def test_circuit_breaker_opens_and_half_opens() -> None:
    b = CircuitBreaker(threshold=3, reset=0.05)
    assert not b.failure() and not b.failure() and b.state == "closed"
    assert b.failure() and b.state == "open" and b.wait_s() > 0
    import time

    time.sleep(0.06)
    assert b.state == "half-open" and b.wait_s() == 0
    assert b.failure() and b.state == "open"  # the probe failed
    b.success()
    assert b.state == "closed" and b.failures == 0 and b.opened_total == 1
    assert not CircuitBreaker(threshold=0, reset=1).failure()  # disabled


def test_dead_letters_store_dedupe_and_replay_requests(tmp_path: Path) -> None:
    with StateStore(str(tmp_path / "state")) as state:
        store = DeadLetterStore(state, "wf")
        change = ins(7, "bad", 13, at=42)
        rec = store.record("x2", "transform", "src", change, SCHEMA, "thirteen", ["d"])
        assert store.put_many([rec, rec]) == 1
        assert store.put_many([rec]) == 0  # the same change refused again after a restart
        (letter,) = store.letters()
        assert letter.change == change and letter.schema == SCHEMA
        assert letter.summary()["destinations"] == ["d"] and letter.position == "42"
        assert store.take_replay_request() == (False, None)
        store.request_replay([letter.id])
        assert store.take_replay_request() == (True, [letter.id])
        assert store.take_replay_request() == (False, None)
        store.update_failed(letter, "still thirteen")
        (again,) = store.letters()
        assert again.attempts == 2 and again.error == "still thirteen"
        assert store.delete(again.id) and store.count() == 0
        assert store.put_many([rec]) == 1  # deleted: a new refusal is stored again
        assert store.purge() == 1 and store.count() == 0
