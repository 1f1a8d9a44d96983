"""loom.checkpoint in one process (no process group): round trips, errors,
integrity, commit protocol, retention, and the chunk planner."""
import json
import math
import os

import pytest
import torch

from loom import checkpoint as ckpt
from loom.checkpoint import layout
from loom.checkpoint.manifest import MANIFEST, MARKER
from loom.checkpoint.state import digest
from loom.checkpoint.store import CheckpointStore, step_name

from helpers import assert_same, bits, chunk_file, flip_byte


def special(dtype, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        x = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40]).to(dtype)
        return x
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    info = torch.iinfo(dtype)
    x = torch.randint(max(info.min, -2**62), min(info.max, 2**62), (n,), generator=g, dtype=dtype)
    x[:2] = torch.tensor([info.min, info.max], dtype=dtype)
    return x


def zeros_like_state(state):
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: zeros_like_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [zeros_like_state(v) for v in state]
    if isinstance(state, tuple):
        return tuple(zeros_like_state(v) for v in state)
    return None


def rich_state():
    return {
        "f32": special(torch.float32).reshape(8, 8),
        "bf16": special(torch.bfloat16).reshape(4, 16),
        "f64": special(torch.float64),
        "f16": special(torch.float16),
        "i64": special(torch.int64).reshape(2, 4, 8),
        "u8": special(torch.uint8),
        "flag": special(torch.bool),
        "c64": torch.complex(special(torch.float32), special(torch.float32, seed=1)),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "scalar_bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 5),
        "empty_bf16": torch.empty(3, 0, dtype=torch.bfloat16),
        "transposed": torch.arange(12.0).reshape(3, 4).t(),  # a non-contiguous view
        "nested": {"list": [torch.ones(2), {"deep": torch.arange(5)}], "tuple": (torch.zeros(1), 7),
                   7: {"int key": torch.full((2,), 7.0)}, "odd/key%": torch.ones(1)},
        "plain": {"n": 3, "x": 0.1, "nan": float("nan"), "inf": -float("inf"), "s": "text",
                  "none": None, "t": (1, (2, "3")), "l": [1, [2.5]], "d": {1: "one", (1, 2): "pair"},
                  "flag": True},
        "top_value": 42,
    }


# ------------------------------------------------------------- round trips

@pytest.mark.parametrize("url_kind", ["path", "file", "memory"])
def test_bitwise_round_trip_every_dtype_and_container(tmp_path, url_kind):
    url = {"path": str(tmp_path / "ck"), "file": f"file://{tmp_path}/ck",
           "memory": f"memory://rt-{os.getpid()}-{id(tmp_path)}"}[url_kind]
    state = rich_state()
    location = ckpt.save(state, url, step=5)
    assert location == url.rstrip("/") + "/" + step_name(5)
    target = zeros_like_state(state)
    target["plain"] = {}
    target["top_value"] = 0
    info = ckpt.load(target, url)
    assert info.step == 5 and info.world_size == 1 and info.missing == [] and info.unexpected == []
    assert_same(state, target)
    # tuple containers that hold tensors are filled in place; their plain parts are replaced
    assert target["nested"]["tuple"][1] == 7


def test_consolidated_arrays_are_plain_zarr(tmp_path):
    import zarr
    state = rich_state()
    ckpt.save(state, tmp_path, step=1)
    group = zarr.open_group(str(tmp_path / step_name(1) / "state"), mode="r")
    assert torch.equal(bits(torch.from_numpy(group["f32"][:])), bits(state["f32"]))
    bf = group["bf16"]
    assert bf.dtype == "uint16" and bf.attrs["loom"]["dtype"] == "bfloat16"
    assert torch.equal(torch.from_numpy(bf[:]), bits(state["bf16"]).view(torch.uint16).reshape(4, 16))
    assert group["nested"]["list"]["1"]["deep"][:].tolist() == [0, 1, 2, 3, 4]
    assert group["scalar"][()] == 3.25


def test_model_and_optimizer_state_dicts_as_they_are(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    x = torch.randn(16, 4, dtype=torch.float64)

    def step(m, o, s):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
        s.step()

    for _ in range(3):
        step(model, opt, sched)
    ckpt.save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()},
              f"file://{tmp_path}", step=3)
    step(model, opt, sched)
    reference = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(1)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).double()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=5)
    state = {"model": model2.state_dict(), "optim": opt2.state_dict(), "sched": sched2.state_dict()}
    assert state["optim"]["state"] == {}  # a fresh optimizer: rebuilt from the checkpoint
    ckpt.load(state, str(tmp_path))
    opt2.load_state_dict(state["optim"])
    sched2.load_state_dict(state["sched"])
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)
    step(model2, opt2, sched2)
    for p, q in zip(model2.parameters(), reference):
        assert torch.equal(p, q)


def test_shard_and_flat_in_one_process_reshape_between_layouts(tmp_path):
    g = torch.arange(60, dtype=torch.float64).reshape(6, 10)
    saved = {"sh": ckpt.Shard(g.clone(), (6, 10), (0, 0)),
             "fl": ckpt.Flat(g.reshape(-1).clone(), (6, 10), 0)}
    ckpt.save(saved, tmp_path, step=0)
    # load the Shard-saved tensor as a Flat range and the Flat-saved one as a box, and both whole
    a = ckpt.Flat(torch.zeros(17, dtype=torch.float64), (6, 10), 23)
    b = ckpt.Shard(torch.zeros(3, 4, dtype=torch.float64), (6, 10), (2, 5))
    ckpt.load({"sh": a, "fl": b}, tmp_path)
    assert torch.equal(a.tensor, g.reshape(-1)[23:40])
    assert torch.equal(b.tensor, g[2:5, 5:9])
    whole = {"sh": torch.zeros(6, 10, dtype=torch.float64), "fl": torch.zeros(6, 10, dtype=torch.float64)}
    ckpt.load(whole, tmp_path)
    assert torch.equal(whole["sh"], g) and torch.equal(whole["fl"], g)


def test_per_rank_single_process(tmp_path):
    rng = torch.get_rng_state()
    ckpt.save({"rng": ckpt.PerRank({"torch": rng, "pos": 17})}, tmp_path, step=1)
    target = {"rng": ckpt.PerRank(None)}
    ckpt.load(target, tmp_path)
    assert torch.equal(target["rng"].value["torch"], rng) and target["rng"].value["pos"] == 17


# ------------------------------------------------------------------ errors

def test_errors_name_the_key(tmp_path):
    ckpt.save({"a": torch.zeros(3, 2), "b": {"c": torch.zeros(4, dtype=torch.int64)}, "v": 1}, tmp_path, step=1)
    with pytest.raises(ValueError, match=r"shape mismatch at key 'a'.*\(3, 2\).*\(2, 3\)"):
        ckpt.load({"a": torch.zeros(2, 3)}, tmp_path)
    with pytest.raises(ValueError, match=r"dtype mismatch at key 'b/c'.*int64.*int32"):
        ckpt.load({"b": {"c": torch.zeros(4, dtype=torch.int32)}}, tmp_path)
    with pytest.raises(KeyError, match=r"lacks keys \['missing', 'x'\]"):
        ckpt.load({"a": torch.zeros(3, 2), "missing": torch.zeros(1), "x": {"y": 2}}, tmp_path)
    target = {"a": torch.zeros(3, 2), "missing": torch.ones(1), "v": 0}
    info = ckpt.load(target, tmp_path, strict=False)
    assert info.missing == ["missing"] and info.unexpected == ["b/c"] and target["v"] == 1
    assert torch.equal(target["missing"], torch.ones(1))  # untouched
    with pytest.raises(TypeError, match=r"key 'bad/obj'.*object.*JSON"):
        ckpt.save({"bad": {"obj": object()}}, tmp_path, step=2)
    with pytest.raises(TypeError, match=r"key 'x'.*set"):
        ckpt.save({"x": {1, 2}}, tmp_path, step=2)
    with pytest.raises(ValueError, match="step=-1"):
        ckpt.save({"a": torch.zeros(1)}, tmp_path, step=-1)
    with pytest.raises(ValueError, match="beyond global size"):
        ckpt.Shard(torch.zeros(3), (4,), (2,))
    with pytest.raises(ValueError, match="beyond the 4 elements"):
        ckpt.Flat(torch.zeros(3), (2, 2), 2)
    with pytest.raises(ValueError, match="cover 2 of its 4 elements"):  # a gap cannot be saved
        ckpt.save({"s": ckpt.Shard(torch.zeros(2), (4,), (0,))}, tmp_path, step=3)
    with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
        ckpt.load({}, tmp_path / "nothing")
    assert 2 not in CheckpointStore(str(tmp_path)).committed_steps()


def _rewrite_manifest(url, step, edit):
    """Tamper with a manifest and re-seal it (to test checks beyond the seal)."""
    store = CheckpointStore(str(url))
    manifest = json.loads(store.get(f"{step_name(step)}/{MANIFEST}"))
    edit(manifest)
    raw = json.dumps(manifest).encode()
    store.put(f"{step_name(step)}/{MANIFEST}", raw)
    store.put(f"{step_name(step)}/{MARKER}", json.dumps({"step": step, "manifest_sha256": digest(raw)}).encode())


def test_unknown_placement_and_tampered_manifest(tmp_path):
    ckpt.save({"w": torch.zeros(2)}, tmp_path, step=1)
    _rewrite_manifest(tmp_path, 1, lambda m: m["tensors"]["w"].update(placement="diagonal"))
    with pytest.raises(ckpt.InvalidCheckpointError,
                       match=r"tensors\['w'\].placement: unknown placement 'diagonal'") as err:
        ckpt.load({"w": torch.zeros(2)}, tmp_path)
    assert err.value.file.endswith(f"{step_name(1)}/{MANIFEST}") and err.value.field == "tensors['w'].placement"
    ckpt.save({"w": torch.zeros(2)}, tmp_path, step=2)
    store = CheckpointStore(str(tmp_path))
    store.put(f"{step_name(2)}/{MANIFEST}", b'{"format": "loom.checkpoint"}')  # not what the marker sealed
    with pytest.raises(ckpt.ChecksumError, match="manifest.json .* does not match"):
        ckpt.load({"w": torch.zeros(2)}, tmp_path, step=2)


# --------------------------------------------------------------- integrity

def test_flipped_byte_raises_naming_array_and_chunk_and_fallback_recovers(tmp_path):
    torch.manual_seed(0)
    old = {"w": torch.randn(64, 4), "b": torch.randn(3)}
    new = {"w": torch.randn(64, 4), "b": torch.randn(3)}
    ckpt.save(old, tmp_path, step=10)
    ckpt.save(new, tmp_path, step=20)
    flip_byte(chunk_file(tmp_path, 20, "w", "0.0"))
    target = {"w": torch.zeros(64, 4), "b": torch.zeros(3)}
    with pytest.raises(ckpt.ChecksumError, match=r"array 'w' chunk 0\.0 .*step-00000020"):
        ckpt.load(target, tmp_path)
    info = ckpt.load(target, tmp_path, fallback=True)
    assert info.step == 10 and [s["step"] for s in info.skipped] == [20]
    assert "chunk 0.0" in info.skipped[0]["error"]
    assert_same(target, old)
    problems = ckpt.verify(str(tmp_path), 20)
    assert len(problems) == 1 and "array 'w' chunk 0.0" in problems[0]
    assert ckpt.verify(str(tmp_path), 10) == []
    # a truncated or deleted chunk object is damage too
    os.truncate(chunk_file(tmp_path, 10, "w", "0.0"), 10)
    os.remove(chunk_file(tmp_path, 10, "b", "0"))
    problems = ckpt.verify(str(tmp_path), 10)
    assert len(problems) == 2
    assert "chunk 0 of array 'b' is missing" in problems[0]
    assert "chunk 0.0 of array 'w' is 10 bytes, not a full chunk of 1024 bytes" in problems[1]


def test_chunks_several_ranks_read_are_checked_once_split_by_bytes():
    import importlib
    import numpy as np
    ChunkReader = importlib.import_module("loom.checkpoint.load").ChunkReader
    from types import SimpleNamespace

    def entry(storage_shape, chunks):  # the TensorEntry fields a reader plans with
        return SimpleNamespace(storage_dtype="float32", storage_shape=storage_shape, chunks=chunks)
    manifest = SimpleNamespace(step=1, tensors={"a": entry((6, 4), (1, 4)), "b": entry((2,), (2,)),
                                                "s": entry((), ())})
    wants = [{"a": ((0, 0), (6, 4))}, {"a": ((0, 2), (6, 4)), "s": ((), ())}, {"b": ((0,), (2,))}]
    readers = []
    for want in wants:
        reader = ChunkReader(None, manifest)
        for key, box in want.items():
            reader.request(key, box, np.empty([stop - start for start, stop in zip(*box)], dtype=np.float32))
        readers.append(reader)
    claims = [r.claims() for r in readers]
    assert [len(c) for c in claims] == [2, 2, 2]  # 8 chunks: a one-byte bitmap per rank (hex)
    for rank, reader in enumerate(readers):
        reader.share_checks(claims, rank)
    # 'a' is read by ranks 0 and 1: each checks 3 of its 6 chunks ('s' already counts for rank 1)
    elsewhere = [sorted(r._checked_elsewhere) for r in readers]
    assert len(elsewhere[0]) == 3 and len(elsewhere[1]) == 3 and elsewhere[2] == []
    assert not set(elsewhere[0]) & set(elsewhere[1])
    assert {readers[0]._chunk_number("s", ()), readers[0]._chunk_number("b", (0,))}.isdisjoint(
        elsewhere[0] + elsewhere[1])


def test_filesystems_that_cannot_map_files_are_read_instead(tmp_path, monkeypatch):
    import mmap

    def cannot_map(*args, **kwargs):
        raise OSError(19, "No such device")  # what mmap says on some FUSE mounts

    state = {"w": torch.randn(64, 4), "b": torch.randn(3)}
    ckpt.save(state, tmp_path, step=1)
    monkeypatch.setattr(mmap, "mmap", cannot_map)
    target = {"w": torch.zeros(64, 4), "b": torch.zeros(3)}
    ckpt.load(target, tmp_path)
    assert_same(target, state)
    flip_byte(chunk_file(tmp_path, 1, "w", "0.0"))
    with pytest.raises(ckpt.ChecksumError, match=r"array 'w' chunk 0\.0"):
        ckpt.load(target, tmp_path)


def test_fallback_refuses_keys_a_rejected_step_overwrote(tmp_path):
    ckpt.save({"a": torch.ones(4)}, tmp_path, step=1)
    ckpt.save({"a": torch.ones(4), "b": torch.ones(4)}, tmp_path, step=2)
    flip_byte(chunk_file(tmp_path, 2, "a"), 1)
    target = {"a": torch.zeros(4), "b": torch.zeros(4)}
    # 'b' is read from step 2 before its bad 'a' chunk is found; step 1 has no 'b'
    with pytest.raises(ValueError, match=r"lacks keys \['b'\] that a rejected newer step"):
        ckpt.load(target, tmp_path, fallback=True, strict=False)


# ---------------------------------------------------------- commit protocol

def test_torn_save_is_invisible_and_latest_is_robust(tmp_path, monkeypatch):
    url = str(tmp_path)
    ckpt.save({"a": torch.ones(3)}, url, step=1)
    store_cls = CheckpointStore
    real_put = store_cls.put

    def die_before_marker(self, rel, data):
        if rel.endswith(MARKER):
            raise OSError("disk vanished")
        real_put(self, rel, data)

    monkeypatch.setattr(store_cls, "put", die_before_marker)
    with pytest.raises(OSError, match="disk vanished"):
        ckpt.save({"a": torch.full((3,), 2.0)}, url, step=2)
    monkeypatch.setattr(store_cls, "put", real_put)
    store = store_cls(url)
    assert store.committed_steps() == [1] and store.latest() == 1  # (the torn step may be gone)
    target = {"a": torch.zeros(3)}
    assert ckpt.load(target, url).step == 1 and torch.equal(target["a"], torch.ones(3))
    with pytest.raises(FileNotFoundError, match="step 2 .* is not committed|no step 2"):
        ckpt.load(target, url, step=2)
    # a torn `latest` is only a hint
    store.put("latest", b'{"st')
    assert store.latest() == 1
    # saving the torn step again replaces it
    ckpt.save({"a": torch.full((3,), 3.0)}, url, step=2)
    assert ckpt.load(target, url).step == 2 and torch.equal(target["a"], torch.full((3,), 3.0))


def test_memory_store_commit_and_overwrite():
    url = f"memory://ck-{os.getpid()}-overwrite"
    ckpt.save({"a": torch.ones(2)}, url, step=1)
    ckpt.save({"a": torch.full((2,), 5.0)}, url, step=1)  # replacing a committed step
    ckpt.save({"a": torch.full((2,), 9.0)}, url, step=0)  # the newest commit in time: `latest`
    target = {"a": torch.zeros(2)}
    assert ckpt.load(target, url).step == 0 and target["a"].tolist() == [9.0, 9.0]
    assert ckpt.load(target, url, step=1).step == 1 and target["a"].tolist() == [5.0, 5.0]
    assert CheckpointStore(url).committed_steps() == [0, 1]


def _record_fsyncs_and_puts(monkeypatch) -> list:
    """(event, real path) in order: every fsync loom makes, every small file it puts."""
    events, real_fsync, real_put = [], os.fsync, CheckpointStore.put

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def put(self, rel, data):
        events.append(("put", os.path.realpath(self.path(rel))))
        real_put(self, rel, data)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(CheckpointStore, "put", put)
    return events


def _assert_durable_order(events, root, step):
    """Every file and directory of the step (and the root) was fsynced before
    the marker was written; the marker, then ``latest``, after theirs."""
    root = os.path.realpath(root)
    step_dir = os.path.join(root, step_name(step))
    marker, latest = os.path.join(step_dir, MARKER), os.path.join(root, "latest")
    at = {}
    for i, (kind, path) in enumerate(events):
        at.setdefault((kind, path), i)
    before = at[("put", marker)]
    for folder, dirs, files in os.walk(step_dir):
        assert at.get(("fsync", folder), before) < before, folder
        for name in files:
            path = os.path.join(folder, name)
            if path != marker:
                assert at.get(("fsync", path), before) < before, path
    assert at.get(("fsync", root), before) < before
    assert before < at[("fsync", marker)] < at[("put", latest)] < at[("fsync", latest)]


def test_durable_save_fsyncs_every_file_and_directory_before_the_marker(tmp_path, monkeypatch):
    events = _record_fsyncs_and_puts(monkeypatch)
    state = {"model": {"w": torch.randn(64, 5), "b": torch.randn(3)}, "n": 3}
    ckpt.save(state, tmp_path / "fast", step=1)
    assert not [e for e in events if e[0] == "fsync"]  # the default: the page cache
    ckpt.save(state, tmp_path / "durable", step=1, durable=True)
    _assert_durable_order(events, tmp_path / "durable", 1)
    with ckpt.AsyncCheckpointer(str(tmp_path / "async"), durable=True) as saver:
        saver.save(state, step=4).result()
    _assert_durable_order(events, tmp_path / "async", 4)
    target = {"model": {"w": torch.zeros(64, 5), "b": torch.zeros(3)}, "n": 0}
    ckpt.load(target, tmp_path / "async")
    assert torch.equal(target["model"]["w"], state["model"]["w"]) and target["n"] == 3


def test_retention_and_gc(tmp_path):
    url = str(tmp_path)
    for s in range(1, 8):
        ckpt.save({"a": torch.full((2,), float(s))}, url, step=s)
    store = CheckpointStore(url)
    os.remove(tmp_path / step_name(5) / MARKER)        # step 5: torn
    os.makedirs(tmp_path / step_name(9) / "state")     # newer than the newest commit: maybe in progress
    assert ckpt.retained([1, 2, 3, 4, 6, 7], keep_last=2, keep_every=3) == {3, 6, 7}
    dry = ckpt.gc(url, keep_last=2, keep_every=3, dry_run=True)
    assert dry == {"uncommitted": [5], "committed": [1, 2, 4], "kept": [3, 6, 7], "damaged": {}}
    assert store.steps() == [1, 2, 3, 4, 5, 6, 7, 9]
    ckpt.gc(url, keep_last=2, keep_every=3)
    assert store.steps() == [3, 6, 7, 9] and store.committed_steps() == [3, 6, 7]
    assert ckpt.gc(url, include_newer=True)["uncommitted"] == [9]
    assert store.steps() == [3, 6, 7]
    with pytest.raises(ValueError, match="keep_last=-1"):
        ckpt.gc(url, keep_last=-1)


# ----------------------------------------------------------- chunk planner

def test_chunk_grid_follows_fragments():
    # uneven row shards: chunks of gcd(3, 6, 8) = 1 row, so each lies in one shard
    boxes = [((0, 0), (3, 4)), ((3, 0), (6, 4)), ((6, 0), (8, 4)), ((8, 0), (10, 4))]
    assert layout.choose_chunks((10, 4), boxes, 4) == (1, 4)
    # even shards split further by divisors down to the size target
    boxes = [((0, 0), (512, 1024)), ((512, 0), (1024, 1024))]
    assert layout.choose_chunks((1024, 1024), boxes, 4, target_bytes=1 << 20) == (256, 1024)
    # boundaries with no useful divisor (ZeRO range split at element 1): a plain grid
    flat = [((0,), (1,)), ((1,), (5000,)), ((5000,), (7001,)), ((7001,), (10000,))]
    assert layout.choose_chunks((10000,), flat, 4) == (10000,)
    assert layout.choose_chunks((), [((), ())], 8) == ()
    assert layout.choose_chunks((0, 5), [((0, 0), (0, 5))], 4) == (1, 5)


def test_every_chunk_has_one_owner_and_replicas_share_the_work():
    shape, world = (64, 8), 4
    rep = layout.ArrayPlan("rep", shape, (4, 8), [(r, layout.full_box(shape)) for r in range(world)])
    flat = [((0,), (1,)), ((1,), (5000,)), ((5000,), (5000,)), ((5000,), (10000,))]
    fl = layout.ArrayPlan("fl", (10000,), layout.choose_chunks((10000,), flat, 4, 16000),
                          list(enumerate(flat)))
    transfers = layout.assign([rep, fl], world, {"rep": 4, "fl": 4})
    assert sorted(rep.owners.values()).count(0) == 4 and len(set(rep.owners.values())) == 4
    assert len(fl.owners) == math.ceil(10000 / fl.chunks[0])
    # the straddling chunks are assembled by their owner from the other holders
    for t in transfers:
        assert t.key == "fl" and t.dst == fl.owners[t.chunk] and t.src != t.dst
    assert {(t.src, t.box) for t in transfers if t.chunk == (0,)} == {(0, ((0,), (1,)))}
    with pytest.raises(ValueError, match="overlap"):
        layout.check_fragments("k", (10,), [(0, ((0,), (6,))), (1, ((5,), (10,)))])


# --------------------------------------------------------------------- CLI

def test_loom_ckpt_cli(tmp_path, capsys):
    from loom.launch.cli import main
    url = str(tmp_path)
    ckpt.save({"model": {"w": torch.zeros(4, 3, dtype=torch.bfloat16)}, "epoch": 2,
               "rng": ckpt.PerRank(5)}, url, step=1, mesh={"dp": 1})
    ckpt.save({"model": {"w": torch.ones(4, 3, dtype=torch.bfloat16)}, "epoch": 3,
               "rng": ckpt.PerRank(6)}, url, step=2)
    os.remove(tmp_path / step_name(2) / MARKER)
    ckpt.save({"model": {"w": torch.ones(4, 3, dtype=torch.bfloat16)}, "epoch": 4,
               "rng": ckpt.PerRank(7)}, url, step=3)
    assert main(["ckpt", "ls", url]) == 0
    out = capsys.readouterr().out
    assert "torn or in progress" in out and "<- latest" in out.splitlines()[-1]
    assert main(["ckpt", "inspect", url, "--step", "1"]) == 0
    out = capsys.readouterr().out
    assert "mesh: dp=1" in out and "model/w  4x3    bfloat16  replicated" in out
    assert "per rank: [5]" in out and "epoch" in out
    assert main(["ckpt", "verify", url, "--all"]) == 0
    assert capsys.readouterr().out.splitlines() == ["step 1: ok", "step 3: ok"]
    flip_byte(chunk_file(tmp_path, 3, "model/w", "0.0"), 3)
    assert main(["ckpt", "verify", url]) == 1
    assert "array 'model/w' chunk 0.0" in capsys.readouterr().out
    assert main(["ckpt", "gc", url, "--keep-last", "1", "--dry-run"]) == 0
    assert "would remove uncommitted steps [2]; would remove committed steps [1]" in capsys.readouterr().out
    assert main(["ckpt", "gc", url]) == 0
    assert CheckpointStore(url).steps() == [1, 3]
    assert main(["ckpt", "inspect", str(tmp_path / "none")]) == 1
    assert "no committed checkpoint" in capsys.readouterr().err


def test_checksum_in_pieces_equals_one_crc32c():
    """Large chunks are checksummed piece by piece (the GIL is let go in
    between); the value is the crc32c of all the bytes."""
    import google_crc32c
    import numpy as np
    from loom.checkpoint.manifest import _CRC_PIECE, checksum
    rng = np.random.default_rng(0)
    for n in (1, _CRC_PIECE - 1, _CRC_PIECE, 2 * _CRC_PIECE + 5):
        a = rng.integers(0, 256, n, dtype=np.uint8)
        assert checksum(a) == google_crc32c.value(a.tobytes())
    assert checksum(np.empty((0, 3))) == 0
    assert checksum(np.arange(12.0).reshape(3, 4).T) == google_crc32c.value(np.arange(12.0).reshape(3, 4).T.tobytes())
