"""Rows as PostgreSQL text (``Batch.pg_text``) and their conversion into values.

The postgres source can ship the pgoutput text form of each value as it arrived
(bytes) instead of loading it: a PostgreSQL destination writes that form back with a
text COPY, so neither process builds a Python object per value. Whatever needs values
(transformations, other destinations, dead letters) calls :func:`materialize`, which
loads them exactly as the source would have (the same loaders, the same text
fallbacks: see :mod:`cdc.postgres.types`).
"""

from __future__ import annotations

from typing import Any

import psycopg
from dataflare.cdc.model import Batch, Change, Row, TableId, TableSchema
from dataflare.cdc.postgres.types import TEXT_FORM_OIDS, load_row
from psycopg import abc, pq
from psycopg.adapt import AdaptersMap, Transformer
from psycopg.types.string import TextLoader


class _Context:
    """An adaptation context without a connection: psycopg's global loaders plus
    the source's text-form choices."""

    connection = None

    def __init__(self) -> None:
        self.adapters = AdaptersMap(psycopg.adapters)
        for oid in TEXT_FORM_OIDS:
            self.adapters.register_loader(oid, TextLoader)


_CONTEXT: _Context | None = None


def _transformer(oids: tuple[int, ...]) -> abc.Transformer:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = _Context()
    tx = Transformer(_CONTEXT)
    tx.set_loader_types(list(oids), pq.Format.TEXT)
    return tx


class _TableLoader:
    def __init__(self, schema: TableSchema, oids: tuple[int, ...]) -> None:
        self.oids = list(oids)
        self.tx = _transformer(oids)
        self.key_idx = schema.key_indexes()

    def row(self, values: Row | None) -> Row | None:
        if values is None:
            return None
        return load_row(self.tx, self.oids, list(values))


def materialize(batch: Batch) -> Batch:
    """``batch`` with every row of its ``pg_text`` tables loaded into values."""
    if not batch.pg_text:
        return batch
    schemas = batch.schema_map()
    loaders: dict[TableId, _TableLoader] = {}
    for t, oids in batch.pg_text.items():
        s = schemas.get(t)
        if s is not None:
            loaders[t] = _TableLoader(s, oids)
    out: list[Change] = []
    append = out.append
    for c in batch.changes:
        ld = loaders.get(c.table)
        if ld is None:
            append(c)
            continue
        before, after = ld.row(c.before), ld.row(c.after)
        key: Any = c.key
        if key is not None and ld.key_idx:
            row = after if after is not None else before
            key = tuple([row[i] for i in ld.key_idx]) if row is not None else None
        append(c._replace(key=key, before=before, after=after))
    return Batch(
        out, batch.schemas, batch.first, batch.last, batch.complete, batch.replay, pg_text={}
    )
