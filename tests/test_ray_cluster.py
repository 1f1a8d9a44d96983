"""Launching on a Ray cluster started the way Ray's documentation shows
(`ray start --head`), with token authentication on as Ray turns it on by
itself; a plain run beside it; and a job the cluster cannot hold.

The head is this test module's own (a random port, a temporary session
directory and HOME); it is stopped by ending its process group, never with
`ray stop`, which would end every Ray instance on the machine."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import pytest

from loom.launch import cluster
from loom.launch.config import ConfigError, build_config, validate

pytestmark = [pytest.mark.e2e]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head` with nothing but a token in ~/.ray/auth_token (as a
    local `ray.init()` leaves behind): Ray then turns token authentication on."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    port = _free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start", "--head",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp_dir}", "--block"],
        env=_clean_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "home": home}
    finally:  # this head's processes only: its process group (Ray would drain for 30 s after SIGTERM)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


_DRIVER = '''
import json, os, sys
import loom, loom.launch

def train_fn(config):
    import torch
    from loom import comms
    total = comms.all_reduce(torch.ones(1), op="sum").item()
    loom.launch.report({"loss": total})
    return {"loom": loom.__file__, "secret": os.environ.get("LOOM_TEST_SECRET"), "total": total}

if __name__ == "__main__":
    result = loom.launch.run(train_fn, workers=2, address=sys.argv[1], env=["LOOM_TEST_SECRET"],
                             runs_dir=sys.argv[2], name="joined", progress=False)
    print("RESULT", json.dumps([(r["loom"], r["secret"], r["total"]) for r in result.returns]))
'''


@pytest.mark.timeout(300)
def test_join_a_cluster_started_with_ray_start(head, tmp_path):
    """No RAY_AUTH_MODE anywhere: loom uses the token as `ray start` did
    (before, this failed with InvalidAuthToken); loom travels to the workers
    as a py_modules package; --env reaches them."""
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    env = _clean_env(head["home"]) | {"LOOM_TEST_SECRET": "k3y"}
    proc = subprocess.run([sys.executable, str(script), head["address"], str(tmp_path / "runs")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    ranks = json.loads(line[len("RESULT "):])  # data, never code
    assert len(ranks) == 2
    for loom_file, secret, total in ranks:
        assert "runtime_resources" in loom_file and "py_modules" in loom_file, loom_file  # the shipped copy
        assert (secret, total) == ("k3y", 2.0)
    assert "k3y" not in (tmp_path / "runs" / "joined" / "config.json").read_text()


def _loom(*args, env, timeout=280):
    return subprocess.run([sys.executable, "-m", "loom", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.timeout(200)
def test_a_job_the_cluster_cannot_hold_fails_at_once(head, tmp_path):
    env = _clean_env(head["home"])
    start = time.monotonic()
    proc = _loom("train", "--address", head["address"], "--dp", "4", "--steps", "2", "--runs-dir", str(tmp_path),
                 "--no-progress", "--start-timeout", "600", env=env, timeout=180)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the Ray cluster can hold 2 of the 4 workers (CPU 1 each): node 0: CPU 2" in proc.stderr, proc.stderr
    proc = _loom("train", "--address", head["address"], "--cpus-per-worker", "3", "--steps", "2",
                 "--runs-dir", str(tmp_path), "--no-progress", "--start-timeout", "600", env=env, timeout=180)
    assert proc.returncode == 1
    assert "no node of the Ray cluster can hold a worker (CPU 3 each" in proc.stderr, proc.stderr
    assert time.monotonic() - start < 170  # not the 600 s start timeout


@pytest.mark.timeout(300)
def test_a_plain_run_starts_its_own_instance_beside_a_cluster(head, tmp_path):
    """RAY_ADDRESS names the running cluster; a plain `loom train` still
    starts its own instance (before: 'When connecting to an existing cluster,
    num_cpus and num_gpus must not be provided')."""
    env = _clean_env(head["home"]) | {"RAY_ADDRESS": head["address"]}
    proc = _loom("train", "--steps", "3", "--name", "own", "--runs-dir", str(tmp_path), "--no-progress", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Started a local Ray instance" in proc.stderr
    assert json.loads((tmp_path / "own" / "summary.json").read_text())["steps"] == 3


def test_capacity_check_counts_bundles_per_node():
    two_nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 2.0}]
    cluster.check_capacity({"CPU": 2.0}, 3, two_nodes)  # 2 + 1 fit
    with pytest.raises(cluster.LaunchError, match="can hold 3 of the 4 workers"):
        cluster.check_capacity({"CPU": 2.0}, 4, two_nodes)
    with pytest.raises(cluster.LaunchError, match=r"no node .* \(CPU 1, GPU 2 each; a worker runs on one node\)"):
        cluster.check_capacity({"CPU": 1.0, "GPU": 2.0}, 1, two_nodes)


def test_ray_client_address_needs_the_cluster_extra(monkeypatch):
    real = cluster.importlib.util.find_spec
    monkeypatch.setattr(cluster.importlib.util, "find_spec",
                        lambda name, *a: None if name == "grpc" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--address=ray://head:10001 connects through Ray Client, which needs "
                                          r"the ray\[client\] extra \(grpcio\): pip install 'loom-train\[cluster\]'"):
        validate(build_config(overrides={"address": "ray://head:10001"}))
    validate(build_config(overrides={"address": "head:6379"}))  # a GCS address needs no extra


def test_bad_or_dead_addresses_fail_at_once():
    for address in ("localhost", "http://head:8265", "head:port"):
        with pytest.raises(ConfigError, match="must be host:port, ray://host:port or auto"):
            validate(build_config(overrides={"address": address}))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(cluster.LaunchError, match=f"nothing answers at --address=127.0.0.1:{port}"):
        cluster.connect(f"127.0.0.1:{port}", 2)
    assert time.monotonic() - start < 30  # Ray alone retries for minutes
