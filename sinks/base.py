"""The Sink protocol: what the apply process drives for each destination."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from dataflare.cdc.model import Batch, Change, Position


class Sink(Protocol):
    """A destination that applies batches idempotently.

    ``write`` of a complete batch makes its data and the checkpoint ``batch.last``
    durable together (one transaction, or data then checkpoint with a replay that
    cannot duplicate), so after a crash at any instant ``checkpoint`` tells exactly
    where to resume. An incomplete batch (inside a large transaction) is applied but
    not checkpointed.

    Records the destination refuses for what they hold (a value the target column
    rejects, an HTTP 4xx) are the destination's ``on_error`` business
    (``SinkContext.on_error``): with "fail" ``write`` raises a non-retryable
    error; otherwise it hands the refused changes to ``SinkContext.reject``
    BEFORE the checkpoint that passes them is durable (so a crash cannot lose
    them: the apply process keeps them as dead letters, or skips them), and
    applies and checkpoints everything else. ``write`` may also return them
    (the apply process then counts them) but must have called ``reject`` first.
    Unavailability (connection lost, 5xx, timeouts) is always raised as a
    ``RetryableError`` with nothing checkpointed.
    """

    def open(self) -> None: ...

    def checkpoint(self, source: str) -> Position | None:
        """The last position of ``source`` durably applied, None if never."""

    def write(self, source: str, batch: Batch) -> Sequence[Rejected] | None:
        """Apply ``batch``; returns the changes refused (None or empty: none)."""

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
class Rejected:
    """A change a destination refused, with why (no row values in ``error``)."""

    change: Change
    error: str


def _ignore_rejected(source: str, rejected: Sequence[Rejected]) -> None:
    """The default: nobody to tell (tests that construct sinks directly)."""


def _never() -> bool:
    return False


@dataclass(frozen=True)
class SinkContext:
    workflow: str
    destination: str
    sources: tuple[str, ...]  # the workflow sources whose changes reach this destination
    state: CheckpointStore
    on_error: Literal["fail", "skip", "dead_letter"] = "fail"
    # Called with (source, refused changes) before they are checkpointed past.
    reject: Callable[[str, Sequence[Rejected]], None] = _ignore_rejected
    # True once the worker was asked to stop: a sink waiting to retry gives up
    # (raises RetryableError) instead of holding up the shutdown.
    stopping: Callable[[], bool] = _never
