"""Multi-level checkpoints: a node-local level in front of the remote store
(`loom.checkpoint.levels`, `remote_copy`, `MultiLevel`, ``--ckpt-local``).

Both levels committed; resume from the local level, from S3 with the local
level gone, from the local level with the remote copy missing; a remote copy
failing (moto server stopped) while saving goes on; retention per level;
`loom ckpt ls --local`; two simulated nodes (``LOOM_NODE_ID``); hostile
local levels; the checks made before any worker starts."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from loom import checkpoint as ckpt
from loom import comms
from loom.checkpoint.levels import NODE_ENV, LocalLevel
from loom.checkpoint.store import CheckpointStore, step_name
from loom.comms.testing import run_distributed
from loom.launch.config import ConfigError, build_config, validate

TINY = {"data": "synthetic", "vocab": 32, "dim": 16, "layers": 2, "heads": 2, "seq_len": 8, "batch_size": 4,
        "dtype": "float64", "lr": 1e-2, "warmup_steps": 2, "progress": False, "monitor": False}


def _state(scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"model": {"w": torch.randn(40, 6, generator=g, dtype=torch.float64) * scale,
                      "b": torch.randn(6, generator=g, dtype=torch.float64) * scale},
            "meta": {"scale": scale}}


def _zeros() -> dict:
    return {"model": {"w": torch.zeros(40, 6, dtype=torch.float64), "b": torch.zeros(6, dtype=torch.float64)},
            "meta": {"scale": 0.0}}


def _same(out: dict, ref: dict) -> bool:
    return all(torch.equal(out["model"][k], ref["model"][k]) for k in ref["model"]) and out["meta"] == ref["meta"]


def _save_steps(url, local, steps, **kw) -> ckpt.MultiLevel:
    levels = ckpt.MultiLevel(url, local, **kw)
    for s in steps:
        levels.save(_state(s), step=s)
    levels.close(timeout=60)
    return levels


# ------------------------------------------------------------- library

def test_both_levels_commit_and_the_nearest_serves(tmp_path):
    url, local = str(tmp_path / "remote"), str(tmp_path / "local")
    levels = _save_steps(url, local, [2, 4])
    assert CheckpointStore(url).committed_steps() == [2, 4]
    assert LocalLevel(local).committed().keys() == {2, 4}
    assert LocalLevel(local).holders(4) == {LocalLevel(local).node: [0]}
    assert levels.levels() == {2: ["local", "remote"], 4: ["local", "remote"]}
    out = _zeros()
    info = levels.load(out)
    assert info.step == 4 and _same(out, _state(4))
    assert info.tiers["local"] == 41 * 6 * 8 and info.tiers["storage"] == 0
    shutil.rmtree(local)  # the local level is gone (a new node): served by the remote store
    out = _zeros()
    info = ckpt.load_levels(out, url, LocalLevel(local))
    assert info.step == 4 and _same(out, _state(4)) and info.tiers["local"] == 0 and info.tiers["storage"] > 0


def test_a_step_missing_remotely_is_served_by_the_local_level(tmp_path):
    url, local = str(tmp_path / "remote"), str(tmp_path / "local")
    _save_steps(url, local, [2, 4])
    CheckpointStore(url).delete_step(4)  # as if its copy had not finished (or failed)
    out = _zeros()
    info = ckpt.load_levels(out, url, LocalLevel(local))
    assert info.step == 4 and _same(out, _state(4))
    assert info.tiers["local"] > 0 and info.tiers["storage"] == 0
    assert info.location == f"{LocalLevel(local).path}/{step_name(4)}"


def test_retention_per_level_keeps_what_is_not_yet_remote(tmp_path):
    url, local = str(tmp_path / "remote"), str(tmp_path / "local")
    _save_steps(url, local, [1, 2, 3, 4], keep_last_local=1, keep_last=2)
    assert CheckpointStore(url).committed_steps() == [3, 4]
    assert sorted(LocalLevel(local).committed()) == [4]
    # steps whose remote copy never happened are kept locally
    level = LocalLevel(local, keep_last=1)
    removed = level.retain(lambda step: False, ())
    assert removed == [] and sorted(level.committed()) == [4]
    _save_steps(str(tmp_path / "elsewhere"), local, [5, 6], keep_last_local=5)
    assert level.retain(lambda step: False, ()) == [] and sorted(level.committed()) == [4, 5, 6]
    # unless space forces it: the oldest go first, never the newest, never one being copied
    assert level.retain(lambda step: False, {5}, need_bytes=1 << 62) == [4]
    assert sorted(level.committed()) == [5, 6]


def test_saves_wait_for_the_remote_copy_only_under_backpressure(tmp_path, monkeypatch):
    import time

    from loom.checkpoint.remote_copy import RemoteCopier
    put = RemoteCopier._put

    def slow_put(self, rel):
        time.sleep(0.05)
        put(self, rel)
    monkeypatch.setattr(RemoteCopier, "_put", slow_put)
    events = []
    levels = ckpt.MultiLevel(str(tmp_path / "remote"), str(tmp_path / "local"), max_pending=1,
                             on_event=events.append)
    levels.save(_state(1), step=1)
    assert levels.waited_s == 0 and levels.copier.busy() == {1}  # the loop did not wait for the copy
    levels.save(_state(2), step=2)
    assert levels.waited_s > 0
    assert events == ["checkpoint step 2: waiting for the remote copy of step 1 (1 step(s) pending, at most 1)"]
    levels.close()
    assert CheckpointStore(str(tmp_path / "remote")).committed_steps() == [1, 2]


def test_ckpt_ls_shows_each_steps_levels(tmp_path):
    url, local = str(tmp_path / "remote"), str(tmp_path / "local")
    _save_steps(url, local, [2, 4], keep_last_local=1)
    CheckpointStore(url).delete_step(2)
    _save_steps(url, local, [6], keep_last_local=5)
    CheckpointStore(url).delete_step(6)  # only local
    proc = subprocess.run([sys.executable, "-m", "loom", "ckpt", "ls", url, "--local", local],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: " ".join(line.split()[1:]) for line in proc.stdout.split("levels (local")[1]
            .splitlines()[3:] if line.strip()}
    assert rows == {"4": "local + remote", "6": "local"}


def test_hostile_local_level_is_refused_and_the_remote_serves(tmp_path, caplog):
    url, local = str(tmp_path / "remote"), str(tmp_path / "local")
    _save_steps(url, local, [2, 4])
    store = CheckpointStore(local)
    chunk = store.path(f"{step_name(4)}/state/model/w/c/0/0")
    with open(chunk, "r+b") as f:  # a size that does not match the manifest
        f.truncate(17)
    outside = tmp_path / "secret"
    outside.write_bytes(b"\0" * (6 * 8))
    bias = store.path(f"{step_name(4)}/state/model/b/c/0")
    os.remove(bias)
    os.symlink(outside, bias)  # a chunk that is a link out of the level
    out = _zeros()
    info = ckpt.load_levels(out, url, LocalLevel(local))
    assert info.step == 4 and _same(out, _state(4))
    assert info.tiers["local"] == 0 and info.tiers["storage"] == 41 * 6 * 8
    assert LocalLevel(local).fetch({"step-00000004/../../secret": 0, "/etc/passwd": 0}) == {}
    # a local-only step whose manifest names a path outside the level: refused, the remote step serves
    _save_steps(url, local, [6])
    CheckpointStore(url).delete_step(6)
    raw = json.loads(store.get(f"{step_name(6)}/manifest.json"))
    raw["tensors"]["model/w"]["array"] = "../../../secret"
    body = json.dumps(raw).encode()
    store.remove(f"{step_name(6)}/COMMITTED")
    store.commit(6, body)  # sealed again: only the manifest's own checks stand in the way
    out = _zeros()
    info = ckpt.load_levels(out, url, LocalLevel(local))
    assert info.step == 4 and _same(out, _state(4))
    assert "damaged" in caplog.text


def _two_nodes(url: str, root: str) -> list:
    rank = dist.get_rank()
    os.environ[NODE_ENV] = f"node{rank}"
    local = os.path.join(root, f"node{rank}")
    ref = _state(3)
    rows = [0, 24, 40]
    state = {"model": {"w": ckpt.Shard(ref["model"]["w"][rows[rank]:rows[rank + 1]].clone(), (40, 6),
                                       (rows[rank], 0)), "b": ref["model"]["b"].clone()},
             "meta": {"scale": 3.0}}
    copy_group = comms.new_group(name="ckpt-remote-test", background=True)
    levels = ckpt.MultiLevel(url, local, copy_group=copy_group)
    levels.save(state, step=3)
    levels.close(timeout=60)
    out = {"model": {"w": torch.zeros(40, 6, dtype=torch.float64), "b": torch.zeros(6, dtype=torch.float64)},
           "meta": {"scale": 0.0}}
    info = levels.load(out)  # every rank wants the whole of w: half of it is on the other node
    ckpt.release_store(url)
    return [info.step, info.tiers, _same(out, ref), LocalLevel(local).holders(3)]


@pytest.mark.timeout(120)
def test_two_nodes_each_keep_their_chunks_and_read_the_others_remotely(s3, tmp_path):
    server, url = s3
    root = str(tmp_path)
    results = run_distributed(_two_nodes, 2, url, root, timeout=100, env=server.env)
    for rank, (step, tiers, same, holders) in enumerate(results):
        assert step == 3 and same
        assert holders == {"node0": [0], "node1": [1]}
        assert tiers["local"] > 0 and tiers["storage"] > 0  # partly local, partly remote
    assert CheckpointStore(url).committed_steps() == [3]
    # one process (another world size) on node0: rank 0's rows locally, rank 1's from S3
    out = _zeros()
    info = ckpt.load_levels(out, url, LocalLevel(os.path.join(root, "node0"), node="node0"))
    assert info.world_size == 2 and _same(out, _state(3))
    assert info.tiers["local"] + info.tiers["storage"] == (40 + 1) * 6 * 8
    assert info.tiers["local"] >= 24 * 6 * 8 and info.tiers["storage"] >= 16 * 6 * 8


@pytest.mark.timeout(120)
def test_a_remote_copy_failing_keeps_the_local_commit(s3_server, tmp_path):
    from s3_server import MotoS3
    with MotoS3() as server:  # a server of this test's own: it is stopped
        env = {**server.env, "AWS_EC2_METADATA_DISABLED": "true"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            from s3fs import S3FileSystem
            S3FileSystem.clear_instance_cache()
            url, local = f"s3://{server.bucket()}/ckpt", str(tmp_path / "local")
            events = []
            levels = ckpt.MultiLevel(url, local, keep_last_local=1, on_event=events.append)
            levels.save(_state(2), step=2)
            levels.copier.wait(60)
            server.stop()
            saved = levels.save(_state(4), step=4)  # the local commit does not wait for the server
            assert saved.seconds < 5
            levels.copier.wait(120)
            done = {r["step"]: r["error"] for r in levels.copier.results()}
            assert done[2] is None and "EndpointConnectionError" in done[4]
            levels.close(timeout=10)
            assert sorted(LocalLevel(local).committed()) == [4]  # step 2 was durable remotely: retired
            out = _zeros()
            info = ckpt.load_levels(out, url, LocalLevel(local))  # the remote cannot even be listed
            assert info.step == 4 and _same(out, _state(4)) and info.tiers["local"] > 0
            ckpt.release_store(url)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# ------------------------------------------------------------- background local commit

def _slow_writes(monkeypatch, seconds: float, fail_step: int | None = None, fail_rank: int | None = None):
    """The background writer sleeps ``seconds`` before each step's chunks;
    ``fail_step`` (on ``fail_rank``, or every rank) fails instead."""
    import time

    from loom.checkpoint.writers import ThreadWriter
    write = ThreadWriter.write

    def slow(self, plan, fragments, parts, pool=None):
        time.sleep(seconds)
        if plan.step == fail_step and fail_rank in (None, plan.group.rank):
            raise OSError(f"disk full writing step {plan.step}")
        return write(self, plan, fragments, parts, pool)
    monkeypatch.setattr(ThreadWriter, "write", slow)


def test_background_local_commit_waits_only_for_the_snapshot(tmp_path, monkeypatch):
    import time
    _slow_writes(monkeypatch, 1.0)
    url, local = str(tmp_path / "remote"), str(tmp_path / "local")
    events = []
    levels = ckpt.MultiLevel(url, local, background=True, on_event=events.append)
    state = _state(1)
    t0 = time.perf_counter()
    handle = levels.save(state, step=1)
    levels.wait_snapshot()  # the loop's stall: the host copy
    stall = time.perf_counter() - t0
    assert isinstance(handle, ckpt.SaveHandle) and handle.snapshot_done() and not handle.done()
    assert stall < 0.8 and LocalLevel(local).committed() == {}
    state["model"]["w"].add_(100.0)  # training goes on: the snapshot is what gets committed
    levels.save(_state(2), step=2)  # waits for step 1's local commit first (backpressure)
    assert levels.waited_s > 0.3 and handle.done() and handle.result() == f"{LocalLevel(local).path}/{step_name(1)}"
    assert "checkpoint step 2: waiting for the local commit of step 1" in events
    levels.close(timeout=60)
    assert sorted(LocalLevel(local).committed()) == [1, 2] and CheckpointStore(url).committed_steps() == [1, 2]
    out = _zeros()
    assert ckpt.load_levels(out, url, LocalLevel(local)).step == 2 and _same(out, _state(2))
    CheckpointStore(url).delete_step(2)
    shutil.rmtree(os.path.join(local, step_name(2)))
    out = _zeros()
    assert ckpt.load_levels(out, url, LocalLevel(local)).step == 1 and _same(out, _state(1))
    with pytest.raises(ValueError, match="background=True"):
        ckpt.MultiLevel(url, local, snapshots=object())


def test_a_failed_background_local_commit_raises_at_the_next_save_and_commits_nothing(tmp_path, monkeypatch):
    _slow_writes(monkeypatch, 0.0, fail_step=2)
    url, local = str(tmp_path / "remote"), str(tmp_path / "local")
    levels = ckpt.MultiLevel(url, local, background=True, keep_last_local=5)
    levels.save(_state(1), step=1)
    levels.save(_state(2), step=2)  # fails in the background
    with pytest.raises(ckpt.CheckpointSaveError, match="disk full writing step 2") as err:
        levels.save(_state(3), step=3)  # started, then the earlier failure is raised
    assert err.value.step == 2
    levels.save(_state(2), step=2)  # fails again: raised by close
    with pytest.raises(ckpt.CheckpointSaveError, match="step 2"):
        levels.close(timeout=60)
    assert sorted(LocalLevel(local).committed()) == [1, 3] and CheckpointStore(url).committed_steps() == [1, 3]
    assert not os.path.exists(os.path.join(local, step_name(2), "COMMITTED"))


def _background_failure(url: str, root: str) -> list:
    import pytest as _pytest
    rank = dist.get_rank()
    os.environ[NODE_ENV] = f"node{rank}"
    with _pytest.MonkeyPatch.context() as mp:
        _slow_writes(mp, 0.0, fail_step=2, fail_rank=1)
        copy_group = comms.new_group(name="ckpt-remote-test", background=True)
        levels = ckpt.MultiLevel(url, os.path.join(root, f"node{rank}"), copy_group=copy_group, background=True)
        levels.save(_state(1), step=1)
        levels.save(_state(2), step=2)  # fails on rank 1 only
        try:
            levels.wait_local()
            raised = None
        except ckpt.CheckpointSaveError as exc:
            raised = exc.step
        levels.close(timeout=60)
    out = _zeros()
    info = levels.load(out)
    ckpt.release_store(url)
    return [raised, info.step, _same(out, _state(1)), sorted(LocalLevel(os.path.join(root, f"node{rank}")).committed())]


@pytest.mark.timeout(120)
def test_a_background_local_commit_failing_on_one_rank_fails_on_every_rank(tmp_path):
    results = run_distributed(_background_failure, 2, str(tmp_path / "remote"), str(tmp_path), timeout=100)
    assert results == [[2, 1, True, [1]]] * 2


_KILLED = """
import os, sys, time, torch
from loom import checkpoint as ckpt
from loom.checkpoint.writers import ThreadWriter
url, local = sys.argv[1], sys.argv[2]
levels = ckpt.MultiLevel(url, local, background=True)
state = {"model": {"w": torch.full((40, 6), 1.0, dtype=torch.float64),
                   "b": torch.full((6,), 1.0, dtype=torch.float64)}, "meta": {"scale": 1.0}}
levels.save(state, step=1)
levels.wait_local()
write = ThreadWriter.write
def dying(self, plan, fragments, parts, pool=None):
    write(self, plan, fragments, parts, pool)  # every chunk of step 2 is on disk, the marker is not
    os._exit(9)                                  # killed before the local commit
ThreadWriter.write = dying
levels.save(state, step=2)
print("save returned", flush=True)
time.sleep(30)
"""


def test_killed_during_the_background_local_write_resumes_from_the_previous_step(tmp_path):
    url, local = str(tmp_path / "remote"), str(tmp_path / "local")
    proc = subprocess.run([sys.executable, "-c", _KILLED, url, local], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    assert "save returned" in proc.stdout  # the loop went on while the local level was written
    assert os.path.isdir(os.path.join(local, step_name(2)))  # written, never committed
    assert sorted(LocalLevel(local).committed()) == [1]
    out = _zeros()
    info = ckpt.load_levels(out, url, LocalLevel(local))
    assert info.step == 1 and float(out["model"]["w"][0, 0]) == 1.0
    assert info.tiers["local"] > 0


# ------------------------------------------------------------- loom train

def _train_runs(runs: list[dict]) -> list:
    from loom.launch.train import train
    out = []
    for overrides in runs:
        wipe = overrides.pop("wipe", None)
        if wipe and dist.get_rank() == 0:
            shutil.rmtree(wipe, ignore_errors=True)
        dist.barrier()
        cfg = validate(build_config(overrides={**TINY, **overrides}), world_size=dist.get_world_size())
        summary = train(cfg)
        out.append((summary["losses"], summary.get("extra", {}).get("start_step"),
                    (summary.get("reload") or {}).get("tier")))
    return out


@pytest.mark.timeout(120)
def test_loom_train_with_a_local_level_resumes_with_the_same_losses(s3, tmp_path):
    server, url = s3
    local = str(tmp_path / "local")
    levels = {"ckpt_url": url, "ckpt_local": local}
    runs = [{"steps": 6, "ckpt_every": 4, **levels},                                 # async: saves step 4 only
            {"steps": 6, "ckpt_every": 10, "resume": True, **levels},                # from the local level
            {"steps": 6, "ckpt_every": 10, "resume": True, "wipe": local, **levels},  # from S3
            {"steps": 4, "ckpt_every": 4, "ckpt_mode": "sync", "wipe": local, **levels}]  # step 4 again, sync
    (reference, _, _), local_run, remote_run, sync_run = run_distributed(_train_runs, 2, runs, timeout=110,
                                                                         env=server.env)[0]
    for losses, start, _ in (local_run, remote_run):
        assert start == 4 and losses == reference[4:]  # bitwise: the same floats
    assert sync_run[0] == reference[:4] and sorted(LocalLevel(local).committed()) == [4]
    assert CheckpointStore(url).committed_steps() == [4]
    assert local_run[2] == "local" and remote_run[2] == "storage"


def test_ckpt_local_is_checked_before_any_worker_starts(tmp_path):
    def problems(**kw):
        with pytest.raises(ConfigError) as err:
            validate(build_config(overrides={**TINY, "dp": 1, **kw}), world_size=1)
        return str(err.value)
    url = str(tmp_path / "remote")
    assert "needs --ckpt-url" in problems(ckpt_local=str(tmp_path / "l"))
    assert "needs --ckpt-url" in problems(ckpt_local=str(tmp_path / "l"), ckpt_url=url, resume=True)
    assert "not a URL" in problems(ckpt_local="s3://b/x", ckpt_url=url, ckpt_every=2)
    assert "is --ckpt-url itself" in problems(ckpt_local=url, ckpt_url=f"file://{url}", ckpt_every=2)
    assert "--keep-last-local=0 must be >= 1" in problems(keep_last_local=0)
    validate(build_config(overrides={**TINY, "dp": 1, "ckpt_local": str(tmp_path / "l"), "ckpt_url": url,
                                     "ckpt_every": 2}), world_size=1)


def _levels(tmp_path, name: str) -> dict:
    return {"ckpt_url": str(tmp_path / name / "remote"), "ckpt_local": str(tmp_path / name / "local")}


@pytest.mark.timeout(150)
def test_fsdp_and_hdp_saves_at_the_local_level_resume_at_another_layout_with_the_same_losses(tmp_path):
    """Async saves through --ckpt-local under --shard-state params (FSDP2)
    resume unsharded, and under --hdp (varlen batches) resume under --hdp:
    served by the local level, the uninterrupted run's losses."""
    fsdp, hdp = _levels(tmp_path, "fsdp"), _levels(tmp_path, "hdp")
    varlen = {"hdp": True, "varlen_median": 6, "varlen_max": 24, "seq_len": 16}
    runs = [{"dp": 2, "shard_state": "params", "steps": 5, "ckpt_every": 3, **fsdp},  # saves step 3 only
            {"dp": 2, "shard_state": "none", "steps": 5, "ckpt_every": 10, "resume": True, **fsdp},
            {"dp": 2, "steps": 5, "ckpt_every": 3, **varlen, **hdp},
            {"dp": 2, "steps": 5, "ckpt_every": 10, "resume": True, **varlen, **hdp}]
    results = run_distributed(_train_runs, 2, runs, timeout=140)
    for rank_results in results:
        (fsdp_ref, _, _), fsdp_resumed, (hdp_ref, _, _), hdp_resumed = rank_results
        for (losses, start, tier), ref in ((fsdp_resumed, fsdp_ref), (hdp_resumed, hdp_ref)):
            assert len(ref) == 5 and ref[-1] < ref[0]
            assert start == 3 and tier == "local"
            assert len(losses) == 2 and max(abs(a - b) for a, b in zip(losses, ref[3:])) < 1e-10, (losses, ref)
    for levels in (fsdp, hdp):
        assert sorted(LocalLevel(levels["ckpt_local"]).committed()) == [3]
        assert CheckpointStore(levels["ckpt_url"]).committed_steps() == [3]


@pytest.mark.timeout(150)
def test_ulysses_ring_saves_at_the_local_level_resume_as_a_dp_by_sp_ring_with_the_same_losses(tmp_path):
    """sp=4 --sp-attention ulysses-ring --sp-inner 2 saves through
    --ckpt-local; resumed at dp=2 x sp=2 (ring) from the local level with the
    remote copy removed: the uninterrupted run's losses."""
    levels = _levels(tmp_path, "ulysses")
    shape = {"seq_len": 16, "heads": 2, "kv_heads": 1}
    runs = [{"dp": 1, "sp": 4, "sp_attention": "ulysses-ring", "sp_inner": 2, "steps": 5, "ckpt_every": 3,
             **shape, **levels},
            {"dp": 2, "sp": 2, "steps": 5, "ckpt_every": 10, "resume": True, "wipe": levels["ckpt_url"],
             **shape, **levels}]  # the remote copy is gone: step 3 is only at the local level
    results = run_distributed(_train_runs, 4, runs, timeout=140)
    for (ref, _, _), (losses, start, tier) in results:
        assert len(ref) == 5 and ref[-1] < ref[0]
        assert start == 3 and tier == "local"
        assert len(losses) == 2 and max(abs(a - b) for a, b in zip(losses, ref[3:])) < 1e-10, (losses, ref)
    assert sorted(LocalLevel(levels["ckpt_local"]).committed()) == [3]
    assert os.listdir(levels["ckpt_url"]) == []  # the remote store held nothing and nothing was written to it
