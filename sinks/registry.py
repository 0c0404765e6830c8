"""Destination types by name (see dataflare.cdc.registry for the pattern)."""

from __future__ import annotations

from dataflare.cdc.registry import ConnectorType
from dataflare.sinks.configs import (
    FileSinkConfig,
    PostgresSinkConfig,
    StdoutSinkConfig,
)

SINK_TYPES: dict[str, ConnectorType] = {
    "file": ConnectorType(FileSinkConfig, "dataflare.sinks.file:FileSink"),
    "postgres": ConnectorType(PostgresSinkConfig, "dataflare.sinks.postgres:PostgresSink"),
    "stdout": ConnectorType(StdoutSinkConfig, "dataflare.sinks.stdout:StdoutSink"),
}
