"""The one place that knows the topology.

world = dp × sp ranks, laid out with sp fastest (rank = dp_rank * sp + sp_rank).
Expert parallelism is folded over the same ranks: ep consecutive ranks form an
ep group (ep_rank = rank % ep), and ranks with the same ep_rank hold the same
experts and form an expert-data-parallel (edp) group.

2-D sequence parallelism (``sp_inner`` > 1) splits each sp group of sp =
inner × outer ranks once more: ``sp_inner`` consecutive sp ranks form an inner
group (the Ulysses all-to-all, kept within a node), and the sp ranks with the
same inner index form an outer group (the ring), so sp_rank = outer_index *
inner + inner_index.  With dp=1, sp=4, sp_inner=2: inner groups [0, 1], [2, 3];
outer groups [0, 2], [1, 3].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from . import ops


def _check_degree(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def mesh_layout(world_size: int, dp: int = 1, sp: int = 1, ep: int = 1,
                sp_inner: int = 1) -> dict[str, list[list[int]]]:
    """The rank lists of every group of each kind, as a pure function
    (kinds dp, sp, ep, edp, sp_inner, sp_outer)."""
    for name, v in (("world_size", world_size), ("dp", dp), ("sp", sp), ("ep", ep), ("sp_inner", sp_inner)):
        _check_degree(name, v)
    if sp % sp_inner:
        raise ValueError(f"sp_inner={sp_inner} must divide sp={sp} (sp = inner x outer)")
    if dp * sp != world_size:
        raise ValueError(f"dp*sp={dp * sp} != world_size={world_size} (dp={dp}, sp={sp}); "
                         f"choose dp and sp whose product is the number of workers")
    if world_size % ep:
        raise ValueError(f"ep={ep} must divide world_size={world_size}")
    return {
        "dp": [[d * sp + s for d in range(dp)] for s in range(sp)],
        "sp": [[d * sp + s for s in range(sp)] for d in range(dp)],
        "ep": [list(range(b * ep, (b + 1) * ep)) for b in range(world_size // ep)],
        "edp": [list(range(e, world_size, ep)) for e in range(ep)],
        "sp_inner": [list(range(b * sp_inner, (b + 1) * sp_inner)) for b in range(world_size // sp_inner)],
        "sp_outer": [[d * sp + o * sp_inner + i for o in range(sp // sp_inner)]
                     for d in range(dp) for i in range(sp_inner)],
    }


@dataclass(frozen=True)
class Mesh:
    world_size: int
    rank: int
    dp: int
    sp: int
    ep: int
    dp_group: object
    sp_group: object
    ep_group: object
    edp_group: object
    dp_ranks: tuple[int, ...]
    sp_ranks: tuple[int, ...]
    ep_ranks: tuple[int, ...]
    edp_ranks: tuple[int, ...]
    sp_inner: int = 1
    sp_inner_group: object = None  # None where the group is one rank (nothing to talk to)
    sp_outer_group: object = None
    sp_inner_ranks: tuple[int, ...] = ()
    sp_outer_ranks: tuple[int, ...] = ()

    @property
    def dp_rank(self) -> int:
        return self.dp_ranks.index(self.rank)

    @property
    def sp_rank(self) -> int:
        return self.sp_ranks.index(self.rank)

    @property
    def ep_rank(self) -> int:
        return self.ep_ranks.index(self.rank)

    @property
    def edp_rank(self) -> int:
        return self.edp_ranks.index(self.rank)

    def degrees(self) -> dict[str, int]:
        return {"dp": self.dp, "sp": self.sp, "ep": self.ep}


def init_mesh(dp: int = 1, sp: int = 1, ep: int = 1, sp_inner: int = 1) -> Mesh:
    """Build every group of the dp × sp mesh (and the folded ep / edp groups,
    and the sp_inner / sp_outer groups of 2-D sequence parallelism) over the
    initialised default process group.  Collective: every rank calls it with
    the same degrees.  An sp_inner / sp_outer group of one rank is not built
    (its field is None); one that is the whole sp group is the sp group."""
    if not dist.is_initialized():
        raise RuntimeError("init_mesh needs an initialised default process group "
                           "(torch.distributed.init_process_group)")
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = mesh_layout(world, dp, sp, ep, sp_inner)
    mine = {}
    for kind, lists in layout.items():
        for ranks in lists:  # every rank creates every group, in the same order
            if kind in ("sp_inner", "sp_outer") and len(ranks) in (1, sp):
                if rank in ranks:
                    mine[kind] = (mine["sp"][0] if len(ranks) == sp > 1 else None, tuple(ranks))
                continue
            group = dist.new_group(ranks)
            if rank in ranks:
                ops.register_group(group, f"{kind}[{','.join(map(str, ranks))}]")
                mine[kind] = (group, tuple(ranks))
    return Mesh(world, rank, dp, sp, ep,
                mine["dp"][0], mine["sp"][0], mine["ep"][0], mine["edp"][0],
                mine["dp"][1], mine["sp"][1], mine["ep"][1], mine["edp"][1],
                sp_inner, mine["sp_inner"][0], mine["sp_outer"][0], mine["sp_inner"][1], mine["sp_outer"][1])
