"""Which placement bundle each rank runs in: the groups that talk most stay within a node.

loom's mesh (`loom.comms.mesh_layout`) makes every sequence-parallel group and
every expert-parallel group a block of consecutive ranks (rank = dp_rank * sp
+ sp_rank; an ep group is ``ep`` consecutive ranks), and a data-parallel group
takes one rank from each sp block.  So a group stays within a node when its
block of consecutive ranks runs in bundles of one node, and dp, the group that
talks least (one gradient all-reduce per step), is left to span the nodes.

`rank_map` is the pure rule (no Ray): given the node of each bundle and the
block sizes in priority order (the group that talks most first: sp, or the
inner group of a 2-D sp, then ep, then the whole sp group), it keeps every
block of each size within a node, taking the sizes one by one while the
nodes' bundles allow (a size that does not fit together with those kept
before it is skipped, the later ones are still tried), and fills the nodes
with consecutive ranks, so a larger block often lands on one node too.
`in_node` and `describe` say, from the nodes the ranks actually run on,
which groups are within a node.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Collection, Sequence


@dataclass(frozen=True)
class RankMap:
    """``bundles[r]``: the bundle index of rank r; ``nodes[r]``: its node;
    ``kept``: the block sizes kept within a node, in the order asked;
    ``block``: the run of consecutive ranks every node holds whole (the
    least common multiple of ``kept``; 1 when none is kept)."""
    bundles: tuple[int, ...]
    nodes: tuple[str, ...]
    kept: tuple[int, ...]
    block: int


def _check_sizes(world: int, sizes: Sequence[int]) -> list[int]:
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world={world!r} must be a positive integer")
    out = []
    for g in sizes:
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"group size {g!r} must be a positive integer")
        if world % g:
            raise ValueError(f"group size {g} does not divide the world size {world}")
        out.append(g)
    return out


def rank_map(bundle_nodes: Sequence[str | None], world: int, sizes: Sequence[int] = (), *,
             prefer: Sequence[int] | None = None, warm: Collection[int] = (), rotate: bool = False) -> RankMap:
    """The bundle of each of ``world`` ranks.

    ``bundle_nodes[b]``: the node (any hashable id, e.g. a Ray node id) that
    bundle ``b`` is placed on, or None for a bundle no rank may use (not
    placed, retired).  ``sizes``: block sizes of consecutive ranks to keep
    within a node, in priority order; each must divide ``world``.

    Whole blocks of consecutive ranks go to a node each: after a restart
    (``prefer``: the previous layout's bundle per rank) a block goes back to
    the node where most of its ranks ran, while that node has room; the
    other blocks fill the nodes in turn, those with the most bundles first
    (then those with the most ``warm`` bundles, then by their first bundle).  Within a node a rank keeps its
    ``prefer`` bundle (``prefer[r]`` for rank r) when it is there; the other
    ranks take that node's ``warm`` bundles (those holding a warmed spare)
    first, then the lowest free ones.  With ``rotate``, warm bundles left
    over on a node then take that node's ranks too (a restarted rank needs a
    new process, and a warmed one is ready at once); on any node when
    ``sizes`` asks for no group.

    Raises ValueError for a bad ``world`` or size, or fewer usable bundles
    than ``world``."""
    sizes = _check_sizes(world, sizes)
    by_node: dict = {}
    for b, node in enumerate(bundle_nodes):
        if node is not None:
            by_node.setdefault(node, []).append(b)
    usable = sum(map(len, by_node.values()))
    if usable < world:
        raise ValueError(f"{world} ranks need {world} usable bundles; {usable} are usable")
    kept, block = [], 1
    for g in sizes:
        u = math.lcm(block, g)
        if sum(len(bs) // u for bs in by_node.values()) * u >= world:
            kept.append(g)
            block = u
    room = {node: len(bs) // block for node, bs in by_node.items()}
    warm = set(warm)
    order = sorted(by_node, key=lambda n: (-room[n], -len(warm.intersection(by_node[n])), by_node[n][0]))
    owner: list = [None] * (world // block)
    for k in range(len(owner)) if prefer is not None else ():  # a block goes back where its ranks ran
        votes = Counter(bundle_nodes[prefer[r]] for r in range(k * block, (k + 1) * block)
                        if r < len(prefer) and 0 <= prefer[r] < len(bundle_nodes))
        node = next((n for n, _ in votes.most_common() if n is not None and room[n]), None)
        if node is not None:
            owner[k] = node
            room[node] -= 1
    for k in range(len(owner)):  # the others fill the nodes in turn, the biggest first
        if owner[k] is None:
            owner[k] = next(n for n in order if room[n])
            room[owner[k]] -= 1
    bundles: list[int | None] = [None] * world
    for node in order:
        ranks = [r for r in range(world) if owner[r // block] == node]
        free = list(by_node[node])
        for r in ranks:  # a rank keeps its bundle where it is on this node
            b = prefer[r] if prefer is not None and r < len(prefer) else None
            if b in free:
                bundles[r] = b
                free.remove(b)
        free.sort(key=lambda b: (b not in warm, b))
        for r in ranks:
            if bundles[r] is None:
                bundles[r] = free.pop(0)
        if rotate:
            spare = [b for b in free if b in warm]
            for r in ranks:
                if spare and bundles[r] not in warm:
                    bundles[r] = spare.pop(0)
    if rotate and not sizes:  # no group to keep: a warmed spare on any node will do
        spare = sorted({b for bs in by_node.values() for b in bs if b in warm} - set(bundles))
        for r in range(world):
            if spare and bundles[r] not in warm:
                bundles[r] = spare.pop(0)
                owner[r] = bundle_nodes[bundles[r]]  # no group asked: a block is one rank
    nodes = tuple(owner[r // block] for r in range(world))
    return RankMap(tuple(bundles), nodes, tuple(kept), block)


def in_node(nodes: Sequence, size: int) -> tuple[int, int]:
    """(groups within one node, groups) for the blocks of ``size``
    consecutive ranks, given each rank's node."""
    groups = [nodes[i:i + size] for i in range(0, len(nodes), size)]
    return sum(len(set(g)) == 1 for g in groups), len(groups)


def span(nodes: Sequence, sp: int) -> int:
    """The most nodes one data-parallel group (every ``sp``-th rank) spans."""
    return max(len(set(nodes[s::sp])) for s in range(sp))


def placement_groups(sp: int, ep: int, sp_inner: int = 1) -> list[tuple[str, int]]:
    """The named block sizes to keep within a node, most talkative first:
    the inner group of a 2-D sp (``sp_inner`` consecutive ranks, Ulysses'
    all-to-all), then ep (the MoE layers' all-to-all), then the whole sp
    group (its ring's neighbour exchanges, at every layer; with no 2-D sp,
    sp comes first).  Degrees of 1 are left out."""
    if sp_inner > 1 and sp_inner < sp:
        named = (("sp inner", sp_inner), ("ep", ep), ("sp", sp))
    else:
        named = (("sp", sp), ("ep", ep))
    return [(name, n) for name, n in named if n > 1]


def summary(nodes: Sequence[str], groups: Sequence[tuple[str, int]], sp: int, strategy: str) -> dict:
    """A JSON-able record of where the ranks run: ``strategy``, each rank's
    ``nodes``, for each named group ``[within a node, groups]``, and the most
    nodes a dp group spans (``dp_nodes``)."""
    return {"strategy": strategy, "nodes": list(nodes),
            "within_node": {name: list(in_node(nodes, size)) for name, size in groups},
            "dp_nodes": span(nodes, sp)}


def describe(record: dict) -> str:
    """One line for a `summary` record: which ranks run on which node, and
    which groups are within a node."""
    nodes = record["nodes"]
    runs, start = [], 0
    for r in range(1, len(nodes) + 1):
        if r == len(nodes) or nodes[r] != nodes[start]:
            ranks = f"rank {start}" if r - start == 1 else f"ranks {start}-{r - 1}"
            runs.append(f"{ranks} on node {str(nodes[start])[:12]}")
            start = r
    within = [f"{name} {ok}/{total}" for name, (ok, total) in record["within_node"].items()]
    return (f"placement {record['strategy']}: {', '.join(runs)}; groups within a node: "
            f"{', '.join(within) or 'none asked'}; dp spans {record['dp_nodes']} node"
            f"{'s' * (record['dp_nodes'] != 1)}")
