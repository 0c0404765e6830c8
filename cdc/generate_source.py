"""The `generate` source: synthetic changes that are a pure function of their sequence number.

Because change ``n`` depends only on ``(seed, n)``, restarting from any checkpointed
position reproduces exactly the stream that followed it, which is what the runtime's
exactly-once tests need. ``expected_rows`` replays the stream into the final table
state so a test can compare a sink against it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from dataflare.cdc.errors import ConfigError
from dataflare.cdc.generate import GenerateConfig
from dataflare.cdc.model import Batch, Change, Column, Op, Position, Row, TableId, TableSchema
from dataflare.cdc.source import SourceContext

KIND = "generate"
_MASK64 = (1 << 64) - 1
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)

COLUMNS = (
    Column("id", "bigint", nullable=False),
    Column("name", "text"),
    Column("amount", "numeric(12,2)"),
    Column("qty", "integer"),
    Column("active", "boolean"),
    Column("updated_at", "timestamptz"),
)


def _mix(x: int) -> int:
    """splitmix64: a cheap, well-distributed hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def parse_table(name: str) -> TableId:
    schema, _, table = name.rpartition(".")
    return TableId(schema or "public", table)


@dataclass(frozen=True, slots=True)
class GeneratedChange:
    seq: int
    op: Op
    table_index: int
    row: Row  # full row for inserts/updates; key-only row (id, None, ...) for deletes


class ChangePlan:
    """Change ``seq`` (1-based) of the stream defined by a GenerateConfig."""

    def __init__(self, cfg: GenerateConfig) -> None:
        if cfg.inserts < 1 or cfg.updates < 0 or cfg.deletes < 0:
            raise ConfigError("generate: inserts must be >= 1, updates and deletes >= 0")
        if cfg.deletes > cfg.inserts:
            raise ConfigError(
                "generate: deletes must not exceed inserts (a block deletes its own rows)"
            )
        self.cfg = cfg
        self.tables = [parse_table(t) for t in cfg.tables]
        self.block = cfg.inserts + cfg.updates + cfg.deletes

    def change(self, seq: int) -> GeneratedChange:
        cfg = self.cfg
        ntables = len(self.tables)
        t = (seq - 1) % ntables
        k = (seq - 1) // ntables  # index of this change within its table
        b, j = divmod(k, self.block)
        h = _mix(cfg.seed * 1_000_003 + seq)
        base = b * cfg.inserts + 1  # first id of this block
        if j < cfg.inserts:
            return GeneratedChange(seq, Op.INSERT, t, self._row(base + j, h, seq))
        if j < cfg.inserts + cfg.updates:
            return GeneratedChange(seq, Op.UPDATE, t, self._row(base + h % cfg.inserts, h, seq))
        # Deletes remove distinct rows of this block, after its updates.
        d = j - cfg.inserts - cfg.updates
        hb = _mix(cfg.seed * 7_919 + t * 1_000_000_007 + b)
        victim = base + (hb + d) % cfg.inserts
        return GeneratedChange(seq, Op.DELETE, t, (victim, None, None, None, None, None))

    @staticmethod
    def _row(row_id: int, h: int, seq: int) -> Row:
        return (
            row_id,
            f"item-{h % 100_000}",
            Decimal(h % 10_000_000).scaleb(-2),
            (h >> 24) % 1000,
            bool(h & 1),
            _EPOCH + timedelta(milliseconds=seq),
        )

    def schema(self, table_index: int) -> TableSchema:
        return TableSchema(self.tables[table_index], COLUMNS, ("id",))


def expected_rows(cfg: GenerateConfig, upto: int) -> dict[TableId, dict[int, Row]]:
    """The table contents after changes 1..upto have been applied."""
    plan = ChangePlan(cfg)
    state: dict[TableId, dict[int, Row]] = {t: {} for t in plan.tables}
    for seq in range(1, upto + 1):
        c = plan.change(seq)
        rows = state[plan.tables[c.table_index]]
        if c.op is Op.DELETE:
            del rows[c.row[0]]
        else:
            rows[c.row[0]] = c.row
    return state


class GenerateSource:
    """Source protocol implementation over a ChangePlan, paced by ``rate``."""

    def __init__(self, name: str, config: GenerateConfig, ctx: SourceContext | None = None) -> None:
        self.name = name
        self.cfg = config
        self.plan = ChangePlan(config)
        self._next = 1  # next sequence number to produce
        self._paced_from: tuple[float, int] = (0.0, 1)  # (monotonic time, seq) of pacing origin
        self._confirmed: Position | None = None

    def prepare(self) -> None:
        pass  # all of it in open()

    def open(self, start: Position | None) -> None:
        if start is not None and start.kind != KIND:
            raise ConfigError(
                f"generate source {self.name}: cannot resume from a {start.kind} position"
            )
        self._next = (start.value if start else 0) + 1
        self._paced_from = (time.monotonic(), self._next)

    @property
    def exhausted(self) -> bool:
        return self.cfg.count is not None and self._next > self.cfg.count

    def _due(self, seq: int) -> float:
        """Monotonic time at which change ``seq`` may be produced."""
        if not self.cfg.rate:
            return 0.0
        t0, s0 = self._paced_from
        return t0 + (seq - s0) / self.cfg.rate

    def _transactions(self, deadline: float) -> Iterator[list[GeneratedChange]]:
        size = self.cfg.transaction_size
        while not self.exhausted:
            end = self._next + size - 1
            if self.cfg.count is not None:
                end = min(end, self.cfg.count)
            due = self._due(end)
            now = time.monotonic()
            if due > now:
                if due > deadline:
                    time.sleep(max(0.0, deadline - now))
                    return
                time.sleep(due - now)
            txn = [self.plan.change(s) for s in range(self._next, end + 1)]
            self._next = end + 1
            yield txn

    def read_batch(self, timeout: float) -> Batch | None:
        start = time.monotonic()
        deadline = start + min(timeout, self.cfg.batch_timeout)
        changes: list[Change] = []
        used: set[int] = set()
        for txn in self._transactions(deadline):
            commit = Position(KIND, txn[-1].seq)
            xid = (txn[-1].seq - 1) // self.cfg.transaction_size + 1
            ts = time.time_ns() // 1000
            for g in txn:
                used.add(g.table_index)
                row = g.row
                deleted = g.op is Op.DELETE
                changes.append(
                    Change(
                        op=g.op,
                        table=self.plan.tables[g.table_index],
                        position=commit,
                        key=(row[0],),
                        before=row if deleted else None,
                        after=None if deleted else row,
                        xid=xid,
                        commit_ts_us=ts,
                    )
                )
            if len(changes) >= self.cfg.batch_size or time.monotonic() >= deadline:
                break
        if not changes:
            return None
        return Batch(
            changes=changes,
            schemas=[self.plan.schema(i) for i in sorted(used)],
            first=changes[0].position,
            last=changes[-1].position,
        )

    def confirm(self, position: Position) -> None:
        self._confirmed = position

    def status(self) -> dict[str, Any]:
        produced = self._next - 1
        remaining = None if self.cfg.count is None else max(0, self.cfg.count - produced)
        return {
            "position": str(Position(KIND, produced)),
            "confirmed": str(self._confirmed) if self._confirmed else None,
            "lag_bytes": 0,
            "lag_seconds": 0.0,
            "snapshot": None,
            "remaining": remaining,
        }

    def close(self) -> None:
        pass
