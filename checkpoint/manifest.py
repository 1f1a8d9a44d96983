"""The manifest: what a committed step holds, and how tensors map to arrays.

One JSON document per step (``manifest.json``), written after every chunk.
Its schema is the dataclasses `Manifest`, `TensorEntry`, `ValueEntry` and
`Fragment` below (their fields, in order, are the document's fields):

    {"format": "loom.checkpoint", "version": 1, "step": 10, "world_size": 4,
     "mesh": {"dp": 2, "sp": 2, "ep": 1} | null, "created": <unix time> | null,
     "tensors": {key: {"path": [...], "containers": "dd", "array": "model/w", "placement":
                 "replicated" | "shard" | "flat" | "per_rank", "dtype": "bfloat16",
                 "shape": [global shape], "storage_dtype": "uint16",
                 "storage_shape": [...], "chunks": [...],
                 "fragments": [[rank, [lo...], [hi...]], ...],
                 "nbytes": ..., "checksums": {"0.1": crc32c, ...}}},
     "values": {key: {"path": [...], "containers": "dd", "value": <JSON>} |
                     {"path": [...], "containers": "dd", "per_rank": [<JSON per rank>]}}}

`Manifest.to_json` writes it and `Manifest.from_json` reads it back (the
same bytes); reading is the one place a manifest is checked (`check_manifest`).

``path`` holds the typed keys (str or int) and ``containers`` the kind of
container each key indexes (d/l/t: dict, list, tuple), so a load can rebuild
structure the target lacks.  Arrays live in the step's ``state/`` Zarr group
at ``array``, which must equal `array_path` of ``path`` (one escaped node
name per key: any string key round-trips, and no manifest can name a path
outside the step).

Every tensor is one Zarr v3 array holding the consolidated global tensor:
its global shape for replicated and sharded tensors, one flat dim for
tensors saved as `Flat` ranges (their ``shape`` says how to view it), and a
leading rank dim for `PerRank` tensors.  Arrays are uncompressed
little-endian; dtypes numpy lacks (bfloat16, float8) are stored as their raw
bits in an unsigned integer of the same width and round-trip bitwise.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import string
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import quote

import google_crc32c
import numpy as np
import torch

from . import layout
from .state import decode_value, dumps, key_of

FORMAT = "loom.checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
MARKER = "COMMITTED"
PLACEMENTS = ("replicated", "shard", "flat", "per_rank")

_NATIVE = {torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
           torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128}
_BITS = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


class InvalidCheckpointError(ValueError):
    """A checkpoint store holds something loom did not write, or holds it
    damaged: a manifest, marker or pointer that does not parse or whose
    numbers disagree with each other or with the bytes really stored, a
    path that leaves the store, a chunk of the wrong size.  ``file`` names
    the object and ``field`` the offending entry (either may be None)."""

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None):
        super().__init__(message)
        self.file, self.field = file, field


class ChecksumError(InvalidCheckpointError):
    """Stored bytes do not match the checksum recorded at save time."""


# ------------------------------------------------------------------ schema
#
# The dataclasses below ARE the manifest's schema: their fields, in order,
# are the JSON document's fields, in the order loom writes them, and
# `Manifest.to_json` writes exactly the bytes `Manifest.from_json` read (the
# same bytes a save writes).  `Manifest.from_json` is the one place a
# manifest read from a store is checked (see `check_manifest`).

Path = tuple  # a state path: typed keys (str or int) from the state's root


def _json_of(value):
    """The JSON form of a schema field's value (tuples become lists)."""
    if isinstance(value, _Schema):
        return value.jsonable()
    if isinstance(value, tuple):
        return [_json_of(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_of(v) for k, v in value.items()}
    return value


class _Schema:
    def jsonable(self):
        """This object's JSON form: its fields, in order."""
        return {f.name: _json_of(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class Fragment(_Schema):
    """The box of a stored array one saving rank held: ``lo`` to ``hi``
    (exclusive) per storage dim.  JSON: ``[rank, [lo...], [hi...]]``."""
    rank: int              # in [0, world_size)
    lo: tuple[int, ...]    # one per dim of ``storage_shape``
    hi: tuple[int, ...]    # lo <= hi <= storage_shape, per dim

    @property
    def box(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.lo, self.hi

    def jsonable(self) -> list:
        return [self.rank, list(self.lo), list(self.hi)]


@dataclass(frozen=True, kw_only=True)
class TensorEntry(_Schema):
    """One tensor: a Zarr v3 array under the step's ``state/`` group."""
    path: Path                       # the typed keys of the tensor in the state (1 to MAX_PATH)
    containers: str                  # per path key the container it indexes: d(ict), l(ist), t(uple)
    array: str                       # the array's node path below ``state/``: always array_path(path)
    placement: str                   # one of PLACEMENTS
    dtype: str                       # the torch dtype's name ("bfloat16")
    shape: tuple[int, ...]           # the logical global shape
    storage_dtype: str               # dtype_name(storage_dtype(dtype)): numpy's twin holding the bits
    storage_shape: tuple[int, ...]   # shape (replicated, shard), [prod(shape)] (flat), [world_size, *shape]
    chunks: tuple[int, ...]          # the regular chunk grid's chunk shape, each in [1, max(dim, 1)]
    fragments: tuple[Fragment, ...]  # which rank held which box (per_rank: rank i holds row i)
    nbytes: int                      # prod(storage_shape) * itemsize of dtype
    checksums: dict[str, int]        # chunk name ("0.1", layout.chunk_name) -> crc32c, one per chunk

    @property
    def tensor_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


@dataclass(frozen=True, kw_only=True)
class ValueEntry(_Schema):
    """One plain value, in `state.encode_value`'s JSON form: either one value
    every rank saved alike (JSON field ``value``) or a `PerRank` value's
    list of every saving rank's value (JSON field ``per_rank``, and no
    ``value``)."""
    path: Path                     # as TensorEntry.path
    containers: str                # as TensorEntry.containers
    value: Any = None              # the shared value (any JSON; null is a value)
    per_rank: tuple | None = None  # world_size values, by rank; None for a shared value

    @property
    def is_per_rank(self) -> bool:
        return self.per_rank is not None

    def decoded(self, rank: int | None = None):
        """The saved value (rank ``rank``'s for a per-rank value)."""
        if self.per_rank is None:
            return decode_value(self.value)
        if rank is None:
            raise ValueError("a per-rank value needs the rank whose value to decode")
        return decode_value(self.per_rank[rank])

    def jsonable(self) -> dict:  # one of value and per_rank; the value's JSON as it is
        if self.per_rank is None:
            return {"path": list(self.path), "containers": self.containers, "value": self.value}
        return {"path": list(self.path), "containers": self.containers, "per_rank": list(self.per_rank)}


@dataclass(frozen=True, kw_only=True)
class Manifest(_Schema):
    """What one committed step holds (``manifest.json``)."""
    format: str = FORMAT             # always FORMAT: anything else is not a loom manifest
    version: int = VERSION           # always VERSION: the only version this loom reads
    step: int                        # the step of the folder it lies in
    world_size: int                  # ranks that saved it (>= 1)
    mesh: dict[str, int] | None      # the saving mesh's degrees by dim name ({"dp": 2, "sp": 2}), or null
    created: float | None            # unix time of the commit, or null
    tensors: dict[str, TensorEntry]  # by key (`state.key_of` of the path)
    values: dict[str, ValueEntry]    # by key; no key is also a tensor

    def to_json(self) -> bytes:
        """The manifest.json bytes (compact JSON, fields in schema order)."""
        return dumps(self.jsonable()).encode()

    @classmethod
    def from_json(cls, raw: bytes, file: str, step: int | None = None) -> Manifest:
        """The manifest in ``raw`` (the bytes of ``file``, read within
        MAX_MANIFEST), checked: see `parse_json` and `check_manifest`.
        Raises InvalidCheckpointError naming ``file`` and the field."""
        return check_manifest(parse_json(raw, file), file, step)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a manifest names (a fixed table: a name read from a
    store is never looked up as an attribute).  Raises ValueError for a
    name that is not a dtype a checkpoint can hold."""
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"unknown dtype {_show(name)} in checkpoint")
    return dtype


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype whose numpy twin holds ``dtype``'s bits in a Zarr array."""
    if dtype in _NATIVE or dtype in (torch.uint16, torch.uint32, torch.uint64):
        return dtype
    if dtype.is_complex or dtype.itemsize not in _BITS:
        raise TypeError(f"tensors of dtype {dtype} cannot be checkpointed")
    return _BITS[dtype.itemsize]


_QUANTIZED = {getattr(torch, n) for n in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4") if hasattr(torch, n)}


def _checkpointable(dtype: torch.dtype) -> bool:
    try:
        storage_dtype(dtype)
    except TypeError:
        return False
    return dtype not in _QUANTIZED  # refused at save (scale and zero point would be lost)


# every dtype a checkpoint can hold, by the name a manifest gives it
_DTYPES = {dtype_name(d): d for d in vars(torch).values() if isinstance(d, torch.dtype) and _checkpointable(d)}


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view (no copy) of a CPU tensor's bits in its storage dtype."""
    t = t.detach()
    sd = storage_dtype(t.dtype)
    return (t if sd == t.dtype else t.view(sd)).numpy()


def from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t if t.dtype == dtype else t.view(dtype)


def contiguous(a) -> np.ndarray:
    """``a`` as a C-contiguous array, copied only if needed (0-d stays 0-d,
    unlike np.ascontiguousarray)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")


# google_crc32c holds the GIL while it runs: checksum large chunks piece by
# piece so a background save never blocks the training thread for long.
_CRC_PIECE = 4 << 20


def checksum(a: np.ndarray) -> int:
    """crc32c of the C-order little-endian bytes of ``a``."""
    a = contiguous(a)
    if not a.size:
        return 0
    data = a.reshape(-1).view(np.uint8)
    crc = 0
    for start in range(0, len(data), _CRC_PIECE):
        crc = google_crc32c.extend(crc, data[start:start + _CRC_PIECE])
    return crc


def zarr_metadata(storage_shape, chunks, sdtype: torch.dtype, attributes: dict) -> dict:
    """The zarr.json document of one uncompressed array (Zarr v3 spec)."""
    np_dtype = np.dtype(dtype_name(sdtype))
    fill = [0.0, 0.0] if np_dtype.kind == "c" else (False if np_dtype.kind == "b" else 0)
    return {"zarr_format": 3, "node_type": "array", "shape": list(storage_shape),
            "data_type": np_dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": fill, "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
            "attributes": attributes, "storage_transformers": []}


def array_document(key: str, entry: TensorEntry) -> dict:
    """The zarr.json of a manifest tensor entry (the true dtype and logical
    shape ride along as attributes)."""
    attrs = {"loom": {"key": key, "dtype": entry.dtype, "shape": list(entry.shape),
                      "placement": entry.placement}}
    return zarr_metadata(entry.storage_shape, entry.chunks, torch_dtype(entry.storage_dtype), attrs)


def group_metadata(attributes: dict | None = None) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


# ------------------------------------------------------------ array names

_SAFE = string.ascii_letters + string.digits + "-_.,+=@()[]{}~"
# names Zarr (v3, and v2 readers probing a folder) gives its own objects in a node's folder
_ZARR_OWN = {"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"}
_INT_LIKE = re.compile(r"^-?[0-9]+$")
MAX_NAME = 255  # bytes of one file name on common filesystems


def _node_name(component) -> str:
    """One path component as a node name.  Injective: ints keep their
    digits; a str is percent-encoded (every output percent-decodes back to
    the str), and its first character is escaped too when the result would
    read as an int, be empty or all dots, start with ``__`` (not valid Zarr
    node names) or name one of Zarr's own objects (any case: some
    filesystems ignore it).  A name longer than MAX_NAME keeps a readable
    head and ends in ``%%`` and a sha256 (quote() never yields ``%%``)."""
    if isinstance(component, int) and not isinstance(component, bool):
        return str(component)
    name = quote(str(component), safe=_SAFE)
    if name == "":
        return "%"  # quote() never yields a bare '%', so this cannot collide
    if (name.strip(".") == "" or name.startswith("__") or _INT_LIKE.match(name)
            or name.lower() in _ZARR_OWN):
        name = f"%{ord(name[0]):02X}" + name[1:]
    if len(name) > MAX_NAME:
        name = f"{name[:64]}%%{hashlib.sha256(name.encode()).hexdigest()[:40]}"
    return name


def array_path(path) -> str:
    """The Zarr node path of a state path (its str/int components): one
    node name per component (see `_node_name`), so distinct paths get
    distinct nodes, every node name is one the store can hold, and the
    result never leaves the step's group (no '/', '.', '..' components)."""
    return "/".join(_node_name(c) for c in path)


# --------------------------------------------------------------- manifest

def new_manifest(step: int, world_size: int, mesh: dict | None, created: float | None,
                 tensors: dict | None = None, values: dict | None = None) -> Manifest:
    """The manifest of ``step`` saved by ``world_size`` ranks, holding
    ``tensors`` ({key: TensorEntry}) and ``values`` ({key: ValueEntry})."""
    return Manifest(step=step, world_size=world_size, mesh=mesh, created=created,
                    tensors=dict(tensors or {}), values=dict(values or {}))


# ------------------------------------------------------- reading a store
#
# Everything below reads what a store holds as hostile: sizes and depths are
# bounded before parsing, every field is checked for type and range and
# against the rest of the manifest, and every error is an
# InvalidCheckpointError naming the file and the field.

MAX_SMALL_JSON = 64 << 10    # bytes of a marker or of `latest`
MAX_MANIFEST = 256 << 20     # bytes of a manifest
MAX_JSON_DEPTH = 512         # nesting of any JSON document loom reads
MAX_NDIM = 64
MAX_PATH = 256               # components of a state path
_INDEX_LIMIT = 1 << 62       # shapes and offsets (sizes and strides fit in int64)
_TOP = {f.name for f in fields(Manifest)}
_TENSOR = {f.name for f in fields(TensorEntry)}
_VALUE = ({"path", "containers", "value"}, {"path", "containers", "per_rank"})  # ValueEntry: one of the two


def _show(value, limit: int = 80) -> str:
    """repr() of a value read from a store, clipped (it may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def invalid(file: str, field: str | None, message: str) -> InvalidCheckpointError:
    """The error for ``file``'s ``field`` (a manifest path such as
    ``tensors['w'].chunks``; None for the file as a whole)."""
    where = f"{file}: {field}" if field else file
    return InvalidCheckpointError(f"{where}: {message}", file=file, field=field)


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def _depth(doc) -> int:
    """Nesting depth of a parsed JSON document (iterative: no recursion)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest if isinstance(doc, (dict, list)) else 0


def parse_json(raw: bytes, file: str):
    """The JSON document in ``raw`` (the bytes of ``file``, already read
    within a size limit).  Refuses NaN/Infinity and nesting deeper than
    MAX_JSON_DEPTH; raises InvalidCheckpointError naming ``file`` for
    anything that does not parse (RecursionError and MemoryError included)."""
    try:
        doc = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise invalid(file, None, f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except MemoryError:
        raise invalid(file, None, "JSON too large to parse") from None
    except ValueError as exc:  # UnicodeDecodeError is one
        raise invalid(file, None, f"not valid JSON ({_show(str(exc), 120)})") from None
    if _depth(doc) > MAX_JSON_DEPTH:
        raise invalid(file, None, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return doc


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Checker:
    """The checks of one manifest (``file``), raising at the first problem,
    and the dataclasses built from what passed them."""

    def __init__(self, file: str):
        self.file = file

    def fail(self, field, message):
        raise invalid(self.file, field, message)

    def int(self, v, field, lo=0, hi=_INDEX_LIMIT) -> int:
        if not _is_int(v) or not lo <= v <= hi:
            self.fail(field, f"{_show(v)} must be an int in [{lo}, {hi}]")
        return v

    def ints(self, v, field, n=None, lo=0, hi=_INDEX_LIMIT) -> list:
        if not isinstance(v, list) or (len(v) != n if n is not None else len(v) > MAX_NDIM):
            want = f"{n} ints" if n is not None else f"at most {MAX_NDIM} ints"
            self.fail(field, f"{_show(v)} must be a list of {want}")
        for i, x in enumerate(v):
            self.int(x, f"{field}[{i}]", lo, hi)
        return v

    def path(self, key: str, entry: dict, field: str) -> tuple:
        path, containers = entry.get("path"), entry.get("containers")
        if not isinstance(path, list) or not 0 < len(path) <= MAX_PATH:
            self.fail(f"{field}.path", f"{_show(path)} must be a list of 1 to {MAX_PATH} keys")
        if not isinstance(containers, str) or len(containers) != len(path) or set(containers) - set("dlt"):
            self.fail(f"{field}.containers", f"{_show(containers)} must be one of d, l, t per path key")
        for i, (c, kind) in enumerate(zip(path, containers)):
            ok = isinstance(c, str) or (_is_int(c) and -_INDEX_LIMIT <= c <= _INDEX_LIMIT)
            if not ok or (kind != "d" and not (_is_int(c) and c >= 0)):
                self.fail(f"{field}.path[{i}]", f"{_show(c)} must be a str or int key "
                                                f"(a non-negative int in a list or tuple)")
        if key_of(path) != key:
            self.fail(f"{field}.path", f"{_show(path)} is not the path of key {_show(key)}")
        return tuple(path)

    def tensor(self, key: str, e, world: int) -> TensorEntry:
        field = f"tensors[{_show(key)}]"
        if not isinstance(e, dict) or set(e) != _TENSOR:
            self.fail(field, f"a tensor entry has exactly the fields {sorted(_TENSOR)}")
        path = self.path(key, e, field)
        if e["array"] != array_path(path):  # the only name a path may have: inside the step
            self.fail(f"{field}.array", f"{_show(e['array'])} is not the array of path {_show(path)} "
                                        f"({_show(array_path(path))})")
        placement = e["placement"]
        if placement not in PLACEMENTS:
            self.fail(f"{field}.placement", f"unknown placement {_show(placement)} "
                                            f"(known: {', '.join(PLACEMENTS)})")
        try:
            dtype = torch_dtype(e["dtype"])
        except ValueError as exc:
            self.fail(f"{field}.dtype", str(exc))
        if e["storage_dtype"] != dtype_name(storage_dtype(dtype)):
            self.fail(f"{field}.storage_dtype", f"{_show(e['storage_dtype'])} is not the storage dtype "
                                                f"of {e['dtype']} ({dtype_name(storage_dtype(dtype))})")
        shape = self.ints(e["shape"], f"{field}.shape")
        expected = {"flat": [math.prod(shape)], "per_rank": [world, *shape]}.get(placement, shape)
        sshape = self.ints(e["storage_shape"], f"{field}.storage_shape", len(expected))
        if sshape != expected:
            self.fail(f"{field}.storage_shape", f"{_show(sshape)} does not follow from placement "
                                                f"{placement}, shape {shape} and world_size {world}")
        if math.prod(max(n, 1) for n in sshape) * dtype.itemsize > _INDEX_LIMIT:
            self.fail(f"{field}.storage_shape", f"{_show(sshape)} is too large for any tensor")
        if not _is_int(e["nbytes"]) or e["nbytes"] != math.prod(sshape) * dtype.itemsize:
            self.fail(f"{field}.nbytes", f"{_show(e['nbytes'])} is not {math.prod(sshape) * dtype.itemsize} "
                                         f"(storage_shape {sshape} of {e['dtype']})")
        chunks = self.ints(e["chunks"], f"{field}.chunks", len(sshape), lo=1)
        for d, (c, n) in enumerate(zip(chunks, sshape)):
            if c > max(n, 1):
                self.fail(f"{field}.chunks[{d}]", f"{c} is larger than the array's dim ({n})")
        self.checksums(e["checksums"], sshape, chunks, f"{field}.checksums")
        fragments = self.fragments(e["fragments"], placement, sshape, world, f"{field}.fragments")
        return TensorEntry(path=path, containers=e["containers"], array=e["array"], placement=placement,
                           dtype=e["dtype"], shape=tuple(shape), storage_dtype=e["storage_dtype"],
                           storage_shape=tuple(sshape), chunks=tuple(chunks), fragments=fragments,
                           nbytes=e["nbytes"], checksums=e["checksums"])

    def checksums(self, sums, sshape, chunks, field) -> None:
        count = layout.num_chunks(sshape, chunks)
        if not isinstance(sums, dict) or len(sums) != count:
            self.fail(field, f"must hold one crc32c per chunk of the grid ({count} chunks of {chunks} "
                             f"over {sshape}), not {len(sums) if isinstance(sums, dict) else _show(sums)}")
        for index in layout.chunk_indices(sshape, chunks):  # as many as the entries, at most
            name = layout.chunk_name(index)
            if name not in sums:
                self.fail(field, f"lacks chunk {name} of the grid ({chunks} over {sshape})")
            self.int(sums[name], f"{field}[{name!r}]", 0, (1 << 32) - 1)

    def fragments(self, frags, placement, sshape, world, field) -> tuple[Fragment, ...]:
        if not isinstance(frags, list) or not 0 < len(frags) <= world:
            self.fail(field, f"must be a list of 1 to world_size={world} fragments")
        ranks, out = set(), []
        for i, f in enumerate(frags):
            if not isinstance(f, list) or len(f) != 3:
                self.fail(f"{field}[{i}]", f"{_show(f)} must be [rank, lo, hi]")
            rank = self.int(f[0], f"{field}[{i}][0]", 0, world - 1)
            lo = self.ints(f[1], f"{field}[{i}][1]", len(sshape))
            hi = self.ints(f[2], f"{field}[{i}][2]", len(sshape))
            if rank in ranks:
                self.fail(f"{field}[{i}][0]", f"rank {rank} holds two fragments")
            ranks.add(rank)
            if not all(a <= b <= n for a, b, n in zip(lo, hi, sshape)):
                self.fail(f"{field}[{i}]", f"box {lo}..{hi} is not inside the array {sshape}")
            if placement == "per_rank" and (rank != i or lo[:1] != [i] or hi[:1] != [i + 1]
                                            or lo[1:] != [0] * (len(sshape) - 1) or hi[1:] != sshape[1:]):
                self.fail(f"{field}[{i}]", "a per-rank tensor has one fragment per rank: rank i holds row i")
            out.append(Fragment(rank, tuple(lo), tuple(hi)))
        if placement == "per_rank" and len(frags) != world:
            self.fail(field, f"a per-rank tensor has world_size={world} fragments, not {len(frags)}")
        return tuple(out)

    def value(self, key: str, e, world: int) -> ValueEntry:
        field = f"values[{_show(key)}]"
        if not isinstance(e, dict) or set(e) not in _VALUE:
            self.fail(field, "a value entry has the fields path, containers and value or per_rank")
        path = self.path(key, e, field)
        if "per_rank" in e:
            if not isinstance(e["per_rank"], list) or len(e["per_rank"]) != world:
                self.fail(f"{field}.per_rank", f"must be a list of world_size={world} values")
            items = [(f"{field}.per_rank[{r}]", v) for r, v in enumerate(e["per_rank"])]
        else:
            items = [(f"{field}.value", e["value"])]
        for where, v in items:
            try:
                decode_value(v)
            except Exception as exc:  # noqa: BLE001 - any failure of a pure decode is damage
                self.fail(where, f"not a value loom encodes ({type(exc).__name__}: {_show(str(exc), 120)})")
        if "per_rank" in e:
            return ValueEntry(path=path, containers=e["containers"], per_rank=tuple(e["per_rank"]))
        return ValueEntry(path=path, containers=e["containers"], value=e["value"])

    def tree(self, entries) -> None:
        """The paths of all entries form one tree: each container has one
        kind, and no entry's path is inside another's (nor are their
        arrays: `array_path` is injective per component)."""
        kinds: dict = {}  # prefix node -> container kind
        ids: dict = {(): 0}
        leaves = set()
        for field, path, containers in entries:
            node = 0
            for c, kind in zip(path, containers):
                if node in leaves:
                    self.fail(f"{field}.path", "lies inside another entry's path")
                if kinds.setdefault(node, kind) != kind:
                    self.fail(f"{field}.containers", "disagrees with another entry about a container's kind")
                node = ids.setdefault((node, type(c).__name__, c), len(ids))
            if node in kinds or node in leaves:
                self.fail(f"{field}.path", "is another entry's path or contains another entry")
            leaves.add(node)


def check_manifest(m, file: str, step: int | None = None) -> Manifest:
    """The `Manifest` of a parsed manifest document ``m`` (read from
    ``file``), checked before anything acts on it: every field's type and
    range, and every number against the rest of the manifest (storage
    shapes, dtypes and byte counts against placement and world_size, the
    chunk grid against the checksums recorded, fragments inside the array,
    per-rank lists of world_size entries, array names derived from the
    paths, ``step`` equal to ``step`` when given).  Work is bounded by the
    manifest's size.  Raises InvalidCheckpointError naming ``file`` and the
    field.  `Manifest.from_json` parses and checks raw bytes."""
    c = _Checker(file)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        c.fail("format", "not a loom checkpoint manifest")
    if m.get("version") != VERSION:
        c.fail("version", f"manifest version {_show(m.get('version'))}; this loom reads version {VERSION}")
    if set(m) != _TOP:
        c.fail(None, f"a manifest has exactly the fields {sorted(_TOP)}, not {_show(sorted(m), 200)}")
    c.int(m["step"], "step")
    if step is not None and m["step"] != step:
        c.fail("step", f"{m['step']} is not the step of its folder ({step})")
    world = c.int(m["world_size"], "world_size", lo=1)
    mesh = m["mesh"]
    if mesh is not None and not (isinstance(mesh, dict) and all(_is_int(v) and v >= 1 for v in mesh.values())):
        c.fail("mesh", f"{_show(mesh)} must be null or a dict of positive int degrees")
    created = m["created"]
    if created is not None and not (isinstance(created, (int, float)) and not isinstance(created, bool)
                                    and math.isfinite(created)):
        c.fail("created", f"{_show(created)} must be null or a time in seconds")
    for name in ("tensors", "values"):
        if not isinstance(m[name], dict):
            c.fail(name, f"must be a dict, not {type(m[name]).__name__}")
    both = m["tensors"].keys() & m["values"].keys()
    if both:
        c.fail("values", f"keys {_show(sorted(both))} are also tensors")
    tensors = {key: c.tensor(key, entry, world) for key, entry in m["tensors"].items()}
    values = {key: c.value(key, entry, world) for key, entry in m["values"].items()}
    c.tree([(f"{kind}[{_show(k)}]", e.path, e.containers)
            for kind, entries in (("tensors", tensors), ("values", values)) for k, e in entries.items()])
    return Manifest(step=m["step"], world_size=world, mesh=mesh, created=created, tensors=tensors, values=values)
