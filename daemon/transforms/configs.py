"""Config dataclasses of the built-in transformations (the keys of DESIGN.md).

Expressions are parsed and type-checked here, when the config loads, so a typo in
a condition is reported with its file, line and column before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dataflare.cdc.settings import ConfigKeyError, duration, secret


def _check_expression(key: str | tuple[str | int, ...], text: str, condition: bool = False) -> None:
    from dataflare.daemon.transforms.expr import ExpressionError, parse

    try:
        expr = parse(text)
    except ExpressionError as e:
        raise ConfigKeyError(key, str(e)) from None
    if condition and expr.result_type not in ("bool", "any", "null"):
        raise ConfigKeyError(key, f"a condition must be true or false, got a {expr.result_type}")


@dataclass(frozen=True)
class FilterConfig:
    """Lets through the changes whose row matches ``condition``; deletes always pass.
    In front of a mirror, an update that stops matching becomes a delete and one
    that starts matching an upsert of the whole row."""

    condition: str
    tables: list[str] | None = None  # SQL identifiers; None: every table

    def __post_init__(self) -> None:
        _check_expression("condition", self.condition, condition=True)


@dataclass(frozen=True)
class FieldMapping:
    destination: str  # output column; a dotted name (user.firstName) nests into a json column
    source: str | None = None  # input column (renamed: it leaves the row)
    expression: str | None = None  # computed value instead of `source`
    cast: (
        Literal[
            "text",
            "integer",
            "bigint",
            "numeric",
            "double precision",
            "boolean",
            "date",
            "timestamp",
            "timestamptz",
            "jsonb",
        ]
        | None
    ) = None


@dataclass(frozen=True)
class MappingConfig:
    mappings: list[FieldMapping] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)  # columns removed
    keep: list[str] | None = None  # only these columns (and the mappings' destinations) stay
    tables: list[str] | None = None

    def __post_init__(self) -> None:
        for i, m in enumerate(self.mappings):
            if (m.source is None) == (m.expression is None):
                raise ConfigKeyError(
                    ("mappings", i), "give exactly one of `source` and `expression`"
                )
            if m.expression is not None:
                _check_expression(("mappings", i, "expression"), m.expression)
            if not m.destination or m.destination.startswith(".") or m.destination.endswith("."):
                raise ConfigKeyError(("mappings", i, "destination"), "not a column name")
        seen: set[str] = set()
        for i, m in enumerate(self.mappings):
            if m.destination in seen:
                raise ConfigKeyError(
                    ("mappings", i, "destination"), f"{m.destination!r} is mapped twice"
                )
            seen.add(m.destination)


@dataclass(frozen=True)
class MaskRule:
    field: str
    method: Literal["full", "partial", "hash", "null"] = "full"
    show_chars: int = 0  # partial: characters kept from the start of the value
    replacement: str = "***"  # full: the whole value; partial: what follows the kept part


@dataclass(frozen=True)
class MaskConfig:
    rules: list[MaskRule]
    salt: str | None = secret(help="key of the hash method (HMAC-SHA256)")
    tables: list[str] | None = None

    def __post_init__(self) -> None:
        for i, r in enumerate(self.rules):
            if r.show_chars < 0:
                raise ConfigKeyError(("rules", i, "show_chars"), "must be 0 or more")
            if r.method == "hash" and not self.salt:
                raise ConfigKeyError(
                    ("rules", i, "method"),
                    "the hash method needs a secret key: set `salt` or `salt_file`",
                )


@dataclass(frozen=True)
class Route:
    to: list[str]  # consumers of this route (they list it in `inputs`)
    condition: str | None = None
    tables: list[str] | None = None


@dataclass(frozen=True)
class RouteConfig:
    """Each change goes to the `to` of the first route it matches (tables and
    condition), else to `default`, else nowhere."""

    routes: list[Route]
    default: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, r in enumerate(self.routes):
            if r.condition is None and r.tables is None:
                raise ConfigKeyError(("routes", i), "give `condition`, `tables` or both")
            if r.condition is not None:
                _check_expression(("routes", i, "condition"), r.condition, condition=True)


@dataclass(frozen=True)
class RenameConfig:
    """Table names in the output: explicit `tables` first, then `schema` and `prefix`."""

    tables: dict[str, str] = field(default_factory=dict)  # "public.users": "crm.customers"
    schema: str | None = None  # every table into this schema/database
    prefix: str = ""  # prepended to every table name
    only: list[str] | None = None  # limit schema/prefix to these tables

    def __post_init__(self) -> None:
        if not self.tables and self.schema is None and not self.prefix:
            raise ConfigKeyError("tables", "give `tables`, `schema` or `prefix`")


@dataclass(frozen=True)
class LookupSource:
    type: Literal["redis", "postgres", "mysql"]
    url: str | None = secret(help="redis: URL")
    dsn: str | None = secret(help="postgres: libpq conninfo or URL")
    host: str = "127.0.0.1"  # mysql
    port: int = 3306  # mysql
    user: str = "root"  # mysql
    password: str | None = secret(help="mysql: password")
    database: str | None = None  # mysql
    key: str = "{}"  # redis: key template of the hash, `{}` is the lookup key ("customer:{}")
    table: str | None = None  # postgres/mysql: table read (SQL identifier syntax)
    key_column: str | None = None  # postgres/mysql: matched against the key (default: mapping.key)

    def __post_init__(self) -> None:
        needed = {"redis": "url", "postgres": "dsn", "mysql": "database"}[self.type]
        if getattr(self, needed) is None:
            raise ConfigKeyError(needed, f"required for a {self.type} lookup")
        if self.type != "redis" and self.table is None:
            raise ConfigKeyError("table", f"required for a {self.type} lookup")
        if self.type == "redis" and "{}" not in self.key:
            raise ConfigKeyError("key", "the key template needs `{}` for the lookup key")


@dataclass(frozen=True)
class LookupMapping:
    key: str  # the record's column holding the lookup key
    fields: dict[str, str] | list[str]  # looked-up field -> output column (a list: same names)


@dataclass(frozen=True)
class LookupConfig:
    source: LookupSource
    mapping: LookupMapping
    tables: list[str] | None = None
    cache_ttl: float = duration(60.0, "how long a looked-up value is reused")
    cache_size: int = 100_000  # entries kept (least recently used dropped)
    on_missing: Literal["null", "error"] = "null"  # no match: output columns null, or an error
