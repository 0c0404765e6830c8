"""Helpers for declaring connector config dataclasses.

The config loader (``dataflare.daemon.config``) builds these dataclasses from YAML:
field names are the YAML keys, type hints drive parsing (str, int, float, bool,
``X | None``, ``list[str]``, ``dict[str, str]``, ``Literal[...]``, nested dataclasses),
and field metadata adds units: ``duration()`` accepts "20ms", "1.5s", "2m" or a
number of seconds; ``byte_size()`` accepts "64MiB", "1GB" or a number of bytes.
``secret=True`` marks a value never shown in logs, errors or the socket; such a key
also accepts a ``<key>_file`` variant read from a file (one trailing newline stripped).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from dataflare.cdc.errors import ConfigError

UNIT = "dataflare_unit"
SECRET = "dataflare_secret"
HELP = "dataflare_help"


def duration(default: float, help: str = "") -> Any:
    return field(default=default, metadata={UNIT: "duration", HELP: help})


def byte_size(default: int, help: str = "") -> Any:
    return field(default=default, metadata={UNIT: "bytes", HELP: help})


def secret(default: str | None = None, help: str = "") -> Any:
    return field(default=default, metadata={SECRET: True, HELP: help})


class ConfigKeyError(ConfigError):
    """Raised by a config dataclass's ``__post_init__`` to blame one of its keys:
    the loader reports ``message`` at that key's line (``key`` may be a path such
    as ``("rules", 2, "field")``)."""

    def __init__(self, key: str | tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.key_path: tuple[str | int, ...] = (key,) if isinstance(key, str) else key
        self.message = message
