"""Run a job on Ray: one actor per rank, placed by a placement group.

A local Ray instance sized to the job is started unless ``address`` names an
existing cluster.  Rank 0's node hosts the rendezvous; every actor gets the
torchrun environment contract and runs the shared worker entry.
"""
from __future__ import annotations

import os
import re
import socket
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import JobConfig
from .fault_watch import DriverWatch
from .report import QueueReporter


class LaunchError(RuntimeError):
    """The job could not start or a worker failed; the message names the rank."""


class RankWorker:
    """One training rank inside a Ray actor."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def rendezvous(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def run(self, cfg: dict, env: dict, queue=None, fault_actor=None, fault_secret: bytes | None = None) -> dict:
        from .fault_watch import RayTransport
        from .worker import run_rank
        os.environ.update(env)
        transport = RayTransport(fault_actor, fault_secret) if fault_actor is not None else None
        return run_rank(cfg, QueueReporter(queue) if queue is not None else None, fault_transport=transport)


def _want_gpus(cfg: JobConfig) -> bool:
    if cfg.job.device == "cuda":
        return True
    if cfg.job.device == "cpu":
        return False
    return ray.cluster_resources().get("GPU", 0) >= cfg.world_size


def _local_ranks(node_ids: list[str]) -> list[tuple[int, int]]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) per rank from the node each runs on."""
    seen: dict[str, int] = {}
    local = []
    for node in node_ids:
        local.append(seen.get(node, 0))
        seen[node] = local[-1] + 1
    return [(lr, seen[node]) for lr, node in zip(local, node_ids)]


def launch_ray(cfg: JobConfig, recorder=None, *, start_timeout: float = 120.0) -> dict:
    """Run the job; rank 0's metrics stream to ``recorder``; returns rank 0's summary."""
    world = cfg.world_size
    started_here = not ray.is_initialized()
    if started_here:
        if cfg.job.address:
            ray.init(address=cfg.job.address, log_to_driver=True)
        else:
            ray.init(num_cpus=max(1, int(round(world * cfg.job.cpus_per_worker))),
                     include_dashboard=False, log_to_driver=True)
    gpus = 1 if _want_gpus(cfg) else 0
    have = ray.cluster_resources().get("GPU", 0)
    if gpus and have < world and not cfg.job.address:
        if started_here:
            ray.shutdown()
        raise LaunchError(f"--device=cuda needs {world} GPUs but this machine has {have:.0f}; "
                          f"use --device cpu (or auto)")
    bundle = {"CPU": cfg.job.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    pg = placement_group([bundle] * world, strategy="SPREAD")
    actors = []
    watch = None
    try:
        try:
            ray.get(pg.ready(), timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            raise LaunchError(f"Ray could not place {world} workers with {bundle} each within "
                              f"{start_timeout:.0f}s; cluster has {ray.cluster_resources()}") from None
        worker_cls = ray.remote(RankWorker)
        actors = [worker_cls.options(num_cpus=cfg.job.cpus_per_worker, num_gpus=gpus,
                                     scheduling_strategy=PlacementGroupSchedulingStrategy(
                                         pg, placement_group_bundle_index=i)).remote()
                  for i in range(world)]
        master_addr, master_port = ray.get(actors[0].rendezvous.remote(), timeout=start_timeout)
        nodes = ray.get([a.node_id.remote() for a in actors], timeout=start_timeout)
        queue = Queue(actor_options={"num_cpus": 0}) if recorder is not None else None
        if cfg.faults.monitor:
            watch = DriverWatch(cfg, getattr(recorder, "run_dir", None),
                                getattr(recorder, "event", None))
        futures = []
        for rank, (local_rank, local_world) in enumerate(_local_ranks(nodes)):
            env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
                   "LOCAL_WORLD_SIZE": str(local_world), "MASTER_ADDR": master_addr,
                   "MASTER_PORT": str(master_port)}
            futures.append(actors[rank].run.remote(cfg.to_dict(), env, queue if rank == 0 else None,
                                                   watch.actor if watch else None,
                                                   watch.secret if watch else None))
        return _supervise(futures, queue, recorder, watch)
    finally:
        for a in actors:
            ray.kill(a)
        if watch is not None:
            watch.close()
        remove_placement_group(pg)
        if started_here:
            ray.shutdown()


def _stopped(fault, world: int) -> str:
    return f"stopped all {world} workers after a {fault.kind.replace('_', ' ')}: {fault.evidence}"


def _drain(queue, recorder) -> None:
    if queue is None:
        return
    while True:
        try:
            kind, payload = queue.get(block=False)
        except Empty:
            return
        getattr(recorder, kind)(payload)


def _supervise(futures, queue, recorder, watch=None, grace: float = 1.5) -> dict:
    """Stream rank 0's metrics while waiting; the first failing rank, or a
    fault that stops the job (hang, lost rank), ends it.  When a rank fails,
    the others get ``grace`` seconds to show whether one of them died first:
    a dead rank is the cause of its peers' errors and is named first."""
    pending = list(futures)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=0.25)
        _drain(queue, recorder)
        if watch is not None and watch.poll() is not None:
            raise LaunchError(_stopped(watch.stopping, len(futures)))
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise _failure(futures, ref, exc, [r for r in pending if r is not ref], watch, grace) from exc
        time.sleep(0 if done else 0.01)
    _drain(queue, recorder)
    if watch is not None:
        watch.poll(final=True)  # the last steps' faults and waits, before the workers go
    return ray.get(futures[0])


def _failure(futures, ref, exc, pending, watch, grace: float) -> LaunchError:
    """The error that ends the job after ``futures[ref]`` failed with ``exc``:
    a rank whose actor died (now, or within ``grace`` s among ``pending``) or
    that the monitor names lost comes first, then the failure seen."""
    rank = futures.index(ref)
    dead = {rank: exc} if isinstance(exc, ray.exceptions.ActorDiedError) else {}
    deadline = time.monotonic() + grace
    while not dead and pending and time.monotonic() < deadline:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        for other in ready:
            try:
                ray.get(other, timeout=1)
            except ray.exceptions.ActorDiedError as died:
                dead[futures.index(other)] = died
            except ray.exceptions.RayError:
                pass  # another symptom
    why = watch.explain(sorted(dead)) if watch is not None else None
    parts, named = [], set()
    if why is not None:  # the monitor knows the cause of the failure
        parts.append(_stopped(why, len(futures)))
        named.update(why.ranks)
    parts += [f"rank {r} died: {_death(dead[r])}" for r in sorted(dead) if r not in named]
    named.update(dead)
    if rank not in named:
        cause = getattr(exc, "cause", None) or exc
        parts.append(f"rank {rank} failed: {type(cause).__name__}: {cause}")
    return LaunchError("; then ".join(parts))


def _death(exc) -> str:
    """A short account of an `ActorDiedError` (its message runs to many lines)."""
    pid = re.search(r"\bpid: (\d+)", str(exc))
    return "its worker process ended" + (f" (pid {pid.group(1)})" if pid else "")
