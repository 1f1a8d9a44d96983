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
    assert info.tiers == {"memory_local": mem.nbytes, "memory_peer": 0, "storage": 0}
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
    assert info.tiers == {"memory_local": 64 * 32 * 8, "memory_peer": 0, "storage": 32 * 8}
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
