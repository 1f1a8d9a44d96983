"""Joining the default process group from the torchrun environment, once per attempt.

Under ``torchrun --max-restarts N`` the elastic agent hosts one TCPStore for
the whole job (torch >= 2.4 shares the rendezvous store with the workers:
``TORCHELASTIC_USE_AGENT_STORE=True``) and restarts every worker when one
fails.  torch's ``env://`` rendezvous connects the workers of every attempt
to that store *without* an attempt prefix, so the keys a process group
writes while it connects - gloo's per-rank addresses, under names made from
the group's name (``default_pg/0//cpu//0/<rank>``, ``default_pg/0//1//cpu//0/<rank>``
for the first `new_group`, ...) - are the same names in every attempt, and
the previous attempt's values are still there.  A restarted rank that reads
a peer's key before that peer has rewritten it connects to the dead
process's port: ``Gloo connectFullMesh failed ... Connection refused``.  The
default group mostly wins that race (every rank writes its key at about the
same moment); the groups `init_mesh` creates next mostly lose it.

`init_process_group_from_env` joins through a client of the agent's store
wrapped in a `PrefixStore` named for the attempt (`attempt_prefix`), so the
default group and every group derived from it read and write only this
attempt's keys.  Outside torchrun (the Ray driver, `loom.comms.testing`)
rank 0 hosts a fresh store for every attempt and torch's ``env://`` is used
unchanged.
"""
from __future__ import annotations

import datetime
import os

import torch.distributed as dist

RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"
ATTEMPT_ENV = "LOOM_ATTEMPT"  # set by loom's Ray driver for the workers of each attempt
JOB_TOKEN_ENV = "LOOM_JOB_TOKEN"  # set by loom's Ray driver: one id for every attempt of a job
AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_job_id(environ=None) -> str | None:
    """The torchrun job's id (``TORCHELASTIC_RUN_ID``: ``--rdzv-id``, a fresh
    uuid under ``--standalone``), or None where it names no job (unset, or
    torchrun's default ``none``, shared by every job that gives none)."""
    run_id = (os.environ if environ is None else environ).get("TORCHELASTIC_RUN_ID", "")
    return None if run_id in ("", "none") else run_id


def job_token(environ=None) -> str | None:
    """One id for every attempt of this job, the same on every host: loom's
    Ray driver's ``LOOM_JOB_TOKEN``, else the torchrun job's id
    (`torchrun_job_id`); None outside both.  A restarted attempt reclaims
    the checkpoint store from the claims made under this id only."""
    environ = os.environ if environ is None else environ
    return environ.get(JOB_TOKEN_ENV) or torchrun_job_id(environ)


def elastic_attempt(environ=None) -> int:
    """The job's attempt this process belongs to (0: the first): loom's Ray
    driver's ``LOOM_ATTEMPT``, else torchrun's ``TORCHELASTIC_RESTART_COUNT``
    (0 outside both).  Raises ValueError if the variable is not a
    non-negative integer."""
    environ = os.environ if environ is None else environ
    name = ATTEMPT_ENV if ATTEMPT_ENV in environ else RESTART_ENV
    value = environ.get(name, "0")
    try:
        attempt = int(value)
    except ValueError:
        attempt = -1
    if attempt < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer (the launcher sets it)")
    return attempt


def uses_agent_store(environ=None) -> bool:
    """Whether the workers share torchrun's agent store (torch's own test)."""
    return (os.environ if environ is None else environ).get(AGENT_STORE_ENV) == str(True)


def attempt_prefix(attempt: int, world_size: int) -> str:
    """The store prefix of one attempt's keys.  The world size is part of it
    because an elastic agent that restarts workers for a membership change
    (nodes joining) does not count a restart."""
    if attempt < 0 or world_size < 1:
        raise ValueError(f"attempt={attempt} must be >= 0 and world_size={world_size} >= 1")
    return f"loom/attempt_{attempt}/world_{world_size}"


def init_process_group_from_env(backend: str, timeout: datetime.timedelta) -> None:
    """Join the default process group described by the torchrun environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Under torchrun's shared agent store the group's keys are prefixed with
    `attempt_prefix` (so a restarted attempt never reads a dead attempt's
    addresses); otherwise this is ``init_process_group(backend, "env://")``.
    Raises RuntimeError naming the missing variables."""
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"joining the process group needs the torchrun environment; missing {missing}")
    if not uses_agent_store():
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                           is_master=False, timeout=timeout)
    store = dist.PrefixStore(attempt_prefix(elastic_attempt(), world), client)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
