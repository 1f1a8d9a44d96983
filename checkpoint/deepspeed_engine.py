"""DeepSpeed's ``save_checkpoint`` through loom's lazy asynchronous engine.

    import loom.checkpoint as ckpt
    engine, *_ = deepspeed.initialize(...)
    ckpt.install_deepspeed_engine(engine, keep_last=3)   # url default: <save_dir>/loom
    ...
    engine.save_checkpoint("runs/ds")     # returns once the plain values are captured
    ...                                   # forward/backward run while tensors are copied
    engine.step()                         # waits only if the copy is unfinished
    engine.load_checkpoint("runs/ds")     # reads back through loom

`LoomCheckpointEngine` is a decoupled DeepSpeed ``CheckpointEngine``.
DeepSpeed calls ``create(info)``, then ``save(state_dict, path)`` for each
of this rank's files (``mp_rank_00_model_states.pt`` on the first data
rank, one ``zero_pp_rank_R_..._optim_states.pt`` per rank), and, being
decoupled, ``commit(info)`` only at the next ``engine.step()``, just before
the optimizer step.  The engine gathers the files of one tag and starts one
collective `AsyncCheckpointer.save` for them when ``save_checkpoint``
returns (the installer wraps it; otherwise at ``commit``).  ``commit`` waits
for the snapshot only - the lazy wait - and the data persists in the
background.  DeepSpeed's ``latest`` file is written by rank 0 after the
loom commit, so it never names a tag whose data is not on storage.

Layout: one loom step (DeepSpeed's ``global_steps``) per tag; each file is a
top-level subtree named after the file, its tensors as Zarr arrays written
by the rank that holds them.  At ``path`` itself the engine leaves a small
JSON pointer (url, step, file), which is what DeepSpeed's loader globs for
and what ``load(path)`` follows.  DeepSpeed's files also hold Python objects
(loss scaler, enums, fragment addresses) that JSON cannot express; they are
kept as a pickle restricted, when read, to DeepSpeed's classes, plain
containers and ``torch.Size``.  `loom.checkpoint.load` never unpickles.
"""
from __future__ import annotations

import builtins
import collections
import dataclasses
import functools
import io
import json
import os
import pickle

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

from .async_engine import AsyncCheckpointer
from .collective import Group
from .load import load

POINTER_FORMAT = "loom.deepspeed-pointer"


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """Where a tensor sat in a DeepSpeed state dict (index into ``tensors``)."""
    index: int


def _pack(state_dict) -> dict:
    """Split a DeepSpeed state dict into its tensors and a pickled skeleton
    (the rest, with `_TensorRef` placeholders)."""
    tensors: list = []

    def strip(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x.detach())
            return _TensorRef(len(tensors) - 1)
        if isinstance(x, dict):
            stripped = {k: strip(v) for k, v in x.items()}
            return type(x)(stripped) if isinstance(x, collections.OrderedDict) else stripped
        if isinstance(x, list):
            return [strip(v) for v in x]
        if isinstance(x, tuple) and not hasattr(x, "_fields"):  # namedtuples go whole
            return tuple(strip(v) for v in x)
        return x

    skeleton = pickle.dumps(strip(state_dict), protocol=4)
    packed = {"skeleton": torch.frombuffer(bytearray(skeleton), dtype=torch.uint8)}
    if tensors:
        packed["tensors"] = {str(i): t for i, t in enumerate(tensors)}
    return packed


_SAFE_BUILTINS = {"set", "frozenset", "complex", "slice", "range", "bytearray"}


class _Unpickler(pickle.Unpickler):
    """Only DeepSpeed's classes, plain containers, torch.Size and dtypes."""

    def find_class(self, module, name):
        obj = None
        if module == __name__ and name == "_TensorRef":
            obj = _TensorRef
        elif module == "builtins" and name in _SAFE_BUILTINS:
            obj = getattr(builtins, name)
        elif module == "collections" and name == "OrderedDict":
            obj = collections.OrderedDict
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            obj = getattr(torch, name)
        elif module == "deepspeed" or module.startswith("deepspeed."):
            candidate = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(candidate, type):
                obj = candidate
        if obj is None:
            raise pickle.UnpicklingError(f"a DeepSpeed checkpoint skeleton refers to {module}.{name}, "
                                         f"which loom does not load")
        return obj


def _unpack(packed: dict, device=None):
    skeleton = _Unpickler(io.BytesIO(packed["skeleton"].numpy().tobytes())).load()
    tensors = packed.get("tensors", {})

    def fill(x):
        if isinstance(x, _TensorRef):
            t = tensors[str(x.index)]
            return t.to(device) if device is not None else t
        if isinstance(x, dict):
            filled = {k: fill(v) for k, v in x.items()}
            return type(x)(filled) if isinstance(x, collections.OrderedDict) else filled
        if isinstance(x, list):
            return [fill(v) for v in x]
        if isinstance(x, tuple) and not hasattr(x, "_fields"):
            return tuple(fill(v) for v in x)
        return x

    return fill(skeleton)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


class LoomCheckpointEngine(CheckpointEngine):
    """A decoupled DeepSpeed checkpoint engine that saves through an
    `AsyncCheckpointer` (see the module docstring).  ``url``: where the
    loom steps go (default ``<save_dir>/loom``); the other options are
    `AsyncCheckpointer`'s."""

    def __init__(self, ds_engine, url: str | None = None, *, host_buffer_bytes: int | None = None,
                 keep_last: int | None = None, writer: str = "thread", config_params=None,
                 durable: bool = False):
        super().__init__(config_params)
        self.name = "LoomCheckpointEngine"
        self.ds_engine, self.url = ds_engine, url
        self._options = {"host_buffer_bytes": host_buffer_bytes, "keep_last": keep_last, "writer": writer,
                         "durable": durable}
        self.checkpointers: dict[str, AsyncCheckpointer] = {}
        self._info: CheckpointCommitInfo | None = None
        self._files: dict = {}
        self._step: int | None = None
        self.handles: list = []

    # -------------------------------------------------------- DeepSpeed API
    def create(self, info: CheckpointCommitInfo):
        self.flush()  # a previous tag not flushed yet goes first
        self._info, self._files = info, {}
        self._step = int(self.ds_engine.global_steps)
        self._checkpointer(info.save_dir)  # collective the first time: every rank is here

    def save(self, state_dict, path: str):
        if self._info is None or self._files is None:
            raise RuntimeError("LoomCheckpointEngine.save outside create() .. save_checkpoint's end")
        name = os.path.basename(path)
        self._files[name] = state_dict
        url = self._url_for(self._info.save_dir)
        _atomic_write(path, json.dumps({"format": POINTER_FORMAT, "url": url, "step": self._step,
                                        "file": name}))

    def flush(self):
        """Start the loom save of the files DeepSpeed handed over for the
        current tag (returns at once)."""
        if self._info is None or self._files is None:
            return
        info, files = self._info, self._files
        self._files = None  # flushed: commit() must not save again
        state = {"deepspeed": {"tag": str(info.tag)}, **{name: _pack(sd) for name, sd in files.items()}}
        ckpt = self._checkpointer(info.save_dir)
        handle = ckpt.save(state, step=self._step)
        self.handles.append(handle)
        if info.save_latest and torch.distributed.get_rank() == 0:
            latest = os.path.join(info.save_dir, "latest")

            def write_latest(location, error):
                if error is None:
                    _atomic_write(latest, str(info.tag))
            handle.add_done_callback(write_latest)

    def commit(self, info: CheckpointCommitInfo):
        """DeepSpeed's hook before the optimizer step: wait for the snapshot
        only (the lazy wait); the data persists in the background."""
        self.flush()
        for ckpt in self.checkpointers.values():
            ckpt.wait_snapshot()
        self._info = None
        return True

    def get_commit_info(self):
        # save_latest=False: DeepSpeed must not write 'latest' before the data
        # is committed; the persist stage writes it afterwards
        return dataclasses.replace(self._info, save_latest=False) if self._info is not None else None

    def load(self, path: str, map_location=None):
        with open(path) as fh:
            try:
                pointer = json.load(fh)
            except ValueError:
                pointer = None
        if not isinstance(pointer, dict) or pointer.get("format") != POINTER_FORMAT:
            raise ValueError(f"{path} is not a loom pointer file (was it saved by another checkpoint engine?)")
        target = {pointer["file"]: {}}
        load(target, pointer["url"], step=pointer["step"], group=Group.alone())
        device = map_location if isinstance(map_location, (str, torch.device)) else None
        return _unpack(target[pointer["file"]], device)

    def is_decoupled(self):
        return True

    def preserves_storage_sharing(self):
        return False  # DeepSpeed would otherwise clone every tensor before save()

    def cleanup(self):
        """Flush, wait for every save, close."""
        self.flush()
        try:
            for ckpt in self.checkpointers.values():
                ckpt.wait()
        finally:
            for ckpt in self.checkpointers.values():
                ckpt.close()
            self.checkpointers.clear()

    def wait(self):
        """Until every save so far is committed (raises a failure)."""
        self.flush()
        for ckpt in self.checkpointers.values():
            ckpt.wait()

    # ----------------------------------------------------------- helpers
    def _url_for(self, save_dir: str) -> str:
        return self.url or os.path.join(os.path.abspath(save_dir), "loom")

    def _checkpointer(self, save_dir: str) -> AsyncCheckpointer:
        url = self._url_for(save_dir)
        if url not in self.checkpointers:
            ckpt = AsyncCheckpointer(url, **self._options)
            inner = getattr(getattr(self.ds_engine, "optimizer", None), "optimizer", None)
            if hasattr(inner, "register_step_pre_hook"):
                ckpt.attach(inner)  # belt and braces: commit() already waits before the step
            self.checkpointers[url] = ckpt
        return self.checkpointers[url]


def install(ds_engine, url: str | None = None, **options) -> LoomCheckpointEngine:
    """Make ``ds_engine.save_checkpoint`` / ``load_checkpoint`` go through
    loom; the loom save starts as ``save_checkpoint`` returns."""
    engine = LoomCheckpointEngine(ds_engine, url, **options)
    ds_engine.checkpoint_engine = engine
    original = ds_engine.save_checkpoint

    @functools.wraps(original)
    def save_checkpoint(*args, **kwargs):
        result = original(*args, **kwargs)
        engine.flush()
        return result

    ds_engine.save_checkpoint = save_checkpoint
    return engine
