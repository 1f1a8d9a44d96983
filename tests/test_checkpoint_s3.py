"""Checkpoints on a real S3-compatible server (moto's, started by the tests on
127.0.0.1: the ``s3`` fixture in conftest.py): save on two ranks and load
resharded on one, async saves with retention, `loom ckpt verify` and `gc`,
large chunks as multipart uploads, `loom train` saving to s3:// and
resuming with the same losses, the checks made before any worker starts,
and a server that stops in the middle of a run."""
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from loom import checkpoint as ckpt
from loom.checkpoint import object_store
from loom.checkpoint.store import CheckpointStore, data_prefix
from loom.comms.testing import run_distributed
from loom.launch import storage
from loom.launch.config import ConfigError, build_config, validate

TINY = {"data": "synthetic", "vocab": 32, "dim": 16, "layers": 2, "heads": 2, "seq_len": 8, "batch_size": 4,
        "dtype": "float64", "lr": 1e-2, "warmup_steps": 2, "progress": False, "monitor": False}


def _reference() -> dict:
    g = torch.Generator().manual_seed(7)
    return {"w": torch.randn(10, 6, generator=g, dtype=torch.float64),
            "rep": torch.randn(5, generator=g, dtype=torch.float64)}


def _save_on_two_ranks(url: str) -> list:
    rank, ref = dist.get_rank(), _reference()
    rows = [0, 4, 10]
    state = {"model": {"w": ckpt.Shard(ref["w"][rows[rank]:rows[rank + 1]].clone(), (10, 6), (rows[rank], 0)),
                       "rep": ref["rep"].clone()},
             "meta": {"step": 5}}
    location = ckpt.save(state, url, step=5)
    ckpt.release_store(url)
    return [location, CheckpointStore(url).committed_steps()]


@pytest.mark.timeout(180)
def test_two_ranks_save_to_s3_and_one_rank_loads_resharded(s3):
    server, url = s3
    results = run_distributed(_save_on_two_ranks, 2, url, timeout=150, env=server.env)
    assert results == [[f"{url}/step-00000005", [5]]] * 2
    ref = _reference()
    out = {"model": {"w": torch.zeros(10, 6, dtype=torch.float64), "rep": torch.zeros(5, dtype=torch.float64)},
           "meta": {"step": 0}}
    info = ckpt.load(out, url)
    assert (info.step, info.world_size, info.location) == (5, 2, f"{url}/step-00000005")
    assert torch.equal(out["model"]["w"], ref["w"]) and torch.equal(out["model"]["rep"], ref["rep"])
    assert out["meta"] == {"step": 5}
    assert ckpt.verify(url, 5) == []
    # the commit is the marker: the objects under the step are what loom wrote, nothing renamed
    keys = {o["Key"] for o in server.client().list_objects_v2(Bucket=url.split("/")[2])["Contents"]}
    assert {"ckpt/latest", "ckpt/step-00000005/COMMITTED", "ckpt/step-00000005/manifest.json"} <= keys
    assert not any(".tmp" in k for k in keys)


def _loom(*args, env=None):
    return subprocess.run([sys.executable, "-m", "loom", *args], capture_output=True, text=True, timeout=120,
                          env=env or os.environ.copy())


@pytest.mark.timeout(300)
def test_async_saves_retention_verify_and_gc_on_s3(s3):
    server, url = s3
    w = torch.arange(12.0, dtype=torch.float64).reshape(3, 4)
    with ckpt.AsyncCheckpointer(url, keep_last=2) as saver:
        for step in range(1, 5):
            saver.save({"w": w * step, "n": step}, step=step).result(60)
    store = CheckpointStore(url)
    assert store.committed_steps() == [3, 4] and store.latest() == 4
    out = {"w": torch.zeros(3, 4, dtype=torch.float64), "n": 0}
    assert ckpt.load(out, url, step=3).step == 3 and torch.equal(out["w"], w * 3) and out["n"] == 3
    # a torn save (chunks, no marker) below the newest commit: gc deletes it, keeps the commits
    store.put(f"{data_prefix(2)}/w/c/0/0", b"\0" * 96)
    assert store.steps() == [2, 3, 4]
    ok = _loom("ckpt", "verify", url, "--all")
    assert ok.returncode == 0, ok.stderr
    gone = _loom("ckpt", "gc", url, "--keep-last", "1")
    assert gone.returncode == 0, gone.stderr
    assert CheckpointStore(url).steps() == [4]
    # a damaged chunk object (same size, other bytes): verify names it and fails
    key = f"{data_prefix(4)}/w/c/0/0"
    store.put(key, b"\1" * len(store.get(key)))
    bad = _loom("ckpt", "verify", url)
    assert bad.returncode == 1 and "step-00000004" in bad.stdout + bad.stderr


@pytest.mark.timeout(120)
def test_a_chunk_above_the_block_size_goes_up_as_a_multipart_upload(s3):
    server, url = s3
    object_store.use_storage_options(url, {"default_block_size": 5 << 20})  # s3fs's smallest part: 5 MiB
    big = torch.randn(1_500_000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))  # 12 MB
    small = torch.arange(10.0)
    ckpt.save({"big": big, "small": small}, url, step=1)
    manifest, _ = CheckpointStore(url).read_sealed(1)
    assert manifest.tensors["big"].chunks == (1_500_000,)  # one chunk object of 12 MB
    client, bucket = server.client(), url.split("/")[2]

    def etag(array, step=1):
        return client.head_object(Bucket=bucket, Key=f"ckpt/{data_prefix(step)}/{manifest.tensors[array].array}"
                                                 f"/c/0")["ETag"].strip('"')
    # S3's ETag of a multipart upload is <md5 of the parts' md5s>-<number of parts>; s3fs sends what it has
    # buffered as one part (up to 5 GiB) once that passes the block size
    assert re.fullmatch(r"[0-9a-f]{32}-1", etag("big"))
    assert "-" not in etag("small")    # one PUT
    out = {"big": torch.zeros_like(big), "small": torch.zeros_like(small)}
    ckpt.load(out, url)
    assert torch.equal(out["big"], big) and torch.equal(out["small"], small)
    # parts of exactly the block size (the last one shorter): s3fs's fixed_upload_size
    object_store.use_storage_options(url, {"fixed_upload_size": True})
    ckpt.save({"big": big, "small": small}, url, step=2)
    assert re.fullmatch(r"[0-9a-f]{32}-3", etag("big", step=2))  # 5 + 5 + 1.4 MiB


def _job(url: str, **more):
    return build_config(overrides={**TINY, "steps": 4, "ckpt_every": 2, "ckpt_url": url, **more})


@pytest.mark.timeout(120)
def test_validation_names_the_missing_package_credentials_endpoint_or_bucket(s3, monkeypatch, tmp_path):
    server, url = s3
    validate(_job(url))  # reachable: passes
    bucket = url.split("/")[2]
    with pytest.raises(ConfigError, match="bucket 'loom-no-such-bucket' does not exist at http://127.0.0.1"):
        validate(_job("s3://loom-no-such-bucket/ckpt"))
    # storage options in the job config: a wrong endpoint in the environment, the right one in the job
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket is closed
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    with pytest.raises(ConfigError, match=f"cannot reach the S3 endpoint {closed}.*AWS_ENDPOINT_URL"):
        validate(_job(url))
    validate(_job(url, ckpt_storage_options=[f"endpoint_url={server.endpoint}"]))
    with pytest.raises(ConfigError, match="secret would be written to the run directory"):
        validate(_job(url, ckpt_storage_options=[f"endpoint_url={server.endpoint}", "secret=abc"]))
    with pytest.raises(ConfigError, match="no --ckpt-url is given"):
        validate(build_config(overrides={**TINY, "ckpt_storage_options": ["anon=true"]}))
    # no credentials anywhere botocore looks
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=f"s3://{bucket}/ckpt: no AWS credentials.*AWS_ACCESS_KEY_ID"):
        validate(_job(url))
    # s3fs not installed: the extra to install is named
    registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is its mapping)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "s3fs", None)
        m.delitem(registry._registry, "s3", raising=False)
        with pytest.raises(ConfigError, match=r"s3:// needs a package that is not installed: "
                                              r"pip install 'loom-train\[s3\]'"):
            validate(_job(url))
    # checkpoints off: the store is not opened, nothing to check
    validate(build_config(overrides={**TINY, "ckpt_url": url}))


def test_the_drivers_aws_variables_reach_the_workers_for_an_s3_store():
    environ = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "http://e:9000",
               "AWS_PROFILE": "p", "HOME": "/home/x"}
    aws = {k: v for k, v in environ.items() if k.startswith("AWS_")}
    assert storage.worker_env(_job("s3://b/p"), environ) == aws
    assert storage.worker_env(_job("/tmp/ck"), environ) == {}
    assert storage.worker_env(build_config(overrides={"ckpt_url": "s3://b/p"}), environ) == {}  # not used
    assert storage.worker_env(build_config(overrides={"data": "a.bin,s3://b/corpus.bin"}), environ) == aws
    assert storage.worker_env(build_config(overrides={"val_data": "s3://b/val.bin"}), environ) == aws


def _train_runs(runs: list[dict]) -> list:
    from loom.launch.train import train
    out = []
    for overrides in runs:
        cfg = validate(build_config(overrides={**TINY, **overrides}), world_size=dist.get_world_size())
        summary = train(cfg)
        out.append((summary["losses"], summary.get("extra", {}).get("start_step")))
    return out


@pytest.mark.timeout(300)
def test_loom_train_checkpoints_to_s3_and_resumes_with_the_same_losses(s3):
    server, url = s3
    env = {k: v for k, v in server.env.items() if k != "AWS_ENDPOINT_URL"}  # the endpoint: from the job config
    options = [f"endpoint_url={server.endpoint}"]
    runs = [{"steps": 6}]
    for mode in ("async", "sync"):
        runs += [{"steps": 4, "ckpt_every": 2, "keep_last": 1, "ckpt_mode": mode, "ckpt_url": f"{url}/{mode}",
                  "ckpt_storage_options": options},
                 {"steps": 6, "resume": True, "ckpt_url": f"{url}/{mode}", "ckpt_storage_options": options}]
    (reference, _), *saved = run_distributed(_train_runs, 2, runs, timeout=280, env=env)[0]
    for mode, (first, _), (resumed, start) in zip(("async", "sync"), saved[::2], saved[1::2]):
        assert first == reference[:4], mode
        assert start == 4 and resumed == reference[4:], mode  # bitwise: the same floats
        assert CheckpointStore(f"{url}/{mode}").committed_steps() == [4], mode  # keep_last=1


def _train_until_the_server_stops(url: str, server_pid: int) -> dict:
    from loom.launch.train import train

    def stop_server(step):
        if step == 3:  # once step 2 is committed (saved in the background), before the save of step 4
            deadline = time.monotonic() + 60
            while CheckpointStore(url).marker(2) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(server_pid, signal.SIGKILL)
    cfg = validate(build_config(overrides={**TINY, "dp": 1, "steps": 8, "ckpt_every": 2,
                                                 "ckpt_url": url}), world_size=1)
    t0 = time.monotonic()
    try:
        train(cfg, step_hook=stop_server)
    except Exception as exc:  # noqa: BLE001 - what the job would fail with
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - t0}
    return {"error": None}


@pytest.mark.timeout(240)
def test_a_server_that_stops_mid_run_fails_the_job_naming_the_save(s3_server):
    from s3_server import MotoS3
    with MotoS3() as server:  # a server of this test's own: it is killed
        url = f"s3://{server.bucket()}/ckpt"
        out = run_distributed(_train_until_the_server_stops, 1, url, server.proc.pid, timeout=220,
                              env=server.env)[0]
    # as for a failing write to a file:// store: the save's error ends the job (a restart would
    # then resume from the newest commit), naming the step, the store and the endpoint
    assert out["error"] is not None, "training went on although no checkpoint could be written"
    assert "CheckpointSaveError" in out["error"] and "step 4" in out["error"] and url in out["error"]
    assert server.endpoint in out["error"]


def _without_s3fs(tmp_path) -> dict:
    """An environment whose Python cannot import s3fs (a stand-in package
    that raises ImportError, first on the path)."""
    shim = tmp_path / "no_s3fs" / "s3fs"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 's3fs'\")\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.timeout(180)
def test_loom_train_refuses_an_unusable_s3_store_before_any_worker_starts(s3, tmp_path):
    server, url = s3
    base = ["train", "--steps", "4", "--ckpt-every", "2", "--no-progress", "--runs-dir", str(tmp_path / "runs")]
    missing = _loom(*base, "--ckpt-url", "s3://loom-no-such-bucket/run")
    assert missing.returncode == 2, missing.stderr
    assert "bucket 'loom-no-such-bucket' does not exist" in missing.stderr
    assert "workers" not in missing.stdout and not (tmp_path / "runs").exists()  # nothing started
    no_s3fs = _loom(*base, "--ckpt-url", url, env=_without_s3fs(tmp_path))
    assert no_s3fs.returncode == 2 and "pip install 'loom-train[s3]'" in no_s3fs.stderr, no_s3fs.stderr
    # the checkpoint commands and the library say the same
    ls = _loom("ckpt", "ls", url, env=_without_s3fs(tmp_path))
    assert ls.returncode == 1 and "pip install 'loom-train[s3]'" in ls.stderr and len(ls.stderr.splitlines()) == 1


_RAY_SCRIPT = '''
import json, os, sys
import ray
from loom.launch.config import build_config
from loom.launch.ray_driver import launch_ray

def save_from_a_worker(config):  # runs in a Ray worker: only what the driver forwarded points it at the server
    import torch
    from loom import checkpoint as ckpt
    location = ckpt.save({"w": torch.arange(4.0)}, config["url"], step=1)
    ckpt.release_store(config["url"])
    return {"location": location, "env": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}}

if __name__ == "__main__":
    url, aws = sys.argv[1], json.loads(sys.argv[2])
    ray.init(address="local", num_cpus=1, include_dashboard=False)  # its workers inherit no AWS_*
    os.environ.update(aws)  # the driver's configuration, set after Ray started
    cfg = build_config(overrides={"dp": 1, "ckpt_url": url, "ckpt_every": 1, "device": "cpu", "monitor": False,
                                  "max_restarts": 0, "memory_snapshots": False})
    print("RESULT", json.dumps(launch_ray(cfg, train_fn=save_from_a_worker, config={"url": url})[0]))
    ray.shutdown()
'''


@pytest.mark.timeout(240)
def test_the_drivers_aws_configuration_reaches_ray_workers_that_did_not_inherit_it(s3, tmp_path):
    server, url = s3
    script = tmp_path / "driver.py"
    script.write_text(_RAY_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(script), url, json.dumps(server.env)], capture_output=True,
                          text=True, timeout=220, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["location"] == f"{url}/step-00000001"
    assert {k: result["env"].get(k) for k in server.env} == server.env
    out = {"w": torch.zeros(4)}
    ckpt.load(out, url)
    assert torch.equal(out["w"], torch.arange(4.0))


@pytest.mark.timeout(180)
def test_the_writer_process_saves_to_s3_with_this_processs_storage_options(s3, monkeypatch):
    server, url = s3
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint only as a storage option, set in this process
    object_store.use_storage_options(url, {"endpoint_url": server.endpoint})
    w = torch.randn(64, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with ckpt.AsyncCheckpointer(url, writer="process") as saver:
        assert saver.save({"w": w}, step=1).result(120) == f"{url}/step-00000001"
        assert saver.save({"w": w * 2}, step=2).result(120) == f"{url}/step-00000002"
    out = {"w": torch.zeros_like(w)}
    assert ckpt.load(out, url).step == 2 and torch.equal(out["w"], w * 2)
    assert ckpt.verify(url, 1) == [] and ckpt.verify(url, 2) == []


def test_a_chunk_read_from_s3_is_one_ranged_get_and_reports_short_objects(s3):
    import numpy as np

    from loom.checkpoint import zarr_io
    server, url = s3
    store = CheckpointStore(url)
    store.put("a", bytes(range(256)) * 64)  # 16 KiB
    store.put("short", b"\1" * 100)
    store.put("empty", b"")
    since = server.log_offset()
    dest = np.zeros(4096, dtype=np.uint8)
    assert zarr_io.read_raw(store, "a", dest) == 4096 and bytes(dest) == (bytes(range(256)) * 16)
    from s3_server import s3_operation
    assert [s3_operation(m, t) for m, t, _ in server.requests(since)] == ["GetObject"]  # no HEAD first
    assert zarr_io.read_raw(store, "short", dest) == 100 and bytes(dest[:100]) == b"\1" * 100
    assert zarr_io.read_raw(store, "empty", dest) == 0  # S3 refuses the range of an empty object
    assert zarr_io.read_raw(store, "a", dest[:0]) == 0
    with pytest.raises(FileNotFoundError):
        zarr_io.read_raw(store, "missing", dest)
