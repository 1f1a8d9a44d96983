import pytest
import torch.distributed as dist

from loom import comms
from loom.comms import mesh_layout


def test_layout_sp_fastest_and_ep_folded():
    lay = mesh_layout(8, dp=2, sp=4, ep=2)
    assert lay["sp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay["edp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]


@pytest.mark.parametrize("world,dp,sp,ep,needle", [
    (4, 3, 2, 1, "dp*sp=6 != world_size=4"),
    (4, 2, 2, 3, "ep=3 must divide world_size=4"),
    (4, 0, 4, 1, "dp=0"),
    (4, 2.0, 2, 1, "dp=2.0"),
])
def test_layout_rejects_bad_degrees(world, dp, sp, ep, needle):
    with pytest.raises(ValueError, match=needle.replace("*", r"\*")):
        mesh_layout(world, dp, sp, ep)


def _mesh_members(dp, sp, ep):
    m = comms.init_mesh(dp=dp, sp=sp, ep=ep)
    sizes = {k: dist.get_world_size(getattr(m, f"{k}_group")) for k in ("dp", "sp", "ep", "edp")}
    # a collective on each group sums the member ranks: checks real membership
    import torch
    sums = {}
    for k in ("dp", "sp", "ep", "edp"):
        t = torch.tensor([float(m.rank)])
        comms.all_reduce(t, group=getattr(m, f"{k}_group"))
        sums[k] = t.item()
    return dict(rank=m.rank, dp_rank=m.dp_rank, sp_rank=m.sp_rank, ep_rank=m.ep_rank,
                dp_ranks=m.dp_ranks, sp_ranks=m.sp_ranks, ep_ranks=m.ep_ranks,
                edp_ranks=m.edp_ranks, sizes=sizes, sums=sums)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world,dp,sp,ep", [(1, 1, 1, 1), (2, 2, 1, 2), (2, 1, 2, 1), (4, 2, 2, 2), (4, 1, 4, 4)])
def test_mesh_groups(distributed, world, dp, sp, ep):
    out = distributed(_mesh_members, world, dp, sp, ep)
    lay = mesh_layout(world, dp, sp, ep)
    for r, o in enumerate(out):
        assert o["rank"] == r
        for kind in ("dp", "sp", "ep", "edp"):
            (mine,) = [g for g in lay[kind] if r in g]
            assert list(o[f"{kind}_ranks"]) == mine
            assert o["sizes"][kind] == len(mine)
            assert o["sums"][kind] == sum(mine)
        assert o["sp_rank"] == r % sp and o["dp_rank"] == r // sp and o["ep_rank"] == r % ep


def _bad_mesh():
    comms.init_mesh(dp=3, sp=2)


@pytest.mark.timeout(60)
def test_init_mesh_error_names_numbers(distributed):
    with pytest.raises(ValueError, match=r"dp\*sp=6 != world_size=4"):
        distributed(_bad_mesh, 4)
