"""Shared fixtures: private PostgreSQL, MariaDB, Redis and NATS servers (see tests/servers.py).

The servers are session-scoped and start lazily: a test that asks only for
``pg_server`` never starts MariaDB. They are stopped and their temporary
directories removed when the session ends, whether tests passed or not.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from tests.servers import MariaDBServer, NatsServer, PostgresServer, RedisServer


def unique_db_name(test_name: str) -> str:
    """A fresh database name derived from a test name (fits PG's 63 bytes)."""
    slug = re.sub(r"[^a-z0-9]+", "_", test_name.lower()).strip("_")[:40]
    return f"t_{slug}_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A private PostgreSQL 15 (wal_level=logical) for the whole session."""
    server = PostgresServer(tmp_path_factory.mktemp("pg_server"))
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def mariadb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBServer]:
    """A private MariaDB 10.11 (row binlog, FULL image and metadata) for the session."""
    server = MariaDBServer(tmp_path_factory.mktemp("mariadb_server"))
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private Redis (no persistence) for the session; ``.url``, ``.client()``."""
    server = RedisServer(tmp_path_factory.mktemp("redis_server"))
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A private NATS server with JetStream for the session; ``.url``."""
    server = NatsServer(tmp_path_factory.mktemp("nats_server"))
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_db(pg_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database on ``pg_server``; the value is its libpq DSN. Dropped after
    the test, with its connections and replication slots."""
    name = unique_db_name(request.node.name)
    dsn = pg_server.create_database(name)
    yield dsn
    if pg_server.running:
        pg_server.drop_database(name)


@pytest.fixture
def mariadb_db(mariadb_server: MariaDBServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database on ``mariadb_server``; the value is its name. Dropped after."""
    name = mariadb_server.create_database(unique_db_name(request.node.name))
    yield name
    if mariadb_server.running:
        mariadb_server.drop_database(name)
