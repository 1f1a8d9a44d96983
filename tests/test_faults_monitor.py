"""Online fault detection on 4 gloo ranks with injected faults.

Each test runs a small synchronous job (a gradient-sized and a loss-sized
all-reduce per step, optionally a ring exchange) on a process group with a
60 s timeout, monitored by a `StoreAggregator` in the test process, and
checks what the aggregator published and when."""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist

from loom import comms
from loom.comms.testing import WorkerError, run_distributed
from loom.faults import Injector, Monitor, StoreAggregator

WORLD = 4


def _job(address, secret, steps, plan, ring=False, mark=None):
    """Run ``steps`` monitored steps with the injection ``plan``; a fatal fault
    published by the aggregator releases an injected hang."""
    rank = dist.get_rank()
    group = dist.new_group(list(range(WORLD)), timeout=datetime.timedelta(seconds=60))
    comms.register_group(group, "job")
    injector = Injector(plan, rank, group=group)
    unchecked = any(i.kind == "mismatch" for i in injector.plan)
    if unchecked:  # as on NCCL: on gloo loom.comms would refuse the mismatched collective itself
        comms.set_collective_checks("off")
    monitor = Monitor(address, secret=secret, on_fatal=lambda fault: injector.release()).start()
    grad, loss = torch.ones(256), torch.ones(1)
    left, right = (rank - 1) % WORLD, (rank + 1) % WORLD
    buf = torch.empty(1024)
    step = 0
    try:
        for step in range(steps):
            comms.set_step(step)
            if mark and any(i.kind == "kill" and i.rank == rank and i.step == step for i in injector.plan):
                with open(mark, "w") as fh:
                    fh.write(repr(time.monotonic()))
            injector.at_step(step)
            if ring:
                comms.wait_all([comms.isend(torch.full((1024,), float(rank)), right, group),
                                comms.irecv(buf, left, group)])
                assert buf[0].item() == left
            torch.mm(torch.ones(32, 32), torch.ones(32, 32))  # a little compute
            comms.all_reduce(grad, "avg", group)
            comms.all_reduce(loss, "sum", group)
    finally:
        comms.set_step(None)
        monitor.stop()
        injector.close()
        if unchecked:
            comms.set_collective_checks(os.environ.get("LOOM_CHECK_COLLECTIVES", "auto"))
    return {"steps": step + 1, "log": injector.log, "fatal": monitor.fatal}


def _run(distributed, steps, plan, ring=False, timeout=120):
    with StoreAggregator(WORLD) as agg:
        out = distributed(_job, WORLD, agg.address, agg.secret, steps, plan, ring, timeout=timeout)
    return agg, out


def _kinds(faults):
    return [(f.kind, f.ranks) for f in faults]


@pytest.mark.timeout(300)
def test_clean_run_of_300_steps_raises_no_fault(distributed):
    agg, out = _run(distributed, 300, "")
    assert agg.faults == [] and agg.error is None
    assert all(o["steps"] == 300 for o in out)
    assert agg.aggregator.all_departed()


@pytest.mark.timeout(300)
def test_straggler_flagged_within_3_steps_naming_only_it(distributed):
    agg, out = _run(distributed, 16, "straggler:rank=2,delay=0.2,from=10")
    assert _kinds(agg.faults) == [("straggler", (2,))], agg.faults
    fault = agg.faults[0]
    assert fault.step <= 12, fault          # the 3rd delayed step completes the evidence ...
    assert agg.aggregator.entries[0]["seen_step"] <= 14  # ... published while the job was that far
    assert fault.group == "job" and fault.seqs and fault.score > 1
    assert [s for kind, s, _ in out[2]["log"]] == list(range(10, 16))


@pytest.mark.timeout(300)
def test_slow_link_reported_as_the_link(distributed):
    agg, out = _run(distributed, 14, "slow_link:src=1,dst=2,delay=0.05,from=4", ring=True)
    assert [(f.kind, f.ranks, f.link) for f in agg.faults] == [("slow_link", (), (1, 2))], agg.faults
    assert "link 1->2 is slow" in agg.faults[0].evidence


@pytest.mark.timeout(300)
def test_hang_detected_within_5s_naming_the_rank(distributed):
    agg, out = _run(distributed, 12, "hang:rank=3,step=8")
    assert _kinds(agg.faults) == [("hang", (3,))], agg.faults
    fault = agg.faults[0]
    assert fault.group == "job" and fault.step == 8 and "rank 3 never entered" in fault.evidence
    (kind, step, hung_at), = out[3]["log"]
    assert (kind, step) == ("hang", 8)
    assert agg.detected_at[fault.key] - hung_at <= 5.0   # the group's timeout is 60 s
    assert all(o["fatal"] == fault for o in out)          # every rank's monitor saw the verdict


@pytest.mark.timeout(300)
def test_mismatch_reported_with_sequence_number_and_rank(distributed):
    agg, out = _run(distributed, 10, "mismatch:rank=1,step=7")
    assert _kinds(agg.faults) == [("mismatch", (1,))], agg.faults
    fault = agg.faults[0]
    assert fault.seqs == (14,) and fault.group == "job" and fault.step == 7  # 2 all-reduces per step
    assert "rank 1 issued a different collective" in fault.evidence and "float32[2, 2]" in fault.evidence


@pytest.mark.timeout(300)
def test_killed_rank_reported_lost_within_2s(tmp_path):
    mark = str(tmp_path / "killed_at")
    with StoreAggregator(WORLD) as agg:
        with pytest.raises(WorkerError, match="rank 3 died"):
            run_distributed(_job, WORLD, agg.address, agg.secret, 30, "kill:rank=3,step=8", False, mark,
                            timeout=240)
        killed_at = float(open(mark).read())
        deadline = time.monotonic() + 10
        while not agg.faults and time.monotonic() < deadline:
            time.sleep(0.05)
    first = agg.faults[0]
    assert (first.kind, first.ranks) == ("lost_rank", (3,)), agg.faults
    assert agg.detected_at[first.key] - killed_at <= 2.0
    assert "rank 3 lost" in first.evidence
    assert os.path.exists(mark)
