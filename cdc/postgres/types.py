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


def configure_loaders(conn: psycopg.Connection[Any]) -> None:
    """Register the loaders above on a connection (its cursors and Transformers)."""
    for oid in TEXT_FORM_OIDS:
        conn.adapters.register_loader(oid, TextLoader)
    for oid in (DATE, TIMESTAMP, TIMESTAMPTZ):
        inner = conn.adapters.get_loader(oid, pq.Format.TEXT)
        if inner is not None:
            conn.adapters.register_loader(oid, _or_text(inner))
