"""Topology-aware placement on a simulated multi-node Ray cluster
(`ray.cluster_utils.Cluster`): dp=2 x sp=2 on two 2-CPU nodes, with the
default ``--placement pack``.  The node of every rank is the one its worker
reports (`RankWorker.node_id`, in the run's summary): each sp pair runs on
one node, and each dp group spans both."""
import json
import subprocess
import sys

import pytest

from helpers import ray_test_cluster
from loom.comms import mesh_layout


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_pack_puts_each_sp_group_on_one_node_and_dp_across_nodes(tmp_path, monkeypatch):
    with ray_test_cluster(tmp_path, monkeypatch, [2, 2]) as (c, nodes, _):
        cmd = [sys.executable, "-m", "loom", "train", "--dp", "2", "--sp", "2", "--data", "synthetic", "--dim", "16",
               "--layers", "1", "--heads", "2", "--seq-len", "16", "--batch-size", "2", "--steps", "2",
               "--eval-every", "0", "--no-progress", "--ckpt-every", "0", "--address", c.address,
               "--runs-dir", str(tmp_path), "--name", "pack"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    placement = json.loads((tmp_path / "pack" / "summary.json").read_text())["placement"]
    ranks = placement["nodes"]
    assert set(ranks) == {n.node_id for n in nodes}, placement
    layout = mesh_layout(4, dp=2, sp=2)
    assert all(len({ranks[r] for r in g}) == 1 for g in layout["sp"]), placement
    assert all(len({ranks[r] for r in g}) == 2 for g in layout["dp"]), placement
    assert placement["strategy"] == "pack" and placement["within_node"] == {"sp": [2, 2]} \
        and placement["dp_nodes"] == 2, placement
    a, b = ranks[0][:12], ranks[2][:12]
    assert f"placement pack: ranks 0-1 on node {a}, ranks 2-3 on node {b}; groups within a node: sp 2/2; " \
           f"dp spans 2 nodes" in run.stdout, run.stdout[-4000:]
