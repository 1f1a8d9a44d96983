"""Fault monitoring and injection wired into `loom train`.

Per rank, `rank_faults` gives the training loop its step hook (fault
injection) and runs a `Monitor` that reports to the job's aggregator:

- under Ray, an `AggregatorActor` the driver starts (`DriverWatch`); the
  driver reports faults live, writes ``faults.jsonl``/``waits.jsonl`` in the run
  directory, and on a stopping fault (hang, lost rank) kills every worker;
- under torchrun, a `StoreAggregator` thread on rank 0, listening on
  MASTER_ADDR only; rank 0 sends its address and the job's secret to the
  other ranks over the default process group (`loom.comms.broadcast`), never
  through the rendezvous store; on a stopping fault every rank's monitor
  logs why (logger ``loom.launch``) and ends its process.

Every report and verdict is authenticated with the job's secret
(`loom.faults.wire`): ``LOOM_JOB_SECRET`` when set (at least 16 bytes), else
a random one made by rank 0 (torchrun) or the driver (Ray).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time

from loom import comms
from loom.faults import DetectConfig, Fault, Injector, LogWriter, Monitor, StoreAggregator, wire
from loom.faults.monitor import Aggregator

log = logging.getLogger("loom.launch")
SECRET_ENV = "LOOM_JOB_SECRET"
_CONTACT_BYTES = 1 + 1 + 255 + 2 + 1 + 255  # version, secret length, secret, port, host length, host


def detect_config(section) -> DetectConfig:
    """The detector thresholds of a job's ``[faults]`` section (it embeds them)."""
    return section.detect


def stop_kinds(section) -> set[str]:
    return {k for k in section.stop_on.replace(" ", "").split(",") if k}


def describe(fault: Fault) -> str:
    return f"[fault] {fault.kind}: {fault.evidence}"


def job_secret() -> bytes:
    """The job's fault-monitor secret: ``LOOM_JOB_SECRET`` (UTF-8) when set,
    else 32 fresh random bytes.  Raises ValueError if the variable is shorter
    than 16 bytes."""
    value = os.environ.get(SECRET_ENV)
    if value is None:
        return wire.new_secret()
    try:
        return wire.check_secret(value.encode())
    except ValueError:
        raise ValueError(f"{SECRET_ENV} has {len(value.encode())} bytes; it needs at least "
                         f"{wire.MIN_SECRET_BYTES}") from None


# ------------------------------------------------------------------ per rank

class _NoFaults:
    def at_step(self, step: int) -> None:
        pass


@contextlib.contextmanager
def rank_faults(cfg, reporter=None, transport=None, attempt: int = 0):
    """Injection + monitoring for one rank; yields an object with ``at_step``.
    ``attempt`` (0: the first) arms only the injections planned for it."""
    import torch.distributed as dist
    f = cfg.faults
    rank = dist.get_rank()
    injector = Injector(f.inject, rank, attempt=attempt) if f.inject else None
    if not f.monitor:
        with contextlib.ExitStack() as stack:
            if injector is not None:
                stack.enter_context(injector)
            yield injector or _NoFaults()
        return
    aggregator, stop_process = None, None  # under Ray the driver decides what to stop
    secret = None
    if transport is None:  # torchrun: an aggregator thread on rank 0; its address and secret by broadcast
        aggregator, transport, secret = _store_aggregator(cfg, reporter, rank, dist.get_world_size())
        stop = stop_kinds(f)

        def stop_process(fault):
            if fault.kind in stop:
                log.error("loom: rank %d: stopping: %s: %s", rank, fault.kind, fault.evidence)
                if aggregator is not None:
                    aggregator.stop()
                os._exit(1)
    monitor = Monitor(transport, rank=rank, interval=f.monitor_interval, on_fatal=stop_process, secret=secret)
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
    """Rank 0 starts the aggregator on MASTER_ADDR and broadcasts its address
    and the job's secret; returns (aggregator or None, (host, port), secret)
    on every rank.  If rank 0 cannot start it, every rank raises."""
    aggregator, contact, error = None, bytes(_CONTACT_BYTES), None
    if rank == 0:
        try:
            callbacks = [lambda fault: reporter.event(describe(fault))] if reporter is not None else []
            aggregator = StoreAggregator(world, detect_config(cfg.faults), host=os.environ["MASTER_ADDR"],
                                         log_dir=getattr(reporter, "run_dir", None), callbacks=callbacks,
                                         secret=job_secret())
            contact = pack_contact(*aggregator.address, aggregator.secret)
        except (OSError, ValueError) as exc:  # the others must not wait for a contact that never comes
            error = exc
            if aggregator is not None:
                aggregator.stop()
    contact = _broadcast_bytes(contact)
    if error is not None:
        raise error
    try:
        host, port, secret = unpack_contact(contact)
    except ValueError as exc:
        raise RuntimeError(f"rank {rank}: rank 0 could not start the fault aggregator ({exc})") from None
    return (aggregator.start() if aggregator is not None else None), (host, port), secret


def pack_contact(host: str, port: int, secret: bytes) -> bytes:
    """The aggregator's address and the job's secret in a fixed layout of
    ``_CONTACT_BYTES``: version 1, secret length, secret, port (2 bytes, big
    endian), host length, host (UTF-8), zero padding.  Raises ValueError if
    the secret or the host name is longer than 255 bytes."""
    name, secret = host.encode(), wire.check_secret(secret)
    if len(name) > 255 or len(secret) > 255:
        raise ValueError(f"fault aggregator contact: host {host!r} ({len(name)} bytes) and secret "
                         f"({len(secret)} bytes) must each fit in 255 bytes")
    packed = bytes([1, len(secret)]) + secret + int(port).to_bytes(2, "big") + bytes([len(name)]) + name
    return packed + bytes(_CONTACT_BYTES - len(packed))


def unpack_contact(data: bytes) -> tuple[str, int, bytes]:
    """``(host, port, secret)`` from `pack_contact`'s layout; raises ValueError
    for anything else (all zeros: rank 0 failed to start the aggregator)."""
    if len(data) != _CONTACT_BYTES or data[0] != 1:
        raise ValueError("no aggregator contact was sent")
    n = data[1]
    secret, rest = data[2:2 + n], data[2 + n:]
    port, m = int.from_bytes(rest[:2], "big"), rest[2]
    return rest[3:3 + m].decode(), port, wire.check_secret(secret)


def _broadcast_bytes(data: bytes) -> bytes:
    """``data`` from rank 0 to every rank over the default process group."""
    import torch
    import torch.distributed as dist
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    comms.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist())


def _await_departures(store_aggregator, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not store_aggregator.aggregator.all_departed() and time.monotonic() < deadline:
        time.sleep(0.05)


# -------------------------------------------------------------------- Ray

class AggregatorActor:
    """The job's aggregator inside a Ray actor: ranks `push`, the driver `poll`s.

    ``secret`` is the job's (the driver's `job_secret`): a pushed report must
    be sealed with it (`loom.faults.wire.seal`), or it is ignored and counted."""

    def __init__(self, world_size: int, config: dict, secret: bytes):
        self.secret = wire.check_secret(secret)
        self.aggregator = Aggregator(world_size, DetectConfig(**config))

    def push(self, sealed: bytes) -> bool:
        """Take one sealed report; False if it was refused (see ``rejected``)."""
        if not isinstance(sealed, bytes) or len(sealed) > wire.MAX_FRAME:
            self.aggregator.reject("oversize", "ignored a push that is not a report of at most "
                                   f"{wire.MAX_FRAME} bytes")
            return False
        body = wire.unseal(self.secret, wire.REPORT, sealed)
        if body is None:
            self.aggregator.reject("auth", "ignored a report whose MAC is missing or wrong")
            return False
        return self.aggregator.ingest(body)

    def rejected(self) -> dict:
        """Refused pushes by kind (``auth``, ``oversize``, ``malformed``)."""
        return dict(self.aggregator.rejected)

    def mark_gone(self, rank: int) -> None:
        self.aggregator.mark_gone(rank)

    def poll(self, final: bool = False) -> dict:
        """Run the detectors (when due, or now if ``final``); return the new
        log lines (``faults``, ``waits``)."""
        self.aggregator.check(force=final)
        return self.aggregator.drain()


class RayTransport:
    """A rank's line to the `AggregatorActor` (fire-and-forget calls), each
    report sealed with the job's ``secret``."""

    max_frame = wire.MAX_FRAME

    def __init__(self, actor, secret: bytes):
        self.actor, self.secret = actor, wire.check_secret(secret)

    def send(self, payload: bytes) -> None:
        self._last = self.actor.push.remote(wire.seal(self.secret, wire.REPORT, payload))

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the last report arrived (before the worker may be killed)."""
        import ray
        if getattr(self, "_last", None) is not None:
            ray.wait([self._last], timeout=timeout)


def start_aggregator(cfg) -> tuple:
    """Start the job's `AggregatorActor` for ``cfg`` (its world size and
    detectors) on the driver's node (a worker node's loss must not take it
    along); returns (actor, secret).  Ray starts its process in the
    background: the first call to it waits for that."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    secret = job_secret()
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(num_cpus=0)(AggregatorActor).options(scheduling_strategy=here).remote(
        cfg.world_size, dataclasses.asdict(detect_config(cfg.faults)), secret)
    return actor, secret


class DriverWatch:
    """The driver's side under Ray: polls the actor, prints faults, writes the
    logs, and says when (and why) the job must stop.  ``started``: the
    (actor, secret) of `start_aggregator`, when the driver started it ahead."""

    def __init__(self, cfg, run_dir: str | None, printer=None, started: tuple | None = None):
        self.stop_on = stop_kinds(cfg.faults)
        # the actor and the secret handed to each worker actor with its transport (`start_aggregator`)
        self.actor, self.secret = started if started is not None else start_aggregator(cfg)
        self.log = LogWriter(run_dir) if run_dir else None
        self.printer = printer or log.warning
        self.faults: list[Fault] = []
        self.stopping: Fault | None = None
        self.judges: list = []  # more stop rules: each takes every poll's log lines, returns a Fault or None

    def poll(self, timeout: float = 30.0, final: bool = False) -> Fault | None:
        """New faults since the last poll; returns the fault that stops the job, if any.
        ``final``: the workers are done, analyse everything they reported."""
        import ray
        try:
            lines = ray.get(self.actor.poll.remote(final), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            # an overloaded machine: the monitor's report is late, not the job's failure
            log.warning("the fault monitor did not answer within %.0f s; %s", timeout,
                        "its last report is lost" if final else "asking again at the next poll")
            return self.stopping
        if self.log is not None:
            self.log.write(lines)
        for entry in lines["faults"]:
            fault = Fault.from_dict(entry)
            self.faults.append(fault)
            self.printer(describe(fault))
            if fault.kind in self.stop_on and self.stopping is None:
                self.stopping = fault
        for judge in self.judges:
            verdict = judge(lines)
            if verdict is not None and self.stopping is None:
                self.stopping = verdict
        return self.stopping

    def explain(self, dead=()) -> Fault | None:
        """After a worker failed: give the monitor a moment to say why.
        ``dead`` are ranks whose process Ray saw die (lost at once; one int or
        several)."""
        import ray
        for rank in ([dead] if isinstance(dead, int) else dead or ()):
            ray.get(self.actor.mark_gone.remote(rank), timeout=30)
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
