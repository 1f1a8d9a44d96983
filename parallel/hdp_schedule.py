"""Hybrid data parallelism (ByteScale): which ranks compute which tokens.

A global batch of variable-length sequences runs in microbatches.  In each
microbatch every rank holds at most ``capacity`` tokens: whole short sequences
packed together (plain attention, one document each) and at most one
contiguous piece of a long sequence that it shares with other ranks over a
ring (ring attention; the executor, `loom.parallel.hdp`, re-lays the ring's
pieces zigzag for the attention call so every member does the same causal
work).  Rings are formed per microbatch from
point-to-point messages, so they need no process groups; the rings of one
microbatch are disjoint, so every rank makes at most one ring call per
attention layer and ranks can never wait on each other in a cycle.

`hdp_schedule` is a pure function: the same lengths give the same schedule on
every rank.  It gives each sequence ``ceil(length / capacity)`` ranks -- more
when its cost alone would exceed a rank's fair share -- and places sequences,
most expensive first, on the least-loaded ranks (longest-processing-time
first) by an estimated cost: a linear term per token plus the causal
query-key pairs of attention (`HDPCost`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple


class Piece(NamedTuple):
    """Tokens ``[start, end)`` of sequence ``seq``, computed on ``ring``: the
    ordered ranks that share the sequence (``(rank,)`` when one rank holds it)."""
    seq: int
    start: int
    end: int
    ring: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class HDPCost:
    """The estimated cost of one rank's piece: ``linear`` per token plus
    ``attention`` per causal query-key pair.  Called as ``cost(tokens, ring)``
    with ``tokens`` the piece's token count and ``ring`` the ranks that share
    its sequence: a sequence of ``t * len(ring)`` tokens has about
    ``(t * len(ring))**2 / 2`` causal pairs, which ring attention in the
    zigzag layout shares equally, ``t * (t * len(ring) + 1) / 2`` per rank
    (exactly ``t * (t + 1) / 2`` on one rank)."""
    linear: float = 1.0
    attention: float = 1.0 / 1024

    def __post_init__(self):
        for name in ("linear", "attention"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"HDPCost {name}={v!r} must be a finite number >= 0")

    def __call__(self, tokens: int, ring=(0,)) -> float:
        return self.linear * tokens + self.attention * tokens * (tokens * len(ring) + 1) / 2

    @classmethod
    def for_model(cls, cfg) -> "HDPCost":
        """Multiply-adds of the reference transformer (a `ModelConfig`): matmuls
        per token, and per query-key pair of its softmax layers (scores and
        values, 2 * heads * head_dim each)."""
        d, hd = cfg.dim, cfg.head_dim
        kv = cfg.kv_heads or cfg.heads
        hidden = cfg.ffn_hidden or 4 * d
        ffn = 2 * d * hidden * (1 if cfg.moe == "none" else cfg.top_k) + \
            (0 if cfg.moe == "none" else d * cfg.num_experts)
        per_token, per_pair = d * cfg.vocab, 0
        for kind in cfg.layer_kinds:
            if kind == "softmax":
                per_token += 2 * d * cfg.heads * hd + 2 * d * kv * hd + ffn
                per_pair += 2 * cfg.heads * hd
            else:  # gated linear attention: q, k, v, o, the low-rank gate, a d x d state per head
                per_token += 4 * d * d + 2 * 16 * d + 2 * cfg.heads * hd * hd + ffn
        return cls(linear=float(per_token), attention=float(per_pair))


Cost = Callable[[int, tuple], float]


# ------------------------------------------------------------------- checks

def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"hdp_schedule: {name}={value!r} must be an integer >= {low}")
    if value < low:
        raise ValueError(f"hdp_schedule: {name}={value} must be >= {low}")
    return value


def _check_lengths(lengths) -> list[int]:
    if isinstance(lengths, (str, bytes)):
        raise ValueError(f"hdp_schedule: lengths={lengths!r} must be a sequence of positive integers")
    try:
        lengths = list(lengths)
    except TypeError:
        raise ValueError(f"hdp_schedule: lengths={lengths!r} must be a sequence of positive integers") \
            from None
    if not lengths:
        raise ValueError("hdp_schedule: the batch is empty (lengths=[]); need at least one sequence")
    out = []
    for i, n in enumerate(lengths):
        if hasattr(n, "item") and getattr(n, "ndim", 0) == 0:
            n = n.item()
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"hdp_schedule: lengths[{i}]={n!r} must be a positive integer")
        out.append(int(n))
    return out


# ----------------------------------------------------------------- splitting

def split_sequence(length: int, parts: int) -> list[range]:
    """``length`` tokens cut into ``parts`` contiguous pieces whose sizes
    differ by at most one (the longer ones first)."""
    if not 1 <= parts <= length:
        raise ValueError(f"cannot split {length} tokens into {parts} non-empty pieces")
    size, extra = divmod(length, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (i < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


@dataclass
class _Item:
    seq: int
    pieces: list[range]
    costs: list[float]

    @property
    def size(self) -> int:
        return len(self.pieces)


def _item(seq: int, length: int, parts: int, cost: Cost) -> _Item:
    pieces = split_sequence(length, parts)
    ring = tuple(range(parts))  # placeholder ranks: only its size may matter to a cost
    return _Item(seq, pieces, [_cost(cost, len(p), ring) for p in pieces])


def _cost(cost: Cost, tokens: int, ring: tuple) -> float:
    c = cost(tokens, ring)
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
        raise ValueError(f"hdp_schedule: cost({tokens}, ring of {len(ring)}) = {c!r}; a cost must be a "
                         f"finite number >= 0")
    return float(c)


# A ring grows past the ranks its tokens need only while its costliest piece
# exceeds a rank's fair share by more than this: every member adds messages the
# cost model does not count, and a bin within 10% of the mean is balanced enough.
SLACK = 1.1


def _items(lengths, world, capacity, cost, microbatches) -> list[_Item]:
    """Each sequence with its ring size: the fewest ranks its tokens fit on,
    more while its costliest piece exceeds a rank's fair share (per microbatch)."""
    items = [_item(i, n, -(-n // capacity), cost) for i, n in enumerate(lengths)]
    fair = sum(sum(it.costs) for it in items) / (world * microbatches)
    for k, it in enumerate(items):
        parts = it.size
        while max(it.costs) > SLACK * fair and parts < min(world, lengths[it.seq]):
            parts += 1
            it = _item(it.seq, lengths[it.seq], parts, cost)
        items[k] = it
    return items


# ---------------------------------------------------------------- placement

def _place(items, world, capacity, microbatches):
    """Longest-processing-time-first placement into (microbatch, rank) bins,
    or None when some item fits nowhere."""
    load = [[0.0] * world for _ in range(microbatches)]
    free = [[capacity] * world for _ in range(microbatches)]
    ringed = [[False] * world for _ in range(microbatches)]
    out = [[[] for _ in range(world)] for _ in range(microbatches)]
    # rings first (they need several ranks free of rings in one microbatch), then by cost
    order = sorted(items, key=lambda it: (it.size == 1, -max(it.costs), -it.size, it.seq))
    for it in order:
        best = None
        for m in range(microbatches):
            if it.size == 1:
                fits = [r for r in range(world) if free[m][r] >= len(it.pieces[0])]
                for r in fits:
                    key = (load[m][r] + it.costs[0], m, r)
                    if best is None or key < best[0]:
                        best = (key, m, (r,))
                continue
            fits = [r for r in range(world) if not ringed[m][r] and free[m][r] >= len(it.pieces[0])]
            if len(fits) < it.size:
                continue
            chosen = sorted(fits, key=lambda r: (load[m][r], r))[:it.size]
            # the costliest piece goes to the least-loaded rank: ring order follows the pieces
            by_cost = sorted(range(it.size), key=lambda j: (-it.costs[j], j))
            ranks = [0] * it.size
            for j, r in zip(by_cost, chosen):
                ranks[j] = r
            key = (max(load[m][r] + c for r, c in zip(ranks, it.costs)), m, tuple(ranks))
            if best is None or key < best[0]:
                best = (key, m, tuple(ranks))
        if best is None:
            return None
        _, m, ring = best
        for piece, cost, r in zip(it.pieces, it.costs, ring):
            load[m][r] += cost
            free[m][r] -= len(piece)
            ringed[m][r] = ringed[m][r] or len(ring) > 1
            out[m][r].append(Piece(it.seq, piece.start, piece.stop, ring))
    for mb in out:
        for pieces in mb:  # the ring piece first, then local sequences in batch order
            pieces.sort(key=lambda p: (len(p.ring) == 1, p.seq, p.start))
    return [mb for mb in out if any(mb)]


def hdp_schedule(lengths, world: int, capacity: int, *, cost: Cost | None = None
                 ) -> list[list[list[Piece]]]:
    """Microbatches for a global batch of sequence ``lengths`` on ``world``
    ranks holding at most ``capacity`` tokens each per microbatch.

    Returns ``schedule[microbatch][rank]``: the `Piece`s that rank computes.
    Every token is assigned exactly once; all pieces of a sequence are in one
    microbatch, share one ring, and the ring lists their ranks in token order;
    a rank is in at most one multi-rank ring per microbatch.  ``cost(tokens,
    ring)`` estimates a piece's work (default `HDPCost()`); the schedule
    balances it across ranks.  Deterministic (no randomness, no hashing)."""
    lengths = _check_lengths(lengths)
    world = _check_int("world", world)
    capacity = _check_int("capacity", capacity)
    if cost is None:
        cost = HDPCost()
    elif not callable(cost):
        raise TypeError(f"hdp_schedule: cost={cost!r} must be callable as cost(tokens, ring)")
    longest = max(lengths)
    if longest > world * capacity:
        seq = lengths.index(longest)
        raise ValueError(f"hdp_schedule: sequence {seq} has {longest} tokens, more than world * capacity "
                         f"= {world} * {capacity} = {world * capacity} (one microbatch holds no more)")
    # ring sizes are chosen once, against the fair share of the fewest microbatches
    # the tokens need; then microbatches are added until everything fits
    fewest = max(1, -(-sum(lengths) // (world * capacity)))
    items = _items(lengths, world, capacity, cost, fewest)
    shared = sum(it.size for it in items if it.size > 1)
    microbatches = max(fewest, -(-shared // world))
    while True:  # ends: with one microbatch per sequence every sequence fits an empty one
        schedule = _place(items, world, capacity, microbatches)
        if schedule is not None:
            return schedule
        microbatches += 1


# ------------------------------------------------------------ introspection

def schedule_costs(schedule, cost: Cost | None = None) -> list[list[float]]:
    """``costs[microbatch][rank]``: the estimated work of each rank's pieces."""
    cost = HDPCost() if cost is None else cost
    return [[sum(_cost(cost, p.tokens, p.ring) for p in pieces) for pieces in mb]
            for mb in schedule]


def imbalance(schedule, cost: Cost | None = None) -> float:
    """max / mean over ranks of the estimated work of the whole step."""
    per_rank = [sum(col) for col in zip(*schedule_costs(schedule, cost))]
    mean = sum(per_rank) / len(per_rank)
    return max(per_rank) / mean if mean > 0 else 1.0


# ---------------------------------------------------------------- validation

def check_schedule(schedule, lengths, world: int, capacity: int | None = None) -> None:
    """Raise ValueError unless ``schedule`` is one that the HDP executor can
    run for ``lengths`` on ``world`` ranks: every token exactly once; all
    pieces of a sequence in one microbatch, contiguous, sharing one ring that
    lists their ranks in token order; at most one multi-rank ring per rank and
    microbatch; at most ``capacity`` tokens per rank and microbatch (if given)."""
    lengths = _check_lengths(lengths)
    seen: dict[int, int] = {}
    if not isinstance(schedule, (list, tuple)):
        raise ValueError(f"schedule must be a list of microbatches, got {type(schedule).__name__}")
    for m, mb in enumerate(schedule):
        if not isinstance(mb, (list, tuple)) or len(mb) != world:
            raise ValueError(f"microbatch {m} must list the pieces of each of the {world} ranks")
        held: dict[int, list] = {}
        for rank, pieces in enumerate(mb):
            shared = []
            for p in pieces:
                if not isinstance(p, Piece):
                    raise ValueError(f"microbatch {m}, rank {rank}: {p!r} is not a Piece")
                if not (isinstance(p.seq, int) and 0 <= p.seq < len(lengths)):
                    raise ValueError(f"microbatch {m}, rank {rank}: {p} names no sequence of the batch")
                if not (isinstance(p.start, int) and isinstance(p.end, int)
                        and 0 <= p.start < p.end <= lengths[p.seq]):
                    raise ValueError(f"microbatch {m}, rank {rank}: {p} is not a non-empty token range "
                                     f"of sequence {p.seq} ({lengths[p.seq]} tokens)")
                ring = p.ring
                if not isinstance(ring, tuple) or rank not in ring or len(set(ring)) != len(ring) \
                        or any(not isinstance(r, int) or not 0 <= r < world for r in ring):
                    raise ValueError(f"microbatch {m}, rank {rank}: {p} needs a ring of distinct ranks "
                                     f"in [0, {world}) that contains rank {rank}")
                if len(ring) > 1:
                    shared.append(p.seq)
                held.setdefault(p.seq, []).append((p.start, p.end, rank, ring))
            if len(shared) > 1:
                raise ValueError(f"microbatch {m}: rank {rank} holds pieces of {len(shared)} sequences "
                                 f"{shared} shared over rings; at most one per rank and microbatch")
            used = sum(p.tokens for p in pieces)
            if capacity is not None and used > capacity:
                raise ValueError(f"microbatch {m}: rank {rank} holds {used} tokens > capacity {capacity}")
        for seq, parts in sorted(held.items()):
            if seq in seen:
                raise ValueError(f"sequence {seq} appears in microbatches {seen[seq]} and {m}; a sequence "
                                 f"must be computed in one microbatch")
            seen[seq] = m
            parts.sort()
            ring = parts[0][3]
            if [a for a, *_ in parts] != [0] + [b for _, b, *_ in parts[:-1]] or parts[-1][1] != lengths[seq]:
                raise ValueError(f"microbatch {m}: the pieces of sequence {seq} "
                                 f"{[(a, b) for a, b, *_ in parts]} do not cover [0, {lengths[seq]}) "
                                 f"exactly once")
            if any(r != ring for *_, r in parts) or tuple(rank for _, _, rank, _ in parts) != ring:
                raise ValueError(f"microbatch {m}: the pieces of sequence {seq} are on ranks "
                                 f"{[rank for _, _, rank, _ in parts]} with rings {[r for *_, r in parts]}; "
                                 f"they must share one ring listing those ranks in token order")
    missing = [i for i in range(len(lengths)) if i not in seen]
    if missing:
        raise ValueError(f"sequences {missing[:8]}{'...' if len(missing) > 8 else ''} are in no microbatch")


def fingerprint(schedule, lengths) -> int:
    """A checksum of a schedule and its lengths (< 2**61): ranks compare it to
    find out that they did not compute the same schedule."""
    h = 0
    values = list(lengths) + [-1]
    for m, mb in enumerate(schedule):
        for rank, pieces in enumerate(mb):
            for p in pieces:
                values += [m, rank, p.seq, p.start, p.end, *p.ring, -2]
    for x in values:
        h = (h * 1000003 + int(x) + 7) % (2**61 - 1)
    return h
