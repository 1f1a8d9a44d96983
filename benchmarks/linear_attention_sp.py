"""Sequence-parallel linear attention: All-Scan against its peers, side by side.

1. The scan alone: All-Scan (ZeCO, pipelined in K blocks) against the
   all-gather baseline (LASP-2) and the serial chain (LASP-1), for states of
   1 MB (16 heads x 128 x 128 float32 per rank) and 8 MB (batch 8 of those), at
   P = 2, 4, 8 ranks.  The time of one scan is the slowest rank's, per call.
2. The whole layer, forward + backward (`loom.parallel.linear_attention`) on a
   contiguous shard per rank at P = 2, 4, against the same per-rank work with
   no communication (each rank alone, the data-parallel ideal).

Methods and the ideal alternate call by call, in lockstep, so drift on a shared
machine hits them equally; the table reports medians.

    python benchmarks/linear_attention_sp.py [--scan-worlds 2 4 8] [--layer-worlds 2 4]
        [--blocks 4 8] [--iters 10] [--layer-iters 7] [--seq-local 512] [--heads 8] [--head-dim 128]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _report import command_line, markdown_table, update_results, write_json  # noqa: E402

from loom import comms  # noqa: E402
from loom.comms.testing import run_distributed  # noqa: E402
from loom.parallel import linear_attention  # noqa: E402

STATES = {"1 MB": (16, 128, 128), "8 MB": (8, 16, 128, 128)}  # float32 [..., d_k, d_v]


def _pin():
    """One core per rank (round robin): less scheduler noise."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[dist.get_rank() % len(cpus)]})


def _lockstep(variants: dict, iters: int, warmup: int = 2) -> dict:
    """Per-call seconds of each variant, called in turn after a barrier (the
    order rotates every round, so no variant always follows the same one)."""
    times = {name: [] for name in variants}
    names = list(variants)
    clock = time.perf_counter
    for it in range(warmup + iters):
        for name in names[it % len(names):] + names[:it % len(names)]:
            call = variants[name]
            comms.barrier()
            t0 = clock()
            call()
            if it >= warmup:
                times[name].append(clock() - t0)
    return times


def _scan_worker(blocks, iters):
    _pin()
    out = {}
    for label, shape in STATES.items():
        gen = torch.Generator().manual_seed(dist.get_rank())
        state = torch.randn(shape, generator=gen)
        decay = torch.rand(shape[:-1], generator=gen)
        variants = {f"allscan K={k}": (lambda k=k: comms.all_scan(decay, state, blocks=k)) for k in blocks}
        variants["allgather"] = lambda: comms.all_scan(decay, state, method="allgather")
        variants["serial"] = lambda: comms.all_scan(decay, state, method="serial")
        for name, ts in _lockstep(variants, iters).items():
            out[(label, name)] = ts
    return out


def _layer_worker(shape, chunk, iters):
    _pin()
    rank = dist.get_rank()
    batch, seq, heads, dim = shape
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
    g = (-0.1 * torch.rand(shape, generator=gen)).requires_grad_()
    grad = torch.randn(shape, generator=gen)

    def step(**kw):
        out = linear_attention(q, k, v, g, chunk_size=chunk, scale=dim ** -0.5, **kw)
        out.backward(grad)
        for t in (q, k, v, g):
            t.grad = None

    variants = {"ideal (no comm)": lambda: step(ranks=[rank])}
    for method in ("allscan", "allgather", "serial"):
        variants[method] = lambda m=method: step(method=m)
    return _lockstep(variants, iters, warmup=1)


def _slowest(per_rank: list[dict], key) -> list[float]:
    """Per call, the slowest rank's time."""
    return [max(c) for c in zip(*(r[key] for r in per_rank))]


def _slowest_rank_median(per_rank: list[dict], key) -> float:
    return statistics.median(_slowest(per_rank, key))


def _median_ratio(per_rank: list[dict], key, base) -> float:
    """Median over rounds of key's time / base's time in the same round (robust to drift)."""
    return statistics.median(a / b for a, b in zip(_slowest(per_rank, key), _slowest(per_rank, base)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan-worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--layer-worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 8], help="All-Scan block counts K")
    ap.add_argument("--iters", type=int, default=10, help="timed scan calls per variant")
    ap.add_argument("--layer-iters", type=int, default=7, help="timed layer calls per variant")
    ap.add_argument("--seq-local", type=int, default=512, help="tokens per rank in the layer run")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128, help="d_k = d_v in the layer run")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]

    scan_rows, scan_data = [], []
    for world in args.scan_worlds:
        per_rank = run_distributed(_scan_worker, world, args.blocks, args.iters, timeout=1800)
        for label in STATES:
            t = {name: _slowest_rank_median(per_rank, (label, name))
                 for name in [f"allscan K={k}" for k in args.blocks] + ["allgather", "serial"]}
            best_k = min(args.blocks, key=lambda k: t[f"allscan K={k}"])
            best = t[f"allscan K={best_k}"]
            scan_rows.append([world, label] + [f"{t[f'allscan K={k}'] * 1e3:.2f}" for k in args.blocks]
                             + [f"{t['allgather'] * 1e3:.2f}", f"{t['serial'] * 1e3:.2f}",
                                f"{best / t['allgather']:.2f}", f"{best / t['serial']:.2f}"])
            scan_data.append({"world": world, "state": label, "seconds": t, "best_blocks": best_k})
            print(scan_rows[-1], flush=True)
    scan_table = markdown_table(
        ["P", "state/rank"] + [f"All-Scan K={k} ms" for k in args.blocks]
        + ["all-gather ms", "serial ms", "All-Scan / all-gather", "All-Scan / serial"], scan_rows)

    shape = (1, args.seq_local, args.heads, args.head_dim)
    layer_rows, layer_data = [], []
    for world in args.layer_worlds:
        per_rank = run_distributed(_layer_worker, world, shape, args.chunk_size, args.layer_iters,
                                   timeout=1800)
        t = {name: _slowest_rank_median(per_rank, name) for name in per_rank[0]}
        ratio = {m: _median_ratio(per_rank, m, "ideal (no comm)") for m in ("allscan", "allgather", "serial")}
        layer_rows.append([world, f"{t['ideal (no comm)'] * 1e3:.0f}"] + [
            f"{t[m] * 1e3:.0f} ({(ratio[m] - 1) * 100:+.1f}%)" for m in ("allscan", "allgather", "serial")])
        layer_data.append({"world": world, "seconds": t, "ratio_to_ideal": ratio,
                           "calls": {name: _slowest(per_rank, name) for name in per_rank[0]}})
        print(layer_rows[-1], flush=True)
    layer_table = markdown_table(["P", "no comm (ideal) ms", "All-Scan ms (overhead)",
                                  "all-gather ms (overhead)", "serial ms (overhead)"], layer_rows)
    state_kb = args.heads * args.head_dim ** 2 * 4 / 1024
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    print(scan_table + "\n\n" + layer_table)
    write_json("linear_attention_sp", {"scan": scan_data, "layer": layer_data, "layer_shape": shape,
                                       "chunk_size": args.chunk_size, "iters": args.iters, "load": load,
                                       "layer_iters": args.layer_iters})
    if not args.no_write:
        body = (f"Machine: {load} (1-minute load; 2 means both cores busy).\n\n"
                f"**The scan alone** (median over {args.iters} calls of the slowest rank's time; "
                f"K = All-Scan blocks; ratios use the best K):\n\n{scan_table}\n\n"
                f"**The layer, forward + backward** (median over {args.layer_iters} calls; batch 1, "
                f"{args.seq_local} tokens per rank, "
                f"{args.heads} heads, d_k = d_v = {args.head_dim}: a {state_kb:.0f} KB state per rank; "
                f"chunk {args.chunk_size}), against each rank running its shard with no communication "
                f"(times are medians; the overhead is the median over rounds of the ratio to the ideal "
                f"call in the same round):"
                f"\n\n{layer_table}\n\n" + NOTES)
        cmd = command_line(__file__, argv)
        update_results("linear_attention_sp", "Sequence-parallel linear attention (All-Scan vs LASP-2 "
                       "all-gather vs LASP-1 serial)", cmd, body)


NOTES = """Targets (from ZeCO, on GPUs): All-Scan ≤ 0.5× all-gather and ≤ 0.35× serial at P = 8
for 8 MB states; layer overhead over the no-communication ideal ≤ 15% at P = 4.

How to read this on a 2-core machine: P = 4 and P = 8 run 2 and 4 processes per core, and
every message is a gloo copy through loopback TCP that costs CPU time on both ends, on the
same two cores.  All-Scan sends exactly the bytes of the serial chain, only pipelined; with
two cores at most two hops make progress at once, so All-Scan can at best halve the serial
chain here (≈ 0.5-0.6 measured at 8 MB), where GPUs with a link per hop reach the ZeCO
ratio.  The all-gather moves (P-1)× the bytes per rank and gloo's ring all-gather needs every
oversubscribed process to advance in each of its P-1 steps, so it degrades fastest.  In the
layer, two scans of the state (fwd + bwd; a few ms, see the scan table) sit beside seconds of
local compute, so the true overhead is a few percent at most and below the noise of a shared
machine: negative overheads are noise, not speed-ups."""


if __name__ == "__main__":
    main()
