"""Learning-rate schedules (`loom.launch.schedule`): values at known steps,
the LambdaLR that runs them, validation, and resume mid-schedule."""
import math

import pytest
import torch

from loom.launch.config import ConfigError, build_config, validate
from loom.launch.schedule import LRSchedule, lambda_lr, restore


def lrs(schedule, steps):
    return [schedule.lr_at(s) for s in range(steps)]


def test_warmup_then_constant():
    s = LRSchedule("constant", lr=1.0, warmup_steps=4, total_steps=10, min_lr=0.5)
    assert lrs(s, 6) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # the last warm-up step is the peak
    assert s.lr_at(1000) == 1.0  # constant ignores min_lr and the end
    assert LRSchedule("constant", lr=2.0, warmup_steps=0).lr_at(0) == 2.0  # no warm-up: peak at once


def test_cosine_peak_midpoint_and_floor():
    s = LRSchedule("cosine", lr=1.0, warmup_steps=2, total_steps=12, min_lr=0.1)
    assert lrs(s, 2) == [0.5, 1.0]
    # decay from the peak step (1) to the last step (11): 10 steps
    for step in range(1, 12):
        done = (step - 1) / 10
        assert s.lr_at(step) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)), abs=1e-15)
    assert s.lr_at(6) == pytest.approx(0.55, abs=1e-15)  # halfway: the mean of peak and floor
    assert s.lr_at(11) == pytest.approx(0.1, abs=1e-15)  # the last step runs at min_lr
    assert s.lr_at(50) == pytest.approx(0.1, abs=1e-15)  # and stays there
    assert all(a >= b for a, b in zip(lrs(s, 20)[1:], lrs(s, 20)[2:]))  # monotone after the peak


def test_linear_decay():
    s = LRSchedule("linear", lr=2.0, warmup_steps=0, total_steps=5, min_lr=0.0)
    assert lrs(s, 6) == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0, 0.0], abs=1e-15)


def test_wsd_phases():
    s = LRSchedule("wsd", lr=1.0, warmup_steps=2, total_steps=20, min_lr=0.2, wsd_decay_frac=0.2)
    assert (s.decay_steps, s.decay_start) == (4, 16)
    values = lrs(s, 21)
    assert values[:2] == [0.5, 1.0]                      # warm-up
    assert values[2:16] == [1.0] * 14                    # stable
    assert values[16:20] == pytest.approx([0.8, 0.6, 0.4, 0.2], abs=1e-15)  # linear decay to min_lr
    assert values[20] == pytest.approx(0.2, abs=1e-15)   # the floor


def test_settings_and_changes():
    s = LRSchedule("cosine", lr=1e-3, warmup_steps=5, total_steps=100, min_lr=1e-5)
    assert s.settings() == {"kind": "cosine", "lr": 1e-3, "warmup_steps": 5, "total_steps": 100, "min_lr": 1e-5}
    assert s.changes(s.settings()) == []
    longer = LRSchedule("cosine", lr=1e-3, warmup_steps=5, total_steps=200, min_lr=1e-5)
    assert longer.changes(s.settings()) == ["--steps 100 -> 200"]
    # a constant schedule does not depend on --steps or --min-lr: extending a run changes nothing
    c = LRSchedule("constant", lr=1e-3, warmup_steps=5, total_steps=100)
    assert LRSchedule("constant", lr=1e-3, warmup_steps=5, total_steps=300, min_lr=1e-4).changes(c.settings()) == []
    assert s.changes(c.settings()) == ["--lr-schedule constant -> cosine", "--min-lr (unset) -> 1e-05",
                                       "--steps (unset) -> 100"]


def test_lambda_lr_follows_the_schedule_and_restore_continues_it():
    s = LRSchedule("wsd", lr=0.1, warmup_steps=3, total_steps=10, min_lr=0.01, wsd_decay_frac=0.3)
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = lambda_lr(opt, s)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == lrs(s, 12)  # bitwise: LambdaLR multiplies the same factor
    # a fresh optimizer + scheduler loaded from the state dicts of step 6 continues exactly
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    sched2 = lambda_lr(opt2, s)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    ref = lambda_lr(ref_opt, s)
    for _ in range(6):
        ref_opt.step()
        ref.step()
    opt2.load_state_dict(ref_opt.state_dict())
    sched2.load_state_dict(ref.state_dict())
    assert restore(sched2, s) == s.lr_at(6) == opt2.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="not the schedule's peak lr"):
        lambda_lr(torch.optim.SGD([w], lr=0.5), s)


@pytest.mark.parametrize("kw, needle", [
    ({"kind": "step"}, "--lr-schedule='step' must be one of constant, cosine, linear, wsd"),
    ({"min_lr": 2.0}, r"--min-lr=2.0 must be in \[0, --lr=1.0\]"),
    ({"min_lr": -1.0}, "--min-lr=-1.0 must be in"),
    ({"wsd_decay_frac": 0.0}, r"--wsd-decay-frac=0.0 must be in \(0, 1\]"),
    ({"kind": "wsd", "warmup_steps": 8, "wsd_decay_frac": 0.5},
     "the decay phase .* would start at step 5, inside the --warmup-steps=8"),
])
def test_bad_schedules_are_refused(kw, needle):
    with pytest.raises(ValueError, match=needle):
        LRSchedule(**{"lr": 1.0, "total_steps": 10, **kw})


def test_schedule_options_are_validated_in_the_config():
    cfg = validate(build_config(overrides={"lr_schedule": "cosine", "min_lr": 1e-4, "steps": 50}))
    assert (cfg.train.lr_schedule, cfg.train.min_lr) == ("cosine", 1e-4)
    with pytest.raises(ConfigError, match="--lr-schedule='exp' must be one of"):
        validate(build_config(overrides={"lr_schedule": "exp"}))
    with pytest.raises(ConfigError, match="--min-lr=0.1 must be in"):
        validate(build_config(overrides={"min_lr": 0.1, "lr": 0.01}))
    with pytest.raises(ConfigError, match="--eval-batches=0 must be >= 1"):
        validate(build_config(overrides={"eval_batches": 0}))


# ------------------------------------------------------ resume mid-schedule

TINY = {"data": "synthetic",
        "vocab": 32, "dim": 16, "layers": 2, "heads": 2, "seq_len": 8, "batch_size": 4, "dtype": "float64",
        "lr": 1e-2, "warmup_steps": 2, "progress": False, "dp": 1, "lr_schedule": "cosine", "min_lr": 1e-3,
        "steps": 8}


class Rows:
    def __init__(self):
        self.rows, self.lines = [], []

    def step(self, metrics):
        self.rows.append(metrics)

    def event(self, text):
        self.lines.append(text)


def _train(overrides):
    from loom.launch.train import train
    rows = Rows()
    train(validate(build_config(overrides=overrides)), rows)
    return [(r["step"], r["lr"], r["loss"]) for r in rows.rows if "lr" in r], rows.lines


def _train_raises(overrides):
    from loom.launch.train import train
    try:
        train(validate(build_config(overrides=overrides)), Rows())
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.mark.timeout(240)
def test_resume_mid_schedule_continues_the_lr_exactly(distributed, tmp_path):
    from loom.checkpoint import CheckpointStore
    url = str(tmp_path / "ck")
    (reference, _), = distributed(_train, 1, TINY, timeout=200)
    assert [lr for _, lr, _ in reference] == [LRSchedule("cosine", 1e-2, 2, 8, 1e-3).lr_at(s) for s in range(8)]
    distributed(_train, 1, {**TINY, "ckpt_every": 4, "ckpt_url": url, "ckpt_mode": "sync"}, timeout=200)
    CheckpointStore(url).delete_step(8)  # as if the run had stopped after step 5
    (resumed, lines), = distributed(_train, 1, {**TINY, "ckpt_url": url, "resume": True}, timeout=200)
    assert resumed == reference[4:]  # lr and loss, bitwise
    assert not any("WARNING" in line for line in lines)
    # another schedule: refused, naming what differs, unless allowed
    error, = distributed(_train_raises, 1, {**TINY, "steps": 16, "ckpt_url": url, "resume": True}, timeout=200)
    assert "trained with another learning-rate schedule (--steps 8 -> 16)" in error
    assert "--allow-lr-schedule-change" in error
    (changed, lines), = distributed(_train, 1, {**TINY, "steps": 16, "ckpt_url": url, "resume": True,
                                                "allow_lr_schedule_change": True}, timeout=200)
    longer = LRSchedule("cosine", 1e-2, 2, 16, 1e-3)
    assert [lr for _, lr, _ in changed] == [longer.lr_at(s) for s in range(4, 16)]
    assert any("WARNING" in line and "--steps 8 -> 16" in line for line in lines)
