"""`loom train` end to end through Ray and through torchrun (a few steps)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import train_rows

pytestmark = [pytest.mark.e2e]


def _check_run(run_dir, steps):
    assert (run_dir / "config.toml").exists()
    metrics = train_rows(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(steps))
    assert all(m["loss"] > 0 and m["tokens_per_s"] > 0 for m in metrics)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["final_loss"] == metrics[-1]["loss"]


@pytest.mark.timeout(300)
def test_loom_train_through_ray(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "loom", "train", "--steps", "4", "--name", "ray-e2e",
         "--runs-dir", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "final loss" in proc.stdout and "tokens/s" in proc.stdout
    _check_run(tmp_path / "ray-e2e", 4)


@pytest.mark.timeout(300)
def test_missing_gpus_fail_fast_with_advice(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "loom", "train", "--steps", "2", "--device", "cuda",
         "--runs-dir", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode == 1
    assert "--device=cuda needs 2 GPUs (2 workers) but this machine has 0; use --device cpu" in proc.stderr


@pytest.mark.timeout(300)
def test_loom_worker_under_torchrun(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(f'[job]\nname = "tr"\nruns_dir = "{tmp_path}"\nprogress = false\n[train]\nsteps = 3\n')
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "loom.launch.worker",
         "--config", str(job)], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_run(tmp_path / "tr", 3)
