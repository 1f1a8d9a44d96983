"""The per-process record of every message loom sends.

Each traced op appends one `CommRecord` to a bounded ring buffer when it
starts (``t_exit`` is None while it is in flight, so a hang is visible) and
stamps ``t_exit`` when it completes.  The fault detectors read these records;
they compare per-rank durations, never clocks across hosts.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

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


@dataclass
class _Recorder:
    capacity: int = DEFAULT_CAPACITY
    buffer: collections.deque = field(default_factory=collections.deque)
    seqs: dict = field(default_factory=dict)
    step: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.buffer = collections.deque(maxlen=self.capacity)


_recorder = _Recorder()
_clock = time.perf_counter  # monotonic, high resolution


def open_record(rank, group, group_ranks, op, nbytes, signature, peer=None, channel=None) -> CommRecord:
    """Append an in-flight record; ``channel`` keys the sequence counter
    (defaults to the group name; point-to-point uses the directed edge)."""
    key = group if channel is None else channel
    with _recorder.lock:
        seq = _recorder.seqs.get(key, 0)
        _recorder.seqs[key] = seq + 1
        rec = CommRecord(rank, group, group_ranks, seq, op, nbytes, peer, signature,
                         _clock(), None, _recorder.step)
        _recorder.buffer.append(rec)
    return rec


def close_record(rec: CommRecord) -> None:
    rec.t_exit = _clock()


def records(clear: bool = False) -> list[CommRecord]:
    """A snapshot of this process's records, oldest first."""
    with _recorder.lock:
        out = list(_recorder.buffer)
        if clear:
            _recorder.buffer.clear()
    return out


def reset_trace(capacity: int | None = None) -> None:
    """Forget records and sequence counters (a new process group starts at seq 0)."""
    with _recorder.lock:
        if capacity is not None:
            _recorder.capacity = capacity
        _recorder.buffer = collections.deque(maxlen=_recorder.capacity)
        _recorder.seqs.clear()
        _recorder.step = None


def set_step(step: int | None) -> None:
    """Tag the records that follow with a training step (for per-step reports)."""
    _recorder.step = step


def current_step() -> int | None:
    return _recorder.step
