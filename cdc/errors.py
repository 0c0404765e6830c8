"""One error tree for the whole daemon.

Retryable errors are retried with backoff inside the component and then by the
supervisor restarting the process; fatal ones stop the workflow with the message
shown in status (and a distinct exit code for systemd's RestartPreventExitStatus=).
"""

from __future__ import annotations


class DataflareError(Exception):
    """Base of every error DataFlare raises on purpose. Messages never hold secrets."""

    retryable: bool = False


class RetryableError(DataflareError):
    """A peer is unavailable or misbehaved for now (disconnect, timeout, lock)."""

    retryable = True


class FatalError(DataflareError):
    """Retrying cannot help (slot dropped, binlog purged, bad data or config)."""


class RecordRefused(FatalError):
    """A destination refuses what a change holds (a value the target column or a
    constraint rejects): only the change's fault, so on_error may set it aside."""


class ConfigError(FatalError):
    """The configuration is invalid."""


class RingClosed(DataflareError):
    """The other side of a ring ended (cleanly or by dying)."""


class PeerDied(RingClosed):
    """The other side of a ring died; a half-written frame it left was discarded."""


# Process exit codes shared by workers, the supervisor and the systemd unit.
EXIT_OK = 0
EXIT_RETRYABLE = 1
EXIT_FATAL = 2
EXIT_NOT_RUNNING = 3  # CLI: no daemon listening on the socket
EXIT_CONFIG = 78  # EX_CONFIG: configuration invalid (RestartPreventExitStatus=)
