"""The transformation DAG of one workflow, run in the apply process.

``Pipeline.run(source, changes, schemas)`` takes a batch's changes and returns, for
every destination the source reaches, the changes that arrive there and their
layouts. Changes travel in runs of consecutive changes of one table: each
transformation's plan for that layout is compiled once and called on whole runs.

Fusion: a chain of transformations linked one to one (A is B's only input and B
is A's only consumer, neither a router) is evaluated run by run through every
plan of the chain before the next run starts, so no intermediate list of the
whole batch is built per transformation and a run emptied by a filter stops there.

Errors: a plan that raises on a run is called again one change at a time, and the
change that still fails goes to the node's ``on_error`` policy through the
``reject`` callback (skip or dead letter) or, with ``fail``, stops the workflow.
A ``RetryableError`` (a lookup server away) is never pinned on a change: it is
raised as :class:`NodeUnavailable` so the caller can retry the batch.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Protocol, TypeVar, runtime_checkable

from dataflare.cdc.errors import FatalError, RetryableError
from dataflare.cdc.model import Change, TableId, TableSchema
from dataflare.daemon.config import WorkflowConfig
from dataflare.daemon.dag import consumers, reachable
from dataflare.daemon.transforms.base import TablePlan, Transform
from loguru import logger

_TABLE = operator.itemgetter(1)

Schemas = dict[TableId, TableSchema]
_R = TypeVar("_R")


def _concat(parts: list[list[Change]]) -> list[Change]:
    return [c for part in parts for c in part]


def _merge_routes(parts: list[dict[str, list[Change]]]) -> dict[str, list[Change]]:
    out: dict[str, list[Change]] = {}
    for part in parts:
        for consumer, changes in part.items():
            out.setdefault(consumer, []).extend(changes)
    return out


@runtime_checkable
class Router(Protocol):
    """A transformation that sends each change to some of its consumers."""

    def open(self) -> None: ...

    def split(self, schema: TableSchema) -> Callable[[list[Change]], dict[str, list[Change]]]: ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class NodeUnavailable(RetryableError):
    """A transformation could not reach what it needs; retry the batch."""

    def __init__(self, node: str, error: RetryableError) -> None:
        super().__init__(f"transformation {node}: {error}")
        self.node = node


class TransformFailed(FatalError):
    """A change a transformation cannot handle, with ``on_error: fail``."""


@dataclass(frozen=True)
class Failure:
    """A change a transformation refused: what the reject callback receives."""

    node: str
    source: str
    change: Change  # as it entered the node
    schema: TableSchema
    error: str
    destinations: tuple[str, ...]  # destinations downstream of the node, which missed it


@dataclass
class NodeCounters:
    records_in: int = 0
    records_out: int = 0
    rejected: int = 0


@dataclass
class _Output:
    changes: list[Change] | dict[str, list[Change]]  # a router's: per consumer
    schemas: Schemas = field(default_factory=dict)

    def for_consumer(self, name: str) -> list[Change]:
        if isinstance(self.changes, dict):
            return self.changes.get(name, [])
        return self.changes


class Pipeline:
    def __init__(
        self,
        wf: WorkflowConfig,
        transforms: Mapping[str, Transform | Router],
        policies: Mapping[str, str],
        reject: Callable[[Failure], None],
    ) -> None:
        self.transforms = dict(transforms)
        self.policies = dict(policies)  # node -> on_error
        self.reject = reject
        self.inputs = {n.name: n.inputs for n in (*wf.transformations, *wf.destinations)}
        self.consumers = consumers(wf)
        self.destinations = [d.name for d in wf.destinations]
        self.counters = {name: NodeCounters() for name in self.transforms}
        self._plans: dict[str, dict[TableSchema, TablePlan]] = {n: {} for n in self.transforms}
        self._splits: dict[str, dict[TableSchema, Callable[[list[Change]], Any]]] = {
            n: {} for n in self.transforms
        }
        self._next: dict[str, str] = {}  # chain links A -> B (fused)
        for name in self.transforms:
            after = self.consumers.get(name, [])
            if len(after) == 1 and after[0] in self.transforms:
                b = after[0]
                plain = not self._is_router(name) and not self._is_router(b)
                if self.inputs[b] == (name,) and plain:
                    self._next[name] = b
        self._prev = {b: a for a, b in self._next.items()}
        self._orders: dict[str, list[str]] = {}
        self._downstream: dict[str, tuple[str, ...]] = {}

    # ----------------------------------------------------------------- structure

    def _is_router(self, name: str) -> bool:
        return isinstance(self.transforms.get(name), Router)

    def _order(self, root: str) -> list[str]:
        """Transformations reachable from ``root`` (itself included if one), in an
        order where every node comes after all its inputs."""
        cached = self._orders.get(root)
        if cached is not None:
            return cached
        reach = reachable(self.consumers, root)
        nodes = [n for n in self.transforms if n in reach or n == root]
        done: set[str] = set()
        order: list[str] = []

        def visit(n: str) -> None:
            if n in done:
                return
            done.add(n)
            for i in self.inputs.get(n, ()):
                if i in self.transforms and (i in reach or i == root) and n != root:
                    visit(i)
            order.append(n)

        for n in nodes:
            visit(n)
        self._orders[root] = order
        return order

    def downstream(self, node: str) -> tuple[str, ...]:
        """Destinations reachable from ``node``."""
        found = self._downstream.get(node)
        if found is None:
            seen = reachable(self.consumers, node)
            found = tuple(d for d in self.destinations if d in seen)
            self._downstream[node] = found
        return found

    # ------------------------------------------------------------------ running

    def run(
        self, source: str, changes: list[Change], schemas: Schemas
    ) -> dict[str, tuple[list[Change], Schemas]]:
        """Changes of ``source`` -> {destination: (changes, layouts)} for every
        destination the source reaches."""
        outputs = {source: _Output(changes, schemas)}
        return self._evaluate(source, outputs, source)

    def run_from(
        self, node: str, source: str, change: Change, schema: TableSchema
    ) -> dict[str, tuple[list[Change], Schemas]]:
        """Replay one change into ``node`` (a transformation or a destination)."""
        if node in self.destinations:
            return {node: ([change], {schema.table: schema})}
        if node not in self.transforms:
            raise FatalError(f"no transformation or destination named {node!r} any more")
        out = self._apply_chain(node, source, [change], {change.table: schema})
        outputs = {node: out}
        last = node
        while last in self._next:
            last = self._next[last]
            outputs[last] = out
        return self._evaluate(last, outputs, source, skip={node, *outputs})

    def _evaluate(
        self, root: str, outputs: dict[str, _Output], source: str, skip: Iterable[str] = ()
    ) -> dict[str, tuple[list[Change], Schemas]]:
        done = set(skip)
        for name in self._order(root):
            if name in done or name == root:
                continue
            if name in self._prev and self._prev[name] in outputs:
                continue  # evaluated inside its chain
            changes, schemas = self._gather(name, outputs)
            out = self._apply_chain(name, source, changes, schemas)
            outputs[name] = out
            node = name
            while node in self._next:  # the chain's members share its output
                node = self._next[node]
                outputs[node] = out
        result: dict[str, tuple[list[Change], Schemas]] = {}
        for dest in self.destinations:
            if any(i in outputs for i in self.inputs[dest]):
                result[dest] = self._gather(dest, outputs)
        return result

    def _gather(self, name: str, outputs: dict[str, _Output]) -> tuple[list[Change], Schemas]:
        present = [i for i in self.inputs[name] if i in outputs]
        if len(present) == 1:
            o = outputs[present[0]]
            return o.for_consumer(name), o.schemas
        changes: list[Change] = []
        schemas: Schemas = {}
        for i in present:  # a diamond: inputs concatenated in config order
            changes.extend(outputs[i].for_consumer(name))
            schemas.update(outputs[i].schemas)
        return changes, schemas

    def _apply_chain(
        self, head: str, source: str, changes: list[Change], schemas: Schemas
    ) -> _Output:
        if self._is_router(head):
            return self._apply_router(head, source, changes, schemas)
        chain = [head]
        while chain[-1] in self._next:
            chain.append(self._next[chain[-1]])
        out: list[Change] = []
        out_schemas: Schemas = {}
        for table, group in groupby(changes, _TABLE):
            run = list(group)
            schema = schemas[table]
            for node in chain:
                self.counters[node].records_in += len(run)
                plan = self._plan(node, schema)
                run = self._guarded(node, source, plan.apply, run, schema, _concat)
                self.counters[node].records_out += len(run)
                schema = plan.schema
                if not run:
                    break
            else:
                out.extend(run)
                seen = out_schemas.get(schema.table)
                if seen is not None and seen != schema:
                    raise FatalError(
                        f"transformation {chain[-1]}: two layouts of table {schema.table} "
                        "in one batch (two tables renamed to the same name?)"
                    )
                out_schemas[schema.table] = schema
        return _Output(out, out_schemas)

    def _apply_router(
        self, node: str, source: str, changes: list[Change], schemas: Schemas
    ) -> _Output:
        router = self.transforms[node]
        assert isinstance(router, Router)
        per: dict[str, list[Change]] = {}
        counters = self.counters[node]
        for table, group in groupby(changes, _TABLE):
            run = list(group)
            counters.records_in += len(run)
            schema = schemas[table]
            cache = self._splits[node]
            split = cache.get(schema)
            if split is None:
                split = cache[schema] = router.split(schema)
            parts = self._guarded(node, source, split, run, schema, _merge_routes)
            for consumer, part in parts.items():
                per.setdefault(consumer, []).extend(part)
                counters.records_out += len(part)
        return _Output(per, dict(schemas))

    def _plan(self, node: str, schema: TableSchema) -> TablePlan:
        cache = self._plans[node]
        plan = cache.get(schema)
        if plan is None:
            t = self.transforms[node]
            assert not isinstance(t, Router)
            try:
                plan = t.plan(schema)
            except (FatalError, RetryableError):
                raise
            except Exception as e:  # a transformation's bug must still name where it happened
                raise FatalError(f"transformation {node} on table {schema.table}: {e}") from e
            cache[schema] = plan
        return plan

    def _guarded(
        self,
        node: str,
        source: str,
        fn: Callable[[list[Change]], _R],
        run: list[Change],
        schema: TableSchema,
        merge: Callable[[list[_R]], _R],
    ) -> _R:
        """``fn(run)``; when it raises, one change at a time to find the poison
        change (the others go on), whose fate is the node's ``on_error``."""
        try:
            return fn(run)
        except RetryableError as e:
            raise NodeUnavailable(node, e) from e
        except Exception as e:
            if len(run) == 1 or self.policies.get(node, "fail") == "fail":
                self._fail_or_reject(node, source, run[0] if len(run) == 1 else None, schema, e)
                return merge([])
        parts: list[_R] = []
        for c in run:
            try:
                parts.append(fn([c]))
            except RetryableError as e:
                raise NodeUnavailable(node, e) from e
            except Exception as e:
                self._fail_or_reject(node, source, c, schema, e)
        return merge(parts)

    def _fail_or_reject(
        self, node: str, source: str, change: Change | None, schema: TableSchema, e: Exception
    ) -> None:
        message = str(e) if isinstance(e, FatalError) else f"{type(e).__name__}: {e}"
        policy = self.policies.get(node, "fail")
        if policy == "fail" or change is None:
            raise TransformFailed(
                f"transformation {node} failed on a change of {schema.table}: {message} "
                "(set error_handling.on_error to skip or dead_letter to let the others pass)"
            ) from e
        if not isinstance(e, FatalError):
            logger.opt(exception=e).debug("transformation {} raised", node)
        self.counters[node].rejected += 1
        self.reject(Failure(node, source, change, schema, message, self.downstream(node)))

    def status(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, t in self.transforms.items():
            c = self.counters[name]
            st = {"records_in": c.records_in, "records_out": c.records_out, "rejected": c.rejected}
            status = getattr(t, "status", None)
            if status is not None:
                st.update(status())
            out[name] = st
        return out
