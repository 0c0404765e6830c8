"""Child process for tests/unit/test_state.py.

``state_writer.py kill STATE_DIR``
    commits checkpoints 1, 2, 3, ... forever, each in its own transaction, and
    prints each value on stdout once its commit returned; the test SIGKILLs it.
    Odd values go through ``put_checkpoint``; even ones through ``transaction()``
    together with ``put_meta("last-even", value)``.
``state_writer.py concurrent STATE_DIR NAME COUNT``
    commits COUNT checkpoints of destination NAME, a dead letter every tenth and
    a schema record every hundredth, then prints ``done``.
``state_writer.py grow STATE_DIR MEGABYTES``
    writes that much incompressible data under meta keys ``grow-*``.
``state_writer.py dead-letter STATE_DIR WORKFLOW``
    stores one dead letter and prints its id.
"""

from __future__ import annotations

import os
import sys

from dataflare.cdc.model import Position
from dataflare.daemon.state import StateStore


def extra_for(value: int) -> dict[str, object]:
    # Sizes vary across the compression threshold so both encodings get killed.
    return {"value": value, "pad": "p" * (value * 37 % 3000)}


def kill_loop(state_dir: str) -> None:
    with StateStore(state_dir) as store:
        value = 0
        while True:
            value += 1
            position = Position("test", value, f"tag-{value}")
            if value % 2:
                store.put_checkpoint("wf", "dst", "src", position, extra_for(value))
            else:
                with store.transaction() as txn:
                    txn.put_checkpoint("wf", "dst", "src", position, extra_for(value))
                    txn.put_meta("last-even", value)
            sys.stdout.write(f"{value}\n")
            sys.stdout.flush()


def concurrent(state_dir: str, name: str, count: int) -> None:
    with StateStore(state_dir) as store:
        for i in range(1, count + 1):
            store.put_checkpoint("wf", name, "src", Position("test", i), {"by": name})
            if i % 10 == 0:
                store.put_dead_letter("wf", {"by": name, "i": i})
            if i % 100 == 0:
                store.append_schema("wf", "src", Position("test", 7), {"by": name, "i": i})
    print("done", flush=True)


def grow(state_dir: str, megabytes: int) -> None:
    with StateStore(state_dir) as store:
        for i in range(megabytes * 16):
            store.put_meta(f"grow-{i}", os.urandom(64 * 1024))
    print("done", flush=True)


def dead_letter(state_dir: str, workflow: str) -> None:
    with StateStore(state_dir) as store:
        print(store.put_dead_letter(workflow, {"by": "child"}), flush=True)


def main(argv: list[str]) -> None:
    mode, state_dir = argv[1], argv[2]
    if mode == "kill":
        kill_loop(state_dir)
    elif mode == "concurrent":
        concurrent(state_dir, argv[3], int(argv[4]))
    elif mode == "grow":
        grow(state_dir, int(argv[3]))
    elif mode == "dead-letter":
        dead_letter(state_dir, argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
