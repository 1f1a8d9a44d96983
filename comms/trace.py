"""The per-process record of every message loom sends.

Each traced op appends one entry to a bounded ring buffer when it starts
(``t_exit`` stays None while it is in flight, so a hang is visible) and stamps
``t_exit`` when it completes.  The fault detectors read these records; they
compare per-rank durations, never clocks across hosts.

The hot path stores a plain list per op (cheap to build, mutable for the exit
stamp); `records()` turns them into `CommRecord`s when someone reads them.
Ops on one group are issued from one thread (as torch.distributed requires),
so the sequence counters need no lock.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import time
from dataclasses import dataclass

DEFAULT_CAPACITY = 65536


@dataclass(slots=True)
class CommRecord:
    rank: int
    group: str
    group_ranks: tuple[int, ...]
    seq: int
    op: str
    nbytes: int
    peer: int | None = None
    signature: tuple = ()
    t_enter: float = 0.0
    t_exit: float | None = None
    step: int | None = None

    @property
    def duration(self) -> float | None:
        return None if self.t_exit is None else self.t_exit - self.t_enter


# entry layout: [rank, group, group_ranks, seq, op, nbytes, peer, dtype, shape, t_enter, t_exit, step, index]
# ``index`` counts entries since the last reset, so a `TraceReader` can find
# what is new without scanning the buffer.
_T_EXIT = 10
_INDEX = 12
_buffer: collections.deque = collections.deque(maxlen=DEFAULT_CAPACITY)
_seqs: dict = {}
_state = {"step": None, "generation": 0}
_counter = itertools.count()
_clock = time.perf_counter  # monotonic, high resolution


def open_record(rank, group, group_ranks, op, nbytes, dtype=None, shape=(), peer=None, channel=None) -> list:
    """Append an in-flight entry; ``channel`` keys the sequence counter
    (defaults to the group name; point-to-point uses the directed edge)."""
    key = group if channel is None else channel
    seq = _seqs.get(key, 0)
    _seqs[key] = seq + 1
    entry = [rank, group, group_ranks, seq, op, nbytes, peer, dtype, shape, _clock(), None, _state["step"],
             next(_counter)]
    _buffer.append(entry)
    return entry


def close_record(entry: list) -> None:
    entry[_T_EXIT] = _clock()


WAIT_PREFIX = "wait:"  # the op of a record that says "this thread waits for background work"


def is_wait(rec: CommRecord) -> bool:
    """Whether ``rec`` is a `background_wait` record (not a message)."""
    return rec.op.startswith(WAIT_PREFIX)


@contextlib.contextmanager
def background_wait(group, what: str):
    """Record that this thread waits for the work of background ``group``
    (made with ``new_group(..., background=True)``, e.g. a checkpoint's):
    an in-flight record with op ``wait:<what>`` on that group for as long as
    the block runs.  It is not a message (no peer enters it; its sequence
    numbers are its own), so the fault detectors can tell a rank that is busy
    with background work from a hung one.  Raises ValueError if ``group`` is
    not a background group."""
    from .ops import _info, is_background
    _, (name, ranks, rank) = _info(group)
    if not is_background(name):
        raise ValueError(f"background_wait: group {name!r} was not made with new_group(..., background=True)")
    entry = open_record(rank, name, ranks, WAIT_PREFIX + what, 0, channel=(WAIT_PREFIX, name))
    try:
        yield
    finally:
        close_record(entry)


def _to_record(e: list) -> CommRecord:
    sig = () if e[7] is None else (str(e[7]), tuple(e[8]))
    return CommRecord(e[0], e[1], e[2], e[3], e[4], e[5], e[6], sig, e[9], e[10], e[11])


def records(clear: bool = False) -> list[CommRecord]:
    """A snapshot of this process's records, oldest first."""
    entries = list(_buffer)
    if clear:
        _buffer.clear()
    return [_to_record(e) for e in entries]


def reset_trace(capacity: int | None = None) -> None:
    """Forget records and sequence counters (a new process group starts at seq 0)."""
    global _buffer, _counter
    _buffer = collections.deque(maxlen=capacity or _buffer.maxlen)
    _counter = itertools.count()
    _seqs.clear()
    _state["step"] = None
    _state["generation"] += 1


def set_step(step: int | None) -> None:
    """Tag the records that follow with a training step (for per-step reports)."""
    _state["step"] = step


def current_step() -> int | None:
    return _state["step"]


def clock() -> float:
    """This process's trace clock (the one ``t_enter``/``t_exit`` use)."""
    return _clock()


class TraceReader:
    """Reads this process's records incrementally (the fault monitor's view).

    Each `read` returns the records appended since the previous read plus the
    ones that were still in flight then and have completed since; a record
    still in flight is returned with ``t_exit=None`` and again once it closes.
    Nothing is added to the hot path: new entries are found by their index,
    and only the few in-flight entries are remembered between reads.
    ``dropped`` counts entries the ring buffer evicted before they were read.
    """

    def __init__(self):
        self._generation = _state["generation"]
        self._next = 0          # index of the first entry not read yet
        self._open: list = []   # entries read while in flight
        self.dropped = 0

    def read(self) -> list[CommRecord]:
        if self._generation != _state["generation"]:  # reset_trace: start over
            self._generation, self._next, self._open = _state["generation"], 0, []
        out, still_open = [], []
        for old in (True, False):
            for e in (self._open if old else self._new_entries()):
                rec = _to_record(e)  # reads t_exit once: the owner thread may be closing it now
                if rec.t_exit is None:
                    still_open.append(e)
                if rec.t_exit is not None or not old:
                    out.append(rec)
        self._open = still_open
        return out

    def _new_entries(self) -> list:
        buf = _buffer
        want = 64
        while True:
            tail = _newest(buf, want)
            if not tail or tail[0][_INDEX] < self._next:
                return []
            if tail[-1][_INDEX] <= self._next or len(tail) < want:
                break
            want = tail[0][_INDEX] - self._next + 64
        tail.reverse()
        first = tail[0][_INDEX]
        if first > self._next:  # evicted before we saw them
            self.dropped += first - self._next
        new = [e for e in tail if e[_INDEX] >= self._next]
        self._next = new[-1][_INDEX] + 1
        return new


def _newest(buf: collections.deque, n: int) -> list:
    """The ``n`` newest entries, newest first.  The copy runs in C, but a
    garbage-collection pass inside it can let the owner thread append, which
    the deque reports; then copy again (appends are microseconds apart)."""
    for _ in range(1000):
        try:
            return list(itertools.islice(reversed(buf), n))
        except RuntimeError:  # "deque mutated during iteration"
            continue
    raise RuntimeError("TraceReader: could not copy the trace while it was being written")
