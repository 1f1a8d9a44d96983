"""Recovery: what a fault costs a `loom train` job, and the same job's
restart under torchrun and Ray Train, side by side in one run.

Every job is loom's tiny reference transformer on 2 CPU ranks (dp=2) with
checkpoints every 10 steps.  A step's compute is simulated by a sleep of
``--step-s`` seconds on every rank (an ``attempts=all`` straggler injection
on both ranks, equal delays: a GPU step leaves the CPU idle like this), so
the numbers measure restarts, not two shared cores computing.

1. Per fault kind, one `loom train` run under Ray (``--max-restarts``):

   - kill: ``--inject kill:rank=1,step=K`` (SIGKILL of rank 1's process);
   - hang: ``--inject hang:rank=1,step=K`` (rank 1 blocks forever before its
     step's first collective; the fault monitor names it, the driver stops
     the workers);
   - node loss: a `ray.cluster_utils.Cluster` of a head (no CPUs) and three
     1-CPU nodes on this machine, the two ranks spread over two of them, one
     spare; rank 1's node is removed after the step-20 checkpoint.

   Times: *injected* is the moment the fault fires (the injector's
   ``LOOM_INJECT_LOG`` line, `loom.faults.inject`; for node loss, when
   ``Cluster.remove_node`` is called); *named* is the first driver line that
   names it (``[fault] ...`` or ``restart 1/N after ...``, timestamped as it
   arrives on the driver's stdout); *first step* is when the new attempt's
   first step reaches the driver: the restart record's ``recovery_s``
   (restarts.jsonl: from the driver seeing the fault to that step) added to
   the named time.  Detection = named - injected; fault -> next step =
   detection + ``recovery_s``.  The reload tier is the record's
   ``reload.tier`` where the branch records it, else "storage" (every
   restart here reloads from the checkpoint store).

2. Goodput of a ``--goodput-steps`` run (300) with a kill every 100 steps
   (``kill:rank=1,step=100;kill:rank=1,step=200,attempts=2``: an injection
   fires in the job's first N attempts, so the kill at 200 fires in attempt
   1, the one that reaches it), checkpoints every 10.  *Useful step time*:
   the sum, over the steps of the final history (each step counted once, the
   row of the attempt that completed it last), of their ``step_time_s``;
   goodput = useful step time / wall time of the whole job (process start
   to exit: Ray's start, every attempt, every checkpoint, every restart).
   The same job without faults shows what the job's start and checkpoints
   alone cost.

3. Peers, the same 300-step job with the same kills: (a) ``torchrun
   --max-restarts 2 ... -m loom.launch.worker --resume auto``; (b) Ray
   Train's `TorchTrainer` with ``FailureConfig(max_failures=2)`` running a
   plain DDP loop (the same model, steps, sleep, a ``ray.train.Checkpoint``
   every 10 steps; rank 1 calls ``os._exit(1)`` at steps 100 and 200).  A
   peer that is not installed is skipped with the reason printed.

4. Reload from host memory vs storage for a 1 GB state:
   ``benchmarks/recovery_tiers.py``'s ``memory_vs_storage`` where that module
   exists.

    python benchmarks/recovery.py [--quick] [--out PATH] [--step-s 0.25] [--no-write]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _report import command_line, markdown_table, update_results, write_json  # noqa: E402

JOB = ["--dp", "2", "--data", "synthetic", "--dim", "16", "--layers", "1", "--heads", "2", "--seq-len", "16",
       "--batch-size", "4", "--eval-every", "0", "--no-progress"]
CKPT_EVERY = 10
INJECT_LOG = "LOOM_INJECT_LOG"  # loom.faults.inject.LOG_ENV
_NAMED = re.compile(r"^(\[fault\] (hang|lost_rank|lost_node)|restart \d+/\d+ after)")


def say(text: str) -> None:
    print(f"[recovery {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ------------------------------------------------------------------ pure helpers (tested)

def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file ([] when absent; a torn line is skipped)."""
    rows = []
    with contextlib.suppress(FileNotFoundError), open(path) as fh:
        for line in fh:
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def final_history(rows: list[dict]) -> dict[int, dict]:
    """step -> the training row that counts for it: each step once, the row of
    the attempt that completed it last (rows in file order; a redone step's
    later row replaces the earlier).  Evaluation rows are left out."""
    out: dict[int, dict] = {}
    for row in rows:
        if row.get("split", "train") == "eval" or "step" not in row or "step_time_s" not in row:
            continue
        step = int(row["step"])
        if step in out and row.get("attempt", 0) < out[step].get("attempt", 0):
            continue
        out[step] = row
    return out


def goodput(rows: list[dict], wall_s: float, steps: int | None = None) -> dict:
    """Useful step time over wall time.  ``rows``: a run's metrics rows
    (``step``, ``step_time_s`` seconds, ``attempt``); ``wall_s``: the job's
    wall time in seconds; ``steps``: the steps the job had to run (a missing
    one raises ValueError: an incomplete history has no goodput).
    Returns ``useful_s`` (the sum of `final_history`'s step times),
    ``wall_s``, ``goodput`` (their ratio), ``steps`` and ``redone`` (rows
    for steps run more than once, the lost work)."""
    if wall_s <= 0:
        raise ValueError(f"wall_s={wall_s!r} must be > 0")
    hist = final_history(rows)
    if steps is not None:
        missing = sorted(set(range(steps)) - set(hist))
        if missing:
            raise ValueError(f"the run's metrics have no row for {len(missing)} of its {steps} steps "
                             f"(first: {missing[0]}): it did not finish")
    train_rows = [r for r in rows if r.get("split", "train") != "eval" and "step_time_s" in r]
    useful = sum(float(r["step_time_s"]) for r in hist.values())
    return {"useful_s": useful, "wall_s": wall_s, "goodput": useful / wall_s, "steps": len(hist),
            "redone": len(train_rows) - len(hist)}


def fault_cost(injected: float | None, named: float | None, record: dict | None) -> dict:
    """One restart's cost.  ``injected``: when the fault fired (``time.time()``
    s; None unknown); ``named``: when the driver first named it; ``record``:
    its restarts.jsonl line.  Returns detection_s (named - injected),
    recovery_s (the record's: the driver seeing the fault -> the new
    attempt's first step), to_next_step_s (their sum), steps_lost,
    resumed_step, tier (``reload.tier`` when recorded, else "storage") and
    cause (kind and rank); a part that cannot be known is None."""
    record = record or {}
    detection = named - injected if injected is not None and named is not None else None
    recovery = record.get("recovery_s")
    to_next = detection + recovery if detection is not None and recovery is not None else None
    reload = record.get("reload") or {}
    cause = record.get("cause") or {}
    return {"detection_s": detection, "recovery_s": recovery, "to_next_step_s": to_next,
            "steps_lost": record.get("steps_lost"), "resumed_step": record.get("resumed_step"),
            "tier": reload.get("tier") or ("storage" if record else None),
            "cause": f"{cause.get('kind')} (rank {cause.get('rank')})" if cause else None}


def first_named(lines: list[tuple[float, str]], after: float | None) -> float | None:
    """The time of the first driver line that names a fault (``[fault] hang``,
    ``[fault] lost_rank``, ``restart k/N after ...``) at or after ``after``."""
    for t, text in lines:
        if (after is None or t >= after - 0.05) and _NAMED.match(text):
            return t
    return None


def phases(lines: list[tuple[float, str]], named: float | None, recovery_s: float | None) -> dict:
    """Where a restart's time goes, in seconds after the driver named the
    fault: ``placed`` (the new attempt's ``attempt k: rank 0 on node ...``
    line: the old workers stopped, the new ones started), ``loaded`` (rank
    0's ``resumed from ...`` line: process group up, checkpoint read) and
    ``first_step`` (``recovery_s``); None where the line is missing."""
    def after(prefix):
        if named is None:
            return None
        return next((t - named for t, text in lines if t >= named and re.match(prefix, text)), None)
    return {"placed": after(r"attempt [1-9]\d*: "), "loaded": after(r"resumed from "), "first_step": recovery_s}


def compute_plan(step_s: float) -> str:
    """The simulated compute: every rank sleeps ``step_s`` s per step, in every attempt."""
    return ";".join(f"straggler:rank={r},delay={step_s},attempts=all" for r in (0, 1))


def kill_plan(at: list[int]) -> str:
    """Kill rank 1 at each step of ``at``, each in the attempt that reaches it
    (the k-th kill fires in the job's first k attempts; the earlier attempts died before it)."""
    return ";".join(f"kill:rank=1,step={s}" + (f",attempts={k + 1}" if k else "") for k, s in enumerate(at))


# ------------------------------------------------------------------ running a job

class Job:
    """A subprocess whose merged stdout/stderr lines are timestamped as they
    arrive (``lines``: (time.time(), text)); ``on_line(t, text)`` sees each."""

    def __init__(self, cmd: list[str], env: dict | None = None, cwd: str | None = None, on_line=None):
        self.cmd, self.lines = cmd, []
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env=full_env, cwd=cwd, start_new_session=True)
        self.on_line = on_line

    def wait(self, timeout: float) -> int:
        timer = threading.Timer(timeout, self.stop)
        timer.start()
        try:
            for line in self.proc.stdout:
                t = time.time()
                self.lines.append((t, line.rstrip("\n")))
                if self.on_line is not None:
                    self.on_line(t, line)
            rc = self.proc.wait()
        except BaseException:
            self.stop()  # never leave a job running behind a failed benchmark
            raise
        finally:
            timer.cancel()
        self.t1 = time.time()
        self.wall_s = self.t1 - self.t0
        return rc

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def tail(self, n: int = 30) -> str:
        return "\n".join(text for _, text in self.lines[-n:])


def _loom_train(tmp: str, name: str, steps: int, plan: str, extra=(), env=None, on_line=None,
                timeout: float = 600) -> tuple[Job, int, str]:
    log = os.path.join(tmp, f"{name}.inject.jsonl")
    cmd = [sys.executable, "-m", "loom", "train", *JOB, "--steps", str(steps), "--ckpt-every", str(CKPT_EVERY),
           "--ckpt-url", os.path.join(tmp, f"{name}-ckpt"), "--runs-dir", os.path.join(tmp, "runs"), "--name", name,
           "--inject", plan, "--env", f"{INJECT_LOG}={log}", *extra]
    job = Job(cmd, env={INJECT_LOG: log, **(env or {})}, on_line=on_line)
    rc = job.wait(timeout)
    return job, rc, os.path.join(tmp, "runs", name)


def _injected(tmp: str, name: str, kind: str) -> float | None:
    hits = [r["time"] for r in read_jsonl(os.path.join(tmp, f"{name}.inject.jsonl")) if r["kind"] == kind]
    return min(hits) if hits else None


def loom_help() -> str:
    return subprocess.run([sys.executable, "-m", "loom", "train", "--help"], capture_output=True, text=True).stdout


# ------------------------------------------------------------------ 1. per fault kind

SPARES = ["--spare-workers", "2"]  # as many warmed spares as ranks


def fault_run(kind: str, tmp: str, steps: int, at: int, step_s: float, extra=()) -> dict:
    name = f"{kind}{'-spare' if extra else ''}"
    plan = f"{kind}:rank=1,step={at};{compute_plan(step_s)}"
    say(f"{name}: loom train, {steps} steps of {step_s} s, {kind} of rank 1 at step {at} {' '.join(extra)}")
    job, rc, run = _loom_train(tmp, name, steps, plan, extra=["--max-restarts", "2", *extra])
    return _cost(name, kind, job, rc, run, _injected(tmp, name, kind))


def _cost(name, kind, job, rc, run, injected) -> dict:
    records = read_jsonl(os.path.join(run, "restarts.jsonl"))
    named = first_named(job.lines, injected)
    out = {"fault": name, "rc": rc, "wall_s": job.wall_s, "restarts": len(records),
           **fault_cost(injected, named, records[0] if records else None)}
    out["phases"] = phases(job.lines, named, out["recovery_s"])
    if rc != 0 or not records:
        out["error"] = job.tail()
        say(f"{name}: FAILED (rc {rc}, {len(records)} restarts):\n{job.tail()}")
    else:
        say(f"{name}: detected in {_s(out['detection_s'])}, next step {_s(out['to_next_step_s'])} after the fault, "
            f"{out['steps_lost']} steps lost, reload from {out['tier']}")
    return out


@contextlib.contextmanager
def ray_cluster(nodes: int):
    """A head with no CPUs (the driver's node) and ``nodes`` 1-CPU worker nodes,
    the benchmark's own (a new head, its own temp dir and HOME)."""
    from ray.cluster_utils import Cluster
    saved = dict(os.environ)
    home = tempfile.mkdtemp(prefix="loom-rb-home-")
    temp_dir = tempfile.mkdtemp(prefix="loom-rb-")  # short: Ray's socket paths must fit in 107 bytes
    for key in [k for k in os.environ if k.startswith("RAY_")]:
        del os.environ[key]
    os.environ["HOME"] = home
    c = None
    try:
        c = Cluster(initialize_head=True, shutdown_at_exit=False,
                    head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": temp_dir})
        yield c, [c.add_node(num_cpus=1, temp_dir=temp_dir) for _ in range(nodes)]
    finally:
        if c is not None:
            c.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def node_loss_run(tmp: str, steps: int, at_ckpt: int, step_s: float) -> dict:
    """Remove the node holding rank 1 once the step-``at_ckpt`` checkpoint is
    committed (the driver's own lines say where rank 1 runs and when)."""
    name = "node_loss"
    say(f"{name}: loom train on a 3-node Ray cluster (1 spare), {steps} steps of {step_s} s, rank 1's node "
        f"removed after the step-{at_ckpt} checkpoint")
    with ray_cluster(3) as (c, nodes):
        state = {"rank1": None, "removed": None, "t": None}

        def on_line(t, line):
            if line.startswith("attempt 0: ") and state["rank1"] is None:
                state["rank1"] = line.split("rank 1 on node ")[1].split()[0].rstrip(",")
            if state["removed"] is None and state["rank1"] and line.startswith("checkpoint") \
                    and f"step-{at_ckpt:08d}" in line:
                node = next(n for n in nodes if n.node_id.startswith(state["rank1"]))
                state["t"] = time.time()
                c.remove_node(node)
                state["removed"] = node.node_id
        job, rc, run = _loom_train(tmp, name, steps, compute_plan(step_s),
                                   extra=["--address", c.address, "--max-restarts", "2"], on_line=on_line)
    out = _cost(name, "node_loss", job, rc, run, state["t"])
    out["removed_node"] = state["removed"]
    return out


# ------------------------------------------------------------------ 2. goodput (loom)

def loom_goodput(tmp: str, steps: int, kills: list[int], step_s: float, name: str, extra=()) -> dict:
    plan = ";".join(filter(None, [kill_plan(kills), compute_plan(step_s)]))
    what = f"kills at {kills}" if kills else "no faults"
    say(f"{name}: loom train (Ray), {steps} steps of {step_s} s, {what} {' '.join(extra)}")
    job, rc, run = _loom_train(tmp, name, steps, plan, extra=["--max-restarts", str(len(kills) + 1), *extra])
    out = _goodput_result(name, job, rc, run, steps, tmp)
    # fault -> next step, from each kill: (the driver naming it - the kill) + the record's recovery_s
    fired = sorted(r["time"] for r in read_jsonl(os.path.join(tmp, f"{name}.inject.jsonl")) if r["kind"] == "kill")
    records = read_jsonl(os.path.join(run, "restarts.jsonl"))
    out["to_next_step_s"] = [fault_cost(f, first_named(job.lines, f), r)["to_next_step_s"]
                             for f, r in zip(fired, records)]
    return out


def _goodput_result(name, job, rc, run, steps, tmp, records=None, rows=None) -> dict:
    rows = read_jsonl(os.path.join(run, "metrics.jsonl")) if rows is None else rows
    records = read_jsonl(os.path.join(run, "restarts.jsonl")) if records is None else records
    out = {"run": name, "rc": rc, "restarts": len(records),
           "steps_lost": sum(r.get("steps_lost") or 0 for r in records),
           "recovery_s": [r.get("recovery_s") for r in records],
           "resumed_steps": [r.get("resumed_step") for r in records]}
    try:
        out.update(goodput(rows, job.wall_s, steps))
    except ValueError as exc:
        out.update(error=f"{exc}\n{job.tail()}", wall_s=job.wall_s)
        say(f"{name}: FAILED: {exc}\n{job.tail()}")
        return out
    say(f"{name}: goodput {out['goodput']:.3f} (useful {out['useful_s']:.1f} s of {out['wall_s']:.1f} s wall; "
        f"{out['restarts']} restarts, {out['redone']} steps redone)")
    return out


# ------------------------------------------------------------------ 3a. torchrun

def torchrun_goodput(tmp: str, steps: int, kills: list[int], step_s: float) -> dict:
    name = "torchrun"
    say(f"{name}: torchrun --max-restarts {len(kills)}, {steps} steps of {step_s} s, kills at {kills}")
    log = os.path.join(tmp, f"{name}.inject.jsonl")
    plan = ";".join([kill_plan(kills), compute_plan(step_s)])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(len(kills)), "-m", "loom.launch.worker", *JOB, "--steps", str(steps),
           "--no-monitor", "--ckpt-every", str(CKPT_EVERY), "--ckpt-url", os.path.join(tmp, f"{name}-ckpt"),
           "--resume", "auto", "--runs-dir", os.path.join(tmp, "runs"), "--name", name, "--inject", plan]
    job = Job(cmd, env={INJECT_LOG: log}, cwd=tmp)
    rc = job.wait(900)
    runs = [d for d in os.listdir(os.path.join(tmp, "runs")) if d.startswith(name)]
    run = os.path.join(tmp, "runs", runs[0]) if len(runs) == 1 else os.path.join(tmp, "runs", name)
    out = _goodput_result(name, job, rc, run, steps, tmp)
    # fault -> next step: the kill's injection -> rank 0's "restart k/N (torchrun)" line (its first step)
    fired = sorted(r["time"] for r in read_jsonl(log) if r["kind"] == "kill")
    back = [t for t, text in job.lines if re.match(r"restart \d+/\d+ \(torchrun\)", text)]
    out["to_next_step_s"] = [b - f for f, b in zip(fired, back)]
    return out


# ------------------------------------------------------------------ 3b. Ray Train

def ray_train_available() -> str | None:
    """None when Ray Train can run here, else why not."""
    for mod in ("ray.train", "ray.train.torch"):
        try:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed (pip install 'ray[train]')"
        except (ImportError, ValueError) as exc:
            return f"{mod} cannot be imported: {exc}"
    try:
        import ray.train.torch  # noqa: F401 - its dependencies (pyarrow, ...) too
    except ImportError as exc:
        return f"ray.train.torch cannot be imported ({exc}); pip install 'ray[train]'"
    return None


def _ray_train_loop(config: dict) -> None:
    """The plain DDP loop Ray Train runs on each worker (the same model, data
    shapes, steps and simulated compute as the loom job)."""
    import ray.train
    import ray.train.torch
    import torch

    from loom.launch.config import build_config, validate
    from loom.parallel import next_token_loss
    from loom.parallel.model import Transformer
    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    cfg = validate(build_config(overrides={"dim": 16, "layers": 1, "heads": 2, "seq_len": 16, "batch_size": 4}))
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(Transformer(cfg.model))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    start, ckpt = 0, ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    attempt = len(read_jsonl(config["starts"]))  # rank 0's count of the attempts before this one
    if rank == 0:
        with open(config["starts"], "a") as fh:
            fh.write(json.dumps({"start": start, "time": time.time()}) + "\n")
    per_rank = cfg.train.batch_size // 2
    for step in range(start, config["steps"]):
        t0 = time.monotonic()
        mark = os.path.join(config["dir"], f"killed-{step}")
        if rank == 1 and step in config["kills"] and not os.path.exists(mark):
            open(mark, "w").close()
            with open(config["inject_log"], "a") as fh:
                fh.write(json.dumps({"kind": "kill", "rank": 1, "step": step, "time": time.time()}) + "\n")
            os._exit(1)
        time.sleep(config["step_s"])
        g = torch.Generator().manual_seed(1000 * step + rank)
        tokens = torch.randint(cfg.model.vocab, (per_rank, cfg.train.seq_len + 1), generator=g)
        loss = next_token_loss(model(tokens[:, :-1]), tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0:
            with open(config["rows"], "a") as fh:
                fh.write(json.dumps({"step": step, "loss": loss.item(), "step_time_s": time.monotonic() - t0,
                                     "attempt": attempt, "time": time.time()}) + "\n")
        if (step + 1) % config["ckpt_every"] == 0:
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "step": step + 1},
                               os.path.join(d, "state.pt"))
                    ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report({"step": step})


def ray_train_peer(config: dict) -> None:
    """Run the Ray Train job (in its own process: ``--ray-train-peer``)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # its own instance, never another job's
    try:
        trainer = TorchTrainer(_ray_train_loop, train_loop_config=config,
                               scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                               run_config=RunConfig(name="ray-train", storage_path=config["dir"],
                                                    failure_config=FailureConfig(max_failures=len(config["kills"]))))
        trainer.fit()
    finally:
        ray.shutdown()


def ray_train_goodput(tmp: str, steps: int, kills: list[int], step_s: float) -> dict:
    name = "ray_train"
    why = ray_train_available()
    if why is not None:
        say(f"{name}: skipped: {why}")
        return {"run": name, "skipped": why}
    say(f"{name}: Ray Train TorchTrainer, FailureConfig(max_failures={len(kills)}), {steps} steps of {step_s} s, "
        f"os._exit(1) of rank 1 at {kills}")
    d = os.path.join(tmp, name)
    os.makedirs(d)
    config = {"dir": d, "steps": steps, "kills": kills, "step_s": step_s, "ckpt_every": CKPT_EVERY,
              "rows": os.path.join(d, "rows.jsonl"), "starts": os.path.join(d, "starts.jsonl"),
              "inject_log": os.path.join(d, "inject.jsonl")}
    home = tempfile.mkdtemp(prefix="loom-rt-home-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    job = Job([sys.executable, os.path.abspath(__file__), "--ray-train-peer", json.dumps(config)], cwd=tmp,
              env={"HOME": home, "RAY_TRAIN_V2_ENABLED": env.get("RAY_TRAIN_V2_ENABLED", "1")})
    try:
        rc = job.wait(900)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    rows = read_jsonl(config["rows"])
    fired = sorted(r["time"] for r in read_jsonl(config["inject_log"]))
    firsts = {}
    for r in rows:
        firsts.setdefault(r["attempt"], r)
    records = []
    for k, f in enumerate(fired):  # restart k+1: the kill -> attempt k+1's first step
        first = firsts.get(k + 1)
        failed_at = max((r["step"] for r in rows if r["attempt"] == k), default=-1) + 1
        records.append({"fault_time": f, "recovery_s": None if first is None else first["time"] - f,
                        "resumed_step": None if first is None else first["step"],
                        "steps_lost": None if first is None else failed_at - first["step"]})
    out = _goodput_result(name, job, rc, d, steps, tmp, records=records, rows=rows)
    out["to_next_step_s"] = [r["recovery_s"] for r in records]
    out.pop("recovery_s", None)
    return out


# ------------------------------------------------------------------ 4. memory vs storage

def memory_tiers(gb: float) -> dict:
    if importlib.util.find_spec("recovery_tiers") is None:
        say("memory vs storage reload: not available on this branch (benchmarks/recovery_tiers.py is missing)")
        return {"skipped": "not available on this branch"}
    import recovery_tiers
    say(f"memory vs storage reload of a {gb:g} GB state")
    return recovery_tiers.memory_vs_storage(gb)


# ------------------------------------------------------------------ main

def _s(x) -> str:
    return "-" if x is None else f"{x:.2f} s"


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter steps: a smoke run (~3 min)")
    ap.add_argument("--step-s", type=float, default=None,
                    help="simulated compute per step, s (default 0.25; --quick 0.05)")
    ap.add_argument("--goodput-steps", type=int, default=None, help="steps of the goodput runs (default 300)")
    ap.add_argument("--tier-gb", type=float, default=1.0, help="state size of the memory-vs-storage reload")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: faults,goodput,torchrun,ray_train,"
                                               "tiers")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/recovery.json)")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--keep", action="store_true", help="keep the runs' temporary directory (printed)")
    ap.add_argument("--ray-train-peer", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ray_train_peer:
        ray_train_peer(json.loads(args.ray_train_peer))
        return
    step_s = args.step_s if args.step_s is not None else (0.05 if args.quick else 0.25)
    steps = args.goodput_steps or (60 if args.quick else 300)
    kills = [steps // 3, 2 * steps // 3]
    fault_steps, at = (30, 14) if args.quick else (40, 24)
    skip = set(filter(None, args.skip.split(",")))
    t_start, load0 = time.monotonic(), os.getloadavg()
    spares = "--spare-workers" in loom_help()
    say(f"start: load average {load0[0]:.1f} on {os.cpu_count()} CPUs (other jobs share them); "
        f"--spare-workers {'available' if spares else 'not on this branch'}")
    result = {"args": {k: v for k, v in vars(args).items() if k != "ray_train_peer"}, "step_s": step_s,
              "goodput_steps": steps, "kills": kills, "fault_steps": fault_steps, "fault_at": at,
              "fault_step_s": min(step_s, 0.1), "faults": [], "goodput": [], "load_start": load0}
    tmp = tempfile.mkdtemp(prefix="loom-recovery-")
    try:
        if "faults" not in skip:
            fault_step_s = result["fault_step_s"]
            result["faults"].append(fault_run("kill", tmp, fault_steps, at, fault_step_s))
            if spares:  # one warmed spare per rank: every rank of the restart starts at once
                result["faults"].append(fault_run("kill", tmp, fault_steps, at, fault_step_s, extra=SPARES))
            result["faults"].append(fault_run("hang", tmp, fault_steps, at, fault_step_s))
            if spares:
                result["faults"].append(fault_run("hang", tmp, fault_steps, at, fault_step_s, extra=SPARES))
            result["faults"].append(node_loss_run(tmp, fault_steps, 20, fault_step_s))
        if "goodput" not in skip:
            result["goodput"].append(loom_goodput(tmp, steps, [], step_s, "loom_clean"))
            result["goodput"].append(loom_goodput(tmp, steps, kills, step_s, "loom"))
            if spares:
                result["goodput"].append(loom_goodput(tmp, steps, kills, step_s, "loom_spares", extra=SPARES))
        if "torchrun" not in skip:
            result["goodput"].append(torchrun_goodput(tmp, steps, kills, step_s))
        if "ray_train" not in skip:
            result["goodput"].append(ray_train_goodput(tmp, steps, kills, step_s))
        result["tiers"] = memory_tiers(args.tier_gb) if "tiers" not in skip else {"skipped": "--skip tiers"}
    finally:
        if args.keep:
            say(f"runs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    result["load_end"], result["wall_s"] = load1, time.monotonic() - t_start
    body = report(result, load0, load1)
    print("\n" + body)
    path = args.out or None
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2)
    else:
        path = write_json("recovery", result)
    say(f"done in {result['wall_s']:.0f} s; JSON: {path}")
    if not args.no_write:
        update_results("recovery", "Recovery (loom --max-restarts vs torchrun vs Ray Train)",
                       command_line(__file__, argv), body)


def report(result: dict, load0, load1) -> str:
    step_s, steps, kills = result["step_s"], result["goodput_steps"], result["kills"]
    parts = []
    if result["faults"]:
        rows = [[f["fault"], _s(f["detection_s"]), _s(f["recovery_s"]), _s(f["to_next_step_s"]),
                 _fmt(f["steps_lost"], "d"), f["tier"] or "-", f["cause"] or "-",
                 f"{_fmt(f['phases']['placed'], '.1f')} / {_fmt(f['phases']['first_step'], '.1f')}",
                 "ok" if f["rc"] == 0 else f"FAILED rc={f['rc']}"] for f in result["faults"]]
        parts.append(
            "**What each fault costs** (`loom train`, Ray, 2 ranks, checkpoints every 10 steps, steps of "
            f"{result['fault_step_s']:g} s simulated compute; one run per fault of {result['fault_steps']} steps, "
            f"rank 1 hit at step {result['fault_at']} or its node removed after the step-20 checkpoint). "
            "*detection*: the fault firing -> the driver's first line "
            "naming it; *restart*: the driver seeing it -> the new attempt's first step at the driver "
            "(restarts.jsonl `recovery_s`); *fault -> next step*: their sum; *restart phases*: seconds "
            "after the fault was named until the old workers were stopped and the new ones placed (the "
            "driver's `attempt 1: ...` line), and until the first step was in (the rest: new processes "
            "importing torch, the process group, reclaiming the checkpoint store, reading the "
            "checkpoint).\n\n" + markdown_table(
                ["fault", "detection", "restart", "fault -> next step", "steps lost", "reload tier", "named as",
                 "restart phases: placed / first step (s)", "job"], rows))
    if result["goodput"]:
        rows = []
        for g in result["goodput"]:
            if "skipped" in g:
                rows.append([g["run"], "-", "-", "-", "-", "-", "-", f"skipped: {g['skipped']}"])
                continue
            nxt = g.get("to_next_step_s") or []
            rows.append([g["run"], _fmt(g.get("goodput"), ".3f"), _fmt(g.get("useful_s"), ".1f"),
                         _fmt(g.get("wall_s"), ".1f"), g.get("restarts", "-"),
                         ", ".join(_fmt(x, ".1f") for x in nxt) or "-", g.get("redone", "-"),
                         "ok" if g.get("rc") == 0 and "error" not in g else f"FAILED rc={g.get('rc')}"])
        parts.append(
            f"**Goodput**: {steps} steps of {step_s:g} s simulated compute, rank 1 killed at steps "
            f"{kills[0]} and {kills[1]}, checkpoints every 10 steps. *useful*: the sum of the step times of the "
            "final history (each step once, from the attempt that completed it last); *wall*: the whole job, "
            "process start to exit (start-up, every attempt, checkpoints, restarts). `loom_clean` is the same "
            "job without faults. *fault -> next step*: from each kill (the injection's own record) to the "
            "new attempt's first step (loom: detection + restarts.jsonl `recovery_s`; torchrun: rank 0's "
            "`restart k/N (torchrun)` line, written at that step; Ray Train: the loop's first row of the "
            "attempt). *steps redone*: rows of steps that ran twice (from the newest committed checkpoint "
            "to the kill).\n\n" + markdown_table(
                ["job", "goodput", "useful s", "wall s", "restarts", "fault -> next step s", "steps redone",
                 "result"], rows))
        by = {g["run"]: g for g in result["goodput"] if "goodput" in g}
        for run in ("loom", "loom_spares"):
            if run not in by or "loom_clean" not in by or not by[run]["restarts"]:
                continue
            f, c = by[run], by["loom_clean"]
            extra = (f["wall_s"] - c["wall_s"]) / f["restarts"]
            why = ""
            if f.get("resumed_steps") == [k - CKPT_EVERY for k in kills]:
                why = (f": resumed at steps {f['resumed_steps']}: a kill at a checkpoint's step finds that "
                       f"asynchronous checkpoint still in flight, so the restart resumes from the one before")
            parts.append(
                f"The kills cost `{run}` {f['wall_s'] - c['wall_s']:.1f} s of wall time over the clean run, "
                f"{extra:.1f} s per kill ({f['redone'] / f['restarts']:.0f} redone steps, "
                f"{f['redone'] / f['restarts'] * step_s:.1f} s, of them{why}); "
                f"goodput with faults / goodput without: {f['goodput'] / c['goodput']:.3f}. The clean run's "
                f"{c['goodput']:.3f} is what Ray's start-up and the checkpoints leave of the wall time.")
    tiers = result.get("tiers") or {}
    if "skipped" in tiers:
        parts.append(f"Reload from host memory vs storage ({result['args']['tier_gb']:g} GB state): "
                     f"{tiers['skipped']}.")
    elif tiers:
        sec, sp = tiers["seconds"], tiers["speedup"]
        parts.append(
            f"**Reload from host memory vs storage** ({tiers['gb']:g} GiB state of one rank, "
            f"`benchmarks/recovery_tiers.py`, best of {tiers['repeats']}): "
            + ", ".join(f"{k} {v:.2f} s" for k, v in sec.items())
            + f"; memory (this node) is {sp['memory_local_vs_storage_cold']:.2f}x cold storage and "
            f"{sp['memory_local_vs_storage_warm']:.2f}x page-cached storage; the peer node's copy "
            f"{sp['memory_peer_vs_storage_cold']:.2f}x cold storage. {tiers.get('notes', '')}.")
    parts.append(f"Targets: hang detected <= 5 s; fault -> next step <= 15 s with spare workers, <= 30 s "
                 f"without; goodput >= 0.85; memory reload >= 3x faster than storage for 1 GB. Machine: load "
                 f"average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end on {os.cpu_count()} CPUs "
                 f"shared with other jobs (the simulated compute is a sleep, so contention shows up in start-up "
                 f"and restart times, not in the step time).")
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
