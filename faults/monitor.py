"""Online fault detection: per-rank monitors feeding an out-of-band aggregator.

Each rank runs a `Monitor`: a daemon thread that, every ``interval`` seconds,
reads the records loom.comms appended since its last read (plus the in-flight
ones that finished), and ships them as compact tuples with a heartbeat to the
aggregator.  The transport never touches the process group being watched:
loom's own small TCP listener (`StoreTransport` / `StoreAggregator`, torchrun
and tests) or a Ray actor (loom.launch wraps an `Aggregator` in one).

Reports are JSON, checked field by field on arrival, and every message is
authenticated with an HMAC under the job's secret (see `loom.faults.wire`):
a peer without the secret can neither report nor forge a verdict, and nothing
received is unpickled or executed.

The `Aggregator` keeps a bounded window of records per rank, runs `detect`,
and publishes every new fault once: to callbacks, to ``faults.jsonl`` (and
per-step waits to ``waits.jsonl``) in its log directory, and - for a fatal
fault (hang, lost rank) - as the *verdict* that monitors can act on.
"""
from __future__ import annotations

import collections
import datetime
import json
import logging
import math
import os
import selectors
import socket
import threading
import time

from loom.comms import CommRecord, TraceReader, is_background, trace
from loom.comms.trace import is_wait

from . import wire
from .detect import DetectConfig, Fault, StepTable, analyse, edge_of, lost_ranks

FAULTS_LOG = "faults.jsonl"
WAITS_LOG = "waits.jsonl"

_log = logging.getLogger("loom.faults")


# ------------------------------------------------------------------ rank side

def _encode(rec: CommRecord) -> list:
    sig = [rec.signature[0], list(rec.signature[1])] if rec.signature else []
    return [rec.group, rec.seq, rec.op, rec.nbytes, rec.peer, sig, rec.t_enter, rec.t_exit, rec.step]


class StoreTransport:
    """A rank's line to a `StoreAggregator`: one TCP connection to ``(host,
    port)``, over which each report is a frame sealed with the job's
    ``secret`` and answered by a sealed reply carrying the current verdict.

    ``timeout`` bounds the wait for the aggregator to accept the first
    connection (later reconnections are tried once per report);
    ``reply_timeout`` the wait for each reply.  Raises ValueError/TypeError
    for a missing or short secret, ConnectionError when the aggregator cannot
    be reached within ``timeout``.  A reply whose MAC does not verify (a
    forged verdict) is ignored and counted in ``rejected``."""

    def __init__(self, host: str, port: int, timeout: float = 60.0, *, secret: bytes | None = None,
                 max_frame: int = wire.MAX_FRAME, reply_timeout: float = 10.0):
        if secret is None:
            raise ValueError("StoreTransport needs the job's secret (secret=..., the StoreAggregator's "
                             ".secret): the aggregator ignores unauthenticated reports")
        self.secret = wire.check_secret(secret)
        self.address = (host, int(port))
        self.max_frame, self.reply_timeout = max_frame, reply_timeout
        self.rejected = 0
        self._verdict: dict | None = None
        self._sock: socket.socket | None = self._connect(timeout)

    def _connect(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection(self.address, timeout=max(0.5, min(5.0, timeout)))
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"fault aggregator at {self.address[0]}:{self.address[1]} is "
                                          f"unreachable: {exc}") from None
                time.sleep(0.1)
                continue
            sock.settimeout(self.reply_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock

    def send(self, payload: bytes) -> None:
        """Deliver one report and read the aggregator's reply.  Raises
        ValueError if the sealed report exceeds ``max_frame``, OSError (e.g.
        ConnectionError) if the aggregator is unreachable."""
        sealed = wire.seal(self.secret, wire.REPORT, payload)
        if len(sealed) > self.max_frame:
            raise ValueError(f"a report of {len(sealed)} bytes exceeds the frame limit of {self.max_frame}")
        if self._sock is None:
            self._sock = self._connect(0.0)
        try:
            self._sock.sendall(wire.frame(sealed))
            reply = wire.read_frame(self._sock, self.max_frame)
        except (OSError, ValueError):
            self.close()
            raise
        self._on_reply(reply, sealed[:wire.MAC_BYTES])

    def _on_reply(self, reply: bytes, request_mac: bytes) -> None:
        body = wire.unseal(self.secret, wire.REPLY, reply)
        try:
            if body is None:
                raise ValueError("its MAC does not verify under the job's secret")
            msg = wire.loads(body)
            if not isinstance(msg, dict) or msg.get("re") != request_mac.hex():
                raise ValueError("it does not answer the report just sent")
            verdict = msg.get("verdict")
            if verdict is not None and not (isinstance(verdict, dict) and Fault.from_dict(verdict).fatal):
                raise ValueError(f"its verdict {str(verdict)[:80]!r} is not a fatal fault")
        except (ValueError, TypeError) as exc:
            self.rejected += 1
            _log.warning("fault monitor: ignored a reply from %s:%d: %s", *self.address, exc)
            return
        if verdict is not None and self._verdict is None:
            self._verdict = verdict

    def verdict(self) -> dict | None:
        """The fatal fault the aggregator posted (as a dict), once it has."""
        return self._verdict

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Monitor:
    """Ships this rank's new records and a heartbeat every ``interval`` s.

    ``transport`` has ``send(bytes)`` and optionally ``verdict() -> dict|None``
    and ``flush()`` (wait until sent); a ``(host, port)`` pair means a
    `StoreTransport` to that address, authenticated with ``secret`` (bytes,
    required then: the `StoreAggregator`'s ``secret``).  ``on_fatal(fault)``
    is called once, from the monitor thread, when the aggregator publishes a
    fatal fault (a hung rank cannot act on it itself, so the callback usually
    ends or releases the process).

    Each report is JSON (`loom.faults.wire.parse_report` describes it) and
    says which of the rank's groups are background ones
    (`loom.comms.is_background`).  A report holds at most ``max_records``
    records and fits the transport's frame limit (a backlog goes out over
    several); at most ``max_backlog`` undelivered records are kept while the
    aggregator is unreachable (the oldest are dropped and counted).
    Raises ValueError for ``interval <= 0`` or a missing secret."""

    def __init__(self, transport, *, rank: int | None = None, interval: float = 0.1, on_fatal=None,
                 secret: bytes | None = None, max_records: int = 4096, max_backlog: int = 65536):
        if interval <= 0:
            raise ValueError(f"Monitor interval={interval} must be > 0")
        if max_records < 1 or max_backlog < max_records:
            raise ValueError(f"Monitor: need 1 <= max_records={max_records} <= max_backlog={max_backlog}")
        self._owns_transport = isinstance(transport, tuple)
        if self._owns_transport:
            if len(transport) != 2:
                raise ValueError(f"Monitor: an address is (host, port), not {transport!r}")
            transport = StoreTransport(*transport, secret=secret)
        if rank is None:
            import torch.distributed as dist
            rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        self.transport, self.rank, self.interval, self.on_fatal = transport, rank, interval, on_fatal
        self.max_records, self.max_backlog = max_records, max_backlog
        self.fatal: Fault | None = None
        self._reader = TraceReader()
        self._groups_seen: set = set()
        self._undeclared: dict[str, tuple] = {}  # groups seen but not yet delivered: name -> (ranks, background)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.shipped = 0
        self.lost = 0  # records dropped from an undeliverable backlog
        self.cpu_s = 0.0  # CPU time the monitor thread has used (its cost to the rank)
        self._unsent: list[list] = []  # records read but not delivered (the transport failed)
        self._me = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname()}

    def start(self) -> "Monitor":
        if self._thread is None:
            self._ship()  # register (pid, host) before anything can go wrong ...
            getattr(self.transport, "flush", lambda: None)()  # ... and wait until it has arrived
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
        if self._owns_transport:
            self.transport.close()

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
            for rec in self._reader.read():
                if rec.group not in self._groups_seen:
                    self._groups_seen.add(rec.group)
                    self._undeclared[rec.group] = (rec.group_ranks, is_background(rec.group))
                self._unsent.append(_encode(rec))
            excess = len(self._unsent) - self.max_backlog
            if excess > 0:
                del self._unsent[:excess]
                self.lost += excess
            limit = getattr(self.transport, "max_frame", wire.MAX_FRAME) - wire.MAC_BYTES
            while True:  # a heartbeat even when there is nothing new; a backlog in several reports
                n = min(len(self._unsent), self.max_records)
                body = self._report(n, bye)
                while len(body) > limit and n > 1:
                    n //= 2
                    body = self._report(n, bye)
                if len(body) > limit:
                    if n == 0:
                        raise ValueError(f"rank {self.rank}: its group declarations alone ({len(body)} bytes) "
                                         f"exceed the frame limit of {limit} bytes")
                    del self._unsent[0]  # one record over the limit on its own
                    self.lost += 1
                    continue
                self.transport.send(body)
                self._undeclared.clear()
                del self._unsent[:n]
                self.shipped += n
                if not self._unsent:
                    return

    def _report(self, n: int, bye: bool) -> bytes:
        return wire.encode_report({
            **self._me, "t": trace.clock(), "recs": self._unsent[:n],
            "groups": {g: list(ranks) for g, (ranks, _) in self._undeclared.items()},
            "background": [g for g, (_, bg) in self._undeclared.items() if bg],
            "dropped": self._reader.dropped + self.lost, "bye": bye and n == len(self._unsent)})

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
    (`mark_gone`) - or when it has been silent for ``lost_after_s``.
    Groups any rank reported as background (``background``) are judged apart:
    a stuck operation there is a non-fatal ``background_stall``.
    Memory is bounded: ``window`` records and `wire.MAX_GROUPS` groups per rank
    (a full window lets its oldest *finished* records go first, so an
    operation in flight stays visible however much training goes on beside it)."""

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
        self._names: dict[str, str] = {}  # group name -> the one string object kept for it
        self.background: set[str] = set()  # groups whose work runs beside training (judged apart)
        self.rejected: collections.Counter = collections.Counter()  # refused inputs by kind
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
    def ingest(self, payload, received_at: float | None = None) -> bool:
        """Take one rank's report: JSON bytes (as a `Monitor` sends them) or the
        decoded dict.  Every field is checked (`loom.faults.wire.parse_report`;
        a record's group must have been declared by that rank); a malformed
        report changes nothing, is counted in ``rejected["malformed"]`` and
        logged, and ``False`` is returned.  Never raises for bad input."""
        try:
            msg = wire.parse_report(payload, self.world_size)
            rank = msg["rank"]
            known, declared = self.group_ranks[rank], msg["groups"]
            if len(known.keys() | declared.keys()) > wire.MAX_GROUPS:
                raise ValueError(f"rank {rank} declared more than {wire.MAX_GROUPS} groups")
            for name in msg["background"]:
                if name not in known and name not in declared:
                    raise ValueError(f"rank {rank}: background group {name[:80]!r} was never declared")
            for i, rec in enumerate(msg["recs"]):
                if rec[0] not in known and rec[0] not in declared:
                    raise ValueError(f"rank {rank}: recs[{i}] is in group {rec[0][:80]!r}, which it never "
                                     f"declared")
        except ValueError as exc:
            self.reject("malformed", f"dropped a malformed report: {exc}")
            return False
        self.heard[rank] = (msg["t"], time.monotonic() if received_at is None else received_at)
        self.procs[rank] = (msg["pid"], msg["host"])
        self.dropped[rank] = msg["dropped"]
        for name, members in declared.items():
            known[self._names.setdefault(name, name)] = members
        self.background.update(self._names[name] for name in msg["background"])
        win = self.windows[rank]
        for group, seq, op, nbytes, peer, sig, t_enter, t_exit, step in msg["recs"]:
            group = self._names[group]  # one string per group, however many records name it
            rec = CommRecord(rank, group, known[group], seq, op, nbytes, peer, sig, t_enter, t_exit, step)
            key = (group, "wait" if is_wait(rec) else edge_of(rec), seq)  # waits count apart from messages
            win[key] = rec
            win.move_to_end(key)
            if step is not None and (self.first_step is None or step < self.first_step):
                self.first_step = step
            self._dirty = True
        if len(win) > self.window:  # the oldest finished records go; ops in flight stay while they can
            done = [k for k, rec in win.items() if rec.t_exit is not None][:len(win) - self.window]
            for key in done:
                del win[key]
            while len(win) > self.window:  # (all in flight)
                win.popitem(last=False)
        if msg["bye"]:
            self.departed.add(rank)
        return True

    def reject(self, kind: str, why: str) -> None:
        """Count a refused input under ``kind`` (``auth``, ``malformed``,
        ``oversize``, ...) and log it (the first few of each kind, then every
        1000th)."""
        self.rejected[kind] += 1
        n = self.rejected[kind]
        if n <= 5 or n % 1000 == 0:
            _log.warning("fault aggregator: %s (%s #%d)", why, kind, n)

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
                                    first_step=self.first_step, ranks=range(self.world_size),
                                    background=self.background)
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


class _Conn:
    """One peer of a `_Listener`: bytes in and out, and whether it has proved
    it holds the secret (sent a frame whose MAC verifies)."""

    __slots__ = ("sock", "inbox", "outbox", "trusted", "opened", "last")

    def __init__(self, sock: socket.socket, now: float):
        self.sock, self.inbox, self.outbox = sock, bytearray(), bytearray()
        self.trusted, self.opened, self.last = False, now, now


class _Listener:
    """loom's small TCP server for fault reports (the `StoreAggregator`'s).

    It listens on ``(host, port)`` only - the address the job was given, not
    every interface - and reads length-prefixed frames without blocking
    (`selectors`).  A frame must carry a valid MAC under ``secret``; its body
    goes to ``handle(body) -> dict`` and the dict comes back, sealed, as the
    reply (with ``re``: the report's MAC, so a reply cannot be replayed for
    another report).  Refused input is counted through ``reject(kind, why)``:
    ``auth`` (missing or wrong MAC: ignored), ``oversize`` (a frame longer
    than ``max_frame``: connection closed), ``refused`` (every slot held by
    peers that proved the secret), ``evicted``/``timeout`` (a peer that never
    proved it within ``auth_timeout`` s, or was the oldest such when more
    than ``max_untrusted`` were waiting).  Memory per peer is bounded by
    ``max_frame``; peers by ``max_connections``."""

    def __init__(self, host: str, port: int, secret: bytes, handle, reject, *, max_frame: int,
                 max_connections: int, max_untrusted: int = 8, auth_timeout: float = 10.0,
                 idle_timeout: float = 600.0):
        self.secret, self.handle, self.reject = secret, handle, reject
        self.max_frame, self.max_connections, self.max_untrusted = max_frame, max_connections, max_untrusted
        self.auth_timeout, self.idle_timeout = auth_timeout, idle_timeout
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as exc:
            raise ValueError(f"fault aggregator: cannot resolve host {host!r}: {exc}") from None
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind(sockaddr)
        except OSError as exc:
            self.sock.close()
            raise OSError(exc.errno, f"fault aggregator: cannot listen on {host}:{port}: {exc.strerror}") from None
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.conns: dict[socket.socket, _Conn] = {}

    def wait(self, timeout: float) -> list:
        return self.sel.select(timeout)

    def serve(self, events) -> None:
        """Handle what ``wait`` returned, then close peers past their time."""
        for key, mask in events:
            if key.data is None:
                self._accept()
                continue
            conn = key.data
            if mask & selectors.EVENT_READ:
                self._read(conn)
            if mask & selectors.EVENT_WRITE and conn.sock in self.conns:
                self._write(conn)
        now = time.monotonic()
        for conn in list(self.conns.values()):
            if not conn.trusted and now - conn.opened > self.auth_timeout:
                self.reject("timeout", "closed a connection that sent no authenticated report in "
                            f"{self.auth_timeout:.0f} s")
                self._close(conn)
            elif conn.trusted and now - conn.last > self.idle_timeout:
                self._close(conn)

    def _accept(self) -> None:
        try:
            sock, _ = self.sock.accept()
        except OSError:  # BlockingIOError, or the peer left at once
            return
        untrusted = sorted((c for c in self.conns.values() if not c.trusted), key=lambda c: c.opened)
        if untrusted and (len(untrusted) >= self.max_untrusted or len(self.conns) >= self.max_connections):
            self.reject("evicted", "closed the oldest connection that has not authenticated, to admit another")
            self._close(untrusted[0])
        if len(self.conns) >= self.max_connections:
            self.reject("refused", f"refused a connection: all {self.max_connections} slots are in use")
            sock.close()
            return
        sock.setblocking(False)
        conn = self.conns[sock] = _Conn(sock, time.monotonic())
        self.sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.inbox += data
        conn.last = time.monotonic()
        while len(conn.inbox) >= wire.HEADER.size:
            (n,) = wire.HEADER.unpack_from(conn.inbox)
            if n > self.max_frame:
                self.reject("oversize", f"closed a connection that announced a frame of {n} bytes "
                            f"(limit {self.max_frame})")
                self._close(conn)
                return
            end = wire.HEADER.size + n
            if len(conn.inbox) < end:
                return
            sealed = bytes(conn.inbox[wire.HEADER.size:end])
            del conn.inbox[:end]
            body = wire.unseal(self.secret, wire.REPORT, sealed)
            if body is None:
                self.reject("auth", "ignored a frame whose MAC is missing or wrong")
                continue
            conn.trusted = True
            reply = {**self.handle(body), "re": sealed[:wire.MAC_BYTES].hex()}
            conn.outbox += wire.frame(wire.seal(self.secret, wire.REPLY, wire.dumps(reply)))
            self._write(conn)
            if conn.sock not in self.conns:
                return

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbox)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return
        del conn.outbox[:sent]
        if len(conn.outbox) > 4 * self.max_frame:  # a peer that does not read its replies
            self._close(conn)
            return
        self.sel.modify(conn.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbox else 0), conn)

    def _close(self, conn: _Conn) -> None:
        if self.conns.pop(conn.sock, None) is not None:
            self.sel.unregister(conn.sock)
        conn.sock.close()

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        self.sel.close()
        self.sock.close()


class StoreAggregator:
    """An `Aggregator` fed over loom's own TCP listener, in a thread of this process.

    It listens on ``(host, port)`` only (``port=0``: a free one; ``address``
    says which) - never the process group's store, never every interface.
    Ranks connect `Monitor`s to ``address`` with ``secret`` (bytes, at least
    16; default: a fresh random one, ``self.secret``); every report must carry
    a valid HMAC under it and the reply to each report carries the current
    verdict, sealed the same way.  Refused input (``rejected``: a Counter by
    kind, see `_Listener`) never stops the thread.  ``max_frame`` bounds one
    message, ``max_connections`` the peers (default 2 x world_size + 16).
    Raises ValueError for a bad secret or an unresolvable host, OSError when
    it cannot listen there."""

    def __init__(self, world_size: int, config: DetectConfig | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, log_dir: str | None = None, callbacks=(), interval: float = 0.05,
                 window: int = 256, check_pids: bool = True, secret: bytes | None = None,
                 max_frame: int = wire.MAX_FRAME, max_connections: int | None = None):
        self._make = lambda: Aggregator(world_size, config, log_dir=log_dir, callbacks=callbacks,
                                        window=window, check_pids=check_pids)
        self.aggregator = self._make()
        self.secret = wire.new_secret() if secret is None else wire.check_secret(secret)
        self._lock = threading.Lock()
        self._listener = _Listener(host, port, self.secret, self._handle, self._reject, max_frame=max_frame,
                                   max_connections=max_connections or 2 * world_size + 16)
        self.address = (host, self._listener.port)
        self.interval = interval
        self.detected_at: dict[tuple, float] = {}  # fault key -> time.monotonic() when published
        self.cpu_s = 0.0  # CPU time the aggregator thread has used
        self._refused: collections.Counter = collections.Counter()  # connection-level refusals
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="loom-fault-aggregator", daemon=True)
        self.error: BaseException | None = None

    @property
    def faults(self) -> list[Fault]:
        return list(self.aggregator.faults)

    @property
    def verdict(self) -> Fault | None:
        return self.aggregator.verdict

    @property
    def rejected(self) -> collections.Counter:
        """Refused input by kind: ``auth``, ``oversize``, ``malformed``, ``refused``, ..."""
        return self._refused + self.aggregator.rejected

    def start(self) -> "StoreAggregator":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: take what already arrived, analyse it, close the log."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._listener.serve(self._listener.wait(0))
            self._step(force=True)  # last words
            self.aggregator.close()
            self._listener.close()

    def reset(self) -> tuple[Aggregator, dict]:
        """Start over for a new job on the same address (the monitors of the
        old one must have stopped).  Returns the old aggregator, with
        everything it received analysed, and its ``detected_at``."""
        with self._lock:
            self._step(force=True)
            old, detected = self.aggregator, self.detected_at
            old.close()
            self.aggregator, self.detected_at = self._make(), {}
        return old, detected

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _handle(self, body: bytes) -> dict:
        self.aggregator.ingest(body)
        verdict = self.aggregator.verdict
        return {"verdict": None if verdict is None else verdict.to_dict()}

    def _reject(self, kind: str, why: str) -> None:
        if kind in ("refused", "evicted", "timeout"):  # about connections: kept across `reset`
            self._refused[kind] += 1
        else:
            self.aggregator.reject(kind, why)

    def _step(self, force: bool = False) -> None:
        for fault in self.aggregator.check(force=force):
            self.detected_at[fault.key] = time.monotonic()
        self.aggregator.drain()  # logged already if it has a log_dir; nobody else reads them

    def _loop(self) -> None:
        try:
            due = time.monotonic() + self.interval
            while not self._stop.is_set():
                events = self._listener.wait(max(0.0, min(due - time.monotonic(), self.interval)))
                t0 = time.thread_time()
                with self._lock:
                    if self._closed:
                        return
                    self._listener.serve(events)
                    if time.monotonic() >= due:
                        self._step()
                        due = time.monotonic() + self.interval
                self.cpu_s += time.thread_time() - t0
        except BaseException as exc:  # noqa: BLE001 - kept for the owner to inspect
            self.error = exc
            raise
