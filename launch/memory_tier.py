"""Checkpoint snapshots held in host memory on the job's Ray nodes.

A restart reloads the newest committed checkpoint from memory when it can:

- The driver starts one `SnapshotHolder` actor (``num_cpus=0``) on every
  node the job's workers use (`holders_env`, each attempt; a holder
  survives attempts, only a lost node takes its holder along) and names
  them to the ranks in ``LOOM_SNAPSHOT_HOLDERS``.
- After each committed checkpoint every rank hands the chunks it wrote
  (`RaySnapshots.keep`, on the async checkpointer's persist thread, or after
  a sync save) to the holder on its own node and to the holder on a peer
  node (the next node of the job in node-id order; none when the job runs
  on one node).  A holder copies them into objects it owns (Ray frees an
  object with the process that put it: a dead rank's copy would die with
  it) and keeps only the newest committed step, dropping older ones.
- A resuming rank reads through them (`RaySnapshots.fetch`): its own
  node's holder first, then the others; `loom.checkpoint.load` takes a
  chunk from memory only when its size and crc32c are the manifest's of the
  step chosen from storage, and reads the rest from storage.

Memory: each node holds its ranks' newest snapshot and one peer node's
(twice the job's checkpoint bytes over the job's nodes), in Ray's object
store (which spills to local disk when full: such a "memory" reload then
reads that disk).  Under torchrun there are no holders: reloads read storage.
"""
from __future__ import annotations

import json
import logging
import time
import os
import threading

log = logging.getLogger("loom.launch")

HOLDERS_ENV = "LOOM_SNAPSHOT_HOLDERS"
_PREFIX = "loom-snapshots-"
NAMESPACE = "loom-snapshots"  # the holders' own Ray namespace (the driver's may be anonymous)
FETCH_TIMEOUT_S = 60.0  # a holder that does not answer in time serves nothing (storage does)


class SnapshotHolder:
    """The copies a node keeps: per rank, its chunks of the newest committed
    step (``{store key: (crc32c, ObjectRef owned by this actor, bytes)}``).
    Ranks hand a step over only once it is committed, so a step arriving
    makes every other step held here an older commit: they are dropped
    (also those of ranks a resized job no longer has)."""

    def __init__(self):
        self._held: dict = {}  # rank -> (step, {store key: (crc32c, ref, nbytes)})

    def keep(self, rank: int, step: int, payload: list, checksums: dict) -> int:
        """Copy the chunks in ``payload[0]`` (a reference to {store key:
        array}, put by the rank) into objects of this actor; drops every
        other step held.  Returns the bytes kept (0 when the rank's object
        was gone)."""
        import ray
        try:
            chunks = ray.get(payload[0])
        except ray.exceptions.RayError as exc:  # the rank died before its copy arrived
            log.warning("snapshot of rank %d step %d lost before it was copied: %s", rank, step, type(exc).__name__)
            return 0
        kept = {key: (int(checksums[key]), ray.put(data), int(data.nbytes)) for key, data in chunks.items()}
        del chunks
        self._held = {r: held for r, held in self._held.items() if held[0] == step and r != rank}
        self._held[rank] = (step, kept)
        return sum(n for _, _, n in kept.values())

    def lookup(self, wanted: dict) -> dict:
        """{store key: [ref]} of the chunks held with exactly the crc32c
        ``wanted`` gives ({store key: crc32c})."""
        found = {}
        for _, chunks in self._held.values():
            for key, (crc, ref, _) in chunks.items():
                if wanted.get(key) == crc:
                    found[key] = [ref]
        return found

    def stats(self) -> dict:
        """{rank: {"step", "bytes"}} of what is held."""
        return {rank: {"step": step, "bytes": sum(n for _, _, n in chunks.values())}
                for rank, (step, chunks) in self._held.items()}

    def clear(self) -> None:
        self._held.clear()


def holder_name(token: str, node: str) -> str:
    return f"{_PREFIX}{token}-{node}"


def holders_env(token: str, nodes: list[str], handles: dict) -> dict:
    """The driver's part, each attempt: a holder on each of ``nodes`` (Ray
    node ids) that has none yet, and the workers' environment naming every
    holder of the job on a node Ray counts alive (``token``: the job's id,
    `Recovery.token`; a rank skips a holder it cannot reach).
    ``handles`` ({node: handle}, kept by the driver for the whole job)
    keeps the holders alive: Ray ends an actor whose handles are all gone.
    Nothing here waits for a holder to start: a new node's holder starts
    while the workers do (it holds nothing yet anyway)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    cls = ray.remote(SnapshotHolder)
    for node in dict.fromkeys(nodes):
        if node in handles:  # the first handle is kept (dropping it would end the actor)
            continue
        handles[node] = cls.options(name=holder_name(token, node), get_if_exists=True, num_cpus=0, max_restarts=0,
                                    namespace=NAMESPACE,
                                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}  # a lost node's holder went with it
    return {HOLDERS_ENV: json.dumps({node: holder_name(token, node) for node in sorted(handles) if node in alive})}


def release_holders(token: str, handles: dict, wait_s: float = 10.0) -> None:
    """Stop the job's holders (the driver, when the job ends) and wait, at
    most ``wait_s`` seconds, until they are gone: ``ray.kill`` only asks, and a
    holder still answering would serve a later reader bytes of a job that has
    ended.  ``token`` names them in log lines."""
    import ray
    killed = []
    for node, handle in list(handles.items()):
        try:
            ray.kill(handle)
            killed.append((node, handle))
        except ray.exceptions.RayError as exc:  # its node is gone already
            log.info("snapshot holder %s: %s", holder_name(token, node)[:40], type(exc).__name__)
    handles.clear()
    deadline = time.monotonic() + wait_s
    for node, handle in killed:
        while time.monotonic() < deadline:
            try:
                ray.get(handle.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.RayError:  # gone (RayActorError), its node too, or no answer in time
                break
            time.sleep(0.05)
        else:
            log.warning("snapshot holder %s still answers %.0f s after it was killed",
                        holder_name(token, node)[:40], wait_s)


class RaySnapshots:
    """A rank's view of the holders: a `loom.checkpoint.memory` sink (`keep`)
    and source (`fetch`).  ``holders``: {node id: actor name}; ``node``:
    this rank's node id."""

    def __init__(self, holders: dict, node: str, rank: int):
        import ray
        self.rank, self.node = rank, node
        self.names = dict(holders)
        ordered = sorted(self.names)
        self.peer = None
        if node in self.names and len(ordered) > 1:
            self.peer = ordered[(ordered.index(node) + 1) % len(ordered)]
        self._ray = ray
        self._actors: dict = {}
        self._handing: threading.Thread | None = None  # the newest handoff to the holders (`keep`)

    @classmethod
    def from_env(cls, rank: int, environ=None) -> "RaySnapshots | None":
        """The holders named in ``LOOM_SNAPSHOT_HOLDERS`` (None without: torchrun, or turned off)."""
        environ = os.environ if environ is None else environ
        text = environ.get(HOLDERS_ENV)
        if not text:
            return None
        import ray
        if not ray.is_initialized():
            return None
        return cls(json.loads(text), ray.get_runtime_context().get_node_id(), rank)

    def describe(self) -> str:
        peer = f"peer node {self.peer[:12]}" if self.peer else "peer copy: none (the job runs on one node)"
        return f"snapshots in host memory: this node's holder, {peer}"

    def _actor(self, node: str):
        if node not in self._actors:
            self._actors[node] = self._ray.get_actor(self.names[node], namespace=NAMESPACE)
        return self._actors[node]

    def keep(self, step: int, chunks: dict, checksums: dict) -> None:
        """Put the chunks once (a copy, owned by this rank: the caller may
        reuse their memory when this returns) and have this node's holder and
        the peer's copy them, on a thread of its own: the checkpointer's
        next commit never waits for a handoff (a holder still starting, or a
        slow peer, would otherwise delay the next step's durability).  One
        handoff at a time, in order; a failed one is logged (storage holds
        the step)."""
        ray = self._ray
        targets = [n for n in dict.fromkeys([self.node, self.peer]) if n is not None and n in self.names]
        ref = ray.put(chunks)
        previous = self._handing

        def hand() -> None:
            if previous is not None:
                previous.join()
            calls = []
            for node in targets:
                try:
                    calls.append(self._actor(node).keep.remote(self.rank, step, [ref], checksums))
                except (ValueError, ray.exceptions.RayError) as exc:
                    log.warning("snapshot holder on node %s is gone: %s", node[:12], exc)
            try:
                if calls:
                    ray.get(calls, timeout=FETCH_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - memory is a cache: the commit stands
                log.warning("keeping step %d in host memory failed (%s: %s); a reload reads it from storage",
                            step, type(exc).__name__, exc)

        self._handing = threading.Thread(target=hand, name="loom-snapshot-handoff", daemon=True)
        self._handing.start()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the newest handoff (tests; a rank need not)."""
        if self._handing is not None:
            self._handing.join(timeout)

    def fetch(self, wanted: dict) -> dict:
        """The chunks the holders have with the ``wanted`` crc32c: this
        node's holder first ("memory_local"), then the others ("memory_peer")."""
        ray = self._ray
        out, missing = {}, dict(wanted)
        order = ([self.node] if self.node in self.names else []) + sorted(n for n in self.names if n != self.node)
        for node in order:
            if not missing:
                break
            try:
                found = ray.get(self._actor(node).lookup.remote(missing), timeout=FETCH_TIMEOUT_S)
                if not found:
                    continue
                keys = list(found)
                values = ray.get([found[k][0] for k in keys], timeout=FETCH_TIMEOUT_S)
            except (ValueError, ray.exceptions.RayError) as exc:  # a lost node's holder: the next one
                log.info("snapshot holder on node %s cannot serve: %s", node[:12], type(exc).__name__)
                continue
            tier = "memory_local" if node == self.node else "memory_peer"
            for key, value in zip(keys, values):
                out[key] = (value, tier)
                missing.pop(key, None)
        return out
