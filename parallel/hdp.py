"""Running a hybrid-data-parallel schedule (see `hdp_schedule`) on the reference model.

For each microbatch a rank packs its pieces into one row of tokens -- its
piece of a shared sequence first (if any), then its whole local sequences --
with each token's position inside its own sequence, and runs the model with an
explicit per-microbatch attention context, `HDPAttention`, in place of the
model's attention cores (`attention_cores`):

- local sequences get plain attention, one document at a time (causal inside
  each, never across documents);
- a shared sequence gets ring attention over its ring.  Pieces are contiguous
  (so linear layers and linear attention see tokens in order), but causal
  work on contiguous shards grows with the ring position, so for the softmax
  call the ring's q/k/v are re-laid zigzag (`ZigzagRelayout`: point-to-point
  inside the ring, autograd-aware) and the output is sent back;
  gated linear attention scans its state along the ring in piece order.

Every rank of a ring makes the same ring calls in the same order (one per
attention layer), a rank is in at most one multi-rank ring per microbatch, and
ranks run microbatches in order, so rings never wait on each other in a cycle.
A rank idle in a microbatch skips it; all ranks meet again at the gradient
all-reduce.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from loom import comms

from .fused_attention import check_kernel
from .hdp_schedule import check_schedule, fingerprint
from .linear_attention import linear_attention, local_linear_attention
from .model import Attention, LinearAttention, local_attention, next_token_loss
from .ring_attention import ring_attention

_TAG = 64  # point-to-point tag of re-layout messages (ring attention uses tags 0-3)


# ------------------------------------------------------- zigzag re-layout

@dataclass(frozen=True)
class Move:
    """``rows`` consecutive rows from ring position ``src`` (starting at local
    row ``src_row``) to position ``dst`` (starting at ``dst_row``)."""
    src: int
    src_row: int
    dst: int
    dst_row: int
    rows: int


@dataclass(frozen=True)
class ZigzagRelayout:
    """How a sequence held in contiguous pieces moves to the zigzag layout.

    ``bounds[p] = (start, end)`` is the piece of ring position p.  In the
    zigzag layout the sequence (padded to ``2 * P * chunk`` tokens at its end)
    is cut into 2P chunks and position p holds chunks p and 2P-1-p; padding
    rows receive nothing (zeros) and are sent nowhere on the way back."""
    ranks: tuple[int, ...]
    bounds: tuple[tuple[int, int], ...]
    length: int

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def chunk(self) -> int:
        return -(-self.length // (2 * self.size))

    def zigzag_tokens(self, p: int) -> list[tuple[int, int, int]]:
        """``(token_start, token_end, row)`` runs of position p's zigzag rows."""
        c, size = self.chunk, self.size
        runs = [(p * c, 0), ((2 * size - 1 - p) * c, c)]
        return [(t, min(t + c, self.length), row) for t, row in runs if t < self.length]

    def moves(self) -> list[Move]:
        """Contiguous -> zigzag, in an order every position computes alike."""
        out = []
        for a, (s, e) in enumerate(self.bounds):
            for z in range(self.size):
                for t0, t1, row in self.zigzag_tokens(z):
                    lo, hi = max(s, t0), min(e, t1)
                    if lo < hi:
                        out.append(Move(a, lo - s, z, row + lo - t0, hi - lo))
        return out

    def cu_seqlens(self, device=None):
        """Document bounds of the zigzag ring call: the sequence, then its padding."""
        padded = 2 * self.size * self.chunk
        bounds = [0, self.length] + ([padded] if padded > self.length else [])
        return torch.tensor(bounds, dtype=torch.int64, device=device)


def exchange_rows(x: torch.Tensor, moves, ranks, position: int, out_rows: int) -> torch.Tensor:
    """Apply ``moves`` to the rows (dim 1) of ``x`` held by ring ``position``:
    returns this position's ``[x.shape[0], out_rows, ...]`` result (rows no
    move fills are zero).  Messages to one peer are concatenated in move order."""
    out = x.new_zeros((x.shape[0], out_rows) + tuple(x.shape[2:]))
    sends: dict[int, list[Move]] = {}
    recvs: dict[int, list[Move]] = {}
    for mv in moves:
        if mv.src == position and mv.dst == position:
            out[:, mv.dst_row:mv.dst_row + mv.rows] = x[:, mv.src_row:mv.src_row + mv.rows]
        elif mv.src == position:
            sends.setdefault(mv.dst, []).append(mv)
        elif mv.dst == position:
            recvs.setdefault(mv.src, []).append(mv)
    pending = []
    buffers = {}
    for src, mvs in recvs.items():
        buf = x.new_empty((x.shape[0], sum(m.rows for m in mvs)) + tuple(x.shape[2:]))
        buffers[src] = buf
        pending.append(comms.irecv(buf, ranks[src], tag=_TAG))
    for dst, mvs in sends.items():
        payload = torch.cat([x[:, m.src_row:m.src_row + m.rows] for m in mvs], 1)
        pending.append(comms.isend(payload, ranks[dst], tag=_TAG))
    comms.wait_all(pending)
    for src, mvs in recvs.items():
        at = 0
        for m in mvs:
            out[:, m.dst_row:m.dst_row + m.rows] = buffers[src][:, at:at + m.rows]
            at += m.rows
    return out


def _reverse(moves):
    return [Move(m.dst, m.dst_row, m.src, m.src_row, m.rows) for m in moves]


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, moves, ranks, position, out_rows):
        ctx.plan = (moves, ranks, position, x.shape[1])
        return exchange_rows(x, moves, ranks, position, out_rows)

    @staticmethod
    def backward(ctx, grad):
        moves, ranks, position, in_rows = ctx.plan
        grad_x = exchange_rows(grad.contiguous(), _reverse(moves), ranks, position, in_rows)
        return grad_x, None, None, None, None


def to_zigzag(x: torch.Tensor, relayout: ZigzagRelayout, position: int) -> torch.Tensor:
    """This position's contiguous piece ``[b, piece, ...]`` -> its zigzag rows ``[b, 2*chunk, ...]``."""
    return _Exchange.apply(x, relayout.moves(), relayout.ranks, position, 2 * relayout.chunk)


def from_zigzag(x: torch.Tensor, relayout: ZigzagRelayout, position: int) -> torch.Tensor:
    """The inverse of `to_zigzag` (padding rows are dropped)."""
    s, e = relayout.bounds[position]
    return _Exchange.apply(x, _reverse(relayout.moves()), relayout.ranks, position, e - s)


# ------------------------------------------------- the attention context

LOCAL_KERNELS = ("sdpa", "blocks")


class HDPAttention:
    """One rank's attention for one microbatch.

    Rows ``[0, ring_rows)`` of the packed row are this rank's piece of a
    sequence shared with the ring of ``relayout`` (None: no shared sequence);
    ``documents`` are the ``(start, end)`` rows of the whole local sequences
    that follow.  `softmax` and `linear` are the cores of the model's
    `Attention` and `LinearAttention` modules (see `attention_cores`).

    ``local_kernel`` computes the local documents: ``"sdpa"``, PyTorch's fused
    attention one document at a time, or ``"blocks"``, the block kernel ring
    attention runs (a ring of one, every document in one call) -- the same
    arithmetic as the rings, for like-for-like comparisons.  ``kernel``: the
    rings' block kernel (`ring_attention`'s ``kernel``); ``head_chunks``: the
    rings' `ring_attention` ``head_chunks`` (memory of the ring's buffers / N)."""

    def __init__(self, rank: int, relayout: ZigzagRelayout | None, documents, linear_method="allscan",
                 local_kernel: str = "sdpa", kernel: str = "auto", head_chunks: int = 1):
        if local_kernel not in LOCAL_KERNELS:
            raise ValueError(f"local_kernel={local_kernel!r} must be one of {LOCAL_KERNELS}")
        check_kernel(kernel)
        self.rank, self.relayout, self.linear_method = rank, relayout, linear_method
        self.local_kernel, self.kernel, self.head_chunks = local_kernel, kernel, head_chunks
        self.documents = [tuple(d) for d in documents]
        if relayout is None:
            self.position, self.ring_rows = None, 0
        else:
            self.position = relayout.ranks.index(rank)
            s, e = relayout.bounds[self.position]
            self.ring_rows = e - s

    def softmax(self, q, k, v, *, causal: bool = False, scale: float | None = None, cu_seqlens=None):
        """The softmax core.  HDP keeps sequences apart itself (its ring and
        its ``documents``), so ``cu_seqlens`` must be None: ValueError otherwise."""
        if cu_seqlens is not None:
            raise ValueError("HDPAttention.softmax: hybrid data parallelism keeps documents apart itself "
                             "(each sequence is its own ring or local document); pass no cu_seqlens")
        outs = []
        if self.relayout is not None:
            n, heads = self.ring_rows, (q.shape[2], k.shape[2], v.shape[2])
            zig = to_zigzag(torch.cat((q[:, :n], k[:, :n], v[:, :n]), 2), self.relayout, self.position)
            qz, kz, vz = zig.split(heads, 2)
            out = ring_attention(qz, kz, vz, causal=causal, layout="zigzag", ranks=list(self.relayout.ranks),
                                 scale=scale, cu_seqlens=self.relayout.cu_seqlens(q.device), kernel=self.kernel,
                                 head_chunks=self.head_chunks)
            outs.append(from_zigzag(out, self.relayout, self.position))
        if self.documents and self.local_kernel == "blocks":
            first = self.documents[0][0]
            cu = torch.tensor([0] + [b - first for _, b in self.documents], dtype=torch.int64, device=q.device)
            outs.append(ring_attention(q[:, first:], k[:, first:], v[:, first:], causal=causal,
                                       ranks=[self.rank], scale=scale, cu_seqlens=cu, kernel=self.kernel))
        elif self.documents:
            outs += [local_attention(q[:, a:b], k[:, a:b], v[:, a:b], causal=causal, scale=scale)
                     for a, b in self.documents]
        return torch.cat(outs, 1)

    def linear(self, q, k, v, log_decay, *, scale: float | None = None, cu_seqlens=None):
        """The linear-attention core; as `softmax`, ``cu_seqlens`` must be None
        (ValueError otherwise): every sequence here is one document."""
        if cu_seqlens is not None:
            raise ValueError("HDPAttention.linear: hybrid data parallelism keeps documents apart itself "
                             "(each sequence is its own ring or local document); pass no cu_seqlens")
        outs = []
        if self.relayout is not None:  # the state scans along the ring in piece (token) order
            n = self.ring_rows
            outs.append(linear_attention(q[:, :n], k[:, :n], v[:, :n], log_decay[:, :n],
                                         ranks=list(self.relayout.ranks), method=self.linear_method,
                                         scale=scale))
        for a, b in self.documents:
            outs.append(local_linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], log_decay[:, a:b],
                                               scale=scale))
        return torch.cat(outs, 1)


@contextlib.contextmanager
def attention_cores(model: torch.nn.Module, attention: HDPAttention):
    """Run ``model``'s attention layers through ``attention`` inside the
    ``with`` block (the forward); the previous cores come back afterwards.
    The backward needs no core: it follows the graph the forward recorded."""
    saved = [(m, m.core) for m in model.modules() if isinstance(m, (Attention, LinearAttention))]
    for m, _ in saved:
        m.core = attention.softmax if isinstance(m, Attention) else attention.linear
    try:
        yield model
    finally:
        for m, core in saved:
            m.core = core


# ---------------------------------------------------------------- packing

@dataclass
class PackedShard:
    """One rank's share of one microbatch, packed in one row."""
    inputs: torch.Tensor      # [1, rows] token ids
    targets: torch.Tensor     # [1, rows] next tokens
    positions: torch.Tensor   # [rows] index of each token inside its own sequence
    attention: HDPAttention


def _checked_sequences(sequences):
    """Every sequence a 1-D tensor of non-negative integer token ids."""
    if isinstance(sequences, torch.Tensor) or not isinstance(sequences, (list, tuple)):
        raise TypeError(f"hdp: sequences must be a list of 1-D token tensors, got {type(sequences).__name__}")
    for i, s in enumerate(sequences):
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.dtype.is_floating_point or s.is_complex() \
                or s.dtype == torch.bool:
            what = f"a {s.dtype} tensor of shape {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"hdp: sequences[{i}] must be a 1-D integer tensor of token ids, got {what}")
        if s.numel() and int(s.min()) < 0:
            raise ValueError(f"hdp: sequences[{i}] holds a negative token id ({int(s.min())})")
    return sequences


def _tokens_fingerprint(sequences) -> int:
    """A 62-bit fingerprint of the batch's tokens (the same batch on every rank)."""
    digest = hashlib.blake2b(digest_size=8)
    for s in sequences:
        digest.update(s.numel().to_bytes(8, "little"))
        digest.update(s.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 2


def pack_microbatch(microbatch, rank: int, sequences, device=None, linear_method: str = "allscan",
                    local_kernel: str = "sdpa", kernel: str = "auto", head_chunks: int = 1) -> PackedShard | None:
    """``rank``'s pieces of ``microbatch`` (a schedule entry: pieces per rank)
    as one packed row; ``sequences[i]`` holds sequence i's ``length + 1``
    tokens (inputs and shifted targets).  None when the rank is idle."""
    pieces = sorted(microbatch[rank], key=lambda p: (len(p.ring) == 1, p.seq))
    if not pieces:
        return None
    inputs, targets, positions, documents = [], [], [], []
    relayout, row = None, 0
    for p in pieces:
        tokens = sequences[p.seq]
        inputs.append(tokens[p.start:p.end])
        targets.append(tokens[p.start + 1:p.end + 1])
        positions.append(torch.arange(p.start, p.end))
        if len(p.ring) > 1:
            relayout = ZigzagRelayout(p.ring, _ring_bounds(microbatch, p), len(tokens) - 1)
        else:
            documents.append((row, row + p.tokens))
        row += p.tokens

    def cat(parts):
        return torch.cat(parts).to(device)

    return PackedShard(cat(inputs)[None], cat(targets)[None], cat(positions),
                       HDPAttention(rank, relayout, documents, linear_method, local_kernel, kernel, head_chunks))


def _ring_bounds(microbatch, piece) -> tuple[tuple[int, int], ...]:
    """The (start, end) of every piece of ``piece``'s sequence, in ring order."""
    found = {r: (p.start, p.end) for r, pieces in enumerate(microbatch) for p in pieces if p.seq == piece.seq}
    return tuple(found[r] for r in piece.ring)


# --------------------------------------------------------- forward/backward

def hdp_forward_backward(model: torch.nn.Module, sequences, schedule, *, device=None,
                         loss_scale: float = 1.0, linear_method: str = "allscan",
                         local_kernel: str = "sdpa", kernel: str = "auto", head_chunks: int = 1) -> torch.Tensor:
    """Forward and backward of this rank's share of every microbatch.

    ``sequences[i]``: the tokens of sequence i of the global batch (``length
    + 1``: inputs and shifted targets); ``schedule`` from `hdp_schedule` over
    their lengths, the same on every rank.  The loss is the per-token mean over
    the whole global batch (times ``loss_scale``): each rank sums its tokens'
    losses and divides by the batch's token count, so the gradients that
    accumulate in ``.grad`` (and the returned float64 losses), *summed* over
    ranks, are those of one process on the whole batch.  Collective: every
    rank calls it (a rank with nothing to do still takes part in the check
    that all ranks hold the same schedule).  ``linear_method``: the state scan
    of linear-attention layers along rings; ``local_kernel``, ``kernel``,
    ``head_chunks``: see `HDPAttention`."""
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    error, mine, lengths = None, (), []
    try:
        lengths = [len(s) - 1 for s in _checked_sequences(sequences)]
        check_schedule(schedule, lengths, world)
        mine = [fingerprint(schedule, lengths), _tokens_fingerprint(sequences)]
    except (TypeError, ValueError) as exc:
        error = exc
    # every rank learns whether all hold the same valid batch and schedule, then all raise alike
    comms.agree(error, mine, what="hdp", device=device if device is not None and torch.device(device).type == "cuda"
                else None).same(["schedule fingerprint", "tokens fingerprint"],
                                "hdp: ranks disagree on the batch or its schedule (every rank must pass the "
                                "same sequences and schedule them with the same options)")
    total = sum(lengths)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for mb in schedule:
        shard = pack_microbatch(mb, rank, sequences, device, linear_method, local_kernel, kernel, head_chunks)
        if shard is None:
            continue
        with attention_cores(model, shard.attention):
            logits = model(shard.inputs, shard.positions)
        loss = next_token_loss(logits, shard.targets, reduction="sum") * (loss_scale / total)
        loss.backward()
        loss_sum += loss.detach().double()
    return loss_sum
