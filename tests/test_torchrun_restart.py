"""torchrun --max-restarts: a restarted attempt reconnects and resumes exactly.

The cause of the old failure: torchrun's agent keeps one TCPStore for every
attempt, and torch's env:// rendezvous does not prefix keys with the attempt,
so a restarted rank could read the dead attempt's gloo addresses
(connectFullMesh: Connection refused).  `loom.comms.elastic` prefixes them.
"""
from __future__ import annotations

import datetime
import glob
import json
import multiprocessing as mp
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from loom.comms import elastic
from loom.faults import inject


# ------------------------------------------------------------ the cause, unit

def _join_and_leave(rank: int, port: int, attempt: int, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT=str(attempt))
    try:
        elastic.init_process_group_from_env("gloo", datetime.timedelta(seconds=20))
        group = dist.new_group([0, 1])  # the group init_mesh's new_group failed on
        import torch
        t = torch.ones(1)
        dist.all_reduce(t, group=group)
        dist.destroy_process_group()
        out.put((rank, float(t)))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        out.put((rank, repr(exc)))


def _attempt(port: int, attempt: int) -> list:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_join_and_leave, args=(r, port, attempt, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(10)
    return results


@pytest.mark.timeout(90)
def test_attempts_write_disjoint_keys_in_the_agents_store():
    """Two attempts over one store (as torchrun's agent keeps it): every key an
    attempt writes - the default group's and new_group's gloo addresses - is
    under its own prefix, so attempt 1 never reads attempt 0's."""
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    assert _attempt(agent.port, 0) == [(0, 2.0), (1, 2.0)]
    first = set(agent.list_keys())
    assert _attempt(agent.port, 1) == [(0, 2.0), (1, 2.0)]
    second = set(agent.list_keys()) - first
    p0, p1 = elastic.attempt_prefix(0, 2), elastic.attempt_prefix(1, 2)
    assert first and second
    assert all(k.startswith(p0 + "/") for k in first), sorted(first)
    assert all(k.startswith(p1 + "/") for k in second), sorted(second)
    # the same names below the prefix: without it attempt 1 would have read attempt 0's values
    assert {k[len(p0):] for k in first} & {k[len(p1):] for k in second}


def test_attempt_from_the_environment():
    assert elastic.elastic_attempt({}) == 0
    assert elastic.elastic_attempt({"TORCHELASTIC_RESTART_COUNT": "2"}) == 2
    with pytest.raises(ValueError, match="TORCHELASTIC_RESTART_COUNT='x'"):
        elastic.elastic_attempt({"TORCHELASTIC_RESTART_COUNT": "x"})
    assert elastic.attempt_prefix(0, 2) != elastic.attempt_prefix(1, 2) != elastic.attempt_prefix(1, 4)
    assert elastic.uses_agent_store({"TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert not elastic.uses_agent_store({})


# ------------------------------------------------- attempt-aware injection

def test_injections_fire_in_the_first_attempt_unless_told():
    once, every, two = inject.parse("kill:rank=1,step=12;hang:rank=0,step=3,attempts=all;"
                                    "straggler:rank=1,delay=0.1,attempts=2")
    assert (once.attempts, every.attempts, two.attempts) == (1, None, 2)
    assert [i.fires_in(0) for i in (once, every, two)] == [True, True, True]
    assert [i.fires_in(1) for i in (once, every, two)] == [False, True, True]
    assert [i.fires_in(2) for i in (once, every, two)] == [False, True, False]
    assert str(once) == "kill:rank=1,step=12" and inject.parse(str(every)) == [every]
    assert inject.parse(str(two)) == [two]
    for bad in ("kill:rank=1,step=1,attempts=0", "kill:rank=1,step=1,attempts=some"):
        with pytest.raises(ValueError, match="attempts="):
            inject.parse(bad)
    first = inject.Injector("kill:rank=1,step=12;straggler:rank=1,delay=0,attempts=all", rank=1)
    again = inject.Injector("kill:rank=1,step=12;straggler:rank=1,delay=0,attempts=all", rank=1, attempt=1)
    assert [i.kind for i in first.plan] == ["kill", "straggler"]
    assert [i.kind for i in again.plan] == ["straggler"] and [i.kind for i in again.skipped] == ["kill"]
    again.at_step(12)  # the kill is not armed in attempt 1: this process lives on
    with pytest.raises(ValueError, match="attempt=-1"):
        inject.Injector("", rank=0, attempt=-1)


def test_resume_auto_on_the_command_line_and_in_toml(tmp_path):
    import argparse

    from loom.launch.config import ConfigError, add_config_arguments, config_from_args, load_config
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    for argv, want in (([], False), (["--resume"], True), (["--resume", "auto"], True),
                       (["--resume", "true"], True), (["--resume", "false"], False), (["--no-resume"], False)):
        assert config_from_args(parser.parse_args(argv + ["--ckpt-url", "x"])).ckpt.resume is want, argv
    job = tmp_path / "job.toml"
    job.write_text('[ckpt]\nckpt_url = "x"\nresume = "auto"\n')
    assert load_config(str(job)).ckpt.resume is True
    job.write_text('[ckpt]\nckpt_url = "x"\nresume = true\n')
    assert load_config(str(job)).ckpt.resume is True
    with pytest.raises(ConfigError, match="resume='maybe'"):
        config_from_args(parser.parse_args(["--resume", "maybe"]))


# ------------------------------------------- one run directory per job

def _cfg(tmp_path, steps: int = 20):
    from loom.launch.config import JobConfig
    cfg = JobConfig()
    cfg.job.runs_dir, cfg.train.steps = str(tmp_path / "runs"), steps
    return cfg


def _open(cfg, attempt: int, **kw):
    from loom.launch.config import to_toml
    from loom.launch.recorder import open_torchrun_run
    return open_torchrun_run(cfg, cfg.train.steps, False, {"config.toml": to_toml(cfg)}, attempt=attempt, **kw)


def test_later_attempts_find_the_jobs_run_directory(tmp_path, caplog):
    """The rule: attempt 0 names its directory in torchrun's agent store
    (one per job); without a store, the directory marked with the job's
    TORCHELASTIC_RUN_ID; never another job's directory."""
    from loom.comms.elastic import torchrun_job_id
    from loom.launch.recorder import find_job_run_dir
    assert torchrun_job_id({}) is None and torchrun_job_id({"TORCHELASTIC_RUN_ID": "none"}) is None
    assert torchrun_job_id({"TORCHELASTIC_RUN_ID": "job42"}) == "job42"
    cfg = _cfg(tmp_path)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=10))
    first = _open(cfg, 0, store=store, job_id="job42")
    first.finish({"steps": 1})
    again = _open(cfg, 1, store=store, job_id="job42")
    assert again.run_dir == first.run_dir  # through the store
    assert find_job_run_dir(cfg.job.runs_dir, None, "job42") == first.run_dir  # through the mark
    other = _open(cfg, 0, job_id="other")  # another job in the same runs directory
    assert other.run_dir != first.run_dir
    assert find_job_run_dir(cfg.job.runs_dir, None, "job42") == first.run_dir
    assert _open(cfg, 1, job_id="other").run_dir == other.run_dir
    # nothing names the job: a fresh directory, and the log says why
    with caplog.at_level("WARNING", logger="loom.launch"):
        lone = _open(cfg, 1)
    assert lone.run_dir not in (first.run_dir, other.run_dir) and "cannot find the run directory" in caplog.text
    # the store names a directory of a different config: not appended to
    changed = _cfg(tmp_path, steps=30)
    caplog.clear()
    with caplog.at_level("WARNING", logger="loom.launch"):
        fresh = _open(changed, 1, store=store, job_id="job42")
    assert fresh.run_dir != first.run_dir and "config.toml differs" in caplog.text
    assert store.get("loom/run_dir").decode() == os.path.abspath(fresh.run_dir)  # attempt 2 appends there


def test_restart_record_from_the_reopened_directory(tmp_path):
    """Attempt 1 reads what attempt 0 left in metrics.jsonl (a torn last row
    too) and writes one restart record, in the Ray side's format, at its
    first step; rows carry ``attempt``; the summary has the restarts."""
    from loom.launch.recovery import torchrun_attempt
    cfg = _cfg(tmp_path)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=10))
    rec0 = _open(cfg, 0, store=store)
    t0 = torchrun_attempt(rec0, 0, max_restarts=2)
    for step in range(7):
        t0.step({"step": step, "loss": 1.0})
    t0.step({"step": 6, "split": "eval", "eval_loss": 1.0})
    rec0.metrics.write('{"step": 7, "lo')  # killed mid-row
    rec0.metrics.close()
    rec1 = _open(cfg, 1, store=store)
    t1 = torchrun_attempt(rec1, 1, max_restarts=2, resumed=5)
    assert rec1.run_dir == rec0.run_dir and rec1.restarts == []
    for step in range(5, 9):
        t1.step({"step": step, "loss": 1.0})
    rec1.finish({"steps": 9})
    with open(os.path.join(rec0.run_dir, "metrics.jsonl")) as fh:
        lines = fh.read().splitlines()
    rows = [json.loads(line) for line in lines if line != '{"step": 7, "lo']
    assert len(rows) == len(lines) - 1  # the next attempt's rows start on a line of their own
    assert [(r["attempt"], r["step"]) for r in rows if "loss" in r] == \
        [(0, s) for s in range(7)] + [(1, s) for s in range(5, 9)]
    (record,) = _rows(rec0.run_dir, "restarts.jsonl")
    assert set(record) == {"attempt", "cause", "failed_at_step", "resumed_step", "steps_lost", "fault_time",
                           "recovery_s"}  # the Ray side's fields
    assert (record["attempt"], record["failed_at_step"], record["resumed_step"], record["steps_lost"]) == \
        (1, 7, 5, 2)
    assert record["cause"]["kind"] == "worker_exited" and record["recovery_s"] >= 0
    with open(os.path.join(rec0.run_dir, "summary.json")) as fh:
        assert json.load(fh)["restarts"] == [record]
    # attempt 2 keeps attempt 1's record in its summary
    rec2 = _open(cfg, 2, store=store)
    assert rec2.restarts == [record]
    rec2.metrics.close()


# ------------------------------------------------------------ end to end

_JOB = ["--steps", "20", "--data", "synthetic", "--dim", "16", "--layers", "1", "--heads", "2", "--seq-len", "16",
        "--batch-size", "4", "--dtype", "float64", "--no-progress", "--eval-every", "0", "--pg-timeout", "30"]


def _torchrun(tmp_path, name: str, max_restarts: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(max_restarts), "-m", "loom.launch.worker", *_JOB,
           "--runs-dir", str(tmp_path / "runs"), "--name", name, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)


def _losses(run_dirs) -> dict[int, float]:
    """step -> loss over the attempts' run directories, the later attempt's
    value where a step was run twice."""
    out = {}
    for run_dir in run_dirs:
        with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
            for line in fh:
                row = json.loads(line)
                if "loss" in row and "step" in row:
                    out[row["step"]] = row["loss"]
    return out


@pytest.mark.timeout(120)
def test_torchrun_restart_resumes_with_the_uninterrupted_losses(tmp_path):
    """torchrun --max-restarts 1, rank 1 killed at step 12, checkpoints every
    5: one restart, resumed at step 10 with --resume auto, exit 0, and the
    losses from step 10 on equal an uninterrupted run's (float64)."""
    ref = _torchrun(tmp_path, "ref", 0, "--no-monitor")
    assert ref.returncode == 0, ref.stderr[-3000:]
    ckpt = str(tmp_path / "ckpt")
    run = _torchrun(tmp_path, "job", 1, "--no-monitor", "--ckpt-every", "5", "--ckpt-mode", "sync",
                    "--ckpt-url", ckpt, "--resume", "auto", "--inject", "kill:rank=1,step=12")
    assert run.returncode == 0, run.stderr[-3000:]
    said = run.stdout + run.stderr
    assert "resumed from" in said and "step-00000010" in said, said[-3000:]
    assert "connectFullMesh" not in said
    dirs = glob.glob(str(tmp_path / "runs" / "job*"))
    assert len(dirs) == 1, dirs  # attempt 1 appended to attempt 0's run directory
    rows = _rows(dirs[0], "metrics.jsonl")
    steps = {a: [r["step"] for r in rows if r.get("attempt") == a] for a in (0, 1)}
    assert steps[0] == list(range(12)) and steps[1] == list(range(10, 20)), steps  # the kill hit step 12 once
    assert len(rows) == 22
    second = {r["step"]: r["loss"] for r in rows if r["attempt"] == 1}
    want = _losses(glob.glob(str(tmp_path / "runs" / "ref*")))
    for step in range(10, 20):
        assert second[step] == pytest.approx(want[step], rel=0, abs=1e-10), step
    restarts = _rows(dirs[0], "restarts.jsonl")
    assert len(restarts) == 1, restarts
    rec = restarts[0]
    assert (rec["attempt"], rec["resumed_step"], rec["failed_at_step"], rec["steps_lost"]) == (1, 10, 12, 2), rec
    assert rec["cause"]["kind"] == "worker_exited" and rec["cause"]["rank"] is None
    assert 0 < rec["recovery_s"] < 60 and rec["fault_time"]
    with open(os.path.join(dirs[0], "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["restarts"] == restarts and summary["extra"]["restarts"] == 1
    assert "restarts" in run.stdout  # the printed summary


def _rows(run_dir: str, name: str) -> list[dict]:
    with open(os.path.join(run_dir, name)) as fh:
        return [json.loads(line) for line in fh]


def test_a_restarted_attempt_reclaims_its_jobs_claim_made_on_another_host(tmp_path):
    """Across hosts, the stopped attempt's claim cannot be judged dead by its
    pid: the restarted attempt reclaims it by the job's torchrun run id at
    once instead of waiting for its 30 s lease; another job's live claim, and
    attempt 0 of the same run id, are refused."""
    import time

    from loom import checkpoint as ckpt
    from loom.checkpoint import owner
    from loom.checkpoint.store import CheckpointStore
    from loom.launch.checkpointing import claim_identity
    cfg = _cfg(tmp_path)
    url = str(tmp_path / "ck")
    env0 = {"TORCHELASTIC_RUN_ID": "job42", "TORCHELASTIC_RESTART_COUNT": "0"}
    env1 = {**env0, "TORCHELASTIC_RESTART_COUNT": "1"}
    job, takeover = claim_identity(cfg, env0)
    assert job.endswith("[job42]") and takeover is False
    assert claim_identity(cfg, env1) == (job, job)
    assert claim_identity(cfg, {"TORCHELASTIC_RESTART_COUNT": "1"})[1] is False  # no id: no takeover
    now = time.time()
    record = {"format": owner.FORMAT, "version": owner.VERSION, "job": job, "host": "another-host", "pid": 1,
              "machine": "m", "token": "t" * 32, "started": now, "heartbeat": now, "lease_s": 30.0}
    CheckpointStore(url).put(owner.OWNER, json.dumps(record).encode())
    with pytest.raises(ckpt.CheckpointOwnershipError, match="another-host"):
        owner.claim_store(url, job=job, takeover=takeover)  # attempt 0 of the same id: refused
    hold = owner.claim_store(url, job=job, takeover=claim_identity(cfg, env1)[1])
    hold.release()
    record["job"] = "loom train [job7]"
    CheckpointStore(url).put(owner.OWNER, json.dumps(record).encode())
    with pytest.raises(ckpt.CheckpointOwnershipError, match="job7"):
        owner.claim_store(url, job=job, takeover=claim_identity(cfg, env1)[1])
