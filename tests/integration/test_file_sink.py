"""The `file` destination: formats, rotation, zstd and exactly-once across crashes.

The state store is the real LMDB one in a temp dir; crashes are injected at the
destination's durability steps (checkpoint commit, rotation rename) by raising a
BaseException there and then dropping the sink's descriptors, which leaves files
and state exactly as a SIGKILL at that instant would.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import zstandard
from dataflare.cdc.errors import FatalError, RetryableError
from dataflare.cdc.generate import GenerateConfig
from dataflare.cdc.generate_source import ChangePlan, GenerateSource
from dataflare.cdc.model import Batch, Change, Column, Op, Position, TableId, TableSchema
from dataflare.daemon.state import StateStore
from dataflare.sinks import file as file_module
from dataflare.sinks.base import SinkContext
from dataflare.sinks.configs import FileSinkConfig
from dataflare.sinks.file import FileSink
from dataflare.sinks.file_format import CSV_COLUMNS

pytestmark = pytest.mark.integration

WF, DEST, SRC = "wf", "out", "gen"


class Crash(BaseException):
    """A simulated SIGKILL: not an Exception, so nothing in the sink handles it."""


class Faults:
    """Counts durability events and crashes at the chosen one."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at = crash_at
        self.events: list[str] = []

    def hit(self, name: str) -> None:
        self.events.append(name)
        if self.crash_at is not None and len(self.events) == self.crash_at:
            raise Crash(name)


class FaultyStore:
    """The real state store, with crash points around each checkpoint commit."""

    def __init__(self, store: StateStore, faults: Faults) -> None:
        self.store = store
        self.faults = faults

    def get_checkpoint(self, workflow: str, destination: str, source: str) -> Position | None:
        return self.store.get_checkpoint(workflow, destination, source)

    def get_checkpoint_extra(
        self, workflow: str, destination: str, source: str
    ) -> dict[str, Any] | None:
        return self.store.get_checkpoint_extra(workflow, destination, source)

    def put_checkpoint(
        self,
        workflow: str,
        destination: str,
        source: str,
        position: Position,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.faults.hit("before checkpoint")
        self.store.put_checkpoint(workflow, destination, source, position, extra)
        self.faults.hit("after checkpoint")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(str(tmp_path / "state")) as s:
        yield s


def make_sink(state: Any, path: Path, sources: tuple[str, ...] = (SRC,), **cfg: Any) -> FileSink:
    sink = FileSink(
        DEST, FileSinkConfig(path=str(path), **cfg), SinkContext(WF, DEST, sources, state)
    )
    sink.open()
    return sink


GEN = {"count": 600, "transaction_size": 5, "batch_size": 20, "tables": ["public.a", "s.b"]}


def batches(start: Position | None, **gen: Any) -> Iterator[Batch]:
    src = GenerateSource(SRC, GenerateConfig(**{**GEN, **gen}))
    src.open(start)
    while not src.exhausted:
        batch = src.read_batch(1.0)
        if batch is not None:
            yield batch


def decode(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".zst"):
        with zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=True
        ) as r:
            return r.read()
    return data


def all_lines(directory: Path, live: str) -> list[str]:
    """Lines of the rotated files (name order) then of the live file."""
    rotated = sorted(p for p in directory.glob("out.0*") if p.name != live)
    out: list[str] = []
    for p in [*rotated, directory / live]:
        if p.exists():
            out.extend(decode(p).decode().splitlines())
    return out


def assert_stream(lines: list[str], n: int, **gen: Any) -> None:
    """Exactly changes 1..n of the generator, in order."""
    cfg = GenerateConfig(**{**GEN, **gen})
    plan = ChangePlan(cfg)
    assert len(lines) == n
    for seq, line in enumerate(lines, start=1):
        env = json.loads(line)
        want = plan.change(seq)
        commit = min(((seq - 1) // cfg.transaction_size + 1) * cfg.transaction_size, n)
        assert env["source"]["seq"] == commit, f"line {seq}"
        assert env["op"] == want.op.value
        assert (env["after"] or env["before"])["id"] == want.row[0]
        assert env["source"]["table"] == plan.tables[want.table_index].name


# ---------------------------------------------------------------------------- formats


def test_jsonl_one_envelope_per_line_and_checkpoint(tmp_path: Path, state: StateStore) -> None:
    out = tmp_path / "out.jsonl"
    sink = make_sink(state, out)
    last = None
    for b in batches(None, count=100):
        sink.write(SRC, b)
        last = b.last
    sink.close()
    assert_stream(out.read_text().splitlines(), 100)
    assert state.get_checkpoint(WF, DEST, SRC) == last
    extra = state.get_checkpoint_extra(WF, DEST, SRC)
    assert extra is not None and extra["seq"] == 1 and extra["offset"] == out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.jsonl.lock", "out.jsonl", "state"]


WEIRD = TableId("my,schema", 'ta"ble')
WEIRD_SCHEMA = TableSchema(WEIRD, (Column("id", "bigint", False), Column("note", "text")), ("id",))


def test_csv_fixed_header_rfc4180_quoting(tmp_path: Path, state: StateStore) -> None:
    out = tmp_path / "out.csv"
    sink = make_sink(state, out, format="csv")
    note = 'a "quoted", multi\nline value'
    pos = Position("generate", 7)
    changes = [
        Change(
            Op.INSERT, WEIRD, pos, (1,), None, (1, note), xid=3, commit_ts_us=1_700_000_000_123_456
        ),
        Change(Op.DELETE, WEIRD, pos, (1,), (1, None), None, xid=3),
    ]
    sink.write(SRC, Batch(changes, [WEIRD_SCHEMA], pos, pos))
    sink.close()
    raw = out.read_bytes()
    assert raw.startswith(b"op,schema,table,position,ts_ms,tx_id,key,before,after\r\n")
    rows = list(csv.reader(io.StringIO(raw.decode(), newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert rows[1] == [
        "c",
        "my,schema",
        'ta"ble',
        "7",
        "1700000000123",
        "3",
        '{"id":1}',
        "",
        json.dumps({"id": 1, "note": note}, separators=(",", ":")),
    ]
    assert rows[2][:7] == ["d", "my,schema", 'ta"ble', "7", "", "3", '{"id":1}']
    assert json.loads(rows[2][7]) == {"id": 1, "note": None} and rows[2][8] == ""
    assert len(rows) == 3
    assert b'"my,schema","ta""ble"' in raw  # quoted, quotes doubled


def test_csv_header_at_start_of_every_rotated_file(tmp_path: Path, state: StateStore) -> None:
    out = tmp_path / "out.csv"
    sink = make_sink(state, out, format="csv", compression="zstd", rotate_bytes=1500)
    for b in batches(None, count=200):
        sink.write(SRC, b)
    sink.close()
    files = sorted(p for p in tmp_path.iterdir() if p.name.endswith(".csv.zst"))
    assert [p.name for p in files][:2] == ["out.000001.csv.zst", "out.000002.csv.zst"]
    assert files[-1].name == "out.csv.zst"  # the live file sorts last
    rows = 0
    for p in files:
        text = decode(p).decode()
        if not text:
            continue
        parsed = list(csv.reader(io.StringIO(text, newline="")))
        assert tuple(parsed[0]) == CSV_COLUMNS, p.name
        assert all(tuple(r) != CSV_COLUMNS for r in parsed[1:])
        rows += len(parsed) - 1
    assert rows == 200


# --------------------------------------------------------------------------- rotation


def test_rotation_by_size_at_checkpoints_only(tmp_path: Path, state: StateStore) -> None:
    out = tmp_path / "out.jsonl"
    sink = make_sink(state, out, rotate_bytes=8000)
    for b in batches(None, count=400):
        sink.write(SRC, b)
    assert sink.status()["rotations"] >= 3
    sink.close()
    rotated = sorted(p.name for p in tmp_path.glob("out.0*.jsonl"))
    assert rotated == [f"out.{i:06d}.jsonl" for i in range(1, len(rotated) + 1)]
    for name in rotated:
        data = (tmp_path / name).read_bytes()
        assert len(data) >= 8000 and data.endswith(b"\n")
        # a rotated file holds whole batches: 20 changes each
        assert data.count(b"\n") % 20 == 0
    assert_stream(all_lines(tmp_path, "out.jsonl"), 400)
    extra = state.get_checkpoint_extra(WF, DEST, SRC)
    assert extra is not None and extra["seq"] == len(rotated) + 1
    assert extra["offset"] == out.stat().st_size


def test_rotation_by_interval(tmp_path: Path, state: StateStore) -> None:
    import time

    out = tmp_path / "out.jsonl"
    sink = make_sink(state, out, rotate_interval=0.3)
    it = batches(None, count=100)
    sink.write(SRC, next(it))
    sink.write(SRC, next(it))
    assert not list(tmp_path.glob("out.0*"))  # younger than the interval
    time.sleep(0.35)
    sink.write(SRC, next(it))
    assert [p.name for p in tmp_path.glob("out.0*")] == ["out.000001.jsonl"]
    assert out.stat().st_size == 0
    sink.write(SRC, next(it))
    sink.close()
    # The interval survives a restart: the live file's start time is in the checkpoint.
    time.sleep(0.35)
    sink = make_sink(state, out, rotate_interval=0.3)
    sink.write(SRC, next(it))
    sink.close()
    assert sorted(p.name for p in tmp_path.glob("out.0*")) == [
        "out.000001.jsonl",
        "out.000002.jsonl",
    ]
    assert_stream(all_lines(tmp_path, "out.jsonl"), 100)


def test_numbering_continues_after_existing_rotated_files(
    tmp_path: Path, state: StateStore
) -> None:
    (tmp_path / "out.000007.jsonl").write_text("kept\n")
    out = tmp_path / "out.jsonl"
    sink = make_sink(state, out, rotate_bytes=1)
    sink.write(SRC, next(batches(None, count=20)))
    sink.close()
    assert (tmp_path / "out.000007.jsonl").read_text() == "kept\n"
    assert (tmp_path / "out.000008.jsonl").read_bytes().count(b"\n") == 20


# ------------------------------------------------------------------------ zstd, crashes


def test_zstd_cut_back_after_crash_is_a_valid_stream(tmp_path: Path, state: StateStore) -> None:
    out = tmp_path / "out.jsonl"
    live = tmp_path / "out.jsonl.zst"
    sink = make_sink(state, out, compression="zstd")
    it = batches(None, count=200)
    for _ in range(3):
        sink.write(SRC, next(it))
    checkpointed = live.stat().st_size
    b = next(it)
    sink.write(SRC, Batch(b.changes, b.schemas, b.first, b.last, complete=False))
    sink.close()  # crash: an unfinished transaction is on disk, not checkpointed
    with open(live, "ab") as f:
        f.write(b"\x28\xb5\x2f\xfd\x00garbage")  # and half a frame
    assert live.stat().st_size > checkpointed
    sink = make_sink(state, out, compression="zstd")
    assert live.stat().st_size == checkpointed
    assert sink.checkpoint(SRC) == Position("generate", 60)
    cli = subprocess.run(["zstd", "-dc", str(live)], capture_output=True, check=True)
    assert_stream(cli.stdout.decode().splitlines(), 60)
    for b in batches(sink.checkpoint(SRC), count=200):
        sink.write(SRC, b)
    sink.close()
    assert_stream(decode(live).decode().splitlines(), 200)
    cli = subprocess.run(["zstd", "-t", str(live)], capture_output=True)
    assert cli.returncode == 0, cli.stderr


def run_with_crash(tmp_path: Path, state: StateStore, crash_at: int | None, **cfg: Any) -> Faults:
    """Write the whole stream with a crash at durability event ``crash_at``, then a
    restart that resumes from the checkpoint (as the daemon does)."""
    faults = Faults(crash_at)
    store = FaultyStore(state, faults)
    out = tmp_path / "out.jsonl"
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        real_rename(src, dst)
        faults.hit("after rename")

    sink = make_sink(store, out, **cfg)
    try:
        file_module.os.rename = rename  # type: ignore[attr-defined]
        for b in batches(sink.checkpoint(SRC)):
            sink.write(SRC, b)
    except Crash:
        pass
    finally:
        file_module.os.rename = real_rename  # type: ignore[attr-defined]
        sink.close()
    sink = make_sink(state, out, **cfg)
    for b in batches(sink.checkpoint(SRC)):
        sink.write(SRC, b)
    sink.close()
    return faults


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_exactly_once_with_a_crash_at_every_durability_step(
    tmp_path: Path, compression: str
) -> None:
    cfg = {"compression": compression, "rotate_bytes": 2500 if compression == "zstd" else 9000}
    dry = run_with_crash(tmp_path / "dry", StateStore(str(tmp_path / "dry-state")), None, **cfg)
    assert dry.events.count("after rename") >= 3, "the stream must rotate a few times"
    live = "out.jsonl.zst" if compression == "zstd" else "out.jsonl"
    for k in range(1, len(dry.events) + 1):
        d = tmp_path / f"crash{k}"
        d.mkdir()
        with StateStore(str(d / "state")) as state:
            faults = run_with_crash(d, state, k, **cfg)
        assert faults.events[-1] == dry.events[k - 1]
        lines = all_lines(d, live)
        assert_stream(lines, GEN["count"])
        if compression == "zstd":
            for p in d.glob("out*.zst"):
                assert subprocess.run(["zstd", "-tq", str(p)]).returncode == 0, p


def test_crash_right_after_rotation_rename(tmp_path: Path, state: StateStore) -> None:
    out = tmp_path / "out.jsonl"
    sink = make_sink(state, out)
    it = batches(None, count=100)
    sink.write(SRC, next(it))
    sink.close()
    # A crash after rename(), before the new live file and the checkpoint.
    os.rename(out, tmp_path / "out.000001.jsonl")
    sink = make_sink(state, out)
    assert out.exists() and out.stat().st_size == 0
    assert state.get_checkpoint_extra(WF, DEST, SRC) == {
        "seq": 2,
        "offset": 0,
        "started": pytest.approx(sink._started),
    }
    for b in it:
        sink.write(SRC, b)
    sink.close()
    assert_stream(all_lines(tmp_path, "out.jsonl"), 100)


def test_missing_or_short_files_are_fatal(tmp_path: Path, state: StateStore) -> None:
    out = tmp_path / "out.jsonl"
    sink = make_sink(state, out, rotate_bytes=9000)
    for b in batches(None, count=60):
        sink.write(SRC, b)
    sink.close()
    assert (tmp_path / "out.000001.jsonl").exists()
    size = out.stat().st_size
    assert size > 0
    with open(out, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(
        FatalError, match=r"out\.jsonl is \d+ bytes but \d+ bytes were checkpointed"
    ):
        make_sink(state, out, rotate_bytes=9000)
    out.unlink()
    with pytest.raises(FatalError, match="truncated or replaced"):
        make_sink(state, out, rotate_bytes=9000)


def test_rotated_file_changed_behind_our_back_is_fatal(tmp_path: Path, state: StateStore) -> None:
    out = tmp_path / "out.jsonl"
    sink = make_sink(state, out)
    sink.write(SRC, next(batches(None, count=20)))
    sink.close()
    os.rename(out, tmp_path / "out.000001.jsonl")
    with open(tmp_path / "out.000001.jsonl", "ab") as f:
        f.write(b"extra\n")
    with pytest.raises(FatalError, match=r"rotated file .*out\.000001\.jsonl is \d+ bytes"):
        make_sink(state, out)


def test_single_writer(tmp_path: Path, state: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_module, "LOCK_WAIT_S", 0.2)
    out = tmp_path / "out.jsonl"
    first = make_sink(state, out)
    with pytest.raises(RetryableError, match="locked by another writer"):
        make_sink(state, out)
    first.close()
    make_sink(state, out).close()


def test_two_sources_share_the_file(tmp_path: Path, state: StateStore) -> None:
    out = tmp_path / "out.jsonl"
    sink = make_sink(state, out, sources=("a", "b"), rotate_bytes=5000)
    ia, ib = batches(None, count=100), batches(None, count=100)
    for ba, bb in zip(ia, ib, strict=True):
        sink.write("a", ba)
        sink.write("b", bb)
    sink.close()
    lines = all_lines(tmp_path, "out.jsonl")
    assert len(lines) == 200
    assert [json.loads(x)["source"]["name"] for x in lines[:40]] == ["a"] * 20 + ["b"] * 20
    # Reopen: the newest checkpoint of the two wins, nothing is cut.
    size = out.stat().st_size
    sink = make_sink(state, out, sources=("a", "b"), rotate_bytes=5000)
    sink.close()
    assert out.stat().st_size == size
