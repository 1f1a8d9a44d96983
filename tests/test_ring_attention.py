"""Ring and Ulysses attention against a naive single-process reference (float64).

Each distributed call runs many sub-cases on one pool of workers: every rank
builds the same global tensors from a seed, attends on its shard, and returns
its shard of the output, LSE and gradients; the test unshards them and
compares with the naive attention on the whole sequence.
"""
import itertools
import re

import pytest
import torch
import torch.distributed as dist

from loom import comms
from loom.parallel import ring_attention, shard_sequence, ulysses_attention, unshard_sequence
from loom.parallel.attention_blocks import block_backward, block_forward, merge_partials
from loom.parallel.ring_attention import make_spec, ring_work, run_ring

from helpers import train_losses, value_error

F64 = torch.float64
ATOL = 1e-10


# ---------------------------------------------------------------- reference

def naive_attention(q, k, v, *, causal, scale=None, cu_seqlens=None):
    """Full-matrix attention with the same masks: (out, lse)."""
    b, s, hq, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    rep = hq // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    pos = torch.arange(s)
    allowed = torch.ones(s, s, dtype=torch.bool)
    if causal:
        allowed &= pos[None, :] <= pos[:, None]
    if cu_seqlens is not None:
        doc = torch.searchsorted(cu_seqlens, pos, right=True) - 1
        allowed &= doc[:, None] == doc[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    p = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def _tensors(case, size, dtype=F64):
    """The global q, k, v and output/LSE cotangents of a case (same on every rank)."""
    g = torch.Generator().manual_seed(case["seed"])
    b, s, hq, hkv, d = case["batch"], case["seq_local"] * size, case["hq"], case["hkv"], case["d"]
    q, k, v = (torch.randn(b, s, h, d, generator=g, dtype=F64) for h in (hq, hkv, hkv))
    dout, dlse = torch.randn(b, s, hq, d, generator=g, dtype=F64), torch.randn(b, hq, s, generator=g, dtype=F64)
    return [t.to(dtype) for t in (q, k, v, dout, dlse)]


def _cu(case, size):
    return None if case.get("docs") is None else torch.tensor(case["docs"](case["seq_local"] * size))


def _reference(case, size):
    q, k, v, dout, dlse = _tensors(case, size)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = naive_attention(q, k, v, causal=case["causal"], scale=case.get("scale"),
                               cu_seqlens=_cu(case, size))
    with_lse = case.get("lse_grad", True)
    loss = (out * dout).sum() + ((lse * dlse).sum() if with_lse else 0)
    return [out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v))]


def _shard_run(case, index, size, ranks=None, dtype=F64):
    """This position's (out, lse, dq, dk, dv) shards from ring (or Ulysses) attention."""
    layout = case["layout"]
    full = _tensors(case, size, dtype)
    q, k, v, dout = (shard_sequence(t, index, size, layout).clone() for t in full[:4])
    dlse = shard_sequence(full[4], index, size, layout, dim=2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    if case.get("ulysses"):
        out = ulysses_attention(q, k, v, causal=case["causal"], scale=case.get("scale"))
        lse = None
        loss = (out.double() * dout.double()).sum()
    elif case.get("tile_rows"):  # the ring's own loop with small tiles (the API picks cache-sized ones)
        spec = make_spec(q.shape[1], size, layout, causal=case["causal"], scale=q.shape[-1] ** -0.5,
                         cu_seqlens=_cu(case, size), tile_rows=case["tile_rows"])
        out, lse = run_ring(q, k, v, comms.Ring(ranks or list(range(size))), spec)
    else:
        out, lse = ring_attention(q, k, v, causal=case["causal"], layout=layout, ranks=ranks,
                                  scale=case.get("scale"), cu_seqlens=_cu(case, size), return_lse=True)
    if lse is not None:
        with_lse = case.get("lse_grad", True)
        loss = (out.double() * dout.double()).sum() + ((lse.double() * dlse.double()).sum() if with_lse else 0)
    grads = torch.autograd.grad(loss, (q, k, v))
    return [out.detach(), None if lse is None else lse.detach(), *grads]


def _compare(case, size, shards, atol=ATOL, rtol=0.0):
    ref = _reference(case, size)
    layout = case["layout"]
    names = ("out", "lse", "dq", "dk", "dv")
    for i, name in enumerate(names):
        if shards[0][i] is None:
            continue
        got = unshard_sequence([s[i] for s in shards], layout, dim=2 if name == "lse" else 1)
        if name == "lse":
            assert got.dtype == (F64 if shards[0][0].dtype == F64 else torch.float32)
        torch.testing.assert_close(got.to(F64), ref[i], atol=atol, rtol=rtol,
                                   msg=lambda m: f"{name} of {_label(case)} at P={size}: {m}")


def _label(case):
    return {k: (v.__name__ if callable(v) else v) for k, v in case.items()}


# ------------------------------------------------------------------- cases

def _bounds(total, lengths):
    bounds = [0]
    for length in itertools.cycle(lengths):
        bounds.append(min(total, bounds[-1] + length))
        if bounds[-1] == total:
            return bounds


def _docs_cut(total):        # boundaries that do not line up with any shard
    return _bounds(total, (5, 7, 1))


def _docs_span(total):       # one document over every rank, one short tail
    return [0, total - 3, total]


def _docs_short(total):      # many short documents, one of them empty
    return _bounds(total, (1, 2, 3, 0))


def _ring_cases():
    cases, seed = [], 0
    for layout, causal, (hq, hkv) in itertools.product(("contiguous", "zigzag"), (True, False),
                                                      ((4, 4), (4, 2), (8, 2), (4, 1))):
        seed += 1
        cases.append(dict(seed=seed, layout=layout, causal=causal, batch=2, seq_local=6, hq=hq,
                          hkv=hkv, d=5))
    for layout, causal, docs in itertools.product(("contiguous", "zigzag"), (True, False),
                                                  (_docs_cut, _docs_span, _docs_short)):
        seed += 1
        cases.append(dict(seed=seed, layout=layout, causal=causal, batch=1, seq_local=6, hq=4, hkv=2,
                          d=3, docs=docs))
    for layout, causal, (tile, docs) in itertools.product(("contiguous", "zigzag"), (True, False),
                                                          ((2, None), (4, _docs_cut), (1, _docs_short))):
        seed += 1
        cases.append(dict(seed=seed, layout=layout, causal=causal, batch=1 if docs else 2, seq_local=6,
                          hq=4, hkv=2, d=3, docs=docs, tile_rows=tile))
    cases.append(dict(seed=99, layout="zigzag", causal=True, batch=2, seq_local=4, hq=2, hkv=1, d=4,
                      scale=0.3, lse_grad=False))
    return cases


def _ulysses_cases(size):
    hq = 6 if size == 3 else 4
    out = []
    for i, (causal, hkv) in enumerate(itertools.product((True, False), (hq, hq // 2, 1))):
        out.append(dict(seed=200 + i, layout="contiguous", causal=causal, batch=2, seq_local=5, hq=hq,
                        hkv=hkv, d=5, ulysses=True, lse_grad=False))
    return out


def _run_cases(cases):
    rank, size = dist.get_rank(), dist.get_world_size()
    return [_shard_run(case, rank, size) for case in cases]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("size", [2, 3, 4])
def test_ring_and_ulysses_match_naive_attention(distributed, size):
    cases = _ring_cases() + _ulysses_cases(size)
    per_rank = distributed(_run_cases, size, cases, timeout=240)
    for i, case in enumerate(cases):
        _compare(case, size, [r[i] for r in per_rank])


def test_ring_of_one_process_matches_naive_attention():
    for case in _ring_cases():
        _compare(case, 1, [_shard_run(case, 0, 1)])
    for layout in ("contiguous", "zigzag"):  # long enough for the API to cut blocks into tiles
        case = dict(seed=5, layout=layout, causal=True, batch=1, seq_local=384, hq=16, hkv=4, d=4)
        _compare(case, 1, [_shard_run(case, 0, 1)])


def test_inputs_are_not_modified():
    q, k, v = torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3)
    before = [t.clone() for t in (q, k, v)]
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ring_attention(q, k, v, causal=True, scale=0.7).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), before))


@pytest.mark.parametrize("chunks", [0, 3, -1, 1.0, True])
def test_head_chunks_must_divide_the_kv_heads(chunks):
    q, k = torch.randn(1, 4, 4, 3), torch.randn(1, 4, 2, 3)
    assert "head_chunks" in value_error(lambda: ring_attention(q, k, k, head_chunks=chunks))


def _float32_cases():
    rank, size = dist.get_rank(), dist.get_world_size()
    out = {}
    for layout in ("contiguous", "zigzag"):
        case = dict(seed=7, layout=layout, causal=True, batch=2, seq_local=32, hq=4, hkv=2, d=16)
        out[layout] = _shard_run(case, rank, size, dtype=torch.float32)
    case = dict(seed=8, layout="zigzag", causal=True, batch=1, seq_local=16, hq=2, hkv=1, d=8)
    bf16 = _shard_run(case, rank, size, dtype=torch.bfloat16)
    return out, (bf16[0].dtype, bf16[1].dtype, bf16[0].float())


@pytest.mark.timeout(180)
def test_float32_and_bfloat16_at_realistic_tolerances(distributed):
    per_rank = distributed(_float32_cases, 4, timeout=150)
    for layout in ("contiguous", "zigzag"):
        case = dict(seed=7, layout=layout, causal=True, batch=2, seq_local=32, hq=4, hkv=2, d=16)
        assert per_rank[0][0][layout][0].dtype == torch.float32
        _compare(case, 4, [r[0][layout] for r in per_rank], atol=2e-5, rtol=1e-4)
    case = dict(seed=8, layout="zigzag", causal=True, batch=1, seq_local=16, hq=2, hkv=1, d=8)
    out_dtype, lse_dtype, _ = per_rank[0][1]
    assert out_dtype == torch.bfloat16 and lse_dtype == torch.float32
    got = unshard_sequence([r[1][2] for r in per_rank], "zigzag")
    torch.testing.assert_close(got.double(), _reference(case, 4)[0], atol=3e-2, rtol=3e-2)


# ------------------------------------------------- rings, messages, failures

def _two_rings_and_message_counts():
    rank = dist.get_rank()
    ring = [3, 1] if rank in (3, 1) else [0, 2]
    index = ring.index(rank)
    case = dict(seed=11 + (rank in (3, 1)), layout="zigzag", causal=True, batch=2, seq_local=4,
                hq=4, hkv=2, d=3)
    comms.records(clear=True)
    two = _shard_run(case, index, 2, ranks=ring)
    peers = {r.peer for r in comms.records() if r.op in ("send", "recv")}

    # exact message counts on the whole world as one ring, forward and backward apart
    case4 = dict(seed=13, layout="zigzag", causal=True, batch=2, seq_local=4, hq=4, hkv=2, d=3)
    q, k, v, dout = (shard_sequence(t, rank, 4, "zigzag").clone() for t in _tensors(case4, 4)[:4])
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    counted = {}
    for chunks in (1, 2):
        comms.records(clear=True)
        out = ring_attention(q, k, v, causal=True, layout="zigzag", head_chunks=chunks)
        fwd = [(r.op, r.peer, r.nbytes) for r in comms.records(clear=True)]
        out.backward(dout)
        bwd = [(r.op, r.peer, r.nbytes) for r in comms.records(clear=True)]
        counted[chunks] = (fwd, bwd, out.detach(), q.grad, k.grad, v.grad)
        q.grad = k.grad = v.grad = None
    # causal contiguous: no block travels past the last position (those before its owner never read it)
    qc, kc, vc = (shard_sequence(t, rank, 4, "contiguous") for t in _tensors(case4, 4)[:3])
    comms.records(clear=True)
    ring_attention(qc, kc, vc, causal=True, layout="contiguous")
    counted["contiguous"] = [(r.op, r.peer, r.nbytes) for r in comms.records(clear=True)]
    # the ring borrows q, k, v: it sends them but never receives into them
    assert all(torch.equal(t, shard_sequence(f, rank, 4, "zigzag")) for t, f in zip((q, k, v), _tensors(case4, 4)))
    return two, peers, counted


@pytest.mark.timeout(180)
def test_two_disjoint_rings_at_once_and_exact_message_counts(distributed):
    results = distributed(_two_rings_and_message_counts, 4, timeout=150)
    for ring, seed in (([3, 1], 12), ([0, 2], 11)):
        case = dict(seed=seed, layout="zigzag", causal=True, batch=2, seq_local=4, hq=4, hkv=2, d=3)
        _compare(case, 2, [results[r][0] for r in ring])
        for r in ring:  # nobody talked outside its ring
            assert results[r][1] == {x for x in ring if x != r}
    for rank, (_, _, counted) in enumerate(results):
        for got, want in zip(counted[2][2:], counted[1][2:]):  # head chunks: the same result (float64)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for chunks in (1, 2):
        one = (2 * 4 * 2 * 3) * 8 // chunks      # K or V (or dK, dV: float64 here) of one head chunk, 2 kv heads
        half = one // 2                          # a zigzag shard's first chunk
        for rank, (_, _, counted) in enumerate(results):
            fwd, bwd = counted[chunks][:2]
            nxt, prev = (rank + 1) % 4, (rank - 1) % 4
            agree_bytes = (2 + 16) * 8                  # comms.agree: one row to and from every other member
            agreement = [x for x in fwd if x[2] == agree_bytes]
            assert sorted(agreement) == sorted([("send", r, agree_bytes) for r in range(4) if r != rank] +
                                               [("recv", r, agree_bytes) for r in range(4) if r != rank])
            fwd = [x for x in fwd if x[2] != agree_bytes]
            # causal zigzag: positions after block 0's owner read only its first chunk, so block 0 travels
            # as its first half (sent by position s at step s); every other block must reach a position
            # before its owner after wrapping round, so it travels whole.  K and V are separate messages.
            kv_sent = [half if s == rank else one for s in range(3) for _ in range(2 * chunks)]
            kv_received = [half if s + 1 == rank else one for s in range(3) for _ in range(2 * chunks)]
            assert sorted(x[2] for x in fwd if x[0] == "send") == sorted(kv_sent)
            assert sorted(x[2] for x in fwd if x[0] == "recv") == sorted(kv_received)
            assert all(x[1] == nxt for x in fwd if x[0] == "send")
            assert all(x[1] == prev for x in fwd if x[0] == "recv")
            # backward: the same K/V messages, then the dK/dV accumulators: after step t a position sends the
            # accumulator of block (rank - t); it holds only first-chunk columns until it has wrapped round
            grads_sent = [half if t <= rank else one for t in range(1, 4) for _ in range(2 * chunks)]
            assert sorted(x[2] for x in bwd if x[0] == "send") == sorted(kv_sent + grads_sent)
            assert all(x[1] == nxt for x in bwd if x[0] == "send")
    one = 2 * 4 * 2 * 3 * 8
    for rank, (_, _, counted) in enumerate(results):  # position r sends block r - s at steps s <= r, up to 3
        sends = [x[2] for x in counted["contiguous"] if x[0] == "send" and x[2] != (2 + 16) * 8]
        assert sends == [one] * 2 * [1, 2, 3, 0][rank], (rank, sends)


def _ring_basics():
    rank = dist.get_rank()
    out = {}
    ring = comms.Ring([3, 1] if rank in (3, 1) else [0, 2])
    out["pair"] = (ring.position, ring.next, ring.prev, ring.all_gather(torch.tensor([rank])).tolist())
    if rank != 1:  # a ring of three over [2, 0, 3] while rank 1 sits out
        three = comms.Ring([2, 0, 3])
        out["three"] = [(step, int(b)) for step, b in three.rotate(torch.tensor(float(rank)))]
    # two rings over the same edges, told apart by their tags even when the
    # ranks post their messages in opposite orders
    a, b = comms.Ring([0, 1, 2, 3], tag=1), comms.Ring([0, 1, 2, 3], tag=2)
    got_a, got_b = torch.empty(3), torch.empty(5)
    first, second = ((a, torch.full((3,), float(rank)), got_a), (b, torch.full((5,), -float(rank)), got_b))
    order = (first, second) if rank % 2 else (second, first)
    pending = [p for ring_, x, buf in order for p in ring_.shift(x, buf)]
    comms.wait_all(pending)
    out["tags"] = (got_a.tolist(), got_b.tolist())
    return out


@pytest.mark.timeout(120)
def test_ring_over_rank_lists(distributed):
    results = distributed(_ring_basics, 4, timeout=90)
    assert results[3]["pair"] == (0, 1, 1, [[3], [1]]) and results[1]["pair"] == (1, 3, 3, [[3], [1]])
    assert results[0]["pair"] == (0, 2, 2, [[0], [2]]) and results[2]["pair"] == (1, 0, 0, [[0], [2]])
    # position p holds the block of position p - step
    assert results[2]["three"] == [(0, 2), (1, 3), (2, 0)]
    assert results[0]["three"] == [(0, 0), (1, 2), (2, 3)]
    assert "three" not in results[1]
    for rank, r in enumerate(results):
        prev = (rank - 1) % 4
        assert r["tags"] == ([prev] * 3, [-prev] * 5)


def test_ring_rejects_bad_rank_lists():
    for bad, message in (([], "non-empty"), ([0, "a"], "not a global rank"), ([0, -1], "not a global rank"),
                         ([0, 1, 0], "twice"), ([5], "rank 0 is not in the ring"), ("01", "sequence")):
        with pytest.raises(ValueError, match=message):
            comms.Ring(bad)
    with pytest.raises(ValueError, match="tag"):
        comms.Ring([0], tag=-1)
    assert comms.Ring([0]).size == 1 and comms.world_ranks() == [0]


def _mismatches():
    rank = dist.get_rank()
    errors = {}

    def attempt(name, fn):
        errors[name] = value_error(fn)

    s = 6 if rank != 1 else 8   # rank 1 has a different seq_local
    q = torch.randn(1, s, 2, 4, dtype=F64)
    attempt("seq_local", lambda: ring_attention(q, q, q, causal=True, layout="zigzag"))
    odd = torch.randn(1, 5 if rank == 2 else 6, 2, 4, dtype=F64)  # only rank 2 is invalid
    attempt("one invalid", lambda: ring_attention(odd, odd, odd, layout="zigzag"))
    q = torch.randn(1, 4, 6, 4, dtype=F64)
    attempt("ulysses heads", lambda: ulysses_attention(q, q, q))
    u = torch.randn(1, 4 + (rank == 0), 4, 4, dtype=F64)
    attempt("ulysses seq_local", lambda: ulysses_attention(u, u, u))
    ok = torch.randn(1, 4, 4, 4, dtype=F64)  # the workers still work afterwards
    attempt("after", lambda: ring_attention(ok, ok, ok, causal=True))
    return errors


@pytest.mark.timeout(180)
def test_mismatches_raise_on_every_rank(distributed):
    results = distributed(_mismatches, 4, timeout=120)
    for rank, errors in enumerate(results):
        assert errors["seq_local"] == ("ring_attention: seq_local differs across ranks [0, 1, 2, 3]: "
                                       "rank 0: 6, rank 1: 8, rank 2: 6, rank 3: 6")
        # the rank with the bad input raises its reason; the others raise it too, naming it
        assert errors["one invalid"].endswith("seq_local=5 must be even for layout='zigzag'")
        assert rank == 2 or errors["one invalid"].startswith("rank 2: ValueError: ring_attention:")
        assert "heads_q=6 must divide by the group size 4" in errors["ulysses heads"]
        assert errors["ulysses seq_local"].startswith("ulysses_attention: seq_local differs across ranks "
                                                      "[0, 1, 2, 3]: rank 0: 5, rank 1: 4")
        assert errors["after"] is None


def test_bad_input_raises_clear_errors():
    q = torch.randn(1, 4, 4, 8)
    k = torch.randn(1, 4, 2, 8)
    bad = [
        (dict(q=q, k=torch.randn(1, 4, 2, 8), v=torch.randn(1, 4, 2, 7)), "must have the same shape"),
        (dict(q=q, k=torch.randn(1, 5, 2, 8), v=torch.randn(1, 5, 2, 8)), "must agree on batch"),
        (dict(q=q, k=k.double(), v=k.double()), "dtypes differ"),
        (dict(q=q, k=torch.randn(1, 4, 3, 8), v=torch.randn(1, 4, 3, 8)), "heads_q=4 must divide by heads_kv=3"),
        (dict(q=torch.randn(1, 5, 4, 8), k=torch.randn(1, 5, 2, 8), v=torch.randn(1, 5, 2, 8),
              layout="zigzag"), "seq_local=5 must be even"),
        (dict(q=q, k=k, v=k, cu_seqlens=torch.tensor([0, 3])), "from 0 to batch * S_total = 4"),
        (dict(q=q, k=k, v=k, cu_seqlens=torch.tensor([1, 4])), "from 0 to batch * S_total = 4"),
        (dict(q=q, k=k, v=k, cu_seqlens=torch.tensor([0, 3, 2, 4])), "non-decreasing"),
        (dict(q=q, k=k, v=k, cu_seqlens=torch.tensor([0.0, 4.0])), "1-D integer tensor"),
        (dict(q=q.expand(2, -1, -1, -1), k=k.expand(2, -1, -1, -1), v=k.expand(2, -1, -1, -1),
              cu_seqlens=torch.tensor([0, 4])), "from 0 to batch * S_total = 8 (batch=2, S_total=4"),
        (dict(q=q, k=k, v=k, layout="stripe"), "layout='stripe'"),
        (dict(q=q, k=k, v=k, scale=-1.0), "scale=-1.0"),
        (dict(q=q[0], k=k, v=k), "must be [batch, seq_local, heads, head_dim]"),
        (dict(q=q, k=k, v=k, ranks=[1, 2]), "rank 0 is not in the ring"),
        (dict(q=q, k=k, v=k, ranks=[0, 0]), "contain a rank twice"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            ring_attention(**kwargs)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        ring_attention([1], k, k)
    with pytest.raises(ValueError, match="heads_q=4 must divide by heads_kv=3"):
        ulysses_attention(q, torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))


# ---------------------------------------------------------------- the merge

def test_merge_is_nan_safe_on_minus_inf_rows():
    inf = float("-inf")
    out = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]], [[0.0, 0.0]]]], dtype=F64)   # [b=1, s=3, h=1, d=2]
    lse = torch.tensor([[[0.5, inf, inf]]], dtype=F64)
    out_b = torch.tensor([[[[3.0, 4.0]], [[5.0, 6.0]], [[0.0, 0.0]]]], dtype=F64)
    lse_b = torch.tensor([[[0.5, 1.0, inf]]], dtype=F64)
    merged, new = merge_partials(out, lse, out_b, lse_b)
    assert not merged.isnan().any() and not new.isnan().any()
    torch.testing.assert_close(merged[0, 0, 0], torch.tensor([2.0, 3.0], dtype=F64))  # equal weights
    torch.testing.assert_close(merged[0, 1, 0], torch.tensor([5.0, 6.0], dtype=F64))  # only the block
    assert merged[0, 2].eq(0).all() and new[0, 0, 2] == inf                              # nothing at all
    # merging in either order, or a split of the keys, equals the whole block
    q, k, v = torch.randn(1, 3, 2, 4, dtype=F64), torch.randn(1, 6, 1, 4, dtype=F64), torch.randn(1, 6, 1, 4, dtype=F64)
    whole = block_forward(q, k, v, 0.5)
    a, b = block_forward(q, k[:, :2], v[:, :2], 0.5), block_forward(q, k[:, 2:], v[:, 2:], 0.5)
    for parts in ((a, b), (b, a)):
        merged, new = merge_partials(*parts[0], *parts[1])
        torch.testing.assert_close(merged, whole[0], atol=1e-14, rtol=0)
        torch.testing.assert_close(new, whole[1], atol=1e-14, rtol=0)


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = torch.randn(1, 3, 2, 4, dtype=F64), torch.randn(1, 3, 1, 4, dtype=F64), torch.randn(1, 3, 1, 4, dtype=F64)
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    out, lse = block_forward(q, k, v, 0.5, mask)
    assert out[0, 1].eq(0).all() and lse[0, :, 1].eq(float("-inf")).all() and not out.isnan().any()
    delta = torch.randn(1, 2, 3, dtype=F64)
    dk, dv = torch.zeros(1, 1, 3, 4, dtype=F64), torch.zeros(1, 1, 3, 4, dtype=F64)
    dq = block_backward(q, k, v, torch.randn_like(q), lse, delta, 0.5, mask, dk, dv)
    assert not any(g.isnan().any() for g in (dq, dk, dv))
    assert dq[0, 1].eq(0).all()


# ----------------------------------------------------- layouts and balance

@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_unshard_round_trip(layout):
    x = torch.arange(2 * 24 * 3).reshape(2, 24, 3)
    for size, dim in itertools.product((1, 2, 3, 4), (1, -2)):
        shards = [shard_sequence(x, i, size, layout, dim=dim) for i in range(size)]
        assert torch.equal(unshard_sequence(shards, layout, dim=dim), x)
        assert sum(s.shape[1] for s in shards) == 24
    if layout == "zigzag":  # position i holds chunk i then chunk 2P-1-i
        assert shard_sequence(torch.arange(8), 1, 2, "zigzag", dim=0).tolist() == [2, 3, 4, 5]
        assert shard_sequence(torch.arange(8), 0, 2, "zigzag", dim=0).tolist() == [0, 1, 6, 7]
    with pytest.raises(ValueError, match="must divide by"):
        shard_sequence(torch.arange(10), 0, 3 if layout == "contiguous" else 2, layout, dim=0)
    with pytest.raises(ValueError, match="index=2 must be in"):
        shard_sequence(x, 2, 2, layout)


def test_shard_batch_positions_follow_the_layout():
    from loom.parallel import shard_batch, shard_positions
    tokens = torch.arange(16).reshape(1, 16) + 100
    for layout in ("contiguous", "zigzag"):
        for i in range(4):
            inputs, targets, pos = shard_batch(tokens, tokens + 1, i, 4, layout)
            assert torch.equal(inputs[0] - 100, pos) and torch.equal(targets, inputs + 1)
            assert torch.equal(pos, shard_positions(16, i, 4, layout))


def test_zigzag_balances_causal_work_and_contiguous_does_not():
    for size in (2, 3, 4, 8):
        zig = ring_work(64, size, "zigzag", causal=True)
        assert max(zig) == min(zig), zig
        con = ring_work(64, size, "contiguous", causal=True)
        assert con == sorted(con) and con[-1] == size * con[0]
        # causal halves the work of non-causal (plus the diagonal blocks)
        assert sum(zig) < 0.5 * sum(ring_work(64, size, "zigzag", causal=False)) + size * 64 * 64
        # with tiles, the diagonal blocks shrink to their lower triangle (at tile granularity)
        tiled = ring_work(64, size, "zigzag", causal=True, tile_rows=8)
        assert max(tiled) == min(tiled)
        full = 64 * 64 * size
        assert sum(tiled) == pytest.approx(full * size / 2, rel=0.1)


# ------------------------------------------------------- the training loop

_TRAIN = dict(data="synthetic", steps=3, batch_size=2, seq_len=16, dim=16, heads=2, layers=2, vocab=32, dtype="float64",
              progress=False, warmup_steps=1)


def _train_many(runs):
    return train_losses(_TRAIN, runs)


@pytest.mark.timeout(300)
def test_training_with_sp2_equals_sp1_float64(distributed):
    """The loss curve of sequence-parallel training (ring zigzag, ring
    contiguous, Ulysses; and dp=2 x sp=2 with GQA) equals one process's."""
    hybrid = dict(layers="linear,softmax")  # linear layers scan their state: contiguous shards
    (single,) = distributed(_train_many, 1, [dict(dp=1), dict(dp=1, kv_heads=1), dict(dp=1, **hybrid)],
                            timeout=150)
    two = distributed(_train_many, 2, [dict(dp=1, sp=2), dict(dp=1, sp=2, sp_layout="contiguous"),
                                       dict(dp=1, sp=2, sp_attention="ulysses"),
                                       dict(dp=1, sp=2, **hybrid)], timeout=240)
    four = distributed(_train_many, 4, [dict(dp=2, sp=2, kv_heads=1)], timeout=200)
    assert single[0][-1] < single[0][0]
    for rank_runs in two:
        for losses, ref in zip(rank_runs, (single[0], single[0], single[0], single[2])):
            assert max(abs(a - b) for a, b in zip(losses, ref)) < 1e-10, (losses, ref)
    for (losses,) in four:
        assert max(abs(a - b) for a, b in zip(losses, single[1])) < 1e-10, (losses, single[1])


@pytest.mark.parametrize("overrides,needle", [
    (dict(dp=1, sp=2, seq_len=6), r"--seq-len=6 must divide by 2\*sp=4 for zigzag sharding"),
    (dict(dp=1, sp=4, seq_len=6, sp_layout="contiguous"), r"--seq-len=6 must divide by sp=4"),
    (dict(dp=1, sp=2, sp_attention="ulysses", sp_layout="zigzag"), "needs --sp-layout contiguous"),
    (dict(dp=1, sp=4, sp_attention="ulysses", heads=2, dim=16), "--heads=2 must divide by --sp=4"),
    (dict(sp_attention="stripe"), "--sp-attention='stripe' must be ring, ulysses or ulysses-ring"),
    (dict(sp_layout="diagonal"), "--sp-layout='diagonal' must be auto, zigzag or contiguous"),
    (dict(dp=1, sp=2, layers="linear,softmax", sp_layout="zigzag"), "linear-attention layers need"),
])
def test_sequence_parallel_options_are_validated(overrides, needle):
    from loom.launch.config import ConfigError, build_config, validate
    with pytest.raises(ConfigError, match=needle):
        validate(build_config(overrides=overrides))


def test_auto_layout_follows_attention_and_layers():
    from loom.launch.config import build_config, sp_layout
    assert sp_layout(build_config(overrides=dict(sp=2))) == "zigzag"
    assert sp_layout(build_config(overrides=dict(sp=2, sp_attention="ulysses"))) == "contiguous"
    assert sp_layout(build_config(overrides=dict(sp=2, layers="linear,softmax"))) == "contiguous"
    assert sp_layout(build_config(overrides=dict(sp=2, sp_layout="contiguous"))) == "contiguous"
