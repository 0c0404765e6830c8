"""The `lookup` transformation: enriches rows with fields read by key elsewhere.

Per run of changes, the keys not in the cache are fetched with ONE round trip:
a pipeline of HMGETs (Redis) or one ``SELECT ... WHERE key = ANY(...)`` /
``IN (...)`` (PostgreSQL, MySQL). Keys compare in text form. Results, misses
included, stay in a TTL + LRU cache.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from dataflare.cdc.errors import DataflareError, FatalError, RetryableError
from dataflare.cdc.model import Change, Column, Row, TableSchema
from dataflare.daemon.transforms.base import ChangeRun, TablePlan, TransformContext, passthrough
from dataflare.daemon.transforms.configs import LookupConfig, LookupSource
from dataflare.daemon.transforms.tables import (
    TableSelector,
    quote_ident,
    split_identifier,
    sql_name,
)
from dataflare.daemon.transforms.values import column, known_before, text_form
from loguru import logger

_MISSING: tuple[Any, ...] = ()  # a cached "no such key"
_new_tuple = tuple.__new__


class Backend(Protocol):
    def connect(self) -> None: ...

    def close(self) -> None: ...

    def field_columns(self, fields: Sequence[str]) -> list[Column]:
        """The type of each looked-up field (read once, after connecting)."""

    def fetch(self, keys: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        """Values of the fields for the keys found (one round trip)."""


def _scrub(text: str, src: LookupSource) -> str:
    for s in (src.url, src.dsn, src.password):
        if s:
            text = text.replace(s, "***")
    return text


class RedisBackend:
    def __init__(self, name: str, src: LookupSource, fields: Sequence[str]) -> None:
        self.name, self.src, self.fields = name, src, list(fields)
        self._client: Any = None

    def connect(self) -> None:
        import redis

        try:
            client = redis.Redis.from_url(
                str(self.src.url), socket_timeout=10, socket_connect_timeout=10
            )
            client.ping()
        except redis.RedisError as e:
            raise self._error(e) from None
        self._client = client

    def _error(self, e: Exception) -> DataflareError:
        import redis

        msg = f"lookup {self.name}: redis: {_scrub(str(e), self.src)}"
        if isinstance(e, redis.ConnectionError | redis.TimeoutError):
            self.close()
            return RetryableError(msg)
        return FatalError(msg)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def field_columns(self, fields: Sequence[str]) -> list[Column]:
        return [column(f, "text") for f in fields]

    def fetch(self, keys: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        import redis

        if self._client is None:
            self.connect()
        template = self.src.key
        try:
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.hmget(template.replace("{}", k), self.fields)
            replies = pipe.execute()
        except redis.RedisError as e:
            raise self._error(e) from None
        out: dict[str, tuple[Any, ...]] = {}
        for k, vals in zip(keys, replies, strict=True):
            if any(v is not None for v in vals):  # a hash with none of the fields: a miss
                out[k] = tuple(None if v is None else v.decode() for v in vals)
        return out


class PostgresBackend:
    def __init__(self, name: str, src: LookupSource, key_column: str, fields: Sequence[str]):
        self.name, self.src = name, src
        self.key_column, self.fields = key_column, list(fields)
        self._conn: Any = None
        self._sql = ""

    def connect(self) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        try:
            params: dict[str, Any] = conninfo_to_dict(str(self.src.dsn))
        except psycopg.Error:
            raise FatalError(
                f"lookup {self.name}: dsn is neither a libpq conninfo string nor a URL"
            ) from None
        params.setdefault("connect_timeout", 10)
        params.setdefault("application_name", f"dataflare:lookup:{self.name}"[:63])
        try:
            self._conn = psycopg.connect(autocommit=True, **params)
        except psycopg.Error as e:
            raise self._error(e) from None
        if not self._sql:
            self._prepare()

    def _error(self, e: Exception) -> DataflareError:
        import psycopg

        msg = f"lookup {self.name}: postgres: {_scrub(str(e).strip(), self.src)}"
        if isinstance(e, psycopg.OperationalError | psycopg.InterfaceError):
            self.close()
            return RetryableError(msg)
        return FatalError(msg)

    def _types(self) -> dict[str, tuple[str, int]]:
        import psycopg

        try:
            rows = self._conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod), atttypid FROM pg_attribute"
                " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                [sql_name(str(self.src.table))],
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            raise FatalError(f"lookup {self.name}: table {self.src.table} does not exist") from None
        except psycopg.Error as e:
            raise self._error(e) from None
        return {r[0]: (r[1], r[2]) for r in rows}

    def _prepare(self) -> None:
        types = self._types()
        for f in (self.key_column, *self.fields):
            if f not in types:
                raise FatalError(f"lookup {self.name}: table {self.src.table} has no column {f}")
        self._columns = types
        cols = ", ".join(quote_ident(c) for c in (self.key_column, *self.fields))
        kc = quote_ident(self.key_column)
        # Keys travel as text and are cast to the key column's type: the index is used.
        self._sql = (
            f"SELECT {cols} FROM {sql_name(str(self.src.table))} "
            f"WHERE {kc} = ANY(%s::text[]::{types[self.key_column][0]}[])"
        )

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def field_columns(self, fields: Sequence[str]) -> list[Column]:
        return [Column(f, self._columns[f][0], True, self._columns[f][1]) for f in fields]

    def fetch(self, keys: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        import psycopg

        if self._conn is None:
            self.connect()
        try:
            rows = self._conn.execute(self._sql, [list(keys)]).fetchall()
        except psycopg.errors.InvalidTextRepresentation:
            raise FatalError(
                f"lookup {self.name}: a lookup key is not a valid "
                f"{self._columns[self.key_column][0]} (column {self.key_column})"
            ) from None
        except psycopg.Error as e:
            raise self._error(e) from None
        out: dict[str, tuple[Any, ...]] = {}
        for r in rows:
            out.setdefault(str(text_form(r[0])), tuple(r[1:]))
        return out


_MYSQL_RETRYABLE = frozenset({1040, 1053, 1205, 1213, 2002, 2003, 2006, 2013})


class MysqlBackend:
    def __init__(self, name: str, src: LookupSource, key_column: str, fields: Sequence[str]):
        self.name, self.src = name, src
        self.key_column, self.fields = key_column, list(fields)
        self._conn: Any = None
        self._select = ""

    def connect(self) -> None:
        import pymysql

        s = self.src
        try:
            self._conn = pymysql.connect(
                host=s.host, port=s.port, user=s.user, password=s.password or "",
                database=s.database, charset="utf8mb4", autocommit=True,
                connect_timeout=10, read_timeout=30, write_timeout=30,
                init_command="SET time_zone = '+00:00'",
            )  # fmt: skip
        except pymysql.err.MySQLError as e:
            raise self._error(e) from None
        if not self._select:
            self._prepare()

    def _error(self, e: Exception) -> DataflareError:
        import pymysql

        code = e.args[0] if e.args and isinstance(e.args[0], int) else 0
        detail = _scrub(str(e.args[-1] if e.args else e), self.src)
        msg = f"lookup {self.name}: mysql: ({code}) {detail}"
        if (
            code in _MYSQL_RETRYABLE
            or 2000 <= code < 3000
            or isinstance(e, pymysql.err.InterfaceError | OSError)
        ):
            self.close()
            return RetryableError(msg)
        return FatalError(msg)

    def _query(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        import pymysql

        try:
            with self._conn.cursor() as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())
        except (pymysql.err.MySQLError, OSError) as e:
            raise self._error(e) from None

    def _prepare(self) -> None:
        parts = [p.text for p in split_identifier(str(self.src.table))]
        db, table = (parts[0], parts[1]) if len(parts) == 2 else (str(self.src.database), parts[0])
        rows = self._query(
            "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            [db, table],
        )
        types = {str(r[0]): str(r[1]) for r in rows}
        if not types:
            raise FatalError(f"lookup {self.name}: table {self.src.table} does not exist")
        for f in (self.key_column, *self.fields):
            if f not in types:
                raise FatalError(f"lookup {self.name}: table {self.src.table} has no column {f}")
        self._columns = types
        cols = ", ".join(quote_ident(c, "`") for c in (self.key_column, *self.fields))
        qt = ".".join(quote_ident(p, "`") for p in parts)
        self._select = f"SELECT {cols} FROM {qt} WHERE {quote_ident(self.key_column, '`')} IN "

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken: nothing to release
                conn.close()

    def field_columns(self, fields: Sequence[str]) -> list[Column]:
        return [Column(f, self._columns[f]) for f in fields]

    def fetch(self, keys: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        if self._conn is None:
            self.connect()
        rows = self._query(self._select + "(" + ", ".join(["%s"] * len(keys)) + ")", keys)
        out: dict[str, tuple[Any, ...]] = {}
        for r in rows:
            out.setdefault(str(text_form(r[0])), tuple(r[1:]))
        return out


class LookupCache:
    """Values by key for ``ttl`` seconds, the ``size`` most recently used kept."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.size, self.clock = ttl, size, clock
        self._d: OrderedDict[str, tuple[float, tuple[Any, ...]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: str, now: float) -> tuple[Any, ...] | None:
        hit = self._d.get(key)
        if hit is None:
            return None
        if hit[0] <= now:
            del self._d[key]
            return None
        self._d.move_to_end(key)
        return hit[1]

    def put(self, key: str, value: tuple[Any, ...], now: float) -> None:
        if self.size <= 0 or self.ttl <= 0:
            return
        self._d[key] = (now + self.ttl, value)
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)


class LookupTransform:
    def __init__(self, name: str, config: LookupConfig, ctx: TransformContext) -> None:
        self.name = name
        self.cfg = config
        self._tables = TableSelector(config.tables)
        f = config.mapping.fields
        self.fields = list(f) if isinstance(f, list) else list(f.keys())
        self.outputs = list(f) if isinstance(f, list) else [f[k] for k in self.fields]
        if not self.fields:
            raise FatalError(f"lookup {name}: mapping.fields is empty")
        src = config.source
        key_column = src.key_column or config.mapping.key
        self.backend: Backend
        if src.type == "redis":
            self.backend = RedisBackend(name, src, self.fields)
        elif src.type == "postgres":
            self.backend = PostgresBackend(name, src, key_column, self.fields)
        else:
            self.backend = MysqlBackend(name, src, key_column, self.fields)
        self.cache = LookupCache(config.cache_ttl, config.cache_size)
        self.hits = self.misses = self.queries = self.not_found = 0
        self._field_columns: list[Column] | None = None
        self.log = logger.bind(workflow=ctx.workflow, component=f"transformation:{name}")

    def open(self) -> None:
        try:
            self.backend.connect()
            self._field_columns = self.backend.field_columns(self.fields)
        except BaseException:
            self.backend.close()
            raise

    def close(self) -> None:
        self.backend.close()

    def status(self) -> dict[str, Any]:
        return {
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "cache_entries": len(self.cache),
            "queries": self.queries,
            "not_found": self.not_found,
        }

    def resolve(self, keys: set[str]) -> dict[str, tuple[Any, ...]]:
        """Values (``_MISSING`` when not found) of every key: cached, or fetched at once."""
        now = self.cache.clock()
        found: dict[str, tuple[Any, ...]] = {}
        todo: list[str] = []
        for k in keys:
            v = self.cache.get(k, now)
            if v is None:
                todo.append(k)
            else:
                found[k] = v
        self.hits += len(found)
        if todo:
            self.misses += len(todo)
            self.queries += 1
            got = self.backend.fetch(todo)
            for k in todo:
                v = got.get(k, _MISSING)
                found[k] = v
                self.cache.put(k, v, now)
        return found

    def plan(self, schema: TableSchema) -> TablePlan:
        if schema.table not in self._tables:
            return passthrough(schema)
        if self._field_columns is None:
            raise RetryableError(f"lookup {self.name}: not connected yet")
        names = schema.column_names
        key = self.cfg.mapping.key
        if key not in names:
            raise FatalError(f"lookup {self.name}: table {schema.table} has no column {key}")
        cols = list(schema.columns)
        slots: list[int] = []  # where each output goes in the row
        for out, fc in zip(self.outputs, self._field_columns, strict=True):
            if out in schema.key:
                raise FatalError(
                    f"lookup {self.name}: output column {out} is part of the primary key "
                    f"of {schema.table}; write the looked-up value to another column"
                )
            c = replace(fc, name=out)
            if out in names:  # fills an existing column
                slots.append(names.index(out))
                cols[slots[-1]] = c
            else:
                slots.append(len(cols))
                cols.append(c)
        out_schema = replace(schema, columns=tuple(cols))
        return TablePlan(out_schema, self._applier(schema, names.index(key), slots, len(cols)))

    def _applier(
        self, schema: TableSchema, ki: int, slots: list[int], width: int
    ) -> Callable[[ChangeRun], ChangeRun]:
        names = schema.column_names
        key_name = names[ki]
        nulls = (None,) * len(slots)
        grow = width - len(names)
        pad = (None,) * grow
        outputs = frozenset(self.outputs)
        table = schema.table
        error = self.cfg.on_missing == "error"

        def enrich(row: Row | None, found: dict[str, tuple[Any, ...]]) -> Row | None:
            if row is None:
                return None
            k = row[ki]
            vals = nulls if k is None else (found[str(text_form(k))] or nulls)
            r = list(row) + list(pad) if grow else list(row)
            for i, v in zip(slots, vals, strict=True):
                r[i] = v
            return tuple(r)

        def apply(changes: ChangeRun) -> ChangeRun:
            if any(key_name in c[6] for c in changes):
                changes = [known_before(c, names) if key_name in c[6] else c for c in changes]
            keys = {
                str(text_form(row[ki]))
                for c in changes
                for row in (c[4], c[5])
                if row is not None and row[ki] is not None
            }
            found = self.resolve(keys) if keys else {}
            missing = [k for k in keys if not found[k]]
            if missing:
                self.not_found += len(missing)
                if error:
                    raise FatalError(
                        f"lookup {self.name}: no match in the lookup source for the "
                        f"{key_name} of a change of {table} (on_missing: error)"
                    )
            out: ChangeRun = []
            for c in changes:
                unchanged = c[6]
                if unchanged:
                    # An unknown key leaves the looked-up columns as the sink has them.
                    unchanged = unchanged.difference(outputs)
                    if key_name in c[6]:
                        unchanged = unchanged | outputs
                out.append(
                    _new_tuple(Change, (c[0], c[1], c[2], c[3], enrich(c[4], found),
                                        enrich(c[5], found), unchanged, c[7], c[8]))
                )  # fmt: skip
            return out

        return apply
