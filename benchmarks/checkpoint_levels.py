"""Checkpoint levels: loom's checkpoints on a real S3-compatible server, against
s3fs's raw put/get and PyTorch DCP's fsspec writer/reader, with a local
directory store beside it.

The script starts its own moto server (``moto[server]``, the ``test`` extra;
tests/s3_server.py) on 127.0.0.1 and a random port, points every process at
it (dummy credentials in ``AWS_*``, the endpoint as the storage option
``endpoint_url`` through `loom.checkpoint.object_store.use_storage_options`,
which s3fs, loom and DCP's ``url_to_fs`` all read), and runs two ranks
(gloo, one long-lived process each) that hold a float32 state of
``--size-mb`` MiB, every tensor sharded by rows over the two ranks (so each
rank writes and reads half of the bytes, in parallel, as in data-parallel
training).  Measured side by side, in one run:

1. Save and load GB/s to S3: ``loom.checkpoint.save`` / ``load`` against
   s3fs's raw ``pipe_file`` / ``cat_file`` of the same bytes (the same
   number of objects of the same sizes, per rank, as loom's chunk objects),
   once with loom's concurrency (`IO_THREADS` threads per rank) and once as
   s3fs's best case (every object of a rank at once, ``pipe`` / ``cat``);
   and against DCP's ``FsspecWriter`` / ``FsspecReader`` on the same server
   and storage options (``thread_count`` = loom's threads, no fsync).
   Rounds alternate; each number is the best of ``--repeats``.
2. Stall (time the training loop is blocked) and time-to-durable (the save
   call to its commit: the ``COMMITTED`` marker written, checked visible
   afterwards) per level and method: ``save`` (synchronous),
   `AsyncCheckpointer` with its writer thread and ``writer="process"``.
3. Load GB/s of one checkpoint from S3 and from a local directory copy of it.

Levels: ``s3`` is the moto server; ``local`` is a plain local directory
store (``--dir``, page cache, no fsync) as the stand-in for a node-local
level: each level here is a separate store, written and read on its own.
4. ``--part multilevel`` (also part of a full run, in its own section of
   RESULTS.md): `loom.checkpoint.MultiLevel` -- the local level in a local
   directory, copied to S3 in the background -- with the stall and the time
   to the local and to the remote commit per checkpoint, for the local
   commit in the loop (``--ckpt-mode sync``) and in the background from a
   host-memory snapshot (``async``, `MultiLevel(background=True)`), and the
   last step loaded through `load_levels` from the local level and from S3
   (local level empty).

It also checks that chunks larger than s3fs's block size go up as multipart
uploads: one more loom save with ``default_block_size`` = 5 MiB (s3fs's
smallest), counting the requests moto served (its request log) and reading
every chunk object's ETag (``<md5>-<parts>`` for a multipart upload).

moto is a Python server sharing the machine's cores with both ranks, so the
absolute numbers are moto's; the ratios compare clients of the same server.

    python benchmarks/checkpoint_levels.py [--size-mb 256] [--repeats 3] [--checkpoints 3] [--quick]
                                           [--part all|multilevel]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the moto server the tests use
from _report import command_line, markdown_table, update_results, write_json  # noqa: E402
from s3_server import MotoS3, s3_operation  # noqa: E402

from loom import checkpoint as ckpt  # noqa: E402
from loom import comms  # noqa: E402
from loom.checkpoint import layout, object_store  # noqa: E402
from loom.checkpoint.save import IO_THREADS  # noqa: E402
from loom.checkpoint.store import CheckpointStore, step_name  # noqa: E402
from loom.comms.testing import WorkerPool  # noqa: E402

WORLD = 2
COLS = 1024
MIB = 1 << 20
#: The stores measured one by one (multi-level checkpoints: `multilevel_run`).
LEVELS = {"local": "local directory store (page cache, no fsync)",
          "s3": "S3 (moto server on 127.0.0.1)"}
MODES = ("sync", "thread", "process")
MODE_LABELS = {"sync": "loom save (synchronous)", "thread": "AsyncCheckpointer, writer thread",
               "process": "AsyncCheckpointer, writer='process'"}
MULTIPART_BLOCK = 5 * MIB  # s3fs's smallest block size (S3's smallest part)


def shape_of(size_mb: float) -> tuple[int, int]:
    """(tensors, rows of each): float32 tensors of ``COLS`` columns whose
    row halves are at most loom's chunk target, ``size_mb`` MiB in all."""
    total = int(size_mb * MIB)
    n = max(1, min(8, round(total / (2 * layout.TARGET_CHUNK_BYTES))))
    rows = total // (4 * COLS * n)
    rows -= rows % WORLD
    if rows < WORLD:
        raise ValueError(f"--size-mb {size_mb} is too small")
    return n, rows


# ------------------------------------------------------------ worker side

_CACHE: dict = {}


def _tensors(n: int, rows: int) -> tuple[dict, dict]:
    """This rank's row halves (seeded by rank) and zeroed targets of the same shapes."""
    if _CACHE.get("key") != (n, rows):
        _CACHE.clear()
        g = torch.Generator().manual_seed(dist.get_rank())
        local = {f"t{i}": torch.rand(rows // WORLD, COLS, generator=g) for i in range(n)}
        _CACHE.update(key=(n, rows), local=local, targets={k: torch.zeros_like(t) for k, t in local.items()})
    return _CACHE["local"], _CACHE["targets"]


def _state(tensors: dict, rows: int) -> dict:
    lo = dist.get_rank() * (rows // WORLD)
    return {"model": {k: ckpt.Shard(t, (rows, COLS), (lo, 0)) for k, t in tensors.items()}}


def _check(targets: dict, local: dict) -> None:
    for k, t in targets.items():
        if not torch.equal(t, local[k]):
            raise AssertionError(f"loaded values of {k} differ from the saved ones")
        t.zero_()


def _configure(options: dict) -> None:
    """Exactly ``options`` as the storage options of every s3:// filesystem of this process."""
    import fsspec.config
    for proto in ("s3", "s3a"):
        fsspec.config.conf.pop(proto, None)
    object_store.use_storage_options("s3://bucket", options)


def _clock(fn) -> float:
    """Wall time of ``fn`` on every rank between barriers (the slowest rank's)."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def _remove(url: str) -> None:
    """Rank 0 removes a store or prefix (local or s3://), between barriers."""
    dist.barrier()
    if dist.get_rank() == 0:
        if object_store.is_remote(url):
            import fsspec
            fs, path = fsspec.core.url_to_fs(url)
            if fs.exists(path):
                fs.rm(path, recursive=True)
        else:
            shutil.rmtree(url, ignore_errors=True)
    dist.barrier()


def loom_round(url: str, n: int, rows: int, step: int, options: dict, load: bool = True,
               keep: bool = False) -> dict:
    """Save (and load back) the state as ``step``: {"save": s, "load": s}.
    The step is deleted afterwards unless ``keep``."""
    _configure(options)
    local, targets = _tensors(n, rows)
    out = {"save": _clock(lambda: ckpt.save(_state(local, rows), url, step=step))}
    if load:
        target = _state(targets, rows)
        out["load"] = _clock(lambda: ckpt.load(target, url, step=step))
        _check(targets, local)
    if not keep:
        _remove(f"{url}/{step_name(step)}")
    return out


def overhead_round(url: str, step: int, options: dict) -> dict:
    """loom's fixed cost per save and load: the same calls on a tiny state
    (one float32 row of ``COLS`` per rank), so the time is the requests and
    agreements around the chunks (claim check, listings, metadata
    documents, manifest, marker, ``latest``)."""
    _configure(options)
    rank = dist.get_rank()
    mine = torch.full((1, COLS), float(rank + 1))
    back = torch.zeros_like(mine)

    def state(t):
        return {"model": {"w": ckpt.Shard(t, (WORLD, COLS), (rank, 0))}}
    out = {"save": _clock(lambda: ckpt.save(state(mine), url, step=step))}
    out["load"] = _clock(lambda: ckpt.load(state(back), url, step=step))
    if not torch.equal(back, mine):
        raise AssertionError("the tiny state did not load back")
    _remove(f"{url}/{step_name(step)}")
    return out


def chunk_objects(url: str, step: int) -> dict[int, list[int]]:
    """{rank: [bytes of each chunk object it wrote]} of a committed step,
    from its manifest (the rank whose fragment holds a chunk writes it)."""
    manifest, _ = CheckpointStore(url).read_sealed(step)
    out: dict[int, list[int]] = {}
    for _, entry in sorted(manifest.tensors.items()):
        shape, chunks = entry.storage_shape, entry.chunks
        size = math.prod(chunks) * entry.tensor_dtype.itemsize
        fragments = [(f.rank, f.box) for f in entry.fragments]
        for index in layout.chunk_indices(shape, chunks):
            box = layout.chunk_box(index, shape, chunks)
            owner = next(r for r, frag in fragments if layout.intersect(box, frag) == box)
            out.setdefault(owner, []).append(size)
    return out


def _slices(tensors: dict, sizes: list[int]) -> list[memoryview]:
    """The bytes of ``tensors`` (in order) cut into pieces of ``sizes``."""
    views = [memoryview(t.numpy()).cast("B") for t in tensors.values()]
    if sum(sizes) != sum(len(v) for v in views):
        raise ValueError(f"objects of {sum(sizes)} bytes for {sum(len(v) for v in views)} bytes of tensors")
    out, i, at = [], 0, 0
    for size in sizes:
        if at == len(views[i]):
            i, at = i + 1, 0
        piece = views[i][at:at + size]
        if len(piece) != size:
            raise ValueError(f"an object of {size} bytes would straddle two tensors")
        out.append(piece)
        at += size
    return out


def raw_round(prefix: str, n: int, rows: int, sizes: dict, options: dict, batch: bool) -> dict:
    """s3fs's own put and get of this rank's bytes as objects of ``sizes[rank]``
    bytes: ``pipe_file`` / ``cat_file`` on `IO_THREADS` threads (loom's
    concurrency), or (``batch``) ``pipe`` / ``cat_ranges`` of every object at
    once.  Reads are ranged (``start=0, end=size``: one GET, where a plain
    ``cat_file`` asks for the size first); got bytes are copied into the
    targets, as a load would."""
    import fsspec
    _configure(options)
    fs = fsspec.filesystem("s3")
    rank = dist.get_rank()
    local, targets = _tensors(n, rows)
    base = prefix.split("://", 1)[1]
    paths = [f"{base}/rank{rank}/{i}" for i in range(len(sizes[rank]))]
    src, dst = _slices(local, sizes[rank]), _slices(targets, sizes[rank])

    def put():
        if batch:
            fs.pipe({p: bytes(v) for p, v in zip(paths, src)})
        else:
            with ThreadPoolExecutor(IO_THREADS) as pool:
                list(pool.map(lambda pv: fs.pipe_file(pv[0], bytes(pv[1])), zip(paths, src)))

    def get():  # ranged reads (the sizes are known): one GET each, no HEAD first
        if batch:
            for got, v in zip(fs.cat_ranges(paths, [0] * len(paths), [len(v) for v in dst]), dst):
                v[:] = got
        else:
            def one(pv):
                pv[1][:] = fs.cat_file(pv[0], start=0, end=len(pv[1]))
            with ThreadPoolExecutor(IO_THREADS) as pool:
                list(pool.map(one, zip(paths, dst)))

    out = {"save": _clock(put), "load": _clock(get)}
    _check(targets, local)
    _remove(prefix)
    return out


def dcp_round(url: str, n: int, rows: int, options: dict) -> dict:
    """PyTorch DCP: save / load DTensor row shards through FsspecWriter /
    FsspecReader at ``url`` (``thread_count`` = loom's threads, no fsync:
    an S3 PUT is durable when it returns)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh
    _configure(options)
    local, targets = _tensors(n, rows)
    mesh = init_device_mesh("cpu", (WORLD,))

    def dt(tensors):
        return {k: DTensor.from_local(t, mesh, [Shard(0)], run_check=False) for k, t in tensors.items()}
    state, target = dt(local), dt(targets)
    out = {"save": _clock(lambda: dcp.save(state, storage_writer=FsspecWriter(
        url, sync_files=False, thread_count=IO_THREADS, **options)))}
    out["load"] = _clock(lambda: dcp.load(target, storage_reader=FsspecReader(url, **options)))
    _check(targets, local)
    _remove(url)
    return out


def load_levels(urls: dict, step: int, n: int, rows: int, repeats: int, options: dict) -> dict:
    """Load the same checkpoint from every level's store (``{level: url}``),
    levels alternating; the best time of ``repeats`` per level."""
    _configure(options)
    local, targets = _tensors(n, rows)
    best = dict.fromkeys(urls, float("inf"))
    for _ in range(repeats):
        for level, url in urls.items():
            target = _state(targets, rows)
            best[level] = min(best[level], _clock(lambda: ckpt.load(target, url, step=step)))
            _check(targets, local)
    return best


def _calibrate(step_ms: float) -> tuple[torch.Tensor, int]:
    """A matmul operand and how many matmuls take about ``step_ms`` here."""
    a = torch.randn(256, 256)
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    per = (time.perf_counter() - t0) / 20
    return a, max(1, round(step_ms / 1e3 / per))


def _training(n: int, rows: int, step_ms: float):
    """(optimizer, state(), train_step(), seconds per step): a fixed amount of
    matmul work then an SGD step over this rank's rows of the state."""
    local, _ = _tensors(n, rows)
    params = [torch.nn.Parameter(t.clone()) for t in local.values()]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt = torch.optim.SGD(params, lr=1e-3)
    a, reps = _calibrate(step_ms)
    lo = dist.get_rank() * (rows // WORLD)

    def state():
        return {"model": {f"t{i}": ckpt.Shard(p.detach(), (rows, COLS), (lo, 0)) for i, p in enumerate(params)}}

    def train_step():
        for _ in range(reps):
            a @ a
        opt.step()

    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(3):
        train_step()
    return opt, state, train_step, (time.perf_counter() - t0) / 3


def multilevel_run(url: str, local_dir: str, n: int, rows: int, checkpoints: int, step_ms: float,
                   repeats: int, options: dict, background: bool = False) -> dict:
    """Multi-level checkpoints (`MultiLevel`: the local level ``local_dir``,
    one node, then ``url`` in the background): per checkpoint the stall, the
    time to the local commit and to the remote commit (training goes on
    meanwhile); then the last step loaded through `load_levels` from the
    local level and, with the local level removed, from the remote store
    (best of ``repeats``).  Times are the slowest rank's.  The stall: the
    local commit plus any wait for room among the pending copies; with
    ``background`` (``--ckpt-mode async``) the host-memory snapshot only
    (the local commit runs in the background, from the snapshot)."""
    _configure(options)
    opt, state, train_step, step_s = _training(n, rows, step_ms)
    copy_group = comms.new_group(name="ckpt-remote", background=True)
    levels = ckpt.MultiLevel(url, local_dir, copy_group=copy_group, keep_last_local=2, max_pending=1,
                             background=background)
    levels.attach(opt)
    stalls, local_s, remote_s, steps_during = [], [], [], []
    try:
        for k in range(checkpoints + 1):  # k = 0: the warm-up
            train_step()
            dist.barrier()
            t0 = time.monotonic()
            saved = levels.save(state(), step=k)
            committed = []  # background: when the local marker was written
            if background:
                saved.add_done_callback(lambda _loc, _err: committed.append(time.monotonic()))
                levels.wait_snapshot()  # what the next optimizer step would wait for
            stall = time.monotonic() - t0
            expected = {key: shard.tensor.clone() for key, shard in state()["model"].items()}  # what was saved
            during = 0
            while (background and not saved.done()) or levels.copier.busy():
                train_step()
                during += 1
            if background:
                saved.result()  # a failed local commit raises
            done = {r["step"]: r for r in levels.copier.results()}[k]
            if done["error"] is not None:
                raise RuntimeError(f"remote copy of step {k} failed: {done['error']}")
            if k:
                stalls.append(stall)
                local_s.append(committed[0] - t0 if background else saved.seconds)
                remote_s.append(done["finished"] - t0)
                steps_during.append(during)
    finally:
        levels.close()
    last = checkpoints
    _, targets = _tensors(n, rows)
    loads = {"local": float("inf"), "remote": float("inf")}
    tiers = {}
    empty = local_dir + "-empty"
    for _ in range(repeats):
        for level, where in (("local", local_dir), ("remote", empty)):
            target = _state(targets, rows)
            t0 = time.perf_counter()
            info = ckpt.load_levels(target, url, ckpt.LocalLevel(where))
            loads[level] = min(loads[level], time.perf_counter() - t0)
            tiers[level] = {t: b for t, b in info.tiers.items() if b}
            if info.step != last:
                raise AssertionError(f"loaded step {info.step}, not {last}")
            _check(targets, expected)
    ckpt.release_store(url)
    worst = torch.tensor([stalls, local_s, remote_s, steps_during], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    load_t = torch.tensor([loads["local"], loads["remote"]], dtype=torch.float64)
    dist.all_reduce(load_t, op=dist.ReduceOp.MAX)
    comms.destroy_group(copy_group)
    _remove(url)
    stalls, local_s, remote_s, steps_during = worst.tolist()
    return {"stall_s": sum(stalls) / len(stalls), "local_durable_s": sum(local_s) / len(local_s),
            "remote_durable_s": sum(remote_s) / len(remote_s), "stalls_s": stalls, "steps_during": steps_during,
            "step_s": step_s, "load_s": {"local": load_t[0].item(), "remote": load_t[1].item()}, "tiers": tiers}


def stall_run(url: str, mode: str, n: int, rows: int, checkpoints: int, step_ms: float, options: dict) -> dict:
    """Train (a fixed amount of matmul work, then an SGD step over the state's
    parameters) and checkpoint ``checkpoints`` times after one warm-up
    checkpoint; per checkpoint the stall (time the loop was blocked: the
    save call, plus for asynchronous saves the optimizer's wait for the
    snapshot) and the time from the save call to the commit (synchronous:
    the same; asynchronous: training goes on until the commit).  Times are
    the slowest rank's.  Afterwards the markers are checked visible."""
    _configure(options)
    opt, state, train_step, step_s = _training(n, rows, step_ms)
    saver = None
    if mode != "sync":
        saver = ckpt.AsyncCheckpointer(url, writer=mode)
        saver.attach(opt)
    stalls, durable, steps_during = [], [], []
    try:
        for k in range(checkpoints + 1):  # k = 0: the warm-up
            train_step()
            dist.barrier()
            t0 = time.perf_counter()
            if saver is None:
                ckpt.save(state(), url, step=k)
                stall = commit = time.perf_counter() - t0
                during = 0
            else:
                done = {}
                handle = saver.save(state(), step=k)
                handle.add_done_callback(lambda *_: done.setdefault("t", time.perf_counter()))
                during = 0
                while not handle.done():
                    train_step()
                    during += 1
                handle.result()
                stall, commit = handle.stall_s, done["t"] - t0
            if k:
                stalls.append(stall)
                durable.append(commit)
                steps_during.append(during)
    finally:
        if saver is not None:
            saver.close()
    if dist.get_rank() == 0:
        store = CheckpointStore(url)
        missing = [k for k in range(checkpoints + 1) if store.read_marker(k) is None]
        if missing:
            raise AssertionError(f"no commit marker visible for steps {missing} at {url}")
    ckpt.release_store(url)
    worst = torch.tensor([stalls, durable, steps_during], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    _remove(url)
    stalls, durable, steps_during = worst.tolist()
    return {"stall_s": sum(stalls) / len(stalls), "durable_s": sum(durable) / len(durable),
            "stalls_s": stalls, "durables_s": durable, "steps_during": steps_during, "step_s": step_s}


# --------------------------------------------------------------- driver

@contextlib.contextmanager
def pointed_at(server: MotoS3):
    """This process's environment and fsspec configuration pointed at
    ``server`` only (every other ``AWS_*`` variable removed, instance
    metadata off); both restored afterwards."""
    import fsspec.config
    saved_env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    saved_conf = copy.deepcopy(fsspec.config.conf)
    for k in saved_env:
        del os.environ[k]
    os.environ.update({**server.env, "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[k]
        os.environ.update(saved_env)
        fsspec.config.conf.clear()
        fsspec.config.conf.update(saved_conf)
        try:
            from s3fs import S3FileSystem
            S3FileSystem.clear_instance_cache()
        except ImportError:
            pass


def count(server: MotoS3, since: int) -> dict:
    """{S3 operation: number} served since the log offset ``since``; the
    reads and writes of loom's owner record (its claim's heartbeat, every
    10 s while a claim is held) are counted apart, as ``OWNER``."""
    return dict(sorted(collections.Counter(
        "OWNER" if t.split("?", 1)[0].endswith("/OWNER") else s3_operation(m, t)
        for m, t, _ in server.requests(since)).items()))


class Runner:
    """The two ranks and the server; `phase` runs one function on both ranks
    and counts the requests moto served meanwhile."""

    def __init__(self, server: MotoS3, pool: WorkerPool, timeout: float):
        self.server, self.pool, self.timeout = server, pool, timeout
        self.requests: dict = {}

    def phase(self, name: str | None, fn, *args):
        since = self.server.log_offset()
        out = self.pool.run(fn, *args, timeout=self.timeout)[0]
        if name is not None:
            counted = count(self.server, since)
            total = self.requests.setdefault(name, {})
            for op, k in counted.items():
                total[op] = total.get(op, 0) + k
        return out


def multipart_check(server: MotoS3, bucket: str, prefix: str, step: int, block: int) -> dict:
    """Every chunk object of ``step`` and its ETag: how many are larger than
    ``block`` and how many were stored as multipart uploads (ETag ``-N``)."""
    client = server.client()
    objects = []
    token = {}
    while True:
        page = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{step_name(step)}/state/", **token)
        objects += [o for o in page.get("Contents", []) if "/c/" in o["Key"]]
        if not page.get("IsTruncated"):
            break
        token = {"ContinuationToken": page["NextContinuationToken"]}
    large = [o for o in objects if o["Size"] > block]
    multipart = [o for o in objects if "-" in o["ETag"].strip('"')]
    return {"chunk_objects": len(objects), "larger_than_block": len(large), "multipart_etags": len(multipart),
            "parts": sorted({int(o["ETag"].strip('"').rsplit("-", 1)[1]) for o in multipart}),
            "large_are_multipart": {o["Key"] for o in large} == {o["Key"] for o in multipart}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=256.0, help="state size in MiB over both ranks (default 256)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N alternating rounds (default 3)")
    ap.add_argument("--checkpoints", type=int, default=3, help="timed checkpoints per level and method")
    ap.add_argument("--step-ms", type=float, default=200.0, help="matmul work per training step (ms, idle)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the local directory store goes")
    ap.add_argument("--quick", action="store_true",
                    help="16 MiB, one round, one checkpoint (a smoke run: writes neither JSON nor RESULTS.md)")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--part", choices=("all", "multilevel"), default="all",
                    help="multilevel: only the multi-level part (--ckpt-local: local level, then S3 in the "
                         "background) and its own section of RESULTS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.size_mb, args.repeats, args.checkpoints, args.step_ms, args.no_write = 16.0, 1, 1, 20.0, True
    if min(args.repeats, args.checkpoints) < 1 or args.size_mb <= 0:
        ap.error("--size-mb, --repeats and --checkpoints must be positive")
    return run(args, argv)


def run(args, argv=None) -> dict:
    n, rows = shape_of(args.size_mb)
    nbytes = n * rows * COLS * 4
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    root = tempfile.mkdtemp(prefix="loom-levels-", dir=args.dir)
    with MotoS3() as server, pointed_at(server), \
            WorkerPool(WORLD, env={**server.env, "AWS_EC2_METADATA_DISABLED": "true"}) as pool:
        try:
            res = {} if args.part == "multilevel" else _measure(args, server, pool, root, n, rows)
            runner = Runner(server, pool, timeout=1800)
            for key, background in (("multilevel", False), ("multilevel_background", True)):
                res[key] = runner.phase(
                    None, multilevel_run, f"s3://{server.bucket()}/{key}", os.path.join(root, f"{key}-local"),
                    n, rows, args.checkpoints, args.step_ms, args.repeats, {"endpoint_url": server.endpoint},
                    background)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    res.update(bytes=nbytes, tensors=n, rows=rows, cols=COLS, world=WORLD, io_threads=IO_THREADS,
               load_before=load_before, load_after=os.getloadavg()[0], seconds=time.perf_counter() - t_start)
    report_multilevel(args, argv, res)
    return res if args.part == "multilevel" else report(args, argv, res)


def report_multilevel(args, argv, res: dict) -> None:
    """The multi-level part: a table of stall / time-to-durable per level and
    one of loads, printed and (unless --no-write) its own RESULTS.md section."""
    m, b, nb = res["multilevel"], res["multilevel_background"], res["bytes"]
    stall = markdown_table(
        ["--ckpt-mode", "stall ms", "local time-to-durable ms", "remote time-to-durable ms",
         "steps trained meanwhile", "step ms (no checkpoint)"],
        [[mode, _ms(r["stall_s"]), _ms(r["local_durable_s"]), _ms(r["remote_durable_s"]),
          f"{sum(r['steps_during']) / len(r['steps_during']):.1f}", _ms(r["step_s"])]
         for mode, r in (("sync (local commit in the loop)", m), ("async (snapshot in the loop, local commit "
                                                                  "in the background)", b))])
    local, remote = m["load_s"]["local"], m["load_s"]["remote"]
    loads = markdown_table(["load from", "bytes per tier (rank 0)", "load GB/s", "vs remote"],
                           [["local level", _tiers(m["tiers"]["local"]), f"{_gbs(nb, local):.3f}",
                             f"{remote / local:.2f}"],
                            ["remote (local level empty)", _tiers(m["tiers"]["remote"]), f"{_gbs(nb, remote):.3f}",
                             "1.00"]])
    summary = (f"{nb / 1e9:.3f} GB float32 state ({res['tensors']} tensors of {res['rows']} x {COLS}, sharded by "
               f"rows over {WORLD} ranks on one node), `checkpoint.MultiLevel` with the local level in a local "
               f"directory and the remote store on the moto server, at most 1 step pending its remote copy; "
               f"mean of {args.checkpoints} checkpoints after a warm-up, loads best of {args.repeats}; machine "
               f"load average {res['load_before']:.1f} at the start, {res['load_after']:.1f} at the end.")
    print("\n" + summary + "\n" + stall + "\n\n" + loads)
    if args.quick or args.no_write:
        return
    write_json("checkpoint_levels_multilevel", {"args": vars(args), **res})
    body = (summary + "\n\n" + stall + "\n\n"
            "*stall*: the training loop blocked per checkpoint, the slowest rank's. `sync`: the local commit "
            "(every rank writes its chunks to the node's directory, one rank per node the manifest, node record "
            "and local marker) plus any wait for room among the pending remote copies; `async` (the default, "
            "`MultiLevel(background=True)`): the copy of the chunks each rank writes into host memory (and any "
            "wait for the previous step's local commit); the local commit then runs on a background thread "
            "from that snapshot, and the remote copy after it. *time-to-durable*: from the save call to the "
            "local marker, and to the remote marker (written last, after every rank's files were copied); "
            f"training goes on meanwhile. A step is {args.step_ms:g} ms of matmuls and an SGD step.\n\n"
            + loads + "\n\n"
            "`load_levels` picks the newest step at the nearest level: with the local level present every "
            "chunk is read from it (crc32c-checked against the manifest); with it empty, every chunk comes "
            "from S3. The remote copy runs while training goes on, so on these 2 cores the copy threads, moto and the "
            "training steps share the CPUs (see the load average): the remote time-to-durable is moto's and "
            "the machine's, the stall is what the loop pays. "
            "Local-level bytes are in the page cache here (a node-local NVMe or /dev/shm on a "
            "cluster); moto is a Python server sharing the 2 cores, so the remote numbers are moto's.")
    update_results("checkpoint_levels_multilevel", "Multi-level checkpoints (--ckpt-local): local level, then "
                   "S3 in the background", command_line(__file__, argv), body)


def _tiers(tiers: dict) -> str:
    return ", ".join(f"{t} {b / 1e6:.1f} MB" for t, b in tiers.items()) or "-"


def _measure(args, server: MotoS3, pool: WorkerPool, root: str, n: int, rows: int) -> dict:
    bucket = server.bucket()
    s3 = f"s3://{bucket}"
    options = {"endpoint_url": server.endpoint}
    runner = Runner(server, pool, timeout=1800)
    loom_url = f"{s3}/loom"
    # warm-up (not timed): the store's claim, connections, first page faults; its step shows loom's chunk objects
    runner.phase(None, loom_round, loom_url, n, rows, 0, options, True, True)
    sizes = chunk_objects(loom_url, 0)
    runner.phase(None, _remove_step, loom_url, 0)
    best: dict = {}
    for r in range(1, args.repeats + 1):
        rounds = (("loom_fixed", overhead_round, loom_url, 100 + r, options),
                  ("loom", loom_round, loom_url, n, rows, r, options, True, r == args.repeats),  # last: kept
                  ("raw", raw_round, f"{s3}/raw", n, rows, sizes, options, False),
                  ("raw_batch", raw_round, f"{s3}/raw", n, rows, sizes, options, True),
                  ("dcp", dcp_round, f"{s3}/dcp", n, rows, options))
        for name, fn, *fn_args in rounds:
            for k, v in runner.phase(name, fn, *fn_args).items():
                best.setdefault(name, {})[k] = min(v, best.get(name, {}).get(k, float("inf")))
    for name in best:  # requests per round, not summed over the rounds
        runner.requests[name] = {op: round(k / args.repeats) for op, k in runner.requests[name].items()}

    # large chunks as multipart uploads: the same save with s3fs's smallest block size
    mp_url = f"{s3}/multipart"
    mp_options = {**options, "default_block_size": MULTIPART_BLOCK}
    runner.phase(None, loom_round, mp_url, n, rows, 0, mp_options, False, False)  # warm-up: the claim
    mp_times = runner.phase("loom_multipart", loom_round, mp_url, n, rows, 1, mp_options, False, True)
    multipart = multipart_check(server, bucket, "multipart", 1, MULTIPART_BLOCK)
    multipart["requests"] = runner.requests["loom_multipart"]
    multipart["save_s"] = mp_times["save"]
    multipart["block_bytes"] = MULTIPART_BLOCK
    runner.phase(None, _remove_step, mp_url, 1)
    runner.phase(None, _release, mp_url)

    # the same checkpoint loaded from S3 and from a local directory copy of it
    step = args.repeats
    local_copy = os.path.join(root, "copy")
    _copy_step(loom_url, local_copy, step)
    loads = runner.phase(None, load_levels, {"local": local_copy, "s3": loom_url}, step, n, rows, args.repeats,
                      options)
    runner.phase(None, _remove_step, loom_url, step)
    runner.phase(None, _release, loom_url)

    # stall and time-to-durable per level and method
    stall = {level: {} for level in LEVELS}
    for mode in MODES:
        for level in LEVELS:
            url = os.path.join(root, f"stall-{mode}") if level == "local" else f"{s3}/stall-{mode}"
            stall[level][mode] = runner.phase(f"stall_{level}_{mode}" if level == "s3" else None, stall_run, url,
                                           mode, n, rows, args.checkpoints, args.step_ms, options)
    levels = {level: {"store": LEVELS[level], "stall": stall[level], "load_s": loads[level]} for level in LEVELS}
    levels["s3"]["throughput"] = best
    return {"levels": levels, "multipart": multipart, "requests": runner.requests, "chunk_objects": sizes}


def _remove_step(url: str, step: int) -> None:
    _remove(f"{url}/{step_name(step)}")


def _release(url: str) -> None:
    ckpt.release_store(url)


def _copy_step(url: str, local: str, step: int) -> None:
    """Copy a committed step (its folder and ``latest``) from S3 to a local directory."""
    import fsspec
    fs, path = fsspec.core.url_to_fs(url)
    os.makedirs(local, exist_ok=True)
    fs.get(f"{path}/{step_name(step)}/", os.path.join(local, step_name(step)) + "/", recursive=True)
    with open(os.path.join(local, "latest"), "wb") as fh:
        fh.write(fs.cat_file(f"{path}/latest"))


# --------------------------------------------------------------- report

def _gbs(nbytes: int, seconds: float) -> float:
    return nbytes / 1e9 / seconds


def _ms(s: float) -> str:
    return f"{s * 1e3:.0f}" if s >= 0.01 else f"{s * 1e3:.1f}"


def report(args, argv, res: dict) -> dict:
    nb, gb = res["bytes"], res["bytes"] / 1e9
    s3 = res["levels"]["s3"]
    tp = s3["throughput"]
    raw = tp["raw"]
    ratios = {"save_vs_raw": raw["save"] / tp["loom"]["save"], "load_vs_raw": raw["load"] / tp["loom"]["load"],
              "save_vs_raw_batch": tp["raw_batch"]["save"] / tp["loom"]["save"],
              "load_vs_raw_batch": tp["raw_batch"]["load"] / tp["loom"]["load"],
              "save_vs_dcp": tp["dcp"]["save"] / tp["loom"]["save"],
              "load_vs_dcp": tp["dcp"]["load"] / tp["loom"]["load"],
              "multipart_save_vs_raw": raw["save"] / res["multipart"]["save_s"],
              "load_local_vs_s3": s3["load_s"] / res["levels"]["local"]["load_s"]}
    fixed = tp["loom_fixed"]
    ratios.update(fixed_share_save=fixed["save"] / tp["loom"]["save"],
                  fixed_share_load=fixed["load"] / tp["loom"]["load"])
    res["ratios"] = ratios
    objects = sorted({size for sizes in res["chunk_objects"].values() for size in sizes})
    per_rank = len(next(iter(res["chunk_objects"].values())))
    rows = []
    for name, label in (("raw", f"s3fs raw `pipe_file` / `cat_file`, {IO_THREADS} threads per rank (loom's)"),
                        ("raw_batch", "s3fs raw `pipe` / `cat_ranges`, every object of a rank at once"),
                        ("loom", "loom `save` / `load`"),
                        ("dcp", f"DCP `FsspecWriter` / `FsspecReader` (thread_count={IO_THREADS})")):
        t = tp[name]
        rows.append(["s3", label, f"{_gbs(nb, t['save']):.3f}", f"{raw['save'] / t['save']:.2f}",
                     f"{_gbs(nb, t['load']):.3f}", f"{raw['load'] / t['load']:.2f}"])
    mp = res["multipart"]
    rows.append(["s3", f"loom `save`, `default_block_size` = {MULTIPART_BLOCK // MIB} MiB (multipart chunks)",
                 f"{_gbs(nb, mp['save_s']):.3f}", f"{ratios['multipart_save_vs_raw']:.2f}", "-", "-"])
    throughput = markdown_table(["level", "method", "save GB/s", "save / raw", "load GB/s", "load / raw"], rows)

    srows = []
    for level in LEVELS:
        for mode in MODES:
            r = res["levels"][level]["stall"][mode]
            srows.append([level, MODE_LABELS[mode], _ms(r["stall_s"]), _ms(r["durable_s"]),
                          f"{sum(r['steps_during']) / len(r['steps_during']):.1f}", _ms(r["step_s"])])
    stall = markdown_table(["level", "method", "stall ms", "time-to-durable ms", "steps trained meanwhile",
                            "step ms (no checkpoint)"], srows)
    local_load, s3_load = res["levels"]["local"]["load_s"], s3["load_s"]
    load_table = markdown_table(["level", "store", "load GB/s", "vs S3"],
                                [["local", LEVELS["local"], f"{_gbs(nb, local_load):.3f}",
                                  f"{s3_load / local_load:.2f}"],
                                 ["s3", LEVELS["s3"], f"{_gbs(nb, s3_load):.3f}", "1.00"]])
    ops = sorted({op for counts in res["requests"].values() for op in counts})
    req_names = [("loom", "loom save + load"), ("raw", "s3fs raw, threads"), ("raw_batch", "s3fs raw, at once"),
                 ("dcp", "DCP save + load"), ("loom_fixed", "loom save + load, tiny state"),
                 ("loom_multipart", "loom save, 5 MiB blocks")]
    req_table = markdown_table(["method (one round)", *ops],
                               [[label, *(res["requests"][name].get(op, 0) for op in ops)]
                                for name, label in req_names])
    mp_line = (f"Multipart: with `default_block_size` = {MULTIPART_BLOCK // MIB} MiB, {mp['larger_than_block']} of "
               f"{mp['chunk_objects']} chunk objects are larger than the block and **{mp['multipart_etags']}** "
               f"were stored as multipart uploads (ETag `<md5>-<parts>`, parts per object: {mp['parts'] or '-'}; "
               f"moto served {mp['requests'].get('CreateMultipartUpload', 0)} CreateMultipartUpload, "
               f"{mp['requests'].get('UploadPart', 0)} UploadPart, "
               f"{mp['requests'].get('CompleteMultipartUpload', 0)} CompleteMultipartUpload); "
               f"{'every' if mp['large_are_multipart'] else 'NOT every'} large chunk went up as a multipart "
               f"upload.")
    summary = (f"{gb:.3f} GB float32 state ({res['tensors']} tensors of {res['rows']} x {COLS}, each sharded by "
               f"rows over {WORLD} ranks: each rank writes and reads half), {per_rank} chunk objects per rank "
               f"of {', '.join(f'{s / MIB:g} MiB' for s in objects)}; best of {args.repeats} alternating rounds; "
               f"machine load average {res['load_before']:.1f} at the start, {res['load_after']:.1f} at the end "
               f"({os.cpu_count()} cores; the moto server and both ranks share them).")
    print(summary)
    print(throughput)
    print("\n" + stall)
    print("\n" + load_table)
    print("\n" + req_table)
    print("\n" + mp_line)
    print(f"\nloom's fixed cost (tiny state): save {_ms(tp['loom_fixed']['save'])} ms, "
          f"load {_ms(tp['loom_fixed']['load'])} ms")
    print(f"\n({res['seconds']:.0f} s)")
    payload = {"args": vars(args), "levels_described": LEVELS, **res}
    if not args.quick:  # a smoke run leaves the repository as it was
        write_json("checkpoint_levels", payload)
    if not args.no_write:
        body = report_body(args, summary, throughput, stall, load_table, req_table, mp_line, ratios, tp)
        update_results("checkpoint_levels", "Checkpoint levels: S3 (moto) vs s3fs raw vs DCP fsspec; "
                       "stall and time-to-durable; local directory vs S3", command_line(__file__, argv), body)
    return payload


def report_body(args, summary, throughput, stall, load_table, req_table, mp_line, ratios, tp) -> str:
    return (summary + "\n\n" + throughput + "\n\n"
            f"loom vs s3fs raw (same objects, same concurrency; target ≥ 0.8): save "
            f"**{ratios['save_vs_raw']:.2f}**, load **{ratios['load_vs_raw']:.2f}**; vs s3fs's best case "
            f"(every object at once): save {ratios['save_vs_raw_batch']:.2f}, load "
            f"{ratios['load_vs_raw_batch']:.2f}; vs DCP's fsspec writer/reader: save "
            f"**{ratios['save_vs_dcp']:.2f}×**, load **{ratios['load_vs_dcp']:.2f}×** DCP's speed. "
            f"loom's fixed cost per checkpoint (the same calls on a tiny state: claim check, listings, "
            f"metadata documents, manifest, marker, `latest`, agreements): save "
            f"{_ms(tp['loom_fixed']['save'])} ms, load {_ms(tp['loom_fixed']['load'])} ms, "
            f"{ratios['fixed_share_save']:.0%} and {ratios['fixed_share_load']:.0%} of the times above. "
            + target_note(ratios) + "\n\n"
            + stall + "\n\n"
            "*stall*: time the training loop was blocked per checkpoint (synchronous: the save call; "
            "asynchronous: the save call plus the optimizer step's wait for the snapshot to host memory), "
            "the slowest rank's, mean of " + str(args.checkpoints) + " after a warm-up checkpoint. "
            "*time-to-durable*: the save call to its commit (the `COMMITTED` marker written; every marker "
            "was read back afterwards); asynchronous saves train on meanwhile (*steps trained meanwhile*). "
            f"A step is {args.step_ms:g} ms of matmuls (on an idle machine) and an SGD step over the state.\n\n"
            + load_table + "\n\n"
            f"The same checkpoint read back from S3 and from a local directory copy of it: local is "
            f"**{ratios['load_local_vs_s3']:.1f}×** faster. The *local* level is a plain local directory "
            "store; the multi-level checkpoints (`--ckpt-local`) are measured in their own section "
            "(`--part multilevel`).\n\n"
            "Requests moto served, per method and round:\n\n" + req_table + "\n\n" + mp_line + "\n\n"
            + notes())


def target_note(ratios: dict) -> str:
    """Whether loom met 0.8 of s3fs raw in this run, and what it does beyond raw put/get."""
    below = [f"{what} {ratios[f'{what}_vs_raw']:.2f}" for what in ("save", "load") if ratios[f"{what}_vs_raw"] < 0.8]
    head = (f"**Below the 0.8 target in this run: {', '.join(below)}.**" if below else
            "Target (≥ 0.8 of s3fs raw at the same concurrency) met in this run.")
    return (head + " What loom does beyond the raw put/get: the fixed cost above (a save's claim check, "
            "listings for the step and the commit's sequence number, metadata documents, manifest, marker and "
            "`latest`: about 20 small requests, each a Python round trip through moto), a crc32c of every "
            "chunk (about 25 ms per 128 MiB rank here), on save one s3fs file object per chunk (a copy into "
            "its buffer); with moto and both ranks on 2 cores, each of these takes CPU from the server. Single "
            "runs on this shared machine vary by about ±20% (see the load average), so the ratios move by that "
            "much between runs.")


def notes() -> str:
    return ("- The server is moto (`moto[server]`), a Python process on the same 2 cores as both ranks: "
            "every byte is parsed by werkzeug and copied into moto's in-memory objects under one GIL, so the "
            "server, not the network or the clients, sets the absolute GB/s, and the clients' own CPU work "
            "(loom's crc32c checksums and copies, DCP's serialisation) takes cores from it. The ratios "
            "compare clients of the same server in the same run; on a real object store with its own "
            "machines, transfer rates are far higher and the per-request costs different.\n"
            "- loom writes each chunk through an s3fs file object: one PutObject for a chunk up to the "
            "block size (50 MiB by default; loom's chunks aim at 16 MiB), a multipart upload above it. "
            "Each chunk read is one ranged GetObject (`cat_file`). Besides the chunks, a loom save "
            "writes each array's and group's `zarr.json`, the manifest, the marker and `latest`, lists the "
            "store (step numbering, the commit's sequence number) and refreshes its owner record; a load "
            "reads the marker, the manifest and one listing of the step before any chunk.\n"
            "- s3fs raw is the least any client of s3fs does to move these objects: `pipe_file` / ranged "
            "`cat_file` of bytes copied out of (and back into) the same tensors, nothing else.\n"
            "- A multipart upload costs moto far more than a PUT of the same bytes: at "
            "CompleteMultipartUpload it concatenates the parts into a new object in Python and hashes it "
            "again (on S3 the parts stay where they are). That is why the 5 MiB-block row is slower; it "
            "is there to show that chunks above the block size go up as multipart uploads, not their "
            "speed. DCP's fsspec writer writes one file per thread per rank (torch.save format; 64 MiB "
            "each at 256 MiB, above s3fs's 50 MiB block, so multipart uploads too) and commits by renaming "
            "its `.metadata` (a copy and a delete on S3), so moto's multipart cost weighs on DCP's save.")


if __name__ == "__main__":
    main()
