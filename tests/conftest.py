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


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server for the session (tests/s3_server.py): started on
    127.0.0.1 and a random port, stopped at the end.  Needs the ``test``
    extra (moto[server], s3fs)."""
    pytest.importorskip("moto.server", reason="moto[server] is in the test extra: pip install -e '.[test]'")
    pytest.importorskip("s3fs", reason="s3fs is in the test extra: pip install -e '.[test]'")
    from s3_server import MotoS3
    with MotoS3() as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the session's moto server, and this test's process
    pointed at it: ``AWS_*`` set by monkeypatch (only the server's: every
    other ``AWS_*`` variable removed, instance metadata off, so nothing can
    reach AWS) and fsspec's config and s3fs's instance cache emptied; both
    undone afterwards.  Yields ``(server, "s3://<bucket>/ckpt")``."""
    import copy

    import fsspec.config
    from s3fs import S3FileSystem
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in {**s3_server.env, "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(fsspec.config, "conf", copy.deepcopy(fsspec.config.conf))
    S3FileSystem.clear_instance_cache()
    url = f"s3://{s3_server.bucket()}/ckpt"
    yield s3_server, url
    from loom.checkpoint import release_store
    release_store(url)
    S3FileSystem.clear_instance_cache()
