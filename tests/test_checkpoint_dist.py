"""loom.checkpoint across gloo processes: the reshard matrix (save at world 4,
load at 1, 2, 3, 4 with other splits), one writer per chunk and minimal reads
(checked through the store), PerRank, errors on every rank, and a process
killed in the middle of a save."""
import math
import os

import pytest
import torch
import torch.distributed as dist

from loom import checkpoint as ckpt
from loom.checkpoint import layout, zarr_io
from loom.checkpoint.manifest import MARKER
from loom.checkpoint.store import CheckpointStore, data_prefix

from helpers import bits, chunk_file, die_after_write, flip_byte, sabotage_chunk_writes, same

TIMEOUT = 240


def reference() -> dict:
    """The global tensors every layout saves and loads (deterministic)."""
    g = torch.Generator().manual_seed(1234)
    return {
        "w": torch.randn(10, 6, generator=g, dtype=torch.float64),
        "col": torch.randn(5, 8, generator=g),
        "grid": torch.randn(6, 8, generator=g).to(torch.bfloat16),
        "flat": torch.randn(7, 9, generator=g),
        "zero": torch.randn(1000, generator=g, dtype=torch.float64),
        "rep": torch.randn(12, 5, generator=g, dtype=torch.float64),
        "emb": torch.randint(-2**40, 2**40, (8, 3), generator=g),
        "scalar": torch.tensor(0.75, dtype=torch.float64),
        "empty": torch.empty(0, 3),
    }


def cuts(n: int, parts: int, skew: float) -> list[int]:
    """Uneven split points of n into parts (equal points give empty parts)."""
    return [round(n * (i / parts) ** skew) for i in range(parts + 1)]




def saved_layout(rank: int) -> dict:
    """World 4: uneven Shard boxes, Flat fragments incl. an empty one, replicas."""
    ref = reference()
    rows = [0, 3, 4, 8, 10]
    colc = [0, 2, 5, 5, 8]                      # rank 2 holds an empty column box
    gr, gc = divmod(rank, 2)
    grid_rows, grid_cols = [0, 4, 6], [0, 3, 8]
    fl = [0, 20, 20, 41, 63]                    # rank 1 holds an empty Flat range
    zc = [0, 1, 500, 700, 1000]                 # boundaries without a useful divisor
    half = rank // 2                            # emb: rows [0,4) on ranks 0,1 and [4,8) on 2,3
    return {
        "model": {
            "w": ckpt.Shard(ref["w"][rows[rank]:rows[rank + 1]].clone(), (10, 6), (rows[rank], 0)),
            "col": ckpt.Shard(ref["col"][:, colc[rank]:colc[rank + 1]].clone(), (5, 8), (0, colc[rank])),
            "grid": ckpt.Shard(ref["grid"][grid_rows[gr]:grid_rows[gr + 1], grid_cols[gc]:grid_cols[gc + 1]].clone(),
                               (6, 8), (grid_rows[gr], grid_cols[gc])),
            "rep": ref["rep"].clone(),
            "emb": ckpt.Shard(ref["emb"][4 * half:4 * half + 4].clone(), (8, 3), (4 * half, 0)),
            "scalar": ref["scalar"].clone(),
            "empty": ref["empty"].clone(),
        },
        "optim": {
            "flat": ckpt.Flat(ref["flat"].reshape(-1)[fl[rank]:fl[rank + 1]].clone(), (7, 9), fl[rank]),
            "zero": ckpt.Flat(ref["zero"][zc[rank]:zc[rank + 1]].clone(), (1000,), zc[rank]),
            "step": 12,
        },
        "rng": ckpt.PerRank({"state": torch.full((3,), float(rank)), "pos": 100 + rank}),
    }


def target_layout(rank: int, world: int, variant: int) -> tuple[dict, dict]:
    """Another layout at ``world`` ranks; returns (target, expected values)."""
    ref = reference()
    skew = 1.0 + 0.7 * variant
    t, e = {"model": {}, "optim": {}}, {}

    def shard(name, group, dim, c):
        lo, hi = c[rank], c[rank + 1]
        box = [slice(None)] * ref[name].dim()
        box[dim] = slice(lo, hi)
        offsets = [0] * ref[name].dim()
        offsets[dim] = lo
        t[group][name] = ckpt.Shard(torch.zeros_like(ref[name][tuple(box)]), ref[name].shape, offsets)
        e[name] = ref[name][tuple(box)]

    def flat(name, group, c):
        lo, hi = c[rank], c[rank + 1]
        t[group][name] = ckpt.Flat(torch.zeros(hi - lo, dtype=ref[name].dtype), ref[name].shape, lo)
        e[name] = ref[name].reshape(-1)[lo:hi]

    shard("w", "model", variant % 2, cuts(ref["w"].shape[variant % 2], world, skew))
    flat("col", "model", cuts(40, world, skew))
    t["model"]["grid"] = torch.zeros(6, 8, dtype=torch.bfloat16)
    e["grid"] = ref["grid"]
    shard("rep", "model", 0, cuts(12, world, skew))
    flat("emb", "model", cuts(24, world, 2.0))
    t["model"]["scalar"] = torch.zeros((), dtype=torch.float64)
    e["scalar"] = ref["scalar"]
    t["model"]["empty"] = torch.empty(0, 3)
    e["empty"] = ref["empty"]
    shard("flat", "optim", 1, cuts(9, world, skew))
    flat("zero", "optim", cuts(1000, world, 0.5))
    t["optim"]["step"] = 0
    return t, e


def check_loaded(target, expected, where):
    got = {**target["model"], **target["optim"]}
    for name, want in expected.items():
        have = got[name].tensor if isinstance(got[name], (ckpt.Shard, ckpt.Flat)) else got[name]
        assert same(have, want), f"{where}: {name} differs"
    assert target["optim"]["step"] == 12, where


def _resolver(saved, rank, world):
    return saved[rank * len(saved) // world]


# ----------------------------------------------------------------- workers

def _recording(fn):
    """Run ``fn`` with every Zarr-store and small-file write and read recorded."""
    from zarr.storage import WrapperStore

    log = {"set": [], "get": []}

    class Recording(WrapperStore):
        async def set(self, key, value):
            log["set"].append(key)
            await super().set(key, value)

        async def get(self, key, prototype, byte_range=None):
            log["get"].append(key)
            return await super().get(key, prototype, byte_range)

    real_zarr, real_put, real_raw = CheckpointStore.zarr_store, CheckpointStore.put, zarr_io.read_raw
    real_write_raw, real_map = zarr_io.write_raw, zarr_io.map_raw

    def write_raw(store, key, data, chunk_shape):  # most chunks are written as raw bytes
        log["set"].append(key)
        real_write_raw(store, key, data, chunk_shape)

    def put(self, rel, data):
        log["set"].append(rel)
        real_put(self, rel, data)

    def read_raw(store, key, dest):  # whole chunks are read straight from the chunk object
        log["get"].append(key)
        return real_raw(store, key, dest)

    def map_raw(store, key, nbytes):  # ... or mapped, on a local store
        log["get"].append(key)
        return real_map(store, key, nbytes)

    CheckpointStore.zarr_store = property(lambda self: Recording(real_zarr.fget(self)))
    CheckpointStore.put, zarr_io.read_raw, zarr_io.write_raw = put, read_raw, write_raw
    zarr_io.map_raw = map_raw
    try:
        result = fn()
    finally:
        CheckpointStore.zarr_store, CheckpointStore.put = real_zarr, real_put
        zarr_io.read_raw, zarr_io.write_raw, zarr_io.map_raw = real_raw, real_write_raw, real_map
    return result, log


def _save_world4(url):
    rank = dist.get_rank()

    def run():
        # the three pieces an asynchronous engine reuses; a tiny chunk target
        # makes many chunks (split by divisors) and straddling ones to assemble
        plan = ckpt.plan_save(saved_layout(rank), url, step=7, mesh={"dp": 2, "tp": 2},
                              target_chunk_bytes=96)
        host = {k: v.clone() for k, v in plan.tensors.items()}  # "host copies"
        parts = ckpt.exchange_parts(plan, host)
        sums = ckpt.write_chunks(plan, host, parts)
        return ckpt.commit(plan, sums), len(plan.transfers)

    (location, transfers), log = _recording(run)
    # a failure on one rank raises on every rank, naming it
    bad = saved_layout(rank)
    if rank == 2:
        bad["optim"]["step"] = object()
    try:
        ckpt.save(bad, url, step=8)
        failed = None
    except TypeError as exc:
        failed = str(exc)
    return location, transfers, log["set"], failed


def _load_world(url, world_variants, read_check):
    rank, world = dist.get_rank(), dist.get_world_size()
    reads = []
    for variant in world_variants:
        target, expected = target_layout(rank, world, variant)
        target["rng"] = ckpt.PerRank(None, resolver=_resolver)
        info, log = _recording(lambda: ckpt.load(target, url))
        check_loaded(target, expected, f"world {world} variant {variant} rank {rank}")
        assert info.step == 7 and info.world_size == 4 and info.mesh == {"dp": 2, "tp": 2}
        src = rank if world == 4 else rank * 4 // world
        assert torch.equal(target["rng"].value["state"], torch.full((3,), float(src)))
        assert target["rng"].value["pos"] == 100 + src
        reads.append(sorted(k for k in log["get"] if "/model/w/c/" in k))
    if read_check and world != 4:
        try:
            ckpt.load({"rng": ckpt.PerRank(None)}, url, strict=False)
        except ValueError as exc:
            return reads, str(exc)
    return reads, None


def _crash_mid_save(url, where):
    """Save step 1, then die (os._exit) in the middle of saving step 2."""
    rank = dist.get_rank()
    state = {"w": ckpt.Shard(torch.full((4, 3), float(rank)), (8, 3), (4 * rank, 0)), "n": 1}
    ckpt.save(state, url, step=1)
    if where == "chunks" and rank == 1:
        sabotage_chunk_writes(die_after_write)  # killed right after writing one chunk
    if where == "marker" and rank == 0:
        real_put = CheckpointStore.put

        def put(self, rel, data):
            if rel.endswith(MARKER):
                os._exit(3)  # killed after the manifest, before the marker
            real_put(self, rel, data)

        CheckpointStore.put = put
    state["w"].tensor.fill_(-1.0)
    ckpt.save(state, url, step=2)
    return "finished"


def _shared_chunks(url):
    """Row shards saved, column shards loaded (plus a replicated tensor): both
    ranks read every chunk.  Returns what this rank checked, whether the
    values were right, and the error after another rank's chunk is damaged."""
    import importlib
    load_mod = importlib.import_module("loom.checkpoint.load")  # the module, not ckpt.load
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(7)
    w, rep = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g)
    ckpt.save({"w": ckpt.Shard(w[4 * rank:4 * rank + 4].clone(), (8, 6), (4 * rank, 0)), "rep": rep},
              url, step=1)
    checked, real_verify = [], load_mod.ChunkReader._verify

    def verify(self, key, index, data):
        checked.append((key, layout.chunk_name(index)))
        real_verify(self, key, index, data)

    def load():
        target = {"w": ckpt.Shard(torch.zeros(8, 3, dtype=torch.float64), (8, 6), (0, 3 * rank)),
                  "rep": torch.zeros(5, 3)}
        ckpt.load(target, url)
        return torch.equal(target["w"].tensor, w[:, 3 * rank:3 * rank + 3]) and torch.equal(target["rep"], rep)

    load_mod.ChunkReader._verify = verify
    try:
        right = load()
    finally:
        load_mod.ChunkReader._verify = real_verify
    everyone = [None, None]
    dist.all_gather_object(everyone, sorted(checked))
    victim = next(name for key, name in everyone[1] if key == "w")  # a chunk rank 1 checks
    if rank == 0:
        flip_byte(chunk_file(url, 1, "w", victim), offset=5)  # column 0: rank 0's half
    dist.barrier()
    try:
        load()
        error = None
    except ckpt.ChecksumError as exc:
        error = str(exc)
    return sorted(checked), right, victim, error


# ------------------------------------------------------------------- tests

@pytest.mark.timeout(TIMEOUT)
def test_chunks_read_by_several_ranks_are_checked_once_and_damage_fails_every_rank(distributed, tmp_path):
    url = str(tmp_path / "ck")
    (checked0, right0, victim, error0), (checked1, right1, _, error1) = \
        distributed(_shared_chunks, 2, url, timeout=TIMEOUT)
    assert right0 and right1
    manifest = CheckpointStore(url).read_manifest(1)
    every_chunk = sorted((key, layout.chunk_name(i)) for key, e in manifest.tensors.items()
                         for i in layout.chunk_indices(e.storage_shape, e.chunks))
    assert sorted(checked0 + checked1) == every_chunk  # each chunk checked by exactly one rank
    assert any(k == "w" for k, _ in checked0) and any(k == "w" for k, _ in checked1)  # the work is shared
    # rank 0 read the damaged bytes without checking them; it fails all the same, naming rank 1
    assert error1 is not None and f"array 'w' chunk {victim}" in error1
    assert error0 is not None and error0.startswith("rank 1: ChecksumError") and f"chunk {victim}" in error0



def _damaged_step_in_a_collective_load(url):
    """Step 2 has a short chunk object: every rank learns it from rank 0's
    check before anything is planned or allocated, and raises the same
    error (file and field); fallback moves every rank to step 1."""
    import importlib
    load_mod = importlib.import_module("loom.checkpoint.load")
    rank = dist.get_rank()

    def state(v):
        return {"w": ckpt.Shard(torch.full((4, 3), float(v + rank)), (8, 3), (4 * rank, 0))}
    ckpt.save(state(10), url, step=1)
    ckpt.save(state(20), url, step=2)
    if rank == 0:
        manifest = CheckpointStore(url).read_manifest(2)
        last = max(manifest.tensors["w"].checksums)  # a chunk rank 1 holds
        os.truncate(chunk_file(url, 2, "w", last), 4)
    dist.barrier()
    planned, real_plan = [], load_mod._plan_step
    load_mod._plan_step = lambda *a: planned.append(a[2].step) or real_plan(*a)
    target = {"w": torch.zeros(8, 3)}
    try:
        try:
            ckpt.load(target, url)
            error = None
        except ckpt.InvalidCheckpointError as exc:
            error = (type(exc).__name__, exc.file, exc.field, str(exc))
        info = ckpt.load(target, url, fallback=True)
    finally:
        load_mod._plan_step = real_plan
    right = torch.equal(target["w"], torch.cat([torch.full((4, 3), 10.0), torch.full((4, 3), 11.0)]))
    return error, planned, info.step, info.skipped, right


@pytest.mark.timeout(TIMEOUT)
def test_a_damaged_step_fails_every_rank_alike_before_any_allocation(distributed, tmp_path):
    url = str(tmp_path / "ck")
    (e0, p0, s0, k0, r0), (e1, p1, s1, k1, r1) = distributed(_damaged_step_in_a_collective_load, 2, url,
                                                            timeout=TIMEOUT)
    assert e0 is not None and e0 == e1 and e0[0] == "InvalidCheckpointError"
    assert e0[1].startswith(f"{url}/step-00000002/state/w/c/") and e0[2] == "tensors['w'].chunks"
    assert p0 == p1 == [1]  # step 2 was never planned (nothing sized by its manifest was allocated)
    assert s0 == s1 == 1 and k0 == k1 and [k["step"] for k in k0] == [2] and r0 and r1


def _check_plain_zarr(url, step):
    """Every global array reads back through zarr-python, bit for bit (the
    chunks loom writes as raw bytes, edge chunks included, follow the spec)."""
    import numpy as np
    import zarr
    ref = reference()
    for key, entry in CheckpointStore(url).read_manifest(step).tensors.items():
        name = key.split("/")[-1]
        if name in ref:
            array = zarr.open_array(f"{url}/{data_prefix(step)}/{entry.array}", mode="r")
            assert array.shape == entry.storage_shape, key  # a 0-d tensor is stored as [1]
            got = torch.from_numpy(np.ascontiguousarray(array[...])).reshape(ref[name].shape)
            assert torch.equal(bits(got), bits(ref[name])), key


@pytest.mark.timeout(TIMEOUT)
def test_reshard_matrix_one_writer_per_chunk_and_minimal_reads(distributed, tmp_path):
    url = str(tmp_path / "ck")
    results = distributed(_save_world4, 4, url, timeout=TIMEOUT)
    locations, transfers, writes, failures = zip(*results)
    assert set(locations) == {f"{url}/step-00000007"}
    assert transfers[0] > 0  # the straddling 'zero' chunks were assembled by their owners
    assert all(f is not None and "key 'optim/step'" in f for f in failures)  # every rank raised
    assert all("rank 2" in f for i, f in enumerate(failures) if i != 2)
    assert CheckpointStore(url).committed_steps() == [7]
    _check_plain_zarr(url, 7)

    # one writer per chunk (and per metadata document), every chunk written
    written = [set(w) for w in writes]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not written[a] & written[b], (a, b, written[a] & written[b])
    manifest = CheckpointStore(url).read_manifest(7)
    expected_chunks = set()
    for entry in manifest.tensors.values():
        for index in layout.chunk_indices(entry.storage_shape, entry.chunks):
            expected_chunks.add(f"{data_prefix(7)}/{entry.array}/c/" + "/".join(map(str, index)) if index
                                else f"{data_prefix(7)}/{entry.array}/c")
    all_chunk_writes = {k for w in written for k in w if "/c/" in k or k.endswith("/c")}
    assert all_chunk_writes == expected_chunks
    w_entry = manifest.tensors["model/w"]
    assert w_entry.placement == "shard" and w_entry.chunks == (1, 6)
    owners = {f.lo for f in manifest.tensors["model/rep"].fragments}
    assert len(owners) == 1  # replicated: one box, all four ranks hold it
    rep_writers = [r for r in range(4) if any("/model/rep/c/" in k for k in written[r])]
    assert rep_writers == [0, 1, 2, 3]  # ... and all four wrote a share

    # load at 4 (two other splits), 3, 2 ranks; then 1 (this process, no process group)
    for world, variants in ((4, (1, 2)), (3, (0, 1)), (2, (1,))):
        out = distributed(_load_world, world, url, variants, True, timeout=TIMEOUT)
        for rank, (reads, per_rank_error) in enumerate(out):
            for variant, keys in zip(variants, reads):
                # only the chunks (rows of 'w', one row per chunk) that the rank's box touches
                dim = variant % 2
                c = cuts(10 if dim == 0 else 6, world, 1.0 + 0.7 * variant)
                rows = range(c[rank], c[rank + 1]) if dim == 0 else range(10 if c[rank + 1] > c[rank] else 0)
                assert keys == sorted(f"{data_prefix(7)}/model/w/c/{r}/0" for r in rows)
            if world != 4:
                assert "saved by 4 ranks and is loaded by" in per_rank_error
    target, expected = target_layout(0, 1, 0)
    target["rng"] = ckpt.PerRank(None, resolver=_resolver)
    ckpt.load(target, url)
    check_loaded(target, expected, "world 1")
    assert target["rng"].value["pos"] == 100


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("where", ["chunks", "marker"])
def test_killed_mid_save_leaves_previous_step(distributed, tmp_path, where):
    from loom.comms.testing import WorkerError
    url = str(tmp_path / "ck")
    with pytest.raises((WorkerError, RuntimeError)):
        distributed(_crash_mid_save, 2, url, where, timeout=TIMEOUT)
    store = CheckpointStore(url)
    # a surviving rank 0 removes the torn step (save discards it); a killed one cannot
    torn = store.steps()[1:]
    assert store.committed_steps() == [1] and store.latest() == 1 and torn in ([], [2])
    assert torn == [2] or where == "chunks"
    target = {"w": torch.zeros(8, 3), "n": 0}
    info = ckpt.load(target, url)  # no process group here: world 1 reads both shards
    assert info.step == 1 and info.world_size == 2 and target["n"] == 1
    assert torch.equal(target["w"], torch.cat([torch.zeros(4, 3), torch.ones(4, 3)]))
    with pytest.raises(FileNotFoundError, match="not committed|no step 2"):
        ckpt.load(target, url, step=2)
    # newer than every commit, so possibly a save in progress: gc keeps it unless told
    assert ckpt.gc(url)["uncommitted"] == [] and store.steps() == [1, *torn]
    assert ckpt.gc(url, include_newer=True)["uncommitted"] == torn and store.steps() == [1]
    assert math.isclose(float(target["w"].sum()), 12.0)
