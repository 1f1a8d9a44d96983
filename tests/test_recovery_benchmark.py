"""The recovery benchmark's pure helpers (benchmarks/recovery.py): goodput
from a run's metrics rows, a restart's cost from its record, and the
injection log it times faults by.  No Ray, no timing assertions."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import recovery  # noqa: E402

from loom.faults import inject  # noqa: E402


def _rows():
    """A 6-step job killed at step 4 and resumed from the step-2 checkpoint
    (steps 2 and 3 redone), with an eval row and a torn last line."""
    rows = [{"step": s, "loss": 1.0, "step_time_s": 1.0, "attempt": 0} for s in range(4)]
    rows.append({"step": 3, "split": "eval", "eval_loss": 1.0, "attempt": 0})
    rows += [{"step": s, "loss": 1.0, "step_time_s": 2.0, "attempt": 1} for s in range(2, 6)]
    return rows


def test_goodput_counts_each_step_once_from_the_attempt_that_completed_it_last(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()) + '{"step": 6, "lo')
    rows = recovery.read_jsonl(str(path))
    assert len(rows) == 9  # the torn line is skipped
    hist = recovery.final_history(rows)
    assert sorted(hist) == list(range(6)) and [hist[s]["attempt"] for s in range(6)] == [0, 0, 1, 1, 1, 1]
    g = recovery.goodput(rows, wall_s=20.0, steps=6)
    assert g == {"useful_s": 2 * 1.0 + 4 * 2.0, "wall_s": 20.0, "goodput": 0.5, "steps": 6, "redone": 2}
    # a later row of an older attempt never replaces a newer attempt's
    late = rows + [{"step": 5, "step_time_s": 9.0, "attempt": 0}]
    assert recovery.final_history(late)[5]["step_time_s"] == 2.0
    with pytest.raises(ValueError, match="no row for 1 of its 7 steps \\(first: 6\\)"):
        recovery.goodput(rows, wall_s=20.0, steps=7)
    with pytest.raises(ValueError, match="wall_s=0"):
        recovery.goodput(rows, wall_s=0)


def test_a_restarts_cost_from_its_record():
    record = {"attempt": 1, "cause": {"kind": "hang", "rank": 1, "evidence": "x"}, "failed_at_step": 24,
              "resumed_step": 20, "steps_lost": 4, "fault_time": "2026-11-30T17:00:00", "recovery_s": 4.5}
    cost = recovery.fault_cost(100.0, 102.25, record)
    assert cost == {"detection_s": 2.25, "recovery_s": 4.5, "to_next_step_s": 6.75, "steps_lost": 4,
                    "resumed_step": 20, "tier": "storage", "cause": "hang (rank 1)"}
    assert recovery.fault_cost(100.0, 101.0, {**record, "reload": {"tier": "peer_memory"}})["tier"] == "peer_memory"
    unknown = recovery.fault_cost(None, 101.0, {**record, "recovery_s": None})
    assert unknown["detection_s"] is None and unknown["to_next_step_s"] is None
    assert recovery.fault_cost(1.0, 2.0, None)["tier"] is None  # no restart: nothing served a reload


def test_the_line_that_names_a_fault_and_the_injection_plans():
    lines = [(1.0, "checkpoint /x/step-00000020 (stall 1 ms)"), (2.0, "[fault] straggler: rank 0 late"),
             (3.0, "[fault] hang: rank 1 never entered all_reduce #40"),
             (3.1, "restart 1/2 after a hang: rank 1 ..."), (9.0, "restart 2/2 after a lost rank: ...")]
    assert recovery.first_named(lines, 1.5) == 3.0
    assert recovery.first_named(lines, 5.0) == 9.0
    assert recovery.first_named(lines, 10.0) is None
    lines += [(4.0, "attempt 1: rank 0 on node ab12, rank 1 on node ab12"),
              (5.5, "resumed from ck/step-00000020 (saved by 2 ranks): step 20")]
    assert recovery.phases(lines, 3.0, 4.0) == {"placed": 1.0, "loaded": 2.5, "first_step": 4.0}
    assert recovery.phases(lines, None, None) == {"placed": None, "loaded": None, "first_step": None}
    plan = recovery.kill_plan([100, 200])
    assert plan == "kill:rank=1,step=100;kill:rank=1,step=200,attempts=2"
    # the second kill is armed in the attempt that reaches step 200 (attempt 1), the first only in attempt 0
    assert [[i.step for i in inject.Injector(plan, 1, attempt=a).plan] for a in (0, 1, 2)] == [[100, 200], [200], []]
    compute = inject.parse(recovery.compute_plan(0.25))
    assert [(i.kind, i.rank, i.delay, i.attempts) for i in compute] == [("straggler", 0, 0.25, None),
                                                                        ("straggler", 1, 0.25, None)]


def test_the_injection_log_records_the_moment_a_one_off_fault_fires(tmp_path, monkeypatch):
    path = tmp_path / "inject.jsonl"
    monkeypatch.setenv(inject.LOG_ENV, str(path))
    injector = inject.Injector("hang:rank=1,step=3,duration=0;straggler:rank=1,delay=0,attempts=all", 1, attempt=0)
    for step in range(5):
        injector.at_step(step)
    (line,) = recovery.read_jsonl(str(path))  # the straggler (every step) is not logged
    assert {k: line[k] for k in ("kind", "rank", "step", "attempt")} == {"kind": "hang", "rank": 1, "step": 3,
                                                                         "attempt": 0}
    assert isinstance(line["time"], float)
    monkeypatch.delenv(inject.LOG_ENV)
    injector.at_step(3)
    assert len(recovery.read_jsonl(str(path))) == 1  # without the variable nothing is written
