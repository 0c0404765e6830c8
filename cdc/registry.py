"""Source types by name: their config dataclass and where the implementation lives.

The implementation is imported only when a source process starts, so validating a
config never loads a database driver.
"""

from __future__ import annotations

from dataclasses import dataclass

from dataflare.cdc.generate import GenerateConfig
from dataflare.cdc.mysql.config import MysqlSourceConfig
from dataflare.cdc.postgres.config import PostgresSourceConfig


@dataclass(frozen=True)
class ConnectorType:
    config: type  # a dataclass, built from the YAML `config:` mapping
    implementation: str  # "module:Class"; constructed as Class(name, config)


SOURCE_TYPES: dict[str, ConnectorType] = {
    "generate": ConnectorType(GenerateConfig, "dataflare.cdc.generate_source:GenerateSource"),
    "mysql": ConnectorType(MysqlSourceConfig, "dataflare.cdc.mysql.source:MysqlBinlogSource"),
    "postgres": ConnectorType(PostgresSourceConfig, "dataflare.cdc.postgres.source:PostgresSource"),
}
