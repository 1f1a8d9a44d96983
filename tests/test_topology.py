"""The rank map of a multi-node job (`loom.launch.topology`), without Ray:
sp and ep blocks of consecutive ranks within a node as far as the nodes'
bundles allow, dp across nodes, spares and restarts."""
import itertools
import random

import pytest

from loom.comms import mesh_layout
from loom.launch.topology import describe, in_node, placement_groups, rank_map, span, summary


def _nodes(*counts, spread=False):
    """Bundle -> node for nodes holding ``counts`` bundles: in node order, or
    dealt round-robin (as a SPREAD placement group numbers them)."""
    if not spread:
        return [f"n{i}" for i, c in enumerate(counts) for _ in range(c)]
    left, out = list(counts), []
    while any(left):
        for i, c in enumerate(left):
            if c:
                out.append(f"n{i}")
                left[i] -= 1
    return out


def _check(m, bundle_nodes, world):
    assert len(m.bundles) == world and len(set(m.bundles)) == world  # one bundle per rank, none shared
    assert all(bundle_nodes[b] is not None for b in m.bundles)
    assert list(m.nodes) == [bundle_nodes[b] for b in m.bundles]
    for g in m.kept:
        assert in_node(m.nodes, g) == (world // g, world // g), (g, m)


def test_dp_by_sp_on_two_nodes_keeps_sp_within_a_node_and_dp_across():
    for spread in (False, True):  # whatever order Ray numbers the bundles in
        bundle_nodes = _nodes(2, 2, spread=spread)
        m = rank_map(bundle_nodes, 4, [2])
        _check(m, bundle_nodes, 4)
        assert m.kept == (2,) and m.nodes == ("n0", "n0", "n1", "n1")
        assert span(m.nodes, 2) == 2  # each dp group: one rank on each node
        layout = mesh_layout(4, dp=2, sp=2)
        assert all(len({m.nodes[r] for r in g}) == 1 for g in layout["sp"])
        assert all(len({m.nodes[r] for r in g}) == 2 for g in layout["dp"])


def test_today_spread_order_would_split_every_sp_group():
    """What the map fixes: SPREAD deals bundles round-robin; rank i in bundle i splits sp."""
    bundle_nodes = _nodes(2, 2, spread=True)
    assert in_node(bundle_nodes[:4], 2) == (0, 2)
    assert in_node(rank_map(bundle_nodes, 4, [2]).nodes, 2) == (2, 2)


@pytest.mark.parametrize("counts,world,sizes,kept", [
    ((4, 4), 8, [2, 4], (2, 4)),            # more ranks per node than a group: both kept
    ((8,), 8, [2, 4], (2, 4)),              # one node holds everything
    ((1, 1, 1, 1), 4, [2], ()),             # fewer bundles per node than a group: nothing can be kept
    ((3, 3), 4, [2], (2,)),                 # uneven fit: a bundle left on each node
    ((4, 2, 2), 8, [2, 4], (2,)),           # uneven nodes: sp inner kept, the whole sp not
    ((6, 2), 8, [4, 2], (2,)),              # 4 does not fit twice; 2 (later) still kept
    ((3, 3, 2), 6, [3, 2], (3,)),           # 3 then 2 (lcm 6) does not fit
    ((6, 6), 12, [2, 3], (2, 3)),           # non-nested sizes: lcm 6 blocks
    ((5, 4, 3), 8, [2, 4, 8], (2, 4)),      # with spares left over
])
def test_kept_sizes_on_many_shapes(counts, world, sizes, kept):
    bundle_nodes = _nodes(*counts)
    m = rank_map(bundle_nodes, world, sizes)
    _check(m, bundle_nodes, world)
    assert m.kept == kept


def test_uneven_nodes_put_a_whole_outer_group_on_the_big_node():
    m = rank_map(_nodes(2, 4, 2), 8, [2, 4])
    assert m.kept == (2,) and in_node(m.nodes, 4) == (1, 2)  # the 4-bundle node holds one sp group whole
    assert m.nodes[:4] == ("n1",) * 4


def _feasible(bundle_nodes, world, sizes):
    """Brute force: does some map keep every block of every size in ``sizes`` within a node?"""
    usable = [b for b, n in enumerate(bundle_nodes) if n is not None]
    for perm in itertools.permutations(usable, world):
        nodes = [bundle_nodes[b] for b in perm]
        if all(in_node(nodes, g)[0] == world // g for g in sizes):
            return True
    return False


def test_kept_sizes_match_brute_force_on_random_small_shapes():
    rng = random.Random(0)
    for _ in range(60):
        counts = [rng.randint(1, 4) for _ in range(rng.randint(1, 3))]
        bundle_nodes = _nodes(*counts, spread=rng.random() < 0.5)
        if len(bundle_nodes) > 1 and rng.random() < 0.3:  # a retired or unplaced bundle
            bundle_nodes[rng.randrange(len(bundle_nodes))] = None
        usable = sum(n is not None for n in bundle_nodes)
        world = rng.choice([w for w in (1, 2, 3, 4, 6) if w <= usable])
        divisors = [d for d in range(2, world + 1) if world % d == 0]
        sizes = rng.sample(divisors, k=min(len(divisors), rng.randint(0, 2)))
        m = rank_map(bundle_nodes, world, sizes)
        _check(m, bundle_nodes, world)
        kept = []
        for g in sizes:  # the greedy rule: each size in turn, if it fits with those kept before it
            if _feasible(bundle_nodes, world, kept + [g]):
                kept.append(g)
        assert list(m.kept) == kept, (bundle_nodes, world, sizes, m)


def test_spares_are_the_bundles_left_and_the_first_map_is_the_identity_on_one_node():
    m = rank_map(_nodes(6), 4, [2])
    assert m.bundles == (0, 1, 2, 3)  # a local run: rank i in bundle i, spares 4 and 5
    m = rank_map(_nodes(3, 3, spread=True), 4, [2])  # bundles n0: 0 2 4, n1: 1 3 5
    assert m.bundles == (0, 2, 1, 3) and m.nodes == ("n0", "n0", "n1", "n1")


def test_a_restart_keeps_ranks_in_their_bundles_and_a_lost_rank_takes_a_spare_on_its_groups_node():
    bundle_nodes = _nodes(3, 3, spread=True)  # n0: 0 2 4, n1: 1 3 5
    first = rank_map(bundle_nodes, 4, [2])
    assert rank_map(bundle_nodes, 4, [2], prefer=first.bundles).bundles == first.bundles
    # rank 2's bundle (1, on n1) is retired: rank 2 takes n1's spare (5), beside rank 3, not n0's
    after = list(bundle_nodes)
    after[1] = None
    m = rank_map(after, 4, [2], prefer=first.bundles, warm={4, 5})
    assert m.bundles == (0, 2, 5, 3) and m.kept == (2,)
    # rotate: every warmed spare left over takes a rank of its own node
    m = rank_map(bundle_nodes, 4, [2], prefer=first.bundles, warm={4, 5}, rotate=True)
    assert m.bundles == (4, 2, 5, 3) and m.nodes == first.nodes


def test_a_lost_node_moves_its_ranks_together_to_one_with_room():
    bundle_nodes = _nodes(2, 2, 2)  # n2: two spares
    first = rank_map(bundle_nodes, 4, [2])
    assert first.nodes == ("n0", "n0", "n1", "n1")
    lost = [None if n == "n0" else n for n in bundle_nodes]
    m = rank_map(lost, 4, [2], prefer=first.bundles, warm={4, 5})
    assert m.kept == (2,) and in_node(m.nodes, 2) == (2, 2) and "n0" not in m.nodes
    assert m.bundles[2:] == first.bundles[2:]  # the survivors' block stays where it ran


def test_a_shrunk_layout_keeps_whole_blocks():
    bundle_nodes = [None, "n0", "n1", "n1", "n2", None]
    m = rank_map(bundle_nodes, 2, [2], prefer=[0, 1, 2, 3, 4, 5])
    assert m.kept == (2,) and m.nodes == ("n1", "n1")


def test_bad_input_is_refused_with_clear_errors():
    with pytest.raises(ValueError, match="4 ranks need 4 usable bundles; 3 are usable"):
        rank_map(["a", "a", None, "b"], 4, [2])
    with pytest.raises(ValueError, match="group size 3 does not divide the world size 4"):
        rank_map(_nodes(4), 4, [3])
    with pytest.raises(ValueError, match="world=0"):
        rank_map(_nodes(4), 0)
    with pytest.raises(ValueError, match="group size 0"):
        rank_map(_nodes(4), 4, [0])


def test_summary_and_its_line():
    assert placement_groups(2, 1) == [("sp", 2)] and placement_groups(1, 1) == []
    assert placement_groups(8, 4, sp_inner=2) == [("sp inner", 2), ("ep", 4), ("sp", 8)]
    record = summary(["aa", "aa", "bb", "bb"], placement_groups(2, 4), 2, "pack")
    assert record == {"strategy": "pack", "nodes": ["aa", "aa", "bb", "bb"],
                      "within_node": {"sp": [2, 2], "ep": [0, 1]}, "dp_nodes": 2}
    assert describe(record) == ("placement pack: ranks 0-1 on node aa, ranks 2-3 on node bb; groups within a "
                                "node: sp 2/2, ep 0/1; dp spans 2 nodes")
    spread = summary(["aa", "bb", "bb", "aa"], placement_groups(2, 1), 2, "spread")
    assert describe(spread) == ("placement spread: rank 0 on node aa, ranks 1-2 on node bb, rank 3 on node aa; "
                                "groups within a node: sp 0/2; dp spans 2 nodes")
