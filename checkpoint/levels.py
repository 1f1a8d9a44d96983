"""The node-local disk level: checkpoints commit on each node's own disk first.

A *local level* is a directory on each node (node-local NVMe, ``/dev/shm``)
laid out like a checkpoint store, holding for each step:

    DIR/step-00000010/state/...     the chunks (and Zarr documents) this node's ranks wrote
    DIR/step-00000010/manifest.json the step's whole manifest (the same on every node)
    DIR/step-00000010/NODES.json    {"nodes": {node id: [ranks...]}}: whose chunks are on which node
    DIR/step-00000010/COMMITTED     the local commit marker, written last

`save_local` commits a step there (collective; every rank writes only to
its own node's DIR); `loom.checkpoint.remote_copy.RemoteCopier` then copies
each rank's files to the remote store in the background and writes the
remote marker last.  A node is named by ``$LOOM_NODE_ID`` or, without it,
the host name (`node_id`).

A `LocalLevel` is also a `loom.checkpoint.memory.SnapshotSource` (tier
``"local"``): `load_levels` reads a step the remote store holds through it,
so each chunk found on this node with the manifest's size and crc32c is read
locally and the rest remotely.  A step committed only locally (its remote
copy still running or failed) is loaded from the local level alone when
every rank finds what it needs on its node (checked like any load: vetted,
every chunk crc32c-checked); otherwise the newest step the remote store
holds is loaded.  Nothing in a local level is trusted: keys are checked to
stay inside DIR, files must be regular, sizes and crc32c must match the
manifest, or the chunk is read remotely.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import stat
import time
from dataclasses import dataclass, field

import numpy as np

from .collective import Group, agree, resolve
from .load import CheckpointInfo, NoCheckpointError, load
from .manifest import InvalidCheckpointError
from .memory import TIERS
from .memory import fetch as fetch_from
from .save import build_manifest, exchange_parts, keep_in_memory, plan_save, write_chunks, written_files
from .state import dumps
from .store import CheckpointStore, step_name

log = logging.getLogger("loom.checkpoint")

NODE_ENV = "LOOM_NODE_ID"
NODES = "NODES.json"
MAX_NODES_JSON = 1 << 20
_KEY = re.compile(r"^step-\d{8,}/[A-Za-z0-9_.%/-]+$")


def node_id(environ=None) -> str:
    """This node's name for the local level: ``$LOOM_NODE_ID`` when set
    (tests simulate several nodes on one machine with it), else the host
    name."""
    env = os.environ if environ is None else environ
    return env.get(NODE_ENV) or socket.gethostname()


def local_dir(path) -> str:
    """``path`` as an absolute local directory; ValueError for a URL
    (anything with ``://`` other than ``file://``) or an empty path."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str) or not text:
        raise ValueError(f"local checkpoint level {path!r} must be a non-empty local directory path")
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise ValueError(f"local checkpoint level {text!r} must be a local directory (node-local disk or "
                         f"/dev/shm), not a URL")
    return os.path.abspath(text)


class _NodeClaim:
    """The claim `plan_save` takes for a local level: none.  Each node's
    DIR is written by this job's ranks on that node only; ownership is
    claimed on the remote store, by the copier."""

    def __init__(self, store: CheckpointStore, holder: bool):
        self.store, self.holder = store, holder

    def check(self) -> None:
        pass

    def begin_step(self, step: int) -> None:
        pass

    def end_step(self, step) -> None:
        pass

    def release(self) -> None:
        pass

    def lost(self):
        return None

    def in_flight(self) -> set:
        return set()


@dataclass
class LocalSave:
    """A step committed at the local level: what its remote copy needs."""
    step: int
    manifest: bytes = field(repr=False)  # the manifest.json bytes (the same on every rank and node)
    files: list       # store keys this rank wrote (its chunks and Zarr documents)
    nbytes: int       # bytes of those files
    location: str     # the step's folder in this node's DIR
    seconds: float    # wall time of the local save


class LocalLevel:
    """One node's DIR of the local level (see the module docstring).
    ``keep_last``: the newest committed steps kept here (retention never
    removes a step that is not durable remotely unless space forces it)."""

    def __init__(self, path, *, node: str | None = None, keep_last: int | None = 2):
        self.path = local_dir(path)
        self.node = node or node_id()
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                      or keep_last < 1):
            raise ValueError(f"keep_last={keep_last!r} must be a positive number of steps or None")
        self.keep_last = keep_last
        self.store = CheckpointStore(self.path)
        self._nodes: dict = {}  # group ranks -> {node: [group ranks]}

    def __repr__(self):
        return f"LocalLevel({self.path!r}, node={self.node!r})"

    # ----------------------------------------------------------- reading
    def committed(self) -> dict[int, str]:
        """{step: manifest sha256} of the steps committed here whose marker
        and manifest are sound (damaged ones are left out, with a warning)."""
        out = {}
        for step in self.store.committed_steps():
            try:
                out[step] = self.store.read_sealed(step)[1]
            except (InvalidCheckpointError, FileNotFoundError) as exc:
                log.warning("local checkpoint step %d at %s is damaged (%s); ignored", step, self.path, exc)
        return out

    def holders(self, step: int) -> dict[str, list[int]] | None:
        """The step's record of which ranks' chunks are on which node, or
        None when it is missing or malformed."""
        try:
            raw = self.store.get(f"{step_name(step)}/{NODES}", MAX_NODES_JSON)
            doc = json.loads(raw) if raw is not None else None
        except (InvalidCheckpointError, ValueError):
            return None
        nodes = doc.get("nodes") if isinstance(doc, dict) else None
        if not isinstance(nodes, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and all(type(r) is int and r >= 0 for r in v)
                for k, v in nodes.items()):
            return None
        return nodes

    def fetch(self, wanted: dict) -> dict:
        """`SnapshotSource.fetch`: the chunk objects of ``wanted`` found in
        DIR, as uint8 arrays with tier ``"local"`` (the reader checks size
        and crc32c).  A key that is not a chunk key or leaves DIR, and a
        file that is not regular, is skipped."""
        root = os.path.realpath(self.path)
        out = {}
        for key in wanted:
            if not isinstance(key, str) or not _KEY.match(key) or ".." in key.split("/"):
                log.warning("local level %s: refusing chunk key %r", self.path, key)
                continue
            path = os.path.join(root, key)
            if os.path.realpath(path) != path:  # a link, or a path leaving DIR
                log.warning("local level %s: %s is a link or leaves the level; ignored", self.path, key)
                continue
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            except OSError:
                continue
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    continue
                buf = np.empty(info.st_size, dtype=np.uint8)
                with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                    got = f.readinto(memoryview(buf))
                if got == info.st_size:
                    out[key] = (buf, "local")
            finally:
                os.close(fd)
        return out

    # ----------------------------------------------------------- writing
    def nodes_of(self, g: Group) -> dict[str, list[int]]:
        """Collective (once per group): {node id: [group ranks on it]}."""
        if g.ranks not in self._nodes:
            names = agree(g, None, self.node)
            nodes: dict = {}
            for rank, name in enumerate(names):
                nodes.setdefault(name, []).append(rank)
            self._nodes[g.ranks] = nodes
        return self._nodes[g.ranks]

    def delete(self, step: int) -> None:
        self.store.delete_step(step)

    def retain(self, durable, busy=(), *, need_bytes: int = 0) -> list[int]:
        """Apply ``keep_last`` to this DIR (called by one rank per node after
        a local commit).  A step older than the newest ``keep_last`` goes
        only when ``durable(step)`` (committed remotely) and it is not in
        ``busy`` (being copied).  When the disk has less than
        ``need_bytes`` free, older steps go even when not durable remotely
        (oldest first, never the newest, never a busy one), with a warning.
        Returns the steps removed."""
        if self.keep_last is None:
            return []
        steps = sorted(self.store.committed_steps())
        removed = []
        for step in steps[:-self.keep_last]:
            if step not in busy and durable(step):
                self.delete(step)
                removed.append(step)
        left = [s for s in steps[:-1] if s not in removed and s not in busy]
        while left and need_bytes and shutil.disk_usage(self.path).free < need_bytes:
            step = left.pop(0)
            log.warning("local checkpoint level %s is short of space (%d bytes free, %d wanted): removing "
                        "step %d, which is %s", self.path, shutil.disk_usage(self.path).free, need_bytes, step,
                        "durable remotely" if durable(step) else "NOT durable remotely")
            self.delete(step)
            removed.append(step)
        return removed


def save_local(state: dict, level: LocalLevel, *, step: int, group=None, mesh=None, durable: bool = False,
               snapshots=None) -> LocalSave:
    """Collective: commit ``state`` as ``step`` at the local level: every
    rank writes its chunks to its own node's DIR; one rank per node then
    writes the manifest, the node record and the local marker there.  A
    failure on any rank raises on every rank and leaves no local marker.
    ``snapshots``: as in `loom.checkpoint.save` (host memory, after the
    commit).  Returns what the remote copy needs (`LocalSave`).
    `loom.checkpoint.local_async.LocalCommitter` does the same from a
    host-memory snapshot, in the background."""
    t0 = time.monotonic()
    g = resolve(group)
    plan = plan_local(state, level, step=step, group=g, mesh=mesh, durable=durable)
    agree(g, begin_local(level, g, step))
    error, sums, parts = None, {}, {}
    try:
        parts = exchange_parts(plan, plan.tensors)
        sums = write_chunks(plan, plan.tensors, parts)
    except Exception as exc:  # noqa: BLE001
        error = exc
    saved = commit_local(plan, level, plan.tensors, parts, sums, error, t0=t0)
    keep_in_memory(snapshots, plan, plan.tensors, parts, sums, settle=True)
    return saved


def plan_local(state: dict, level: LocalLevel, *, step: int, group=None, mesh=None, durable: bool = False):
    """Collective: `plan_save` of ``step`` into the local level (no claim:
    each node's DIR is this job's own)."""
    g = resolve(group)
    return plan_save(state, level.store.url, step=step, group=g, mesh=mesh, durable=durable,
                     ownership=local_claim(level, g))


def local_claim(level: LocalLevel, g: Group) -> "_NodeClaim":
    """The (empty) claim a local level's plans carry."""
    return _NodeClaim(level.store, g.rank == 0)


def _leader(level: LocalLevel, g: Group) -> bool:
    """This rank writes its node's manifest, record and marker (the node's lowest rank)."""
    nodes = level.nodes_of(g)
    return level.node in nodes and min(nodes[level.node]) == g.rank


def begin_local(level: LocalLevel, g: Group, step: int) -> BaseException | None:
    """Before any chunk of ``step`` is written: the node's leader removes
    an older save of the step from its DIR.  Returns this rank's failure
    (for the caller's agreement), never raises."""
    if not _leader(level, g):
        return None
    try:
        level.store.begin(step)
    except Exception as exc:  # noqa: BLE001 - every rank must learn of it
        return exc
    return None


def commit_local(plan, level: LocalLevel, tensors: dict, parts: dict, sums: dict, error: BaseException | None,
                 *, t0: float) -> LocalSave:
    """Collective over ``plan.group``, once every rank has written its
    chunks (``sums``; ``error``: this rank's failure): each node's leader
    writes the manifest, the node record and the local marker, last.  A
    failure on any rank raises on every rank and leaves no local marker.
    ``tensors``/``parts``: what the chunks were written from (the files
    this rank wrote are listed from them); ``t0``: the save's start
    (`time.monotonic`)."""
    g, level_store, step = plan.group, level.store, plan.step
    nodes, leader = level.nodes_of(g), _leader(level, g)
    files, nbytes = [], 0
    if error is None:
        try:
            files = written_files(plan, tensors, parts)
            nbytes = sum(os.path.getsize(level_store.path(rel)) for rel in files)
        except Exception as exc:  # noqa: BLE001
            error = exc
    everyone = agree(g, error, {"sums": sums, "created": time.time()})
    error, manifest = None, b""
    try:
        manifest = build_manifest(plan, [p["sums"] for p in everyone], everyone[0]["created"]).to_json()
        if leader:
            record = {"nodes": {name: [g.global_rank(r) for r in ranks] for name, ranks in nodes.items()}}
            level_store.put(f"{step_name(step)}/{NODES}", dumps(record).encode())
            level_store.commit(step, manifest, durable=plan.durable)
    except Exception as exc:  # noqa: BLE001
        error = exc
    try:
        agree(g, error)
    except BaseException:
        if leader and level_store.marker(step) is not None:
            level_store.delete_step(step)  # the step failed on another node: no half-committed level
        raise
    return LocalSave(step=step, manifest=manifest, files=files, nbytes=nbytes, location=level_store.location(step),
                     seconds=time.monotonic() - t0)


# ------------------------------------------------------------------ load

class _Chain:
    """Sources asked in order; each is asked only for what the earlier
    ones did not serve."""

    def __init__(self, *sources):
        self.sources = [s for s in sources if s is not None]

    def fetch(self, wanted: dict) -> dict:
        out: dict = {}
        for source in self.sources:
            rest = {k: v for k, v in wanted.items() if k not in out}
            if not rest:
                break
            out.update(fetch_from(source, rest))
        return out


def _remote_steps(url: str) -> list[int]:
    try:
        return CheckpointStore(url).committed_steps()
    except Exception as exc:  # noqa: BLE001 - the local level may still serve
        log.warning("listing the remote checkpoint store %s failed (%s: %s); only the local level can serve",
                    url, type(exc).__name__, exc)
        return []


def load_levels(state: dict, url: str, level: LocalLevel, *, group=None, strict: bool = True,
                fallback: bool = False, memory=None) -> CheckpointInfo:
    """Collective: load the newest step found at the nearest level.

    One agreement collects every rank's locally committed steps (with their
    manifest's sha256) and rank 0's listing of the remote store at ``url``.
    The newest step among those committed remotely and those committed
    locally on every rank (same manifest) is loaded: a remote one through
    ``memory`` (host memory, if given) then this node's DIR, the rest from
    ``url`` (partly local, partly remote, every chunk crc32c-checked); a
    local-only one from each rank's DIR, which works when every rank finds
    every chunk it needs on its node, and otherwise (on every rank alike)
    passes to the next candidate.  ``info.tiers`` counts ``"local"``
    bytes.  ``fallback``: as in `load` (damaged remote steps are passed
    over).  Raises NoCheckpointError when no level holds a step."""
    g = resolve(group)
    mine = {str(s): sha for s, sha in level.committed().items()}
    payload = {"local": mine, "remote": _remote_steps(url) if g.rank == 0 else None}
    everyone = agree(g, None, payload)
    remote = set(everyone[0]["remote"])
    shas = [p["local"] for p in everyone]
    local = {int(s) for s, sha in shas[0].items() if all(other.get(s) == sha for other in shas[1:])}
    candidates = sorted(local | remote, reverse=True)
    if not candidates:
        raise NoCheckpointError(f"no committed checkpoint at {url} nor at the local level {level.path}")
    skipped: list = []
    for n, step in enumerate(candidates):
        last = n == len(candidates) - 1
        try:
            if step in remote:
                info = load(state, url, step=step, group=g, strict=strict, memory=_Chain(memory, level))
            else:
                info = load(state, level.store.url, step=step, group=g, strict=strict, memory=memory)
                _as_local(info)
        except (InvalidCheckpointError, FileNotFoundError) as exc:
            if isinstance(exc, NoCheckpointError) or last or (step in remote and not fallback):
                raise
            where = "remote" if step in remote else "local"
            log.warning("checkpoint step %d could not be loaded from the %s level (%s); trying step %d",
                        step, where, exc, candidates[n + 1])
            skipped.append({"step": step, "error": f"{where} level: {exc}"})
            continue
        info.skipped = skipped + info.skipped
        return info
    raise AssertionError("unreachable")  # pragma: no cover


def _as_local(info: CheckpointInfo) -> None:
    """A load from the local level's DIR: its store bytes are local bytes."""
    for tiers in [info.tiers, *info.tiers_by_rank]:
        tiers["local"] = tiers.get("local", 0) + tiers.pop("storage", 0)
        tiers["storage"] = 0
        for t in TIERS:
            tiers.setdefault(t, 0)


def levels_of(url: str, local: LocalLevel | None) -> dict[int, list[str]]:
    """{step: the levels committing it ("local", "remote")} for `loom ckpt ls`."""
    out: dict = {}
    for step in _remote_steps(url):
        out.setdefault(step, []).append("remote")
    if local is not None:
        for step in local.committed():
            out.setdefault(step, []).insert(0, "local")
    return dict(sorted(out.items()))
