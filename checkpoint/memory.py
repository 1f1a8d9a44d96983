"""Snapshots in host memory: a tier above storage for reloads.

A save can hand the chunks a rank wrote to a *sink* once the step is
committed (``save(..., snapshots=sink)``, ``AsyncCheckpointer(...,
snapshots=sink)``); a load can read through a *source* first
(``load(..., memory=source)``) and go to storage only for what the source
cannot serve.  Keys are chunk objects' paths inside the store
(``step-00000010/state/model/w/c/0/1``), so a key names its step; every
chunk comes with the crc32c the writer computed (the one the manifest
records).

The store stays the truth: the step a load reads is still picked from the
committed markers, and a chunk from memory is used only when its recorded
crc32c is the manifest's and its bytes hash to it; anything else (a step
that never committed, a replaced step, a wrong size, damaged bytes) is read
from storage instead.  A reshard reads whatever keys its layout needs;
misses go to storage.

`HostSnapshots` is the in-process implementation of both sides (the newest
committed step of one process, for tests and single-process loops);
`loom.launch.memory_tier` keeps them in Ray actors on the job's nodes.
"""
from __future__ import annotations

import logging
import threading
from typing import Protocol

import numpy as np

log = logging.getLogger("loom.checkpoint")

#: the tiers a load reports bytes for (`CheckpointInfo.tiers`): host memory
#: (this node's, a peer's), the node-local disk level (`loom.checkpoint.levels`),
#: and the store the step was chosen from
TIERS = ("memory_local", "memory_peer", "local", "storage")
MEMORY_TIERS = TIERS[:2]
SOURCE_TIERS = TIERS[:3]  # what a `SnapshotSource` may name


class SnapshotSink(Protocol):
    def keep(self, step: int, chunks: dict, checksums: dict) -> None:
        """Take ``chunks`` ({store key: C-contiguous numpy array, the chunk's
        valid values}) of committed ``step`` with their crc32c
        (``checksums``: {store key: int}).  The arrays are valid only during
        the call: copy what is kept.  Errors are logged by the caller, never
        fail the save.  A sink may finish the handoff in the background and
        then offers ``wait()``, which a synchronous save calls."""


class SnapshotSource(Protocol):
    def fetch(self, wanted: dict) -> dict:
        """For ``wanted`` ({store key: expected crc32c}), the chunks held
        with exactly that crc32c: {store key: (uint8 1-d array, tier)} with
        tier one of `SOURCE_TIERS`.  A chunk's bytes are its valid values or
        its whole stored object (the full chunk shape, C order).  Keys not held are left out."""


class HostSnapshots:
    """Both sides in one process: keeps the newest step handed to `keep`
    (copies of its chunks; older steps are dropped) and serves them to
    `fetch` as ``tier`` ("memory_local" by default).  Thread-safe."""

    def __init__(self, tier: str = "memory_local"):
        if tier not in MEMORY_TIERS:
            raise ValueError(f"tier={tier!r} must be one of {', '.join(MEMORY_TIERS)}")
        self.tier = tier
        self.step: int | None = None
        self._chunks: dict = {}  # store key -> (crc32c, uint8 copy)
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(buf.nbytes for _, buf in self._chunks.values())

    def keep(self, step: int, chunks: dict, checksums: dict) -> None:
        copies = {k: (int(checksums[k]), as_bytes(a).copy()) for k, a in chunks.items()}
        with self._lock:
            self.step, self._chunks = step, copies

    def fetch(self, wanted: dict) -> dict:
        with self._lock:
            return {k: (held[1], self.tier) for k, crc in wanted.items()
                    if (held := self._chunks.get(k)) is not None and held[0] == crc}

    def clear(self) -> None:
        with self._lock:
            self.step, self._chunks = None, {}


def as_bytes(a: np.ndarray) -> np.ndarray:
    """The C-order bytes of ``a`` as a 1-d uint8 array (a view when ``a``
    is C-contiguous)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def offer(sink, step: int, chunks: dict, checksums: dict) -> None:
    """Hand a committed step to ``sink``; a failure is logged, not raised
    (storage already holds the step)."""
    if sink is None:
        return
    try:
        sink.keep(step, chunks, checksums)
    except Exception as exc:  # noqa: BLE001 - memory is a cache: the commit stands
        log.warning("keeping step %d in host memory failed (%s: %s); a reload reads it from storage",
                    step, type(exc).__name__, exc)


def fetch(source, wanted: dict) -> dict:
    """``source.fetch(wanted)``; a failure is logged and serves nothing."""
    if source is None or not wanted:
        return {}
    try:
        return source.fetch(wanted)
    except Exception as exc:  # noqa: BLE001 - storage serves instead
        log.warning("reading snapshots from host memory failed (%s: %s); reading storage", type(exc).__name__, exc)
        return {}


def tier_of(bytes_by_tier: dict) -> str:
    """One word for where a load's bytes came from: "memory" (all from this
    node's memory), "peer" (all from memory, some from a peer), "local"
    (all from the node-local disk level), "storage", "mixed" (several of
    memory, local disk and storage), or "none" (no bytes)."""
    local, peer, disk, storage = (bytes_by_tier.get(t, 0) for t in TIERS)
    kinds = [k for k, n in (("memory", local or peer), ("local", disk), ("storage", storage)) if n]
    if len(kinds) > 1:
        return "mixed"
    if not kinds:
        return "none"
    if kinds[0] == "memory":
        return "peer" if peer else "memory"
    return kinds[0]
