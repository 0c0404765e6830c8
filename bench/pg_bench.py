"""PostgreSQL -> PostgreSQL: DataFlare next to native logical replication, in one run.

    .venv/bin/python bench/pg_bench.py [--rows 1000000] [--runs 3] [--skip-latency]

Two private PostgreSQL 15 servers (source A, target B) with the same settings. For
each workload (inserts; updates of existing rows), both replicators are given the
same backlog, as a slot created before the load, and timed until the target has
caught up (a sentinel transaction written last becomes visible): native from
ALTER SUBSCRIPTION ENABLE in its running server, DataFlare from its workflow's
start in a running daemon (the file added to workflows.d and a reload, SIGHUP);
each start then costs what the replicator itself does to start streaming, not a
server's or a daemon's launch. They run one after
the other, never together, in alternating order (odd runs native first), each after
a checkpoint on both servers and with its target table read into shared buffers;
autovacuum is off on both servers, so neither one's timed run vacuums, checkpoints
or re-reads what the load or the other one wrote. Prints rows/s
for both and the ratio, median of --runs:
once from the start (ALTER SUBSCRIPTION ENABLE; the workflow's start), and once
counted from when each replicator first streamed from its slot (the catch-up proper,
without the one-off start: the apply worker's launch, the workers' start and
connections); then how long each took from its start to stream, and how long a
daemon launched cold (a new process with the workflow in its config) takes.

Also prints the CPU time the whole machine spent per million rows while each one
ran (from /proc/stat; the daemon's own share from its processes): on 2 cores both
replicators are CPU-bound, so this says where the time goes.

Then: the daemon's total RSS (supervisor + workers, sampled every 50 ms) while it
replicates one transaction of --big-txn rows, and end-to-end latency (source commit
-> visible in the target) p50/p99 at a steady 5k rows/s.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.servers import PostgresServer

DDL = (
    "CREATE TABLE IF NOT EXISTS {t} "
    "(id bigint PRIMARY KEY, name text, amount numeric(12,2), qty int, ts timestamptz)"
)
SENTINEL = "CREATE TABLE IF NOT EXISTS bench_done (k int PRIMARY KEY, v int)"


def sql(dsn: str, *stmts: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in stmts:
            conn.execute(s)


def one(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
        return row[0] if row else None


def load(dsn: str, rows: int, txn: int, kind: str, run_id: int) -> float:
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(1, rows + 1, txn):
            end = min(rows, start + txn - 1)
            if kind == "insert":
                conn.execute(
                    "INSERT INTO items SELECT g, 'name ' || g, g * 1.25, g %% 100, now() "
                    "FROM generate_series(%s::bigint, %s::bigint) g",
                    (start, end),
                )
            else:
                conn.execute(
                    "UPDATE items SET qty = qty + 1, amount = amount + 1 "
                    "WHERE id BETWEEN %s AND %s",
                    (start, end),
                )
        conn.execute(
            "INSERT INTO bench_done VALUES (1, %s) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            (run_id,),
        )
    return time.perf_counter() - t0


def wait_streaming(dsn: str, slot: str, timeout: float = 120) -> float:
    """When a walsender first serves ``slot`` (the replicator has connected and asked
    for the stream): the start of the catch-up proper, for both replicators alike."""
    deadline = time.perf_counter() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.perf_counter() < deadline:
            row = conn.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            if row and row[0]:
                return time.perf_counter()
            time.sleep(0.005)
    raise TimeoutError(f"nothing streamed from slot {slot}")


def wait_sentinel(dsn: str, run_id: int, timeout: float = 1800) -> float:
    deadline = time.perf_counter() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.perf_counter() < deadline:
            try:
                row = conn.execute("SELECT v FROM bench_done WHERE k = 1").fetchone()
            except psycopg.errors.UndefinedTable:
                row = None
            if row and row[0] == run_id:
                return time.perf_counter()
            time.sleep(0.02)
    raise TimeoutError("target did not catch up")


class DaemonRun:
    def __init__(
        self, base: Path, src_dsn: str, dst_dsn: str, slot: str, tables: list[str]
    ) -> None:
        (base / "workflows.d").mkdir(parents=True, exist_ok=True)
        self.base = base
        self.sock = str(base / "df.sock")
        (base / "dataflare.yaml").write_text(
            yaml.safe_dump(
                {
                    "daemon": {
                        "state_dir": str(base / "state"),
                        "socket": self.sock,
                        "log_format": "text",
                        "log_level": "WARNING",
                    },
                    "workflows_dir": "workflows.d",
                }
            )
        )
        (base / "workflows.d" / "bench.yaml").write_text(
            yaml.safe_dump(
                {
                    "name": "bench",
                    "sources": {
                        "a": {
                            "type": "postgres",
                            "config": {
                                "dsn": src_dsn,
                                "tables": tables,
                                "slot": slot,
                                "publication": "bench_pub",
                                "snapshot": "never",
                                "batch_size": 5000,
                            },
                        }
                    },
                    "destinations": {
                        "b": {
                            "type": "postgres",
                            "inputs": ["a"],
                            "config": {"dsn": dst_dsn, "schema": "public"},
                        }
                    },
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, idle: bool = False) -> None:
        """Launch the daemon; ``idle``: without the workflow, and return once it is
        ready (its systemd READY=1), for ``enable`` to start the workflow."""
        workflow = self.base / "workflows.d" / "bench.yaml"
        env = dict(os.environ)
        notify: socket.socket | None = None
        if idle:
            workflow.rename(self.base / "bench.yaml.held")
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            notify.bind(str(self.base / "notify.sock"))
            notify.settimeout(60)
            env["NOTIFY_SOCKET"] = str(self.base / "notify.sock")
        log = open(self.base / "daemon.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dataflare.daemon.cli",
                "--config",
                str(self.base / "dataflare.yaml"),
                "run",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        if notify is not None:
            with notify:
                while b"READY=1" not in notify.recv(4096).split(b"\n"):
                    pass

    def enable(self) -> None:
        """Start the workflow in the running daemon: its file back in workflows.d,
        then a reload."""
        assert self.proc is not None
        (self.base / "bench.yaml.held").rename(self.base / "workflows.d" / "bench.yaml")
        self.proc.send_signal(signal.SIGHUP)

    def rss_mb(self) -> float:
        assert self.proc is not None
        pids = [self.proc.pid]
        try:
            out = subprocess.run(
                ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True
            ).stdout.split()
            pids += [int(p) for p in out]
        except OSError:
            pass
        total = 0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU time the whole machine spent busy (all cores, /proc/stat), in seconds."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(v) - v[3] - v[4]) / TICK  # minus idle and iowait


def tree_cpu_seconds(root: int) -> float:
    """user + system CPU of a process and its live descendants, in seconds."""
    stats: dict[int, tuple[int, float]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(d.name)] = (int(f[1]), (int(f[11]) + int(f[12])) / TICK)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo += [c for c, (ppid, _) in stats.items() if ppid == pid]
    return total


def settle(target: str, *servers: PostgresServer) -> None:
    """Before each timed run: a checkpoint on both servers, so neither replicator
    pays for the WAL the load or the other one wrote (autovacuum is off on both,
    for the same reason: it would vacuum the rows the previous run inserted); and
    the replicator's target table read into shared buffers, as warm for one as for
    the other (the one that ran first would otherwise have evicted the other's)."""
    for s in servers:
        sql(s.dsn(), "CHECKPOINT")
    sql(
        target,
        "CREATE EXTENSION IF NOT EXISTS pg_prewarm",
        "SELECT pg_prewarm('items'), pg_prewarm('items_pkey')",
    )


def fresh_target(b: PostgresServer, name: str) -> str:
    b.drop_database(name) if one(
        b.dsn(), f"SELECT 1 FROM pg_database WHERE datname = '{name}'"
    ) else None
    dsn = b.create_database(name)
    sql(dsn, DDL.format(t="items"), SENTINEL)
    return dsn


def catch_up(
    a: PostgresServer, b: PostgresServer, rows: int, kind: str, run_id: int, work: Path
) -> tuple[float, ...]:
    """(native rows/s, dataflare rows/s, and CPU seconds per million rows: the machine
    while native ran, the machine while DataFlare ran, DataFlare's own processes; then
    native and dataflare rows/s counted from when each first streamed from its slot)
    for one run of one workload. The first two include each one's start: the apply
    worker's launch for native, the daemon's start (processes, connections) for us."""
    src = fresh_target(a, "src")
    sql(src, "CREATE PUBLICATION bench_pub FOR TABLE items, bench_done")
    native_dst = fresh_target(b, "native")
    df_dst = fresh_target(b, "df")
    if kind == "update":  # the rows exist everywhere before the backlog is made
        for dsn in (src, native_dst, df_dst):
            sql(
                dsn,
                f"INSERT INTO items SELECT g, 'name ' || g, g * 1.25, g % 100, now() "
                f"FROM generate_series(1, {rows}) g",
            )
    sql(
        native_dst,
        f"CREATE SUBSCRIPTION native_sub CONNECTION '{src}' PUBLICATION bench_pub "
        "WITH (copy_data = false, enabled = false, slot_name = 'native_slot')",
    )
    sql(src, "SELECT pg_create_logical_replication_slot('dataflare_slot', 'pgoutput')")
    load(src, rows, 1000, kind, run_id)

    def run_native() -> tuple[float, float, float, float]:
        settle(native_dst, a, b)
        t0, c0 = time.perf_counter(), busy_seconds()
        sql(native_dst, "ALTER SUBSCRIPTION native_sub ENABLE")
        t_stream = wait_streaming(src, "native_slot")
        t1 = wait_sentinel(native_dst, run_id)
        cpu = busy_seconds() - c0
        sql(
            native_dst,
            "ALTER SUBSCRIPTION native_sub DISABLE",
            "ALTER SUBSCRIPTION native_sub SET (slot_name = NONE)",
            "DROP SUBSCRIPTION native_sub",
        )
        sql(src, "SELECT pg_drop_replication_slot('native_slot')")
        return rows / (t1 - t0), rows / (t1 - t_stream), cpu, t_stream - t0

    def run_dataflare() -> tuple[float, float, float, float, float]:
        d = DaemonRun(
            work / f"{kind}-{run_id}",
            src,
            df_dst,
            "dataflare_slot",
            ["public.items", "public.bench_done"],
        )
        d.start(idle=True)
        try:
            assert d.proc is not None
            settle(df_dst, a, b)
            t0, c0, own0 = time.perf_counter(), busy_seconds(), tree_cpu_seconds(d.proc.pid)
            d.enable()
            t_stream = wait_streaming(src, "dataflare_slot")
            t1 = wait_sentinel(df_dst, run_id)
            cpu = busy_seconds() - c0
            own = tree_cpu_seconds(d.proc.pid) - own0
        finally:
            d.stop()
        return rows / (t1 - t0), rows / (t1 - t_stream), cpu, own, t_stream - t0

    # Whoever runs second would meet the first one's aftermath; alternate.
    if run_id % 2:
        native, native_streaming, native_cpu, native_start = run_native()
        df, df_streaming, df_cpu, daemon_cpu, df_start = run_dataflare()
    else:
        df, df_streaming, df_cpu, daemon_cpu, df_start = run_dataflare()
        native, native_streaming, native_cpu, native_start = run_native()
    assert one(df_dst, "SELECT count(*) FROM items") == one(src, "SELECT count(*) FROM items")
    assert one(df_dst, "SELECT sum(qty) FROM items") == one(src, "SELECT sum(qty) FROM items")
    sql(src, "SELECT pg_drop_replication_slot('dataflare_slot')")
    per_m = 1e6 / rows
    return (
        native,
        df,
        native_cpu * per_m,
        df_cpu * per_m,
        daemon_cpu * per_m,
        native_streaming,
        df_streaming,
        native_start,
        df_start,
    )


def cold_start(a: PostgresServer, b: PostgresServer, work: Path, runs: int = 3) -> list[float]:
    """Seconds from a daemon's launch (a new process, the workflow in its config)
    to streaming from its slot, with a small backlog waiting, for each of ``runs``."""
    src = fresh_target(a, "src")
    sql(src, "CREATE PUBLICATION bench_pub FOR TABLE items, bench_done")
    out = []
    for run in range(runs):
        dst = fresh_target(b, "df")
        sql(src, "SELECT pg_create_logical_replication_slot('dataflare_slot', 'pgoutput')")
        sql(src, "TRUNCATE items")
        load(src, 20_000, 1000, "insert", 100 + run)
        d = DaemonRun(
            work / f"cold-{run}", src, dst, "dataflare_slot", ["public.items", "public.bench_done"]
        )
        settle(dst, a, b)
        t0 = time.perf_counter()
        d.start()
        try:
            out.append(wait_streaming(src, "dataflare_slot") - t0)
            wait_sentinel(dst, 100 + run)
        finally:
            d.stop()
        sql(src, "SELECT pg_drop_replication_slot('dataflare_slot')")
    return out


def big_transaction_rss(a: PostgresServer, b: PostgresServer, rows: int, work: Path) -> float:
    src = fresh_target(a, "src")
    sql(src, "CREATE PUBLICATION bench_pub FOR TABLE items, bench_done")
    dst = fresh_target(b, "df")
    sql(src, "SELECT pg_create_logical_replication_slot('dataflare_slot', 'pgoutput')")
    sql(
        src,
        f"INSERT INTO items SELECT g, repeat('x', 40) || g, g, g % 100, now() "
        f"FROM generate_series(1, {rows}) g",
        "INSERT INTO bench_done VALUES (1, 99)",
    )
    d = DaemonRun(
        work / "bigtxn", src, dst, "dataflare_slot", ["public.items", "public.bench_done"]
    )
    peak = 0.0
    d.start()
    try:
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, d.rss_mb())
                time.sleep(0.05)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        wait_sentinel(dst, 99)
        done.set()
        t.join()
    finally:
        d.stop()
    assert one(dst, "SELECT count(*) FROM items") == rows
    sql(src, "SELECT pg_drop_replication_slot('dataflare_slot')")
    return peak


def latency(
    a: PostgresServer, b: PostgresServer, work: Path, rate: int = 5000, seconds: float = 20.0
) -> tuple[float, float, int]:
    src = fresh_target(a, "src")
    sql(
        src,
        "CREATE TABLE lat (id bigint PRIMARY KEY, t_src timestamptz)",
        "CREATE PUBLICATION bench_pub FOR TABLE lat",
    )
    dst = fresh_target(b, "df")
    sql(dst, "CREATE TABLE lat (id bigint PRIMARY KEY, t_src timestamptz)")
    sql(src, "SELECT pg_create_logical_replication_slot('dataflare_slot', 'pgoutput')")
    d = DaemonRun(work / "latency", src, dst, "dataflare_slot", ["public.lat"])
    d.start()
    lat_ms: list[float] = []
    try:
        time.sleep(3)
        stop = threading.Event()

        def write() -> None:
            per_txn, interval = 50, 50 / rate
            nid = 1
            with psycopg.connect(src, autocommit=True) as conn:
                nxt = time.perf_counter()
                while not stop.is_set():
                    conn.execute(
                        "INSERT INTO lat SELECT g, clock_timestamp() "
                        "FROM generate_series(%s::bigint, %s::bigint) g",
                        (nid, nid + per_txn - 1),
                    )
                    nid += per_txn
                    nxt += interval
                    time.sleep(max(0.0, nxt - time.perf_counter()))

        w = threading.Thread(target=write, daemon=True)
        w.start()
        last = 0
        end = time.perf_counter() + seconds
        with psycopg.connect(dst, autocommit=True) as conn:
            while time.perf_counter() < end:
                rows = conn.execute(
                    "SELECT id, extract(epoch FROM clock_timestamp() - t_src) * 1000 FROM lat "
                    "WHERE id > %s",
                    (last,),
                ).fetchall()
                for rid, ms in rows:
                    last = max(last, rid)
                    lat_ms.append(float(ms))
                time.sleep(0.002)
        stop.set()
        w.join()
    finally:
        d.stop()
    sql(src, "SELECT pg_drop_replication_slot('dataflare_slot')")
    lat_ms.sort()
    return (statistics.median(lat_ms), lat_ms[int(len(lat_ms) * 0.99) - 1], len(lat_ms))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--big-txn", type=int, default=1_000_000)
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--workloads", default="insert,update")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dataflare-pgbench-"))
    # Both servers alike: no autovacuum (see settle), and shared buffers that hold
    # a target table with its updated copies of every row.
    quiet: dict[str, str | bool] = {"autovacuum": False, "shared_buffers": "512MB"}
    a = PostgresServer(work / "a", durability="fast", settings=quiet).start()
    b = PostgresServer(work / "b", durability="fast", settings=quiet).start()
    try:
        print(
            f"rows {args.rows} in 1000-row transactions, median of {args.runs}; "
            f"2 private PostgreSQL 15 servers on {os.cpu_count()} cores",
            flush=True,
        )
        print(f"{'workload':<9} {'native rows/s':>14} {'dataflare rows/s':>17} {'ratio':>7}")
        for kind in filter(None, args.workloads.split(",")):
            results = [catch_up(a, b, args.rows, kind, run + 1, work) for run in range(args.runs)]
            native = statistics.median(r[0] for r in results)
            df = statistics.median(r[1] for r in results)
            print(
                f"{kind:<9} {native:>14,.0f} {df:>17,.0f} {df / native:>6.2f}x   "
                f"(runs: {', '.join(f'{r[1] / r[0]:.2f}x' for r in results)})",
                flush=True,
            )
            native_s = statistics.median(r[5] for r in results)
            df_s = statistics.median(r[6] for r in results)
            print(
                f"{'  stream':<9} {native_s:>14,.0f} {df_s:>17,.0f} {df_s / native_s:>6.2f}x   "
                f"(runs: {', '.join(f'{r[6] / r[5]:.2f}x' for r in results)}; "
                "counted from when each first streamed from its slot)",
                flush=True,
            )
            starts = [statistics.median(r[i] for r in results) * 1000 for i in (7, 8)]
            print(
                f"{'':<9} start -> streaming from its slot: native {starts[0]:.0f} ms, "
                f"DataFlare {starts[1]:.0f} ms",
                flush=True,
            )
            cpu = [statistics.median(r[i] for r in results) for i in (2, 3, 4)]
            print(
                f"{'':<9} CPU seconds per million rows, whole machine: native {cpu[0]:.1f}, "
                f"DataFlare {cpu[1]:.1f} (its own processes {cpu[2]:.1f}, "
                f"the PostgreSQL servers and the rest {cpu[1] - cpu[2]:.1f})",
                flush=True,
            )
        cold = [c * 1000 for c in cold_start(a, b, work)]
        print(
            f"a daemon launched cold, launch -> streaming: median {statistics.median(cold):.0f} "
            f"ms (runs: {', '.join(f'{c:.0f}' for c in cold)})",
            flush=True,
        )
        if args.big_txn:
            peak = big_transaction_rss(a, b, args.big_txn, work)
            print(
                f"one transaction of {args.big_txn} rows: daemon peak RSS {peak:.0f} MB "
                "(supervisor + workers)",
                flush=True,
            )
        if not args.skip_latency:
            p50, p99, n = latency(a, b, work)
            print(
                f"latency at 5k rows/s (commit -> visible in target), {n} rows: "
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms",
                flush=True,
            )
    finally:
        a.destroy()
        b.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
