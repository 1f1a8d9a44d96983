"""`loom train --max-restarts`: a failed attempt is restarted from the newest
committed checkpoint; a fault that repeats stops with the original error."""
import json
import re
import subprocess
import sys

import pytest

from loom.faults.inject import Injector, parse
from loom.launch.cluster import LaunchError
from loom.launch.config import ConfigError, build_config, max_restarts, validate
from loom.launch.recovery import AttemptRecorder, Recovery

TINY = ["--dp", "2", "--data", "synthetic", "--dim", "16", "--layers", "1", "--seq-len", "16", "--batch-size", "4",
        "--dtype", "float64", "--steps", "20", "--eval-every", "0", "--no-progress"]


# ------------------------------------------------------------------ no Ray

def test_max_restarts_defaults_to_three_with_checkpoints_and_is_validated():
    assert max_restarts(validate(build_config())) == 0
    assert max_restarts(validate(build_config(overrides={"ckpt_every": 5, "ckpt_url": "x"}))) == 3
    assert max_restarts(validate(build_config(overrides={"ckpt_every": 5, "ckpt_url": "x",
                                                         "max_restarts": "0"}))) == 0
    with pytest.raises(ConfigError, match=r"--max-restarts=-2 must be >= 0"):
        validate(build_config(overrides={"max_restarts": -2}))


def test_injections_fire_in_the_attempts_they_name():
    plan = parse("kill:rank=1,step=12;hang:rank=0,step=3,attempts=2;straggler:rank=1,delay=0.1,attempts=all")
    assert [str(i) for i in parse(";".join(str(i) for i in plan))] == [str(i) for i in plan]  # round trip
    assert [[i.kind for i in Injector(plan, 0, attempt=a).plan] for a in (0, 1, 2)] == \
        [["kill", "hang", "straggler"], ["hang", "straggler"], ["straggler"]]
    for bad, needle in (("kill:rank=1,step=2,attempts=0", "attempts='0' must be 'all' or a positive integer"),
                        ("kill:rank=1,step=2,attempts=x", "attempts='x' must be 'all' or a positive integer")):
        with pytest.raises(ValueError, match=needle):
            parse(bad)


class _Recorder:
    run_dir = None

    def __init__(self):
        self.events, self.rows, self.restarts = [], [], []

    def event(self, text):
        self.events.append(text)

    def step(self, row):
        self.rows.append(row)

    def restart(self, record):
        self.restarts.append(record)


def _fail(recovery, recorder, last_step, kind="exception", rank=1, text="rank 1 failed: ValueError: boom"):
    tracker = recovery.begin()
    if last_step is not None:
        tracker.step({"step": last_step, "loss": 1.0})
    cause = ValueError("boom")
    err = LaunchError(text, rank=rank, kind=kind, remote_traceback="Traceback ...\nValueError: boom")
    err.__cause__ = cause
    recovery.failed(err, tracker)


def test_a_fault_that_repeats_at_the_same_step_stops_with_the_first_error():
    cfg = validate(build_config(overrides={"max_restarts": 5}))  # no checkpoints: restarts start at 0
    rec = _Recorder()
    recovery = Recovery(cfg, rec)
    _fail(recovery, rec, 11)
    assert recovery.attempt == 1 and recovery.job_dict()["ckpt"]["resume"] is False
    with pytest.raises(LaunchError) as err:
        _fail(recovery, rec, 11, text="rank 1 failed: ValueError: boom again")
    assert str(err.value).startswith("rank 1 failed: ValueError: boom (the same exception of rank 1 at step 12 "
                                     "in attempts 0 and 1")
    assert err.value.remote_traceback.endswith("ValueError: boom") and err.value.rank == 1
    assert isinstance(err.value.__cause__, ValueError)
    assert [r["attempt"] for r in rec.restarts] == [1]  # one restart
    assert rec.restarts[0]["resumed_step"] == 0 and rec.restarts[0]["steps_lost"] == 12
    assert rec.restarts[0]["recovery_s"] >= 0
    assert rec.events[0] == ("restart 1/5 after an exception: rank 1 failed: ValueError: boom, at step 12; "
                             "resuming from step 0")


def test_the_budget_ends_restarts_with_the_original_error():
    cfg = validate(build_config(overrides={"max_restarts": 2}))
    rec = _Recorder()
    recovery = Recovery(cfg, rec)
    _fail(recovery, rec, 3)
    recovery.begin().step({"step": 0})  # the new attempt's first step completes its record
    assert rec.restarts[0]["recovery_s"] is not None and rec.restarts[0]["steps_lost"] == 4
    _fail(recovery, rec, 5, kind="hang", rank=0, text="stopped all 2 workers after a hang: rank 0 never entered x")
    with pytest.raises(LaunchError, match=r"^rank 1 failed: ValueError: boom \(gave up after 2 restarts; the "
                                          r"last attempt's: rank 1 failed"):
        _fail(recovery, rec, None)
    assert [r["cause"]["kind"] for r in rec.restarts] == ["exception", "hang"]
    assert rec.restarts[1]["recovery_s"] is None  # its attempt failed before a step
    assert rec.restarts[1]["cause"]["evidence"] == "rank 0 never entered x"
    # --max-restarts 0: the error itself, as before
    recovery = Recovery(validate(build_config()), rec)
    tracker = recovery.begin()
    err = LaunchError("rank 1 died: its worker process ended", rank=1, kind="died")
    with pytest.raises(LaunchError) as raised:
        recovery.failed(err, tracker)
    assert raised.value is err


def test_rows_carry_their_attempt_only_when_restarts_are_possible():
    rec = _Recorder()
    AttemptRecorder(rec, 2, tag=True).step({"step": 4})
    AttemptRecorder(rec, 0, tag=False).step({"step": 4})
    assert rec.rows == [{"step": 4, "attempt": 2}, {"step": 4}]


# ------------------------------------------------------------------ loom train under Ray

def _loom(*args, timeout=150):
    return subprocess.run([sys.executable, "-m", "loom", "train", *TINY, *args], capture_output=True, text=True,
                          timeout=timeout)


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_a_killed_rank_is_restarted_from_the_newest_checkpoint_with_the_same_losses(tmp_path):
    ckpt = ["--ckpt-every", "5", "--ckpt-mode", "sync", "--runs-dir", str(tmp_path)]
    ref = _loom(*ckpt, "--ckpt-url", str(tmp_path / "ref-ck"), "--name", "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = _loom(*ckpt, "--ckpt-url", str(tmp_path / "ck"), "--name", "kill", "--inject", "kill:rank=1,step=12")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"restart 1/3 after a (lost rank|died): rank 1 .*, at step 12; resuming from step 10",
                     proc.stdout), proc.stdout[-3000:]
    run = tmp_path / "kill"
    restarts = [json.loads(x) for x in (run / "restarts.jsonl").read_text().splitlines()]
    assert len(restarts) == 1
    r = restarts[0]
    assert (r["attempt"], r["cause"]["rank"], r["failed_at_step"], r["resumed_step"], r["steps_lost"]) == \
        (1, 1, 12, 10, 2)
    assert 0 < r["recovery_s"] < 120
    summary = json.loads((run / "summary.json").read_text())
    assert summary["restarts"] == restarts and summary["extra"]["start_step"] == 10
    rows = _rows(run)
    assert [x["step"] for x in rows if x["attempt"] == 0] == list(range(12))
    assert [x["step"] for x in rows if x["attempt"] == 1] == list(range(10, 20))  # steps 10, 11 redone
    reference = {x["step"]: x["loss"] for x in _rows(tmp_path / "ref")}
    for x in rows:
        assert x["loss"] == pytest.approx(reference[x["step"]], abs=1e-10, rel=0), x


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_a_hung_rank_is_restarted_on_warmed_spares_from_host_memory_with_the_same_losses(tmp_path):
    """A hang (the monitor names it; the driver stops every worker) composed
    with spares and the host-memory tier: both ranks move to warmed spares,
    the hung rank's bundle is retired, the reload is served from memory, and
    every loss equals the uninterrupted run's."""
    ckpt = ["--ckpt-every", "5", "--runs-dir", str(tmp_path)]  # async checkpoints (the default)
    ref = _loom(*ckpt, "--ckpt-url", str(tmp_path / "ref-ck"), "--name", "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = _loom(*ckpt, "--ckpt-url", str(tmp_path / "ck"), "--name", "hang", "--spare-workers", "2",
                 "--inject", "hang:rank=1,step=12")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [r] = [json.loads(x) for x in (tmp_path / "hang" / "restarts.jsonl").read_text().splitlines()]
    assert (r["cause"]["kind"], r["cause"]["rank"], r["failed_at_step"]) == ("hang", 1, 12), r
    assert r["resumed_step"] in (5, 10) and r["steps_lost"] == 12 - r["resumed_step"]
    assert r["isolated"][0]["retired"] is True and r["isolated"][0]["replaced_by"] == "spare"
    assert sorted(r["bundles"]) == [2, 3]  # both ranks on the warmed spares
    assert r["reload"]["tier"] == "memory" and r["reload"]["bytes"]["storage"] == 0, r["reload"]
    reference = {x["step"]: x["loss"] for x in _rows(tmp_path / "ref")}
    rows = _rows(tmp_path / "hang")
    assert [x["step"] for x in rows if x["attempt"] == 1] == list(range(r["resumed_step"], 20))
    for x in rows:
        assert x["loss"] == pytest.approx(reference[x["step"]], abs=1e-10, rel=0), x


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_a_fault_in_every_attempt_stops_with_the_original_error_and_zero_restarts_keeps_todays_behaviour(tmp_path):
    proc = _loom("--ckpt-every", "5", "--ckpt-mode", "sync", "--ckpt-url", str(tmp_path / "ck"), "--runs-dir",
                 str(tmp_path), "--name", "every", "--inject", "kill:rank=1,step=7,attempts=all")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("loom train: "))
    assert "rank 1" in line and "(the same " in line and "at step 7 in attempts 0 and 1" in line, line
    restarts = (tmp_path / "every" / "restarts.jsonl").read_text().splitlines()
    assert len(restarts) == 1 and json.loads(restarts[0])["resumed_step"] == 5
    # --max-restarts 0: stopped at the first fault, as before
    proc = _loom("--ckpt-every", "5", "--ckpt-url", str(tmp_path / "ck0"), "--runs-dir", str(tmp_path),
                 "--name", "zero", "--max-restarts", "0", "--inject", "kill:rank=1,step=7")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("loom train: "))
    assert "rank 1" in line and "(the same" not in line and "gave up" not in line, line
    assert "restart" not in proc.stdout and not (tmp_path / "zero" / "restarts.jsonl").exists()
    assert all("attempt" not in row for row in _rows(tmp_path / "zero"))
