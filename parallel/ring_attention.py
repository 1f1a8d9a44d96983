"""Ring attention: exact softmax attention over a sequence sharded on a ring.

Each position of the ring holds a shard of Q, K and V.  Forward: the K/V
block travels round the ring (P-1 shifts, the next one in flight while the
current block is computed) and each block's partial output is merged into the
running result by its LSE.  Backward: K/V go round again; a block's dK/dV
accumulator starts at the first position after its owner and travels with it
(P-1 shifts, the last one home, where it is added to the owner's own part);
dQ stays local.  Every block's gradient is computed from the *rotated* K/V it
arrived with and the forward's merged output and LSE.  The second half of a
shard's own causal block is computed last, while the accumulators' last hop
home is in flight.

``head_chunks`` runs the ring once per chunk of K/V heads (attention heads
are independent): the buffers in flight (K/V blocks, dK/dV accumulators, the
kernels' temporaries) shrink by that factor, for that many times more,
smaller messages.

Point-to-point messages per call and rank (P = ring size, C head chunks):
P-1 tiny agreement messages (`loom.comms.agree`, one to every other member:
shapes and options, or the error) + at most 2C(P-1) K/V messages forward;
at most 2C(P-1) K/V and 2C(P-1) dK/dV messages backward (K and V travel as
separate messages, without being stacked into a copy; a message no later
holder needs is not sent).  The plan (tiles, windows) is worked out once per
pass and shared by the head chunks.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from loom.comms import Ring, agree, world_ranks
from loom.comms.agree import bits_float, checksum_ints, dtype_code, dtype_name, float_bits

from .attention_blocks import Documents, accumulation_dtype, block_backward, block_forward, \
    check_cu_seqlens, check_qkv, empty_attention, merge_into, pair_columns, plan_area, plan_block, tile_rows_for
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

    def _hull(self, source: int, steps) -> slice:
        """The hull of the key columns of block ``source`` that its holders
        at ``steps`` read (``slice(0, 0)``: none)."""
        size = len(self.segments)
        spans = [pair_columns(self.segments[(source + t) % size], self.segments[source], causal=self.causal,
                              docs=self.docs) for t in steps]
        spans = [(a, b) for a, b in spans if b > a]
        return slice(min(a for a, _ in spans), max(b for _, b in spans)) if spans else slice(0, 0)

    def kv_window(self, source: int, step: int) -> slice:
        """The columns of block ``source`` that its holders at ``step`` and
        after read: all that the K/V message bringing it to ``step`` carries
        (under causal zigzag, position 0's block travels as its first half;
        under causal contiguous, no block travels past the last position)."""
        return self._hull(source, range(step, len(self.segments)))

    def grad_window(self, source: int, step: int) -> slice:
        """The columns of block ``source``'s dK/dV accumulator that its
        holders at steps 1..``step`` wrote: all that it carries after
        ``step`` (the rest is zero)."""
        return self._hull(source, range(1, step + 1))

    def own_tiles(self, position: int, device=None, defer: bool = True) -> tuple[list, list]:
        """`kernel_tiles` of a shard's own block split in two, ``(now,
        later)``: ``later`` holds the tiles whose rows lie in the second half
        of the shard (a fused causal square is cut into its first-half
        triangle, the full lower-left rectangle and the second-half triangle),
        so the backward can compute them while the last accumulators travel
        home.  ``defer`` False: everything now."""
        tiles = self.kernel_tiles(position, position, device)
        if not defer:
            return tiles, []
        half = sum(length for *_, length in self.segments[position]) // 2
        now, later = [], []
        for rows, cols, mask, fused_causal in tiles:
            if fused_causal and rows.stop - rows.start > 1:
                a, e = rows.start, rows.stop
                m = a + (e - a) // 2
                now += [(slice(a, m), slice(a, m), None, True), (slice(m, e), slice(a, m), None, False)]
                later.append((slice(m, e), slice(m, e), None, True))
            else:
                (later if rows.start >= half else now).append((rows, cols, mask, fused_causal))
        return now, later


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
           "ring ranks", "cu_seqlens", "head_chunks")
_SHOWN = _FIELDS[:5] + ("head_chunks",)
_FORMATS = {"dtype": dtype_name, "layout": lambda z: "zigzag" if z else "contiguous", "causal": bool,
            "scale": bits_float}


def _description(q, k, layout, causal, scale, bounds, ring, head_chunks) -> list[int]:
    """What every position of the ring must agree on (see `comms.agree`)."""
    return [q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], dtype_code(q.dtype),
            layout == "zigzag", causal, float_bits(scale), checksum_ints(ring.ranks),
            -1 if bounds is None else checksum_ints(bounds), head_chunks]


# ------------------------------------------------------------------ the ring

def head_chunk_slices(heads_q: int, heads_kv: int, chunks: int) -> list[tuple[slice, slice]]:
    """``(query heads, K/V heads)`` of each of ``chunks`` head chunks (a K/V
    head stays with the query heads that read it).  ValueError unless
    ``chunks`` is a positive integer dividing ``heads_kv``."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1 or heads_kv % chunks:
        raise ValueError(f"head_chunks={chunks!r} must be a positive integer dividing the {heads_kv} K/V heads")
    per_kv, per_q = heads_kv // chunks, heads_q // chunks
    return [(slice(i * per_q, (i + 1) * per_q), slice(i * per_kv, (i + 1) * per_kv)) for i in range(chunks)]


class _Pass:
    """One pass's plan (the forward's, or the backward's), worked out once
    and shared by its head chunks: the kernel tiles against each source
    block, the message windows and the own block's split.  Not kept from
    the forward to the backward: the tiles' masks would stay alive with the
    activations."""

    def __init__(self, spec: RingSpec, ring, device):
        self.spec, self.ring, self.device = spec, ring, device
        self.tiles = functools.cache(lambda source: spec.kernel_tiles(ring.position, source, device))
        self.kv_window = functools.cache(spec.kv_window)
        self.grad_window = functools.cache(spec.grad_window)

    @functools.cached_property
    def own(self) -> tuple[list, list]:
        """`RingSpec.own_tiles` of this position (deferred half only when there is a ring)."""
        return self.spec.own_tiles(self.ring.position, self.device, defer=self.ring.size > 1)


def _forward_tiles(tiles, q, kb, vb, spec, out, lse) -> None:
    """Merge the partial results of ``tiles`` (`RingSpec.kernel_tiles`) into
    ``out [b, s, h, d]`` / ``lse [b, h, s]`` (views of the running result)."""
    for rows, cols, mask, fused_causal in tiles:
        if fused_causal is None:
            o_b, l_b = block_forward(q[:, rows], kb[:, cols], vb[:, cols], spec.scale, mask)
        else:
            o_b, l_b = fused_block_forward(q[:, rows], kb[:, cols], vb[:, cols], spec.scale, fused_causal)
        merge_into(out[:, rows], lse[:, :, rows], o_b, l_b)


def _backward_tiles(tiles, q, kb, vb, saved, spec, dq, dkv, lse_grad: bool, first: int = 0) -> None:
    """Add the gradients of ``tiles`` into ``dq [b, s, hq, d]`` and the
    heads-first ``dkv = (dk, dv)`` accumulators of the block ``kb``/``vb``,
    which hold its key columns from ``first`` on.  ``saved``: ``(dout, out,
    lse, delta)`` of the query rows."""
    dout, out, lse, delta = saved
    for rows, cols, mask, fused_causal in tiles:
        held = slice(cols.start - first, cols.stop - first)
        k_t, v_t, dk_t, dv_t = kb[:, cols], vb[:, cols], dkv[0][:, :, held], dkv[1][:, :, held]
        if fused_causal is None or lse_grad:  # the fused kernel takes no gradient of the LSE
            dq[:, rows] += block_backward(q[:, rows], k_t, v_t, dout[:, rows], lse[:, :, rows], delta[:, :, rows],
                                          spec.scale, explicit_mask(mask, fused_causal, rows, q.device), dk_t, dv_t)
        else:
            dq[:, rows] += fused_block_backward(q[:, rows], k_t, v_t, dout[:, rows], out[:, rows], lse[:, :, rows],
                                                spec.scale, fused_causal, dk_t, dv_t)


def _ring_forward(q, k, v, plan: _Pass, out, lse) -> None:
    """One head chunk's forward into the views ``out`` / ``lse``."""
    ring = plan.ring
    out.zero_()
    lse.fill_(float("-inf"))
    for step, (kb, vb) in ring.rotate((k, v), channel=_KV, borrow=True, window=plan.kv_window):
        _forward_tiles(plan.tiles(ring.owner(step)), q, kb, vb, plan.spec, out, lse)


def _ring_backward(q, k, v, saved, plan: _Pass, dq, lse_grad: bool) -> tuple:
    """One head chunk's backward: adds into ``dq`` and returns this shard's
    ``(dk, dv)``, heads-first ``[b, hkv, s, d]`` in the accumulation dtype.

    A block's accumulator starts at the first position after its owner and
    travels with it, holding only the key columns written so far
    (`RingSpec.grad_window`): each holder computes its part into a buffer of
    its window, adds what arrived and sends the buffer on as it is."""
    b, s, hkv, d = k.shape
    acc, ring, spec = dq.dtype, plan.ring, plan.spec

    def buffers(window: slice, make=torch.zeros):
        return tuple(make((b, hkv, window.stop - window.start, d), dtype=acc, device=k.device) for _ in range(2))
    own = buffers(slice(0, s))
    now, later = plan.own
    sending, incoming, received = [], [], None
    for step, (kb, vb) in ring.rotate((k, v), channel=_KV, borrow=True, window=plan.kv_window):
        if step == 0:
            _backward_tiles(now, q, kb, vb, saved, spec, dq, own, lse_grad)
            continue
        window = plan.grad_window(ring.owner(step), step)
        part = buffers(window)
        _backward_tiles(plan.tiles(ring.owner(step)), q, kb, vb, saved, spec, dq, part, lse_grad, first=window.start)
        if received is not None:  # the accumulator that travelled here with this block: add it in
            for p in incoming:
                p.wait()
            came, arrived = received
            for a, g in zip(part, arrived):
                a[:, :, came.start - window.start:came.stop - window.start] += g
        for p in sending:  # the previous part has left
            p.wait()
        coming = plan.grad_window(ring.owner(step + 1), step)  # the block held next (our own after the last)
        arrived = buffers(coming, torch.empty) if coming.stop > coming.start else None
        pairs = [ring.shift(g if g.numel() else None, None if arrived is None else arrived[i], channel=_ACC)
                 for i, g in enumerate(part)]
        sending = [p for p, _ in pairs if p is not None]
        incoming = [r for _, r in pairs if r is not None]
        received = None if arrived is None else (coming, arrived)
    _backward_tiles(later, q, k, v, saved, spec, dq, own, lse_grad)  # while the last hop is in flight
    for p in incoming + sending:
        p.wait()
    if received is not None:  # this shard's accumulator, home after P-1 hops
        came, arrived = received
        for a, g in zip(own, arrived):
            a[:, :, came] += g
    return own


class _RingAttention(torch.autograd.Function):
    """Differentiable once: the dK/dV accumulators that travel the ring are
    outside autograd's graph, so a backward that would build a graph for a
    second derivative (``create_graph=True``) is refused on every rank
    before any message moves, rather than giving wrong (or silently zero)
    second derivatives."""

    @staticmethod
    def forward(ctx, q, k, v, ring, spec, head_chunks):
        ctx.set_materialize_grads(False)
        acc = accumulation_dtype(q.dtype)
        b, s, hq, d = q.shape
        chunks = head_chunk_slices(hq, k.shape[2], head_chunks)
        out = torch.empty(b, s, hq, d, dtype=acc, device=q.device)
        lse = torch.empty((b, hq, s), dtype=acc, device=q.device)
        plan = _Pass(spec, ring, q.device)
        for qh, kh in chunks:
            _ring_forward(q[:, :, qh], k[:, :, kh], v[:, :, kh], plan, out[:, :, qh], lse[:, qh])
        out = out.to(q.dtype)
        ctx.ring, ctx.spec, ctx.chunks = ring, spec, chunks
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if torch.is_grad_enabled():
            raise RuntimeError("ring_attention does not support double backward: its backward cannot build a "
                               "graph (create_graph=True); take first derivatives only")
        q, k, v, out, lse = ctx.saved_tensors
        ring, spec, chunks = ctx.ring, ctx.spec, ctx.chunks
        acc = lse.dtype
        dout = torch.zeros_like(out, dtype=acc) if dout is None else dout.to(acc)
        delta = (dout * out.to(acc)).sum(-1).transpose(1, 2)        # [b, hq, s]
        if dlse is not None:
            delta = delta - dlse.to(acc)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        plan = _Pass(spec, ring, q.device)
        if len(chunks) == 1:
            dk, dv = _ring_backward(q, k, v, (dout, out, lse, delta), plan, dq, dlse is not None)
            dk, dv = (g.permute(0, 2, 1, 3).to(k.dtype) for g in (dk, dv))
        else:
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            for qh, kh in chunks:
                saved = (dout[:, :, qh], out[:, :, qh], lse[:, qh], delta[:, qh])
                grads = _ring_backward(q[:, :, qh], k[:, :, kh], v[:, :, kh], saved, plan, dq[:, :, qh],
                                       dlse is not None)
                for whole, g in zip((dk, dv), grads):
                    whole[:, :, kh] = g.permute(0, 2, 1, 3)
        return dq.to(q.dtype), dk, dv, None, None, None


def run_ring(q, k, v, ring, spec: RingSpec, head_chunks: int = 1):
    """The autograd-aware ring on an already-checked call: ``(out, lse)``.
    ``ring`` is anything with Ring's ``position``, ``size``, ``owner``,
    ``rotate`` and ``shift`` (benchmarks pass a ring that does not talk);
    ``head_chunks``: see `ring_attention`."""
    return _RingAttention.apply(q, k, v, ring, spec, head_chunks)


def ring_attention(q, k, v, *, causal: bool = False, layout: str = "contiguous", group=None,
                   ranks=None, scale: float | None = None, cu_seqlens=None, return_lse: bool = False,
                   kernel: str = "auto", head_chunks: int = 1):
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
    ``head_chunks``: run the ring once per chunk of the K/V heads (a divisor
    of heads_kv; ValueError otherwise): the K/V blocks in flight, the
    travelling dK/dV accumulators and the kernels' temporaries shrink by that
    factor, for that many times more (smaller) messages.  1 (the default) is
    fastest; raise it when the ring's buffers, not the activations, bound
    memory.  The result is the same (heads are independent).
    Returns ``out`` like q, plus ``lse [batch, heads_q, seq_local]`` (float32,
    float64 for float64 inputs) when ``return_lse``."""
    ring = Ring(list(ranks) if ranks is not None else world_ranks(group))
    error, mine = None, ()
    try:
        scale, bounds = _check_inputs(q, k, v, layout=layout, scale=scale, cu_seqlens=cu_seqlens,
                                      size=ring.size)
        kernel = resolve_kernel(kernel, q.device, q.dtype, q.shape[-1])
        head_chunk_slices(q.shape[2], k.shape[2], head_chunks)
        mine = _description(q, k, layout, bool(causal), scale, bounds, ring, head_chunks)
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
    out, lse = run_ring(q, k, v, ring, spec, head_chunks)
    return (out, lse) if return_lse else out
