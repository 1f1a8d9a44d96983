"""One writer per checkpoint store (loom.checkpoint.owner): a second writer
fails at once naming the first (in one process and across processes), two
processes saving the same steps leave only intact commits, a crashed owner's
store is claimed, takeover, a taken-over job fails its next save on every
rank; ranks that do not share the store are refused; a failed synchronous
save leaves no torn step."""
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from loom import checkpoint as ckpt
from loom.checkpoint import owner
from loom.checkpoint.collective import Group
from loom.checkpoint.store import CheckpointStore

from helpers import sabotage_chunk_writes

TIMEOUT = 120


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(256, generator=g, dtype=torch.float64) for i in range(6)} | {"seed": seed}


def intact(url) -> list[int]:
    """The committed steps, after checking that every one of them verifies."""
    steps = CheckpointStore(url).committed_steps()
    for step in steps:
        assert ckpt.verify(url, step) == [], step
    return steps


def hand_written(url, **fields):
    """An owner record as another job would have left it."""
    now = time.time()
    record = {"format": owner.FORMAT, "version": owner.VERSION, "job": "other", "host": "elsewhere",
              "pid": 12345, "machine": "m", "token": "t" * 32, "started": now, "heartbeat": now,
              "lease_s": 30.0, **fields}
    CheckpointStore(url).put(owner.OWNER, json.dumps(record).encode())


# ------------------------------------------------------------ one process

@pytest.mark.timeout(TIMEOUT)
def test_second_writer_in_one_process_fails_at_once_naming_the_first(tmp_path):
    url = str(tmp_path / "ck")
    with ckpt.AsyncCheckpointer(url, job="first") as first:
        record = ckpt.read_owner(url)
        assert (record["job"], record["pid"], record["host"]) == ("first", os.getpid(), socket.gethostname())
        t0 = time.monotonic()
        with pytest.raises(ckpt.CheckpointOwnershipError,
                           match=rf"owned by job 'first' on host '{socket.gethostname()}' \(pid {os.getpid()}, "
                                 r"started .*, heartbeat \d+\.\d s ago, lease 30 s\)"):
            ckpt.AsyncCheckpointer(url, job="second")
        with pytest.raises(ckpt.CheckpointOwnershipError, match="owned by job 'first'"):
            ckpt.save(state(1), url, step=1, job="second")
        assert time.monotonic() - t0 < 5  # at once, not after a lease
        # the same job shares its claim for one-shot saves
        assert ckpt.save(state(2), url, step=2, job="first").endswith("step-00000002")
        first.save(state(3), step=3).result()
        assert ckpt.read_owner(url)["token"] == record["token"]
    assert ckpt.read_owner(url) is None  # released by close()
    with ckpt.AsyncCheckpointer(url, job="second") as second:
        second.save(state(4), step=4).result()
    assert intact(url) == [2, 3, 4]


@pytest.mark.timeout(TIMEOUT)
def test_a_gone_owner_is_claimed_and_a_live_one_is_not(tmp_path):
    url = str(tmp_path / "ck")
    # a live owner elsewhere: refused; once its heartbeat is older than its lease: claimed
    hand_written(url, heartbeat=time.time() - 0.5, lease_s=3.0)
    with pytest.raises(ckpt.CheckpointOwnershipError, match="job 'other' on host 'elsewhere'"):
        ckpt.save(state(1), url, step=1)
    hand_written(url, heartbeat=time.time() - 5.0, lease_s=3.0)
    ckpt.save(state(1), url, step=1)
    assert ckpt.read_owner(url)["job"] == owner.default_job()  # kept by this process after the save
    assert ckpt.release_store(url) and ckpt.read_owner(url) is None and not ckpt.release_store(url)
    # an owner on this host whose process has exited: claimed at once (its lease is long)
    code = ("import os, sys; from loom.checkpoint import owner; "
            "owner.claim_store(sys.argv[1], job='crashed'); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, url], check=True, timeout=60)
    crashed = ckpt.read_owner(url)
    assert crashed["job"] == "crashed" and crashed["lease_s"] == owner.LEASE_S
    t0 = time.monotonic()
    with ckpt.AsyncCheckpointer(url, job="restarted") as saver:
        assert time.monotonic() - t0 < 5
        saver.save(state(2), step=2).result()
    # a record loom did not write is refused (takeover replaces it)
    CheckpointStore(url).put(owner.OWNER, b"{not json")
    with pytest.raises(ckpt.InvalidCheckpointError, match="OWNER.*not a loom owner record.*takeover=True"):
        ckpt.save(state(3), url, step=3)
    hand_written(url, started=1e300)  # fields are checked before use
    with pytest.raises(ckpt.InvalidCheckpointError, match="started=1e[+]300 must be a time in seconds"):
        ckpt.save(state(3), url, step=3)
    ckpt.save(state(3), url, step=3, takeover=True)
    assert intact(url) == [1, 2, 3]
    ckpt.release_store(url)


@pytest.mark.timeout(TIMEOUT)
def test_the_heartbeat_keeps_a_short_lease_alive(tmp_path):
    url = str(tmp_path / "ck")
    with ckpt.AsyncCheckpointer(url, job="beating", lease_s=0.3) as saver:
        first = ckpt.read_owner(url)["heartbeat"]
        time.sleep(1.2)  # four leases
        assert ckpt.read_owner(url)["heartbeat"] > first
        with pytest.raises(ckpt.CheckpointOwnershipError, match="owned by job 'beating'"):
            ckpt.AsyncCheckpointer(url, job="other")
        saver.save(state(1), step=1).result()


@pytest.mark.timeout(TIMEOUT)
def test_takeover_fails_the_old_jobs_next_save_and_keeps_the_new_owner(tmp_path):
    url = str(tmp_path / "ck")
    old = ckpt.AsyncCheckpointer(url, job="old")
    old.save(state(1), step=1).result()
    with ckpt.AsyncCheckpointer(url, job="new", takeover=True) as new:
        with pytest.raises(ckpt.CheckpointSaveError, match="no longer owns.*taken over by job 'new'") as err:
            old.save(state(2), step=2).result()
        assert isinstance(err.value.__cause__, ckpt.CheckpointOwnershipError)
        old.close()                             # does not remove the new owner's record
        assert ckpt.read_owner(url)["job"] == "new"
        new.save(state(3), step=3).result()
    assert intact(url) == [1, 3] and CheckpointStore(url).steps() == [1, 3]


# ------------------------------------------------- failed synchronous saves

@pytest.mark.timeout(TIMEOUT)
def test_a_failed_sync_save_leaves_no_torn_step(tmp_path, monkeypatch):
    url = str(tmp_path / "ck")
    ckpt.save(state(1), url, step=1)

    def disk_full(write):
        raise OSError(28, "No space left on device")
    undo = sabotage_chunk_writes(disk_full)
    try:
        with pytest.raises(OSError, match="No space left"):
            ckpt.save(state(2), url, step=2)
    finally:
        undo()
    store = CheckpointStore(url)
    assert store.steps() == [1]

    # a failure after the marker: the step is committed, so it stays
    real_commit = CheckpointStore.commit

    def commit(self, *args, **kwargs):
        real_commit(self, *args, **kwargs)
        raise OSError("failed after the marker")
    monkeypatch.setattr(CheckpointStore, "commit", commit)
    with pytest.raises(OSError, match="failed after the marker"):
        ckpt.save(state(3), url, step=3)
    monkeypatch.setattr(CheckpointStore, "commit", real_commit)
    assert store.committed_steps() == [1, 3] and intact(url) == [1, 3]

    # taken over while writing: nothing is committed, and the step (now the
    # other job's to write) is not removed
    ckpt.release_store(url)  # this process kept its claim for the default job since the first save
    thief, lock = [], threading.Lock()

    def taken_over(write):
        write()
        with lock:  # chunks are written by several threads
            if not thief:
                thief.append(owner.claim_store(url, job="thief", takeover=True))
    undo = sabotage_chunk_writes(taken_over)
    try:
        with pytest.raises(ckpt.CheckpointOwnershipError, match="taken over by job 'thief'"):
            ckpt.save(state(4), url, step=4, job="victim")
    finally:
        undo()
    assert store.steps() == [1, 3, 4] and store.committed_steps() == [1, 3]
    assert ckpt.read_owner(url)["job"] == "thief"
    thief[0].release()
    assert ckpt.read_owner(url) is None


# ------------------------------------------------------- across processes

def _second_process_writer(url):
    """Rank 0 and rank 1 are two separate jobs (each a group of one)."""
    rank, alone = dist.get_rank(), Group.alone()
    out = {"pid": os.getpid()}
    saver = ckpt.AsyncCheckpointer(url, group=alone, job="job-0") if rank == 0 else None
    dist.barrier()
    if rank == 1:
        t0 = time.monotonic()
        for attempt in (lambda: ckpt.AsyncCheckpointer(url, group=alone, job="job-1"),
                        lambda: ckpt.save(state(5), url, step=5, group=alone, job="job-1")):
            try:
                attempt()
            except ckpt.CheckpointOwnershipError as exc:
                out.setdefault("errors", []).append(str(exc))
        out["seconds"] = time.monotonic() - t0
    dist.barrier()
    if saver is not None:
        saver.save(state(0), step=1).result()
        saver.close()
    return out


@pytest.mark.timeout(TIMEOUT)
def test_second_writer_in_another_process_fails_at_once_naming_the_first(distributed, tmp_path):
    url = str(tmp_path / "ck")
    first, second = distributed(_second_process_writer, 2, url, timeout=TIMEOUT)
    assert len(second["errors"]) == 2 and second["seconds"] < 10
    for text in second["errors"]:
        assert f"owned by job 'job-0' on host '{socket.gethostname()}' (pid {first['pid']}" in text
        assert "heartbeat" in text and "takeover=True" in text
    assert intact(url) == [1] and ckpt.read_owner(url) is None


def _save_in_a_loop(url, rounds):
    """Each rank is its own job (a group of one) calling ckpt.save on one
    store over and over (/tmp/attack/twojobs.py); then the one that saved
    releases the store and the other one saves."""
    rank, alone = dist.get_rank(), Group.alone()
    saved, refused = [], set()
    dist.barrier()  # both start together
    for i in range(rounds):
        for step in (1, 2):
            try:
                ckpt.save(state(1000 * rank + i), url, step=step, group=alone, job=f"loop-{rank}")
                saved.append(step)
            except ckpt.CheckpointOwnershipError as exc:
                refused.add(re.search(r"owned by job '([^']*)'", str(exc)).group(1))
            time.sleep(0.005)  # a training step between saves
    dist.barrier()
    holder = ckpt.read_owner(url)["job"]  # the job that saved still holds the store between its saves
    latest = CheckpointStore(url).latest()
    dist.barrier()
    released = ckpt.release_store(url)
    dist.barrier()
    after = None
    if not saved:  # the store is free now
        after = ckpt.save(state(7), url, step=3, group=alone, job=f"loop-{rank}")
        ckpt.release_store(url)
    return {"saved": saved, "refused": sorted(refused), "holder": holder, "latest": latest,
            "released": released, "after": after}


@pytest.mark.timeout(TIMEOUT)
def test_a_job_that_saved_keeps_the_store_until_it_releases_it(distributed, tmp_path):
    url = str(tmp_path / "ck")
    results = distributed(_save_in_a_loop, 2, url, 20, timeout=TIMEOUT)
    winner = next(r for r, out in enumerate(results) if out["saved"])
    loser = 1 - winner
    assert results[winner]["saved"] == [1, 2] * 20 and results[winner]["refused"] == []
    assert results[loser]["saved"] == [] and results[loser]["refused"] == [f"loop-{winner}"]  # every time
    assert all(out["holder"] == f"loop-{winner}" and out["latest"] == 2 for out in results)
    assert results[winner]["released"] and not results[loser]["released"]
    assert results[loser]["after"].endswith("step-00000003")
    assert intact(url) == [1, 2, 3] and ckpt.read_owner(url) is None
    for step, seed in ((1, 1000 * winner + 19), (2, 1000 * winner + 19), (3, 7)):  # whole saves of one job
        target = {f"w{i}": torch.zeros(256, dtype=torch.float64) for i in range(6)} | {"seed": None}
        ckpt.load(target, url, step=step)
        assert target["seed"] == seed
        assert all(torch.equal(target[k], v) for k, v in state(seed).items() if k != "seed")


def _taken_over(url):
    """A 2-rank job saves; rank 1's process, as another job, takes the store over."""
    rank = dist.get_rank()
    out = {}
    shard = ckpt.Shard(torch.full((2, 3), float(rank)), (4, 3), (2 * rank, 0))
    saver = ckpt.AsyncCheckpointer(url, job="job-a")
    saver.save({"w": shard}, step=1).result()
    dist.barrier()
    thief = ckpt.claim_store(url, group=Group.alone(), job="job-b", takeover=True) if rank == 1 else None
    if rank == 1:
        ckpt.save({"w": torch.ones(4, 3)}, url, step=2, group=Group.alone(), job="job-b")
    dist.barrier()
    try:
        saver.save({"w": shard}, step=3).result()
    except ckpt.CheckpointSaveError as exc:
        out["async"] = (type(exc.__cause__).__name__, str(exc))
    try:
        ckpt.save({"w": shard}, url, step=4, job="job-a")
    except ckpt.CheckpointOwnershipError as exc:
        out["sync"] = str(exc)
    saver.close()
    dist.barrier()
    out["owner"] = ckpt.read_owner(url)["job"]
    dist.barrier()
    if thief is not None:
        thief.release()
    return out


@pytest.mark.timeout(TIMEOUT)
def test_a_taken_over_job_fails_its_next_save_on_every_rank(distributed, tmp_path):
    url = str(tmp_path / "ck")
    for rank, out in enumerate(distributed(_taken_over, 2, url, timeout=TIMEOUT)):
        kind, text = out["async"]
        assert kind == "CheckpointOwnershipError" and "step 3" in text
        assert "no longer owns" in text and "taken over by job 'job-b'" in text
        assert "no longer owns" in out["sync"] and "job 'job-b'" in out["sync"]
        assert rank == 0 or out["sync"].startswith("rank 0: CheckpointOwnershipError")
        assert out["owner"] == "job-b"
    assert intact(url) == [1, 2] and CheckpointStore(url).steps() == [1, 2]
    assert ckpt.read_owner(url) is None


def _fails_on_rank_1(url):
    """Rank 1's chunk writes fail: both ranks raise, rank 0 removes the torn step."""
    rank = dist.get_rank()
    shard = ckpt.Shard(torch.full((2, 3), float(rank)), (4, 3), (2 * rank, 0))
    ckpt.save({"w": shard}, url, step=1)

    def failing(write):
        raise OSError("injected write failure on rank 1")
    undo = sabotage_chunk_writes(failing) if rank == 1 else (lambda: None)
    try:
        ckpt.save({"w": shard}, url, step=2)
    except (OSError, RuntimeError) as exc:
        error = str(exc)
    finally:
        undo()
    dist.barrier()
    ckpt.release_store(url)  # this worker process lives on: it would keep its claim
    return error, CheckpointStore(url).steps()


@pytest.mark.timeout(TIMEOUT)
def test_a_sync_save_that_fails_on_one_rank_leaves_no_torn_step(distributed, tmp_path):
    url = str(tmp_path / "ck")
    for error, steps in distributed(_fails_on_rank_1, 2, url, timeout=TIMEOUT):
        assert "injected write failure on rank 1" in error and steps == [1]
    assert intact(url) == [1]


def _memory_store(url):
    rank = dist.get_rank()
    out = {}
    try:
        ckpt.save({"w": ckpt.Shard(torch.ones(2), (4,), (2 * rank,))}, url, step=1)
        out["saved"] = True
    except ckpt.StoreNotSharedError as exc:
        out["save"] = str(exc)
    try:
        ckpt.AsyncCheckpointer(url)
        out["constructed"] = True
    except ckpt.StoreNotSharedError as exc:
        out["async"] = str(exc)
    store = CheckpointStore(url)
    out["left"] = store.fs.ls(store.root, detail=False) if store.fs.exists(store.root) else []
    return out


@pytest.mark.timeout(TIMEOUT)
def test_a_store_the_ranks_do_not_share_is_refused_on_every_rank(distributed):
    url = "memory://not-shared"
    for out in distributed(_memory_store, 2, url, timeout=TIMEOUT):
        assert "saved" not in out and "constructed" not in out
        for text in (out["save"], out["async"]):
            assert f"checkpoint store {url} is not shared by the 2 ranks" in text
            assert "ranks [1] could not see it (rank 1: not found)" in text and "memory://" in text
        assert out["left"] == []  # no probe, no owner record, no step


# ------------------------------------------------- kept claims (one-shot saves)

CHILD = ("import sys, torch; from loom import checkpoint as ckpt; "
         "ckpt.save({'w': torch.ones(2)}, sys.argv[1], step=9, job='child')")


@pytest.mark.timeout(TIMEOUT)
def test_a_process_that_saved_keeps_the_store_until_release_or_exit(tmp_path):
    url = str(tmp_path / "ck")
    ckpt.save(state(1), url, step=1, job="first")
    record = ckpt.read_owner(url)
    assert (record["job"], record["pid"]) == ("first", os.getpid())
    for attempt in (lambda: ckpt.save(state(2), url, step=2, job="second"),
                    lambda: ckpt.claim_store(url, job="second"),
                    lambda: ckpt.AsyncCheckpointer(url, job="second")):
        with pytest.raises(ckpt.CheckpointOwnershipError,
                           match=r"owned by job 'first' .*\(this process: .*release_store"):
            attempt()
    ckpt.save(state(2), url, step=2, job="first")  # its own saves share the claim
    ckpt.save(state(3), url, step=3)               # job=None: whatever claim this process holds
    assert ckpt.read_owner(url)["token"] == record["token"]
    # an explicit claim of the same job adopts the kept claim (with its own lease); its close ends it
    with ckpt.AsyncCheckpointer(url, job="first", lease_s=5.0) as saver:
        adopted = ckpt.read_owner(url)
        assert adopted["token"] == record["token"] and adopted["lease_s"] == 5.0
        with pytest.raises(ValueError, match=r"close\(\)"):
            ckpt.release_store(url)
        saver.save(state(4), step=4).result()
    assert ckpt.read_owner(url) is None and not ckpt.release_store(url)
    ckpt.save(state(5), url, step=5, job="again")
    assert ckpt.read_owner(url)["job"] == "again" and ckpt.release_store(url) and ckpt.read_owner(url) is None
    # a process that exits releases its claim; one that is killed leaves a record claimable at once
    subprocess.run([sys.executable, "-c", CHILD, url], check=True, timeout=60)
    assert ckpt.read_owner(url) is None
    killed = subprocess.run([sys.executable, "-c", CHILD + "; import os; os.kill(os.getpid(), 9)", url],
                            timeout=60)
    assert killed.returncode == -9 and ckpt.read_owner(url)["job"] == "child"
    t0 = time.monotonic()
    ckpt.save(state(6), url, step=6)
    assert time.monotonic() - t0 < 5 and ckpt.read_owner(url)["pid"] == os.getpid()
    ckpt.release_store(url)
    assert intact(url) == [1, 2, 3, 4, 5, 6, 9]


# ------------------------------------------------------------ gc is a writer

def _val(x):
    return {"w": torch.full((4,), float(x))}


@pytest.mark.timeout(TIMEOUT)
def test_gc_claims_the_store_and_never_deletes_a_step_in_flight(tmp_path):
    """/tmp/attack/rollback_gc.py: a job rolled back to 50 (of 50 and 100) is
    writing 60, which looks torn (uncommitted, below the newest commit)."""
    url = str(tmp_path / "rb")
    for s in (50, 100):
        ckpt.save(_val(s), url, step=s)
    ckpt.load(_val(0), url, step=50)
    own = ckpt.claim_store(url)  # adopts the claim its saves kept
    plan = ckpt.plan_save(_val(60), url, step=60, ownership=own)
    sums = ckpt.write_chunks(plan, plan.tensors)
    # another process: gc (a dry run too) fails at once naming the owner; nothing is deleted
    job = owner.default_job()
    code = "import sys; from loom import checkpoint as ckpt; ckpt.gc(sys.argv[1], include_newer=True)"
    runs = [subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=60)]
    for extra in ([], ["--dry-run"]):
        runs.append(subprocess.run([sys.executable, "-m", "loom", "ckpt", "gc", url, "--include-newer", *extra],
                                   capture_output=True, text=True, timeout=60))
    for run in runs:
        assert run.returncode == 1 and f"CheckpointOwnershipError: checkpoint store {url} is owned by job " \
                                       f"'{job}' on host '{socket.gethostname()}' (pid {os.getpid()}" in run.stderr
    assert len(runs[1].stderr.splitlines()) == 1 and CheckpointStore(url).steps() == [50, 60, 100]
    # the owning process's gc shares its claim and leaves the step it is writing
    assert ckpt.gc(url, include_newer=True) == {"uncommitted": [], "committed": [], "kept": [50, 100],
                                                "damaged": {}}
    assert ckpt.commit(plan, sums).endswith("step-00000060")
    store = CheckpointStore(url)
    assert ckpt.verify(url) == [] and store.latest() == 60
    assert ckpt.gc(url, keep_last=1)["committed"] == [50, 100] and intact(url) == [60]
    assert ckpt.read_owner(url)["token"] == own.token
    own.release()
    # a store nobody holds: gc claims it for the call only
    os.makedirs(os.path.join(url, "step-00000070"))
    assert ckpt.gc(url, include_newer=True)["uncommitted"] == [70] and ckpt.read_owner(url) is None


# --------------------------------------------------------- hostile records

@pytest.mark.parametrize("field, value", [
    ("pid", 2**31), ("pid", 2**63 - 1), ("pid", 2**70), ("pid", 0), ("pid", True), ("pid", 1.5),
    ("heartbeat", 253402300799.0), ("started", -1.0), ("lease_s", 0), ("lease_s", 1e9), ("lease_s", "30"),
    ("version", True), ("job", ""), ("host", 7), ("token", "t" * 5000), ("surplus", 1)])
def test_an_owner_record_out_of_range_is_invalid_naming_the_field(tmp_path, field, value):
    """/tmp/attack/owner_attack.py: a record of this host and machine whose pid
    overflowed os.kill; every field is range-checked before it is used."""
    url = str(tmp_path)
    hand_written(url, **{"host": socket.gethostname(), "machine": owner._machine(), field: value})
    for attempt in (lambda: ckpt.save(state(1), url, step=1), lambda: ckpt.gc(url)):
        with pytest.raises(ckpt.InvalidCheckpointError, match="not a loom owner record") as err:
            attempt()
        assert err.value.file == f"{url}/OWNER" and err.value.field == (None if field == "surplus" else field)
    assert CheckpointStore(url).steps() == []


def test_a_restarted_job_reclaims_only_its_own_claim(tmp_path):
    """takeover=<job id>: a live owner record of that very job (its stopped
    attempt's workers) is reclaimed; another job's live claim is refused as
    without takeover; a bad takeover value is a ValueError."""
    url = str(tmp_path / "ck")
    hand_written(url, job="loom train demo [abc]", heartbeat=time.time(), lease_s=30.0)
    with pytest.raises(ckpt.CheckpointOwnershipError, match="job 'loom train demo \\[abc\\]'"):
        owner.claim_store(url, job="loom train other [xyz]", takeover="loom train other [xyz]")
    hold = owner.claim_store(url, job="loom train demo [abc]", takeover="loom train demo [abc]")
    assert ckpt.read_owner(url)["host"] == socket.gethostname()
    hold.release()
    with pytest.raises(ValueError, match="takeover=''"):
        owner.claim_store(url, job="x", takeover="")
