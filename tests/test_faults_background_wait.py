"""A rank waiting for checkpoint work shows it in its trace (`comms.background_wait`),
and a synchronous save of `loom train` runs on a background group of its own:
2 gloo ranks, with a slow snapshot copy or chunk write on rank 1."""
import time

import pytest
import torch
import torch.distributed as dist

from loom import comms
from loom.comms import trace


def _mine(since: float) -> list:
    return [r for r in comms.records() if r.t_enter >= since]


def _background_wait_and_async_backpressure(url: str) -> dict:
    from loom import checkpoint
    from loom.checkpoint import async_engine
    rank = dist.get_rank()
    out = {}
    plain = comms.new_group(name="plain")
    try:
        comms.background_wait(plain, "x").__enter__()
    except ValueError as exc:
        out["plain"] = str(exc)
    comms.destroy_group(plain)

    real_copy = async_engine._copy

    def slow_copy(*args):  # rank 1's snapshot copy takes 1 s: its optimizer step would wait
        if rank == 1:
            time.sleep(1.0)
        return real_copy(*args)

    async_engine._copy = slow_copy
    torch.manual_seed(0)  # the same weights on both ranks (replicated)
    model = torch.nn.Linear(8, 8)
    try:
        saver = checkpoint.AsyncCheckpointer(url)
        t0 = trace.clock()
        saver.save({"model": model.state_dict()}, step=1)
        saver.wait_snapshot()                   # blocks (on rank 1: about 1 s)
        saver.wait_snapshot()                   # nothing pending: returns at once, no record
        out["background"] = comms.background_groups()
        saver.close()
    finally:
        async_engine._copy = real_copy
    recs = _mine(t0)
    out["waits"] = [(r.group, r.op, r.duration) for r in recs if r.op.startswith("wait:")]
    out["snapshot_seqs"] = [r.seq for r in recs if r.group.startswith("ckpt-snapshot") and
                            not r.op.startswith("wait:")]
    return out


@pytest.mark.timeout(120)
def test_a_blocked_wait_for_a_snapshot_is_a_trace_record_on_the_snapshot_group(distributed, tmp_path):
    out = distributed(_background_wait_and_async_backpressure, 2, str(tmp_path / "ckpt"), timeout=90)
    for rank, got in enumerate(out):
        assert "group 'plain[0,1]' was not made with new_group(..., background=True)" in got["plain"]
        snapshot = [w for w in got["waits"] if w[1] == "wait:snapshot"]
        assert len(snapshot) == 1, got["waits"]  # the second, unblocked wait left no record
        group, _, duration = snapshot[0]
        assert group == "ckpt-snapshot[0,1]" and group in got["background"]
        if rank == 1:
            assert duration >= 0.9, got["waits"]
        assert any(w[1] == "wait:commit" and w[0] == "ckpt-persist[0,1]" for w in got["waits"]), got["waits"]
        # the wait takes no sequence number of the group: its collectives are numbered alike on both ranks
    assert out[0]["snapshot_seqs"] == out[1]["snapshot_seqs"]


def _sync_save_on_its_own_group(url: str) -> dict:
    import importlib
    save_module = importlib.import_module("loom.checkpoint.save")  # the module, not the function
    from loom.launch.checkpointing import TrainingCheckpoints
    from loom.launch.config import build_config, validate
    rank = dist.get_rank()
    cfg = validate(build_config(overrides={"ckpt_every": 1, "ckpt_mode": "sync", "ckpt_url": url,
                                           "keep_last": 1}), world_size=2)
    torch.manual_seed(0)  # the same weights on both ranks (replicated)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    real_write = save_module.write_chunks

    def slow_write(*args, **kwargs):  # rank 1 writes for 1 s: rank 0 waits in the save's collectives
        if rank == 1:  # (well above the 0.4 s asserted: rank 0's own part of the save overlaps the sleep)
            time.sleep(1.0)
        return real_write(*args, **kwargs)

    save_module.write_chunks = slow_write
    try:
        ckpts = TrainingCheckpoints(cfg, model, opt, sched, comms.init_mesh(2, 1, 1))
        t0 = trace.clock()
        ckpts.save(1)
        recs = _mine(t0)
        background = comms.background_groups()
        ckpts.finish()
    finally:
        save_module.write_chunks = real_write
    return {"recs": [(r.group, r.op, r.t_enter, r.t_exit) for r in recs], "background": background}


@pytest.mark.timeout(120)
def test_loom_trains_synchronous_save_runs_on_a_background_group_of_its_own(distributed, tmp_path):
    out = distributed(_sync_save_on_its_own_group, 2, str(tmp_path / "ckpt"), timeout=90)
    for rank, got in enumerate(out):
        recs = got["recs"]
        assert "ckpt-sync[0,1]" in got["background"]
        assert {g for g, *_ in recs} == {"ckpt-sync[0,1]"}, recs  # nothing of the save on the training groups
        wait = [r for r in recs if r[1] == "wait:checkpoint"]
        assert len(wait) == 1 and all(wait[0][2] <= r[2] and r[3] <= wait[0][3] for r in recs), recs
    # rank 0 waited for rank 1's write inside the save's (background) collectives
    longest = max(t1 - t0 for g, op, t0, t1 in out[0]["recs"] if not op.startswith("wait:"))
    assert longest >= 0.4, out[0]["recs"]
