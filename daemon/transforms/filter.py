"""The `filter` transformation: only rows matching a condition reach the mirror.

The condition is evaluated on the new row. Inserts and snapshot reads pass when
it is true; deletes and truncates always pass. An update that matches passes (the
sink upserts the whole row, so a row that starts matching appears); one that does
not becomes a delete of its old row, so a row that stops matching disappears from
the mirror (deleting a row the sink never had changes nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Change, Op, Row, TableSchema
from dataflare.daemon.transforms.base import (
    ChangeRun,
    Stateless,
    TablePlan,
    TransformContext,
    passthrough,
)
from dataflare.daemon.transforms.configs import FilterConfig
from dataflare.daemon.transforms.expr import parse
from dataflare.daemon.transforms.tables import TableSelector
from dataflare.daemon.transforms.values import (
    delete_maker,
    known_before,
    read_columns,
    unknown_unchanged,
)

_ALWAYS = frozenset({Op.DELETE, Op.TRUNCATE})


class FilterTransform(Stateless):
    def __init__(self, name: str, config: FilterConfig, ctx: TransformContext) -> None:
        self.name = name
        self.cfg = config
        self.expr = parse(config.condition)
        self._tables = TableSelector(config.tables)
        self.passed = self.dropped = self.deleted = 0

    def status(self) -> dict[str, Any]:
        return {"passed": self.passed, "dropped": self.dropped, "turned_to_deletes": self.deleted}

    def plan(self, schema: TableSchema) -> TablePlan:
        if schema.table not in self._tables:
            return passthrough(schema)
        names = schema.column_names
        try:
            predicate = self.expr.predicate(names)
        except FatalError as e:
            raise FatalError(f"filter {self.name}: table {schema.table}: {e}") from None
        reads = read_columns(self.expr.fields, names)
        return TablePlan(schema, self._applier(schema, predicate, reads))

    def _applier(
        self,
        schema: TableSchema,
        predicate: Callable[[Sequence[Row | None]], list[bool]],
        reads: frozenset[str],
    ) -> Callable[[ChangeRun], ChangeRun]:
        names = schema.column_names
        table = schema.table
        node = f"filter {self.name}"
        as_delete = delete_maker(schema, node)

        def with_known(c: Change) -> Change:
            if not (c[6] & reads):
                return c
            c = known_before(c, names)
            if c[6] & reads:
                raise unknown_unchanged(node, table)
            return c

        def apply(changes: ChangeRun) -> ChangeRun:
            if reads and any(c[6] for c in changes):
                changes = [with_known(c) if c[6] else c for c in changes]
            matched = predicate([c[5] for c in changes])
            out: ChangeRun = []
            for c, ok in zip(changes, matched, strict=True):
                if ok or c[0] in _ALWAYS:
                    out.append(c)
                elif c[0] == Op.UPDATE:
                    out.append(as_delete(c))
                    self.deleted += 1
            self.passed += len(out)
            self.dropped += len(changes) - len(out)
            return out

        return apply
