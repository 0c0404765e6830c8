"""How the postgres source turns pgoutput text values into Python values.

psycopg's loaders are exact for most types. Three cases are not, and take the
server's text form instead, which every PostgreSQL sink writes back unchanged:

- json/jsonb: a JSON ``null`` and an SQL NULL would both become None;
- interval: months become 30-day timedeltas ('1 mon' != '30 days');
- date/timestamp/timestamptz values Python cannot hold ('infinity', BC dates,
  years after 9999) would stop the stream: those values (only) stay text.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import abc, pq
from psycopg.adapt import Loader
from psycopg.types.string import TextLoader

JSON, JSON_ARRAY, JSONB, JSONB_ARRAY, INTERVAL, INTERVAL_ARRAY = 114, 199, 3802, 3807, 1186, 1187
TEXT_FORM_OIDS = frozenset({JSON, JSON_ARRAY, JSONB, JSONB_ARRAY, INTERVAL, INTERVAL_ARRAY})
DATE, TIMESTAMP, TIMESTAMPTZ = 1082, 1114, 1184


def _or_text(inner: type[abc.Loader]) -> type[Loader]:
    class OrText(Loader):
        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            self._inner = inner(oid, context)

        def load(self, data: Any) -> Any:
            try:
                return self._inner.load(data)
            except psycopg.DataError:
                return bytes(data).decode()

    return OrText


def configure_loaders(conn: psycopg.Connection[Any], fallbacks: bool = True) -> None:
    """Register the loaders above on a connection (its cursors and Transformers).
    ``fallbacks=False`` leaves psycopg's fast date loaders in place: for callers that
    catch DataError per row and then use :func:`load_or_text` (the stream does)."""
    for oid in TEXT_FORM_OIDS:
        conn.adapters.register_loader(oid, TextLoader)
    if not fallbacks:
        return
    for oid in (DATE, TIMESTAMP, TIMESTAMPTZ):
        inner = conn.adapters.get_loader(oid, pq.Format.TEXT)
        if inner is not None:
            conn.adapters.register_loader(oid, _or_text(inner))


def load_or_text(tx: abc.Transformer, oids: list[int], values: list[bytes | None]) -> list[Any]:
    """Value by value, text where a loader refuses (the slow path of a rare row)."""
    out: list[Any] = []
    for oid, v in zip(oids, values, strict=True):
        if v is None:
            out.append(None)
            continue
        try:
            out.append(tx.get_loader(oid, pq.Format.TEXT).load(v))
        except psycopg.DataError:
            out.append(v.decode())
    return out


def load_row(tx: abc.Transformer, oids: list[int], values: Any) -> tuple[Any, ...]:
    """A row of text values loaded by ``tx`` (its loader types set to ``oids``); the
    values a loader refuses ('infinity', BC, year > 9999) stay text."""
    try:
        return tuple(tx.load_sequence(values))
    except psycopg.DataError:
        return tuple(load_or_text(tx, oids, list(values)))
