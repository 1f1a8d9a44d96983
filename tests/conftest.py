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


@pytest.fixture
def mem():
    """A fresh folder on fsspec's (process-wide) memory filesystem: ``(fs,
    "/<dir>")``; its URLs are ``memory://<dir>/...``.  Removed afterwards."""
    import uuid

    import fsspec
    fs = fsspec.filesystem("memory")
    root = f"/loomtest-{uuid.uuid4().hex}"
    fs.mkdir(root)
    yield fs, root
    fs.rm(root, recursive=True)
