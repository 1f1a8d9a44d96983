"""loom.checkpoint: training state in and out of Zarr stores.

    from loom import checkpoint as ckpt
    ckpt.save({"model": model.state_dict(), "optim": opt.state_dict()}, "runs/ckpt", step=100)
    info = ckpt.load(state, "runs/ckpt")          # latest committed step, any world size

Collective over ``group`` (or a single process with no process group).
Leaves: tensors (replicated), `Shard`, `Flat`, `PerRank`, plain JSON values.
"""
from .async_engine import AsyncCheckpointer, CheckpointSaveError, SaveHandle
from .layout import TARGET_CHUNK_BYTES
from .load import CheckpointInfo, MissingKeysError, NoCheckpointError, load, verify
from .manifest import ChecksumError
from .save import SavePlan, commit, exchange_parts, plan_save, save, write_chunks
from .state import Flat, PerRank, Shard
from .store import CheckpointStore, gc, retained

__all__ = [
    "AsyncCheckpointer", "CheckpointSaveError", "SaveHandle", "CheckpointInfo", "CheckpointStore", "ChecksumError", "Flat", "MissingKeysError",
    "NoCheckpointError", "PerRank", "SavePlan", "Shard", "TARGET_CHUNK_BYTES", "commit",
    "exchange_parts", "gc", "load", "plan_save", "retained", "save", "verify", "write_chunks",
]
