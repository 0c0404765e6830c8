"""Config dataclasses of the built-in destinations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
