"""The zygote's fork protocol, driven from a process of its own (tests/unit/zygote_probe.py)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = Path(__file__).with_name("zygote_probe.py")


@functools.cache
def _probe() -> dict[str, object]:
    marker = Path(tempfile.mkdtemp(prefix="dataflare-warm-")) / "imported-by"
    env = {**os.environ, "DATAFLARE_TEST_WARM_MARKER": str(marker)}
    out = subprocess.run(
        [sys.executable, str(PROBE)], capture_output=True, text=True, timeout=60, check=True,
        env=env,
    )  # fmt: skip
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_a_forked_worker_runs_only_once_the_supervisor_confirms_it() -> None:
    r = _probe()
    unconfirmed, confirmed = r["unconfirmed"], r["confirmed"]
    assert isinstance(unconfirmed, dict) and isinstance(confirmed, dict)
    # Never confirmed (its pid lost to the supervisor): exits at once, ran nothing.
    assert unconfirmed["pid"], unconfirmed
    assert unconfirmed["exit"] == 1, unconfirmed
    assert unconfirmed["status"] == "", unconfirmed
    # Confirmed: it ran (and, given no workflow, reported its failure).
    assert confirmed["pid"], confirmed
    assert '"error"' in str(confirmed["status"]), confirmed
    assert confirmed["exit"] == 1, confirmed


def test_more_fds_than_a_message_carries_go_the_plain_way_and_keep_the_zygote() -> None:
    r = _probe()
    assert r["too_many_fds"] is None
    assert r["broken_after"] is False
    after = r["after_too_many"]
    assert isinstance(after, dict) and after["pid"], after


def test_a_warm_request_imports_in_the_zygote_and_keeps_it_serving() -> None:
    """The classes of a warm request are imported by the zygote itself, so its later
    forks have them; a path that does not import is left to the worker to report."""
    r = _probe()
    warm = r["warm"]
    assert isinstance(warm, dict)
    assert warm["broken"] is False
    assert warm["imported_by"] == warm["zygote"]
    confirmed = r["confirmed"]
    assert isinstance(confirmed, dict) and confirmed["pid"], confirmed
