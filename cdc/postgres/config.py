"""Config of the `postgres` source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dataflare.cdc.settings import duration, secret


@dataclass(frozen=True)
class PostgresSourceConfig:
    dsn: str = secret(help="libpq conninfo or URL")
    tables: list[str] | None = None  # SQL identifiers; None: the publication's tables
    publication: str | None = None  # default dataflare_<workflow>
    slot: str | None = None  # default dataflare_<workflow>
    snapshot: Literal["initial", "never"] = "initial"
    batch_size: int = 5000
    batch_timeout: float = duration(0.02)
    status_interval: float = duration(1.0, "standby status sent at least this often")
    connect_timeout: float = duration(10.0)
