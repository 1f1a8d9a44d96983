"""The per-rank entry shared by Ray and torchrun.

Under torchrun:  ``torchrun --nproc-per-node 2 -m loom.launch.worker --config job.toml``
It reads the torchrun environment contract (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), joins the process group and runs
the training loop; rank 0 writes the run directory and shows progress.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

from .config import ConfigError, JobConfig, add_config_arguments, config_from_args, to_toml, validate
from .fault_watch import rank_faults
from .logging_backends import check_backends, open_sinks
from .report import RunRecorder, configure_logging, make_run_dir
from .train import resolve_device, train

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
    dist.init_process_group(backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=cfg.job.pg_timeout))


def run_rank(cfg: JobConfig | dict, reporter=None, fault_transport=None) -> dict:
    """Join, train, leave.  Returns the training summary.

    ``fault_transport`` carries this rank's fault-monitor reports (the Ray
    driver passes one); without it rank 0 hosts the aggregator (torchrun)."""
    if isinstance(cfg, dict):
        cfg = JobConfig.from_dict(cfg)
    validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", cfg.world_size)))
    init_distributed(cfg)
    try:
        with rank_faults(cfg, reporter, fault_transport) as faults:
            return train(cfg, reporter, step_hook=faults.at_step)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loom.launch.worker",
                                     description="loom's per-rank worker (run it under torchrun)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = validate(config_from_args(args), world_size=int(os.environ.get("WORLD_SIZE", "1")))
        if rank0:  # only rank 0 logs to the backends
            check_backends(cfg.job)
    except ConfigError as exc:
        parser.error(str(exc))
    recorder = None
    if rank0:
        run_dir = make_run_dir(cfg.job.runs_dir, cfg.job.name)
        with open(os.path.join(run_dir, "config.toml"), "w") as fh:
            fh.write(to_toml(cfg))
        recorder = RunRecorder(run_dir, cfg.train.steps, cfg.job.progress, sinks=open_sinks(cfg, run_dir))
    try:
        summary = run_rank(cfg, recorder)
    except BaseException:
        if recorder is not None:
            recorder.close_sinks()
        raise
    if recorder is not None:
        recorder.finish({k: v for k, v in summary.items() if k != "losses"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
