"""Helpers shared by test modules.  Worker processes import them too (spawned
workers inherit the parent's sys.path, which holds this folder)."""
import contextlib
import importlib
import math
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist


def train_losses(base: dict, runs: list[dict]) -> list[list[float]]:
    """Run `loom train` in this process group once per override dict (on top
    of ``base``); return each run's per-step losses."""
    from loom.launch.config import build_config, validate
    from loom.launch.train import train
    out = []
    for overrides in runs:
        cfg = validate(build_config(overrides={**base, **overrides}), world_size=dist.get_world_size())
        out.append(train(cfg)["losses"])
    return out


def sabotage_chunk_writes(on_write):
    """From now on, every checkpoint chunk this process writes goes through
    ``on_write(write)``, where ``write()`` does the real write (to fail or
    kill a save midway).  Returns the function that undoes it."""
    save_mod = importlib.import_module("loom.checkpoint.save")  # the module, not ckpt.save
    zarr_io = importlib.import_module("loom.checkpoint.zarr_io")
    real_open, real_raw = save_mod.open_array, zarr_io.write_raw

    class Sabotaged:  # the chunks zarr-python lays out
        def __init__(self, arr):
            self.arr = arr

        def __setitem__(self, sel, value):
            on_write(lambda: self.arr.__setitem__(sel, value))

    save_mod.open_array = lambda *a: Sabotaged(real_open(*a))
    zarr_io.write_raw = lambda *a: on_write(lambda: real_raw(*a))  # the chunks written as raw bytes

    def undo():
        save_mod.open_array, zarr_io.write_raw = real_open, real_raw
    return undo


def die_after_write(write):
    """An `on_write` that writes one chunk, then kills the whole process."""
    write()
    os._exit(3)


def single_process_losses(config, steps: int, batch: int, *, lr: float = 3e-3) -> list[float]:
    """Train the reference model with ``config`` in this process on the
    synthetic task (AdamW, seed 0); return the per-step losses."""
    import torch
    from loom.parallel import SyntheticData, Transformer, next_token_loss
    torch.manual_seed(0)
    model = Transformer(config)
    data = SyntheticData(config.vocab, 64, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x, y = data.batch(step, range(batch))
        loss = next_token_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def chunk_file(root, step, array, chunk="0"):
    """The file of one chunk of a local checkpoint (``chunk``: "0.1")."""
    from loom.checkpoint.store import step_name
    return os.path.join(str(root), step_name(step), "state", array, "c", *chunk.split("."))


def flip_byte(path, offset=5):
    """Damage a stored chunk in place."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x40]))


def bits(t):
    """The raw bytes of a tensor, for bitwise comparison (NaN payloads, -0.0)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same(a, b) -> bool:
    """Two tensors of one dtype and shape, equal bit for bit."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_same(a, b, where="", *, exact_types=False):
    """Bitwise equality of nested states: tensors by bits, NaN floats as NaN,
    objects without their own ``==`` field by field, the rest by ``==``;
    container types kept (any two dicts match unless ``exact_types``)."""
    dicts = isinstance(a, dict) and isinstance(b, dict) and not exact_types
    assert type(a) is type(b) or dicts, (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert same(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k!r}", exact_types=exact_types)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}", exact_types=exact_types)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    elif hasattr(a, "__dict__") and type(a).__eq__ is object.__eq__:
        assert_same(vars(a), vars(b), where, exact_types=exact_types)
    else:
        assert a == b, (where, a, b)


def outcome(call):
    """``"no error"``, or (exception type name, message, seconds taken) of the
    ValueError/TypeError ``call()`` raised: what a rank reports in the
    fail-together tests."""
    t0 = time.monotonic()
    try:
        call()
    except (ValueError, TypeError) as exc:
        return type(exc).__name__, str(exc), time.monotonic() - t0
    return "no error"


class EventLog:
    """A reporter for `loom.launch.train.train` that keeps the event lines
    and the metrics rows."""

    def __init__(self):
        self.lines: list[str] = []
        self.rows: list[dict] = []

    def step(self, metrics: dict) -> None:
        self.rows.append(metrics)

    def event(self, text: str) -> None:
        self.lines.append(text)


def train_rows(metrics_path) -> list[dict]:
    """The training steps' rows of a run's metrics.jsonl (not evaluations')."""
    import json
    with open(metrics_path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [r for r in rows if r.get("split", "train") == "train"]


def recurrence(q, k, v, g, scale=1.0):
    """S_t = diag(exp g_t) S_{t-1} + k_tᵀ v_t from S = 0, o_t = scale q_t S_t,
    token by token; q, k, g [b, s, h, d_k], v [b, s, h, d_v].  Returns o and
    every S_t [b, s, h, d_k, d_v]."""
    import torch
    state = torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype=q.dtype)
    outs, states = [], []
    for t in range(q.shape[1]):
        state = g[:, t].exp()[..., None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", scale * q[:, t], state))
        states.append(state)
    if not outs:
        return v[:, :0], state[:, None][:, :0]
    return torch.stack(outs, 1), torch.stack(states, 1)


def value_error(fn) -> str | None:
    """The message of the ValueError ``fn()`` raises, or None when it returns."""
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def ray_test_cluster(tmp_path, monkeypatch, cpus: list[int]):
    """A simulated multi-node Ray cluster on this machine
    (`ray.cluster_utils.Cluster`, the test's own: a new head with no CPUs for
    workers, the driver's node, its own session directory and HOME, no RAY_*
    from the environment) and one worker node per entry of ``cpus``.
    Yields (cluster, worker nodes, temp_dir for adding nodes)."""
    from ray.cluster_utils import Cluster
    for key in [k for k in os.environ if k.startswith("RAY_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    temp_dir = tempfile.mkdtemp(prefix="loom-rc-")  # short: Ray's socket paths must fit in 107 bytes
    c = Cluster(initialize_head=True, shutdown_at_exit=False,
                head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": temp_dir})
    try:
        yield c, [c.add_node(num_cpus=n, temp_dir=temp_dir) for n in cpus], temp_dir
    finally:
        c.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
