"""The Transform protocol.

A transformation works table by table: for every table layout it is given, it
returns a :class:`TablePlan`, the layout of its output and a function from a run
of that table's changes to the changes it lets through (possibly with another op,
another layout or another table name). The pipeline (``pipeline.py``) calls the
plan on consecutive changes of one table, so batching lookups and compiled
expressions see many rows per call, and plans of adjacent transformations are
fused into one pass.

A plan's function raises on a change it cannot handle. The pipeline then calls it
one change at a time to find the poison change and applies the node's
``on_error`` policy to that change alone. A :class:`RetryableError`
(an unreachable lookup server) is never pinned on a change: it is retried.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dataflare.cdc.model import Change, TableSchema

ChangeRun = list[Change]


@dataclass(frozen=True)
class TablePlan:
    schema: TableSchema  # layout (and table id) of the output changes
    apply: Callable[[ChangeRun], ChangeRun]  # changes of one input table -> output changes


def passthrough(schema: TableSchema) -> TablePlan:
    return TablePlan(schema, _identity)


def _identity(changes: ChangeRun) -> ChangeRun:
    return changes


class Transform(Protocol):
    """Constructed as ``Class(name, config, ctx)`` from the registry."""

    def open(self) -> None:
        """Connect what the transformation needs (lookup servers)."""

    def plan(self, schema: TableSchema) -> TablePlan:
        """How changes of this layout are transformed. Called once per layout; a
        table the transformation does not touch gets :func:`passthrough`. Raises
        ``FatalError`` naming the table when the config cannot apply to it (a
        condition on a column the table does not have)."""

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class Stateless:
    """Lifecycle of a transformation that holds no connection and no counters."""

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class TransformContext:
    workflow: str
    node: str  # the transformation's name in the workflow
