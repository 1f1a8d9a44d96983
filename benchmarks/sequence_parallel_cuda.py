"""Ring attention's fused block kernels on the device they run on (CUDA
where one is lent; CPU runs the same checks with its own fused kernel).

    python benchmarks/sequence_parallel_cuda.py [--device cuda] [--out benchmarks/results/sequence_parallel_cuda.json]

A ring computes each (query shard, key shard) pair with a block kernel,
merges the partial outputs by their LSE, and in backward feeds every pair
the *merged* output and LSE.  This script does exactly that in one process
(`fused_block_forward`, `merge_partials`, `fused_block_backward`, the calls
`loom.parallel.ring_attention` makes), so one device checks the kernels
without a multi-GPU ring:

1. Exactness: a causal sequence cut into 2P zigzag chunks, each query chunk
   attended over every key chunk it may see (own causal triangles fused,
   whole earlier chunks fused), merged, then backward per pair; against a
   float64 reference (autograd through plain softmax attention), GQA,
   float32 (the memory-efficient kernel on CUDA) and bfloat16 (FlashAttention-2
   on sm80+).  Errors reported per tensor; the script exits 1 above tolerance.
2. Speed: one zigzag rank's block work at P=2 (its own compute in a real
   ring) with the fused and the explicit kernel, against SDPA's fwd+bwd on the
   whole sequence (the single-device baseline): ratios, not absolute times.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from loom.parallel.attention_blocks import block_backward, block_forward, merge_partials
from loom.parallel.fused_attention import cuda_backend, fused_block_backward, fused_block_forward, resolve_kernel

TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _reference(q, k, v, dout, scale):
    """Causal GQA attention in float64 with autograd: (out, dq, dk, dv)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    kk, vv = (t.repeat_interleave(rep, dim=2) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                         is_causal=True, scale=scale).transpose(1, 2)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _pairs(chunks: int):
    """(query chunk, key chunk, causal) for causal attention over ``chunks``."""
    return [(i, j, i == j) for i in range(chunks) for j in range(i + 1)]


def blockwise(q, k, v, dout, scale, chunks: int, kernel: str, pairs=None):
    """Causal attention of ``chunks`` query chunks, block pair by block pair
    as a ring runs them (``kernel``: fused or explicit): (out, dq, dk, dv),
    or only the pairs named in ``pairs``."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    c = s // chunks
    pairs = pairs if pairs is not None else _pairs(chunks)
    cut = [slice(i * c, (i + 1) * c) for i in range(chunks)]
    acc = torch.float32 if q.dtype != torch.float64 else torch.float64
    out = torch.zeros(b, s, hq, d, dtype=acc, device=q.device)
    lse = torch.full((b, hq, s), float("-inf"), dtype=acc, device=q.device)
    tril = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    for i, j, causal in pairs:
        rq, rk = cut[i], cut[j]
        if kernel == "fused":
            o_b, l_b = fused_block_forward(q[:, rq], k[:, rk], v[:, rk], scale, causal)
        else:
            o_b, l_b = block_forward(q[:, rq], k[:, rk], v[:, rk], scale, tril if causal else None)
        out[:, rq], lse[..., rq] = merge_partials(out[:, rq], lse[..., rq], o_b, l_b)
    dq = torch.zeros(b, s, hq, d, dtype=acc, device=q.device)
    dk = torch.zeros(b, hkv, s, d, dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    delta = (dout.to(acc) * out).sum(-1).transpose(1, 2)
    for i, j, causal in pairs:
        rq, rk = cut[i], cut[j]
        if kernel == "fused":
            dq[:, rq] += fused_block_backward(q[:, rq], k[:, rk], v[:, rk], dout[:, rq], out[:, rq], lse[..., rq],
                                              scale, causal, dk[:, :, rk], dv[:, :, rk])
        else:
            dq[:, rq] += block_backward(q[:, rq], k[:, rk], v[:, rk], dout[:, rq], lse[..., rq], delta[..., rq],
                                        scale, tril if causal else None, dk[:, :, rk], dv[:, :, rk])
    return out, dq, dk.transpose(1, 2), dv.transpose(1, 2)


def exactness(device, seq: int, heads: int, kv_heads: int, dim: int, chunks: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, seq, h, dim, generator=gen, dtype=torch.float64)
                     for h in (heads, kv_heads, kv_heads, heads))
    scale = dim ** -0.5
    ref = _reference(q, k, v, dout, scale)
    capability = torch.cuda.get_device_capability(device) if torch.device(device).type == "cuda" else None
    for dtype in (torch.float32, torch.bfloat16):
        if resolve_kernel("auto", device, dtype, dim) != "fused":
            rows.append({"dtype": str(dtype), "kernel": "none for this device", "ok": None})
            continue
        got = blockwise(*(t.to(device, dtype) for t in (q, k, v, dout)), scale, chunks, "fused")
        errors = {name: float((g.double().cpu() - r).abs().max() / r.abs().max().clamp_min(1e-12))
                  for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
        kernel = "cpu flash" if capability is None else cuda_backend(dtype, dim, capability)
        ok = max(errors.values()) <= TOLERANCE[dtype]
        rows.append({"dtype": str(dtype).removeprefix("torch."), "kernel": kernel, "relative_errors": errors,
                     "tolerance": TOLERANCE[dtype], "ok": ok})
        print(f"exactness {rows[-1]['dtype']:8s} {kernel:10s} "
              + " ".join(f"{n}={e:.1e}" for n, e in errors.items()) + ("  ok" if ok else "  FAIL"))
    return rows


def _time(fn, device, repeats: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(device, dtype, seq: int, heads: int, dim: int, repeats: int) -> dict:
    """Zigzag rank 0 at P=2 holds chunks 0 and 3 of 4.  In a ring it computes
    its own (0,0) and (3,3) causal triangles and the whole (3,0), then (3,1)
    and (3,2) with the other rank's K/V ((0,1), (0,2) are masked out): half
    the causal work, as rank 1.  The explicit kernel runs untiled here."""
    gen = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(1, seq, heads, dim, generator=gen).to(device, dtype) for _ in range(4))
    scale = dim ** -0.5
    mine = [(0, 0, True), (3, 0, False), (3, 1, False), (3, 2, False), (3, 3, True)]

    def sdpa():
        qq, kk, vv = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
        F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale).backward(dout.transpose(1, 2))

    whole = _time(sdpa, device, repeats)
    row = {"dtype": str(dtype).removeprefix("torch."), "seq": seq, "heads": heads, "dim": dim,
           "sdpa_fwd_bwd_s": whole}
    for kernel in ("fused", "explicit"):
        t = _time(lambda: blockwise(q, k, v, dout, scale, 4, kernel, pairs=mine), device, repeats)
        row[f"{kernel}_rank_s"] = t
        row[f"{kernel}_vs_sdpa"] = t / whole
    print(f"speed {row['dtype']:8s} seq {seq}: one P=2 rank's blocks / whole-sequence SDPA: "
          f"fused {row['fused_vs_sdpa']:.2f}x, explicit {row['explicit_vs_sdpa']:.2f}x (ideal 0.5)")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq", type=int, default=None, help="speed part's sequence (cuda 16384, cpu 2048)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/sequence_parallel_cuda.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = exactness(device, seq=96, heads=4, kv_heads=2, dim=64, chunks=4)
    cuda = device.type == "cuda"
    seq = args.seq or (16384 if cuda else 2048)
    timings = [speed(device, dtype, seq, 8 if cuda else 4, 64 if cuda else 32, args.repeats)
               for dtype in ((torch.bfloat16, torch.float32) if cuda else (torch.float32,))]
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    with open(args.out, "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "exactness": rows, "speed": timings}, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
