"""Gated linear attention, sequence-parallel over a chain of ranks with All-Scan.

    S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t,    o_t = (scale · q_t) S_t

q, k, log_decay g are [batch, seq_local, heads, d_k], v is [batch, seq_local,
heads, d_v]; the sequence is laid out contiguously over the ranks (rank
position p holds the p-th slice).  Each rank

1. runs the chunked recurrence on its slice from a zero state: inside a chunk
   an attention-like term, across chunks the state;
2. scans (decay product of its slice, final local state) with
   `loom.comms.all_scan` to get its true initial state S_in;
3. corrects its outputs with q_t · exp(g_1 + ... + g_t) · S_in.

States and decay products are float32 (float64 for float64 input).  Every
decay factor is the exp of a plain sum of log decays (never a difference of
cumulative sums), so a decay of exactly 0 (g = -inf) or 1 (g = 0) is exact.
Gradients come from autograd through the local steps and from the scan's own
backward, which is the reverse scan.

Packed documents (``cu_seqlens``, the boundaries softmax attention takes; see
`loom.parallel.check_cu_seqlens`): the first token t of a document forgets
the state before it, S_t = k_tᵀ v_t.  That is the recurrence with g_t = -inf
at that token, and it is computed as exactly that: because every decay
factor above is the exp of a plain sum, a -inf turns every factor that spans
the document start into exactly 0 -- the intra-chunk pairs that cross it,
the chunk state carried over it, the correction by the incoming state -- and
leaves every other factor as it was (no difference of sums, so never
-inf - -inf), in float32 as in float64.  Backward stays finite: d exp(x) =
exp(x) dx is 0 there, and the start token's own log decay gets gradient 0
(it is not used).  Under sequence parallelism a shard holding a document
start has decay product 0, so the scan cuts the state passed across it:
the shard's outputs and the states it passes on no longer depend on the
shards before it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from loom.comms import agree, all_scan
from loom.comms import agreed as comms_agreed
from loom.comms.agree import bits_float, checksum_ints, dtype_code, dtype_name, float_bits
from loom.comms.scan import METHODS, chain_ranks

from .attention_blocks import check_bounds, check_cu_seqlens, copy_to_device, cu_seqlens_bounds

_FIELDS = ("batch", "heads", "d_k", "d_v", "dtype", "method", "scale", "chain (ranks in order)", "cu_seqlens")
_SEQ_LOCAL = len(_FIELDS)  # the description's last integer: this shard's length (may differ; not compared)


def linear_attention(q, k, v, log_decay, *, group=None, ranks=None, method: str = "allscan",
                     chunk_size: int = 64, scale: float | None = None, return_final_state: bool = False,
                     cu_seqlens=None):
    """Gated linear attention over the sequence sharded contiguously on ``ranks``
    (global ranks in sequence order; default: the ranks of ``group``, default world).

    ``method`` picks the scan ("allscan", "serial" or "allgather").
    ``cu_seqlens``: boundaries of the documents packed in the batch, GLOBAL
    (``[0, ..., batch * S_total]`` over the rows flattened row-major, S_total
    the sum of the shards' lengths, every row boundary ``r * S_total``
    included, the same tensor on every rank; see `check_cu_seqlens`): the
    state restarts from zero at each document's first token (see the module
    docstring).  Each rank's offset in the sequence is the length of the
    shards before it in ``ranks``.  Returns the output [batch, seq_local,
    heads, d_v] in q's dtype and, with ``return_final_state``, also the state
    after this rank's last token [batch, heads, d_k, d_v] (float32, or
    float64).  Bad or mismatched input raises ValueError/TypeError on every
    rank of the chain before any state moves."""
    error, mine, bounds = None, (), None
    chain = chain_ranks(group, ranks)
    try:
        qh, kh, vh, gh = _prepare(q, k, v, log_decay, chunk_size, scale)
        if method not in METHODS:
            raise ValueError(f"linear_attention: method={method!r} must be one of {METHODS}")
        if cu_seqlens is not None:
            bounds = cu_seqlens_bounds(cu_seqlens, "linear_attention")
        mine = [q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype_code(q.dtype), METHODS.index(method),
                float_bits(1.0 if scale is None else scale), checksum_ints(chain),
                -1 if bounds is None else checksum_ints(bounds), q.shape[1]]
    except (TypeError, ValueError) as exc:
        error = exc
    # every rank of the chain learns of a bad or mismatched call before the scan
    # (seq_local may differ: shards of any length, empty ones too)
    device = q.device if isinstance(q, torch.Tensor) and q.is_cuda else None
    agreement = agree(error, mine, ranks=chain, what="linear_attention", device=device)
    agreement.same(_FIELDS, "linear_attention", show=_FIELDS[:4],
                   formats={"dtype": dtype_name, "method": METHODS.__getitem__, "scale": bits_float})
    if bounds is not None:
        # the same boundaries and shard lengths everywhere: every rank raises alike
        lengths = dict(zip(agreement.ranks, agreement.column(_SEQ_LOCAL)))
        me = chain.index(dist.get_rank() if dist.is_initialized() else chain[0])
        total, offset = sum(lengths.values()), sum(lengths[r] for r in chain[:me])
        check_bounds(bounds, q.shape[0], total, "linear_attention")
        gh = _reset_at_starts(gh, cu_seqlens, total, offset)
    out, local_state = _chunked(qh, kh, vh, gh, chunk_size)
    cum = gh.cumsum(2)                                    # g_1 + ... + g_t from the slice start
    # an empty shard's decay is 1, still computed from log_decay so the scan's
    # node is in this rank's backward graph: every rank must run the reverse scan
    decay = cum[:, :, -1].exp() if cum.shape[2] else gh.sum(2).exp()
    with comms_agreed():  # the scan's messages follow from what the chain just agreed on
        initial = all_scan(decay, local_state, group=group, ranks=ranks, method=method, check=False)
    out = out + (qh * cum.exp()) @ initial
    return _finish(out, q.dtype, return_final_state, decay[..., None] * initial + local_state)


def local_linear_attention(q, k, v, log_decay, *, chunk_size: int = 64, scale: float | None = None,
                           return_final_state: bool = False, cu_seqlens=None):
    """The same layer on one process (no communication): the whole sequence is
    local.  ``cu_seqlens``: document boundaries ``[0, ..., batch * seq]``
    (every row boundary ``r * seq`` included; see `check_cu_seqlens`, which
    raises ValueError on bad ones -- checked eagerly, not inside
    torch.compile's graph): the state restarts at each document's first token."""
    qh, kh, vh, gh = _prepare(q, k, v, log_decay, chunk_size, scale)
    if cu_seqlens is not None:
        if not torch.compiler.is_compiling():  # reading the boundaries back would break the graph
            check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1], "local_linear_attention")
        gh = _reset_at_starts(gh, cu_seqlens, q.shape[1], 0)
    out, state = _chunked(qh, kh, vh, gh, chunk_size)
    return _finish(out, q.dtype, return_final_state, state)


def _reset_at_starts(g, cu_seqlens, seq_total: int, offset: int):
    """``g`` [b, h, s, d] (the shard at ``offset`` of rows of ``seq_total``
    tokens) with -inf at every document's first token: the decay that forgets
    the state before it (exact, see the module docstring)."""
    b, _, s, _ = g.shape
    tokens = (torch.arange(b, device=g.device)[:, None] * seq_total + offset
              + torch.arange(s, device=g.device))                                    # [b, s], flattened
    starts = torch.isin(tokens, copy_to_device(torch.as_tensor(cu_seqlens, dtype=torch.int64), g.device))
    return torch.where(starts[:, None, :, None], float("-inf"), g)


def _prepare(q, k, v, g, chunk_size, scale):
    """Validate; return heads-first [b, h, s, d] copies in the state dtype (q scaled)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("log_decay", g)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"linear_attention: {name} must be a floating-point tensor")
        if t.dim() != 4:
            raise ValueError(f"linear_attention: {name} {tuple(t.shape)} must be [batch, seq, heads, dim]")
    if q.shape != k.shape or g.shape != k.shape or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"linear_attention: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"log_decay {tuple(g.shape)} must be equal and v {tuple(v.shape)} must share "
                         f"[batch, seq, heads]")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"linear_attention: chunk_size={chunk_size!r} must be an integer >= 1")
    if g.numel() and not bool((g <= 0).all()):  # also rejects NaN
        bad = g[~(g <= 0)][0].item()
        raise ValueError(f"linear_attention: log_decay must be <= 0 everywhere (found {bad})")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh, kh, vh, gh = (t.transpose(1, 2).to(dtype) for t in (q, k, v, g))
    if scale is not None and scale != 1:
        qh = qh * scale
    return qh, kh, vh, gh


def _finish(out, dtype, return_final_state, state):
    out = out.transpose(1, 2).to(dtype)
    return (out, state) if return_final_state else out


def _chunked(q, k, v, g, chunk_size):
    """Outputs and final state from a zero initial state; all [b, h, s, d]."""
    b, h, s, d_k = k.shape
    if s == 0:  # an empty shard: no outputs and a zero state, still in k's and v's graph
        return v[:, :, :0], k.transpose(-1, -2) @ v
    state = q.new_zeros(b, h, d_k, v.shape[-1])
    outs = []
    for lo in range(0, s, chunk_size):
        qc, kc, vc, gc = (t[:, :, lo:lo + chunk_size] for t in (q, k, v, g))
        head = gc.cumsum(2)                        # decay from the chunk start through t
        out = (qc * head.exp()) @ state + _intra_chunk(qc, kc, gc) @ vc
        tail = _after(gc)                          # decay from s (exclusive) to the chunk end
        state = head[:, :, -1, :, None].exp() * state + (kc * tail.exp()).transpose(-1, -2) @ vc
        outs.append(out)
    return (torch.cat(outs, 2) if outs else v.new_zeros(b, h, 0, v.shape[-1])), state


_BLOCK = 16  # tokens per block of the intra-chunk term (bounds its [block, block, d_k] tensors)


def _intra_chunk(q, k, g):
    """A[t, s] = Σ_d q_t[d] k_s[d] exp(g_{s+1} + ... + g_t)[d] for s <= t, else 0.

    In blocks of _BLOCK tokens.  On the diagonal the segment sums are cumulated
    pairwise (`_pairwise`).  Below it the decay factors into (key s to the end of
    its block) x (whole blocks in between) x (start of the query's block to t),
    each the exp of a plain sum <= 0, so the block is one matmul."""
    c = g.shape[2]
    qs, ks, gs = ([t[:, :, i:i + _BLOCK] for i in range(0, c, _BLOCK)] for t in (q, k, g))
    keys = [kb * _after(gb).exp() for kb, gb in zip(ks, gs)]         # decayed to their block end
    through = [gb.sum(2, keepdim=True).exp() for gb in gs]          # decay across a whole block
    rows, end = [], 0
    for i, (qb, kb, gb) in enumerate(zip(qs, ks, gs)):
        end += gb.shape[2]
        row = [_pairwise(qb, kb, gb)]
        query = qb * gb.cumsum(2).exp()
        for j in range(i - 1, -1, -1):
            row.insert(0, query @ keys[j].transpose(-1, -2))
            query = query * through[j]
        rows.append(F.pad(torch.cat(row, -1), (0, c - end)))
    return torch.cat(rows, 2)


def _pairwise(q, k, g):
    """The intra-chunk term with exact segment sums, cumulated directly (no
    difference of prefix sums, so exact and -inf safe): [c, c, d_k] memory."""
    c = g.shape[2]
    later = torch.ones(c, c, dtype=torch.bool, device=g.device).tril(-1)   # [m, s]: m > s
    seg = torch.where(later[:, :, None], g[:, :, :, None, :], 0).cumsum(2)  # [b, h, t, s, d]
    causal = torch.ones(c, c, dtype=torch.bool, device=g.device).tril()     # t >= s
    decay = torch.where(causal[:, :, None], seg, float("-inf")).exp()
    return torch.einsum("bhtd,bhsd,bhtsd->bhts", q, k, decay)


def _after(g):
    """Σ_{m > s} g_m within the chunk, for every s (0 for the last)."""
    rev = g.flip(2).cumsum(2).flip(2)                  # Σ_{m >= s}
    return torch.cat([rev[:, :, 1:], torch.zeros_like(rev[:, :, :1])], 2)
