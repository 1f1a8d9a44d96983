"""Real data on a GPU: document-masked attention is exact on CUDA, and the
loader against the training step there.

    python benchmarks/data_cuda.py [--out benchmarks/results/data_cuda.json]

Needs a CUDA device (run where one is lent).  Three parts:

1. Exactness on CUDA: `local_attention`, a ring of one (`ring_attention`)
   and Ulysses of one with per-row documents (``cu_seqlens``, batch 2, GQA)
   in float32 and bfloat16, forward and backward, against a float64 CPU
   reference that attends within each document separately; gated linear
   attention (`local_linear_attention`, float32) against the same layer run
   on each document alone.
2. The default job's loader on a GPU: one rank's batch (8 windows of 64+1
   tokens of the built-in corpus plus ``cu_seqlens``, moved to the GPU) as
   the training loop gets it (`micro_batches`), against one training step of
   the default model there (AdamW): the step time the loader adds, inline (as
   the loop runs it) and prefetched on a background thread (measured, not
   taken: it is slower).
3. The cost of document masking on a GPU at a realistic size (dim 1024,
   8 layers, 16 heads, batch 8 x 2048 tokens, bf16 autocast): a training step
   with ``cu_seqlens`` (the kernel `loom.parallel.varlen` picks there: varlen
   flash attention, else SDPA with a bool mask) against plain causal packing
   (SDPA's flash kernel), side by side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import types
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from loom.data import TokenWindows
from loom.data.builtin import pydoc_corpus
from loom.launch.batches import micro_batches, rank_batch
from loom.parallel import Transformer, local_attention, local_linear_attention, next_token_loss, ring_attention
from loom.parallel.model import ModelConfig
from loom.parallel.ulysses import ulysses_attention
from loom.parallel.varlen import kernel_for


def reference(q, k, v, bounds, seq):
    """Causal attention inside each document (float64 CPU tensors), one document at a time."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    rows = [[] for _ in range(q.shape[0])]
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        r, lo, hi = a // seq, a % seq, a % seq + (b - a)
        o = F.scaled_dot_product_attention(q[r:r + 1, lo:hi].transpose(1, 2), k[r:r + 1, lo:hi].transpose(1, 2),
                                           v[r:r + 1, lo:hi].transpose(1, 2), is_causal=True)
        rows[r].append(o.transpose(1, 2))
    return torch.cat([torch.cat(parts, dim=1) for parts in rows])


def exactness(device) -> list[dict]:
    torch.manual_seed(0)
    seq, rows = 96, 2
    bounds = [0, 17, 40, 40, 96, 96 + 50, 192]  # row 0: three documents (one empty); row 1: two
    cu = torch.tensor(bounds, dtype=torch.int64, device=device)
    results = []
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2)):
        q = torch.randn(rows, seq, 4, 32, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(rows, seq, 2, 32, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(rows, seq, 2, 32, device=device, dtype=dtype, requires_grad=True)
        qr, kr, vr = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
        want = reference(qr, kr, vr, bounds, seq)
        dout = torch.randn_like(want)
        want_grads = torch.autograd.grad(want, (qr, kr, vr), dout)
        for name, fn in (("local_attention", lambda: local_attention(q, k, v, causal=True, cu_seqlens=cu)),
                         ("ring_attention (ring of one)", lambda: ring_attention(q, k, v, causal=True,
                                                                                   cu_seqlens=cu)),
                         ("ulysses_attention (one rank)", lambda: ulysses_attention(q, k, v, causal=True,
                                                                                      cu_seqlens=cu))):
            out = fn()
            grads = torch.autograd.grad(out, (q, k, v), dout.to(device=device, dtype=dtype))
            err = (out.double().cpu() - want).abs().max().item()
            gerr = max((g.double().cpu() - w).abs().max().item() for g, w in zip(grads, want_grads))
            kernel = "loom ring blocks" if name.startswith("ring") else kernel_for(q, None, bounds)
            results.append({"core": name, "kernel": kernel, "dtype": str(dtype).removeprefix("torch."),
                            "max_abs_err_out": err,
                            "max_abs_err_grad": gerr, "ok": err < tol * 10 and gerr < tol * 20
                            and bool(torch.isfinite(out).all())})
    return results


def linear_exactness(device) -> list[dict]:
    """Gated linear attention restarts at document starts on CUDA: float32
    against float64 CPU runs of each document alone, forward and backward."""
    torch.manual_seed(0)
    seq, rows, h, d = 96, 2, 2, 16
    bounds = [0, 17, 40, 40, 96, 96 + 50, 192]
    cu = torch.tensor(bounds, dtype=torch.int64, device=device)
    q, k, v = (torch.randn(rows, seq, h, d, device=device, requires_grad=True) for _ in range(3))
    g = (-torch.rand(rows, seq, h, d, device=device) * 0.2).requires_grad_()
    out = local_linear_attention(q, k, v, g, chunk_size=16, cu_seqlens=cu)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, g), dout)
    refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v, g)]
    pieces = [[] for _ in range(rows)]
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        r, lo, hi = a // seq, a % seq, a % seq + (b - a)
        pieces[r].append(local_linear_attention(*(t[r:r + 1, lo:hi] for t in refs), chunk_size=16))
    want = torch.cat([torch.cat(p, dim=1) for p in pieces])
    want_grads = torch.autograd.grad(want, refs, dout.double().cpu())
    err = (out.double().cpu() - want).abs().max().item()
    gerr = max((a.double().cpu() - b).abs().max().item() for a, b in zip(grads, want_grads))
    return [{"core": "local_linear_attention", "dtype": "float32", "max_abs_err_out": err,
             "max_abs_err_grad": gerr, "ok": err < 1e-4 and gerr < 1e-3 and bool(torch.isfinite(out).all())}]


def timed(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def default_job_share(device) -> dict:
    """The default job's step on the GPU (batch 8 x 64 per rank, AdamW): with
    one fixed batch (no loader), with the training loop's loader inline
    (`micro_batches`), and with the next step's batch prepared on a
    background thread (a prefetching design loom measured and did not take);
    the loader's cost is the step time it adds."""
    train, _ = pydoc_corpus().split(0.05)
    windows = TokenWindows(train, 64, 16, seed=0)
    torch.manual_seed(0)
    model = Transformer(ModelConfig()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mesh = types.SimpleNamespace(sp=1, dp=2, dp_rank=0)  # what the loader reads of a dp=2 mesh
    fixed = rank_batch(windows, 0, range(8), mesh, "contiguous", device)
    pool = ThreadPoolExecutor(1)
    pending = {}

    def inline(step):
        return micro_batches(windows, step, mesh, "contiguous", device, batch_size=16)

    def prefetched(step):
        future = pending.pop(step, None)
        batches = future.result() if future is not None else inline(step)
        pending[step + 1] = pool.submit(inline, step + 1)
        return batches

    state = {"step": 0}

    def train_step(batch):
        x, y, context = batch
        loss = next_token_loss(model(x, **context), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # the loop reads the loss every step (the mean-loss all-reduce)

    def with_loader(fetch):
        s = state["step"]
        state["step"] += 1
        train_step(fetch(s)[0])

    def host_only():
        s = state["step"]
        state["step"] += 1
        windows.batch(s, range(8))
        windows.cu_seqlens(s, range(8))

    rows = {}
    for _ in range(3):  # interleaved rounds: the medians of each
        rows.setdefault("no_loader", []).append(timed(lambda: train_step(fixed), 50))
        rows.setdefault("inline", []).append(timed(lambda: with_loader(inline), 50))
        pending.clear()
        rows.setdefault("prefetch", []).append(timed(lambda: with_loader(prefetched), 50))
    pool.shutdown()
    base, inl, pre = (statistics.median(rows[k]) for k in ("no_loader", "inline", "prefetch"))
    host = timed(host_only, 200)
    return {"step_no_loader_ms": base * 1e3, "step_loader_inline_ms": inl * 1e3,
            "step_loader_prefetched_ms": pre * 1e3, "loader_host_ms": host * 1e3,
            "inline_overhead_pct": 100 * (inl - base) / base, "prefetched_overhead_pct": 100 * (pre - base) / base}


def masking_cost(device) -> dict:
    cfg = ModelConfig(vocab=32000, dim=1024, layers=8, heads=16)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, s = 8, 2048
    x = torch.randint(cfg.vocab, (b, s), device=device)
    y = torch.randint(cfg.vocab, (b, s), device=device)
    g = torch.Generator().manual_seed(1)
    bounds = [0]
    for r in range(b):  # documents of ~500 tokens
        inner = sorted(torch.randint(1, s, (3,), generator=g).tolist())
        bounds += [r * s + i for i in inner] + [(r + 1) * s]
    cu = torch.tensor(sorted(set(bounds)))  # on the host, as the training loop passes it

    def step(documents: bool):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x, cu_seqlens=cu) if documents else model(x)
        loss = next_token_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    plain = timed(lambda: step(False), 10)
    docs = timed(lambda: step(True), 10)
    tokens = b * s
    probe = torch.empty(1, 1, cfg.heads, cfg.dim // cfg.heads, device=device, dtype=torch.bfloat16)
    return {"shape": f"dim {cfg.dim}, {cfg.layers} layers, {cfg.heads} heads, batch {b} x {s}, bf16 autocast",
            "kernel": kernel_for(probe, None, cu.tolist()),
            "causal_packing_step_ms": plain * 1e3, "document_masked_step_ms": docs * 1e3,
            "ratio": docs / plain, "causal_tokens_per_s": tokens / plain, "masked_tokens_per_s": tokens / docs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/data_cuda.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("data_cuda: no CUDA device here; run it where one is lent")
        return 2
    device = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "exactness": exactness(device) + linear_exactness(device), "default_job": default_job_share(device),
              "masking_cost": masking_cost(device)}
    print(json.dumps(report, indent=2))
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    return 0 if all(r["ok"] for r in report["exactness"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
