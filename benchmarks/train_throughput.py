"""Training throughput: `loom train` against a plain PyTorch DDP script, and
the cost of each training essential, side by side in one run.

    python benchmarks/train_throughput.py [--steps 30] [--rounds 2] [--compile]

Every row trains the same reference model (dim 256, 4 layers, 8 heads) on the
same synthetic global batch (16 sequences of 256 tokens) at dp=2 with one
intra-op thread per rank:

- ``torch DDP (torchrun)``: `benchmarks/ddp_baseline.py`, the peer a user would
  otherwise write (DistributedDataParallel, AdamW, warm-up, clipping);
- ``loom train``: the same job through `loom train` (Ray workers, the fault
  monitor and checked collectives on, as a user gets them; no logging backend);
- ``loom worker (torchrun)``: loom's per-rank entry under torchrun (no Ray);
- one row per essential on top of ``loom train``: bf16 mixed precision,
  gradient accumulation (4 micro-batches, the same global batch), activation
  checkpointing, TensorBoard logging, and with ``--compile`` torch.compile.

Throughput is the global batch's tokens over the median step time of the
steps after the first ``--skip`` (start-up, warm-up and compilation are not
steady state); rounds interleave the rows so machine noise hits them alike,
and each row keeps the median over rounds.  Ratios are to ``torch DDP`` and to
``loom train``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _report import command_line, markdown_table, update_results, write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = {"dim": 256, "layers": 4, "heads": 8, "vocab": 256}
BATCH, SEQ = 16, 256


def _job_flags(steps: int) -> list[str]:
    flags = ["--steps", str(steps), "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--dp", "2",
             "--threads-per-worker", "1", "--no-progress"]
    for key, value in MODEL.items():
        flags += [f"--{key}", str(value)]
    return flags


def torchrun() -> str:
    return shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"


def run_command(cmd: list[str], env=None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def loom_step_rows(run_dir: str) -> list[dict]:
    """The training-step rows of a `loom train` run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [r for r in rows if "step_time_s" in r and "loss" in r]


def _loom_times(run_dir: str) -> list[float]:
    return [r["step_time_s"] for r in loom_step_rows(run_dir)]


def run_ddp(tmp: str, steps: int) -> list[float]:
    out = os.path.join(tmp, "ddp.json")
    run_command([torchrun(), "--standalone", "--nproc-per-node", "2", os.path.join(HERE, "ddp_baseline.py"),
          "--steps", str(steps), "--batch-size", str(BATCH), "--seq-len", str(SEQ),
          *[x for k, v in MODEL.items() for x in (f"--{k}", str(v))], "--out", out])
    with open(out) as fh:
        return json.load(fh)["step_time_s"]


def run_loom(tmp: str, name: str, steps: int, extra: list[str]) -> list[float]:
    run_command([sys.executable, "-m", "loom", "train", *_job_flags(steps), "--runs-dir", tmp, "--name", name,
          *extra])
    return _loom_times(os.path.join(tmp, name))


def run_loom_torchrun(tmp: str, name: str, steps: int, extra: list[str]) -> list[float]:
    run_command([torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "loom.launch.worker",
          *_job_flags(steps), "--runs-dir", tmp, "--name", name, *extra])
    return _loom_times(os.path.join(tmp, name))


def rows(args) -> list[tuple[str, callable]]:
    """(label, run(tmp, name) -> step times) for every row, in report order."""
    quiet = ["--no-tensorboard"]  # the plain run logs to metrics.jsonl only
    table = [
        ("torch DDP (torchrun)", lambda tmp, n: run_ddp(tmp, args.steps)),
        ("loom train", lambda tmp, n: run_loom(tmp, n, args.steps, quiet)),
        ("loom worker (torchrun)", lambda tmp, n: run_loom_torchrun(tmp, n, args.steps, quiet)),
        ("+ bf16 mixed precision", lambda tmp, n: run_loom(tmp, n, args.steps,
                                                           quiet + ["--mixed-precision", "bf16"])),
        ("+ grad accumulation x4", lambda tmp, n: run_loom(tmp, n, args.steps, quiet + ["--grad-accum", "4"])),
        ("+ activation checkpointing", lambda tmp, n: run_loom(tmp, n, args.steps,
                                                               quiet + ["--activation-checkpointing"])),
        ("+ TensorBoard logging", lambda tmp, n: run_loom(tmp, n, args.steps, ["--tensorboard"])),
    ]
    if args.compile:
        table.append(("+ torch.compile", lambda tmp, n: run_loom(tmp, n, args.steps, quiet + ["--compile"])))
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=8, help="first steps left out of the median (warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also measure --compile (slow to start)")
    args = ap.parse_args()
    if args.steps <= args.skip + 2:
        ap.error(f"--steps={args.steps} must exceed --skip={args.skip} by at least 3")
    table = rows(args)
    medians: dict[str, list[float]] = {label: [] for label, _ in table}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = table if r % 2 == 0 else table[::-1]
            for i, (label, fn) in enumerate(order):
                times = fn(tmp, f"r{r}-{i}")
                medians[label].append(statistics.median(times[args.skip:]))
                print(f"round {r + 1}/{args.rounds} {label}: {medians[label][-1] * 1e3:.1f} ms/step",
                      flush=True)
    tokens = BATCH * SEQ
    step_s = {label: statistics.median(v) for label, v in medians.items()}
    ddp, loom = step_s["torch DDP (torchrun)"], step_s["loom train"]
    results = [{"row": label, "step_s": s, "tokens_per_s": tokens / s, "vs_ddp": ddp / s, "vs_loom": loom / s,
                "rounds_step_s": medians[label]} for label, s in step_s.items()]
    body = markdown_table(
        ["run (dp=2)", "ms/step", "tokens/s", "× torch DDP", "× loom train"],
        [[r["row"], f"{r['step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['vs_ddp']:.2f}",
          f"{r['vs_loom']:.2f}"] for r in results])
    body += (f"\n\nModel dim {MODEL['dim']}, {MODEL['layers']} layers, {MODEL['heads']} heads; global batch "
             f"{BATCH} × {SEQ} tokens; {args.steps} steps, median step time after the first {args.skip}, "
             f"median of {args.rounds} interleaved rounds. Ratios above 1 are faster.")
    write_json("train_throughput", {"args": vars(args), "model": MODEL, "batch": BATCH, "seq_len": SEQ,
                                    "results": results})
    update_results("train_throughput", "Training throughput: loom train vs torch DDP, cost of each essential",
                   command_line(__file__), body)
    print(body)


if __name__ == "__main__":
    main()
