"""How long training stalls to checkpoint: loom's lazy asynchronous engine vs
torch.save, PyTorch DCP save / async_save and DeepSpeed, side by side.

Two ranks train a model whose parameters + AdamW moments total ``--size-gb``
(each rank holds half of every layer, tensor-parallel style, and trains it
on its own batch; a loss all-reduce keeps the ranks in step).  Each method
checkpoints every step and every 10 steps; per method we report

- the **stall per checkpoint**: time the training loop spent in the save
  call plus time it waited for the checkpoint later (loom: its optimizer
  hook; DCP async_save: waiting for the previous save before the next),
  the slowest rank's, mean over checkpoints;
- the **end-to-end step time** and its overhead over no checkpointing;
- for asynchronous methods, the **persist** time (save call to committed).

The limit is a plain memory copy of the same bytes (what a synchronous
snapshot to host memory costs), timed in the same run.  loom runs with its
persist stage on a thread and in a separate writer process (both measured;
the README says which is the default and why).  DeepSpeed (ZeRO-1 over the
2 ranks, one full replica of the same per-rank model, so its step includes a
gradient all-reduce) is compared with its own no-checkpoint baseline:
`save_checkpoint` with its default torch engine, with loom's engine
installed, and its decoupled engine (recorded if it cannot run on CPU).

Every method writes into the page cache of /work's disk under a temporary
directory, removed at the end.  Each method gets one warm-up checkpoint
(pool allocation, writer start-up, first page faults) before timing.

    python benchmarks/checkpoint_stall.py [--size-gb 0.6] [--batch 256] [--steps 20] [--no-deepspeed]
"""
from __future__ import annotations

import abc
import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _report import command_line, markdown_table, update_results, write_json  # noqa: E402

from loom import checkpoint as ckpt  # noqa: E402
from loom import comms  # noqa: E402
from loom.comms.testing import run_distributed  # noqa: E402

WORLD = 2
WIDTH = 1024


def _layers(size_gb: float) -> int:
    """Layers per rank so that params + 2 AdamW moments over both ranks are ``size_gb``."""
    per_layer = (WIDTH * WIDTH + WIDTH) * 4 * 3 * WORLD
    return max(1, round(size_gb * 1e9 / per_layer))


def _mlp(layers: int) -> torch.nn.Module:
    return torch.nn.Sequential(*[m for _ in range(layers) for m in (torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU())])


class Trainer:
    """This rank's half of the model, its optimizer and one training step."""

    def __init__(self, layers: int, batch: int):
        self.rank = dist.get_rank()
        torch.manual_seed(self.rank)
        self.model = _mlp(layers)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.x = torch.randn(batch, WIDTH)
        self.step()  # the AdamW moments exist from here on

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(self.x).pow(2).mean()
        loss.backward()
        self.opt.step()
        comms.all_reduce(loss.detach().reshape(1))  # the ranks stay in step, as in real training

    def tensors(self) -> list[torch.Tensor]:
        out = [p.detach() for p in self.model.parameters()]
        for s in self.opt.state.values():
            out += [s["exp_avg"], s["exp_avg_sq"]]
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # ------------------------------------------------------------ states
    def _global(self, t: torch.Tensor):
        """This rank's rows of the global tensor (rank halves stacked on dim 0)."""
        shape = (WORLD * t.shape[0], *t.shape[1:])
        return ckpt.Shard(t, shape, (self.rank * t.shape[0], *(0 for _ in t.shape[1:])))

    def loom_state(self) -> dict:
        sd = self.opt.state_dict()
        optim = {"state": {i: {"step": s["step"], "exp_avg": self._global(s["exp_avg"]),
                               "exp_avg_sq": self._global(s["exp_avg_sq"])} for i, s in sd["state"].items()},
                 "param_groups": sd["param_groups"]}
        return {"model": {k: self._global(v) for k, v in self.model.state_dict().items()}, "optim": optim}

    def torch_state(self) -> dict:
        return {"model": self.model.state_dict(), "optim": self.opt.state_dict()}

    def dcp_state(self, mesh) -> dict:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor import Shard as DShard

        def dt(t):
            return DTensor.from_local(t, mesh, [DShard(0)], run_check=False)
        sd = self.opt.state_dict()
        optim = {f"{i}.{k}": (dt(v) if k != "step" else v) for i, s in sd["state"].items() for k, v in s.items()}
        return {"model": {k: dt(v) for k, v in self.model.state_dict().items()}, "optim": optim}


# --------------------------------------------------------------- methods

class Method(abc.ABC):
    """One way to checkpoint: ``checkpoint(step)``; ``later_stalls()``: what
    the loop lost afterwards, per checkpoint; ``finish()`` waits for
    outstanding saves and returns their persist times; ``close()``."""
    asynchronous = False

    def __init__(self, trainer: Trainer, root: str):
        self.t, self.root = trainer, root
        os.makedirs(root, exist_ok=True)

    @abc.abstractmethod
    def checkpoint(self, step: int) -> None:
        """Save (or start saving) the trainer's state as ``step``."""

    def later_stalls(self) -> list[float]:
        return []

    def finish(self) -> list[float]:
        return []

    def close(self) -> None:
        pass

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step-{step:08d}")


class NoCheckpoint(Method):
    def checkpoint(self, step):
        pass


class LoomAsync(Method):
    asynchronous = True

    def __init__(self, trainer, root, writer):
        super().__init__(trainer, root)
        self.saver = ckpt.AsyncCheckpointer(root, keep_last=2, writer=writer)
        self.saver.attach(trainer.opt)
        self.handles = []

    def checkpoint(self, step):
        self.handles.append(self.saver.save(self.t.loom_state(), step=step))

    def later_stalls(self):
        return [h.stats["blocked_s"] for h in self.handles]

    def finish(self):
        self.saver.wait()
        persist = [h.stats["snapshot_s"] + h.stats["persist_s"] for h in self.handles]
        self.handles = []
        return persist

    def close(self):
        self.saver.close()


class LoomSync(Method):
    def checkpoint(self, step):
        ckpt.save(self.t.loom_state(), self.root, step=step)


class TorchSave(Method):
    def checkpoint(self, step):
        os.makedirs(self.path(step), exist_ok=True)
        torch.save(self.t.torch_state(), os.path.join(self.path(step), f"rank{self.t.rank}.pt"))


class DcpSave(Method):
    def __init__(self, trainer, root, mesh):
        super().__init__(trainer, root)
        self.mesh = mesh

    def checkpoint(self, step):
        import torch.distributed.checkpoint as dcp
        dcp.save(self.t.dcp_state(self.mesh), storage_writer=dcp.FileSystemWriter(self.path(step), sync_files=False))


class DcpAsyncSave(Method):
    """DCP's async_save on its own gloo group (its background collectives must
    not interleave with training's); one save in flight, as DCP asks."""
    asynchronous = True

    def __init__(self, trainer, root, mesh):
        super().__init__(trainer, root)
        self.mesh, self.group = mesh, comms.new_group(None, name="dcp-async")
        self.future, self.waits, self.persist, self.count = None, [], [], 0

    def _wait_previous(self) -> float:
        if self.future is None:
            return 0.0
        t0 = time.perf_counter()
        self.future.result()
        self.future = None
        return time.perf_counter() - t0

    def checkpoint(self, step):
        import torch.distributed.checkpoint as dcp
        self.waits.append(self._wait_previous())
        t0 = time.perf_counter()
        fut = dcp.async_save(self.t.dcp_state(self.mesh), process_group=self.group,
                             storage_writer=dcp.FileSystemWriter(self.path(step), sync_files=False))
        fut.add_done_callback(lambda _: self.persist.append(time.perf_counter() - t0))
        self.future = fut
        self.count += 1

    def later_stalls(self):
        return self.waits[1:] + [0.0]  # the wait before save k+1 is save k's

    def finish(self):
        self._wait_previous()
        while len(self.persist) < self.count:  # done-callbacks run just after result() wakes
            time.sleep(0.001)
        persist, self.persist, self.waits, self.count = self.persist, [], [], 0
        return persist

    def close(self):
        comms.destroy_group(self.group)


def memcpy_limit(trainer: Trainer, repeats: int = 3) -> float:
    """A plain copy of this rank's state into preallocated host memory."""
    src = trainer.tensors()
    dst = [torch.empty_like(t) for t in src]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for d, s in zip(dst, src):
            d.copy_(s)
        best = min(best, time.perf_counter() - t0)
    return best


def _max(values: list[float]) -> list[float]:
    """Element-wise max over ranks (the slowest rank sets the pace)."""
    t = torch.tensor(values, dtype=torch.float64)
    return comms.all_reduce(t, "max").tolist() if t.numel() else []


def _clean(path: str) -> None:
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


def run_method(make, step_fn, every: int, steps: int, root: str) -> dict:
    """Warm up with one checkpoint, then train ``steps`` steps checkpointing
    every ``every``.  Times are the slowest rank's."""
    method = make(root)
    step_fn()
    method.checkpoint(0)
    step_fn()
    method.finish()
    call_stalls, step_times = [], []
    dist.barrier()
    for s in range(1, steps + 1):
        t0 = time.perf_counter()
        step_fn()
        if s % every == 0:
            tc = time.perf_counter()
            method.checkpoint(s)
            call_stalls.append(time.perf_counter() - tc)
        step_times.append(time.perf_counter() - t0)
    later = method.later_stalls()
    persist = method.finish()
    method.close()
    stalls = [c + (later[i] if i < len(later) else 0.0) for i, c in enumerate(call_stalls)]
    stalls, step_times, persist = _max(stalls), _max(step_times), _max(persist)
    _clean(root)
    gc.collect()
    return {"stall_s": sum(stalls) / len(stalls) if stalls else 0.0, "stalls": stalls,
            "step_s": sum(step_times) / len(step_times), "persist_s": sum(persist) / len(persist) if persist else None}


# --------------------------------------------------------------- DeepSpeed

def _deepspeed_rows(root: str, layers: int, batch: int, steps: int) -> dict:
    import deepspeed
    out = {}
    torch.manual_seed(0)
    model = _mlp(layers)
    config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1}, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    x = torch.randn(batch, WIDTH)

    def step():
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()

    class DsSave(Method):
        def checkpoint(self, s):
            engine.save_checkpoint(self.root, tag=f"global_step{s}")

    class DsLoom(Method):
        asynchronous = True

        def __init__(self, trainer, root):
            super().__init__(trainer, root)
            self.original = engine.checkpoint_engine
            self.loom = ckpt.install_deepspeed_engine(engine, keep_last=2)
            self.mark = 0

        def checkpoint(self, s):
            engine.save_checkpoint(self.root, tag=f"global_step{s}")

        def later_stalls(self):
            return [h.stats["blocked_s"] for h in self.loom.handles[self.mark:]]

        def finish(self):
            self.loom.wait()
            handles, self.mark = self.loom.handles[self.mark:], len(self.loom.handles)
            return [h.stats["snapshot_s"] + h.stats["persist_s"] for h in handles]

        def close(self):
            self.loom.cleanup()
            engine.checkpoint_engine = self.original
            del engine.save_checkpoint  # the installer's wrapper: back to the class method

    bytes_saved = None
    for name, make in (("none", lambda r: NoCheckpoint(None, r)), ("save_checkpoint", lambda r: DsSave(None, r)),
                       ("loom_engine", lambda r: DsLoom(None, r))):
        for every in (1, 10):
            n = 5 if every == 1 else steps
            root_m = os.path.join(root, f"ds-{name}-{every}")
            if name == "save_checkpoint" and every == 10 and bytes_saved is None:
                engine.save_checkpoint(root_m, tag="size")
                bytes_saved = _dir_bytes(os.path.join(root_m, "size"))
            out.setdefault(name, {})[every] = run_method(make, step, every, n, root_m)
    out["bytes"] = bytes_saved
    try:  # DeepSpeed's decoupled engine (a writer process per rank)
        os.environ.setdefault("CROSS_SIZE", "1")
        os.environ.setdefault("CROSS_RANK", "0")
        cfg = {**config, "checkpoint": {"writer": {"type": "python", "decoupled": True}}}
        deepspeed.initialize(model=_mlp(layers), model_parameters=None, config=cfg)
        out["decoupled"] = {"error": "ran (not measured)"}
    except Exception as exc:  # noqa: BLE001 - recorded in the table
        out["decoupled"] = {"error": f"{type(exc).__name__}: {exc}"}
    engine.destroy()
    return out


def _dir_bytes(path: str) -> int:
    total = 0
    if dist.get_rank() == 0:
        for dirpath, _, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    t = torch.tensor([total], dtype=torch.int64)
    dist.broadcast(t, 0)
    return int(t)


# ------------------------------------------------------------------ worker

def _median(values):
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def _worker(root: str, size_gb: float, batch: int, steps: int, deepspeed: bool, only: list | None,
            rounds: int) -> dict:
    from torch.distributed.tensor import init_device_mesh
    layers = _layers(size_gb)
    trainer = Trainer(layers, batch)
    mesh = init_device_mesh("cpu", (WORLD,))
    out = {"layers": layers, "bytes": int(_max([float(trainer.nbytes())])[0]) * WORLD,
           "memcpy_s": _max([memcpy_limit(trainer)])[0]}
    methods = {
        "none": lambda r: NoCheckpoint(trainer, r),
        "loom_async_thread": lambda r: LoomAsync(trainer, r, "thread"),
        "loom_async_process": lambda r: LoomAsync(trainer, r, "process"),
        "loom_sync": lambda r: LoomSync(trainer, r),
        "torch_save": lambda r: TorchSave(trainer, r),
        "dcp_save": lambda r: DcpSave(trainer, r, mesh),
        "dcp_async_save": lambda r: DcpAsyncSave(trainer, r, mesh),
    }
    names = [n for n in methods if only is None or n == "none" or n in only]
    for every in (1, 10):
        n = 5 if every == 1 else steps
        runs: dict = {}
        for r in range(rounds):
            # rotate the order so drift on a shared machine hits every method alike; with
            # one round the baseline runs first and last and its mean is the reference
            order = names[r % len(names):] + names[:r % len(names)]
            if rounds == 1:
                order.append("none")
            for name in order:
                try:
                    runs.setdefault(name, []).append(run_method(methods[name], trainer.step, every, n,
                                                                os.path.join(root, f"{name}-{every}")))
                except Exception as exc:  # noqa: BLE001 - recorded in the table
                    runs.setdefault(name, []).append({"error": f"{type(exc).__name__}: {exc}"})
        for name, results in runs.items():
            errors = [x for x in results if "error" in x]
            if errors:
                out.setdefault(name, {})[every] = errors[0]
                continue
            out.setdefault(name, {})[every] = {
                "step_s": (sum(x["step_s"] for x in results) / len(results) if rounds == 1
                           else _median([x["step_s"] for x in results])),
                "stall_s": _median([x["stall_s"] for x in results]),
                "persist_s": _median([x["persist_s"] for x in results]),
                "rounds": results}
    if deepspeed:
        del trainer
        gc.collect()
        try:
            out["deepspeed"] = _deepspeed_rows(root, layers, batch, steps)
        except Exception as exc:  # noqa: BLE001
            out["deepspeed"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


# -------------------------------------------------------------------- report

LABELS = {
    "none": "no checkpointing",
    "loom_async_thread": "**loom async** (persist on a thread)",
    "loom_async_process": "loom async (persist in a writer process)",
    "loom_sync": "loom sync (`ckpt.save`)",
    "torch_save": "`torch.save` per rank",
    "dcp_save": "DCP `save`",
    "dcp_async_save": "DCP `async_save`",
}


def _ms(s) -> str:
    return "-" if s is None else f"{s * 1e3:.1f}"


def _rows(res: dict, base: dict, ref_stall: dict, labels: dict) -> list:
    rows = []
    for name, label in labels.items():
        r = res.get(name)
        if r is None:
            continue
        row = [label]
        for every in (1, 10):
            m = r.get(every, {})
            if "error" in m:
                row += ["failed", "-", "-", "-"]
                continue
            over = m["step_s"] / base[every]["step_s"] - 1
            ratio = "-" if not ref_stall.get(every) else f"{m['stall_s'] / ref_stall[every]:.3f}"
            row += [_ms(m["stall_s"]), ratio, f"{m['step_s']:.3f}", f"{over:+.1%}"]
        p = [r[e].get("persist_s") for e in (1, 10) if "error" not in r.get(e, {})]
        row.append(" / ".join(_ms(x) for x in p) if any(x is not None for x in p) else "-")
        rows.append(row)
    return rows


HEADER = ["method", "stall/ckpt ms (every step)", "÷ torch.save", "step s", "overhead",
          "stall/ckpt ms (every 10)", "÷ torch.save", "step s", "overhead", "persist ms (1 / 10)"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=0.6, help="params + AdamW moments over both ranks (GB)")
    ap.add_argument("--batch", type=int, default=256, help="rows per rank per step (compute per step)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps when checkpointing every 10")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds per method (median)")
    ap.add_argument("--methods", default="", help="comma list of methods to run (default: all): "
                    + ", ".join(LABELS))
    ap.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed")
    ap.add_argument("--dir", default="/work", help="where the temporary data goes (default /work)")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    if args.steps < 10:
        ap.error(f"--steps {args.steps}: at least 10, so that checkpointing every 10 steps times one")
    free = shutil.disk_usage(args.dir).free / 1e9
    if free < args.size_gb * 8:
        sys.exit(f"{args.dir} has {free:.1f} GB free; this run needs about {args.size_gb * 8:.1f} GB")
    root = tempfile.mkdtemp(prefix="loom-stall-bench-", dir=args.dir)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        only = [m.strip() for m in args.methods.split(",") if m.strip()] or None
        unknown = set(only or ()) - set(LABELS)
        if unknown:
            sys.exit(f"unknown methods {sorted(unknown)}; choose from {', '.join(LABELS)}")
        res = run_distributed(_worker, WORLD, root, args.size_gb, args.batch, args.steps, not args.no_deepspeed,
                              only, args.rounds, timeout=3600, env={"DS_ACCELERATOR": "cpu"})[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.perf_counter() - t0

    def ok(name, every):
        return name in res and "error" not in res[name].get(every, {"error": "not run"})

    ts = {e: res["torch_save"][e]["stall_s"] for e in (1, 10) if ok("torch_save", e)}
    rows = _rows(res, res["none"], ts, LABELS)
    limit = ["plain memory copy of the same bytes (the limit of a synchronous snapshot)", _ms(res["memcpy_s"]),
             "-" if 1 not in ts else f"{res['memcpy_s'] / ts[1]:.3f}", "-", "-", _ms(res["memcpy_s"]),
             "-" if 10 not in ts else f"{res['memcpy_s'] / ts[10]:.3f}", "-", "-", "-"]
    table = markdown_table(HEADER, rows + [limit])

    ds_table, ds = "", res.get("deepspeed")
    if ds is not None:
        if "error" in ds:
            ds_table = f"DeepSpeed failed: {ds['error']}"
        else:
            dts = {e: ds["save_checkpoint"][e]["stall_s"] for e in (1, 10)}
            ds_labels = {"none": "DeepSpeed, no checkpointing",
                         "save_checkpoint": "DeepSpeed `save_checkpoint` (torch engine)",
                         "loom_engine": "DeepSpeed + **loom engine** (`install_deepspeed_engine`)"}
            ds_rows = _rows(ds, ds["none"], dts, ds_labels)
            ds_rows.append(["DeepSpeed decoupled engine (`writer: {decoupled: true}`)"] +
                           [f"could not run: {ds['decoupled']['error']}"] + ["-"] * 8)
            ds_table = (f"DeepSpeed saves {ds['bytes'] / 1e9:.2f} GB per checkpoint (module + fp32 partitions + "
                        f"moments):\n\n" + markdown_table([h.replace("torch.save", "save_checkpoint") for h in HEADER],
                                                          ds_rows))

    def overhead(name, every):
        return res[name][every]["step_s"] / res["none"][every]["step_s"] - 1

    checks = []
    for every in (1, 10):
        if not ok("loom_async_thread", every):
            continue
        m = res["loom_async_thread"][every]
        text = f"every {'step' if every == 1 else '10 steps'}: stall "
        if every in ts:
            text += f"**{m['stall_s'] / ts[every]:.3f}×** torch.save's (target ≤ 0.05)"
        if ok("dcp_async_save", every):
            dcp_stall = max(res['dcp_async_save'][every]['stall_s'], 1e-9)
            text += f", **{m['stall_s'] / dcp_stall:.3f}×** DCP async_save's (target ≤ 0.33)"
        text += (f"; end-to-end overhead **{overhead('loom_async_thread', every):+.1%}** "
                 f"(target ≤ {'25' if every == 1 else '5'}%)")
        checks.append(text)
    writer_note = ""
    if all(ok(n, e) for n in ("loom_async_thread", "loom_async_process") for e in (1, 10)):
        t, p = res["loom_async_thread"], res["loom_async_process"]
        writer_note = (f"Persist on a thread vs in a writer process: stall {_ms(t[1]['stall_s'])} vs "
                       f"{_ms(p[1]['stall_s'])} ms (every step), {_ms(t[10]['stall_s'])} vs {_ms(p[10]['stall_s'])} ms "
                       f"(every 10); overhead {overhead('loom_async_thread', 1):+.1%} vs "
                       f"{overhead('loom_async_process', 1):+.1%} (every step), "
                       f"{overhead('loom_async_thread', 10):+.1%} vs "
                       f"{overhead('loom_async_process', 10):+.1%} (every 10).")
    gb = res["bytes"] / 1e9
    print(table + "\n\n" + ds_table + "\n\n" + "\n".join(checks) + "\n\n" + writer_note + f"\n\n({elapsed:.0f} s)")
    write_json("checkpoint_stall", {"size_gb": args.size_gb, "batch": args.batch, "steps": args.steps,
                                    "rounds": args.rounds, "results": res})
    if not args.no_write:
        body = (f"{WORLD} ranks, each training its half of an MLP ({res['layers']} layers of {WIDTH}×{WIDTH} per rank, "
                f"batch {args.batch}); params + AdamW moments = {gb:.2f} GB in all. Checkpoint every step "
                f"(5 timed steps) and every 10 steps ({args.steps} timed steps), after one warm-up checkpoint. "
                f"Stall = time the loop lost per checkpoint (in the call + waiting for it later), the slowest "
                f"rank's, mean; overhead = step time vs no checkpointing; persist = save call to committed. "
                f"Page cache, no fsync.\n\n" + table + "\n\n" + ds_table + "\n\n" + "  \n".join(checks) +
                "\n\n" + writer_note +
                f"\n\nLoad average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after the run "
                f"({elapsed:.0f} s) on {os.cpu_count()} cores: the two ranks already use both cores, so every "
                f"background copy, checksum and write competes with training for CPU, and step times vary "
                f"by several % between runs.")
        cmd = command_line(__file__, argv)
        update_results("checkpoint_stall", "Checkpoint stall (loom async vs torch.save vs DCP vs DeepSpeed)",
                       cmd, body)


if __name__ == "__main__":
    main()
