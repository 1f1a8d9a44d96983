"""Reload of a rank's checkpoint: host memory (own node, peer node) vs storage.

One rank's state of ``gb`` GiB (8 float32 tensors) is saved with
`loom.checkpoint.save` to a Zarr store on this machine's disk, and handed to
two snapshot holders (`loom.launch.memory_tier`) on the two nodes of a Ray
cluster simulated on this machine (`ray.cluster_utils.Cluster`: the driver's
node and a peer node).  Then `loom.checkpoint.load` reloads it into a fresh
state four ways, every chunk checked against its crc32c in all of them:

- ``storage_cold``: from the store, after its files' pages were dropped from
  the page cache (``posix_fadvise(DONTNEED)`` after ``os.sync``: the bytes
  come from the disk);
- ``storage_warm``: from the store, its pages still in the page cache (what
  a reload right after a save on a local disk sees: the best case of storage);
- ``memory_local``: from the holder on the loading process's node (Ray's
  object store, shared memory: no copy until the target's);
- ``memory_peer``: from the holder on the other node (pulled through Ray's
  object transfer over loopback TCP; on a real cluster, the network).

Each round saves a new step (so the peer's objects are new and not yet
cached on the loading node); each number is the best of ``repeats`` rounds.
The machine is shared (2 CPUs, other jobs): ratios matter, not absolute times.

    python benchmarks/recovery_tiers.py [--gb 1.0] [--quick] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _report import markdown_table, update_results, write_json  # noqa: E402

from loom import checkpoint  # noqa: E402

TENSORS = 8


def _state(gb: float, seed: int) -> dict:
    n = max(1, int(gb * 2**30 / 4 / TENSORS))
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.rand(n, generator=g) for i in range(TENSORS)}


def _empty(state: dict) -> dict:
    return {k: torch.empty_like(v) for k, v in state.items()}


def _drop_page_cache(root: str) -> None:
    """Evict the store's files from the page cache (clean pages only: sync first)."""
    os.sync()
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _timed_load(target: dict, url: str, memory=None) -> tuple[float, dict]:
    t0 = time.perf_counter()
    info = checkpoint.load(target, url, memory=memory)
    return time.perf_counter() - t0, info.tiers


def memory_vs_storage(gb: float = 1.0, repeats: int = 3, workdir: str | None = None) -> dict:
    """Reload times of one rank's ``gb`` GiB checkpoint from each tier.

    Starts its own two-node Ray cluster on this machine (Ray must not be
    initialised in the calling process: ValueError otherwise) and a store
    under ``workdir`` (default: a temporary folder; removed at the end).
    Returns {"gb", "bytes", "repeats", "seconds": {tier: best seconds},
    "gb_per_s": {tier: ...}, "speedup": {"memory_local_vs_storage_cold",
    "memory_local_vs_storage_warm", "memory_peer_vs_storage_cold",
    "memory_peer_vs_storage_warm"}, "save_s", "keep_s" (the save's handoff
    to the two holders, included in save_s), "served": {tier: the chunk
    bytes each memory load took from memory}, "notes"}.  Seconds are
    wall-clock, best of ``repeats`` rounds."""
    import ray
    from ray.cluster_utils import Cluster

    from loom.launch.memory_tier import RaySnapshots, holders_env, release_holders
    if gb <= 0 or repeats < 1:
        raise ValueError(f"gb={gb!r} must be > 0 and repeats={repeats!r} >= 1")
    if ray.is_initialized():
        raise ValueError("memory_vs_storage starts its own Ray cluster: call it with Ray not initialised "
                         "(ray.shutdown() first)")
    nbytes = max(1, int(gb * 2**30 / 4 / TENSORS)) * 4 * TENSORS
    store_mem = int(3 * nbytes + 2**28)  # a holder's copy, the put, a peer's pulled copy; per node
    temp_dir = tempfile.mkdtemp(prefix="loom-rt-")  # short: Ray's socket paths must fit in 107 bytes
    data_dir = tempfile.mkdtemp(prefix="loom-recovery-tiers-", dir=workdir)
    url = os.path.join(data_dir, "ck")
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": False, "temp_dir": temp_dir,
                                      "object_store_memory": store_mem})
    handles: dict = {}
    token = "bench"
    try:
        cluster.add_node(num_cpus=1, temp_dir=temp_dir, object_store_memory=store_mem)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        here = ray.get_runtime_context().get_node_id()
        peer = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here)
        import json
        holders = json.loads(holders_env(token, [here, peer], handles)["LOOM_SNAPSHOT_HOLDERS"])
        both = RaySnapshots(holders, here, rank=0)                   # keeps on this node and the peer
        peer_only = RaySnapshots({peer: holders[peer]}, here, rank=0)  # reads only the peer's copy
        seconds = {t: [] for t in ("storage_cold", "storage_warm", "memory_local", "memory_peer")}
        saves, keeps, served = [], [], {}
        for r in range(repeats):
            state = _state(gb, r)
            kept = []

            class Timed:  # the save's handoff to the holders, timed on its own
                def keep(self, step, chunks, sums):
                    t = time.perf_counter()
                    both.keep(step, chunks, sums)
                    kept.append(time.perf_counter() - t)
            t0 = time.perf_counter()
            checkpoint.save(state, url, step=r + 1, snapshots=Timed())
            saves.append(time.perf_counter() - t0)
            keeps.append(kept[0])
            shutil.rmtree(os.path.join(url, f"step-{r:08d}"), ignore_errors=True)  # the previous round's
            _drop_page_cache(url)
            for tier, memory in (("storage_cold", None), ("storage_warm", None), ("memory_local", both),
                                 ("memory_peer", peer_only)):
                target = _empty(state)
                s, tiers = _timed_load(target, url, memory)
                seconds[tier].append(s)
                if memory is not None:
                    served[tier] = tiers[tier]
                    if tiers["storage"]:
                        raise RuntimeError(f"{tier}: {tiers['storage']} bytes came from storage ({tiers})")
                if r == 0 and not all(torch.equal(target[k], state[k]) for k in state):
                    raise RuntimeError(f"{tier}: the reloaded state differs from the saved one")
                del target
        best = {t: min(v) for t, v in seconds.items()}
        out = {"gb": gb, "bytes": nbytes, "repeats": repeats,
               "seconds": {t: round(v, 4) for t, v in best.items()},
               "gb_per_s": {t: round(nbytes / 2**30 / v, 3) for t, v in best.items()},
               "speedup": {f"{m}_vs_{s}": round(best[s] / best[m], 2)
                           for m in ("memory_local", "memory_peer") for s in ("storage_cold", "storage_warm")},
               "save_s": round(min(saves), 4), "keep_s": round(min(keeps), 4), "served": served,
               "notes": ("one machine: the peer node is a second Ray node on it (loopback TCP); storage is "
                         "this machine's disk, cold after posix_fadvise(DONTNEED) and warm from the page "
                         "cache; 2 CPUs shared with other jobs")}
        return out
    finally:
        if ray.is_initialized():
            release_holders(token, handles)
            ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="GiB of the rank's state (default 1.0)")
    parser.add_argument("--quick", action="store_true", help="0.25 GiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-results-md", action="store_true", help="only the JSON, not RESULTS.md")
    args = parser.parse_args(argv)
    gb = 0.25 if args.quick else args.gb
    result = memory_vs_storage(gb, repeats=args.repeats)
    path = write_json("recovery_tiers", result)
    rows = [[tier, f"{result['seconds'][tier]:.3f}", f"{result['gb_per_s'][tier]:.2f}"]
            for tier in ("memory_local", "memory_peer", "storage_warm", "storage_cold")]
    body = markdown_table(["reload from", "seconds", "GiB/s"], rows) + "\n\n" + \
        ", ".join(f"{k.replace('_', ' ')}: {v}x" for k, v in result["speedup"].items()) + \
        f"\n\nSave {result['save_s']:.2f} s, of which the handoff to both holders {result['keep_s']:.2f} s. " + \
        result["notes"] + "."
    if not args.no_results_md:
        update_results("recovery_tiers", f"Reload of a {gb:g} GiB rank state: host memory vs storage",
                       f"python benchmarks/recovery_tiers.py {'--quick' if args.quick else f'--gb {gb:g}'} "
                       f"--repeats {args.repeats}", body)
    print(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
