"""The `mask` transformation: hides column values (old and new rows alike)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Change, Column, Row, TableSchema
from dataflare.daemon.transforms.base import (
    ChangeRun,
    Stateless,
    TablePlan,
    TransformContext,
    passthrough,
)
from dataflare.daemon.transforms.configs import MaskConfig, MaskRule
from dataflare.daemon.transforms.tables import TableSelector
from dataflare.daemon.transforms.values import column, text_form
from loguru import logger

_new_tuple = tuple.__new__
Masker = Callable[[Any], Any]  # a non-NULL value -> its masked form


class MaskTransform(Stateless):
    def __init__(self, name: str, config: MaskConfig, ctx: TransformContext) -> None:
        self.name = name
        self.cfg = config
        self._tables = TableSelector(config.tables)
        self._rules: dict[str, MaskRule] = {}
        for r in config.rules:
            if r.field in self._rules:
                raise FatalError(f"mask {name}: two rules for column {r.field!r}: keep one")
            self._rules[r.field] = r
        self._hmac = hmac.new((config.salt or "").encode(), digestmod=hashlib.sha256)
        self.log = logger.bind(workflow=ctx.workflow, component=f"transformation:{name}")

    def masker(self, rule: MaskRule) -> Masker:
        if rule.method == "full":
            replacement = rule.replacement
            return lambda v: replacement
        if rule.method == "partial":
            n, replacement = rule.show_chars, rule.replacement

            def partial(v: Any) -> Any:
                s = text_form(v)
                assert s is not None
                # A value no longer than the part shown would be shown whole.
                return s[:n] + replacement if len(s) > n else replacement

            return partial
        if rule.method == "hash":
            base = self._hmac

            def digest(v: Any) -> Any:
                h = base.copy()
                h.update(str(text_form(v)).encode())
                return h.hexdigest()

            return digest
        return lambda v: None

    def plan(self, schema: TableSchema) -> TablePlan:
        if schema.table not in self._tables:
            return passthrough(schema)
        names = schema.column_names
        missing = [f for f in self._rules if f not in names]
        if missing:
            self.log.info("table {}: no column {} to mask", schema.table, ", ".join(missing))
        fns: list[tuple[int, Masker]] = []
        key_fns: list[tuple[int, Masker]] = []
        cols = list(schema.columns)
        for i, c in enumerate(schema.columns):
            rule = self._rules.get(c.name)
            if rule is None:
                continue
            fn = self.masker(rule)
            fns.append((i, fn))
            if c.name in schema.key:
                if rule.method != "hash":
                    raise FatalError(
                        f"mask {self.name}: column {c.name} is part of the primary key of "
                        f"{schema.table}: only the hash method keeps keys distinct (method "
                        f"{rule.method} would merge rows in a mirror)"
                    )
                key_fns.append((schema.key.index(c.name), fn))
            cols[i] = (
                Column(c.name, c.type_name, True, c.type_oid)
                if rule.method == "null"
                else column(c.name, "text", c.nullable)
            )
        if not fns:
            return passthrough(schema)
        out = replace(schema, columns=tuple(cols))
        return TablePlan(out, _masking(fns, key_fns))


def _mask_row(row: Row | None, fns: list[tuple[int, Masker]]) -> Row | None:
    if row is None:
        return None
    r = list(row)
    for i, fn in fns:
        v = r[i]
        if v is not None:
            r[i] = fn(v)
    return tuple(r)


def _masking(
    fns: list[tuple[int, Masker]], key_fns: list[tuple[int, Masker]]
) -> Callable[[ChangeRun], ChangeRun]:
    new = _new_tuple

    def apply(changes: ChangeRun) -> ChangeRun:
        if key_fns:
            return [
                new(Change, (op, t, pos, _mask_row(key, key_fns), _mask_row(before, fns),
                             _mask_row(after, fns), unchanged, xid, ts))
                for op, t, pos, key, before, after, unchanged, xid, ts in changes
            ]  # fmt: skip
        return [
            new(Change, (op, t, pos, key, None if before is None else _mask_row(before, fns),
                         None if after is None else _mask_row(after, fns), unchanged, xid, ts))
            for op, t, pos, key, before, after, unchanged, xid, ts in changes
        ]  # fmt: skip

    return apply
