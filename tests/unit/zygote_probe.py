"""Drives a zygote the way the supervisor does, from its own process (a child
subreaper, so the forked workers become its children): run by test_zygote_protocol.

Prints one JSON object: for a worker never confirmed and one confirmed, its exit
code and what it wrote on its status pipe; whether a request with more fds than
one message carries was refused without breaking the zygote; which process a warm
request's classes were imported in (the zygote), a bad path among them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dataflare.daemon import zygote_client
from dataflare.daemon.worker_spec import WorkerSpec


def spec(status_fd: int) -> WorkerSpec:
    # No workflow: a worker that runs at all reports the error on its status pipe.
    return WorkerSpec(
        role="source",
        workflow=None,  # type: ignore[arg-type]
        rings={},
        state_dir="/nonexistent",
        status_fd=status_fd,
        parent_pid=os.getpid(),
        log_format="text",
    )


def one(z: zygote_client.Zygote, confirmed: bool) -> dict[str, object]:
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = z.fork(spec(w), [w], go_r)
    os.close(w)
    os.close(go_r)
    if pid is None:
        return {"pid": None}
    if confirmed:
        zygote_client.confirm(go_w)
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    return {"pid": pid, "exit": os.waitstatus_to_exitcode(status), "status": out.decode()}


def main() -> int:
    z = zygote_client.Zygote.start()
    if z is None:
        print(json.dumps({"error": "no zygote"}))
        return 1
    result: dict[str, object] = {"unconfirmed": one(z, confirmed=False)}
    z.warm("INFO", "text", ["no_such_module_anywhere:Nothing", "zygote_warm_marker:Thing"])
    marker = Path(os.environ["DATAFLARE_TEST_WARM_MARKER"])
    result["warm"] = {
        "broken": z.broken,
        "zygote": z.proc.pid,
        "imported_by": int(marker.read_text()) if marker.exists() else None,
    }
    result["confirmed"] = one(z, confirmed=True)
    many = [os.open("/dev/null", os.O_RDONLY) for _ in range(300)]
    go_r, go_w = os.pipe()
    result["too_many_fds"] = z.fork(spec(many[0]), many, go_r)
    for fd in (go_r, go_w, *many):
        os.close(fd)
    result["broken_after"] = z.broken
    result["after_too_many"] = one(z, confirmed=True)
    z.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
