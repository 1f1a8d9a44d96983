"""Attention on one (query block, key block) pair, and the merge of partials.

The shared helpers of ring attention: a block's softmax is explicit and kept
in float32 (float64 for float64 inputs) so partial results from different
blocks can be merged exactly by their log-sum-exp (LSE).  Grouped-query
attention never expands K/V: queries are viewed as ``[.., kv_heads, rep, ..]``.

Masks are boolean, True = may attend: ``[q, k]`` for every row of the batch
alike, or ``[batch, q, k]`` when the rows differ (packed documents).  A query row with nothing to attend to
has LSE -inf and output 0 (never NaN), here and in the merge.
"""
from __future__ import annotations

import bisect
import math

import torch

NONE, PARTIAL, FULL = 0, 1, 2  # how much of a block pair a mask allows
TILE_ELEMENTS = 2**20  # score entries per tile: 4 MB in float32, cache-sized on CPUs
MIN_TILE_ROWS = 16


def copy_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device`` (None: where it is).  A host tensor bound for a
    CUDA device goes through pinned memory without blocking, so that small
    metadata (document boundaries) never makes the host wait for the
    device's queued work; the copy is ordered before later work on the
    stream, as a blocking one would be."""
    if device is None or t.device == torch.device(device):
        return t
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_attention(q, k, v):
    """The output of attention over no tokens (batch or seq_local 0): an empty
    tensor like q that is still in q's, k's and v's graph, so backward reaches
    them (with empty gradients) as it would with tokens."""
    return q + (k.sum() + v.sum()) * 0


def check_qkv(q, k, v, scale, who: str) -> float:
    """Check q ``[b, s, hq, d]`` and k, v ``[b, s, hkv, d]``; return the scale
    (default ``head_dim ** -0.5``)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{who}: {name} must be [batch, seq_local, heads, head_dim], "
                             f"got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{who}: {name} must be floating point, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{who}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    b, s, hq, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, s, d):
        raise ValueError(f"{who}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, "
                         f"seq_local and head_dim")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"{who}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"{who}: q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if min(hq, k.shape[2], d) < 1:  # no tokens (batch or seq_local 0) is fine: see empty_attention
        raise ValueError(f"{who}: heads and head_dim must be >= 1: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if hq % k.shape[2]:
        raise ValueError(f"{who}: heads_q={hq} must divide by heads_kv={k.shape[2]}")
    if scale is None:
        return d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or scale <= 0:
        raise ValueError(f"{who}: scale={scale!r} must be a positive finite number")
    return float(scale)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """-inf LSEs (rows with nothing to attend to) replaced by 0, so that
    ``exp(x - lse)`` gives 0 instead of NaN for their all -inf scores."""
    return torch.where(torch.isneginf(lse), torch.zeros((), dtype=lse.dtype, device=lse.device), lse)


def _heads_first(x: torch.Tensor, kv_heads: int, dtype) -> torch.Tensor:
    """[b, s, h, d] -> [b, kv_heads, (h / kv_heads) * s, d]: the query heads
    that share a K/V head stacked along rows, so one matmul serves them all."""
    b, s, h, d = x.shape
    return x.to(dtype).permute(0, 2, 1, 3).reshape(b, kv_heads, (h // kv_heads) * s, d)


def _scores(q, k, scale, mask):
    """Scaled scores ``[b, hkv, rep*sq, sk]`` (masked to -inf) and the scaled
    grouped queries ``[b, hkv, rep*sq, d]``."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    acc = accumulation_dtype(q.dtype)
    qh = _heads_first(q, hkv, acc) * scale   # out of place: it may be a view of q
    s = torch.matmul(qh, k.to(acc).permute(0, 2, 3, 1))
    if mask is not None:  # [sq, sk], or [b, sq, sk] when the batch's rows differ
        m = mask if mask.dim() == 2 else mask[:, None, None]
        s.view(b, hkv, hq // hkv, sq, -1).masked_fill_(~m, float("-inf"))
    return s, qh


def _heads_last(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, hkv, rep*s, d] -> [b, s, heads, d] (a view)."""
    b, _, n, d = x.shape
    return x.reshape(b, heads, -1, d).permute(0, 2, 1, 3)


def block_forward(q, k, v, scale: float, mask=None):
    """Softmax attention of q ``[b, sq, hq, d]`` over k, v ``[b, sk, hkv, d]``.

    Returns ``(out [b, sq, hq, d], lse [b, hq, sq])`` in the accumulation dtype."""
    b, sq, hq, d = q.shape
    s, _ = _scores(q, k, scale, mask)
    top = _finite(s.amax(-1, keepdim=True))              # 0, not -inf, for rows with nothing allowed
    p = s.sub_(top).exp_()
    total = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v.to(s.dtype).permute(0, 2, 1, 3))
    out.div_(torch.where(total > 0, total, torch.ones((), dtype=total.dtype, device=total.device)))
    lse = (top + total.log()).reshape(b, hq, sq)       # log(0) = -inf for those rows
    return _heads_last(out, hq), lse


def block_backward(q, k, v, dout, lse, delta, scale: float, mask, dk_acc, dv_acc):
    """Gradients of one block pair given the *final* (merged) ``lse`` of the
    query rows and ``delta = rowsum(dout * out) - dlse`` (both ``[b, hq, sq]``).

    Adds dK and dV (summed over the query heads that share a K/V head) into
    ``dk_acc`` / ``dv_acc``, heads-first ``[b, hkv, sk, d]`` views in the
    accumulation dtype, and returns dq ``[b, sq, hq, d]``."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    s, qh = _scores(q, k, scale, mask)
    rows = (b, hkv, -1, 1)
    p = s.sub_(_finite(lse).reshape(rows)).exp_()
    do = _heads_first(dout, hkv, s.dtype)
    kk, vv = k.to(s.dtype).permute(0, 2, 1, 3), v.to(s.dtype).permute(0, 2, 1, 3)   # [b, hkv, sk, d]
    _add_matmul(dv_acc, p.transpose(-1, -2), do)
    ds = torch.matmul(do, vv.transpose(-1, -2)).sub_(delta.reshape(rows)).mul_(p)
    _add_matmul(dk_acc, ds.transpose(-1, -2), qh)       # qh carries the scale
    return _heads_last(torch.matmul(ds, kk).mul_(scale), hq)


def _add_matmul(acc, a, b) -> None:
    """``acc += a @ b`` for [batch, heads, ., .] operands, without a temporary
    the size of ``acc``."""
    acc.view(-1, *acc.shape[2:]).baddbmm_(a.flatten(0, 1), b.flatten(0, 1))  # view: never a copy


def merge_partials(out, lse, out_b, lse_b):
    """Merge a block's partial ``(out_b, lse_b)`` into ``(out, lse)``:
    ``lse' = logaddexp(lse, lse_b)``, ``out' = out*exp(lse-lse') + out_b*exp(lse_b-lse')``.
    Rows where both LSEs are -inf stay (0, -inf).  Returns new tensors."""
    out, lse = out.clone(), lse.clone()
    merge_into(out, lse, out_b.clone(), lse_b)
    return out, lse


def merge_into(out, lse, out_b, lse_b) -> None:
    """`merge_partials` in place: ``out [b, s, h, d]`` and ``lse [b, h, s]``
    (views into the running result) take the merge; ``out_b`` (a fresh
    partial) is scaled in place."""
    new = torch.logaddexp(lse, lse_b)
    base = _finite(new)
    out.mul_(torch.exp(lse - base).transpose(1, 2).unsqueeze(-1))
    out.add_(out_b.mul_(torch.exp(lse_b - base).transpose(1, 2).unsqueeze(-1)))
    lse.copy_(new)


# ------------------------------------------------------------------ planning

def check_bounds(bounds: list[int], batch: int, seq_total: int, who: str) -> None:
    """The checks of `check_cu_seqlens` on a list of Python ints."""
    end = batch * seq_total
    if not bounds or bounds[0] != 0 or bounds[-1] != end:
        got = f"{bounds[0]}...{bounds[-1]}" if bounds else "an empty tensor"
        raise ValueError(f"{who}: cu_seqlens must run from 0 to batch * S_total = {end} (batch={batch}, "
                         f"S_total={seq_total}: the global sequence length), got {got}")
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if b < a:
            raise ValueError(f"{who}: cu_seqlens must be non-decreasing, got {a} then {b} at index {i + 1}")
    present = set(bounds)
    for r in range(1, batch):
        if r * seq_total not in present:
            raise ValueError(f"{who}: cu_seqlens must contain every row boundary r * S_total (documents never "
                             f"span rows): {r * seq_total}, where row {r} of {batch} starts "
                             f"(S_total={seq_total}), is missing")


def check_cu_seqlens(cu_seqlens, batch: int, seq_total: int, who: str = "attention") -> list[int]:
    """Check document boundaries for a batch of ``batch`` rows of ``seq_total``
    tokens each; return them as a list of ints.

    ``cu_seqlens`` is a 1-D integer tensor over the batch flattened row-major
    (the flash-attn varlen convention): it runs from 0 to ``batch *
    seq_total``, is non-decreasing (repeated entries are empty documents) and
    contains every row boundary ``r * seq_total`` (documents never span rows).
    Under sequence parallelism ``seq_total`` is the global sequence length
    (seq_local * sp size) and every rank passes the same tensor.
    Raises ValueError naming the offending value."""
    bounds = cu_seqlens_bounds(cu_seqlens, who)
    check_bounds(bounds, batch, seq_total, who)
    return bounds


def cu_seqlens_bounds(cu_seqlens, who: str = "attention") -> list[int]:
    """``cu_seqlens`` as a list of ints, checked only to be a 1-D integer
    tensor (ValueError otherwise); `check_bounds` checks the values once the
    batch and S_total are known (see `check_cu_seqlens`)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point \
            or cu_seqlens.dtype == torch.bool or cu_seqlens.is_complex():
        got = (f"a {cu_seqlens.dim()}-D {cu_seqlens.dtype} tensor" if isinstance(cu_seqlens, torch.Tensor)
               else type(cu_seqlens).__name__)
        raise ValueError(f"{who}: cu_seqlens must be a 1-D integer tensor, got {got}")
    return cu_seqlens.tolist()


def document_ids(cu_seqlens, batch: int, seq_total: int) -> torch.Tensor:
    """The document of every token: int64 ``[batch, seq_total]`` on
    cu_seqlens' device, numbered over the whole batch (documents in different
    rows never share a number; empty documents own no token).  Does not check
    ``cu_seqlens`` (see `check_cu_seqlens`)."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64)
    tokens = torch.arange(batch * seq_total, dtype=torch.int64, device=cu.device)
    return (torch.searchsorted(cu, tokens, right=True) - 1).reshape(batch, seq_total)


def document_mask(cu_seqlens, batch: int, seq_total: int, *, causal: bool, device=None) -> torch.Tensor:
    """Bool ``[batch, 1, seq_total, seq_total]`` (True = may attend): same
    document, and key <= query when ``causal``.  Every token sees itself, so
    no query row is ever fully masked."""
    ids = document_ids(copy_to_device(torch.as_tensor(cu_seqlens, dtype=torch.int64), device), batch, seq_total)
    mask = ids[:, :, None] == ids[:, None, :]
    if causal:
        mask &= torch.ones(seq_total, seq_total, dtype=torch.bool, device=mask.device).tril()
    return mask[:, None]


class Documents:
    """Packed documents of a batch: boundaries ``[0, ..., batch * S_total]``
    over the rows flattened row-major (see `check_cu_seqlens`); ``seq_total``
    defaults to the whole span (batch 1).  Rows with the same boundaries share
    one description, so a uniform batch costs what batch 1 does."""

    def __init__(self, bounds, device=None, *, seq_total: int | None = None):
        bounds = [int(c) for c in bounds]
        total = bounds[-1] if seq_total is None else int(seq_total)
        if total < 1 or bounds[-1] % total:
            raise ValueError(f"Documents: the last boundary {bounds[-1]} must be a multiple of "
                             f"S_total={total} >= 1")
        batch = bounds[-1] // total
        check_bounds(bounds, batch, total, "Documents")
        self.batch, self.seq_total = batch, total
        rows = [tuple(sorted({c - r * total for c in bounds if r * total <= c <= (r + 1) * total}))
                for r in range(batch)]
        self.row_bounds = rows                 # per row: its boundaries, 0 .. S_total
        self.distinct = sorted(set(rows))      # the different rows, for planning
        self.uniform = len(self.distinct) == 1
        if self.uniform:
            self._t = copy_to_device(torch.tensor(rows[0], dtype=torch.int64), device)
        else:
            self._t = document_ids(copy_to_device(torch.tensor(bounds, dtype=torch.int64), device), batch, total)

    @staticmethod
    def of(bounds: tuple, pos: int) -> int:
        """The document of token ``pos`` of a row with ``bounds`` (empty
        documents own no token)."""
        return bisect.bisect_right(bounds, pos) - 1

    def ids(self, positions: torch.Tensor) -> torch.Tensor:
        """Document ids of the tokens at ``positions`` (indices within a row):
        ``[n]`` when every row is the same, else ``[batch, n]``."""
        positions = positions.to(self._t.device)
        if self.uniform:
            return torch.searchsorted(self._t, positions, right=True) - 1
        return self._t[:, positions]


def _pair_status(q0: int, q1: int, k0: int, k1: int, causal: bool, docs) -> int:
    """NONE / FULL / PARTIAL for queries [q0, q1) against keys [k0, k1) (indices
    within a row) over every row: NONE only if no row allows anything, FULL
    only if every row allows everything.  PARTIAL is conservative: the caller
    builds the exact mask."""
    if causal and q1 - 1 < k0:
        return NONE
    full = not causal or q0 >= k1 - 1
    if docs is None:
        return FULL if full else PARTIAL
    statuses = set()
    for bounds in docs.distinct:
        dq0, dq1, dk0, dk1 = (docs.of(bounds, p) for p in (q0, q1 - 1, k0, k1 - 1))
        if dq1 < dk0 or dk1 < dq0:
            statuses.add(NONE)
        else:
            statuses.add(FULL if full and dq0 == dq1 == dk0 == dk1 else PARTIAL)
    if statuses == {NONE}:
        return NONE
    return FULL if statuses == {FULL} else PARTIAL


def _positions(segments, lo: int, hi: int, device) -> torch.Tensor:
    return torch.cat([torch.arange(g, g + n, device=device) for _, g, n in segments[lo:hi + 1]])


def tile_rows_for(batch: int, heads: int, keys: int, elements: int = TILE_ELEMENTS) -> int:
    """Query rows per tile so one tile's scores stay near ``elements`` entries."""
    return max(MIN_TILE_ROWS, elements // max(1, batch * heads * keys))


def _segment_status(q_segments, k_segments, causal: bool, docs) -> tuple[dict, list]:
    """`_pair_status` of every (query segment, key segment), and the pairs
    that are not NONE."""
    status = {(i, j): _pair_status(qg, qg + qn, kg, kg + kn, causal, docs)
              for i, (_, qg, qn) in enumerate(q_segments)
              for j, (_, kg, kn) in enumerate(k_segments)}
    return status, [ij for ij, st in status.items() if st != NONE]


def pair_columns(q_segments, k_segments, *, causal: bool, docs: Documents | None = None) -> tuple[int, int]:
    """``(start, stop)``: the local key columns that `plan_block`'s tiles of
    this pair can read (the hull of the key segments any query may attend
    to); ``(0, 0)`` when none.  Cheap: no masks are built."""
    _, live = _segment_status(q_segments, k_segments, causal, docs)
    if not live:
        return 0, 0
    ka, kb = min(j for _, j in live), max(j for _, j in live)
    return k_segments[ka][0], k_segments[kb][0] + k_segments[kb][2]


def plan_block(q_segments, k_segments, *, causal: bool, docs: Documents | None = None, device=None,
               tile_rows: int | None = None) -> list:
    """What to compute for one (query shard, key shard) pair, as tiles.

    Segments are ``(local_start, global_start, length)`` runs of consecutive
    global tokens, in local order.  Returns a list (empty when no query may
    attend to any key) of ``(q_slice, k_slice, mask)`` tiles of at most
    ``tile_rows`` query rows: the local rows and the columns they need (the
    union over the batch's rows), with a bool mask over them: None when all
    of it is allowed, ``[q, k]`` when every row of the batch allows the same,
    else ``[batch, q, k]``.  Skipping what a
    mask forbids is what balances causal work under the zigzag layout: an
    off-diagonal pair reduces to half the queries or half the keys, and a
    diagonal pair to its lower triangle (at tile granularity)."""
    status, live = _segment_status(q_segments, k_segments, causal, docs)
    if not live:
        return []
    qa, qb = min(i for i, _ in live), max(i for i, _ in live)
    ka, kb = min(j for _, j in live), max(j for _, j in live)
    q0, q1 = q_segments[qa][0], q_segments[qb][0] + q_segments[qb][2]
    k0, k1 = k_segments[ka][0], k_segments[kb][0] + k_segments[kb][2]
    step = q1 - q0 if tile_rows is None else max(1, int(tile_rows))
    if all(status[i, j] == FULL for i in range(qa, qb + 1) for j in range(ka, kb + 1)):
        return [(slice(r, min(q1, r + step)), slice(k0, k1), None) for r in range(q0, q1, step)]
    pq, pk = _positions(q_segments, qa, qb, device), _positions(k_segments, ka, kb, device)
    mask = torch.ones(len(pq), len(pk), dtype=torch.bool, device=device)
    if causal:
        mask &= pk[None, :] <= pq[:, None]
    if docs is not None:
        mask = mask & (docs.ids(pq)[..., :, None] == docs.ids(pk)[..., None, :])  # [q, k] or [b, q, k]
    tiles = []
    for r in range(0, q1 - q0, step):
        sub = mask[..., r:r + step, :]
        cols = (sub.any(0) if sub.dim() == 2 else sub.any(1).any(0)).nonzero()   # the union over rows
        if len(cols) == 0:
            continue
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        sub = sub[..., c0:c1]
        if sub.dim() == 3 and bool((sub == sub[:1]).all()):
            sub = sub[0]                         # every row the same here: one [q, k] mask serves all
        tiles.append((slice(q0 + r, q0 + r + sub.shape[-2]), slice(k0 + c0, k0 + c1),
                      None if bool(sub.all()) else sub))
    return tiles


def plan_area(tiles) -> int:
    """Score entries a plan's tiles compute per (batch, head): its work."""
    return sum((q.stop - q.start) * (k.stop - k.start) for q, k, _ in tiles)
