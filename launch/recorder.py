"""Where a run's progress goes: a progress bar, metrics.jsonl, a summary
table, and the logging backends (TensorBoard, W&B: `loom.launch.logging_backends`).

The `RunRecorder` lives wherever the user is watching (the Ray driver, or
rank 0 under torchrun); rank 0 of the job reports to it directly or through a
queue (`QueueReporter`).  A metrics row is a dict with ``step``; training
rows carry ``loss``, ``lr``, ``grad_norm``, ``step_time_s``, ``tokens_per_s``,
``model_tflops_per_device``, ``mfu`` (with ``--peak-tflops``) and
``peak_cuda_mem_bytes`` or ``peak_rss_bytes``; evaluation rows carry
``"split": "eval"`` and ``eval_loss``, ``eval_ppl``, ``eval_tokens``,
``eval_time_s``.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

from .logging_backends import scalars

RESTARTS_LOG = "restarts.jsonl"  # one line per restart of the job (loom.launch.recovery)

log = logging.getLogger("loom.launch")


def make_run_dir(runs_dir: str, name: str) -> str:
    """A fresh directory for the run; a taken name gets a numeric suffix.
    ConfigError (naming ``--runs-dir``/``--name``) when it cannot be created."""
    from .config import ConfigError
    base = name or time.strftime("run-%Y%m%d-%H%M%S")
    path, n = os.path.join(runs_dir, base), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(runs_dir, f"{base}-{n}")
    try:
        os.makedirs(path)
        probe = os.path.join(path, ".writable")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"cannot create the run directory {path!r} (--runs-dir={runs_dir!r}, "
                          f"--name={name!r}): {exc.strerror or exc}; pick a --runs-dir you can write") from None
    return path


def open_run(cfg, total_steps: int | None, progress: bool, files: dict, *, runs_dir: str | None = None,
             name: str | None = None) -> "RunRecorder":
    """Start a run's record as `loom train`, the torchrun worker and
    `loom.launch.run` do: check the logging backends' packages (ConfigError
    before anything is created), make a fresh run directory
    (`make_run_dir`; ``runs_dir``/``name`` default to ``cfg.job``'s), write
    ``files`` (file name -> text) into it, and return a `RunRecorder` over it
    with the job's logging sinks."""
    from .logging_backends import check_backends, open_sinks
    check_backends(cfg.job)
    run_dir = make_run_dir(cfg.job.runs_dir if runs_dir is None else runs_dir,
                           cfg.job.name if name is None else name)
    for file_name, text in files.items():
        with open(os.path.join(run_dir, file_name), "w") as fh:
            fh.write(text)
    return RunRecorder(run_dir, total_steps, progress, sinks=open_sinks(cfg, run_dir))


RUN_DIR_KEY = "loom/run_dir"   # in torchrun's agent store: the job's run directory (set by attempt 0)
JOB_MARK = ".torchrun_job"      # in a run directory: the torchrun job (TORCHELASTIC_RUN_ID) that wrote it


def find_job_run_dir(runs_dir: str, store=None, job_id: str | None = None) -> str | None:
    """The run directory an earlier attempt of this torchrun job opened, or None.

    The rule: (1) the path attempt 0 put under `RUN_DIR_KEY` in ``store``
    (torchrun's agent store: one per job, kept across its attempts, seen by no
    other job); (2) without that, the newest directory in ``runs_dir`` whose
    `JOB_MARK` file holds ``job_id`` (see `loom.comms.elastic.torchrun_job_id`); (3) else None."""
    if store is not None:
        try:
            if store.check([RUN_DIR_KEY]):
                return store.get(RUN_DIR_KEY).decode()
        except Exception as exc:  # noqa: BLE001 - a store that cannot answer: try the marks
            log.warning("cannot read the run directory from torchrun's store: %s: %s", type(exc).__name__, exc)
    if job_id is None or not os.path.isdir(runs_dir):
        return None
    found = []
    for entry in os.scandir(runs_dir):
        try:
            with open(os.path.join(entry.path, JOB_MARK)) as fh:
                if fh.read().strip() == job_id:
                    found.append((entry.stat().st_mtime, entry.path))
        except OSError:
            continue
    return max(found)[1] if found else None


def open_torchrun_run(cfg, total_steps: int | None, progress: bool, files: dict, *, attempt: int,
                      store=None, job_id: str | None = None) -> "RunRecorder":
    """Rank 0's `open_run` under torchrun: attempt 0 opens a fresh run
    directory and names it for the later attempts (`RUN_DIR_KEY` in
    ``store``, `JOB_MARK` holding ``job_id``); attempt k > 0 reopens that
    directory (`find_job_run_dir`) and appends to its metrics.jsonl and
    restarts.jsonl.  It never appends to another job's directory: when the
    directory is not found, or its config.toml differs from ``files``', it
    opens a fresh one and logs why (logger ``loom.launch``)."""
    previous = find_job_run_dir(cfg.job.runs_dir, store, job_id) if attempt > 0 else None
    if previous is not None:
        why = _cannot_append(previous, files)
        if why is None:
            from .logging_backends import check_backends, open_sinks
            check_backends(cfg.job)
            log.info("attempt %d appends to the run directory %s", attempt, previous)
            _end_line(os.path.join(previous, "metrics.jsonl"))
            return RunRecorder(previous, total_steps, progress, sinks=open_sinks(cfg, previous))
        log.warning("attempt %d: not appending to %s: %s; writing a new run directory", attempt, previous, why)
    elif attempt > 0:
        log.warning("attempt %d: cannot find the run directory of this job's earlier attempts (no agent store "
                    "that names it, and TORCHELASTIC_RUN_ID=%r matches none in %s); writing a new one",
                    attempt, job_id or "none", cfg.job.runs_dir)
    recorder = open_run(cfg, total_steps, progress, files)
    if job_id is not None:
        with open(os.path.join(recorder.run_dir, JOB_MARK), "w") as fh:
            fh.write(job_id + "\n")
    if store is not None:
        try:
            store.set(RUN_DIR_KEY, os.path.abspath(recorder.run_dir))
        except Exception as exc:  # noqa: BLE001 - later attempts fall back to the mark
            log.warning("cannot name the run directory in torchrun's store: %s: %s", type(exc).__name__, exc)
    return recorder


def _end_line(path: str) -> None:
    """End a JSON-lines file a killed writer left mid-line, so the next row starts on its own line."""
    try:
        with open(path, "rb+") as fh:
            if fh.seek(0, os.SEEK_END) and (fh.seek(-1, os.SEEK_END), fh.read(1))[1] != b"\n":
                fh.write(b"\n")
    except FileNotFoundError:
        pass


def _cannot_append(run_dir: str, files: dict) -> str | None:
    """Why attempt k may not append to ``run_dir`` (None: it may)."""
    if not os.path.isdir(run_dir):
        return "it does not exist on this node"
    for file_name, text in files.items():
        try:
            with open(os.path.join(run_dir, file_name)) as fh:
                if fh.read() != text:
                    return f"its {file_name} differs from this job's"
        except OSError as exc:
            return f"its {file_name} cannot be read ({exc.strerror or exc})"
    return None


def _human(x: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.1f}{unit}"
        x /= 1000
    return f"{x:.1f}T"


class ProgressBar:
    """A one-line bar on a terminal; a line per ~10% of the run elsewhere."""

    def __init__(self, total: int | None, stream=None, enabled: bool = True):
        self.total, self.stream, self.enabled = total, stream or sys.stderr, enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = max(1, (total or 100) // 10)  # unknown length: a line every 10 steps
        self.start: float | None = None  # the first step's report starts the clock

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        done = step + 1
        now = time.monotonic()
        if self.start is None:
            self.start, self.first = now, done
        rate = (done - self.first) / (now - self.start) if now > self.start else 0.0
        if self.total is None:  # a run of unknown length: no bar, no ETA
            line = f"step {done} {text}"
        else:
            eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 else "?"
            filled = int(30 * done / self.total)
            line = f"[{'#' * filled}{'.' * (30 - filled)}] step {done}/{self.total} {text} eta {eta}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == self.total else ""))
        elif done % self.every == 0 or done == self.total or done == 1:
            self.stream.write(line + "\n")
        self.stream.flush()


def progress_text(metrics: dict) -> str:
    """The progress line's words for a training metrics row (what it has of
    loss, lr, gradient norm, tokens/s, mfu, peak memory)."""
    parts = []
    for key, fmt in (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3g}")):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(fmt.format(metrics[key]))
    if isinstance(metrics.get("tokens_per_s"), (int, float)):
        parts.append(f"tok/s {_human(metrics['tokens_per_s'])}")
    if isinstance(metrics.get("mfu"), (int, float)):
        parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
    for key in ("peak_cuda_mem_bytes", "peak_rss_bytes"):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(f"mem {metrics[key] / 2**30:.2f}G")
    return " ".join(parts)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """For the CLI: show the ``loom`` loggers' records on stderr, one
    message a line (library code logs; only the CLI prints).  Idempotent."""
    logger = logging.getLogger("loom")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


class RunRecorder:
    """Writes metrics.jsonl and summary.json into the run directory, shows
    progress, and passes every metrics row to ``sinks`` (`MetricsSink`s,
    e.g. from `loom.launch.logging_backends.open_sinks`; closed by `finish`).
    A sink that raises is reported once (logger ``loom.launch``) and dropped:
    a logging backend never stops the training."""

    def __init__(self, run_dir: str, total_steps: int, progress: bool = True, stream=None, sinks=None):
        self.run_dir = run_dir
        self.stream = stream or sys.stdout
        self.metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        self.bar = ProgressBar(total_steps, enabled=progress)
        self.sinks = list(sinks or [])
        self.placement: dict | None = None  # `placed`
        self.restarts: list[dict] = read_jsonl(os.path.join(run_dir, RESTARTS_LOG))  # `restart`; a
        # reopened directory (a later torchrun attempt) keeps the earlier attempts' records

    def step(self, metrics: dict) -> None:
        """One metrics row (training, or evaluation with ``"split": "eval"``)."""
        self.metrics.write(json.dumps(metrics) + "\n")
        self._to_sinks(metrics)
        if metrics.get("split", "train") == "eval":
            text = f"eval after step {metrics['step'] + 1}: " + " ".join(
                f"{k.removeprefix('eval_')} {v:.4g}" for k, v in metrics.items()
                if k in ("eval_loss", "eval_ppl", "eval_bpb") and isinstance(v, (int, float)))
            self.event(text)
            return
        self.bar.update(metrics["step"], progress_text(metrics))

    def _to_sinks(self, metrics: dict) -> None:
        values = scalars(metrics)
        for sink in list(self.sinks):
            try:
                sink.log(int(metrics["step"]), values)
            except Exception as exc:  # noqa: BLE001 - a backend must not end the run
                log.warning("logging backend %s failed and is dropped: %s: %s", type(sink).__name__,
                            type(exc).__name__, exc)
                self.sinks.remove(sink)

    def event(self, text: str) -> None:
        """A line of news during the run (a checkpoint, a fault)."""
        self.stream.write(text + "\n")
        self.stream.flush()

    def restart(self, record: dict) -> None:
        """One restart of the job (`loom.launch.recovery`): a line of
        restarts.jsonl, and the summary's ``restarts``."""
        self.restarts.append(record)
        append_jsonl(os.path.join(self.run_dir, RESTARTS_LOG), record)

    def placed(self, record: dict) -> None:
        """Where the ranks of the newest attempt run, on Ray
        (`loom.launch.topology.summary`): the summary's ``placement``."""
        self.placement = record

    def finish(self, summary: dict) -> None:
        if self.placement is not None:
            summary = {**summary, "placement": self.placement}
        if self.restarts:
            summary = {**summary, "restarts": self.restarts,
                       "extra": {**summary.get("extra", {}), "restarts": len(self.restarts)}}
        self.metrics.close()
        self.close_sinks()
        with open(os.path.join(self.run_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        self.stream.write(format_summary(summary) + f"\nrun directory: {self.run_dir}\n")
        self.stream.flush()


    def close_sinks(self) -> None:
        """Close every logging backend (also when the run failed)."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("logging backend %s failed to close: %s: %s", type(sink).__name__,
                            type(exc).__name__, exc)


def append_jsonl(path: str, row: dict) -> None:
    """One row at the end of a JSON-lines file."""
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file ([] if there is none); a torn last line is skipped."""
    rows = []
    try:
        with open(path) as fh:
            for line in fh:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return rows


def format_summary(summary: dict) -> str:
    rows = [(label, fmt(summary[key])) for key, label, fmt in (  # what the summary has of these
        ("steps", "steps", str), ("first_loss", "first loss", "{:.4f}".format),
        ("final_loss", "final loss", "{:.4f}".format), ("tokens_per_s", "tokens/s", _human),
        ("wall_time_s", "wall time", "{:.1f} s".format)) if key in summary]
    rows += [(k.replace("_", " "), str(v)) for k, v in summary.get("extra", {}).items()]
    width = max(len(k) for k, _ in rows)
    inner = width + 3 + max(len(v) for _, v in rows)
    lines = ["+" + "-" * (inner + 2) + "+"]
    lines += [f"| {k:<{width}}   {v:>{inner - width - 3}} |" for k, v in rows]
    return "\n".join(lines + [lines[0]])


class QueueReporter:
    """Rank 0's side under Ray: forwards events to the driver's RunRecorder
    through a Ray queue.  A message is sent without waiting for the queue
    to take it (a round trip per step would slow rank 0, and every rank
    with it); the send before is waited for first, so messages keep their
    order, and that one is long done by then.  `flush` waits for the last."""

    def __init__(self, queue):
        self.queue = queue
        self._last = None  # the reference of the newest message in flight

    def _send(self, item) -> None:
        import ray
        if self._last is not None:
            ray.get(self._last)
        self._last = self.queue.actor.put_nowait.remote(item)  # an unbounded queue: never full

    def step(self, metrics: dict) -> None:
        self._send(("step", metrics))

    def event(self, text: str) -> None:
        self._send(("event", text))

    def reload(self, record: dict) -> None:
        """Where a resume's bytes came from (`loom.launch.checkpointing`), for the restart's record."""
        self._send(("reload", record))

    def flush(self) -> None:
        """Wait until every message sent has reached the queue."""
        import ray
        if self._last is not None:
            ray.get(self._last)
            self._last = None

    def finish(self, summary: dict) -> None:
        self.flush()  # the driver finishes its recorder with the summary the worker returns
