"""The sequence-parallel softmax attention core for the reference model.

`sequence_parallel_core` builds the ``core(q, k, v, causal=...)`` callable that
`enable_sequence_parallel` (loom.parallel.model) puts into every softmax
`Attention`; `shard_batch` (loom.parallel.sequence) gives each position its
tokens and their global positions.  The layout is a parameter: ring attention
takes zigzag (balanced causal work) or contiguous shards; Ulysses, and models
with linear-attention layers (their state scan runs in sequence order), need
contiguous shards.
"""
from __future__ import annotations

import functools

from .fused_attention import check_kernel
from .ring_attention import ring_attention
from .sequence import check_layout
from .ulysses import ulysses_attention

SP_ATTENTION = ("ring", "ulysses")


def sequence_parallel_core(attention: str = "ring", *, ranks=None, group=None, layout: str = "zigzag",
                           kernel: str = "auto"):
    """The softmax attention core for sequence shards over ``ranks`` (ring) or
    ``group`` (Ulysses), laid out as ``layout``; ``kernel``: the ring's block
    kernel (`ring_attention`; Ulysses attends with PyTorch's SDPA)."""
    check_layout(layout)
    check_kernel(kernel)
    if attention == "ring":
        return functools.partial(ring_attention, ranks=None if ranks is None else list(ranks),
                                 group=group, layout=layout, kernel=kernel)
    if attention == "ulysses":
        if layout != "contiguous":
            raise ValueError(f"ulysses attention needs layout='contiguous', got {layout!r}")
        return functools.partial(ulysses_attention, group=group)
    raise ValueError(f"attention={attention!r} must be one of {SP_ATTENTION}")
