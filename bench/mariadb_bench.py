"""MariaDB catch-up throughput: the daemon end to end next to raw binlog parse rates.

Run: ``python bench/mariadb_bench.py [--rows 200000] [--txn 1000] [--target postgres|mariadb]
[--chameleon] [--runs N] [--profile]``

One private MariaDB (durability "unsafe") holds a source table of 7 columns
(bigint key, varchar, decimal, int, datetime(6), varchar, tinyint). The bench

1. starts the daemon (`mysql` source -> a private PostgreSQL, or with ``--target
   mariadb`` a `mysql` destination in another database of the same server), lets it
   checkpoint one row and stops it (SIGTERM);
2. loads ``--rows`` rows in transactions of ``--txn`` rows (multi-row INSERTs);
3. times the raw parse of exactly that binlog range by
   - pymysqlreplication itself (BinLogStreamReader, ``event.rows``),
   - DataFlare's BinlogStream (the library's framing, our precompiled row layouts),
   - ``mariadb-binlog --base64-output=decode-rows -v`` on the binlog files;
4. starts the daemon again and times its catch-up until the target has every row
   (rows/s from the first applied row to the last, and from daemon start).

With ``--chameleon``, pg_chameleon 2.0.21 (the best-known Python MySQL ->
PostgreSQL replicator) runs in its own venv (created with the system Python from
PyPI, reused from ``--chameleon-venv``) against a private PostgreSQL: its
``init_replica`` runs before the load and its ``start_replica`` catch-up is timed
like ours. It refuses to run as root, so it runs as the ``postgres`` user then.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import pwd
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataflare.cdc.mysql.binlog import BinlogStream, Rows, server_info  # noqa: E402
from pymysqlreplication import BinLogStreamReader  # noqa: E402
from pymysqlreplication.row_event import WriteRowsEvent  # noqa: E402

from tests.e2e.daemon_harness import Daemon, wait_for, write_config  # noqa: E402
from tests.servers import MariaDBServer, PostgresServer  # noqa: E402

CHAMELEON = "pg_chameleon==2.0.21"

DDL = (
    "CREATE TABLE src.items (id bigint PRIMARY KEY, name varchar(40), amount decimal(12,2),"
    " qty int, at datetime(6), note varchar(100), flag tinyint)"
)


def load(server: MariaDBServer, rows: int, txn: int) -> None:
    conn = server.connect("src", autocommit=False)
    with conn.cursor() as cur:
        for start in range(2, rows + 2, txn):
            batch = [
                (i, f"name-{i}", Decimal(i % 100000) / 100, i % 1000,
                 f"2026-01-01 00:00:{i % 60:02d}.{i % 1000000:06d}", "note " * 4, i % 2)
                for i in range(start, min(start + txn, rows + 2))
            ]  # fmt: skip
            cur.executemany("INSERT INTO items VALUES (%s, %s, %s, %s, %s, %s, %s)", batch)
            conn.commit()
    conn.close()


def parse_library(server: MariaDBServer, file: str, pos: int, end: tuple[str, int]) -> int:
    stream = BinLogStreamReader(
        connection_settings=server.connect_args(),
        server_id=9901,
        blocking=False,
        resume_stream=True,
        log_file=file,
        log_pos=pos,
        only_events=[WriteRowsEvent],
        only_schemas=["src"],
        only_tables=["items"],
        enable_logging=False,
    )
    n = 0
    for ev in stream:
        n += len(ev.rows)
    stream.close()
    return n


def parse_ours(server: MariaDBServer, file: str, pos: int, end: tuple[str, int], total: int) -> int:
    stream = BinlogStream(server.connect_args(), 9902, {("src", "items")})
    stream.open(file=file, pos=pos)
    n = 0
    for ev in stream.events():
        if isinstance(ev, Rows):
            n += len(ev.rows)
            if n >= total:
                break
    stream.close()
    return n


def parse_mariadb_binlog(server: MariaDBServer, files: list[str], pos: int) -> float:
    data = server.data_dir
    t0 = time.perf_counter()
    args = ["mariadb-binlog", "--no-defaults", "--base64-output=decode-rows", "-v",
            f"--start-position={pos}", *(str(data / f) for f in files)]  # fmt: skip
    with open("/dev/null", "wb") as null:
        subprocess.run(args, stdout=null, check=True)
    return time.perf_counter() - t0


class Chameleon:
    """pg_chameleon in its own venv, MariaDB -> a private PostgreSQL."""

    def __init__(self, venv: Path, home: Path, my: MariaDBServer, pg: PostgresServer) -> None:
        self.venv = venv
        self.home = home
        self.pg = pg
        if not (venv / "bin" / "chameleon").exists():
            subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", CHAMELEON], check=True)
            subprocess.run(["chmod", "-R", "a+rX", str(venv)], check=True)
        for sub in (".pg_chameleon/configuration", "logs", "pid", "out"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        pg.execute("CREATE DATABASE chameleon")
        # pg_chameleon builds a libpq string with "password=%s": an empty password
        # would swallow the next key, so a dummy one (trust auth ignores it).
        (home / ".pg_chameleon/configuration/bench.yml").write_text(f"""
pid_dir: '{home}/pid/'
log_dir: '{home}/logs/'
log_dest: file
log_level: info
log_days_keep: 1
rollbar_key: ''
rollbar_env: ''
type_override: {{}}
pg_conn: {{host: "127.0.0.1", port: "{pg.port}", user: "{pg.superuser}",
          password: "unused", database: "chameleon", charset: "utf8"}}
sources:
  mysql:
    db_conn: {{host: "127.0.0.1", port: "{my.port}", user: "root", password: "",
              charset: "utf8", connect_timeout: 10}}
    schema_mappings: {{src: dst}}
    limit_tables: []
    skip_tables: []
    grant_select_to: []
    lock_timeout: "120s"
    my_server_id: 9903
    replica_batch_size: 10000
    replay_max_rows: 10000
    batch_retention: '1 day'
    copy_max_memory: "300M"
    copy_mode: 'file'
    out_dir: {home}/out
    sleep_loop: 1
    on_error_replay: continue
    on_error_read: continue
    auto_maintenance: "disabled"
    gtid_enable: false
    type: mysql
    skip_events: {{insert: [], delete: [], update: []}}
    keep_existing_schema: No
    net_read_timeout: 600
""")
        if os.geteuid() == 0:
            u = pwd.getpwnam("postgres")
            for root, _dirs, files in os.walk(home):
                os.chown(root, u.pw_uid, u.pw_gid)
                for f in files:
                    os.chown(os.path.join(root, f), u.pw_uid, u.pw_gid)

    def cmd(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return [*prefix, "env", f"HOME={self.home}", str(self.venv / "bin" / "chameleon"),
                *args, "--config", "bench"]  # fmt: skip

    def run(self, *args: str) -> None:
        r = subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"chameleon {' '.join(args)} failed:\n{r.stdout[-2000:]}"
                               f"{r.stderr[-2000:]}")  # fmt: skip

    def count(self) -> int:
        try:
            rows = self.pg.execute("SELECT count(*) FROM dst.items", dbname="chameleon")
        except Exception:
            return 0
        return int(rows[0][0])


def count(server: MariaDBServer) -> int:
    rows = server.execute("SELECT COUNT(*) FROM dst.items")
    return int(rows[0][0]) if rows else 0


def one_run(args: argparse.Namespace, profile: bool) -> dict[str, float]:
    """One run on fresh servers: rows/s of each parser and replicator."""
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="df-mariadb-bench-") as tmp:
        base = Path(tmp)
        pg: PostgresServer | None = None
        server = MariaDBServer(base / "mariadb", durability="unsafe",
                               options={"innodb-buffer-pool-size": "256M"})  # fmt: skip
        server.start()
        try:
            server.execute("CREATE DATABASE src")
            server.execute(DDL)
            if args.chameleon or args.target == "postgres":
                pg = PostgresServer(base / "pg", durability="unsafe")
                pg.start()
            if args.target == "postgres":
                assert pg is not None
                dsn = pg.create_database("dataflare")
                dest = {"type": "postgres", "inputs": ["shop"],
                        "config": {"dsn": dsn, "schema": "dst"}}  # fmt: skip

                def target_count() -> int:
                    assert pg is not None
                    try:
                        rows = pg.execute("SELECT count(*) FROM dst.items", dbname="dataflare")
                    except Exception:
                        return 0
                    return int(rows[0][0])
            else:
                dest = {"type": "mysql", "inputs": ["shop"], "config": {
                    "host": server.host, "port": server.port, "user": server.user,
                    "password": server.password, "database": "dst"}}  # fmt: skip

                def target_count() -> int:
                    return count(server)

            wf = {
                "sources": {"shop": {"type": "mysql", "config": {
                    "host": server.host, "port": server.port, "user": server.user,
                    "password": server.password, "server_id": 9900,
                    "tables": ["src.items"], "snapshot": "never", "batch_size": 5000}}},
                "destinations": {"out": dest},
            }  # fmt: skip
            cfg = write_config(base / "daemon", {"bench": wf}, log_level="WARNING")
            d = Daemon(cfg)
            d.start()
            wait_for(lambda: d.workflow("bench")["state"] == "streaming", 30, "streaming")
            time.sleep(1.0)
            server.execute("INSERT INTO src.items (id) VALUES (1)")
            wait_for(lambda: target_count() == 1, 30, "first row")
            d.terminate()
            cham: Chameleon | None = None
            if args.chameleon:
                assert pg is not None
                chome = base / "chameleon"
                chome.mkdir()
                os.chmod(base, 0o755)
                cham = Chameleon(Path(args.chameleon_venv), chome, server, pg)
                cham.run("create_replica_schema")
                cham.run("add_source", "--source", "mysql")
                cham.run("init_replica", "--source", "mysql", "--debug")
                assert cham.count() == 1

            info = server_info(server.connect_args())
            file, pos = info.current
            t0 = time.perf_counter()
            load(server, args.rows, args.txn)
            print(f"loaded {args.rows} rows in {time.perf_counter() - t0:.1f}s")
            after = server_info(server.connect_args())
            files = [f for f in after.logs if f >= file]

            t0 = time.perf_counter()
            n = parse_library(server, file, pos, after.current)
            lib_s = time.perf_counter() - t0
            assert n == args.rows, n
            t0 = time.perf_counter()
            if profile:
                prof = cProfile.Profile()
                prof.enable()
            n = parse_ours(server, file, pos, after.current, args.rows)
            ours_s = time.perf_counter() - t0
            if profile:
                prof.disable()
            assert n == args.rows, n
            mb_s = parse_mariadb_binlog(server, files, pos)

            d = Daemon(cfg)
            t_start = time.perf_counter()
            d.start()
            first = None
            while True:
                c = target_count()
                now = time.perf_counter()
                if first is None and c > 1:
                    first = (now, c)
                if c >= args.rows + 1:
                    break
                if now - t_start > 1800:
                    raise SystemExit("catch-up did not finish in 30 min")
                time.sleep(0.2)
            t_end = time.perf_counter()
            d.terminate()
            assert first is not None
            steady = (args.rows + 1 - first[1]) / max(1e-9, t_end - first[0])
            total = args.rows / (t_end - t_start)
            cham_rate: tuple[float, float] | None = None
            if cham is not None:
                t_start = time.perf_counter()
                proc = subprocess.Popen(
                    cham.cmd("start_replica", "--source", "mysql", "--debug"),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
                cfirst = None
                try:
                    while True:
                        c = cham.count()
                        now = time.perf_counter()
                        if cfirst is None and c > 1:
                            cfirst = (now, c)
                        if c >= args.rows + 1:
                            break
                        if proc.poll() is not None:
                            raise SystemExit(f"pg_chameleon exited ({proc.returncode}) at {c}")
                        if now - t_start > 1800:
                            raise SystemExit("pg_chameleon did not finish in 30 min")
                        time.sleep(0.5)
                finally:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(30)
                c_end = time.perf_counter()
                assert cfirst is not None
                cham_rate = (
                    (args.rows + 1 - cfirst[1]) / max(1e-9, c_end - cfirst[0]),
                    args.rows / (c_end - t_start),
                )
            cols = 7
            print()
            print(f"{'what':<52} {'rows/s':>12}")
            print(f"{'pymysqlreplication parse (event.rows)':<52} {args.rows / lib_s:>12,.0f}")
            print(f"{'DataFlare BinlogStream parse (precompiled layouts)':<52} "
                  f"{args.rows / ours_s:>12,.0f}")  # fmt: skip
            print(f"{'mariadb-binlog -v decode-rows (local files)':<52} {args.rows / mb_s:>12,.0f}")
            where = "PostgreSQL" if args.target == "postgres" else "MariaDB"
            print(f"{'DataFlare catch-up MariaDB -> ' + where + ', steady':<52} {steady:>12,.0f}")
            print(f"{'DataFlare catch-up MariaDB -> ' + where + ', incl. start':<52} "
                  f"{total:>12,.0f}")  # fmt: skip
            if cham_rate is not None:
                print(f"{'pg_chameleon 2.0.21 MariaDB -> PostgreSQL, steady':<52} "
                      f"{cham_rate[0]:>12,.0f}")  # fmt: skip
                print(f"{'pg_chameleon 2.0.21 MariaDB -> PostgreSQL, incl. start':<52} "
                      f"{cham_rate[1]:>12,.0f}")  # fmt: skip
            print(f"({args.rows} rows x {cols} columns, {args.txn}-row transactions)", flush=True)
            rates.update(
                library=args.rows / lib_s,
                ours=args.rows / ours_s,
                mariadb_binlog=args.rows / mb_s,
                steady=steady,
                total=total,
            )
            if cham_rate is not None:
                rates.update(cham_steady=cham_rate[0], cham_total=cham_rate[1])
            if profile:
                pstats.Stats(prof).sort_stats("cumulative").print_stats(15)
        finally:
            server.destroy()
            if pg is not None:
                pg.destroy()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--txn", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=1, help="repeat on fresh servers; medians")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--target", choices=["mariadb", "postgres"], default="postgres")
    ap.add_argument("--chameleon", action="store_true", help="also time pg_chameleon")
    ap.add_argument("--chameleon-venv", default="/tmp/dataflare-bench-chameleon-venv")
    args = ap.parse_args()
    runs = [one_run(args, args.profile and i == args.runs - 1) for i in range(args.runs)]
    if args.runs < 2:
        return
    print(f"\nmedians of {args.runs} runs (each on fresh servers):")
    for key, label in [
        ("library", "pymysqlreplication parse"),
        ("ours", "DataFlare BinlogStream parse"),
        ("mariadb_binlog", "mariadb-binlog decode-rows"),
        ("steady", "DataFlare catch-up, steady"),
        ("total", "DataFlare catch-up, incl. start"),
        ("cham_steady", "pg_chameleon, steady"),
        ("cham_total", "pg_chameleon, incl. start"),
    ]:
        if key in runs[0]:
            print(f"{label:<52} {statistics.median(r[key] for r in runs):>12,.0f}")
    if "cham_steady" in runs[0]:
        for key, label in [("steady", "steady"), ("total", "incl. start")]:
            ratios = [r[key] / r["cham_" + key] for r in runs]
            print(f"DataFlare / pg_chameleon, {label}: median {statistics.median(ratios):.1f}x "
                  f"(runs: {', '.join(f'{x:.1f}x' for x in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
