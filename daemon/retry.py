"""Backoff and the circuit breaker, from a node's ``error_handling``."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from dataflare.daemon.config import ErrorHandling


def backoff_delay(eh: ErrorHandling, attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based).

    Exponential waits double from ``initial_backoff`` up to ``max_backoff``; with
    ``jitter`` each is drawn from [wait/2, wait] so restarting workers do not knock
    on a recovering server in step.
    """
    if eh.backoff == "fixed":
        return eh.initial_backoff
    wait = float(min(eh.max_backoff, eh.initial_backoff * 2.0 ** max(0, attempt - 1)))
    if eh.jitter:
        wait = float((rng or random).uniform(wait / 2, wait))
    return wait


@dataclass
class CircuitBreaker:
    """Closed: writes go through. After ``threshold`` failed attempts in a row it
    opens for ``reset`` seconds (writes wait; the ring fills and the source stops
    reading, so nothing is lost), then lets one attempt through (half-open):
    success closes it, failure opens it again. A threshold of 0 disables it."""

    threshold: int
    reset: float
    failures: int = 0
    opened_at: float | None = None
    opened_total: int = 0

    @classmethod
    def of(cls, eh: ErrorHandling) -> CircuitBreaker:
        return cls(eh.circuit_breaker_threshold, eh.circuit_breaker_reset)

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "open" if time.monotonic() - self.opened_at < self.reset else "half-open"

    def wait_s(self) -> float:
        """Seconds until an attempt is allowed (0 when closed or half-open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.reset - (time.monotonic() - self.opened_at))

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def failure(self) -> bool:
        """Count a failed attempt; True when the circuit is (now) open."""
        self.failures += 1
        if self.threshold > 0 and self.failures >= self.threshold:
            if self.opened_at is None:
                self.opened_total += 1
            self.opened_at = time.monotonic()
            return True
        return False
