"""Config of the `mysql` source (MySQL and MariaDB); imported by the registry, so no driver here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dataflare.cdc.settings import duration, secret


@dataclass(frozen=True)
class MysqlSourceConfig:
    server_id: int  # replica server id this source registers with; unique among replicas
    tables: list[str] = field(default_factory=list)  # `db.table` entries (SQL identifier syntax)
    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    password: str | None = secret(None)
    snapshot: Literal["initial", "never"] = "initial"
    batch_size: int = 5000
    batch_timeout: float = duration(0.02)
    # zero or invalid dates ('0000-00-00', '2024-00-10'): NULL, or stop with an error.
    # YAML reads a bare `null` as None: that means "null" too.
    zero_dates: Literal["null", "error"] | None = "null"
    heartbeat: float = duration(1.0, "server heartbeat period on an idle binlog connection")
    read_timeout: float = duration(5.0, "a binlog connection silent this long is dead")
    max_backoff: float = duration(10.0, "longest wait between reconnects")
    snapshot_chunk_size: int = 10_000  # rows per primary-key chunk of the initial snapshot
