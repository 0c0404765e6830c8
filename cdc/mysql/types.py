"""MySQL/MariaDB type names (as the `mysql` source reports them) -> PostgreSQL types.

For destinations in another database: a Postgres sink creating a table for a
MySQL-origin layout (``Column.type_oid == 0``) calls :func:`postgres_type`. The
choices keep every value exact (see docs/mysql.md):

==========================  ===========================  =============================
MySQL                       PostgreSQL                   why
==========================  ===========================  =============================
tinyint, smallint           smallint
mediumint, int              integer
int unsigned                bigint
bigint                      bigint
bigint unsigned             numeric(20,0)                up to 2^64-1
decimal(p,s)                numeric(p,s)
float / double              real / double precision
date                        date
datetime(n)                 timestamp(n)                 no time zone, like the source
timestamp(n)                timestamptz(n)               values are UTC instants
time(n)                     interval                     TIME may be negative or > 24 h
year                        smallint
bit(n)                      bigint (numeric(20,0) n=64)  values are integers
enum(...), set(...)         text                         SET as 'a,b'
char/varchar(n)             varchar(n)
*text                       text
json                        jsonb
binary/varbinary/*blob      bytea
geometry                    bytea                        WKB with SRID prefix, as stored
==========================  ===========================  =============================
"""

from __future__ import annotations

import re
from dataclasses import replace

from dataflare.cdc.model import Batch, Column

_SIMPLE = {
    "tinyint": "smallint",
    "tinyint unsigned": "smallint",
    "smallint": "smallint",
    "smallint unsigned": "integer",
    "mediumint": "integer",
    "mediumint unsigned": "integer",
    "int": "integer",
    "integer": "integer",
    "int unsigned": "bigint",
    "bigint": "bigint",
    "bigint unsigned": "numeric(20,0)",
    "float": "real",
    "double": "double precision",
    "date": "date",
    "year": "smallint",
    "json": "jsonb",
    "geometry": "bytea",
    "tinytext": "text",
    "text": "text",
    "mediumtext": "text",
    "longtext": "text",
    "tinyblob": "bytea",
    "blob": "bytea",
    "mediumblob": "bytea",
    "longblob": "bytea",
}
_ARGS = re.compile(r"^([a-z ]+?)\s*(?:\(([^)]*)\))?\s*(unsigned)?\s*(zerofill)?$")


def postgres_type(type_name: str) -> str:
    t = type_name.strip().lower()
    if t in _SIMPLE:
        return _SIMPLE[t]
    if t.startswith(("enum(", "set(")):
        return "text"
    m = _ARGS.match(t)
    if m is None:
        return "text"
    base, args, unsigned = m.group(1), m.group(2) or "", m.group(3)
    if base in ("tinyint", "smallint", "mediumint", "int", "integer", "bigint"):
        return _SIMPLE[base + (" unsigned" if unsigned else "")]
    if base in ("decimal", "numeric", "dec", "fixed"):
        return f"numeric({args})" if args else "numeric"
    if base in ("float", "double", "real"):
        return "double precision" if base != "float" else "real"
    fsp = f"({args})" if args else ""
    if base == "datetime":
        return f"timestamp{fsp}"
    if base == "timestamp":
        return f"timestamptz{fsp}"
    if base == "time":
        return "interval"
    if base == "bit":
        return "numeric(20,0)" if int(args or 1) == 64 else "bigint"
    if base in ("char", "varchar"):
        return f"varchar({args})" if args else "text"
    if base in ("binary", "varbinary"):
        return "bytea"
    return _SIMPLE.get(base, "text")


def _pg_column(c: Column) -> Column:
    return replace(c, type_name=postgres_type(c.type_name))


def for_postgres(batch: Batch) -> Batch:
    """The batch with its layouts' MySQL type names mapped to PostgreSQL types.

    For a Postgres destination receiving a `mysql` source's batches (position kind
    ``mysql``); values need no change (see the table above).
    """
    schemas = [
        replace(
            s, columns=tuple(replace(c, type_name=postgres_type(c.type_name)) for c in s.columns)
        )
        for s in batch.schemas
    ]
    return Batch(batch.changes, schemas, batch.first, batch.last, batch.complete)
