"""plan_batch: the one-kind fast plan gives what the coalescing planner would."""

from __future__ import annotations

from dataflare.cdc.model import Change, Column, Op, Position, TableId, TableSchema
from dataflare.sinks.sql_common import KeyedSegment, _KeyedPlanner, plan_batch

T = TableId("public", "t")
S = TableSchema(T, (Column("id", "bigint", False), Column("v", "text")), ("id",))
P = Position("postgres", 1)


def slow(changes: list[Change]) -> list[object]:
    planner = _KeyedPlanner(S)
    for c in changes:
        planner.add(c)
    planner.flush()
    return list(planner.steps)


def ins(k: int, v: str = "x") -> Change:
    return Change(Op.INSERT, T, P, key=(k,), after=(k, v))


def upd(k: int, v: str = "y", key: tuple[int, ...] | None = None) -> Change:
    return Change(Op.UPDATE, T, P, key=key or (k,), after=(k, v))


def test_one_kind_batches_plan_like_the_coalescing_planner() -> None:
    for changes in (
        [ins(1), ins(2), ins(3)],
        [upd(1), upd(2)],
        [ins(1), ins(1, "again")],  # a key twice: coalesced
        [upd(1), upd(1, "z")],
        [upd(2, key=(1,))],  # a key change without the old row
        [ins(1), upd(2)],
    ):
        plans = plan_batch(changes, {T: S})
        assert len(plans) == 1 and plans[0].changes == len(changes)
        assert plans[0].steps == slow(changes), changes


def test_inserts_are_marked_for_a_plain_load() -> None:
    (plan,) = plan_batch([ins(1), ins(2)], {T: S})
    assert plan.steps == [KeyedSegment(inserts=[(1, "x"), (2, "x")])]
    (plan,) = plan_batch([upd(1), upd(2)], {T: S})
    assert plan.steps == [KeyedSegment(upserts=[(1, "y"), (2, "y")])]


def test_unhashable_keys_are_planned() -> None:
    """Array or json key values (lists, dicts) cannot be dict keys: still planned."""
    changes = [
        Change(Op.INSERT, T, P, key=([1, 2],), after=([1, 2], "a")),
        Change(Op.DELETE, T, P, key=([1, 2],), before=([1, 2], None)),
        Change(Op.INSERT, T, P, key=([1, 2],), after=([1, 2], "b")),
        Change(Op.INSERT, T, P, key=({"k": 1},), after=({"k": 1}, "c")),
    ]
    (plan,) = plan_batch(changes, {T: S})
    assert plan.steps == [KeyedSegment(upserts=[([1, 2], "b")], inserts=[({"k": 1}, "c")])]
