"""The one place that knows the topology.

world = dp × sp ranks, laid out with sp fastest (rank = dp_rank * sp + sp_rank).
Expert parallelism is folded over the same ranks: ep consecutive ranks form an
ep group (ep_rank = rank % ep), and ranks with the same ep_rank hold the same
experts and form an expert-data-parallel (edp) group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from . import ops


def _check_degree(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def mesh_layout(world_size: int, dp: int = 1, sp: int = 1, ep: int = 1) -> dict[str, list[list[int]]]:
    """The rank lists of every group of each kind, as a pure function."""
    for name, v in (("world_size", world_size), ("dp", dp), ("sp", sp), ("ep", ep)):
        _check_degree(name, v)
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


def init_mesh(dp: int = 1, sp: int = 1, ep: int = 1) -> Mesh:
    """Build every group of the dp × sp mesh (and the folded ep / edp groups)
    over the initialised default process group.  Collective: every rank calls
    it with the same degrees."""
    if not dist.is_initialized():
        raise RuntimeError("init_mesh needs an initialised default process group "
                           "(torch.distributed.init_process_group)")
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = mesh_layout(world, dp, sp, ep)
    mine = {}
    for kind, lists in layout.items():
        for ranks in lists:  # every rank creates every group, in the same order
            group = dist.new_group(ranks)
            if rank in ranks:
                ops.register_group(group, f"{kind}[{','.join(map(str, ranks))}]")
                mine[kind] = (group, tuple(ranks))
    return Mesh(world, rank, dp, sp, ep,
                mine["dp"][0], mine["sp"][0], mine["ep"][0], mine["edp"][0],
                mine["dp"][1], mine["sp"][1], mine["ep"][1], mine["edp"][1])
