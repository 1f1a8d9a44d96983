"""Collective save in three pieces: plan, write, commit.

    plan = plan_save(state, url, step=10)          # collective: gather fragments, agree
    parts = exchange_parts(plan, plan.tensors)      # collective only if a chunk straddles ranks
    sums = write_chunks(plan, plan.tensors, parts)  # no communication; any thread
    location = commit(plan, sums)                   # collective: barrier, manifest, marker, latest

`save` runs them in order.  They are separate so that an asynchronous engine
can snapshot tensors to host memory and call `write_chunks` on the copies from
a background thread (passing them instead of ``plan.tensors``), then
`commit`.  Every rank writes only the chunks it owns (replicated tensors are
divided among their replicas), so the data moves in parallel and no chunk has
two writers.

One job writes a store at a time (`loom.checkpoint.owner`): `save` claims
the store and its process keeps the claim until `release_store` or exit
(or shares the claim its process holds), `plan_save`
checks the claim before the step is started and `commit` again before the
manifest, so a job whose store was taken over fails on every rank instead
of writing.  A failed commit removes the step its save started.
"""
from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from loom import comms

from . import layout
from .collective import Group, agree, resolve
from .replicas import check_replicas, fingerprint
from .manifest import (Fragment, TensorEntry, ValueEntry, array_document, array_path, as_numpy, checksum,
                       contiguous, dtype_name, group_metadata, new_manifest, storage_dtype)
from .state import digest, dumps, encode_value, flatten
from .owner import ERRORS, StoreOwnership, claim_store
from .store import CheckpointStore, check_step, data_prefix, step_name
from . import memory, zarr_io
from .zarr_io import open_array

# Chunk writes/reads in flight per rank: enough to overlap I/O with the
# checksum and hide store latency, without oversubscribing small machines.
IO_THREADS = max(2, min(8, os.cpu_count() or 2))


@dataclass
class SavePlan:
    """Who writes what for one save; identical on every rank except ``tensors``."""
    store: CheckpointStore
    step: int
    group: Group
    mesh: dict | None
    arrays: dict            # key -> layout.ArrayPlan (every tensor of every rank)
    entries: dict[str, TensorEntry]  # by key (checksums filled at commit)
    values: dict[str, ValueEntry]    # by key (complete on rank 0)
    transfers: list         # layout.Transfer, in a global order
    groups: list            # Zarr group paths under the step, for rank 0 to create
    tensors: dict = field(default_factory=dict)  # key -> this rank's local tensor
    durable: bool = False   # fsync files and directories before the commit marker
    ownership: StoreOwnership | None = None  # the job's claim on the store (checked by rank 0)
    release_ownership: bool = False          # the claim was made by plan_save: commit releases it

    @property
    def location(self) -> str:
        return self.store.location(self.step)

    def my_chunks(self) -> list[tuple[str, tuple]]:
        me = self.group.rank
        return [(k, i) for k, a in self.arrays.items() for i, o in a.owners.items() if o == me]


def _mesh_description(mesh) -> dict | None:
    if mesh is None:
        return None
    if isinstance(mesh, comms.Mesh):
        return mesh.degrees()
    if isinstance(mesh, dict) and all(isinstance(k, str) and isinstance(v, int) for k, v in mesh.items()):
        return dict(mesh)
    raise TypeError(f"mesh={mesh!r} must be a loom.comms.Mesh or a dict of degrees like {{'dp': 2}}")


def _storage(leaf, g: Group):
    """(kind, logical shape, storage shape, this rank's box) of a tensor leaf."""
    obj, t = leaf.obj, leaf.tensor
    if leaf.kind == "replicated":
        shape = tuple(t.shape)
        return shape, shape, layout.full_box(shape)
    if leaf.kind == "shard":
        lo = tuple(obj.offsets)
        return obj.global_shape, obj.global_shape, (lo, tuple(o + n for o, n in zip(lo, t.shape)))
    if leaf.kind == "flat":
        n = math.prod(obj.global_shape)
        return obj.global_shape, (n,), ((obj.start,), (obj.start + t.numel(),))
    # per_rank: one row per rank
    shape = tuple(t.shape)
    return shape, (g.size, *shape), ((g.rank, *(0 for _ in shape)), (g.rank + 1, *shape))


def _describe(leaves, g: Group, salt: int = 0) -> list[dict]:
    out = []
    for leaf in leaves:
        d = {"key": leaf.key, "path": list(leaf.path), "containers": leaf.containers, "kind": leaf.kind}
        if leaf.tensor is not None:
            storage_dtype(leaf.tensor.dtype)  # raises for dtypes a checkpoint cannot hold
            shape, sshape, box = _storage(leaf, g)
            d.update(dtype=dtype_name(leaf.tensor.dtype), shape=list(shape), storage_shape=list(sshape),
                     box=[list(box[0]), list(box[1])])
            if leaf.kind != "per_rank":  # replicas of a box must agree (the replica guard)
                d["fingerprint"] = fingerprint(leaf.tensor, salt)
        else:
            encoded = encode_value(leaf.obj, leaf.key)
            text = dumps(encoded)
            if leaf.kind == "per_rank_value" or g.rank == 0:
                d["value"] = encoded
            d["hash"] = digest(text)
        out.append(d)
    return out


def plan_save(state: dict, url: str, *, step: int, group=None, mesh=None,
              target_chunk_bytes: int = layout.TARGET_CHUNK_BYTES, durable: bool = False,
              ownership: StoreOwnership | None = None) -> SavePlan:
    """Collective: check ``state`` on every rank, gather the fragments, and
    decide the chunk grid and the writer of every chunk.  A previous
    (committed or torn) save of the same step is removed once every rank
    has agreed to save.  ``durable``: see `save`.

    ``ownership``: this job's claim on the store (`claim_store` over the
    same ranks); without it the store is claimed here and kept by the
    process, as `save` does (sharing a claim this process already holds).
    Rank 0 checks the claim before anything is removed or written, and
    counts the step as in flight (`gc` leaves it alone) until `commit`.

    Raises on every rank: ValueError/TypeError for bad ``state``, ``step``
    or ``mesh`` (naming the key and rank); `CheckpointOwnershipError` when
    another job owns the store; `StoreNotSharedError` when the ranks do
    not share it."""
    g = resolve(group)
    store = CheckpointStore(url)
    made = ownership is None
    if made:
        ownership = claim_store(url, group=g, keep=True)  # kept until release_store() or exit
    elif ownership.holder != (g.rank == 0) or ownership.store.url != store.url:
        raise ValueError(f"ownership={ownership!r} is not a claim on {store.url!r} made by this group's "
                         f"rank 0 (group rank {g.rank}); pass the claim_store result of the same ranks")
    try:
        plan = _plan(state, store, step, g, mesh, target_chunk_bytes, ownership)
    except BaseException:
        ownership.end_step(step)
        if made:
            ownership.release()
        raise
    plan.durable = bool(durable)
    plan.ownership, plan.release_ownership = ownership, made
    return plan


def _plan(state, store, step, g: Group, mesh, target_chunk_bytes, ownership: StoreOwnership) -> SavePlan:
    error, described, leaves, mesh_desc, replacing = None, None, [], None, False
    try:
        check_step(step)
        mesh_desc = _mesh_description(mesh)
        leaves = flatten(state)
        described = _describe(leaves, g, step)
        ownership.check()  # rank 0: nothing is removed or written for a job that lost the store
        ownership.begin_step(step)  # until commit: gc in this process leaves it alone
        replacing = g.rank == 0 and step in store.steps()
    except Exception as exc:  # noqa: BLE001 - every rank must learn of it
        error = exc
    payloads = agree(g, error, {"described": described, "replacing": replacing, "step": step}, custom=ERRORS)
    # the same on every rank, so its checks raise everywhere alike
    steps = [p["step"] for p in payloads]
    if len(set(steps)) > 1:
        shown = ", ".join(f"rank {r}: {s}" for r, s in enumerate(steps))
        raise ValueError(f"save: ranks are saving different steps ({shown}); every rank must save the same step")
    plan = _build_plan([p["described"] for p in payloads], store, step, g, mesh_desc, target_chunk_bytes)
    if payloads[0]["replacing"]:
        # an earlier (committed or torn) save of this step goes first, marker
        # first; nobody writes a chunk before it is gone
        error = None
        if g.rank == 0:
            try:
                store.begin(step)
            except Exception as exc:  # noqa: BLE001
                error = exc
        agree(g, error)
    for leaf in leaves:
        if leaf.tensor is not None:
            plan.tensors[leaf.key] = leaf.tensor
    return plan


def _build_plan(everyone: list[list[dict]], store, step, g: Group, mesh, target_chunk_bytes) -> SavePlan:
    """The same plan on every rank, from every rank's descriptions."""
    by_key: dict[str, list] = {}
    for rank, described in enumerate(everyone):
        for d in described:
            by_key.setdefault(d["key"], []).append((rank, d))
    arrays, entries, values, itemsizes = {}, {}, {}, {}
    for key, items in by_key.items():
        first = items[0][1]
        kinds = sorted({d["kind"] for _, d in items})
        if len(kinds) > 1:
            raise ValueError(f"key {key!r} is saved as {' and '.join(kinds)} on different ranks")
        kind = first["kind"]
        holders = [r for r, _ in items]
        if kind in ("value", "per_rank_value", "per_rank") and len(items) != g.size:
            raise ValueError(f"key {key!r} ({kind}) is present on ranks {holders} but not on "
                             f"every one of the {g.size} ranks")
        if kind == "value":
            if len({d["hash"] for _, d in items}) > 1:
                raise ValueError(f"the plain value at key {key!r} differs across ranks; replicated "
                                 f"values must be equal (wrap per-rank values in PerRank)")
            values[key] = ValueEntry(path=tuple(first["path"]), containers=first["containers"],
                                     value=first["value"])
            continue
        if kind == "per_rank_value":
            values[key] = ValueEntry(path=tuple(first["path"]), containers=first["containers"],
                                     per_rank=tuple(d["value"] for _, d in items))
            continue
        for field_name in ("dtype", "shape", "storage_shape"):
            seen = {tuple(d[field_name]) if isinstance(d[field_name], list) else d[field_name]
                    for _, d in items}
            if len(seen) > 1:
                detail = ", ".join(f"rank {r}: {d[field_name]}" for r, d in items)
                raise ValueError(f"tensor {key!r} has different {field_name.replace('_', ' ')}s on "
                                 f"different ranks ({detail})")
        sshape = tuple(first["storage_shape"])
        fragments = [(r, (tuple(d["box"][0]), tuple(d["box"][1]))) for r, d in items]
        layout.check_fragments(key, sshape, fragments)
        if kind != "per_rank":
            check_replicas(key, kind, [(r, box, d["fingerprint"]) for (r, box), (_, d) in zip(fragments, items)])
        dtype = getattr(torch, first["dtype"])
        itemsizes[key] = dtype.itemsize
        chunks = layout.choose_chunks(sshape, [b for _, b in fragments], dtype.itemsize, target_chunk_bytes)
        arrays[key] = layout.ArrayPlan(key, sshape, chunks, fragments)
        entries[key] = TensorEntry(path=tuple(first["path"]), containers=first["containers"],
                                   array=array_path(first["path"]), placement=kind,
                                   dtype=first["dtype"], shape=tuple(first["shape"]),
                                   storage_dtype=dtype_name(storage_dtype(dtype)),
                                   storage_shape=sshape, chunks=tuple(chunks),
                                   fragments=tuple(Fragment(r, *b) for r, b in fragments),
                                   nbytes=math.prod(sshape) * dtype.itemsize, checksums={})
    transfers = layout.assign(list(arrays.values()), g.size, itemsizes)
    groups = {""}
    for entry in entries.values():
        parts = entry.array.split("/")
        groups.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return SavePlan(store, step, g, mesh, arrays, entries, values, transfers, sorted(groups))


# ------------------------------------------------------------------ data

def _local_view(kind: str, t: torch.Tensor) -> np.ndarray:
    """This rank's fragment as a numpy view in storage coordinates."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return as_numpy(t.unsqueeze(0) if kind == "per_rank" else t)


def _my_box(arr: layout.ArrayPlan, me: int):
    return next(box for r, box in arr.fragments if r == me)


def exchange_parts(plan: SavePlan, tensors: dict) -> dict:
    """Assemble the chunks this rank owns but holds only in part (collective,
    point-to-point; a no-op without communication when no chunk straddles
    ranks, which is the common case).  Returns {(key, chunk): numpy array}."""
    if not plan.transfers:
        return {}
    g, me = plan.group, plan.group.rank
    assembled: dict = {}
    pending = []
    views = {}

    def view(key):
        if key not in views:
            views[key] = _local_view(plan.entries[key].placement, tensors[key])
        return views[key]

    for tr in plan.transfers:
        arr = plan.arrays[tr.key]
        if tr.dst == me:
            cbox = layout.chunk_box(tr.chunk, arr.shape, arr.chunks)
            if (tr.key, tr.chunk) not in assembled:
                buf = np.empty([stop - start for start, stop in zip(*cbox)], dtype=view(tr.key).dtype)
                own = layout.intersect(_my_box(arr, me), cbox)
                if own is not None:
                    buf[layout.relative(own, cbox[0])] = view(tr.key)[layout.relative(own, _my_box(arr, me)[0])]
                assembled[(tr.key, tr.chunk)] = buf
            part = np.empty([stop - start for start, stop in zip(*tr.box)], dtype=view(tr.key).dtype)
            raw = torch.from_numpy(part.reshape(-1).view(np.uint8))
            pending.append((comms.irecv(raw, g.global_rank(tr.src), g.handle), part, tr, cbox))
        elif tr.src == me:
            part = contiguous(view(tr.key)[layout.relative(tr.box, _my_box(arr, me)[0])])
            raw = torch.from_numpy(part.reshape(-1).view(np.uint8))
            pending.append((comms.isend(raw, g.global_rank(tr.dst), g.handle), None, tr, None))
    for p, part, tr, cbox in pending:
        p.wait()
        if part is not None:
            assembled[(tr.key, tr.chunk)][layout.relative(tr.box, cbox[0])] = part
    return assembled


def my_chunk_data(plan: SavePlan, tensors: dict, parts: dict | None = None) -> list[tuple]:
    """The chunks this rank writes: [(key, chunk index, chunk box, numpy
    array of the chunk's valid values)], from ``parts`` (assembled chunks,
    {(key, index): array}) or views of ``tensors`` (this rank's local
    tensors or host copies).  KeyError when a tensor is missing."""
    parts = parts or {}
    me = plan.group.rank
    views = {}
    tasks = []
    for key, index in plan.my_chunks():
        arr = plan.arrays[key]
        cbox = layout.chunk_box(index, arr.shape, arr.chunks)
        if (key, index) in parts:
            data = parts[(key, index)]
        else:
            if key not in views:
                if key not in tensors:
                    raise KeyError(f"write_chunks: no local tensor for {key!r}")
                views[key] = _local_view(plan.entries[key].placement, tensors[key])
            data = views[key][layout.relative(cbox, _my_box(arr, me)[0])]
        tasks.append((key, index, cbox, data))
    return tasks


def array_prefix(plan: SavePlan, key: str) -> str:
    """Where ``key``'s Zarr array of ``plan``'s step lives in the store."""
    return f"{data_prefix(plan.step)}/{plan.entries[key].array}"


def keep_in_memory(sink, plan: SavePlan, tensors: dict, parts: dict | None, checksums: dict,
                   settle: bool = False) -> None:
    """After ``plan``'s step committed: hand the chunks this rank wrote,
    keyed by their store keys, with their crc32c (``checksums``, what
    `write_chunks` returned) to ``sink`` (`loom.checkpoint.memory`).
    ``settle``: also wait until a sink that hands off in the background
    has done so (a synchronous save: the step is in memory when it returns)."""
    if sink is None:
        return
    chunks, sums = {}, {}
    for key, index, _, data in my_chunk_data(plan, tensors, parts):
        where = zarr_io.chunk_key(array_prefix(plan, key), index)
        chunks[where] = contiguous(data)
        sums[where] = checksums[key][layout.chunk_name(index)]
    memory.offer(sink, plan.step, chunks, sums)
    if settle and hasattr(sink, "wait"):
        sink.wait()


def write_chunks(plan: SavePlan, tensors: dict, parts: dict | None = None,
                 threads: int = IO_THREADS) -> dict:
    """Write every chunk this rank owns, plus the Zarr metadata documents it
    owns.  No communication, so it may run on a background thread.
    ``tensors`` maps keys to this rank's local tensors (or host copies of
    them).  Returns {key: {chunk name: crc32c}} for `commit`."""
    me, store = plan.group.rank, plan.store
    tasks = my_chunk_data(plan, tensors, parts)
    paths = {key: array_prefix(plan, key) for key in {t[0] for t in tasks}}
    edge_arrays = {}

    written = []  # store keys, for `durable`

    def write(task):
        if len(task) == 2:  # a metadata document
            store.put(*task)
            if plan.durable:
                store.sync([task[0]], dirs=False)
            written.append(task[0])
            return None
        key, index, cbox, data = task
        data = contiguous(data)
        chunks = plan.arrays[key].chunks
        where = zarr_io.chunk_key(paths[key], index)
        if zarr_io.is_prefix(data.shape, chunks):
            zarr_io.write_raw(store, where, data, chunks)
        else:  # an edge chunk cut along an inner dim: zarr-python lays it out
            if key not in edge_arrays:  # built once per array (two threads may race: same result)
                edge_arrays[key] = open_array(store, paths[key], array_document(key, plan.entries[key]))
            edge_arrays[key][tuple(slice(start, stop) for start, stop in zip(*cbox))] = data
        if plan.durable:
            store.sync([where], dirs=False)  # in parallel; the directories once, below
        written.append(where)
        return key, layout.chunk_name(index), checksum(data)

    sums: dict = {}
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for done in pool.map(write, _metadata_documents(plan, me) + tasks):
            if done is not None:
                key, name, crc = done
                sums.setdefault(key, {})[name] = crc
    if plan.durable and written:
        store.sync(written, files=False)  # every directory of this rank's files, once
    return sums


def _metadata_documents(plan: SavePlan, me: int) -> list[tuple[str, bytes]]:
    """The zarr.json documents this rank writes: the arrays it is the
    metadata writer of, and (rank 0) every group."""
    prefix = data_prefix(plan.step)
    docs = [(f"{prefix}/{plan.entries[key].array}/zarr.json",
             json.dumps(array_document(key, plan.entries[key])).encode())
            for key, arr in plan.arrays.items() if arr.meta_writer == me]
    if me == 0:
        for gpath in plan.groups:
            attrs = {"loom": {"step": plan.step}} if gpath == "" else {}
            where = f"{prefix}/{gpath}/zarr.json" if gpath else f"{prefix}/zarr.json"
            docs.append((where, json.dumps(group_metadata(attrs)).encode()))
    return docs


# ----------------------------------------------------------------- commit

def commit(plan: SavePlan, checksums: dict, error: BaseException | None = None,
           on_committed=None) -> str:
    """Collective: once every rank has written (the exchange is the barrier),
    rank 0 checks that the job still owns the store, then writes the
    manifest, the marker and ``latest``.  A failure on any rank (``error``,
    or `CheckpointOwnershipError` when the store was taken over) raises on
    every rank, commits nothing and leaves no torn step (rank 0 removes
    the step this save started, unless it is committed or the job no
    longer owns the store).  ``on_committed`` (rank 0, after the marker,
    before the closing agreement) is housekeeping such as retention: every
    rank returns only after it, so the store looks final to all of them;
    its errors do not undo the commit.  A claim that `plan_save` made is
    released here, whatever happens."""
    try:
        return _commit(plan, checksums, error, on_committed)
    except BaseException:
        _discard_torn(plan)  # every rank is past writing: each entered the commit's agreement
        raise
    finally:
        if plan.ownership is not None:
            plan.ownership.end_step(plan.step)
        if plan.release_ownership and plan.ownership is not None:
            plan.ownership.release()


def _commit(plan: SavePlan, checksums: dict, error, on_committed) -> str:
    g = plan.group
    everyone = agree(g, error, checksums)
    failure = None
    if g.rank == 0:
        try:
            if plan.ownership is not None:
                plan.ownership.check()  # a job that lost the store commits nothing
            manifest = build_manifest(plan, everyone, time.time())
            plan.store.commit(plan.step, manifest.to_json(), durable=plan.durable)
        except Exception as exc:  # noqa: BLE001
            failure = exc
        if failure is None and on_committed is not None:
            on_committed()
    agree(g, failure, custom=ERRORS)
    return plan.location


def build_manifest(plan: SavePlan, everyone: list, created: float):
    """The manifest of ``plan``'s step from every rank's `write_chunks`
    result (``everyone``, group order); RuntimeError naming the chunks no
    rank wrote."""
    tensors = {}
    for key, entry in plan.entries.items():
        sums = {}
        for rank_sums in everyone:
            sums.update(rank_sums.get(key, {}))
        expected = {layout.chunk_name(i) for i in plan.arrays[key].owners}
        if set(sums) != expected:
            raise RuntimeError(f"chunks {sorted(expected - set(sums))} of {key!r} were not written")
        tensors[key] = replace(entry, checksums=sums)
    return new_manifest(plan.step, plan.group.size, plan.mesh, created, tensors, plan.values)


def written_files(plan: SavePlan, tensors: dict, parts: dict | None = None) -> list[str]:
    """The store keys `write_chunks` writes on this rank: its metadata
    documents and its chunks (what a copy to another level carries)."""
    me = plan.group.rank
    docs = [rel for rel, _ in _metadata_documents(plan, me)]
    return docs + [zarr_io.chunk_key(array_prefix(plan, key), index)
                   for key, index, _, _ in my_chunk_data(plan, tensors, parts)]


def _discard_torn(plan: SavePlan) -> None:
    """After a failed commit of ``plan``, rank 0 removes the step the save
    started, unless the step is committed or the job no longer owns the
    store (the step may then be another job's).  Best effort: a torn step
    is invisible anyway, and `gc` removes what is left."""
    if plan.group.rank != 0:
        return
    try:
        if plan.ownership is not None and plan.ownership.lost() is not None:
            return
        if plan.store.marker(plan.step) is None:
            plan.store.remove(step_name(plan.step), recursive=True)
    except Exception:  # noqa: BLE001 - invisible without its marker
        pass


def save(state: dict, url: str, *, step: int, group=None, mesh=None, durable: bool = False,
         job: str | None = None, takeover: bool = False, snapshots=None) -> str:
    """Collective save of ``state`` as ``step`` under ``url``; returns the
    committed location.  Works with no process group (a single process).
    ``durable=True`` fsyncs every file and directory of the step before the
    commit marker (and the marker before ``latest``): the committed step then
    survives a machine crash or power loss, not only a killed process.
    Without it the step is committed in the page cache (faster).

    The store is claimed by the first save and the claim is kept by the
    process (rank 0) until `release_store` or exit, so no other job can
    write between this job's saves (`claim_store` with ``keep``; a claim
    this process already holds for the same ``job``, or for any job when
    ``job`` is None, is shared): a store another job owns raises
    `CheckpointOwnershipError` on every rank, naming it; ``takeover=True``
    claims it anyway (dangerous: see `claim_store`).  Ranks that do not
    share the store (memory:// across processes) raise
    `StoreNotSharedError` before anything is written.  A save that fails
    on any rank raises on every rank and leaves no torn step behind.
    Bad ``state`` raises ValueError/TypeError naming the key.
    ``snapshots``: a `loom.checkpoint.memory.SnapshotSink` that receives
    the chunks this rank wrote once the step is committed (a copy the
    caller's training thread waits for; its failure is only logged)."""
    g = resolve(group)
    ownership = claim_store(url, group=g, job=job, takeover=takeover, keep=True)
    plan = plan_save(state, url, step=step, group=g, mesh=mesh, durable=durable, ownership=ownership)
    error, sums, parts = None, {}, {}
    try:
        parts = exchange_parts(plan, plan.tensors)
        sums = write_chunks(plan, plan.tensors, parts)
    except Exception as exc:  # noqa: BLE001 - commit() raises it on every rank
        error = exc
    location = commit(plan, sums, error)  # a failure removes the torn step
    keep_in_memory(snapshots, plan, plan.tensors, parts, sums, settle=True)
    return location

