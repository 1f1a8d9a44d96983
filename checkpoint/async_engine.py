"""Lazy asynchronous checkpoints: training barely stalls to save.

    ckpt = AsyncCheckpointer("runs/ckpt", keep_last=3)
    ckpt.attach(optimizer)             # optimizer.step() waits while a snapshot is unfinished
    for step in range(steps):
        ...forward, backward, optimizer.step()...
        ckpt.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, step=step)
    ckpt.close()                       # every save committed (or its failure raised)

`save` copies nothing: it captures the plain values (JSON, at once) and
references to the tensors, and returns a `SaveHandle`.  Model and optimizer
tensors do not change until the next optimizer step, so two background
threads per rank do the rest while forward and backward run:

1. **snapshot** (level 1): agree on the step, plan the save (collective,
   metadata only: fragments, chunk grid, owners; see `plan_save`) and copy
   the chunks *this rank writes* into a region of a preallocated host buffer
   pool (replicas split the copying as they split the writing).  The
   attached optimizer's step pre-hook waits only while a snapshot is
   unfinished.  A full pool makes the next snapshot wait (backpressure).
2. **persist** (level 2): exchange straddling parts (rare), write the chunks
   from the pool (a thread, or a separate writer process), give the region
   back, commit with #6's protocol (collective: barrier, manifest, marker,
   ``latest``) and apply retention.

Each thread runs its own process group, created for it, and handles saves
in the order they were made, so its collectives are in the same order on
every rank and never interleave with training collectives.  A failure on
any rank fails that save on every rank; it surfaces as `CheckpointSaveError`
(with the cause) from the next `save`, `wait` or the handle's `result`, and
nothing of it is committed, so the previous committed step stays loadable.

Ownership: the checkpointer claims its store when it is constructed
(`loom.checkpoint.owner`; a store another job owns fails the constructor on
every rank, naming it) and releases it at `close`; ranks that do not share
the store fail the constructor too.  Every save checks the claim, so a job
whose store was taken over fails its next save on every rank.

Lazy consistency: tensors are read after `save` returns, until their
snapshot completes.  The attached optimizer is covered; anything else that
changes saved tensors in place (BatchNorm statistics in forward, manual
edits, a second optimizer not attached) must call `wait_snapshot()` first.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import queue
import threading
import time
import warnings
from concurrent.futures import Future

import torch

from loom import comms

from . import layout
from .collective import agree, resolve
from .host_pool import HostBufferPool, aligned
from .manifest import storage_dtype
from .object_store import is_remote
from .owner import LEASE_S, claim_store
from .save import SavePlan, commit, exchange_parts, keep_in_memory, plan_save
from .state import Flat, PerRank, Shard, _contains_tensors, decode_value, encode_value, flatten, key_of
from .store import CheckpointStore, check_step, retained
from .writers import ProcessWriter, ThreadWriter

WRITERS = ("thread", "process")


class CheckpointSaveError(RuntimeError):
    """An asynchronous save failed; ``step`` is the step it was saving and
    ``__cause__`` the original error."""

    def __init__(self, message: str, step=None):
        super().__init__(message)
        self.step = step


class SaveHandle:
    """One `AsyncCheckpointer.save`: ``done()``, ``result()`` (the committed
    location, or the failure raised), and ``stats`` (seconds and bytes)."""

    def __init__(self, owner: "AsyncCheckpointer", step):
        self.step = step
        self._owner = owner
        self._future: Future = Future()
        self._snapshot = threading.Event()
        self._seen = False  # its failure was raised to the caller
        self._callbacks: list = []
        self.stats = {"step": step, "save_s": 0.0, "blocked_s": 0.0, "plan_s": None, "snapshot_s": None,
                      "persist_s": None, "bytes": 0}

    def done(self) -> bool:
        """Committed, or failed."""
        return self._future.done()

    def snapshot_done(self) -> bool:
        """The live tensors are no longer read (copied, or the save failed)."""
        return self._snapshot.is_set()

    def result(self, timeout: float | None = None) -> str:
        """Wait for the commit; the committed location, or raise the failure."""
        try:
            return self._future.result(timeout)
        except CheckpointSaveError:
            self._owner._reported(self)
            raise

    def wait(self, timeout: float | None = None) -> bool:
        """Until committed or failed, without raising; returns ``done()``."""
        try:
            self._future.exception(timeout)
        except TimeoutError:
            pass
        return self.done()

    def add_done_callback(self, fn) -> None:
        """Call ``fn(location, error)`` once the save is committed (error
        None) or failed (location None), on the persist thread before
        anyone waiting is woken; at once if that has already happened."""
        with self._owner._lock:
            if not self.done():
                self._callbacks.append(fn)
                return
        error = self._future.exception()
        fn(None if error else self._future.result(), error)

    @property
    def stall_s(self) -> float:
        """What this save cost the training thread: time in `save` plus time
        the optimizer (or `wait_snapshot`) waited for its snapshot."""
        return self.stats["save_s"] + self.stats["blocked_s"]

    def __repr__(self):
        state = "committed" if self.done() and self._future.exception() is None else \
            "failed" if self.done() else "snapshotted" if self.snapshot_done() else "copying"
        return f"SaveHandle(step={self.step}, {state})"


@dataclasses.dataclass
class _Job:
    seq: int
    step: object
    handle: SaveHandle
    state: dict | None = None
    error: BaseException | None = None
    cuda_events: dict = dataclasses.field(default_factory=dict)
    plan: SavePlan | None = None
    pool: HostBufferPool | None = None
    region: object = None
    fragments: dict = dataclasses.field(default_factory=dict)  # key -> host copy of the local tensor
    chunks: dict = dataclasses.field(default_factory=dict)     # (key, chunk) -> host numpy chunk
    t_submit: float = 0.0
    t_snapshot: float = 0.0


_STOP = object()


class AsyncCheckpointer:
    """Asynchronous, lazily consistent saves of ``state`` to ``url`` in the
    universal layout (`loom.checkpoint.load` reads them).

    ``group``: the ranks that save together (default: the world, or one
    process without torch.distributed); every member constructs the
    checkpointer and calls `save` in the same order.  ``host_buffer_bytes``:
    the pool for snapshots; default: twice the largest snapshot this rank
    has made, grown when a larger one comes (an explicit size never grows,
    and a snapshot larger than it fails with a clear error).
    ``keep_last`` / ``keep_every``: retention after each commit (`retained`).
    ``writer``: "thread" or "process" (level 2 in a separate process).
    ``mesh``: recorded in the manifest, as in `save`.  ``durable``: fsync
    before the commit marker, as in `save` (a save counts as done only once
    its step would survive a machine crash).

    The store is claimed for the checkpointer's lifetime (collective, at
    construction; released by `close`): ``job`` is the id recorded
    (default `loom.checkpoint.owner.default_job`), ``lease_s`` how long its
    heartbeat may go stale before another job may claim the store, and
    ``takeover=True`` claims a store another job still owns (dangerous:
    that job keeps writing until its next save fails).  Raises on every
    rank: `CheckpointOwnershipError` naming the owner, `StoreNotSharedError`
    naming the ranks that cannot see the store, ValueError for bad
    arguments.

    ``snapshots``: a `loom.checkpoint.memory.SnapshotSink` that receives
    the chunks this rank wrote once each step is committed, on the persist
    thread, from the host pool (whose region is held until then); a
    failure there is logged, never fails the save."""

    def __init__(self, url: str, *, group=None, host_buffer_bytes: int | None = None,
                 keep_last: int | None = None, keep_every: int | None = None,
                 writer: str = "thread", mesh=None, durable: bool = False, job: str | None = None,
                 takeover: bool | str = False, lease_s: float = LEASE_S, snapshots=None):
        CheckpointStore(url)  # checks the URL
        if host_buffer_bytes is not None and (isinstance(host_buffer_bytes, bool) or
                                              not isinstance(host_buffer_bytes, int) or host_buffer_bytes <= 0):
            raise ValueError(f"host_buffer_bytes={host_buffer_bytes!r} must be a positive int (or None)")
        retained([], keep_last, keep_every)  # checks the retention values
        if writer not in WRITERS:
            raise ValueError(f"writer={writer!r} must be one of {', '.join(WRITERS)}")
        if writer == "process" and not (CheckpointStore(url).local or is_remote(url)):
            raise ValueError(f"writer='process' needs a store that another process can reach; {url!r} is "
                             f"not a local path or an object store (memory:// lives inside one process)")
        self.url, self.mesh, self.durable = str(url), mesh, bool(durable)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.writer_kind = writer
        self.snapshots = snapshots
        self._capacity = host_buffer_bytes
        self._g = resolve(group)
        self.ownership = self._claim(job, takeover, lease_s)
        try:
            if self._g.distributed:
                ranks = list(self._g.ranks)
                self._plan_handle = comms.new_group(ranks, name="ckpt-snapshot", background=True)
                self._persist_handle = comms.new_group(ranks, name="ckpt-persist", background=True)
            else:
                self._plan_handle = self._persist_handle = None
            self._writer = ThreadWriter() if writer == "thread" else ProcessWriter(self.url)
        except BaseException:
            self.ownership.release()
            raise
        self._persist_g = dataclasses.replace(self._g, handle=self._persist_handle)
        self.pool: HostBufferPool | None = None
        self._lock = threading.Condition()
        self._seq = 0
        self._snapshots_done = 0   # jobs (in order) whose snapshot finished
        self._unreported: list[SaveHandle] = []
        self._inflight: dict = {}  # seq -> job, until committed or failed
        self.history: collections.deque = collections.deque(maxlen=100_000)  # recent handles
        self._hooks: list = []
        self._closed = False
        self._snap_q: queue.Queue = queue.Queue()
        self._persist_q: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._snapshot_loop, name="loom-ckpt-snapshot", daemon=True),
                         threading.Thread(target=self._persist_loop, name="loom-ckpt-persist", daemon=True)]
        for t in self._threads:
            t.start()

    def _claim(self, job, takeover, lease_s):
        """Collective: this checkpointer's claim on its store (released by `close`)."""
        return claim_store(self.url, group=self._g, job=job, takeover=takeover, lease_s=lease_s)

    # ------------------------------------------------------------ public
    def attach(self, optimizer) -> None:
        """Make ``optimizer.step()`` wait for unfinished snapshots first (a
        step pre-hook; it returns at once when none is pending)."""
        register = getattr(optimizer, "register_step_pre_hook", None)
        if register is None:
            raise TypeError(f"attach needs a torch.optim.Optimizer (with register_step_pre_hook), got "
                            f"{type(optimizer).__name__}; call wait_snapshot() before its step instead")
        self._hooks.append(register(lambda *_: self.wait_snapshot()))

    def save(self, state: dict, *, step: int) -> SaveHandle:
        """Start saving ``state`` as ``step``; returns its handle at once.
        Plain values are captured now; tensors are copied in the background.

        Bad input raises here (and fails this save on every rank).  If an
        earlier save failed and nobody has seen it yet, this save is still
        started and then the failure is raised (`CheckpointSaveError`, the
        new save's handle in its ``handle``)."""
        t0 = time.perf_counter()
        if self._closed:
            raise RuntimeError("this AsyncCheckpointer is closed")
        handle = SaveHandle(self, step)
        job = _Job(0, step, handle, t_submit=t0)
        try:
            check_step(step)
            job.state = capture(state)
            if torch.cuda.is_available():
                job.cuda_events = _record_cuda_events(flatten(job.state))
        except Exception as exc:  # noqa: BLE001 - every rank learns of it in the background
            job.error = exc
        with self._lock:
            self._seq += 1
            job.seq = self._seq
            self._inflight[job.seq] = job
            self.history.append(handle)
        self._snap_q.put(job)
        handle.stats["save_s"] = time.perf_counter() - t0
        if job.error is not None:
            self._reported(handle)  # raised here; the peers' saves of this step fail too
            raise job.error
        earlier = self._take_unreported()
        if earlier is not None:
            raise _resurface(earlier, handle)
        return handle

    def wait_snapshot(self) -> None:
        """Until every save made so far has finished reading the live
        tensors (copied into the pool, or failed).  Call it before changing
        saved tensors by any means other than the attached optimizer.
        While it blocks, the trace shows it (``wait:snapshot`` on the
        snapshot group, `loom.comms.background_wait`): peers waiting for
        this rank meanwhile are held up by the checkpoint, not by a hang."""
        with self._lock:
            target = self._seq
            if self._snapshots_done >= target:
                return
            t0 = time.perf_counter()
            with self._waiting(self._plan_handle, "snapshot"):
                while self._snapshots_done < target:
                    self._lock.wait(1.0)
            blocked = time.perf_counter() - t0
            newest = self._inflight.get(target)
            handle = newest.handle if newest is not None else self.history[-1]
        handle.stats["blocked_s"] += blocked

    def wait(self, timeout: float | None = None) -> None:
        """Until every save made so far is committed (or failed); raises the
        first failure nobody has seen yet."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            pending = [job.handle for job in self._inflight.values()]
        with self._waiting(self._persist_handle if pending else None, "commit"):
            for handle in pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    handle._future.result(left)
                except CheckpointSaveError:
                    pass
        earlier = self._take_unreported()
        if earlier is not None:
            raise _resurface(earlier)

    def close(self) -> None:
        """Wait for every save, stop the threads, free the pool, detach the
        hooks, release the store.  Raises a failure not reported yet."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            try:
                for hook in self._hooks:
                    hook.remove()
                self._hooks.clear()
                self._snap_q.put(_STOP)
                for t in self._threads:
                    t.join()
                if self._writer is not None:
                    self._writer.close()
                if self.pool is not None:
                    self.pool.close()
                for h in {self._plan_handle, self._persist_handle} - {None}:
                    comms.destroy_group(h)
            finally:
                self.ownership.release()  # after the threads: no save of this job is running

    @staticmethod
    def _waiting(handle, what: str):
        """A trace record of this thread waiting for the background group
        ``handle``'s work (nothing without a process group)."""
        return contextlib.nullcontext() if handle is None else comms.background_wait(handle, what)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            return
        try:  # an exception is already on its way out: do not mask it
            self.close()
        except CheckpointSaveError:
            pass

    def stats(self) -> list[dict]:
        """Per recent save: step, save_s, blocked_s (the stall is their
        sum), plan_s (the collective plan, on the snapshot thread),
        snapshot_s (save to snapshot done), persist_s (snapshot done to
        commit), bytes copied by this rank."""
        return [dict(h.stats) for h in self.history]

    # ----------------------------------------------------------- failures
    def _take_unreported(self) -> CheckpointSaveError | None:
        """The oldest failure nobody has seen yet (the run of failures after
        it counts as seen with it)."""
        with self._lock:
            if not self._unreported:
                return None
            first = self._unreported[0]
            for handle in self._unreported:
                handle._seen = True
            self._unreported.clear()
        return first._future.exception()

    def _reported(self, handle: SaveHandle) -> None:
        with self._lock:
            if handle in self._unreported:
                self._unreported.remove(handle)
            handle._seen = True

    def _finish(self, job: _Job, location: str | None, error: BaseException | None) -> None:
        job.state, job.plan, job.fragments, job.chunks = None, None, {}, {}
        handle = job.handle
        with self._lock:
            self._inflight.pop(job.seq, None)
            if error is not None and not handle._seen:
                self._unreported.append(handle)
        if error is not None and not isinstance(error, CheckpointSaveError):
            wrapped = CheckpointSaveError(f"saving step {job.step} to {self.url} failed: "
                                          f"{type(error).__name__}: {error}", job.step)
            wrapped.__cause__ = error
            error = wrapped
        if error is None:
            handle.stats["persist_s"] = time.perf_counter() - job.t_snapshot
        with self._lock:
            callbacks, handle._callbacks = handle._callbacks, []
        for fn in callbacks:
            try:
                fn(location, error)
            except Exception as exc:  # noqa: BLE001 - a callback must not break the engine
                warnings.warn(f"a checkpoint done-callback failed: {exc!r}", stacklevel=2)
        with self._lock:  # add_done_callback sees either the list or a done future
            if error is None:
                handle._future.set_result(location)
            else:
                handle._future.set_exception(error)

    def _snapshot_finished(self, job: _Job) -> None:
        job.state = None
        if job.plan is not None:
            job.plan.tensors = {}  # the persist stage never touches live tensors
        job.t_snapshot = time.perf_counter()
        job.handle.stats["snapshot_s"] = job.t_snapshot - job.t_submit
        job.handle._snapshot.set()
        with self._lock:
            self._snapshots_done = job.seq
            self._lock.notify_all()

    # ------------------------------------------------------- level 1
    def _snapshot_loop(self) -> None:
        while True:
            job = self._snap_q.get()
            if job is _STOP:
                self._persist_q.put(_STOP)
                return
            try:
                self._snapshot(job)
            except BaseException as exc:  # noqa: BLE001 - the persist stage fails it on every rank
                job.error = job.error or exc
            if job.region is not None and job.error is not None:
                job.pool.release(job.region)
                job.region = None
            self._snapshot_finished(job)
            self._persist_q.put(job)

    def _snapshot(self, job: _Job) -> None:
        g = dataclasses.replace(self._g, handle=self._plan_handle)
        # every rank learns of a save that failed to start on any rank, and
        # that everyone saves the same step (a misuse would pair different saves)
        steps = agree(g, job.error, job.step if job.error is None else None)
        if len(set(steps)) > 1:
            raise ValueError(f"ranks are saving different steps at once: {steps} (rank order); "
                             f"every rank must call save() with the same steps in the same order")
        self._wait_for_same_step(job)
        t0 = time.perf_counter()
        job.plan = plan_save(job.state, self.url, step=job.step, group=g, mesh=self.mesh,
                             durable=self.durable, ownership=self.ownership)
        job.handle.stats["plan_s"] = time.perf_counter() - t0
        pieces = _pieces(job.plan)
        need = sum(aligned(_nbytes(src)) for _, _, src in pieces)
        self._ensure_pool(job, need, _on_cuda(pieces))
        job.pool = self.pool
        job.region = self.pool.reserve(need)
        job.handle.stats["bytes"] = sum(_nbytes(src) for _, _, src in pieces)
        _copy(self.pool, job, pieces)

    def _wait_for_same_step(self, job: _Job) -> None:
        """A save of a step still in flight is replaced only once it is done
        (planning removes the step's old files)."""
        with self._lock:
            earlier = [j for s, j in self._inflight.items() if s < job.seq and j.step == job.step]
        for j in earlier:
            j.handle._future.exception()  # waits

    def _ensure_pool(self, job: _Job, need: int, cuda: bool) -> None:
        """Allocate the pool on first use; grow an automatic one (to twice
        the need) once every earlier save has left it."""
        if self.pool is not None and (need <= self.pool.capacity or self._capacity is not None):
            return  # an explicit pool never grows: reserve() raises a clear error
        if self.pool is not None:
            with self._lock:
                earlier = [j for s, j in self._inflight.items() if s < job.seq]
            for j in earlier:
                j.handle._future.exception()  # waits until it is written and committed
            self.pool.close()
            self.pool = None
        capacity = self._capacity or max(2 * need, 1 << 20)
        self.pool = HostBufferPool(capacity, pin=cuda and torch.cuda.is_available(),
                                   shared=self.writer_kind == "process")

    # ------------------------------------------------------- level 2
    def _persist_loop(self) -> None:
        while True:
            job = self._persist_q.get()
            if job is _STOP:
                return
            try:
                location = self._persist(job)
            except BaseException as exc:  # noqa: BLE001
                self._finish(job, None, exc)
            else:
                self._finish(job, location, None)

    def _persist(self, job: _Job) -> str:
        plan = job.plan
        if plan is None:  # failed before planning, on every rank alike
            raise job.error
        plan.group = self._persist_g
        error, sums, parts = job.error, {}, {}
        try:
            try:
                error = self._before_write(plan, error)
                if plan.transfers:
                    agree(plan.group, error)  # nobody enters point-to-point with a failed peer
                if error is None:
                    parts = {**job.chunks, **exchange_parts(plan, job.fragments)}
                    # the writer needs no claim (and a writer process could not receive its thread)
                    portable = dataclasses.replace(plan, ownership=None, release_ownership=False)
                    sums = self._writer.write(portable, job.fragments, parts, job.pool)
            except Exception as exc:  # noqa: BLE001 - commit() raises it on every rank
                error = error or exc
            if self.snapshots is None:  # nothing to keep: the region goes back before the commit
                self._release(job)
            location = self._commit(job, sums, parts, error)  # a failure removes the torn step
            # committed: the chunks this rank wrote go to host memory (from the region, still held)
            keep_in_memory(self.snapshots, plan, job.fragments, parts, sums)
            return location
        finally:
            self._release(job)

    def _before_write(self, plan: SavePlan, error: BaseException | None) -> BaseException | None:
        """Collective hook on the persist group before any chunk is written
        (``error``: this rank's failure so far, returned or replaced)."""
        return error

    def _commit(self, job: _Job, sums: dict, parts: dict, error: BaseException | None) -> str:
        """Collective: commit the step whose chunks were written (``sums``:
        this rank's checksums; ``error``: raised on every rank, nothing
        committed); the committed location."""
        return commit(job.plan, sums, error, on_committed=self._retain)

    @staticmethod
    def _release(job: _Job) -> None:
        if job.region is not None:
            job.pool.release(job.region)
            job.region = None
        job.fragments, job.chunks = {}, {}

    def _retain(self) -> None:
        """Drop committed steps the retention policy no longer keeps (rank 0,
        inside the commit, so every rank's ``wait()`` sees the pruned store);
        best effort: the new step is committed whatever happens here."""
        if not (self.keep_last or self.keep_every):
            return
        try:
            self._drop_unretained()
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"checkpoint retention at {self.url} failed: {exc}", stacklevel=2)

    def _drop_unretained(self) -> None:
        """Retention in commit order (`CheckpointStore.retention`: after a
        rollback the step just committed is the newest, whatever its number)."""
        store = CheckpointStore(self.url)
        committed, keep = store.retention(self.keep_last, self.keep_every)
        with self._lock:
            busy = {j.step for j in self._inflight.values()}
        for step in committed:
            if step not in keep and step not in busy:
                store.delete_step(step)


def _resurface(error: CheckpointSaveError, handle: SaveHandle | None = None) -> CheckpointSaveError:
    """A fresh exception for an earlier failure (the stored one stays with
    its handle), carrying the handle of the save just started."""
    again = CheckpointSaveError(str(error), error.step)
    again.__cause__ = error.__cause__
    again.handle = handle
    return again


# ------------------------------------------------------------- capture

def capture(state: dict) -> dict:
    """A copy of ``state``'s structure that shares its tensors and holds
    copies of its plain values (taken now, via their JSON form, which also
    checks them).  Later changes to the values do not reach the save."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    captured = _capture(state, ())
    flatten(captured)  # key and leaf checks, now
    return captured


def _capture(value, path):
    if isinstance(value, PerRank):
        return PerRank(_capture(value.value, path), value.resolver)
    if isinstance(value, Shard):
        return Shard(value.tensor, value.global_shape, value.offsets)
    if isinstance(value, Flat):
        return Flat(value.tensor, value.global_shape, value.start)
    if isinstance(value, torch.Tensor):
        storage_dtype(value.dtype)  # a dtype a checkpoint cannot hold fails now
        return value
    if isinstance(value, dict) and (not path or _contains_tensors(value)):
        return {k: _capture(v, path + (k,)) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and _contains_tensors(value):
        items = [_capture(v, path + (i,)) for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    return decode_value(encode_value(value, key_of(path)))


def _record_cuda_events(leaves) -> dict:
    """An event on each device's current stream: the snapshot copies wait
    for the work that produced the tensors, not for the whole device."""
    devices = {leaf.tensor.device for leaf in leaves if leaf.tensor is not None and leaf.tensor.is_cuda}
    return {d: torch.cuda.current_stream(d).record_event() for d in devices}


# -------------------------------------------------------------- copying

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _pieces(plan: SavePlan) -> list[tuple[str, object, torch.Tensor]]:
    """What this rank copies: every chunk it writes (a view of its local
    tensor, in the storage dtype), and whole local tensors of the keys whose
    chunks straddle ranks (the exchange needs them)."""
    me = plan.group.rank
    straddling = {tr.key for tr in plan.transfers}
    pieces = []
    for key in sorted(straddling & plan.tensors.keys()):
        pieces.append(("fragment", key, plan.tensors[key].detach()))
    locals_ = {}
    for key, index in plan.my_chunks():
        if key in straddling:
            continue
        if key not in locals_:
            t = plan.tensors[key].detach()
            sd = storage_dtype(t.dtype)
            t = t if sd == t.dtype else t.view(sd)
            locals_[key] = t.unsqueeze(0) if plan.entries[key].placement == "per_rank" else t
        arr = plan.arrays[key]
        cbox = layout.chunk_box(index, arr.shape, arr.chunks)
        origin = next(box for r, box in arr.fragments if r == me)[0]
        pieces.append(("chunk", (key, index), locals_[key][layout.relative(cbox, origin)]))
    return pieces


def _on_cuda(pieces) -> bool:
    return any(src.is_cuda for _, _, src in pieces)


def _copy(pool: HostBufferPool, job: _Job, pieces) -> None:
    """Copy ``pieces`` into the job's region (CUDA: on a side stream that
    first waits for the events recorded at save time)."""
    streams = {}
    offset = 0
    for kind, ident, src in pieces:
        n = _nbytes(src)
        dst = pool.view(job.region, offset, n).view(src.dtype).view(src.shape)
        offset += aligned(n)
        if src.is_cuda:
            if src.device not in streams:
                stream = torch.cuda.Stream(src.device)
                if src.device in job.cuda_events:
                    stream.wait_event(job.cuda_events[src.device])
                streams[src.device] = stream
            with torch.cuda.stream(streams[src.device]):
                dst.copy_(src, non_blocking=True)
        else:
            dst.copy_(src)
        if kind == "fragment":
            job.fragments[ident] = dst
        else:
            job.chunks[ident] = dst.numpy()
    for stream in streams.values():
        stream.synchronize()
