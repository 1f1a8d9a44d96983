"""Online fault detection: per-rank monitors feeding an out-of-band aggregator.

Each rank runs a `Monitor`: a daemon thread that, every ``interval`` seconds,
reads the records loom.comms appended since its last read (plus the in-flight
ones that finished), and ships them as compact tuples with a heartbeat to the
aggregator.  The transport never touches the process group being watched:
a TCPStore queue (`StoreTransport` / `StoreAggregator`, torchrun and tests) or
a Ray actor (loom.launch wraps an `Aggregator` in one).

The `Aggregator` keeps a bounded window of records per rank, runs `detect`,
and publishes every new fault once: to callbacks, to ``faults.jsonl`` (and
per-step waits to ``waits.jsonl``) in its log directory, and - for a fatal
fault (hang, lost rank) - as the *verdict* that monitors can act on.
"""
from __future__ import annotations

import collections
import datetime
import json
import math
import os
import pickle
import socket
import threading
import time

import torch.distributed as dist

from loom.comms import CommRecord, TraceReader, trace

from .detect import DetectConfig, Fault, StepTable, analyse, edge_of, lost_ranks

INBOX = "loom/faults/inbox"
VERDICT = "loom/faults/verdict"
FAULTS_LOG = "faults.jsonl"
WAITS_LOG = "waits.jsonl"


# ------------------------------------------------------------------ rank side

def _encode(rec: CommRecord) -> tuple:
    return (rec.group, rec.seq, rec.op, rec.nbytes, rec.peer, rec.signature, rec.t_enter, rec.t_exit,
            rec.step)


class StoreTransport:
    """A rank's line to a `StoreAggregator` (a TCPStore queue)."""

    def __init__(self, host: str, port: int, timeout: float = 60.0):
        self.store = dist.TCPStore(host, int(port), is_master=False,
                                   timeout=datetime.timedelta(seconds=timeout))

    def send(self, payload: bytes) -> None:
        self.store.queue_push(INBOX, payload)

    def verdict(self) -> dict | None:
        if self.store.check([VERDICT]):
            return json.loads(self.store.get(VERDICT))
        return None


class Monitor:
    """Ships this rank's new records and a heartbeat every ``interval`` s.

    ``transport`` has ``send(bytes)`` and optionally ``verdict() -> dict|None``
    and ``flush()`` (wait until sent);
    a ``(host, port)`` pair means a `StoreTransport`.  ``on_fatal(fault)`` is
    called once, from the monitor thread, when the aggregator publishes a
    fatal fault (a hung rank cannot act on it itself, so the callback usually
    ends or releases the process)."""

    def __init__(self, transport, *, rank: int | None = None, interval: float = 0.1, on_fatal=None):
        if interval <= 0:
            raise ValueError(f"Monitor interval={interval} must be > 0")
        if isinstance(transport, tuple):
            transport = StoreTransport(*transport)
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        self.transport, self.rank, self.interval, self.on_fatal = transport, rank, interval, on_fatal
        self.fatal: Fault | None = None
        self._reader = TraceReader()
        self._groups_sent: set = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.shipped = 0
        self.cpu_s = 0.0  # CPU time the monitor thread has used (its cost to the rank)
        self._unsent: list[tuple] = []  # records read but not delivered (the transport failed)
        self._me = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname()}

    def start(self) -> "Monitor":
        if self._thread is None:
            self._ship()  # register (pid, host) before anything can go wrong
            self._thread = threading.Thread(target=self._loop, name=f"loom-monitor-{self.rank}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Ship what is left and say goodbye (a departed rank is not 'lost')."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        try:
            self._ship(bye=True)
            getattr(self.transport, "flush", lambda: None)()
        except Exception:
            pass  # the aggregator may already be gone at shutdown

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            t0 = time.thread_time()
            try:
                self._ship()
                self._check_verdict()
            except Exception:
                if self._stop.is_set():
                    return
                time.sleep(self.interval)  # aggregator briefly unreachable: keep trying
            self.cpu_s += time.thread_time() - t0

    def _ship(self, bye: bool = False) -> None:
        with self._lock:
            recs = self._reader.read()
            groups = {}
            for rec in recs:
                if rec.group not in self._groups_sent:
                    self._groups_sent.add(rec.group)
                    groups[rec.group] = rec.group_ranks
            self._unsent += [_encode(r) for r in recs]
            payload = {**self._me, "t": trace.clock(), "recs": self._unsent, "groups": groups,
                       "dropped": self._reader.dropped, "bye": bye}
            try:
                self.transport.send(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
            except Exception:
                self._groups_sent.difference_update(groups)  # send them again with the records
                raise
            self.shipped += len(self._unsent)
            self._unsent = []

    def _check_verdict(self) -> None:
        if self.on_fatal is None or self.fatal is not None:
            return
        verdict = getattr(self.transport, "verdict", lambda: None)()
        if verdict is not None:
            self.fatal = Fault.from_dict(verdict)
            self.on_fatal(self.fatal)


# ----------------------------------------------------------- aggregator side

def _pid_alive(pid: int) -> bool:
    """False once the process is gone or a zombie (killed, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


class Aggregator:
    """Collects the ranks' summaries, runs `detect`, publishes new faults.

    ``callbacks`` are called as ``cb(fault)`` for every new fault.  With
    ``log_dir``, faults go to ``faults.jsonl`` (one JSON object per line: the
    fault, ``t`` seconds since the aggregator started, ``time`` wall clock,
    ``seen_step`` the latest step any rank had reached) and per-step waits to
    ``waits.jsonl``; without it, the owner `drain`s those lines and writes them
    where it likes (`LogWriter`).  A rank is lost when its process is gone -
    checked directly on this host (``check_pids``), or reported by the owner
    (`mark_gone`) - or when it has been silent for ``lost_after_s``."""

    def __init__(self, world_size: int, config: DetectConfig | None = None, *, log_dir: str | None = None,
                 callbacks=(), window: int = 256, check_pids: bool = True, check_every_s: float = 0.1,
                 idle_check_s: float = 0.5, max_cpu: float = 0.02):
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        self.world_size, self.config = world_size, config or DetectConfig()
        self.callbacks, self.window, self.check_pids = list(callbacks), window, check_pids
        # the detectors run when reports arrive, at most every check_every_s and
        # spaced so that they use at most max_cpu of a core (their cost grows
        # with the window); every idle_check_s otherwise (a hang shows as time
        # passing, not as data)
        self.check_every_s, self.idle_check_s, self.max_cpu = check_every_s, idle_check_s, max_cpu
        self._gap = check_every_s
        self.windows: dict[int, collections.OrderedDict] = {r: collections.OrderedDict()
                                                            for r in range(world_size)}
        self.group_ranks: dict[int, dict] = {r: {} for r in range(world_size)}
        self.heard: dict[int, tuple[float, float]] = {}  # rank -> (its clock, our clock) at last message
        self.procs: dict[int, tuple[int, str]] = {}
        self.departed: set[int] = set()
        self.gone: set[int] = set()  # ranks whose process is known to have ended
        self.dropped: dict[int, int] = {}
        self.first_step: int | None = None
        self.faults: list[Fault] = []
        self.entries: list[dict] = []  # each fault as logged: with t, time, seen_step
        self.verdict: Fault | None = None
        self._published: set = set()
        self._dirty = False
        self._last_check = -math.inf
        self._last_tick = self._listening_since = time.monotonic()
        self._t0 = time.monotonic()
        self._host = socket.gethostname()
        self._waits_written = -1
        self._pending: dict[str, list] = {"faults": [], "waits": []}  # log lines not yet drained
        self._log = LogWriter(log_dir) if log_dir else None

    # -- input
    def ingest(self, payload, received_at: float | None = None) -> None:
        msg = pickle.loads(payload) if isinstance(payload, (bytes, bytearray)) else payload
        rank = int(msg["rank"])
        if not 0 <= rank < self.world_size:
            raise ValueError(f"summary from rank {rank}, outside 0..{self.world_size - 1}")
        self.heard[rank] = (msg["t"], time.monotonic() if received_at is None else received_at)
        self.procs[rank] = (msg["pid"], msg["host"])
        self.dropped[rank] = msg.get("dropped", 0)
        self.group_ranks[rank].update(msg.get("groups", {}))
        win = self.windows[rank]
        for group, seq, op, nbytes, peer, sig, t_enter, t_exit, step in msg["recs"]:
            rec = CommRecord(rank, group, tuple(self.group_ranks[rank].get(group, ())), seq, op, nbytes, peer,
                             sig, t_enter, t_exit, step)
            key = (group, edge_of(rec), seq)
            win[key] = rec
            win.move_to_end(key)
            if step is not None and (self.first_step is None or step < self.first_step):
                self.first_step = step
            self._dirty = True
        while len(win) > self.window:
            win.popitem(last=False)
        if msg.get("bye"):
            self.departed.add(rank)

    # -- analysis
    def snapshot(self) -> dict[int, list[CommRecord]]:
        return {r: list(w.values()) for r, w in self.windows.items() if w}

    def _liveness(self, now: float) -> tuple[dict, dict]:
        if now - self._last_tick > 1.0:
            # we were not listening (this process starved): silence only counts from now
            self._listening_since = now
        self._last_tick = now
        clocks, silent = {}, {}
        for rank, (t_rank, t_ours) in self.heard.items():
            clocks[rank] = t_rank + (now - t_ours)
            if rank in self.departed:
                continue
            silent[rank] = now - max(t_ours, self._listening_since)
            pid, host = self.procs[rank]
            if rank in self.gone or (self.check_pids and host == self._host and not _pid_alive(pid)):
                silent[rank] = math.inf
        for rank in self.gone - self.departed - set(self.heard):  # died before its first report
            silent[rank] = math.inf
        return clocks, silent

    def check(self, force: bool = False) -> list[Fault]:
        """Run the detectors when due (liveness every call); return the
        faults not published before, after publishing them."""
        now = time.monotonic()
        clocks, silent = self._liveness(now)
        since = now - self._last_check
        if force or since >= (self._gap if self._dirty else max(self._gap, self.idle_check_s)):
            self._dirty, self._last_check = False, now
            faults, table = analyse(self.snapshot(), config=self.config, now=clocks, silent=silent,
                                    first_step=self.first_step, ranks=range(self.world_size))
            self._record_waits(table)
            self._gap = max(self.check_every_s, (time.monotonic() - now) / self.max_cpu)
        else:  # between analyses only liveness can change
            newest = {r: next(reversed(w.values())).step for r, w in self.windows.items() if w}
            faults = lost_ranks(silent, self.config, {r: s for r, s in newest.items() if s is not None})
        return self._publish(faults, now)

    def _publish(self, faults: list[Fault], now: float) -> list[Fault]:
        new = []
        for fault in faults:
            if fault.key in self._published:
                continue
            self._published.add(fault.key)
            self.faults.append(fault)
            new.append(fault)
            if fault.fatal and self.verdict is None:
                self.verdict = fault
            entry = {**fault.to_dict(), "t": round(now - self._t0, 3),
                     "time": datetime.datetime.now().isoformat(timespec="milliseconds"),
                     "seen_step": self.latest_step()}
            self.entries.append(entry)
            self._pending["faults"].append(entry)
            for cb in self.callbacks:
                cb(fault)
        if self._log is not None:
            self._log.write(self.drain())
        return new

    def drain(self) -> dict[str, list]:
        """The log lines (``faults``, ``waits``) produced since the last drain
        (when the aggregator writes no log itself, its owner writes them)."""
        out, self._pending = self._pending, {"faults": [], "waits": []}
        return out

    def latest_step(self) -> int | None:
        """The latest step any rank has reported (its newest record's)."""
        newest = [next(reversed(w.values())).step for w in self.windows.values() if w]
        steps = [s for s in newest if s is not None]
        return max(steps) if steps else None

    def _record_waits(self, table: StepTable) -> None:
        for u in table.complete:
            if u > self._waits_written:
                self._pending["waits"].append({"step": u, "wait_s": table.wait[u], "step_s": table.step_time[u]})
                self._waits_written = u

    def mark_gone(self, rank: int) -> None:
        """The owner learned that ``rank``'s process ended (e.g. Ray saw its
        actor die): it is lost at the next check unless it said goodbye."""
        self.gone.add(rank)

    def all_departed(self) -> bool:
        return len(self.departed) == self.world_size

    def close(self) -> None:
        if self._log is not None:
            self._log.write(self.drain())
            self._log.close()
            self._log = None


class LogWriter:
    """Appends an aggregator's log lines to ``faults.jsonl`` and ``waits.jsonl``."""

    def __init__(self, log_dir: str):
        os.makedirs(log_dir, exist_ok=True)
        self.files = {"faults": open(os.path.join(log_dir, FAULTS_LOG), "a", buffering=1),
                      "waits": open(os.path.join(log_dir, WAITS_LOG), "a", buffering=1)}

    def write(self, lines: dict[str, list]) -> None:
        for name, rows in lines.items():
            for row in rows:
                self.files[name].write(json.dumps(row) + "\n")

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()


class StoreAggregator:
    """An `Aggregator` fed through a TCPStore queue, in a thread of this process.

    It hosts its own TCPStore (never the process group's): ranks connect
    `Monitor`s to ``address``.  A fatal fault is published under the verdict
    key, where the monitors see it."""

    def __init__(self, world_size: int, config: DetectConfig | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, log_dir: str | None = None, callbacks=(), interval: float = 0.05,
                 window: int = 256, check_pids: bool = True):
        self._make = lambda: Aggregator(world_size, config, log_dir=log_dir, callbacks=callbacks,
                                        window=window, check_pids=check_pids)
        self.aggregator = self._make()
        self._lock = threading.Lock()
        self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=60))
        self.address = (host, self.store.port)
        self.interval = interval
        self.detected_at: dict[tuple, float] = {}  # fault key -> time.monotonic() when published
        self.cpu_s = 0.0  # CPU time the aggregator thread has used
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loom-fault-aggregator", daemon=True)
        self.error: BaseException | None = None

    @property
    def faults(self) -> list[Fault]:
        return list(self.aggregator.faults)

    @property
    def verdict(self) -> Fault | None:
        return self.aggregator.verdict

    def start(self) -> "StoreAggregator":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        with self._lock:
            self._step(force=True)  # last words
            self.aggregator.close()

    def reset(self) -> tuple[Aggregator, dict]:
        """Start over for a new job on the same address (the monitors of the
        old one must have stopped).  Returns the old aggregator, with
        everything it received analysed, and its ``detected_at``."""
        with self._lock:
            self._step(force=True)
            old, detected = self.aggregator, self.detected_at
            old.close()
            self.aggregator, self.detected_at = self._make(), {}
            self.store.delete_key(VERDICT)
        return old, detected

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _poll(self) -> None:
        for _ in range(self.store.queue_len(INBOX)):
            self.aggregator.ingest(self.store.queue_pop(INBOX, False))

    def _step(self, force: bool = False) -> None:
        self._poll()
        for fault in self.aggregator.check(force=force):
            self.detected_at[fault.key] = time.monotonic()
            if fault is self.aggregator.verdict:
                self.store.set(VERDICT, json.dumps(fault.to_dict()))
        self.aggregator.drain()  # logged already if it has a log_dir; nobody else reads them

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                t0 = time.thread_time()
                with self._lock:
                    self._step()
                self.cpu_s += time.thread_time() - t0
        except BaseException as exc:  # noqa: BLE001 - kept for the owner to inspect
            self.error = exc
            raise
