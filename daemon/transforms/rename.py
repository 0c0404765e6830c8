"""The `rename` transformation: the table names changes carry downstream."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Change, TableId, TableSchema
from dataflare.daemon.transforms.base import (
    ChangeRun,
    Stateless,
    TablePlan,
    TransformContext,
    passthrough,
)
from dataflare.daemon.transforms.configs import RenameConfig
from dataflare.daemon.transforms.tables import TableSelector, parse_pattern, parse_table_id

_new_tuple = tuple.__new__


class RenameTransform(Stateless):
    def __init__(self, name: str, config: RenameConfig, ctx: TransformContext) -> None:
        self.name = name
        self.cfg = config
        self.ctx = ctx
        self._explicit = [(parse_pattern(k), parse_table_id(v)) for k, v in config.tables.items()]
        self._only = TableSelector(config.only)
        self._origin: dict[TableId, TableId] = {}  # output table -> the input renamed to it

    def status(self) -> dict[str, Any]:
        return {"renamed": len(self._origin)}

    def target(self, table: TableId) -> TableId:
        for pattern, to in self._explicit:
            if pattern.matches(table):
                return to
        if table not in self._only:
            return table
        schema = table.schema if self.cfg.schema is None else self.cfg.schema
        return TableId(schema, self.cfg.prefix + table.name)

    def plan(self, schema: TableSchema) -> TablePlan:
        new = self.target(schema.table)
        if new == schema.table:
            return passthrough(schema)
        # Two tables written as one would interleave rows of different layouts.
        other = self._origin.setdefault(new, schema.table)
        if other != schema.table:
            raise FatalError(
                f"rename {self.name}: tables {other} and {schema.table} would both be "
                f"renamed to {new}; give them different names"
            )
        return TablePlan(replace(schema, table=new), _retable(new))


def _retable(table: TableId) -> Callable[[ChangeRun], ChangeRun]:
    def apply(changes: ChangeRun) -> ChangeRun:
        new = _new_tuple
        return [
            new(Change, (op, table, pos, key, before, after, unchanged, xid, ts))
            for op, _, pos, key, before, after, unchanged, xid, ts in changes
        ]

    return apply
