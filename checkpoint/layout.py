"""Geometry of a saved tensor: boxes, the chunk grid, who writes which chunk.

Pure functions (no I/O, no processes), so every rank computes the same plan
from the same gathered fragment list, and tests can check plans directly.

A box is ``(lo, hi)``: two tuples, half-open per dim, in *storage*
coordinates (the global shape for replicated and sharded tensors, one flat
dim for Flat fragments, a leading rank dim for PerRank tensors).

The chunk grid comes from the fragments: along each dim the chunk size
divides every fragment boundary, so each chunk lies inside one fragment and
has exactly one writer with no data movement.  Chunks are then split further
(by divisors, which keeps the alignment) down to ``target_bytes``.  When the
boundaries have no useful common divisor (e.g. ZeRO ranges that split a
parameter at element 1) that grid would be absurdly fine, so a plain grid is
used instead and the few chunks that straddle fragments are assembled by one
owner from its peers' parts before writing (`Transfer`s).  Either way no
chunk ever has two writers.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

Box = tuple  # (lo: tuple[int, ...], hi: tuple[int, ...])

# Chunks stay below 32 MiB: glibc serves smaller buffers from reused heap
# memory, larger ones from fresh mmaps that page-fault on every use.
TARGET_CHUNK_BYTES = 16 << 20
# An aligned grid finer than this many chunks per fragment (beyond what the
# size target asks for) means the boundaries share no useful divisor.
_MAX_EXTRA_CHUNKS = 64


def volume(box: Box) -> int:
    lo, hi = box
    return math.prod(stop - start for start, stop in zip(lo, hi))


def full_box(shape) -> Box:
    return (tuple(0 for _ in shape), tuple(shape))


def intersect(a: Box, b: Box) -> Box | None:
    lo = tuple(max(x, y) for x, y in zip(a[0], b[0]))
    hi = tuple(min(x, y) for x, y in zip(a[1], b[1]))
    if any(start >= stop for start, stop in zip(lo, hi)):
        return None
    return (lo, hi)


def relative(box: Box, origin) -> tuple[slice, ...]:
    """Slices selecting ``box`` inside an array whose first element is at ``origin``."""
    return tuple(slice(start - o, stop - o) for start, stop, o in zip(box[0], box[1], origin))


def view(a, box: Box, origin):
    """The numpy view of ``box`` inside ``a`` (whose first element is at
    ``origin``); a 0-d array stays a 0-d view, not a scalar."""
    return a[relative(box, origin)] if len(box[0]) else a[...]


def _largest_divisor_at_most(n: int, limit: int) -> int:
    if n <= limit:
        return n
    best = 1
    for i in range(1, math.isqrt(n) + 1):
        if n % i == 0:
            for q in (i, n // i):
                if best < q <= limit:
                    best = q
    return best


def shrink_chunks(chunks, itemsize: int, target_bytes: int) -> tuple[int, ...]:
    """Split chunks by divisors, outermost dim first, until each is at most
    ``target_bytes`` (or a single element row cannot shrink further)."""
    chunks = list(chunks)
    for d in range(len(chunks)):
        if math.prod(chunks) * itemsize <= target_bytes:
            break
        inner = math.prod(chunks[d + 1:]) * itemsize
        chunks[d] = _largest_divisor_at_most(chunks[d], max(1, target_bytes // max(inner, 1)))
    return tuple(chunks)


def aligned_chunks(shape, boxes) -> tuple[int, ...]:
    """Per dim, the gcd of every interior fragment boundary (the dim size when none)."""
    chunks = []
    for d, n in enumerate(shape):
        g = 0
        for lo, hi in boxes:
            for b in (lo[d], hi[d]):
                if 0 < b < n:
                    g = math.gcd(g, b)
        chunks.append(g or max(n, 1))
    return tuple(chunks)


def num_chunks(shape, chunks) -> int:
    return math.prod(-(-n // c) for n, c in zip(shape, chunks))


def choose_chunks(shape, boxes, itemsize: int, target_bytes: int = TARGET_CHUNK_BYTES) -> tuple[int, ...]:
    """The chunk shape for a tensor of storage ``shape`` saved as ``boxes``."""
    aligned = shrink_chunks(aligned_chunks(shape, boxes), itemsize, target_bytes)
    plain = shrink_chunks(tuple(max(n, 1) for n in shape), itemsize, target_bytes)
    if num_chunks(shape, aligned) <= num_chunks(shape, plain) + _MAX_EXTRA_CHUNKS * len(boxes):
        return aligned
    return plain


def chunk_indices(shape, chunks):
    """Every chunk index of the grid, in C order (none for empty arrays)."""
    return itertools.product(*(range(-(-n // c)) for n, c in zip(shape, chunks)))


def chunk_box(index, shape, chunks) -> Box:
    lo = tuple(i * c for i, c in zip(index, chunks))
    hi = tuple(min(start + c, n) for start, c, n in zip(lo, chunks, shape))
    return (lo, hi)


def chunks_touching(box: Box, shape, chunks):
    """Indices of the chunks that intersect ``box``."""
    if volume(box) == 0:
        return iter(())
    ranges = [range(start // c, -(-stop // c)) for start, stop, c in zip(box[0], box[1], chunks)]
    return itertools.product(*ranges)


def chunk_name(index) -> str:
    return ".".join(map(str, index)) if index else "c"


# --------------------------------------------------------------- the plan

@dataclass
class Transfer:
    """Rank ``src`` sends its part ``box`` of chunk ``chunk`` of ``key`` to the chunk's owner."""
    key: str
    chunk: tuple
    src: int
    dst: int
    box: Box


@dataclass
class ArrayPlan:
    """Where one tensor goes: its grid, the fragments, and each chunk's writer."""
    key: str
    shape: tuple            # storage shape
    chunks: tuple           # chunk shape
    fragments: list         # [(rank, box)], one per holding rank
    owners: dict = field(default_factory=dict)      # chunk index -> writing rank
    meta_writer: int = 0    # the rank that writes the array's zarr.json


def check_fragments(key: str, shape, fragments) -> None:
    """Distinct boxes must be inside the array, disjoint, and cover it."""
    distinct = sorted({box for _, box in fragments})
    whole = full_box(shape)
    for box in distinct:
        if intersect(box, whole) != box and volume(box) > 0:
            raise ValueError(f"fragment {box} of {key!r} lies outside its shape {tuple(shape)}")
    nonempty = [b for b in distinct if volume(b) > 0]
    for a, b in itertools.combinations(nonempty, 2):
        if intersect(a, b) is not None:
            raise ValueError(f"fragments {_fmt(a)} and {_fmt(b)} of {key!r} overlap; distinct "
                             f"shards must be disjoint (replicas must hold identical boxes)")
    covered, total = sum(volume(b) for b in nonempty), math.prod(shape)
    if covered != total:
        raise ValueError(f"the fragments of {key!r} cover {covered} of its {total} elements "
                         f"(shape {tuple(shape)}); every element needs a holder to be saved")


def _fmt(box: Box) -> str:
    return "[" + ", ".join(f"{start}:{stop}" for start, stop in zip(*box)) + "]"


def assign(arrays: list[ArrayPlan], world: int, itemsizes: dict) -> list[Transfer]:
    """Give every chunk one owner, balancing bytes across ranks; return the
    transfers that owners of straddling chunks need.  Deterministic."""
    load = [0] * world
    transfers: list[Transfer] = []
    for n, arr in enumerate(arrays):
        itemsize = itemsizes[arr.key]
        for index in chunk_indices(arr.shape, arr.chunks):
            cbox = chunk_box(index, arr.shape, arr.chunks)
            size = volume(cbox)
            parts = []  # (rank, part box)
            for rank, box in arr.fragments:
                part = intersect(box, cbox)
                if part is not None:
                    parts.append((rank, part))
            whole = [r for r, p in parts if volume(p) == size]
            if whole:
                owner = min(whole, key=lambda r: (load[r], r))
            else:
                owner = min(parts, key=lambda rp: (-volume(rp[1]), load[rp[0]], rp[0]))[0]
                own = next(p for r, p in parts if r == owner)
                for part in sorted({p for _, p in parts if p != own}):
                    src = min((r for r, p in parts if p == part), key=lambda r: (load[r], r))
                    transfers.append(Transfer(arr.key, index, src, owner, part))
            arr.owners[index] = owner
            load[owner] += size * itemsize
        arr.meta_writer = arr.owners[next(iter(arr.owners))] if arr.owners else n % world
    return transfers
