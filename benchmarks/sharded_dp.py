"""Sharded data parallelism (FSDP2 through `loom.parallel.shard_data_parallel`) vs unsharded.

dp ranks on gloo (one thread each, float32), loom's reference transformer,
AdamW, the step `loom train` runs: zero_grad, forward, backward, gradient
sync, clip_grad_norm_ (1.0), optimizer step.  Levels (``--shard-state``):

- ``none``: every rank holds everything; `ExpertParallelGradientSync`
  all-reduces the gradients (flat buckets) -- DDP.
- ``grads``: ZeRO-2 / FSDP SHARD_GRAD_OP: gradients and AdamW state sharded,
  parameters sharded between steps, gathered once per step (kept whole from
  the forward to the end of the backward).
- ``params``: ZeRO-3 / FSDP FULL_SHARD: parameters gathered per block just in
  time (next block prefetched), freed after it.

Measured, per rank:

1. Memory of one step after a warm-up step (AdamW state exists).  CPU has no
   allocator statistics by category, so `StepMemory` (a `TorchDispatchMode`)
   samples, after every operator, the bytes of every live storage, each
   storage counted once, by category: *params* (the rank's parameters: its
   shards, or whole parameters), *gathered* (FSDP2's unsharded parameters,
   gathered for a block), *grads* (the rank's gradients: its shards, or whole
   gradients), *block_grads* (FSDP2's unsharded gradients of a block, held from
   its backward to its reduce-scatter), *optim* (AdamW state), *comm* (buffers handed to a collective: FSDP2's flat
   all-gather / reduce-scatter buffers, the unsharded all-reduce buckets),
   *other* (activations saved for backward, autograd and optimizer
   temporaries).  *state* = params + gathered + grads + block_grads + optim; the issue's
   target is judged on its peak: <= 1.1/N x the unsharded state peak + one
   block's gathered parameters.  *steady*: state bytes between steps.
2. Step time: the slowest rank's step, median over ``--reps`` steps after a
   warm-up, levels interleaved (one step of each per round), no tracker; the
   ratio to unsharded is the median of each round's ratio.
3. The largest model (``--sweep-dim`` wide, layers swept) whose whole measured
   peak (every category) fits ``--budget-mib`` per rank: unsharded vs
   ``params``, at each dp.

    python benchmarks/sharded_dp.py [--dim 192] [--layers 8 16] [--dps 2 4] [--budget-mib 64] [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import weakref

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(__file__))
from _report import command_line, markdown_table, peak_bytes, update_results, write_json  # noqa: E402

from loom import comms  # noqa: E402
from loom.comms.testing import run_distributed  # noqa: E402
from loom.parallel import (ExpertParallelGradientSync, ModelConfig, SyntheticData, Transformer,  # noqa: E402
                           next_token_loss, shard_data_parallel)

LEVELS = ("none", "grads", "params")
STATE = ("params", "gathered", "grads", "block_grads", "optim")
CATEGORIES = STATE + ("comm", "other")
MIB = 2 ** 20


# ------------------------------------------------------------- the tracker

def _storage(t):
    """The storage holding ``t``'s bytes (a DTensor's: its local shard's), or None."""
    if isinstance(t, DTensor):
        t = t._local_tensor
    if not isinstance(t, torch.Tensor) or type(t) not in (torch.Tensor, torch.nn.Parameter):
        return None
    return t.untyped_storage()


def _fsdp_params(model):
    """FSDP2's per-parameter records of every sharded unit of ``model``."""
    out = []
    for module in model.modules():
        get = getattr(module, "_get_fsdp_state", None)
        group = get()._fsdp_param_group if get is not None else None
        if group is not None:
            out += group.fsdp_params
    return out


class StepMemory(TorchDispatchMode):
    """Live storage bytes of one rank by category (see the module docstring),
    sampled after every operator while the mode is active.

    ``peak[c]``: the most bytes category ``c`` held at once; ``peak_state`` /
    ``peak_total``: the most bytes of the `STATE` categories / of every category held
    at once, with the breakdown at that moment (``at_state_peak``,
    ``at_total_peak``).  Storages are counted once (the first category that
    claims them, in `CATEGORIES` order).  Bytes allocated and freed inside one
    operator (a kernel's scratch) and the temporaries of operators on DTensors
    (the optimizer step over shards runs below this mode) are not seen."""

    def __init__(self, model, opt):
        super().__init__()
        self.model, self.opt = model, opt
        self.fsdp = _fsdp_params(model)
        self.seen: dict[int, weakref.ref] = {}
        self.comm: dict[int, weakref.ref] = {}
        self.peak = dict.fromkeys(CATEGORIES, 0)
        self.peak_state = self.peak_total = 0
        self.at_state_peak: dict = {}
        self.at_total_peak: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        into = self.comm if func.namespace == "c10d" else self.seen
        for t in tree_leaves((args, kwargs, out)):
            st = _storage(t) if isinstance(t, torch.Tensor) else None
            if st is not None:
                into[st._cdata] = weakref.ref(st)
        self.sample()
        return out

    def breakdown(self) -> dict:
        """Bytes held now, by category (`CATEGORIES`)."""
        counted: set[int] = set()
        out = dict.fromkeys(CATEGORIES, 0)

        def add(cat, t):
            st = _storage(t) if t is not None else None
            if st is not None and st._cdata not in counted:
                counted.add(st._cdata)
                out[cat] += st.nbytes()

        for fp in self.fsdp:  # gathered first: a whole parameter's storage is FSDP2's all-gather output
            for t in getattr(fp, "all_gather_outputs", []):
                add("gathered", t)
            unsharded = getattr(fp, "_unsharded_param", None)
            add("gathered", unsharded)
            if unsharded is not None:
                add("block_grads", unsharded.grad)
            add("params", fp.sharded_param)
            add("grads", fp.sharded_param.grad)
        for p in self.model.parameters():
            add("params", p)
            add("grads", p.grad)
        for state in self.opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    add("optim", v)
        for cat, refs in (("comm", self.comm), ("other", self.seen)):
            for key, ref in list(refs.items()):
                st = ref()
                if st is None:
                    del refs[key]
                elif key not in counted:
                    counted.add(key)
                    out[cat] += st.nbytes()
        return out

    def sample(self) -> None:
        now = self.breakdown()
        for c in CATEGORIES:
            self.peak[c] = max(self.peak[c], now[c])
        state, total = sum(now[c] for c in STATE), sum(now.values())
        if state > self.peak_state:
            self.peak_state, self.at_state_peak = state, now
        if total > self.peak_total:
            self.peak_total, self.at_total_peak = total, now

    def result(self) -> dict:
        return {"peak": dict(self.peak), "peak_state": self.peak_state, "peak_total": self.peak_total,
                "at_state_peak": self.at_state_peak, "at_total_peak": self.at_total_peak}


# ------------------------------------------------------------------ a job

def model_config(dim: int, layers: int, vocab: int) -> ModelConfig:
    return ModelConfig(vocab=vocab, dim=dim, heads=max(1, dim // 32), layers=layers)


class Job:
    """One rank's model, sync and AdamW at one level, and its step."""

    def __init__(self, cfg: ModelConfig, level: str, batch: int, seq: int):
        torch.manual_seed(0)  # the same weights on every rank
        self.model = Transformer(cfg)
        self.level = level
        self.sync = ExpertParallelGradientSync(self.model, None) if level == "none" else \
            shard_data_parallel(self.model, level)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)  # after sharding: over the shards
        rank = dist.get_rank()
        self.data = SyntheticData(cfg.vocab, seq, seed=0)
        self.rows = range(rank * batch, (rank + 1) * batch)
        self.block_bytes = sum(p.numel() * p.element_size() for p in self.model.blocks[0].parameters())
        self.numel = sum(p.numel() for p in self.model.parameters())  # global shapes (DTensors too)
        self.tensors = len(list(self.model.parameters()))
        self.steps = 0

    def step(self) -> float:
        x, y = self.data.batch(self.steps, self.rows)
        self.opt.zero_grad(set_to_none=True)
        loss = next_token_loss(self.model(x), y)
        loss.backward()
        self.sync.sync()
        self.sync.clip_grad_norm_(1.0)
        self.opt.step()
        self.steps += 1
        return loss.item()

    def state_bytes(self) -> dict:
        """Bytes held between steps (nothing gathered), by category."""
        return {c: v for c, v in StepMemory(self.model, self.opt).breakdown().items() if c in STATE}

    def measure(self) -> dict:
        """One step under `StepMemory` (after at least one step: AdamW state
        exists), then one under the CPU allocator's own count (torch
        profiler memory events: ``allocator_peak``, every category at once,
        including what a single operator allocates and frees inside itself)."""
        while self.steps < 1:
            self.step()
        probe = StepMemory(self.model, self.opt)
        with probe:
            self.step()
        steady = self.state_bytes()
        # the profiler cannot subtract frees of blocks allocated before it started: free the gradients first
        self.opt.zero_grad(set_to_none=True)
        start = sum(StepMemory(self.model, self.opt).breakdown().values())
        return {**probe.result(), "steady": steady, "allocator_peak": start + peak_bytes(self.step)}


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64)
    comms.all_reduce(t, "max")
    return float(t)


# ---------------------------------------------------------------- workers

def _memory_and_time(cfg: ModelConfig, levels, batch: int, seq: int, reps: int) -> dict:
    jobs = {level: Job(cfg, level, batch, seq) for level in levels}
    out = {}
    for level, job in jobs.items():
        out[level] = {"memory": job.measure(), "block_bytes": job.block_bytes, "numel": job.numel,
                      "tensors": job.tensors}
    times = {level: [] for level in levels}
    for rep in range(reps + 1):  # the first round warms up; levels interleave within a round
        for level, job in jobs.items():
            comms.barrier()
            t0 = time.perf_counter()
            job.step()
            took = _max_over_ranks(time.perf_counter() - t0)
            if rep:
                times[level].append(took)
    for level in levels:
        out[level]["step_s"] = times[level]
        out[level]["loss"] = jobs[level].step()  # the same loss at every level (same data, same init)
    return out


def _probe(dim: int, layers: int, vocab: int, level: str, batch: int, seq: int) -> dict:
    job = Job(model_config(dim, layers, vocab), level, batch, seq)
    m = job.measure()
    tracked, allocator = _max_over_ranks(m["peak_total"]), _max_over_ranks(m["allocator_peak"])
    return {"layers": layers, "numel": job.numel, "peak_total": max(tracked, allocator),
            "tracked_peak": tracked, "allocator_peak": allocator,
            "peak_state": _max_over_ranks(m["peak_state"])}


def _largest_fitting(dim: int, vocab: int, level: str, batch: int, seq: int, budget: int, max_layers: int):
    """The most layers whose step's whole peak (max over ranks) is <= ``budget``
    bytes: two small probes give the bytes per layer (the peak is affine in
    the layers), then probes step from the estimate to the boundary."""
    probes = {}

    def fits(layers):
        if layers not in probes:
            probes[layers] = _probe(dim, layers, vocab, level, batch, seq)
        return probes[layers]["peak_total"] <= budget

    if not fits(1):
        return None, sorted(probes.values(), key=lambda p: p["layers"])
    fits(2)
    per_layer = max(1.0, probes[2]["peak_total"] - probes[1]["peak_total"])
    guess = int(min(max_layers, max(1, 1 + (budget - probes[1]["peak_total"]) // per_layer)))
    if fits(guess):
        while guess < max_layers and fits(guess + 1):
            guess += 1
    else:
        while guess > 1 and not fits(guess - 1):
            guess -= 1
        guess -= 1
    return guess, sorted(probes.values(), key=lambda p: p["layers"])


def _sweep(dim: int, vocab: int, batch: int, seq: int, budget: int, max_layers: int) -> dict:
    out = {}
    for level in ("none", "params"):
        layers, probes = _largest_fitting(dim, vocab, level, batch, seq, budget, max_layers)
        best = next((p for p in probes if p["layers"] == layers), None)
        out[level] = {"layers": layers, "numel": best["numel"] if best else 0,
                      "peak_total": best["peak_total"] if best else None, "probes": probes}
    return out


# ------------------------------------------------------------------ report

def _mib(b) -> str:
    return f"{b / MIB:.2f}"


def _per_layer(sweep: dict) -> float:
    """Bytes one more layer costs: the slope of the whole peak over the sweep's probes
    (least squares; allocator peaks jitter by a block's worth)."""
    xs = [p["layers"] for p in sweep["probes"]]
    ys = [p["peak_total"] for p in sweep["probes"]]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def memory_rows(dp: int, res: dict) -> tuple[list[list], dict]:
    """Table rows of one dp's memory and time results, and the per-level summary."""
    per_level = {}
    base = res["none"]
    base_state = max(r["memory"]["peak_state"] for r in base["ranks"])
    base_steps = base["ranks"][0]["step_s"]
    rows = []
    for level in LEVELS:
        r = res[level]
        ranks = r["ranks"]
        worst = max(ranks, key=lambda x: x["memory"]["peak_state"])["memory"]
        state = worst["peak_state"]
        steady = max(sum(x["memory"]["steady"].values()) for x in ranks)
        total = max(x["memory"]["peak_total"] for x in ranks)
        allocator = max(x["memory"]["allocator_peak"] for x in ranks)
        target = 1.1 / dp * base_state + ranks[0]["block_bytes"]
        step = statistics.median(ranks[0]["step_s"])  # max over ranks already
        # each round's ratio (its steps ran back to back), then their median: robust to slow spells
        ratio = statistics.median(t / b for t, b in zip(ranks[0]["step_s"], base_steps))
        ok = state <= target
        per_level[level] = {"peak_state": state, "steady_state": steady, "peak_total": total,
                            "allocator_peak": allocator,
                            "target": target, "meets_target": ok, "state_vs_unsharded": state / base_state,
                            "at_state_peak": worst["at_state_peak"], "step_s": step,
                            "step_vs_unsharded": ratio, "loss": ranks[0]["loss"]}
        at = worst["at_state_peak"]
        rows.append([dp, level, _mib(state), f"{state / base_state:.3f}",
                     "—" if level == "none" else _mib(target),
                     "—" if level == "none" else ("pass" if ok else "FAIL"),
                     " / ".join(_mib(at[c]) for c in STATE), _mib(steady), _mib(total), _mib(allocator),
                     f"{step * 1e3:.0f}", f"{ratio:.2f}"])
    return rows, per_level


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=192, help="model width for the memory and time table")
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16], help="blocks for the memory and time table")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--dps", type=int, nargs="+", default=[2, 4], help="data-parallel sizes")
    ap.add_argument("--reps", type=int, default=9, help="timed steps per level after a warm-up")
    ap.add_argument("--budget-mib", type=float, default=64.0, help="per-rank memory budget of the sweep")
    ap.add_argument("--sweep-dim", type=int, default=0, help="model width of the sweep (layers vary; 0: --dim)")
    ap.add_argument("--max-layers", type=int, default=64, help="the sweep's largest model")
    ap.add_argument("--no-sweep", action="store_true", help="skip the largest-model sweep")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes, dp=2 only, ~30 s (a smoke run: writes neither JSON nor RESULTS.md)")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.dim, args.layers, args.dps, args.reps = 64, [4], [2], 2
        args.sweep_dim, args.budget_mib, args.max_layers, args.seq = 64, 4.0, 16, 32
        args.no_write = True
    return run(args, argv)


def run(args, argv=None) -> dict:
    load_before = os.getloadavg()[0]
    budget = int(args.budget_mib * MIB)
    results, rows, sweeps = [], [], {}
    for dp in args.dps:
        for layers in args.layers:
            cfg = model_config(args.dim, layers, args.vocab)
            per_rank = run_distributed(_memory_and_time, dp, cfg, LEVELS, args.batch, args.seq, args.reps,
                                       timeout=1800)
            res = {level: {"ranks": [r[level] for r in per_rank]} for level in LEVELS}
            level_rows, summary = memory_rows(dp, res)
            rows += [[layers, *row] for row in level_rows]
            results.append({"dp": dp, "layers": layers, "numel": res["none"]["ranks"][0]["numel"],
                            "levels": summary, "per_rank": res})
        if not args.no_sweep:
            sweeps[dp] = run_distributed(_sweep, dp, args.sweep_dim or args.dim, args.vocab, args.batch, args.seq,
                                         budget, args.max_layers, timeout=3000)[0]
    load_after = os.getloadavg()[0]
    block = results[0]["per_rank"]["none"]["ranks"][0]["block_bytes"]
    table = markdown_table(["layers", "dp", "level", "state peak MiB", "vs unsharded", "target MiB", "target",
                            "at peak: params / gathered / grads / block grads / optim MiB", "steady state MiB",
                            "whole peak MiB", "allocator peak MiB", "step ms", "step vs unsharded"], rows)
    sweep_rows = []
    for dp, sw in sweeps.items():
        none, params = sw["none"], sw["params"]
        ratio = f"{params['numel'] / none['numel']:.2f}" if none["numel"] else "—"
        sweep_rows.append([dp, none["layers"], f"{none['numel'] / 1e6:.2f}",
                           _mib(none["peak_total"]) if none["peak_total"] else "—", _mib(_per_layer(none)),
                           params["layers"], f"{params['numel'] / 1e6:.2f}",
                           _mib(params["peak_total"]) if params["peak_total"] else "—", _mib(_per_layer(params)),
                           ratio])
    sweep_table = markdown_table(["dp", "unsharded: layers", "params (M)", "peak MiB", "MiB per layer",
                                  "params level: layers", "params (M)", "peak MiB", "MiB per layer",
                                  "params ratio"], sweep_rows) if sweeps else ""
    sizes = ", ".join(f"{r['layers']} layers: {r['numel'] / 1e6:.2f} M" for r in results if r["dp"] == args.dps[0])
    summary = (f"Reference transformer dim {args.dim}, vocab {args.vocab}, {args.dim // 32 or 1} heads "
               f"({sizes} parameters; float32; one block's parameters {_mib(block)} MiB); "
               f"{args.batch} sequences x {args.seq} tokens per rank; AdamW; gloo, one thread per rank. "
               f"Machine load average: {load_before:.1f} at the start, {load_after:.1f} at the end.")
    print(summary)
    print(table)
    if sweeps:
        print(f"\nLargest model within {args.budget_mib:g} MiB per rank (dim {args.sweep_dim or args.dim}, "
              f"layers swept):")
        print(sweep_table)
    payload = {"args": vars(args), "results": results,
               "sweep": {str(k): v for k, v in sweeps.items()}}
    if not args.quick:  # a smoke run leaves the repository as it was
        write_json("sharded_dp", payload)
    if not args.no_write:
        update_results("sharded_dp", "Sharded data parallelism (FSDP2: none / grads / params)",
                       command_line(__file__, argv), report_body(args, summary, table, sweep_table))
    return payload


def report_body(args, summary, table, sweep_table) -> str:
    sweep = (f"\n\nLargest model within {args.budget_mib:g} MiB per rank (the step's whole peak, the larger of "
             f"the tracker's and the allocator's, slowest rank: state, communication buffers, activations and "
             f"temporaries; dim {args.sweep_dim or args.dim}, "
             f"{args.batch} x {args.seq} tokens per rank, layers swept up to {args.max_layers}):\n\n"
             + sweep_table + "\n\nThe sweep counts the whole peak, and activations (the same at every level: "
            f"{args.batch} x {args.seq} tokens per rank here) and communication buffers do not shard, so a "
            "layer costs more than 1/N of its unsharded bytes (*MiB per layer*: the slope over the probes) "
            "and the ratio stays below N; it approaches N as the state outweighs the activations (wider "
            "models, fewer tokens per rank, activation checkpointing). Where the allocator's peak falls "
            "inside a gloo collective it varies by up to a block between runs, so the boundary can move by "
            "a layer.") if sweep_table else ""
    return (summary + "\n\n" + table + sweep + "\n\n"
            "- Memory: live storage bytes per rank during one training step (forward, backward, gradient "
            "sync, clipping, AdamW step) after a warm-up step, sampled after every operator by a "
            "`TorchDispatchMode` that counts each live storage once (CPU has no allocator statistics by "
            "category). *state* = params (this rank's shards, or whole parameters) + gathered (FSDP2's "
            "unsharded parameters) + grads (this rank's gradient shards, or whole gradients) + block grads "
            "(FSDP2's unsharded gradients of a unit, from its backward to its reduce-scatter) + AdamW state "
            "(exp_avg, exp_avg_sq, step); *at peak* is its breakdown at its peak; the worst rank is shown. "
            "*steady*: state between steps. *whole peak*: every live storage at once, including "
            "communication buffers (FSDP2's flat all-gather and reduce-scatter buffers, the unsharded "
            "all-reduce's flat buckets, a copy of every gradient), activations and temporaries (operators "
            "on DTensor shards -- "
            "the optimizer step -- run below the tracker, so their temporaries are not seen). *allocator "
            "peak*: the same step's peak counted by the CPU allocator itself (torch profiler memory events, "
            "from the bytes live at the step's start): it sees everything, including what one operator "
            "allocates and frees inside itself -- for `none` and `grads` it equals the tracker's whole peak "
            "to the byte; for `params` it is higher: its peak falls inside gloo's all-gather (profiler: "
            "`c10d::_allgather_base_` during a block's backward prefetch), which gathers into a temporary "
            "flat tensor of its own and copies it out (NCCL writes in place).\n"
            "- Target (issue 17): state peak <= 1.1/N x the unsharded state peak + one block's gathered "
            "parameters. It is meant for `params` (ZeRO-3); `grads` (ZeRO-2) keeps every parameter whole "
            "from the forward to the end of the backward, so it cannot meet it and is shown for "
            "comparison.\n"
            "- What `params` holds above 1/N of the unsharded state: one block's gathered parameters (the "
            "*gathered* peak; FSDP2's flat all-gather and reduce-scatter buffers, up to two blocks' worth, "
            "are counted under comm), that unit's unsharded gradients until its reduce-scatter (*block "
            "grads*), and the root unit (the final norm), which `shard_data_parallel` keeps gathered for the "
            "step. The embedding and the head are units of their own: the embedding is freed after its "
            "forward, the head after its backward (it stays gathered between its forward and its backward, "
            "which follow each other). "
            "These bytes are fixed for a model width while the target's slack, 0.1/N of the unsharded state, "
            "grows with depth: the margin to the target improves with layers (compare the rows).\n"
            "- Step time: the slowest rank's step, median of "
            f"{args.reps} after a warm-up, levels interleaved (a step of each per round), no tracker; "
            "*step vs unsharded* is the median of the rounds' ratios. On gloo over loopback with ranks "
            "sharing 2 cores, every collective is a memory copy through the kernel by CPUs that also do the "
            "math: `params` all-gathers every block's parameters twice (forward, and again in the "
            "backward) and reduce-scatters its gradients, about 1.5x the bytes of the unsharded all-reduce, in "
            "3L+7 smaller collectives (L+3 all-gathers in the forward: root, embedding, blocks, head; L+1 in "
            "the backward; L+3 reduce-scatters) instead of a few large buckets, each with FSDP2's per-unit "
            "copy-in/copy-out and hooks in Python; `grads` gathers once per step (2L+6 collectives, 1x the "
            "all-reduce's bytes). Nothing overlaps "
            "communication with compute here (the prefetch only reorders), so the ratio is the whole cost "
            "of sharding; on GPUs with NCCL the gathers overlap the previous block's compute.\n"
            "- Other processes share the machine (see the load average): absolute times are noisy; the "
            "tracker's memory columns are the same in every run, the allocator peak varies by up to a block.")


if __name__ == "__main__":
    main()
