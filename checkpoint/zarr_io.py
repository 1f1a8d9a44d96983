"""Chunk I/O, straight between the chunk objects and the caller's memory.

loom's arrays are uncompressed with the ``bytes`` codec (little-endian), so
by the Zarr v3 spec a chunk object is exactly the C-order bytes of the full
chunk shape (edge chunks padded with the fill value, zero).  Writing and
reading those bytes directly skips zarr-python's per-chunk encode buffers
and copies (which page-fault fresh memory for every large chunk); chunks
whose valid region is not a prefix of the stored bytes (edge chunks cut
along an inner dim) go through zarr-python.
"""
from __future__ import annotations

import errno
import math
import mmap
import os

import numpy as np

_ZEROS = bytes(1 << 20)


def open_array(store, path: str, document: dict):
    """A zarr.Array at ``path`` of the checkpoint store, built from its
    metadata document without reading it back (every rank knows it)."""
    from zarr.core.array import Array, AsyncArray
    from zarr.storage import StorePath
    return Array(AsyncArray(document, StorePath(store.zarr_store, path),
                            config={"write_empty_chunks": True}))


def chunk_key(array_path: str, index) -> str:
    """The store key of a chunk (default chunk key encoding, '/' separator)."""
    return f"{array_path}/c/" + "/".join(map(str, index)) if index else f"{array_path}/c"


def is_prefix(valid_shape, chunk_shape) -> bool:
    """Are the valid values of a chunk the first bytes of its stored object?
    (True unless an edge cuts the chunk along an inner dim.)"""
    return tuple(valid_shape[1:]) == tuple(chunk_shape[1:])


def write_raw(store, key: str, data: np.ndarray, chunk_shape) -> None:
    """Store a chunk whose valid values ``data`` (C-contiguous) are a prefix
    of its bytes: those bytes, then zeros up to the full chunk shape."""
    view = memoryview(data.reshape(-1).view(np.uint8))
    pad = math.prod(chunk_shape) * data.itemsize - len(view)
    if store.local:
        path = os.path.join(store.root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fh = open(path, "wb", buffering=0)
    else:
        fh = store.fs.open(store.path(key), "wb")
    with fh:
        done = 0
        while done < len(view):  # unbuffered writes may be partial
            done += fh.write(view[done:])
        while pad > 0:
            done = fh.write(_ZEROS[:min(pad, len(_ZEROS))])
            pad -= done


def read_raw(store, key: str, dest: np.ndarray) -> int:
    """Read the first ``dest.nbytes`` bytes of a chunk object into C-contiguous
    ``dest``; returns how many bytes there were (fewer means truncated).
    Off local disks one ranged read (``cat_file``: for s3:// one GET, no
    HEAD, no read-ahead cache copying the bytes on their way)."""
    view = memoryview(dest.reshape(-1).view(np.uint8))
    if not store.local:
        if not len(view):
            return 0
        try:
            data = store.fs.cat_file(store.path(key), start=0, end=len(view))
        except OSError as exc:
            if exc.errno == errno.EINVAL and "range" in str(exc).lower():
                return 0  # S3: "the requested range is not satisfiable", an empty object
            raise
        view[:len(data)] = data[:len(view)]
        return min(len(data), len(view))
    total = 0
    with open(os.path.join(store.root, key), "rb", buffering=0) as fh:
        while total < len(view):
            n = fh.readinto(view[total:])
            if not n:
                break
            total += n
    return total


def map_raw(store, key: str, nbytes: int) -> tuple[np.ndarray | None, int]:
    """The first ``nbytes`` of a chunk object of a local store, memory-mapped
    read-only: ``(uint8 view, nbytes)``, or ``(None, size)`` when the object
    is missing (size 0) or shorter.  Reading through the mapping copies
    straight from the page cache into the destination, and touches only the
    pages a partial read needs.  The mapping lives as long as the view."""
    try:
        fd = os.open(os.path.join(store.root, key), os.O_RDONLY)
    except FileNotFoundError:
        return None, 0
    try:
        size = os.fstat(fd).st_size
        if size < nbytes:
            return None, size
        if nbytes == 0:
            return np.empty(0, dtype=np.uint8), 0
        try:
            return np.frombuffer(mmap.mmap(fd, nbytes, access=mmap.ACCESS_READ), dtype=np.uint8), nbytes
        except OSError:  # a filesystem that cannot map files (some FUSE mounts)
            pass
    finally:
        os.close(fd)
    buf = np.empty(nbytes, dtype=np.uint8)  # ... read instead
    got = read_raw(store, key, buf)
    return (buf, nbytes) if got == nbytes else (None, got)


def read_box(array, box, out: np.ndarray | None = None) -> np.ndarray:
    """The values of ``box`` through zarr-python; into ``out`` when given."""
    selection = tuple(slice(start, stop) for start, stop in zip(*box))
    if out is not None and out.ndim and out.flags.c_contiguous:  # zarr ignores out= for 0-d
        from zarr.core.buffer.cpu import NDBuffer
        array.get_basic_selection(selection, out=NDBuffer.from_numpy_array(out))
        return out
    data = np.asarray(array.get_basic_selection(selection))
    if out is not None:
        out[...] = data
        return out
    return data

