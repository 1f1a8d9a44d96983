"""Helpers shared by test modules.  Worker processes import them too (spawned
workers inherit the parent's sys.path, which holds this folder)."""
import importlib
import os

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
    ``on_write(array, selection, value)`` (to fail or kill it mid-save).
    Returns the function that undoes it."""
    save_mod = importlib.import_module("loom.checkpoint.save")  # the module, not ckpt.save
    real_open = save_mod.open_array

    class Sabotaged:
        def __init__(self, arr):
            self.arr = arr

        def __setitem__(self, sel, value):
            on_write(self.arr, sel, value)

    save_mod.open_array = lambda *a: Sabotaged(real_open(*a))
    return lambda: setattr(save_mod, "open_array", real_open)


def die_after_write(arr, sel, value):
    """An `on_write` that writes one chunk, then kills the whole process."""
    arr[sel] = value
    os._exit(3)
