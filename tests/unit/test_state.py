"""The LMDB state store: round trips, encoding, map growth, several processes, SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest
from dataflare.cdc.model import Position
from dataflare.daemon.state import (
    COMPRESS_THRESHOLD,
    StateConflictError,
    StateError,
    StateStore,
)

WRITER = Path(__file__).with_name("state_writer.py")
MiB = 1 << 20


def pos(value: int, tag: str = "", kind: str = "postgres") -> Position:
    return Position(kind, value, tag)


@pytest.fixture
def state_dir(tmp_path: Path) -> str:
    return str(tmp_path / "state")


@pytest.fixture
def store(state_dir: str) -> Iterator[StateStore]:
    with StateStore(state_dir) as s:
        yield s


def raw_values(state_dir: str, db_name: str) -> list[tuple[bytes, bytes]]:
    """Every record of one sub-database, read with plain lmdb (the store must be closed)."""
    env = lmdb.open(state_dir, max_dbs=16, readonly=True, lock=True)
    try:
        db = env.open_db(db_name.encode(), create=False)
        with env.begin(db=db) as txn:
            return list(txn.cursor())
    finally:
        env.close()


def run_writer(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WRITER), *args], stdout=subprocess.PIPE, text=True)


# --- round trips ------------------------------------------------------------------------


def test_directory_created_private(tmp_path: Path) -> None:
    state_dir = tmp_path / "a" / "state"
    with StateStore(str(state_dir)) as s:
        s.put_meta("k", 1)
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / "data.mdb").stat().st_mode) & 0o077 == 0


def test_checkpoint_round_trip(store: StateStore) -> None:
    assert store.get_checkpoint("wf", "dst", "src") is None
    assert store.get_checkpoint_extra("wf", "dst", "src") is None
    store.put_checkpoint("wf", "dst", "src", pos(0x16B3748, "x"))
    assert store.get_checkpoint("wf", "dst", "src") == pos(0x16B3748)
    assert store.get_checkpoint("wf", "dst", "src").tag == "x"  # type: ignore[union-attr]
    assert store.get_checkpoint_extra("wf", "dst", "src") is None

    gtid = "3E11FA47-71CA-11E1-9E33-C80AA9429562:1-5"
    store.put_checkpoint("wf", "dst", "src", pos(2**64 - 1, gtid, "mysql"), {"offset": 12})
    assert store.get_checkpoint_entry("wf", "dst", "src") == (
        Position("mysql", 2**64 - 1, gtid),
        {"offset": 12},
    )
    store.put_checkpoint("wf", "dst2", "src", pos(5))
    store.put_checkpoint("wf", "dst", "src2", pos(6))
    store.put_checkpoint("other", "dst", "src", pos(7))
    assert store.checkpoints("wf") == {
        ("dst", "src"): Position("mysql", 2**64 - 1),
        ("dst2", "src"): pos(5),
        ("dst", "src2"): pos(6),
    }
    assert store.checkpoints("nothing") == {}


def test_keys_unambiguous(store: StateStore) -> None:
    names = ["a/b", "a", "b/c", "", "\x00", "a\x00b", "ünï/cödé", "x" * 100, "\ud800", "ab"]
    expected: dict[tuple[str, str, str], Position] = {}
    n = 0
    for w in names[:5]:
        for d in names:
            for s in names[:4]:
                n += 1
                store.put_checkpoint(w, d, s, pos(n), {"n": n})
                expected[w, d, s] = pos(n)
    for (w, d, s), p in expected.items():
        assert store.get_checkpoint(w, d, s) == p
        assert store.get_checkpoint_extra(w, d, s) == {"n": p.value}
    for w in names[:5]:
        mine = {(d, s): p for (ww, d, s), p in expected.items() if ww == w}
        assert store.checkpoints(w) == mine
    # "a" is a prefix of "ab" and "a/b" as text; their keys must not mix.
    store.put_dead_letter("a", {"w": "a"})
    store.put_dead_letter("ab", {"w": "ab"})
    assert [r["w"] for _, r in store.dead_letters("a")] == ["a"]


def test_snapshot_progress_round_trip(store: StateStore) -> None:
    assert store.get_snapshot_progress("wf", "src") is None
    progress = {"public.t": {"done": False, "last_key": [1, "a"]}, "public.u": {"done": True}}
    store.put_snapshot_progress("wf", "src", progress)
    assert store.get_snapshot_progress("wf", "src") == progress
    store.put_snapshot_progress("wf", "src", {"public.t": {"done": True}})
    assert store.get_snapshot_progress("wf", "src") == {"public.t": {"done": True}}
    assert store.get_snapshot_progress("wf", "src2") is None


def test_schema_history_ordered_by_position(store: StateStore) -> None:
    for value, name in [(300, "c"), (2, "a"), (2**40, "d"), (10, "b"), (2, "a2")]:
        store.append_schema("wf", "src", pos(value, f"t{value}"), {"table": name})
    store.append_schema("wf", "other", pos(1), {"table": "z"})
    history = store.schema_history("wf", "src")
    assert [(p.value, r["table"]) for p, r in history] == [
        (2, "a"),
        (2, "a2"),
        (10, "b"),
        (300, "c"),
        (2**40, "d"),
    ]
    assert history[0][0].tag == "t2"
    # A source replaying after a restart appends the same record again: no duplicate.
    store.append_schema("wf", "src", pos(10, "t10"), {"table": "b"})
    store.append_schema("wf", "src", pos(2, "t2"), {"table": "a"})
    assert len(store.schema_history("wf", "src")) == 5
    assert store.schema_history("wf", "other") == [(pos(1), {"table": "z"})]
    assert store.schema_history("wf", "none") == []


def test_dead_letters(store: StateStore) -> None:
    assert store.count_dead_letters("wf") == 0
    assert store.dead_letters("wf") == []
    ids = [store.put_dead_letter("wf", {"n": n, "error": "boom"}) for n in range(300)]
    assert ids == sorted(ids) and len(set(ids)) == 300
    assert store.count_dead_letters("wf") == 300
    assert [r["n"] for _, r in store.dead_letters("wf")] == list(range(300))  # numeric order
    assert store.dead_letters("wf", limit=3) == [
        (ids[n], {"n": n, "error": "boom"}) for n in (0, 1, 2)
    ]
    assert store.dead_letters("wf", limit=0) == []
    assert store.delete_dead_letter("wf", ids[1]) is True
    assert store.delete_dead_letter("wf", ids[1]) is False
    assert store.delete_dead_letter("wf", -1) is False
    assert store.delete_dead_letter("other", ids[2]) is False
    assert store.count_dead_letters("wf") == 299
    # Ids are never reused, even after the newest letter is deleted.
    assert store.delete_dead_letter("wf", ids[-1]) is True
    assert store.put_dead_letter("wf", {"n": "new"}) > ids[-1]
    assert store.count_dead_letters("other") == 0


def test_meta(store: StateStore) -> None:
    assert store.get_meta("missing") is None
    values: list[Any] = [1, "s", b"\x00bytes", [1, [2, None]], {"a": {"b": 1.5}}, True, -(2**63)]
    for i, v in enumerate(values):
        store.put_meta(f"k{i}", v)
    assert [store.get_meta(f"k{i}") for i in range(len(values))] == values
    store.put_meta("k0", 2)
    assert store.get_meta("k0") == 2


def test_position_out_of_range(store: StateStore) -> None:
    with pytest.raises(ValueError):
        store.put_checkpoint("wf", "d", "s", pos(-1))
    with pytest.raises(ValueError):
        store.append_schema("wf", "s", pos(2**64), {})
    assert store.get_checkpoint("wf", "d", "s") is None


# --- transactions -----------------------------------------------------------------------


def test_transaction_commits_together(store: StateStore) -> None:
    with store.transaction() as txn:
        txn.put_checkpoint("wf", "dst", "src", pos(10), {"offset": 1})
        txn.put_snapshot_progress("wf", "src", {"t": 1})
        txn.append_schema("wf", "src", pos(10), {"table": "t"})
        first = txn.put_dead_letter("wf", {"n": 1})
        second = txn.put_dead_letter("wf", {"n": 2})
        assert second == first + 1
        txn.put_meta("k", "v")
        # Reads through the store see the state before the transaction.
        assert store.get_checkpoint("wf", "dst", "src") is None
    assert store.get_checkpoint_entry("wf", "dst", "src") == (pos(10), {"offset": 1})
    assert store.get_snapshot_progress("wf", "src") == {"t": 1}
    assert store.schema_history("wf", "src") == [(pos(10), {"table": "t"})]
    assert store.count_dead_letters("wf") == 2
    assert store.get_meta("k") == "v"


def test_transaction_aborts_on_error(store: StateStore) -> None:
    store.put_checkpoint("wf", "dst", "src", pos(1))
    with pytest.raises(RuntimeError), store.transaction() as txn:
        txn.put_checkpoint("wf", "dst", "src", pos(2))
        txn.put_meta("k", "v")
        raise RuntimeError("sink failed")
    assert store.get_checkpoint("wf", "dst", "src") == pos(1)
    assert store.get_meta("k") is None
    store.put_checkpoint("wf", "dst", "src", pos(3))  # the write lock was released
    assert store.get_checkpoint("wf", "dst", "src") == pos(3)


def test_nested_write_refused(store: StateStore) -> None:
    with store.transaction() as txn:
        txn.put_meta("a", 1)
        assert store.get_meta("a") is None  # a read of the state before the transaction
        with pytest.raises(StateError):
            store.put_meta("b", 2)  # would deadlock on LMDB's writer lock
        with pytest.raises(StateError), store.transaction():
            pass
    assert store.get_meta("a") == 1
    assert store.get_meta("b") is None


def test_threads_share_one_store(store: StateStore) -> None:
    def work(name: str) -> None:
        for i in range(1, 201):
            if i % 2:
                store.put_checkpoint("wf", name, "src", pos(i))
            else:
                with store.transaction() as txn:
                    txn.put_checkpoint("wf", name, "src", pos(i))
            assert store.get_checkpoint("wf", name, "src") == pos(i)

    threads = [threading.Thread(target=work, args=(f"d{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.checkpoints("wf") == {(f"d{n}", "src"): pos(200) for n in range(4)}


# --- lifecycle --------------------------------------------------------------------------


def test_readonly(state_dir: str, tmp_path: Path) -> None:
    with pytest.raises(StateError):
        StateStore(str(tmp_path / "missing"), readonly=True)
    with StateStore(state_dir) as s:
        s.put_checkpoint("wf", "d", "s", pos(1))
    with StateStore(state_dir, readonly=True) as r:
        assert r.get_checkpoint("wf", "d", "s") == pos(1)
        assert r.readonly
        with pytest.raises(StateError):
            r.put_checkpoint("wf", "d", "s", pos(2))
        with pytest.raises(StateError), r.transaction():
            pass
        with pytest.raises(StateError):
            StateStore(state_dir)  # writable while open read-only in this process


def test_stores_of_one_process_share_the_environment(state_dir: str) -> None:
    a = StateStore(state_dir)
    b = StateStore(state_dir)
    try:
        a.put_checkpoint("wf", "d", "s", pos(1))
        assert b.get_checkpoint("wf", "d", "s") == pos(1)
        with StateStore(state_dir, readonly=True) as r:
            assert r.get_checkpoint("wf", "d", "s") == pos(1)
        a.close()
        a.close()
        with pytest.raises(StateError):
            a.get_meta("k")
        b.put_meta("k", 1)
        assert b.get_meta("k") == 1
    finally:
        a.close()
        b.close()


def test_delete_workflow_removes_only_that_workflow(store: StateStore) -> None:
    for w in ("wf", "wf2", "w", "wf/x"):
        store.put_checkpoint(w, "dst", "src", pos(1), {"w": w})
        store.put_snapshot_progress(w, "src", {"w": w})
        store.append_schema(w, "src", pos(1), {"w": w})
        store.put_dead_letter(w, {"w": w})
    store.put_meta("global", 1)
    store.delete_workflow("wf")
    assert store.checkpoints("wf") == {}
    assert store.get_checkpoint("wf", "dst", "src") is None
    assert store.get_snapshot_progress("wf", "src") is None
    assert store.schema_history("wf", "src") == []
    assert store.count_dead_letters("wf") == 0
    for w in ("wf2", "w", "wf/x"):
        assert store.get_checkpoint_entry(w, "dst", "src") == (pos(1), {"w": w})
        assert store.get_snapshot_progress(w, "src") == {"w": w}
        assert store.schema_history(w, "src") == [(pos(1), {"w": w})]
        assert [r for _, r in store.dead_letters(w)] == [{"w": w}]
    assert store.get_meta("global") == 1
    store.delete_workflow("nothing")
    with store.transaction() as txn:
        txn.delete_workflow("wf2")
        txn.put_checkpoint("wf2", "dst", "src", pos(9))
    assert store.checkpoints("wf2") == {("dst", "src"): pos(9)}
    assert store.count_dead_letters("wf2") == 0


# --- encoding ---------------------------------------------------------------------------


def test_large_values_compressed(state_dir: str) -> None:
    schema = {"columns": [{"name": f"column_{i}", "type": "numeric(10,2)"} for i in range(200)]}
    progress = {f"public.table_{i}": {"done": i % 2 == 0, "rows": i * 1000} for i in range(100)}
    noise = os.urandom(4000)  # incompressible: stored as is
    with StateStore(state_dir) as s:
        s.append_schema("wf", "src", pos(1), schema)
        s.put_snapshot_progress("wf", "src", progress)
        s.put_checkpoint("wf", "dst", "src", pos(1), {"small": 1})
        s.put_meta("noise", noise)
    packed_schema = msgpack.packb({"p": ["postgres", 1, ""], "r": schema}, use_bin_type=True)
    assert len(packed_schema) > COMPRESS_THRESHOLD
    [(_, raw_schema)] = raw_values(state_dir, "schemas")
    [(_, raw_progress)] = raw_values(state_dir, "snapshots")
    [(_, raw_checkpoint)] = raw_values(state_dir, "checkpoints")
    [(_, raw_noise)] = raw_values(state_dir, "meta")
    assert raw_schema[:1] == b"\x01" and len(raw_schema) < len(packed_schema) // 4
    assert raw_progress[:1] == b"\x01" and len(raw_progress) < len(msgpack.packb(progress)) // 2
    assert raw_checkpoint[:1] == b"\x00"
    assert msgpack.unpackb(raw_checkpoint[1:]) == {"p": ["postgres", 1, ""], "x": {"small": 1}}
    assert raw_noise[:1] == b"\x00"
    with StateStore(state_dir, readonly=True) as r:
        assert r.schema_history("wf", "src") == [(pos(1), schema)]
        assert r.get_snapshot_progress("wf", "src") == progress
        assert r.get_meta("noise") == noise


# --- map growth -------------------------------------------------------------------------


def test_map_grows_on_demand(state_dir: str) -> None:
    with StateStore(state_dir, initial_map_size=MiB) as s:
        assert s.map_size() == MiB
        for i in range(48):  # 3 MiB in separate transactions
            s.put_meta(f"single-{i}", os.urandom(64 * 1024))
        grown = s.map_size()
        assert grown >= 4 * MiB
        with s.transaction() as txn:  # 4 MiB in one transaction: aborted and re-run
            txn.put_checkpoint("wf", "dst", "src", pos(1), {"before": "growth"})
            first = txn.put_dead_letter("wf", {"n": 0})
            for i in range(64):
                txn.put_meta(f"txn-{i}", os.urandom(64 * 1024))
            assert txn.put_dead_letter("wf", {"n": 1}) == first + 1
        assert s.map_size() > grown
        assert s.get_checkpoint_extra("wf", "dst", "src") == {"before": "growth"}
        assert [(i, r["n"]) for i, r in s.dead_letters("wf")] == [(first, 0), (first + 1, 1)]
        assert all(len(s.get_meta(f"txn-{i}")) == 64 * 1024 for i in range(64))
        assert all(len(s.get_meta(f"single-{i}")) == 64 * 1024 for i in range(48))


def test_transaction_rerun_conflict(state_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process takes the next dead-letter id while the map is being grown."""
    with StateStore(state_dir, initial_map_size=MiB) as s:
        env = s._env
        assert env is not None
        grow = env.grow

        def grow_while_another_process_writes() -> None:
            child = run_writer("dead-letter", state_dir, "wf")
            out, _ = child.communicate(timeout=60)
            assert child.returncode == 0 and out.strip() == "1"
            grow()

        monkeypatch.setattr(env, "grow", grow_while_another_process_writes)
        with pytest.raises(StateConflictError), s.transaction() as txn:
            assert txn.put_dead_letter("wf", {"by": "parent"}) == 1
            for i in range(32):
                txn.put_meta(f"big-{i}", os.urandom(64 * 1024))
        monkeypatch.undo()
        assert s.dead_letters("wf") == [(1, {"by": "child"})]
        assert s.get_meta("big-0") is None
        with s.transaction() as txn:  # run again: the map is large enough now
            assert txn.put_dead_letter("wf", {"by": "parent"}) == 2
            for i in range(32):
                txn.put_meta(f"big-{i}", os.urandom(64 * 1024))
        assert s.count_dead_letters("wf") == 2


@pytest.mark.parametrize("readonly", [False, True])
def test_map_grown_by_another_process(state_dir: str, readonly: bool) -> None:
    with StateStore(state_dir, initial_map_size=MiB) as s:
        s.put_checkpoint("wf", "dst", "src", pos(1))
    with StateStore(state_dir, readonly=readonly, initial_map_size=MiB) as s:
        assert s.map_size() == MiB
        assert s.get_checkpoint("wf", "dst", "src") == pos(1)
        child = run_writer("grow", state_dir, "6")
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0 and out.strip() == "done"
        # This process still maps 1 MiB; the file is larger now: the size is adopted.
        assert len(s.get_meta("grow-95")) == 64 * 1024
        assert s.map_size() > MiB
        if not readonly:
            s.put_checkpoint("wf", "dst", "src", pos(2))
            assert s.get_checkpoint("wf", "dst", "src") == pos(2)


# --- several processes ------------------------------------------------------------------


def test_two_processes_write_concurrently(state_dir: str) -> None:
    with StateStore(state_dir) as s:  # the parent keeps it open, like the supervisor
        children = [run_writer("concurrent", state_dir, name, "1000") for name in ("a", "b")]
        for child in children:
            out, _ = child.communicate(timeout=60)
            assert child.returncode == 0 and out.strip() == "done"
        assert s.checkpoints("wf") == {
            ("a", "src"): pos(1000, kind="test"),
            ("b", "src"): pos(1000, kind="test"),
        }
        assert s.get_checkpoint_extra("wf", "a", "src") == {"by": "a"}
        letters = s.dead_letters("wf")
        assert len(letters) == 200 == s.count_dead_letters("wf")
        assert [i for i, _ in letters] == list(range(1, 201))  # unique, gap-free, ordered
        for name in ("a", "b"):
            mine = [r["i"] for _, r in letters if r["by"] == name]
            assert mine == list(range(10, 1001, 10))
        history = s.schema_history("wf", "src")
        assert len(history) == 20
        assert {(r["by"], r["i"]) for _, r in history} == {
            (n, i) for n in ("a", "b") for i in range(100, 1001, 100)
        }


def test_checkpoint_survives_sigkill(state_dir: str) -> None:
    rng = random.Random()
    for _ in range(5):
        child = run_writer("kill", state_dir)
        assert child.stdout is not None
        first = child.stdout.readline()  # the writer is running and has committed
        assert first.strip()
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        rest = child.stdout.read()
        child.wait()
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        lines = (first + rest).split("\n")
        complete = [int(line) for line in lines[:-1]]  # the last piece may be cut short
        reported = complete[-1]

        with StateStore(state_dir) as s:
            entry = s.get_checkpoint_entry("wf", "dst", "src")
            assert entry is not None
            position, extra = entry
            # Every reported commit is durable; at most one more committed unreported.
            assert reported <= position.value <= reported + 1
            # Position and extra were written together and stay together.
            assert position == Position("test", position.value)
            assert position.tag == f"tag-{position.value}"
            assert extra == {"value": position.value, "pad": "p" * (position.value * 37 % 3000)}
            even = position.value - position.value % 2
            assert s.get_meta("last-even") == (even or None)
            s.put_meta("last-even", None)  # the next round starts afresh
            s.delete_workflow("wf")
