"""The `generate` source: deterministic synthetic changes, for demos and runtime tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from dataflare.cdc.settings import duration


@dataclass(frozen=True)
class GenerateConfig:
    tables: list[str] = field(default_factory=lambda: ["public.items"])
    count: int | None = None  # total changes to produce; None: unlimited
    rate: float | None = None  # changes per second; None: as fast as possible
    seed: int = 1
    transaction_size: int = 1  # changes per source transaction
    # Per block of inserts+updates+deletes changes: first the inserts, then updates
    # and deletes of rows inserted in that block, so a change is a pure function of
    # its sequence number and a restart from any position reproduces the stream.
    inserts: int = 6
    updates: int = 3
    deletes: int = 1
    batch_size: int = 5000
    batch_timeout: float = duration(0.02)
