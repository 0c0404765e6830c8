"""The Source protocol: what a source process drives."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dataflare.cdc.model import Batch, Position


class Source(Protocol):
    """A change stream read in batches.

    Positions: every change carries the commit position of its transaction (the
    point a consumer resumes after), so positions never decrease along the stream.
    """

    def prepare(self) -> None:
        """What needs no start position (connect, check the server): called while
        the destinations open and find the start, so the two overlap. May do nothing."""

    def open(self, start: Position | None) -> None:
        """Connect (unless ``prepare`` did) and stream every transaction that commits
        after ``start`` (None: from the beginning, including the initial snapshot if
        configured)."""

    def read_batch(self, timeout: float) -> Batch | None:
        """The next batch, or None if nothing arrived within ``timeout`` seconds."""

    def confirm(self, position: Position) -> None:
        """Everything up to ``position`` is durably applied by every destination;
        the source may let the server free it (standby status, checkpoint)."""

    @property
    def exhausted(self) -> bool:
        """True when a finite source has delivered everything it ever will."""

    def status(self) -> dict[str, Any]:
        """Progress for status: position, lag_bytes, lag_seconds, snapshot, ..."""

    def close(self) -> None: ...


class SourceStateStore(Protocol):
    """The part of the daemon's state store (LMDB) a source uses: snapshot progress
    and schema history. The worker opens it and hands it over in the context, so
    cdc never imports the daemon."""

    def get_snapshot_progress(self, workflow: str, source: str) -> dict[str, Any] | None: ...

    def put_snapshot_progress(
        self, workflow: str, source: str, progress: Mapping[str, Any]
    ) -> None: ...

    def append_schema(
        self, workflow: str, source: str, position: Position, schema_record: Mapping[str, Any]
    ) -> None: ...

    def schema_history(
        self, workflow: str, source: str
    ) -> list[tuple[Position, dict[str, Any]]]: ...


@dataclass(frozen=True)
class SourceContext:
    """What a source knows of the workflow it runs in (third constructor argument)."""

    workflow: str
    state_dir: str = ""
    # True when everything sent so far has been taken by the apply side (ring empty):
    # a source may then ship a partial batch at once instead of filling it.
    downstream_idle: Callable[[], bool] = field(default=lambda: True, compare=False)
    state: SourceStateStore | None = field(default=None, compare=False)
    # Every destination writes PostgreSQL text rows as they are (Batch.pg_text): a
    # postgres source may then skip loading values.
    pg_text: bool = False

    @property
    def default_slot(self) -> str:
        """Default slot and publication name: dataflare_ + the workflow name with every
        character outside [a-z0-9_] replaced by _."""
        return "dataflare_" + re.sub(r"[^a-z0-9_]", "_", self.workflow.lower())
