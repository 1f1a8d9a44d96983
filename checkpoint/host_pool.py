"""A preallocated arena of host memory for checkpoint snapshots.

Each save reserves one contiguous region and gives it back once its chunks
are on storage.  Saves finish in the order they started, so regions come
back in the order they were handed out and a ring allocator is enough: the
only waste is the unused tail when a region does not fit before the end.
When the arena is full, `reserve` waits (backpressure) instead of
allocating: the arena is the only host memory snapshots ever use.

The arena is pinned when the tensors live on CUDA (fast, truly asynchronous
device-to-host copies), and a named shared-memory segment when a separate
writer process must read it (a file in /dev/shm that both map).
"""
from __future__ import annotations

import collections
import os
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass

import torch

ALIGN = 64  # every piece starts on a cache line (and any dtype's alignment)


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class PoolClosed(RuntimeError):
    """The pool was closed while a reservation was waiting."""


@dataclass
class Region:
    """Bytes ``[start, start + nbytes)`` of the arena."""
    start: int
    nbytes: int
    free: bool = False


class HostBufferPool:
    """``capacity`` bytes of host memory, handed out as FIFO regions."""

    def __init__(self, capacity: int, *, pin: bool = False, shared: bool = False):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"host buffer capacity {capacity!r} must be a positive number of bytes")
        self.capacity = aligned(capacity)
        self.pinned, self.shared = pin, shared
        self.path = None
        if shared:
            self.path = _shared_file(self.capacity)
            # the file goes when the pool is closed, collected, or the interpreter exits
            self._unlink = weakref.finalize(self, _remove, self.path)
            self.arena = torch.from_file(self.path, shared=True, size=self.capacity, dtype=torch.uint8)
        else:
            self.arena = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=pin)
        self._live: collections.deque[Region] = collections.deque()
        self._head = 0
        self._cond = threading.Condition()
        self._closed = False
        self.high_water = 0  # most bytes ever reserved at once
        self.waited_s = 0.0  # total time reservations waited for space
        self.waits = 0       # reservations that had to wait (backpressure)

    @property
    def used(self) -> int:
        with self._cond:
            return sum(r.nbytes for r in self._live)

    def _place(self, nbytes: int) -> int | None:
        """Where a region of ``nbytes`` fits now, or None."""
        if not self._live:
            return 0
        tail = self._live[0].start
        if self._head > tail:  # live bytes are [tail, head): room after head, or before tail
            if self.capacity - self._head >= nbytes:
                return self._head
            return 0 if tail >= nbytes else None
        # wrapped: live bytes are [tail, end) and [0, head); room only between (none if equal)
        return self._head if tail - self._head >= nbytes else None

    def reserve(self, nbytes: int, timeout: float | None = None) -> Region:
        """A region of ``nbytes`` (rounded up to the alignment); waits while
        the arena is full.  Raises ValueError if it can never fit."""
        nbytes = aligned(nbytes)
        if nbytes > self.capacity:
            raise ValueError(f"a snapshot of {nbytes} bytes does not fit in the host buffer pool of "
                             f"{self.capacity} bytes; pass host_buffer_bytes >= {nbytes}")
        if nbytes == 0:
            return Region(0, 0)
        deadline = None if timeout is None else time.monotonic() + timeout
        t0, waited = time.monotonic(), False
        with self._cond:
            while True:
                if self._closed:
                    raise PoolClosed("the host buffer pool was closed")
                start = self._place(nbytes)
                if start is not None:
                    break
                if not waited:
                    waited = True
                    self.waits += 1
                    self._cond.notify_all()  # for whoever watches the backpressure
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no room for {nbytes} bytes in the host buffer pool "
                                       f"after {timeout} s")
                self._cond.wait(left)
            region = Region(start, nbytes)
            self._live.append(region)
            self._head = start + nbytes
            self.high_water = max(self.high_water, sum(r.nbytes for r in self._live))
            self.waited_s += time.monotonic() - t0
            return region

    def release(self, region: Region) -> None:
        if region.nbytes == 0 or region.free:
            return
        with self._cond:
            region.free = True
            while self._live and self._live[0].free:
                self._live.popleft()
            if not self._live:
                self._head = 0
            self._cond.notify_all()

    def view(self, region: Region, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of the arena at ``offset`` inside ``region`` (uint8)."""
        if offset + nbytes > region.nbytes:
            raise ValueError(f"piece [{offset}, {offset + nbytes}) lies outside a region of {region.nbytes} bytes")
        return self.arena[region.start + offset:region.start + offset + nbytes]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.arena = None
        if self.path is not None:
            self._unlink()
            self.path = None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _shared_file(nbytes: int) -> str:
    """A fresh file of ``nbytes`` in shared memory (/dev/shm when there is
    one) that another process can map by name."""
    where = tempfile.gettempdir()
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize >= 2 * nbytes:  # a small /dev/shm would SIGBUS when touched
            where = "/dev/shm"
    fd, path = tempfile.mkstemp(prefix="loom-ckpt-pool-", dir=where)
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)
    return path
