"""Hugging Face models: a transformers Llama under `loom train --hf-config`
against the same model in a plain DDP loop, and sequence parallelism where
data parallelism runs out of memory.

    python benchmarks/hf_models.py [--steps 12] [--skip 4] [--long-seq 4096] [--budget-mib 900]

The model is a small ``LlamaForCausalLM`` (hidden 256, 4 layers, 8 query and
4 key/value heads, intermediate 688, vocabulary 256, untied head) from a
config.json the script writes; every run trains it with AdamW on loom's
synthetic data, one intra-op thread per rank, float32.

- Throughput (dp=2, global batch 16 x 256 tokens): ``torch DDP + SDPA``
  (`benchmarks/ddp_baseline.py --hf-config`: DistributedDataParallel over
  gloo, transformers' own SDPA attention, torchrun) against ``loom train
  --hf-config`` (Ray workers, the fault monitor and checked collectives on;
  loom's attention core routed through transformers' attention interface).
  Tokens/s: the global batch over the median step time after the first
  ``--skip`` steps.
- Memory (``--long-seq`` tokens per sequence): the smallest dp=2 job (one
  sequence per rank) against sp=2 (one sequence split over the two ranks,
  ring attention), both ``loom train --hf-config``, and the DDP loop at dp=2
  for reference.  Peak: the largest peak resident set size over the ranks
  (the whole process: Python, torch, transformers, Ray's worker), as the
  training rows report it; ``--budget-mib`` is the fixed per-rank budget the
  rows are read against.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _report import command_line, markdown_table, update_results, write_json  # noqa: E402
from train_throughput import HERE, loom_step_rows, run_command, torchrun  # noqa: E402

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 256,
         "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
         "max_position_embeddings": 16384, "attention_dropout": 0.0, "tie_word_embeddings": False,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
BATCH, SEQ = 16, 256
MIB = 2**20


def write_config(tmp: str) -> str:
    path = os.path.join(tmp, "llama")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(LLAMA, fh)
    return path


def run_ddp(tmp: str, name: str, config: str, steps: int, batch: int, seq: int) -> dict:
    """The DDP + SDPA loop at dp=2: {"step_s": [...], "peak_rss_bytes": max over ranks}."""
    out = os.path.join(tmp, f"{name}.json")
    run_command([torchrun(), "--standalone", "--nproc-per-node", "2", os.path.join(HERE, "ddp_baseline.py"),
                 "--hf-config", config, "--steps", str(steps), "--batch-size", str(batch), "--seq-len", str(seq),
                 "--out", out])
    with open(out) as fh:
        result = json.load(fh)
    return {"step_s": result["step_time_s"], "peak_rss_bytes": result["peak_rss_bytes"]}


def run_loom(tmp: str, name: str, config: str, steps: int, batch: int, seq: int, dp: int, sp: int) -> dict:
    """`loom train --hf-config` at dp x sp: {"step_s": [...], "peak_rss_bytes": max over ranks}."""
    run_command([sys.executable, "-m", "loom", "train", "--hf-config", config, "--steps", str(steps),
                 "--batch-size", str(batch), "--seq-len", str(seq), "--dp", str(dp), "--sp", str(sp),
                 "--threads-per-worker", "1", "--eval-every", "0", "--no-progress", "--no-tensorboard",
                 "--runs-dir", tmp, "--name", name])
    rows = loom_step_rows(os.path.join(tmp, name))
    return {"step_s": [r["step_time_s"] for r in rows], "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rows)}


def _summary(label: str, run: dict, skip: int, tokens: int, seq: int, dp: int, sp: int) -> dict:
    times = run["step_s"][skip:] or run["step_s"][-1:]
    step = statistics.median(times)
    return {"row": label, "seq_len": seq, "dp": dp, "sp": sp, "tokens_per_step": tokens, "step_s": step,
            "tokens_per_s": tokens / step, "peak_rss_bytes": run["peak_rss_bytes"], "step_times_s": run["step_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="steps of the throughput runs")
    ap.add_argument("--skip", type=int, default=4, help="first steps left out of the median (warm-up)")
    ap.add_argument("--long-seq", type=int, default=4096, help="sequence length of the memory rows")
    ap.add_argument("--long-steps", type=int, default=3, help="steps of the memory rows")
    ap.add_argument("--budget-mib", type=float, default=900.0, help="fixed per-rank memory budget (MiB)")
    args = ap.parse_args()
    if args.steps <= args.skip + 2:
        ap.error(f"--steps={args.steps} must exceed --skip={args.skip} by at least 3")
    if args.long_seq % 4 or args.long_seq > LLAMA["max_position_embeddings"]:
        ap.error(f"--long-seq={args.long_seq} must divide by 4 (zigzag shards of sp=2) and be at most "
                 f"{LLAMA['max_position_embeddings']}")
    load_before = os.getloadavg()
    long_skip = 1 if args.long_steps > 1 else 0
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(tmp)
        plan = [("torch DDP + SDPA (torchrun)", SEQ, BATCH, 2, 1, args.skip,
                 lambda: run_ddp(tmp, "ddp", config, args.steps, BATCH, SEQ)),
                ("loom train --hf-config", SEQ, BATCH, 2, 1, args.skip,
                 lambda: run_loom(tmp, "loom", config, args.steps, BATCH, SEQ, 2, 1)),
                ("torch DDP + SDPA (torchrun)", args.long_seq, 2, 2, 1, long_skip,
                 lambda: run_ddp(tmp, "ddp-long", config, args.long_steps, 2, args.long_seq)),
                ("loom train --hf-config", args.long_seq, 2, 2, 1, long_skip,
                 lambda: run_loom(tmp, "dp-long", config, args.long_steps, 2, args.long_seq, 2, 1)),
                ("loom train --hf-config --sp 2", args.long_seq, 1, 1, 2, long_skip,
                 lambda: run_loom(tmp, "sp-long", config, args.long_steps, 1, args.long_seq, 1, 2))]
        results = []
        for label, seq, batch, dp, sp, skip, fn in plan:
            results.append(_summary(label, fn(), skip, batch * seq, seq, dp, sp))
            r = results[-1]
            print(f"{label} seq {seq} dp={dp} sp={sp}: {r['step_s'] * 1e3:.0f} ms/step, "
                  f"{r['tokens_per_s']:.0f} tokens/s, peak {r['peak_rss_bytes'] / MIB:.0f} MiB", flush=True)
    load_after = os.getloadavg()
    budget = args.budget_mib * MIB
    ddp = results[0]["tokens_per_s"]
    for r in results:
        r["fits_budget"] = r["peak_rss_bytes"] <= budget
        r["vs_ddp"] = r["tokens_per_s"] / ddp if r["seq_len"] == SEQ else None
    body = markdown_table(
        ["run", "seq len", "dp × sp", "tokens/step", "ms/step", "tokens/s", "× DDP", "peak RSS/rank (MiB)",
         f"≤ {args.budget_mib:g} MiB"],
        [[r["row"], r["seq_len"], f"{r['dp']} × {r['sp']}", r["tokens_per_step"], f"{r['step_s'] * 1e3:.0f}",
          f"{r['tokens_per_s']:.0f}", "" if r["vs_ddp"] is None else f"{r['vs_ddp']:.2f}",
          f"{r['peak_rss_bytes'] / MIB:.0f}", "yes" if r["fits_budget"] else "no"] for r in results])
    body += (f"\n\nModel: LlamaForCausalLM, hidden {LLAMA['hidden_size']}, {LLAMA['num_hidden_layers']} layers, "
             f"{LLAMA['num_attention_heads']} heads ({LLAMA['num_key_value_heads']} kv), vocab "
             f"{LLAMA['vocab_size']}, float32, AdamW, one thread per rank, gloo. Throughput rows: global batch "
             f"{BATCH} × {SEQ}, {args.steps} steps, median step time after the first {args.skip}. Memory rows: "
             f"{args.long_seq} tokens per sequence, {args.long_steps} steps; dp=2 holds one whole sequence per "
             f"rank, sp=2 one sequence split over two ranks (ring attention, zigzag). Peak RSS: the largest over "
             f"the ranks of the whole process (Python, torch, transformers; Ray's worker for loom). Load average "
             f"(1 min) before/after: {load_before[0]:.1f}/{load_after[0]:.1f} on {os.cpu_count()} CPUs "
             f"shared with other jobs: read the ratios, not the absolute numbers.")
    write_json("hf_models", {"args": vars(args), "config": LLAMA, "budget_bytes": budget,
                             "load_avg_before": load_before, "load_avg_after": load_after, "results": results})
    update_results("hf_models", "Hugging Face models: loom train --hf-config vs DDP + SDPA, sp=2 past dp's memory",
                   command_line(__file__), body)
    print(body)


if __name__ == "__main__":
    main()
