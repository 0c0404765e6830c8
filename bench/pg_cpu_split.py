"""Where the CPU goes, per process, while native logical replication and DataFlare
catch up on the same backlog.

    .venv/bin/python bench/pg_cpu_split.py [--rows 500000] [--workload insert|update]

The setup of ``pg_bench.py`` (same servers, backlog, settling before each run), one
run of each; prints rows/s and, for every process that used CPU during the run,
its CPU time per row (from /proc/<pid>/stat, sampled when the target caught up) and
its context switches and minor page faults per 1000 rows, voluntary (it waited) and involuntary
(preempted; /proc/<pid>/status): the
walsender and the apply worker for native; the walsender, the sink's backend, the
source and apply workers, the zygote and the supervisor for DataFlare. Read the
split, not the rates: one run on a noisy machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pg_bench as pb  # type: ignore[import-not-found]  # (bench/ is on sys.path)

from tests.servers import PostgresServer

TICK = os.sysconf("SC_CLK_TCK")


# label, CPU s, voluntary and involuntary switches, minor page faults
Sample = tuple[str, float, int, int, int]


def cpu_by_process() -> dict[int, Sample]:
    out: dict[int, Sample] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            comm = (d / "comm").read_text().strip()
            status = (d / "status").read_text().splitlines()
        except OSError:
            continue
        switches = {
            k: int(v)
            for k, _, v in (ln.partition(":") for ln in status)
            if k.endswith("ctxt_switches")
        }
        # The daemon's forks share the CLI's command line; their comm names them.
        label = f"{comm}: {cmd.strip()}" if comm.startswith("df-") else cmd.strip()
        out[int(d.name)] = (
            label[:80],
            (int(f[11]) + int(f[12])) / TICK,
            switches.get("voluntary_ctxt_switches", 0),
            switches.get("nonvoluntary_ctxt_switches", 0),
            int(f[7]),
        )
    return out


def report(
    name: str,
    rows: int,
    t0: float,
    t_stream: float,
    t1: float,
    before: dict[int, Sample],
    after: dict[int, Sample],
) -> None:
    print(
        f"{name}: {rows / (t1 - t0):,.0f} rows/s from start, "
        f"{rows / (t1 - t_stream):,.0f} from streaming"
    )
    used = []
    for pid, (cmd, cpu, vol, invol, flt) in after.items():
        _, cpu0, vol0, invol0, flt0 = before.get(pid, (cmd, 0.0, 0, 0, 0))
        if cpu - cpu0 >= 0.02:
            k = 1000 / rows
            used.append(
                (
                    (cpu - cpu0) * 1e6 / rows,
                    (vol - vol0) * k,
                    (invol - invol0) * k,
                    (flt - flt0) * k,
                    pid,
                    cmd,
                )
            )
    print("      CPU      switches/1k rows   page faults")
    print("             voluntary involuntary  /1k rows")
    for us, vol, invol, flt, pid, cmd in sorted(used, reverse=True):
        print(f"  {us:6.2f} us/row  {vol:6.2f} {invol:6.2f}  {flt:8.1f}  {pid:>7}  {cmd}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--workload", choices=("insert", "update"), default="insert")
    args = p.parse_args()
    rows, kind = args.rows, args.workload
    work = Path(tempfile.mkdtemp(prefix="dataflare-cpusplit-"))
    settings: dict[str, str | bool] = {"autovacuum": False, "shared_buffers": "512MB"}
    a = PostgresServer(work / "a", durability="fast", settings=settings).start()
    b = PostgresServer(work / "b", durability="fast", settings=settings).start()
    try:
        src = pb.fresh_target(a, "src")
        pb.sql(src, "CREATE PUBLICATION bench_pub FOR TABLE items, bench_done")
        native_dst, df_dst = pb.fresh_target(b, "native"), pb.fresh_target(b, "df")
        if kind == "update":
            for dsn in (src, native_dst, df_dst):
                pb.sql(
                    dsn,
                    "INSERT INTO items SELECT g, 'name ' || g, g * 1.25, g % 100, now() "
                    f"FROM generate_series(1, {rows}) g",
                )
        pb.sql(
            native_dst,
            f"CREATE SUBSCRIPTION native_sub CONNECTION '{src}' PUBLICATION bench_pub "
            "WITH (copy_data = false, enabled = false, slot_name = 'native_slot')",
        )
        pb.sql(src, "SELECT pg_create_logical_replication_slot('dataflare_slot', 'pgoutput')")
        pb.load(src, rows, 1000, kind, 1)

        pb.settle(native_dst, a, b)
        before, t0 = cpu_by_process(), time.perf_counter()
        pb.sql(native_dst, "ALTER SUBSCRIPTION native_sub ENABLE")
        t_stream = pb.wait_streaming(src, "native_slot")
        t1 = pb.wait_sentinel(native_dst, 1)
        report("native", rows, t0, t_stream, t1, before, cpu_by_process())
        pb.sql(native_dst, "ALTER SUBSCRIPTION native_sub DISABLE")

        d = pb.DaemonRun(
            work / "d", src, df_dst, "dataflare_slot", ["public.items", "public.bench_done"]
        )
        pb.settle(df_dst, a, b)
        before, t0 = cpu_by_process(), time.perf_counter()
        d.start()
        try:
            t_stream = pb.wait_streaming(src, "dataflare_slot")
            t1 = pb.wait_sentinel(df_dst, 1)
            report("dataflare", rows, t0, t_stream, t1, before, cpu_by_process())
        finally:
            d.stop()
    finally:
        a.destroy()
        b.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
