"""Record formats of the `file` destination: JSONL envelopes or fixed-column CSV.

CSV has one fixed header for every table (``CSV_COLUMNS``), with the key and the
row images as JSON text: a file mixes tables and a table's layout may change in
mid-file (schema evolution), so a header naming the table's own columns would be
wrong for some rows of the very file it heads. The fixed columns stay valid for
every row, and a reader gets the columns of a row from its JSON.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

from dataflare.cdc.model import Change, TableId, TableSchema
from dataflare.sinks.envelope import envelope, to_json

CSV_COLUMNS = ("op", "schema", "table", "position", "ts_ms", "tx_id", "key", "before", "after")


class JsonlFormat:
    """One Debezium-style envelope (``dataflare.sinks.envelope``) per line."""

    extension = "jsonl"

    def header(self) -> bytes:
        return b""

    def encode(
        self, changes: Sequence[Change], schemas: Mapping[TableId, TableSchema], source: str
    ) -> bytes:
        lines = [to_json(envelope(c, schemas[c.table], source)) + "\n" for c in changes]
        return "".join(lines).encode()


class CsvFormat:
    """RFC 4180: comma separated, CRLF line ends, fields quoted when they need it.

    ``ts_ms`` is the commit time of the source transaction (the envelope's
    ``source.ts_ms``); an absent value (no key, no before image, unknown
    transaction id) is an empty field.
    """

    extension = "csv"

    def header(self) -> bytes:
        return self._rows([CSV_COLUMNS])

    def encode(
        self, changes: Sequence[Change], schemas: Mapping[TableId, TableSchema], source: str
    ) -> bytes:
        rows = []
        for c in changes:
            schema = schemas[c.table]
            env = envelope(c, schema, source)
            src = env["source"]
            key = None if c.key is None else dict(zip(schema.key, c.key, strict=False))
            rows.append(
                (
                    c.op.value,
                    c.table.schema,
                    c.table.name,
                    src["position"],
                    _text(src["ts_ms"]),
                    _text(c.xid),
                    _json(key),
                    _json(env["before"]),
                    _json(env["after"]),
                )
            )
        return self._rows(rows)

    @staticmethod
    def _rows(rows: Sequence[Sequence[str]]) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL).writerows(rows)
        return buf.getvalue().encode()


def _text(v: int | None) -> str:
    return "" if v is None else str(v)


def _json(v: Any) -> str:
    return "" if v is None else to_json(v)


def make_format(name: str) -> JsonlFormat | CsvFormat:
    return CsvFormat() if name == "csv" else JsonlFormat()
