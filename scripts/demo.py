"""The demo: a throwaway daemon replicating a live generated workload, shown live.

Starts `dataflare run` on a config in a temp dir (a generate source at a steady
rate into a JSONL file), shows `dataflare status` while it runs, kills the daemon
with SIGKILL halfway and starts it again to show it resumes exactly, then drains
it with SIGTERM and checks that the file holds every change exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

COUNT = int(os.environ.get("DEMO_COUNT", "40000"))
RATE = int(os.environ.get("DEMO_RATE", "4000"))


def dataflare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dataflare.daemon.cli", *args], capture_output=True, text=True
    )


def start(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "dataflare.daemon.cli", "--config", str(cfg), "run"],
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def show_status(sock: str, rounds: int) -> None:
    for _ in range(rounds):
        time.sleep(2)
        r = dataflare("--socket", sock, "status")
        print(r.stdout if r.returncode == 0 else r.stderr, flush=True)


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="dataflare-demo-"))
    (base / "workflows.d").mkdir()
    sock = str(base / "dataflare.sock")
    out = base / "orders.jsonl"
    cfg = base / "dataflare.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "daemon": {"state_dir": str(base / "state"), "socket": sock, "log_format": "text"},
                "workflows_dir": "workflows.d",
            }
        )
    )
    (base / "workflows.d" / "demo.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "demo",
                "description": "synthetic orders into a JSONL file",
                "sources": {
                    "shop": {
                        "type": "generate",
                        "config": {
                            "tables": ["public.orders", "public.customers"],
                            "count": COUNT,
                            "rate": RATE,
                            "transaction_size": 10,
                        },
                    }
                },
                "destinations": {
                    "archive": {"type": "file", "inputs": ["shop"], "config": {"path": str(out)}}
                },
            },
            sort_keys=False,
        )
    )
    log = base / "daemon.log"
    print(f"demo directory: {base}\n$ dataflare validate {cfg}")
    print(dataflare("validate", str(cfg)).stdout)
    daemon = start(cfg, log)
    try:
        show_status(sock, 3)
        print(f"--- SIGKILL the daemon (pid {daemon.pid}) mid-stream, then start it again ---")
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        daemon = start(cfg, log)
        deadline = time.monotonic() + COUNT / RATE + 60
        while time.monotonic() < deadline:
            show_status(sock, 1)
            st = dataflare("--socket", sock, "status", "--json")
            if st.returncode == 0 and json.loads(st.stdout)["workflows"][0]["state"] == "stopped":
                break
    finally:
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(60)
    with open(out) as f:
        seqs = [json.loads(line)["source"]["seq"] for line in f]
    print(
        f"daemon exited with {rc}; {out.name} has {len(seqs)} lines for {COUNT} changes; "
        f"positions in order: {seqs == sorted(seqs)}"
    )
    print(f"log: {log}")
    return 0 if len(seqs) == COUNT and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
