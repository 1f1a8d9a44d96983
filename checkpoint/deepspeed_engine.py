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
top-level subtree named after the file: its tensors as Zarr arrays
(``tensors/<i>``, written by the rank that holds them) and the rest of the
state dict as a *skeleton*, a tagged JSON document (``skeleton_json``, its
UTF-8 bytes as a uint8 array) with ``{"$": "tensor", "index": i}`` where
the tensors sat.  Nothing is pickled.  The skeleton holds only inert data:

    null, true/false, int, finite float, str, JSON arrays (lists), and
    {"$": "float", "value": "nan" | "inf" | "-inf"}
    {"$": "dict" | "odict", "items": [[key, value], ...]}   keys of any hashable kind
    {"$": "tuple" | "set" | "frozenset", "items": [...]}
    {"$": "bytes", "base64": "..."}
    {"$": "size", "dims": [...]}                            torch.Size
    {"$": "dtype", "name": "float16"}                       torch.dtype
    {"$": "enum", "class": C, "name": member}               C in ENUM_CLASSES
    {"$": "object", "class": C, "fields": {name: value}}    C in OBJECT_FIELDS
    {"$": "tensor", "index": i}

inside ``{"format": "loom.deepspeed-skeleton", "version": 1, "root": ...}``.
The enum and object classes are an exact allow-list (DeepSpeed's
``ZeroStageEnum``, ``LossScaler``, ``DynamicLossScaler`` and
``fragment_address``: what ZeRO-1/2 and bf16 engines save); objects are
rebuilt field by field (``object.__new__`` and their ``__dict__``), running
none of their code.  Anything else in a state dict (say an object in a
``client_state``) is refused at save with a TypeError naming its key path,
on every rank.  At ``path`` itself the engine leaves a small JSON pointer
(url, step, file), which is what DeepSpeed's loader globs for; ``load(path)``
reads it only if it names this engine's store and its own file name.
Damaged or hostile skeletons and pointers raise `InvalidCheckpointError`.
"""
from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import functools
import json
import math
import os

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from .async_engine import AsyncCheckpointer
from .collective import Group, agree, resolve
from .load import load
from .manifest import InvalidCheckpointError, dtype_name
from .state import key_of
from .store import CheckpointStore

POINTER_FORMAT = "loom.deepspeed-pointer"
SKELETON_FORMAT = "loom.deepspeed-skeleton"
SKELETON_VERSION = 1
MAX_SKELETON_BYTES = 64 << 20  # a skeleton is metadata: ~100 bytes per parameter
MAX_POINTER_BYTES = 64 << 10
MAX_DEPTH = 64  # DeepSpeed's state dicts nest ~6 deep

#: Enum classes whose members a skeleton may hold (by member name).
ENUM_CLASSES = (ZeroStageEnum,)
#: Plain-data classes a skeleton may hold, with the fields each may have.
OBJECT_FIELDS = {
    LossScaler: frozenset({"cur_scale", "dynamic"}),
    DynamicLossScaler: frozenset({"cur_scale", "dynamic", "cur_iter", "last_overflow_iter", "scale_factor",
                                  "scale_window", "min_scale", "delayed_shift", "cur_hysteresis",
                                  "consecutive_hysteresis", "raise_error_at_min_scale", "dtype"}),
    fragment_address: frozenset(f.name for f in dataclasses.fields(fragment_address)),
}
#: Every DeepSpeed class a ZeRO-1/2 checkpoint file may name.
DEEPSPEED_CLASSES = (*ENUM_CLASSES, *OBJECT_FIELDS)


def class_name(cls) -> str:
    """``module.QualifiedName`` of a class: how skeletons and errors name it."""
    return f"{cls.__module__}.{cls.__qualname__}"


_ENUMS = {class_name(c): c for c in ENUM_CLASSES}
_OBJECTS = {class_name(c): c for c in OBJECT_FIELDS}
_DTYPES = {dtype_name(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_SEQUENCES = {tuple: "tuple", set: "set", frozenset: "frozenset"}
_MAPPINGS = {dict: "dict", collections.OrderedDict: "odict"}
_NON_FINITE = ("nan", "inf", "-inf")


def _where(path: tuple) -> str:
    return "/".join(p if isinstance(p, str) else repr(p) for p in path) or "<root>"


# ------------------------------------------------------------- skeleton: save

class _Encoder:
    """Turns a state dict into a skeleton node, collecting its tensors."""

    def __init__(self, file: str):
        self.file = file
        self.tensors: list[torch.Tensor] = []

    def refuse(self, path: tuple, what: str):
        raise TypeError(f"{self.file}: the value at {_where(path)!r} is {what}, which loom's DeepSpeed engine "
                        f"cannot store (it keeps tensors, plain containers, numbers, str, bytes, "
                        f"torch.Size, torch.dtype and DeepSpeed's {', '.join(_ENUMS)}, {', '.join(_OBJECTS)}; "
                        f"no pickle)")

    def node(self, x, path: tuple, key: bool = False):
        if len(path) > MAX_DEPTH:
            self.refuse(path, f"nested more than {MAX_DEPTH} levels deep (a cycle?)")
        t = type(x)
        if x is None or t in (bool, int, str):
            return x
        if t is float:
            return x if math.isfinite(x) else {"$": "float", "value": repr(x)}
        if t in ENUM_CLASSES:
            return {"$": "enum", "class": class_name(t), "name": x.name}
        if t is bytes:
            return {"$": "bytes", "base64": base64.b64encode(x).decode("ascii")}
        if t is torch.Size:
            return {"$": "size", "dims": [int(d) for d in x]}
        if t is torch.dtype:
            return {"$": "dtype", "name": dtype_name(x)}
        if t is tuple or t is frozenset:
            return {"$": _SEQUENCES[t], "items": [self.node(v, path + (i,), key) for i, v in enumerate(x)]}
        if key:
            self.refuse(path, f"a dict key or set item of type {class_name(t)}")
        if isinstance(x, torch.Tensor):
            self.tensors.append(x.detach())
            return {"$": "tensor", "index": len(self.tensors) - 1}
        if t in _MAPPINGS:
            return {"$": _MAPPINGS[t], "items": [[self.node(k, path + (k,), key=True), self.node(v, path + (k,))]
                                                 for k, v in x.items()]}
        if t is list:
            return [self.node(v, path + (i,)) for i, v in enumerate(x)]
        if t is set:
            return {"$": "set", "items": [self.node(v, path + (i,), key=True) for i, v in enumerate(x)]}
        if t in OBJECT_FIELDS:
            fields = vars(x)
            extra = sorted(set(fields) - OBJECT_FIELDS[t])
            if extra:
                self.refuse(path + (extra[0],), f"a field of {class_name(t)} that loom does not know "
                                                f"(known: {sorted(OBJECT_FIELDS[t])})")
            return {"$": "object", "class": class_name(t),
                    "fields": {k: self.node(v, path + (k,)) for k, v in fields.items()}}
        self.refuse(path, f"an object of type {class_name(t)}")


def pack(state_dict: dict, file: str) -> dict:
    """Split one DeepSpeed state dict into ``{"skeleton_json": uint8 tensor,
    "tensors": {"0": ..., ...}}`` (see the module doc).  The tensors are
    referenced, not copied.  Raises TypeError naming the key path of a value
    the skeleton cannot hold."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"{file}: DeepSpeed handed over a {type(state_dict).__name__}, not a state dict")
    enc = _Encoder(file)
    root = enc.node(state_dict, ())
    text = json.dumps({"format": SKELETON_FORMAT, "version": SKELETON_VERSION, "root": root},
                      separators=(",", ":"), allow_nan=False)
    data = text.encode("utf-8")
    if len(data) > MAX_SKELETON_BYTES:
        raise TypeError(f"{file}: the non-tensor part of the state dict is {len(data)} bytes as JSON, more "
                        f"than the {MAX_SKELETON_BYTES} loom's DeepSpeed engine stores")
    packed = {"skeleton_json": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    if enc.tensors:
        packed["tensors"] = {str(i): t for i, t in enumerate(enc.tensors)}
    return packed


# ------------------------------------------------------------- skeleton: load

_NODE_KEYS = {"float": {"value"}, "tensor": {"index"}, "dict": {"items"}, "odict": {"items"},
              "tuple": {"items"}, "set": {"items"}, "frozenset": {"items"}, "bytes": {"base64"},
              "size": {"dims"}, "dtype": {"name"}, "enum": {"class", "name"}, "object": {"class", "fields"}}
_UNHASHABLE = {"tensor", "dict", "odict", "set", "object"}


class _Decoder:
    """Rebuilds a state dict from a skeleton node; every node is checked."""

    def __init__(self, file: str, tensors: list):
        self.file, self.tensors = file, tensors

    def fail(self, path: tuple, message: str):
        raise InvalidCheckpointError(f"{self.file}: skeleton entry at {_where(path)!r}: {message}",
                                     file=self.file, field=_where(path))

    def items(self, n: dict, path: tuple) -> list:
        items = n["items"]
        if type(items) is not list:
            self.fail(path, f"'items' must be a list, got {type(items).__name__}")
        return items

    def node(self, n, path: tuple, key: bool = False):
        if len(path) > MAX_DEPTH:
            self.fail(path, f"nested more than {MAX_DEPTH} levels deep")
        t = type(n)
        if n is None or t in (bool, int, float, str):
            return n
        if t is list:
            if key:
                self.fail(path, "a list cannot be a dict key or set item")
            return [self.node(v, path + (i,)) for i, v in enumerate(n)]
        tag = n.get("$") if t is dict else None
        if not isinstance(tag, str) or tag not in _NODE_KEYS:
            self.fail(path, f"unknown node {tag!r}")
        if set(n) != _NODE_KEYS[tag] | {"$"}:
            self.fail(path, f"a {tag!r} node has keys {sorted(n)}; expected {sorted(_NODE_KEYS[tag] | {'$'})}")
        if key and tag in _UNHASHABLE:
            self.fail(path, f"a {tag!r} cannot be a dict key or set item")
        return getattr(self, f"_{tag}")(n, path, key)

    def _float(self, n, path, key):
        if n["value"] not in _NON_FINITE:
            self.fail(path, f"float value {n['value']!r} is not one of {_NON_FINITE}")
        return float(n["value"])

    def _tensor(self, n, path, key):
        i = n["index"]
        if type(i) is not int or not 0 <= i < len(self.tensors):
            self.fail(path, f"tensor index {i!r} is not one of the {len(self.tensors)} stored tensors")
        return self.tensors[i]

    def _mapping(self, n, path, cls):
        out = cls()
        for pair in self.items(n, path):
            if type(pair) is not list or len(pair) != 2:
                self.fail(path, "a dict item must be a [key, value] pair")
            k = self.node(pair[0], path + ("<key>",), key=True)
            out[k] = self.node(pair[1], path + (k,))
        return out

    def _dict(self, n, path, key):
        return self._mapping(n, path, dict)

    def _odict(self, n, path, key):
        return self._mapping(n, path, collections.OrderedDict)

    def _tuple(self, n, path, key):
        return tuple(self.node(v, path + (i,), key) for i, v in enumerate(self.items(n, path)))

    def _set(self, n, path, key):
        return {self.node(v, path + (i,), key=True) for i, v in enumerate(self.items(n, path))}

    def _frozenset(self, n, path, key):
        return frozenset(self._set(n, path, key))

    def _bytes(self, n, path, key):
        try:
            return base64.b64decode(n["base64"], validate=True)
        except (TypeError, ValueError, binascii.Error):
            self.fail(path, "'base64' is not base64 text")

    def _size(self, n, path, key):
        dims = n["dims"]
        if type(dims) is not list or not all(type(d) is int and d >= 0 for d in dims):
            self.fail(path, f"torch.Size dims {dims!r} must be a list of non-negative ints")
        return torch.Size(dims)

    def _dtype(self, n, path, key):
        name = n["name"]
        if not isinstance(name, str) or name not in _DTYPES:
            self.fail(path, f"unknown dtype {name!r}")
        return _DTYPES[name]

    def _enum(self, n, path, key):
        cls = _ENUMS.get(n["class"]) if isinstance(n["class"], str) else None
        if cls is None:
            self.fail(path, f"enum class {n['class']!r} is not one loom loads (known: {sorted(_ENUMS)})")
        member = cls.__members__.get(n["name"]) if isinstance(n["name"], str) else None
        if member is None:
            self.fail(path, f"{n['name']!r} is not a member of {n['class']}")
        return member

    def _object(self, n, path, key):
        cls = _OBJECTS.get(n["class"]) if isinstance(n["class"], str) else None
        if cls is None:
            self.fail(path, f"class {n['class']!r} is not one loom loads (known: {sorted(_OBJECTS)})")
        fields = n["fields"]
        if type(fields) is not dict:
            self.fail(path, f"'fields' of {n['class']} must be a JSON object")
        unknown = sorted(set(fields) - OBJECT_FIELDS[cls])
        if unknown:
            self.fail(path + (unknown[0],), f"{n['class']} has no field {unknown[0]!r} "
                                            f"(known: {sorted(OBJECT_FIELDS[cls])})")
        obj = object.__new__(cls)  # no __init__, no __setattr__: plain data goes into __dict__
        vars(obj).update({k: self.node(v, path + (k,)) for k, v in fields.items()})
        return obj


def _refuse_constant(name):
    raise ValueError(f"JSON constant {name} (non-finite floats are tagged)")


def unpack(packed: dict, file: str, device=None) -> dict:
    """The DeepSpeed state dict that `pack` split into ``packed`` (as loom's
    `load` returns it), its tensors moved to ``device`` if given.  Raises
    InvalidCheckpointError for anything `pack` would not have written."""
    if not isinstance(packed, dict):
        raise InvalidCheckpointError(f"{file}: the loom store holds no DeepSpeed file here", file=file)
    if "skeleton_json" not in packed and "skeleton" in packed:
        raise InvalidCheckpointError(
            f"{file} was saved by an older loom that pickled the non-tensor state; loom no longer "
            f"unpickles it (load it with that loom and save again)", file=file, field="skeleton")
    unknown = sorted(set(packed) - {"skeleton_json", "tensors"})
    if unknown or "skeleton_json" not in packed:
        raise InvalidCheckpointError(f"{file}: expected 'skeleton_json' and 'tensors' in the loom store, "
                                     f"found {sorted(packed)}", file=file, field=(unknown or [None])[0])
    raw = packed["skeleton_json"]
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.dim() != 1:
        raise InvalidCheckpointError(f"{file}: 'skeleton_json' must be a 1-D uint8 array", file=file,
                                     field="skeleton_json")
    if raw.numel() > MAX_SKELETON_BYTES:
        raise InvalidCheckpointError(f"{file}: 'skeleton_json' is {raw.numel()} bytes, more than the "
                                     f"{MAX_SKELETON_BYTES} loom reads", file=file, field="skeleton_json")
    stored = packed.get("tensors", {})
    if not isinstance(stored, dict) or set(stored) != {str(i) for i in range(len(stored))} or \
            not all(isinstance(t, torch.Tensor) for t in stored.values()):
        raise InvalidCheckpointError(f"{file}: 'tensors' must hold tensors named 0..n-1", file=file,
                                     field="tensors")
    tensors = [stored[str(i)] for i in range(len(stored))]
    if device is not None:
        tensors = [t.to(device) for t in tensors]
    try:
        doc = json.loads(raw.numpy().tobytes().decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InvalidCheckpointError(f"{file}: 'skeleton_json' is not valid JSON: "
                                     f"{type(exc).__name__}: {str(exc)[:200]}", file=file,
                                     field="skeleton_json") from None
    if not isinstance(doc, dict) or set(doc) != {"format", "version", "root"} or \
            doc["format"] != SKELETON_FORMAT:
        raise InvalidCheckpointError(f"{file}: 'skeleton_json' is not a {SKELETON_FORMAT} document",
                                     file=file, field="skeleton_json")
    if doc["version"] != SKELETON_VERSION:
        raise InvalidCheckpointError(f"{file}: skeleton version {doc['version']!r}; this loom reads "
                                     f"version {SKELETON_VERSION}", file=file, field="version")
    state = _Decoder(file, tensors).node(doc["root"], ())
    if not isinstance(state, dict):
        raise InvalidCheckpointError(f"{file}: the skeleton's root is a {type(state).__name__}, not a dict",
                                     file=file, field="root")
    return state


# ------------------------------------------------------------------- pointers

def _store_path(url: str) -> str | None:
    """The local path of a url (None for other filesystems)."""
    url = str(url)
    if url.startswith("file://"):
        url = url[len("file://"):]
    return None if "://" in url else os.path.realpath(url)


def same_store(a: str, b: str) -> bool:
    """Whether two checkpoint urls name the same store."""
    pa, pb = _store_path(a), _store_path(b)
    if pa is not None or pb is not None:
        return pa == pb
    return str(a).rstrip("/") == str(b).rstrip("/")


def default_url(save_dir: str) -> str:
    """Where the engine keeps a save directory's loom steps unless told otherwise."""
    return os.path.join(os.path.abspath(save_dir), "loom")


def read_pointer(path: str) -> dict:
    """The pointer file DeepSpeed finds at ``path``: ``{"format", "url",
    "step", "file"}``, checked: the format, a str url, a non-negative int
    step and ``file`` equal to the file's own name.  Raises
    InvalidCheckpointError otherwise (FileNotFoundError if there is none)."""
    name = os.path.basename(path)
    with open(path, "rb") as fh:
        data = fh.read(MAX_POINTER_BYTES + 1)
    if len(data) > MAX_POINTER_BYTES:
        raise InvalidCheckpointError(f"{path} is not a loom pointer file: larger than {MAX_POINTER_BYTES} "
                                     f"bytes (was it saved by another checkpoint engine?)", file=path)
    try:
        pointer = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        pointer = None
    if not isinstance(pointer, dict) or pointer.get("format") != POINTER_FORMAT:
        raise InvalidCheckpointError(f"{path} is not a loom pointer file (was it saved by another "
                                     f"checkpoint engine?)", file=path, field="format")
    if set(pointer) != {"format", "url", "step", "file"}:
        raise InvalidCheckpointError(f"{path}: a loom pointer has the fields format, url, step, file; "
                                     f"this one has {sorted(pointer)}", file=path)
    if not isinstance(pointer["url"], str) or not pointer["url"]:
        raise InvalidCheckpointError(f"{path}: pointer url {pointer['url']!r} must be a non-empty str",
                                     file=path, field="url")
    if pointer["file"] != name:
        raise InvalidCheckpointError(f"{path}: the pointer names file {pointer['file']!r}, not its own "
                                     f"name {name!r}", file=path, field="file")
    step = pointer["step"]
    if type(step) is not int or step < 0:
        raise InvalidCheckpointError(f"{path}: pointer step {step!r} must be a non-negative int",
                                     file=path, field="step")
    return pointer


def load_pointer(path: str, url: str, map_location=None) -> dict:
    """Read the DeepSpeed state dict behind the pointer file ``path``, which
    must name the store ``url`` (InvalidCheckpointError otherwise, and for a
    damaged or hostile skeleton).  ``map_location``: a device for the
    tensors (other forms are ignored: they stay on the CPU).  Reads this
    process's file only (no collective)."""
    pointer = read_pointer(path)
    if not same_store(pointer["url"], url):
        raise InvalidCheckpointError(f"{path}: the pointer names the store {pointer['url']!r}, but this "
                                     f"checkpoint's store is {url!r} (loom reads only from its own store; "
                                     f"pass url= if it was saved elsewhere)", file=path, field="url")
    name, step = pointer["file"], pointer["step"]
    manifest = CheckpointStore(url).read_manifest(step)
    entry = manifest.tensors.get(key_of((name, "skeleton_json")))
    if entry is None:
        if key_of((name, "skeleton")) in manifest.tensors:
            unpack({"skeleton": None}, name)  # raises: the pickled skeleton of an older loom
        raise InvalidCheckpointError(f"{path}: step {step} of {url} holds no DeepSpeed file {name!r}",
                                     file=path, field="file")
    if entry.dtype != "uint8" or len(entry.shape) != 1 or entry.shape[0] > MAX_SKELETON_BYTES:
        raise InvalidCheckpointError(f"{path}: the skeleton of {name} at step {step} of {url} is "
                                     f"{entry.dtype} of shape {list(entry.shape)}, not at most "
                                     f"{MAX_SKELETON_BYTES} uint8 bytes", file=path, field="skeleton_json")
    target = {name: {}}
    load(target, url, step=step, group=Group.alone(), strict=False)
    device = map_location if isinstance(map_location, (str, torch.device)) else None
    return unpack(target[name], name, device)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------- engine

class LoomCheckpointEngine(CheckpointEngine):
    """A decoupled DeepSpeed checkpoint engine that saves through an
    `AsyncCheckpointer` (see the module docstring).  ``url``: where the
    loom steps go (default ``<save_dir>/loom``); the other options are
    `AsyncCheckpointer`'s."""

    def __init__(self, ds_engine, url: str | None = None, *, host_buffer_bytes: int | None = None,
                 keep_last: int | None = None, writer: str = "thread", config_params=None,
                 durable: bool = False, job: str | None = None, takeover: bool = False, lease_s: float = 30.0):
        super().__init__(config_params)
        self.name = "LoomCheckpointEngine"
        self.ds_engine, self.url = ds_engine, url
        self._options = {"host_buffer_bytes": host_buffer_bytes, "keep_last": keep_last, "writer": writer,
                         "durable": durable, "job": job, "takeover": takeover, "lease_s": lease_s}
        self.checkpointers: dict[str, AsyncCheckpointer] = {}
        self._info: CheckpointCommitInfo | None = None
        self._files: dict | None = {}
        self._error: BaseException | None = None
        self._step: int | None = None
        self.handles: list = []

    # -------------------------------------------------------- DeepSpeed API
    def create(self, info: CheckpointCommitInfo):
        self.flush()  # a previous tag not flushed yet goes first
        self._info, self._files, self._error = info, {}, None
        self._step = int(self.ds_engine.global_steps)
        self._checkpointer(info.save_dir)  # collective the first time: every rank is here

    def save(self, state_dict, path: str):
        """Split ``state_dict`` (see `pack`); its pointer is written at
        ``path`` when the tag is flushed.  A value the skeleton cannot hold
        is raised then (as ``save_checkpoint`` returns), on every rank, not
        here: the peers must not be left waiting in DeepSpeed's barrier."""
        if self._info is None or self._files is None:
            raise RuntimeError("LoomCheckpointEngine.save outside create() .. save_checkpoint's end")
        name = os.path.basename(path)
        try:
            self._files[name] = (path, pack(state_dict, name))
        except TypeError as exc:
            self._error = self._error or exc

    def flush(self):
        """Start the loom save of the files DeepSpeed handed over for the
        current tag (returns at once).  Collective over the world: if any
        rank's files could not be packed, every rank raises (the TypeError
        itself where it happened) and nothing is saved."""
        if self._info is None or self._files is None:
            return
        info, files, error = self._info, self._files, self._error
        self._files, self._error = None, None  # flushed: commit() must not save again
        agree(resolve(None), error)
        url = self._url_for(info.save_dir)
        for name, (path, _) in files.items():
            _atomic_write(path, json.dumps({"format": POINTER_FORMAT, "url": url, "step": self._step,
                                            "file": name}))
        state = {"deepspeed": {"tag": str(info.tag)}, **{name: packed for name, (_, packed) in files.items()}}
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
        """The state dict DeepSpeed saved as ``path`` (``<save_dir>/<tag>/<file>``),
        read through its pointer from this engine's store (the configured
        url, or ``<save_dir>/loom``).  Raises InvalidCheckpointError for a
        pointer naming another store or file, or a damaged skeleton."""
        save_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        return load_pointer(path, self._url_for(save_dir), map_location)

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
        return self.url or default_url(save_dir)

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
    loom; the loom save starts as ``save_checkpoint`` returns (and a state
    dict loom cannot store raises TypeError there, on every rank)."""
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
