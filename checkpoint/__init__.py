"""loom.checkpoint: training state in and out of Zarr stores.

    from loom import checkpoint as ckpt
    ckpt.save({"model": model.state_dict(), "optim": opt.state_dict()}, "runs/ckpt", step=100)
    info = ckpt.load(state, "runs/ckpt")          # latest committed step, any world size

    saver = ckpt.AsyncCheckpointer("runs/ckpt")   # lazy, asynchronous: training barely stalls
    saver.attach(opt); saver.save(state, step=100); ...; saver.close()

    levels = ckpt.MultiLevel("s3://bucket/run1", "/local_nvme/run1")  # node-local level, copied in the background
    levels.save(state, step=100); info = levels.load(state); levels.close()

Collective over ``group`` (or a single process with no process group).
Leaves: tensors (replicated), `Shard`, `Flat`, `PerRank`, plain JSON values.
One job writes a store at a time (`claim_store`; `save`, `gc` and
`AsyncCheckpointer` claim it themselves, and a process that has saved keeps
its claim until `release_store` or exit); reads need no claim.
"""
from .async_engine import AsyncCheckpointer, CheckpointSaveError, SaveHandle
from .layout import TARGET_CHUNK_BYTES
from .levels import LocalLevel, LocalSave, load_levels, save_local
from .local_async import LocalCommitter
from .load import CheckpointInfo, MissingKeysError, NoCheckpointError, load, verify
from .manifest import ChecksumError, InvalidCheckpointError
from .multilevel import MultiLevel
from .optim import optimizer_state_dict
from .owner import (CheckpointOwnershipError, StoreNotSharedError, StoreOwnership, claim_store,
                    read_owner, release_store)
from .remote_copy import RemoteCopier
from .retention import gc
from .save import SavePlan, commit, exchange_parts, plan_save, save, write_chunks
from .state import Flat, PerRank, Shard
from .store import CheckpointStore, retained


def install_deepspeed_engine(ds_engine, url=None, **options):
    """Route ``ds_engine.save_checkpoint``/``load_checkpoint`` through loom's
    lazy asynchronous engine (see `loom.checkpoint.deepspeed_engine`)."""
    from .deepspeed_engine import install
    return install(ds_engine, url, **options)


__all__ = [
    "AsyncCheckpointer", "CheckpointInfo", "CheckpointOwnershipError", "CheckpointSaveError", "CheckpointStore",
    "ChecksumError", "Flat", "InvalidCheckpointError", "LocalCommitter", "LocalLevel", "LocalSave", "MissingKeysError",
    "MultiLevel", "NoCheckpointError", "PerRank",
    "SaveHandle", "SavePlan", "Shard", "StoreNotSharedError", "StoreOwnership", "TARGET_CHUNK_BYTES",
    "RemoteCopier", "claim_store", "commit", "exchange_parts", "gc", "install_deepspeed_engine", "load",
    "load_levels",
    "optimizer_state_dict", "plan_save", "read_owner", "release_store", "retained", "save", "save_local", "verify",
    "write_chunks",
]
