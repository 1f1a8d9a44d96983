"""`loom.faults.detect` on synthetic record sets, the injection plan parser and
the incremental trace reader (no processes)."""
import math
import random

import pytest
import torch

from loom import comms
from loom.comms import CommRecord, trace
from loom.faults import Aggregator, DetectConfig, Fault, detect, inject, step_waits

EPS = 0.0005


class Sim:
    """A synchronous job on a shared 'true' clock; each rank stamps its records
    with its own clock (true time + a large per-rank offset), as real hosts do."""

    def __init__(self, world=4, seed=0):
        self.world = world
        self.rng = random.Random(seed)
        self.offset = {r: 1000.0 * (r + 1) + self.rng.random() for r in range(world)}
        self.recs = {r: [] for r in range(world)}
        self.seq: dict = {}
        self.t = 0.0

    def _rec(self, r, group, op, nbytes, t0, t1, step, peer=None, shape=(4,), channel=None, ranks=None):
        key = channel or group
        seq = self.seq.get((r, key), 0)
        self.seq[(r, key)] = seq + 1
        off = self.offset[r]
        rec = CommRecord(r, group, tuple(ranks or range(self.world)), seq, op, nbytes, peer,
                         ("torch.float32", tuple(shape)), t0 + off, None if t1 is None else t1 + off, step)
        self.recs[r].append(rec)
        return rec

    def collective(self, arrive, step, op="all_reduce", shapes=None, group="world"):
        """Every rank enters at self.t + arrive[r]; all leave after the last arrival."""
        end = self.t + max(arrive.values()) + EPS
        for r, a in arrive.items():
            shape = (shapes or {}).get(r, (4,))
            self._rec(r, group, op, 16, self.t + a, end, step, shape=shape)
        self.t = end

    def step(self, u, compute=0.01, late=None, jitter=0.0):
        late = late or {}
        arrive = {r: compute + late.get(r, 0.0) + self.rng.uniform(0, jitter) for r in range(self.world)}
        self.collective(arrive, u)           # gradient all-reduce
        self.collective({r: 0.0 for r in range(self.world)}, u)  # loss all-reduce

    def ring_step(self, u, slow=None, delay=0.0, nbytes=4096):
        """Every rank sends to its right neighbour; edge ``slow`` takes ``delay``."""
        done = {}
        for src in range(self.world):
            dst = (src + 1) % self.world
            transfer = EPS + (delay if (src, dst) == slow else 0.0)
            t0, t1 = self.t, self.t + transfer
            edge = f"p2p:{src}->{dst}"
            self._rec(src, "world", "send", nbytes, t0, t1, u, peer=dst, channel=edge, shape=(nbytes // 4,))
            self._rec(dst, "world", "recv", nbytes, t0, t1, u, peer=src, channel=edge, shape=(nbytes // 4,))
            done[src] = max(done.get(src, 0.0), transfer)
            done[dst] = max(done.get(dst, 0.0), transfer)
        self.collective(done, u)

    def now(self, extra=0.0):
        return {r: self.t + extra + self.offset[r] for r in range(self.world)}


def kinds(faults):
    return [(f.kind, f.ranks) for f in faults]


# ----------------------------------------------------------------- straggler

def test_straggler_flagged_on_its_third_late_step_naming_only_it():
    sim = Sim()
    flagged_at = None
    for u in range(20):
        sim.step(u, compute=0.02, late={2: 0.2} if u >= 10 else None, jitter=0.004)
        faults = detect(sim.recs)
        if faults and flagged_at is None:
            flagged_at = u
            assert kinds(faults) == [("straggler", (2,))], faults
            f = faults[0]
            assert f.step == 12 and f.group == "world" and len(f.seqs) == 3 and f.score > 1
            assert "rank 2 arrived late in 3 of the last 4 steps" in f.evidence
    assert flagged_at == 12
    # looking later does not move the detection point: still flagged as of step 12
    assert detect(sim.recs)[0].step == 12 and "late in 4 of the last 4 steps (steps 16-19)" in \
        detect(sim.recs)[0].evidence


def test_no_straggler_from_noise_warmup_or_rare_lateness():
    sim = Sim(seed=1)
    for u in range(200):
        late = {0: 0.5} if u < 5 else {}            # warm-up: excluded
        if u in (50, 52):                          # twice in a window of 4: not persistent
            late = {3: 0.2}
        if u % 7 == 0 and not 45 <= u <= 56:  # one-off hiccups of random ranks
            late = {sim.rng.randrange(4): 0.1}
        sim.step(u, compute=0.05, late=late, jitter=0.02)
        assert detect(sim.recs) == [], u


def test_straggler_threshold_is_relative_to_the_step_time():
    # 60 ms late is above the 30 ms floor, but below 10% of a 1 s step
    sim = Sim()
    for u in range(12):
        sim.step(u, compute=1.0, late={1: 0.06} if u >= 6 else None)
    assert detect(sim.recs) == []
    assert kinds(detect(sim.recs, config=DetectConfig(straggler_rel=0.02))) == [("straggler", (1,))]


def test_straggler_without_step_tags_uses_each_collective():
    sim = Sim()
    for u in range(12):
        sim.collective({r: 0.01 + (0.1 if (r == 3 and u >= 6) else 0.0) for r in range(4)}, None)
    faults = detect(sim.recs)
    assert kinds(faults) == [("straggler", (3,))]
    assert faults[0].group == "world" and faults[0].seqs == (6, 7, 8, 9, 10, 11)[-len(faults[0].seqs):]


def test_two_rank_job_names_the_late_rank():
    sim = Sim(world=2)
    for u in range(12):
        sim.step(u, late={0: 0.1} if u >= 5 else None)
    assert kinds(detect(sim.recs)) == [("straggler", (0,))]


# ---------------------------------------------------------------------- hang

def _hung_job(typical=EPS):
    sim = Sim()
    for u in range(10):
        sim.step(u)
    # step 10: ranks 0-2 enter the gradient all-reduce, rank 3 never does
    for r in range(3):
        sim._rec(r, "world", "all_reduce", 16, sim.t + 0.01, None, 10)
    return sim


def test_hang_names_the_missing_rank_after_the_floor():
    sim = _hung_job()
    assert detect(sim.recs, now=sim.now(1.5)) == []
    faults = detect(sim.recs, now=sim.now(2.5))
    assert kinds(faults) == [("hang", (3,))]
    f = faults[0]
    assert f.group == "world" and f.seqs == (20,) and f.step == 10 and f.fatal
    assert "rank 3 never entered all_reduce #20 of group world (step 10)" in f.evidence
    # without `now`, a trace that simply ends with ops in flight is not a hang
    assert detect(sim.recs) == []


def test_hang_threshold_scales_with_the_typical_duration():
    sim = Sim()
    for u in range(10):  # most ops last 0.5 s: the hang threshold becomes 10 x 0.5 s
        sim.collective({0: 0.5, 1: 0.0, 2: 0.0, 3: 0.0}, u)
    for r in range(3):
        sim._rec(r, "world", "all_reduce", 16, sim.t, None, 10)
    hangs = lambda fs: [f for f in fs if f.kind == "hang"]  # noqa: E731 (rank 0 is also a straggler)
    assert hangs(detect(sim.recs, now=sim.now(4.5))) == []
    assert kinds(hangs(detect(sim.recs, now=sim.now(5.5)))) == [("hang", (3,))]


def test_hang_during_warmup_waits_longer():
    sim = Sim()
    sim.step(0)
    for r in range(1, 4):
        sim._rec(r, "world", "all_reduce", 16, sim.t, None, 1)
    assert detect(sim.recs, now=sim.now(10.0)) == []
    assert kinds(detect(sim.recs, now=sim.now(31.0))) == [("hang", (0,))]


def test_hang_on_a_point_to_point_edge():
    sim = Sim()
    for u in range(8):
        sim.ring_step(u)
    sim._rec(1, "world", "send", 4096, sim.t, None, 8, peer=2, channel="p2p:1->2")
    faults = detect(sim.recs, now=sim.now(3.0))
    assert kinds(faults) == [("hang", (2,))] and faults[0].link == (1, 2)


def test_lost_rank_explains_the_hang():
    sim = _hung_job()
    faults = detect(sim.recs, now=sim.now(3.0), silent={0: 0.1, 1: 0.1, 2: 0.1, 3: math.inf})
    assert kinds(faults) == [("lost_rank", (3,))]
    assert "rank 3 lost: its process is gone (last seen in step 9)" == faults[0].evidence
    faults = detect(sim.recs, now=sim.now(0.5), silent={0: 0.1, 1: 0.1, 2: 0.1, 3: 30.5})
    assert kinds(faults) == [("lost_rank", (3,))] and "no heartbeat for 30.5 s" in faults[0].evidence
    assert detect(sim.recs, silent={3: 29.9}) == []
    assert kinds(detect(sim.recs, silent={3: 1.5}, config=DetectConfig(lost_after_s=1.0))) == [("lost_rank", (3,))]


# ----------------------------------------------------------------- slow link

def test_slow_link_reported_as_the_edge_not_its_endpoints():
    sim = Sim()
    for u in range(12):
        sim.ring_step(u, slow=(1, 2) if u >= 5 else None, delay=0.05)
    faults = detect(sim.recs)
    assert [(f.kind, f.ranks, f.link) for f in faults] == [("slow_link", (), (1, 2))]
    assert faults[0].score > 10 and "link 1->2 is slow" in faults[0].evidence
    assert faults[0].step == 7  # the third slow message completed the evidence


def test_uniformly_slow_links_are_not_a_slow_link():
    sim = Sim()
    for u in range(12):
        sim.ring_step(u, nbytes=4096 * (1 + u % 3))
    assert detect(sim.recs) == []


# ------------------------------------------------------------------ mismatch

def test_mismatch_names_the_odd_rank_and_sequence_number():
    sim = Sim()
    for u in range(6):
        sim.step(u)
    sim.collective({r: 0.0 for r in range(4)}, 6, shapes={1: (2, 2)})
    sim.collective({r: 0.0 for r in range(4)}, 6, shapes={1: (8,)})  # a later consequence
    faults = detect(sim.recs)
    assert kinds(faults) == [("mismatch", (1,))]
    f = faults[0]
    assert f.seqs == (12,) and f.group == "world" and f.step == 6
    assert "rank 1 issued a different collective" in f.evidence and "float32[2, 2]" in f.evidence


def test_mismatch_waits_until_the_minority_is_certain():
    sim = Sim()
    sim.collective({r: 0.0 for r in range(4)}, 0, shapes={0: (2, 2)})
    partial = {r: sim.recs[r] for r in (0, 2)}          # 1 vs 1: who is odd is not known yet
    assert detect(partial) == []
    partial[3] = sim.recs[3]                             # 1 vs 2 of 4: still open
    assert detect(partial) == []
    partial[1] = sim.recs[1]
    assert kinds(detect(partial)) == [("mismatch", (0,))]
    five = Sim(world=5)                                  # 3 of 5 agree: settled without the rest
    five.collective({r: 0.0 for r in range(5)}, 0, shapes={4: (2, 2)})
    assert kinds(detect({r: five.recs[r] for r in (0, 1, 2, 4)})) == [("mismatch", (4,))]


def test_mismatched_op_and_uneven_all_to_all():
    sim = Sim()
    for r in range(4):  # uneven all_to_all_v rows are legitimate
        sim._rec(r, "world", "all_to_all_v", 16, 0.0, 0.01, 0, shape=(r + 1, 8))
    assert detect(sim.recs) == []
    for r in range(4):
        sim._rec(r, "world", "barrier" if r == 0 else "all_reduce", 16, 0.02, 0.03, 0)
    assert kinds(detect(sim.recs)) == [("mismatch", (0,))]


# -------------------------------------------------------------- odds and ends

def test_clean_run_with_offset_clocks_raises_nothing_and_reports_waits():
    sim = Sim()
    for u in range(30):
        sim.step(u, compute=0.02, jitter=0.01)
    assert detect(sim.recs, now=sim.now(0.1), silent={r: 0.05 for r in range(4)}) == []
    waits = step_waits(sim.recs)
    assert [w["step"] for w in waits] == list(range(30))
    assert all(set(w["wait_s"]) == {0, 1, 2, 3} for w in waits)
    assert all(len(w["step_s"]) == 4 for w in waits[:-1]) and waits[-1]["step_s"] == {}


def test_fault_round_trip_and_bad_input():
    f = Fault("slow_link", (), (1, 2), "world", (3, 4), 7.5, "link 1->2 is slow", 9)
    assert Fault.from_dict(f.to_dict()) == f and not f.fatal and f.key == ("slow_link", (1, 2))
    with pytest.raises(ValueError, match="unknown fault kind 'oops'"):
        Fault("oops", (), None, None, (), 0, "")
    with pytest.raises(ValueError, match="straggler_k=5 <= straggler_n=4"):
        DetectConfig(straggler_k=5)
    with pytest.raises(TypeError, match="DetectConfig"):
        detect({}, config={"warmup_steps": 1})


def test_aggregator_publishes_each_fault_once_and_logs(tmp_path):
    import json
    sim = Sim()
    for u in range(15):
        sim.step(u, late={2: 0.2} if u >= 8 else None)
    seen = []
    agg = Aggregator(4, log_dir=str(tmp_path), callbacks=[seen.append], check_pids=False)
    for r, recs in sim.recs.items():
        payload = {"rank": r, "pid": 1, "host": "h", "t": recs[-1].t_exit, "groups": {"world": (0, 1, 2, 3)},
                   "recs": [(x.group, x.seq, x.op, x.nbytes, x.peer, x.signature, x.t_enter, x.t_exit, x.step)
                            for x in recs]}
        assert agg.ingest(json.dumps(payload).encode())
    assert kinds(agg.check()) == [("straggler", (2,))]
    assert agg.check(force=True) == [] and kinds(seen) == [("straggler", (2,))] and agg.verdict is None
    agg.ingest({"rank": 0, "pid": 1, "host": "h", "t": 0.0, "recs": [], "bye": True})  # left: never lost
    agg.mark_gone(0)
    agg.mark_gone(3)  # its process ended (the launcher saw it): lost at once
    assert kinds(agg.check()) == [("lost_rank", (3,))] and agg.verdict.ranks == (3,)
    assert "rank 3 lost: its process is gone (last seen in step 14)" == agg.verdict.evidence
    agg.close()
    lines = [json.loads(x) for x in (tmp_path / "faults.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["straggler", "lost_rank"] and lines[0]["seen_step"] == 14
    assert lines[1]["score"] is None  # a process known gone: no finite score
    waits = [json.loads(x) for x in (tmp_path / "waits.jsonl").read_text().splitlines()]
    assert [w["step"] for w in waits] == list(range(15))


def test_injection_plan_parsing():
    plan = inject.parse("straggler:rank=1,delay=0.2,from=20; hang:rank=3,step=40 ;"
                        "slow_link:src=1,dst=2,delay=0.05;kill:rank=0,step=5;mismatch:rank=2,step=7")
    assert [i.kind for i in plan] == ["straggler", "hang", "slow_link", "kill", "mismatch"]
    assert plan[0].start == 20 and plan[0].active(20) and not plan[0].active(19)
    assert plan[1].duration is None and plan[2].ranks() == (1, 2)
    assert inject.parse(str(plan[0])) == [plan[0]]
    assert inject.parse("") == []
    for bad, msg in [("slow:rank=1", "unknown kind 'slow'"), ("hang:rank=1", r"missing \['step'\]"),
                     ("kill:rank=x,step=1", "rank='x' is not a number"),
                     ("straggler:rank=1,delay=0.1,speed=2", "unknown or malformed setting 'speed=2'")]:
        with pytest.raises(ValueError, match=msg):
            inject.parse(bad)
    with pytest.raises(ValueError, match="rank 4 is outside 0..3"):
        inject.validate_plan(inject.parse("kill:rank=4,step=1"), 4)


def test_injector_slow_link_hook_is_installed_only_when_planned():
    from loom.comms import ops
    with inject.Injector("straggler:rank=0,delay=0.0", rank=0):
        assert ops._send_hook is None
    with inject.Injector("slow_link:src=0,dst=1,delay=0.0", rank=0):
        assert ops._send_hook is not None
    assert ops._send_hook is None


# ------------------------------------------------------------- trace reader

def test_trace_reader_returns_new_records_then_completed_ones():
    trace.reset_trace(capacity=8)
    reader = comms.TraceReader()
    x = torch.ones(4)
    a = trace.open_record(0, "world", (0, 1), "all_reduce", 16, x.dtype, x.shape)
    b = trace.open_record(0, "world", (0, 1), "all_reduce", 16, x.dtype, x.shape)
    trace.close_record(b)
    first = reader.read()
    assert [(r.seq, r.t_exit is None) for r in first] == [(0, True), (1, False)]
    assert reader.read() == []
    trace.close_record(a)
    c = trace.open_record(0, "world", (0, 1), "barrier", 0)
    again = reader.read()
    assert [(r.seq, r.t_exit is None) for r in again] == [(0, False), (2, True)]
    trace.close_record(c)
    for _ in range(20):  # overflow the 8-entry ring before the next read
        trace.close_record(trace.open_record(0, "world", (0, 1), "barrier", 0))
    recs = reader.read()
    assert [r.seq for r in recs] == [2] + list(range(15, 23)) and reader.dropped == 12
    trace.reset_trace(capacity=trace.DEFAULT_CAPACITY)
    trace.close_record(trace.open_record(0, "world", (0, 1), "barrier", 0))
    assert [r.seq for r in reader.read()] == [0]
    trace.reset_trace()


def test_trace_reader_misses_nothing_while_the_owner_thread_records():
    import threading
    trace.reset_trace(capacity=1 << 16)
    reader, closed, stop, errors = comms.TraceReader(), {}, threading.Event(), []

    def read():
        try:
            while not stop.is_set():
                for r in reader.read():
                    if r.t_exit is not None:
                        closed[r.seq] = closed.get(r.seq, 0) + 1
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    t = threading.Thread(target=read)
    t.start()
    pending = []
    for i in range(30000):
        pending.append(trace.open_record(0, "world", (0, 1), "barrier", 0))
        if i % 3 == 2:  # close out of order, a few in flight at a time
            for e in reversed(pending):
                trace.close_record(e)
            pending.clear()
    for e in pending:
        trace.close_record(e)
    stop.set()
    t.join()
    for r in reader.read():
        if r.t_exit is not None:
            closed[r.seq] = closed.get(r.seq, 0) + 1
    assert errors == []
    assert reader.dropped == 0 and sorted(closed) == list(range(30000)) and set(closed.values()) == {1}
    trace.reset_trace()


def test_monitor_resends_what_a_failed_transport_dropped():
    import json
    from loom.faults import Monitor

    class Flaky:
        def __init__(self):
            self.sent, self.fail = [], False

        def send(self, payload):
            if self.fail:
                raise ConnectionError("aggregator unreachable")
            self.sent.append(json.loads(payload))

    trace.reset_trace()
    link = Flaky()
    mon = Monitor(link, rank=5, interval=60).start()  # the first report registers the rank
    trace.close_record(trace.open_record(5, "world", (0, 5), "barrier", 0))
    link.fail = True
    with pytest.raises(ConnectionError):
        mon._ship()
    link.fail = False
    trace.close_record(trace.open_record(5, "world", (0, 5), "barrier", 0))
    mon.stop()
    assert [m["rank"] for m in link.sent] == [5, 5] and link.sent[-1]["bye"]
    assert [r[1] for r in link.sent[-1]["recs"]] == [0, 1] and link.sent[-1]["groups"] == {"world": [0, 5]}
    trace.reset_trace()


def test_aggregator_counts_silence_only_while_it_was_listening():
    import time as _time
    agg = Aggregator(2, check_pids=False)
    agg.ingest({"rank": 0, "pid": 1, "host": "h", "t": 0.0, "recs": []}, received_at=_time.monotonic() - 40)
    agg._last_tick = _time.monotonic() - 40  # the aggregator itself was starved for 40 s
    assert agg.check() == []                  # so rank 0's 40 s of silence is not held against it
    agg._listening_since -= 40                # it was listening all along: rank 0 is lost
    assert kinds(agg.check()) == [("lost_rank", (0,))]


# ---------------------------------------------------------- background groups

PERSIST = "ckpt-persist[0,1]"


def _training_beside_a_slow_write(sim, steps, stop_at=None):
    """Training all-reduces every 60 ms on the world group; at step 10 rank 0
    enters the persist group's all-reduce while rank 1 is still writing (it
    never enters).  From ``stop_at`` on, rank 1 stops training too: rank 0
    waits in the world group's next all-reduce."""
    for u in range(steps):
        if u == 10:
            sim._rec(0, PERSIST, "all_reduce", 8, sim.t, None, u, ranks=(0, 1))
        if u == stop_at:
            sim._rec(0, "world", "all_reduce", 16, sim.t + 0.05, None, u)
            return
        sim.collective({r: 0.0595 for r in range(2)}, u)  # a 60 ms step


def test_slow_background_write_is_reported_but_never_fatal_while_training_progresses():
    sim = Sim(world=2)
    _training_beside_a_slow_write(sim, 61)  # 3 s of training since rank 0 entered the persist all-reduce
    faults = detect(sim.recs, now=sim.now(0.01), background={PERSIST})
    assert kinds(faults) == [("background_stall", (1,))], faults
    f = faults[0]
    assert not f.fatal and f.group == PERSIST and f.step == 10 and f.seqs == (0,)
    assert f.evidence.startswith(f"rank 1 never entered all_reduce #0 of background group {PERSIST} (step 10): "
                                 "rank 0 has waited 3.")
    # the stuck background op takes no part in the per-step judgements: every step completes
    assert [w["step"] for w in step_waits(sim.recs, background={PERSIST})] == list(range(61))
    # without the background mark, the same records would stop the job
    assert [x.kind for x in detect(sim.recs, now=sim.now(0.01))] == ["hang"]
    with pytest.raises(TypeError, match="not the string"):
        detect(sim.recs, background=PERSIST)


def _report(rank, recs, background=()):
    groups = {}
    for x in recs:
        groups.setdefault(x.group, list(x.group_ranks))
    return {"rank": rank, "pid": 1, "host": "h", "t": recs[-1].t_enter if recs[-1].t_exit is None else recs[-1].t_exit,
            "groups": groups, "background": list(background),
            "recs": [(x.group, x.seq, x.op, x.nbytes, x.peer, x.signature, x.t_enter, x.t_exit, x.step)
                     for x in recs]}


def test_aggregator_posts_no_verdict_for_a_slow_background_write():
    import json
    sim = Sim(world=2)
    _training_beside_a_slow_write(sim, 61)
    agg = Aggregator(2, check_pids=False)
    for r, recs in sim.recs.items():  # only rank 0 has records of the persist group: it says it is background
        assert agg.ingest(json.dumps(_report(r, recs, [PERSIST] if r == 0 else [])).encode())
    published = agg.check(force=True)
    assert kinds(published) == [("background_stall", (1,))] and agg.verdict is None
    assert PERSIST in published[0].evidence and agg.background == {PERSIST}
    assert [w["step"] for w in agg.drain()["waits"]] == list(range(61))


def test_background_stall_and_stopped_training_is_a_fatal_hang():
    sim = Sim(world=2)
    _training_beside_a_slow_write(sim, 61, stop_at=12)
    sim.t += 3.0  # 3 s later: rank 0 still waits in both groups
    faults = detect(sim.recs, now=sim.now(), background={PERSIST})
    assert [(f.kind, f.ranks, f.group) for f in faults] == [("hang", (1,), "world"),
                                                            ("background_stall", (1,), PERSIST)]
    agg = Aggregator(2, check_pids=False)
    for r, recs in sim.recs.items():
        assert agg.ingest(_report(r, recs, [PERSIST] if r == 0 else []), received_at=None)
    clocks = sim.now()
    agg.heard = {r: (clocks[r], agg.heard[r][1]) for r in agg.heard}  # the ranks' clocks now
    agg.check(force=True)
    assert agg.verdict is not None and (agg.verdict.kind, agg.verdict.group) == ("hang", "world")
    assert "rank 1 never entered all_reduce #12 of group world (step 12)" in agg.verdict.evidence


def test_monitor_ships_which_groups_are_background(monkeypatch):
    import json
    from loom.comms import ops
    from loom.faults import Monitor

    class Capture:
        def __init__(self):
            self.sent = []

        def send(self, payload):
            self.sent.append(json.loads(payload))

    monkeypatch.setattr(ops, "_background", {PERSIST})  # as comms.new_group(..., background=True) marks it
    trace.reset_trace()
    link = Capture()
    mon = Monitor(link, rank=0, interval=60).start()
    trace.close_record(trace.open_record(0, "world", (0, 1), "barrier", 0))
    trace.open_record(0, PERSIST, (0, 1), "all_reduce", 8)
    mon.stop()
    shipped = link.sent[-1]
    assert shipped["groups"] == {"world": [0, 1], PERSIST: [0, 1]} and shipped["background"] == [PERSIST]
    agg = Aggregator(2, check_pids=False)
    assert all(agg.ingest(json.dumps(m).encode()) for m in link.sent)
    assert agg.background == {PERSIST}
    trace.reset_trace()


def test_monitor_reports_fit_the_frame_and_the_backlog_is_bounded():
    import json
    from loom.faults import Monitor, wire

    class Small:
        max_frame = 1500  # bytes of a sealed report

        def __init__(self):
            self.sent, self.fail = [], False

        def send(self, payload):
            if self.fail:
                raise ConnectionError("aggregator unreachable")
            assert len(payload) + wire.MAC_BYTES <= self.max_frame
            self.sent.append(json.loads(payload))

    trace.reset_trace()
    link = Small()
    mon = Monitor(link, rank=0, interval=60, max_records=40, max_backlog=50).start()
    link.fail = True
    for _ in range(70):  # 70 records while the aggregator is away: the 20 oldest are let go
        trace.close_record(trace.open_record(0, "world", (0, 1), "barrier", 0))
    with pytest.raises(ConnectionError):
        mon._ship()
    link.fail = False
    mon.stop()
    reports = link.sent[1:]
    assert len(reports) > 2 and all(len(m["recs"]) <= 40 for m in reports)  # a backlog over several reports
    assert [r[1] for m in reports for r in m["recs"]] == list(range(20, 70))
    assert reports[0]["groups"] == {"world": [0, 1]} and all(m["groups"] == {} for m in reports[1:])
    assert reports[-1]["dropped"] == 20 and reports[-1]["bye"] and not any(m["bye"] for m in reports[:-1])
    agg = Aggregator(2, check_pids=False)
    assert all(agg.ingest(json.dumps(m).encode()) for m in link.sent) and 0 in agg.departed
    trace.reset_trace()


# ------------------------------------------- waiting for background work

SNAPSHOT, SYNC = "ckpt-snapshot[0,1]", "ckpt-sync[0,1]"


def _wait(sim, rank, group, what, t0, t1, step):
    """A `comms.background_wait` record: op wait:<what>, its own sequence numbers."""
    return sim._rec(rank, group, f"wait:{what}", 0, t0, t1, step, channel=("wait:", rank, group), ranks=(0, 1))


def _backpressure(sim, wait_from=20, wait_s=None, hung_from=None):
    """60 ms steps on the world group.  At step ``wait_from`` rank 1's
    optimizer step waits for its snapshot (the host pool is full: a slow
    write), for ``wait_s`` seconds (None: still waiting), while rank 0 waits
    in the loss all-reduce; ``hung_from``: instead rank 1 simply stops."""
    for u in range(wait_from):
        sim.collective({0: 0.0595, 1: 0.0595}, u)
    for r in range(2):  # the snapshot threads agree on the save of the step before
        sim._rec(r, SNAPSHOT, "agree:checkpoint", 8, sim.t, sim.t + 0.001, wait_from - 1, ranks=(0, 1))
    sim.collective({0: 0.05, 1: 0.05}, wait_from)  # the gradient all-reduce of the step
    sim._rec(0, "world", "all_reduce", 16, sim.t + 0.005, None, wait_from)
    if hung_from is None:
        _wait(sim, 1, SNAPSHOT, "snapshot", sim.t + 0.001, None if wait_s is None else sim.t + wait_s, wait_from)


def test_a_rank_waiting_for_its_snapshot_is_a_background_stall_not_a_hang():
    sim = Sim(world=2)
    _backpressure(sim)
    assert detect(sim.recs, now=sim.now(1.5), background={SNAPSHOT}) == []
    faults = detect(sim.recs, now=sim.now(20.0), background={SNAPSHOT})  # a 20 s write
    assert kinds(faults) == [("background_stall", (1,))], faults
    f = faults[0]
    assert not f.fatal and f.group == "world" and f.step == 20
    assert f.evidence.startswith("rank 1 never entered all_reduce #21 of group world (step 20): rank 0 has waited "
                                 "20.0 s (threshold 2.0 s); rank 1 is waiting for background work (wait:snapshot "
                                 f"on background group {SNAPSHOT}) for 20.0 s"), f.evidence
    # the wait is no message: no rank is named for "never entering" it, and every step before it is complete
    assert [w["step"] for w in step_waits(sim.recs, background={SNAPSHOT})] == list(range(20))
    # a wait on a group not known to be background excuses nothing
    assert kinds(detect(sim.recs, now=sim.now(20.0))) == [("hang", (1,))]


def test_a_truly_hung_rank_is_still_a_hang():
    sim = Sim(world=2)
    _backpressure(sim, hung_from=20)
    faults = detect(sim.recs, now=sim.now(2.5), background={SNAPSHOT})
    assert kinds(faults) == [("hang", (1,))] and faults[0].fatal
    # nor does a wait that began before its last training op (another thread's): it did not hold it up
    sim = Sim(world=2)
    _wait(sim, 1, SNAPSHOT, "snapshot", 0.001, None, 0)
    _backpressure(sim, hung_from=20)
    assert kinds(detect(sim.recs, now=sim.now(2.5), background={SNAPSHOT})) == [("hang", (1,))]


def test_a_rank_just_out_of_its_wait_is_excused_for_the_threshold_only():
    sim = Sim(world=2)
    _backpressure(sim, wait_s=20.0)
    # out of its wait 0.5 s ago (the optimizer step runs): still the checkpoint's doing
    faults = detect(sim.recs, now=sim.now(20.5), background={SNAPSHOT})
    assert kinds(faults) == [("background_stall", (1,))]
    assert "rank 1 waited 20.0 s for background work (wait:snapshot on background group " in faults[0].evidence
    assert "until 0.5 s ago" in faults[0].evidence
    # out of it for longer than the hang threshold and still missing: hung
    faults = detect(sim.recs, now=sim.now(22.5), background={SNAPSHOT})
    assert kinds(faults) == [("hang", (1,))] and faults[0].fatal


def _slow_sync_save(sim, group):
    """20 steps, then a synchronous save over ``group``: planned together,
    then rank 1 writes for long while rank 0 waits in the commit's agreement."""
    for u in range(20):
        sim.collective({0: 0.0595, 1: 0.0595}, u)
    for r in range(2):
        _wait(sim, r, SYNC, "checkpoint", sim.t, None, 19)
        sim._rec(r, group, "agree:checkpoint", 8, sim.t + 0.01, sim.t + 0.02, 19, ranks=(0, 1))
    sim.t += 0.02
    sim._rec(0, group, "agree:checkpoint", 8, sim.t + 0.01, None, 19, ranks=(0, 1))


def test_a_slow_synchronous_save_on_its_background_group_is_not_a_hang():
    sim = Sim(world=2)
    _slow_sync_save(sim, SYNC)
    faults = detect(sim.recs, now=sim.now(8.0), background={SYNC})  # an 8 s write
    assert kinds(faults) == [("background_stall", (1,))] and faults[0].group == SYNC
    assert faults[0].evidence.startswith(f"rank 1 never entered agree:checkpoint #1 of background group {SYNC}")
    # the same save on the training group (as before) stopped the job
    sim = Sim(world=2)
    _slow_sync_save(sim, "world")
    assert kinds(detect(sim.recs, now=sim.now(8.0), background={SYNC})) == [("hang", (1,))]


def test_a_rank_still_in_its_synchronous_save_holds_up_the_next_step_as_background_work():
    # rank 0 applies retention after the commit; rank 1 is already in the next step's all-reduce
    sim = Sim(world=2)
    for u in range(20):
        sim.collective({0: 0.0595, 1: 0.0595}, u)
    _wait(sim, 0, SYNC, "checkpoint", sim.t, None, 19)
    _wait(sim, 1, SYNC, "checkpoint", sim.t, sim.t + 0.05, 19)
    sim._rec(1, "world", "all_reduce", 16, sim.t + 0.1, None, 20)
    faults = detect(sim.recs, now=sim.now(5.0), background={SYNC})
    assert kinds(faults) == [("background_stall", (0,))], faults
    assert "rank 0 is waiting for background work (wait:checkpoint on background group ckpt-sync[0,1])" in \
        faults[0].evidence


def test_aggregator_posts_no_verdict_while_a_rank_waits_for_its_snapshot():
    import json
    sim = Sim(world=2)
    _backpressure(sim)
    agg = Aggregator(2, check_pids=False)
    for r, recs in sim.recs.items():  # rank 1's wait and its agreement are both #0 of the snapshot group
        assert agg.ingest(json.dumps(_report(r, recs, [SNAPSHOT])).encode())
    clocks = sim.now(20.0)
    agg.heard = {r: (clocks[r], agg.heard[r][1]) for r in agg.heard}
    published = agg.check(force=True)
    assert kinds(published) == [("background_stall", (1,))] and agg.verdict is None
    assert sorted(x.op for x in agg.snapshot()[1] if x.group == SNAPSHOT) == ["agree:checkpoint", "wait:snapshot"]


def test_aggregator_keeps_an_operation_in_flight_while_newer_records_pass_it():
    # training goes on beside a slow write: far more than a window of newer records follow the open one
    sim = Sim(world=2)
    _training_beside_a_slow_write(sim, 61)
    agg = Aggregator(2, check_pids=False, window=16)
    for r, recs in sim.recs.items():
        for i in range(0, len(recs), 4):  # reports of a few records each, as a monitor sends them
            part = recs[i:i + 4]
            assert agg.ingest(_report(r, part, [PERSIST] if any(x.group == PERSIST for x in part) else []))
    assert all(len(w) <= 16 for w in agg.windows.values())
    clocks = sim.now(0.01)
    agg.heard = {r: (clocks[r], agg.heard[r][1]) for r in agg.heard}
    assert kinds(agg.check(force=True)) == [("background_stall", (1,))] and agg.verdict is None


def test_hang_threshold_scales_with_the_step_time():
    # 1.5 s steps on an overloaded machine: a rank 2.5 s late is slow, not hung;
    # one missing for more than 3 steps' time is a hang
    sim = Sim()
    for u in range(10):
        sim.step(u, compute=1.5)
    for r in range(3):
        sim._rec(r, "world", "all_reduce", 16, sim.t + 0.01, None, 10)
    assert detect(sim.recs, now=sim.now(2.5)) == []
    faults = detect(sim.recs, now=sim.now(4.8))
    assert kinds(faults) == [("hang", (3,))] and "(threshold 4.5 s)" in faults[0].evidence
    # the step factor is a setting (0: the floor and the op durations alone)
    assert kinds(detect(sim.recs, now=sim.now(2.5), config=DetectConfig(hang_step_factor=0))) == [("hang", (3,))]
