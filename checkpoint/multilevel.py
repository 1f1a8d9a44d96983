"""`MultiLevel`: the library face of multi-level checkpoints.

    from loom import checkpoint as ckpt
    levels = ckpt.MultiLevel("s3://bucket/run1", "/local_nvme/run1", keep_last_local=2, keep_last=5)
    levels.save(state, step=100)     # commits on each node's disk, copies to S3 in the background
    info = levels.load(state)        # newest step at the nearest level; info.tiers["local"]
    levels.close()                   # waits for the pending remote copies

With ``background=True`` the local commit runs in the background too
(memory -> local -> remote, as in DataStates-LLM): `save` returns a
`SaveHandle` at once, the training loop waits only for the host-memory
snapshot (``levels.attach(optimizer)``: its next step waits while the
snapshot is unfinished), and a background thread commits the step at the
local level, then queues its remote copy (`loom.checkpoint.local_async`).
A save waits while the previous step's local commit is running; a failed
local commit raises `CheckpointSaveError` from the next `save` or `close`
on every rank (a failed remote copy stays a warning, as without it).

Collective over ``group`` like `save`/`load`.  The remote copies agree over a
process group of their own (``copy_group``: one used by nothing else, made
by the caller, e.g. ``loom.comms.new_group(background=True)``; not needed in
a single process).  See `loom.checkpoint.levels` and
`loom.checkpoint.remote_copy`.
"""
from __future__ import annotations

import time

from .async_engine import CheckpointSaveError, SaveHandle
from .collective import resolve
from .levels import LocalLevel, LocalSave, levels_of, load_levels, save_local
from .local_async import LocalCommitter
from .remote_copy import RemoteCopier


class MultiLevel:
    """A node-local level (``local``: a directory on each node) under the
    remote store ``url``.  ``keep_last_local``: steps kept per node (a step
    not yet durable remotely is kept unless space forces it);
    ``keep_last``/``keep_every``: the remote retention; ``max_pending``:
    steps that may wait for their remote copy before `save` blocks.
    ``ownership``: this job's claim on ``url`` (made here when None).
    ``background``: the local commit runs in the background from a
    host-memory snapshot (see the module docstring; collective: two more
    background process groups are made here); ``snapshots`` (a
    `loom.checkpoint.memory.SnapshotSink`) and ``host_buffer_bytes`` then
    go to its `LocalCommitter`."""

    def __init__(self, url: str, local, *, group=None, copy_group=None, keep_last_local: int | None = 2,
                 keep_last: int | None = None, keep_every: int | None = None, max_pending: int = 1,
                 durable: bool = False, mesh=None, ownership=None, job: str | None = None,
                 takeover: bool | str = False, on_event=None, node: str | None = None,
                 background: bool = False, snapshots=None, host_buffer_bytes: int | None = None):
        if not isinstance(background, bool):
            raise TypeError(f"background={background!r} must be True or False")
        if not background and (snapshots is not None or host_buffer_bytes is not None):
            raise ValueError("snapshots= and host_buffer_bytes= are for background=True (without it, give "
                             "snapshots to each save)")
        g = resolve(group)
        if g.distributed and g.size > 1 and copy_group is None:
            raise ValueError("MultiLevel over several ranks needs copy_group: a process group of its own for "
                             "the background copies (loom.comms.new_group(background=True))")
        self.url, self.group, self.mesh, self.durable = url, group, mesh, durable
        self.level = local if isinstance(local, LocalLevel) else LocalLevel(local, node=node,
                                                                           keep_last=keep_last_local)
        if self.level.path.rstrip("/") == _plain(url):
            raise ValueError(f"the local level {self.level.path!r} is the remote store itself; give a "
                             f"node-local directory and a shared or remote URL")
        self.copier = RemoteCopier(url, self.level, group=copy_group, ownership=ownership,
                                   max_pending=max_pending, keep_last=keep_last, keep_every=keep_every,
                                   durable=durable, job=job, takeover=takeover, on_event=on_event)
        self.last: LocalSave | None = None  # the newest step committed at the local level
        self.waited_s = 0.0  # the last save's wait: for room among the pending copies (background:
        #                      for the previous step's local commit, which includes that)
        self.committer = None
        self._handle: SaveHandle | None = None  # background: the newest save
        if background:
            try:
                self.committer = LocalCommitter(self.level, group=group, mesh=mesh, durable=durable,
                                                snapshots=snapshots, host_buffer_bytes=host_buffer_bytes,
                                                then=self._hand_on)
            except BaseException:
                self.copier.close(0)
                raise

    def save(self, state: dict, *, step: int, snapshots=None) -> LocalSave | SaveHandle:
        """Collective: commit ``step`` at the local level, queue its remote
        copy (blocking while ``max_pending`` copies are pending) and apply the
        local retention.  Returns the `LocalSave` (its ``seconds``: the
        local commit).

        ``background=True``: waits while the previous step's local commit
        is running, starts this one (the tensors are copied to host memory
        in the background; attach the optimizer or call `wait_snapshot`
        before changing them) and returns its `SaveHandle` (``result()``:
        the local location); an earlier failed local commit raises
        `CheckpointSaveError` here, on every rank."""
        if self.committer is not None:
            return self._save_background(state, step, snapshots)
        saved = save_local(state, self.level, step=step, group=self.group, mesh=self.mesh,
                           durable=self.durable, snapshots=snapshots)
        self.waited_s = self.copier.submit(saved)
        self._keep(saved)
        return saved

    def _save_background(self, state: dict, step: int, snapshots) -> SaveHandle:
        if snapshots is not None and snapshots is not self.committer.snapshots:
            raise ValueError("with background=True the host-memory sink is given once, as "
                             "MultiLevel(snapshots=...)")
        t0 = time.perf_counter()
        previous = self._handle
        if previous is not None and not previous.done():
            self.copier.say(f"checkpoint step {step}: waiting for the local commit of step {previous.step}")
            previous.wait()
        self.waited_s = time.perf_counter() - t0
        try:
            handle = self.committer.save(state, step=step)
        except CheckpointSaveError as exc:  # an earlier local commit failed; this save was started
            self._handle = getattr(exc, "handle", None) or self._handle
            raise
        handle.stats["blocked_s"] += self.waited_s  # part of what the save cost the loop
        self._handle = handle
        return handle

    def _hand_on(self, saved: LocalSave) -> None:
        """Background: a step committed at the local level goes on to its remote copy."""
        self.copier.submit(saved)
        self._keep(saved)

    def _keep(self, saved: LocalSave) -> None:
        """The local retention after ``saved``'s commit (one rank per node keeps its DIR)."""
        g = resolve(self.group)
        nodes = self.level.nodes_of(g)
        if min(nodes.get(self.level.node, [g.rank])) == g.rank:
            self.level.retain(self.copier.is_durable, self.copier.busy(),
                              need_bytes=2 * saved.nbytes * len(nodes.get(self.level.node, [0])))
        self.last = saved

    def attach(self, optimizer) -> None:
        """Background: ``optimizer.step()`` waits while a snapshot is
        unfinished (`AsyncCheckpointer.attach`); nothing to do without."""
        if self.committer is not None:
            self.committer.attach(optimizer)

    def wait_snapshot(self) -> None:
        """Background: until every save has been copied to host memory."""
        if self.committer is not None:
            self.committer.wait_snapshot()

    def wait_local(self) -> None:
        """Background: until every save is committed at the local level (and
        its remote copy queued); raises the first failure not yet raised."""
        if self.committer is not None:
            self.committer.wait()

    def load(self, state: dict, *, strict: bool = True, fallback: bool = False, memory=None):
        """Collective: `load_levels` (the newest step at the nearest level)."""
        return load_levels(state, self.url, self.level, group=self.group, strict=strict, fallback=fallback,
                           memory=memory)

    def levels(self) -> dict[int, list[str]]:
        """{step: ["local", "remote"] or one of them} as seen from this node."""
        return levels_of(self.url, self.level)

    def close(self, timeout: float | None = None) -> None:
        """Wait for the local commits (background; a failure not yet raised
        raises here, after the rest is stopped) and the pending remote copies
        (up to ``timeout``), then stop."""
        try:
            if self.committer is not None:
                self.committer.close()
        finally:
            self.copier.close(timeout)


def _plain(url: str) -> str:
    import os
    text = url[len("file://"):] if url.startswith("file://") else url
    return os.path.abspath(text).rstrip("/") if "://" not in text else text
