"""Attacks on ring attention's fused block kernel (``kernel="auto"|"fused"|
"explicit"``) and its ``--attention-kernel`` option: each test states the
expected behaviour and fails while the problem is there.

Checked and found sound (not repeated here): fused vs explicit vs the float64
reference at seq_local 1 and 2, P=3 zigzag, head_dim 1, 24 heads, GQA 3:1
and 4:1, MQA, a custom scale, scale 100, documents aligned with shards /
cut across them / empty / non-causal, non-contiguous inputs, no_grad,
inference_mode, autocast(cpu, bf16), float16/bfloat16, float64 with
``kernel="fused"``, an LSE with and without a gradient, retain_graph,
batch 0 / seq 0, and different kernels on the ranks of one ring."""
import pytest
import torch
import torch.distributed as dist

from loom.parallel import ring_attention, shard_sequence, unshard_sequence
from loom.parallel.attention_blocks import tile_rows_for
from loom.parallel.ring_attention import make_spec

from test_ring_attention import _bounds, naive_attention

TINY = dict(data="synthetic", vocab=32, dim=16, layers=2, heads=2, seq_len=16, batch_size=4, dtype="float32",
            lr=1e-2, warmup_steps=1, steps=4, progress=False)


def _area(tiles):
    return sum((rows.stop - rows.start) * (cols.stop - cols.start) for rows, cols, *_ in tiles)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_fused_kernel_on_packed_documents_computes_no_more_than_the_explicit_kernel(layout):
    """Packed short documents (64 tokens, seq_local 2048, P=2): no tile is
    fusable, so ``kernel="fused"`` (and ``"auto"``, which picks it) runs the
    explicit kernel on every tile -- but `RingSpec.kernel_tiles` plans the
    pair untiled and then cuts rows while keeping the *whole pair's* column
    span, dropping plan_block's per-tile column narrowing.  Measured
    (contiguous, causal, seq_local 2048, h=4, P=2): 16x the score entries
    of ``kernel="explicit"`` (4.19M vs 0.26M per position), one position's
    fwd+bwd (d=32) 344 ms fused vs 247 ms explicit.  Expected: the tiles the
    fused path leaves to the explicit kernel cost no more than the explicit
    plan of the same pair."""
    seq_local, size = 2048, 2
    cu = _bounds(seq_local * size, (64,))
    common = dict(causal=True, scale=1.0, cu_seqlens=cu, tile_rows=tile_rows_for(1, 4, seq_local))
    explicit = make_spec(seq_local, size, layout, kernel="explicit", **common)
    fused = make_spec(seq_local, size, layout, kernel="fused", **common)
    for i in range(size):
        for j in range(size):
            left = _area([t for t in fused.kernel_tiles(i, j) if t[3] is None])
            planned = _area(explicit.kernel_tiles(i, j))
            assert left <= planned, f"pair ({i}, {j}): {left} score entries vs {planned} for kernel='explicit'"


def _double_backward(kernel):
    """Second derivative of sum(dL/dq) through ring attention (float64):
    ``("error", message, ok_after)`` or ``("value", gq, gk, gv shards)``."""
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(3)
    full = [torch.randn(1, 4 * size, 2, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    q, k, v = (shard_sequence(t, rank, size, "zigzag").clone().requires_grad_() for t in full)
    try:
        out = ring_attention(q, k, v, causal=True, layout="zigzag", kernel=kernel)
        dq, = torch.autograd.grad((out ** 2).sum(), q, create_graph=True)
        second = torch.autograd.grad(dq.sum(), (q, k, v), allow_unused=True)
        result = ("value", *[torch.zeros_like(q) if s is None else s.detach() for s in second])
    except RuntimeError as exc:
        result = ("error", str(exc))
    # the ring must still work afterwards (no message left in flight)
    plain = ring_attention(q.detach(), k.detach(), v.detach(), causal=True, layout="zigzag", kernel=kernel)
    return result + (bool(torch.isfinite(plain).all()),)


def _double_reference(size):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4 * size, 2, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    out, _ = naive_attention(q, k, v, causal=True)
    dq, = torch.autograd.grad((out ** 2).sum(), q, create_graph=True)
    return torch.autograd.grad(dq.sum(), (q, k, v))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kernel", ["fused", "explicit"])
def test_double_backward_is_refused_clearly_or_exact(distributed, kernel):
    """``torch.autograd.grad(..., create_graph=True)`` then a second grad,
    P=2, float64.  Now: ``kernel="fused"`` raises "a leaf Variable that
    requires grad is being used in an in-place operation" (the ``acc +=`` in
    `fused_block_backward`) at the ring's first backward step, with the
    rotating K/V still in flight, and the next ring_attention call on the
    same ranks then usually hangs (WorkerPool timeout; 4 runs of 5); ``kernel="explicit"`` returns second
    derivatives without complaint, but d2/dk is wrong (the dK/dV that travel
    the ring are outside the graph).  Expected: either a clear RuntimeError
    naming double backward (e.g. once_differentiable), raised before any
    message moves, with the ring left usable, or second derivatives equal to
    the float64 reference."""
    per_rank = distributed(_double_backward, 2, kernel, timeout=20)
    assert all(r[-1] for r in per_rank), "ring_attention failed after a double backward"
    if per_rank[0][0] == "error":
        message = per_rank[0][1]
        assert "double backward" in message or "differentiable" in message, message
        return
    ref = _double_reference(2)
    for i, name in enumerate(("q", "k", "v")):
        got = unshard_sequence([r[1 + i] for r in per_rank], "zigzag", dim=1)
        torch.testing.assert_close(got, ref[i], atol=1e-8, rtol=1e-6, msg=f"d2/d{name}")


def test_config_refuses_a_fused_kernel_cuda_does_not_have():
    """``--attention-kernel fused --device cuda --sp 2`` in float64 (no CUDA
    fused kernel takes it): once validate accepted it, and the job failed at
    the start banner on rank 0 only or at the first forward.  Expected: a
    ConfigError from validate naming --attention-kernel; float32 is accepted
    (the memory-efficient kernel takes it)."""
    from loom.launch.config import ConfigError, build_config, validate
    with pytest.raises(ConfigError, match="--attention-kernel fused: .*no fused kernel .*float64"):
        validate(build_config(overrides=dict(TINY, dp=1, sp=2, device="cuda", dtype="float64",
                                             attention_kernel="fused")), world_size=2)
    validate(build_config(overrides=dict(TINY, dp=1, sp=2, device="cuda", dtype="float32", attention_kernel="fused")),
             world_size=2)


@pytest.mark.parametrize("overrides", [dict(dp=1, sp=2, sp_attention="ulysses"), dict(dp=2, sp=1)],
                         ids=["ulysses", "no-sp-no-hdp"])
def test_config_reports_an_attention_kernel_that_no_ring_uses(overrides):
    """``--attention-kernel fused`` with ``--sp-attention ulysses`` (or with
    no sp and no --hdp): no ring attention runs, the choice is silently
    ignored (not even the start banner mentions it).  Expected: validate
    reports it (a ConfigError or a warning naming --attention-kernel)."""
    import warnings

    from loom.launch.config import ConfigError, build_config, validate
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            validate(build_config(overrides=dict(TINY, attention_kernel="fused", **overrides)), world_size=2)
        except ConfigError as exc:
            assert "--attention-kernel" in str(exc)
            return
    assert any("--attention-kernel" in str(w.message) for w in caught), "--attention-kernel fused silently ignored"


@pytest.mark.parametrize("attention", ["ring", "ulysses"])
def test_sequence_parallel_core_refuses_an_unknown_kernel(attention):
    """``sequence_parallel_core(attention, layout="contiguous",
    kernel="flash")``: accepted.  For "ring" the ValueError only comes at the
    first forward; for "ulysses" the bogus kernel is silently ignored
    forever.  Expected: ValueError naming the kernels (auto, fused,
    explicit) when the core is made, as for an unknown ``attention``."""
    from loom.parallel import sequence_parallel_core
    with pytest.raises(ValueError, match="auto, fused, explicit"):
        sequence_parallel_core(attention, layout="contiguous", kernel="flash")


def test_hdp_attention_refuses_an_unknown_kernel():
    """``HDPAttention(..., kernel="flash")`` is built without complaint
    (``local_kernel="flash"`` is refused there), so the mistake surfaces only
    inside a ring at the first microbatch with a multi-rank document.
    Expected: ValueError naming the kernels at construction, as for
    ``local_kernel``."""
    from loom.parallel.hdp import HDPAttention
    with pytest.raises(ValueError, match="auto, fused, explicit"):
        HDPAttention(0, None, [], kernel="flash")
