"""The supervisor reaps exited children nothing waits for (it is a child subreaper:
forks whose pid never reached it end up as its children), and only those."""

from __future__ import annotations

import os
import time
from pathlib import Path

from dataflare.daemon.supervisor import exited_children, reap_strays


def _exited_child() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    return pid


def test_only_unknown_children_that_stayed_exited_are_reaped() -> None:
    others = exited_children(set())  # this process's own, not ours to touch
    stray, waited_for = _exited_child(), _exited_child()
    known = others | {waited_for}
    try:
        reaped, seen = reap_strays(known, set())
        assert reaped == 0  # first sight: a waiter may be about to reap it
        assert stray in seen and waited_for not in seen
        reaped, seen = reap_strays(known, seen)
        assert reaped == 1
        assert not Path(f"/proc/{stray}").exists()
        assert stray not in seen
        # the known one is left to its waiter
        assert Path(f"/proc/{waited_for}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    finally:
        os.waitpid(waited_for, 0)
