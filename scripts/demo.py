"""The demo: live PostgreSQL -> PostgreSQL replication through the daemon.

Starts two throwaway PostgreSQL servers (source and sink, private, on free ports),
loads a table, starts `dataflare run` with a postgres -> postgres workflow (initial
snapshot, then streaming), runs a live insert/update/delete workload against the
source, shows `dataflare status` while it runs, SIGKILLs the daemon halfway and
starts it again, then checks that the sink equals the source row for row.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.servers import PostgresServer

SECONDS = float(os.environ.get("DEMO_SECONDS", "24"))
RATE = int(os.environ.get("DEMO_RATE", "3000"))  # changes per second


def dataflare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dataflare.daemon.cli", *args], capture_output=True, text=True
    )


def start_daemon(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "dataflare.daemon.cli", "--config", str(cfg), "run"],
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def workload(dsn: str, stop: threading.Event, counter: list[int]) -> None:
    try:
        _workload(dsn, stop, counter)
    except Exception as e:
        print(f"workload failed: {e}", flush=True)
        raise


def _workload(dsn: str, stop: threading.Event, counter: list[int]) -> None:
    rng = random.Random(1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        next_id = 100_001
        t_next = time.monotonic()
        while not stop.is_set():
            with conn.transaction():
                conn.execute(
                    "INSERT INTO orders (id, customer, amount, status) SELECT g, "
                    "'c' || (g %% 500), (g %% 997) * 1.01, 'new' "
                    "FROM generate_series(%s, %s) g",
                    (next_id, next_id + 19),
                )
                next_id += 20
                lo = rng.randint(1, next_id - 30)
                conn.execute(
                    "UPDATE orders SET status = 'paid', amount = amount + 1 "
                    "WHERE id BETWEEN %s AND %s",
                    (lo, lo + 7),
                )
                conn.execute("DELETE FROM orders WHERE id = %s", (rng.randint(1, next_id),))
            counter[0] += 29
            t_next += 29 / RATE
            time.sleep(max(0.0, t_next - time.monotonic()))


def table(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT * FROM orders ORDER BY id").fetchall()


def show(sock: str) -> None:
    r = dataflare("--socket", sock, "status")
    print(r.stdout if r.returncode == 0 else r.stderr, flush=True)


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="dataflare-demo-"))
    print(f"demo directory: {base}\nstarting two throwaway PostgreSQL 15 servers…", flush=True)
    src_pg = PostgresServer(base / "source-pg").start()
    dst_pg = PostgresServer(base / "sink-pg").start()
    daemon: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    try:
        src = src_pg.create_database("shop")
        dst = dst_pg.create_database("reporting")
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE orders (id bigint PRIMARY KEY, customer text, "
                "amount numeric(12,2), status text, created timestamptz DEFAULT now())"
            )
            conn.execute(
                "INSERT INTO orders (id, customer, amount, status) SELECT g, "
                "'c' || (g % 500), g % 997, 'old' FROM generate_series(1, 100000) g"
            )
        sock = str(base / "dataflare.sock")
        cfg = base / "dataflare.yaml"
        (base / "workflows.d").mkdir()
        cfg.write_text(
            yaml.safe_dump(
                {
                    "daemon": {
                        "state_dir": str(base / "state"),
                        "socket": sock,
                        "log_format": "text",
                    },
                    "workflows_dir": "workflows.d",
                }
            )
        )
        (base / "workflows.d" / "orders.yaml").write_text(
            yaml.safe_dump(
                {
                    "name": "orders-replica",
                    "description": "shop.orders into the reporting database",
                    "sources": {
                        "shop": {
                            "type": "postgres",
                            "config": {"dsn": "${SHOP_DSN}", "tables": ["public.orders"]},
                        }
                    },
                    "destinations": {
                        "reporting": {
                            "type": "postgres",
                            "inputs": ["shop"],
                            "config": {"dsn": "${REPORTING_DSN}", "schema": "replica"},
                        }
                    },
                },
                sort_keys=False,
            )
        )
        os.environ["SHOP_DSN"], os.environ["REPORTING_DSN"] = src, dst
        print(f"$ dataflare validate {cfg}\n{dataflare('validate', str(cfg)).stdout}")
        log = base / "daemon.log"
        daemon = start_daemon(cfg, log)
        counter = [0]
        load = threading.Thread(target=workload, args=(src, stop, counter), daemon=True)
        load.start()
        t_end = time.monotonic() + SECONDS
        killed = False
        while time.monotonic() < t_end:
            time.sleep(3)
            print(f"--- workload: {counter[0]} changes so far", flush=True)
            show(sock)
            if not killed and time.monotonic() > t_end - SECONDS / 2:
                print(
                    f"--- SIGKILL the daemon (pid {daemon.pid}) mid-stream; starting it again",
                    flush=True,
                )
                daemon.send_signal(signal.SIGKILL)
                daemon.wait()
                daemon = start_daemon(cfg, log)
                killed = True
        stop.set()
        load.join()
        print(f"--- workload stopped after {counter[0]} changes; waiting for the sink…", flush=True)
        want = table(src)
        deadline = time.monotonic() + 120
        dst_replica = dst + " options='-c search_path=replica'"
        while time.monotonic() < deadline and table(dst_replica) != want:
            time.sleep(0.5)
        show(sock)
        equal = table(dst_replica) == want
        print(f"sink equals source: {equal} ({len(want)} rows)")
        print(f"log: {log}")
        return 0 if equal else 1
    finally:
        stop.set()
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
        src_pg.destroy()
        dst_pg.destroy()


if __name__ == "__main__":
    sys.exit(main())
