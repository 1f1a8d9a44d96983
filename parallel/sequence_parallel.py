"""Sequence parallelism for the reference model, applied from outside.

`apply_sequence_parallel` swaps every attention core of a `Transformer` for a
sequence-parallel one; `shard_batch` (loom.parallel.sequence) gives each
position its tokens and their global positions.  The layout is a parameter:
ring attention takes zigzag (balanced causal work) or contiguous shards,
Ulysses takes contiguous shards.
"""
from __future__ import annotations

import functools

import torch

from .model import Attention
from .ring_attention import ring_attention
from .sequence import check_layout
from .ulysses import ulysses_attention

SP_ATTENTION = ("ring", "ulysses")


def sequence_parallel_core(attention: str = "ring", *, ranks=None, group=None, layout: str = "zigzag"):
    """The attention core ``core(q, k, v, causal=...)`` for sequence shards."""
    check_layout(layout)
    if attention == "ring":
        return functools.partial(ring_attention, ranks=None if ranks is None else list(ranks),
                                 group=group, layout=layout)
    if attention == "ulysses":
        if layout != "contiguous":
            raise ValueError(f"ulysses attention needs layout='contiguous', got {layout!r}")
        return functools.partial(ulysses_attention, group=group)
    raise ValueError(f"attention={attention!r} must be one of {SP_ATTENTION}")


def apply_sequence_parallel(model: torch.nn.Module, attention: str = "ring", *, ranks=None, group=None,
                            layout: str = "zigzag") -> torch.nn.Module:
    """Swap the core of every `Attention` in ``model`` (in place); returns the model."""
    core = sequence_parallel_core(attention, ranks=ranks, group=group, layout=layout)
    swapped = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.core = core
            swapped += 1
    if not swapped:
        raise ValueError(f"{type(model).__name__} has no loom Attention module to make sequence-parallel")
    return model
