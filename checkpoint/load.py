"""Collective, resharding load.

Every rank asks only for the regions its own targets need, in the storage
coordinates of each array, and reads only the chunks that intersect them, so
a checkpoint saved by any world size / boxes / flat ranges loads into any
other.  Every chunk read is checked against its crc32c from the manifest,
once: by one of the ranks that read it, and a failure raises on every rank.
Tensors are filled in place; plain values are replaced; a target whose
container is empty (a fresh optimizer's ``state``) is rebuilt from the saved
subtree.

Nothing is allocated or read from a step before it is vetted: its manifest
is checked (`Manifest.from_json`) and one listing of its folder shows every
chunk object the manifest names as a plain file of exactly its full-chunk
size (`check_objects`).  In a collective load rank 0 vets while it picks
the step and every rank learns its verdict in the same agreement, so memory
and time are bounded by the bytes really stored plus the manifest's size.
"""
from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from . import layout, zarr_io
from .collective import agree, resolve
from .memory import SOURCE_TIERS, TIERS
from .memory import fetch as fetch_from_memory
from .manifest import (ChecksumError, InvalidCheckpointError, Manifest, TensorEntry, array_document, as_numpy,
                       checksum, contiguous, from_numpy)
from .save import IO_THREADS
from .state import build_tree, flatten, key_of, per_rank_nodes, set_path
from .store import CheckpointStore, check_objects, check_step, data_prefix, vet
from .zarr_io import open_array, read_box

log = logging.getLogger("loom.checkpoint")


class MissingKeysError(KeyError):
    """Keys of the target are not in the checkpoint (``strict=True``)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class NoCheckpointError(FileNotFoundError):
    """There is no committed step at the URL (``step=None``)."""


@dataclass
class CheckpointInfo:
    step: int
    world_size: int
    mesh: dict | None
    location: str
    missing: list = field(default_factory=list)     # target keys the step lacks (strict=False)
    unexpected: list = field(default_factory=list)  # saved keys the target did not ask for
    skipped: list = field(default_factory=list)     # [{"step", "error"}] passed over by fallback
    created: float | None = None
    # chunk bytes this rank read per tier (`loom.checkpoint.memory.TIERS`), and every rank's (group order)
    tiers: dict = field(default_factory=dict)
    tiers_by_rank: list = field(default_factory=list)


# ------------------------------------------------------------ chunk reads

class ChunkReader:
    """Reads of boxes of one committed step, run in parallel, every chunk
    checked against its crc32c.  In a collective load each chunk is checked
    by one of the ranks that read it (``share_checks``); the others, on a
    local store, copy only the part they need from the mapped object."""

    def __init__(self, store: CheckpointStore, manifest: Manifest, memory=None):
        self.store, self.manifest, self.memory = store, manifest, memory
        self._served: dict = {}  # (key, chunk index) -> (valid values from host memory, tier)
        self.tiers = dict.fromkeys(TIERS, 0)  # chunk bytes read per tier (`serve_from_memory`)
        self.prefix = data_prefix(manifest.step)
        self._arrays: dict = {}
        self._tasks: list = []
        self._buffers = threading.local()  # one reusable staging buffer per I/O thread
        self._checked_elsewhere: set = set()  # chunk numbers another rank checks
        self._first, self._total = None, 0     # see _chunk_numbers

    def array(self, key: str):
        if key not in self._arrays:
            entry = self.manifest.tensors[key]
            self._arrays[key] = open_array(self.store, f"{self.prefix}/{entry.array}",
                                           array_document(key, entry))
        return self._arrays[key]

    def request(self, key: str, box, out: np.ndarray) -> None:
        """Fill ``out`` (the shape of ``box``) with the saved values of ``box``."""
        entry = self.manifest.tensors[key]
        shape, chunks = entry.storage_shape, entry.chunks
        for index in layout.chunks_touching(box, shape, chunks):
            cbox = layout.chunk_box(index, shape, chunks)
            self._tasks.append((key, index, cbox, layout.intersect(cbox, box), out, box[0]))

    def serve_from_memory(self) -> None:
        """Ask ``memory`` (a `loom.checkpoint.memory.SnapshotSource`) once for
        every chunk the requests so far touch; keep those whose bytes have
        the size and crc32c the manifest records (the rest, and everything
        ``memory`` lacks, is read from storage), and count the bytes of
        every chunk per tier in ``tiers``."""
        entries = self.manifest.tensors
        chunks = {}
        for key, index, cbox, *_ in self._tasks:
            chunks.setdefault((key, index), cbox)
        wanted = {}
        for (key, index), cbox in chunks.items():
            expected = entries[key].checksums.get(layout.chunk_name(index))
            if expected is not None:
                wanted[self._chunk_key(key, index)] = expected
        got = fetch_from_memory(self.memory, wanted)
        for (key, index), cbox in chunks.items():
            dtype = np.dtype(entries[key].storage_dtype)
            valid = [stop - start for start, stop in zip(*cbox)]
            nbytes = math.prod(valid) * dtype.itemsize
            held = got.get(self._chunk_key(key, index))
            if held is not None:
                buf, tier = held
                data = np.asarray(buf).reshape(-1).view(np.uint8)
                whole = math.prod(entries[key].chunks) * dtype.itemsize
                if data.nbytes == whole and whole != nbytes:  # a stored object: the full chunk shape
                    data = np.ascontiguousarray(
                        data.view(dtype).reshape(entries[key].chunks)[tuple(slice(0, v) for v in valid)])
                if data.nbytes == nbytes and tier in SOURCE_TIERS:
                    data = data.view(dtype).reshape(valid)
                    if checksum(data) == entries[key].checksums[layout.chunk_name(index)]:
                        self._served[(key, index)] = (data, tier)
                        self.tiers[tier] += nbytes
                        continue
                log.warning("the %s copy of %s does not match its manifest (size or crc32c); "
                            "reading it from storage", tier, self._chunk_key(key, index))
            self.tiers["storage"] += nbytes

    def claims(self) -> str:
        """The chunks the requests so far touch, compactly (a hex bitmap over
        `_chunk_numbers`): what every rank sends every other in a load.
        Chunks served from host memory are not claimed (they are checked
        by this rank, not read from storage)."""
        first, total = self._chunk_numbers()
        touched = np.zeros(total, dtype=bool)
        for key, index, *_ in self._tasks:
            if (key, index) in self._served:
                continue
            touched[self._chunk_number(key, index)] = True
        return np.packbits(touched).tobytes().hex()

    def share_checks(self, claims: list[str], rank: int) -> None:
        """Given every rank's ``claims()`` (group order), each chunk is checked
        by one rank that reads it: a chunk only one rank reads, by that rank;
        the others, in chunk order, by the reader with the fewest bytes to
        check so far.  Deterministic, so every rank reaches the same split.
        A chunk read by several ranks (a reshard, a replicated tensor) is then
        checked once, not once per reader."""
        first, total = self._chunk_numbers()
        readers = np.stack([np.unpackbits(np.frombuffer(bytes.fromhex(c), dtype=np.uint8), count=total)
                            for c in claims]).astype(bool).T  # [chunk, rank]
        sizes = np.zeros(total, dtype=np.int64)
        for key, n in first.items():
            entry = self.manifest.tensors[key]
            count = layout.num_chunks(entry.storage_shape, entry.chunks)
            sizes[n:n + count] = math.prod(entry.chunks) * np.dtype(entry.storage_dtype).itemsize
        shared = readers.sum(axis=1) > 1
        to_check = (readers[~shared] * sizes[~shared, None]).sum(axis=0)  # the forced checks first
        checked_elsewhere = set()
        for number in np.flatnonzero(shared):
            ranks = np.flatnonzero(readers[number])
            checker = ranks[np.argmin(to_check[ranks])]  # ties: the lowest rank
            to_check[checker] += sizes[number]
            if checker != rank and readers[number, rank]:
                checked_elsewhere.add(int(number))
        self._checked_elsewhere = checked_elsewhere

    def _chunk_numbers(self) -> tuple[dict, int]:
        """One numbering of every chunk of the step, the same on every rank:
        arrays in key order, each array's chunks in C order.  Returns each
        array's first number and the total."""
        if self._first is None:
            first, total = {}, 0
            for key in sorted(self.manifest.tensors):
                entry = self.manifest.tensors[key]
                first[key] = total
                total += layout.num_chunks(entry.storage_shape, entry.chunks)
            self._first, self._total = first, total
        return self._first, self._total

    def _chunk_number(self, key: str, index) -> int:
        entry = self.manifest.tensors[key]
        grid = [-(-n // c) for n, c in zip(entry.storage_shape, entry.chunks)]
        return self._chunk_numbers()[0][key] + (int(np.ravel_multi_index(index, grid)) if grid else 0)

    def run(self, threads: int = IO_THREADS) -> None:
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        with ThreadPoolExecutor(max(1, min(threads, len(tasks)))) as pool:
            for _ in pool.map(self._read, tasks):
                pass

    def read_chunk(self, key: str, index, cbox, dest: np.ndarray | None = None, *,
                   check: bool = True) -> np.ndarray:
        """One whole chunk's valid values, checked against its checksum
        (``check=False``: another rank checks it).  Into ``dest``
        (C-contiguous, the chunk's valid shape) when given; otherwise, on a
        local store, a read-only view of the mapped chunk object."""
        entry = self.manifest.tensors[key]
        valid = [stop - start for start, stop in zip(*cbox)]
        if not zarr_io.is_prefix(valid, entry.chunks):
            data = read_box(self.array(key), cbox, dest)  # an edge cut along an inner dim: zarr-python
        elif self.store.local:
            data = self._mapped(key, index, valid)
            if check:  # before the copy: a bad chunk never reaches the target
                self._verify(key, index, data)
                check = False
            if dest is not None:
                np.copyto(dest, data)
                data = dest
        else:
            data = self._staging(valid, entry.storage_dtype) if dest is None else dest
            try:
                got = zarr_io.read_raw(self.store, self._chunk_key(key, index), data)
            except FileNotFoundError:
                got = 0
            if got != data.nbytes:
                self._truncated(key, index, got, data.nbytes)
        if check:
            self._verify(key, index, data)
        return data

    def _chunk_key(self, key: str, index) -> str:
        return zarr_io.chunk_key(f"{self.prefix}/{self.manifest.tensors[key].array}", index)

    def _mapped(self, key: str, index, valid) -> np.ndarray:
        dtype = np.dtype(self.manifest.tensors[key].storage_dtype)
        nbytes = math.prod(valid) * dtype.itemsize
        view, got = zarr_io.map_raw(self.store, self._chunk_key(key, index), nbytes)
        if view is None:
            self._truncated(key, index, got, nbytes)
        return view.view(dtype).reshape(valid)

    def _truncated(self, key: str, index, got: int, want: int):
        self._fail(key, index, f"its stored object is missing or truncated ({got} of {want} bytes)")

    def _staging(self, shape, dtype) -> np.ndarray:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        buf = getattr(self._buffers, "buf", None)
        if buf is None or buf.nbytes < size:
            buf = self._buffers.buf = np.empty(size, dtype=np.uint8)
        return buf[:size].view(dtype).reshape(shape)

    def _read(self, task) -> None:
        key, index, cbox, part, out, origin = task
        dest = layout.view(out, part, origin)
        served = self._served.get((key, index))
        if served is not None:  # checked in serve_from_memory
            dest[...] = layout.view(served[0], part, cbox[0])
            return
        check = self._chunk_number(key, index) not in self._checked_elsewhere
        if part == cbox and dest.flags.c_contiguous:
            self.read_chunk(key, index, cbox, dest, check=check)
        else:  # a mapped chunk: only the pages of ``part`` are read (unless checked here)
            data = self.read_chunk(key, index, cbox, check=check)
            dest[...] = layout.view(data, part, cbox[0])

    def _verify(self, key: str, index, data: np.ndarray) -> None:
        expected = self.manifest.tensors[key].checksums.get(layout.chunk_name(index))
        if expected is None or checksum(data) != expected:
            self._fail(key, index, "the stored bytes do not match its checksum")

    def _fail(self, key: str, index, why: str):
        entry = self.manifest.tensors[key]
        raise ChecksumError(
            f"checksum mismatch in array {key!r} chunk {layout.chunk_name(index)} (Zarr array "
            f"{entry.array!r}) of {self.store.location(self.manifest.step)}: {why}",
            file=self.store.url_of(self._chunk_key(key, index)), field=f"tensors[{key!r}].checksums")


# -------------------------------------------------------- region mapping

def _is_flat_storage(entry: TensorEntry) -> bool:
    return entry.placement == "flat"


def _target_region(entry: TensorEntry, leaf):
    """The logical region a target asks for: ('all',), ('box', box) or ('range', a, b)."""
    if leaf.kind == "replicated":
        return ("all",)
    if leaf.kind == "shard":
        lo = tuple(leaf.obj.offsets)
        return ("box", (lo, tuple(o + n for o, n in zip(lo, leaf.obj.tensor.shape))))
    return ("range", leaf.obj.start, leaf.obj.start + leaf.obj.tensor.numel())


def schedule(reader: ChunkReader, key: str, entry: TensorEntry, region, target: torch.Tensor):
    """Arrange for ``target`` (the region's values, in its own shape) to be
    filled; returns a finisher to call after the reads (None if direct)."""
    shape = entry.shape
    flat_storage = _is_flat_storage(entry)
    numel = math.prod(shape)
    row = math.prod(shape[1:]) if shape else 1
    direct = target.device.type == "cpu" and target.is_contiguous()
    kind = region[0]
    if kind == "all":
        region = ("box", layout.full_box(shape)) if not flat_storage else ("range", 0, numel)
        kind = region[0]
    if kind == "box":
        box = region[1]
        if layout.volume(box) == 0:
            return None
        if not flat_storage:
            return _fill(reader, key, box, target, direct, lambda a: a)
        # flat storage, box target: read the rows that cover the box
        lo0, hi0 = (box[0][0], box[1][0]) if shape else (0, 1)
        rows = ((lo0 * row,), (hi0 * row,))
        inner = (slice(None),) + tuple(slice(start, stop) for start, stop in zip(box[0][1:], box[1][1:]))
        return _fill(reader, key, rows, target, False,
                     lambda a: a.reshape((hi0 - lo0, *shape[1:]))[inner] if shape else a.reshape(()))
    a, b = region[1], region[2]
    if b <= a:
        return None
    if flat_storage:
        return _fill(reader, key, ((a,), (b,)), target, direct, lambda x: x.reshape(target.shape))
    if not shape:
        return _fill(reader, key, ((), ()), target, False, lambda x: x.reshape(-1))
    r0, r1 = a // row, -(-b // row)
    box = ((r0, *(0 for _ in shape[1:])), (r1, *shape[1:]))
    off = r0 * row
    return _fill(reader, key, box, target, False, lambda x: x.reshape(-1)[a - off:b - off])


def _fill(reader, key, box, target, direct: bool, select):
    """Read ``box`` straight into ``target`` (direct) or into a buffer whose
    ``select``-ed part is copied into ``target`` afterwards."""
    entry = reader.manifest.tensors[key]
    if direct:
        view = as_numpy(target)
        view = view.reshape([stop - start for start, stop in zip(*box)])
        reader.request(key, box, view)
        return None
    buf = np.empty([stop - start for start, stop in zip(*box)], dtype=np.dtype(entry.storage_dtype))
    reader.request(key, box, buf)

    def finish():
        src = from_numpy(contiguous(select(buf)), target.dtype)
        with torch.no_grad():
            target.copy_(src.reshape(target.shape))
    return finish


def read_whole(reader: ChunkReader, key: str, row: int | None = None):
    """A new tensor holding a saved array (the logical tensor; for PerRank
    tensors the ``row`` of one saved rank).  Returns (tensor, finisher)."""
    entry = reader.manifest.tensors[key]
    dtype, shape = entry.tensor_dtype, entry.shape
    t = torch.empty(shape, dtype=dtype)
    if row is None:
        return t, schedule(reader, key, entry, ("all",), t)
    box = ((row, *(0 for _ in shape)), (row + 1, *shape))
    if t.numel():
        reader.request(key, box, as_numpy(t).reshape([1, *shape]))
    return t, None


# ----------------------------------------------------------------- load

def _candidates(store: CheckpointStore, step, fallback: bool) -> list[int]:
    """The steps a load tries, in order: ``step`` (when None: first the
    steps whose damaged marker may be a newer commit, `damaged_newer`, which
    fail to vet, then the one `latest()` picks), then with ``fallback``
    every lower committed step, highest first (a rolled-back branch's
    higher steps are never fallbacks)."""
    committed = store.committed_steps()
    damaged = []
    if step is None:
        step = store.latest()
        damaged = [s for s, _ in store.damaged_newer(step)]
        if step is None:
            if not damaged:
                raise NoCheckpointError(f"no committed checkpoint at {store.url}")
            return damaged  # nothing sound: the newest one's damage is raised
    check_step(step)
    return damaged + [step] + ([s for s in reversed(committed) if s < step] if fallback else [])


def _choose(store: CheckpointStore, candidates: list[int], fallback: bool, vetted: dict) -> dict:
    """Rank 0: vet candidates in order until one passes (``fallback``) or
    the first (not).  Returns ``{"step", "sha", "rest", "skipped", "error"}``
    where ``error`` is the last candidate's InvalidCheckpointError (as a
    record every rank rebuilds with its file and field) when none passed.
    Vetted manifests are kept in ``vetted`` (by sha) for this rank's load."""
    skipped = []
    for n, s in enumerate(candidates):
        try:
            manifest, sha = vet(store, s)
        except InvalidCheckpointError as exc:
            if fallback and n < len(candidates) - 1:
                skipped.append({"step": s, "error": str(exc)})
                continue
            record = {"type": type(exc).__name__, "message": str(exc), "file": exc.file, "field": exc.field}
            return {"step": s, "sha": None, "rest": [], "skipped": skipped, "error": record}
        vetted[sha] = manifest
        return {"step": s, "sha": sha, "rest": candidates[n + 1:], "skipped": skipped, "error": None}
    raise AssertionError("no candidates")  # pragma: no cover - _candidates returns at least one


def _agree_choice(g, store, candidates, fallback: bool, vetted: dict, custom: dict, asked=None) -> dict:
    """One agreement: rank 0 vets (`_choose`) the steps ``candidates()``
    returns, every rank learns the verdict; when none passed, the same
    InvalidCheckpointError (file and field included) raises everywhere.
    ``asked``: the step each rank's caller asked for, which must be the same
    on every rank (a ValueError on every rank otherwise)."""
    error, choice = None, None
    if g.rank == 0:
        try:
            choice = _choose(store, candidates(), fallback, vetted)
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it
            error = exc
    everyone = agree(g, error, {"choice": choice, "asked": asked}, custom=custom)
    asks = [p["asked"] for p in everyone]
    if len(set(map(str, asks))) > 1:
        shown = ", ".join(f"rank {r}: {'latest' if a is None else a}" for r, a in enumerate(asks))
        raise ValueError(f"load: ranks ask for different steps ({shown}); every rank must load the same step")
    choice = everyone[0]["choice"]
    record = choice["error"]
    if record is not None:
        cls = ChecksumError if record["type"] == "ChecksumError" else InvalidCheckpointError
        raise cls(record["message"], file=record["file"], field=record["field"])
    return choice


def load(state: dict, url: str, *, step: int | None = None, group=None, strict: bool = True,
         fallback: bool = False, memory=None) -> CheckpointInfo:
    """Collective: fill ``state`` from ``step`` (the one `latest()` picks
    when None: the newest commit in time) under ``url``.  Tensors are filled
    in place, plain values replaced.  ``strict=False`` loads the keys
    present and reports the missing ones.  ``fallback=True`` moves on to the
    next lower committed step when a step is damaged (a checksum mismatch, a
    damaged manifest, a missing or wrong-sized chunk object: any
    InvalidCheckpointError); ``info.skipped`` says which steps and why.
    Works with no process group (a single process).

    Raises NoCheckpointError when nothing is committed, FileNotFoundError
    for a ``step`` that is not, InvalidCheckpointError (ChecksumError for a
    checksum) for damage, MissingKeysError for target keys the step lacks
    (``strict``), ValueError/TypeError for a target that does not match.

    ``memory``: a `loom.checkpoint.memory.SnapshotSource` asked first for
    the chunks of the step chosen (chosen from storage, as without it);
    a chunk is taken from it only when its size and crc32c are the
    manifest's, everything else is read from storage.  ``info.tiers``:
    the chunk bytes this rank read per tier; ``info.tiers_by_rank``: every
    rank's."""
    g = resolve(group)
    store = CheckpointStore(url)
    custom = {"ChecksumError": ChecksumError, "InvalidCheckpointError": InvalidCheckpointError,
              "MissingKeysError": MissingKeysError, "NoCheckpointError": NoCheckpointError}
    vetted: dict = {}  # sha -> manifest, on rank 0
    choice = _agree_choice(g, store, lambda: _candidates(store, step, fallback), fallback, vetted, custom,
                           asked=step)
    skipped = list(choice["skipped"])
    touched: set = set()
    while True:
        try:
            info = _load_candidate(state, store, choice["step"], choice["sha"], vetted, g, strict,
                                   touched, custom, memory)
        except InvalidCheckpointError as exc:
            if not fallback or not choice["rest"]:
                raise
            skipped.append({"step": choice["step"], "error": str(exc)})
            choice = _agree_choice(g, store, lambda rest=choice["rest"]: rest, fallback, vetted, custom)
            skipped += choice["skipped"]
            continue
        info.skipped = skipped
        return info


def _load_candidate(state, store, step, sha, vetted: dict, g, strict, touched: set, custom: dict,
                    memory=None) -> CheckpointInfo:
    """Load one vetted step (manifest ``sha``) in two agreements: after
    planning (every rank's chunk claims, so that each chunk is checked by
    one rank) and after reading.  An error on any rank raises on every rank
    at one of them."""
    error, reader, finish = None, None, None
    try:
        manifest = vetted.get(sha) or store.read_manifest(step, expect_sha256=sha)
        reader, finish = _plan_step(state, store, manifest, g, strict, touched, memory)
    except Exception as exc:  # noqa: BLE001 - every rank must learn of it
        error = exc
    claims = agree(g, error, None if reader is None else reader.claims(), custom=custom)
    error, info = None, None
    try:
        reader.share_checks(claims, g.rank)
        info = finish()
    except Exception as exc:  # noqa: BLE001
        error = exc
    everyone = agree(g, error, dict(reader.tiers), custom=custom)
    info.tiers, info.tiers_by_rank = dict(reader.tiers), everyone
    return info


def _plan_step(state, store, manifest, g, strict, touched: set, memory=None):
    """Match ``state`` against a step's manifest and queue the reads;
    returns the reader and a function that runs the reads and fills
    ``state`` (returning the CheckpointInfo)."""
    tensors, values = manifest.tensors, manifest.values
    saved = {**{k: ("tensor", e) for k, e in tensors.items()}, **{k: ("value", e) for k, e in values.items()}}
    by_path = {e.path: k for k, (_, e) in saved.items()}
    reader = ChunkReader(store, manifest, memory)
    consumed, missing, finishers, replacements = set(), [], [], []
    written: set = set()

    def under(prefix):
        return [k for p, k in by_path.items() if len(p) >= len(prefix) and p[:len(prefix)] == prefix]

    for leaf in flatten(state):
        if leaf.kind in ("per_rank", "per_rank_value"):
            continue  # whole PerRank values are restored below
        found = by_path.get(tuple(leaf.path))
        if leaf.tensor is not None:
            if found is None or saved[found][0] != "tensor":
                if found is not None:
                    raise ValueError(f"key {leaf.key!r} is a tensor in the target but a plain value "
                                     f"in the checkpoint")
                missing.append(leaf.key)
                continue
            entry = tensors[found]
            _check_compatible(leaf, entry)
            if entry.placement == "per_rank":
                raise ValueError(f"key {leaf.key!r} was saved per rank; load it into a PerRank")
            fin = schedule(reader, found, entry, _target_region(entry, leaf), leaf.tensor)
            if fin is not None:
                finishers.append(fin)
            consumed.add(found)
            written.add(leaf.key)
            continue
        if found is not None and saved[found][0] == "value":
            entry = values[found]
            if entry.is_per_rank:
                raise ValueError(f"key {leaf.key!r} was saved per rank; load it into a PerRank")
            replacements.append((leaf.path, entry.decoded()))
            consumed.add(found)
            continue
        if found is not None:
            raise ValueError(f"key {leaf.key!r} is a plain value in the target but a tensor in the "
                             f"checkpoint")
        subtree = under(tuple(leaf.path))
        if not subtree:
            missing.append(leaf.key)
            continue
        # an empty container (a fresh optimizer's state): rebuild it from the checkpoint
        value, fins = _materialize(reader, saved, subtree, len(leaf.path), None)
        finishers += fins
        replacements.append((leaf.path, value))
        consumed.update(subtree)

    per_rank = []
    for path, node in per_rank_nodes(state):
        subtree = under(tuple(path))
        if not subtree:
            missing.append(key_of(path))
            continue
        per_rank.append((path, node, subtree))
        consumed.update(subtree)

    lost = sorted(set(missing) & touched)
    if lost:
        raise ValueError(f"step {manifest.step} lacks keys {lost} that a rejected newer step had "
                         f"already overwritten; they cannot be restored consistently")
    if strict and missing:
        raise MissingKeysError(
            f"checkpoint {store.location(manifest.step)} lacks keys {missing} (pass strict=False "
            f"to load the keys present)")
    touched |= written

    resolved = []
    saved_world = manifest.world_size
    for path, node, subtree in per_rank:
        per = any(saved[k][0] == "tensor" and tensors[k].placement == "per_rank" or
                  saved[k][0] == "value" and values[k].is_per_rank for k in subtree)
        if not per or saved_world == g.size:
            value, fins = _materialize(reader, saved, subtree, len(path), g.rank)
            finishers += fins
            resolved.append((node, lambda v=value: v))
        elif node.resolver is None:
            raise ValueError(f"PerRank value at key {key_of(path)!r} was saved by {saved_world} ranks "
                             f"and is loaded by {g.size}; pass PerRank(..., resolver=fn) where "
                             f"fn(saved_values, rank, world_size) picks this rank's value")
        else:
            options = []
            for r in range(saved_world):
                value, fins = _materialize(reader, saved, subtree, len(path), r)
                finishers += fins
                options.append(value)
            resolved.append((node, lambda o=options, n=node: n.resolver(o, g.rank, g.size)))

    def finish() -> CheckpointInfo:
        reader.run()
        for fin in finishers:
            fin()
        for path, value in replacements:
            set_path(state, path, value)
        for node, make in resolved:
            node.value = make()
        unexpected = sorted(set(saved) - consumed)
        return CheckpointInfo(step=manifest.step, world_size=saved_world, mesh=manifest.mesh,
                              location=store.location(manifest.step), missing=missing,
                              unexpected=unexpected, created=manifest.created)
    reader.serve_from_memory()  # every read is requested: what host memory holds is taken from it
    return reader, finish


def _check_compatible(leaf, entry: TensorEntry) -> None:
    t = leaf.tensor
    if str(t.dtype).removeprefix("torch.") != entry.dtype:
        raise ValueError(f"dtype mismatch at key {leaf.key!r}: the checkpoint holds {entry.dtype}, "
                         f"the target is {str(t.dtype).removeprefix('torch.')}")
    want = tuple(t.shape) if leaf.kind == "replicated" else tuple(leaf.obj.global_shape)
    if want != entry.shape:
        raise ValueError(f"shape mismatch at key {leaf.key!r}: the checkpoint holds "
                         f"{entry.shape}, the target's global shape is {want}")


def _materialize(reader, saved: dict, keys: list, depth: int, rank: int | None):
    """Rebuild the saved subtree of ``keys`` below ``depth`` path components.
    Per-rank parts take saved rank ``rank``'s values.  Returns (value, finishers)."""
    items, finishers = [], []
    for key in keys:
        what, entry = saved[key]
        rel, containers = entry.path[depth:], entry.containers[depth:]
        if what == "tensor":
            per = entry.placement == "per_rank"
            if per and rank is None:
                raise ValueError(f"key {key!r} was saved per rank; load it into a PerRank")
            t, fin = read_whole(reader, key, rank if per else None)
            if fin is not None:
                finishers.append(fin)
            items.append((rel, containers, t))
        elif entry.is_per_rank:
            if rank is None:
                raise ValueError(f"key {key!r} was saved per rank; load it into a PerRank")
            items.append((rel, containers, entry.decoded(rank)))
        else:
            items.append((rel, containers, entry.decoded()))
    return build_tree(items), finishers


# ---------------------------------------------------------------- verify

def verify(url: str, step: int | None = None) -> list[str]:
    """Check a committed step (default: the newest, the one `load` tries
    first): its chunk objects (`check_objects`), then every chunk's crc32c.
    Returns the problems found (empty when the step is intact).  One
    process.  Raises FileNotFoundError when there is no such committed step
    and InvalidCheckpointError when its marker or manifest is damaged
    (nothing can be checked against it) -- by default also when a step
    whose marker is damaged may be newer than the one `latest()` picks
    (`CheckpointStore.damaged_newer`)."""
    store = CheckpointStore(url)
    if step is None:
        step = store.latest()
        newer = store.damaged_newer(step)
        if newer:
            raise newer[0][1]
    else:
        check_step(step)
    if step is None:
        raise FileNotFoundError(f"no committed checkpoint at {url}")
    manifest = store.read_manifest(step)
    damaged = check_objects(store, manifest)
    problems = [str(exc) for exc in damaged.values()]
    reader = ChunkReader(store, manifest)
    for key in sorted(manifest.tensors):
        entry = manifest.tensors[key]
        shape, chunks = entry.storage_shape, entry.chunks
        for index in layout.chunk_indices(shape, chunks):
            if (key, index) in damaged:
                continue
            try:
                reader.read_chunk(key, index, layout.chunk_box(index, shape, chunks))
            except Exception as exc:  # noqa: BLE001 - report every bad chunk
                problems.append(str(exc) if isinstance(exc, InvalidCheckpointError) else
                                f"array {key!r} chunk {layout.chunk_name(index)}: {type(exc).__name__}: {exc}")
    return problems
