"""Your own training loop on loom's workers: `run` and `report`.

In the style of Ray Train's ``TorchTrainer(train_loop_per_worker)``::

    def train_fn(config):                 # runs on every rank
        ...                               # torch.distributed is initialised
        loom.launch.report({"loss": loss})

    result = loom.launch.run(train_fn, config={"lr": 1e-3}, workers=2)

`run` takes the same path as ``loom train`` (`ray_driver.launch_ray`): the
job's own local Ray instance (or a cluster at ``address``), one actor per
rank with the torchrun environment contract, the default process group
(gloo on CPU, NCCL on GPU; destroyed after), the fault monitor over the
loop's `loom.comms` collectives, progress, and a run directory
``runs/<name>/`` (``config.json``, ``metrics.jsonl``, ``summary.json``, and the
monitor's ``faults.jsonl``/``waits.jsonl``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import time
from dataclasses import dataclass, field

from loom import comms

from .config import SECTIONS, ConfigError, build_config, parse_env, validate_launch

__all__ = ["Result", "device", "report", "run"]

_LAUNCH_SECTIONS = ("job", "faults")  # the options a user loop takes; the rest belong to loom's own loop


@dataclass
class Result:
    """What `run` returns.

    returns: what ``train_fn`` returned on each rank, in rank order (each
        must be picklable; ``None`` for a loop that returns nothing).
    metrics: the last metrics row rank 0 reported (``{}`` when none); every
        row has ``step``.
    metrics_history: every row rank 0 reported, in order (as in metrics.jsonl).
    run_dir: the run directory.
    """
    returns: list
    metrics: dict = field(default_factory=dict)
    metrics_history: list = field(default_factory=list)
    run_dir: str = ""

    @property
    def value(self):
        """Rank 0's return value."""
        return self.returns[0]


# ------------------------------------------------------------ inside a rank

@dataclass
class _Session:
    reporter: object
    at_step: object
    device: str
    step: int = 0


_session: _Session | None = None  # the one per-process state of the API: the loop now running here


@contextlib.contextmanager
def rank_session(reporter, at_step, device: str = "auto"):
    """For `worker.run_rank`: make `report` work while a ``train_fn`` runs.
    ``reporter`` (rank 0's, else None) gets the metrics rows; ``at_step(step)``
    (fault injection) runs at the start and after every report."""
    global _session
    _session = _Session(reporter, at_step, device)
    try:
        at_step(0)
        yield _session
    finally:
        _session = None
        comms.set_step(None)


def _scalar(key, value):
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Number):
        return value if isinstance(value, (int, float)) else float(value)
    item = getattr(value, "item", None)  # a one-element tensor or numpy scalar
    if item is not None and getattr(value, "numel", lambda: getattr(value, "size", 1))() == 1:
        return item()
    raise TypeError(f"report: metric {key!r} is a {type(value).__name__}; metrics are numbers, strings, "
                    f"booleans or one-element tensors")


def report(metrics: dict) -> None:
    """Report one row of metrics from inside a ``train_fn`` that `run` runs;
    call it once per step on every rank.

    On rank 0 the row goes to the driver: the progress bar (``loss``,
    ``tokens_per_s``, ... when present), ``metrics.jsonl`` and the recorder's
    logging backends; `run`'s `Result` keeps them.  On every other rank the
    row is not sent anywhere (compute a global value with `loom.comms`
    first if you want one); there, as on rank 0, the call marks the end of a
    step for the fault monitor (straggler detection per step; hang
    detection after the warm-up steps) and fault injection.

    ``metrics``: a dict of numbers, strings, booleans or one-element tensors
    (turned into Python numbers).  ``step`` (int) is added when missing: the
    number of earlier reports (or one past the last ``step`` given).  Raises
    RuntimeError outside `run`, TypeError for other values, ValueError for
    a negative ``step``."""
    s = _session
    if s is None:
        raise RuntimeError("loom.launch.report() works inside a train_fn that loom.launch.run runs")
    if not isinstance(metrics, dict):
        raise TypeError(f"report: metrics must be a dict, not {type(metrics).__name__}")
    row = {"step": s.step, **{str(k): _scalar(k, v) for k, v in metrics.items()}}
    if not isinstance(row["step"], int) or isinstance(row["step"], bool):
        raise TypeError(f"report: step must be an int, not {row['step']!r}")
    if row["step"] < 0:
        raise ValueError(f"report: step={row['step']} must be >= 0")
    if s.reporter is not None:
        s.reporter.step(row)
    s.step = row["step"] + 1
    comms.set_step(s.step)
    s.at_step(s.step)


def device():
    """This rank's `torch.device` inside a ``train_fn``: ``cuda:LOCAL_RANK``
    when the job runs on GPUs, else ``cpu``.  RuntimeError outside `run`."""
    from .train import resolve_device
    if _session is None:
        raise RuntimeError("loom.launch.device() works inside a train_fn that loom.launch.run runs")
    return resolve_device(_session.device)


# ------------------------------------------------------------ on the driver

class _Collect:
    """The driver's recorder for `run`: keeps every row, passes everything on."""

    def __init__(self, recorder):
        self.recorder, self.run_dir, self.history = recorder, recorder.run_dir, []

    def step(self, metrics: dict) -> None:
        self.history.append(metrics)
        self.recorder.step(metrics)

    def event(self, text: str) -> None:
        self.recorder.event(text)

    def placed(self, record: dict) -> None:
        self.recorder.placed(record)


def _job_config(workers: int, options: dict):
    launch_options = {f.name for s in _LAUNCH_SECTIONS for f in dataclasses.fields(SECTIONS[s])}
    for key in options:
        if key.replace("-", "_") not in launch_options:
            owner = next((s for s, f in SECTIONS.items() if key.replace("-", "_") in
                          {x.name for x in dataclasses.fields(f)}), None)
            if owner:
                raise ConfigError(f"option {key!r} is a setting of loom's own training loop ([{owner}]); "
                                  f"pass your loop's settings in config=")
    cfg = build_config(overrides={**options, "dp": workers, "sp": 1, "ep": 1})
    return validate_launch(cfg, workers)


def _env(env) -> dict[str, str]:
    if env is None:
        return {}
    if isinstance(env, dict):
        bad = [k for k, v in env.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"env: names and values must be strings (got {bad})")
        return dict(env)
    if isinstance(env, str):
        return parse_env(env)
    return parse_env(",".join(env))


def _check_picklable(what: str, obj) -> None:
    """TypeError before anything starts when ``obj`` cannot travel to the
    workers (Ray sends it with cloudpickle, as here)."""
    from ray import cloudpickle
    try:
        cloudpickle.dumps(obj)
    except Exception as exc:  # noqa: BLE001 - pickling raises many kinds
        raise TypeError(f"{what} must be picklable (cloudpickle sends it to every rank), but: "
                        f"{type(exc).__name__}: {exc}") from None


def run(train_fn, config=None, *, workers: int = 2, address: str | None = None, device: str = "auto",
        cpus_per_worker: float = 1.0, threads_per_worker: int = 1, env=None, runtime_env: dict | None = None,
        name: str | None = None, runs_dir: str = "runs", steps: int | None = None, progress: bool = True,
        options: dict | None = None) -> Result:
    """Run ``train_fn`` on ``workers`` ranks and return a `Result`.

    train_fn: called on every rank as ``train_fn(config)`` (or ``train_fn()``
        when it takes no argument) with ``torch.distributed`` initialised and
        RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
        MASTER_PORT set; it may call `report` and `device`.  Defined in the
        ``__main__`` script it is sent by value; defined in a module, that
        module must be importable on the workers (on a cluster: ship it with
        ``runtime_env={"working_dir": ...}``).
    config: any picklable object, passed to every rank as is (Ray Train's
        ``train_loop_config``); written to ``config.json`` (``repr`` for what
        JSON cannot hold).
    workers: ranks (Ray actors), each with ``cpus_per_worker`` CPUs (and one
        GPU when ``device`` is "cuda", or "auto" and the cluster has a GPU per
        worker) and ``threads_per_worker`` torch threads.
    address: None for the job's own local Ray instance (``RAY_ADDRESS`` is
        ignored); "host:port", "ray://host:10001" or "auto" to join a cluster
        (see `loom.launch.cluster`).  When Ray is already initialised in this
        process, that connection is used (``address``/``runtime_env`` must be None).
    env: environment variables for every rank: a dict, or names (a list, or
        one comma-separated string) whose values are copied from this process.
        Values are never written to the run directory.
    runtime_env: a Ray runtime_env for the workers (pip, working_dir, ...);
        on a cluster loom adds itself as a ``py_modules`` package.
    name, runs_dir: the run directory ``runs_dir/name`` (default name: a
        timestamp; a taken name gets a suffix).
    steps: how many reports rank 0 will make, for the progress bar's length
        and ETA (None: a bar of unknown length); ``progress=False`` hides it.
    options: any other ``loom train`` option of the ``[job]`` and ``[faults]``
        sections by name, e.g. ``{"pg_timeout": 60, "hang_floor_s": 5,
        "inject": "hang:rank=1,step=8", "monitor": False, "wandb": "proj"}``
        (logging backends: TensorBoard on when installed, W&B with ``wandb``).

    Returns a `Result` (every rank's return value, rank 0's reported
    metrics, the run directory).  Raises `LaunchError` when a rank fails
    (the message names the rank and its exception, ``.rank`` is that rank
    and ``__cause__`` its exception), when the fault monitor stops the job
    (a hang or a lost rank, named), or when the job cannot start (a cluster
    too small for it fails at once); ConfigError for bad options, TypeError
    for a ``train_fn`` that is not callable with one argument or none, or a
    ``train_fn`` or ``config`` that cannot be pickled.
    """
    from .ray_driver import launch_ray
    from .recorder import open_run
    from .worker import takes_config
    if not callable(train_fn):
        raise TypeError(f"train_fn must be callable, not {type(train_fn).__name__}")
    takes_config(train_fn)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers={workers!r} must be an int >= 1")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps={steps!r} must be None or an int >= 1")
    _check_picklable("train_fn", train_fn)
    _check_picklable("config", config)
    cfg = _job_config(workers, {**(options or {}), "address": address or "", "device": device,
                                "cpus_per_worker": cpus_per_worker, "threads_per_worker": threads_per_worker,
                                "name": name or "", "runs_dir": runs_dir, "progress": progress})
    env_vars = {**parse_env(cfg.job.env), **_env(env)}
    job = {s: dataclasses.asdict(getattr(cfg, s)) for s in _LAUNCH_SECTIONS}
    job["job"]["env"] = sorted(env_vars)  # names only: values may be credentials
    record = json.dumps({"train_fn": f"{getattr(train_fn, '__module__', '?')}:{getattr(train_fn, '__qualname__', '?')}",
                         "workers": workers, "config": config, "launch": job}, indent=2, default=repr)
    recorder = open_run(cfg, steps, progress, {"config.json": record}, runs_dir=runs_dir, name=name or "")
    run_dir = recorder.run_dir
    collect = _Collect(recorder)
    t0 = time.monotonic()
    try:
        returns = launch_ray(cfg, collect, train_fn=train_fn, config=config, runtime_env=runtime_env,
                             env=env_vars)
    except BaseException:
        recorder.metrics.close()
        recorder.close_sinks()
        raise
    last = collect.history[-1] if collect.history else {}
    extra = {"workers": workers, **{f"last {k}": (f"{v:.6g}" if isinstance(v, float) else v)
                                    for k, v in last.items() if k not in ("step", "loss")}}
    summary = {"steps": len(collect.history), "wall_time_s": time.monotonic() - t0, "extra": extra}
    if isinstance(last.get("loss"), (int, float)) and math.isfinite(last["loss"]):
        summary["final_loss"] = last["loss"]
    recorder.finish(summary)
    return Result(returns, last, collect.history, run_dir)
