"""Learning-rate schedules: the learning rate as a pure function of the step.

``LRSchedule(kind, lr, warmup_steps, total_steps, min_lr, wsd_decay_frac)``
gives the learning rate of every (0-based) optimizer step:

- warm-up (every kind): step ``s < warmup_steps`` runs at
  ``lr * (s + 1) / warmup_steps``, so the last warm-up step reaches the peak
  ``lr`` (no warm-up when ``warmup_steps`` is 0: step 0 runs at the peak);
- ``constant``: the peak from then on (``min_lr`` is not used);
- ``cosine``: from the peak down to ``min_lr`` along half a cosine, reaching
  ``min_lr`` at the last step (``total_steps - 1``);
- ``linear``: the same path as a straight line;
- ``wsd`` (warmup-stable-decay, MiniCPM, arXiv:2404.06395): the peak until
  the last ``round(wsd_decay_frac * total_steps)`` steps, which decay
  linearly to ``min_lr`` (reached at the last step).

Steps past ``total_steps - 1`` stay at ``min_lr`` (the floor).  The training
loop uses it through `torch.optim.lr_scheduler.LambdaLR` (`lambda_lr`);
`settings` is what a checkpoint stores, so that a resumed run can tell
whether it continues the same schedule (`changes`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SCHEDULES = ("constant", "cosine", "linear", "wsd")


@dataclass(frozen=True)
class LRSchedule:
    """A learning-rate schedule.  ``lr``/``min_lr`` in the optimizer's units;
    steps are optimizer steps.  Raises ValueError (naming the flag) for a kind
    not in `SCHEDULES`, ``lr <= 0``, ``min_lr`` outside ``[0, lr]``, negative
    ``warmup_steps``, ``total_steps < 1``, ``wsd_decay_frac`` outside
    ``(0, 1]``, or a wsd decay phase that would start inside the warm-up."""
    kind: str = field(default="constant", metadata={
        "help": "learning rate after the warm-up: constant, cosine or linear (to --min-lr at the last step), "
                "or wsd (warmup-stable-decay: constant, then a linear decay to --min-lr over the last "
                "--wsd-decay-frac of the steps)"})
    lr: float = 3e-3
    warmup_steps: int = 0
    total_steps: int = 1
    min_lr: float = field(default=0.0, metadata={
        "help": "the learning rate cosine, linear and wsd schedules end at"})
    wsd_decay_frac: float = field(default=0.1, metadata={
        "help": "with --lr-schedule wsd: the fraction of --steps in the final decay"})

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"--lr-schedule={self.kind!r} must be one of {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise ValueError(f"--lr={self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr={self.min_lr} must be in [0, --lr={self.lr}]")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps={self.warmup_steps} must be >= 0")
        if self.total_steps < 1:
            raise ValueError(f"--steps={self.total_steps} must be >= 1")
        if not 0 < self.wsd_decay_frac <= 1:
            raise ValueError(f"--wsd-decay-frac={self.wsd_decay_frac} must be in (0, 1]")
        if self.kind == "wsd" and self.decay_start < self.warmup_steps:
            raise ValueError(f"--lr-schedule=wsd: the decay phase (the last {self.decay_steps} of --steps="
                             f"{self.total_steps}, from --wsd-decay-frac={self.wsd_decay_frac}) would start "
                             f"at step {self.decay_start}, inside the --warmup-steps={self.warmup_steps}: "
                             f"lower --wsd-decay-frac or --warmup-steps, or raise --steps")

    @property
    def decay_steps(self) -> int:
        """wsd: the number of steps in the final decay phase (at least 1)."""
        return max(1, round(self.wsd_decay_frac * self.total_steps))

    @property
    def decay_start(self) -> int:
        """wsd: the first step of the decay phase."""
        return self.total_steps - self.decay_steps

    def factor(self, step: int) -> float:
        """The learning rate of ``step`` divided by the peak ``lr`` (what
        `LambdaLR` multiplies the optimizer's initial lr by)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        warm = max(1, self.warmup_steps)
        if step < warm:
            return (step + 1) / warm
        if self.kind == "constant":
            return 1.0
        floor = self.min_lr / self.lr
        if self.kind == "wsd":
            if step < self.decay_start:
                return 1.0
            done = min(1.0, (step - self.decay_start + 1) / self.decay_steps)
            return floor + (1.0 - floor) * (1.0 - done)
        peak = warm - 1  # the step that ran at the peak
        done = min(1.0, (step - peak) / max(1, self.total_steps - 1 - peak))
        if self.kind == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * done))
        return floor + (1.0 - floor) * (1.0 - done)  # linear

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step`` (0-based)."""
        return self.lr * self.factor(step)

    def settings(self) -> dict:
        """The settings that decide the learning rate of some step, as plain
        values (what a checkpoint stores): ``min_lr`` and ``total_steps``
        only for kinds that decay, ``wsd_decay_frac`` only for wsd."""
        out = {"kind": self.kind, "lr": float(self.lr), "warmup_steps": int(self.warmup_steps)}
        if self.kind != "constant":
            out.update(total_steps=int(self.total_steps), min_lr=float(self.min_lr))
        if self.kind == "wsd":
            out["wsd_decay_frac"] = float(self.wsd_decay_frac)
        return out

    def changes(self, saved: dict) -> list[str]:
        """What differs between ``saved`` (another schedule's `settings`) and
        this one, as ``"name old -> new"`` strings (empty: the same schedule)."""
        mine = self.settings()
        return [f"{_FLAG.get(k, k)} {saved.get(k, '(unset)')} -> {mine.get(k, '(unset)')}"
                for k in sorted(set(mine) | set(saved)) if saved.get(k) != mine.get(k)]

    @classmethod
    def from_config(cls, train) -> "LRSchedule":
        """The schedule of a job's ``[train]`` section."""
        return cls(kind=train.lr_schedule, lr=train.lr, warmup_steps=train.warmup_steps,
                   total_steps=train.steps, min_lr=train.min_lr, wsd_decay_frac=train.wsd_decay_frac)


_FLAG = {"kind": "--lr-schedule", "lr": "--lr", "warmup_steps": "--warmup-steps", "total_steps": "--steps",
         "min_lr": "--min-lr", "wsd_decay_frac": "--wsd-decay-frac"}


def lambda_lr(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` that runs ``optimizer`` on ``schedule``: after ``n`` calls
    of its ``step()``, the optimizer's lr is ``schedule.lr_at(n)``.  Every
    param group's initial lr must be ``schedule.lr`` (ValueError otherwise)."""
    for group in optimizer.param_groups:
        if group.get("initial_lr", group["lr"]) != schedule.lr:
            raise ValueError(f"lambda_lr: a param group's lr {group['lr']} is not the schedule's "
                             f"peak lr {schedule.lr}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.factor(step))


def restore(scheduler: torch.optim.lr_scheduler.LambdaLR, schedule: LRSchedule) -> float:
    """After loading a checkpoint into ``scheduler`` and its optimizer: set
    the optimizer's lr (and the peak it scales) from ``schedule`` at the
    scheduler's step, so the run continues ``schedule`` whatever lr the
    checkpoint held.  Returns that lr."""
    step = scheduler.last_epoch
    lr = schedule.lr_at(step)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"], group["lr"] = schedule.lr, lr
    scheduler.base_lrs = [schedule.lr] * len(scheduler.optimizer.param_groups)
    scheduler._last_lr = [lr] * len(scheduler.optimizer.param_groups)
    return lr
