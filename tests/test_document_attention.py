"""Document-aware attention: packed documents never attend to each other.

``cu_seqlens`` holds the document boundaries of a batch flattened row-major
(``[0, ..., batch * S_total]``, every row boundary included; the flash-attn
varlen convention).  Every kernel (local SDPA, ring attention in both layouts,
Ulysses) is compared in float64, forward and backward, with a single-process
reference that runs plain attention on each document separately; the
reference model is checked end to end (sp=1 and sp=2).
"""
import re

import pytest
import torch
import torch.nn.functional as F
import torch.distributed as dist

from loom import comms
from loom.parallel import (LinearAttention, ModelConfig, Transformer, apply_activation_checkpointing,
                           check_cu_seqlens, document_ids, enable_sequence_parallel, local_attention,
                           next_token_loss, ring_attention, sequence_parallel_core, shard_batch, shard_sequence,
                           ulysses_attention, unshard_sequence)
from loom.parallel.attention_blocks import Documents
from loom.parallel.hdp import HDPAttention
from loom.parallel.ring_attention import make_spec, ring_work, run_ring
from helpers import value_error

F64 = torch.float64
ATOL = 1e-10
S_LOCAL = 6            # per rank at sp=2: S_total = 12, zigzag chunks of 3


# ---------------------------------------------------------------- reference

def _row_bounds(cu, batch, total):
    """Each row's boundaries, 0 .. total (empty documents dropped)."""
    flat = [int(c) for c in cu]
    return [sorted({c - r * total for c in flat if r * total <= c <= (r + 1) * total}) for r in range(batch)]


def per_document_attention(q, k, v, cu, *, causal, scale=None):
    """Plain attention run separately on each document of each row."""
    b, total, hq, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    rep = hq // k.shape[2]
    rows = []
    for r, bounds in enumerate(_row_bounds(cu, b, total)):
        pieces = []
        for a, e in zip(bounds, bounds[1:]):
            qq = q[r, a:e]
            kk, vv = k[r, a:e].repeat_interleave(rep, 1), v[r, a:e].repeat_interleave(rep, 1)
            scores = torch.einsum("qhd,khd->hqk", qq, kk) * scale
            if causal:
                scores = scores.masked_fill(torch.ones(e - a, e - a, dtype=torch.bool).triu(1), float("-inf"))
            pieces.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv))
        rows.append(torch.cat(pieces, 0))
    return torch.stack(rows)


# ------------------------------------------------------------------- cases
# document layouts over 2 rows of S_total = 12 tokens (row 1 starts at 12)

DOCS = {
    "rows differ": [0, 5, 12, 15, 16, 21, 24],
    "at shard boundaries": [0, 6, 12, 15, 21, 24],          # 6: contiguous shards; 3, 9: zigzag chunks
    "empty documents": [0, 4, 4, 12, 12, 12, 13, 13, 20, 24, 24],
    "one per row": [0, 12, 24],
    "one row whole": [0, 12, 14, 17, 18, 24],
    "same rows": [0, 5, 9, 12, 17, 21, 24],
}


def _cases():
    cases, seed = [], 0
    for layout in ("contiguous", "zigzag"):
        for name, cu in DOCS.items():
            for hq, hkv in ((4, 2), (4, 1)) if name == "rows differ" else ((4, 2),):
                seed += 1
                cases.append(dict(seed=seed, layout=layout, docs=name, causal=True, hq=hq, hkv=hkv))
        for name, tile in (("rows differ", 2), ("empty documents", 1)):     # small tiles: per-row masks cut
            seed += 1
            cases.append(dict(seed=seed, layout=layout, docs=name, causal=True, hq=4, hkv=2, tile_rows=tile))
        seed += 1
        cases.append(dict(seed=seed, layout=layout, docs="empty documents", causal=False, hq=4, hkv=2))
    for name, (hq, hkv) in (("rows differ", (4, 4)), ("empty documents", (4, 1)), ("at shard boundaries", (4, 2))):
        seed += 1
        cases.append(dict(seed=seed, layout="contiguous", docs=name, causal=True, hq=hq, hkv=hkv, ulysses=True))
    return cases


def _tensors(case, size=2):
    g = torch.Generator().manual_seed(case["seed"])
    total = S_LOCAL * size
    q, k, v = (torch.randn(2, total, h, 4, generator=g, dtype=F64) for h in (case["hq"], case["hkv"], case["hkv"]))
    return q, k, v, torch.randn(2, total, case["hq"], 4, generator=g, dtype=F64)


def _cu(case, size=2):
    """The case's boundaries, stretched from S_total 12 to S_LOCAL * size."""
    return torch.tensor([c * size // 2 for c in DOCS[case["docs"]]], dtype=torch.int64)


def _reference(case):
    q, k, v, dout = _tensors(case)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = per_document_attention(q, k, v, _cu(case), causal=case["causal"])
    return [out.detach(), *torch.autograd.grad((out * dout).sum(), (q, k, v))]


def _shard_run(case, index, size):
    """(out, dq, dk, dv) shards at ring/group position ``index`` of ``size``."""
    layout = case["layout"]
    q, k, v, dout = (shard_sequence(t, index, size, layout).clone() for t in _tensors(case, size))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    cu = _cu(case, size)
    if case.get("ulysses"):
        out = ulysses_attention(q, k, v, causal=case["causal"], cu_seqlens=cu)
    elif case.get("tile_rows"):
        spec = make_spec(S_LOCAL, size, layout, causal=case["causal"], scale=0.5, cu_seqlens=cu,
                         tile_rows=case["tile_rows"])
        out = run_ring(q, k, v, comms.Ring(list(range(size))), spec)[0]
    else:
        out = ring_attention(q, k, v, causal=case["causal"], layout=layout, cu_seqlens=cu)
    return [out.detach(), *torch.autograd.grad((out * dout).sum(), (q, k, v))]


def _compare(case, shards):
    ref = _reference(case)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        got = unshard_sequence([s[i] for s in shards], case["layout"])
        torch.testing.assert_close(got, ref[i], atol=ATOL, rtol=0, msg=lambda m: f"{name} of {case}: {m}")


# ------------------------------------------------------- single process

def test_local_attention_matches_per_document_attention():
    for case in _cases():
        if case.get("ulysses") or case.get("tile_rows"):
            continue
        q, k, v, dout = (t.requires_grad_() for t in _tensors(case, 2))
        out = local_attention(q, k, v, causal=case["causal"], cu_seqlens=_cu(case))
        assert not out.isnan().any()
        got = [out.detach(), *torch.autograd.grad((out * dout).sum(), (q, k, v))]
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, _reference(case)):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{name} of {case}: {m}")


def test_ring_of_one_process_matches_per_document_attention():
    for case in _cases():
        if case["layout"] == "contiguous":   # a ring of one holds the whole sequence in either layout
            case = dict(case, ulysses=False)
            q, k, v, dout = (t.requires_grad_() for t in _tensors(case))
            if case.get("tile_rows"):
                spec = make_spec(12, 1, "contiguous", causal=True, scale=0.5, cu_seqlens=_cu(case),
                                 tile_rows=case["tile_rows"])
                out = run_ring(q, k, v, comms.Ring([0]), spec)[0]
            else:
                out = ring_attention(q, k, v, causal=case["causal"], cu_seqlens=_cu(case))
            got = [out.detach(), *torch.autograd.grad((out * dout).sum(), (q, k, v))]
            for a, b in zip(got, _reference(case)):
                torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_document_ids_and_plans():
    cu = torch.tensor(DOCS["empty documents"])
    ids = document_ids(cu, 2, 12)
    assert ids.shape == (2, 12) and ids.dtype == torch.int64
    # row 0: [0, 4) [4, 12); row 1: [0, 1) [1, 8) [8, 12); empty documents own no token
    assert [len(set(row.tolist())) for row in ids] == [2, 3]
    assert not set(ids[0].tolist()) & set(ids[1].tolist())      # rows never share a document
    assert ids[0, :4].unique().numel() == 1 and ids[0, 3] != ids[0, 4] and ids[1, 0] != ids[1, 1]
    # identical rows plan like batch 1 ([q, k] masks, the same work); different rows need [b, q, k]
    same = make_spec(6, 2, "zigzag", causal=True, scale=1.0, cu_seqlens=DOCS["same rows"])
    one = make_spec(6, 2, "zigzag", causal=True, scale=1.0, cu_seqlens=[0, 5, 9, 12])
    for i in range(2):
        for j in range(2):
            a, b = same.plan(i, j), one.plan(i, j)
            assert [(r, c) for r, c, _ in a] == [(r, c) for r, c, _ in b]
            assert all(m is None or m.dim() == 2 for *_, m in a)
            assert all((x is None and y is None) or torch.equal(x, y) for (*_, x), (*_, y) in zip(a, b))
    differ = make_spec(6, 2, "contiguous", causal=True, scale=1.0, cu_seqlens=DOCS["rows differ"])
    assert any(m is not None and m.shape[0] == 2 and m.dim() == 3 for *_, m in differ.plan(1, 1))
    # documents only remove work; the union over rows keeps what any row needs
    for layout in ("contiguous", "zigzag"):
        plain = ring_work(6, 2, layout, causal=True)
        for cu in DOCS.values():
            assert all(w <= p for w, p in zip(ring_work(6, 2, layout, causal=True, cu_seqlens=cu), plain))
    # a document per shard: position 1 skips position 0's keys, in every row
    assert ring_work(6, 2, "contiguous", causal=True) == [36, 72]
    assert ring_work(6, 2, "contiguous", causal=True, cu_seqlens=[0, 6, 12, 18, 24]) == [36, 36]
    assert Documents([0, 3, 8]).batch == 1                       # batch 1 as before


def test_bad_cu_seqlens_raise_clear_errors():
    bad = [
        (torch.tensor([0, 5, 24]), "row boundary r * S_total (documents never span rows): 12, where row 1 of 2"),
        (torch.tensor([0, 12, 20]), "from 0 to batch * S_total = 24 (batch=2, S_total=12"),
        (torch.tensor([0, 12, 30]), "got 0...30"),
        (torch.tensor([2, 12, 24]), "from 0 to batch * S_total = 24"),
        (torch.tensor([0, 7, 5, 12, 24]), "non-decreasing, got 7 then 5 at index 2"),
        (torch.tensor([0.0, 12.0, 24.0]), "1-D integer tensor, got a 1-D torch.float32 tensor"),
        (torch.tensor([[0, 12, 24]]), "1-D integer tensor, got a 2-D torch.int64 tensor"),
        ([0, 12, 24], "1-D integer tensor, got list"),
        (torch.tensor([], dtype=torch.int64), "got an empty tensor"),
    ]
    q = torch.randn(2, 12, 2, 4, dtype=F64)
    for cu, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_cu_seqlens(cu, 2, 12)
        with pytest.raises(ValueError, match="local_attention: .*" + re.escape(message)):
            local_attention(q, q, q, causal=True, cu_seqlens=cu)
        with pytest.raises(ValueError, match="ring_attention: .*" + re.escape(message)):
            ring_attention(q, q, q, causal=True, cu_seqlens=cu)
        with pytest.raises(ValueError, match="ulysses_attention: .*" + re.escape(message)):
            ulysses_attention(q, q, q, causal=True, cu_seqlens=cu)
    assert check_cu_seqlens(torch.tensor([0, 12, 12, 24], dtype=torch.int32), 2, 12) == [0, 12, 12, 24]


# ------------------------------------------------------------------ model

def _model(layers=2, **kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab=32, dim=16, layers=layers, heads=4, kv_heads=2, **kw)).double()


MODEL_CU = torch.tensor([0, 7, 16, 26, 32])    # row 0: [0, 7) [7, 16); row 1: [0, 10) [10, 16)


def _model_tokens():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(32, (2, 16), generator=g)
    perturbed = tokens.clone()
    perturbed[0, :7] = torch.randint(32, (7,), generator=g)     # document 1 of each row changes
    perturbed[1, :10] = torch.randint(32, (10,), generator=g)
    return tokens, perturbed


def test_documents_do_not_see_each_other_in_the_model():
    model = _model()
    tokens, perturbed = _model_tokens()
    with torch.no_grad():
        a, b = model(tokens, cu_seqlens=MODEL_CU), model(perturbed, cu_seqlens=MODEL_CU)
        torch.testing.assert_close(a[0, 7:], b[0, 7:], atol=1e-12, rtol=0)
        torch.testing.assert_close(a[1, 10:], b[1, 10:], atol=1e-12, rtol=0)
        assert (a[0, :7] - b[0, :7]).abs().max() > 1e-3           # document 1 itself did change
        plain_a, plain_b = model(tokens), model(perturbed)           # no documents: everything sees row start
        assert (plain_a[0, 7:] - plain_b[0, 7:]).abs().max() > 1e-3
        assert (plain_a[1, 10:] - plain_b[1, 10:]).abs().max() > 1e-3
        # one document per row is plain causal attention
        torch.testing.assert_close(model(tokens, cu_seqlens=torch.tensor([0, 16, 32])), plain_a, atol=1e-12, rtol=0)
    # activation checkpointing recomputes with the same documents: the same gradients
    grads = []
    for checkpointed in (False, True):
        model = _model()
        if checkpointed:
            apply_activation_checkpointing(model)
        next_token_loss(model(tokens, cu_seqlens=MODEL_CU), perturbed, reduction="sum").backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_cores_without_the_keyword_still_work_and_linear_layers_take_documents():
    model = _model()
    for block in model.blocks:   # a user's core that knows nothing of documents
        block.attn.core = lambda q, k, v, causal: local_attention(q, k, v, causal=causal)
    tokens, perturbed = _model_tokens()
    assert model(tokens).shape == (2, 16, 32)
    hybrid = _model(layers="linear,softmax")
    assert isinstance(hybrid.blocks[0].attn, LinearAttention) and hybrid(tokens).shape == (2, 16, 32)
    # linear layers keep documents apart too (tests/test_linear_attention_documents.py checks the numbers)
    logits, after = hybrid(tokens, cu_seqlens=MODEL_CU), hybrid(perturbed, cu_seqlens=MODEL_CU)
    torch.testing.assert_close(after[0, 7:], logits[0, 7:], rtol=0, atol=1e-12)
    torch.testing.assert_close(after[1, 10:], logits[1, 10:], rtol=0, atol=1e-12)
    q = torch.randn(1, 4, 2, 4, dtype=F64)
    hdp = HDPAttention(0, None, [(0, 4)])
    torch.testing.assert_close(hdp.softmax(q, q, q, causal=True, cu_seqlens=None),
                               local_attention(q, q, q, causal=True))
    with pytest.raises(ValueError, match="keeps documents apart itself"):
        hdp.softmax(q, q, q, causal=True, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="keeps documents apart itself"):
        hdp.linear(q, q, q, -q.abs(), cu_seqlens=torch.tensor([0, 4]))


# ------------------------------------------------------------ distributed

def _sp_model_run(attention, layout):
    """This rank's logits and parameter gradients at sp=2 with global cu_seqlens."""
    rank = dist.get_rank()
    model = _model()
    core = sequence_parallel_core(attention, ranks=[0, 1], layout=layout)
    enable_sequence_parallel(model, [0, 1], softmax_core=core)
    tokens, _ = _model_tokens()
    inputs, targets, positions = shard_batch(tokens, tokens.roll(-1, 1), rank, 2, layout)
    logits = model(inputs, positions, cu_seqlens=MODEL_CU)
    next_token_loss(logits, targets, reduction="sum").backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def _bad_calls():
    rank = dist.get_rank()
    q = torch.randn(2, 6, 2, 4, dtype=F64)
    errors = {}

    def attempt(name, fn):
        errors[name] = value_error(fn)

    ok = torch.tensor([0, 5, 12, 20, 24])
    attempt("missing row", lambda: ring_attention(q, q, q, causal=True, cu_seqlens=torch.tensor([0, 5, 24])))
    attempt("one rank bad", lambda: ring_attention(q, q, q, causal=True, layout="zigzag",
                                                   cu_seqlens=torch.tensor([0, 12, 30]) if rank == 1 else ok))
    other = torch.tensor([0, 3, 12, 20, 24]) if rank == 0 else ok
    attempt("ring differs", lambda: ring_attention(q, q, q, causal=True, cu_seqlens=other))
    attempt("ulysses differs", lambda: ulysses_attention(q, q, q, causal=True, cu_seqlens=other))
    attempt("ulysses bad", lambda: ulysses_attention(q, q, q, causal=True, cu_seqlens=torch.tensor([0, 12])))
    attempt("after", lambda: ring_attention(q, q, q, causal=True, cu_seqlens=ok))
    return errors


def _everything():
    rank, size = dist.get_rank(), dist.get_world_size()
    kernels = [_shard_run(case, rank, size) for case in _cases()]
    models = {(a, lay): _sp_model_run(a, lay)
              for a, lay in (("ring", "zigzag"), ("ring", "contiguous"), ("ulysses", "contiguous"))}
    return kernels, models, _bad_calls()


@pytest.mark.timeout(120)
def test_two_ranks_match_per_document_attention_and_fail_together(distributed):
    kernels, models, errors = zip(*distributed(_everything, 2, timeout=100))
    for i, case in enumerate(_cases()):
        _compare(case, [r[i] for r in kernels])

    # the model at sp=2 (global cu_seqlens, local shards) equals sp=1: logits and gradients
    model = _model()
    tokens, _ = _model_tokens()
    logits = model(tokens, cu_seqlens=MODEL_CU)
    next_token_loss(logits, tokens.roll(-1, 1), reduction="sum").backward()
    for (attention, layout), _ in models[0].items():
        got = unshard_sequence([m[(attention, layout)][0] for m in models], layout)
        torch.testing.assert_close(got, logits.detach(), atol=ATOL, rtol=0, msg=lambda m: f"{attention}: {m}")
        for name, p in model.named_parameters():
            grad = sum(m[(attention, layout)][1][name] for m in models)
            torch.testing.assert_close(grad, p.grad, atol=ATOL, rtol=0, msg=lambda m: f"{attention} {name}: {m}")

    for rank, e in enumerate(errors):   # every rank raises, no rank hangs
        assert "must contain every row boundary r * S_total" in e["missing row"]
        assert e["one rank bad"].endswith(
            "cu_seqlens must run from 0 to batch * S_total = 24 (batch=2, S_total=12: the global sequence "
            "length), got 0...30")
        assert rank == 1 or e["one rank bad"].startswith("rank 1: ValueError: ring_attention:")
        assert e["ring differs"] == "ring_attention: cu_seqlens differs across ranks [0, 1]: (differs)"
        assert e["ulysses differs"] == "ulysses_attention: cu_seqlens differs across ranks [0, 1]: (differs)"
        assert "ulysses_attention: cu_seqlens must run from 0 to batch * S_total = 24" in e["ulysses bad"]
        assert e["after"] is None


def _fake_varlen(with_window: bool, with_gqa: bool):
    """A stand-in for PyTorch's CUDA varlen flash attention on CPU tensors:
    SDPA on each [cu[i], cu[i+1]) segment of the flattened tokens, asked
    for causality either way PyTorch versions spell it."""
    calls = []

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=None, is_causal=None,
                    enable_gqa=False):
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
        bounds = cu_q.tolist()
        assert all(b > a for a, b in zip(bounds, bounds[1:])), "empty documents must be dropped"
        assert max_q == max_k == max(b - a for a, b in zip(bounds, bounds[1:]))
        causal = window_size == (-1, 0) if with_window else is_causal
        calls.append((causal, enable_gqa, k.shape[1]))
        out = torch.empty_like(q)
        for a, b in zip(bounds, bounds[1:]):
            seg = [t[a:b].transpose(0, 1) for t in (q, k, v)]
            out[a:b] = F.scaled_dot_product_attention(*seg, is_causal=causal, scale=scale,
                                                      enable_gqa=enable_gqa).transpose(0, 1)
        return out

    names = {"scale", "window_size" if with_window else "is_causal"} | ({"enable_gqa"} if with_gqa else set())
    return (varlen_attn, names), calls


@pytest.mark.parametrize("with_window,with_gqa", [(True, True), (False, False)])
def test_the_varlen_kernel_path_flattens_rows_and_drops_empty_documents(monkeypatch, with_window, with_gqa):
    """What `document_attention` hands CUDA's varlen flash attention (checked
    here with a CPU stand-in, both PyTorch spellings): the rows flattened,
    int32 boundaries without empty documents, causality, GQA -- equal to the
    masked SDPA path in float64."""
    from loom.parallel import varlen
    fake, calls = _fake_varlen(with_window, with_gqa)
    monkeypatch.setattr(varlen, "_varlen", lambda: fake)
    torch.manual_seed(0)
    q = torch.randn(2, 12, 4, 8, dtype=F64)
    k, v = torch.randn(2, 12, 2, 8, dtype=F64), torch.randn(2, 12, 2, 8, dtype=F64)
    cu = torch.tensor([0, 5, 5, 12, 16, 24])
    for causal in (True, False):
        want = varlen.document_attention(q, k, v, cu, None, causal=causal)  # no bounds: the mask path
        got = varlen._flash_varlen(q, k, v, cu.tolist(), causal=causal, scale=None)
        assert (got - want).abs().max().item() < 1e-12
    assert [c[0] for c in calls] == [True, False]
    assert all(c[1:] == ((True, 2) if with_gqa else (False, 4)) for c in calls)
    assert varlen.kernel_for(q.float(), None, cu.tolist()) == "sdpa-mask"  # not CUDA: the mask
