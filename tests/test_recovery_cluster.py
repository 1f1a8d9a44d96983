"""Losing a node mid-run (simulated multi-node): a Ray cluster of several
nodes on this machine (`ray.cluster_utils.Cluster`, the test's own: a new
head with its own session directory and HOME), workers spread over them, and
a spare node.  Removing the node that holds rank 1 after a checkpoint ends
the attempt; Ray places the lost bundle again on the spare, and the job
resumes there at the same size with the uninterrupted run's losses."""
import json
import subprocess
import sys

import pytest

from helpers import ray_test_cluster
from loom.launch import cluster as loom_cluster
from loom.launch.ray_driver import _death, _lost_node

TINY = ["--dp", "2", "--data", "synthetic", "--dim", "16", "--layers", "1", "--seq-len", "16", "--batch-size", "4",
        "--dtype", "float64", "--steps", "40", "--eval-every", "0", "--no-progress", "--ckpt-every", "5",
        "--ckpt-mode", "sync"]

# Ray 2.60's ActorDiedError text for an actor whose node went away
_NODE_DIED = ("The actor died unexpectedly before finishing this task.\n\tclass_name: RankWorker\n\tactor_id: 84c5\n"
              "\tpid: 32369\n\tnamespace: a1c7\n\tip: 192.0.2.2\nThe actor died because its node has died. Node Id: "
              "22ebd74f290f96d5d47c3f7de89334c883a7cda0b653f089003e6648\n\tthe actor's node was terminated "
              "expectedly: received SIGTERM")


def test_an_actor_lost_with_its_node_names_the_node():
    assert _lost_node(_NODE_DIED) == ("22ebd74f290f96d5d47c3f7de89334c883a7cda0b653f089003e6648",
                                      "terminated expectedly: received SIGTERM")
    assert _death(_NODE_DIED) == "its Ray node 22ebd74f290f was lost (terminated expectedly: received SIGTERM)"
    assert _lost_node("The actor died unexpectedly before finishing this task.\n\tpid: 7") is None
    assert _death("The actor died unexpectedly before finishing this task.\n\tpid: 7") == \
        "its worker process ended (pid 7)"


def test_a_lost_nodes_workers_that_cannot_be_placed_again_fail_after_the_timeout(monkeypatch):
    """No spare and no node coming back: a clear error after the timeout,
    naming what the live nodes hold (never an endless wait)."""
    import ray.util
    states = iter(["RESCHEDULING"] * 1000)
    monkeypatch.setattr(ray.util, "placement_group_table", lambda pg: {"state": next(states)})
    monkeypatch.setattr(loom_cluster.ray, "nodes", lambda: [
        {"Alive": True, "Resources": {"CPU": 1.0}}, {"Alive": False, "Resources": {"CPU": 1.0}},
        {"Alive": True, "Resources": {"memory": 1.0}}])
    monkeypatch.setattr(loom_cluster.ray, "available_resources", lambda: {"CPU": 0.0})
    notes = []
    with pytest.raises(loom_cluster.LaunchError, match=r"Ray could not place the 2 workers \(CPU 1 each\) again "
                                                       r"within 0s after a node was lost: the live nodes hold 1 of "
                                                       r"them \(node 0: CPU 1; node 1: nothing\)\. Add a node"):
        loom_cluster.wait_replaced(object(), {"CPU": 1.0}, 2, 0.3, notes.append, every=0.1, poll=0.05)
    assert notes and notes[0].startswith("waiting for Ray to place the workers of a lost node again")
    monkeypatch.setattr(ray.util, "placement_group_table", lambda pg: {"state": "CREATED"})
    loom_cluster.wait_replaced(object(), {"CPU": 1.0}, 2, 0.0)  # nothing missing: at once
    monkeypatch.setattr(ray.util, "placement_group_table", lambda pg: {"state": "REMOVED"})
    with pytest.raises(loom_cluster.LaunchError, match="placement group was removed"):
        loom_cluster.wait_replaced(object(), {"CPU": 1.0}, 2, 10.0)


@pytest.fixture
def ray_cluster(tmp_path, monkeypatch):
    """A head with no CPUs for workers (the driver's node) and three 1-CPU
    worker nodes: two for the job's workers, one spare."""
    with ray_test_cluster(tmp_path, monkeypatch, [1, 1, 1]) as (c, nodes, _):
        yield c, nodes


def _run_losing_rank1s_node(c, nodes, cmd, on_line=None):
    """Run ``cmd`` (`loom train` on the cluster ``c``) to its end (exit 0),
    removing the node of rank 1 (the driver's ``attempt 0:`` line names it)
    once the step-5 checkpoint is in; ``on_line(line)`` sees every line.
    Event-driven: the driver's own lines say where rank 1 runs and when to
    act.  Returns (the output, the node removed)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, removed, rank1 = [], None, None
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("attempt 0: ") and rank1 is None:
                rank1 = line.split("rank 1 on node ")[1].split()[0].rstrip(",")
            if removed is None and rank1 and line.startswith("checkpoint") and "step-00000005" in line:
                removed = next(n for n in nodes if n.node_id.startswith(rank1))
                c.remove_node(removed)
            if on_line is not None:
                on_line(line)
        assert proc.wait(timeout=60) == 0, "".join(out)[-4000:]
    finally:
        proc.kill()
    text = "".join(out)
    assert removed is not None, text[-4000:]
    return text, removed


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_lost_node_is_replaced_by_the_spare_and_the_job_resumes_at_the_same_size(ray_cluster, tmp_path):
    c, nodes = ray_cluster
    slow = ["--inject", "straggler:rank=0,delay=0.1,attempts=all"]  # steps that last long enough to lose a node in
    cmd = [sys.executable, "-m", "loom", "train", *TINY, *slow, "--address", c.address, "--max-restarts", "2",
           "--ckpt-url", str(tmp_path / "ck"), "--runs-dir", str(tmp_path), "--name", "node"]
    text, removed = _run_losing_rank1s_node(c, nodes, cmd)
    run = tmp_path / "node"
    restarts = [json.loads(x) for x in (run / "restarts.jsonl").read_text().splitlines()]
    assert len(restarts) == 1, restarts
    r = restarts[0]
    assert r["cause"]["kind"] == "lost_node" and r["cause"]["rank"] == 1 and r["cause"]["node"] == removed.node_id
    assert f"rank 1 lost with its Ray node {removed.node_id[:12]}" in r["cause"]["evidence"]
    assert f"restart 1/2 after a lost node: rank 1 lost with its Ray node {removed.node_id[:12]}" in text
    # the same size, rank 0 where it was, rank 1 on the spare (never on the lost node)
    spare = {n.node_id for n in nodes} - set(r["placement"]["failed"])
    assert r["placement"]["failed"][1] == removed.node_id
    assert r["placement"]["resumed"] == [r["placement"]["failed"][0], *spare]
    assert r["resumed_step"] >= 5 and r["resumed_step"] % 5 == 0 and r["steps_lost"] >= 0
    # the reload came from host memory: rank 0 from its own node's holder, rank 1 (on the spare, whose node
    # and holder are gone) from the copy its old node's peer holder kept; nothing from storage
    assert r["reload"]["ranks"] == ["memory", "peer"] and r["reload"]["tier"] == "peer", r["reload"]
    assert r["reload"]["bytes"]["storage"] == 0 and r["reload"]["bytes"]["memory_peer"] > 0, r["reload"]
    rows = _rows(run)
    assert [x["step"] for x in rows if x["attempt"] == 1] == list(range(r["resumed_step"], 40))

    ref = subprocess.run([sys.executable, "-m", "loom", "train", *TINY, "--ckpt-url", str(tmp_path / "ref-ck"),
                          "--runs-dir", str(tmp_path), "--name", "ref"], capture_output=True, text=True, timeout=150)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = {x["step"]: x["loss"] for x in _rows(tmp_path / "ref")}
    assert len(reference) == 40
    for x in rows:
        assert x["loss"] == pytest.approx(reference[x["step"]], abs=1e-10, rel=0), x


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
    """As `ray_cluster`, with two 1-CPU worker nodes and no spare (a third can be added)."""
    with ray_test_cluster(tmp_path, monkeypatch, [1, 1]) as cluster:
        yield cluster


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_lost_node_without_a_spare_shrinks_the_job_and_it_grows_back_when_a_node_returns(two_nodes, tmp_path):
    """dp=2 on two nodes, --min-workers 1: the node of rank 1 is removed after
    the step-5 checkpoint; Ray cannot place its bundle again, so after
    --replace-wait the job continues at dp=1 (grad-accum 2).  A node is then
    added: Ray places the bundle on it, the workers stop at their next
    checkpoint and the job grows back to dp=2.  Every step's loss is the
    uninterrupted dp=2 run's."""
    c, nodes, temp_dir = two_nodes
    steps = ["--steps", "60", "--inject", "straggler:rank=0,delay=0.2,attempts=all"]
    cmd = [sys.executable, "-m", "loom", "train", *TINY, *steps, "--address", c.address, "--max-restarts", "2",
           "--min-workers", "1", "--replace-wait", "2", "--ckpt-url", str(tmp_path / "ck"), "--runs-dir",
           str(tmp_path), "--name", "elastic"]
    added = []

    def add_a_node(line):
        if not added and line.startswith("restart 1/2 ") and "shrinking" in line:
            added.append(c.add_node(num_cpus=1, temp_dir=temp_dir))
    text, removed = _run_losing_rank1s_node(c, nodes, cmd, add_a_node)
    assert added, text[-4000:]
    added = added[0]
    assert "shrinking from dp=2 (grad-accum 1) to dp=1 (grad-accum 2)" in text, text[-4000:]
    assert "growing from dp=1 (grad-accum 2) to dp=2 (grad-accum 1): more workers can be placed again: stopped " \
           "at the checkpoint of step" in text, text[-4000:]
    run = tmp_path / "elastic"
    shrink, grow = [json.loads(x) for x in (run / "restarts.jsonl").read_text().splitlines()]
    assert shrink["cause"]["kind"] == "lost_node" and shrink["layout"]["to"]["dp"] == 1
    assert shrink["isolated"][0]["replaced_by"] == "shrunk" and shrink["isolated"][0]["retired"] is False
    assert grow["cause"]["kind"] == "grow" and grow["steps_lost"] == 0 and grow["layout"]["to"]["dp"] == 2
    assert grow["resumed_step"] % 5 == 0 and added.node_id in grow["placement"]["resumed"]
    rows = _rows(run)
    assert [x["step"] for x in rows if x["attempt"] == 2] == list(range(grow["resumed_step"], 60))
    ref = subprocess.run([sys.executable, "-m", "loom", "train", *TINY, "--steps", "60", "--ckpt-url",
                          str(tmp_path / "ref-ck"), "--runs-dir", str(tmp_path), "--name", "ref"],
                         capture_output=True, text=True, timeout=150)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = {x["step"]: x["loss"] for x in _rows(tmp_path / "ref")}
    for x in rows:
        assert x["loss"] == pytest.approx(reference[x["step"]], abs=1e-9, rel=0), x


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_lost_node_with_a_spare_worker_restarts_at_once_on_the_warmed_spare(ray_cluster, tmp_path):
    """--spare-workers 1 on three nodes: the spare's bundle (and its warmed
    worker) sits on the third node.  The node of rank 1 is removed: rank 1
    moves to the spare without waiting for Ray to place anything again; its
    bundle is not retired (Ray may place it again on a new node)."""
    c, nodes = ray_cluster
    slow = ["--inject", "straggler:rank=0,delay=0.1,attempts=all"]
    cmd = [sys.executable, "-m", "loom", "train", *TINY, *slow, "--address", c.address, "--max-restarts", "2",
           "--spare-workers", "1", "--ckpt-url", str(tmp_path / "ck"), "--runs-dir", str(tmp_path), "--name", "sp"]
    text, removed = _run_losing_rank1s_node(c, nodes, cmd)
    [r] = [json.loads(x) for x in (tmp_path / "sp" / "restarts.jsonl").read_text().splitlines()]
    assert r["cause"]["kind"] == "lost_node" and r["cause"]["node"] == removed.node_id
    assert r["isolated"] == [{"rank": 1, "bundle": 1, "node": removed.node_id, "retired": False,
                              "replaced_by": "spare"}]
    assert r["bundles"] == [0, 2] and removed.node_id not in r["placement"]["resumed"]
    assert "waiting for Ray to place" not in text
    assert f"rank 1's bundle 1 (node {removed.node_id[:12]}) left until Ray places it again, a spare in bundle 2 " \
           f"takes its place" in text, text[-4000:]
    rows = _rows(tmp_path / "sp")
    assert [x["step"] for x in rows if x["attempt"] == 1] == list(range(r["resumed_step"], 40))
