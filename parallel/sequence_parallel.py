"""The sequence-parallel softmax attention core for the reference model.

`sequence_parallel_core` builds the ``core(q, k, v, causal=...)`` callable that
`enable_sequence_parallel` (loom.parallel.model) puts into every softmax
`Attention`; `shard_batch` (loom.parallel.sequence) gives each position its
tokens and their global positions.  The layout is a parameter: ring attention
and 2-D sequence parallelism (``"ulysses-ring"``) take zigzag (balanced causal
work) or contiguous shards; Ulysses, and models with linear-attention layers
(their state scan runs in sequence order), need contiguous shards.
"""
from __future__ import annotations

import functools

from loom.comms import world_ranks

from .fused_attention import check_kernel
from .ring_attention import ring_attention
from .sequence import check_layout
from .ulysses import ulysses_attention
from .ulysses_ring import ulysses_ring_attention

SP_ATTENTION = ("ring", "ulysses", "ulysses-ring")


def sequence_parallel_core(attention: str = "ring", *, ranks=None, group=None, layout: str = "zigzag",
                           kernel: str = "auto", inner: int | None = None, inner_group=None,
                           head_chunks: int = 1):
    """The softmax attention core for sequence shards over the sp ``ranks``
    (default: the ranks of ``group``), laid out as ``layout``.

    ``attention``: ``"ring"`` (ring attention over ``ranks``), ``"ulysses"``
    (all-to-all over ``group``) or ``"ulysses-ring"`` (2-D: Ulysses over
    inner groups of ``inner`` consecutive sp ranks, this rank's being
    ``inner_group``, ring over the outer rings; see loom.parallel.ulysses_ring).
    ``inner`` = 1 gives ring attention and ``inner`` = sp with contiguous
    shards gives Ulysses, exactly.  ``kernel``: the ring's block kernel
    (`ring_attention`; Ulysses attends with PyTorch's SDPA); ``head_chunks``:
    the ring's (`ring_attention`; checked per call, Ulysses has no ring
    and ignores it).  ValueError for
    an unknown attention, layout or kernel, a layout the attention cannot
    take, or ``inner`` given without ``"ulysses-ring"``."""
    check_layout(layout)
    check_kernel(kernel)
    if attention not in SP_ATTENTION:
        raise ValueError(f"attention={attention!r} must be one of {SP_ATTENTION}")
    if attention != "ulysses-ring" and (inner is not None or inner_group is not None):
        raise ValueError(f"inner / inner_group are for attention='ulysses-ring', not {attention!r}")
    ranks = None if ranks is None else list(ranks)
    if attention == "ulysses-ring":
        if isinstance(inner, bool) or not isinstance(inner, int) or inner < 1:
            raise ValueError(f"attention='ulysses-ring' needs inner (the Ulysses degree), a positive "
                             f"integer; got {inner!r}")
        if inner == 1:
            attention = "ring"
        elif layout == "contiguous" and inner == len(ranks if ranks is not None else world_ranks(group)):
            attention, group = "ulysses", inner_group
        else:
            return functools.partial(ulysses_ring_attention, inner=inner, inner_group=inner_group, ranks=ranks,
                                     group=group, layout=layout, kernel=kernel, head_chunks=head_chunks)
    if attention == "ring":
        return functools.partial(ring_attention, ranks=ranks, group=group, layout=layout, kernel=kernel,
                                 head_chunks=head_chunks)
    if layout != "contiguous":
        raise ValueError(f"ulysses attention needs layout='contiguous', got {layout!r}")
    return functools.partial(ulysses_attention, group=group)


def mesh_core(attention: str, mesh, *, layout: str, kernel: str = "auto", head_chunks: int = 1):
    """`sequence_parallel_core` over the sp groups of ``mesh``
    (`loom.comms.Mesh`): its sp ranks, and for ``"ulysses-ring"`` its
    ``sp_inner`` degree and inner group (``init_mesh(..., sp_inner=N)``)."""
    two_d = attention == "ulysses-ring"
    return sequence_parallel_core(attention, ranks=mesh.sp_ranks, group=mesh.sp_group, layout=layout, kernel=kernel,
                                  head_chunks=head_chunks,
                                  inner=mesh.sp_inner if two_d else None,
                                  inner_group=mesh.sp_inner_group if two_d else None)
