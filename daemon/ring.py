"""Single-producer/single-consumer shared-memory ring for encoded batches.

One ring per source carries frames (one encoded batch each) from the source
process to the apply process, and an ack area (the applied source position)
back. Linux only (eventfd).

Segment layout (native-endian u64 words; every field 8-byte aligned, so one word
is written and read by one machine store/load):

  words 0..3     magic, layout version, capacity, data offset
  words 8..11    producer line: write position, frames sent, bytes sent, attached
  words 16..19   consumer line: read position, frames received, closed, attached
  words 24..26   ack seqlock: sequence, version, length; ack bytes follow (<= 4 KiB)
  _DATA_OFF      the data area, ``capacity`` bytes

Positions are monotonically increasing byte counters (offset = pos % capacity).
A record is an 8-byte header (u32 length | u32 flags << 32) and its payload,
padded to 8 bytes. A record that does not fit before the end of the data area is
preceded by a PAD header that sends the reader to offset 0. Frames larger than
half the ring are split into chunks (MORE on all but the last, CONT on all but
the first): a chunk of at most half the ring always fits once the ring drains,
whatever the current offset, so big frames cannot deadlock.

Synchronisation. Python has no memory fences, so the positions in the header are
for stats only; the hand-over itself goes through eventfds, whose kernel-side
lock orders our plain stores before the peer's loads (on any CPU, not just x86):

* data eventfd (EFD_SEMAPHORE, producer -> consumer): +1 per record, written
  after the record (and its PAD) is completely in place; the consumer takes 1
  before it looks at a record. So a record is never seen half-written, and the
  fd is readable exactly while published records are unread (level-triggered).
* space eventfd (consumer -> producer): +n after the consumer copied out a record
  of n bytes (PAD included); the producer adds what it reads to its own copy of
  the read position, so it never overwrites bytes still being read.
* ack eventfd (consumer -> producer): +1 after each ack update. The ack area
  itself is a seqlock (one writer, retrying readers) of plain stores and loads,
  which relies on x86-64's store/store and load/load ordering (TSO).

Peer death: each side holds the write end of its own "lifeline" pipe and polls
the read end of the other's; POLLHUP means every copy of the peer's write end is
closed, i.e. the peer is gone. All fds are close-on-exec and reach children only
through ``subprocess.Popen(pass_fds=...)``, so no stray copy keeps a dead peer
"alive" (a child forked without exec must close the fds it does not own).

Each side is used from one thread and attached once per ring: after a peer dies
the supervisor creates a new ring (unread eventfd counts make re-attaching unsafe).
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import select
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Final, Literal

from dataflare.cdc.errors import PeerDied, RingClosed

__all__ = [
    "ACK_MAX",
    "MAX_CAPACITY",
    "MIN_CAPACITY",
    "RingConsumer",
    "RingOwner",
    "RingProducer",
    "RingStats",
]

ACK_MAX: Final = 4096
MIN_CAPACITY: Final = 256
MAX_CAPACITY: Final = 1 << 32  # chunk lengths are u32 and chunks are <= capacity / 2

_MAGIC: Final = int.from_bytes(b"DFRING01", "little")
_LAYOUT: Final = 1
_W_MAGIC, _W_LAYOUT, _W_CAPACITY, _W_DATA_OFF = 0, 1, 2, 3
# Producer and consumer fields sit on separate cache lines (no false sharing).
_W_WPOS, _W_FRAMES_SENT, _W_BYTES_SENT, _W_PRODUCER_ATTACHED = 8, 9, 10, 11
_W_RPOS, _W_FRAMES_RECV, _W_CONSUMER_CLOSED, _W_CONSUMER_ATTACHED = 16, 17, 18, 19
_W_ACK_SEQ, _W_ACK_VERSION, _W_ACK_LEN = 24, 25, 26
_ACK_DATA: Final = 27 * 8
_DATA_OFF: Final = 8192  # page aligned, after the header and the ack area

_HDR: Final = 8
_LEN_MASK: Final = 0xFFFF_FFFF
_F_MORE: Final = 1  # more chunks of this frame follow
_F_CONT: Final = 2  # continues the frame of the previous record
_F_PAD: Final = 4  # skip to offset 0
_F_EOS: Final = 8  # producer closed the ring
_F_INVALID: Final = _LEN_MASK & ~(_F_MORE | _F_CONT | _F_EOS)  # PAD only before a record
_PEER_CHECK_INTERVAL: Final = 0.01  # seconds between lifeline checks of an unblocked producer

# Handle keys that hold fd numbers (all end in "_fd").
_FD_KEYS: Final = ("data_fd", "space_fd", "ack_fd", "lifeline_fd", "peer_fd")

Role = Literal["producer", "consumer"]


@dataclass(frozen=True, slots=True)
class RingStats:
    """A snapshot. ``used`` counts ring bytes in flight (headers and padding too);
    frames and bytes count whole frames (payload bytes), not chunks."""

    capacity: int
    used: int
    frames_sent: int
    frames_received: int
    bytes_sent: int


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _max_payload(capacity: int) -> int:
    """Largest chunk payload: header + padded payload fits in half the ring."""
    return (capacity // 2) // 8 * 8 - _HDR


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + max(0.0, timeout)


def _poller(fds: Iterable[int]) -> select.poll:
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return poller


def _wait(poller: select.poll, deadline: float | None) -> set[int]:
    """Block in poll() until a registered fd has an event or ``deadline`` passes.

    Any event counts (POLLIN, POLLHUP, POLLERR, POLLNVAL): a lifeline only ever
    reports HUP, and a broken wake fd must not make the caller block forever.
    """
    if deadline is None:
        events = poller.poll()
    else:
        # Round up: a timeout rounded down to 0 ms would spin until the deadline.
        events = poller.poll(max(0, math.ceil((deadline - time.monotonic()) * 1000)))
    return {fd for fd, _ in events}


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


_tracker_lock = threading.Lock()


def _attach_segment(name: str) -> SharedMemory:
    """Map an existing segment without handing it to this process's resource tracker.

    Python < 3.13 registers every attached segment with the resource tracker,
    which unlinks it when the attaching process exits, destroying the ring under
    the creator. The usual workaround, unregistering right after attaching,
    starts a tracker process in every child and, when the attacher shares the
    creator's tracker (same process, or a fork child), deletes the creator's own
    registration, so a crashed supervisor would leak the segment. Skipping the
    registration of this one name avoids both.
    """
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    skipped = "/" + name  # SharedMemory registers the POSIX name, with its slash
    real_register = resource_tracker.register

    def register(rname: str, rtype: str) -> None:
        if rtype != "shared_memory" or rname != skipped:
            real_register(rname, rtype)

    with _tracker_lock:
        setattr(resource_tracker, "register", register)  # noqa: B010 (a function, not a field)
        try:
            return SharedMemory(name=name)
        finally:
            setattr(resource_tracker, "register", real_register)  # noqa: B010


class _Mapping:
    """The segment's byte view and the u64 word view the hot paths index."""

    def __init__(self, shm: SharedMemory) -> None:
        buf = shm.buf
        if buf is None:
            raise ValueError("shared memory segment is closed")
        self.shm = shm
        self.buf: memoryview = buf
        self.words: memoryview = buf.cast("Q")

    def stats(self) -> RingStats:
        w = self.words
        rpos = w[_W_RPOS]  # before wpos: both only grow, so used >= 0
        wpos = w[_W_WPOS]
        return RingStats(
            capacity=w[_W_CAPACITY],
            used=max(0, wpos - rpos),
            frames_sent=w[_W_FRAMES_SENT],
            frames_received=w[_W_FRAMES_RECV],
            bytes_sent=w[_W_BYTES_SENT],
        )

    def close(self) -> None:
        # Our views must go first: mmap.close() refuses while views exist.
        self.words.release()
        self.buf.release()
        self.shm.close()


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class RingOwner:
    """Creates and finally destroys a ring; hands its two ends to child processes.

    Usage (supervisor)::

        owner = RingOwner.create(64 << 20)
        src = Popen([..., json.dumps(owner.producer_handles())], pass_fds=owner.producer_fds())
        app = Popen([..., json.dumps(owner.consumer_handles())], pass_fds=owner.consumer_fds())
        owner.close_child_ends()   # else the children never see each other die
        ...
        owner.destroy()
    """

    def __init__(self, mapping: _Mapping, capacity: int) -> None:
        self._shm = mapping.shm
        self._map: _Mapping | None = mapping
        self.name: str = mapping.shm.name
        self._capacity = capacity
        self._fds: dict[str, int] | None = None
        self._destroyed = False
        fds: dict[str, int] = {}
        try:
            flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
            fds["data"] = os.eventfd(0, flags | os.EFD_SEMAPHORE)
            fds["space"] = os.eventfd(0, flags)
            fds["ack"] = os.eventfd(0, flags)
            # Lifelines: nothing is ever written; only the writers' exit (EOF) matters.
            fds["p_life_r"], fds["p_life_w"] = os.pipe()
            fds["c_life_r"], fds["c_life_w"] = os.pipe()
        except BaseException:
            _close_fds(fds.values())
            raise
        self._fds = fds

    @classmethod
    def create(cls, capacity: int, name_prefix: str = "dataflare") -> RingOwner:
        """Create a ring whose data area holds ``capacity`` bytes (rounded up to 8)."""
        capacity = _align8(capacity)
        if not MIN_CAPACITY <= capacity <= MAX_CAPACITY:
            raise ValueError(f"ring capacity must be in [{MIN_CAPACITY}, {MAX_CAPACITY}]")
        if "/" in name_prefix or not name_prefix:
            raise ValueError("name_prefix must be non-empty and contain no '/'")
        name = f"{name_prefix}-{os.getpid()}-{secrets.token_hex(6)}"
        shm = SharedMemory(name=name, create=True, size=_DATA_OFF + capacity)
        try:
            m = _Mapping(shm)
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        try:
            w = m.words
            w[_W_LAYOUT] = _LAYOUT
            w[_W_CAPACITY] = capacity
            w[_W_DATA_OFF] = _DATA_OFF
            w[_W_MAGIC] = _MAGIC  # last: an attacher checks it
            return cls(m, capacity)
        except BaseException:
            m.close()
            shm.unlink()
            raise

    def _handles(self, role: Role) -> dict[str, int | str]:
        if self._fds is None:
            raise RuntimeError("ring fds already closed (close_child_ends or destroy)")
        f = self._fds
        own, peer = ("p_life_w", "c_life_r") if role == "producer" else ("c_life_w", "p_life_r")
        return {
            "role": role,
            "shm": self.name,
            "capacity": self._capacity,
            "data_fd": f["data"],
            "space_fd": f["space"],
            "ack_fd": f["ack"],
            "lifeline_fd": f[own],
            "peer_fd": f[peer],
        }

    def producer_handles(self) -> dict[str, int | str]:
        return self._handles("producer")

    def consumer_handles(self) -> dict[str, int | str]:
        return self._handles("consumer")

    def producer_fds(self) -> list[int]:
        h = self._handles("producer")
        return [int(h[k]) for k in _FD_KEYS]

    def consumer_fds(self) -> list[int]:
        h = self._handles("consumer")
        return [int(h[k]) for k in _FD_KEYS]

    def close_child_ends(self) -> None:
        """Close the owner's copies of every fd, once both children have theirs.

        The owner keeps none: it only reads stats from the segment, and a copy of
        a lifeline write end left here would hide that child's death from its peer.
        """
        if self._fds is not None:
            fds, self._fds = self._fds, None
            _close_fds(fds.values())

    def stats(self) -> RingStats:
        if self._map is None:
            raise RuntimeError("ring destroyed")
        return self._map.stats()

    def destroy(self) -> None:
        """Close fds, unmap and unlink the segment. Idempotent."""
        self.close_child_ends()
        if self._map is not None:
            m, self._map = self._map, None
            m.close()
        if not self._destroyed:
            self._destroyed = True
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()

    def __enter__(self) -> RingOwner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __del__(self) -> None:
        # Release our views so SharedMemory.__del__ can unmap (else BufferError);
        # the resource tracker unlinks a segment never destroyed at exit.
        m = getattr(self, "_map", None)
        if m is not None:
            self._map = None
            m.close()
        fds = getattr(self, "_fds", None)
        if fds:
            self._fds = None
            _close_fds(fds.values())


class _Side:
    """What producer and consumer share: attach, fds, stats, detach."""

    _role: Role
    _attached_word: int

    def __init__(self, handles: Mapping[str, int | str]) -> None:
        self._map: _Mapping | None = None
        self._fds: list[int] = []
        if handles.get("role") != self._role:
            raise ValueError(f"handles are for the {handles.get('role')}, not the {self._role}")
        fds = [int(handles[k]) for k in _FD_KEYS]
        for key, fd in zip(_FD_KEYS, fds, strict=True):
            try:
                os.fstat(fd)
            except OSError:
                raise ValueError(f"ring {key} {fd} is not open here (pass_fds?)") from None
        shm = _attach_segment(str(handles["shm"]))
        m = _Mapping(shm)
        try:
            w = m.words
            capacity = int(handles["capacity"])
            if (
                w[_W_MAGIC] != _MAGIC
                or w[_W_LAYOUT] != _LAYOUT
                or w[_W_DATA_OFF] != _DATA_OFF
                or w[_W_CAPACITY] != capacity
                or shm.size < _DATA_OFF + capacity
            ):
                raise ValueError(f"shared memory {handles['shm']!r} is not a matching ring")
            if w[self._attached_word]:
                raise RuntimeError(f"a {self._role} already attached to this ring")
            w[self._attached_word] = os.getpid()
        except BaseException:
            m.close()
            raise
        self._map = m
        self._fds = fds
        self._capacity = capacity
        self._max_payload = _max_payload(capacity)
        self._buf = m.buf
        self._words = m.words
        self._data_fd, self._space_fd, self._ack_fd, self._lifeline_fd, self._peer_fd = fds
        self._pollers: dict[tuple[int, ...], select.poll] = {}
        self._peer_poll = _poller((self._peer_fd,))  # for the "is the peer gone" check

    def _wait(
        self, fds: tuple[int, ...], wake_fds: Sequence[int], deadline: float | None
    ) -> set[int]:
        if wake_fds:
            return _wait(_poller((*fds, *wake_fds)), deadline)
        poller = self._pollers.get(fds)  # reused: waiting is the hot path when streaming
        if poller is None:
            poller = self._pollers[fds] = _poller(fds)
        return _wait(poller, deadline)

    def _check_open(self) -> None:
        if self._map is None:
            raise ValueError(f"ring {self._role} is closed")

    def stats(self) -> RingStats:
        self._check_open()
        assert self._map is not None
        return self._map.stats()

    def _detach(self) -> None:
        if self._map is not None:
            m, self._map = self._map, None
            del self._buf, self._words
            m.close()
        fds, self._fds = self._fds, []
        _close_fds(fds)

    def __del__(self) -> None:
        if getattr(self, "_map", None) is not None or getattr(self, "_fds", None):
            self._detach()


class RingProducer(_Side):
    """The source process's end: ``send`` frames, read acks."""

    _role = "producer"
    _attached_word = _W_PRODUCER_ATTACHED

    def __init__(self, handles: Mapping[str, int | str]) -> None:
        super().__init__(handles)
        self._wpos = 0
        self._rpos = 0  # what the consumer has freed, as far as we have been told
        self._frames_sent = 0
        self._bytes_sent = 0
        self._gone: RingClosed | None = None
        self._next_peer_check = 0.0

    @classmethod
    def attach(cls, handles: Mapping[str, int | str]) -> RingProducer:
        return cls(handles)

    def _peer_gone(self) -> RingClosed:
        if self._gone is None:
            if self._words[_W_CONSUMER_CLOSED]:
                self._gone = RingClosed("the ring consumer closed the ring")
            else:
                self._gone = PeerDied("the ring consumer process died")
        return self._gone

    def _check_peer(self) -> None:
        if self._gone is not None:
            raise self._gone
        # A blocked send notices at once (it polls the lifeline); an unblocked
        # stream of sends looks at most every _PEER_CHECK_INTERVAL, which spares a
        # syscall per frame (clock_gettime is a vDSO call).
        now = time.monotonic()
        if now >= self._next_peer_check:
            self._next_peer_check = now + _PEER_CHECK_INTERVAL
            if self._peer_poll.poll(0):
                raise self._peer_gone()

    def send(
        self,
        frame: bytes | bytearray | memoryview,
        *,
        timeout: float | None = None,
        wake_fds: Sequence[int] = (),
    ) -> bool:
        """Publish one frame; block while the ring is full.

        Returns False if ``timeout`` expired or a ``wake_fds`` fd became readable
        first (checked only when blocking). The frame is then not delivered: if
        it was chunked and partly written, the consumer drops those chunks when
        the next frame or the end of stream arrives. Raises PeerDied if the
        consumer died, RingClosed if it closed the ring.
        """
        if self._map is None:
            self._check_open()
        self._check_peer()
        mv = memoryview(frame)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = mv.nbytes
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        if n <= self._max_payload:
            if not self._put(mv, 0, deadline, wake_fds):
                return False
        else:
            step = self._max_payload
            for pos in range(0, n, step):
                flags = (_F_CONT if pos else 0) | (_F_MORE if pos + step < n else 0)
                if not self._put(mv[pos : pos + step], flags, deadline, wake_fds):
                    return False
        self._frames_sent += 1
        self._bytes_sent += n
        w = self._words
        w[_W_FRAMES_SENT] = self._frames_sent
        w[_W_BYTES_SENT] = self._bytes_sent
        return True

    def _put(
        self, chunk: memoryview, flags: int, deadline: float | None, wake_fds: Sequence[int]
    ) -> bool:
        n = chunk.nbytes
        rec = _HDR + ((n + 7) & ~7)
        cap = self._capacity
        wpos = self._wpos
        off = wpos % cap
        tail = cap - off
        need = rec if rec <= tail else tail + rec  # PAD to the end, then the record at 0
        if cap - (wpos - self._rpos) < need and not self._wait_space(need, deadline, wake_fds):
            return False
        w = self._words
        base = _DATA_OFF + off
        if rec > tail:
            w[base >> 3] = _F_PAD << 32
            base = _DATA_OFF
        if n:
            self._buf[base + _HDR : base + _HDR + n] = chunk
        w[base >> 3] = n | (flags << 32)
        self._wpos = wpos = wpos + need
        w[_W_WPOS] = wpos
        os.eventfd_write(self._data_fd, 1)  # publish: only now may the consumer look
        return True

    def _drain_space(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._rpos += os.eventfd_read(self._space_fd)

    def _wait_space(self, need: int, deadline: float | None, wake_fds: Sequence[int]) -> bool:
        cap = self._capacity
        while True:
            # Drain before waiting: a release signalled after this read leaves the
            # eventfd readable, so poll() cannot miss it.
            self._drain_space()
            if cap - (self._wpos - self._rpos) >= need:
                return True
            ready = self._wait((self._space_fd, self._peer_fd), wake_fds, deadline)
            if self._peer_fd in ready:
                raise self._peer_gone()
            if ready - {self._space_fd}:
                return False  # a wake fd
            if not ready and _expired(deadline):
                return False

    def ack(self) -> tuple[int, bytes]:
        """The consumer's latest ack as (version, data); version 0 means never set."""
        self._check_open()
        w = self._words
        while True:
            seq = w[_W_ACK_SEQ]
            if not seq & 1:
                version = w[_W_ACK_VERSION]
                length = min(w[_W_ACK_LEN], ACK_MAX)
                data = bytes(self._buf[_ACK_DATA : _ACK_DATA + length])
                if w[_W_ACK_SEQ] == seq:
                    return version, data
                continue  # raced with an update: read again
            # An update is in progress. The consumer signals the ack eventfd when it
            # is done, so block on that instead of spinning; a leftover signal only
            # costs one more round.
            ready = self._wait((self._ack_fd, self._peer_fd), (), None)
            if self._ack_fd in ready:
                self._drain_ack()
            elif w[_W_ACK_SEQ] & 1:
                raise self._peer_gone()  # died mid-update: the ack is torn

    def _drain_ack(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._ack_fd)

    def wait_ack(
        self,
        min_version: int,
        *,
        timeout: float | None = None,
        wake_fds: Sequence[int] = (),
    ) -> tuple[int, bytes] | None:
        """Wait until the ack version is >= ``min_version``; None on timeout or wake.

        Raises PeerDied (RingClosed) if the consumer is gone and the ack is older.
        """
        self._check_open()
        deadline = _deadline(timeout)
        while True:
            self._drain_ack()  # before reading, so a later update wakes the poll
            version, data = self.ack()
            if version >= min_version:
                return version, data
            ready = self._wait((self._ack_fd, self._peer_fd), wake_fds, deadline)
            if self._ack_fd in ready:
                continue
            if self._peer_fd in ready:
                version, data = self.ack()  # it may have acked just before it went
                if version >= min_version:
                    return version, data
                raise self._peer_gone()
            if ready or _expired(deadline):
                return None

    def close(self, *, timeout: float | None = None) -> None:
        """Write the end-of-stream marker (if the consumer is alive), then detach.

        Waits for 8 bytes of space up to ``timeout`` (None: as long as the consumer
        lives); if the marker cannot be written the consumer sees PeerDied instead
        of RingClosed once this process exits.
        """
        if self._map is None:
            return
        try:
            if self._gone is None and not self._peer_poll.poll(0):
                self._put(memoryview(b""), _F_EOS, _deadline(timeout), ())
        except RingClosed:
            pass
        finally:
            self._detach()

    def __enter__(self) -> RingProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RingConsumer(_Side):
    """The apply process's end: ``recv`` frames, publish acks."""

    _role = "consumer"
    _attached_word = _W_CONSUMER_ATTACHED

    def __init__(self, handles: Mapping[str, int | str]) -> None:
        super().__init__(handles)
        self._rpos = 0
        self._frames_received = 0
        self._partial: list[bytes] | None = None  # chunks of a frame being reassembled
        self._ended: RingClosed | None = None
        # fileno(): readable when recv() has something to say, data or the
        # producer's death (the data eventfd alone never reports the latter).
        self._epoll = select.epoll()
        self._epoll.register(self._data_fd, select.EPOLLIN)
        self._epoll.register(self._peer_fd, select.EPOLLIN)

    @classmethod
    def attach(cls, handles: Mapping[str, int | str]) -> RingConsumer:
        return cls(handles)

    def fileno(self) -> int:
        """An fd that polls readable when a record is published or the producer is gone.

        It is an epoll fd watching the data eventfd and the producer's lifeline
        (level-triggered): after it polls readable, ``recv(timeout=0)`` returns a
        frame, returns None (only part of a chunked frame so far), or raises.
        """
        self._check_open()
        return self._epoll.fileno()

    def recv(self, *, timeout: float | None = None, wake_fds: Sequence[int] = ()) -> bytes | None:
        """The next complete frame, blocking while the ring is empty.

        Returns None if ``timeout`` expired or a ``wake_fds`` fd became readable
        (checked only when blocking). Raises RingClosed after the last frame
        before the end-of-stream marker, PeerDied if the producer died (after
        every complete frame it published; a partly written frame is dropped).
        """
        if self._map is None:
            self._check_open()
        if self._ended is not None:
            raise self._ended
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            frame = self._take()
            if frame is not None:
                return frame
            ready = self._wait((self._data_fd, self._peer_fd), wake_fds, deadline)
            if self._data_fd in ready:
                continue
            if self._peer_fd in ready:
                # Every record it published was signalled before it died: take those
                # first; only then is an unfinished frame known to stay unfinished.
                frame = self._take()
                if frame is not None:
                    return frame
                self._partial = None
                self._ended = PeerDied("the ring producer process died")
                raise self._ended
            if ready or _expired(deadline):
                return None

    def _take(self) -> bytes | None:
        """Consume published records until a frame completes; None when they run out."""
        cap = self._capacity
        w = self._words
        while True:
            rpos = self._rpos
            if w[_W_WPOS] == rpos:
                # Nothing published: skip the eventfd read, whose failure costs more
                # than the poll() the caller does next. The header is only a hint;
                # the eventfd decides, and a poll() that saw it readable also makes
                # the producer's earlier store of the write position visible.
                return None
            try:
                os.eventfd_read(self._data_fd)  # semaphore: one published record
            except BlockingIOError:
                return None
            off = rpos % cap
            header = w[(_DATA_OFF + off) >> 3]
            freed = 0
            if header >> 32 == _F_PAD:
                freed = cap - off
                off = 0
                header = w[_DATA_OFF >> 3]
            flags = header >> 32
            n = header & _LEN_MASK
            if n > self._max_payload or flags & _F_INVALID:
                raise RuntimeError(f"ring {self._map and self._map.shm.name} is corrupt")
            start = _DATA_OFF + off + _HDR
            payload = bytes(self._buf[start : start + n])
            freed += _HDR + ((n + 7) & ~7)
            self._rpos = rpos = rpos + freed
            w[_W_RPOS] = rpos
            os.eventfd_write(self._space_fd, freed)  # after the copy: the bytes may go
            if flags & _F_EOS:
                self._partial = None
                self._ended = RingClosed("the ring producer closed the ring")
                raise self._ended
            if not flags & _F_CONT:
                # A new frame: chunks still buffered belong to a frame whose send()
                # gave up (timeout or wake fd) and are dropped.
                self._partial = None
                if not flags & _F_MORE:
                    self._frames_received = count = self._frames_received + 1
                    w[_W_FRAMES_RECV] = count
                    return payload
                self._partial = [payload]
            elif self._partial is not None:
                self._partial.append(payload)
                if not flags & _F_MORE:
                    parts, self._partial = self._partial, None
                    return self._complete(b"".join(parts))
            # else: the rest of a frame whose start was dropped; skip it

    def _complete(self, frame: bytes) -> bytes:
        self._frames_received += 1
        self._words[_W_FRAMES_RECV] = self._frames_received
        return frame

    def set_ack(self, data: bytes) -> None:
        """Publish ``data`` (<= ACK_MAX bytes) as the new ack and wake the producer."""
        self._check_open()
        if len(data) > ACK_MAX:
            raise ValueError(f"ack data is {len(data)} bytes, more than {ACK_MAX}")
        w = self._words
        seq = w[_W_ACK_SEQ]
        w[_W_ACK_SEQ] = seq + 1  # odd: update in progress
        self._buf[_ACK_DATA : _ACK_DATA + len(data)] = data
        w[_W_ACK_LEN] = len(data)
        w[_W_ACK_VERSION] = w[_W_ACK_VERSION] + 1
        w[_W_ACK_SEQ] = seq + 2
        os.eventfd_write(self._ack_fd, 1)

    def close(self) -> None:
        """Detach. The producer then gets RingClosed (not PeerDied) when it waits."""
        if self._map is None:
            return
        self._words[_W_CONSUMER_CLOSED] = 1
        self._detach()

    def _detach(self) -> None:
        epoll = getattr(self, "_epoll", None)  # absent if __init__ failed early
        if epoll is not None:
            epoll.close()
        super()._detach()

    def __enter__(self) -> RingConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
