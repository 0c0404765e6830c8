"""The `file` destination: JSONL or CSV, optionally zstd, rotated, exactly once.

Exactly-once without a transactional target: the daemon's state store keeps, with
each checkpoint, the sequence number of the live file and its byte length at that
point (``extra = {"seq", "offset", "started"}``). Data is appended, fsynced, and
only then is the checkpoint committed; on open the live file is cut back to the
checkpointed length, so bytes written after it (a crash before the checkpoint, or
half a record) are dropped and the source re-sends exactly those. The apply process
never interleaves another source inside an incomplete batch, so the greatest
checkpointed (seq, offset) of the destination's sources is the valid one.

zstd: every write is one complete zstd frame, so every checkpointed length is a
frame boundary and the cut-back file is a valid stream (concatenated frames decode
as one).

Rotation happens only right after a checkpoint: the live file, complete and
fsynced, is renamed to ``<stem>.<seq>.<ext>[.zst]``, a new live file is created,
the directory fsynced, then a checkpoint records the next sequence at offset 0.
A crash between the rename and that checkpoint leaves a checkpoint naming a
sequence whose rotated file exists: open() sees it and carries on with the next
sequence (see :meth:`FileSink._reconcile`). Names: ``dataflare.sinks.file_names``;
the manual: docs/sinks-files.md.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from typing import Any

import zstandard
from dataflare.cdc.errors import FatalError, RetryableError
from dataflare.cdc.model import Batch, Position
from dataflare.sinks.base import SinkContext
from dataflare.sinks.configs import FileSinkConfig
from dataflare.sinks.file_format import make_format
from dataflare.sinks.file_names import FileNames, fsync_dir
from loguru import logger

LOCK_WAIT_S = 15.0
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class _Mark:
    """Where the checkpoint of one source left the file."""

    source: str
    position: Position
    seq: int | None  # None: written before rotation existed (offset only)
    offset: int
    started: float | None  # wall-clock time the live file was begun

    @property
    def order(self) -> tuple[int, int]:
        return (self.seq or 0, self.offset)


class FileSink:
    # Reopening cuts the live file back to the checkpoint: what a failed write left
    # is gone, so the apply process may probe sub-batches (see daemon/worker.py).
    transactional = True

    def __init__(self, name: str, config: FileSinkConfig, ctx: SinkContext) -> None:
        self.name = name
        self.cfg = config
        self.ctx = ctx
        self.log = logger.bind(workflow=ctx.workflow, component=f"destination:{name}")
        self._format = make_format(config.format)
        self._zstd = (
            zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
            if config.compression == "zstd"
            else None
        )
        self.names = FileNames.of(config.path, self._format.extension, self._zstd is not None)
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._seq = 1  # sequence number the live file gets when rotated
        self._offset = 0
        self._started = 0.0
        self._checkpoints: dict[str, Position | None] = {}
        self.records_written = 0
        self.rotations = 0

    # ------------------------------------------------------------------ open

    def open(self) -> None:
        os.makedirs(self.names.directory, exist_ok=True)
        lock_fd = os.open(self.names.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            self._lock(lock_fd)
            self._reconcile(self._marks())
        except BaseException:
            os.close(lock_fd)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            raise
        self._lock_fd = lock_fd

    def _marks(self) -> list[_Mark]:
        marks = []
        for source in self.ctx.sources:
            pos = self.ctx.state.get_checkpoint(self.ctx.workflow, self.name, source)
            self._checkpoints[source] = pos
            if pos is None:
                continue
            x = self.ctx.state.get_checkpoint_extra(self.ctx.workflow, self.name, source) or {}
            seq = x.get("seq")
            started = x.get("started")
            marks.append(
                _Mark(
                    source,
                    pos,
                    None if seq is None else int(seq),
                    int(x.get("offset", 0)),
                    None if started is None else float(started),
                )
            )
        return marks

    def _reconcile(self, marks: list[_Mark]) -> None:
        """Bring the files in line with the newest checkpoint, whatever instant a
        crash hit: cut back what was written after it, finish a rotation it did
        not record, refuse to go on when checkpointed data is gone."""
        best = max(marks, key=lambda m: m.order, default=None)
        now = time.time()
        if best is None or best.seq is None:
            # Never rotated (or no checkpoint): number after any rotated file present,
            # never overwrite one.
            present = self.names.rotated_sequences()
            seq, valid, started = (present[-1] + 1 if present else 1), 0, now
            if best is not None:
                valid = best.offset
            finished_rotation = False
        else:
            seq, valid, started = best.seq, best.offset, best.started or now
            finished_rotation = self._rotated_after_checkpoint(seq, valid)
            if finished_rotation:
                seq, valid, started = seq + 1, 0, now
        live = self.names.live
        fd = os.open(live, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._fd = fd
        size = os.fstat(fd).st_size
        if size < valid:
            raise FatalError(
                f"file destination {self.name}: {live} is {size} bytes but {valid} bytes were "
                "checkpointed: the file was truncated or replaced; move it back, or remove "
                "the workflow's state to start over"
            )
        if size > valid:
            self.log.info("cutting {} back from {} to {} checkpointed bytes", live, size, valid)
            os.ftruncate(fd, valid)  # drop what was written after the last checkpoint
            os.fsync(fd)
        os.lseek(fd, valid, os.SEEK_SET)
        self._seq, self._offset, self._started = seq, valid, started
        if finished_rotation and best is not None:
            self.log.info("finished the rotation of {} a crash interrupted", live)
            fsync_dir(self.names.directory)
            self._put_checkpoint(best.source, best.position)

    def _rotated_after_checkpoint(self, seq: int, valid: int) -> bool:
        """True when the live file of checkpoint (seq, valid) was already rotated."""
        rotated = self.names.rotated(seq)
        try:
            size = os.stat(rotated).st_size
        except FileNotFoundError:
            return False
        if size != valid:
            # Rotation renames only a fully checkpointed file: anything else means
            # the file was changed behind our back.
            raise FatalError(
                f"file destination {self.name}: rotated file {rotated} is {size} bytes but "
                f"{valid} bytes were checkpointed for it; restore it, or remove the "
                "workflow's state to start over"
            )
        return True

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
                        f"file destination {self.name}: {self.names.live} is locked by "
                        "another writer"
                    ) from None
                time.sleep(0.05)

    # ----------------------------------------------------------------- write

    def checkpoint(self, source: str) -> Position | None:
        return self._checkpoints.get(source)

    def write(self, source: str, batch: Batch) -> None:
        assert self._fd is not None, "open() first"
        if batch.changes:
            data = self._format.encode(batch.changes, batch.schema_map(), source)
            if self._offset == 0:
                data = self._format.header() + data
            if self._zstd is not None:
                data = self._zstd.compress(data)  # one frame: a valid cut-back point
            self._write_all(data)
            self.records_written += len(batch.changes)
        if batch.complete:
            if self.cfg.fsync:
                os.fsync(self._fd)
            self._put_checkpoint(source, batch.last)
            if self._rotation_due():
                self._rotate(source, batch.last)

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._offset += len(data)

    def _put_checkpoint(self, source: str, position: Position) -> None:
        extra = {"seq": self._seq, "offset": self._offset, "started": self._started}
        self.ctx.state.put_checkpoint(self.ctx.workflow, self.name, source, position, extra)
        self._checkpoints[source] = position

    def _rotation_due(self) -> bool:
        if self._offset == 0:
            return False  # never rotate out an empty file
        if self.cfg.rotate_bytes and self._offset >= self.cfg.rotate_bytes:
            return True
        return bool(
            self.cfg.rotate_interval and time.time() - self._started >= self.cfg.rotate_interval
        )

    def _rotate(self, source: str, position: Position) -> None:
        """Rename the (checkpointed, fsynced) live file to its rotated name and begin
        a new one; the checkpoint then moves to the new file at offset 0."""
        assert self._fd is not None
        target = self.names.rotated(self._seq)
        if os.path.exists(target):
            raise FatalError(
                f"file destination {self.name}: {target} already exists; move it away "
                "(rotated files are never overwritten)"
            )
        os.rename(self.names.live, target)
        fd = os.open(self.names.live, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        os.close(self._fd)
        self._fd = fd
        if self.cfg.fsync:
            fsync_dir(self.names.directory)
        self.log.info("rotated {} bytes to {}", self._offset, target)
        self._seq, self._offset, self._started = self._seq + 1, 0, time.time()
        self.rotations += 1
        self._put_checkpoint(source, position)

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        return {
            "records_written": self.records_written,
            "bytes": self._offset,
            "file_sequence": self._seq,
            "rotations": self.rotations,
        }

    def close(self) -> None:
        for attr in ("_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)
