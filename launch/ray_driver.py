"""Run a job on Ray: one actor per rank, placed by a placement group.

``--placement pack`` (the default) asks Ray to pack the bundles on as few
nodes as possible and gives ranks bundles by node (`loom.launch.topology`):
each sp and ep group of consecutive ranks within a node where the nodes'
sizes allow, dp across nodes; ``spread`` spreads the bundles over the nodes
and runs rank i in bundle i.

`launch_ray` is the one path both `loom train` (the built-in loop) and
`loom.launch.run` (the user's ``train_fn``) take: reach Ray (`cluster`), check
the cluster can hold the job, place one `RankWorker` per rank, hand each the
torchrun environment contract (rendezvous on rank 0's node) and the shared
worker entry (`worker.run_rank`), and supervise them with the fault monitor.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from . import cluster, storage
from .cluster import LaunchError
from .config import JobConfig, parse_env, sp_inner
from .elastic_policy import ElasticPolicy, StopControl
from .fault_watch import DriverWatch, start_aggregator
from .pool import WorkerPool
from .recorder import QueueReporter
from .recovery import Recovery
from .restart_on import PersistentStraggler
from .topology import placement_groups, summary

log = logging.getLogger("loom.launch")
__all__ = ["LaunchError", "RankWorker", "launch_ray"]


class RankWorker:
    """One training rank inside a Ray actor."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def rendezvous(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def warm(self) -> str:
        """Import what a rank needs (torch, loom's worker and training loop)
        ahead of time, so that a spare starts training at once; returns its node id."""
        import torch

        from . import train, worker  # noqa: F401 - imported for their cost, now
        # an optimizer's first construction imports torch._dynamo (about 1 s): a warmed worker has done it
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
        return self.node_id()

    def run(self, cfg: dict, env: dict, queue=None, fault_actor=None, fault_secret: bytes | None = None,
            train_fn=None, config=None, control=None):
        """This rank's part of the job: ``worker.run_rank`` with the built-in
        loop (``train_fn`` None) or the user's ``train_fn(config)``.
        ``control``: the driver's `StopControl`, asked (by rank 0) at each
        checkpoint whether to stop there (to grow the job)."""
        from .fault_watch import RayTransport
        from .worker import run_rank
        os.environ.update(env)
        transport = RayTransport(fault_actor, fault_secret) if fault_actor is not None else None
        reporter = QueueReporter(queue) if queue is not None else None
        stop_check = None
        if control is not None:
            rank0 = env.get("RANK") == "0"
            stop_check = (lambda: bool(ray.get(control.requested.remote(), timeout=30))) if rank0 else (lambda: False)
        try:
            return run_rank(cfg, reporter, fault_transport=transport, train_fn=train_fn, config=config,
                            stop_check=stop_check)
        finally:
            if reporter is not None:
                reporter.flush()  # every row and event is on the queue before the driver sees the result


def _want_gpus(cfg: JobConfig, workers: int | None = None) -> bool:
    """Whether each worker gets a GPU: --device cuda, or auto with a GPU for
    each of ``workers`` (default the world size; the driver counts spares too)."""
    if cfg.job.device == "cuda":
        return True
    if cfg.job.device == "cpu":
        return False
    return ray.cluster_resources().get("GPU", 0) >= (cfg.world_size if workers is None else workers)


def _local_ranks(node_ids: list[str]) -> list[tuple[int, int]]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) per rank from the node each runs on."""
    seen: dict[str, int] = {}
    local = []
    for node in node_ids:
        local.append(seen.get(node, 0))
        seen[node] = local[-1] + 1
    return [(lr, seen[node]) for lr, node in zip(local, node_ids)]


def launch_ray(cfg: JobConfig, recorder=None, *, train_fn=None, config=None, runtime_env: dict | None = None,
               env: dict | None = None, start_timeout: float | None = None) -> list:
    """Run the job on ``cfg.world_size`` Ray actors; returns every rank's
    result in rank order (the built-in loop's summary, or what ``train_fn``
    returned).  Rank 0's metrics and events stream to ``recorder``.  Every
    rank gets ``cfg.job.env`` (`parse_env`) and ``env`` in its environment.

    Ray: the job's own local instance unless ``cfg.job.address`` names a
    cluster (see `loom.launch.cluster`); when Ray is already initialised in
    this process, that connection is used and left up (``runtime_env`` must
    then be None).  ``start_timeout`` (default ``cfg.job.start_timeout``)
    bounds the wait for free resources; a cluster too small for the job
    fails at once.

    ``--max-restarts`` (`loom.launch.recovery`): a failure of a running job
    stops every worker; new workers are placed in the same placement group
    and resume from the newest committed checkpoint, until the budget is
    spent or the same fault repeats.  ``--spare-workers``: warmed spare
    workers take the place of isolated ones (`loom.launch.pool`);
    ``--min-workers``: the job shrinks to the healthy workers it can have and
    grows back at a checkpoint (`loom.launch.elastic`).  Raises LaunchError
    naming the rank that failed (and its exception), or the fault that
    stopped the job (the first attempt's, when restarts did not help)."""
    world = cfg.world_size
    start_timeout = cfg.job.start_timeout if start_timeout is None else start_timeout
    # before anything starts: ConfigError for a KEY not set; the driver's AWS_* for an s3:// store
    env = {**storage.worker_env(cfg), **parse_env(cfg.job.env), **(env or {})}
    if train_fn is not None and cfg.recovery.min_workers:
        raise LaunchError(f"--min-workers={cfg.recovery.min_workers} reshapes loom's own training loop (dp, "
                          f"grad-accum); a train_fn runs at the world size it was given: use --spare-workers")
    recovery = Recovery(cfg, recorder)
    spares = cfg.recovery.spare_workers if recovery.budget else 0
    started_here = not ray.is_initialized()
    if started_here:
        shipped, staging = cluster.runtime_env(cfg.job.address, cfg.job.working_dir, runtime_env)
        try:
            cluster.connect(cfg.job.address, (world + spares) * cfg.job.cpus_per_worker, shipped)
        finally:
            if staging:
                shutil.rmtree(staging, ignore_errors=True)
    elif runtime_env or cfg.job.working_dir:
        raise LaunchError("Ray is already initialised in this process: its runtime_env is the job's; pass "
                          "runtime_env (or working_dir) to ray.init, or call ray.shutdown() first")
    pg = pool = helpers = None
    notify = getattr(recorder, "event", None)
    try:
        gpus = 1 if _want_gpus(cfg, world + spares) else 0
        have = ray.cluster_resources().get("GPU", 0)
        if gpus and have < world + spares and cluster.is_local(cfg.job.address) and started_here:
            raise LaunchError(f"--device=cuda needs {world + spares} GPUs ({world} workers"
                              f"{f' and {spares} spares' if spares else ''}) but this machine has {have:.0f}; "
                              f"use --device cpu (or auto)")
        bundle = {"CPU": cfg.job.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        try:
            cluster.check_capacity(bundle, world + spares)
        except LaunchError as exc:
            if not spares:
                raise
            raise LaunchError(f"{exc} (the job asks for {world} workers and {spares} spares: --spare-workers)") \
                from None
        pack = cfg.job.placement == "pack"  # bundles on as few nodes as possible, ranks mapped by node
        pg = placement_group([bundle] * (world + spares), strategy="PACK" if pack else "SPREAD")
        cluster.wait_placed(pg, bundle, world + spares, start_timeout, notify)
        worker_cls = ray.remote(RankWorker)

        def new_actor(index: int):
            return worker_cls.options(num_cpus=cfg.job.cpus_per_worker, num_gpus=gpus,
                                      scheduling_strategy=PlacementGroupSchedulingStrategy(
                                          pg, placement_group_bundle_index=index)).remote()

        talkative = placement_groups(cfg.parallel.sp, cfg.parallel.ep, sp_inner(cfg))  # kept within a node
        groups = [size for _, size in talkative]
        pool = WorkerPool(pg, world, spares, new_actor, groups if pack else None)
        pool.warm()
        elastic = ElasticPolicy(cfg, pool, train_fn is None)
        helpers = AttemptHelpers(recorder is not None, ahead=recovery.budget > 0)
        fn_ref = ray.put(train_fn) if train_fn is not None else None
        while True:  # one attempt per pass; a failure either restarts (--max-restarts) or raises
            if recovery.attempt > 0 and not elastic.ready:  # a plain restart: every bundle placed again
                try:
                    if spares:  # enough placed bundles will do, not every one (a spare's may be on a lost node)
                        need = elastic.layout.world
                        if len(pool.wait_usable(need, start_timeout, notify)) < need:
                            cluster.wait_replaced(pg, bundle, need, 0.0)  # raises, naming what the nodes hold
                    else:
                        cluster.wait_replaced(pg, bundle, world, start_timeout, notify)
                except LaunchError as exc:
                    last = recovery.failures[-1]
                    raise LaunchError(f"could not restart after {last.error}: {exc}", rank=last.rank) \
                        from last.error
            elastic.ready = False
            tracker = recovery.begin()
            bundles = pool.assign(elastic.layout.world, rotate=recovery.attempt > 0)
            try:
                results = _attempt(elastic.job(recovery), recovery, pool, bundles, gpus, env,
                                   tracker if recorder is not None else None, fn_ref, config, start_timeout,
                                   elastic, helpers)
            except LaunchError as exc:
                if exc.kind is None:  # the job could not start: no fault of a running job
                    raise
                recovery.failed(exc, tracker, plan=lambda failure: elastic.after_fault(failure, recovery,
                                                                                       start_timeout, notify))
                continue
            stopped = results[0].get("stopped_at") if isinstance(results[0], dict) else None
            if stopped is not None and elastic.growing is not None:
                recovery.grew(stopped, *elastic.grow())
                continue
            recovery.finish()
            return results
    finally:
        recovery.finish()
        if helpers is not None:
            helpers.close()
        if pool is not None:
            pool.close()
        _release_memory(recovery)
        if pg is not None:
            remove_placement_group(pg)
        if started_here:
            ray.shutdown()


def _attempt(job: dict, recovery: Recovery, pool: WorkerPool, bundles: list[int], gpus: int, env: dict, recorder,
             fn_ref, config, start_timeout: float, elastic: ElasticPolicy | None = None,
             helpers: "AttemptHelpers | None" = None) -> list:
    """One attempt of the job: an actor per rank in ``bundles`` (a warmed
    spare where the bundle holds one, else a new one), a new fault monitor,
    run, supervise; every rank's actor is stopped when it ends."""
    cfg = JobConfig.from_dict(job)
    world = cfg.world_size
    actors, watch, queue, nodes, control = [], None, None, None, None
    try:
        actors, _ = pool.take(bundles)
        master_addr, master_port = ray.get(actors[0].rendezvous.remote(), timeout=start_timeout)
        nodes = ray.get([a.node_id.remote() for a in actors], timeout=start_timeout)
        talkative = placement_groups(cfg.parallel.sp, cfg.parallel.ep, sp_inner(cfg))
        recovery.placed(nodes, summary(nodes, talkative, cfg.parallel.sp, cfg.job.placement))
        memory_env = _memory_holders(cfg, recovery, nodes)
        helpers = helpers or AttemptHelpers(recorder is not None, ahead=False)
        queue, aggregator = helpers.take(cfg)
        if cfg.faults.monitor:
            watch = DriverWatch(cfg, getattr(recorder, "run_dir", None),
                                getattr(recorder, "event", None), started=aggregator)
            if recovery.budget and "straggler" in cfg.recovery.restart_on:  # a persistent one ends the attempt
                watch.judges.append(PersistentStraggler(cfg.recovery.restart_straggler_steps, cfg.faults.detect).feed)
        if elastic is not None and elastic.may_grow():  # only a shrunk job asks its workers to stop
            control = ray.remote(num_cpus=0)(StopControl).options(scheduling_strategy=_on_driver_node()).remote()
        futures = []
        for rank, (local_rank, local_world) in enumerate(_local_ranks(nodes)):
            rank_env = {**env, **recovery.env(), **memory_env, "RANK": str(rank), "WORLD_SIZE": str(world),
                        "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_world),
                        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
            futures.append(actors[rank].run.remote(job, rank_env, queue if rank == 0 else None,
                                                   watch.actor if watch else None,
                                                   watch.secret if watch else None, fn_ref, config, control))

        def tick():
            if elastic is not None:
                elastic.tick(control, recorder)
            if recorder is None or recorder.last_step is not None:  # not while this attempt starts
                helpers.prepare(cfg)
        return _supervise(futures, queue, recorder, watch, nodes=nodes, tick=tick)
    except ray.exceptions.GetTimeoutError:
        raise LaunchError(f"the {world} workers did not start within {start_timeout:.0f}s (--start-timeout): "
                          f"Ray could not place them or start their processes") from None
    except ray.exceptions.RayError as exc:  # an actor lost outside a rank's own result (e.g. its node went away)
        lost, deadline = {}, time.monotonic() + 2.0
        while nodes and not lost and time.monotonic() < deadline:  # Ray marks a lost node dead within moments
            lost = _lost_with_nodes([], [], nodes, 0.0)
            if not lost:
                time.sleep(0.1)
        if lost:  # whichever call saw it first, a lost node is the cause
            raise LaunchError("; ".join(_lost_parts(lost)), rank=min(lost), kind="lost_node", ranks=lost) from exc
        where = "while starting" if nodes is None else "while running"
        raise LaunchError(f"a worker was lost {where}: {type(exc).__name__}: {_one_line(exc)}",
                          kind="actor_lost") from exc
    finally:
        for a in actors:
            ray.kill(a)
        if control is not None:
            ray.kill(control)
        if watch is not None:
            watch.close()
        if queue is not None:
            try:
                _drain(queue, recorder)  # what rank 0 sent before it stopped
            except ray.exceptions.RayError as exc:
                log.warning("lost rank 0's last reports: %s", _one_line(exc))
            queue.shutdown(force=True)


class AttemptHelpers:
    """The driver's helper actors of an attempt: rank 0's metrics queue
    (``with_queue``) and the fault monitor's aggregator (`start_aggregator`).
    With ``ahead``, `prepare` starts the next attempt's while this one runs,
    so that a restart does not wait for Ray to start their processes (about
    1 s on a small machine, on the restart's critical path: a rank's first
    report waits for them)."""

    def __init__(self, with_queue: bool, ahead: bool = True):
        self.with_queue, self.ahead = with_queue, ahead
        self._next: tuple | None = None  # (world, queue, (aggregator, secret) or None)

    def prepare(self, cfg: JobConfig) -> None:
        """Start the next attempt's helpers now, if none are waiting."""
        if self.ahead and self._next is None:
            self._next = (cfg.world_size, *self._start(cfg))

    def take(self, cfg: JobConfig) -> tuple:
        """(queue or None, (aggregator, secret) or None) for an attempt of
        ``cfg``: the ones started ahead when they fit its world size."""
        ready, self._next = self._next, None
        if ready is not None and ready[0] == cfg.world_size and self._alive(*ready[1:]):
            return ready[1], ready[2]
        if ready is not None:
            self._kill(*ready[1:])
        return self._start(cfg)

    def close(self) -> None:
        if self._next is not None:
            self._kill(*self._next[1:])
            self._next = None

    def _start(self, cfg: JobConfig) -> tuple:
        queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": _on_driver_node()}) \
            if self.with_queue else None
        return queue, start_aggregator(cfg) if cfg.faults.monitor else None

    @staticmethod
    def _alive(queue, aggregator, timeout: float = 2.0) -> bool:
        """Whether helpers started ahead still answer: the node Ray put them
        on may have been lost since (its actors went with it)."""
        calls = ([queue.actor.qsize.remote()] if queue is not None else []) + \
            ([aggregator[0].rejected.remote()] if aggregator is not None else [])
        try:
            ray.get(calls, timeout=timeout)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
            log.info("the helpers started ahead for this attempt are gone (%s); starting new ones",
                     type(exc).__name__)
            return False
        return True

    @staticmethod
    def _kill(queue, aggregator) -> None:
        try:
            if queue is not None:
                queue.shutdown(force=True)
            if aggregator is not None:
                ray.kill(aggregator[0])
        except ray.exceptions.RayError:  # gone with its node already
            pass


def _memory_holders(cfg: JobConfig, recovery: Recovery, nodes: list[str]) -> dict:
    """Host-memory snapshot holders (`loom.launch.memory_tier`) on the
    attempt's nodes, kept across attempts; the workers' environment naming
    them ({} without checkpoints or with --no-memory-snapshots)."""
    if not (cfg.ckpt.memory_snapshots and cfg.ckpt.ckpt_every > 0):
        return {}
    from .memory_tier import holders_env
    return holders_env(recovery.token, nodes, recovery.holders)


def _release_memory(recovery: Recovery) -> None:
    """Stop the job's snapshot holders (Ray may stay up after the job)."""
    if ray.is_initialized():
        from .memory_tier import release_holders
        release_holders(recovery.token, recovery.holders)


def _on_driver_node():
    """Keep the driver's helper actors (the metrics queue, the fault monitor)
    on the driver's own node: a lost worker node must not take them along."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)


def _one_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


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


def _supervise(futures, queue, recorder, watch=None, grace: float = 1.5, nodes: list[str] | None = None,
               tick=None) -> dict:
    """Stream rank 0's metrics while waiting; the first failing rank, or a
    fault that stops the job (hang, lost rank), ends it.  When a rank fails,
    the others get ``grace`` seconds to show whether one of them died first:
    a dead rank is the cause of its peers' errors and is named first.
    ``tick()`` runs at every pass (the elastic driver's look for capacity)."""
    pending = list(futures)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=0.25)
        _drain(queue, recorder)
        if tick is not None:
            tick()
        if watch is not None and watch.poll() is not None:
            fault = watch.stopping
            lost = _lost_with_nodes(futures, pending, nodes, grace)  # a lost node explains a lost rank
            if lost:
                named = set(lost)
                parts = _lost_parts(lost) + ([] if set(fault.ranks) <= named else [_stopped(fault, len(futures))])
                raise LaunchError("; then ".join(parts), rank=min(lost), kind="lost_node", step=fault.step,
                                  ranks=lost)
            raise LaunchError(_stopped(fault, len(futures)), rank=min(fault.ranks, default=None), kind=fault.kind,
                              step=fault.step, ranks=fault.ranks)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise _failure(futures, ref, exc, [r for r in pending if r is not ref], watch, grace, nodes) \
                    from (getattr(exc, "cause", None) or exc)
        time.sleep(0 if done else 0.01)
    _drain(queue, recorder)
    if watch is not None:
        watch.poll(final=True)  # the last steps' faults and waits, before the workers go
    return ray.get(futures)


def _lost_with_nodes(futures, pending, nodes: list[str] | None, grace: float) -> dict[int, tuple[str, str]]:
    """Ranks lost with their Ray node: {rank: (node id, Ray's reason)}.  Ray
    says so in each such actor's `ActorDiedError` (waited for up to ``grace``
    s among ``pending``), and marks the node dead (``nodes``: each rank's)."""
    lost: dict[int, tuple[str, str]] = {}
    deadline = time.monotonic() + grace
    pending = list(pending)
    while pending and time.monotonic() < deadline:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        for ref in ready:
            try:
                ray.get(ref, timeout=1)
            except ray.exceptions.RayError as exc:
                if _lost_node(exc):
                    lost[futures.index(ref)] = _lost_node(exc)
        if lost:
            break
    if nodes and not lost:
        dead = {n["NodeID"] for n in ray.nodes() if not n.get("Alive")}
        lost = {r: (node, "Ray marks it dead") for r, node in enumerate(nodes) if node in dead}
    return lost


def _lost_parts(lost: dict[int, tuple[str, str]]) -> list[str]:
    """One line per lost node, naming its ranks (`_lost_with_nodes`)."""
    parts = []
    for node, reason in dict.fromkeys(lost.values()):
        ranks = [r for r in sorted(lost) if lost[r][0] == node]
        several = len(ranks) > 1
        parts.append(f"rank{'s' * several} {', '.join(map(str, ranks))} lost with {'their' if several else 'its'} "
                     f"Ray node {node[:12]}" + (f" ({reason})" if reason else ""))
    return parts


def _failure(futures, ref, exc, pending, watch, grace: float, nodes: list[str] | None = None) -> LaunchError:
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
    lost = {r: _lost_node(e) for r, e in sorted(dead.items()) if _lost_node(e)}
    if not lost and nodes and not dead:  # e.g. a collective failed first: was a peer's node lost?
        lost = _lost_with_nodes(futures, [], nodes, 0.0)
    parts += _lost_parts(lost)  # a lost node is the cause of its ranks' loss
    named.update(lost)
    if why is not None and not set(why.ranks) <= named:  # the monitor knows the cause of the failure
        parts.append(_stopped(why, len(futures)))
        named.update(why.ranks)
    parts += [f"rank {r} died: {_death(dead[r])}" for r in sorted(dead) if r not in named]
    named.update(dead)
    if rank not in named:
        cause = getattr(exc, "cause", None) or exc
        parts.append(f"rank {rank} failed: {type(cause).__name__}: {cause}")
    first = sorted(lost) or (sorted(why.ranks) if why is not None and why.ranks else sorted(dead))
    kind = "lost_node" if lost else why.kind if why is not None else "died" if dead else "exception"
    traceback = str(exc) if kind == "exception" and isinstance(exc, ray.exceptions.RayTaskError) else None
    return LaunchError("; then ".join(parts), rank=first[0] if first else rank, kind=kind,
                       step=why.step if why is not None else None, remote_traceback=traceback,
                       ranks=first or [rank])


def _death(exc) -> str:
    """A short account of an `ActorDiedError` (its message runs to many lines)."""
    node = _lost_node(exc)
    if node is not None:
        return f"its Ray node {node[0][:12]} was lost" + (f" ({node[1]})" if node[1] else "")
    pid = re.search(r"\bpid: (\d+)", str(exc))
    return "its worker process ended" + (f" (pid {pid.group(1)})" if pid else "")


def _lost_node(exc) -> tuple[str, str] | None:
    """(node id, Ray's reason) when ``exc`` says an actor died with its node
    (Ray: "The actor died because its node has died. Node Id: ..."), else None."""
    found = re.search(r"its node has died\. Node Id: ([0-9a-f]+)\s*\n?\s*(.*)", str(exc))
    if found is None:
        return None
    return found.group(1), found.group(2).strip().removeprefix("the actor's node was ").strip()
