"""Reloads from host memory (`loom.checkpoint.memory`): served from memory when
the copy is the committed one, from storage otherwise."""
import numpy as np
import pytest
import torch

from loom import checkpoint
from loom.checkpoint.memory import HostSnapshots, tier_of


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 32, generator=g, dtype=torch.float64),
            "b": torch.randn(32, generator=g, dtype=torch.float64), "step": seed}


def _empty():
    return {"w": torch.zeros(64, 32, dtype=torch.float64), "b": torch.zeros(32, dtype=torch.float64), "step": -1}


def _same(a, b):
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["b"], b["b"]) and a["step"] == b["step"]


def test_a_committed_step_is_served_from_memory(tmp_path):
    mem = HostSnapshots()
    saved = _state(1)
    checkpoint.save(saved, str(tmp_path), step=10, snapshots=mem)
    assert mem.step == 10 and mem.nbytes == (64 * 32 + 32) * 8
    target = _empty()
    info = checkpoint.load(target, str(tmp_path), memory=mem)
    _same(target, saved)
    assert info.tiers == {"memory_local": mem.nbytes, "memory_peer": 0, "local": 0, "storage": 0}
    assert info.tiers_by_rank == [info.tiers] and tier_of(info.tiers) == "memory"


def test_a_miss_is_read_from_storage(tmp_path):
    mem = HostSnapshots()
    saved = _state(2)
    checkpoint.save(saved, str(tmp_path), step=5, snapshots=mem)
    key = next(k for k in mem._chunks if "/b/" in k)
    del mem._chunks[key]
    target = _empty()
    info = checkpoint.load(target, str(tmp_path), memory=mem)
    _same(target, saved)
    assert info.tiers == {"memory_local": 64 * 32 * 8, "memory_peer": 0, "local": 0, "storage": 32 * 8}
    assert tier_of(info.tiers) == "mixed"


def test_damaged_or_foreign_bytes_in_memory_are_not_used(tmp_path, caplog):
    mem = HostSnapshots(tier="memory_peer")
    saved = _state(3)
    checkpoint.save(saved, str(tmp_path), step=5, snapshots=mem)
    key = next(k for k in mem._chunks if "/w/" in k)
    crc, buf = mem._chunks[key]
    buf[0] ^= 0xFF  # same recorded crc, other bytes: the crc of the bytes is checked
    target = _empty()
    info = checkpoint.load(target, str(tmp_path), memory=mem)
    _same(target, saved)
    assert info.tiers["storage"] == 64 * 32 * 8 and info.tiers["memory_peer"] == 32 * 8
    assert "does not match its manifest" in caplog.text
    # a copy whose recorded crc is not the manifest's (another save of the key) is never even returned
    mem._chunks[key] = (crc ^ 1, buf)
    assert key not in mem.fetch({key: crc})
    # a copy of the wrong size
    mem._chunks[key] = (crc, np.zeros(8, dtype=np.uint8))
    info = checkpoint.load(_empty(), str(tmp_path), memory=mem)
    assert info.tiers["storage"] == 64 * 32 * 8


def test_memory_of_a_step_that_never_committed_is_never_used(tmp_path, monkeypatch):
    mem = HostSnapshots()
    saved = _state(4)
    checkpoint.save(saved, str(tmp_path), step=10, snapshots=mem)
    # memory now holds a newer step (a save that died before its commit marker): the store says 10
    newer = HostSnapshots()
    checkpoint.save(_state(5), str(tmp_path / "elsewhere"), step=15, snapshots=newer)
    stale = {k.replace("step-00000015", "step-00000010"): v for k, v in newer._chunks.items()}
    mem._chunks = dict(stale)  # the same keys as step 10's chunks, other bytes and crcs
    target = _empty()
    info = checkpoint.load(target, str(tmp_path), memory=mem)
    _same(target, saved)
    assert info.step == 10 and info.tiers["memory_local"] == 0 and info.tiers["storage"] == mem.nbytes
    # the failed save of an asynchronous checkpointer hands nothing to memory
    mem = HostSnapshots()
    saver = checkpoint.AsyncCheckpointer(str(tmp_path / "async"), snapshots=mem)
    saver.save(_state(6), step=3).result(60)
    assert mem.step == 3

    def no_commit(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("loom.checkpoint.async_engine.commit", no_commit)
    with pytest.raises(checkpoint.CheckpointSaveError, match="disk full"):
        saver.save(_state(9), step=4).result(60)
    monkeypatch.undo()
    saver.close()
    assert mem.step == 3
    target = _empty()
    info = checkpoint.load(target, str(tmp_path / "async"), memory=mem)
    _same(target, _state(6))
    assert info.tiers["storage"] == 0


def test_a_resharding_load_takes_what_memory_holds(tmp_path):
    mem = HostSnapshots()
    saved = _state(7)
    checkpoint.save(saved, str(tmp_path), step=1, snapshots=mem)
    part = {"w": checkpoint.Shard(torch.zeros(16, 32, dtype=torch.float64), (64, 32), (16, 0))}
    info = checkpoint.load(part, str(tmp_path), memory=mem, strict=False)
    assert torch.equal(part["w"].tensor, saved["w"][16:32])
    assert info.tiers["storage"] == 0 and info.tiers["memory_local"] > 0


def test_a_source_that_fails_serves_nothing(tmp_path, caplog):
    class Broken:
        def fetch(self, wanted):
            raise ConnectionError("holder gone")
    saved = _state(8)
    checkpoint.save(saved, str(tmp_path), step=1)
    target = _empty()
    info = checkpoint.load(target, str(tmp_path), memory=Broken())
    _same(target, saved)
    assert tier_of(info.tiers) == "storage" and "holder gone" in caplog.text


# ------------------------------------------------------------------ the Ray holders

@pytest.mark.timeout(120)
def test_ray_holders_keep_the_newest_committed_step_and_serve_it(tmp_path, caplog):
    ray = pytest.importorskip("ray")
    from loom.launch.memory_tier import RaySnapshots, holders_env, release_holders
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    handles = {}
    try:
        node = ray.get_runtime_context().get_node_id()
        env = holders_env("t0", [node], handles)
        names = __import__("json").loads(env["LOOM_SNAPSHOT_HOLDERS"])
        assert list(names) == [node]
        again = holders_env("t0", [node], handles)  # a later attempt finds the same holder
        assert again == env and len(handles) == 1
        mine = RaySnapshots.from_env(0, env)
        assert mine.peer is None and "peer copy: none" in mine.describe()
        saved = _state(11)
        checkpoint.save(saved, str(tmp_path), step=5, snapshots=mine)
        mine.wait()  # the handoff runs on a thread of its own: the save does not wait for it
        other = RaySnapshots(names, node, rank=1)  # another rank's older step is dropped by a newer commit
        other.keep(3, {"x": np.zeros(4)}, {"x": 0})
        other.wait()
        holder = handles[node]
        assert set(ray.get(holder.stats.remote())) == {1}
        checkpoint.save(saved, str(tmp_path), step=10, snapshots=mine)
        mine.wait()
        assert ray.get(holder.stats.remote()) == {0: {"step": 10, "bytes": (64 * 32 + 32) * 8}}
        target = _empty()
        info = checkpoint.load(target, str(tmp_path), memory=mine)
        _same(target, saved)
        assert info.tiers == {"memory_local": (64 * 32 + 32) * 8, "memory_peer": 0, "local": 0, "storage": 0}
        # a reader on another node finds the copy on this one as a peer's
        elsewhere = RaySnapshots(names, "f" * 56, rank=0)
        info = checkpoint.load(_empty(), str(tmp_path), memory=elsewhere)
        assert info.tiers["memory_peer"] == (64 * 32 + 32) * 8
        ray.get(holder.clear.remote())  # emptied: storage serves
        info = checkpoint.load(_empty(), str(tmp_path), memory=mine)
        assert info.tiers["storage"] == (64 * 32 + 32) * 8 and info.tiers["memory_local"] == 0
        checkpoint.save(saved, str(tmp_path), step=15, snapshots=mine)
        mine.wait()
        release_holders("t0", handles)  # gone: storage serves, nothing raises
        target = _empty()
        info = checkpoint.load(target, str(tmp_path), memory=mine)
        _same(target, saved)
        assert tier_of(info.tiers) == "storage"
    finally:
        ray.shutdown()


# ------------------------------------------------------------------ loom train under Ray

TINY = ["--dp", "2", "--data", "synthetic", "--dim", "16", "--layers", "1", "--seq-len", "16", "--batch-size", "4",
        "--dtype", "float64", "--steps", "16", "--eval-every", "0", "--no-progress", "--ckpt-every", "5",
        "--ckpt-mode", "sync"]


def _loom(tmp_path, name, *args, timeout=200):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "loom", "train", *TINY, "--runs-dir", str(tmp_path), "--name", name,
                           "--ckpt-url", str(tmp_path / f"{name}-ck"), *args], capture_output=True, text=True,
                          timeout=timeout)


def _jsonl(path):
    import json
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.e2e
@pytest.mark.timeout(500)
def test_a_killed_rank_reloads_from_host_memory_and_without_it_from_storage(tmp_path):
    ref = _loom(tmp_path, "ref", "--no-memory-snapshots")
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    reference = {x["step"]: x["loss"] for x in _jsonl(tmp_path / "ref" / "metrics.jsonl")}
    for name, flag, tier in (("mem", "--memory-snapshots", "memory"), ("disk", "--no-memory-snapshots", "storage")):
        proc = _loom(tmp_path, name, flag, "--inject", "kill:rank=1,step=12")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (record,) = _jsonl(tmp_path / name / "restarts.jsonl")
        assert record["resumed_step"] == 10, record
        reload = record["reload"]
        assert reload["tier"] == tier and reload["ranks"] == [tier, tier], reload
        b = reload["bytes"]
        if tier == "memory":  # one node: both ranks' copies are in its holder (no peer node to copy to)
            assert b["memory_local"] > 0 and b["memory_peer"] == 0 and b["storage"] == 0, b
            assert "resumed step 10 from host memory (" in proc.stdout and "0 peer, 0 storage)" in proc.stdout
        else:
            assert b["storage"] > 0 and b["memory_local"] == b["memory_peer"] == 0, b
            assert "resumed step 10 from storage (0 local, 0 peer, " in proc.stdout
        import json
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["reload"]["tier"] == tier and summary["restarts"][0]["reload"] == reload
        rows = _jsonl(tmp_path / name / "metrics.jsonl")
        assert [x["step"] for x in rows if x["attempt"] == 1] == list(range(10, 16))
        for x in rows:
            assert x["loss"] == pytest.approx(reference[x["step"]], abs=1e-10, rel=0), (name, x)
