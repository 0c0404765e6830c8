"""Config dataclasses of the built-in destinations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dataflare.cdc.settings import HELP, SECRET, duration


@dataclass(frozen=True)
class FileSinkConfig:
    path: str
    format: Literal["jsonl"] = "jsonl"
    compression: Literal["none"] = "none"
    rotate_bytes: int | None = None  # rotation arrives with the sinks issue
    fsync: bool = True  # fsync before each checkpoint; off only for throwaway demos


@dataclass(frozen=True)
class StdoutSinkConfig:
    format: Literal["jsonl", "text"] = "jsonl"


@dataclass(frozen=True)
class PostgresSinkConfig:
    """The `postgres` destination (see docs/sinks-postgres.md)."""

    dsn: str = field(metadata={SECRET: True, HELP: "libpq conninfo or URL"})
    schema: str | None = None  # target schema; None: the source table's schema
    mode: Literal["upsert", "append"] = "upsert"
    create_tables: bool = True  # create/alter target tables from the source schema
    checkpoint_schema: str = "dataflare"  # holds the `checkpoints` table
    append_suffix: str = "_changes"  # mode append: change log table = <table><suffix>
    connect_timeout: float = duration(10.0)
    lock_timeout: float = duration(15.0, "wait this long for another writer to let go")


@dataclass(frozen=True)
class MysqlSinkConfig:
    """The `mysql` destination (MySQL or MariaDB; see docs/mysql.md)."""

    database: str  # target database (created when create_tables)
    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    password: str | None = field(default=None, metadata={SECRET: True, HELP: "password"})
    mode: Literal["upsert", "append"] = "upsert"
    create_tables: bool = True  # create missing tables, add missing columns
