"""Config dataclasses of the built-in destinations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dataflare.cdc.settings import HELP, SECRET, byte_size, duration


@dataclass(frozen=True)
class FileSinkConfig:
    path: str  # the live file; rotated files are <stem>.<sequence>.jsonl[.zst]
    format: Literal["jsonl", "csv"] = "jsonl"
    compression: Literal["none", "zstd"] = "none"
    rotate_bytes: int = byte_size(0, "rotate when the file reaches this size (0: never)")
    rotate_interval: float = duration(0.0, "rotate this often (0: never)")
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


@dataclass(frozen=True)
class RedisSinkConfig:
    """The `redis` destination (see docs/sinks-messages.md)."""

    url: str = field(default="redis://127.0.0.1:6379/0", metadata={SECRET: True, HELP: "URL"})
    mode: Literal["hash", "stream"] = "hash"
    key: str = "{table}:{key}"  # hash mode: key template ({schema}, {table}, {key}, any column)
    stream: str = "dataflare.{schema}.{table}"  # stream mode: stream name template
    stream_maxlen: int | None = None  # approximate MAXLEN trimming of each stream
    envelope: Literal["json", "msgpack"] = "json"  # stream mode: entry encoding
    connect_timeout: float = duration(5.0)


@dataclass(frozen=True)
class NatsSinkConfig:
    """The `nats` destination: JetStream publish with server-side dedupe."""

    url: str = field(default="nats://127.0.0.1:4222", metadata={SECRET: True, HELP: "URL"})
    subject: str = "dataflare.{schema}.{table}"
    stream: str = "DATAFLARE"
    create_stream: bool = True  # create the stream (subjects: the template's wildcard) if missing
    envelope: Literal["json", "msgpack"] = "json"
    duplicate_window: float = duration(120.0, "JetStream dedupe window of a created stream")
    ack_timeout: float = duration(10.0)


@dataclass(frozen=True)
class HttpSinkConfig:
    """The `http` destination: batches POSTed as JSON to a webhook."""

    url: str = field(metadata={SECRET: True, HELP: "endpoint URL"})
    headers: dict[str, str] = field(default_factory=dict, metadata={SECRET: True})
    batch_size: int = 500  # changes per request
    timeout: float = duration(10.0)
    retry_count: int = 5  # 5xx, 429 and timeouts: retried with exponential backoff
    initial_backoff: float = duration(0.2)
    max_backoff: float = duration(10.0)
    tls_verify: bool = True
    tls_ca_file: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
