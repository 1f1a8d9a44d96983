"""Gated linear attention on packed documents (``cu_seqlens``): the state
restarts at every document's first token.  Compared in float64, forward and
backward (q, k, v, log_decay), with a reference that runs the plain
recurrence separately on each document -- on one process, sharded over 2 and
4 ranks with every scan method, and in the hybrid model (sp=1 and sp=2)."""
import pytest
import torch
import torch.distributed as dist

from loom.parallel import (ModelConfig, Transformer, enable_sequence_parallel, linear_attention,
                           local_linear_attention, next_token_loss, sequence_parallel_core, shard_batch,
                           unshard_sequence)
from helpers import recurrence


B, H, D_K, D_V = 2, 2, 4, 3
ATOL = 1e-10


def per_document(q, k, v, g, rows, scale):
    """The reference: ``recurrence`` on each document of each row on its own
    (``rows[r]``: row r's cuts, 0 .. S), stitched back: outputs [b, S, h,
    d_v] and the state after every token [b, S, h, d_k, d_v]."""
    outs, states = [], []
    for r, cuts in enumerate(rows):
        pieces = [recurrence(*(t[r:r + 1, a:e] for t in (q, k, v, g)), scale)
                  for a, e in zip(cuts, cuts[1:]) if e > a]
        outs.append(torch.cat([o for o, _ in pieces], 1))
        states.append(torch.cat([s for _, s in pieces], 1))
    return torch.cat(outs), torch.cat(states)


def flatten(rows, seq):
    """cu_seqlens from per-row cuts (each 0 .. seq; repeats are empty documents)."""
    bounds = [0]
    for r, cuts in enumerate(rows):
        bounds += [r * seq + c for c in cuts[1:]]
    return torch.tensor(bounds, dtype=torch.int64)


def inputs(seq, seed=0, dtype=torch.float64, edges=True):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, seq, H, D_K, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(B, seq, H, D_V, generator=gen, dtype=dtype)
    g = -torch.rand(B, seq, H, D_K, generator=gen, dtype=dtype) * 1.5
    if edges and seq > 3:  # a decay of exactly 0 and exactly 1 inside documents, as without them
        g[0, seq // 3, 1, 2] = float("-inf")
        g[1, seq // 2] = 0.0
    return q, k, v, g


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


SEQ = 32
ROWS = {  # per row: its cuts (S = 32); row 0 and row 1 always differ
    "one document": [[0, SEQ], [0, SEQ]],
    "chunk boundaries": [[0, 8, 16, SEQ], [0, 24, SEQ]],
    "inside chunks": [[0, 3, 4, 13, 30, 31, SEQ], [0, 1, 21, SEQ]],
    "empty documents": [[0, 0, 5, 5, 5, 18, SEQ, SEQ], [0, 11, 11, SEQ]],
    "every token": [list(range(SEQ + 1)), [0, 2, 4, SEQ]],
}


def _check(rows, chunk, fn=local_linear_attention):
    q, k, v, g = leaves(*inputs(SEQ))
    out, state = fn(q, k, v, g, chunk_size=chunk, scale=0.7, return_final_state=True,
                    cu_seqlens=flatten(rows, SEQ))
    rq, rk, rv, rg = leaves(q, k, v, g)
    ref, ref_states = per_document(rq, rk, rv, rg, rows, 0.7)
    gen = torch.Generator().manual_seed(1)
    w_o, w_s = torch.randn(out.shape, generator=gen, dtype=out.dtype), torch.randn(state.shape, generator=gen,
                                                                                  dtype=out.dtype)
    ((out * w_o).sum() + (state * w_s).sum()).backward()
    ((ref * w_o).sum() + (ref_states[:, -1] * w_s).sum()).backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(state, ref_states[:, -1], rtol=0, atol=ATOL)
    for name, got, want in zip("q k v log_decay".split(), (q, k, v, g), (rq, rk, rv, rg)):
        assert torch.isfinite(got.grad).all(), name
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=ATOL, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("case", sorted(ROWS))
@pytest.mark.parametrize("chunk", [1, 4, 8, 13, 20, 64])
def test_local_layer_restarts_at_every_document(case, chunk):
    # chunks of 4 and 8 put the boundaries of "chunk boundaries" on chunk
    # starts; 13 and 20 (intra-chunk blocks of 16) cut documents anywhere
    _check(ROWS[case], chunk)


def test_chain_of_one_takes_the_same_documents():
    # linear_attention without a process group: a chain of one, offset 0
    for case in ("inside chunks", "empty documents"):
        _check(ROWS[case], 8, fn=linear_attention)


def test_documents_never_see_each_other_float32():
    """float32: no NaN, the per-document reference at a realistic tolerance, and
    what document 1 holds (values 1e3 times larger, decays of 1) leaves
    document 2 bit for bit unchanged: every factor across a start is an exact 0."""
    rows = ROWS["inside chunks"]
    cu = flatten(rows, SEQ)
    q, k, v, g = (t.float() for t in inputs(SEQ))
    out = local_linear_attention(q, k, v, g, chunk_size=8, cu_seqlens=cu)
    ref, _ = per_document(*(t.double() for t in (q, k, v, g)), rows, 1.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    loud = [t.clone() for t in (q, k, v, g)]
    for t in loud[:3]:
        t[0, :13] = t[0, :13] * 1e3                 # row 0, documents [0, 3) [3, 4) [4, 13)
    loud[3][0, :13] = 0.0                           # and decays of exactly 1
    leaves_ = leaves(*loud)
    again = local_linear_attention(*leaves_, chunk_size=8, cu_seqlens=cu)
    assert torch.equal(again[0, 13:], out[0, 13:]) and torch.equal(again[1], out[1])
    again.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves_)
    assert torch.equal(leaves_[3].grad[0, 13], torch.zeros(H, D_K))   # a start's own decay is unused


def test_bad_boundaries_are_clear_value_errors():
    q, k, v, g = inputs(8, edges=False)
    for fn in (local_linear_attention, linear_attention):
        for cu, needle in ((torch.tensor([0.0, 16.0]), "must be a 1-D integer tensor"),
                           (torch.tensor([0, 5, 16]), "must contain every row boundary"),
                           (torch.tensor([0, 8, 12]), "must run from 0 to batch \\* S_total = 16"),
                           (torch.tensor([0, 8, 6, 16]), "must be non-decreasing")):
            with pytest.raises(ValueError, match=needle):
                fn(q, k, v, g, cu_seqlens=cu)


# ------------------------------------------------------------- sharded

L = 6  # tokens per rank


def _sharded_rows(world):
    s = L * world
    return {
        "shard boundaries": [[0, L, L, s], [0, s - L, s]],                    # a start on a shard's first token
        "inside shards": [[0, 2, L + 3, s - 1, s], [0, s]],                    # 1-token documents too
        "many": [list(range(0, s + 1, 2)), [0, 1, 1, L + 1, s]],
    }


def _sharded_run(rows, lengths, ring, method, chunk, dtype=torch.float64):
    """This rank's output, final state and gradients, and the reference's."""
    pos = ring.index(dist.get_rank())
    seq = sum(lengths)
    lo = sum(lengths[:pos])
    sl = slice(lo, lo + lengths[pos])
    q, k, v, g = inputs(seq, seed=len(lengths), dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    w_o = torch.randn(B, seq, H, D_V, generator=gen, dtype=torch.float64)
    w_s = torch.randn(len(lengths), B, H, D_K, D_V, generator=gen, dtype=torch.float64)
    lq, lk, lv, lg = leaves(*(t[:, sl] for t in (q, k, v, g)))
    out, state = linear_attention(lq, lk, lv, lg, ranks=ring, method=method, chunk_size=chunk, scale=0.5,
                                  return_final_state=True, cu_seqlens=flatten(rows, seq))
    if dtype != torch.float64:
        return out.detach(), per_document(*(t.double() for t in (q, k, v, g)), rows, 0.5)[0][:, sl]
    ((out * w_o[:, sl]).sum() + (state * w_s[pos]).sum()).backward()
    rq, rk, rv, rg = leaves(q, k, v, g)
    ref, states = per_document(rq, rk, rv, rg, rows, 0.5)
    # every rank's boundary state: the state after its last token (none before an empty first shard)
    ends = [sum(lengths[:p + 1]) - 1 for p in range(len(lengths))]
    boundary = torch.stack([states[:, e] if e >= 0 else torch.zeros_like(states[:, 0]) for e in ends])
    ((ref * w_o).sum() + (boundary * w_s).sum()).backward()
    pairs = [("out", out, ref[:, sl]), ("state", state, boundary[pos])]
    pairs += [(f"d{n}", t.grad, r.grad[:, sl]) for n, t, r in zip(("q", "k", "v", "log_decay"), (lq, lk, lv, lg),
                                                                    (rq, rk, rv, rg))]
    return max((got - want).abs().max().item() if got.numel() else 0.0 for _, got, want in pairs)


def _sharded_cases():
    world = dist.get_world_size()
    chain = list(range(world))
    errors = {}
    for name, rows in _sharded_rows(world).items():
        for method, chunk in (("allscan", 1), ("allscan", 4), ("allscan", 64), ("serial", 4), ("allgather", 4)):
            errors[name, method, chunk] = _sharded_run(rows, [L] * world, chain, method, chunk)
        # the chain in another order: position p still holds slice p
        errors[name, "reversed"] = _sharded_run(rows, [L] * world, chain[::-1], "allscan", 4)
    # shards of different lengths, an empty one too: offsets from the agreed lengths
    lengths = [5, 9] if world == 2 else [5, 0, 7, 4]
    seq = sum(lengths)
    uneven = [[0, 3, 5, 5, 11, seq], [0, 14, seq]]
    for method in ("allscan", "serial", "allgather"):
        errors["uneven", method] = _sharded_run(uneven, lengths, chain, method, 4)
    f32 = _sharded_run(_sharded_rows(world)["inside shards"], [L] * world, chain, "allscan", 4, torch.float32)
    return errors, f32, _bad_sharded_calls()


def _bad_sharded_calls():
    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v, g = (t[:, :L] for t in inputs(L * world, edges=False))
    good = flatten([[0, 3, L * world], [0, L * world]], L * world)
    messages = {}
    for name, cu in (("one rank differs", good if rank else torch.tensor([0, 1, L * world, 2 * L * world])),
                     ("wrong end", torch.tensor([0, L * world, 2 * L * world + 1])),
                     ("one rank without", None if rank == world - 1 else good),
                     ("after", good)):
        try:
            linear_attention(q, k, v, g, cu_seqlens=cu)
            messages[name] = None
        except ValueError as exc:
            messages[name] = str(exc)
    return messages


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_layer_restarts_at_every_document(distributed, world):
    results = distributed(_sharded_cases, world, timeout=280)
    for rank, (errors, (out32, ref32), bad) in enumerate(results):
        for case, err in errors.items():
            assert err < ATOL, (rank, case, err)
        assert torch.isfinite(out32).all()
        torch.testing.assert_close(out32.double(), ref32, rtol=1e-4, atol=1e-4)
        # every rank raises, none hangs, and the next call works
        assert bad["one rank differs"] == f"linear_attention: cu_seqlens differs across ranks " \
                                          f"{list(range(world))}: (differs)"
        assert bad["one rank without"] == bad["one rank differs"]
        assert f"cu_seqlens must run from 0 to batch * S_total = {2 * L * world}" in bad["wrong end"]
        assert bad["after"] is None


# ---------------------------------------------------------------- the model

MODEL = dict(vocab=32, dim=16, heads=2, layers="linear,softmax")
MODEL_SEQ = 16
MODEL_ROWS = [[0, 7, MODEL_SEQ], [0, 10, MODEL_SEQ]]


def _model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(**MODEL)).double()


def _tokens():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(MODEL["vocab"], (B, MODEL_SEQ), generator=g)
    changed = tokens.clone()
    changed[0, :7] = torch.randint(MODEL["vocab"], (7,), generator=g)    # document 1 of each row
    changed[1, :10] = torch.randint(MODEL["vocab"], (10,), generator=g)
    return tokens, changed


def test_hybrid_model_keeps_documents_apart():
    model, (tokens, changed) = _model(), _tokens()
    cu = flatten(MODEL_ROWS, MODEL_SEQ)
    logits, after = model(tokens, cu_seqlens=cu), model(changed, cu_seqlens=cu)
    torch.testing.assert_close(after[0, 7:], logits[0, 7:], rtol=0, atol=1e-12)
    torch.testing.assert_close(after[1, 10:], logits[1, 10:], rtol=0, atol=1e-12)
    # without the boundaries document 2 sees document 1, through both layer kinds
    assert not torch.allclose(model(changed)[0, 7:], model(tokens)[0, 7:])
    # document 2 alone: the same logits as inside the packed row
    alone = model(tokens[:1, 7:], torch.arange(7, MODEL_SEQ))
    torch.testing.assert_close(alone[0], logits[0, 7:], rtol=0, atol=ATOL)


def _sp_model_run():
    rank = dist.get_rank()
    model, (tokens, _) = _model(), _tokens()
    core = sequence_parallel_core("ring", ranks=[0, 1], layout="contiguous")
    enable_sequence_parallel(model, [0, 1], softmax_core=core, linear_method="allscan")
    inputs_, targets, positions = shard_batch(tokens, tokens.roll(-1, 1), rank, 2, "contiguous")
    logits = model(inputs_, positions, cu_seqlens=flatten(MODEL_ROWS, MODEL_SEQ))
    next_token_loss(logits, targets, reduction="sum").backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.timeout(120)
def test_hybrid_model_sp2_equals_sp1(distributed):
    shards = distributed(_sp_model_run, 2, timeout=100)
    model, (tokens, _) = _model(), _tokens()
    logits = model(tokens, cu_seqlens=flatten(MODEL_ROWS, MODEL_SEQ))
    next_token_loss(logits, tokens.roll(-1, 1), reduction="sum").backward()
    torch.testing.assert_close(unshard_sequence([s[0] for s in shards], "contiguous"), logits.detach(),
                               rtol=0, atol=ATOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(sum(s[1][name] for s in shards), p.grad, rtol=0, atol=ATOL, msg=name)


# ------------------------------------------------------------ training

def _train(overrides):
    from loom.launch.config import build_config, validate
    from loom.launch.train import train
    cfg = validate(build_config(overrides=overrides), world_size=dist.get_world_size())
    return train(cfg)["losses"]


@pytest.mark.timeout(300)
def test_hybrid_model_trains_on_documents_alike_at_sp1_and_sp2(distributed, tmp_path):
    """`loom train --layers linear,softmax --data` (no --cross-document-attention):
    float64 losses equal at sp=1 and sp=2, and differ from cross-document packing."""
    import numpy as np
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, size=80)
    np.save(tmp_path / "docs.npy", rng.integers(0, 64, size=int(lengths.sum())).astype(np.uint16))
    np.save(tmp_path / "docs.docs.npy", np.cumsum([0, *lengths[:-1]]).astype(np.int64))
    base = dict(vocab=64, dim=16, heads=2, layers="linear,softmax", seq_len=16, batch_size=4, dtype="float64",
                lr=1e-2, warmup_steps=1, progress=False, val_fraction=0.0, eval_every=0, steps=3,
                data=str(tmp_path / "docs.npy"))
    one = distributed(_train, 1, {**base, "dp": 1}, timeout=150)[0]
    crossed = distributed(_train, 1, {**base, "dp": 1, "cross_document_attention": True}, timeout=150)[0]
    two = distributed(_train, 2, {**base, "dp": 1, "sp": 2}, timeout=200)
    for losses in two:
        np.testing.assert_allclose(losses, one, rtol=0, atol=1e-10)
    assert not np.allclose(one, crossed)
