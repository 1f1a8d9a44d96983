"""The manifest: what a committed step holds, and how tensors map to arrays.

One JSON document per step (``manifest.json``), written after every chunk:

    {"format": "loom.checkpoint", "version": 1, "step": 10, "world_size": 4,
     "mesh": {"dp": 2, "sp": 2, "ep": 1} | null, "created": <unix time>,
     "tensors": {key: {"path": [...], "containers": "dd", "array": "model/w", "placement":
                 "replicated" | "shard" | "flat" | "per_rank", "dtype": "bfloat16",
                 "shape": [global shape], "storage_dtype": "uint16",
                 "storage_shape": [...], "chunks": [...],
                 "fragments": [[rank, [lo...], [hi...]], ...],
                 "checksums": {"0.1": crc32c, ...}, "nbytes": ...}},
     "values": {key: {"path": [...], "containers": "dd", "value": <JSON>} |
                     {"path": [...], "containers": "dd", "per_rank": [<JSON per rank>]}}}

``path`` holds the typed keys (str or int) and ``containers`` the kind of
container each key indexes (d/l/t: dict, list, tuple), so a load can rebuild
structure the target lacks.  Arrays live in the step's ``state/`` Zarr group
at ``array`` (keys made valid node names).

Every tensor is one Zarr v3 array holding the consolidated global tensor:
its global shape for replicated and sharded tensors, one flat dim for
tensors saved as `Flat` ranges (their ``shape`` says how to view it), and a
leading rank dim for `PerRank` tensors.  Arrays are uncompressed
little-endian; dtypes numpy lacks (bfloat16, float8) are stored as their raw
bits in an unsigned integer of the same width and round-trip bitwise.
"""
from __future__ import annotations

import math
import string
from urllib.parse import quote

import google_crc32c
import numpy as np
import torch

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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in checkpoint")
    return dtype


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype whose numpy twin holds ``dtype``'s bits in a Zarr array."""
    if dtype in _NATIVE or dtype in (torch.uint16, torch.uint32, torch.uint64):
        return dtype
    if dtype.is_complex or dtype.itemsize not in _BITS:
        raise TypeError(f"tensors of dtype {dtype} cannot be checkpointed")
    return _BITS[dtype.itemsize]


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


def array_document(key: str, entry: dict) -> dict:
    """The zarr.json of a manifest tensor entry (the true dtype and logical
    shape ride along as attributes)."""
    attrs = {"loom": {"key": key, "dtype": entry["dtype"], "shape": entry["shape"],
                      "placement": entry["placement"]}}
    return zarr_metadata(entry["storage_shape"], entry["chunks"], torch_dtype(entry["storage_dtype"]), attrs)


def group_metadata(attributes: dict | None = None) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


# ------------------------------------------------------------ array names

_SAFE = string.ascii_letters + string.digits + "-_.,+=@()[]{}~"


def _node_name(component) -> str:
    name = quote(str(component), safe=_SAFE)
    if name == "":
        return "%"  # quote() never yields a bare '%', so this cannot collide
    if name.strip(".") == "" or name.startswith("__"):  # not valid Zarr node names
        name = f"%{ord(name[0]):02X}" + name[1:]
    return name


def array_path(path) -> str:
    """The Zarr node path of a state path: a valid node name per component."""
    return "/".join(_node_name(c) for c in path)


# --------------------------------------------------------------- manifest

def new_manifest(step: int, world_size: int, mesh, created: float) -> dict:
    return {"format": FORMAT, "version": VERSION, "step": step, "world_size": world_size,
            "mesh": mesh, "created": created, "tensors": {}, "values": {}}


def check_manifest(m: dict, where: str) -> dict:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{where} is not a loom checkpoint manifest")
    if m.get("version") != VERSION:
        raise ValueError(f"{where} has manifest version {m.get('version')}; this loom reads "
                         f"version {VERSION}")
    for key, entry in m["tensors"].items():
        if entry.get("placement") not in PLACEMENTS:
            raise ValueError(f"tensor {key!r} in {where} has unknown placement "
                             f"{entry.get('placement')!r} (known: {', '.join(PLACEMENTS)})")
        torch_dtype(entry.get("dtype"))
    return m


def entry_nbytes(entry: dict) -> int:
    return math.prod(entry["storage_shape"]) * torch_dtype(entry["dtype"]).itemsize

