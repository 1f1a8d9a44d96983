"""Chunk I/O through zarr-python: open an array from its document, read a
box into caller memory."""
from __future__ import annotations

import numpy as np


def open_array(store, path: str, document: dict):
    """A zarr.Array at ``path`` of the checkpoint store, built from its
    metadata document without reading it back (every rank knows it)."""
    from zarr.core.array import Array, AsyncArray
    from zarr.storage import StorePath
    return Array(AsyncArray(document, StorePath(store.zarr_store, path),
                            config={"write_empty_chunks": True}))


def read_box(array, box, out: np.ndarray | None = None) -> np.ndarray:
    """The values of ``box`` (storage coordinates); read straight into
    ``out`` when it is given and C-contiguous."""
    selection = tuple(slice(l, h) for l, h in zip(*box))
    if out is not None and out.ndim and out.flags.c_contiguous:  # zarr ignores out= for 0-d
        from zarr.core.buffer.cpu import NDBuffer
        array.get_basic_selection(selection, out=NDBuffer.from_numpy_array(out))
        return out
    data = np.asarray(array.get_basic_selection(selection))
    if out is not None:
        out[...] = data
        return out
    return data
