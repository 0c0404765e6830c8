"""Destination types by name (see dataflare.cdc.registry for the pattern)."""

from __future__ import annotations

from dataflare.cdc.registry import ConnectorType
from dataflare.sinks.configs import (
    FileSinkConfig,
    HttpSinkConfig,
    MysqlSinkConfig,
    NatsSinkConfig,
    PostgresSinkConfig,
    RedisSinkConfig,
    StdoutSinkConfig,
)

SINK_TYPES: dict[str, ConnectorType] = {
    "file": ConnectorType(FileSinkConfig, "dataflare.sinks.file:FileSink"),
    "http": ConnectorType(HttpSinkConfig, "dataflare.sinks.http:HttpSink"),
    "mysql": ConnectorType(MysqlSinkConfig, "dataflare.sinks.mysql:MysqlSink"),
    "nats": ConnectorType(NatsSinkConfig, "dataflare.sinks.nats:NatsSink"),
    "postgres": ConnectorType(PostgresSinkConfig, "dataflare.sinks.postgres:PostgresSink"),
    "redis": ConnectorType(RedisSinkConfig, "dataflare.sinks.redis:RedisSink"),
    "stdout": ConnectorType(StdoutSinkConfig, "dataflare.sinks.stdout:StdoutSink"),
}
