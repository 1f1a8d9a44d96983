"""The Ray driver's workers: placement bundles, spares, isolation.

A job's placement group holds ``world + spares`` bundles (one worker each;
packed on few nodes, ranks given bundles by node, or spread: ``--placement``,
`loom.launch.topology`).  Ranks run in ``world`` of them; every other bundle
Ray has placed holds a *spare*: an idle worker started and warmed up
(`RankWorker.warm`: torch and loom imported) at start, so that a restart
does not wait for Ray to start a process and import torch.

After a fault, `WorkerPool.isolate` retires the bundle of each rank the
fault names (C4's isolation: the worker, and the machine slot it ran in,
are not used again for the rest of the job; Ray cannot release one bundle of
a placement group, so a retired bundle stays reserved and empty) when a
spare can take its place or the job may shrink (``--min-workers``);
otherwise the rank gets a fresh process in the same bundle.  A bundle whose
node was lost is not retired: Ray places it again where there is room, and
it serves again once placed.  `WorkerPool.assign` then gives the next
attempt's ranks their bundles: each surviving rank keeps its own, a rank
that lost its bundle takes a spare (warmed ones first), and a shrunk layout
keeps the lowest surviving ranks' bundles; warmed spares left over then take
surviving ranks as well (every rank of a restart needs a new process; a
warmed one skips Ray's process start and torch's import), and the bundles
they leave get new spares once the restarted attempt runs.
"""
from __future__ import annotations

import logging

import ray
from ray.util import placement_group_table

from .cluster import LaunchError, poll_until
from .topology import rank_map

log = logging.getLogger("loom.launch")

# fault kinds that name a worker (or its machine) as the culprit: its bundle is isolated.  An exception
# raised by a rank's own code is not (it is the program's, and a restart repeats it wherever it runs)
ISOLATE_KINDS = frozenset({"died", "hang", "lost_rank", "straggler", "actor_lost", "mismatch"})


class WorkerPool:
    """The bundles of placement group ``pg`` (``world + spares``) and the
    idle warmed workers in those that hold no rank.  ``new_actor(bundle)``
    starts a `RankWorker` actor in that bundle.

    ``groups`` (``--placement pack``): block sizes of consecutive ranks to
    keep within a node, most talkative first (`loom.launch.topology`); ranks
    then take bundles by node, at the start and at every `assign`.  None
    (``--placement spread``): rank i runs in bundle i, and `assign` keeps
    bundles regardless of nodes."""

    def __init__(self, pg, world: int, spares: int, new_actor, groups: list[int] | None = None):
        self.pg, self.new_actor, self.groups = pg, new_actor, groups
        self.size = world + spares
        self.ranks: list[int] = list(range(world))   # the bundle of each rank of the current layout
        self.retired: dict[int, str] = {}              # bundle -> why it is never used again
        self.idle: dict[int, object] = {}              # bundle -> an idle warmed actor (a spare)
        self._warming: dict[int, object] = {}          # bundle -> its warm() call
        self.lost: dict[int, str] = {}                 # bundle -> the node it was lost with
        if groups is not None:
            self.ranks = self._by_node(world, self.placed(), None, rotate=False)

    # ------------------------------------------------------------ state

    def placed(self) -> dict[int, str]:
        """Bundle -> the Ray node id Ray placed it on, for the bundles placed
        now on a live node (a lost node's bundles are not, until Ray places
        them again: also while Ray's table still names the dead node)."""
        table = placement_group_table(self.pg).get("bundles_to_node_id") or {}
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        return {int(b): node for b, node in table.items()
                if node and node in alive and node != self.lost.get(int(b))}

    def usable(self, placed: dict[int, str] | None = None) -> list[int]:
        """The bundles a rank can run in now: placed and not retired."""
        placed = self.placed() if placed is None else placed
        return [b for b in range(self.size) if b in placed and b not in self.retired]

    def spares(self, placed: dict[int, str] | None = None) -> list[int]:
        """Usable bundles that hold no rank of the current layout."""
        return [b for b in self.usable(placed) if b not in self.ranks]

    # ------------------------------------------------------------ spares

    def warm(self, bundles=None) -> None:
        """Start an idle warmed worker in each usable bundle without a rank
        (``bundles``: only those) that has none."""
        for b in self.spares() if bundles is None else bundles:
            if b not in self.idle and b not in self.retired:
                actor = self.new_actor(b)
                self.idle[b] = actor
                self._warming[b] = actor.warm.remote()

    def take(self, bundles: list[int]) -> tuple[list, list[bool]]:
        """Actors for ranks in ``bundles`` (rank order): a bundle's idle warmed
        worker when it has a live one, else a new actor.  Returns (actors,
        whether each was a warmed spare)."""
        actors, warmed = [], []
        for b in bundles:
            actor = self.idle.pop(b, None)
            call = self._warming.pop(b, None)
            if actor is not None:
                ready, _ = ray.wait([call], timeout=0) if call is not None else ([], None)
                alive = True
                if ready:
                    try:
                        ray.get(ready[0])
                    except ray.exceptions.RayError as exc:  # it died while idle (e.g. with its node)
                        log.info("the spare in bundle %d is gone (%s); starting a new worker", b, type(exc).__name__)
                        alive = False
                if not alive:
                    ray.kill(actor)
                    actor = None
            actors.append(actor if actor is not None else self.new_actor(b))
            warmed.append(actor is not None)
        return actors, warmed

    def close(self) -> None:
        for actor in self.idle.values():
            ray.kill(actor)
        self.idle.clear()
        self._warming.clear()

    # ------------------------------------------------------------ after a fault

    def isolate(self, ranks, kind: str, can_shrink=False, nodes: list[str] | None = None) -> list[dict]:
        """Retire the bundles of ``ranks`` (ranks of the current layout) after
        a fault of ``kind``, when `ISOLATE_KINDS` names the worker and a spare
        can take its place or the job may shrink: ``can_shrink(n)`` (or a
        bool) says whether the job can run on ``n`` usable bundles; a bundle
        whose retirement would leave too few is used again.  Returns one
        entry per rank: ``rank``, ``bundle``, ``node`` (its Ray node in the
        failed attempt: ``nodes``) and ``retired``."""
        shrink = can_shrink if callable(can_shrink) else (lambda n: bool(can_shrink))
        if kind == "lost_node" and nodes:  # not usable until Ray places them elsewhere
            self.lost.update({self.ranks[r]: nodes[r] for r in ranks if 0 <= r < min(len(nodes), len(self.ranks))})
        placed = self.placed()
        free = self.spares(placed)
        out = []
        for r in sorted(set(ranks)):
            if not 0 <= r < len(self.ranks):
                continue
            b = self.ranks[r]
            entry = {"rank": r, "bundle": b, "node": (nodes[r] if nodes and r < len(nodes) else placed.get(b)),
                     "retired": False}
            if kind in ISOLATE_KINDS and b in placed and (free or shrink(len(self.usable(placed)) - 1)):
                self.retire(b, f"{kind} of rank {r}")
                entry["retired"] = True
                if free:
                    free.pop(0)
            out.append(entry)
        return out

    def retire(self, bundle: int, why: str) -> None:
        self.retired[bundle] = why
        self._drop_idle(bundle)

    def _drop_idle(self, bundle: int) -> None:
        actor = self.idle.pop(bundle, None)
        self._warming.pop(bundle, None)
        if actor is not None:
            ray.kill(actor)

    def assign(self, world: int, rotate: bool = True) -> list[int]:
        """The bundles of the next attempt's ``world`` ranks (and they become
        the current layout's): a surviving rank keeps its bundle, others take
        usable bundles without a rank, warmed spares first.  With ``rotate``
        (a restart), warmed spares left over then take surviving ranks too:
        a restarted rank needs a new process anyway (the old one may be stuck
        in the failed collective), and a warmed one is ready at once; the
        bundle it leaves gets a new spare once the attempt runs."""
        placed = self.placed()
        for b in [b for b in self.idle if b not in placed]:  # a spare lost with its node
            self._drop_idle(b)
        usable = set(self.usable(placed))
        if len(usable) < world:
            raise LaunchError(f"{world} workers need {world} placed bundles, but only {len(usable)} are placed "
                              f"and not retired now (a node was lost meanwhile)")
        if self.groups is not None:
            self.ranks = self._by_node(world, placed, self.ranks, rotate)
            return self.ranks
        free = sorted((b for b in usable if b not in self.ranks), key=lambda b: (b not in self.idle, b))
        if world < len(self.ranks):  # shrinking: the lowest surviving ranks keep their bundles
            out = [b for b in self.ranks if b in usable][:world]
        else:  # each rank keeps its bundle while it is usable
            out = [b if b in usable else None for b in self.ranks]
        out = [b if b is not None else free.pop(0) for b in out]
        out += [free.pop(0) for _ in range(world - len(out))]
        if rotate:
            warmed = [b for b in free if b in self.idle]
            out = [warmed.pop(0) if b not in self.idle and warmed else b for b in out]
        self.ranks = out
        return out

    def _by_node(self, world: int, placed: dict[int, str], prefer, rotate: bool) -> list[int]:
        """`topology.rank_map` over the usable bundles: the groups' blocks
        within a node (sizes that do not divide ``world`` are not asked)."""
        usable = set(self.usable(placed))
        nodes = [placed[b] if b in usable else None for b in range(self.size)]
        sizes = [g for g in self.groups if world % g == 0]
        return list(rank_map(nodes, world, sizes, prefer=prefer, warm=set(self.idle), rotate=rotate).bundles)

    def wait_usable(self, count: int, timeout: float, notify=None, every: float = 10.0,
                    poll: float = 0.2) -> list[int]:
        """Wait up to ``timeout`` s until at least ``count`` bundles are usable
        (Ray places a lost node's bundles again where there is room); returns
        the usable bundles then (fewer at the timeout), saying so every
        ``every`` s through ``notify``."""
        usable: list[int] = []

        def enough() -> bool:
            usable[:] = self.usable()
            return len(usable) >= count

        poll_until(enough, timeout, lambda seconds: f"waiting for Ray to place the workers of a lost node again: "
                   f"{seconds:.0f}s; {len(usable)} of {count} bundles placed", notify, every, poll)
        return usable
