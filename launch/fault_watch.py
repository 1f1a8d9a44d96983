"""Fault monitoring and injection wired into `loom train`.

Per rank, `rank_faults` gives the training loop its step hook (fault
injection) and runs a `Monitor` that reports to the job's aggregator:

- under Ray, an `AggregatorActor` the driver starts (`DriverWatch`); the
  driver prints faults live, writes ``faults.jsonl``/``waits.jsonl`` in the run
  directory, and on a stopping fault (hang, lost rank) kills every worker;
- under torchrun, a `StoreAggregator` thread on rank 0 (its own TCPStore; the
  address travels through the rendezvous store); on a stopping fault every
  rank's monitor prints why and ends its process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
import time

from loom.faults import DetectConfig, Fault, Injector, LogWriter, Monitor, StoreAggregator
from loom.faults.monitor import Aggregator

_ADDRESS_KEY = "loom/faults/address"
_RENAMED = {"warmup_steps": "fault_warmup_steps"}  # DetectConfig field -> [faults] option


def detect_config(section) -> DetectConfig:
    """The detector thresholds from a job's ``[faults]`` section."""
    names = {f.name for f in dataclasses.fields(DetectConfig)}
    values = {n: getattr(section, _RENAMED.get(n, n)) for n in names if hasattr(section, _RENAMED.get(n, n))}
    try:
        return DetectConfig(**values)
    except ValueError as exc:
        msg = str(exc).replace("DetectConfig: ", "").replace("DetectConfig.", "")
        for n in names:
            msg = msg.replace(f"{n}=", f"--{_RENAMED.get(n, n).replace('_', '-')}=")
        raise ValueError(msg) from None


def stop_kinds(section) -> set[str]:
    return {k for k in section.stop_on.replace(" ", "").split(",") if k}


def describe(fault: Fault) -> str:
    return f"[fault] {fault.kind}: {fault.evidence}"


# ------------------------------------------------------------------ per rank

class _NoFaults:
    def at_step(self, step: int) -> None:
        pass


@contextlib.contextmanager
def rank_faults(cfg, reporter=None, transport=None):
    """Injection + monitoring for one rank; yields an object with ``at_step``."""
    import torch.distributed as dist
    f = cfg.faults
    rank = dist.get_rank()
    injector = Injector(f.inject, rank) if f.inject else None
    if not f.monitor:
        with contextlib.ExitStack() as stack:
            if injector is not None:
                stack.enter_context(injector)
            yield injector or _NoFaults()
        return
    aggregator, stop_process = None, None  # under Ray the driver decides what to stop
    if transport is None:  # torchrun: an aggregator thread on rank 0, its address via the rendezvous store
        aggregator, transport = _store_aggregator(cfg, reporter, rank, dist.get_world_size())
        stop = stop_kinds(f)

        def stop_process(fault):
            if fault.kind in stop:
                print(f"loom: rank {rank}: stopping: {fault.kind}: {fault.evidence}", file=sys.stderr,
                      flush=True)
                if aggregator is not None:
                    aggregator.stop()
                os._exit(1)
    monitor = Monitor(transport, rank=rank, interval=f.monitor_interval, on_fatal=stop_process)
    try:
        with monitor:
            if injector is None:
                yield _NoFaults()
            else:
                with injector:
                    yield injector
    finally:
        if aggregator is not None:
            _await_departures(aggregator)
            aggregator.stop()


def _store_aggregator(cfg, reporter, rank: int, world: int):
    import torch.distributed as dist
    rdzv = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=cfg.job.pg_timeout))
    aggregator = None
    if rank == 0:
        callbacks = [lambda fault: reporter.event(describe(fault))] if reporter is not None else []
        aggregator = StoreAggregator(world, detect_config(cfg.faults), host=os.environ["MASTER_ADDR"],
                                     log_dir=getattr(reporter, "run_dir", None), callbacks=callbacks).start()
        rdzv.set(_ADDRESS_KEY, f"{aggregator.address[0]}:{aggregator.address[1]}")
    host, _, port = rdzv.get(_ADDRESS_KEY).decode().rpartition(":")
    return aggregator, (host, int(port))


def _await_departures(store_aggregator, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not store_aggregator.aggregator.all_departed() and time.monotonic() < deadline:
        time.sleep(0.05)


# -------------------------------------------------------------------- Ray

class AggregatorActor:
    """The job's aggregator inside a Ray actor: ranks `push`, the driver `poll`s."""

    def __init__(self, world_size: int, config: dict):
        self.aggregator = Aggregator(world_size, DetectConfig(**config))

    def push(self, payload: bytes) -> None:
        self.aggregator.ingest(payload)

    def mark_gone(self, rank: int) -> None:
        self.aggregator.mark_gone(rank)

    def poll(self, final: bool = False) -> dict:
        """Run the detectors (when due, or now if ``final``); return the new
        log lines (``faults``, ``waits``)."""
        self.aggregator.check(force=final)
        return self.aggregator.drain()


class RayTransport:
    """A rank's line to the `AggregatorActor` (fire-and-forget calls)."""

    def __init__(self, actor):
        self.actor = actor

    def send(self, payload: bytes) -> None:
        self._last = self.actor.push.remote(payload)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the last report arrived (before the worker may be killed)."""
        import ray
        if getattr(self, "_last", None) is not None:
            ray.wait([self._last], timeout=timeout)


class DriverWatch:
    """The driver's side under Ray: polls the actor, prints faults, writes the
    logs, and says when (and why) the job must stop."""

    def __init__(self, cfg, run_dir: str | None, printer=None):
        import ray
        self.stop_on = stop_kinds(cfg.faults)
        config = dataclasses.asdict(detect_config(cfg.faults))
        self.actor = ray.remote(num_cpus=0)(AggregatorActor).remote(cfg.world_size, config)
        self.log = LogWriter(run_dir) if run_dir else None
        self.printer = printer or (lambda text: print(text, flush=True))
        self.faults: list[Fault] = []
        self.stopping: Fault | None = None

    def poll(self, timeout: float = 30.0, final: bool = False) -> Fault | None:
        """New faults since the last poll; returns the fault that stops the job, if any.
        ``final``: the workers are done, analyse everything they reported."""
        import ray
        lines = ray.get(self.actor.poll.remote(final), timeout=timeout)
        if self.log is not None:
            self.log.write(lines)
        for entry in lines["faults"]:
            fault = Fault.from_dict(entry)
            self.faults.append(fault)
            self.printer(describe(fault))
            if fault.kind in self.stop_on and self.stopping is None:
                self.stopping = fault
        return self.stopping

    def explain(self, dead: int | None = None) -> Fault | None:
        """After a worker failed: give the monitor a moment to say why.
        ``dead`` is a rank whose process Ray saw die (lost at once)."""
        import ray
        if dead is not None:
            ray.get(self.actor.mark_gone.remote(dead), timeout=30)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            fault = self.poll()
            if fault is not None or any(f.fatal for f in self.faults):
                return fault or next(f for f in self.faults if f.fatal)
            time.sleep(0.1)
        return None

    def close(self) -> None:
        """Stop watching (not polling again: the workers are being killed)."""
        import ray
        if self.log is not None:
            self.log.close()
        ray.kill(self.actor)
