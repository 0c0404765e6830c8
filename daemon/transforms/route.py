"""The `route` transformation: each change to the consumers of the first route it matches.

Routing keeps mirrors right, like a filter: a delete or truncate of a table goes
to every consumer a route of that table could send its rows to (a delete carries
only the key, so it cannot be matched, and deleting a row a mirror never had is a
no-op); an update sent to one consumer reaches the other possible consumers as a
delete, so a row that moves from one route to another leaves the first mirror.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dataflare.cdc.model import Change, Op, TableSchema
from dataflare.daemon.transforms.base import Stateless, TransformContext
from dataflare.daemon.transforms.configs import RouteConfig
from dataflare.daemon.transforms.expr import Expression, parse
from dataflare.daemon.transforms.tables import TableSelector
from dataflare.daemon.transforms.values import delete_maker

_UNCONDITIONAL = (Op.DELETE, Op.TRUNCATE)


class RouteTransform(Stateless):
    def __init__(self, name: str, config: RouteConfig, ctx: TransformContext) -> None:
        self.name = name
        self.routes: list[tuple[TableSelector, Expression | None, tuple[str, ...]]] = [
            (TableSelector(r.tables), parse(r.condition) if r.condition else None, tuple(r.to))
            for r in config.routes
        ]
        self.default = tuple(config.default)
        self.sent: dict[str, int] = {}

    def status(self) -> dict[str, Any]:
        return {"routed": dict(self.sent)}

    def split(self, schema: TableSchema) -> Callable[[list[Change]], dict[str, list[Change]]]:
        columns = schema.column_names
        routes = [
            (None if expr is None else expr.predicate(columns), to)
            for tables, expr, to in self.routes
            if schema.table in tables
        ]
        every: list[str] = []
        for _, to in routes:
            every.extend(t for t in to if t not in every)
        every.extend(t for t in self.default if t not in every)
        default = self.default
        sent = self.sent
        as_delete = delete_maker(schema, f"route {self.name}")

        def split(run: list[Change]) -> dict[str, list[Change]]:
            out: dict[str, list[Change]] = {t: [] for t in every}
            rows = [c.after for c in run]
            masks = [None if p is None else p(rows) for p, _ in routes]
            for i, c in enumerate(run):
                if c.op in _UNCONDITIONAL:
                    for t in every:
                        out[t].append(c)
                    continue
                chosen = default
                for (_, to), mask in zip(routes, masks, strict=True):
                    if mask is None or mask[i]:
                        chosen = to
                        break
                for t in chosen:
                    out[t].append(c)
                if c.op is Op.UPDATE:
                    gone = [t for t in every if t not in chosen]
                    if gone:
                        d = as_delete(c)
                        for t in gone:
                            out[t].append(d)
            for t, part in out.items():
                sent[t] = sent.get(t, 0) + len(part)
            return out

        return split
