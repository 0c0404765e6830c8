"""Destination types by name (see dataflare.cdc.registry for the pattern)."""

from __future__ import annotations

from dataflare.cdc.registry import ConnectorType
from dataflare.sinks.configs import (
    FileSinkConfig,
    MysqlSinkConfig,
    PostgresSinkConfig,
    StdoutSinkConfig,
)

SINK_TYPES: dict[str, ConnectorType] = {
    "file": ConnectorType(FileSinkConfig, "dataflare.sinks.file:FileSink"),
    "mysql": ConnectorType(MysqlSinkConfig, "dataflare.sinks.mysql:MysqlSink"),
    "postgres": ConnectorType(PostgresSinkConfig, "dataflare.sinks.postgres:PostgresSink"),
    "stdout": ConnectorType(StdoutSinkConfig, "dataflare.sinks.stdout:StdoutSink"),
}
