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

from .attention_blocks import check_qkv


def _seq_to_heads(x: torch.Tensor, size: int, group) -> torch.Tensor:
    """[b, s, h, d] sequence shard -> [b, size*s, h/size, d] head shard."""
    b, s, h, d = x.shape
    parts = x.reshape(b, s, size, h // size, d).permute(2, 0, 1, 3, 4).contiguous()
    got = comms.all_to_all_v_with_grad(parts, [1] * size, [1] * size, group)   # [src, b, s, h/P, d]
    return got.transpose(0, 1).reshape(b, size * s, h // size, d)


def _heads_to_seq(y: torch.Tensor, size: int, group) -> torch.Tensor:
    """[b, size*s, h/size, d] head shard -> [b, s, h, d] sequence shard."""
    b, n, hp, d = y.shape
    parts = y.reshape(b, size, n // size, hp, d).transpose(0, 1).contiguous()
    got = comms.all_to_all_v_with_grad(parts, [1] * size, [1] * size, group)   # [head chunk, b, s, h/P, d]
    return got.permute(1, 2, 0, 3, 4).reshape(b, n // size, size * hp, d)


def _attend(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def _check_group_agrees(mine: list[int] | None, group, device) -> None:
    """All ranks must call with the same shapes; a mismatch (or a rank whose
    input was invalid: ``mine`` is None) raises on every rank."""
    mine = [0] * 8 if mine is None else mine
    table = comms.all_gather(torch.tensor([mine], dtype=torch.int64, device=device), group)
    if not all(table[:, 0].tolist()):
        bad = [i for i, ok in enumerate(table[:, 0].tolist()) if not ok]
        raise ValueError(f"ulysses_attention: invalid input at group positions {bad}; those ranks "
                         f"raised the reason")
    names = ("valid", "batch", "seq_local", "heads_q", "head_dim", "heads_kv", "causal", "scale")
    for col, name in enumerate(names):
        values = table[:, col].tolist()
        if len(set(values)) > 1:
            raise ValueError(f"ulysses_attention: {name} differs across the group: {values} by rank")


def ulysses_attention(q, k, v, *, causal: bool = False, group=None, scale: float | None = None):
    """Softmax attention over a sequence sharded contiguously over ``group``
    (q ``[batch, seq_local, heads_q, head_dim]``, k/v ``[.., heads_kv, ..]``),
    by two all-to-alls.  Returns the output shard, like q."""
    size = len(comms.world_ranks(group))
    try:
        scale = check_qkv(q, k, v, scale, "ulysses_attention")
        if q.shape[2] % size:
            raise ValueError(f"ulysses_attention: heads_q={q.shape[2]} must divide by the group "
                             f"size {size}")
    except (TypeError, ValueError):
        if size > 1:
            try:  # tell the group first, so no one hangs in the all-to-all
                _check_group_agrees(None, group, q.device if isinstance(q, torch.Tensor) else None)
            except ValueError:
                pass
        raise
    if size == 1:
        return _attend(q, k, v, causal, scale)
    _check_group_agrees([1, *q.shape, k.shape[2], int(causal), round(scale * 2**40)], group, q.device)
    expand = size // math.gcd(k.shape[2], size)
    if expand > 1:  # MQA/GQA with fewer K/V heads than ranks: give every rank its own copy
        k, v = k.repeat_interleave(expand, dim=2), v.repeat_interleave(expand, dim=2)
    qh, kh, vh = (_seq_to_heads(t, size, group) for t in (q, k, v))
    return _heads_to_seq(_attend(qh, kh, vh, causal, scale), size, group)
