"""Tracing overhead: loom.comms ops against raw torch.distributed, side by side.

For each world size, workers alternate raw calls, traced calls with the
collective checks off (as on NCCL) and traced calls with them on (the gloo
default: each collective first agrees on its inputs, one tiny extra
exchange) one by one, in lockstep, for a tiny tensor and a 1 MB tensor, for
all_reduce and all_to_all, and compare the median per-call times (drift hits
all equally).  It also times the recorder alone (open + close of a record,
no communication): the exact cost tracing adds to every op.

A world of 1 runs the same gloo ops with no peer: the difference there is
the wrappers' own cost, free of the cross-process timing noise that 2-4
processes on a 2-core machine add.

    python benchmarks/comms_overhead.py [--worlds 1 2 4] [--calls 1000]
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
from loom.comms import trace  # noqa: E402
from loom.comms.testing import run_distributed  # noqa: E402

SIZES = {"tiny (16 B)": 4, "1 MB": 2**18}  # float32 elements


def _alternate(calls_of, calls):
    """Median per-call times of each callable, called in turn in lockstep."""
    times = [[] for _ in calls_of]
    clock = time.perf_counter
    dist.barrier()
    for _ in range(calls):
        for fn, out in zip(calls_of, times):
            t0 = clock()
            fn()
            out.append(clock() - t0)
    return [statistics.median(t) for t in times]


def _checks(mode, fn):
    def run():
        comms.set_collective_checks(mode)
        fn()
    return run


def _worker(calls):
    world = dist.get_world_size()
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[dist.get_rank() % len(cpus)]})  # less scheduler noise
    out = {}
    for label, n in SIZES.items():
        n -= n % world
        x = torch.ones(n)
        splits = [n // world] * world
        cases = {  # both sides allocate their output, as the traced op does
            "all_reduce": (lambda: dist.all_reduce(x), lambda: comms.all_reduce(x)),
            "all_to_all": (lambda: dist.all_to_all_single(torch.empty(n), x, splits, splits),
                           lambda: comms.all_to_all_v(x, splits, splits)),
        }
        for op, (raw, traced) in cases.items():
            variants = [raw, _checks("off", traced), _checks("on", traced)]
            for _ in range(10):  # warm-up
                for fn in variants:
                    fn()
            out[(op, label)] = _alternate(variants, calls)
    comms.set_collective_checks("auto")
    return out


def _train_rate(mode: str, overrides: dict, steps: int) -> float:
    """Tokens/s of `loom train`'s loop on this process group with the
    collective checks ``mode`` (the reference job, or ``overrides``)."""
    from loom.launch.config import build_config, validate
    from loom.launch.train import train
    comms.set_collective_checks(mode)
    try:
        cfg = validate(build_config(overrides={"steps": steps, "progress": False, **overrides}),
                       world_size=dist.get_world_size())
        return train(cfg)["tokens_per_s"]
    finally:
        comms.set_collective_checks("auto")


def _training(steps: int, rounds: int) -> dict:
    """Median tokens/s, checks off vs on (alternating rounds), of the default
    dp=2 job and an ep=2 MoE job."""
    jobs = {"dp=2 (default job)": {}, "dp=2 ep=2 MoE": {"ep": 2, "moe": "standard"}}
    out = {}
    for name, overrides in jobs.items():
        rates = {"off": [], "on": []}
        for _ in range(rounds):
            for mode in rates:
                rates[mode].append(run_distributed(_train_rate, 2, mode, overrides, steps, timeout=900)[0])
        out[name] = {mode: statistics.median(r) for mode, r in rates.items()}
    return out


def _recorder_cost(iters=200000):
    x = torch.ones(4)
    t0 = time.perf_counter()
    for _ in range(iters):
        trace.close_record(trace.open_record(0, "world", (0, 1), "all_reduce", 16, x.dtype, x.shape))
    return (time.perf_counter() - t0) / iters


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--calls", type=int, default=1000, help="alternating calls per case")
    ap.add_argument("--train-steps", type=int, default=60, help="steps per training round (0: skip)")
    ap.add_argument("--train-rounds", type=int, default=3, help="alternating off/on training rounds")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)

    rec_us = _recorder_cost() * 1e6
    rows, data = [], []
    for world in args.worlds:
        per_rank = run_distributed(_worker, world, args.calls, timeout=1800)
        for key in per_rank[0]:
            raw, traced, checked = (statistics.median(r[key][i] for r in per_rank) for i in range(3))
            op, label = key
            rows.append([world, op, label, f"{raw * 1e6:.1f}", f"{traced * 1e6:.1f}", f"{checked * 1e6:.1f}",
                         f"{traced / raw:.3f}", f"{checked / raw:.3f}", f"{(traced - raw) * 1e6:+.1f}",
                         f"{(checked - raw) * 1e6:+.1f}"])
            data.append({"world": world, "op": op, "size": label, "raw_s": raw, "traced_s": traced,
                         "checked_s": checked})
    table = markdown_table(["ranks", "op", "size", "raw µs", "traced µs", "checked µs", "traced/raw",
                            "checked/raw", "traced added µs", "checked added µs"], rows)
    training = _training(args.train_steps, args.train_rounds) if args.train_steps else {}
    train_table = markdown_table(
        ["job (2 gloo ranks, loom train's loop)", "tok/s checks off", "tok/s checks on", "on / off"],
        [[name, f"{r['off']:.0f}", f"{r['on']:.0f}", f"{r['on'] / r['off']:.3f}"] for name, r in training.items()])
    print(table)
    print(f"\nrecorder alone (open + close one record): {rec_us:.2f} µs per op")
    if training:
        print("\n" + train_table)
    write_json("comms_overhead", {"rows": data, "recorder_us": rec_us, "calls": args.calls, "training": training,
                                  "train_steps": args.train_steps})
    if not args.no_write:
        body = (table + f"\n\nThe recorder alone (open + close of one record, no communication) costs "
                f"**{rec_us:.2f} µs** per op. One rank (the same gloo ops, no peer) shows the "
                f"whole wrapper cost without cross-process noise; at 2 and 4 ranks a 2-core machine "
                f"running the processes plus gloo's I/O threads adds timing noise of tens of µs "
                f"(±100 µs at 4 ranks) in both directions. Targets: ≤ 2% on a 1 MB all_reduce, "
                f"≤ 10 µs on a tiny one (traced). 'traced' is loom.comms with the collective checks "
                f"off (as on NCCL); 'checked' with them on, the gloo default: every collective first "
                f"agrees on its op, dtype, shape and arguments (one tiny extra exchange), so a "
                f"mismatch raises on every rank instead of hanging or aborting the process. Code that "
                f"has agreed already skips the per-op check (`comms.agreed()`: MoE, Ulysses, All-Scan, "
                f"GradientSync), so what a training step pays is one small exchange per layer call:"
                + ("\n\n" + train_table + f"\n\nMedian of {args.train_rounds} alternating rounds of "
                   f"{args.train_steps} steps each (2 processes on 2 cores: ±10% between rounds)."
                   if training else ""))
        cmd = command_line(__file__, argv)
        update_results("comms_overhead", "Tracing overhead (loom.comms vs raw torch.distributed)",
                       cmd, body)


if __name__ == "__main__":
    main()
