"""Runs `dataflare run` as a subprocess against a config in a temp dir."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def write_config(base: Path, workflows: dict[str, dict[str, Any]], **daemon: Any) -> Path:
    (base / "workflows.d").mkdir(parents=True, exist_ok=True)
    settings = {
        "state_dir": str(base / "state"),
        "socket": str(base / "df.sock"),
        "log_level": "INFO",
        "log_format": "text",
        **daemon,
    }
    cfg = base / "dataflare.yaml"
    cfg.write_text(yaml.safe_dump({"daemon": settings, "workflows_dir": "workflows.d"}))
    for name, wf in workflows.items():
        (base / "workflows.d" / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **wf}))
    return cfg


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dataflare.daemon.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


class Daemon:
    new_session = False  # GroupDaemon: a session of its own, killed as a whole

    def __init__(self, config: Path) -> None:
        self.config = config
        self.socket = str(config.parent / "df.sock")
        self.log = config.parent / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        logf = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dataflare.daemon.cli", "--config", str(self.config), "run"],
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=self.new_session,
            )
        finally:
            logf.close()
        wait_for(
            lambda: os.path.exists(self.socket) and self.try_status() is not None,
            20,
            f"daemon did not come up; log:\n{self.log_tail()}",
        )

    def try_status(self) -> dict[str, Any] | None:
        r = cli("--socket", self.socket, "status", "--json", timeout=10)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def status(self) -> dict[str, Any]:
        st = self.try_status()
        assert st is not None, f"no status; log:\n{self.log_tail()}"
        return st

    def workflow(self, name: str) -> dict[str, Any]:
        return next(w for w in self.status()["workflows"] if w["name"] == name)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def wait_for(cond: Callable[[], bool], timeout: float, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for: {message}")


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


class GroupDaemon(Daemon):
    """The daemon in its own session, so one killpg() hits every process of it."""

    new_session = True

    def kill_group(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        for name in os.listdir("/dev/shm"):  # the rings a SIGKILLed daemon leaves
            if name.startswith(f"dataflare.{self.proc.pid}."):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/dev/shm/{name}")

    def stop(self) -> None:
        super().stop()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
