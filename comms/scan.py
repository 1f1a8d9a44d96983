"""All-Scan (ZeCO): an exclusive scan of linear-attention states along a chain of ranks.

Ring position p holds ``decay`` [..., d_k] (its chunk's decay product) and
``state`` [..., d_k, d_v] (its chunk's final state from a zero start); the scan
returns ``S_in(0) = 0``, ``S_in(p+1) = decay_p[..., None] * S_in(p) + state_p``
(``reverse=True``: ``R_in(last) = 0``, ``R_in(p-1) = decay_p * R_in(p) + state_p``).

Three methods behind one contract:

- ``"allscan"`` (ZeCO): the state is cut into ``blocks`` pieces along d_k; a rank
  receives piece b from its predecessor, updates it, sends it on, and moves to
  piece b+1 while b travels.  Every rank but the last sends one state's bytes.
- ``"serial"`` (LASP-1): the same chain with the whole state as one message.
- ``"allgather"`` (LASP-2): every rank gets every (decay, state) pair and folds
  its prefix locally.  With ``group`` (or neither ``group`` nor ``ranks``) it is
  one all_gather on that group; with only ``ranks`` it is P-1 point-to-point
  sends and receives per rank (no process group needed).

The chain methods use point-to-point messages on the default group between
*global* ranks, so a scan over any ordered rank list needs no process group.
The scan is differentiable in ``decay`` and ``state``; its backward is the
mirror scan of the output gradient, so every rank of the chain must run the
backward (each rank's output must reach its loss).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from . import ops
from .agree import agree, checksum_ints, dtype_code, dtype_name

METHODS = ("allscan", "serial", "allgather")


def all_scan(decay: torch.Tensor, state: torch.Tensor, *, group=None, ranks=None, blocks: int = 4,
             reverse: bool = False, method: str = "allscan", check: bool = True) -> torch.Tensor:
    """The exclusive scan of (decay, state) pairs over the ring ``ranks`` (global
    ranks in chain order; default: the ranks of ``group``, default world; a
    chain of one without a process group).

    ``blocks`` (allscan only) is capped at d_k; it need not divide d_k.
    Returns a tensor shaped like ``state``: this position's incoming state.
    Every rank first agrees (`loom.comms.agree`) on the shapes, dtype and
    options, so a bad or mismatched call raises ValueError/TypeError on every
    rank of the chain; ``check=False`` skips that when the caller has already
    agreed on its inputs (`loom.parallel.linear_attention` does)."""
    error, chain = None, None
    try:
        chain = _Chain.build(decay, state, group, ranks, blocks, method)
    except (TypeError, ValueError) as exc:
        error = exc
    if check:
        fields = () if chain is None else chain.description(state, reverse)
        # over the chain's ranks, however the caller named them (group or list)
        agree(error, fields, ranks=chain_ranks(group, ranks), what="all_scan",
              device=state.device if isinstance(state, torch.Tensor) and state.is_cuda else None) \
            .same(_FIELDS, "all_scan", show=_SHOWN,
                                                  formats={"dtype": dtype_name, "method": METHODS.__getitem__,
                                                           "blocks": str, "reverse": bool})
    elif error is not None:
        raise error
    if not check:
        return _AllScan.apply(decay, state, chain, bool(reverse))
    with ops.agreed():  # its messages follow from what the chain just agreed on
        return _AllScan.apply(decay, state, chain, bool(reverse))


def chain_ranks(group=None, ranks=None) -> list:
    """The global ranks of a chain named by ``ranks`` or ``group`` (default:
    the world; a chain of one without a process group)."""
    return list(ranks) if ranks is not None else ops.group_ranks(group)


_FIELDS = ("dtype", "method", "blocks", "reverse", "chain", "state dims", *(f"state dim {i}" for i in range(10)))
_SHOWN = _FIELDS[5:]


class _Chain:
    """The validated, rank-local view of one scan: positions and message plan."""

    __slots__ = ("ranks", "pos", "group", "blocks", "method", "collective")

    @classmethod
    def build(cls, decay, state, group, ranks, blocks, method):
        if method not in METHODS:
            raise ValueError(f"all_scan: method={method!r} must be one of {METHODS}")
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"all_scan: blocks={blocks!r} must be a positive integer")
        for name, t in (("decay", decay), ("state", state)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"all_scan: {name} must be a floating-point tensor, got {_describe(t)}")
        if state.dim() < 2 or tuple(decay.shape) != tuple(state.shape[:-1]):
            raise ValueError(f"all_scan: decay {tuple(decay.shape)} must be state {tuple(state.shape)} "
                             f"without its last dim ([..., d_k] and [..., d_k, d_v])")
        if decay.dtype != state.dtype:
            raise ValueError(f"all_scan: decay dtype {decay.dtype} != state dtype {state.dtype}")
        if decay.numel() and not bool(((decay >= 0) & (decay <= 1)).all()):  # also refuses NaN
            bad = decay[~((decay >= 0) & (decay <= 1))][0].item()
            raise ValueError(f"all_scan: decay must be in [0, 1] everywhere (found {bad})")
        self = cls()
        alone = not dist.is_initialized()
        me = 0 if alone else dist.get_rank()
        group_members = ops.group_ranks(group) if (group is not None or ranks is None) else None
        if ranks is None:
            ranks = group_members
        ranks = _check_ranks(ranks, 1 if alone else dist.get_world_size(), me)
        if group is not None and sorted(ranks) != sorted(group_members):
            raise ValueError(f"all_scan: ranks={ranks} must be an ordering of the group's ranks "
                             f"{group_members} when both are given")
        self.ranks, self.pos, self.group, self.method = ranks, ranks.index(me), group, method
        self.blocks = 1 if method == "serial" else min(blocks, state.shape[-2])
        # allgather uses a collective whenever a group names the ring's members
        self.collective = method == "allgather" and group_members is not None
        return self

    def description(self, state, reverse: bool) -> list[int]:
        """What every position of the chain must agree on (see `all_scan`)."""
        shape = list(state.shape)[:10]
        return [dtype_code(state.dtype), METHODS.index(self.method), self.blocks, int(reverse),
                checksum_ints(self.ranks), state.dim(), *shape]

    def neighbours(self, reverse: bool):
        """(predecessor, successor) along the scan direction; None at the ends."""
        before = self.ranks[self.pos - 1] if self.pos > 0 else None
        after = self.ranks[self.pos + 1] if self.pos + 1 < len(self.ranks) else None
        return (after, before) if reverse else (before, after)

    def scan(self, decay, state, reverse: bool) -> torch.Tensor:
        if len(self.ranks) == 1:
            return torch.zeros_like(state)
        if self.method == "allgather":
            return self._gather_fold(decay, state, reverse)
        return self._pipelined(decay, state, reverse)

    def _pipelined(self, decay, state, reverse):
        prev, nxt = self.neighbours(reverse)
        d_k = state.shape[-2]
        # d_k first, so every piece (and every receive buffer) is a contiguous slice
        state_t, decay_t = state.movedim(-2, 0).contiguous(), decay.movedim(-1, 0).unsqueeze(-1)
        out_t = torch.zeros_like(state_t)
        bounds = _pieces(d_k, self.blocks)
        recvs = [ops.irecv(out_t[lo:hi], prev, tag=b) for b, (lo, hi) in enumerate(bounds)] \
            if prev is not None else []
        sends = []
        for b, (lo, hi) in enumerate(bounds):
            if nxt is None:
                break
            if prev is None:
                piece = state_t[lo:hi]
            else:
                piece = torch.addcmul(state_t[lo:hi], decay_t[lo:hi], recvs[b].wait())
            sends.append(ops.isend(piece, nxt, tag=b))
        ops.wait_all(recvs)
        ops.wait_all(sends)
        return out_t.movedim(0, -2)

    def _gather_fold(self, decay, state, reverse):
        packed = torch.cat([state, decay.unsqueeze(-1)], dim=-1).contiguous()  # [..., d_k, d_v+1]
        if self.collective:
            gathered = ops.all_gather(packed.unsqueeze(0), self.group)
            order = ops.group_ranks(self.group)
            pairs = [gathered[order.index(r)] for r in self.ranks]
        else:
            pairs = self._exchange(packed)
        before = range(self.pos) if not reverse else range(len(self.ranks) - 1, self.pos, -1)
        acc = torch.zeros_like(state)
        for q in before:  # fold the pairs that precede this position, in scan order
            acc = torch.addcmul(pairs[q][..., :-1], pairs[q][..., -1:], acc)
        return acc

    def _exchange(self, packed):
        """Every rank's packed pair, in ring order, by point-to-point messages."""
        pairs = [packed if r == self.ranks[self.pos] else torch.empty_like(packed) for r in self.ranks]
        me = self.ranks[self.pos]
        pending = [ops.isend(packed, r) for r in self.ranks if r != me]
        pending += [ops.irecv(pairs[q], r) for q, r in enumerate(self.ranks) if r != me]
        ops.wait_all(pending)
        return pairs


class _AllScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, decay, state, chain, reverse):
        out = chain.scan(decay.detach(), state.detach(), reverse)
        ctx.chain, ctx.reverse, ctx.agreed = chain, reverse, ops.in_agreed()
        ctx.save_for_backward(decay, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        decay, out = ctx.saved_tensors
        # The adjoint runs the mirror scan over the output gradient:
        # grad state_p is what arrives from the other direction, and
        # grad decay_p pairs it with this position's incoming state.
        with ops.agreed() if ctx.agreed else contextlib.nullcontext():
            grad_state = ctx.chain.scan(decay, grad_out.contiguous(), not ctx.reverse)
        grad_decay = (grad_state * out).sum(-1)
        return grad_decay, grad_state, None, None


def _pieces(d_k: int, blocks: int) -> list[tuple[int, int]]:
    """``blocks`` nearly equal [lo, hi) ranges covering 0..d_k (the first ones one longer)."""
    size, extra = divmod(d_k, blocks)
    bounds, lo = [], 0
    for b in range(blocks):
        hi = lo + size + (1 if b < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _check_ranks(ranks, world: int, me: int) -> list[int]:
    try:
        ranks = [int(r) for r in ranks]
    except (TypeError, ValueError):
        raise ValueError(f"all_scan: ranks={ranks!r} must be a list of global ranks") from None
    if not ranks or len(set(ranks)) != len(ranks) or min(ranks) < 0 or max(ranks) >= world:
        raise ValueError(f"all_scan: ranks={ranks} must be distinct global ranks in [0, {world})")
    if me not in ranks:
        raise ValueError(f"all_scan: this rank ({me}) is not in ranks={ranks}")
    return ranks


def _describe(t) -> str:
    return f"{t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
