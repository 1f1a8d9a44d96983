"""A ring over an ordered list of global ranks, with double-buffered shifts.

Messages go point-to-point on the default group, so a ring needs no process
group of its own: several disjoint rings can run at the same time on one world
and rings can be formed per batch.  Position i of the ring sends to position
i+1 and receives from position i-1.

Messages between two ranks are matched in program order per (edge, tag).  A
ring's messages use the tags ``tag * CHANNELS + channel``, so the kinds of
message one algorithm keeps in flight together (say K/V blocks and gradient
accumulators) never match each other, and rings given different ``tag``s never
match each other's messages even when they share an edge.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from . import ops

CHANNELS = 4  # channels per ring: wire tag = tag * CHANNELS + channel


def _check_ranks(ranks) -> tuple[int, ...]:
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or not ranks:
        raise ValueError(f"ring ranks={ranks!r} must be a non-empty sequence of global ranks")
    out = []
    for r in ranks:
        if isinstance(r, torch.Tensor) and r.numel() == 1:
            r = r.item()
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"ring ranks={list(ranks)!r}: {r!r} is not a global rank")
        out.append(int(r))
    if len(set(out)) != len(out):
        raise ValueError(f"ring ranks={out} contain a rank twice")
    return tuple(out)


def world_ranks(group=None) -> list[int]:
    """The global ranks of ``group`` (default: the world); ``[0]`` when
    torch.distributed is not initialised (a single process is a ring of one)."""
    return ops.group_ranks(group)


class Ring:
    """An ordered ring of global ranks that this process belongs to.

    ``Ring([3, 1])``: rank 3 is position 0 and sends to rank 1, which sends
    back to rank 3.  ``tag`` separates rings that share an edge."""

    def __init__(self, ranks, *, rank: int | None = None, tag: int = 0):
        self.ranks = _check_ranks(ranks)
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
        if rank not in self.ranks:
            raise ValueError(f"rank {rank} is not in the ring {list(self.ranks)}")
        if self.size > 1 and not dist.is_initialized():
            raise RuntimeError(f"a ring of {self.size} ranks needs an initialised process group")
        if isinstance(tag, bool) or not isinstance(tag, int) or tag < 0:
            raise ValueError(f"ring tag={tag!r} must be a non-negative integer")
        self.rank, self.tag = rank, tag
        self.position = self.ranks.index(rank)
        self.next = self.ranks[(self.position + 1) % self.size]
        self.prev = self.ranks[(self.position - 1) % self.size]

    @property
    def size(self) -> int:
        return len(self.ranks)

    def owner(self, step: int) -> int:
        """The position whose block this rank holds after ``step`` shifts."""
        return (self.position - step) % self.size

    def _tag(self, channel: int) -> int:
        if not 0 <= channel < CHANNELS:
            raise ValueError(f"ring channel={channel} must be in [0, {CHANNELS})")
        return self.tag * CHANNELS + channel

    def shift(self, send: torch.Tensor | None, recv_into: torch.Tensor | None, channel: int = 0):
        """Post ``send`` to the next rank and a receive from the previous one
        into ``recv_into``; returns the two `Pending`s (send, recv).  None
        on either side: nothing is posted there (and None returned), for a
        message both ends know to be empty."""
        tag = self._tag(channel)
        recv = None if recv_into is None else ops.irecv(recv_into, self.prev, tag=tag)
        sent = None if send is None else ops.isend(send, self.next, tag=tag)
        return sent, recv

    def rotate(self, x, steps: int | None = None, channel: int = 0, *, borrow: bool = False, window=None
               ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(step, block)`` for ``steps`` (default: size) steps, where
        ``block`` is what position ``owner(step)`` started with.  ``x`` is a
        tensor or a tuple of tensors (one message each, yielded as a tuple).

        Double buffered: the transfer for step i+1 is in flight while the
        caller works on step i.  Without ``borrow`` the ring takes ``x`` over
        (its storage is reused as a receive buffer); with it, ``x`` stays the
        caller's and is never written (the ring allocates its own buffers, one
        fewer copy than stacking the parts into a new tensor).  A yielded block
        is only valid until the next one is requested.

        ``window(owner, step)``, when given, is the slice of dim 1 of the
        block ``owner`` started with that its holder at ``step`` (and later)
        will read: only that part travels to it (an empty slice: no message),
        and the rest of a yielded block is stale.  Every position must derive
        it from the same plan, since sender and receiver each compute their
        side."""
        steps = self.size if steps is None else steps
        if not 0 <= steps <= self.size:
            raise ValueError(f"rotate: steps={steps} must be in [0, {self.size}]")
        single = isinstance(x, torch.Tensor)
        start = tuple(t.contiguous() for t in ((x,) if single else x))
        current, spare = start, []   # spare: ring-owned buffers nothing reads now
        for step in range(steps):
            pending, nxt, landing = [], None, []
            if step + 1 < steps:
                nxt = spare.pop() if spare else tuple(torch.empty_like(t) for t in current)
                if window is not None:
                    out_w, in_w = window(self.owner(step), step + 1), window(self.owner(step + 1), step + 1)
                for send, recv_into in zip(current, nxt):
                    if window is not None:
                        send, recv_into = send[:, out_w], recv_into[:, in_w]
                        send = send if send.numel() else None
                        if not recv_into.numel():
                            recv_into = None
                        elif not recv_into.is_contiguous():  # received whole, then copied into its place
                            landing.append((recv_into, torch.empty_like(recv_into,
                                                                        memory_format=torch.contiguous_format)))
                            recv_into = landing[-1][1]
                    pending.extend(p for p in self.shift(send, recv_into, channel) if p is not None)
            yield step, (current[0] if single else current)
            for p in pending:
                p.wait()
            for place, arrived in landing:
                place.copy_(arrived)
            if nxt is not None:
                if not (borrow and current is start):
                    spare.append(current)
                current = nxt

    def all_gather(self, x: torch.Tensor, channel: int = 0) -> torch.Tensor:
        """Every position's ``x`` (same shape everywhere), stacked in ring
        order, by size-1 shifts around the ring."""
        out = x.new_empty((self.size,) + tuple(x.shape))
        out[self.position] = x
        for step, block in self.rotate(x.clone(), channel=channel):
            out[self.owner(step)] = block
        return out

    def __repr__(self) -> str:
        return f"Ring(ranks={list(self.ranks)}, position={self.position}, tag={self.tag})"
