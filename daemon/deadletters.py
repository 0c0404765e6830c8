"""Dead letters: changes a transformation or destination refused, kept in LMDB.

A record holds the change as it entered the node that refused it (one-change
batch, encoded by the ring's codec with its table layout), the node, the stage
(transform or destination), the destinations that missed it, the error and the
source position. Stored through :class:`StateStore` (msgpack, zstd when large).

The same change refused again after a restart (the source re-sends the window
after the last checkpoint) is not stored twice: a fingerprint of (node, change)
maps to the letter's id while it exists.

Replay: ``dataflare dlq replay`` stores a request; the workflow's apply process
picks it up between batches, sends each letter through its node again (and what
follows it), deletes the letters that now pass and keeps the others with their
new error.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dataflare.cdc.codec import decode_batch, encode_batch
from dataflare.cdc.model import Batch, Change, TableSchema
from dataflare.daemon.state import StateStore


@dataclass(frozen=True)
class DeadLetter:
    id: int
    node: str
    stage: str  # "transform" | "destination"
    source: str
    destinations: tuple[str, ...]
    error: str
    position: str
    table: str
    op: str
    created: float
    attempts: int
    change: Change
    schema: TableSchema

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "node": self.node,
            "stage": self.stage,
            "source": self.source,
            "destinations": list(self.destinations),
            "table": self.table,
            "op": self.op,
            "position": self.position,
            "error": self.error,
            "created": self.created,
            "attempts": self.attempts,
        }


def _encode_change(change: Change, schema: TableSchema) -> bytes:
    return encode_batch(Batch([change], [schema], change.position, change.position, True))


def _decode_change(data: bytes) -> tuple[Change, TableSchema]:
    batch = decode_batch(data)
    return batch.changes[0], batch.schemas[0]


class DeadLetterStore:
    def __init__(self, state: StateStore, workflow: str) -> None:
        self.state = state
        self.workflow = workflow

    def _fp_key(self, fp: str) -> str:
        return f"dlfp:{self.workflow}:{fp}"

    def _replay_key(self) -> str:
        return f"dlq-replay:{self.workflow}"

    def record(
        self,
        node: str,
        stage: str,
        source: str,
        change: Change,
        schema: TableSchema,
        error: str,
        destinations: Sequence[str],
    ) -> dict[str, Any]:
        data = _encode_change(change, schema)
        fp = hashlib.sha256(node.encode() + b"\0" + stage.encode() + b"\0" + data).hexdigest()
        return {
            "node": node,
            "stage": stage,
            "source": source,
            "destinations": list(destinations),
            "error": error[:2000],
            "position": str(change.position),
            "table": str(change.table),
            "op": change.op.value,
            "created": time.time(),
            "attempts": 1,
            "fp": fp,
            "change": data,
        }

    def put_many(self, records: Sequence[dict[str, Any]]) -> int:
        """Store records (one transaction); returns how many were new."""
        fresh: list[dict[str, Any]] = []
        seen: set[str] = set()
        for r in records:
            fp = r["fp"]
            if fp in seen:
                continue
            seen.add(fp)
            existing = self.state.get_meta(self._fp_key(fp))
            if (
                existing is not None
                and self.state.get_dead_letter(self.workflow, int(existing)) is not None
            ):
                continue  # the same change refused again after a restart
            fresh.append(r)
        if not fresh:
            return 0
        with self.state.transaction() as txn:
            for r in fresh:
                letter_id = txn.put_dead_letter(self.workflow, r)
                txn.put_meta(self._fp_key(r["fp"]), letter_id)
        return len(fresh)

    def _letter(self, letter_id: int, raw: dict[str, Any]) -> DeadLetter:
        change, schema = _decode_change(bytes(raw["change"]))
        return DeadLetter(
            id=letter_id,
            node=str(raw.get("node", "")),
            stage=str(raw.get("stage", "")),
            source=str(raw.get("source", "")),
            destinations=tuple(raw.get("destinations") or ()),
            error=str(raw.get("error", "")),
            position=str(raw.get("position", "")),
            table=str(raw.get("table", "")),
            op=str(raw.get("op", "")),
            created=float(raw.get("created", 0.0)),
            attempts=int(raw.get("attempts", 1)),
            change=change,
            schema=schema,
        )

    def letters(self, limit: int | None = None) -> list[DeadLetter]:
        return [self._letter(i, raw) for i, raw in self.state.dead_letters(self.workflow, limit)]

    def get(self, letter_id: int) -> DeadLetter | None:
        raw = self.state.get_dead_letter(self.workflow, letter_id)
        return None if raw is None else self._letter(letter_id, raw)

    def count(self) -> int:
        return self.state.count_dead_letters(self.workflow)

    def delete(self, letter_id: int) -> bool:
        raw = self.state.get_dead_letter(self.workflow, letter_id)
        if raw is None:
            return False
        with self.state.transaction() as txn:
            txn.delete_dead_letter(self.workflow, letter_id)
            txn.put_meta(self._fp_key(str(raw.get("fp", ""))), None)
        return True

    def update_failed(
        self, letter: DeadLetter, error: str, destinations: Sequence[str] | None = None
    ) -> None:
        """A replay failed again: keep the letter with the new error, and only the
        destinations that still miss it. (The store gives every put a new id, so
        the letter gets one too.)"""
        raw = self.state.get_dead_letter(self.workflow, letter.id)
        if raw is None:
            return
        raw = {**raw, "error": error[:2000], "attempts": letter.attempts + 1}
        if destinations is not None:
            raw["destinations"] = list(destinations)
        with self.state.transaction() as txn:
            txn.delete_dead_letter(self.workflow, letter.id)
            new_id = txn.put_dead_letter(self.workflow, raw)
            txn.put_meta(self._fp_key(str(raw.get("fp", ""))), new_id)

    def purge(self, ids: Sequence[int] | None = None) -> int:
        targets = [d.id for d in self.letters()] if ids is None else list(ids)
        return sum(1 for i in targets if self.delete(i))

    # replay requests (written by the supervisor, taken by the apply process)

    def request_replay(self, ids: Sequence[int] | None) -> None:
        self.state.put_meta(
            self._replay_key(),
            {"ids": None if ids is None else list(ids), "requested": time.time()},
        )
        self.state.put_meta(self._replay_key() + ":result", None)

    def take_replay_request(self) -> tuple[bool, list[int] | None]:
        """(asked, the ids asked for: None for all)."""
        req = self.state.get_meta(self._replay_key())
        if not req:
            return False, None
        self.state.put_meta(self._replay_key(), None)
        ids = req.get("ids")
        return True, None if ids is None else [int(i) for i in ids]

    def put_replay_result(self, result: dict[str, Any]) -> None:
        self.state.put_meta(self._replay_key() + ":result", {**result, "done": time.time()})

    def replay_result(self) -> dict[str, Any] | None:
        res = self.state.get_meta(self._replay_key() + ":result")
        return res if isinstance(res, dict) else None
