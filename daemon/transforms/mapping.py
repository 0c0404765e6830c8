"""The `mapping` transformation: renamed, converted, computed and dropped columns.

The output layout is worked out once per input layout: a renamed column takes its
source's place, a computed one replaces the column of the same name or is
appended, a nested destination (``user.firstName``) builds a jsonb column
(``user``) whose value is an object merging every mapping into it. A row is then
the input row extended by the few values computed for it, picked in output order
by one ``itemgetter``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Change, Column, Row, TableId, TableSchema
from dataflare.daemon.transforms.base import (
    ChangeRun,
    Stateless,
    TablePlan,
    TransformContext,
    passthrough,
)
from dataflare.daemon.transforms.configs import FieldMapping, MappingConfig
from dataflare.daemon.transforms.expr import parse
from dataflare.daemon.transforms.tables import TableSelector
from dataflare.daemon.transforms.values import (
    CASTS,
    CastError,
    column,
    known_before,
    read_columns,
    unknown_unchanged,
)

_new_tuple = tuple.__new__
_EMPTY: frozenset[str] = frozenset()

RESULT_TYPES = {
    "bool": "boolean",
    "string": "text",
    "number": "numeric",
    "timestamp": "timestamptz",
    "date": "date",
}


@dataclass
class _Value:
    """How one value of the output row is made from an input row."""

    index: int | None = None  # input column copied (None: computed by an expression)
    expr: int | None = None  # which of the plan's expressions computes it
    cast: Callable[[Any], Any] | None = None
    deps: frozenset[str] = _EMPTY  # input columns it depends on


@dataclass
class _Nest:
    """A jsonb column built from nested destinations: paths inside it -> values."""

    parts: list[tuple[tuple[str, ...], _Value]] = field(default_factory=list)


class MappingTransform(Stateless):
    def __init__(self, name: str, config: MappingConfig, ctx: TransformContext) -> None:
        self.name = name
        self.cfg = config
        self._tables = TableSelector(config.tables)
        self._exprs = [
            None if m.expression is None else parse(m.expression) for m in config.mappings
        ]

    def plan(self, schema: TableSchema) -> TablePlan:
        if schema.table not in self._tables:
            return passthrough(schema)
        return _Planner(self, schema).build()


class _Planner:
    def __init__(self, t: MappingTransform, schema: TableSchema) -> None:
        self.t = t
        self.schema = schema
        self.names = schema.column_names
        self.idx = {n: i for i, n in enumerate(self.names)}
        self.where = f"mapping {t.name}: table {schema.table}"
        self.value_fns: list[Callable[[Sequence[Row | None]], list[Any]]] = []

    def fail(self, message: str) -> FatalError:
        return FatalError(f"{self.where}: {message}")

    def _value(self, i: int, m: FieldMapping) -> tuple[_Value, Column]:
        """The value and column type of mapping ``i`` (its destination's leaf)."""
        cast = CASTS[m.cast] if m.cast else None
        if m.source is not None:
            if m.source not in self.idx:
                raise self.fail(f"no column {m.source} (mapping {i}: source)")
            src = self.schema.columns[self.idx[m.source]]
            col = column(m.destination, m.cast, src.nullable) if m.cast else src
            v = _Value(index=self.idx[m.source], deps=frozenset({m.source}))
        else:
            e = self.t._exprs[i]
            assert e is not None
            try:
                fn = e.values(self.names)
            except FatalError as err:
                raise self.fail(f"mapping {i} ({m.destination}): {err}") from None
            self.value_fns.append(fn)
            v = _Value(expr=len(self.value_fns) - 1, deps=read_columns(e.fields, self.names))
            text = (m.expression or "").strip()
            if m.cast:
                col = column(m.destination, m.cast)
            elif e.result_type in RESULT_TYPES:
                col = column(m.destination, RESULT_TYPES[e.result_type])
            elif text in self.idx:  # a plain reference keeps the column's type
                col = self.schema.columns[self.idx[text]]
            else:
                col = column(m.destination, "text")
        if cast is not None:
            v.cast = _named_cast(cast, f"{self.where}: column {m.destination}", str(m.cast))
        return v, replace(col, name=m.destination)

    def build(self) -> TablePlan:
        cfg, schema, names = self.t.cfg, self.schema, self.names
        renamed = {m.source for m in cfg.mappings if m.source is not None}
        dropped = set(cfg.drop)
        keep = None if cfg.keep is None else set(cfg.keep)
        top: dict[str, tuple[_Value, Column]] = {}  # plain destinations
        nests: dict[str, _Nest] = {}
        first_dest: dict[str, str] = {}  # source column -> its first plain destination
        for i, m in enumerate(cfg.mappings):
            value, col = self._value(i, m)
            parent, dot, rest = m.destination.partition(".")
            if dot:
                nests.setdefault(parent, _Nest()).parts.append((tuple(rest.split(".")), value))
            else:
                top[m.destination] = (value, col)
                if m.source is not None:
                    first_dest.setdefault(m.source, m.destination)
        for parent, nest in nests.items():
            if parent in top:
                raise self.fail(f"{parent} is both a column and the parent of nested fields")
            paths = {p for p, _ in nest.parts}
            for p in paths:
                if any(p == q[: len(p)] for q in paths if q != p):
                    raise self.fail(f"{parent}.{'.'.join(p)} is both a value and an object")

        def stays(n: str) -> bool:
            return n not in renamed and n not in dropped and (keep is None or n in keep)

        for parent in nests:
            if parent in self.idx and stays(parent):
                raise self.fail(f"column {parent} exists: nested fields cannot go into it")
        # Output columns in order: input columns in place (a renamed one where its
        # source was), then the other destinations in mapping order.
        out: list[tuple[str, _Value | _Nest, Column]] = []
        placed: set[str] = set()
        for i, n in enumerate(names):
            dest = first_dest.get(n) if n in renamed else (n if stays(n) else None)
            if dest is None or dest in placed:
                continue
            placed.add(dest)
            if dest in top:
                out.append((dest, *top[dest]))
            else:
                out.append((dest, _Value(index=i, deps=frozenset({n})), schema.columns[i]))
        for m in cfg.mappings:
            dest = m.destination.partition(".")[0]
            if dest in placed:
                continue
            placed.add(dest)
            if dest in top:
                out.append((dest, *top[dest]))
            else:
                out.append((dest, nests[dest], column(dest, "jsonb")))
        # The key follows renames; a key column that leaves the row is an error.
        out_names = [o[0] for o in out]
        new_key: list[str] = []
        for k in schema.key:
            dest = first_dest.get(k) if k in renamed else (k if stays(k) else None)
            if dest is None:
                raise self.fail(
                    f"primary-key column {k} is dropped (a mirror needs its key); keep it "
                    "or rename it to a plain column"
                )
            new_key.append(dest)
        out_schema = replace(schema, columns=tuple(o[2] for o in out), key=tuple(new_key))
        same_key = all(
            isinstance(o[1], _Value) and o[1].cast is None and o[1].index == self.idx[k]
            for k, o in zip(schema.key, (out[out_names.index(d)] for d in new_key), strict=True)
        )
        return TablePlan(out_schema, self._applier(out, out_schema, same_key))

    def _applier(
        self,
        out: list[tuple[str, _Value | _Nest, Column]],
        out_schema: TableSchema,
        same_key: bool,
    ) -> Callable[[ChangeRun], ChangeRun]:
        width = len(self.names)
        picks: list[int] = []
        extras: list[_Value | _Nest] = []
        for _, v, _ in out:
            if isinstance(v, _Value) and v.index is not None and v.cast is None:
                picks.append(v.index)
            else:
                picks.append(width + len(extras))
                extras.append(v)
        pick = _picker(picks)
        value_fns = self.value_fns
        computed_key = [
            (name, v)
            for name, v, _ in out
            if isinstance(v, _Value) and v.index is None and name in out_schema.key
        ]
        for name, v in computed_key:
            if not v.deps <= set(self.schema.key):
                raise FatalError(
                    f"mapping {self.t.name}: key column {name} of {self.schema.table} is computed "
                    "from columns outside the key; a delete carries only the key, so it could "
                    "not be found: compute key columns from key columns only"
                )
        # The sink matches the old row whole (no key), or by a computed key: compute
        # the expressions on old rows too.
        keyless = not self.schema.key or bool(computed_key)
        kidx = out_schema.key_indexes()
        out_deps = [(name, _deps(v)) for name, v, _ in out]
        recompute_key = bool(not same_key and kidx)
        new = _new_tuple
        names = self.names
        table: TableId = self.schema.table
        node = f"mapping {self.t.name}"

        def out_unchanged(c: Change) -> Change:
            c = known_before(c, names)
            u = c[6]
            gone = set()
            for name, deps in out_deps:
                if deps and deps <= u:
                    gone.add(name)
                elif deps & u:
                    raise unknown_unchanged(node, table)
            return c._replace(unchanged=frozenset(gone))

        def apply(changes: ChangeRun) -> ChangeRun:
            if any(c[6] for c in changes):
                changes = [out_unchanged(c) if c[6] else c for c in changes]
            afters = [c[5] for c in changes]
            ev_after = [fn(afters) for fn in value_fns] if value_fns else None
            ev_before = None
            if keyless and value_fns:  # the sink matches the old row whole: compute it too
                befores = [c[4] for c in changes]
                ev_before = [fn(befores) for fn in value_fns]
            result: ChangeRun = []
            append = result.append
            for j, (op, t, pos, key, before, after, unchanged, xid, ts) in enumerate(changes):
                if after is not None:
                    after = pick(after + tuple([_make(x, after, j, ev_after) for x in extras]))
                if before is not None:
                    before = pick(before + tuple([_make(x, before, j, ev_before) for x in extras]))
                if recompute_key:
                    row = after if after is not None else before
                    key = None if row is None else tuple([row[i] for i in kidx])
                append(new(Change, (op, t, pos, key, before, after, unchanged, xid, ts)))
            return result

        return apply


def _picker(picks: list[int]) -> Callable[[Row], Row]:
    if len(picks) == 1:
        i = picks[0]
        return lambda row: (row[i],)
    if not picks:
        return lambda row: ()
    return operator.itemgetter(*picks)


def _deps(v: _Value | _Nest) -> frozenset[str]:
    if isinstance(v, _Value):
        return v.deps
    return frozenset().union(*(p[1].deps for p in v.parts))


def _leaf(v: _Value, row: Row, j: int, ev: list[list[Any]] | None) -> Any:
    if v.index is not None:
        x = row[v.index]
    elif ev is None:
        return None  # a computed value of an old row the sink only finds by key
    else:
        assert v.expr is not None
        x = ev[v.expr][j]
    return x if v.cast is None or x is None else v.cast(x)


def _make(x: _Value | _Nest, row: Row, j: int, ev: list[list[Any]] | None) -> Any:
    if isinstance(x, _Value):
        return _leaf(x, row, j, ev)
    obj: dict[str, Any] = {}
    for path, v in x.parts:
        d = obj
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = _leaf(v, row, j, ev)
    return obj


def _named_cast(fn: Callable[[Any], Any], where: str, target: str) -> Callable[[Any], Any]:
    def cast(v: Any) -> Any:
        try:
            return fn(v)
        except CastError as e:
            raise FatalError(f"{where}: cast to {target} failed: {e}") from None

    return cast
