"""`RemoteCopier`: steps committed at the local level, copied to the remote store in the background.

Each rank's copier thread copies the files its rank wrote at the local
level (`loom.checkpoint.levels.LocalSave.files`) to the same keys under the
remote URL (``fs.put_file`` on the save's I/O threads: multipart uploads
for large chunks on object stores); once every rank has copied (an agreement over the copier's group,
which must be a group of its own, used by nothing else), rank 0 checks the
job's claim on the remote store and writes the manifest and the remote
commit marker last (`CheckpointStore.commit`), then applies the remote
retention.  Steps are copied one at a time, in the order submitted (the
same on every rank).

A copy that fails on any rank (the server is gone, the claim was taken)
fails on every rank: the step stays committed locally only, the failure is
reported through `results` (and logged, naming the step and the error), and
the next step is tried afresh.  ``max_pending`` bounds the steps waiting
for their remote copy: `submit` blocks (backpressure) while that many are
pending, and says so through ``on_event``.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .collective import agree, resolve
from .levels import LocalLevel, LocalSave
from .owner import claim_store
from .retention import gc
from .save import IO_THREADS
from .store import CheckpointStore, step_name

log = logging.getLogger("loom.checkpoint")


class RemoteCopier:
    """Background copies of local-level steps to ``url`` (see the module
    docstring).  Collective to construct over ``group``; ``ownership``: this
    job's claim on ``url`` (`claim_store` over the same ranks), made here
    when None.  ``keep_last``/``keep_every``: the remote retention.
    ``on_event(text)``: called (on the submitting thread) for waits."""

    def __init__(self, url: str, level: LocalLevel, *, group=None, ownership=None, max_pending: int = 1,
                 keep_last: int | None = None, keep_every: int | None = None, durable: bool = False,
                 job: str | None = None, takeover: bool | str = False, on_event=None):
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending={max_pending!r} must be a positive number of steps")
        self.url, self.level, self.g = url, level, resolve(group)
        self.remote = CheckpointStore(url)
        self.ownership = ownership if ownership is not None else claim_store(
            url, group=self.g, job=job, takeover=takeover, keep=True)
        self.max_pending, self.durable_writes = max_pending, durable
        self.keep_last, self.keep_every = keep_last, keep_every
        self.on_event = on_event
        self.durable: set[int] = set()   # steps committed remotely by this copier
        self.failed: dict[int, str] = {}  # step -> why its copy failed
        self.pending: list[int] = []      # steps submitted, not finished (oldest first)
        self._done: list[dict] = []       # finished copies not yet taken by `results`
        self._cond = threading.Condition()
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="loom-remote-copy", daemon=True)
        self._thread.start()

    # ------------------------------------------------------- the caller
    def submit(self, saved: LocalSave) -> float:
        """Queue ``saved``'s remote copy; returns the seconds spent waiting
        for room (backpressure: ``max_pending`` steps were pending)."""
        waited = 0.0
        with self._cond:
            if len(self.pending) >= self.max_pending:
                self.say(f"checkpoint step {saved.step}: waiting for the remote copy of step "
                          f"{self.pending[0]} ({len(self.pending)} step(s) pending, at most {self.max_pending})")
                t0 = time.monotonic()
                self._cond.wait_for(lambda: len(self.pending) < self.max_pending)
                waited = time.monotonic() - t0
            self.pending.append(saved.step)
        self._jobs.put(saved)
        return waited

    def busy(self) -> set[int]:
        with self._cond:
            return set(self.pending)

    def is_durable(self, step: int) -> bool:
        with self._cond:
            return step in self.durable

    def results(self) -> list[dict]:
        """Copies finished since the last call: [{"step", "error" (None or
        text), "seconds" (the copy), "finished" (time.monotonic()), "nbytes"}]."""
        with self._cond:
            done, self._done = self._done, []
        return done

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no copy is pending; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self.pending, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Finish the pending copies (up to ``timeout``) and stop the thread."""
        self.wait(timeout)
        self._jobs.put(None)
        self._thread.join(timeout)

    def say(self, text: str) -> None:
        """Log ``text`` and pass it to ``on_event`` (the waits it announces)."""
        log.info(text)
        if self.on_event is not None:
            self.on_event(text)

    # ------------------------------------------------------- the thread
    def _loop(self) -> None:
        while True:
            saved = self._jobs.get()
            if saved is None:
                return
            t0 = time.monotonic()
            try:
                self._copy(saved)
                error = None
            except Exception as exc:  # noqa: BLE001 - reported; the local commit stands
                error = f"{type(exc).__name__}: {exc}"
                log.warning("the remote copy of checkpoint step %d to %s failed (%s); the step stays "
                            "committed at the local level %s", saved.step, self.url, error, self.level.path)
            with self._cond:
                self.pending.remove(saved.step)
                if error is None:
                    self.durable.add(saved.step)
                    self.failed.pop(saved.step, None)
                else:
                    self.failed[saved.step] = error
                now = time.monotonic()
                self._done.append({"step": saved.step, "error": error, "seconds": now - t0, "finished": now,
                                   "nbytes": saved.nbytes})
                self._cond.notify_all()

    def _copy(self, saved: LocalSave) -> None:
        g, step, remote = self.g, saved.step, self.remote
        error = None
        if g.rank == 0:
            try:
                self.ownership.check()
                self.ownership.begin_step(step)
                remote.begin(step)  # an older copy of this step goes first, marker first
            except Exception as exc:  # noqa: BLE001 - every rank must learn of it
                error = exc
        try:
            agree(g, error)
            error = None
            try:
                with ThreadPoolExecutor(max(1, min(IO_THREADS, len(saved.files)))) as pool:
                    for _ in pool.map(self._put, saved.files):
                        pass
            except Exception as exc:  # noqa: BLE001
                error = exc
            agree(g, error)
            error = None
            if g.rank == 0:
                try:
                    self.ownership.check()
                    remote.commit(step, saved.manifest, durable=self.durable_writes)  # the marker last
                except Exception as exc:  # noqa: BLE001
                    error = exc
                if error is None:
                    self._retain()
            agree(g, error)
        except BaseException:
            if g.rank == 0:
                _discard(remote, step)
            raise
        finally:
            if g.rank == 0:
                self.ownership.end_step(step)

    def _put(self, rel: str) -> None:
        """Copy one file of the local level to the same key remotely."""
        remote = self.remote
        if remote.local:  # a shared filesystem: folders first (object stores have none)
            remote.fs.makedirs(remote.path(rel).rsplit("/", 1)[0], exist_ok=True)
        remote.fs.put_file(self.level.store.path(rel), remote.path(rel))

    def _retain(self) -> None:
        if not self.keep_last:
            return
        try:
            gc(self.url, keep_last=self.keep_last, keep_every=self.keep_every)
        except Exception as exc:  # noqa: BLE001 - the commit stands
            log.warning("remote retention at %s failed (%s: %s)", self.url, type(exc).__name__, exc)


def _discard(remote: CheckpointStore, step: int) -> None:
    """Best effort: remove a failed copy's files (invisible without a marker)."""
    try:
        if remote.marker(step) is None:
            remote.remove(step_name(step), recursive=True)
    except Exception:  # noqa: BLE001
        pass
