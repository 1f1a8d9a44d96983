"""Elastic recovery: the layout choice (`loom.launch.elastic`, pure), the
recovery flags, the worker pool's bookkeeping and --restart-on's persistence
(no Ray); then `loom train` under Ray: shrinking from dp=4 to dp=2, a spare
taking a killed rank's place, a persistent straggler restarted without it."""
import re

import pytest

from loom.launch.cluster import LaunchError
from loom.launch.config import ConfigError, build_config, validate
from loom.launch.elastic import Layout, apply_layout, choose_layout, configured_layout, grow_layout

BASE = {"data": "synthetic", "dim": 16, "layers": 1, "seq_len": 16, "dtype": "float64", "steps": 20,
        "eval_every": 0}


def _cfg(**kw):
    return validate(build_config(overrides={**BASE, **kw}))


def test_the_configured_layout_when_it_fits_and_dp_shrinks_with_grad_accum_growing():
    cfg = _cfg(dp=4, batch_size=4)
    assert choose_layout(cfg, 4, 2) == configured_layout(cfg) == Layout(4, 1, 1, 1)
    assert choose_layout(cfg, 9, 2) == Layout(4, 1, 1, 1)  # never above the configured world
    # 3 healthy: dp=3 cannot divide the batch of 4; dp=2 with twice the micro-batches
    assert choose_layout(cfg, 3, 2) == Layout(2, 1, 1, 2)
    assert choose_layout(cfg, 3, 1, max_workers=1) == Layout(1, 1, 1, 4)
    with pytest.raises(LaunchError, match=r"only 1 healthy worker of the configured 4 .* no valid layout with at "
                                          r"least --min-workers=2"):
        choose_layout(cfg, 1, 2)
    with pytest.raises(LaunchError, match=r"no valid layout at dp=3"):
        choose_layout(cfg, 3, 3)


def test_a_batch_that_does_not_split_evenly_keeps_the_micro_batch_no_larger():
    cfg = _cfg(dp=4, batch_size=12, grad_accum=1)  # 3 sequences per micro-batch
    assert choose_layout(cfg, 3, 1) == Layout(3, 1, 1, 2)  # 4 per rank: 2 micro-batches of 2
    assert choose_layout(cfg, 2, 1) == Layout(2, 1, 1, 2)  # 6 per rank: 2 of 3
    cfg = _cfg(dp=4, batch_size=8, grad_accum=2)  # micro-batches of 1
    assert choose_layout(cfg, 2, 1) == Layout(2, 1, 1, 4)


def test_sequence_and_expert_parallel_degrees_are_kept():
    cfg = _cfg(dp=2, sp=2, batch_size=4)
    assert choose_layout(cfg, 3, 2) == Layout(1, 2, 1, 2)  # world 2: one dp group of sp=2
    with pytest.raises(LaunchError, match="at least --min-workers=3"):
        choose_layout(cfg, 3, 3)
    cfg = _cfg(dp=4, ep=4, moe="standard", num_experts=4, batch_size=8)
    with pytest.raises(LaunchError, match=r"no valid layout at dp=3, dp=2, dp=1"):  # ep=4 divides no smaller world
        choose_layout(cfg, 3, 1)
    cfg = _cfg(dp=4, ep=2, moe="standard", num_experts=4, batch_size=8)
    assert choose_layout(cfg, 3, 1) == Layout(2, 1, 2, 2)


def test_hdp_keeps_its_data_and_fits_the_longest_sequence():
    cfg = _cfg(dp=4, hdp=True, batch_size=8)
    layout = choose_layout(cfg, 3, 1)
    # 4 ranks held 4*16 tokens per micro-batch; 2 ranks take two groups, each 32 tokens per rank
    assert layout == Layout(2, 1, 1, 2, hdp_capacity=32, varlen_max=64)
    shrunk = apply_layout(cfg, layout)
    assert (shrunk.parallel.dp, shrunk.train.grad_accum, shrunk.parallel.hdp_capacity, shrunk.train.varlen_max) \
        == (2, 2, 32, 64)
    validate(shrunk, world_size=2)


def test_apply_layout_drops_injections_of_ranks_outside_the_new_world():
    cfg = _cfg(dp=4, batch_size=4, inject="kill:rank=3,step=12;straggler:rank=1,delay=0.1")
    small = apply_layout(cfg, Layout(2, 1, 1, 2))
    assert small.faults.inject == "straggler:rank=1,delay=0.1,from=0"
    assert cfg.faults.inject.startswith("kill:rank=3")  # the original is left alone
    assert small.world_size == 2 and small.train.batch_size == 4


def test_grow_back_only_to_a_larger_valid_layout_within_max_workers():
    cfg = _cfg(dp=4, batch_size=4)
    small = Layout(2, 1, 1, 2)
    assert grow_layout(cfg, small, 4, 2) == Layout(4, 1, 1, 1)
    assert grow_layout(cfg, small, 3, 2) is None  # dp=3 does not divide the batch
    assert grow_layout(cfg, small, 4, 1, max_workers=2) is None
    assert grow_layout(cfg, Layout(1, 1, 1, 4), 3, 1, max_workers=3) == small


@pytest.mark.parametrize("flags, needle", [
    ({"spare_workers": -1}, "--spare-workers=-1 must be >= 0"),
    ({"min_workers": 5, "ckpt_every": 5, "ckpt_url": "x"}, "--min-workers=5 exceeds the configured world dp*sp=4"),
    ({"max_workers": 3, "ckpt_every": 5, "ckpt_url": "x"}, "--max-workers=3 bounds how far a shrunk job grows "
                                                           "back: it needs --min-workers"),
    ({"min_workers": 2, "max_workers": 6, "ckpt_every": 5, "ckpt_url": "x"},
     "--max-workers=6 must be between --min-workers=2 and the configured world dp*sp=4"),
    ({"min_workers": 3, "max_workers": 2, "ckpt_every": 5, "ckpt_url": "x"}, "--max-workers=2 must be between"),
    ({"restart_on": "hang"}, "--restart-on='hang': unknown kind(s) ['hang']; expected straggler"),
    ({"replace_wait": -1.0}, "--replace-wait=-1.0 must be >= 0"),
    ({"spare_workers": 1}, "--spare-workers act when the job restarts: they need --max-restarts > 0"),
    ({"min_workers": 2, "restart_on": "straggler", "max_restarts": 0},
     "--min-workers and --restart-on act when the job restarts"),
])
def test_the_recovery_flags_are_validated(flags, needle):
    with pytest.raises(ConfigError) as err:
        validate(build_config(overrides={**BASE, "dp": 4, "batch_size": 4, **flags}))
    assert needle in str(err.value)


def test_valid_recovery_flags_pass():
    cfg = validate(build_config(overrides={**BASE, "dp": 4, "batch_size": 4, "ckpt_every": 5, "ckpt_url": "x",
                                           "spare_workers": 1, "min_workers": 2, "max_workers": 4,
                                           "restart_on": "straggler"}))
    assert (cfg.recovery.spare_workers, cfg.recovery.min_workers, cfg.recovery.max_workers) == (1, 2, 4)


# ------------------------------------------------------------------ --restart-on straggler: persistence

def _straggler(rank=1):
    return {"kind": "straggler", "ranks": [rank], "link": None, "group": "dp", "seqs": [3], "score": 2.0,
            "evidence": f"rank {rank} arrived late in 3 of the last 4 steps", "step": 6}


def _waits(step, late_rank=None, late_by=0.3):
    waits = {"0": 0.3, "1": 0.3, "2": 0.3}
    if late_rank is not None:
        waits[str(late_rank)] = 0.3 - late_by  # the late rank waits less: the others waited for it
    return {"step": step, "wait_s": waits, "step_s": {r: 0.31 for r in waits}}


def test_a_straggler_restarts_the_job_only_once_it_persists():
    from loom.faults import DetectConfig
    from loom.launch.restart_on import PersistentStraggler
    judge = PersistentStraggler(3, DetectConfig())
    assert judge.feed({"faults": [], "waits": [_waits(s, 1) for s in range(5)]}) is None  # not flagged yet
    assert judge.feed({"faults": [_straggler()], "waits": [_waits(7, 1), _waits(8, 1)]}) is None
    assert judge.feed({"faults": [], "waits": [_waits(9)]}) is None  # it caught up: the count starts again
    assert judge.feed({"faults": [], "waits": [_waits(10, 1), _waits(11, 1)]}) is None
    assert judge.feed({"faults": [], "waits": [_waits(12, 1, late_by=0.01)]}) is None  # below the threshold
    fault = None
    for step in range(13, 16):
        fault = judge.feed({"faults": [], "waits": [_waits(step, 1)]})
    assert fault is not None and fault.kind == "straggler" and fault.ranks == (1,)
    assert fault.evidence.endswith("; still late in the 3 steps since")
    assert PersistentStraggler(0, DetectConfig()).feed({"faults": [_straggler(2)], "waits": []}).ranks == (2,)


# ------------------------------------------------------------------ the restart record of a grow

def test_a_grow_is_a_restart_record_without_a_fault_and_not_counted_against_the_budget():
    from loom.launch.recovery import Recovery

    class Rec:
        run_dir = None

        def __init__(self):
            self.events, self.restarts = [], []

        def event(self, text):
            self.events.append(text)

        def step(self, row):
            pass

        def restart(self, record):
            self.restarts.append(record)

    rec = Rec()
    recovery = Recovery(validate(build_config(overrides={**BASE, "dp": 4, "batch_size": 4, "max_restarts": 1})), rec)
    tracker = recovery.begin()
    tracker.step({"step": 11, "loss": 1.0})
    err = LaunchError("rank 3 died: its worker process ended", rank=3, kind="died")
    recovery.failed(err, tracker, plan=lambda failure: ({"layout": {"from": {"dp": 4}, "to": {"dp": 2}}},
                                                        "shrinking from dp=4 to dp=2"))
    assert rec.events[-1] == ("restart 1/1 after a died: rank 3 died: its worker process ended, at step 12; "
                              "shrinking from dp=4 to dp=2; resuming from step 0")
    recovery.begin().step({"step": 0, "loss": 1.0})
    recovery.grew(15, {"layout": {"from": {"dp": 2}, "to": {"dp": 4}}}, "growing from dp=2 to dp=4")
    assert recovery.attempt == 2 and recovery.job_dict()["ckpt"]["resume"] is True
    recovery.begin().step({"step": 15, "loss": 1.0})
    assert [r["cause"]["kind"] for r in rec.restarts] == ["died", "grow"]
    grow = rec.restarts[1]
    assert (grow["failed_at_step"], grow["resumed_step"], grow["steps_lost"]) == (15, 15, 0)
    assert grow["layout"]["to"] == {"dp": 4} and grow["recovery_s"] >= 0
    # the budget (1) is spent by the one fault only: a fault now ends the job
    with pytest.raises(LaunchError, match=r"gave up after 1 restart"):
        recovery.failed(LaunchError("rank 0 died", rank=0, kind="died"), recovery.begin())
    # a plan that cannot ready the next attempt ends the job, naming the failure it followed
    recovery = Recovery(validate(build_config(overrides={**BASE, "dp": 4, "batch_size": 4, "max_restarts": 2})),
                        rec)

    def no_room(failure):
        raise LaunchError("only 1 healthy worker of the configured 4")
    with pytest.raises(LaunchError, match=r"^rank 3 died: its worker process ended \(could not restart: only 1 "
                                          r"healthy worker"):
        recovery.failed(err, recovery.begin(), plan=no_room)


# ------------------------------------------------------------------ the worker pool's bookkeeping (no Ray)

class _Actor:
    def __init__(self, bundle):
        self.bundle = bundle
        self.warm = self

    def remote(self):
        return f"warm-{self.bundle}"


@pytest.fixture(params=["spread", "pack"])
def placement(request):
    """The pool's tests hold for both placements (pack: a dp-only job asks no group within a node)."""
    return request.param


def _pool(monkeypatch, world, spares, placed, placement="spread", groups=()):
    from loom.launch import pool as pool_mod
    monkeypatch.setattr(pool_mod, "placement_group_table", lambda pg: {"bundles_to_node_id": {
        b: placed.get(b, "") for b in range(world + spares)}})
    killed = []
    monkeypatch.setattr(pool_mod.ray, "nodes", lambda: [{"NodeID": n, "Alive": n != "dead"} for n in
                                                        {"n0", "n1", "n2", "n3", "n9", "dead"}])
    monkeypatch.setattr(pool_mod.ray, "kill", killed.append)
    monkeypatch.setattr(pool_mod.ray, "wait", lambda refs, timeout=None: ([], refs))
    started = []

    def new_actor(b):
        started.append(b)
        return _Actor(b)
    pool = pool_mod.WorkerPool(object(), world, spares, new_actor, list(groups) if placement == "pack" else None)
    return pool, started, killed


def test_a_faulty_ranks_bundle_is_retired_and_a_warmed_spare_takes_its_rank(monkeypatch, placement):
    placed = {0: "n0", 1: "n1", 2: "n2", 3: "n3"}
    pool, started, killed = _pool(monkeypatch, 3, 1, placed, placement)
    pool.warm()
    assert started == [3] and list(pool.idle) == [3]
    iso = pool.isolate([1], "died", can_shrink=False, nodes=["n0", "n1", "n2"])
    assert iso == [{"rank": 1, "bundle": 1, "node": "n1", "retired": True}] and 1 in pool.retired
    assert pool.assign(3) == [0, 3, 2]
    actors, warmed = pool.take([0, 3, 2])
    assert [a.bundle for a in actors] == [0, 3, 2] and warmed == [False, True, False]
    # no spare left: the next fault's rank gets a fresh process in its own bundle (not retired)
    assert pool.isolate([2], "hang", can_shrink=False)[0]["retired"] is False
    # an exception is the program's: never isolated
    assert pool.isolate([0], "exception", can_shrink=True)[0]["retired"] is False
    # with --min-workers the faulty bundle goes even without a spare: the job shrinks
    assert pool.isolate([2], "lost_rank", can_shrink=True)[0]["retired"] is True
    assert pool.assign(2) == [0, 3] and sorted(pool.retired) == [1, 2]
    # ... but not when the job could not run on what is left: the bundle is used again
    assert pool.isolate([1], "died", can_shrink=lambda n: n >= 2)[0]["retired"] is False
    assert pool.isolate([1], "died", can_shrink=lambda n: n >= 1)[0]["retired"] is True


def test_a_restart_moves_surviving_ranks_onto_warmed_spares_left_over(monkeypatch, placement):
    """Every rank of a restart needs a new process: with spares enough, all
    take warmed ones (faulty ranks first); the first attempt stays put."""
    placed = {b: f"n{b}" for b in range(4)}
    pool, started, _ = _pool(monkeypatch, 2, 2, placed, placement)
    pool.warm()
    assert started == [2, 3] and pool.assign(2, rotate=False) == [0, 1]
    pool.isolate([1], "died", can_shrink=False, nodes=["n0", "n1"])
    assert pool.assign(2) == [3, 2]  # rank 1 (its bundle retired) takes the first spare, rank 0 the other
    assert pool.take([3, 2])[1] == [True, True]
    assert pool.assign(2) == [3, 2]  # no warmed spare left: the same bundles, fresh processes
    pool.warm()
    assert started[-1:] == [0]  # the bundle rank 0 left gets a new spare (bundle 1 stays retired)
    pool2, _, _ = _pool(monkeypatch, 2, 1, placed, placement)
    pool2.warm()
    pool2.isolate([0], "exception", can_shrink=False)  # not isolated: rank 0 keeps its bundle ...
    assert pool2.assign(2) == [2, 1]  # ... but a warmed spare is faster than a new process there


def test_pack_keeps_each_sp_group_on_its_node_through_isolation_and_restarts(monkeypatch):
    """dp=2 x sp=2 and two spares on two 3-bundle nodes (numbered round-robin,
    as Ray may): each sp pair on one node, and a replaced rank takes the
    spare of its pair's node, never the other node's."""
    placed = {b: f"n{b % 2}" for b in range(6)}  # n0: 0 2 4, n1: 1 3 5
    pool, started, _ = _pool(monkeypatch, 4, 2, placed, "pack", groups=[2])
    assert pool.ranks == [0, 2, 1, 3]  # ranks 0, 1 on n0; 2, 3 on n1
    pool.warm()
    assert started == [4, 5] and pool.assign(4, rotate=False) == [0, 2, 1, 3]
    assert pool.isolate([2], "died", can_shrink=False, nodes=["n0", "n0", "n1", "n1"])[0]["retired"] is True
    assert pool.assign(4) == [4, 2, 5, 3]  # rank 2 onto n1's spare; n0's spare takes rank 0 (rotation)
    assert [placed[b] for b in pool.ranks] == ["n0", "n0", "n1", "n1"]
    del placed[3]  # n1 loses another bundle (its node, for now): n0 holds 3, n1 1, no pair fits twice
    bundles = pool.assign(4)
    assert sorted(bundles) == [0, 2, 4, 5] and [placed[b] for b in bundles].count("n0") == 3
    del placed[5]
    with pytest.raises(LaunchError, match="4 workers need 4 placed bundles, but only 3"):
        pool.assign(4)


def test_a_lost_nodes_bundle_is_not_retired_and_serves_again_once_placed(monkeypatch, placement):
    placed = {0: "n0", 1: "n1"}
    pool, started, killed = _pool(monkeypatch, 2, 0, placed, placement)
    del placed[1]  # its node is gone; Ray has not placed the bundle again
    iso = pool.isolate([1], "lost_node", can_shrink=True, nodes=["n0", "n1"])
    assert iso[0]["retired"] is False and iso[0]["node"] == "n1"
    assert pool.usable() == [0] and pool.assign(1) == [0]
    assert pool.wait_usable(2, timeout=0.05, poll=0.01) == [0]
    placed[1] = "n9"  # Ray placed it again on a new node
    assert pool.usable() == [0, 1] and pool.assign(2) == [0, 1]


def test_a_bundle_still_named_on_its_lost_node_is_not_usable(monkeypatch, placement):
    """Ray's table may still name the dead node for a moment after the loss."""
    placed = {0: "n0", 1: "n1", 2: "n2"}
    pool, _, _ = _pool(monkeypatch, 2, 1, placed, placement)
    iso = pool.isolate([1], "lost_node", can_shrink=False, nodes=["n0", "n1"])
    assert iso[0]["retired"] is False and pool.usable() == [0, 2] and pool.assign(2) == [0, 2]
    placed[2] = "dead"  # a node Ray marks dead
    assert pool.usable() == [0]


# ------------------------------------------------------------------ loom train under Ray

TINY = ["--data", "synthetic", "--dim", "16", "--layers", "1", "--seq-len", "16", "--batch-size", "4",
        "--dtype", "float64", "--steps", "20", "--eval-every", "0", "--no-progress", "--ckpt-every", "5",
        "--ckpt-mode", "sync"]


def _loom(tmp, name, *args, timeout=150):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "loom", "train", *TINY, "--runs-dir", str(tmp), "--name", name,
                           "--ckpt-url", str(tmp / f"ck-{name}"), *args], capture_output=True, text=True,
                          timeout=timeout)


def _rows(run):
    import json
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _restarts(run):
    import json
    return [json.loads(x) for x in (run / "restarts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted runs' losses by step, at dp=2 and dp=4 (made once, when asked)."""
    tmp, made = tmp_path_factory.mktemp("ref"), {}

    def losses(dp):
        if dp not in made:
            ref = _loom(tmp, f"ref{dp}", "--dp", str(dp))
            assert ref.returncode == 0, ref.stderr[-3000:]
            made[dp] = {x["step"]: x["loss"] for x in _rows(tmp / f"ref{dp}")}
            assert len(made[dp]) == 20
        return made[dp]
    return losses


@pytest.mark.e2e
@pytest.mark.timeout(200)
def test_a_job_that_loses_a_worker_shrinks_from_dp4_to_dp2_with_the_same_losses(tmp_path, reference):
    """dp=4, --min-workers 2, no spare: rank 3 killed at step 12; its bundle is
    retired, 3 workers are left, and dp=3 cannot split the batch of 4, so the
    job continues at dp=2 with twice the micro-batches: every step's loss is
    the uninterrupted dp=4 run's."""
    proc = _loom(tmp_path, "shrink", "--dp", "4", "--min-workers", "2", "--inject", "kill:rank=3,step=12")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"restart 1/3 after a (lost rank|died): rank 3 .*, at step 12; rank 3's bundle 3 \(node \w+\) "
                     r"retired, the job shrinks; shrinking from dp=4 \(grad-accum 1\) to dp=2 \(grad-accum 2\); "
                     r"resuming from step 10", proc.stdout), proc.stdout[-3000:]
    run = tmp_path / "shrink"
    [r] = _restarts(run)
    assert r["layout"] == {"from": {"dp": 4, "sp": 1, "ep": 1, "grad_accum": 1, "world": 4},
                           "to": {"dp": 2, "sp": 1, "ep": 1, "grad_accum": 2, "world": 2}}
    assert r["isolated"] == [{"rank": 3, "bundle": 3, "node": r["placement"]["failed"][3], "retired": True,
                              "replaced_by": "shrunk"}]
    assert (r["resumed_step"], len(r["placement"]["resumed"])) == (10, 2)
    rows = _rows(run)
    assert [x["step"] for x in rows if x["attempt"] == 1] == list(range(10, 20))
    ref = reference(4)
    for x in rows:
        assert x["loss"] == pytest.approx(ref[x["step"]], abs=1e-9, rel=0), x


@pytest.mark.e2e
@pytest.mark.timeout(200)
def test_a_killed_ranks_bundle_is_retired_and_a_warmed_spare_takes_its_place(tmp_path, reference):
    proc = _loom(tmp_path, "spare", "--dp", "2", "--spare-workers", "1", "--inject", "kill:rank=1,step=12")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"at step 12; rank 1's bundle 1 \(node \w+\) retired, a spare in bundle 2 takes its place; "
                     r"resuming from step 10", proc.stdout), proc.stdout[-3000:]
    [r] = _restarts(tmp_path / "spare")
    assert r["isolated"][0] | {"node": None} == {"rank": 1, "bundle": 1, "node": None, "retired": True,
                                                "replaced_by": "spare"}
    assert r["bundles"] == [0, 2] and "layout" not in r
    ref = reference(2)
    for x in _rows(tmp_path / "spare"):
        assert x["loss"] == pytest.approx(ref[x["step"]], abs=1e-10, rel=0), x


@pytest.mark.e2e
@pytest.mark.timeout(200)
def test_a_persistent_straggler_is_restarted_without_it(tmp_path, reference):
    proc = _loom(tmp_path, "strag", "--dp", "2", "--spare-workers", "1", "--restart-on", "straggler",
                 "--restart-straggler-steps", "2", "--inject", "straggler:rank=1,delay=0.3,from=6")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "restart 1/3 after a straggler: rank 1 arrived late" in proc.stdout, proc.stdout[-3000:]
    [r] = _restarts(tmp_path / "strag")
    assert (r["cause"]["kind"], r["cause"]["rank"]) == ("straggler", 1)
    # at least the 2 steps asked; more when one poll of the monitor's log brings several steps at once
    late = re.search(r"still late in the (\d+) steps since", r["cause"]["evidence"])
    assert late and int(late.group(1)) >= 2, r["cause"]["evidence"]
    assert r["isolated"][0]["replaced_by"] == "spare" and r["bundles"] == [0, 2]
    ref = reference(2)
    for x in _rows(tmp_path / "strag"):
        assert x["loss"] == pytest.approx(ref[x["step"]], abs=1e-10, rel=0), x


def test_assigning_more_ranks_than_placed_bundles_is_a_clear_error(monkeypatch, placement):
    placed = {0: "n0", 1: "n1"}
    pool, _, _ = _pool(monkeypatch, 2, 0, placed, placement)
    del placed[1]
    with pytest.raises(LaunchError, match=r"2 workers need 2 placed bundles, but only 1 are placed"):
        pool.assign(2)
