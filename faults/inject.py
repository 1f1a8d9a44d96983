"""Fault injection for tests and demos.

A plan is a list of `Injection`s, written as text for the command line::

    straggler:rank=1,delay=0.2,from=20[,until=40]   sleep `delay` s at the start of each step
    hang:rank=3,step=40[,duration=10]               block before the step's first collective
                                                   (forever unless `duration`; `release()` ends it)
    kill:rank=3,step=40                             SIGKILL the rank's process at that step
    slow_link:src=1,dst=2,delay=0.05[,from=0,until=N]  delay every send on edge 1->2
    mismatch:rank=1,step=30                         every rank issues a probe all-reduce at that
                                                   step; `rank` issues it wrong-shaped

Every injection also takes ``attempts=N`` (it fires in the job's first N
attempts; default 1: the first attempt only, so a restarted job is not hit
again) or ``attempts=all`` (every attempt: a fault that repeats, like a bug)::

    kill:rank=1,step=12                 the first attempt only
    kill:rank=1,step=12,attempts=all    every attempt

Several injections are joined with ``;``.  Every rank builds the same
`Injector` from the same plan (and the same ``attempt``) and calls ``at_step(step)`` at each step
boundary (after ``comms.set_step``); only the targeted rank misbehaves, and
nothing is installed in loom.comms unless a slow link is planned.

With ``LOOM_INJECT_LOG=<path>`` in a rank's environment, each kill, hang or
mismatch also appends one JSON line to that file the moment it fires
(``kind``, ``rank``, ``step``, ``attempt``, ``time``: ``time.time()``), so a
benchmark can time a fault from its injection (`benchmarks/recovery.py`).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch

from loom import comms

_KEYS = {
    "straggler": ({"rank", "delay"}, {"from", "until"}),
    "hang": ({"rank", "step"}, {"duration"}),
    "kill": ({"rank", "step"}, set()),
    "slow_link": ({"src", "dst", "delay"}, {"from", "until"}),
    "mismatch": ({"rank", "step"}, set()),
}
_INTS = {"rank", "step", "src", "dst", "from", "until"}
_COMMON = {"attempts"}  # optional for every kind
LOG_ENV = "LOOM_INJECT_LOG"  # a file each one-off injection (kill, hang, mismatch) appends a line to
_MOMENTS = {"kill", "hang", "mismatch"}


@dataclass(frozen=True)
class Injection:
    kind: str
    rank: int | None = None        # straggler, hang, kill, mismatch
    src: int | None = None         # slow_link
    dst: int | None = None
    delay: float = 0.0             # straggler, slow_link (seconds)
    step: int | None = None        # hang, kill, mismatch
    start: int = 0                 # straggler, slow_link: first step
    until: int | None = None       # ... and the step they stop at (exclusive)
    duration: float | None = None  # hang: seconds (None: until released or killed)
    attempts: int | None = 1       # fires in attempts 0..attempts-1 (None: every attempt)

    def __post_init__(self):
        if self.kind not in _KEYS:
            raise ValueError(f"unknown injection kind {self.kind!r}; expected one of {sorted(_KEYS)}")
        if self.delay < 0 or (self.duration is not None and self.duration < 0):
            raise ValueError(f"{self}: delay and duration must be >= 0")
        if self.attempts is not None and (isinstance(self.attempts, bool) or not isinstance(self.attempts, int)
                                          or self.attempts < 1):
            raise ValueError(f"injection {self.kind}: attempts={self.attempts!r} must be a positive integer "
                             f"(the first N attempts) or 'all'")

    def fires_in(self, attempt: int) -> bool:
        """Whether this injection is armed in ``attempt`` (0: the first)."""
        return self.attempts is None or attempt < self.attempts

    def active(self, step: int) -> bool:
        return self.start <= step and (self.until is None or step < self.until)

    def ranks(self) -> tuple[int, ...]:
        return (self.src, self.dst) if self.kind == "slow_link" else (self.rank,)

    def __str__(self) -> str:
        return self._text() + ("" if self.attempts == 1 else
                               f",attempts={'all' if self.attempts is None else self.attempts}")

    def _text(self) -> str:
        if self.kind == "slow_link":
            return f"slow_link:src={self.src},dst={self.dst},delay={self.delay},from={self.start}" + \
                (f",until={self.until}" if self.until is not None else "")
        if self.kind == "straggler":
            return f"straggler:rank={self.rank},delay={self.delay},from={self.start}" + \
                (f",until={self.until}" if self.until is not None else "")
        extra = f",duration={self.duration}" if self.duration is not None else ""
        return f"{self.kind}:rank={self.rank},step={self.step}{extra}"


def parse(spec: str) -> list[Injection]:
    """``"straggler:rank=1,delay=0.2,from=20;kill:rank=3,step=50"`` -> injections."""
    out = []
    for part in (p.strip() for p in (spec or "").split(";")):
        if not part:
            continue
        kind, _, args = part.partition(":")
        kind = kind.strip()
        if kind not in _KEYS:
            raise ValueError(f"injection {part!r}: unknown kind {kind!r}; expected one of {sorted(_KEYS)}")
        required, optional = _KEYS[kind]
        values = {}
        for item in filter(None, (a.strip() for a in args.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in required | optional | _COMMON:
                raise ValueError(f"injection {part!r}: unknown or malformed setting {item!r}; "
                                 f"{kind} takes {sorted(required)} and optionally {sorted(optional | _COMMON)}")
            if key == "attempts":
                values[key] = _attempts(part, value.strip())
                continue
            try:
                values[key] = int(value) if key in _INTS else float(value)
            except ValueError:
                raise ValueError(f"injection {part!r}: {key}={value!r} is not a number") from None
        missing = required - set(values)
        if missing:
            raise ValueError(f"injection {part!r}: missing {sorted(missing)}")
        if "from" in values:
            values["start"] = values.pop("from")
        out.append(Injection(kind, **values))
    return out


def _attempts(part: str, value: str) -> int | None:
    if value.lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"injection {part!r}: attempts={value!r} must be 'all' or a positive integer "
                         f"(the first N attempts)")
    return n


def validate_plan(plan: list[Injection], world_size: int) -> None:
    """Reject injections naming ranks outside the job."""
    for inj in plan:
        for r in inj.ranks():
            if not 0 <= r < world_size:
                raise ValueError(f"injection {inj}: rank {r} is outside 0..{world_size - 1}")
        if inj.kind == "slow_link" and inj.src == inj.dst:
            raise ValueError(f"injection {inj}: src and dst must differ")


class Injector:
    """Applies a plan on one rank.  Call `at_step` at every step boundary.

    ``attempt`` is the job's attempt this process belongs to (0: the first;
    under torchrun ``TORCHELASTIC_RESTART_COUNT``, under Ray the driver's
    count of restarts): only the injections armed in it (`Injection.fires_in`)
    are applied; the others are in ``skipped``."""

    def __init__(self, plan, rank: int, *, group=None, attempt: int = 0):
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
            raise ValueError(f"Injector: attempt={attempt!r} must be a non-negative integer (0: the first)")
        planned = parse(plan) if isinstance(plan, str) else list(plan)
        self.attempt = attempt
        self.plan = [i for i in planned if i.fires_in(attempt)]
        self.skipped = [i for i in planned if not i.fires_in(attempt)]
        self.rank, self.group = rank, group
        self._release = threading.Event()
        self.log: list[tuple[str, int, float]] = []  # (kind, step, time.monotonic()) of what fired here
        links = [i for i in self.plan if i.kind == "slow_link" and i.src == rank]
        if links:
            comms.set_send_hook(self._slow_send_hook(links))
        self._armed_links = bool(links)

    def at_step(self, step: int) -> None:
        for inj in self.plan:
            if inj.kind == "mismatch" and inj.step == step:
                self._mismatch(inj)
            if inj.rank != self.rank:
                continue
            if inj.kind == "straggler" and inj.active(step):
                self._note("straggler", step)
                time.sleep(inj.delay)
            elif inj.kind == "hang" and inj.step == step:
                self._note("hang", step)
                self._release.wait(inj.duration)
            elif inj.kind == "kill" and inj.step == step:
                self._note("kill", step)
                os.kill(os.getpid(), signal.SIGKILL)

    def release(self) -> None:
        """End an injected hang now (tests; the monitor's stop)."""
        self._release.set()

    def close(self) -> None:
        self.release()
        if self._armed_links:
            comms.set_send_hook(None)
            self._armed_links = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _note(self, kind: str, step: int) -> None:
        self.log.append((kind, step, time.monotonic()))
        path = os.environ.get(LOG_ENV)
        if path and kind in _MOMENTS:  # written (and closed) before a kill ends the process
            with open(path, "a") as fh:
                fh.write(json.dumps({"kind": kind, "rank": self.rank, "step": step, "attempt": self.attempt,
                                     "time": time.time()}) + "\n")

    def _mismatch(self, inj: Injection) -> None:
        # a real collective that gloo and NCCL accept (same element count) but
        # whose shape differs on the injected rank
        probe = torch.zeros(2, 2) if self.rank == inj.rank else torch.zeros(4)
        if self.rank == inj.rank:
            self._note("mismatch", inj.step)
        comms.all_reduce(probe, "sum", self.group)

    def _slow_send_hook(self, links):
        started = set()

        def hook(src, dst, tensor):
            step = comms.trace.current_step()
            for inj in links:
                if inj.dst == dst and (step is None or inj.active(step)):
                    if inj not in started:  # log the onset once, not every send
                        started.add(inj)
                        self._note("slow_link", step)
                    time.sleep(inj.delay)
        return hook
