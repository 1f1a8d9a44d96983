import os

import pytest

from loom.comms.testing import WorkerPool

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def _pools():
    pools: dict[int, WorkerPool] = {}
    yield pools
    for pool in pools.values():
        pool.close()


@pytest.fixture
def distributed(_pools):
    """``distributed(fn, world_size, *args, timeout=60)``: run ``fn`` on a
    long-lived pool of initialised gloo workers (restarted after a failure)."""

    def run(fn, world_size, *args, timeout=60, **kwargs):
        pool = _pools.get(world_size)
        if pool is None:
            pool = _pools[world_size] = WorkerPool(world_size)
        return pool.run(fn, *args, timeout=timeout, **kwargs)

    return run
