"""Fault detection: latency, localisation, false positives and overhead of
loom.faults, against what plain PyTorch offers, in one run.

Four gloo ranks run a synchronous job (a simulated compute phase, a
gradient-sized and a loss-sized all-reduce per step, a ring exchange for the
slow-link trials), monitored by a `StoreAggregator` in this process.  Faults
are injected with `loom.faults.inject`:

- latency per fault kind (steps and seconds from the first faulty step to the
  published fault);
- localisation: straggler injections at a random rank with a random delay of
  10-100% of a step; correct = exactly that rank flagged and nothing else;
- false positives over clean steps (a CPU-bound step, the noisy case here);
- monitoring overhead on step time (monitored and unmonitored blocks
  alternate, CPU-bound steps);
- the baseline: a hung peer under a process-group timeout, `monitored_barrier`
  (and its cost per step), and TORCH_DISTRIBUTED_DEBUG=DETAIL for a
  mismatched collective (and its cost per step).

    python benchmarks/fault_detection.py [--trials 50] [--clean-steps 1000] [--step 0.25]
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import threading
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _report import command_line, markdown_table, update_results, write_json  # noqa: E402

from loom import comms  # noqa: E402
from loom.comms.testing import WorkerError, run_distributed  # noqa: E402
from loom.faults import Injector, Monitor, StoreAggregator  # noqa: E402

WORLD = 4
_DONE, _READY, _STOP = "bench/done/{}", "bench/ready/{}", "bench/stop/{}"


# ------------------------------------------------------------------ workers

def _compute(spec):
    if spec.get("cpu"):  # a CPU-bound step: noisy on a shared 2-core machine
        a = torch.ones(spec["cpu"], spec["cpu"])
        for _ in range(spec.get("reps", 1)):
            a = torch.mm(a, a).mul_(1e-3)
    if spec.get("sleep"):  # a step whose compute runs elsewhere (a GPU)
        time.sleep(spec["sleep"])


def _trial(ctl, address, secret, k, spec, group):
    rank = dist.get_rank()
    comms.reset_trace()
    injector = Injector(spec.get("plan", ""), rank, group=group)
    if spec["kind"] == "mismatch":  # as on NCCL: on gloo loom.comms would refuse the mismatched collective itself
        comms.set_collective_checks("off")
    monitor = Monitor(address, secret=secret, on_fatal=lambda f: injector.release()).start() \
        if spec["monitored"] else None
    grad = torch.ones(spec.get("grad", 4096))
    buf = torch.empty(1024)
    left, right = (rank - 1) % WORLD, (rank + 1) % WORLD
    times = []
    try:
        for step in range(spec["steps"]):
            t0 = time.perf_counter()
            comms.set_step(step)
            injector.at_step(step)
            if spec.get("ring"):
                comms.wait_all([comms.isend(torch.ones(1024), right, group), comms.irecv(buf, left, group)])
            _compute(spec)
            if spec.get("barrier"):  # the monitored_barrier baseline: one per step
                dist.monitored_barrier(group, timeout=datetime.timedelta(seconds=60))
            comms.all_reduce(grad, "avg", group)
            flag = float(rank == 0 and spec["monitored"] and ctl.check([_STOP.format(k)]))
            out = comms.all_reduce(torch.tensor([1.0, flag]), "sum", group)
            times.append(time.perf_counter() - t0)
            if out[1] > 0:  # the controller saw the fault: next trial
                break
    finally:
        comms.set_step(None)
        if monitor is not None:
            monitor.stop()
        injector.close()
        comms.set_collective_checks(os.environ.get("LOOM_CHECK_COLLECTIVES", "auto"))
    comms.barrier(group)
    if rank == 0:
        ctl.set(_DONE.format(k), "1")
    ctl.wait([_READY.format(k)], datetime.timedelta(seconds=300))
    return {"times": times, "log": injector.log, "monitor_cpu_s": monitor.cpu_s if monitor else 0.0}


def _worker(address, secret, ctl_port, trials):
    group = dist.new_group(list(range(WORLD)), timeout=datetime.timedelta(seconds=120))
    comms.register_group(group, "job")
    ctl = dist.TCPStore("127.0.0.1", ctl_port, is_master=False, timeout=datetime.timedelta(seconds=300))
    # (no CPU pinning: on a shared machine a pinned rank can wait seconds for its core)
    return [_trial(ctl, address, secret, k, spec, group) for k, spec in enumerate(trials)]


class Controller(threading.Thread):
    """Harvests each trial's faults, tells rank 0 to stop a trial once its
    fault is out, and resets the aggregator between trials."""

    def __init__(self, agg: StoreAggregator, trials, ctl_port: int):
        super().__init__(daemon=True)
        self.agg, self.trials, self.results = agg, trials, []
        self.agg_cpu = []  # per trial: (aggregator CPU seconds, wall seconds)
        self.store = dist.TCPStore("127.0.0.1", ctl_port, is_master=False,
                                   timeout=datetime.timedelta(seconds=600))

    def run(self):
        for k, spec in enumerate(self.trials):
            cpu0, t0 = self.agg.cpu_s, time.monotonic()
            while not self.store.check([_DONE.format(k)]):
                if spec.get("stop_on") and any(f.kind == spec["stop_on"] for f in self.agg.faults):
                    self.store.set(_STOP.format(k), "1")
                time.sleep(0.02)
            self.agg_cpu.append((self.agg.cpu_s - cpu0, time.monotonic() - t0))
            old, detected = self.agg.reset()
            self.results.append([(f, detected.get(f.key)) for f in old.faults])
            self.store.set(_READY.format(k), "1")


# ------------------------------------------------------------------ trials

def _plan_trials(args, rng):
    T = args.step
    base = {"sleep": T, "monitored": True, "grad": 4096}
    trials = []
    r = rng.randrange(WORLD)
    trials.append({**base, "kind": "straggler", "steps": 20, "onset": 8, "culprit": (r,), "stop_on": "straggler",
                   "plan": f"straggler:rank={r},delay={0.5 * T},from=8"})
    src = rng.randrange(WORLD)
    trials.append({**base, "kind": "slow_link", "steps": 20, "onset": 8, "ring": True, "stop_on": "slow_link",
                   "link": (src, (src + 1) % WORLD),
                   "plan": f"slow_link:src={src},dst={(src + 1) % WORLD},delay={0.2 * T},from=8"})
    r = rng.randrange(WORLD)
    trials.append({**base, "kind": "mismatch", "steps": 12, "onset": 8, "culprit": (r,), "stop_on": "mismatch",
                   "plan": f"mismatch:rank={r},step=8"})
    r = rng.randrange(WORLD)
    trials.append({**base, "kind": "hang", "steps": 12, "onset": 8, "culprit": (r,), "stop_on": "hang",
                   "plan": f"hang:rank={r},step=8"})
    for _ in range(args.trials):
        r, frac = rng.randrange(WORLD), rng.uniform(0.1, 1.0)
        trials.append({**base, "kind": "localise", "steps": 18, "onset": 6, "culprit": (r,), "frac": frac,
                       "stop_on": "straggler", "plan": f"straggler:rank={r},delay={frac * T:.4f},from=6"})
    trials.append({"kind": "clean", "steps": args.clean_steps, "sleep": 0.01, "cpu": 96, "monitored": True})
    for _ in range(args.blocks):  # the three modes alternate, so drift hits them alike
        for monitored in (True, False):
            trials.append({"kind": "overhead", "steps": args.block_steps, "cpu": 256, "reps": 3,
                           "monitored": monitored})
        trials.append({"kind": "barrier_cost", "steps": args.block_steps, "cpu": 256, "reps": 3,
                       "monitored": False, "barrier": True})
    return trials


def _onset_time(out, spec):
    """When the first faulty step began on the injecting rank (its monotonic clock = ours, same host)."""
    ranks = spec.get("culprit") or spec.get("link")
    log = out[ranks[0]]["log"]
    return log[0][2] if log else None


def _analyse(trials, outs, results, T):
    latency, localise = {}, []
    clean_faults, overhead = [], {"on": [], "off": [], "barrier": [], "monitor_cpu": []}
    for k, spec in enumerate(trials):
        faults = results[k]
        per_rank = [o[k] for o in outs]
        kind = spec["kind"]
        if kind in ("straggler", "slow_link", "mismatch", "hang"):
            hit = next(((f, t) for f, t in faults if f.kind == kind), (None, None))
            f, t = hit
            start = _onset_time(per_rank, spec)
            right = f is not None and (f.link == spec["link"] if kind == "slow_link" else f.ranks == spec["culprit"])
            latency[kind] = {"detected": f is not None, "correct": right,
                             "steps": None if f is None or f.step is None or kind in ("hang",) else
                             f.step - spec["onset"] + 1,
                             "seconds": None if t is None or start is None else t - start,
                             "others": [str(x) for x, _ in faults if x is not f],
                             "evidence": f.evidence if f else ""}
        elif kind == "localise":
            named = [f.ranks for f, _ in faults if f.kind == "straggler"]
            f = next((f for f, _ in faults if f.kind == "straggler"), None)
            localise.append({"frac": spec["frac"], "culprit": spec["culprit"], "named": named,
                             "others": [str(f2) for f2, _ in faults if f2.kind != "straggler"],
                             "correct": named == [spec["culprit"]] and len(faults) == 1,
                             "steps": None if f is None else f.step - spec["onset"] + 1})
        elif kind == "clean":
            clean_faults = [str(f) for f, _ in faults]
        elif kind in ("overhead", "barrier_cost"):
            # a block's step time: the 20th percentile over its steps (other jobs on the machine only
            # ever add time), of the slowest rank; the block's first steps excluded
            step = max(_quantile(o["times"][5:], 0.2) for o in per_rank)
            key = "barrier" if kind == "barrier_cost" else ("on" if spec["monitored"] else "off")
            overhead[key].append(step)
            if spec["monitored"]:
                overhead["monitor_cpu"].append(statistics.mean(o["monitor_cpu_s"] / sum(o["times"])
                                                               for o in per_rank))
    return latency, localise, clean_faults, overhead


def _quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ------------------------------------------------------------ lost rank

def _kill_worker(address, secret, mark):
    rank = dist.get_rank()
    group = dist.new_group(list(range(WORLD)), timeout=datetime.timedelta(seconds=60))
    monitor = Monitor(address, secret=secret).start()
    try:
        for step in range(40):
            comms.set_step(step)
            if rank == 3 and step == 10:
                with open(mark, "w") as fh:
                    fh.write(repr(time.monotonic()))
                os.kill(os.getpid(), 9)
            time.sleep(0.02)
            comms.all_reduce(torch.ones(16), "sum", group)
    finally:
        monitor.stop()


def _lost_latency(tmp):
    mark = os.path.join(tmp, "killed_at")
    with StoreAggregator(WORLD) as agg:
        try:
            run_distributed(_kill_worker, WORLD, agg.address, agg.secret, mark, timeout=300)
        except WorkerError:
            pass
        deadline = time.monotonic() + 10
        while not agg.faults and time.monotonic() < deadline:
            time.sleep(0.05)
        first = agg.faults[0] if agg.faults else None
        killed = float(open(mark).read())
        return {"detected": first is not None and first.kind == "lost_rank",
                "correct": first is not None and first.ranks == (3,),
                "seconds": agg.detected_at[first.key] - killed if first else None, "steps": None,
                "evidence": first.evidence if first else ""}


# ------------------------------------------------------------- baselines

def _timeout_baseline(pg_timeout, use_barrier):
    """Rank 3 hangs; the others block in an all-reduce (or a monitored_barrier)."""
    rank = dist.get_rank()
    group = dist.new_group(list(range(WORLD)), timeout=datetime.timedelta(seconds=pg_timeout))
    if rank == 3:
        time.sleep(pg_timeout + 3)
        return None
    t0 = time.monotonic()
    try:
        if use_barrier:
            dist.monitored_barrier(group, timeout=datetime.timedelta(seconds=pg_timeout), wait_all_ranks=True)
        else:
            dist.all_reduce(torch.ones(4), group=group)
        return (time.monotonic() - t0, "no error")
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return (time.monotonic() - t0, str(exc).splitlines()[0][:160])


def _detail_baseline(steps, cpu, reps):
    """TORCH_DISTRIBUTED_DEBUG=DETAIL: cost per step, then a mismatched collective."""
    rank = dist.get_rank()
    plain = dist.new_group(list(range(WORLD)))
    dist.set_debug_level(dist.DebugLevel.DETAIL)
    checked = dist.new_group(list(range(WORLD)), timeout=datetime.timedelta(seconds=60))
    dist.set_debug_level(dist.DebugLevel.OFF)
    spec = {"cpu": cpu, "reps": reps}
    times = {"plain": [], "detail": []}
    for _ in range(3):
        for name, g in (("plain", plain), ("detail", checked)):
            for _ in range(steps):
                t0 = time.perf_counter()
                _compute(spec)
                dist.all_reduce(torch.ones(4096), group=g)
                dist.all_reduce(torch.ones(2), group=g)
                times[name].append(time.perf_counter() - t0)
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.zeros(2, 2) if rank == 1 else torch.zeros(4), group=checked)
        result = (time.monotonic() - t0, "no error")
    except Exception as exc:  # noqa: BLE001
        result = (time.monotonic() - t0, str(exc).splitlines()[0][:160])
    return {k: statistics.median(v) for k, v in times.items()}, result


# ------------------------------------------------------------------ main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=50, help="randomised straggler injections")
    ap.add_argument("--clean-steps", type=int, default=1000, help="clean steps for false positives")
    ap.add_argument("--step", type=float, default=0.25, help="simulated compute per step (s)")
    ap.add_argument("--blocks", type=int, default=8,
                    help="rounds of monitored / unmonitored / monitored_barrier blocks (overhead)")
    ap.add_argument("--block-steps", type=int, default=100, help="steps per overhead block")
    ap.add_argument("--pg-timeout", type=float, default=10.0, help="process-group timeout of the baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    t_start = time.monotonic()

    trials = _plan_trials(args, rng)
    # the trials' control channel (a TCPStore of its own: the aggregator's listener carries reports only)
    ctl_store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=600))
    with StoreAggregator(WORLD) as agg:
        ctl = Controller(agg, trials, ctl_store.port)
        ctl.start()
        outs = run_distributed(_worker, WORLD, agg.address, agg.secret, ctl_store.port, trials, timeout=3600)
        ctl.join(30)
        busy = [c for c, spec in zip(ctl.agg_cpu, trials) if spec["kind"] == "overhead" and spec["monitored"]]
        agg_cpu = sum(c for c, _ in busy) / sum(w for _, w in busy)  # while the CPU-bound steps ran
    latency, localise, clean_faults, overhead = _analyse(trials, outs, ctl.results, args.step)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        latency["lost_rank"] = _lost_latency(tmp)
    pg = run_distributed(_timeout_baseline, WORLD, args.pg_timeout, False, timeout=300)
    mb = run_distributed(_timeout_baseline, WORLD, 2.0, True, timeout=300)
    detail = run_distributed(_detail_baseline, WORLD, args.block_steps, 256, 3, timeout=600)

    # ---- tables
    rows = []
    for kind in ("straggler", "slow_link", "mismatch", "hang", "lost_rank"):
        x = latency[kind]
        rows.append([kind, "yes" if x["detected"] else "NO", "yes" if x["correct"] else "NO",
                     "-" if x["steps"] is None else x["steps"],
                     "-" if x["seconds"] is None else f"{x['seconds']:.2f}"])
    lat_table = markdown_table(["fault", "detected", "right culprit", "steps", "seconds"], rows)

    buckets = [(0.1, 0.2), (0.2, 0.5), (0.5, 1.01)]
    loc_rows = []
    for lo, hi in buckets:
        xs = [x for x in localise if lo <= x["frac"] < hi]
        if xs:
            ok = sum(x["correct"] for x in xs)
            steps = [x["steps"] for x in xs if x["steps"] is not None and x["correct"]]
            loc_rows.append([f"{lo:.0%}-{min(hi, 1):.0%}", len(xs), f"{ok}/{len(xs)} ({ok / len(xs):.0%})",
                             f"{statistics.median(steps):.0f}" if steps else "-"])
    ge20 = [x for x in localise if x["frac"] >= 0.2]
    loc_table = markdown_table(["delay (of a step)", "injections", "localised exactly", "median steps"], loc_rows)

    on, off = statistics.median(overhead["on"]), statistics.median(overhead["off"])
    # paired by round (the three modes ran back to back), so slow drift of the machine cancels
    mon_cost = statistics.median(a / b for a, b in zip(overhead["on"], overhead["off"])) - 1
    bar_cost = statistics.median(a / b for a, b in zip(overhead["barrier"], overhead["off"])) - 1
    monitor_cpu = statistics.median(overhead["monitor_cpu"])
    detail_cost, (detail_s, detail_msg) = detail[0]
    pg_s, pg_msg = pg[0]
    mb_s, mb_msg = mb[0]
    base_rows = [
        ["loom.faults (this)", "all five kinds, named", f"{latency['hang']['seconds']:.1f} s",
         f"{mon_cost * 100:+.1f}%"],
        [f"process-group timeout ({args.pg_timeout:g} s here; gloo default 30 min, NCCL 10 min)",
         "hang only, no culprit", f"{pg_s:.1f} s: \"{pg_msg[:90]}\"", "0"],
        ["`monitored_barrier` (2 s timeout; cost: one per step)", "hang/dead rank at the barrier, named",
         f"{mb_s:.1f} s: \"{mb_msg[:90]}\"", f"{bar_cost * 100:+.1f}%"],
        ["`TORCH_DISTRIBUTED_DEBUG=DETAIL`", "mismatched collective, named",
         f"{detail_s:.2f} s: \"{detail_msg[:90]}\"",
         f"{(detail_cost['detail'] / detail_cost['plain'] - 1) * 100:+.1f}%"],
        ["straggler / slow link", "nothing in PyTorch", "-", "-"],
    ]
    base_table = markdown_table(["tool", "finds", "time to report (hang / mismatch)", "step-time cost"],
                                base_rows)
    summary = (f"Localisation for delays >= 20% of a step: **{sum(x['correct'] for x in ge20)}/{len(ge20)}**; "
               f"false positives over {args.clean_steps} clean steps: **{len(clean_faults)}**"
               + (f" ({'; '.join(clean_faults)[:300]})" if clean_faults else "") +
               f"; monitoring overhead on step time: **{mon_cost * 100:+.1f}%** "
               f"(median ratio over {args.blocks} rounds of back-to-back monitored and unmonitored blocks "
               f"of {args.block_steps} CPU-bound steps; median step {off * 1e3:.1f} ms unmonitored, "
               f"{on * 1e3:.1f} ms monitored), while the CPU the monitor "
               f"thread used was **{monitor_cpu * 100:.2f}%** of each rank's time and the aggregator "
               f"{agg_cpu * 100:.1f}% of one core (in this process; a Ray actor or rank 0's thread in "
               f"`loom train`) - on 2 cores shared by 4 ranks, that CPU comes out of the "
               f"ranks' share.")
    print(lat_table, "\n")
    print(loc_table, "\n")
    print(base_table, "\n")
    print(summary)
    print(f"\nwall time {time.monotonic() - t_start:.0f} s")
    write_json("fault_detection", {
        "args": vars(args), "latency": latency, "localisation": localise, "clean_faults": clean_faults,
        "overhead_s": overhead, "aggregator_cpu": agg_cpu,
        "baselines": {"pg_timeout": pg[0], "monitored_barrier": mb[0],
                      "detail": {"cost_s": detail_cost, "mismatch": detail[0][1]}}})
    if not args.no_write:
        body = (f"4 gloo ranks; steps of {args.step * 1e3:.0f} ms simulated compute (sleep) plus a 16 KiB "
                f"and a tiny all-reduce (a ring exchange for the slow link); monitor interval 0.1 s, default "
                f"thresholds. Latency counts from the start of the first faulty step to the published fault "
                f"(steps: faulty steps until the evidence was complete).\n\n" + lat_table +
                "\n\nRandomised stragglers (random rank, delay uniform in 10-100% of a step):\n\n" + loc_table +
                "\n\n" + summary + "\n\nWhat plain PyTorch offers, side by side:\n\n" + base_table +
                "\n\nTargets: 100% localisation for delays >= 20% of a step; zero false positives; hang "
                "detected <= 5 s; overhead <= 1% of step time. On a 2-core box running 4 ranks, "
                "step-time differences of a few % are within the noise.")
        cmd = command_line(__file__, argv)
        update_results("fault_detection", "Fault detection (loom.faults vs plain PyTorch)", cmd, body)


if __name__ == "__main__":
    main()
