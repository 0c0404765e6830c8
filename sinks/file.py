"""The `file` destination: one JSON envelope per line (JSONL), exactly once.

Exactly-once without a transactional target: the daemon's state store keeps, with
each checkpoint, the byte length of the file at that point. Lines are appended,
fsynced, and only then is the checkpoint committed; on open the file is cut back to
the last checkpointed length, so lines written after it (a crash before the
checkpoint, or half a line) are dropped and the source re-sends exactly those.
The apply process never interleaves another source inside an incomplete batch, so
the longest checkpointed length is the valid one.
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import Any

from dataflare.cdc.errors import FatalError, RetryableError
from dataflare.cdc.model import Batch, Position
from dataflare.sinks.base import SinkContext
from dataflare.sinks.configs import FileSinkConfig
from dataflare.sinks.envelope import envelope, to_json

LOCK_WAIT_S = 15.0


class FileSink:
    def __init__(self, name: str, config: FileSinkConfig, ctx: SinkContext) -> None:
        self.name = name
        self.cfg = config
        self.ctx = ctx
        self._fd: int | None = None
        self._offset = 0
        self._checkpoints: dict[str, Position | None] = {}
        self.records_written = 0

    def open(self) -> None:
        path = self.cfg.path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            self._lock(fd)
            valid = 0
            for source in self.ctx.sources:
                self._checkpoints[source] = self.ctx.state.get_checkpoint(
                    self.ctx.workflow, self.name, source
                )
                extra = self.ctx.state.get_checkpoint_extra(self.ctx.workflow, self.name, source)
                valid = max(valid, int((extra or {}).get("offset", 0)))
            size = os.fstat(fd).st_size
            if size < valid:
                raise FatalError(
                    f"file destination {self.name}: {path} is {size} bytes but {valid} bytes were "
                    "checkpointed: the file was truncated or replaced; move it back, or remove "
                    "the workflow's state to start over"
                )
            if size > valid:
                os.ftruncate(fd, valid)  # drop lines written after the last checkpoint
                os.fsync(fd)
            os.lseek(fd, valid, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._offset = fd, valid

    def _lock(self, fd: int) -> None:
        # A previous apply process may still be exiting; wait for it, never interleave.
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RetryableError(
                        f"file destination {self.name}: {self.cfg.path} is locked by another writer"
                    ) from None
                time.sleep(0.05)

    def checkpoint(self, source: str) -> Position | None:
        return self._checkpoints.get(source)

    def write(self, source: str, batch: Batch) -> None:
        assert self._fd is not None, "open() first"
        schemas = batch.schema_map()
        if batch.changes:
            lines = [to_json(envelope(c, schemas[c.table], source)) + "\n" for c in batch.changes]
            data = "".join(lines).encode()
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            self._offset += len(data)
            self.records_written += len(lines)
        if batch.complete:
            if self.cfg.fsync:
                os.fsync(self._fd)
            self.ctx.state.put_checkpoint(
                self.ctx.workflow, self.name, source, batch.last, {"offset": self._offset}
            )
            self._checkpoints[source] = batch.last

    def status(self) -> dict[str, Any]:
        return {"records_written": self.records_written, "bytes": self._offset}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
