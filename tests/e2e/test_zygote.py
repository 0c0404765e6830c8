"""Workers forked from the zygote: whose children they are, what they hold, and the
plain start the supervisor falls back to when the zygote is gone."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.daemon_harness import Daemon, count_lines, wait_for, write_config
from tests.e2e.test_daemon_generate import assert_exact_stream, gen_workflow

pytestmark = pytest.mark.e2e


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if _ppid(int(d.name)) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError):
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _fd_targets(pid: int) -> list[str]:
    base = Path(f"/proc/{pid}/fd")
    out = []
    for fd in base.iterdir():
        try:
            out.append(os.readlink(fd))
        except OSError:
            continue
    return out


def _pipe_ends(pid: int) -> set[tuple[str, str]]:
    """(pipe inode, "r" or "w") for each pipe end ``pid`` holds."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            flags = int(
                next(
                    ln.split()[1]
                    for ln in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines()
                    if ln.startswith("flags:")
                ),
                8,
            )
        except OSError:
            continue
        if target.startswith("pipe:"):
            out.add((target, "w" if flags & os.O_ACCMODE == os.O_WRONLY else "r"))
    return out


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def test_workers_are_forked_children_of_the_supervisor_and_die_with_it(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    gen = {"count": 8_000, "rate": 2000, "transaction_size": 5, "seed": 11}
    out = tmp_path / "out.jsonl"
    d = Daemon(write_config(tmp_path, {"gen": gen_workflow(out, **gen)}))
    daemons.append(d)
    d.start()
    wait_for(lambda: count_lines(out) >= 500, 30, "500 lines")
    assert d.proc is not None
    sup = d.proc.pid
    workers = d.workflow("gen")["pids"]
    assert len(workers) == 2
    for pid in workers:
        # forked (no exec): the CLI's command line, named by role; re-parented to the supervisor
        assert "dataflare.daemon.cli" in _cmdline(pid), _cmdline(pid)
        assert _ppid(pid) == sup
    assert sorted(_comm(pid) for pid in workers) == ["df-apply", "df-source"]
    # batch scheduling: their wakeups do not preempt the databases' processes
    assert all(os.sched_getscheduler(pid) == os.SCHED_BATCH for pid in workers)
    zygotes = [p for p in _children(sup) if p not in workers and _comm(p) == "df-zygote"]
    assert len(zygotes) == 1
    # A worker holds its own ring's fds and nothing of the zygote's: the ring's
    # three eventfds, no socket (the generate/file workflow opens no connection).
    for pid in workers:
        targets = _fd_targets(pid)
        assert sum(t == "anon_inode:[eventfd]" for t in targets) == 3, targets
        assert not [t for t in targets if t.startswith("socket:")], targets
    # Lifelines: of each pipe the two workers share, one holds the write end and
    # the other the read end (a stray write end would keep a dead peer "alive").
    ends = [_pipe_ends(pid) for pid in workers]
    shared = {i for i, _ in ends[0]} & {i for i, _ in ends[1]}
    assert len(shared) == 2, ends
    for inode in shared:
        modes = [{m for i, m in e if i == inode} for e in ends]
        assert sorted(map(sorted, modes)) == [["r"], ["w"]], (inode, ends)
    wait_for(lambda: d.workflow("gen")["state"] == "stopped", 60, "workflow finished")
    assert_exact_stream(out, gen, gen["count"])
    d.kill()  # SIGKILL: the zygote dies with the supervisor (PDEATHSIG)
    wait_for(lambda: not _alive(zygotes[0]), 10, "the zygote gone")


def test_without_the_zygote_workers_start_the_plain_way(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    gen = {"count": 12_000, "rate": 3000, "transaction_size": 4, "seed": 12}
    out = tmp_path / "out.jsonl"
    d = Daemon(write_config(tmp_path, {"gen": gen_workflow(out, **gen)}))
    daemons.append(d)
    d.start()
    wait_for(lambda: count_lines(out) >= 1000, 30, "1000 lines")
    assert d.proc is not None
    workers = d.workflow("gen")["pids"]
    (zygote,) = [p for p in _children(d.proc.pid) if p not in workers and _comm(p) == "df-zygote"]
    os.kill(zygote, signal.SIGKILL)
    os.kill(workers[0], signal.SIGKILL)  # the apply process: the workflow restarts
    wait_for(lambda: d.workflow("gen")["restarts"] >= 1, 20, "a restart")
    wait_for(lambda: len(d.workflow("gen")["pids"]) == 2, 20, "new workers")
    for pid in d.workflow("gen")["pids"]:
        assert "dataflare.daemon.worker" in _cmdline(pid), _cmdline(pid)
        wait_for(  # once it runs (imported the data path, unlike a fork)
            lambda p=pid: os.sched_getscheduler(p) == os.SCHED_BATCH, 20, "batch scheduling"
        )
        assert _ppid(pid) == d.proc.pid
    assert "the zygote could not fork a worker" in d.log.read_text()
    wait_for(lambda: d.workflow("gen")["state"] == "stopped", 60, "workflow finished")
    assert_exact_stream(out, gen, gen["count"])
