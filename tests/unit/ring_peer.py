"""Child process for tests/unit/test_ring.py: the other end of a ring.

``ring_peer.py MODE HANDLES_JSON [SPEC_JSON]``; the fds named in the handles are
inherited through ``pass_fds``. Lines on stdout report progress; stdin carries
commands.

``produce``  SPEC: ``{"seed", "sizes": [...]}`` or ``{"seed", "count", "max",
             "big_every", "big_max"}``; sends those frames, then if ``then_big``
             prints ``big`` and sends one frame of that size; with ``forever``
             keeps sending random frames; with ``linger`` prints ``sent`` and
             waits for a stdin line; finally closes the ring and prints ``done``.
``consume``  SPEC: ``{"wait_go": bool, "ack": bool}``; optionally waits for a
             ``go`` line, then receives and checks frames until the ring ends and
             prints a JSON summary (``frames``, ``bad``, ``end``). With ``ack`` it
             sets the ack to ``ack:<index>`` after each frame.
``hold``     attaches (role from the handles), prints ``ready``, then obeys stdin
             lines: ``close`` closes the ring end (and prints ``closed``); EOF exits.
``ack-stress`` SPEC: ``{"count"}``: as consumer, prints ``ready``, waits for
             ``go``, sets ``count`` self-describing acks (see ``ack_payload``),
             prints ``done`` and waits for EOF.
``attach-exit`` attaches, prints whether a resource tracker runs here, exits.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Iterator
from multiprocessing import resource_tracker
from typing import Any

from dataflare.cdc.errors import PeerDied, RingClosed
from dataflare.daemon.ring import RingConsumer, RingProducer

HEAD = 8 + 32  # index + sha256 of the body


def make_frame(rng: random.Random, index: int, size: int) -> bytes:
    """A self-checking frame of ``size`` bytes (at least HEAD)."""
    body = rng.randbytes(max(0, size - HEAD))
    return index.to_bytes(8, "little") + hashlib.sha256(body).digest() + body


def check_frame(frame: bytes) -> int:
    """The frame's index; AssertionError if it is truncated or corrupt."""
    assert len(frame) >= HEAD, f"short frame ({len(frame)} bytes)"
    body = frame[HEAD:]
    assert hashlib.sha256(body).digest() == frame[8:HEAD], f"corrupt frame ({len(frame)} bytes)"
    return int.from_bytes(frame[:8], "little")


def ack_payload(version: int) -> bytes:
    """An ack whose every byte depends on its version: a torn read cannot match."""
    return version.to_bytes(8, "little") * (version % 500 + 1)


def random_sizes(spec: dict[str, Any], rng: random.Random) -> Iterator[int]:
    count = spec.get("count")
    i = 0
    while count is None or i < count:
        i += 1
        if spec.get("big_every") and i % spec["big_every"] == 0:
            yield rng.randrange(HEAD, spec["big_max"])
        else:
            yield rng.randrange(HEAD, spec["max"])


def produce(handles: dict[str, Any], spec: dict[str, Any]) -> None:
    rng = random.Random(spec["seed"])
    sizes = iter(spec["sizes"]) if "sizes" in spec else random_sizes(spec, rng)
    with RingProducer.attach(handles) as ring:
        index = 0
        for size in sizes:
            ring.send(make_frame(rng, index, size))
            index += 1
        if "then_big" in spec:
            print("big", flush=True)
            ring.send(make_frame(rng, index, spec["then_big"]))
        if spec.get("linger"):
            print("sent", flush=True)
            sys.stdin.readline()
    print("done", flush=True)


def consume(handles: dict[str, Any], spec: dict[str, Any]) -> None:
    if spec.get("wait_go"):
        assert sys.stdin.readline().strip() == "go"
    frames = bad = 0
    with RingConsumer.attach(handles) as ring:
        try:
            while True:
                frame = ring.recv()
                assert frame is not None
                try:
                    if check_frame(frame) != frames:
                        bad += 1
                except AssertionError:
                    bad += 1
                if spec.get("ack"):
                    ring.set_ack(b"ack:%d" % frames)
                frames += 1
        except PeerDied:
            end = "PeerDied"
        except RingClosed:
            end = "RingClosed"
    print(json.dumps({"frames": frames, "bad": bad, "end": end}), flush=True)


def hold(handles: dict[str, Any]) -> None:
    side = (RingProducer if handles["role"] == "producer" else RingConsumer).attach(handles)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "close":
            side.close()
            print("closed", flush=True)


def ack_stress(handles: dict[str, Any], spec: dict[str, Any]) -> None:
    with RingConsumer.attach(handles) as ring:
        print("ready", flush=True)
        assert sys.stdin.readline().strip() == "go"
        for version in range(1, spec["count"] + 1):
            ring.set_ack(ack_payload(version))
        print("done", flush=True)
        sys.stdin.read()


def attach_exit(handles: dict[str, Any]) -> None:
    side = (RingProducer if handles["role"] == "producer" else RingConsumer).attach(handles)
    side.close()
    tracker_fd = resource_tracker._resource_tracker._fd  # type: ignore[attr-defined]
    print(json.dumps({"tracker": tracker_fd is not None}), flush=True)


def main() -> None:
    mode, handles = sys.argv[1], json.loads(sys.argv[2])
    spec = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    if mode == "produce":
        produce(handles, spec)
    elif mode == "consume":
        consume(handles, spec)
    elif mode == "hold":
        hold(handles)
    elif mode == "ack-stress":
        ack_stress(handles, spec)
    elif mode == "attach-exit":
        attach_exit(handles)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
