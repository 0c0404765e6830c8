"""Throughput of the shared-memory ring vs multiprocessing.Queue and Pipe.

Run: ``python bench/ring_bench.py [--scale 0.5]``

For each frame size, a forked child sends the same frames (eight distinct random
frames, cycled) to this process through each transport; this process receives
them as ``bytes``, as the apply process would. Timing starts when the child is
ready and told to go and stops at the last frame. Each figure is the median of
three runs; transports alternate within a run so background noise hits all.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event

from dataflare.cdc.errors import RingClosed
from dataflare.daemon.ring import RingConsumer, RingOwner, RingProducer

CTX = mp.get_context("fork")
KIB, MIB = 1024, 1024 * 1024
# Frame size -> frames per run (100 MB to 0.6 GB).
SIZES = {KIB: 100_000, 64 * KIB: 10_000, MIB: 600}
RUNS = 3
RING_CAPACITY = 8 * MIB  # a 1 MiB frame goes whole (chunks only above capacity / 2)


def make_frames(size: int) -> list[bytes]:
    rng = random.Random(size)
    return [rng.randbytes(size) for _ in range(8)]


# --- children (forked: they inherit the parent's fds) ------------------------


def ring_child(
    handles: Mapping[str, int | str], size: int, count: int, ready: Event, go: Event
) -> None:
    frames = make_frames(size)
    producer = RingProducer.attach(handles)
    ready.set()
    go.wait()
    for i in range(count):
        producer.send(frames[i % 8])
    producer.close()


def queue_child(q: mp.Queue[bytes | None], size: int, count: int, ready: Event, go: Event) -> None:
    frames = make_frames(size)
    ready.set()
    go.wait()
    for i in range(count):
        q.put(frames[i % 8])
    q.put(None)
    q.close()
    q.join_thread()


def pipe_child(conn: Connection, size: int, count: int, ready: Event, go: Event) -> None:
    frames = make_frames(size)
    ready.set()
    go.wait()
    for i in range(count):
        conn.send_bytes(frames[i % 8])
    conn.send_bytes(b"")  # end marker (real frames are never empty here)
    conn.close()


# --- one timed run per transport ---------------------------------------------


def timed(
    start_child: Callable[[Event, Event], mp.process.BaseProcess],
    receive: Callable[[], int],
    expected: int,
) -> float:
    """Bytes per second from "go" to the last frame; checks every byte arrived."""
    ready, go = CTX.Event(), CTX.Event()
    child = start_child(ready, go)
    if not ready.wait(30):
        raise RuntimeError("child did not start")
    t0 = time.perf_counter()
    go.set()
    received = receive()
    elapsed = time.perf_counter() - t0
    child.join(30)
    if child.exitcode != 0:
        raise RuntimeError(f"child failed: exit code {child.exitcode}")
    if received != expected:
        raise RuntimeError(f"received {received} bytes, expected {expected}")
    return received / elapsed


def run_ring(size: int, count: int) -> float:
    owner = RingOwner.create(RING_CAPACITY, name_prefix="dataflare-bench")
    try:
        # Our end gets its own fds so the owner can close its copies after the fork.
        mine = {
            k: os.dup(v) if k.endswith("_fd") and isinstance(v, int) else v
            for k, v in owner.consumer_handles().items()
        }
        consumer = RingConsumer.attach(mine)

        def start(ready: Event, go: Event) -> mp.process.BaseProcess:
            p = CTX.Process(
                target=ring_child, args=(owner.producer_handles(), size, count, ready, go)
            )
            p.start()
            owner.close_child_ends()
            return p

        def receive() -> int:
            total = 0
            try:
                while True:
                    frame = consumer.recv()
                    assert frame is not None
                    total += len(frame)
            except RingClosed:
                return total

        try:
            return timed(start, receive, size * count)
        finally:
            consumer.close()
    finally:
        owner.destroy()


def run_queue(size: int, count: int) -> float:
    q: mp.Queue[bytes | None] = CTX.Queue()

    def start(ready: Event, go: Event) -> mp.process.BaseProcess:
        p = CTX.Process(target=queue_child, args=(q, size, count, ready, go))
        p.start()
        return p

    def receive() -> int:
        total = 0
        while (frame := q.get()) is not None:
            total += len(frame)
        return total

    try:
        return timed(start, receive, size * count)
    finally:
        q.close()
        q.join_thread()


def run_pipe(size: int, count: int) -> float:
    recv_end, send_end = CTX.Pipe(duplex=False)

    def start(ready: Event, go: Event) -> mp.process.BaseProcess:
        p = CTX.Process(target=pipe_child, args=(send_end, size, count, ready, go))
        p.start()
        send_end.close()
        return p

    def receive() -> int:
        total = 0
        while frame := recv_end.recv_bytes():
            total += len(frame)
        return total

    try:
        return timed(start, receive, size * count)
    finally:
        recv_end.close()


TRANSPORTS: dict[str, Callable[[int, int], float]] = {
    "ring": run_ring,
    "mp.Queue": run_queue,
    "mp.Pipe": run_pipe,
}


def human(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply frame counts")
    args = parser.parse_args()
    started = time.perf_counter()
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus,"
        f" ring capacity {human(RING_CAPACITY)}, median of {RUNS} runs"
    )
    print(f"{'frame':>7}  {'transport':<9} {'frames/s':>10} {'MB/s':>9}  {'ring / this':>11}")
    for size, base_count in SIZES.items():
        count = max(10, int(base_count * args.scale))
        rates: dict[str, list[float]] = {name: [] for name in TRANSPORTS}
        for _ in range(RUNS):
            for name, run in TRANSPORTS.items():
                rates[name].append(run(size, count))
        medians = {name: statistics.median(r) for name, r in rates.items()}
        for name, bps in medians.items():
            ratio = "-" if name == "ring" else f"{medians['ring'] / bps:.2f}x"
            print(
                f"{human(size):>7}  {name:<9} {bps / size:>10,.0f} {bps / 1e6:>9,.1f}  {ratio:>11}"
            )
    print(f"(MB = 10^6 bytes; total {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
