"""Checkpoints of the training loop: model, optimizer, scheduler, data position, RNG.

The data is a pure function of (seed, sample number): a real corpus's
position (`loom.data.SamplePosition`: the sample number the next step starts
at, its epoch and place in it) is saved as ``data``, so a resume continues
exactly there (even with another batch size); the synthetic task's position
is the step.  RNG states are per rank (`PerRank`).  A resumed run therefore
repeats the uninterrupted run's losses exactly.  `save` is the one place a
checkpoint is taken: asynchronously (lazy, `AsyncCheckpointer`; with
``--ckpt-local`` `MultiLevel(background=True)`) or synchronously, per
``--ckpt-mode``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from loom import checkpoint, comms
from loom.comms.elastic import job_token

from loom.checkpoint.memory import TIERS, tier_of

from .config import ConfigError
from .hf_model import hf_config_text
from .memory_tier import RaySnapshots
from .schedule import LRSchedule, restore
from .storage import apply_storage_options

log = logging.getLogger("loom.launch")
_SCHEDULE_FIELDS = {f.name for f in dataclasses.fields(LRSchedule)}


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _same_or_wrapped_rank(saved: list, rank: int, world: int):
    """RNG after a change of world size: rank r continues saved rank r mod n."""
    return saved[rank % len(saved)]



def claim_identity(cfg, environ=None) -> tuple[str, bool | str]:
    """(job, takeover) for `loom.checkpoint.claim_store`: the job is
    ``loom train [NAME] [[TOKEN]]`` with the launcher's id of this job
    (`loom.comms.elastic.job_token`: the Ray driver's, or torchrun's run id,
    the same on every host and in every attempt).  A restarted attempt
    reclaims the store from this very job's stopped workers (takeover=<job>),
    from no other job, and without waiting for the stopped claim's lease to
    lapse even when that claim was made on another host; ``--ckpt-takeover``
    claims it from anyone."""
    job = f"loom train {cfg.job.name}" if cfg.job.name else "loom train"
    token = job_token(environ)
    if token:
        job += f" [{token}]"
    restarted = token and comms.elastic_attempt(environ) > 0
    return job, cfg.ckpt.ckpt_takeover or (job if restarted else False)


REMOTE_COPY_CLOSE_S = 600.0  # the job's end waits this long for pending remote copies, then warns


class TrainingCheckpoints:
    """Saves every ``ckpt_every`` steps and resumes from the latest commit.

    ``--ckpt-mode async`` (the default) saves through an `AsyncCheckpointer`
    attached to the optimizer: the loop stalls only for `save` itself (the
    plain values) and for a host copy still running when the next optimizer
    step starts.  ``sync`` waits for `loom.checkpoint.save`, whose
    collectives run on a background group of their own (``ckpt-sync[...]``,
    made once), so that the fault monitor judges a slow save as background
    work, not as a hang.  Both record the stall per checkpoint and the time
    to reach storage (persist); while the loop waits for either, the trace
    shows it (`loom.comms.background_wait`).

    A job that saves claims ``--ckpt-url`` for its whole run (one job writes
    a store at a time; ``--ckpt-takeover`` claims a store another job owns):
    the claim is made here, collectively, before the first step, and a store
    another job owns stops the job on every rank, naming the owner."""

    def __init__(self, cfg, model, optimizer, scheduler, mesh, reporter=None, precision=None, data=None):
        self.cfg, self.c = cfg, cfg.ckpt
        apply_storage_options(self.c)  # --ckpt-storage-options, before the store is opened here
        # a source with a position to save (loom.data.TokenWindows / DocumentDraws), else None
        self.data = data if hasattr(data, "position") else None
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.precision = precision       # a MixedPrecision: its fp16 loss scaler is saved too
        self.mesh, self.reporter = mesh, reporter
        self.schedule = LRSchedule.from_config(cfg.train)  # what the scheduler runs (train.build_optimizer)
        self.saved = 0
        self.stalls: list[float] = []    # seconds the training loop lost per checkpoint
        self.persists: list[float] = []  # seconds from the save to its commit
        self.saver = None
        self.ownership = None            # the claim on the store (sync mode; async: the saver's)
        self.group = None                # sync mode: the background group the saves run on
        self._pending: list = []         # async handles not reported yet
        self.job, takeover = claim_identity(cfg)
        # the host-memory tier (`loom.launch.memory_tier`): under Ray with --memory-snapshots, else None
        self.memory = RaySnapshots.from_env(dist.get_rank() if dist.is_initialized() else 0) \
            if self.c.memory_snapshots else None
        self.reload: dict | None = None  # where the resume's bytes came from (`resume`)
        self.levels = None               # --ckpt-local: a checkpoint.MultiLevel (local level, remote copies)
        self.copy_group = None           # its copies' background group
        self._started: dict = {}         # step -> when its local save began (time to remote durability)
        if self.c.ckpt_every and self.c.ckpt_local:
            self._start_levels(takeover)
        elif self.c.ckpt_every and self.c.ckpt_mode == "async":
            self.saver = checkpoint.AsyncCheckpointer(
                self.c.ckpt_url, keep_last=self.c.keep_last or None,
                keep_every=(self.c.keep_every or None) if self.c.keep_last else None, mesh=mesh,
                durable=self.c.ckpt_durable, job=self.job, takeover=takeover, snapshots=self.memory)
            self.saver.attach(optimizer)
        elif self.c.ckpt_every:
            if dist.is_initialized():
                self.group = comms.new_group(name="ckpt-sync", background=True)
            self.ownership = checkpoint.claim_store(self.c.ckpt_url, group=self.group, job=self.job,
                                                    takeover=takeover)

    def _start_levels(self, takeover) -> None:
        """``--ckpt-local``: each checkpoint commits on the node-local level
        (local disk or /dev/shm) and is copied to ``--ckpt-url`` in the
        background (at most ``--ckpt-pending-copies`` waiting before the
        loop does); the job claims ``--ckpt-url`` here.  ``--ckpt-mode
        async``: the local commit runs in the background too, after a
        host-memory snapshot (the optimizer's next step waits for it);
        ``sync``: the loop waits for the local commit."""
        if dist.is_initialized():
            self.group = comms.new_group(name="ckpt-sync", background=True)
            self.copy_group = comms.new_group(name="ckpt-remote", background=True)
        self.ownership = checkpoint.claim_store(self.c.ckpt_url, group=self.group, job=self.job,
                                                takeover=takeover)
        self.levels = checkpoint.MultiLevel(
            self.c.ckpt_url, self.c.ckpt_local, group=self.group, copy_group=self.copy_group,
            keep_last_local=self.c.keep_last_local, keep_last=self.c.keep_last or None,
            keep_every=(self.c.keep_every or None) if self.c.keep_last else None,
            max_pending=self.c.ckpt_pending_copies, durable=self.c.ckpt_durable, mesh=self.mesh,
            ownership=self.ownership, on_event=self._event, background=self.c.ckpt_mode == "async",
            snapshots=self.memory if self.c.ckpt_mode == "async" else None)
        self.levels.attach(self.optimizer)

    def state(self, next_step: int, *, for_load: bool = False) -> dict:
        """What a checkpoint holds.  Parameters split across ranks (expert
        parallelism) carry their placement through ``state_dict()``, and the
        optimizer's moments follow their parameters; ``for_load`` creates the
        optimizer's state first, so the load has tensors of this rank's shapes.
        An fp16 run's loss scaler (the same on every rank) is saved as ``scaler``."""
        state = {"model": self.model.state_dict(),
                 "optim": checkpoint.optimizer_state_dict(self.optimizer, init=for_load),
                 "sched": self.scheduler.state_dict(), "progress": {"step": next_step},
                 "schedule": {} if for_load else self.schedule.settings(),
                 "rng": checkpoint.PerRank(rng_state(), resolver=_same_or_wrapped_rank)}
        scaler = self.precision.state_dict() if self.precision is not None else {}
        if scaler:
            state["scaler"] = scaler
        if self.data is not None:
            state["data"] = self.data.position(next_step).to_dict()
        hf = None if for_load else hf_config_text(self.model)
        if hf is not None:  # a --hf-config model's transformers config: `loom ckpt export-hf` needs only the store
            state["hf"] = {"config": hf}
        return state

    def resume(self) -> int:
        """Restore the latest committed step (when --resume); the first step to run."""
        if not self.c.resume:
            return 0
        state = self.state(0, for_load=True)
        try:
            # not strict: a checkpoint from before schedules were saved lacks "schedule", one saved
            # without fp16 lacks "scaler" (both handled below); any other missing key raises
            t0 = time.monotonic()
            if self.levels is not None:  # the newest step at the nearest level
                info = self.levels.load(state, fallback=True, strict=False, memory=self.memory)
            else:
                info = checkpoint.load(state, self.c.ckpt_url, fallback=True, strict=False, memory=self.memory)
            seconds = time.monotonic() - t0
        except checkpoint.NoCheckpointError:
            self.optimizer.state.clear()  # as fresh as it was: no state made for the load
            where = f" nor at the local level {self.c.ckpt_local}" if self.levels is not None else ""
            self._event(f"no committed checkpoint at {self.c.ckpt_url}{where}; starting from step 0")
            return 0
        for skipped in info.skipped:  # a damaged newer step: say so loudly, then go on
            text = (f"WARNING: checkpoint step {skipped['step']} at {self.c.ckpt_url} is damaged and was "
                    f"skipped ({skipped['error']}); resuming from step {info.step}")
            log.warning(text)
            self._event(text)
        lacking = [key for key in info.missing if key != "schedule" and key.split("/")[0] not in ("scaler", "data")]
        if lacking:
            raise checkpoint.MissingKeysError(f"checkpoint {info.location} lacks keys {lacking}")
        self.optimizer.load_state_dict(state["optim"])
        self.scheduler.load_state_dict(state["sched"])
        self._continue_schedule(state["schedule"], info.location)
        if "scaler" in state:
            self._resume_scaler(info, state["scaler"])
        set_rng_state(state["rng"].value)
        start = int(state["progress"]["step"])
        if self.data is not None:
            self._resume_data(info, state["data"], start)
        ranks = f"{info.world_size} rank" + ("s" if info.world_size != 1 else "")
        self._event(f"resumed from {info.location} (saved by {ranks}): step {start}")
        self._report_reload(info, seconds)
        return start

    def _report_reload(self, info, seconds: float) -> None:
        """Which tier served the resume (every rank's chunk bytes, summed):
        an event, ``self.reload`` (rank 0's summary) and, through a reporter
        that takes it (`loom.launch.recovery.AttemptRecorder`), the restart's record."""
        total = {tier: sum(t.get(tier, 0) for t in info.tiers_by_rank) for tier in TIERS}
        self.reload = {"tier": tier_of(total), "bytes": total, "seconds": round(seconds, 4),
                       "ranks": [tier_of(t) for t in info.tiers_by_rank]}
        where = {"memory": "host memory", "peer": "host memory (peers)", "mixed": "several levels",
                 "local": "the local level", "storage": "storage", "none": "storage"}[self.reload["tier"]]
        local, peer, disk, storage = (_mb(total[t]) for t in TIERS)
        on_disk = f", {disk} local level" if self.levels is not None else ""
        self._event(f"resumed step {info.step} from {where} ({local} local, {peer} peer{on_disk}, {storage} "
                    f"storage) in {seconds:.2f} s")
        note = getattr(self.reporter, "reload", None)
        if note is not None:
            note(self.reload)

    def _continue_schedule(self, saved: dict, location: str) -> None:
        """The learning-rate schedule is part of the checkpoint: a resumed run
        whose schedule settings differ from the saved ones raises ConfigError
        (on every rank alike: the settings and the checkpoint are the same
        everywhere) unless ``--allow-lr-schedule-change``, which continues
        with this run's schedule after a loud warning.  Either way the
        optimizer's lr is set from this run's schedule at the resumed step."""
        step = self.scheduler.last_epoch
        changes = self.schedule.changes(saved) if saved else []
        if changes:
            old = LRSchedule(**{k: v for k, v in saved.items() if k in _SCHEDULE_FIELDS})
            what = (f"the checkpoint at {location} was trained with another learning-rate schedule "
                    f"({'; '.join(changes)}): at step {step} it gives lr {old.lr_at(step):.6g}, this run's "
                    f"gives {self.schedule.lr_at(step):.6g}")
            self._changed(what, allowed=self.cfg.train.allow_lr_schedule_change, flag="--allow-lr-schedule-change",
                          refuse="Pass the checkpoint's values again to continue its schedule, or "
                                 "--allow-lr-schedule-change to continue with this run's",
                          going_on="continuing with this run's schedule")
        elif not saved:
            text = (f"WARNING: the checkpoint at {location} does not record its learning-rate schedule "
                    f"(saved before loom kept it); continuing with this run's")
            log.warning(text)
            self._event(text)
        restore(self.scheduler, self.schedule)

    def _changed(self, what: str, *, allowed: bool, flag: str, refuse: str, going_on: str) -> None:
        """A resume whose checkpoint differs from this run in ``what``:
        ConfigError (on every rank alike: settings and checkpoint are the same
        everywhere) saying ``refuse``, unless ``flag`` allowed it; then a loud
        warning that the run goes on as ``going_on`` says."""
        if not allowed:
            raise ConfigError(f"{what}. {refuse}")
        text = f"WARNING: {what}; {going_on} ({flag})"
        log.warning(text)
        self._event(text)

    def _resume_scaler(self, info, saved: dict) -> None:
        """The fp16 loss scaler from ``info``'s checkpoint, or a fresh one when
        it was saved without (every other key must be there)."""
        if any(k.split("/")[0] == "scaler" for k in info.missing):
            self._event(f"the checkpoint at {info.location} holds no fp16 loss scaler (saved without "
                        f"--mixed-precision fp16): starting with a fresh one")
        else:
            self.precision.load_state_dict(saved)

    def _resume_data(self, info, saved: dict, start: int) -> None:
        """The data position of ``info``'s checkpoint; one saved without (the
        synthetic task, or before loom kept it) continues at ``start * batch``."""
        if any(k.split("/")[0] == "data" for k in info.missing):
            self._event(f"the checkpoint at {info.location} holds no data position: step {start} starts at "
                        f"sample {start} * --batch-size")
            return
        saved = {k: int(v) for k, v in saved.items()}
        if saved["fingerprint"] != self.data.fingerprint():
            what = (f"the checkpoint at {info.location} was saved drawing samples from other data than this "
                    f"run's ({self.data.corpus.name}: another corpus, --seq-len, --seed, --val-fraction or "
                    f"--hdp than when it was saved)")
            self._changed(what, allowed=self.cfg.data.allow_data_change, flag="--allow-data-change",
                          refuse="Resume with the data it was saved with, or pass --allow-data-change to "
                                 "continue at its sample number on this data",
                          going_on=f"continuing at sample {saved['samples']} of this data")
        self.data.resume(saved)
        if saved["step"] != start:
            raise checkpoint.InvalidCheckpointError(f"checkpoint {info.location}: its data position is for step "
                                                    f"{saved['step']}, its progress says step {start}")
        self._event(f"data: step {start} starts at sample {saved['samples']} (epoch {saved['epoch']}, "
                    f"item {saved['index']} of it)")

    def after_step(self, step: int) -> None:
        """Called after step ``step`` (0-based) completes."""
        self._report_committed()
        done = step + 1
        if self.c.ckpt_every and done % self.c.ckpt_every == 0:
            self.save(done)

    def save(self, done: int) -> None:
        if self.levels is not None:
            self._save_levels(done)
            return
        if self.saver is not None:
            self._pending.append(self.saver.save(self.state(done), step=done))
            self.saved += 1
            return
        t0 = time.monotonic()
        with self._busy():
            location = checkpoint.save(self.state(done), self.c.ckpt_url, step=done, group=self.group,
                                       mesh=self.mesh, durable=self.c.ckpt_durable,
                                       job=self.job, snapshots=self.memory)  # shares self.ownership
            self.saved += 1
            if self.c.keep_last and self.mesh.rank == 0:
                checkpoint.gc(self.c.ckpt_url, keep_last=self.c.keep_last,
                              keep_every=self.c.keep_every or None)
        elapsed = time.monotonic() - t0
        self.stalls.append(elapsed)
        self.persists.append(elapsed)
        self._event(f"checkpoint {location} ({elapsed:.2f} s)")

    def _save_levels(self, done: int) -> None:
        """Commit at the local level, queue the remote copy (waiting only
        under backpressure, which `MultiLevel` announces), keep the level.
        ``--ckpt-mode async``: start the save (the previous step's local
        commit is waited for first); `_report_committed` reports it."""
        t0 = time.monotonic()
        if self.levels.committer is not None:
            self._started[done] = t0
            with self._busy():
                self._pending.append(self.levels.save(self.state(done), step=done))
            self.saved += 1
            return
        with self._busy():
            saved = self.levels.save(self.state(done), step=done, snapshots=self.memory)
        self.saved += 1
        self._started[done] = t0
        elapsed = time.monotonic() - t0
        self.stalls.append(elapsed)
        waited = f", {self.levels.waited_s:.2f} s of it waiting for the remote copy" if self.levels.waited_s \
            else ""
        self._event(f"checkpoint {saved.location} committed at the local level ({elapsed:.2f} s{waited}); "
                    f"copying to {self.c.ckpt_url} in the background")

    def _report_copies(self) -> None:
        """Events for remote copies that finished: committed remotely (time
        to durability from the save's start), or failed (the step stays at
        the local level; training goes on)."""
        for done in self.levels.copier.results():
            step, started = done["step"], self._started.pop(done["step"], None)
            if done["error"] is None:
                persist = done["finished"] - started if started is not None else done["seconds"]
                self.persists.append(persist)
                self._event(f"checkpoint step {step} committed at {self.c.ckpt_url} (remote copy "
                            f"{done['seconds']:.2f} s, {persist:.2f} s after the save began)")
            else:
                text = (f"WARNING: the remote copy of checkpoint step {step} to {self.c.ckpt_url} failed "
                        f"({done['error']}); the step stays committed at the local level "
                        f"{self.c.ckpt_local}; training goes on")
                log.warning(text)
                self._event(text)

    def finish(self) -> dict:
        """Wait for asynchronous saves (raising a failure) and remote copies;
        the summary's checkpoint entries."""
        if self.levels is not None:
            try:
                self.levels.wait_local()  # a failed local commit raises here, on every rank
            finally:
                self._finish_levels()
        if self.copy_group is not None:
            comms.destroy_group(self.copy_group)
            self.copy_group = None
        if self.saver is not None:
            try:
                self.saver.close()
            finally:
                self._report_committed()
        if self.ownership is not None:
            self.ownership.release()
        if self.group is not None:
            comms.destroy_group(self.group)
            self.group = None
        out = {"checkpoints": self.saved}
        if self.saved:
            out.update(ckpt_mode=self.c.ckpt_mode,
                       ckpt_stall_s=round(sum(self.stalls) / len(self.stalls), 6) if self.stalls else None,
                       ckpt_stall_max_s=round(max(self.stalls), 6) if self.stalls else None,
                       ckpt_persist_s=round(sum(self.persists) / len(self.persists), 6) if self.persists else None)
        return out

    def _finish_levels(self) -> None:
        """--ckpt-local at the job's end: the last local commits reported,
        the remote copies waited for (at most REMOTE_COPY_CLOSE_S), stop."""
        try:
            self._report_committed()
        finally:
            pending = list(self.levels.copier.pending)
            if not self.levels.copier.wait(REMOTE_COPY_CLOSE_S):  # a hung store must not hang the job's end
                text = (f"WARNING: the remote copies of checkpoint steps {self.levels.copier.pending} to "
                        f"{self.c.ckpt_url} did not finish within {REMOTE_COPY_CLOSE_S:.0f} s of the job's end "
                        f"(pending since: {pending}); they stay committed at the local level "
                        f"{self.c.ckpt_local}")
                log.warning(text)
                self._event(text)
            self.levels.close(timeout=1.0)
            self._report_copies()
            self.levels = None

    def _busy(self):
        """A synchronous save, seen in the trace as this rank waiting for
        checkpoint work (``wait:checkpoint`` on the save's group)."""
        return contextlib.nullcontext() if self.group is None else comms.background_wait(self.group, "checkpoint")

    def _report_committed(self) -> None:
        """Events for asynchronous saves that finished (their stall is final
        once the next optimizer step has passed its wait) and remote copies."""
        if self.levels is not None:
            self._report_copies()
            self._report_levels()
            return
        while self._pending and self._pending[0].done():
            handle = self._pending.pop(0)
            location = handle.result()  # raises a failure here, on every rank
            self.stalls.append(handle.stall_s)
            self.persists.append(handle.stats["persist_s"])
            self._event(f"checkpoint {location} (stall {handle.stall_s * 1e3:.1f} ms, "
                        f"persist {handle.stats['persist_s']:.2f} s)")

    def _report_levels(self) -> None:
        """--ckpt-local, --ckpt-mode async: events for local commits that
        finished (a failure raises here, on every rank); the persist time
        is the time to remote durability (`_report_copies`)."""
        while self._pending and self._pending[0].done():
            handle = self._pending.pop(0)
            self.stalls.append(handle.stall_s)
            location = handle.result()
            self._event(f"checkpoint {location} committed at the local level (stall {handle.stall_s * 1e3:.1f} "
                        f"ms, local commit {handle.stats['persist_s']:.2f} s); copying to {self.c.ckpt_url} "
                        f"in the background")

    def _event(self, text: str) -> None:
        if self.reporter is not None:
            self.reporter.event(text)


def _mb(n: int) -> str:
    return "0" if not n else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
