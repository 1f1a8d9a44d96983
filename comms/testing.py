"""Run a function on several gloo (or nccl) worker processes.

`run_distributed` spawns fresh workers for one call; `WorkerPool` keeps a
group of initialised workers alive across calls (tests use it to avoid paying
process start-up for every case).  Both return each rank's return value,
re-raise a worker's exception naming its rank, and kill every worker when the
timeout passes, so a hung collective never hangs the caller.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import time
import traceback

import torch
import torch.distributed as dist

from . import ops, trace

# A worker's process group times out a little after the caller's deadline at
# most; the caller kills workers first, so this only bounds orphaned work.
_PG_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("LOOM_TEST_PG_TIMEOUT", "300")))


class WorkerError(RuntimeError):
    """A worker failed in a way that cannot be re-raised as its own type."""


def _dumps_exception(exc: BaseException) -> bytes | None:
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:
        return None


def _rebuild_exception(rank: int, exc_bytes: bytes | None, tb: str) -> BaseException:
    original = None
    if exc_bytes is not None:
        try:
            original = pickle.loads(exc_bytes)
        except Exception:
            original = None
    message = f"rank {rank}: {original if original is not None else tb.strip().splitlines()[-1]}"
    err: BaseException
    try:
        err = type(original)(message) if original is not None else WorkerError(message)
    except Exception:
        err = WorkerError(f"rank {rank}: {type(original).__name__}: {original}")
    err.rank = rank
    err.remote_traceback = tb
    if hasattr(err, "add_note"):
        err.add_note(f"--- traceback of rank {rank} ---\n{tb}")
    return err


def _init_worker(rank, world_size, host, port, backend, env, threads):
    os.environ.update(env or {})
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR=host, MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=_PG_TIMEOUT)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=_PG_TIMEOUT)
    trace.reset_trace()


def _call(fn, args, kwargs) -> tuple[bool, object]:
    try:
        return True, pickle.dumps(fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - reported to the caller with the rank
        return False, (_dumps_exception(exc), traceback.format_exc())


def _drop_subgroups():
    """Destroy the groups a task created so a long-lived worker does not leak sockets."""
    world = dist.group.WORLD
    for pg in list(getattr(dist.distributed_c10d._world, "pg_map", {})):
        if pg is not world:
            try:
                dist.destroy_process_group(pg)
            except Exception:
                pass
    ops.forget_groups()


def _one_shot_worker(rank, world_size, host, port, backend, env, threads, payload, results):
    try:
        _init_worker(rank, world_size, host, port, backend, env, threads)
        fn, args, kwargs = pickle.loads(payload)
        ok, value = _call(fn, args, kwargs)
    except BaseException as exc:  # noqa: BLE001
        ok, value = False, (_dumps_exception(exc), traceback.format_exc())
    results.put((rank, ok, value))
    results.close()
    results.join_thread()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def _pool_worker(rank, world_size, host, port, backend, env, threads, tasks, results):
    try:
        _init_worker(rank, world_size, host, port, backend, env, threads)
        results.put((rank, True, b"ready"))
    except BaseException as exc:  # noqa: BLE001
        results.put((rank, False, (_dumps_exception(exc), traceback.format_exc())))
        return
    while True:
        payload = tasks.get()
        if payload is None:
            break
        trace.reset_trace()
        fn, args, kwargs = pickle.loads(payload)
        ok, value = _call(fn, args, kwargs)
        if ok:
            _drop_subgroups()
        results.put((rank, ok, value))
    dist.destroy_process_group()


def _rendezvous_store():
    # The parent owns the store, so the port is bound before any worker starts.
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=_PG_TIMEOUT)


def _kill(procs):
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 2.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def _drain_ranks(results) -> set[int]:
    ranks = set()
    while True:
        try:
            ranks.add(results.get_nowait()[0])
        except queue_mod.Empty:
            return ranks


def _collect(procs, results, world_size, timeout, what):
    """Gather one (rank, ok, value) per rank; raise on the first failure,
    on a worker that died silently, or at the deadline."""
    out: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    exited_at: dict[int, float] = {}
    while len(out) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(out))
            raise TimeoutError(f"{what}: ranks {missing} did not finish within {timeout}s; "
                               f"every worker was killed")
        try:
            rank, ok, value = results.get(timeout=min(remaining, 0.2))
        except queue_mod.Empty:
            now = time.monotonic()
            for r, p in enumerate(procs):
                if r not in out and not p.is_alive():
                    # let a result already in the pipe arrive before calling it dead
                    if now - exited_at.setdefault(r, now) > 1.0:
                        raise WorkerError(f"{what}: rank {r} died with exit code {p.exitcode} "
                                          f"before returning a result")
            continue
        if not ok:
            exc_bytes, tb = value
            error = _rebuild_exception(rank, exc_bytes, tb)
            # A peer that died without a word is the cause of the others'
            # "connection closed" errors: name it rather than the symptom.
            reported = set(out) | {rank}
            dead: list[int] = []
            grace = time.monotonic() + 1.5  # a crashed peer may still be exiting
            while not dead and time.monotonic() < grace:
                time.sleep(0.05)
                reported |= _drain_ranks(results)
                dead = [r for r, p in enumerate(procs) if r not in reported and p.exitcode is not None]
            if dead:
                raise WorkerError(f"{what}: rank {dead[0]} died with exit code "
                                  f"{procs[dead[0]].exitcode} before returning a result "
                                  f"(then rank {rank} failed: {error})")
            raise error
        out[rank] = value
    return [out[r] for r in range(world_size)]


def run_distributed(fn, world_size: int, *args, timeout: float = 60, backend: str = "gloo",
                    env: dict | None = None, threads: int = 1, **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` fresh worker processes with
    an initialised default process group; return the per-rank results.

    ``fn`` must be importable by module path (defined at module level)."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    ctx = mp.get_context("spawn")
    store = _rendezvous_store()
    results = ctx.Queue()
    payload = pickle.dumps((fn, args, kwargs))
    procs = [ctx.Process(target=_one_shot_worker, daemon=True,
                         args=(r, world_size, "127.0.0.1", store.port, backend, env, threads,
                               payload, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        values = _collect(procs, results, world_size, timeout, f"run_distributed({fn.__name__})")
        for p in procs:
            p.join(5.0)
        return [pickle.loads(v) for v in values]
    finally:
        _kill(procs)
        del store


class WorkerPool:
    """Long-lived initialised workers: ``pool.run(fn, *args)`` like run_distributed.

    After any failure or timeout the workers are killed and restarted on the
    next call, so one broken test cannot poison the next."""

    def __init__(self, world_size: int, backend: str = "gloo", env: dict | None = None,
                 threads: int = 1, start_timeout: float = 120):
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        self.world_size, self.backend, self.env, self.threads = world_size, backend, env, threads
        self.start_timeout = start_timeout
        self._procs: list = []

    def _start(self):
        ctx = mp.get_context("spawn")
        self._store = _rendezvous_store()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [ctx.Process(target=_pool_worker, daemon=True,
                                   args=(r, self.world_size, "127.0.0.1", self._store.port,
                                         self.backend, self.env, self.threads, self._tasks[r],
                                         self._results))
                       for r in range(self.world_size)]
        for p in self._procs:
            p.start()
        try:
            _collect(self._procs, self._results, self.world_size, self.start_timeout, "WorkerPool start")
        except BaseException:
            self.close()
            raise

    def run(self, fn, *args, timeout: float = 60, **kwargs) -> list:
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        payload = pickle.dumps((fn, args, kwargs))
        for q in self._tasks:
            q.put(payload)
        try:
            values = _collect(self._procs, self._results, self.world_size, timeout,
                              f"WorkerPool.run({fn.__name__})")
        except BaseException:
            self.close()
            raise
        return [pickle.loads(v) for v in values]

    def close(self):
        if self._procs:
            for q in self._tasks:
                try:
                    q.put(None)
                except Exception:
                    pass
            for p in self._procs:
                p.join(0.5)
            _kill(self._procs)
        self._procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
