"""Restarting a job after a fault (``--max-restarts N``): the policy and its record.

The Ray driver runs a job in attempts (0, 1, ...).  An attempt ends on the
first failure `ray_driver` names (a worker process that died, a Ray actor
lost, a hang or lost rank from the fault monitor, an exception in a rank);
`Recovery.failed` then decides: restart (the driver starts new workers, which
resume from the newest committed checkpoint, or from step 0 without one), or
stop with the first attempt's error.  It stops early when two attempts in a
row fail alike (same kind, rank and step: a bug, not a machine), and always
once the budget is spent.

Each restart is one line of ``restarts.jsonl`` in the run directory (and the
run's summary): ``attempt`` (the new attempt's number), ``cause`` (``kind``,
``rank``, ``evidence``: the fault's evidence or the exception's one-line
text), ``failed_at_step`` (the step the failed attempt was running: its last
reported step + 1, or the monitor's step), ``resumed_step``, ``steps_lost``
(``failed_at_step - resumed_step``: steps computed again), ``recovery_s``
(seconds from the driver seeing the fault to the new attempt's first
reported step; None if it never got there), and on Ray ``placement``
(``failed``/``resumed``: the Ray node id of each rank in the failed and the
new attempt; the cause's ``node`` is its rank's), and ``reload`` (where the new
attempt's resume read the checkpoint: ``tier`` "memory", "peer", "storage" or
"mixed", the chunk ``bytes`` per tier summed over ranks, ``seconds``, each
rank's tier in ``ranks``; `loom.launch.memory_tier`).  A lost node is kind
``lost_node``: Ray places its workers again on a node with room (a spare).  Metrics rows carry ``attempt``
while restarts are possible, so the redone steps' rows can be told apart.

The Ray driver's elastic choices (`loom.launch.pool`, `loom.launch.elastic`)
add to a record: ``isolated`` (per rank the fault names: ``rank``,
``bundle``, ``node``, ``retired``, ``replaced_by``: ``spare``, ``same
bundle`` or ``shrunk``), ``layout`` (``from``/``to``: dp, sp, ep,
grad_accum, world) when it changed, and ``bundles`` (each new rank's
placement bundle).  Growing back (`Recovery.grew`) is a record of cause
kind ``grow``: no fault, no step lost, not counted against the budget.
"""
from __future__ import annotations

import logging
import os
import re
import time
import uuid
from dataclasses import dataclass

from loom.comms.elastic import ATTEMPT_ENV, JOB_TOKEN_ENV

from .cluster import LaunchError
from .config import JobConfig, max_restarts
from .recorder import RESTARTS_LOG, append_jsonl, read_jsonl
from .storage import apply_storage_options
from .topology import describe

log = logging.getLogger("loom.launch")
# errors of the job's setup, which a restart would meet again (a store another job owns, a bad config)
_NOT_FAULTS = re.compile(r"\b(CheckpointOwnershipError|StoreNotSharedError|ConfigError)\b")


@dataclass
class Failure:
    """Why one attempt ended."""

    attempt: int
    kind: str
    rank: int | None
    evidence: str
    step: int | None      # the step the attempt was running when it failed
    time: float           # time.time() when the driver saw it
    error: LaunchError

    def signature(self) -> tuple:
        return self.kind, self.rank, self.step


def _evidence(message: str) -> str:
    """The first cause of a driver's error message, without its preamble."""
    first = message.split("; then ")[0]
    first = re.sub(r"^stopped all \d+ workers after an? [\w ]+?: ", "", first)
    return " ".join(first.split())


class AttemptRecorder:
    """The driver's recorder during one attempt: adds ``attempt`` to each
    metrics row (``tag``), keeps the newest training step, and tells
    `Recovery` when the attempt's first step arrives; passes everything on."""

    def __init__(self, recorder, attempt: int, tag: bool, on_first_step=None, on_reload=None):
        self.recorder, self.attempt, self.tag = recorder, attempt, tag
        self.on_reload = on_reload
        self.run_dir = getattr(recorder, "run_dir", None)
        self.last_step: int | None = None
        self.on_first_step = on_first_step

    def step(self, metrics: dict) -> None:
        if self.tag:
            metrics = {**metrics, "attempt": self.attempt}
        if metrics.get("split", "train") != "eval":
            first = self.last_step is None
            self.last_step = max(metrics["step"], self.last_step if self.last_step is not None else -1)
            if first and self.on_first_step is not None:
                self.on_first_step(metrics["step"])
        if self.recorder is not None:
            self.recorder.step(metrics)

    def event(self, text: str) -> None:
        if self.recorder is not None:
            self.recorder.event(text)

    def reload(self, record: dict) -> None:
        """Where the attempt's resume read its checkpoint from (memory tiers
        or storage): the restart's record gets it as ``reload``."""
        if self.on_reload is not None:
            self.on_reload(record)


class Recovery:
    """The restart policy of one job (``cfg``) and its record (``recorder``:
    the driver's; its ``restart(record)``, when it has one, takes each record)."""

    def __init__(self, cfg: JobConfig, recorder=None):
        self.cfg, self.recorder = cfg, recorder
        self.budget = max_restarts(cfg)
        self.attempt = 0
        self.failures: list[Failure] = []
        self.records: list[dict] = []
        self._pending: dict | None = None   # the newest restart, until its attempt's first step
        self.nodes: dict[int, list[str]] = {}  # attempt -> the Ray node id of each rank (`placed`)
        self._resume = cfg.ckpt.resume
        self.token = uuid.uuid4().hex[:16]  # this job's id in its checkpoint store claims, every attempt
        self.holders: dict = {}  # node id -> the job's snapshot holder there (`loom.launch.memory_tier`)
        c = cfg.ckpt
        apply_storage_options(c)  # the driver reads the store too
        self._store = c.ckpt_url if c.ckpt_url and (c.ckpt_every > 0 or c.resume) else None
        # a store with older commits and no --resume: a restart resumes only from this job's commits
        self._baseline = self._newest() if self.budget and self._store and not c.resume else None

    # ---------------------------------------------------------------- per attempt

    def begin(self) -> AttemptRecorder:
        """The recorder for the next attempt."""
        return AttemptRecorder(self.recorder, self.attempt, tag=self.budget > 0, on_first_step=self._first_step,
                               on_reload=self._reloaded)

    def job_dict(self, cfg: JobConfig | None = None) -> dict:
        """The attempt's job config for the workers (``cfg``: the job at the
        attempt's layout; default the configured job): after a restart they
        resume (from step 0 when nothing is committed), taking over the
        store the stopped attempt's workers claimed."""
        d = (cfg or self.cfg).to_dict()
        if self.attempt > 0:
            d["ckpt"]["resume"] = self._resume
        return d

    def placed(self, nodes: list[str], record: dict | None = None) -> None:
        """The attempt's workers run on ``nodes`` (Ray node ids, hex, in rank
        order).  Said as an event when the job spans several nodes or after a
        restart, so a user sees where each attempt ran; with ``record``
        (`loom.launch.topology.summary`), also which groups are within a
        node, and the recorder's ``placed(record)`` (when it has one) keeps
        it for the run's summary."""
        self.nodes[self.attempt] = list(nodes)
        if record is not None and hasattr(self.recorder, "placed"):
            self.recorder.placed(record)
        if self._pending is not None and self._pending["attempt"] == self.attempt and "placement" in self._pending:
            self._pending["placement"]["resumed"] = list(nodes)
        if len(set(nodes)) > 1 or self.attempt > 0:
            where = ", ".join(f"rank {r} on node {n[:12]}" for r, n in enumerate(nodes))
            self._event(f"attempt {self.attempt}: {where}")
            if record is not None:
                self._event(describe(record))

    def env(self) -> dict:
        """The workers' environment: the attempt, and the job's id, with which
        a restarted attempt reclaims the checkpoint store from this job's own
        stopped workers (`loom.checkpoint.claim_store`'s takeover=<job>) and
        never from another job."""
        return {ATTEMPT_ENV: str(self.attempt), JOB_TOKEN_ENV: self.token}

    def failed(self, exc: LaunchError, tracker: AttemptRecorder, plan=None) -> None:
        """The attempt ended with ``exc``: prepare the next, or raise the
        LaunchError that ends the job (the first attempt's error).

        ``plan(failure)``, called once the job restarts, readies the next
        attempt's workers (isolation, layout; `loom.launch.ray_driver`) and
        returns (fields for the restart's record, text for its event line);
        a LaunchError it raises (e.g. too few healthy workers left) ends the
        job, naming the failure it followed."""
        now = time.time()
        reached = tracker.last_step + 1 if tracker.last_step is not None else None
        if exc.step is not None:
            reached = max(exc.step, reached or 0)
        failure = Failure(self.attempt, exc.kind or "failure", exc.rank, _evidence(str(exc)), reached, now, exc)
        self._flush_pending()
        self.failures.append(failure)
        if self.budget == 0:
            raise exc
        not_a_fault = _NOT_FAULTS.search(str(exc))
        if not_a_fault:  # the job's setup, not a machine: another attempt would meet it again
            self._event(f"loom: not restarting after a {not_a_fault.group(1)}: the job's configuration or its "
                        f"checkpoint store is wrong, not a machine")
            raise exc
        self._give_up(failure)
        extra, said = {}, ""
        if plan is not None:
            try:
                extra, said = plan(failure)
            except LaunchError as stop:
                self._event(f"loom: cannot restart: {stop}")
                raise LaunchError(f"{exc} (could not restart: {stop})", rank=exc.rank, kind=exc.kind,
                                  step=exc.step, remote_traceback=exc.remote_traceback) from stop
        resumed = self._resume_step()
        self.attempt += 1
        failed_nodes = self.nodes.get(failure.attempt)
        cause = {"kind": failure.kind, "rank": failure.rank, "evidence": failure.evidence}
        if failed_nodes and failure.rank is not None and failure.rank < len(failed_nodes):
            cause["node"] = failed_nodes[failure.rank]
        record = {"attempt": self.attempt, "cause": cause,
                  "failed_at_step": reached, "resumed_step": resumed,
                  "steps_lost": reached - resumed if reached is not None and resumed is not None else None,
                  "fault_time": now, "recovery_s": None}
        if failed_nodes:  # where each rank ran: the failed attempt's nodes, then the new attempt's (`placed`)
            record["placement"] = {"failed": failed_nodes, "resumed": None}
        record.update(extra)
        at = f", at step {reached}" if reached is not None else ""
        where = f"step {resumed}" if resumed is not None else "the newest checkpoint"
        kind = failure.kind.replace("_", " ")
        self._event(f"restart {len(self.failures)}/{self.budget} after {'an' if kind[0] in 'aeiou' else 'a'} "
                    f"{kind}: {failure.evidence}{at}; {said + '; ' if said else ''}resuming from {where}")
        self._pending = record

    def grew(self, stopped_at: int, extra: dict, said: str) -> None:
        """The attempt stopped on purpose at the committed checkpoint of step
        ``stopped_at`` so that the job grows (more workers can be had again):
        the next attempt resumes there.  Recorded as a restart of kind
        ``grow`` (no fault, no steps lost, not counted against --max-restarts);
        ``extra``: fields for its record (the layouts), ``said``: its event's text."""
        self._flush_pending()
        now = time.time()
        self.attempt += 1
        self._resume = True
        record = {"attempt": self.attempt, "cause": {"kind": "grow", "rank": None, "evidence": said},
                  "failed_at_step": stopped_at, "resumed_step": stopped_at, "steps_lost": 0,
                  "fault_time": now, "recovery_s": None, **extra}
        failed_nodes = self.nodes.get(self.attempt - 1)
        if failed_nodes:
            record["placement"] = {"failed": failed_nodes, "resumed": None}
        self._event(f"{said}: stopped at the checkpoint of step {stopped_at}; resuming from step {stopped_at}")
        self._pending = record

    def finish(self) -> list[dict]:
        """The job ended: every restart's record."""
        self._flush_pending()
        return self.records

    # ---------------------------------------------------------------- inside

    def _give_up(self, failure: Failure) -> None:
        first = self.failures[0]
        why = None
        if len(self.failures) >= 2 and self.failures[-2].signature() == failure.signature() \
                and failure.step is not None:
            why = (f"the same {failure.kind.replace('_', ' ')} of rank {failure.rank} at step {failure.step} in "
                   f"attempts {failure.attempt - 1} and {failure.attempt}: a fault that repeats where it "
                   f"happened is a bug, not a machine; not restarting")
        elif len(self.failures) > self.budget:
            why = f"gave up after {self.budget} restart{'s' * (self.budget != 1)}"
            if failure is not first:
                why += f"; the last attempt's: {failure.evidence}"
        if why is None:
            return
        self._event(f"loom: {why}")
        err = LaunchError(f"{first.error} ({why})", rank=first.rank, kind=first.kind, step=first.step,
                          remote_traceback=first.error.remote_traceback)
        raise err from (first.error.__cause__ or first.error)

    def _newest(self) -> int | None:
        """The store's newest committed step, as the workers' resume will
        choose it; None if there is none or it cannot be read here."""
        from loom.checkpoint import CheckpointStore
        try:
            return CheckpointStore(self._store).latest()
        except Exception as exc:  # noqa: BLE001 - the workers may reach a store the driver cannot
            log.info("cannot read the checkpoints at %s from the driver: %s: %s", self._store,
                     type(exc).__name__, exc)
            return None

    def _resume_step(self) -> int | None:
        """The step the next attempt starts at; decides whether it resumes."""
        if self._store is None:
            self._resume = False
            return 0
        newest = self._newest()
        if not self.cfg.ckpt.resume and newest is not None and newest == self._baseline:
            newest = None  # nothing committed by this job yet: not another job's checkpoint
        self._resume = self.cfg.ckpt.resume or newest is not None
        return newest if newest is not None else 0

    def _first_step(self, step: int) -> None:
        if self._pending is not None and self._pending["attempt"] == self.attempt:
            self._pending["recovery_s"] = round(time.time() - self._pending["fault_time"], 3)
            if self._pending["resumed_step"] is None:  # the driver could not read the store
                self._pending["resumed_step"] = step
            self._flush_pending()

    def _reloaded(self, record: dict) -> None:
        if self._pending is not None and self._pending["attempt"] == self.attempt:
            self._pending["reload"] = record

    def _flush_pending(self) -> None:
        if self._pending is None:
            return
        record, self._pending = self._pending, None
        record["fault_time"] = _iso(record["fault_time"])
        self.records.append(record)
        note_restart(self.recorder, record)

    def _event(self, text: str) -> None:
        if self.recorder is not None:
            self.recorder.event(text)
        else:
            log.warning(text)


# ---------------------------------------------------------------- the record, shared with torchrun

def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def note_restart(recorder, record: dict) -> None:
    """Write one restart ``record``: the recorder's ``restart`` (a line of
    restarts.jsonl and the summary's ``restarts``) when it has one, else a
    line of restarts.jsonl in its ``run_dir`` (nothing without either)."""
    note = getattr(recorder, "restart", None)
    if note is not None:
        note(record)
    elif getattr(recorder, "run_dir", None):
        append_jsonl(os.path.join(recorder.run_dir, RESTARTS_LOG), record)


TORCHRUN_CAUSE = {"kind": "worker_exited", "rank": None,
                  "evidence": "torchrun restarted every worker after one exited (it does not tell the new "
                              "workers which rank failed or why: its agent's log has the exit code)"}


def previous_attempts(run_dir: str, attempt: int) -> tuple[int | None, float | None]:
    """What the run directory's metrics.jsonl tells of the attempts before
    ``attempt``: the newest training step they reported (None: none), and
    the time (``time.time()`` seconds) of their last row (the file's
    modification time; None without the file).  Call it before the new
    attempt writes a row."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        last_time = os.path.getmtime(path)
    except OSError:
        return None, None
    steps = [row["step"] for row in read_jsonl(path)  # a torn last row of a killed writer is skipped
             if row.get("split", "train") != "eval" and row.get("attempt", 0) < attempt and "step" in row]
    return max(steps, default=None), last_time


def resume_step(cfg: JobConfig) -> int | None:
    """The step a job that starts now resumes at: the newest committed
    checkpoint with ``--resume`` (0 when there is none), 0 without; None when
    the store cannot be read here."""
    if not (cfg.ckpt.resume and cfg.ckpt.ckpt_url):
        return 0
    from loom.checkpoint import CheckpointStore
    try:
        apply_storage_options(cfg.ckpt)
        newest = CheckpointStore(cfg.ckpt.ckpt_url).latest()
    except Exception as exc:  # noqa: BLE001 - the record then takes the first reported step
        log.info("cannot read the checkpoints at %s: %s: %s", cfg.ckpt.ckpt_url, type(exc).__name__, exc)
        return None
    return 0 if newest is None else newest


def torchrun_attempt(recorder, attempt: int, max_restarts: int, resumed: int | None = None) -> AttemptRecorder:
    """Rank 0's recorder for ``attempt`` of a torchrun job (``recorder``: the
    `RunRecorder` of the job's run directory, reopened for attempt > 0).
    Rows carry ``attempt`` when restarts are possible (``max_restarts`` > 0,
    torchrun's ``TORCHELASTIC_MAX_RESTARTS``), as under Ray.  In attempt
    k > 0 the first reported step writes the restart's record in the Ray
    side's format (`note_restart`): ``cause`` is `TORCHRUN_CAUSE` (all that
    torchrun tells), ``failed_at_step`` the failed attempts' newest reported
    step + 1 (at least the resumed step), ``resumed_step`` the step this
    attempt starts at (``resumed``, e.g. `resume_step`; None: its first reported step),
    ``fault_time`` the time of the previous attempt's last row and
    ``recovery_s`` the seconds from that row to this attempt's first reported step."""
    tag = max_restarts > 0 or attempt > 0
    if attempt == 0:
        return AttemptRecorder(recorder, 0, tag)
    last_step, last_time = previous_attempts(recorder.run_dir, attempt)

    def first_step(step: int) -> None:
        step = step if resumed is None else resumed
        failed = max(last_step + 1, step) if last_step is not None else None
        note_restart(recorder, {
            "attempt": attempt, "cause": dict(TORCHRUN_CAUSE), "failed_at_step": failed, "resumed_step": step,
            "steps_lost": failed - step if failed is not None else None, "fault_time": _iso(last_time),
            "recovery_s": round(time.time() - last_time, 3) if last_time is not None else None})
        at = f" at step {failed}" if failed is not None else ""
        recorder.event(f"restart {attempt}/{max_restarts} (torchrun) after a worker exited{at}; "
                       f"resumed from step {step}")

    return AttemptRecorder(recorder, attempt, tag, on_first_step=first_step)
