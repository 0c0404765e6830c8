"""The Sink protocol: what the apply process drives for each destination."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from dataflare.cdc.model import Batch, Position


class Sink(Protocol):
    """A destination that applies batches idempotently.

    ``write`` of a complete batch makes its data and the checkpoint ``batch.last``
    durable together (one transaction, or data then checkpoint with a replay that
    cannot duplicate), so after a crash at any instant ``checkpoint`` tells exactly
    where to resume. An incomplete batch (inside a large transaction) is applied but
    not checkpointed.
    """

    def open(self) -> None: ...

    def checkpoint(self, source: str) -> Position | None:
        """The last position of ``source`` durably applied, None if never."""

    def write(self, source: str, batch: Batch) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class CheckpointStore(Protocol):
    """The part of the daemon's state store a non-transactional sink keeps its
    checkpoint in (dataflare.daemon.state.StateStore implements it)."""

    def get_checkpoint(self, workflow: str, destination: str, source: str) -> Position | None: ...

    def get_checkpoint_extra(
        self, workflow: str, destination: str, source: str
    ) -> dict[str, Any] | None: ...

    def put_checkpoint(
        self,
        workflow: str,
        destination: str,
        source: str,
        position: Position,
        extra: Mapping[str, Any] | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class SinkContext:
    workflow: str
    destination: str
    sources: tuple[str, ...]  # the workflow sources whose changes reach this destination
    state: CheckpointStore
