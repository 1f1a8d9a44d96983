"""PyTorch DTensors (FSDP2's sharded parameters and optimizer state) as boxes.

A DTensor on a `DeviceMesh` holds on each rank one box of its global tensor:
``placements[i]`` says how mesh dim ``i`` splits it (``Replicate()``: every
coordinate holds the same; ``Shard(d)``: tensor dim ``d`` is cut into
``mesh.size(i)`` pieces the way ``torch.chunk`` cuts it - pieces of
``ceil(n / size)`` rows, the last ones shorter or empty).  A checkpoint saves
that box as a `loom.checkpoint.Shard` of the global tensor - this rank's
local tensor, no gather - and a load fills it from whatever layout was saved.

`dtensor_box` computes the box from the mesh coordinate and the placements,
so that what a checkpoint records does not depend on DTensor internals; the
local tensor's shape is checked against it.
"""
from __future__ import annotations

import math
import sys

import torch


def is_dtensor(value) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (a
    parameter wrapping one included).  Never imports DTensor: none can
    exist before its module is imported (which takes ~0.4 s)."""
    if type(value) is torch.Tensor:
        return False
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def _strided_shard_type() -> type | None:
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - a torch without it
        return None
    return _StridedShard


def dtensor_box(global_shape, mesh, placements, key: str = "") -> tuple[tuple, tuple] | None:
    """This rank's box of a DTensor: ``(offsets, local_shape)``, both of
    ``len(global_shape)`` ints, or None when this rank is not in ``mesh``
    (``mesh.get_coordinate()`` is None: it holds nothing).

    ``mesh``: anything with ``.ndim``, ``.size(i)`` and ``.get_coordinate()``
    (a ``DeviceMesh``).  ``placements``: one per mesh dim; ``Replicate()``
    or ``Shard(d)`` (``d`` may be negative), applied in mesh dim order, each
    ``Shard`` cutting the piece left by the mesh dims before it the way
    ``torch.chunk`` does: with ``n`` rows over ``k`` coordinates, coordinate
    ``c`` holds rows ``[min(c * ceil(n/k), n), min((c + 1) * ceil(n/k), n))``
    (7 rows over 3: 3, 3, 1; 3 rows over 4: 1, 1, 1, 0 - an empty box).

    Raises TypeError naming ``key`` for placements a checkpoint cannot
    lay out: ``Partial`` (pending reduction: reduce it first, e.g.
    ``dt.redistribute(placements=[Replicate()])``), ``_StridedShard``
    (not supported yet) and any other kind; ValueError for a placement count
    other than ``mesh.ndim`` or a shard dim outside the tensor."""
    shape = tuple(int(s) for s in global_shape)
    placements = tuple(placements)
    where = f"the DTensor at key {key!r}"
    if len(placements) != mesh.ndim:
        raise ValueError(f"{where} has {len(placements)} placements for a {mesh.ndim}-d mesh")
    strided = _strided_shard_type()
    dims = []
    for i, p in enumerate(placements):
        if strided is not None and isinstance(p, strided):
            raise TypeError(f"{where} has the placement {p!r} (a _StridedShard, from sharding one tensor dim "
                            f"over several mesh dims out of order) on mesh dim {i}, which loom checkpoints "
                            f"do not support yet; redistribute it to Shard/Replicate placements first")
        if p.is_partial():
            raise TypeError(f"{where} has the placement {p!r} (Partial: values pending a reduction) on mesh "
                            f"dim {i}; reduce it first (dt.redistribute(placements=[Replicate() or Shard(d), "
                            f"...])) and save the result")
        if p.is_replicate():
            dims.append(None)
        elif p.is_shard():
            d = p.dim + len(shape) if p.dim < 0 else p.dim
            if not 0 <= d < len(shape):
                raise ValueError(f"{where} has {p!r} on mesh dim {i}, but its global shape {shape} has no "
                                 f"dim {p.dim}")
            dims.append(d)
        else:
            raise TypeError(f"{where} has the placement {p!r} on mesh dim {i}; a checkpoint lays out only "
                            f"Replicate and Shard placements")
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    offsets, sizes = [0] * len(shape), list(shape)
    for i, d in enumerate(dims):
        if d is None:
            continue
        size, c = sizes[d], int(coordinate[i])
        piece = math.ceil(size / mesh.size(i)) if size else 0
        start, stop = min(c * piece, size), min((c + 1) * piece, size)
        offsets[d] += start
        sizes[d] = stop - start
    return tuple(offsets), tuple(sizes)


def check_default_order(dt, key: str = "") -> None:
    """Raise TypeError naming ``key`` when ``dt`` shards a tensor dim over
    several mesh dims in an order other than mesh dim order (the one
    `dtensor_box` computes).  Recent torch records the order on the spec."""
    order = getattr(getattr(dt, "_spec", None), "shard_order", None)
    for entry in order or ():
        mesh_dims = tuple(getattr(entry, "mesh_dims", ()))
        if list(mesh_dims) != sorted(mesh_dims):
            raise TypeError(f"the DTensor at key {key!r} shards tensor dim {entry.tensor_dim} over mesh dims "
                            f"{mesh_dims}, in an order other than mesh dim order, which loom checkpoints do "
                            f"not support yet; redistribute it first")
