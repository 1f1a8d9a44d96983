"""2-D sequence parallelism: Ulysses inside a group, ring attention across groups.

The sp ranks ``R[0..P)`` (P = inner × outer) are cut into ``outer`` inner
groups of ``inner`` consecutive ranks (``R[o*inner:(o+1)*inner]``, so the
all-to-all stays within a node); the ranks with the same inner index form
an outer ring (``R[i::inner]``).  As in USP (Fang & Zhao 2024) and Megatron's
hierarchical context parallelism (a2a + p2p):

1. an all-to-all over the inner group turns each rank's sequence shard of all
   heads into the inner group's whole share of the sequence for heads_q/inner
   heads (K/V heads repeated up to lcm(heads_kv, inner) first, as Ulysses does);
2. ring attention runs over the outer ring on those tensors;
3. the inverse all-to-all brings the output back to the rank's sequence shard.

Layout.  Each rank holds what the data loader gives sp rank p under the
job's layout over all P positions (`loom.parallel.sequence`), so the loader
knows nothing of the split.  With ``zigzag`` the sequence is cut into 2P
chunks of c tokens and sp rank p holds chunks p and 2P-1-p.  After the
all-to-all, the rank at inner index i of inner group o holds, for its heads,
the shards of sp ranks o*inner .. o*inner+inner-1 one after the other:
chunks o*inner+j and 2P-1-o*inner-j for j = 0..inner-1.  Reordered as
zigzag's own inverse does (`unshard_sequence` over the inner shards: every
first half in order, then every second half in reverse) these are two runs
of consecutive tokens, ``[o*inner*c, (o+1)*inner*c)`` and ``[(2P-(o+1)*inner)*c,
(2P-o*inner)*c)`` — exactly outer position o's shard of a zigzag layout over
``outer`` positions with chunks of inner*c tokens.  So the outer ring runs
plain zigzag ring attention (balanced causal work, its masks and document
boundaries in global positions unchanged), and the output is reordered back
before the inverse all-to-all.  With ``contiguous`` the inner group's shards
are already the contiguous block ``[o*inner*s, (o+1)*inner*s)`` (s =
seq_local), the outer ring's contiguous shard; no reordering.

The degenerate splits are the 1-D cores: inner = 1 is ring attention over
the sp ranks, outer = 1 is Ulysses over them (for zigzag shards Ulysses plus
the reordering, then one attention over the whole sequence).

Messages per call and rank: P-1 tiny agreement messages over the sp ranks;
3 all-to-alls over the inner group (q, k, v), the outer ring's K/V blocks
(see loom.parallel.ring_attention), 1 all-to-all back; the same in reverse
for the backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from loom.comms import Ring, agree, agreed, world_ranks
from loom.comms.agree import bits_float, checksum_ints, dtype_code, dtype_name, float_bits

from .attention_blocks import check_cu_seqlens, check_qkv, empty_attention, tile_rows_for
from .fused_attention import resolve_kernel
from .ring_attention import head_chunk_slices, make_spec, run_ring
from .sequence import check_layout, shard_sequence, unshard_sequence
from .ulysses import attend, expand_kv, heads_to_seq, kv_heads_after, seq_to_heads

MAX_INNER = 8  # the default inner degree is at most this (the GPUs of a node)


def default_sp_inner(sp: int, heads: int, most: int = MAX_INNER) -> int:
    """The largest divisor of ``sp`` that also divides ``heads`` (query
    heads) and is at most ``most``: the default Ulysses degree of 2-D
    sequence parallelism (K/V heads it does not divide are repeated)."""
    for name, v in (("sp", sp), ("heads", heads), ("most", most)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"default_sp_inner: {name}={v!r} must be a positive integer")
    return max(d for d in range(1, min(sp, most) + 1) if sp % d == 0 and heads % d == 0)


def split_ranks(ranks, inner: int, rank: int) -> tuple[list[int], list[int]]:
    """``(inner group, outer ring)`` of global ``rank`` among the sp ``ranks``
    (in sp order) cut into inner groups of ``inner`` consecutive ranks.
    ValueError when ``inner`` does not divide them or ``rank`` is not one."""
    ranks = list(ranks)
    if isinstance(inner, bool) or not isinstance(inner, int) or inner < 1 or len(ranks) % inner:
        raise ValueError(f"sp inner degree {inner!r} must be a positive integer dividing the "
                         f"{len(ranks)} sp ranks (sp = inner x outer)")
    if rank not in ranks:
        raise ValueError(f"rank {rank} is not one of the sp ranks {ranks}")
    p = ranks.index(rank)
    start = p - p % inner
    return ranks[start:start + inner], ranks[p % inner::inner]


def _gathered_order(x: torch.Tensor, inner: int, layout: str) -> torch.Tensor:
    """The inner group's shards, concatenated along dim 1 in inner order,
    put in the outer ring's layout (see the module docstring)."""
    if layout == "contiguous" or inner == 1:
        return x
    return unshard_sequence(x.chunk(inner, dim=1), "zigzag")


def _scattered_order(y: torch.Tensor, inner: int, layout: str) -> torch.Tensor:
    """The inverse of `_gathered_order`."""
    if layout == "contiguous" or inner == 1:
        return y
    return torch.cat([shard_sequence(y, i, inner, "zigzag") for i in range(inner)], dim=1)


_FIELDS = ("batch", "seq_local", "heads_q", "heads_kv", "head_dim", "dtype", "layout", "causal", "scale",
           "inner", "sp ranks", "cu_seqlens", "head_chunks")
_SHOWN = _FIELDS[:5] + ("inner", "head_chunks")
_FORMATS = {"dtype": dtype_name, "layout": lambda z: "zigzag" if z else "contiguous", "causal": bool,
            "scale": bits_float}


def ulysses_ring_attention(q, k, v, *, inner: int, inner_group=None, ranks=None, group=None,
                           causal: bool = False, layout: str = "zigzag", scale: float | None = None,
                           cu_seqlens=None, kernel: str = "auto", head_chunks: int = 1):
    """Softmax attention over a sequence sharded over the sp ranks by 2-D
    sequence parallelism: Ulysses over inner groups of ``inner`` consecutive
    sp ranks, ring attention over the outer rings (see the module docstring).

    q ``[batch, seq_local, heads_q, head_dim]``, k/v ``[.., heads_kv, ..]``
    (heads_q % heads_kv == 0), this rank's shard under ``layout``
    (``"zigzag"`` or ``"contiguous"`` over all P sp positions, as
    `shard_sequence` gives it).  ``ranks``: the sp ranks in sp order (default:
    the ranks of ``group``, default the world); ``inner`` must divide P and
    heads_q; ``inner_group``: the process group of this rank's inner group
    (``ranks[o*inner:(o+1)*inner]``), needed when inner > 1.  ``cu_seqlens``
    as `ring_attention` (global positions over the batch flattened row-major,
    S_total = seq_local * P).  ``kernel``: the ring's block kernel
    (`ring_attention`).  ``head_chunks``: the outer ring's (`ring_attention`),
    a divisor of the K/V heads each rank holds after the all-to-all
    (heads_kv, repeated up to a multiple of ``inner``, / ``inner``).
    Returns the output shard, like q.  Bad or mismatched
    calls raise ValueError on every sp rank before any tensor moves."""
    sp_ranks = list(ranks) if ranks is not None else world_ranks(group)
    error, mine, outer = None, (), []
    try:
        scale = check_qkv(q, k, v, scale, "ulysses_ring_attention")
        check_layout(layout)
        rank = dist.get_rank() if dist.is_initialized() else 0
        inner_ranks, outer = split_ranks(sp_ranks, inner, rank)
        if inner > 1 and (inner_group is None or world_ranks(inner_group) != inner_ranks):
            got = None if inner_group is None else world_ranks(inner_group)
            raise ValueError(f"ulysses_ring_attention: inner_group must be the group of ranks {inner_ranks}, "
                             f"got {got}")
        if q.shape[2] % inner:
            raise ValueError(f"ulysses_ring_attention: heads_q={q.shape[2]} must divide by the inner "
                             f"(Ulysses) degree {inner}")
        if layout == "zigzag" and q.shape[1] % 2:
            raise ValueError(f"ulysses_ring_attention: seq_local={q.shape[1]} must be even for layout='zigzag'")
        bounds = None
        if cu_seqlens is not None:
            bounds = check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1] * len(sp_ranks),
                                      "ulysses_ring_attention")
        kernel = resolve_kernel(kernel, q.device, q.dtype, q.shape[-1])
        head_chunk_slices(q.shape[2] // inner, kv_heads_after(k.shape[2], inner) // inner, head_chunks)
        mine = [q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], dtype_code(q.dtype),
                layout == "zigzag", bool(causal), float_bits(scale), inner, checksum_ints(sp_ranks),
                -1 if bounds is None else checksum_ints(bounds), head_chunks]
    except (TypeError, ValueError) as exc:
        error = exc
    # every sp rank learns of a bad or mismatched call before any all-to-all or ring message
    device = q.device if isinstance(q, torch.Tensor) and q.is_cuda else None
    agreement = agree(error, mine, ranks=sp_ranks, device=device, what="ulysses_ring_attention")
    agreement.same(_FIELDS, "ulysses_ring_attention", show=_SHOWN, formats=_FORMATS)
    if q.shape[0] == 0 or q.shape[1] == 0:  # no tokens anywhere (the sp ranks agreed on seq_local)
        return empty_attention(q, k, v)
    k, v = expand_kv(k, v, inner)
    with agreed():  # the all-to-alls' and the ring's shapes follow from what the sp ranks just agreed on
        if inner > 1:
            q, k, v = (_gathered_order(seq_to_heads(t, inner, inner_group), inner, layout) for t in (q, k, v))
        if len(outer) == 1:  # the inner group holds the whole sequence
            out = attend(q, k, v, bool(causal), scale, cu_seqlens, bounds)
        else:
            spec = make_spec(q.shape[1], len(outer), layout, causal=causal, scale=scale, cu_seqlens=bounds,
                             device=q.device, tile_rows=tile_rows_for(q.shape[0], q.shape[2], q.shape[1]),
                             kernel=kernel)
            out, _ = run_ring(q, k, v, Ring(outer), spec, head_chunks)
        if inner > 1:
            out = heads_to_seq(_scattered_order(out, inner, layout), inner, inner_group)
        return out


__all__ = ["MAX_INNER", "default_sp_inner", "split_ranks", "ulysses_ring_attention"]
