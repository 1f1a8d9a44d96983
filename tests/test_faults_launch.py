"""Fault monitoring in `loom train`: the [faults] options, `loom faults report`,
and end-to-end runs with injected faults through Ray."""
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from ray import exceptions as ray_exceptions

from loom.faults import Fault, LogWriter
from loom.launch.cli import main
from loom.launch.config import ConfigError, build_config, validate
from loom.launch.fault_watch import detect_config


@pytest.mark.parametrize("overrides,needle", [
    ({"inject": "straggler:rank=9,delay=0.1"}, "--inject: injection straggler:rank=9.*rank 9 is outside 0..1"),
    ({"inject": "freeze:rank=0"}, "--inject: injection 'freeze:rank=0': unknown kind 'freeze'"),
    ({"stop_on": "hang,typo"}, r"--stop-on: unknown fault kind\(s\) \['typo'\]"),
    ({"straggler_k": 5}, "need 1 <= --straggler-k=5 <= --straggler-n=4"),
    ({"fault_warmup_steps": -1}, "--fault-warmup-steps=-1 must be >= 0"),
    ({"monitor_interval": 0}, "--monitor-interval=0.0 must be > 0"),
])
def test_bad_fault_options_are_named(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(build_config(overrides=overrides))


def test_fault_options_reach_the_detector():
    cfg = validate(build_config(overrides={"hang_floor_s": 3.5, "fault_warmup_steps": 2, "straggler_n": 6,
                                           "inject": "kill:rank=1,step=3"}))
    d = detect_config(cfg.faults)
    assert (d.hang_floor_s, d.warmup_steps, d.straggler_n) == (3.5, 2, 6)
    assert cfg.faults.monitor and cfg.faults.stop_on == "hang,lost_rank"


def test_faults_report_timeline_and_png(tmp_path, capsys):
    log = LogWriter(str(tmp_path))
    fault = Fault("straggler", (2,), None, "world", (20, 22, 24), 6.1, "rank 2 arrived late", 12)
    log.write({"faults": [{**fault.to_dict(), "t": 1.5, "seen_step": 13}],
               "waits": [{"step": u, "wait_s": {"0": 0.2 if u >= 10 else 0.01, "1": 0.01},
                          "step_s": {"0": 0.25, "1": 0.25}} for u in range(30)]})
    log.close()
    png = tmp_path / "waits.png"
    assert main(["faults", "report", str(tmp_path), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "2 ranks, steps 0-29, 1 fault" in out
    assert "straggler  rank 2" in out and "rank 2 arrived late" in out
    assert "rank   0" in out and "rank   1" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"IHDR" in data[:16] and data.endswith(b"IEND\xaeB`\x82")
    assert main(["faults", "report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _loom(*args, timeout=280):
    return subprocess.run([sys.executable, "-m", "loom", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_loom_train_reports_a_straggler_live(tmp_path):
    proc = _loom("train", "--steps", "30", "--name", "strag", "--runs-dir", str(tmp_path), "--no-progress",
                 "--inject", "straggler:rank=1,delay=0.2,from=10")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "strag"
    faults = [json.loads(x) for x in (run / "faults.jsonl").read_text().splitlines()]
    # (the 3-step bound is tested on 4 ranks; here a heavily loaded machine may blur one step)
    assert [(f["kind"], f["ranks"]) for f in faults] == [("straggler", [1])], proc.stdout[-3000:]
    assert 12 <= faults[0]["step"] <= 14
    assert "[fault] straggler: rank 1 arrived late in " in proc.stdout
    waits = [json.loads(x) for x in (run / "waits.jsonl").read_text().splitlines()]
    assert [w["step"] for w in waits] == list(range(30))
    report = _loom("faults", "report", str(run), "--png", str(tmp_path / "w.png"))
    assert report.returncode == 0 and "straggler  rank 1" in report.stdout
    assert (tmp_path / "w.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_loom_train_stops_every_worker_on_a_hang_naming_the_rank(tmp_path):
    proc = _loom("train", "--steps", "200", "--name", "hang", "--runs-dir", str(tmp_path), "--no-progress",
                 "--pg-timeout", "300", "--inject", "hang:rank=1,step=15")
    ended = datetime.datetime.now()
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    # (the op is whichever collective of the step rank 1 never reached: all_reduce, agree, ...)
    assert re.search(r"loom train: stopped all 2 workers after a hang: rank 1 never entered [\w:]+ #\d+ of group "
                     r"world \(step 15\)", proc.stderr), proc.stderr[-3000:]
    faults = [json.loads(x) for x in (tmp_path / "hang" / "faults.jsonl").read_text().splitlines()]
    assert [(f["kind"], f["ranks"], f["step"]) for f in faults] == [("hang", [1], 15)]
    # detected and stopped within seconds, far from the 300 s process-group timeout
    detected = datetime.datetime.fromisoformat(faults[0]["time"])
    assert (ended - detected).total_seconds() < 20, (detected, ended)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_torchrun_ranks_stop_on_the_authenticated_verdict(tmp_path):
    """Under torchrun rank 0 hosts the aggregator and sends its address and
    the job's secret by broadcast; every rank acts on the sealed verdict."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = dict(os.environ, LOOM_JOB_SECRET="a-job-secret-of-some-length")
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "loom.launch.worker",
                           "--steps", "60", "--name", "tr", "--runs-dir", str(tmp_path), "--no-progress",
                           "--pg-timeout", "200", "--inject", "hang:rank=1,step=10"],
                          capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode != 0
    # (the first rank to stop ends the job: torchrun then terminates the other)
    assert re.search(r"loom: rank \d: stopping: hang: rank 1 never entered [\w:]+ #\d+ of group world \(step 10\)",
                     proc.stderr), proc.stderr[-3000:]
    faults = [json.loads(x) for x in (tmp_path / "tr" / "faults.jsonl").read_text().splitlines()]
    assert (faults[0]["kind"], faults[0]["ranks"], faults[0]["step"]) == ("hang", [1], 10)
    waits = [json.loads(x) for x in (tmp_path / "tr" / "waits.jsonl").read_text().splitlines()]
    assert waits and all(set(w["wait_s"]) == {"0", "1"} for w in waits)  # rank 1's reports got through too


class _Ref:
    def __init__(self, after, outcome):
        self.ready_at, self.outcome = time.monotonic() + after, outcome


class _FakeRay:
    """Just enough of `ray` for the driver's supervision: futures that settle
    at set times with a value or an error."""
    exceptions = ray_exceptions

    @staticmethod
    def wait(refs, num_returns=1, timeout=None):
        deadline = time.monotonic() + (timeout or 0)
        while True:
            ready = [r for r in refs if time.monotonic() >= r.ready_at][:num_returns]
            if ready or time.monotonic() >= deadline:
                return ready, [r for r in refs if r not in ready]
            time.sleep(0.005)

    @staticmethod
    def get(ref, timeout=None):
        if isinstance(ref.outcome, BaseException):
            raise ref.outcome
        return ref.outcome


class _Watch:
    """A monitor that names rank 0 lost once told its process ended."""

    def __init__(self):
        self.told = None

    def poll(self):
        return None

    def explain(self, dead=()):
        self.told = list(dead)
        return Fault("lost_rank", (0,), None, None, (), math.inf, "rank 0 lost: its process is gone") \
            if 0 in self.told else None


def test_a_dead_rank_is_named_before_the_peer_it_broke(monkeypatch):
    from loom.launch import ray_driver
    monkeypatch.setattr(ray_driver, "ray", _FakeRay)
    closed = ray_exceptions.RayTaskError("run", "", ConnectionError("Connection closed by peer"))

    def futures():  # rank 1's error arrives first; rank 0's death is seen 0.3 s later
        return [_Ref(0.3, ray_exceptions.ActorDiedError()), _Ref(0.0, closed)]

    with pytest.raises(ray_driver.LaunchError) as err:
        ray_driver._supervise(futures(), None, None)
    assert str(err.value) == ("rank 0 died: its worker process ended; "
                              "then rank 1 failed: ConnectionError: Connection closed by peer")
    watch = _Watch()
    with pytest.raises(ray_driver.LaunchError) as err:
        ray_driver._supervise(futures(), None, None, watch)
    assert watch.told == [0]
    assert str(err.value) == ("stopped all 2 workers after a lost rank: rank 0 lost: its process is gone; "
                              "then rank 1 failed: ConnectionError: Connection closed by peer")
    with pytest.raises(ray_driver.LaunchError, match=r"^rank 1 failed: ConnectionError"):  # nobody died
        ray_driver._supervise([_Ref(5.0, {}), _Ref(0.0, closed)], None, None, grace=0.2)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_loom_train_names_the_rank_that_died_first(tmp_path):
    # without the monitor, so that the driver's own supervision must tell the
    # dead rank from the peer whose connection it broke (with it, the monitor
    # names rank 0 lost as well: the unit test above covers both)
    proc = _loom("train", "--steps", "20", "--name", "kill0", "--runs-dir", str(tmp_path), "--no-progress",
                 "--no-monitor", "--pg-timeout", "120", "--inject", "kill:rank=0,step=0")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("loom train: "))
    assert re.match(r"loom train: rank 0 died: its worker process ended \(pid \d+\)($|; then rank 1 failed: )",
                    line), line


_SLOW_WRITE = '''\
import os, sys
if os.environ.get("LOOM_TEST_SLOW_WRITE"):  # "rank,seconds": that rank's first chunk write sleeps
    import importlib.abc, importlib.util, time

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "loom.checkpoint.zarr_io":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(mod):
                run(mod)
                real, slept = mod.write_raw, []
                rank, secs = os.environ["LOOM_TEST_SLOW_WRITE"].split(",")

                def write_raw(*args):
                    if not slept and os.environ.get("RANK") == rank:
                        slept.append(1)
                        time.sleep(float(secs))
                    return real(*args)
                mod.write_raw = write_raw
            spec.loader.exec_module = exec_module
            return spec
    sys.meta_path.insert(0, _Hook())
'''


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_loom_train_survives_a_slow_checkpoint_write_as_a_background_stall(tmp_path):
    """Rank 1's first chunk write takes 5 s: the host pool (two snapshots)
    fills, rank 1's optimizer step waits for its snapshot while rank 0 waits
    in the loss all-reduce.  That is the checkpoint holding training up, not
    a hang: reported, and the job completes."""
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(_SLOW_WRITE)
    env = dict(os.environ, LOOM_TEST_SLOW_WRITE="1,5",
               PYTHONPATH=os.pathsep.join(filter(None, [str(patch), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "loom", "train", "--steps", "20", "--name", "slow",
                           "--runs-dir", str(tmp_path), "--no-progress", "--ckpt-every", "3",
                           "--ckpt-url", str(tmp_path / "ckpt"),
                           # host-memory snapshots hold every rank's pool region through the commit, which waits
                           # for rank 1's slow write: then both ranks stall on their snapshots and no one-rank
                           # stall is there to name (the job still completes); this test is about naming one
                           "--no-memory-snapshots"],
                          capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    faults = [json.loads(x) for x in (tmp_path / "slow" / "faults.jsonl").read_text().splitlines()]
    assert not [f for f in faults if f["kind"] in ("hang", "lost_rank")], faults
    held = [f for f in faults if f["kind"] == "background_stall" and f["group"] == "world"]
    assert held and held[0]["ranks"] == [1], (faults, proc.stdout[-3000:])
    assert re.search(r"rank 1 never entered \S+ #\d+ of group world \(step \d+\): rank 0 has waited \d+\.\d s "
                     r"\(threshold \d+\.\d s\); rank 1 (is waiting|waited \d+\.\d s) for background work "
                     r"\(wait:snapshot on background group ckpt-snapshot\[0,1\]\)", held[0]["evidence"]), held
    assert "[fault] background_stall: rank 1 never entered" in proc.stdout
    assert (tmp_path / "ckpt" / "step-00000018").is_dir()


def _lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_faults_report_skips_malformed_lines_and_escapes_what_it_prints(tmp_path, capsys):
    evil = "rank 1 \x1b[2J\x1b]0;pwned\x07late\nforged line \u202egnp.exe \x9b31m"
    good = {**Fault("straggler", (1,), None, "world", (5,), 2.0, evil, 7).to_dict(), "t": 1.0}
    _lines(tmp_path / "faults.jsonl", [
        {"kind": "hang"},                              # no evidence
        "not json",
        "[" * 100_000,                                 # too deep for the parser
        '"a string"',
        {**good, "ranks": "1"},
        {**good, "kind": "\x1b[31mhang"},              # not a fault kind
        {**good, "t": "soon"},
        good,
    ])
    _lines(tmp_path / "waits.jsonl", [
        {"step": 1},                                   # no wait_s
        {"step": 2, "wait_s": {"a": 0.1}},
        {"step": 3, "wait_s": {"0": "slow"}},
        {"step": 5, "wait_s": {"0": -1, "1": 0.1}},    # a negative wait
        {"step": 9, "wait_s": {"0": 0.3, "1": 0.1}},   # out of order, with a gap
        {"step": 4, "wait_s": {"0": 0.1, "1": 0.1}},
        {"step": 4, "wait_s": {"0": 0.2, "1": 0.1}},   # repeated: the last one counts
    ])
    assert main(["faults", "report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\x9b" not in out
    assert "2 ranks, steps 4-9, 1 fault" in out
    assert "skipped 12 malformed lines: faults.jsonl:1: no 'evidence' text; faults.jsonl:2: not JSON" in out
    row = next(x for x in out.splitlines() if "straggler" in x)
    assert row.endswith("rank 1 \\x1b[2J\\x1b]0;pwned\\x07late\\nforged line \\u202egnp.exe \\x9b31m")
    assert "forged line" not in out.replace(row, "")  # the evidence stays on its own line
    from loom.faults.report import read_run
    log = read_run(str(tmp_path))
    assert [w["step"] for w in log.waits] == [4, 9] and log.waits[0]["wait_s"] == {0: 0.2, 1: 0.1}
    assert log.skipped[2] == "faults.jsonl:3: JSON nested too deeply"
    assert log.skipped[5].startswith("faults.jsonl:6: kind '\\x1b[31mhang' is not one of ")
    assert log.skipped[-1] == "waits.jsonl: step 4 repeated (the last line kept)"
    png = tmp_path / "w.png"
    assert main(["faults", "report", str(tmp_path), "--png", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("make,needle", [
    (lambda d: None, "does not exist"),
    (lambda d: d.write_text("x"), "is not a directory"),
    (lambda d: (d.mkdir(), (d / "faults.jsonl").mkdir()), "faults.jsonl: not a regular file"),
    (lambda d: (d.mkdir(), os.mkfifo(d / "waits.jsonl")), "waits.jsonl: not a regular file"),
    (lambda d: d.mkdir(), "has no faults.jsonl or waits.jsonl"),
])
@pytest.mark.timeout(30)  # an unguarded FIFO would block the read for good
def test_faults_report_says_in_one_line_why_it_cannot_read_a_run(tmp_path, capsys, make, needle):
    run = tmp_path / "run\x1b[31m"
    make(run)
    assert main(["faults", "report", str(run)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and needle in captured.err, captured.err
    assert captured.err.count("\n") == 1 and "\x1b" not in captured.err and "Traceback" not in captured.err


def test_faults_report_cannot_write_its_png_in_one_line(tmp_path, capsys):
    LogWriter(str(tmp_path)).close()  # empty logs: a report with no steps
    assert main(["faults", "report", str(tmp_path), "--png", str(tmp_path / "no" / "such" / "w.png")]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and err.count("\n") == 1


def test_a_late_monitor_answer_is_a_warning_not_the_jobs_failure(monkeypatch, caplog):
    """On an overloaded machine the monitor actor may answer a poll late:
    the driver warns and asks again instead of failing the job with a traceback."""
    import logging

    import ray

    from loom.launch.fault_watch import DriverWatch

    class _Actor:
        class poll:
            @staticmethod
            def remote(final):
                return "ref"

    def late(ref, timeout=None):
        raise ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready.")

    watch = DriverWatch.__new__(DriverWatch)
    watch.actor, watch.log, watch.stopping, watch.faults = _Actor(), None, None, []
    monkeypatch.setattr(ray, "get", late)
    with caplog.at_level(logging.WARNING, logger="loom.launch"):
        assert watch.poll(timeout=0.1) is None
        assert watch.poll(timeout=0.1, final=True) is None
    assert "did not answer" in caplog.text and "last report is lost" in caplog.text
