"""Ring attention: exact softmax attention over a sequence sharded on a ring.

Each position of the ring holds a shard of Q, K and V.  Forward: the K/V
block travels round the ring (P-1 shifts, the next one in flight while the
current block is computed) and each block's partial output is merged into the
running result by its LSE.  Backward: K/V go round again and each block's
dK/dV accumulator travels with it (P shifts, so it arrives home); dQ stays
local.  Every block's gradient is computed from the *rotated* K/V it arrived
with and the forward's merged output and LSE.

Point-to-point messages per call and rank (P = ring size): P-1 tiny
agreement messages (`loom.comms.agree`, one to every other member: shapes and
options, or the error) + P-1 K/V blocks forward; P-1 K/V blocks + P dK/dV
accumulators backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.comms import Ring, agree, world_ranks
from loom.comms.agree import bits_float, checksum_ints, dtype_code, dtype_name, float_bits

from .attention_blocks import Documents, accumulation_dtype, block_backward, block_forward, \
    check_cu_seqlens, check_qkv, empty_attention, merge_partials, plan_area, plan_block, tile_rows_for
from .fused_attention import fused_block_backward, fused_block_forward, resolve_kernel
from .sequence import check_layout, shard_segments

_KV, _ACC = 0, 1  # ring channels (message kinds that are in flight together)


@dataclass(frozen=True)
class RingSpec:
    """What every position computes: the shards' global segments, the mask and the scale."""
    segments: tuple  # per ring position: ((local_start, global_start, length), ...)
    causal: bool
    scale: float
    docs: Documents | None = None
    tile_rows: int | None = None
    kernel: str = "explicit"  # resolved: "fused" or "explicit" (see loom.parallel.fused_attention)

    def plan(self, position: int, source: int, device=None) -> list:
        """The tiles for queries at ``position`` against keys from ``source``
        (`plan_block`'s ``(rows, cols, mask)``), for the explicit kernel."""
        return plan_block(self.segments[position], self.segments[source], causal=self.causal,
                          docs=self.docs, device=device, tile_rows=self.tile_rows)

    def kernel_tiles(self, position: int, source: int, device=None) -> list:
        """The tiles of `plan` with their kernel: ``(rows, cols, mask,
        fused_causal)``, ``fused_causal`` True / False for a tile the fused
        kernel computes (its lower triangle / all of it), None for the
        explicit kernel (``mask`` is kept for it either way)."""
        if self.kernel == "explicit":
            return [(rows, cols, mask, None) for rows, cols, mask in self.plan(position, source, device)]
        if position == source and self.causal and self.docs is None:
            # a shard's own keys: global positions rise in local order under every layout, so the causal
            # mask is the square's lower triangle (not built here: `explicit_mask` makes it if needed)
            n = sum(length for *_, length in self.segments[position])
            return [(slice(0, n), slice(0, n), None, True)] if n else []
        # the explicit plan, its unmasked tiles fused (one call per run of them: the kernel tiles itself);
        # masked tiles stay as the explicit kernel's, narrowed to the columns they need
        planned = []
        for rows, cols, mask in self.plan(position, source, device):
            last = planned[-1] if planned else None
            if mask is None and last is not None and last[3] is False and last[1] == cols \
                    and last[0].stop == rows.start:
                planned[-1] = (slice(last[0].start, rows.stop), cols, None, False)
            else:
                planned.append((rows, cols, mask, None if mask is not None else False))
        return planned


def explicit_mask(mask, fused_causal, rows: slice, device=None):
    """The explicit kernel's mask for a tile of `RingSpec.kernel_tiles`: its
    own, or the lower triangle of a causal tile planned for the fused kernel."""
    if mask is None and fused_causal:
        n = rows.stop - rows.start
        return torch.ones(n, n, dtype=torch.bool, device=device).tril_()
    return mask


def make_spec(seq_local: int, size: int, layout: str, *, causal: bool, scale: float,
              cu_seqlens=None, device=None, tile_rows: int | None = None, kernel: str = "explicit") -> RingSpec:
    """The ring's plan.  ``cu_seqlens`` (a tensor or list of ints) covers the
    batch flattened row-major, ``[0, ..., batch * seq_local * size]`` (see
    `check_cu_seqlens`); the batch follows from its last entry.  ``kernel``:
    ``"fused"`` or ``"explicit"`` (already resolved: `resolve_kernel`)."""
    segments = tuple(tuple(shard_segments(seq_local, i, size, layout)) for i in range(size))
    docs = None if cu_seqlens is None else Documents([int(c) for c in cu_seqlens], device,
                                                     seq_total=seq_local * size)
    return RingSpec(segments, bool(causal), float(scale), docs, tile_rows, kernel)


def ring_work(seq_local: int, size: int, layout: str, *, causal: bool, cu_seqlens=None,
              tile_rows: int | None = None) -> list[int]:
    """Score entries each position computes (per batch and head) over a
    forward: the causal balance of a layout, without running anything."""
    spec = make_spec(seq_local, size, layout, causal=causal, scale=1.0, cu_seqlens=cu_seqlens,
                     tile_rows=tile_rows)
    return [sum(plan_area(spec.plan(i, j)) for j in range(size)) for i in range(size)]


# ------------------------------------------------------------------- checks

def _check_inputs(q, k, v, *, layout, scale, cu_seqlens, size):
    """``(scale, boundaries)``: the checked scale and cu_seqlens as a list (None without)."""
    scale = check_qkv(q, k, v, scale, "ring_attention")
    check_layout(layout)
    if layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"ring_attention: seq_local={q.shape[1]} must be even for layout='zigzag'")
    bounds = None
    if cu_seqlens is not None:
        bounds = check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1] * size, "ring_attention")
    return scale, bounds


_FIELDS = ("batch", "seq_local", "heads_q", "heads_kv", "head_dim", "dtype", "layout", "causal", "scale",
           "ring ranks", "cu_seqlens")
_SHOWN = _FIELDS[:5]
_FORMATS = {"dtype": dtype_name, "layout": lambda z: "zigzag" if z else "contiguous", "causal": bool,
            "scale": bits_float}


def _description(q, k, layout, causal, scale, bounds, ring) -> list[int]:
    """What every position of the ring must agree on (see `comms.agree`)."""
    return [q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], dtype_code(q.dtype),
            layout == "zigzag", causal, float_bits(scale), checksum_ints(ring.ranks),
            -1 if bounds is None else checksum_ints(bounds)]


# ------------------------------------------------------------------ the ring

class _RingAttention(torch.autograd.Function):
    """Differentiable once: the dK/dV accumulators that travel the ring are
    outside autograd's graph, so a backward that would build a graph for a
    second derivative (``create_graph=True``) is refused on every rank
    before any message moves, rather than giving wrong (or silently zero)
    second derivatives."""

    @staticmethod
    def forward(ctx, q, k, v, ring, spec):
        ctx.set_materialize_grads(False)
        acc = accumulation_dtype(q.dtype)
        b, s, hq, d = q.shape
        out = torch.zeros(b, s, hq, d, dtype=acc, device=q.device)
        lse = torch.full((b, hq, s), float("-inf"), dtype=acc, device=q.device)
        for step, kv in ring.rotate(torch.stack((k, v)), channel=_KV):
            for rows, cols, mask, fused_causal in spec.kernel_tiles(ring.position, ring.owner(step), q.device):
                if fused_causal is None:
                    o_b, l_b = block_forward(q[:, rows], kv[0][:, cols], kv[1][:, cols], spec.scale, mask)
                else:
                    o_b, l_b = fused_block_forward(q[:, rows], kv[0][:, cols], kv[1][:, cols], spec.scale,
                                                   fused_causal)
                out[:, rows], lse[:, :, rows] = merge_partials(out[:, rows], lse[:, :, rows], o_b, l_b)
        out = out.to(q.dtype)
        ctx.ring, ctx.spec = ring, spec
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if torch.is_grad_enabled():
            raise RuntimeError("ring_attention does not support double backward: its backward cannot build a "
                               "graph (create_graph=True); take first derivatives only")
        q, k, v, out, lse = ctx.saved_tensors
        ring, spec = ctx.ring, ctx.spec
        acc = lse.dtype
        dout = torch.zeros_like(out, dtype=acc) if dout is None else dout.to(acc)
        delta = (dout * out.to(acc)).sum(-1).transpose(1, 2)        # [b, hq, s]
        if dlse is not None:
            delta = delta - dlse.to(acc)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        b, s, hkv, d = k.shape
        part = torch.empty((2, b, hkv, s, d), dtype=acc, device=k.device)  # this step's dK/dV, heads first
        incoming, sending = None, ()
        for step, kv in ring.rotate(torch.stack((k, v)), channel=_KV):
            part.zero_()
            for rows, cols, mask, fused_causal in spec.kernel_tiles(ring.position, ring.owner(step), q.device):
                kb, vb, dk_b, dv_b = kv[0][:, cols], kv[1][:, cols], part[0][:, :, cols], part[1][:, :, cols]
                if fused_causal is None or dlse is not None:  # the fused kernel takes no gradient of the LSE
                    dq[:, rows] += block_backward(q[:, rows], kb, vb, dout[:, rows], lse[:, :, rows],
                                                  delta[:, :, rows], spec.scale,
                                                  explicit_mask(mask, fused_causal, rows, q.device), dk_b, dv_b)
                else:
                    dq[:, rows] += fused_block_backward(q[:, rows], kb, vb, dout[:, rows], out[:, rows],
                                                        lse[:, :, rows], spec.scale, fused_causal, dk_b, dv_b)
            # add to the accumulator of the block held now: the one that
            # travelled here with it (received while computing), fresh at step 0
            dkv = part.clone() if incoming is None else incoming.wait().add_(part)
            for p in sending:
                p.wait()
            if ring.size > 1:  # pass it on; after P passes every accumulator is home
                sent, incoming = ring.shift(dkv, torch.empty_like(dkv), channel=_ACC)
                sending = (sent,)
        if incoming is not None:
            dkv = incoming.wait()
            sending[0].wait()
        dk, dv = (g.permute(0, 2, 1, 3).to(k.dtype) for g in dkv)
        return dq.to(q.dtype), dk, dv, None, None


def run_ring(q, k, v, ring, spec: RingSpec):
    """The autograd-aware ring on an already-checked call: ``(out, lse)``.
    ``ring`` is anything with Ring's ``position``, ``size``, ``owner``,
    ``rotate`` and ``shift`` (benchmarks pass a ring that does not talk)."""
    return _RingAttention.apply(q, k, v, ring, spec)


def ring_attention(q, k, v, *, causal: bool = False, layout: str = "contiguous", group=None,
                   ranks=None, scale: float | None = None, cu_seqlens=None, return_lse: bool = False,
                   kernel: str = "auto"):
    """Exact softmax attention over a sequence sharded across a ring of ranks.

    q ``[batch, seq_local, heads_q, head_dim]``, k/v ``[batch, seq_local,
    heads_kv, head_dim]`` (heads_q % heads_kv == 0; K/V travel un-expanded).
    ``ranks`` is the ring, an ordered list of global ranks (default: the ranks
    of ``group``, default the world); a rank's shard belongs to its position.
    ``layout`` is ``"contiguous"`` or ``"zigzag"`` (see loom.parallel.sequence).
    ``cu_seqlens``: document boundaries of packed documents, a 1-D integer
    tensor over the batch flattened row-major (the flash-attn varlen
    convention): ``[0, ..., batch * S_total]`` with S_total = seq_local *
    ring size (global positions, the same tensor on every rank), non-decreasing
    (repeats are empty documents), containing every row boundary ``r *
    S_total``; attention stays inside each document.  Rows may hold different
    documents.  Bad boundaries raise ValueError (see `check_cu_seqlens`), on
    every rank of the ring.
    ``kernel``: the block kernel, ``"auto"`` (PyTorch's fused flash attention
    where the device has one that returns the LSE, for float32/bfloat16/float16;
    loom's explicit softmax for float64, which stays exact, and for the masks
    no fused kernel expresses), ``"fused"`` or ``"explicit"`` (see
    `loom.parallel.fused_attention`; ValueError for an unknown one, or
    ``"fused"`` where none exists).
    Returns ``out`` like q, plus ``lse [batch, heads_q, seq_local]`` (float32,
    float64 for float64 inputs) when ``return_lse``."""
    ring = Ring(list(ranks) if ranks is not None else world_ranks(group))
    error, mine = None, ()
    try:
        scale, bounds = _check_inputs(q, k, v, layout=layout, scale=scale, cu_seqlens=cu_seqlens,
                                      size=ring.size)
        kernel = resolve_kernel(kernel, q.device, q.dtype, q.shape[-1])
        mine = _description(q, k, layout, bool(causal), scale, bounds, ring)
    except (TypeError, ValueError) as exc:
        error = exc
    # every position learns of a bad or mismatched call before any K/V moves
    device = q.device if isinstance(q, torch.Tensor) and q.is_cuda else None
    agreement = agree(error, mine, ranks=ring.ranks, tag=ring.tag, device=device, what="ring_attention")
    agreement.same(_FIELDS, "ring_attention", show=_SHOWN, formats=_FORMATS)
    if q.shape[0] == 0 or q.shape[1] == 0:  # no tokens anywhere (the ring agreed on seq_local)
        out = empty_attention(q, k, v)
        lse = out.new_zeros(q.shape[0], q.shape[2], q.shape[1], dtype=accumulation_dtype(q.dtype))
        return (out, lse) if return_lse else out
    spec = make_spec(q.shape[1], ring.size, layout, causal=causal, scale=scale, cu_seqlens=bounds,
                     device=q.device, tile_rows=tile_rows_for(q.shape[0], q.shape[2], q.shape[1]), kernel=kernel)
    out, lse = run_ring(q, k, v, ring, spec)
    return (out, lse) if return_lse else out
