"""Plain fakes of the daemon's protocols, shared by tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dataflare.cdc.model import Position


class NoState:
    """The daemon's state store, for sinks that keep their checkpoint in their
    target (postgres, mysql, redis): any use of it is a bug."""

    def __init__(self, sink: str = "this sink") -> None:
        self.message = f"{sink} keeps its checkpoint in its target, not in the state store"

    def get_checkpoint(self, workflow: str, destination: str, source: str) -> Position | None:
        raise AssertionError(self.message)

    def get_checkpoint_extra(
        self, workflow: str, destination: str, source: str
    ) -> dict[str, Any] | None:
        raise AssertionError(self.message)

    def put_checkpoint(
        self,
        workflow: str,
        destination: str,
        source: str,
        position: Position,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        raise AssertionError(self.message)
