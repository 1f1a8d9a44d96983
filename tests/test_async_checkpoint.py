"""loom.checkpoint.AsyncCheckpointer: lazy consistency (an optimizer step
right after save leaves the pre-step values in the checkpoint, CPU tensors
included), a bounded host buffer pool with backpressure, failures that
surface and never lose the previous step, retention, the writer process,
and the same across 2 gloo ranks (incl. a rank killed mid-persist)."""
import importlib
import os
import signal
import threading

import pytest
import torch
import torch.distributed as dist

from loom import checkpoint as ckpt
from loom.checkpoint import async_engine
from loom.checkpoint.host_pool import ALIGN, HostBufferPool, PoolClosed
from loom.checkpoint.store import CheckpointStore

from helpers import die_after_write, sabotage_chunk_writes, same

TIMEOUT = 240
save_mod = importlib.import_module("loom.checkpoint.save")  # the module, not ckpt.save




def model_and_optimizer(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    return model, opt


def train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=g, dtype=next(model.parameters()).dtype)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def state_of(model, opt, extra=None):
    return {"model": model.state_dict(), "optim": opt.state_dict(), **(extra or {})}


def frozen(state):
    """Bitwise copies of every tensor of a state (the expected checkpoint)."""
    out = {}
    for leaf in ckpt.state.flatten(state):
        if leaf.tensor is not None:
            out[leaf.key] = leaf.tensor.detach().clone()
    return out


def check_step(url, step, expected, target_fn):
    target = target_fn()
    info = ckpt.load(target, url, step=step)
    assert info.step == step
    got = {leaf.key: leaf.tensor for leaf in ckpt.state.flatten(target) if leaf.tensor is not None}
    assert set(got) == set(expected)
    for key in expected:
        assert same(got[key], expected[key]), (step, key)
    return target


def _fresh_target():
    model, opt = model_and_optimizer(seed=99)
    train_step(model, opt, 0)  # materialise the optimizer state with the right shapes
    return state_of(model, opt)


class GatedCopy:
    """Holds the snapshot copy until the training thread is blocked in
    `wait_snapshot` (or `release()`): makes 'the optimizer steps while the
    copy is still running' deterministic instead of a race."""

    def __init__(self, monkeypatch):
        self.entered = threading.Event()
        real_copy, real_wait = async_engine._copy, async_engine.AsyncCheckpointer.wait_snapshot

        def copy(pool, job, pieces):
            assert self.entered.wait(60), "nobody waited for the snapshot"
            real_copy(pool, job, pieces)

        def wait_snapshot(ckpt_self):
            self.entered.set()
            real_wait(ckpt_self)

        monkeypatch.setattr(async_engine, "_copy", copy)
        monkeypatch.setattr(async_engine.AsyncCheckpointer, "wait_snapshot", wait_snapshot)

    def release(self):
        self.entered.set()


# ------------------------------------------------------------------ pool

def test_pool_is_a_bounded_fifo_ring():
    pool = HostBufferPool(10 * ALIGN)
    a = pool.reserve(4 * ALIGN)
    b = pool.reserve(3 * ALIGN - 5)       # rounded up to the alignment
    assert (a.start, b.start, b.nbytes) == (0, 4 * ALIGN, 3 * ALIGN)
    with pytest.raises(ValueError, match="does not fit in the host buffer pool"):
        pool.reserve(11 * ALIGN)
    with pytest.raises(TimeoutError):
        pool.reserve(4 * ALIGN, timeout=0)  # 3 left at the end, 0 before the oldest
    waits = pool.waits
    pool.release(a)
    c = pool.reserve(4 * ALIGN)           # wraps to the front
    assert c.start == 0 and pool.used == 7 * ALIGN and pool.high_water == 7 * ALIGN

    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.reserve(6 * ALIGN)))
    waiter.start()
    with pool._cond:                       # wait until it is blocked (backpressure)
        assert pool._cond.wait_for(lambda: pool.waits == waits + 1, 30)
    pool.release(c)                        # freed out of order: nothing moves yet
    assert not got
    pool.release(b)
    waiter.join(30)
    assert got and got[0].start == 0 and pool.high_water <= pool.capacity
    pool.release(got[0])
    assert pool.used == 0

    blocked = []
    pool.reserve(10 * ALIGN)
    t = threading.Thread(target=lambda: blocked.append(pytest.raises(PoolClosed, pool.reserve, ALIGN)))
    t.start()
    with pool._cond:
        assert pool._cond.wait_for(lambda: pool.waits == waits + 2, 30)
    pool.close()
    t.join(30)
    assert blocked


# ---------------------------------------------------------- one process

@pytest.mark.timeout(120)
def test_optimizer_step_right_after_save_keeps_the_pre_step_values(tmp_path, monkeypatch):
    url = str(tmp_path / "ck")
    model, opt = model_and_optimizer()
    train_step(model, opt, 0)
    gate = GatedCopy(monkeypatch)
    extra = {"bf16": torch.arange(12, dtype=torch.float32).to(torch.bfloat16).reshape(3, 4),
             "shard": ckpt.Shard(torch.arange(6.0).reshape(2, 3), (2, 3), (0, 0)),
             "flat": ckpt.Flat(torch.arange(5, dtype=torch.int64), (1, 5), 0),
             "rng": ckpt.PerRank(torch.get_rng_state()),
             "counter": {"n": 1}}
    expected = {}
    with ckpt.AsyncCheckpointer(url) as saver:
        saver.attach(opt)
        for step in (1, 2, 3):
            state = state_of(model, opt, extra)
            expected[step] = frozen(state)
            handle = saver.save(state, step=step)
            assert not handle.snapshot_done()          # nothing was copied inside save()
            train_step(model, opt, step)               # blocks until the snapshot is done
            assert handle.snapshot_done()
            extra["counter"]["n"] += 1                 # plain values were captured at save()
            saver.wait_snapshot()                      # other in-place changes: wait first
            extra["bf16"].add_(1)
            extra["shard"].tensor.mul_(2)
            extra["flat"].tensor.add_(7)
        saver.wait()
        assert [h.result() for h in saver.history] == [f"{url}/step-{s:08d}" for s in (1, 2, 3)]
        stats = saver.stats()
        assert [s["step"] for s in stats] == [1, 2, 3]
        assert all(s["bytes"] > 0 and s["persist_s"] is not None and s["snapshot_s"] is not None for s in stats)

    def target():
        t = _fresh_target()
        t.update({"bf16": torch.zeros(3, 4, dtype=torch.bfloat16),
                  "shard": ckpt.Shard(torch.zeros(2, 3), (2, 3), (0, 0)),
                  "flat": ckpt.Flat(torch.zeros(5, dtype=torch.int64), (1, 5), 0),
                  "rng": ckpt.PerRank(torch.zeros_like(torch.get_rng_state())), "counter": None})
        return t
    for step in (1, 2, 3):
        loaded = check_step(url, step, expected[step], target)
        assert loaded["counter"] == {"n": step}

    # the control: without the hook the step changes tensors before they are copied
    model, opt = model_and_optimizer()
    train_step(model, opt, 0)
    gate.entered.clear()
    with ckpt.AsyncCheckpointer(str(tmp_path / "unattached")) as saver:
        before = frozen(state_of(model, opt))
        saver.save(state_of(model, opt), step=1)
        train_step(model, opt, 1)                      # not attached: runs at once
        gate.release()
        saver.wait()
    target = _fresh_target()
    ckpt.load(target, str(tmp_path / "unattached"))
    assert not torch.equal(target["model"]["0.weight"], before["model/0.weight"])
    assert torch.equal(target["model"]["0.weight"], model.state_dict()["0.weight"])


@pytest.mark.timeout(120)
def test_many_saves_in_flight_with_a_pool_smaller_than_two_states(tmp_path, monkeypatch):
    url = str(tmp_path / "ck")
    model, opt = model_and_optimizer()
    train_step(model, opt, 0)
    one_state = sum(ALIGN * -(-t.numel() * t.element_size() // ALIGN) for t in frozen(state_of(model, opt)).values())
    capacity = one_state * 3 // 2
    # the first write waits until the second snapshot is blocked on the full pool
    real_write = async_engine.ThreadWriter.write
    first = []

    def write(self, plan, fragments, parts, pool=None):
        if not first:
            first.append(plan.step)
            with pool._cond:
                assert pool._cond.wait_for(lambda: pool.waits >= 1, 60), "no backpressure"
        return real_write(self, plan, fragments, parts, pool)

    monkeypatch.setattr(async_engine.ThreadWriter, "write", write)
    expected = {}
    with ckpt.AsyncCheckpointer(url, host_buffer_bytes=capacity) as saver:
        saver.attach(opt)
        pool = None
        for step in range(1, 7):
            state = state_of(model, opt)
            expected[step] = frozen(state)
            saver.save(state, step=step)
            train_step(model, opt, step)
            pool = pool or saver.pool
            assert saver.pool is pool                  # one arena, never reallocated
        saver.wait()
        assert pool.capacity < 2 * one_state and pool.high_water <= pool.capacity and pool.waits >= 1
    for step, exp in expected.items():
        check_step(url, step, exp, _fresh_target)


@pytest.mark.timeout(120)
def test_explicit_pool_too_small_for_one_snapshot_fails_clearly(tmp_path):
    url = str(tmp_path / "ck")
    with ckpt.AsyncCheckpointer(url, host_buffer_bytes=1024) as saver:
        saver.save({"ok": torch.zeros(8)}, step=1).result()
        handle = saver.save({"big": torch.zeros(4096)}, step=2)
        with pytest.raises(ckpt.CheckpointSaveError, match="host_buffer_bytes >= 16384") as err:
            handle.result()
        assert isinstance(err.value.__cause__, ValueError) and err.value.step == 2
    assert CheckpointStore(url).committed_steps() == [1]


@pytest.mark.timeout(120)
def test_automatic_pool_grows_for_a_larger_state(tmp_path):
    url = str(tmp_path / "ck")
    with ckpt.AsyncCheckpointer(url) as saver:
        saver.save({"w": torch.ones(4)}, step=1)
        saver.save({"w": torch.ones(4), "m": torch.full((300_000,), 2.0)}, step=2)  # optimizer state appeared
        saver.wait()
        assert saver.pool.capacity >= 2 * 1_200_000
    target = {"w": torch.zeros(4), "m": torch.zeros(300_000)}
    ckpt.load(target, url)
    assert torch.equal(target["m"], torch.full((300_000,), 2.0))


@pytest.mark.timeout(120)
def test_injected_write_failure_surfaces_and_the_previous_step_loads(tmp_path):
    url = str(tmp_path / "ck")
    broken = {"on": False}

    def disk_full(write):
        if broken["on"]:
            raise OSError(28, "No space left on device")
        write()

    undo = sabotage_chunk_writes(disk_full)
    try:
        _write_failures(url, broken)
    finally:
        undo()


def _write_failures(url, broken):
    good = {"w": torch.arange(10.0), "n": 1}
    with ckpt.AsyncCheckpointer(url) as saver:
        saver.save(good, step=1).result()
        broken["on"] = True
        # 1. through the handle
        h2 = saver.save({"w": torch.full((10,), -1.0), "n": 2}, step=2)
        with pytest.raises(ckpt.CheckpointSaveError, match="step 2.*No space left on device") as err:
            h2.result()
        assert isinstance(err.value.__cause__, OSError)
        saver.wait()                                   # already reported: no second raise
        # 2. through wait()
        saver.save({"w": torch.full((10,), -1.0), "n": 3}, step=3)
        with pytest.raises(ckpt.CheckpointSaveError, match="step 3"):
            saver.wait()
        # 3. through the next save(), which is still made
        assert saver.save({"w": torch.full((10,), -1.0), "n": 4}, step=4).wait()
        broken["on"] = False
        with pytest.raises(ckpt.CheckpointSaveError, match="step 4") as err:
            saver.save({"w": torch.full((10,), 5.0), "n": 5}, step=5)
        assert err.value.handle.result() == f"{url}/step-00000005"
        # bad input raises at once, and the checkpointer stays usable
        with pytest.raises(TypeError, match="key 'bad'"):
            saver.save({"bad": object()}, step=6)
        with pytest.raises(ValueError, match="step=-1"):
            saver.save({"w": torch.ones(1)}, step=-1)
        saver.save({"w": torch.full((10,), 7.0), "n": 7}, step=7).result()
    store = CheckpointStore(url)
    assert store.committed_steps() == [1, 5, 7] and store.steps() == [1, 5, 7]  # torn steps removed
    target = {"w": torch.zeros(10), "n": 0}
    assert ckpt.load(target, url, step=1).step == 1 and torch.equal(target["w"], torch.arange(10.0))
    ckpt.load(target, url)
    assert target["n"] == 7


@pytest.mark.timeout(120)
def test_save_every_step_keep_last_three_and_the_same_step_twice(tmp_path):
    url = str(tmp_path / "ck")
    with ckpt.AsyncCheckpointer(url, keep_last=3) as saver:
        handles = [saver.save({"w": torch.full((3,), float(s)), "s": s}, step=s) for s in range(20)]
        again = saver.save({"w": torch.full((3,), 100.0), "s": 100}, step=19)  # replaces 19 once it is done
        saver.wait()
    assert all(h.done() for h in handles) and again.done()
    assert [h.result() for h in handles][-1] == f"{url}/step-00000019"
    store = CheckpointStore(url)
    assert store.committed_steps() == [17, 18, 19] and store.latest() == 19
    target = {"w": torch.zeros(3), "s": 0}
    ckpt.load(target, url)
    assert target["s"] == 100 and torch.equal(target["w"], torch.full((3,), 100.0))


@pytest.mark.timeout(120)
def test_memory_store_and_bad_arguments():
    url = "memory://async-ckpt-test"
    with ckpt.AsyncCheckpointer(url) as saver:
        saver.save({"w": torch.arange(4.0)}, step=3).result()
    target = {"w": torch.zeros(4)}
    assert ckpt.load(target, url).step == 3 and torch.equal(target["w"], torch.arange(4.0))
    with pytest.raises(ValueError, match="writer='process' needs a store"):
        ckpt.AsyncCheckpointer(url, writer="process")
    with pytest.raises(ValueError, match="writer='disk'"):
        ckpt.AsyncCheckpointer(url, writer="disk")
    with pytest.raises(ValueError, match="host_buffer_bytes=0"):
        ckpt.AsyncCheckpointer(url, host_buffer_bytes=0)
    with pytest.raises(ValueError, match="keep_last=-2"):
        ckpt.AsyncCheckpointer(url, keep_last=-2)
    saver = ckpt.AsyncCheckpointer(url)
    with pytest.raises(TypeError, match="register_step_pre_hook"):
        saver.attach(object())
    saver.close()
    with pytest.raises(RuntimeError, match="closed"):
        saver.save({}, step=1)


@pytest.mark.timeout(180)
def test_process_writer_round_trip_and_a_killed_writer(tmp_path, monkeypatch):
    from loom.checkpoint import writers
    url = str(tmp_path / "ck")
    model, opt = model_and_optimizer()
    train_step(model, opt, 0)
    with ckpt.AsyncCheckpointer(url, writer="process") as saver:
        saver.attach(opt)
        state = state_of(model, opt)
        one = frozen(state)
        saver.save(state, step=1)
        train_step(model, opt, 1)
        saver.wait()
        writer = saver._writer
        assert saver.pool.path.startswith(("/dev/shm", "/tmp")) and writer.pid is not None

        # killed in the middle of a persist: the save fails, step 1 stays
        real_send = writers.ProcessWriter._send

        def send_then_kill(self, message):
            real_send(self, message)
            os.kill(self.pid, signal.SIGKILL)
        monkeypatch.setattr(writers.ProcessWriter, "_send", send_then_kill)
        with pytest.raises(ckpt.CheckpointSaveError, match="writer process died .*exit code -9"):
            saver.save(state_of(model, opt), step=2).result()
        monkeypatch.setattr(writers.ProcessWriter, "_send", real_send)
        # the next save starts a new writer
        state = state_of(model, opt)
        three = frozen(state)
        saver.save(state, step=3).result()
        pool_file = saver.pool.path
    assert not os.path.exists(pool_file)  # the shared file is gone with the pool
    assert CheckpointStore(url).committed_steps() == [1, 3]
    check_step(url, 1, one, _fresh_target)
    check_step(url, 3, three, _fresh_target)


# ------------------------------------------------------------ two ranks

def _two_ranks(root):
    """Sub-cases on 2 gloo ranks, one distributed call: lazy consistency with
    sharded / flat / replicated / per-rank leaves, a failure on one rank,
    different steps, keep_last over 20 saves."""
    rank = dist.get_rank()
    out = {}
    # lazy consistency; rank-specific fragments and replicated tensors
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4).double()                 # replicated over the 2 ranks
    frag = torch.arange(7.0) + 10 * rank                   # Flat ranges of 14
    rows = torch.full((2, 3), float(rank))                 # Shard rows of (4, 3)
    opt = torch.optim.SGD(list(model.parameters()) + [frag.requires_grad_(), rows.requires_grad_()], lr=0.5)
    url = f"{root}/lazy"
    with ckpt.AsyncCheckpointer(url) as saver:
        saver.attach(opt)
        for step in (1, 2):
            state = {"model": model.state_dict(), "frag": ckpt.Flat(frag.detach(), (14,), 7 * rank),
                     "rows": ckpt.Shard(rows.detach(), (4, 3), (2 * rank, 0)),
                     "rng": ckpt.PerRank({"rank": rank, "t": torch.full((2,), float(rank))})}
            out[f"expected{step}"] = {k: v.clone() for k, v in model.state_dict().items()}
            out[f"frag{step}"], out[f"rows{step}"] = frag.detach().clone(), rows.detach().clone()
            saver.save(state, step=step)
            opt.zero_grad()
            (model(torch.ones(3, 5, dtype=torch.float64)).sum() + frag.sum() + rows.sum()).backward()
            opt.step()
        saver.wait()
    target = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()},
              "frag": torch.zeros(14), "rows": torch.zeros(4, 3), "rng": ckpt.PerRank(None)}
    ckpt.load(target, url, step=1)
    out["loaded1"] = target

    # an injected failure on rank 1 fails the save everywhere; step 1 stays
    def failing(write):
        raise OSError("injected write failure on rank 1")

    url = f"{root}/fail"
    with ckpt.AsyncCheckpointer(url) as saver:
        state = {"w": ckpt.Shard(torch.full((2, 2), float(rank)), (4, 2), (2 * rank, 0)), "rep": torch.ones(3)}
        saver.save(state, step=1).result()
        undo = sabotage_chunk_writes(failing) if rank == 1 else (lambda: None)
        try:
            saver.save(state, step=2).result()
        except ckpt.CheckpointSaveError as exc:
            out["failure"] = str(exc)
        finally:
            undo()
        # ranks saving different steps at once: refused on both
        try:
            saver.save(state, step=3 + rank).result()
        except ckpt.CheckpointSaveError as exc:
            out["mismatch"] = str(exc)
    out["fail_committed"] = CheckpointStore(url).committed_steps()

    # a save at every step for 20 steps, keep_last=3
    url = f"{root}/keep"
    with ckpt.AsyncCheckpointer(url, keep_last=3) as saver:
        handles = [saver.save({"w": ckpt.Shard(torch.full((1, 2), float(s)), (2, 2), (rank, 0)), "s": s}, step=s)
                   for s in range(20)]
        saver.wait()
        out["all_committed"] = all(h.result().endswith(f"step-{s:08d}") for s, h in enumerate(handles))
    out["kept"] = CheckpointStore(url).committed_steps()

    # a group that is a proper subset of the world: only its members take part
    from loom import comms
    if rank == 1:
        alone = comms.new_group([1], name="alone")
        with ckpt.AsyncCheckpointer(f"{root}/alone", group=alone) as saver:
            saver.save({"w": torch.full((2,), 5.0)}, step=1).result()
        out["alone"] = CheckpointStore(f"{root}/alone").read_manifest(1).world_size
    return out


@pytest.mark.timeout(TIMEOUT)
def test_two_ranks_lazy_failure_and_retention(distributed, tmp_path):
    results = distributed(_two_ranks, 2, str(tmp_path), timeout=TIMEOUT)
    for rank, out in enumerate(results):
        loaded = out["loaded1"]
        for k, v in out["expected1"].items():
            assert same(loaded["model"][k], v), (rank, k)
        assert torch.equal(loaded["frag"], torch.cat([results[0]["frag1"], results[1]["frag1"]]))
        assert torch.equal(loaded["rows"], torch.cat([results[0]["rows1"], results[1]["rows1"]]))
        assert loaded["rng"].value["rank"] == rank
        assert torch.equal(loaded["rng"].value["t"], torch.full((2,), float(rank)))
        assert "step 2" in out["failure"] and ("injected write failure on rank 1" in out["failure"])
        assert "different steps" in out["mismatch"]
        assert out["fail_committed"] == [1]
        assert out["all_committed"] and out["kept"] == [17, 18, 19]
    assert results[1]["alone"] == 1 and "alone" not in results[0]
    # the second save also reached storage with the pre-step values
    target = {"model": {k: torch.zeros_like(v) for k, v in results[0]["expected2"].items()},
              "frag": torch.zeros(14), "rows": torch.zeros(4, 3)}
    ckpt.load(target, str(tmp_path / "lazy"), step=2, strict=False)
    for k, v in results[0]["expected2"].items():
        assert same(target["model"][k], v)


def _killed_mid_persist(url):
    """Step 1 committed; rank 1 dies (os._exit) while writing step 2's chunks."""
    rank = dist.get_rank()
    state = {"w": ckpt.Shard(torch.full((4, 3), float(rank)), (8, 3), (4 * rank, 0)), "n": 1}
    with ckpt.AsyncCheckpointer(url) as saver:
        saver.save(state, step=1).result()
        if rank == 1:
            sabotage_chunk_writes(die_after_write)  # the whole process dies, from the persist thread
        state["w"] = ckpt.Shard(torch.full((4, 3), -1.0), (8, 3), (4 * rank, 0))
        state["n"] = 2
        saver.save(state, step=2).result()
    return "finished"


@pytest.mark.timeout(TIMEOUT)
def test_killed_mid_persist_leaves_the_previous_step(distributed, tmp_path):
    from loom.comms.testing import WorkerError
    url = str(tmp_path / "ck")
    with pytest.raises((WorkerError, RuntimeError)):
        distributed(_killed_mid_persist, 2, url, timeout=TIMEOUT)
    store = CheckpointStore(url)
    assert store.committed_steps() == [1] and store.latest() == 1
    target = {"w": torch.zeros(8, 3), "n": 0}
    info = ckpt.load(target, url)
    assert info.step == 1 and target["n"] == 1
    assert torch.equal(target["w"], torch.cat([torch.zeros(4, 3), torch.ones(4, 3)]))
    with pytest.raises(FileNotFoundError):
        ckpt.load(target, url, step=2)


# ------------------------------------------------------------- loom train

TINY = {"data": "synthetic", "vocab": 32, "dim": 16, "layers": 2, "heads": 2, "seq_len": 8, "batch_size": 4,
        "dtype": "float64", "lr": 1e-2, "warmup_steps": 2, "progress": False}


def _train_both_modes(root):
    from loom.launch.config import build_config, validate
    from loom.launch.train import train
    out = {}
    for mode in ("async", "sync"):
        cfg = validate(build_config(overrides={**TINY, "steps": 4, "ckpt_every": 1, "keep_last": 2,
                                               "ckpt_url": f"{root}/{mode}", "ckpt_mode": mode}))
        summary = train(cfg, None)
        out[mode] = (summary["losses"], summary["extra"])
    return out


@pytest.mark.timeout(TIMEOUT)
def test_loom_train_async_and_sync_checkpoints_are_identical(distributed, tmp_path):
    from loom.launch.config import ConfigError, build_config, validate
    with pytest.raises(ConfigError, match="--ckpt-mode='later' must be async or sync"):
        validate(build_config(overrides={"ckpt_mode": "later"}))
    out = distributed(_train_both_modes, 2, str(tmp_path), timeout=TIMEOUT)[0]
    (losses_a, extra_a), (losses_s, extra_s) = out["async"], out["sync"]
    assert losses_a == losses_s
    for extra, mode in ((extra_a, "async"), (extra_s, "sync")):
        assert extra["checkpoints"] == 4 and extra["ckpt_mode"] == mode
        assert extra["ckpt_stall_s"] >= 0 and extra["ckpt_persist_s"] > 0
    # a checkpoint taken while the next step's optimizer was already waiting
    # to run holds exactly what the synchronous save wrote: same chunks (crc32c), same values
    stores = {m: CheckpointStore(str(tmp_path / m)) for m in ("async", "sync")}
    assert stores["async"].committed_steps() == stores["sync"].committed_steps() == [3, 4]
    for step in (3, 4):
        a, s = (stores[m].read_manifest(step) for m in ("async", "sync"))
        assert a.values == s.values
        assert {k: e.checksums for k, e in a.tensors.items()} == {k: e.checksums for k, e in s.tensors.items()}
