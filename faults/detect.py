"""Fault detection over the `CommRecord`s of every rank: pure functions.

Training is periodic and homogeneous, so a deviation in the communication
pattern points at a fault.  Clocks are never compared across ranks: every
measure is a duration on one rank's own clock (how long it waited in an op,
how long a step took), compared with the other ranks' durations.

- straggler: in a synchronous step everyone waits for the last arrival, so
  the rank that spends far *less* time communicating than the others is the
  one that arrived late.  Needs persistence (k of the last n steps), a
  relative threshold (a fraction of the step time) with an absolute floor,
  and the warm-up steps excluded.
- hang: a (group, sequence number) some ranks entered and others have not,
  for longer than ``max(floor, m x typical duration, s x typical step time)``:
  the missing ranks are named (a rank slower by part of a step is a
  straggler, however slow the steps are).
- slow_link: a point-to-point edge whose time per byte is far above the other
  edges'; the edge is the culprit, not its endpoints.
- mismatch: one (group, sequence number) issued with different ops or
  signatures on different ranks.
- lost_rank: a rank whose heartbeats stopped or whose process is gone (the
  caller measures that; see ``silent``).

Background groups (``background``: made with ``loom.comms.new_group(...,
background=True)``, e.g. a checkpoint's persist stage) are judged apart: an
operation stuck there is a ``background_stall`` (same rule and threshold as a
hang, never fatal: training may go on while a checkpoint writes slowly); their
records take no part in the straggler, slow-link and per-step judgements; a
mismatch there is still a mismatch.  If training stops too, the foreground
groups show the hang, which is fatal as always.

A rank can also hold training up *for* background work: its optimizer step
waits for a checkpoint's snapshot (backpressure), or it runs a synchronous
save.  Such a wait is a record of its own (`loom.comms.background_wait`: op
``wait:<what>`` on the background group, not a message).  A foreground hang
whose missing ranks are all inside such a wait (begun after their last
record on the hung group, on their own clocks), or left it less than the
hang threshold ago, is that background work showing: a ``background_stall``
naming the ranks and what they wait for, never fatal.  A missing rank that
is in no such wait is hung, as always; one whose process dies or falls
silent is a lost rank.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import InitVar, asdict, dataclass, field, fields

from loom.comms import CommRecord
from loom.comms.trace import is_wait

KINDS = ("lost_rank", "hang", "mismatch", "slow_link", "straggler", "background_stall")  # most severe first
FATAL_KINDS = ("hang", "lost_rank")


@dataclass(frozen=True)
class Fault:
    """One detected fault.

    ``ranks`` are the culprits (empty for a slow link, whose culprit is
    ``link = (src, dst)``), ``group`` and ``seqs`` say where it was seen, and
    ``score`` says how far past its threshold it is (1.0 = at the threshold;
    for a slow link, its time per byte over the other links').
    ``step`` is the latest training step of the evidence, when steps are tagged.
    """

    kind: str
    ranks: tuple[int, ...]
    link: tuple[int, int] | None
    group: str | None
    seqs: tuple[int, ...]
    score: float
    evidence: str
    step: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {KINDS}")

    @property
    def key(self) -> tuple:
        """What makes two detections the same fault (a monitor reports each once)."""
        if self.kind == "slow_link":
            return (self.kind, self.link)
        if self.kind == "mismatch":  # the first one in a group; later ones are its echoes
            return (self.kind, self.group, self.link)
        if self.kind == "background_stall":  # each stuck operation once
            return (self.kind, self.group, self.link, self.ranks, self.seqs)
        return (self.kind, self.ranks)

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL_KINDS

    def to_dict(self) -> dict:
        """JSON-ready (an infinite score, e.g. a process known gone, is None)."""
        d = asdict(self)
        d["ranks"], d["seqs"] = list(self.ranks), list(self.seqs)
        d["link"] = None if self.link is None else list(self.link)
        d["score"] = self.score if math.isfinite(self.score) else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Fault":
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["ranks"], d["seqs"] = tuple(d.get("ranks", ())), tuple(d.get("seqs", ()))
        d["link"] = None if d.get("link") is None else tuple(d["link"])
        d["score"] = math.inf if d.get("score") is None else d["score"]
        return cls(**d)

    def __str__(self) -> str:
        return f"{self.kind}: {self.evidence}"


def _setting(default, help: str):
    """A threshold with its one default and help text (loom train's flags are made from them)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DetectConfig:
    """Thresholds of `detect`.  Defaults suit steps of ~10 ms to seconds.

    ``names`` (not stored) says how errors name the fields, e.g. by the flags
    that set them (``{"warmup_steps": "--fault-warmup-steps", ...}``); by
    default they are ``DetectConfig: <field>``.  Raises ValueError naming the
    first bad value."""

    warmup_steps: int = _setting(5, "first steps (or untagged collectives) the straggler and hang "
                                    "detectors ignore")
    straggler_k: int = _setting(3, "a straggler is late in at least k ...")
    straggler_n: int = _setting(4, "... of the last n steps")
    straggler_rel: float = _setting(0.1, "late = arrived at least this fraction of the typical step "
                                         "time after the others ...")
    straggler_min_s: float = _setting(0.03, "... and at least this many seconds after them (the "
                                            "scheduler's noise floor)")
    hang_floor_s: float = _setting(2.0, "a hang is a collective some ranks have waited in this many "
                                        "seconds ...")
    hang_factor: float = _setting(10.0, "... or this many times its typical duration, if longer")
    hang_warmup_s: float = _setting(30.0, "the hang floor during the warm-up steps (start-up skew is "
                                          "not a hang)")
    hang_step_factor: float = _setting(3.0, "... and at least this many typical step times (a rank "
                                            "late by part of a step on a slow or overloaded machine is "
                                            "a straggler, not a hang)")
    slow_link_factor: float = _setting(4.0, "a slow link's time per byte is at least this many times "
                                            "the other links' ...")
    slow_link_min_s: float = _setting(0.005, "... and it is at least this many seconds slower per "
                                             "message ...")
    slow_link_k: int = _setting(3, "... in at least k ...")
    slow_link_n: int = _setting(5, "... of the link's last n messages")
    # A CPU op holding the GIL, or an overloaded machine, can mute a healthy
    # rank's heartbeats for seconds; a dead rank that others wait for shows as
    # a hang within hang_floor_s anyway.
    lost_after_s: float = _setting(30.0, "a rank silent this many seconds is lost (one whose process "
                                         "is known gone, at once)")
    names: InitVar[Mapping[str, str] | None] = None

    def __post_init__(self, names=None):
        where = "" if names else "DetectConfig: "

        def named(field_name: str) -> str:  # "name=value", the name as the caller knows it
            return f"{(names or {}).get(field_name, field_name)}={getattr(self, field_name)}"

        if self.warmup_steps < 0:
            raise ValueError(f"{where}{named('warmup_steps')} must be >= 0")
        for k, n in (("straggler_k", "straggler_n"), ("slow_link_k", "slow_link_n")):
            if not 1 <= getattr(self, k) <= getattr(self, n):
                raise ValueError(f"{where}need 1 <= {named(k)} <= {named(n)}")
        for field_name in ("straggler_rel", "straggler_min_s", "hang_floor_s", "hang_factor",
                           "hang_warmup_s", "hang_step_factor", "slow_link_min_s", "lost_after_s"):
            if not getattr(self, field_name) >= 0:
                raise ValueError(f"{where}{named(field_name)} must be >= 0")
        if not self.slow_link_factor > 1:
            raise ValueError(f"{where}{named('slow_link_factor')} must be > 1")


def edge_of(rec: CommRecord) -> tuple[int, int] | None:
    """The directed edge (src, dst) of a point-to-point record, else None."""
    if rec.op == "send":
        return (rec.rank, rec.peer)
    if rec.op == "recv":
        return (rec.peer, rec.rank)
    return None


class _Index:
    """The records of all ranks, keyed the way every detector needs them."""

    def __init__(self, records):
        # ops[(group, edge)][seq][rank] -> record; edge None for collectives
        self.ops: dict = defaultdict(lambda: defaultdict(dict))
        self.members: dict = {}
        self.latest: dict[int, float] = {}  # each rank's latest timestamp (its own clock)
        self.last_step: dict[int, int] = {}
        self.waits: dict[int, list[CommRecord]] = defaultdict(list)  # background waits (not messages)
        for rank, recs in records.items():
            latest, last_step = -math.inf, None
            for rec in recs:
                if is_wait(rec):
                    self.waits[rank].append(rec)
                else:
                    edge = edge_of(rec)
                    key = (rec.group, edge)
                    self.ops[key][rec.seq][rank] = rec
                    if key not in self.members:
                        self.members[key] = edge if edge is not None else tuple(rec.group_ranks)
                t = rec.t_enter if rec.t_exit is None else rec.t_exit
                if t > latest:
                    latest = t
                if rec.step is not None and (last_step is None or rec.step > last_step):
                    last_step = rec.step
            if recs:
                self.latest[rank] = latest
            if last_step is not None:
                self.last_step[rank] = last_step


def _as_rank_map(records) -> dict[int, list[CommRecord]]:
    if isinstance(records, dict):
        return {int(r): list(v) for r, v in records.items()}
    out: dict[int, list[CommRecord]] = defaultdict(list)
    for rec in records:
        out[rec.rank].append(rec)
    return dict(out)


def detect(records, *, config: DetectConfig | None = None, now: dict | None = None,
           silent: dict | None = None, first_step: int | None = None, background=()) -> list[Fault]:
    """Faults in ``records`` (``{rank: [CommRecord, ...]}`` from all ranks, or
    one flat list), most severe first.

    ``now`` maps a rank to the current time *on that rank's clock* (how long
    an op has been in flight); by default it is the rank's latest timestamp,
    so ops still open at the end of a finished trace are not called hangs.
    ``silent`` maps a rank to the seconds since its last heartbeat, ``math.inf``
    if its process is known to be gone (lost-rank detection).
    ``first_step`` is the step monitoring started at (warm-up counts from
    there; default: the earliest step in the records).
    ``background`` names the groups whose work runs beside training
    (`loom.comms.background_groups`): judged apart, never fatal (see the
    module's docstring).  Raises TypeError for a config that is not a
    `DetectConfig` or a ``background`` given as one string."""
    return analyse(records, config=config, now=now, silent=silent, first_step=first_step,
                   background=background)[0]


def analyse(records, *, config: DetectConfig | None = None, now: dict | None = None,
            silent: dict | None = None, first_step: int | None = None,
            ranks=None, background=()) -> tuple[list[Fault], "StepTable"]:
    """`detect`, also returning the per-step `StepTable` it built (over
    ``ranks``, default the members of the groups seen; foreground records
    only) for reports."""
    cfg = config or DetectConfig()
    if not isinstance(cfg, DetectConfig):
        raise TypeError(f"config must be a DetectConfig, not {type(cfg).__name__}")
    background = _names(background)
    recs = _as_rank_map(records)
    idx = _Index(recs)
    fg_recs = _foreground(recs, background)
    fg_idx = _Index(fg_recs) if fg_recs is not recs else idx
    clocks = dict(idx.latest)
    clocks.update(now or {})
    if first_step is None:
        steps = [rec.step for rs in recs.values() for rec in rs if rec.step is not None]
        first_step = min(steps) if steps else 0
    lost = lost_ranks(silent or {}, cfg, idx.last_step)
    gone = {r for f in lost for r in f.ranks}
    table = StepTable(fg_recs, ranks)
    hangs, stalls = _hangs(idx, clocks, cfg, gone, first_step, background)
    faults = lost + hangs + _mismatches(idx) + _slow_links(fg_idx, cfg, first_step) + \
        _stragglers(fg_idx, table, cfg, first_step) + stalls
    return faults, table


def _names(background) -> frozenset:
    if isinstance(background, str):
        raise TypeError(f"background must be a collection of group names, not the string {background!r}")
    return frozenset(background or ())


def _foreground(recs: dict[int, list[CommRecord]], background: frozenset) -> dict[int, list[CommRecord]]:
    """``recs`` without the background groups' records and the background
    waits (``recs`` itself if it has none)."""
    def keep(rec):
        return rec.group not in background and not is_wait(rec)
    if all(keep(rec) for rs in recs.values() for rec in rs):
        return recs
    return {r: [rec for rec in rs if keep(rec)] for r, rs in recs.items()}


# ------------------------------------------------------------------ lost rank

def lost_ranks(silent: dict, config: DetectConfig | None = None, last_step: dict | None = None) -> list[Fault]:
    """Lost-rank faults from ``silent`` ({rank: seconds without a heartbeat,
    ``math.inf`` when its process is gone}); ``last_step`` for the evidence."""
    cfg, last_step = config or DetectConfig(), last_step or {}
    out = []
    for rank in sorted(silent):
        age = silent[rank]
        if age is None or age <= cfg.lost_after_s:
            continue
        why = "its process is gone" if math.isinf(age) else f"no heartbeat for {age:.1f} s"
        step = last_step.get(rank)
        where = f" (last seen in step {step})" if step is not None else ""
        score = math.inf if math.isinf(age) else age / max(cfg.lost_after_s, 1e-9)
        out.append(Fault("lost_rank", (rank,), None, None, (), score, f"rank {rank} lost: {why}{where}",
                         step))
    return out


# ----------------------------------------------------------------------- hang

def _typical_step(by_seq: dict) -> float:
    """The median time (s) from the start of one training step to the next in
    a group's records: each rank's first entry into the group per step, on
    that rank's own clock (so clock offsets cancel); 0 without step tags."""
    starts: dict[int, dict[int, float]] = defaultdict(dict)
    for recs in by_seq.values():
        for r, rec in recs.items():
            if rec.step is not None and rec.t_enter < starts[r].get(rec.step, math.inf):
                starts[r][rec.step] = rec.t_enter
    gaps = [first[s + 1] - first[s] for first in starts.values() for s in first if s + 1 in first]
    return statistics.median(gaps) if gaps else 0.0


def _hangs(idx: _Index, clocks: dict, cfg: DetectConfig, gone: set, first_step: int,
           background: frozenset = frozenset()) -> tuple[list[Fault], list[Fault]]:
    """Hangs in the foreground groups (the worst per set of missing ranks), and
    ``background_stall``s: each stuck operation of a background group, and
    each foreground one whose missing ranks wait for background work (`_busy`)."""
    found: dict[tuple, Fault] = {}
    stalls: list[Fault] = []
    for key, by_seq in idx.ops.items():
        group, edge = key
        members = idx.members[key]
        if not members:
            continue  # group membership unknown: cannot say who is missing
        top = max(by_seq)
        entered = by_seq[top]
        missing = tuple(r for r in members if r not in entered)
        waiting = [r for r, rec in entered.items() if rec.t_exit is None]
        if not waiting or (missing and set(missing) <= gone):
            continue
        if not missing and len(waiting) < len(members):
            continue  # everyone entered and some finished: it is completing
        elapsed = min(clocks.get(r, entered[r].t_enter) - entered[r].t_enter for r in waiting)
        durations = [rec.duration for recs in by_seq.values() for rec in recs.values()
                     if rec.t_exit is not None]
        typical = statistics.median(durations) if durations else 0.0
        threshold = max(cfg.hang_floor_s, cfg.hang_factor * typical)
        step = entered[waiting[0]].step
        in_warmup = (top < cfg.warmup_steps) if step is None else (step < first_step + cfg.warmup_steps)
        if in_warmup:
            threshold = max(threshold, cfg.hang_warmup_s)
        if elapsed > threshold and cfg.hang_step_factor > 0:  # the steps' pace, only when it matters
            threshold = max(threshold, cfg.hang_step_factor * _typical_step(by_seq))
        if elapsed <= threshold:
            continue
        rec = entered[waiting[0]]
        stalled = group in background
        where = f"{rec.op} #{top} of {'background ' if stalled else ''}{_where(group, edge)}" + \
            (f" (step {step})" if step is not None else "")
        if missing:
            who = ", ".join(map(str, missing))
            many = len(waiting) > 1
            text = (f"rank{'s' if len(missing) > 1 else ''} {who} never entered {where}: "
                    f"rank{'s' if many else ''} {', '.join(map(str, sorted(waiting)))} ha{'ve' if many else 's'} "
                    f"waited {elapsed:.1f} s (threshold {threshold:.1f} s)")
        else:
            text = (f"every rank entered {where} and none finished in {elapsed:.1f} s "
                    f"(threshold {threshold:.1f} s)")
        if stalled:
            stalls.append(Fault("background_stall", missing, edge, group, (top,), elapsed / threshold,
                                text + " (background work: reported, not fatal)", step))
            continue
        busy = {r: _busy(idx, r, key, clocks, background) for r in missing}
        if missing and all(b is not None and b[1] <= threshold for b in busy.values()):
            # each missing rank is (or was until just now) waiting for background work
            why = "; ".join(_busy_text(r, w, free, clocks) for r, (w, free) in busy.items())
            stalls.append(Fault("background_stall", missing, edge, group, (top,), elapsed / threshold,
                                f"{text}; {why} (background work: reported, not fatal)", step))
            continue
        fault = Fault("hang", missing, edge, group, (top,), elapsed / threshold, text, step)
        old = found.get(missing)
        if old is None or fault.score > old.score:
            found[missing] = fault
    return [found[k] for k in sorted(found)], sorted(stalls, key=lambda f: (f.group, f.link or (), f.ranks))


def _busy(idx: _Index, rank: int, key: tuple, clocks: dict, background: frozenset):
    """The background wait that keeps ``rank`` from the next op of ``key``:
    its waits in background groups begun after its last record on ``key``
    (its own clock).  ``(the wait, 0.0)`` while one lasts, else ``(the last
    to end, seconds since it ended)``; None without such a wait."""
    after = max((recs[rank].t_enter for recs in idx.ops[key].values() if rank in recs), default=-math.inf)
    waits = [w for w in idx.waits.get(rank, ()) if w.group in background and w.t_enter >= after]
    if not waits:
        return None
    open_ = [w for w in waits if w.t_exit is None]
    if open_:
        return min(open_, key=lambda w: w.t_enter), 0.0
    last = max(waits, key=lambda w: w.t_exit)
    return last, max(0.0, clocks.get(rank, last.t_exit) - last.t_exit)


def _busy_text(rank: int, wait: CommRecord, free: float, clocks: dict) -> str:
    what = f"{wait.op} on background group {wait.group}"
    if wait.t_exit is None:
        return (f"rank {rank} is waiting for background work ({what}) for "
                f"{clocks.get(rank, wait.t_enter) - wait.t_enter:.1f} s")
    return f"rank {rank} waited {wait.duration:.1f} s for background work ({what}) until {free:.1f} s ago"


def _where(group: str, edge) -> str:
    return f"group {group}" if edge is None else f"link {edge[0]}->{edge[1]} (group {group})"


# ------------------------------------------------------------------- mismatch

def _shape_key(rec: CommRecord):
    if not rec.signature:
        return (rec.op, rec.signature)
    dtype, shape = rec.signature
    if rec.op == "all_to_all_v":  # uneven splits: only the row shape must agree
        shape = tuple(shape[1:])
    return (rec.op, dtype, tuple(shape))


def _mismatches(idx: _Index) -> list[Fault]:
    out = []
    for (group, edge), by_seq in sorted(idx.ops.items(), key=lambda kv: (kv[0][0], kv[0][1] or ())):
        for seq in sorted(by_seq):
            recs = by_seq[seq]
            if len(recs) < 2:
                continue
            if edge is None:
                variants = {r: _shape_key(rec) for r, rec in recs.items()}
                members = idx.members[(group, edge)]
                if len(recs) < len(members) and not _settled(variants, members):
                    break  # wait for the other ranks' reports before naming anyone
            else:  # the two ends of a message: same dtype and size
                variants = {r: (rec.signature[0] if rec.signature else None, rec.nbytes)
                            for r, rec in recs.items()}
            if len(set(variants.values())) == 1:
                continue
            counts = defaultdict(list)
            for r, v in variants.items():
                counts[v].append(r)
            ranked = sorted(counts.items(), key=lambda kv: (-len(kv[1]), min(kv[1])))
            if edge is None and len(ranked[0][1]) > len(ranked[1][1]):
                culprits = tuple(sorted(r for v, rs in ranked[1:] for r in rs))
                common = f"the others issued {_describe(ranked[0][0])}"
            else:
                culprits = tuple(sorted(recs))
                common = "no majority"
            issued = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {','.join(map(str, sorted(rs)))}: "
                               f"{_describe(v)}" for v, rs in ranked)
            step = next(iter(recs.values())).step
            text = (f"{_where(group, edge)} #{seq}" + (f" (step {step})" if step is not None else "") +
                    f": rank{'s' if len(culprits) > 1 else ''} {', '.join(map(str, culprits))} issued a "
                    f"different collective ({common}) — {issued}")
            out.append(Fault("mismatch", culprits, edge, group, (seq,), float(len(culprits)), text, step))
            break  # later sequence numbers of this group are out of step anyway
    return out


def _settled(variants: dict, members) -> bool:
    """Whether the ranks still missing cannot change who is in the minority:
    one variant already holds more than half of the members, the rest differ."""
    counts = defaultdict(int)
    for v in variants.values():
        counts[v] += 1
    return len(counts) > 1 and max(counts.values()) * 2 > len(members)


def _describe(variant) -> str:
    if len(variant) == 3:
        op, dtype, shape = variant
        return f"{op} {dtype.replace('torch.', '')}{list(shape)}"
    return " ".join(map(str, variant))


# ------------------------------------------------------------------ slow link

def _slow_links(idx: _Index, cfg: DetectConfig, first_step: int) -> list[Fault]:
    # per edge: (seq, step, transfer time, nbytes) of its matched, completed messages
    msgs: dict = defaultdict(list)
    for (group, edge), by_seq in idx.ops.items():
        if edge is None:
            continue
        src, dst = edge
        for seq, recs in by_seq.items():
            send, recv = recs.get(src), recs.get(dst)
            if send is None or recv is None or send.t_exit is None or recv.t_exit is None:
                continue
            step = send.step
            if (seq < cfg.warmup_steps) if step is None else (step < first_step + cfg.warmup_steps):
                continue
            # the end that arrived last waited least: its wait is the transfer
            msgs[edge].append((step if step is not None else -1, seq, min(send.duration, recv.duration),
                               max(send.nbytes, 1), group))
    if len(msgs) < 2:
        return []
    n = cfg.slow_link_n
    msgs = {e: sorted(m) for e, m in msgs.items()}
    last = {e: m[-n:] for e, m in msgs.items()}
    out = []
    for edge, mine in sorted(last.items()):
        others = [t / b for e, ms in last.items() if e != edge for _, _, t, b, _ in ms]
        ref = statistics.median(others)
        flags = [m if m[2] / m[3] >= cfg.slow_link_factor * ref and m[2] - ref * m[3] >= cfg.slow_link_min_s
                 else None for m in msgs[edge]]
        onset = _persistent_since(flags, cfg.slow_link_k, n)
        if onset is None:
            continue
        slow = [(m[2], m[3]) for m in flags[-n:] if m is not None]
        t_med = statistics.median(t for t, _ in slow)
        b_med = statistics.median(b for _, b in slow)
        ratio = statistics.median(t / b for t, b in slow) / max(ref, 1e-15)
        step = onset[0] if onset[0] >= 0 else None
        text = (f"link {edge[0]}->{edge[1]} is slow: {t_med * 1e3:.1f} ms per {_bytes(b_med)} message "
                f"({t_med / b_med * 1e9:.1f} ns/B) vs {ref * 1e9:.2f} ns/B on the other {len(last) - 1} "
                f"link{'s' if len(last) > 2 else ''}, in {len(slow)} of its last {len(mine)} messages")
        out.append(Fault("slow_link", (), edge, mine[-1][4], tuple(s for _, s, _, _, _ in mine),
                         ratio, text, step))
    return out


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} TiB"


# ------------------------------------------------------------------ straggler

class StepTable:
    """Per rank and step: time spent communicating (``wait``: the sum of its
    ops' durations) and the step's length (from its first op to the next
    step's first op), both on the rank's own clock.  A step counts once every
    rank of ``ranks`` is done with it (default: the members of the groups in
    the records), so a rank whose reports are late holds it back."""

    def __init__(self, records: dict[int, list[CommRecord]], ranks=None):
        wait: dict = defaultdict(dict)
        count: dict = defaultdict(dict)
        open_: dict = defaultdict(set)
        first: dict = defaultdict(dict)
        last_step: dict[int, int] = {}
        members: set = set()
        for rank, recs in records.items():
            for rec in recs:
                u = rec.step
                if u is None:
                    continue
                if ranks is None and rec.group_ranks not in members:
                    members.add(rec.group_ranks)
                count[u][rank] = count[u].get(rank, 0) + 1
                if rec.t_exit is None:
                    open_[u].add(rank)
                else:
                    wait[u][rank] = wait[u].get(rank, 0.0) + rec.t_exit - rec.t_enter
                if rec.t_enter < first[u].get(rank, math.inf):
                    first[u][rank] = rec.t_enter
                if rec.step > last_step.get(rank, -math.inf):
                    last_step[rank] = rec.step
        if ranks is None:
            ranks = set(last_step).union(*members)
        self.ranks = sorted(ranks)
        self.wait, self.step_time, self.complete = {}, {}, []
        for u in sorted(count):
            ranks = count[u]
            if any(r not in ranks for r in self.ranks) or open_.get(u):
                continue
            # done: it started a later step, or it closed as many ops as in its previous step
            if not all(last_step[r] > u or count.get(u - 1, {}).get(r, 0) and ranks[r] >= count[u - 1][r]
                       for r in ranks):
                continue
            self.complete.append(u)
            self.wait[u] = {r: wait[u].get(r, 0.0) for r in ranks}
            nxt = first.get(u + 1, {})
            self.step_time[u] = {r: nxt[r] - first[u][r] for r in ranks if r in nxt}


def step_waits(records, background=()) -> list[dict]:
    """Per complete step: each rank's time in communication and step length
    (``{"step", "wait_s": {rank: s}, "step_s": {rank: s}}``), for reports;
    the ``background`` groups' records are left out."""
    table = StepTable(_foreground(_as_rank_map(records), _names(background)))
    return [{"step": u, "wait_s": table.wait[u], "step_s": table.step_time[u]} for u in table.complete]


def _stragglers(idx: _Index, table: "StepTable", cfg: DetectConfig, first_step: int) -> list[Fault]:
    units = [u for u in table.complete if u >= first_step + cfg.warmup_steps]
    out = []
    if units:
        lengths = [t for u in units for t in table.step_time[u].values()]
        typical = statistics.median(lengths) if lengths else 0.0
        out += _late_ranks([(u, table.wait[u]) for u in units], typical, cfg, "step", idx)
    named = {f.ranks for f in out}
    return out + [f for f in _untagged_stragglers(idx, cfg) if f.ranks not in named]


def _late_ranks(units, typical: float, cfg: DetectConfig, what: str, idx: _Index,
                group: str | None = None) -> list[Fault]:
    """Ranks late in >= k of the last n ``units`` [(unit, {rank: wait})]."""
    threshold = max(cfg.straggler_min_s, cfg.straggler_rel * typical)
    n = cfg.straggler_n
    out = []
    for r in sorted({r for _, w in units[-n:] for r in w}):
        flags = []  # per unit: (unit, lateness, the others' wait, its wait) or None if not late
        for u, waits in units:
            if r not in waits or len(waits) < 2:
                flags.append(None)
                continue
            others = statistics.median(w for j, w in waits.items() if j != r)
            flags.append((u, others - waits[r], others, waits[r]) if others - waits[r] >= threshold else None)
        onset = _persistent_since(flags, cfg.straggler_k, n)
        if onset is None:
            continue
        late = [x for x in flags[-n:] if x is not None]
        lateness = statistics.median(x[1] for x in late)
        span = f"{what}s {late[0][0]}-{late[-1][0]}" if what == "step" else \
            f"{group} #{late[0][0]}-#{late[-1][0]}"
        text = (f"rank {r} arrived late in {len(late)} of the last {min(n, len(units))} {what}s ({span}): "
                f"it waited {statistics.median(x[3] for x in late) * 1e3:.0f} ms while the others waited "
                f"{statistics.median(x[2] for x in late) * 1e3:.0f} ms (late by {lateness * 1e3:.0f} ms; "
                f"{what} time {typical * 1e3:.0f} ms, threshold {threshold * 1e3:.0f} ms)")
        if what == "step":
            grp, seqs = _late_collectives(idx, r, [x[0] for x in late])
            step = onset[0]
        else:
            grp, seqs, step = group, tuple(x[0] for x in late), None
        out.append(Fault("straggler", (r,), None, grp, seqs, lateness / threshold, text, step))
    return out


def _persistent_since(flags: list, k: int, n: int):
    """If >= k of the last n ``flags`` are set: the flag at which this run of
    windows (each with >= k of n set) first held - the detection point,
    independent of how late the caller looked.  Else None."""
    def holds(end):  # window flags[end - n + 1 .. end]
        return sum(f is not None for f in flags[max(0, end - n + 1):end + 1]) >= k
    end = len(flags) - 1
    if end < 0 or not holds(end):
        return None
    while end > 0 and holds(end - 1):
        end -= 1
    return flags[end]


def _late_collectives(idx: _Index, rank: int, steps: list[int]):
    """For each late step, the collective where the others waited longest for ``rank``."""
    wanted = set(steps)
    best: dict[int, tuple] = {}
    for (group, edge), by_seq in idx.ops.items():
        if edge is not None:
            continue
        for seq, recs in by_seq.items():
            mine = recs.get(rank)
            if mine is None or mine.step not in wanted or mine.t_exit is None or len(recs) < 2:
                continue
            others = [rec.duration for r, rec in recs.items() if r != rank and rec.t_exit is not None]
            if not others:
                continue
            gap = statistics.median(others) - mine.duration
            if gap > best.get(mine.step, (-math.inf,))[0]:
                best[mine.step] = (gap, group, seq)
    if not best:
        return None, ()
    group = best[max(best)][1]
    return group, tuple(best[u][2] for u in sorted(best) if best[u][1] == group)


def _untagged_stragglers(idx: _Index, cfg: DetectConfig) -> list[Fault]:
    """Records without a step: each collective of a group is its own unit."""
    out = []
    for (group, edge), by_seq in sorted(idx.ops.items(), key=lambda kv: (kv[0][0], kv[0][1] or ())):
        if edge is not None:
            continue
        members = idx.members[(group, edge)]
        units, gaps = [], []
        prev: dict[int, float] = {}
        for seq in sorted(by_seq):
            recs = by_seq[seq]
            if any(rec.step is not None for rec in recs.values()):
                break
            for r, rec in recs.items():
                if r in prev:
                    gaps.append(rec.t_enter - prev[r])
                prev[r] = rec.t_enter
            if seq < cfg.warmup_steps or len(recs) < len(members) or \
                    any(rec.t_exit is None for rec in recs.values()):
                continue
            units.append((seq, {r: rec.duration for r, rec in recs.items()}))
        if units:
            typical = statistics.median(gaps) if gaps else 0.0
            out += _late_ranks(units, typical, cfg, "collective", idx, group)
    return out
