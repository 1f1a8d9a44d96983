"""`LocalCommitter`: the node-local level's commit in the background (memory -> local -> remote).

The three levels of DataStates-LLM: `save` returns at once and the
training loop waits only for the host-memory snapshot (the attached
optimizer's next step, as in `loom.checkpoint.async_engine`); a background
thread then writes the snapshot to each node's DIR of the local level and
commits it there (`loom.checkpoint.levels.commit_local`: each node's
leader writes the manifest, the node record and the local marker last),
and hands the committed step on (``then``: `MultiLevel` queues its remote
copy).  The snapshot, the pool, the ordering, the process groups of its
own and the failure reporting are `AsyncCheckpointer`'s: a local commit
that fails on any rank fails on every rank, commits nothing at the local
level and raises `CheckpointSaveError` from the next `save`, `wait` or
`close`.  A process killed during the background write leaves no marker:
the step is simply not committed and a resume finds the previous one.
"""
from __future__ import annotations

import logging
import time

from .async_engine import AsyncCheckpointer, _Job
from .collective import agree
from .levels import LocalLevel, begin_local, commit_local, local_claim
from .save import SavePlan

log = logging.getLogger("loom.checkpoint")


class LocalCommitter(AsyncCheckpointer):
    """Asynchronous saves into the local level ``level`` (see the module
    docstring).  Collective to construct over ``group`` (it makes two
    background process groups, as `AsyncCheckpointer` does).  ``then(saved)``
    is called with each committed step's `LocalSave` on the persist thread,
    on every rank, before the save's handle is done (a wait there, such as
    the remote copies' backpressure, holds the next save).  ``mesh``,
    ``durable``, ``snapshots``, ``host_buffer_bytes``: as in
    `AsyncCheckpointer`.  No retention here: the caller keeps the level."""

    def __init__(self, level: LocalLevel, *, group=None, mesh=None, durable: bool = False, snapshots=None,
                 host_buffer_bytes: int | None = None, then=None):
        if not isinstance(level, LocalLevel):
            raise TypeError(f"level must be a LocalLevel, got {type(level).__name__}")
        self.level, self.then = level, then
        super().__init__(level.store.url, group=group, host_buffer_bytes=host_buffer_bytes, mesh=mesh,
                         durable=durable, snapshots=snapshots)
        level.nodes_of(self._g)  # collective, once: the persist thread reuses it (same ranks)

    def _claim(self, job, takeover, lease_s):
        return local_claim(self.level, self._g)  # each node's DIR is this job's own: nothing to claim

    def _before_write(self, plan: SavePlan, error: BaseException | None) -> BaseException | None:
        try:
            agree(plan.group, error or begin_local(self.level, plan.group, plan.step))
        except Exception as exc:  # noqa: BLE001 - the same on every rank; the commit raises it
            return exc
        return None

    def _commit(self, job: _Job, sums: dict, parts: dict, error: BaseException | None) -> str:
        since = time.perf_counter() - job.t_snapshot  # LocalSave.seconds: from the snapshot to the commit
        saved = commit_local(job.plan, self.level, job.fragments, parts, sums, error, t0=time.monotonic() - since)
        if self.then is not None:
            try:
                self.then(saved)
            except Exception as exc:  # noqa: BLE001 - the step is committed locally on every rank
                log.warning("checkpoint step %d is committed at the local level %s, but handing it on "
                            "failed (%s: %s)", saved.step, self.level.path, type(exc).__name__, exc)
        return saved.location
