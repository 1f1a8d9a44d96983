"""One writing job per checkpoint store: the owner record, and shared-store probes.

A job that writes a store first claims it.  The claim is collective (rank 0
of the saving group claims, every rank learns the result through an
agreement) and leaves an owner record at the store root:

    <url>/OWNER   {"format": "loom.owner", "version": 1, "job": "loom train run1",
                   "host": "node7", "pid": 4242, "machine": "<boot id>/<pid namespace>",
                   "token": "<random hex, one per claim>", "started": <unix time>,
                   "heartbeat": <unix time>, "lease_s": 30.0}

Rank 0 refreshes ``heartbeat`` from a background thread every ``lease_s / 3``
seconds.  A claim on a store whose record is live fails at once, naming the
owner.  A record is *gone* (claimable) when its heartbeat is older than its
lease, or when it was written on this machine (same host, boot and pid
namespace) by a process that no longer exists.  ``takeover=True`` claims
regardless; the job that held the store then fails its next save on every
rank (every save checks the record when it starts and again before its
commit).  Reads (`load`, `verify`, `loom ckpt ls`) need no claim; `gc`
deletes, so it claims too (sharing its own process's claim).

A claim that `save` or `plan_save` makes is *kept* by the process
(``keep=True``): it lasts, heartbeat and all, until `release_store` or the
end of the process (released at interpreter exit; a process that dies
without that leaves a record whose pid is gone or whose lease lapses), so
a job saving with one-shot `save` calls holds the store from its first
save on, and no other job can write between them.  An explicit
`claim_store` (an `AsyncCheckpointer`) of the same job adopts a kept claim.
Each claim counts the steps its process is writing (`StoreOwnership.writing`),
which `gc` leaves alone.

Race safety, as far as the store allows.  Claims in one process are
serialised by a lock.  On a local filesystem a claim of a store without a
record is an atomic create (a hard link of a complete file, O_EXCL where
links are not supported), then a re-read.  Replacing a record (gone, or a
takeover) and every claim on an object store is a write, a pause of
``CONFIRM_S`` and a re-read that must still show this claim; two claimants
both succeed only if one of them took longer than ``CONFIRM_S`` between
reading the old record and writing its own, and even then the loser fails at
its next check (before it starts a step, and before it commits one).  The
heartbeat and the release are a read then a write, so a takeover landing in
that instant is undone; the taker's re-read then reports the conflict.
Heartbeat ages compare wall clocks, so hosts need roughly synchronised
clocks (well within the lease).

Before a multi-rank save writes anything, rank 0 writes a probe object with
a random name and every rank must read it back (`claim_store` does this), so
stores the ranks do not share (``memory://``, which lives inside one
process; a local path on several nodes) are refused with an error naming
the ranks that could not see it.
"""
from __future__ import annotations

import atexit
import collections
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid

from .collective import agree, resolve
from .manifest import MAX_SMALL_JSON, InvalidCheckpointError, parse_json
from .store import CheckpointStore

log = logging.getLogger("loom.checkpoint")

OWNER = "OWNER"
FORMAT = "loom.owner"
VERSION = 1
LEASE_S = 30.0       # a record whose heartbeat is older than this is gone
CONFIRM_S = 0.5      # pause between writing a claim and re-reading it (see the module docstring)
PROBE_PREFIX = ".loom-probe-"
_MAX_TIME = 253402300799.0  # 9999-12-31: later times in a record are damage
MAX_LEASE_S = 86400.0       # a lease longer than a day is not one loom writes
_MAX_AHEAD_S = 86400.0      # a record's time more than a day ahead of this clock is damage
_MAX_PID = 2**31 - 1        # pid_t: larger pids cannot be checked (os.kill overflows)
_MAX_TEXT = 4096            # characters of a record's job, host, machine and token


class CheckpointOwnershipError(RuntimeError):
    """Another job owns the store (or took it over from this one); the
    message names it: job, host, pid, heartbeat age."""


class StoreNotSharedError(ValueError):
    """The ranks of a save do not see the same store (``memory://`` is per
    process; a local path on several nodes is a different directory on each)."""


ERRORS = {"CheckpointOwnershipError": CheckpointOwnershipError, "StoreNotSharedError": StoreNotSharedError,
          "InvalidCheckpointError": InvalidCheckpointError}  # for `agree(..., custom=ERRORS)`

_LOCK = threading.RLock()                 # claims, releases and the registry, in this process
_HELD: dict[str, "StoreOwnership"] = {}   # store key -> the claim this process holds on it


def default_job() -> str:
    """The job id a claim records when none is given: $LOOM_JOB_ID, else
    ``pid-<this process id>``."""
    return os.environ.get("LOOM_JOB_ID") or f"pid-{os.getpid()}"


@functools.lru_cache(maxsize=1)
def _machine() -> str:
    """What must match for a pid in a record to be checkable here: the boot
    and the pid namespace (empty parts where the system does not say)."""
    parts = []
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            parts.append(fh.read().strip())
    except OSError:
        parts.append("")
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append("")
    return "/".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _key(store: CheckpointStore) -> str:
    if store.local:
        return "file://" + os.path.realpath(store.root)
    protocol = store.fs.protocol
    return f"{protocol[0] if isinstance(protocol, (tuple, list)) else protocol}://{store.root}"


def _confirm_s(store: CheckpointStore) -> float:
    """memory:// lives in this process, where `_LOCK` already serialises claims."""
    return 0.0 if _key(store).startswith("memory://") else CONFIRM_S


# ------------------------------------------------------------- the record

def describe(record: dict, now: float | None = None) -> str:
    """A record for people: job, host, pid, start, heartbeat age, lease."""
    age = max(0.0, (time.time() if now is None else now) - record["heartbeat"])
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["started"]))
    return (f"job {record['job']!r} on host {record['host']!r} (pid {record['pid']}, started {started}, "
            f"heartbeat {age:.1f} s ago, lease {record['lease_s']:g} s)")


_FIELDS = {"format", "version", "job", "host", "pid", "machine", "token", "started", "heartbeat", "lease_s"}


def _check_record(record, where: str) -> dict:
    """``record`` when every field is in range; InvalidCheckpointError
    naming ``where`` and the field otherwise."""
    def bad(field, why):
        raise InvalidCheckpointError(
            f"{f'{where}: {field}' if field else where}: not a loom owner record ({why}); if no job is writing this "
            f"store, claim it with takeover=True (loom train --ckpt-takeover), which replaces the record, "
            f"or remove {where} by hand",
            file=where, field=field)

    def number(v) -> bool:
        return not isinstance(v, bool) and isinstance(v, (int, float))

    if not isinstance(record, dict):
        bad(None, f"a {type(record).__name__}, not a JSON object")
    if record.get("format") != FORMAT:
        bad("format", f"format={record.get('format')!r:.80}, expected {FORMAT!r}")
    if isinstance(record.get("version"), bool) or record.get("version") != VERSION:
        bad("version", f"version={record.get('version')!r:.80}, expected {VERSION}")
    if set(record) != _FIELDS:
        bad(None, f"fields {sorted(set(record) ^ _FIELDS)!r:.200} missing or unknown; expected "
                  f"{sorted(_FIELDS)}")
    for name in ("job", "host", "machine", "token"):
        v = record[name]
        if not isinstance(v, str) or not 0 < len(v) <= _MAX_TEXT:
            bad(name, f"{name}={v!r:.80} must be a string of 1 to {_MAX_TEXT} characters")
    pid = record["pid"]
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= _MAX_PID:
        bad("pid", f"pid={pid!r:.80} must be an int from 1 to {_MAX_PID}")
    latest = min(time.time() + _MAX_AHEAD_S, _MAX_TIME)
    for name in ("started", "heartbeat"):
        v = record[name]
        if not number(v) or not 0 <= v <= latest:
            bad(name, f"{name}={v!r:.80} must be a time in seconds from 0 to at most a day ahead of "
                      f"this host's clock ({latest:.0f})")
    if not number(record["lease_s"]) or not 0 < record["lease_s"] <= MAX_LEASE_S:
        bad("lease_s", f"lease_s={record['lease_s']!r:.80} must be a number of seconds above 0 and at "
                       f"most {MAX_LEASE_S:g}")
    return record


def _read(store: CheckpointStore) -> dict | None:
    """The store's owner record, None when there is none; InvalidCheckpointError
    when it is not one (also when it is too large, or not a regular file)."""
    where = f"{store.url}/{OWNER}"
    try:
        raw = store.get(OWNER, MAX_SMALL_JSON)
        if raw is None:
            return None
        record = parse_json(raw, where)
    except InvalidCheckpointError as exc:
        raise InvalidCheckpointError(f"{exc} (not a loom owner record); if no job is writing this store, "
                                     f"claim it with takeover=True (loom train --ckpt-takeover), which "
                                     f"replaces it, or remove {where} by hand", file=where) from None
    return _check_record(record, where)


def read_owner(url: str) -> dict | None:
    """The owner record of the store at ``url`` (a dict, see the module
    docstring), or None when no job holds it.  Raises InvalidCheckpointError
    for a record loom did not write."""
    return _read(CheckpointStore(url))


def _gone(record: dict, now: float) -> str | None:
    """Why ``record`` no longer holds its store, or None while it does."""
    if record["host"] == socket.gethostname() and record["machine"] == _machine():
        if record["pid"] == os.getpid():
            with _LOCK:
                if not any(h.token == record["token"] for h in _HELD.values()):
                    return f"its process {record['pid']} is this one, which does not hold the claim"
        elif not _pid_alive(record["pid"]):
            return f"its process {record['pid']} on {record['host']} has exited"
    age = now - record["heartbeat"]
    if age > record["lease_s"]:
        return f"its heartbeat is {age:.1f} s old, past its lease of {record['lease_s']:g} s"
    return None


def _encode(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def _create_exclusive(store: CheckpointStore, data: bytes) -> bool:
    """Create the record on a local disk only if there is none: a hard link of
    a complete temporary file (readers never see half a record); O_EXCL where
    the filesystem has no links.  False when a record exists."""
    path = store.path(OWNER)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.claim-{uuid.uuid4().hex}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some FUSE and SMB mounts)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True
    finally:
        os.unlink(tmp)


def _owned_error(url: str, record: dict, now: float) -> CheckpointOwnershipError:
    lapse = max(0.0, record["heartbeat"] + record["lease_s"] - now)
    mine = ""
    if (record["pid"], record["host"], record["machine"]) == (os.getpid(), socket.gethostname(), _machine()):
        mine = (" (this process: a job that saved keeps the store until loom.checkpoint.release_store(url), "
                "an AsyncCheckpointer until close())")
    return CheckpointOwnershipError(
        f"checkpoint store {url} is owned by {describe(record, now)}{mine}; one job writes a store at a time. "
        f"Wait for that job to end, or save to another url. If that job is gone, its claim lapses in "
        f"{lapse:.0f} s (its lease after its last heartbeat; for a claim from its own host, as soon as "
        f"its process has exited); takeover=True (loom train --ckpt-takeover) claims the store "
        f"regardless (dangerous: a job still running keeps writing until its next save fails)")


def _claim(store: CheckpointStore, job: str, takeover: bool | str, lease_s: float) -> dict:
    """Rank 0: write this process's record, or raise naming the live owner."""
    with _LOCK:
        for _ in range(3):
            try:
                current = _read(store)
            except InvalidCheckpointError:
                if takeover is not True:
                    raise
                current = {}  # replaced below
            now = time.time()
            # takeover=True: any owner; takeover=<job>: an owner record of that very job (its earlier attempt)
            ours = isinstance(takeover, str) and bool(current) and current.get("job") == takeover
            if current and takeover is True:
                log.warning("taking over checkpoint store %s from %s", store.url, describe(current, now))
            elif ours:
                log.warning("reclaiming checkpoint store %s from this job's earlier attempt: %s", store.url,
                            describe(current, now))
            elif current:
                why = _gone(current, now)
                if why is None:
                    raise _owned_error(store.url, current, now)
                log.warning("claiming checkpoint store %s from %s: %s", store.url, describe(current, now), why)
            mine = {"format": FORMAT, "version": VERSION, "job": job, "host": socket.gethostname(),
                    "pid": os.getpid(), "machine": _machine(), "token": uuid.uuid4().hex,
                    "started": now, "heartbeat": now, "lease_s": float(lease_s)}
            if current is None and store.local:
                if not _create_exclusive(store, _encode(mine)):
                    continue  # another claim came first: look at it
            else:
                store.put(OWNER, _encode(mine))
                time.sleep(_confirm_s(store))
            try:
                confirmed = _read(store)
            except InvalidCheckpointError:
                confirmed = None
            if confirmed is not None and confirmed["token"] == mine["token"]:
                return mine
            if confirmed is not None:
                raise CheckpointOwnershipError(
                    f"checkpoint store {store.url} was claimed at the same moment by {describe(confirmed)}, "
                    f"which won; one job writes a store at a time")
        raise CheckpointOwnershipError(f"could not claim checkpoint store {store.url}: its owner record "
                                       f"kept changing while claiming (other jobs are claiming it); "
                                       f"try again once they are done")


# ---------------------------------------------------------------- the hold

class StoreOwnership:
    """This job's hold on a checkpoint store, from `claim_store`.

    On rank 0 of the claiming group (``holder``) it keeps the owner record
    and its heartbeat thread; on the other ranks it only carries the claim's
    token.  ``check()`` (rank 0) raises `CheckpointOwnershipError` once the
    store has been taken over; ``release()`` ends the hold (a reused hold,
    ``reused``, belongs to the claim it reuses and releases nothing; so does
    the one a ``keep=True`` claim returns: `release_store` ends that).  Use
    it as a context manager to release on exit.

    ``writing`` counts the steps this process is saving under the claim
    (`plan_save` to `commit`, rank 0; shared by every hold on the same
    claim), which `gc` never deletes."""

    def __init__(self, store: CheckpointStore, job: str, token: str, lease_s: float, *, holder: bool,
                 reused: bool = False, writing: collections.Counter | None = None, proven: set | None = None):
        self.store, self.url, self.job, self.token, self.lease_s = store, store.url, job, token, lease_s
        self.holder, self.reused = holder, reused
        self.released = False
        self.kept = False  # held by the process until release_store() or exit (see claim_store's keep)
        self.writing = collections.Counter() if writing is None else writing
        self.proven = set() if proven is None else proven  # rank lists that proved they share the store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def shared(self) -> "StoreOwnership":
        """Another hold on this claim that releases nothing (``reused``)."""
        return StoreOwnership(self.store, self.job, self.token, self.lease_s, holder=self.holder,
                              reused=True, writing=self.writing, proven=self.proven)

    # ------------------------------------------------- steps in flight
    def begin_step(self, step: int) -> None:
        """``step`` is being written under this claim (until `end_step`)."""
        with _LOCK:
            self.writing[step] += 1

    def end_step(self, step) -> None:
        """One `begin_step` of ``step`` is over (anything else is ignored)."""
        if isinstance(step, int):
            with _LOCK:
                self.writing[step] -= 1
                if self.writing[step] <= 0:
                    del self.writing[step]

    def in_flight(self) -> set[int]:
        """The steps this process is writing under the claim now."""
        with _LOCK:
            return set(self.writing)

    # --------------------------------------------------------- checks
    def lost(self) -> str | None:
        """Rank 0: why this job no longer owns the store, or None while it does
        (the other ranks: always None).  Reads the record."""
        if not self.holder:
            return None
        if self.released:
            return f"its claim on {self.url} was released"
        return self._look()[1]

    def _look(self) -> tuple[dict | None, str | None]:
        """(the record, why it is not this claim's or None)."""
        try:
            record = _read(self.store)
        except InvalidCheckpointError as exc:
            return None, f"the owner record was replaced by something unreadable ({exc})"
        if record is None:
            return None, (f"the owner record {self.url}/{OWNER} is gone (removed, or released by a job "
                          f"that took the store over and has ended)")
        if record["token"] != self.token:
            return record, f"the store was taken over by {describe(record)}"
        return record, None

    def check(self) -> None:
        """Raise `CheckpointOwnershipError` (rank 0) when this job no longer
        owns the store; nothing is written after it."""
        why = self.lost()
        if why is not None:
            raise CheckpointOwnershipError(
                f"job {self.job!r} (pid {os.getpid()}) no longer owns checkpoint store {self.url}: {why}; "
                f"nothing more is written. Stop this job (the other one writes there now), or restart it "
                f"with takeover=True (loom train --ckpt-takeover) if it is the one that should write")

    # ------------------------------------------------------ heartbeat
    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="loom-ckpt-owner", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                record, why = self._look()
                if why is not None:
                    if self.kept and record is None:  # the store was removed: nothing to hold
                        log.info("checkpoint store %s: its owner record is gone; heartbeat stopped", self.url)
                    else:
                        log.error("checkpoint store %s: job %r lost its claim: %s", self.url, self.job, why)
                    return
                record["heartbeat"] = time.time()
                self.store.put(OWNER, _encode(record))
            except Exception as exc:  # noqa: BLE001 - a store hiccup; the lease allows a few
                log.warning("checkpoint store %s: heartbeat failed: %s", self.url, exc)

    def _set_lease(self, lease_s: float) -> None:
        """Rank 0: record a new lease (and beat at its pace from now on)."""
        if lease_s == self.lease_s:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        record, why = self._look()
        if why is not None:
            raise CheckpointOwnershipError(f"job {self.job!r} no longer owns checkpoint store {self.url}: {why}")
        record.update(lease_s=lease_s, heartbeat=time.time())
        self.store.put(OWNER, _encode(record))
        self.lease_s, self._stop = lease_s, threading.Event()
        self._start()

    # -------------------------------------------------------- release
    def release(self) -> None:
        """End the hold: stop the heartbeat and (rank 0) remove the record if
        it is still this claim's.  Never raises (a record left behind is
        claimable once this process has exited or its lease has passed)."""
        if self.released:
            return
        self.released = True
        if not self.holder or self.reused:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with _LOCK:
            if _HELD.get(_key(self.store)) is self:
                del _HELD[_key(self.store)]
            try:
                record = _read(self.store)
                if record is not None and record["token"] == self.token:
                    self.store.remove(OWNER)
            except Exception as exc:  # noqa: BLE001
                log.warning("checkpoint store %s: could not remove its owner record: %s", self.url, exc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        state = ("released" if self.released else "reused" if self.reused else
                 "kept" if self.kept else "held")
        return f"StoreOwnership({self.url!r}, job={self.job!r}, {state})"


def claim_store(url: str, *, group=None, job: str | None = None, takeover: bool | str = False,
                lease_s: float = LEASE_S, reuse: bool = False, keep: bool = False) -> StoreOwnership:
    """Collective over ``group`` (default: the world, or this process alone):
    make this job the one writer of the store at ``url``, and prove that
    every rank sees the same store (once per claim and set of ranks: a
    kept claim reused by the next save of the same ranks skips the probe).

    ``job``: the id recorded (default `default_job()`).  ``lease_s``: how old
    this claim's heartbeat may get before others may claim the store.
    ``takeover``: True claims even a live owner's store (dangerous: it keeps
    writing until its next save fails); a job id (str) claims a store whose
    live owner record is that very job's -- a restarted job reclaiming what
    its stopped workers held -- and no other job's.  ``reuse``: when this process
    already holds the store for the same ``job`` (for any job when ``job``
    is None), share that claim (the returned hold releases nothing) instead
    of failing.  ``keep`` (what `save` does): reuse, and keep a new claim
    in this process until `release_store` or exit; the returned hold
    releases nothing.  Without ``reuse``/``keep``, a claim this process
    keeps for the same job is adopted: the returned hold owns it (its
    ``release()`` ends it).

    Returns a `StoreOwnership` on every rank.  Raises on every rank:
    `CheckpointOwnershipError` naming the live owner; `StoreNotSharedError`
    naming the ranks that could not see rank 0's probe (nothing stays
    claimed); InvalidCheckpointError for an owner record loom did not write
    (``takeover`` replaces it); ValueError for bad arguments."""
    g = resolve(group)
    store = CheckpointStore(url)
    any_job = job is None and (reuse or keep)
    job = default_job() if job is None else job
    if not isinstance(takeover, (bool, str)) or takeover == "":
        raise ValueError(f"takeover={takeover!r} must be True, False or the id of the job whose claim to reclaim")
    if not isinstance(job, str) or not 0 < len(job) <= _MAX_TEXT:
        raise ValueError(f"job={job!r:.80} must be a non-empty string of at most {_MAX_TEXT} characters")
    if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or not 0 < lease_s <= MAX_LEASE_S:
        raise ValueError(f"lease_s={lease_s!r} must be a number of seconds above 0 and at most {MAX_LEASE_S:g}")
    mine, fresh, error, info = None, None, None, None
    if g.rank == 0:
        try:
            mine, fresh = _hold(store, job, takeover, float(lease_s), bool(reuse or keep), bool(keep),
                                any_job)
            info = {"token": mine.token, "reused": mine.reused, "probe": None}
            if g.size > 1 and tuple(g.ranks) not in mine.proven:  # once per claim and ranks
                name, content = f"{PROBE_PREFIX}{uuid.uuid4().hex}", uuid.uuid4().hex
                store.put(name, content.encode())
                info["probe"] = [name, content]
        except Exception as exc:  # noqa: BLE001 - every rank raises it
            error = exc
    try:
        info = agree(g, error, info, custom=ERRORS)[0]
        if info["probe"] is not None:
            _prove_shared(store, g, info["probe"])
            if mine is not None:
                mine.proven.add(tuple(g.ranks))
    except BaseException:
        if fresh is not None:
            fresh.release()  # a claim made here, kept or not
        raise
    if mine is None:
        mine = StoreOwnership(store, job, info["token"], float(lease_s), holder=False, reused=info["reused"])
    return mine


def release_store(url: str) -> bool:
    """End the claim on the store at ``url`` that this process keeps (the
    one `save`, `plan_save` or `gc` made; see `claim_store`'s ``keep``):
    heartbeat stopped, owner record removed.  True when there was one,
    False when this process keeps none (call it on every rank: only rank 0
    of a save holds the claim).  Raises ValueError for a claim made by
    `claim_store` or an `AsyncCheckpointer`: release or close that one."""
    with _LOCK:
        held = _HELD.get(_key(CheckpointStore(url)))
    if held is None:
        return False
    if not held.kept:
        raise ValueError(f"checkpoint store {url} is held by {held!r}, which claim_store (or an "
                         f"AsyncCheckpointer) made: release it with its release() (or close())")
    held.release()
    return True


def held_claim(url: str) -> StoreOwnership | None:
    """A hold on the claim this process has on the store at ``url`` (one
    that releases nothing), or None when it has none."""
    with _LOCK:
        held = _HELD.get(_key(CheckpointStore(url)))
        return None if held is None else held.shared()


def check_writable(url: str) -> None:
    """Raise `CheckpointOwnershipError` naming the owner when another live
    job owns the store at ``url`` (what a claim would raise), without
    writing anything; InvalidCheckpointError for a record loom did not write."""
    store = CheckpointStore(url)
    with _LOCK:
        if _key(store) in _HELD:
            return
        record = _read(store)
        now = time.time()
        if record is not None and _gone(record, now) is None:
            raise _owned_error(store.url, record, now)


def _hold(store: CheckpointStore, job: str, takeover: bool | str, lease_s: float, reuse: bool, keep: bool,
          any_job: bool) -> tuple[StoreOwnership, StoreOwnership | None]:
    """Rank 0: (the hold to return, the claim made here or None): a share
    of the claim this process holds (``reuse``), that claim itself when it
    is kept for the same job and this is an explicit claim (adopted), or a
    new claim."""
    with _LOCK:
        held = _HELD.get(_key(store))
        if held is not None and held.kept and held.lost() is not None:
            held.release()  # removed or taken over since: claim afresh (or fail naming the new owner)
            held = None
        if held is not None and (held.job == job or reuse and any_job):
            if reuse:
                return held.shared(), None
            if held.kept:
                held._set_lease(lease_s)
                held.kept = False  # adopted: its release() now ends the claim
                return held, None
        record = _claim(store, job, takeover, lease_s)
        mine = StoreOwnership(store, job, record["token"], lease_s, holder=True)
        mine.kept = keep
        _HELD[_key(store)] = mine
    mine._start()
    return (mine.shared() if keep else mine), mine


@atexit.register
def _release_kept() -> None:
    """At interpreter exit, every claim this process still holds ends."""
    with _LOCK:
        held = list(_HELD.values())
    for h in held:
        h.release()


def _forget_after_fork() -> None:
    """A forked child holds none of its parent's claims (its pid differs)."""
    global _LOCK
    _LOCK = threading.RLock()
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _prove_shared(store: CheckpointStore, g, probe: list) -> None:
    """Every rank reads rank 0's probe back; rank 0 removes it; all raise
    `StoreNotSharedError` if any rank could not see it."""
    name, content = probe
    why = None
    if g.rank != 0:
        try:
            raw = store.get(name, MAX_SMALL_JSON)
            why = "not found" if raw is None else None if raw == content.encode() else "different content"
        except Exception as exc:  # noqa: BLE001 - cannot read it: not shared either
            why = f"{type(exc).__name__}: {exc}"
    seen = agree(g, None, why)
    if g.rank == 0:
        try:
            store.remove(name)
        except Exception as exc:  # noqa: BLE001
            log.warning("checkpoint store %s: could not remove the probe %s: %s", store.url, name, exc)
    blind = {r: w for r, w in enumerate(seen) if w is not None}
    if blind:
        detail = ", ".join(f"rank {r}: {w}" for r, w in blind.items())
        raise StoreNotSharedError(
            f"checkpoint store {store.url} is not shared by the {g.size} ranks: rank 0 wrote {name} there, "
            f"but ranks {sorted(blind)} could not see it ({detail}). Every rank of a save must reach the "
            f"same store: memory:// lives inside one process, and a local path on several nodes is a "
            f"different directory on each; use a shared filesystem or an object store (s3://, gs://, ...)")
