"""What the supervisor hands a worker process, and how classes named in the
registries are loaded. Kept apart from :mod:`dataflare.daemon.worker` so the
supervisor starts without importing the whole data path (psycopg, codecs, sinks):
its start is on the critical path of every worker's."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from dataflare.daemon.config import WorkflowConfig


@dataclass(frozen=True)
class WorkerSpec:
    role: Literal["source", "apply"]
    workflow: WorkflowConfig
    rings: dict[str, dict[str, int | str]]  # source name -> producer/consumer handles
    state_dir: str
    status_fd: int
    parent_pid: int
    source: str = ""  # role "source": which source of the workflow
    log_level: str = "INFO"
    log_format: str = "json"
    extra: dict[str, Any] = field(default_factory=dict)


def load_class(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    cls: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return cls
