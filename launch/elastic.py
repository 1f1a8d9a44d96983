"""Elastic layouts: the job's layout on fewer (or again more) workers.

With ``--min-workers M`` a job that cannot have its configured world of
healthy workers continues at the largest valid layout of at least M workers
(`choose_layout`): the sequence-parallel degree (and the expert-parallel
degree) stay as configured and the data-parallel degree ``dp`` shrinks.  The
global batch (``--batch-size`` sequences per step) never changes; each rank's
share of it grows, and ``--grad-accum`` grows with it so that a micro-batch
is no larger than the configured one (the memory a rank needs stays the
same): the loss and the gradients of every step are the configured job's.
The workers resume from the universal checkpoint, which loads into any
layout.  `grow_layout` says when a shrunk job can grow back (up to
``--max-workers``).

Pure functions of the job config: no Ray, no processes.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from .cluster import LaunchError
from .config import ConfigError, JobConfig, hdp_capacity, validate


@dataclass(frozen=True)
class Layout:
    """How a job's ranks are arranged: ``dp * sp`` workers, ``grad_accum``
    micro-batches per step (and, under ``--hdp``, ``hdp_capacity`` tokens per
    rank per micro-batch and the longest sequence ``varlen_max``; 0: as configured)."""

    dp: int
    sp: int
    ep: int
    grad_accum: int
    hdp_capacity: int = 0
    varlen_max: int = 0

    @property
    def world(self) -> int:
        return self.dp * self.sp

    def as_dict(self) -> dict:
        d = {"dp": self.dp, "sp": self.sp, "ep": self.ep, "grad_accum": self.grad_accum, "world": self.world}
        if self.hdp_capacity:
            d.update(hdp_capacity=self.hdp_capacity, varlen_max=self.varlen_max)
        return d

    def describe(self) -> str:
        return f"dp={self.dp}" + (f", sp={self.sp}" if self.sp > 1 else "") + f" (grad-accum {self.grad_accum})"


def configured_layout(cfg: JobConfig) -> Layout:
    p = cfg.parallel
    return Layout(p.dp, p.sp, p.ep, cfg.train.grad_accum)


def apply_layout(cfg: JobConfig, layout: Layout) -> JobConfig:
    """A copy of ``cfg`` that runs at ``layout``.  Injections (``--inject``)
    that name ranks outside the new world are dropped: a rank number belongs
    to a layout."""
    from loom.faults import inject
    new = copy.deepcopy(cfg)
    new.parallel.dp, new.train.grad_accum = layout.dp, layout.grad_accum
    if layout.hdp_capacity:
        new.parallel.hdp_capacity, new.train.varlen_max = layout.hdp_capacity, layout.varlen_max
    if layout.world != cfg.world_size and new.faults.inject:
        plan = inject.parse(new.faults.inject)
        new.faults.inject = ";".join(str(i) for i in plan if all(r < layout.world for r in i.ranks()))
    return new


def _candidate(cfg: JobConfig, dp: int) -> Layout | None:
    """The layout at ``dp`` (sp, ep fixed) that keeps the configured job's
    global batch and micro-batch size at most the configured one; None if
    there is none."""
    p, t = cfg.parallel, cfg.train
    world = dp * p.sp
    if world % p.ep:
        return None
    if p.hdp:  # the global batch's sequences in grad_accum groups, each spread over every rank
        ratio = p.dp * t.grad_accum
        if ratio % dp:
            return None
        accum = ratio // dp  # a group holds as many tokens per rank as before
        if t.batch_size % accum:
            return None
        longest = t.varlen_max or cfg.world_size * hdp_capacity(cfg)  # the data must not change
        capacity = max(hdp_capacity(cfg), math.ceil(longest / world))
        return Layout(dp, p.sp, p.ep, accum, capacity, longest)
    if t.batch_size % dp:
        return None
    local = t.batch_size // dp
    micro = t.batch_size // (p.dp * t.grad_accum)  # the configured micro-batch (sequences)
    for accum in range(1, local + 1):  # the fewest micro-batches that are no larger than the configured
        if local % accum == 0 and local // accum <= micro:
            return Layout(dp, p.sp, p.ep, accum)
    return None


def choose_layout(cfg: JobConfig, healthy: int, min_workers: int, max_workers: int | None = None) -> Layout:
    """The largest valid layout of ``cfg`` on at most ``healthy`` workers (and
    at most ``max_workers``; default the configured world), with at least
    ``min_workers``: the configured ``sp`` and ``ep`` kept, ``dp`` reduced,
    the global batch kept by gradient accumulation (`_candidate`), and the
    result passing `validate`.  The configured layout itself when it fits.

    Raises LaunchError when no valid layout of at least ``min_workers``
    workers fits in ``healthy`` (naming both and why smaller ones fail)."""
    top = min(healthy, cfg.world_size if max_workers is None or max_workers <= 0 else max_workers)
    p = cfg.parallel
    rejected = []
    for dp in range(min(p.dp, top // p.sp), 0, -1):
        if dp * p.sp < min_workers:
            break
        layout = configured_layout(cfg) if dp == p.dp else _candidate(cfg, dp)
        if layout is None:
            rejected.append(f"dp={dp}")
            continue
        if dp != p.dp:
            try:
                validate(apply_layout(cfg, layout), world_size=layout.world)
            except ConfigError as exc:
                rejected.append(f"dp={dp} ({' '.join(str(exc).split(chr(10))[1:]).strip()})")
                continue
        return layout
    why = f"; no valid layout at {', '.join(rejected)}" if rejected else ""
    raise LaunchError(f"only {healthy} healthy worker{'s' * (healthy != 1)} of the configured {cfg.world_size} "
                      f"(sp={p.sp}, ep={p.ep}, --batch-size={cfg.train.batch_size}): no valid layout with at "
                      f"least --min-workers={min_workers}{why}")


def grow_layout(cfg: JobConfig, current: Layout, healthy: int, min_workers: int,
                max_workers: int | None = None) -> Layout | None:
    """The larger layout a job running at ``current`` should grow to now that
    ``healthy`` workers can be had (at most ``max_workers``), or None when
    none is larger than ``current``."""
    try:
        best = choose_layout(cfg, healthy, min_workers, max_workers)
    except LaunchError:
        return None
    return best if best.world > current.world else None
