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


# entry layout: [rank, group, group_ranks, seq, op, nbytes, peer, dtype, shape, t_enter, t_exit, step]
_T_EXIT = 10
_buffer: collections.deque = collections.deque(maxlen=DEFAULT_CAPACITY)
_seqs: dict = {}
_state = {"step": None}
_clock = time.perf_counter  # monotonic, high resolution


def open_record(rank, group, group_ranks, op, nbytes, dtype=None, shape=(), peer=None, channel=None) -> list:
    """Append an in-flight entry; ``channel`` keys the sequence counter
    (defaults to the group name; point-to-point uses the directed edge)."""
    key = group if channel is None else channel
    seq = _seqs.get(key, 0)
    _seqs[key] = seq + 1
    entry = [rank, group, group_ranks, seq, op, nbytes, peer, dtype, shape, _clock(), None, _state["step"]]
    _buffer.append(entry)
    return entry


def close_record(entry: list) -> None:
    entry[_T_EXIT] = _clock()


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
    global _buffer
    _buffer = collections.deque(maxlen=capacity or _buffer.maxlen)
    _seqs.clear()
    _state["step"] = None


def set_step(step: int | None) -> None:
    """Tag the records that follow with a training step (for per-step reports)."""
    _state["step"] = step


def current_step() -> int | None:
    return _state["step"]
