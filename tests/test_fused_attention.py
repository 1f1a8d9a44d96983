"""Ring attention's fused block kernel (PyTorch's flash attention with its
LSE) against the explicit kernel and the single-process float64 reference,
on the ring cases: P = 2, 3, 4, both layouts, causal or not, GQA, packed
documents (partly explicit), with and without a gradient on the LSE."""
import pytest
import torch
import torch.distributed as dist

from loom.parallel import ring_attention, shard_sequence, unshard_sequence
from loom.parallel.fused_attention import KERNELS, resolve_kernel
from loom.parallel.ring_attention import make_spec

from helpers import value_error
from test_ring_attention import _bounds, _cu, _reference, _tensors

CASES = [dict(seed=1, layout="zigzag", causal=True, batch=2, seq_local=8, hq=4, hkv=2, d=8),
         dict(seed=2, layout="contiguous", causal=True, batch=1, seq_local=6, hq=2, hkv=2, d=4),
         dict(seed=3, layout="contiguous", causal=False, batch=2, seq_local=5, hq=6, hkv=2, d=8),
         dict(seed=4, layout="zigzag", causal=True, batch=1, seq_local=8, hq=2, hkv=1, d=8, lse_grad=False),
         dict(seed=5, layout="zigzag", causal=True, batch=1, seq_local=8, hq=4, hkv=2, d=8,
              docs=lambda total: _bounds(total, (5, 7, 1))),
         # the ring once per chunk of K/V heads (GQA groups stay together), plain and with documents
         dict(seed=6, layout="zigzag", causal=True, batch=2, seq_local=8, hq=4, hkv=2, d=8, head_chunks=2),
         dict(seed=7, layout="contiguous", causal=True, batch=1, seq_local=6, hq=6, hkv=3, d=4, head_chunks=3,
              docs=lambda total: _bounds(total, (4, 9)))]


def _run(case, kernel, dtype):
    """This rank's (out, lse, dq, dk, dv) shards with ``kernel``."""
    rank, size = dist.get_rank(), dist.get_world_size()
    full = _tensors(case, size, dtype)
    q, k, v, dout = (shard_sequence(t, rank, size, case["layout"]).clone() for t in full[:4])
    dlse = shard_sequence(full[4], rank, size, case["layout"], dim=2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ring_attention(q, k, v, causal=case["causal"], layout=case["layout"], cu_seqlens=_cu(case, size),
                              return_lse=True, kernel=kernel, head_chunks=case.get("head_chunks", 1))
    acc = lse.dtype  # float64 for float64, float32 otherwise
    loss = (out.to(acc) * dout.to(acc)).sum()
    if case.get("lse_grad", True):
        loss = loss + (lse * dlse.to(acc)).sum()
    return [t.detach() for t in (out, lse, *torch.autograd.grad(loss, (q, k, v)))]


def _kernels(dtype):
    return {kernel: [_run(case, kernel, dtype) for case in CASES] for kernel in ("explicit", "fused", "auto")}


def _unshard(shards, case, i):
    return unshard_sequence([s[i] for s in shards], case["layout"], dim=2 if i == 1 else 1).double()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("size", [2, 3, 4])
def test_fused_equals_explicit_and_the_reference_in_float32(distributed, size):
    per_rank = distributed(_kernels, size, torch.float32, timeout=180)
    for c, case in enumerate(CASES):
        ref = _reference(case, size)
        for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
            fused = _unshard([r["fused"][c] for r in per_rank], case, i)
            explicit = _unshard([r["explicit"][c] for r in per_rank], case, i)
            auto = _unshard([r["auto"][c] for r in per_rank], case, i)
            msg = f"{name} of case {c} at P={size}"
            torch.testing.assert_close(fused, explicit, atol=2e-5, rtol=1e-4, msg=msg)
            torch.testing.assert_close(fused, ref[i], atol=2e-5, rtol=1e-4, msg=msg)
            assert torch.equal(auto, fused), msg          # auto is the fused kernel on CPU in float32


@pytest.mark.timeout(120)
def test_fused_bfloat16_within_its_tolerance_and_float64_auto_stays_exact(distributed):
    per_rank = distributed(_kernels, 2, torch.bfloat16, timeout=100)
    for c, case in enumerate(CASES):
        ref = _reference(case, 2)
        for i in range(5):
            got = _unshard([r["fused"][c] for r in per_rank], case, i)
            scale = ref[i].abs().max().item()
            assert (got - ref[i]).abs().max().item() < 3e-2 * max(1.0, scale), (c, i)
    exact = distributed(_kernels, 2, torch.float64, timeout=100)
    for c, case in enumerate(CASES):
        ref = _reference(case, 2)
        for i in range(5):
            auto = _unshard([r["auto"][c] for r in exact], case, i)
            explicit = _unshard([r["explicit"][c] for r in exact], case, i)
            assert torch.equal(auto, explicit)                # auto keeps float64 on the explicit kernel
            torch.testing.assert_close(auto, ref[i], atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_kernel_takes_inputs_whose_head_dim_is_strided(dtype):
    """A q/k/v/dout whose last dim is strided (a slice of a wider tensor)
    reached the fused CPU kernel as a view, which read it as if contiguous."""
    g = torch.Generator().manual_seed(3)
    wide = [torch.randn(2, 12, h, 8, 2, generator=g, dtype=dtype) for h in (4, 2, 2, 4)]
    q, k, v, dout = (t[..., 1] for t in wide)                       # head dim stride 2
    assert q.stride(-1) == 2
    results = {}
    for kernel in ("explicit", "fused"):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))  # detach keeps the strides
        out, lse = ring_attention(qq, kk, vv, causal=True, kernel=kernel, return_lse=True,
                                  cu_seqlens=torch.tensor([0, 5, 12, 20, 24]))
        results[kernel] = [out, lse, *torch.autograd.grad((out * dout).sum() + lse.sum(), (qq, kk, vv))]
    tol = dict(atol=1e-10, rtol=0) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), results["explicit"], results["fused"]):
        torch.testing.assert_close(b.double(), a.double(), msg=name, **tol)
    out = ring_attention(q, k, v, causal=True, kernel="fused")   # and without documents: all fused blocks
    torch.testing.assert_close(out, ring_attention(q.contiguous(), k, v, causal=True, kernel="fused"), **tol)


def test_kernel_choice_and_the_tiles_it_fuses():
    assert KERNELS == ("auto", "fused", "explicit")
    assert resolve_kernel("auto", "cpu", torch.float32) == "fused"
    assert resolve_kernel("auto", "cpu", torch.bfloat16) == "fused"
    assert resolve_kernel("auto", "cpu", torch.float64) == "explicit"
    assert resolve_kernel("fused", "cpu", torch.float64) == "fused"
    assert resolve_kernel("explicit", "cpu", torch.float32) == "explicit"
    with pytest.raises(ValueError, match="must be one of auto, fused, explicit"):
        resolve_kernel("flash", "cpu", torch.float32)
    # zigzag causal at P=2: the own shard is one square lower triangle, the other pair is whole or half
    spec = make_spec(8, 2, "zigzag", causal=True, scale=1.0, tile_rows=2, kernel="fused")
    diagonal = spec.kernel_tiles(0, 0)
    assert [(r, c, m, f) for r, c, m, f in diagonal] == [(slice(0, 8), slice(0, 8), None, True)]
    assert all(f is False for *_, f in spec.kernel_tiles(1, 0))
    # packed documents: what the fused kernel cannot express is tiled for the explicit one
    docs = make_spec(8, 2, "zigzag", causal=True, scale=1.0, cu_seqlens=[0, 5, 16], tile_rows=2, kernel="fused")
    tiles = docs.kernel_tiles(0, 0)
    assert any(f is None for *_, f in tiles) and all(r.stop - r.start <= 2 for r, _, _, f in tiles if f is None)


def _unknown_kernel():
    q = torch.randn(1, 4, 2, 4)
    return value_error(lambda: ring_attention(q, q, q, kernel="flash"))


@pytest.mark.timeout(60)
def test_an_unknown_kernel_is_refused_on_every_rank(distributed):
    for message in distributed(_unknown_kernel, 2):
        assert "attention kernel 'flash' must be one of auto, fused, explicit" in message


TINY = dict(data="synthetic", vocab=32, dim=16, layers=2, heads=2, seq_len=16, batch_size=4, dtype="float32",
            lr=1e-2, warmup_steps=1, steps=4, progress=False)


def _train_kernels():
    from helpers import train_losses
    runs = [dict(dp=1, sp=2, attention_kernel=k) for k in ("explicit", "fused", "auto")]
    runs += [dict(dp=2, hdp=True, varlen_median=6, varlen_max=24, attention_kernel=k) for k in ("explicit", "fused")]
    runs += [dict(dp=1, sp=2, ring_head_chunks=2),  # the rings once per head: the same training
             dict(dp=2, hdp=True, varlen_median=6, varlen_max=24, ring_head_chunks=2)]
    return train_losses(TINY, runs)


@pytest.mark.timeout(200)
def test_loom_train_with_each_kernel_gives_the_same_float32_losses(distributed):
    """sp=2 ring attention and --hdp's rings: the fused kernel trains like the
    explicit one (float32 rounding apart); auto is the fused kernel here."""
    explicit, fused, auto, hdp_explicit, hdp_fused, chunked, hdp_chunked = distributed(_train_kernels, 2,
                                                                                       timeout=180)[0]
    assert explicit[-1] < explicit[0]
    assert max(abs(a - b) for a, b in zip(chunked, fused)) < 1e-5, (chunked, fused)
    assert max(abs(a - b) for a, b in zip(hdp_chunked, hdp_fused)) < 1e-5, (hdp_chunked, hdp_fused)
    assert max(abs(a - b) for a, b in zip(explicit, fused)) < 1e-4, (explicit, fused)
    assert auto == fused
    assert max(abs(a - b) for a, b in zip(hdp_explicit, hdp_fused)) < 1e-4, (hdp_explicit, hdp_fused)


def test_attention_kernel_is_validated():
    from loom.launch.config import ConfigError, build_config, validate
    with pytest.raises(ConfigError, match="--attention-kernel='flash' must be one of auto, fused, explicit"):
        validate(build_config(overrides=dict(TINY, dp=1, sp=2, attention_kernel="flash")), world_size=2)


@pytest.mark.parametrize("overrides, message", [
    (dict(dp=1, sp=2, ring_head_chunks=0), "--ring-head-chunks=0 must be a positive integer"),
    (dict(dp=2, ring_head_chunks=2), "no ring runs here"),
    (dict(dp=1, sp=2, heads=2, ring_head_chunks=4), r"--ring-head-chunks=4 must divide the 2 K/V heads each ring "
                                                    r"sees \(--kv-heads=2\)"),
    (dict(dp=1, sp=2, heads=4, kv_heads=2, ring_head_chunks=4), "must divide the 2 K/V heads"),
    (dict(dp=1, sp=4, heads=4, sp_attention="ulysses-ring", sp_inner=2, ring_head_chunks=4),
     r"must divide the 2 K/V heads each ring sees \(--kv-heads=4 over --sp-inner 2\)")])
def test_ring_head_chunks_is_validated(overrides, message):
    from loom.launch.config import ConfigError, build_config, validate
    world = overrides["dp"] * overrides.get("sp", 1)
    with pytest.raises(ConfigError, match=message):
        validate(build_config(overrides=dict(TINY, **overrides)), world_size=world)


def test_cuda_kernel_choice():
    """Which CUDA kernel takes a block (chosen here without a GPU)."""
    from loom.parallel.fused_attention import cuda_backend
    assert cuda_backend(torch.bfloat16, 64, (9, 0)) == "flash"
    assert cuda_backend(torch.float16, 256, (8, 0)) == "flash"
    assert cuda_backend(torch.bfloat16, 64, (7, 5)) == "efficient"  # no flash before sm80
    assert cuda_backend(torch.bfloat16, 320, (9, 0)) == "efficient"  # flash stops at head dim 256
    assert cuda_backend(torch.float32, 64, (9, 0)) == "efficient"
    assert cuda_backend(torch.float32, 12, (9, 0)) == "efficient"
    assert cuda_backend(torch.float32, 6, (9, 0)) is None  # misaligned: the explicit kernel
    assert cuda_backend(torch.bfloat16, 12, (9, 0)) is None
    assert cuda_backend(torch.float64, 64, (9, 0)) is None
    assert resolve_kernel("auto", "cuda", torch.float64, 64) == "explicit"
    assert resolve_kernel("auto", "cuda", torch.float32, 6) == "explicit"
    with pytest.raises(ValueError, match="no fused kernel returning the LSE for torch.float64"):
        resolve_kernel("fused", "cuda", torch.float64, 64)


@pytest.mark.parametrize("backend", ["flash", "efficient"])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_kernel_calls_line_up(monkeypatch, backend, causal):
    """The CUDA flash / memory-efficient calls on meta tensors: their
    signatures, the LSE the efficient kernel pads to 32 query rows (sliced
    out, padded back for its backward), GQA's K/V expansion and gradient sum.
    The numbers are PyTorch's kernels'; a GPU run checks them
    (benchmarks/sequence_parallel_cuda.py)."""
    from loom.parallel import fused_attention
    monkeypatch.setattr(fused_attention, "_backend", lambda device, dtype, head_dim: backend)
    b, sq, hq, hkv, d = 2, 40, 4, 2, 64
    meta = dict(device="meta", dtype=torch.bfloat16)
    q, k, v = torch.empty(b, sq, hq, d, **meta), torch.empty(b, sq, hkv, d, **meta), torch.empty(b, sq, hkv, d, **meta)
    out, lse = fused_attention.fused_block_forward(q, k, v, 0.125, causal)
    assert out.shape == (b, sq, hq, d) and out.dtype == torch.float32
    assert lse.shape == (b, hq, sq) and lse.dtype == torch.float32
    dk_acc = torch.zeros(b, hkv, sq, d, device="meta", dtype=torch.float32)
    dv_acc = torch.zeros_like(dk_acc)
    dq = fused_attention.fused_block_backward(q, k, v, out, out, lse, 0.125, causal, dk_acc, dv_acc)
    assert dq.shape == (b, sq, hq, d) and dk_acc.shape == dv_acc.shape == (b, hkv, sq, d)
    assert fused_attention._padded_lse(lse).shape == (b, hq, 64)
