"""The systemd side: the unit verifies and rates OK or better, the daemon speaks
sd_notify (READY, WATCHDOG, RELOADING/READY, STOPPING, STATUS) to a socket the
test binds, works under MemoryDenyWriteExecute, and the installer fills a
staging root without touching the real system."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.daemon_harness import REPO, Daemon, count_lines, wait_for, write_config
from tests.e2e.test_reload import assert_stream, gen_workflow

pytestmark = pytest.mark.e2e

UNIT = REPO / "systemd" / "dataflare.service"
VENV_BIN = Path(sys.executable).parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "systemd-analyze"
# systemd-analyze security: the levels from best to worst.
RATINGS = ("PERFECT", "SAFE", "OK", "MEDIUM", "EXPOSED", "UNSAFE", "DANGEROUS")


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with its commands pointing at this venv's `dataflare`."""
    dataflare = VENV_BIN / "dataflare"
    assert os.access(dataflare, os.X_OK), f"{dataflare} missing: install the project"
    text = UNIT.read_text().replace("/usr/local/bin/dataflare", str(dataflare))
    out = tmp_path / "dataflare.service"
    out.write_text(text)
    return out


def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    unit = unit_for_this_machine(tmp_path)
    r = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr  # unknown keys and bad values are only warnings
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "ExecStartPre=/usr/local/bin/dataflare validate",
        "ExecReload=/usr/local/bin/dataflare reload",
        "Restart=on-failure",
        "RestartPreventExitStatus=78 2",
        "KillMode=mixed",
        "User=dataflare",
        "RuntimeDirectory=dataflare",
        "StateDirectory=dataflare",
        "ConfigurationDirectory=dataflare",
        "Environment=DATAFLARE_CONFIG=/etc/dataflare/dataflare.yaml",
        "WatchdogSec=",
        "LoadCredential=",
    ):
        assert line in text, line
    stop = re.search(r"^TimeoutStopSec=(\d+)s$", text, re.M)
    assert stop is not None and 20 < int(stop.group(1)) <= 60  # above the 20 s drain bound


def test_security_rating_is_ok_or_better(tmp_path: Path) -> None:
    r = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    out = r.stdout + r.stderr
    m = re.search(r"Overall exposure level for dataflare\.service: ([\d.]+) (\w+)", out)
    assert m is not None, out
    print(m.group(0))
    assert m.group(2) in RATINGS[: RATINGS.index("OK") + 1], m.group(0)
    assert float(m.group(1)) < 5.0


class NotifyListener:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def snapshot(self) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return list(self.messages)

    def count(self, key: str, since: float = 0.0) -> int:
        return sum(1 for t, m in self.snapshot() if key in m and t >= since)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    lst = NotifyListener(tmp_path / "notify.sock")
    yield lst
    lst.close()


def test_daemon_speaks_sd_notify(
    tmp_path: Path, listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out" / "g.jsonl"
    out.parent.mkdir()
    gen = {"rate": 300, "seed": 41}
    cfg = write_config(tmp_path, {"g": gen_workflow(out, **gen)})
    monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    d = Daemon(cfg)
    try:
        d.start()
        wait_for(lambda: listener.count("READY") >= 1, 20, "READY=1")
        ready = next(m for _, m in listener.snapshot() if "READY" in m)
        assert ready["READY"] == "1" and "workflow(s)" in ready["STATUS"]

        # Watchdog pings from the event loop, about every WATCHDOG_USEC / 2.
        t0 = time.monotonic()
        time.sleep(1.5)
        pings = listener.count("WATCHDOG", since=t0)
        assert 6 <= pings <= 20, pings

        # A stuck supervisor stops pinging (that is what systemd's watchdog catches).
        assert d.proc is not None
        wait_for(lambda: len(d.workflow("g")["pids"]) == 2, 20, "workers up")
        worker_pids = d.workflow("g")["pids"]
        d.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.3)
            t1 = time.monotonic()
            time.sleep(0.6)
            assert listener.count("WATCHDOG", since=t1) == 0
        finally:
            d.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: listener.count("WATCHDOG", since=time.monotonic() - 0.5) > 0, 10, "pings")

        # Workers do not inherit the notification socket (NotifyAccess=main).
        for pid in worker_pids:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not any(e.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_")) for e in env)

        # RELOADING=1 (with MONOTONIC_USEC), then READY=1 around a SIGHUP reload.
        t2 = time.monotonic()
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: listener.count("READY", since=t2) >= 1, 20, "READY after reload")
        after = [
            m for t, m in listener.snapshot() if t >= t2 and ("RELOADING" in m or "READY" in m)
        ]
        kinds = [("RELOADING" if "RELOADING" in m else "READY") for m in after]
        assert kinds[:2] == ["RELOADING", "READY"], after
        usec = int(after[0]["MONOTONIC_USEC"])
        assert abs(usec - time.monotonic_ns() // 1000) < 10_000_000  # CLOCK_MONOTONIC

        # STOPPING=1 on SIGTERM, then a clean exit after the drain.
        t3 = time.monotonic()
        assert d.terminate() == 0
        stopping = [m for t, m in listener.snapshot() if t >= t3 and "STOPPING" in m]
        assert stopping and stopping[0]["STOPPING"] == "1"
    finally:
        d.stop()
    assert assert_stream(out, gen) > 0


def test_daemon_runs_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """What MemoryDenyWriteExecute=yes enforces, with the kernel's PR_SET_MDWE
    (inherited by children across execve): the supervisor and its workers run
    and imports of every compiled dependency work."""
    pr_set_mdwe, pr_mdwe_refuse_exec_gain = 65, 1
    libc = ctypes.CDLL(None, use_errno=True)
    out = tmp_path / "out" / "m.jsonl"
    out.parent.mkdir()
    gen = {"count": 3000, "rate": 3000, "transaction_size": 3, "seed": 51}
    cfg = write_config(tmp_path, {"m": gen_workflow(out, **gen)})

    def mdwe() -> None:  # in the child, before exec
        if libc.prctl(pr_set_mdwe, pr_mdwe_refuse_exec_gain, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_MDWE")

    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mmap, psycopg, lmdb, zstandard, msgpack, watchfiles, yaml, loguru, "
            "pymysqlreplication, dataflare.daemon.supervisor, dataflare.daemon.worker\n"
            "try:\n"
            "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            "    print('W+X allowed')\n"
            "except OSError:\n"
            "    print('W+X refused')\n",
        ],
        preexec_fn=mdwe,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "W+X refused"  # the restriction really is on

    log = tmp_path / "daemon.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dataflare.daemon.cli", "--config", str(cfg), "run"],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            preexec_fn=mdwe,
        )
    d = Daemon(cfg)
    d.proc = proc  # for stop()
    try:
        wait_for(lambda: count_lines(out) >= 3000, 60, f"all changes; log:\n{d.log_tail()}")
        wait_for(lambda: d.try_status() is not None, 20, "status")
        wait_for(lambda: d.workflow("m")["state"] == "stopped", 30, "finished")
        assert d.workflow("m")["errors"] == 0
        assert d.terminate() == 0
    finally:
        d.stop()
    assert_stream(out, gen, 3000)


def run_install(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "install.sh")],
        env={**os.environ, "DESTDIR": str(root), "INSTALL_VENV": "0", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_install_into_a_staging_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = run_install(root, BINDIR=str(VENV_BIN))
    assert r.returncode == 0, r.stdout + r.stderr
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert {
        "usr/local/lib/systemd/system/dataflare.service",
        "usr/local/lib/sysusers.d/dataflare.conf",
        "usr/local/lib/tmpfiles.d/dataflare.conf",
        "usr/local/share/doc/dataflare/systemd.md",
        "etc/dataflare/dataflare.yaml",
        "etc/dataflare/examples/postgres-to-postgres.yaml",
        "etc/dataflare/examples/mariadb-to-postgres.yaml",
        "etc/dataflare/examples/transforms.yaml",
        "etc/dataflare/examples/generate-to-file.yaml",
    } <= files
    assert not list((root / "etc/dataflare/workflows.d").iterdir())  # no demo runs by default
    assert oct((root / "etc/dataflare").stat().st_mode & 0o777) == "0o750"
    assert oct((root / "etc/dataflare/dataflare.yaml").stat().st_mode & 0o777) == "0o640"
    unit = root / "usr/local/lib/systemd/system/dataflare.service"
    assert f"ExecStart={VENV_BIN}/dataflare run" in unit.read_text()
    v = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert v.returncode == 0 and v.stderr.strip() == "", v.stderr

    # The sysusers and tmpfiles files apply cleanly inside the staging root.
    sysusers = subprocess.run(
        [
            "systemd-sysusers",
            f"--root={root}",
            str(root / "usr/local/lib/sysusers.d/dataflare.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sysusers.returncode == 0, sysusers.stderr
    assert re.search(r"^dataflare:x:\d+:\d+:", (root / "etc/passwd").read_text(), re.M)
    assert re.search(r"^dataflare:x:\d+:", (root / "etc/group").read_text(), re.M)
    tmpfiles = subprocess.run(
        [
            "systemd-tmpfiles",
            f"--root={root}",
            "--create",
            str(root / "usr/local/lib/tmpfiles.d/dataflare.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tmpfiles.returncode == 0, tmpfiles.stderr
    assert (root / "var/lib/dataflare").is_dir()

    # A second run keeps an edited config.
    (root / "etc/dataflare/dataflare.yaml").write_text("# mine\n")
    assert run_install(root, BINDIR=str(VENV_BIN)).returncode == 0
    assert (root / "etc/dataflare/dataflare.yaml").read_text() == "# mine\n"


def _example_types(doc: dict[str, Any]) -> dict[str, set[str]]:
    return {
        section: {str(n.get("type")) for n in (doc.get(section) or {}).values()}
        for section in ("sources", "transformations", "destinations")
    }


def test_shipped_examples_validate(tmp_path: Path) -> None:
    """Every example whose connector types are all registered validates (with
    stand-in credential files); the generate example always does."""
    import yaml
    from dataflare.cdc.registry import SOURCE_TYPES
    from dataflare.daemon.config import validate_paths
    from dataflare.daemon.transform_registry import TRANSFORM_TYPES
    from dataflare.sinks.registry import SINK_TYPES

    registries = {
        "sources": SOURCE_TYPES,
        "transformations": TRANSFORM_TYPES,
        "destinations": SINK_TYPES,
    }
    creds = tmp_path / "credentials"
    creds.mkdir()
    examples = sorted((REPO / "etc" / "examples").glob("*.yaml"))
    assert {p.name for p in examples} >= {
        "postgres-to-postgres.yaml",
        "mariadb-to-postgres.yaml",
        "transforms.yaml",
        "generate-to-file.yaml",
    }
    validated, waiting = [], {}
    for path in examples:
        text = path.read_text()
        for name in re.findall(r"\$\{CREDENTIALS_DIRECTORY\}/([\w.-]+)", text):
            (creds / name).write_text("host=db.example dbname=x\n")
        missing = {
            f"{section}:{t}"
            for section, types in _example_types(yaml.safe_load(text)).items()
            for t in types
            if t not in registries[section]
        }
        if missing:
            waiting[path.name] = sorted(missing)
            continue
        env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds)}
        assert validate_paths([str(path)], env=env) == [], path.name
        validated.append(path.name)
    print("validated:", validated, "waiting for types:", waiting)
    assert {"generate-to-file.yaml", "transforms.yaml"} <= set(validated)
    # The default daemon file is valid and loads the repository's demo workflow.
    assert validate_paths([str(REPO / "etc" / "dataflare.yaml")], env={}) == []
