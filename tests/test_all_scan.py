"""All-Scan and its baselines against a sequential scan on one process (float64)."""
import collections

import pytest
import torch
import torch.distributed as dist

from loom import comms

D_K, D_V, LEAD = 5, 3, (2,)          # d_k = 5: blocks 2 and 3 do not divide it
BLOCKS = (1, 2, 3, D_K, 7)            # 7 > d_k is capped at d_k


def _pairs(world, kind, seed=0, lead=LEAD, d_k=D_K, d_v=D_V):
    """Every position's (decay, state), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.rand(world, *lead, d_k, generator=g, dtype=torch.float64)
    if kind == "zero":
        decay.zero_()
    elif kind == "one":
        decay.fill_(1.0)
    elif kind == "mixed":  # exact 0s and 1s among ordinary values
        decay[..., 0], decay[..., -1] = 0.0, 1.0
    state = torch.randn(world, *lead, d_k, d_v, generator=g, dtype=torch.float64)
    return decay, state


def sequential_scan(decay, state, reverse=False):
    """The exclusive scan over dim 0, one position after another."""
    out, acc = [None] * len(state), 0 * state[0]  # (keeps a graph even for one position)
    order = range(len(state) - 1, -1, -1) if reverse else range(len(state))
    for p in order:
        out[p] = acc
        acc = decay[p][..., None] * acc + state[p]
    return torch.stack(out)


def _variants(world):
    """(method, blocks, ranks) triples to try; ranks=None means the world group."""
    every = list(range(world))
    out = [("allscan", b, None) for b in BLOCKS]
    out += [("serial", 4, None), ("allgather", 4, None), ("allgather", 4, every)]  # collective / p2p
    out += [(m, 2, every[::-1]) for m in ("allscan", "serial", "allgather")]       # reversed ring
    if world >= 3:  # a ring over a subset of the ranks, in a scrambled order
        out += [(m, 2, [world - 1, 0, 1]) for m in ("allscan", "serial", "allgather")]
    return out


def _forward_cases():
    rank, world = dist.get_rank(), dist.get_world_size()
    worst = 0.0
    for kind in ("random", "zero", "one", "mixed"):
        decay, state = _pairs(world, kind)
        for method, blocks, ranks in _variants(world):
            ring = ranks or list(range(world))
            if rank not in ring:
                continue
            order = torch.tensor(ring)
            for reverse in (False, True):
                ref = sequential_scan(decay[order], state[order], reverse)[ring.index(rank)]
                got = comms.all_scan(decay[rank], state[rank], ranks=ranks, blocks=blocks,
                                     reverse=reverse, method=method)
                err = (got - ref).abs().max().item()
                assert err < 1e-12, (kind, method, blocks, ranks, reverse, err)
                worst = max(worst, err)
    return worst


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_all_scan_matches_sequential_scan(distributed, world):
    assert max(distributed(_forward_cases, world, timeout=200)) < 1e-12


def _group_cases():
    """Scans over the sp groups of a dp=2 x sp=2 mesh: the rings follow the group
    order; all-gather is a collective on the group; gradients flow."""
    mesh = comms.init_mesh(dp=2, sp=2)
    rank, ring = dist.get_rank(), list(mesh.sp_ranks)
    decay, state = _pairs(dist.get_world_size(), "mixed", seed=4)
    order = torch.tensor(ring)
    weights = torch.randn(state.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for method in ("allscan", "serial", "allgather"):
        for reverse in (False, True):
            d_ref, s_ref = decay[order].requires_grad_(), state[order].requires_grad_()
            ref = sequential_scan(d_ref, s_ref, reverse)
            (ref * weights[order]).sum().backward()
            d, s = decay[rank].clone().requires_grad_(), state[rank].clone().requires_grad_()
            got = comms.all_scan(d, s, group=mesh.sp_group, blocks=2, reverse=reverse, method=method)
            (got * weights[rank]).sum().backward()
            i = ring.index(rank)
            for a, b in ((got, ref[i]), (d.grad, d_ref.grad[i]), (s.grad, s_ref.grad[i])):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # a ring in the group's ranks but another order needs the same members
    got = comms.all_scan(decay[rank], state[rank], group=mesh.sp_group, ranks=ring[::-1], method="allgather")
    want = sequential_scan(decay[order.flip(0)], state[order.flip(0)])[ring[::-1].index(rank)]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    return [r.op for r in comms.records() if r.group.startswith("sp[")]


@pytest.mark.timeout(120)
def test_all_scan_over_mesh_groups(distributed):
    for ops in distributed(_group_cases, 4):
        assert ops.count("all_gather") == 2 * 2 + 1     # forward + backward per direction, + one


def _grad_cases():
    """Gradients of sum_p <W_p, out_p> against autograd through the sequential scan."""
    rank, world = dist.get_rank(), dist.get_world_size()
    decay, state = _pairs(world, "mixed", seed=1)
    weights = torch.randn(state.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for reverse in (False, True):
        d_ref, s_ref = decay.clone().requires_grad_(), state.clone().requires_grad_()
        loss = (sequential_scan(d_ref, s_ref, reverse) * weights).sum()
        d_ref.grad, s_ref.grad = torch.autograd.grad(loss, (d_ref, s_ref), allow_unused=True,
                                                     materialize_grads=True)
        for method in ("allscan", "serial", "allgather"):
            d, s = decay[rank].clone().requires_grad_(), state[rank].clone().requires_grad_()
            (comms.all_scan(d, s, blocks=3, reverse=reverse, method=method) * weights[rank]).sum().backward()
            torch.testing.assert_close(d.grad, d_ref.grad[rank], rtol=0, atol=1e-12)
            torch.testing.assert_close(s.grad, s_ref.grad[rank], rtol=0, atol=1e-12)
    return True


class _Replicated(torch.autograd.Function):
    """Identity on a tensor every rank holds equally; the gradient of the copy
    is the sum of every rank's part (each rank back-propagates its own slice)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return comms.all_reduce(g.clone())


class _GatherOutputs(torch.autograd.Function):
    """Every rank's output, stacked; the output gradient is the same on every rank,
    so each rank takes back only its own slice."""

    @staticmethod
    def forward(ctx, out):
        ctx.rank = dist.get_rank()
        return comms.all_gather(out.unsqueeze(0))

    @staticmethod
    def backward(ctx, g):
        return g[ctx.rank]


def _gradcheck_cases():
    """gradcheck of the global map (all decays, all states) -> all outputs, run
    in lockstep on every rank (gradcheck's perturbations are deterministic)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    decay, state = _pairs(world, "random", seed=3, lead=(2,), d_k=3, d_v=2)
    for method in ("allscan", "serial", "allgather"):
        for reverse in (False, True):
            def fn(d_all, s_all):
                d_all, s_all = _Replicated.apply(d_all), _Replicated.apply(s_all)
                out = comms.all_scan(d_all[rank], s_all[rank], blocks=2, reverse=reverse, method=method)
                return _GatherOutputs.apply(out)

            inputs = (decay.clone().requires_grad_(), state.clone().requires_grad_())
            assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)
    return True


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_all_scan_gradients(distributed, world):
    assert all(distributed(_grad_cases, world, timeout=200))
    if world in (2, 3):
        assert all(distributed(_gradcheck_cases, world, timeout=200))


def _message_counts():
    """Per method: (op, peer) -> (count, bytes) over one forward and one backward
    (without the agreement on the inputs, one tiny exchange that comes first)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    decay, state = _pairs(world, "random")
    out = {}
    for name, kw in {"allscan": dict(method="allscan", blocks=3), "serial": dict(method="serial"),
                     "allgather": dict(method="allgather"),
                     "allgather_p2p": dict(method="allgather", ranks=list(range(world)))}.items():
        d, s = decay[rank].clone().requires_grad_(), state[rank].clone().requires_grad_()
        comms.reset_trace()
        comms.all_scan(d, s, check=False, **kw).sum().backward()  # the scan's own messages only
        counts = collections.defaultdict(lambda: [0, 0])
        for rec in comms.records():
            if rec.op.startswith("agree"):  # the checked all_gather's agreement (gloo)
                continue
            key = (rec.op, rec.peer)
            counts[key][0] += 1
            counts[key][1] += rec.nbytes
        out[name] = {k: tuple(v) for k, v in counts.items()}
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 4])
def test_exact_message_counts(distributed, world):
    state_bytes = 2 * D_K * D_V * 8                 # one position's state, float64
    pair_bytes = 2 * D_K * (D_V + 1) * 8            # state plus decay, packed
    for rank, got in enumerate(distributed(_message_counts, world)):
        prev = rank - 1 if rank > 0 else None
        nxt = rank + 1 if rank < world - 1 else None
        for name, blocks in (("allscan", 3), ("serial", 1)):
            want = {}
            # forward: receive every piece from the predecessor, send every piece on;
            # backward (the reverse scan): the same in the other direction
            for frm, to in ((prev, nxt), (nxt, prev)):
                if frm is not None:
                    want[("recv", frm)] = (want.get(("recv", frm), (0, 0))[0] + blocks,
                                           want.get(("recv", frm), (0, 0))[1] + state_bytes)
                if to is not None:
                    want[("send", to)] = (want.get(("send", to), (0, 0))[0] + blocks,
                                          want.get(("send", to), (0, 0))[1] + state_bytes)
            assert got[name] == want, (rank, name, got[name])
        if world == 1:
            assert got["allgather"] == {} and got["allgather_p2p"] == {}
            continue
        assert got["allgather"] == {("all_gather", None): (2, 2 * pair_bytes)}
        others = [r for r in range(world) if r != rank]
        want = {(op, r): (2, 2 * pair_bytes) for r in others for op in ("send", "recv")}
        assert got["allgather_p2p"] == want, (rank, got["allgather_p2p"])


def _bad_inputs():
    rank = dist.get_rank()
    d, s = torch.rand(2, 4, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    cases = {
        "method": lambda: comms.all_scan(d, s, method="tree"),
        "blocks": lambda: comms.all_scan(d, s, blocks=0),
        "shape": lambda: comms.all_scan(d[:, :3], s),
        "state_dim": lambda: comms.all_scan(d[0, 0], s[0, 0, 0]),
        "dtype": lambda: comms.all_scan(d.float(), s),
        "decay_range": lambda: comms.all_scan(d + 1.5, s),
        "decay_nan": lambda: comms.all_scan(torch.full_like(d, float("nan")), s),
        "not_member": lambda: comms.all_scan(d, s, ranks=[1 - rank]),
        "duplicate": lambda: comms.all_scan(d, s, ranks=[0, 1, 0]),
        "out_of_range": lambda: comms.all_scan(d, s, ranks=[0, 1, 2]),
        "group_mismatch": lambda: comms.all_scan(d, s, group=dist.group.WORLD, ranks=[rank]),
    }
    messages = {}
    for name, call in cases.items():
        try:
            call()
        except ValueError as exc:
            messages[name] = str(exc)
    try:
        comms.all_scan(d.long(), s)
    except TypeError as exc:
        messages["type"] = str(exc)
    comms.barrier()  # nobody is stuck in a half-started scan
    return messages


@pytest.mark.timeout(120)
def test_bad_input_raises_before_any_message(distributed):
    for rank, msgs in enumerate(distributed(_bad_inputs, 2)):
        assert set(msgs) == {"method", "blocks", "shape", "state_dim", "dtype", "decay_range", "decay_nan",
                             "not_member", "duplicate", "out_of_range", "group_mismatch", "type"}, msgs
        assert "decay must be in [0, 1] everywhere (found nan)" in msgs["decay_nan"]
        assert "method='tree'" in msgs["method"] and "blocks=0" in msgs["blocks"]
        assert "(2, 3)" in msgs["shape"] and f"this rank ({rank}) is not in" in msgs["not_member"]
        assert "float32" in msgs["dtype"] and "[0, 1, 0]" in msgs["duplicate"]
