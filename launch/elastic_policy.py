"""The Ray driver's choices across a job's attempts (``--spare-workers``,
``--min-workers``, ``--max-workers``): which workers a fault isolates, the
layout the next attempt runs at, and when a shrunk job grows back.

`ElasticPolicy` holds the job's current `Layout` and its `WorkerPool`.
After a fault (`ElasticPolicy.after_fault`) it isolates the ranks the fault
names, waits briefly for a lost node's bundles to be placed again, and
chooses the layout (`choose_layout`); while a shrunk job runs
(`ElasticPolicy.tick`) it warms spares and looks every `GROW_POLL_S` seconds
for bundles Ray placed again: when a larger layout fits, it raises the
attempt's `StopControl`, which rank 0 reads at its next checkpoint, and
every rank stops there (`loom.launch.train`); the driver then restarts at
the larger layout (`ElasticPolicy.grow`).
"""
from __future__ import annotations

import logging
import time

import ray

from .cluster import LaunchError
from .config import JobConfig
from .elastic import Layout, apply_layout, choose_layout, configured_layout, grow_layout
from .pool import WorkerPool
from .recovery import Recovery

log = logging.getLogger("loom.launch")
GROW_POLL_S = 2.0  # seconds between a shrunk job's looks at the placement group


class StopControl:
    """A flag the driver raises (`request`) and rank 0 reads at each
    checkpoint (`requested`): stop there, all ranks at the same step, so
    that the job restarts at a larger layout."""

    def __init__(self):
        self.reason = ""

    def request(self, reason: str) -> None:
        self.reason = reason

    def requested(self) -> str:
        return self.reason


class ElasticPolicy:
    """The driver's choice of workers and layout across attempts: isolation
    after a fault, shrinking (``--min-workers``) and growing back
    (``--max-workers``)."""

    def __init__(self, cfg: JobConfig, pool: WorkerPool, builtin_loop: bool):
        r = cfg.recovery
        self.cfg, self.pool = cfg, pool
        self.min_workers, self.max_workers = r.min_workers, r.max_workers or cfg.world_size
        self.layout = configured_layout(cfg)
        self.ready = False            # after_fault has readied the next attempt's bundles
        self.growing: Layout | None = None
        # growing stops the built-in loop at a checkpoint (a user's train_fn has no such stop)
        self.can_grow = bool(self.min_workers and builtin_loop and cfg.ckpt.ckpt_every > 0)
        self._next_check = 0.0
        self.warm_later = False       # start spares once the next attempt runs (not beside its start)
        self._next_warm = 0.0

    def job(self, recovery: Recovery) -> dict:
        """The next attempt's job config for the workers, at the current layout."""
        return recovery.job_dict(apply_layout(self.cfg, self.layout)
                                 if self.layout != configured_layout(self.cfg) else None)

    def after_fault(self, failure, recovery: Recovery, timeout: float, notify):
        """Isolate the fault's ranks and choose the next attempt's layout;
        returns (record fields, event text) for `Recovery.failed`."""
        self.growing = None
        nodes = recovery.nodes.get(failure.attempt)
        ranks = failure.error.ranks or ((failure.rank,) if failure.rank is not None else ())
        isolated = self.pool.isolate(ranks, failure.kind, self._fits, nodes)
        world = self.layout.world
        if not self.pool.retired and not self.pool.spares() and not self.min_workers:
            return self._said(isolated, self.layout, [])  # today's restart: wait_replaced, same bundles
        want = self.cfg.world_size if self.min_workers else world  # a shrunk job takes back what it can
        want = min(want, self.pool.size - len(self.pool.retired))  # a retired bundle never comes back
        usable = self.pool.usable()
        if len(usable) < want:  # a lost node's bundles: Ray places them again where there is room
            wait = self.cfg.recovery.replace_wait if self.min_workers else timeout
            usable = self.pool.wait_usable(want, wait, notify)
        old = self.layout
        if self.min_workers:
            self.layout = choose_layout(self.cfg, len(usable), self.min_workers, self.max_workers)
        elif len(usable) < world:
            raise LaunchError(f"only {len(usable)} of the {world} workers can be placed after {failure.kind}: "
                              f"{len(self.pool.retired)} isolated, the rest on lost nodes not placed again within "
                              f"{timeout:.0f}s; add nodes or spares (--spare-workers), or let the job shrink "
                              f"(--min-workers)")
        self.ready = True
        bundles = self.pool.assign(self.layout.world)
        self.warm_later = True  # the usable bundles left without a rank hold spares (`tick`)
        return self._said(isolated, old, bundles)

    def _fits(self, healthy: int) -> bool:
        """Whether the job can run on ``healthy`` workers (``--min-workers``)."""
        if not self.min_workers:
            return False
        try:
            choose_layout(self.cfg, healthy, self.min_workers, self.max_workers)
        except LaunchError:
            return False
        return True

    def _said(self, isolated: list[dict], old: Layout, bundles: list[int]):
        extra, parts = {}, []
        for entry in isolated:
            b = entry["bundle"]
            if not bundles or b in bundles:
                by = "same bundle"
            elif self.layout.world < old.world:
                by = "shrunk"
            else:
                by = "spare"
            entry["replaced_by"] = by
            node = f" (node {entry['node'][:12]})" if entry.get("node") else ""
            if by != "same bundle":  # (a new process in the same bundle is what every restart does: not said)
                fate = "retired" if entry["retired"] else "left until Ray places it again"
                with_ = f"a spare in bundle {bundles[entry['rank']]} takes its place" if by == "spare" \
                    else "the job shrinks"
                parts.append(f"rank {entry['rank']}'s bundle {b}{node} {fate}, {with_}")
        if isolated:
            extra["isolated"] = isolated
        if self.layout != old:
            extra["layout"] = {"from": old.as_dict(), "to": self.layout.as_dict()}
            verb = "shrinking" if self.layout.world < old.world else "growing"
            parts.append(f"{verb} from {old.describe()} to {self.layout.describe()}")
        if bundles:
            extra["bundles"] = bundles
        return extra, "; ".join(parts)

    # ------------------------------------------------------------ growing back, while an attempt runs

    def tick(self, control, tracker) -> None:
        """While an attempt runs: warm new spares once it has reported a step
        (a spare's start must not slow the restart down), and `check_grow`."""
        if tracker is not None and tracker.last_step is None:
            return  # the attempt is starting: nothing beside it
        now = time.monotonic()
        if self.warm_later or (self.pool.size > self.layout.world and now >= self._next_warm):
            # spares in the bundles without a rank, also those Ray placed again since (e.g. on a new node)
            self.warm_later, self._next_warm = False, now + GROW_POLL_S
            self.pool.warm()
        self.check_grow(control)

    def may_grow(self) -> bool:
        """Whether the job runs below the layout it may grow to."""
        return self.can_grow and self.layout.world < min(self.max_workers, self.cfg.world_size)

    def check_grow(self, control) -> None:
        """Every few seconds while running shrunk: when Ray can place more
        workers again and a larger layout fits, ask the workers (``control``)
        to stop at their next checkpoint."""
        if not self.can_grow or control is None or self.growing is not None or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + GROW_POLL_S
        if not self.may_grow():
            return
        bigger = grow_layout(self.cfg, self.layout, len(self.pool.usable()), self.min_workers, self.max_workers)
        if bigger is not None:
            self.growing = bigger
            ray.get(control.request.remote(f"grow to {bigger.describe()}"), timeout=30)
            log.info("asking the workers to stop at their next checkpoint to grow to %s", bigger.describe())

    def grow(self) -> tuple[dict, str]:
        """The attempt stopped for `check_grow`: the next one runs at the larger layout."""
        old, self.growing = self.layout, None
        # the best layout now (a bundle placed again may have gone again since the request)
        self.layout = choose_layout(self.cfg, len(self.pool.usable()), self.min_workers, self.max_workers)
        bundles = self.pool.assign(self.layout.world)
        self.ready = True
        self.warm_later = True
        extra = {"layout": {"from": old.as_dict(), "to": self.layout.as_dict()}, "bundles": bundles}
        if self.layout.world <= old.world:
            return extra, f"restarting at {self.layout.describe()}: the workers placed again were lost again"
        return extra, f"growing from {old.describe()} to {self.layout.describe()}: more workers can be placed again"
