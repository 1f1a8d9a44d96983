"""Ulysses attention: all-to-all from sequence shards to head shards.

Each rank of the group holds a contiguous sequence shard of every head.  One
all-to-all gives each rank the whole sequence for 1/P of the heads, plain
local attention runs on it, and a second all-to-all brings the output back to
sequence shards.  P must divide heads_q; K/V heads that P does not divide
(GQA/MQA) are repeated up to lcm(heads_kv, P), keeping every query head with
its own K/V head.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loom import comms
from loom.comms.agree import bits_float, checksum_ints, dtype_code, dtype_name, float_bits

from .attention_blocks import check_cu_seqlens, check_qkv, empty_attention
from .varlen import document_attention



def seq_to_heads(x: torch.Tensor, size: int, group) -> torch.Tensor:
    """[b, s, h, d] sequence shard -> [b, size*s, h/size, d] head shard."""
    b, s, h, d = x.shape
    parts = x.reshape(b, s, size, h // size, d).permute(2, 0, 1, 3, 4).contiguous()
    got = comms.all_to_all_v_with_grad(parts, [1] * size, [1] * size, group)   # [src, b, s, h/P, d]
    return got.transpose(0, 1).reshape(b, size * s, h // size, d)


def heads_to_seq(y: torch.Tensor, size: int, group) -> torch.Tensor:
    """[b, size*s, h/size, d] head shard -> [b, s, h, d] sequence shard."""
    b, n, hp, d = y.shape
    parts = y.reshape(b, size, n // size, hp, d).transpose(0, 1).contiguous()
    got = comms.all_to_all_v_with_grad(parts, [1] * size, [1] * size, group)   # [head chunk, b, s, h/P, d]
    return got.permute(1, 2, 0, 3, 4).reshape(b, n // size, size * hp, d)


def attend(q, k, v, causal: bool, scale: float, cu_seqlens=None, bounds=None) -> torch.Tensor:
    """Attention on the whole sequence [b, S_total, h, d]: SDPA, or with
    documents `document_attention` (varlen flash on CUDA, else a mask)."""
    if cu_seqlens is not None:
        return document_attention(q, k, v, cu_seqlens, bounds, causal=causal, scale=scale)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def kv_heads_after(heads_kv: int, size: int) -> int:
    """How many K/V heads `expand_kv` gives: lcm(heads_kv, size)."""
    return heads_kv * (size // math.gcd(heads_kv, size))


def expand_kv(k, v, size: int):
    """K/V ``[b, s, heads_kv, d]`` with each head repeated up to lcm(heads_kv,
    size) heads (MQA/GQA with fewer K/V heads than ranks: every rank gets its
    own copy; query head i keeps its K/V head), so ``size`` divides them."""
    expand = kv_heads_after(k.shape[2], size) // k.shape[2]
    if expand > 1:
        k, v = k.repeat_interleave(expand, dim=2), v.repeat_interleave(expand, dim=2)
    return k, v


_FIELDS = ("batch", "seq_local", "heads_q", "head_dim", "heads_kv", "dtype", "causal", "scale", "cu_seqlens")
_SHOWN = _FIELDS[:5]
_FORMATS = {"dtype": dtype_name, "causal": bool, "scale": bits_float}


def ulysses_attention(q, k, v, *, causal: bool = False, group=None, scale: float | None = None,
                      cu_seqlens=None):
    """Softmax attention over a sequence sharded contiguously over ``group``
    (q ``[batch, seq_local, heads_q, head_dim]``, k/v ``[.., heads_kv, ..]``),
    by two all-to-alls.  Returns the output shard, like q.

    ``cu_seqlens``: boundaries of packed documents, global over the batch
    flattened row-major (``[0, ..., batch * S_total]``, S_total = seq_local *
    group size, every row boundary included; the same tensor on every rank;
    see `check_cu_seqlens`): attention stays inside each document.  Bad or
    differing boundaries raise ValueError on every rank."""
    size = len(comms.world_ranks(group))
    error, mine = None, ()
    try:
        scale = check_qkv(q, k, v, scale, "ulysses_attention")
        if q.shape[2] % size:
            raise ValueError(f"ulysses_attention: heads_q={q.shape[2]} must divide by the group "
                             f"size {size}")
        bounds = None
        if cu_seqlens is not None:
            bounds = check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1] * size, "ulysses_attention")
        mine = [*q.shape, k.shape[2], dtype_code(q.dtype), int(causal), float_bits(scale),
                -1 if bounds is None else checksum_ints(bounds)]
    except (TypeError, ValueError) as exc:
        error = exc
    # every rank learns of a bad or mismatched call before the all-to-all
    device = q.device if isinstance(q, torch.Tensor) and q.is_cuda else None
    agreement = comms.agree(error, mine, group=group, device=device, what="ulysses_attention")
    agreement.same(_FIELDS, "ulysses_attention", show=_SHOWN, formats=_FORMATS)
    if q.shape[0] == 0 or q.shape[1] == 0:  # no tokens anywhere (the group agreed on seq_local)
        return empty_attention(q, k, v)
    if size == 1:
        return attend(q, k, v, causal, scale, cu_seqlens, bounds)
    k, v = expand_kv(k, v, size)
    with comms.agreed():  # the all-to-alls' shapes follow from what the ranks just agreed on
        qh, kh, vh = (seq_to_heads(t, size, group) for t in (q, k, v))
        return heads_to_seq(attend(qh, kh, vh, causal, scale, cu_seqlens, bounds), size, group)
