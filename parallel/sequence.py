"""Sequence layouts: which global tokens each sequence-parallel position holds.

``contiguous``: position i of P holds tokens ``[i*S_local, (i+1)*S_local)``.
``zigzag``: the sequence is cut into 2P equal chunks and position i holds
chunk i followed by chunk 2P-1-i, so under a causal mask every position has
the same amount of work (an early chunk with little to attend to is paired
with a late chunk with a lot).

Everything here is a pure function; `shard_sequence` / `unshard_sequence` are
an exact inverse pair.
"""
from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    return layout


def _check_position(index, size) -> None:
    for name, v in (("size", size), ("index", index)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}={v!r} must be an int")
    if size < 1 or not 0 <= index < size:
        raise ValueError(f"index={index} must be in [0, size={size})")


def chunks_per_position(layout: str) -> int:
    """How many equal chunks of the sequence each position holds."""
    return 1 if check_layout(layout) == "contiguous" else 2


def check_divisible(seq_total: int, size: int, layout: str, what: str = "sequence length") -> None:
    parts = size * chunks_per_position(layout)
    if seq_total % parts:
        raise ValueError(f"{what} {seq_total} must divide by {parts} for layout={layout!r} "
                         f"over {size} positions")


def shard_segments(seq_local: int, index: int, size: int, layout: str) -> list[tuple[int, int, int]]:
    """The runs of consecutive global tokens at ``index``, in local order, as
    ``(local_start, global_start, length)``."""
    _check_position(index, size)
    if chunks_per_position(layout) == 1:
        return [(0, index * seq_local, seq_local)]
    if seq_local % 2:
        raise ValueError(f"seq_local={seq_local} must be even for layout='zigzag'")
    c = seq_local // 2
    return [(0, index * c, c), (c, (2 * size - 1 - index) * c, c)]


def shard_positions(seq_total: int, index: int, size: int, layout: str,
                    device=None) -> torch.Tensor:
    """Global token indices held by position ``index``, in local order."""
    check_divisible(seq_total, size, layout)
    segs = shard_segments(seq_total // size, index, size, layout)
    return torch.cat([torch.arange(g, g + n, device=device) for _, g, n in segs])


def shard_sequence(x: torch.Tensor, index: int, size: int, layout: str, dim: int = 1) -> torch.Tensor:
    """Position ``index``'s shard of ``x`` along ``dim`` (a copy-free view
    for contiguous, a concatenation for zigzag)."""
    check_layout(layout)
    _check_position(index, size)
    dim = dim % x.dim()
    check_divisible(x.shape[dim], size, layout, f"x.shape[{dim}]")
    seq_local = x.shape[dim] // size
    parts = [x.narrow(dim, g, n) for _, g, n in shard_segments(seq_local, index, size, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard_sequence(shards, layout: str, dim: int = 1) -> torch.Tensor:
    """The full tensor from every position's shard (in position order)."""
    check_layout(layout)
    shards = list(shards)
    if not shards:
        raise ValueError("unshard_sequence needs at least one shard")
    dim = dim % shards[0].dim()
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) != 1:
        raise ValueError(f"unshard_sequence: shards have different shapes {sorted(shapes)}")
    if chunks_per_position(layout) == 1:
        return torch.cat(shards, dim)
    n = shards[0].shape[dim]
    if n % 2:
        raise ValueError(f"unshard_sequence: zigzag shards need an even length, got {n} on dim {dim}")
    firsts = [s.narrow(dim, 0, n // 2) for s in shards]
    seconds = [s.narrow(dim, n // 2, n // 2) for s in reversed(shards)]
    return torch.cat(firsts + seconds, dim)


def shard_batch(inputs: torch.Tensor, targets: torch.Tensor, index: int, size: int, layout: str):
    """One position's share of a ``[batch, seq]`` token batch: ``(inputs,
    targets, positions)``, where positions are the global token indices
    the model's position embedding needs."""
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} differ")
    positions = shard_positions(inputs.shape[1], index, size, layout, device=inputs.device)
    return (shard_sequence(inputs, index, size, layout), shard_sequence(targets, index, size, layout),
            positions)
