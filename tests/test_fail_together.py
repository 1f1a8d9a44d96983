"""Fail together, everywhere: ranks with no tokens take part correctly, and one
rank's bad input makes every rank raise at once, naming it (float64 against
one process; bounded time instead of a hang until the process-group timeout)."""

import pytest
import torch
import torch.distributed as dist

from loom import comms
from loom.parallel import MoE, linear_attention, local_linear_attention, ring_attention, ulysses_attention

from helpers import outcome

F64 = torch.float64
LENGTHS = [5, 0, 1, 4]  # per-rank shard lengths of one 10-token sequence, one rank empty


def _whole(seed=3):
    gen = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    q, k = (torch.randn(2, n, 2, 3, generator=gen, dtype=F64) for _ in range(2))
    v = torch.randn(2, n, 2, 4, generator=gen, dtype=F64)
    g = -torch.rand(2, n, 2, 3, generator=gen, dtype=F64)
    w = torch.randn(2, n, 2, 4, generator=gen, dtype=F64)
    return q, k, v, g, w


def _empty_rank_linear(method):
    rank = dist.get_rank()
    q, k, v, g, w = _whole()
    lo = sum(LENGTHS[:rank])
    sl = slice(lo, lo + LENGTHS[rank])
    mine = [t[:, sl].clone().requires_grad_() for t in (q, k, v, g)]
    out = linear_attention(*mine, method=method, chunk_size=4)
    (out * w[:, sl]).sum().backward()
    return out.detach(), [t.grad for t in mine]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["allscan", "serial", "allgather"])
def test_linear_attention_with_an_empty_rank_matches_one_process(distributed, method):
    q, k, v, g, w = _whole()
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
    ref = local_linear_attention(*leaves, chunk_size=4)
    (ref * w).sum().backward()
    lo = 0
    for n, (out, grads) in zip(LENGTHS, distributed(_empty_rank_linear, 4, method, timeout=60)):
        sl = slice(lo, lo + n)
        assert out.shape[1] == n
        torch.testing.assert_close(out, ref[:, sl].detach(), rtol=0, atol=1e-12)
        for got, leaf in zip(grads, leaves):
            torch.testing.assert_close(got, leaf.grad[:, sl], rtol=0, atol=1e-12)
        lo += n


def _empty_everywhere():
    """A batch with no tokens at all: ring attention and Ulysses return empty shards."""
    q = torch.randn(1, 0, 2, 4, dtype=F64, requires_grad=True)
    out = ring_attention(q, q, q, causal=True)
    out.sum().backward()
    u = ulysses_attention(q, q, q, causal=True)
    return tuple(out.shape), tuple(u.shape), tuple(q.grad.shape)


def test_ring_and_ulysses_with_no_tokens(distributed):
    for shapes in distributed(_empty_everywhere, 2, timeout=60):
        assert shapes == ((1, 0, 2, 4), (1, 0, 2, 4), (1, 0, 2, 4))


def _one_bad_rank(case):
    rank, world = dist.get_rank(), dist.get_world_size()
    bad = rank == 2

    def moe(width=8, dtype=torch.float32):
        mesh = comms.init_mesh(dp=world, ep=world)
        MoE(8, 16, 4, 2, ep_group=mesh.ep_group).to(dtype)(torch.randn(5, width, dtype=dtype))

    q3 = torch.randn(1, 3, 2 + bad, 4, dtype=F64)
    k = torch.randn(1, 3, 2, 4, dtype=F64)
    calls = {
        "linear_attention shape": lambda: linear_attention(torch.randn(1, 3, 2, 4 + bad, dtype=F64), k, k, -k.abs()),
        "linear_attention heads": lambda: linear_attention(q3, q3, q3, -q3.abs()),
        "all_scan": lambda: comms.all_scan(torch.ones(2, 3, dtype=F64), torch.zeros(2, 3, 4 + bad, dtype=F64)),
        "moe input": lambda: moe(width=7 if bad else 8),
        "moe dtype": lambda: moe(dtype=F64 if bad else torch.float32),
    }
    return outcome(calls[case])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case,reason", [
    ("linear_attention shape", "shapes disagree"),
    ("linear_attention heads", "heads differs across ranks [0, 1, 2, 3]: rank 0: 2, rank 1: 2, rank 2: 3"),
    ("all_scan", "state dim 2 differs across ranks [0, 1, 2, 3]: rank 0: 4, rank 1: 4, rank 2: 5"),
    ("moe input", "MoE expected input [..., 8], got shape (5, 7)"),
    ("moe dtype", "dtype differs"),
])
def test_one_bad_rank_fails_every_rank_at_once(distributed, case, reason):
    for rank, result in enumerate(distributed(_one_bad_rank, 4, case, timeout=120)):
        assert result != "no error", (case, rank)
        kind, message, seconds = result
        assert reason in message, (rank, message)
        assert seconds < 10, seconds
        if "differs" not in reason and rank != 2:  # the others name the rank that failed
            assert message.startswith("rank 2: ValueError:"), message


def _different_steps(url, what):
    from loom import checkpoint as ckpt
    rank = dist.get_rank()
    t = torch.arange(8.0).reshape(2, 4)
    state = {"w": ckpt.Shard(t[rank:rank + 1], (2, 4), (rank, 0))}
    try:
        if what == "save":
            ckpt.save(state, url, step=1 + rank)
        else:
            ckpt.save(state, url, step=1)
            ckpt.save(state, url, step=2)
            ckpt.load({"w": ckpt.Shard(torch.zeros(1, 4), (2, 4), (rank, 0))}, url, step=None if rank else 1)
        return "no error"
    except ValueError as exc:
        return str(exc)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("what,expect", [
    ("save", "save: ranks are saving different steps (rank 0: 1, rank 1: 2)"),
    ("load", "load: ranks ask for different steps (rank 0: 1, rank 1: latest)"),
])
def test_ranks_that_pass_different_steps_all_raise(distributed, tmp_path, what, expect):
    from loom import checkpoint as ckpt
    url = str(tmp_path / what)
    for message in distributed(_different_steps, 2, url, what, timeout=90):
        assert expect in message, message
    if what == "save":  # nothing half-saved
        assert ckpt.CheckpointStore(url).committed_steps() == []


def _chain_named_two_ways(case):
    rank = dist.get_rank()
    q = torch.randn(1, 3, 2, 4, dtype=F64)
    try:
        if case == "group or list":  # the same chain: rank 0 names it by list, rank 1 by the default group
            out = linear_attention(q, q, q, -q.abs(), ranks=[0, 1] if rank == 0 else None)
            return "ok", tuple(out.shape)
        if case == "orders differ":
            linear_attention(q, q, q, -q.abs(), ranks=[0, 1, 2] if rank else [0, 2, 1])
        return "no error"
    except ValueError as exc:
        return str(exc)


@pytest.mark.timeout(120)
def test_a_chain_named_by_group_or_by_list_is_the_same_chain(distributed):
    assert distributed(_chain_named_two_ways, 2, "group or list", timeout=60) == [("ok", (1, 3, 2, 4))] * 2
    messages = distributed(_chain_named_two_ways, 3, "orders differ", timeout=60)
    assert "chain (ranks in order) differs across ranks [0, 1, 2]" in messages[0], messages
    assert messages[0] == messages[1] == messages[2]  # the same words on every rank


def _hdp_bad(case):
    from loom.parallel import ModelConfig, Transformer, hdp_forward_backward, hdp_schedule
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab=32, dim=16, layers=1, heads=2)).double()
    lengths = [12, 5, 3]
    seqs = [torch.arange(n + 1) % 32 for n in lengths]
    if case == "float tokens" and rank == 1:
        seqs[1] = seqs[1].double()
    if case == "different batch" and rank == 1:
        seqs[0] = seqs[0].flip(0)
    try:
        hdp_forward_backward(model, seqs, hdp_schedule(lengths, 2, 8))
        return "no error"
    except ValueError as exc:
        return str(exc)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case,expect", [
    ("float tokens", "sequences[1] must be a 1-D integer tensor of token ids, got a torch.float64 tensor"),
    ("different batch", "tokens fingerprint differs across ranks"),
])
def test_hdp_agrees_on_the_batch(distributed, case, expect):
    for message in distributed(_hdp_bad, 2, case, timeout=90):
        assert expect in message, message


def _named_values():
    rank = dist.get_rank()
    q = torch.randn(1, 4, 2, 4, dtype=F64 if rank else torch.float32)
    out = {}
    for name, call in {"ring": lambda: ring_attention(q, q, q, causal=bool(rank)),
                       "ulysses": lambda: ulysses_attention(q, q, q),
                       "linear": lambda: linear_attention(q, q, q, -q.abs(),
                                                          method="serial" if rank else "allscan")}.items():
        try:
            call()
        except ValueError as exc:
            out[name] = str(exc)
    return out


def test_mismatches_name_the_values(distributed):
    for got in distributed(_named_values, 2, timeout=60):
        assert got["ring"].endswith("dtype differs across ranks [0, 1]: rank 0: float32, rank 1: float64"), got
        assert got["ulysses"].endswith("rank 0: float32, rank 1: float64"), got
        assert "dtype differs across ranks [0, 1]: rank 0: float32, rank 1: float64" in got["linear"], got
