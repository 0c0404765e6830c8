"""The shared-memory ring (dataflare.daemon.ring) across two real processes.

The test process owns the ring and plays one end; ``ring_peer.py`` plays the
other in a child started like the supervisor starts workers (JSON handles,
``pass_fds``). The local end attaches with dup'd fds so the owner can close its
own copies (``close_child_ends``), exactly as a supervisor does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dataflare.cdc.errors import PeerDied, RingClosed
from dataflare.daemon.ring import ACK_MAX, RingConsumer, RingOwner, RingProducer
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(60)

PEER = Path(__file__).with_name("ring_peer.py")
_spec = importlib.util.spec_from_file_location("ring_peer", PEER)
assert _spec is not None and _spec.loader is not None
ring_peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ring_peer)
make_frame, check_frame, ack_payload = (
    ring_peer.make_frame,
    ring_peer.check_frame,
    ring_peer.ack_payload,
)


def dup_handles(handles: dict[str, int | str]) -> dict[str, int | str]:
    return {
        k: os.dup(v) if k.endswith("_fd") and isinstance(v, int) else v for k, v in handles.items()
    }


class Rig:
    """Rings, children and local ends of one test; all cleaned up afterwards."""

    def __init__(self) -> None:
        self.owners: list[RingOwner] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.ends: list[RingProducer | RingConsumer] = []

    def ring(self, capacity: int) -> RingOwner:
        owner = RingOwner.create(capacity, name_prefix="dataflare-test")
        self.owners.append(owner)
        return owner

    def spawn(
        self, owner: RingOwner, role: str, mode: str, spec: dict[str, Any] | None = None
    ) -> subprocess.Popen[str]:
        handles = owner.producer_handles() if role == "producer" else owner.consumer_handles()
        fds = owner.producer_fds() if role == "producer" else owner.consumer_fds()
        args = [sys.executable, str(PEER), mode, json.dumps(handles)]
        if spec is not None:
            args.append(json.dumps(spec))
        proc = subprocess.Popen(
            args, pass_fds=fds, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.procs.append(proc)
        return proc

    def pair(
        self, capacity: int, local: str, mode: str, spec: dict[str, Any] | None = None
    ) -> tuple[RingOwner, Any, subprocess.Popen[str]]:
        """A ring with the child at one end and the test process at ``local``."""
        owner = self.ring(capacity)
        proc = self.spawn(owner, "consumer" if local == "producer" else "producer", mode, spec)
        end: RingProducer | RingConsumer
        if local == "producer":
            end = RingProducer.attach(dup_handles(owner.producer_handles()))
        else:
            end = RingConsumer.attach(dup_handles(owner.consumer_handles()))
        self.ends.append(end)
        owner.close_child_ends()
        return owner, end, proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(BrokenPipeError):
                        stream.close()
        for end in self.ends:
            if isinstance(end, RingProducer):
                end.close(timeout=0)
            else:
                end.close()
        for owner in self.owners:
            owner.destroy()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def tell(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(text + "\n")
    proc.stdin.flush()


def summary(proc: subprocess.Popen[str]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(line(proc))
    assert proc.wait(timeout=10) == 0
    return result


def fill(producer: RingProducer, size: int = 1000) -> int:
    """Send frames until the ring is full; the number sent."""
    rng, sent = random.Random(size), 0
    while producer.send(make_frame(rng, sent, size), timeout=0):
        sent += 1
    return sent


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def later(delay: float, action: Any) -> threading.Timer:
    timer = threading.Timer(delay, action)
    timer.start()
    return timer


def test_random_frames_cross_processes_in_order_and_intact(rig: Rig) -> None:
    count = 3000
    spec = {"seed": 7, "count": count, "max": 3000, "big_every": 25, "big_max": 40_000}
    owner, consumer, proc = rig.pair(16 * 1024, "consumer", "produce", spec)
    for expected in range(count):
        frame = consumer.recv(timeout=5)
        assert frame is not None
        assert check_frame(frame) == expected
    with pytest.raises(RingClosed) as exc:
        consumer.recv(timeout=5)
    assert type(exc.value) is RingClosed
    assert line(proc) == "done"
    stats = owner.stats()
    assert stats.frames_sent == stats.frames_received == count
    assert stats.used == 0
    assert stats.bytes_sent > 100 * stats.capacity  # wrapped around many times, with big frames


def test_backpressure_blocks_full_producer_until_consumer_reads(rig: Rig) -> None:
    owner, producer, proc = rig.pair(4096, "producer", "consume", {"wait_go": True})
    sent = fill(producer)
    assert sent == 4 and owner.stats().used == 4 * 1008  # 8-byte header + 1000 bytes
    rng = random.Random(1)

    start = time.monotonic()
    assert producer.send(make_frame(rng, sent, 1000), timeout=0.3) is False
    assert time.monotonic() - start >= 0.3

    # Blocked without a timeout, it resumes once the consumer starts reading.
    timer = later(0.3, lambda: tell(proc, "go"))
    start = time.monotonic()
    assert producer.send(make_frame(rng, sent, 1000))
    assert time.monotonic() - start >= 0.25
    timer.join()
    sent += 1
    for _ in range(300):  # many more full-ring round trips
        assert producer.send(make_frame(rng, sent, rng.randrange(40, 3000)), timeout=5)
        sent += 1
    producer.close()
    assert summary(proc) == {"frames": sent, "bad": 0, "end": "RingClosed"}


def test_frames_larger_than_the_ring_are_chunked(rig: Rig) -> None:
    capacity = 4096
    sizes = [100, 3 * capacity + 123, 50, 5 * capacity, 3 * capacity]
    owner, consumer, _ = rig.pair(capacity, "consumer", "produce", {"seed": 3, "sizes": sizes})
    for index, size in enumerate(sizes):
        frame = consumer.recv(timeout=5)
        assert frame is not None and len(frame) == size and check_frame(frame) == index
    with pytest.raises(RingClosed):
        consumer.recv(timeout=5)
    assert owner.stats().bytes_sent == sum(sizes)


def test_producer_killed_mid_chunked_frame_never_yields_it(rig: Rig) -> None:
    capacity = 8192  # chunks of 4088 + 8 bytes
    spec = {"seed": 5, "sizes": [100, 200, 300], "then_big": 20 * capacity}
    owner, consumer, proc = rig.pair(capacity, "consumer", "produce", spec)
    for index in range(3):
        frame = consumer.recv(timeout=5)
        assert frame is not None and check_frame(frame) == index
    assert line(proc) == "big"
    # One chunk published, the next cannot fit: it is blocked inside the big send.
    wait_until(lambda: owner.stats().used >= capacity // 2)
    os.kill(proc.pid, signal.SIGSTOP)  # freeze it there, then take what it published
    assert consumer.recv(timeout=0) is None
    assert consumer._partial  # reassembling
    proc.kill()
    proc.wait()

    readable, _, _ = select.select([consumer.fileno()], [], [], 5)
    assert readable  # fileno() also reports the producer's death
    start = time.monotonic()
    with pytest.raises(PeerDied):
        consumer.recv(timeout=5)
    assert time.monotonic() - start < 1
    assert consumer._partial is None
    with pytest.raises(PeerDied):
        consumer.recv(timeout=0)
    assert owner.stats().frames_received == 3


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_producer_killed_at_random_moment_only_whole_frames_arrive(rig: Rig, seed: int) -> None:
    capacity = 8192
    spec = {"seed": seed, "max": 6000, "big_every": 3, "big_max": 5 * capacity}
    _, consumer, proc = rig.pair(capacity, "consumer", "produce", spec)
    assert consumer.recv(timeout=5) is not None  # it is running
    timer = later(random.Random(seed).uniform(0.05, 0.25), proc.kill)
    received = 1
    with pytest.raises(PeerDied):
        while True:
            frame = consumer.recv(timeout=5)
            assert frame is not None
            assert check_frame(frame) == received  # whole, intact and in order
            received += 1
    timer.join()
    assert received > 1


def test_consumer_killed_unblocks_producer_promptly(rig: Rig) -> None:
    _, producer, proc = rig.pair(4096, "producer", "hold")
    assert line(proc) == "ready"
    fill(producer)
    timer = later(0.3, proc.kill)
    start = time.monotonic()
    with pytest.raises(PeerDied):
        producer.send(b"x" * 1000, timeout=10)
    assert 0.25 <= time.monotonic() - start < 2
    timer.join()
    with pytest.raises(PeerDied):
        producer.send(b"y", timeout=0)
    producer.close()  # no end-of-stream for nobody, no error


def test_unblocked_producer_notices_dead_consumer(rig: Rig) -> None:
    _, producer, proc = rig.pair(64 * 1024, "producer", "hold")
    assert line(proc) == "ready"
    proc.kill()
    proc.wait()
    start, sent = time.monotonic(), 0
    with pytest.raises(PeerDied):
        while True:  # room for 60 frames, but it looks at the lifeline every 10 ms
            assert producer.send(b"x" * 1000, timeout=0)
            sent += 1
            time.sleep(0.002)
    assert time.monotonic() - start < 1 and sent < 20


def test_consumer_killed_unblocks_wait_ack(rig: Rig) -> None:
    _, producer, proc = rig.pair(4096, "producer", "hold")
    assert line(proc) == "ready"
    timer = later(0.3, proc.kill)
    start = time.monotonic()
    with pytest.raises(PeerDied):
        producer.wait_ack(1, timeout=10)
    assert time.monotonic() - start < 2
    timer.join()


def test_consumer_close_is_ring_closed_not_peer_died(rig: Rig) -> None:
    _, producer, proc = rig.pair(4096, "producer", "hold")
    assert line(proc) == "ready"
    tell(proc, "close")
    assert line(proc) == "closed"
    with pytest.raises(RingClosed) as exc:
        fill(producer)
        producer.send(b"x" * 1000, timeout=5)
    assert type(exc.value) is RingClosed


def test_clean_close_delivers_every_frame_then_ring_closed(rig: Rig) -> None:
    owner, consumer, proc = rig.pair(
        64 * 1024, "consumer", "produce", {"seed": 9, "count": 50, "max": 1000}
    )
    assert line(proc) == "done"
    assert proc.wait(timeout=10) == 0  # gone before we read: its frames and EOS are not
    for index in range(50):
        frame = consumer.recv(timeout=0)
        assert frame is not None and check_frame(frame) == index
    for _ in range(2):
        with pytest.raises(RingClosed) as exc:
            consumer.recv(timeout=1)
        assert type(exc.value) is RingClosed  # not PeerDied though the producer exited
    assert owner.stats().frames_received == 50


def test_fileno_is_level_triggered(rig: Rig) -> None:
    spec = {"seed": 8, "count": 5, "max": 500, "linger": True}
    _, consumer, proc = rig.pair(4096, "consumer", "produce", spec)
    assert line(proc) == "sent"
    poller = select.poll()
    poller.register(consumer.fileno(), select.POLLIN)
    for index in range(5):
        assert poller.poll(0)  # stays readable while frames are unread
        frame = consumer.recv(timeout=0)
        assert frame is not None and check_frame(frame) == index
    assert not poller.poll(100)  # all read, producer alive
    tell(proc, "close")
    assert poller.poll(5000)  # the end-of-stream marker
    with pytest.raises(RingClosed):
        consumer.recv(timeout=0)
    assert line(proc) == "done"


def test_ack_round_trip(rig: Rig) -> None:
    _, producer, proc = rig.pair(4096, "producer", "consume", {"ack": True})
    assert producer.ack() == (0, b"")
    assert producer.wait_ack(1, timeout=0.1) is None
    rng = random.Random(2)
    for index in range(5):
        assert producer.send(make_frame(rng, index, 200), timeout=5)
    assert producer.wait_ack(5, timeout=5) == (5, b"ack:4")
    assert producer.ack() == (5, b"ack:4")
    assert producer.wait_ack(3, timeout=0) == (5, b"ack:4")
    producer.close()
    assert summary(proc) == {"frames": 5, "bad": 0, "end": "RingClosed"}


def test_ack_reads_are_never_torn(rig: Rig) -> None:
    count = 30_000
    _, producer, proc = rig.pair(4096, "producer", "ack-stress", {"count": count})
    assert line(proc) == "ready"
    tell(proc, "go")
    seen: set[int] = set()
    deadline = time.monotonic() + 20
    version = 0
    while version < count:  # read as fast as it writes: many reads race an update
        version, data = producer.ack()
        assert version == 0 or data == ack_payload(version)
        seen.add(version)
        assert time.monotonic() < deadline
    assert line(proc) == "done"
    assert len(seen) > 10
    assert producer.wait_ack(count, timeout=0) == (count, ack_payload(count))


def test_ack_size_limit(rig: Rig) -> None:
    _, consumer, _ = rig.pair(4096, "consumer", "hold")
    consumer.set_ack(b"a" * ACK_MAX)
    with pytest.raises(ValueError):
        consumer.set_ack(b"a" * (ACK_MAX + 1))


def test_wake_fds_interrupt_recv(rig: Rig) -> None:
    _, consumer, proc = rig.pair(4096, "consumer", "hold")
    assert line(proc) == "ready"
    r, w = os.pipe()
    try:
        later(0.2, lambda: os.write(w, b"!"))
        start = time.monotonic()
        assert consumer.recv(timeout=5, wake_fds=[r]) is None
        assert 0.15 <= time.monotonic() - start < 2
        assert consumer.recv(wake_fds=[r]) is None  # still readable: not consumed
        assert os.read(r, 10) == b"!"
    finally:
        os.close(r)
        os.close(w)


def test_wake_fds_signal_wakeup_fd_interrupts_recv(rig: Rig) -> None:
    _, consumer, proc = rig.pair(4096, "consumer", "hold")
    assert line(proc) == "ready"
    r, w = os.pipe()
    os.set_blocking(w, False)
    caught: list[int] = []
    old_handler = signal.signal(signal.SIGUSR1, lambda signum, frame: caught.append(signum))
    old_fd = signal.set_wakeup_fd(w)
    try:
        timer = later(0.2, lambda: os.kill(os.getpid(), signal.SIGUSR1))
        assert consumer.recv(timeout=5, wake_fds=[r]) is None
        timer.join()
        assert caught == [signal.SIGUSR1]
        assert os.read(r, 10) == bytes([signal.SIGUSR1])
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGUSR1, old_handler)
        os.close(r)
        os.close(w)


def test_wake_fds_interrupt_send_and_wait_ack(rig: Rig) -> None:
    _, producer, proc = rig.pair(4096, "producer", "hold")
    assert line(proc) == "ready"
    fill(producer)
    r, w = os.pipe()
    try:
        timer = later(0.2, lambda: os.write(w, b"!"))
        start = time.monotonic()
        assert producer.send(b"x" * 1000, timeout=5, wake_fds=[r]) is False
        assert 0.15 <= time.monotonic() - start < 2
        timer.join()
        assert producer.wait_ack(1, timeout=5, wake_fds=[r]) is None
        assert os.read(r, 10) == b"!"
    finally:
        os.close(r)
        os.close(w)


def test_only_the_owner_unlinks_the_segment(rig: Rig) -> None:
    owner = rig.ring(4096)
    path = Path("/dev/shm") / owner.name
    producer = rig.spawn(owner, "producer", "attach-exit")
    consumer = rig.spawn(owner, "consumer", "attach-exit")
    owner.close_child_ends()
    # Attaching must not start a resource tracker that unlinks the segment on exit.
    assert summary(producer) == {"tracker": False}
    assert summary(consumer) == {"tracker": False}
    time.sleep(0.2)
    assert path.exists()
    assert owner.stats().capacity == 4096
    owner.destroy()
    assert not path.exists()
    owner.destroy()  # idempotent
    with pytest.raises(RuntimeError):
        owner.stats()


def test_destroy_after_traffic_leaves_no_dev_shm_entry(rig: Rig) -> None:
    owner, consumer, proc = rig.pair(
        4096, "consumer", "produce", {"seed": 4, "count": 20, "max": 3000}
    )
    path = Path("/dev/shm") / owner.name
    for _ in range(20):
        assert consumer.recv(timeout=5) is not None
    with pytest.raises(RingClosed):
        consumer.recv(timeout=5)
    assert proc.wait(timeout=10) == 0
    consumer.close()
    owner.destroy()
    assert not path.exists()


def local_pair(capacity: int) -> tuple[RingOwner, RingProducer, RingConsumer]:
    owner = RingOwner.create(capacity, name_prefix="dataflare-test")
    producer = RingProducer.attach(dup_handles(owner.producer_handles()))
    consumer = RingConsumer.attach(dup_handles(owner.consumer_handles()))
    owner.close_child_ends()
    return owner, producer, consumer


def test_send_giving_up_mid_chunked_frame_drops_its_chunks() -> None:
    # Framing logic only, both ends in this process.
    owner, producer, consumer = local_pair(4096)
    try:
        assert producer.send(b"b" * 10_000, timeout=0.05) is False  # 2 of 5 chunks written
        assert consumer.recv(timeout=0) is None  # took the 2 chunks, waits for more
        assert producer.send(b"small", timeout=1)
        assert consumer.recv(timeout=1) == b"small"
        assert producer.send(b"c" * 10_000, timeout=0) is False
        producer.close(timeout=1)
        with pytest.raises(RingClosed):
            consumer.recv(timeout=1)
        assert owner.stats().frames_received == 1
    finally:
        producer.close()
        consumer.close()
        owner.destroy()


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.sampled_from([256, 1000, 4096]),
    ops=st.lists(st.one_of(st.integers(0, 5000), st.none()), max_size=80),
)
def test_model_interleaved_nonblocking_send_recv(capacity: int, ops: list[int | None]) -> None:
    """Any interleaving of non-blocking sends (sizes) and receives (None) is FIFO."""
    owner, producer, consumer = local_pair(capacity)
    try:
        model: deque[bytes] = deque()
        for i, op in enumerate(ops):
            if op is None:
                frame = consumer.recv(timeout=0)
                if frame is not None:
                    assert frame == model.popleft()
            else:
                frame = random.Random(i).randbytes(op)
                if producer.send(frame, timeout=0):
                    model.append(frame)
        while (frame := consumer.recv(timeout=0)) is not None:
            assert frame == model.popleft()
        assert not model
        producer.close(timeout=1)
        with pytest.raises(RingClosed):
            consumer.recv(timeout=1)
    finally:
        producer.close()
        consumer.close()
        owner.destroy()
