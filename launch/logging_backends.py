"""Logging backends: where a run's metrics go besides metrics.jsonl.

A backend is a `MetricsSink`: ``log(step, metrics)`` takes one row of
scalars named ``train/<metric>`` or ``eval/<metric>`` (`scalars` makes them
from a metrics row), ``close()`` flushes and ends it.  The `RunRecorder`
(`loom.launch.report`) holds the sinks of a run: on the Ray driver, or on
rank 0 under torchrun, so only that process needs the packages.

- `TensorBoardSink`: event files in ``<run dir>/tensorboard``
  (`torch.utils.tensorboard.SummaryWriter`; ``pip install
  'loom-train[tensorboard]'``).  ``--tensorboard`` is on by default when the
  package is installed.
- `WandbSink`: a Weights & Biases run in ``--wandb PROJECT`` (``pip install
  'loom-train[wandb]'``), its files under ``<run dir>/wandb``.
  ``--wandb-mode offline`` (or ``WANDB_MODE=offline`` with the default
  ``auto``) needs no network; ``wandb sync <run dir>/wandb/offline-run-*``
  uploads it later.

The packages are imported only when a sink is opened.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Protocol

from .config import ConfigError

log = logging.getLogger("loom.launch")

_INSTALL = {"tensorboard": "pip install 'loom-train[tensorboard]' (or: pip install tensorboard)",
            "wandb": "pip install 'loom-train[wandb]' (or: pip install wandb)"}


class MetricsSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One row of scalars (names like ``train/loss``) at optimizer step ``step`` (0-based)."""

    def close(self) -> None:
        """Flush and end; called once, after the last `log`."""


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row (`loom.launch.train` reports them) under
    backend names: ``train/<key>``, or ``eval/<key without 'eval_'>`` for a
    row with ``"split": "eval"``.  Non-numbers, ``step`` and ``split`` are
    left out."""
    split = row.get("split", "train")
    out = {}
    for key, value in row.items():
        if key in ("step", "split") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = key.removeprefix(f"{split}_")
        out[f"{split}/{name}"] = float(value)
    return out


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def wanted(job) -> dict[str, bool]:
    """Which backends a job's ``[job]`` section turns on (``tensorboard``:
    True, False, or None for 'when installed'; ``wandb``: a project name)."""
    tb = job.tensorboard if job.tensorboard is not None else _installed("tensorboard")
    return {"tensorboard": bool(tb), "wandb": bool(job.wandb)}


def check_backends(job) -> None:
    """ConfigError naming the ``pip install`` for each backend the job asks
    for whose package is missing.  Call before the run starts."""
    missing = [name for name, on in wanted(job).items() if on and not _installed(name)]
    if missing:
        raise ConfigError("; ".join(f"--{name} needs the {name} package: {_INSTALL[name]}" for name in missing))


class TensorBoardSink:
    """Scalars to TensorBoard event files in ``log_dir``."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Scalars to a Weights & Biases run.  ``mode``: "online", "offline",
    "disabled", or None (WANDB_MODE from the environment, else online)."""

    def __init__(self, project: str, run_dir: str, *, name: str | None = None, mode: str | None = None,
                 config: dict | None = None):
        import wandb
        self.run = wandb.init(project=project, dir=run_dir, name=name or os.path.basename(run_dir),
                              mode=mode, config=config or {})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(cfg, run_dir: str) -> list:
    """The sinks a job's config asks for, writing under ``run_dir``
    (ConfigError when a package is missing, before any is opened)."""
    check_backends(cfg.job)
    on, sinks = wanted(cfg.job), []
    if on["tensorboard"]:
        sinks.append(TensorBoardSink(os.path.join(run_dir, "tensorboard")))
    if on["wandb"]:
        mode = None if cfg.job.wandb_mode == "auto" else cfg.job.wandb_mode
        sinks.append(WandbSink(cfg.job.wandb, run_dir, name=cfg.job.name or None, mode=mode,
                               config=cfg.to_dict()))
    return sinks
