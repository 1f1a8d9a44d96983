"""`loom train` checkpoints: a resumed run repeats the uninterrupted run's
losses exactly (float64, deterministic data), in-process and through the CLI."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import EventLog

from loom.launch.config import ConfigError, build_config, validate

TINY = {"data": "synthetic", "vocab": 32, "dim": 16, "layers": 2, "heads": 2, "seq_len": 8, "batch_size": 4,
        "dtype": "float64", "lr": 1e-2, "warmup_steps": 2, "progress": False}


def _train(overrides):
    from loom.launch.train import train
    cfg = validate(build_config(overrides=overrides))

    events = EventLog()
    summary = train(cfg, events)
    return summary["losses"], summary.get("extra", {}), events.lines


@pytest.mark.timeout(300)
def test_resume_repeats_the_uninterrupted_losses_exactly(distributed, tmp_path):
    url = str(tmp_path / "ck")
    reference = distributed(_train, 2, {**TINY, "steps": 7}, timeout=240)[0][0]
    # interrupted after step 5 (checkpoints at 2 and 4), resumed from 4
    first, extra, events = distributed(_train, 2, {**TINY, "steps": 5, "ckpt_every": 2, "ckpt_url": url,
                                                   "keep_last": 1, "ckpt_durable": True}, timeout=240)[0]
    assert first == reference[:5] and (extra["start_step"], extra["checkpoints"]) == (0, 2)
    assert extra["ckpt_mode"] == "async" and extra["ckpt_stall_s"] >= 0 and extra["ckpt_persist_s"] > 0
    assert any("step-00000004" in e for e in events)
    from loom.checkpoint import CheckpointStore
    assert CheckpointStore(url).committed_steps() == [4]  # keep_last=1
    resumed, extra, events = distributed(_train, 2, {**TINY, "steps": 7, "ckpt_url": url, "resume": True},
                                         timeout=240)[0]
    assert extra["start_step"] == 4 and "resumed from" in events[0]
    assert resumed == reference[4:]  # bitwise: the same floats
    # resume on one rank (dp=1): model and optimizer reshard, RNG maps by rank
    single, extra, _ = distributed(_train, 1, {**TINY, "steps": 7, "dp": 1, "ckpt_url": url,
                                               "resume": True}, timeout=240)[0]
    assert extra["start_step"] == 4
    assert single == pytest.approx(reference[4:], rel=1e-10, abs=0)
    # --resume with nothing to resume starts from step 0
    fresh, extra, events = distributed(_train, 2, {**TINY, "steps": 2, "ckpt_url": str(tmp_path / "none"),
                                                   "resume": True}, timeout=240)[0]
    assert fresh == reference[:2] and extra["start_step"] == 0 and "starting from step 0" in events[0]


def test_ckpt_options_are_validated():
    with pytest.raises(ConfigError, match="--ckpt-every and --resume need --ckpt-url"):
        validate(build_config(overrides={"ckpt_every": 5}))
    with pytest.raises(ConfigError, match="--keep-last=-1 must be >= 0"):
        validate(build_config(overrides={"keep_last": -1, "ckpt_url": "x"}))
    cfg = validate(build_config(overrides={"ckpt_every": 5, "ckpt_url": "memory://x", "resume": "true",
                                           "dp": 1}))
    assert (cfg.ckpt.ckpt_every, cfg.ckpt.ckpt_url, cfg.ckpt.resume) == (5, "memory://x", True)
    # memory:// lives inside one process: several workers cannot share it (saving or resuming)
    for option in ({"ckpt_every": 5}, {"resume": True}):
        with pytest.raises(ConfigError, match="--ckpt-url=memory://x cannot be shared by 2 workers: "
                                              "memory:// lives inside one process"):
            validate(build_config(overrides={**option, "ckpt_url": "memory://x"}))
    with pytest.raises(ConfigError, match="cannot be shared by 4 workers"):
        validate(build_config(overrides={"ckpt_every": 5, "ckpt_url": "memory://x", "dp": 1}), world_size=4)
    validate(build_config(overrides={"ckpt_every": 5, "ckpt_url": "runs/ck"}))  # a path is fine
    with pytest.raises(ConfigError, match="--ckpt-takeover claims the store for saving: it needs --ckpt-every"):
        validate(build_config(overrides={"ckpt_takeover": True, "ckpt_url": "x", "resume": True}))
    assert validate(build_config(overrides={"ckpt_takeover": True, "ckpt_url": "x",
                                            "ckpt_every": 2})).ckpt.ckpt_takeover


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_loom_train_cli_resume(distributed, tmp_path):
    url = str(tmp_path / "ck")
    reference = distributed(_train, 2, {**TINY, "steps": 6}, timeout=240)[0][0]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "progress"] + ["--no-progress"]

    def run(name, *extra):
        proc = subprocess.run([sys.executable, "-m", "loom", "train", "--name", name, "--runs-dir",
                               str(tmp_path), "--ckpt-url", url, *flags, *extra],
                              capture_output=True, text=True, timeout=280)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(x) for x in lines]
        return proc.stdout, [m for m in rows if m.get("split", "train") == "train"]  # not the final eval's

    out, metrics = run("first", "--steps", "4", "--ckpt-every", "2")
    assert "checkpoint" in out and [m["loss"] for m in metrics] == reference[:4]
    out, metrics = run("second", "--steps", "6", "--resume")
    assert "resumed from" in out
    assert [m["step"] for m in metrics] == [4, 5] and [m["loss"] for m in metrics] == reference[4:]


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_loom_train_twice_on_one_store_the_second_exits_naming_the_owner(tmp_path):
    from loom import checkpoint
    url = str(tmp_path / "ck")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "progress"] + [
        "--no-progress", "--runs-dir", str(tmp_path), "--ckpt-url", url, "--ckpt-every", "5", "--keep-last", "2"]
    with open(tmp_path / "first.log", "w") as log:  # a file: a pipe nobody reads would fill up
        first = subprocess.Popen([sys.executable, "-m", "loom", "train", "--name", "first", "--steps", "1000000",
                                  *flags], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while (record := checkpoint.read_owner(url)) is None:
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.5)
        assert re.fullmatch(r"loom train first \[[0-9a-f]{16}\]", record["job"])  # the name and the job's id
        second = subprocess.run([sys.executable, "-m", "loom", "train", "--name", "second", "--steps", "10",
                                 "--seed", "1", *flags], capture_output=True, text=True, timeout=280)
        assert second.returncode == 1, second.stdout[-3000:] + second.stderr[-3000:]
        assert "CheckpointOwnershipError" in second.stderr
        assert f"is owned by job '{record['job']}' on host '{record['host']}' (pid {record['pid']}" in second.stderr
        assert "restart 1/" not in second.stdout  # a store another job owns is the setup, not a fault: no restart
        assert first.poll() is None  # the owner is not disturbed
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.wait(120)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait(30)
    steps = checkpoint.CheckpointStore(url).committed_steps()
    assert steps and all(checkpoint.verify(url, s) == [] for s in steps)
