"""`MultiLevel`: the library face of multi-level checkpoints.

    from loom import checkpoint as ckpt
    levels = ckpt.MultiLevel("s3://bucket/run1", "/local_nvme/run1", keep_last_local=2, keep_last=5)
    levels.save(state, step=100)     # commits on each node's disk, copies to S3 in the background
    info = levels.load(state)        # newest step at the nearest level; info.tiers["local"]
    levels.close()                   # waits for the pending remote copies

Collective over ``group`` like `save`/`load`.  The remote copies agree over a
process group of their own (``copy_group``: one used by nothing else, made
by the caller, e.g. ``loom.comms.new_group(background=True)``; not needed in
a single process).  See `loom.checkpoint.levels` and
`loom.checkpoint.remote_copy`.
"""
from __future__ import annotations

from .collective import resolve
from .levels import LocalLevel, LocalSave, levels_of, load_levels, save_local
from .remote_copy import RemoteCopier


class MultiLevel:
    """A node-local level (``local``: a directory on each node) under the
    remote store ``url``.  ``keep_last_local``: steps kept per node (a step
    not yet durable remotely is kept unless space forces it);
    ``keep_last``/``keep_every``: the remote retention; ``max_pending``:
    steps that may wait for their remote copy before `save` blocks.
    ``ownership``: this job's claim on ``url`` (made here when None)."""

    def __init__(self, url: str, local, *, group=None, copy_group=None, keep_last_local: int | None = 2,
                 keep_last: int | None = None, keep_every: int | None = None, max_pending: int = 1,
                 durable: bool = False, mesh=None, ownership=None, job: str | None = None,
                 takeover: bool | str = False, on_event=None, node: str | None = None):
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
        self.last: LocalSave | None = None
        self.waited_s = 0.0  # the last save's wait for room among the pending copies

    def save(self, state: dict, *, step: int, snapshots=None) -> LocalSave:
        """Collective: commit ``step`` at the local level, queue its remote
        copy (blocking while ``max_pending`` copies are pending) and apply the
        local retention.  Returns the `LocalSave` (its ``seconds``: the
        local commit)."""
        saved = save_local(state, self.level, step=step, group=self.group, mesh=self.mesh,
                           durable=self.durable, snapshots=snapshots)
        self.waited_s = self.copier.submit(saved)
        g = resolve(self.group)
        nodes = self.level.nodes_of(g)
        if min(nodes.get(self.level.node, [g.rank])) == g.rank:  # one rank per node keeps its DIR
            self.level.retain(self.copier.is_durable, self.copier.busy(),
                              need_bytes=2 * saved.nbytes * len(nodes.get(self.level.node, [0])))
        self.last = saved
        return saved

    def load(self, state: dict, *, strict: bool = True, fallback: bool = False, memory=None):
        """Collective: `load_levels` (the newest step at the nearest level)."""
        return load_levels(state, self.url, self.level, group=self.group, strict=strict, fallback=fallback,
                           memory=memory)

    def levels(self) -> dict[int, list[str]]:
        """{step: ["local", "remote"] or one of them} as seen from this node."""
        return levels_of(self.url, self.level)

    def close(self, timeout: float | None = None) -> None:
        """Wait for the pending remote copies (up to ``timeout``), then stop."""
        self.copier.close(timeout)


def _plain(url: str) -> str:
    import os
    text = url[len("file://"):] if url.startswith("file://") else url
    return os.path.abspath(text).rstrip("/") if "://" not in text else text
