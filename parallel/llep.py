"""Least-Loaded Expert Parallelism: the pure planner and its configuration.

Standard EP computes every expert on its home rank, so skewed routing piles
the work (and the activations) on one rank.  The least-loaded plan lets other
ranks compute slices of a hot expert's tokens, borrowing its weights:

- capacity per rank: ``ceil(alpha * total / P)`` slots;
- a rank's *effective load* is what it has been given plus its own experts not
  yet placed (so spilled work leaves room for a helper's own experts);
- experts in descending load (ties: lower id first); the home rank takes what
  fits; the rest goes, chunk by chunk, to whichever has the lower effective
  load: the best rank already holding the expert, or the best rank that could
  borrow it (a strictly lower load is needed to pay for a transfer, a borrower
  must have budget left, and a borrower gets at least ``min_chunk`` slots, so
  small leftovers stay with ranks that hold the weights);
- a chunk fills the chosen rank up to capacity, and when every rank is full
  the overflow is spread in chunks of ``min_chunk`` to the least loaded.

The plan is a pure function of the global loads, so every rank computes the
same plan without talking.  Ranks in a plan are positions in the EP group.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field
from typing import NamedTuple


def _setting(default, help: str):
    """A setting with its one default and help text (loom train's flags are made from them)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class LLEPConfig:
    """When and how the least-loaded plan replaces plain EP.

    ``names`` (not stored) says how errors name the fields, e.g. by the flags
    that set them (``{"lam": "--llep-lam", ...}``); by default they are
    ``LLEPConfig: <field>``.  Raises ValueError naming the first bad value."""

    lam: float = _setting(1.3, "switch LLEP on when the busiest rank's standard-EP load is at least "
                               "this many times the mean (below it, plain EP: no weights move)")
    alpha: float = _setting(1.0, "capacity factor: a rank is filled up to alpha * total / P token slots")
    min_chunk: int = _setting(1024, "fewest token slots worth moving an expert's weights for")
    max_borrowed_experts: int | None = _setting(None, "at most this many foreign experts' weights on any "
                                                      "rank (default: no limit)")
    names: InitVar[Mapping[str, str] | None] = None

    def __post_init__(self, names=None):
        where = "" if names else "LLEPConfig: "

        def name(field_name: str) -> str:
            return where + (names or {}).get(field_name, field_name)

        if not self.lam >= 1.0:
            raise ValueError(f"{name('lam')}={self.lam!r} must be >= 1")
        if not self.alpha > 0:
            raise ValueError(f"{name('alpha')}={self.alpha!r} must be > 0")
        _check_int(name("min_chunk"), self.min_chunk, 1)
        if self.max_borrowed_experts is not None:
            _check_int(name("max_borrowed_experts"), self.max_borrowed_experts, 0)


class LLEPPlan(NamedTuple):
    ranges: list[list[tuple[int, int, int]]]
    """per expert: ``(rank, start, end)`` slices tiling ``[0, load)`` in order"""
    transfers: list[tuple[int, int, int]]
    """``(expert, src, dst)``: ``dst`` borrows the weights of ``expert`` from its home ``src``"""

    def rank_loads(self, world: int) -> list[int]:
        """Slots each rank computes under this plan."""
        loads = [0] * world
        for ranges in self.ranges:
            for rank, start, end in ranges:
                loads[rank] += end - start
        return loads


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    return value


def standard_plan(expert_loads, world: int, experts_per_rank: int) -> LLEPPlan:
    """Every expert's slots on its home rank, no transfers (plain EP)."""
    loads = _check_loads(expert_loads, world, experts_per_rank)
    return LLEPPlan([[(e // experts_per_rank, 0, n)] if n else [] for e, n in enumerate(loads)], [])


def _check_loads(expert_loads, world, experts_per_rank) -> list[int]:
    _check_int("world", world, 1)
    _check_int("experts_per_rank", experts_per_rank, 1)
    loads = [int(n) for n in expert_loads]
    if len(loads) != world * experts_per_rank:
        raise ValueError(f"expert_loads has {len(loads)} entries; expected world * experts_per_rank "
                         f"= {world} * {experts_per_rank}")
    if loads and min(loads) < 0:
        raise ValueError(f"expert_loads {loads} must be non-negative")
    return loads


def llep_plan(expert_loads, world: int, experts_per_rank: int, *, alpha: float = 1.0,
              min_chunk: int = 1024, max_borrowed_experts: int | None = None) -> LLEPPlan:
    """The least-loaded plan for global per-expert slot counts (see the module doc)."""
    loads = _check_loads(expert_loads, world, experts_per_rank)
    if not alpha > 0:
        raise ValueError(f"alpha={alpha!r} must be > 0")
    _check_int("min_chunk", min_chunk, 1)
    budget = math.inf if max_borrowed_experts is None else \
        _check_int("max_borrowed_experts", max_borrowed_experts, 0)
    capacity = math.ceil(alpha * sum(loads) / world)
    assigned = [0] * world
    # a rank's effective load: what it was given plus its own experts still to place
    pending = [sum(loads[r * experts_per_rank:(r + 1) * experts_per_rank]) for r in range(world)]
    borrowed = [0] * world
    ranges: list[list[tuple[int, int, int]]] = [[] for _ in loads]
    transfers: list[tuple[int, int, int]] = []

    def effective(rank: int) -> int:
        return assigned[rank] + pending[rank]

    def give(e: int, rank: int, start: int, amount: int) -> None:
        assigned[rank] += amount
        last = ranges[e][-1] if ranges[e] else None
        if last is not None and last[0] == rank and last[2] == start:
            ranges[e][-1] = (rank, last[1], start + amount)  # extend the previous slice
        else:
            ranges[e].append((rank, start, start + amount))

    for e in sorted(range(len(loads)), key=lambda i: (-loads[i], i)):
        load, home = loads[e], e // experts_per_rank
        if load == 0:
            continue
        pending[home] -= load
        take = min(load, max(0, capacity - effective(home)))
        if take:
            give(e, home, 0, take)
        done, holders = take, [home]
        while done < load:
            left = load - done
            holder = min(holders, key=lambda r: (effective(r), r))
            helper = None
            if left >= min_chunk:
                free = [r for r in range(world) if r not in holders and borrowed[r] < budget]
                helper = min(free, key=lambda r: (effective(r), r)) if free else None
            if helper is not None and effective(helper) < effective(holder):
                target = helper
                holders.append(helper)
                borrowed[helper] += 1
                transfers.append((e, home, helper))
            else:
                target = holder
            amount = min(left, max(capacity - effective(target), min_chunk))
            give(e, target, done, amount)
            done += amount
    return LLEPPlan(ranges, transfers)
