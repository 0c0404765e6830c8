"""The `stdout` destination: change envelopes on the daemon's standard output.

At-least-once by nature (nothing to checkpoint against); its checkpoint lives in
the state store so a restart does not replay what was already printed.
"""

from __future__ import annotations

import sys
from typing import Any

from dataflare.cdc.model import Batch, Position
from dataflare.sinks.base import SinkContext
from dataflare.sinks.configs import StdoutSinkConfig
from dataflare.sinks.envelope import envelope, to_json


class StdoutSink:
    def __init__(self, name: str, config: StdoutSinkConfig, ctx: SinkContext) -> None:
        self.name = name
        self.cfg = config
        self.ctx = ctx
        self._checkpoints: dict[str, Position | None] = {}
        self.records_written = 0

    def open(self) -> None:
        for source in self.ctx.sources:
            self._checkpoints[source] = self.ctx.state.get_checkpoint(
                self.ctx.workflow, self.name, source
            )

    def checkpoint(self, source: str) -> Position | None:
        return self._checkpoints.get(source)

    def write(self, source: str, batch: Batch) -> None:
        schemas = batch.schema_map()
        out = sys.stdout
        for c in batch.changes:
            if self.cfg.format == "jsonl":
                out.write(to_json(envelope(c, schemas[c.table], source)) + "\n")
            else:
                out.write(f"{c.position} {c.op.value} {c.table} {c.key}\n")
        out.flush()
        self.records_written += len(batch.changes)
        if batch.complete:
            self.ctx.state.put_checkpoint(self.ctx.workflow, self.name, source, batch.last)
            self._checkpoints[source] = batch.last

    def status(self) -> dict[str, Any]:
        return {"records_written": self.records_written}

    def close(self) -> None:
        pass
