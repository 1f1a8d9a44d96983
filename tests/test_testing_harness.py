"""run_distributed and WorkerPool: results, errors with ranks, timeouts."""
import os
import time

import pytest
import torch.distributed as dist

from loom.comms.testing import WorkerError, WorkerPool, run_distributed


def _rank_times(k):
    return dist.get_rank() * k


def _fail_on(rank):
    if dist.get_rank() == rank:
        raise KeyError("no such thing")
    dist.barrier()  # the others block here until killed


def _hang_on(rank):
    if dist.get_rank() == rank:
        time.sleep(3600)
    return dist.get_rank()


def _hang_after_start(rank):
    """The hanging rank hangs only once every rank has started (a barrier),
    so a slow start-up on a loaded machine cannot be mistaken for the hang."""
    dist.barrier()
    return _hang_on(rank)


def _die_on(rank):
    if dist.get_rank() == rank:
        os._exit(3)
    dist.barrier()


@pytest.mark.timeout(60)
def test_returns_values_in_rank_order():
    assert run_distributed(_rank_times, 3, 5) == [0, 5, 10]


@pytest.mark.timeout(60)
def test_worker_exception_names_rank():
    with pytest.raises(KeyError, match="rank 2") as info:
        run_distributed(_fail_on, 3, 2, timeout=30)
    assert info.value.rank == 2
    assert "no such thing" in info.value.remote_traceback


@pytest.mark.timeout(60)
def test_hung_worker_is_killed_at_timeout():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish within 20s"):
        run_distributed(_hang_after_start, 2, 1, timeout=20)
    assert time.monotonic() - t0 < 40


@pytest.mark.timeout(60)
def test_silently_dead_worker_is_reported():
    with pytest.raises(WorkerError, match="rank 1 died with exit code 3"):
        run_distributed(_die_on, 2, 1, timeout=30)


@pytest.mark.timeout(120)
def test_pool_recovers_after_failure_and_timeout():
    with WorkerPool(2) as pool:
        assert pool.run(_rank_times, 2) == [0, 2]
        with pytest.raises(KeyError, match="rank 0"):
            pool.run(_fail_on, 0, timeout=30)
        with pytest.raises(TimeoutError, match=r"ranks \[0\]"):
            pool.run(_hang_on, 0, timeout=5)
        assert pool.run(_rank_times, 3) == [0, 3]
