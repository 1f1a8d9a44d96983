"""The per-rank entry shared by Ray and torchrun.

Under torchrun:  ``torchrun --nproc-per-node 2 -m loom.launch.worker --config job.toml``
It reads the torchrun environment contract (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), joins the process group and runs
the training loop; rank 0 writes the run directory and shows progress.  Under
``torchrun --max-restarts N`` every attempt appends to the run directory
attempt 0 opened (`loom.launch.recorder.open_torchrun_run`), and each restart
is recorded in its restarts.jsonl (`loom.launch.recovery.torchrun_attempt`).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys

import torch
import torch.distributed as dist

from loom import comms
from loom.comms.elastic import torchrun_job_id, uses_agent_store

from .config import (ConfigError, JobConfig, add_config_arguments, config_from_args, to_toml, validate,
                     validate_launch)
from .fault_watch import rank_faults
from .recorder import configure_logging, open_torchrun_run
from .recovery import resume_step, torchrun_attempt
from .train import resolve_device, train

log = logging.getLogger("loom.launch")
_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(cfg: JobConfig) -> None:
    """Join the default process group described by the environment."""
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"the worker needs the torchrun environment; missing {missing}")
    torch.set_num_threads(cfg.job.threads_per_worker)
    device = resolve_device(cfg.job.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # under torchrun, keys prefixed per attempt: a restart must not read the dead attempt's addresses
    comms.init_process_group_from_env(backend, datetime.timedelta(seconds=cfg.job.pg_timeout))


def run_rank(cfg: JobConfig | dict, reporter=None, fault_transport=None, train_fn=None, config=None,
             attempt: int | None = None, stop_check=None):
    """Join, train, leave.  Returns the built-in loop's summary, or what
    ``train_fn`` returned (``train_fn(config)``, or ``train_fn()`` when it
    takes no argument; `loom.launch.report` works inside it).

    ``fault_transport`` carries this rank's fault-monitor reports (the Ray
    driver passes one); without it rank 0 hosts the aggregator (torchrun).
    ``attempt``: the job's attempt this rank belongs to (0: the first), which
    arms the fault injections planned for it; None reads the Ray driver's
    ``LOOM_ATTEMPT``, else torchrun's ``TORCHELASTIC_RESTART_COUNT`` (0 outside both).
    ``stop_check``: the built-in loop's question at each checkpoint (`train`)."""
    if attempt is None:
        attempt = comms.elastic_attempt()
    from .api import rank_session
    if isinstance(cfg, dict):
        cfg = JobConfig.from_dict(cfg)
    world = int(os.environ.get("WORLD_SIZE", cfg.world_size))
    if train_fn is None:
        validate(cfg, world_size=world)
    else:
        validate_launch(cfg, world)
    init_distributed(cfg)
    try:
        with rank_faults(cfg, reporter, fault_transport, attempt=attempt) as faults:
            if train_fn is None:
                return train(cfg, reporter, step_hook=faults.at_step, stop_check=stop_check)
            with rank_session(reporter, faults.at_step, cfg.job.device):
                return call_train_fn(train_fn, config)
    finally:
        dist.destroy_process_group()


def call_train_fn(train_fn, config):
    """``train_fn(config)`` (or ``train_fn()``).  A ``sys.exit()`` inside it
    is a failure of this rank, raised as RuntimeError naming the exit code (an
    exiting actor would otherwise only show as a process that ended, while
    its peers wait for it in their collectives)."""
    try:
        value = train_fn(config) if takes_config(train_fn) else train_fn()
    except SystemExit as exc:
        raise RuntimeError(f"train_fn called sys.exit({exc.code!r}) on rank {os.environ.get('RANK', '?')}: "
                           f"return from train_fn to end the loop, raise to fail the job") from None
    _check_returnable(value)
    return value


def _check_returnable(value) -> None:
    """The driver receives ``train_fn``'s return value through Ray (cloudpickle):
    a value that cannot travel is named here, not as a bare pickling error."""
    from ray import cloudpickle
    try:
        cloudpickle.dumps(value)
    except Exception as exc:  # noqa: BLE001 - any failure to serialise
        raise TypeError(f"train_fn returned a {type(value).__name__} that cannot be sent to the driver "
                        f"({type(exc).__name__}: {exc}); return plain values (numbers, strings, lists, "
                        f"dicts, tensors)") from None


def takes_config(train_fn) -> bool:
    """Whether ``train_fn`` is called with the config (it has a first
    parameter) or without (it has none), as Ray Train decides; TypeError when
    it needs more than one argument."""
    import inspect
    params = list(inspect.signature(train_fn).parameters.values())
    needed = [p.name for p in params[1:] if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL,
                                                                                    p.VAR_KEYWORD)]
    if needed:
        raise TypeError(f"train_fn {getattr(train_fn, '__qualname__', train_fn)!r} also needs {needed}; "
                        f"it must take one argument (config) or none")
    return bool(params)


def agent_store(cfg: JobConfig):
    """A client of torchrun's agent store (one per job, kept across its
    attempts), or None where the workers do not share it or none is reachable."""
    if not uses_agent_store() or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=cfg.job.pg_timeout))
    except Exception as exc:  # noqa: BLE001 - the run directory is then found by TORCHELASTIC_RUN_ID
        log.warning("cannot reach torchrun's agent store: %s: %s", type(exc).__name__, exc)
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loom.launch.worker",
                                     description="loom's per-rank worker (run it under torchrun)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    recorder = tracker = None
    try:
        cfg = validate(config_from_args(args), world_size=int(os.environ.get("WORLD_SIZE", "1")))
        if rank0:  # only rank 0 writes the run directory and logs to the backends
            attempt = comms.elastic_attempt()
            # every torchrun attempt of the job appends to attempt 0's run directory
            recorder = open_torchrun_run(cfg, cfg.train.steps, cfg.job.progress, {"config.toml": to_toml(cfg)},
                                         attempt=attempt, store=agent_store(cfg), job_id=torchrun_job_id())
            tracker = torchrun_attempt(recorder, attempt, int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")),
                                       resumed=resume_step(cfg) if attempt > 0 else None)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        summary = run_rank(cfg, tracker)
    except BaseException:
        if recorder is not None:
            recorder.close_sinks()
        raise
    if recorder is not None:
        recorder.finish({k: v for k, v in summary.items() if k != "losses"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
