"""The replica guard: a tensor saved as replicated must be equal on its ranks.

Replicas share the writing (each writes some chunks), so replicas that differ
would be saved as a silent mix of ranks' values - or, for state that differs
by rank by design (an expert-parallel layer's experts, their optimizer
moments), as one rank's part passed off as the whole.  Every rank therefore
sends a cheap fingerprint of each tensor fragment with its save description,
and the plan (the same on every rank) refuses a box whose holders disagree,
naming the key and the ranks: every rank raises the same error.

The fingerprint is a crc32c of the fragment's dtype, shape and of up to
`SAMPLE` elements spread evenly over it (all of them for small tensors), read
without copying the tensor: tens of microseconds per tensor, whatever its
size.  It catches state that differs by rank (different everywhere); for a
large tensor the sampled elements move with the step, so replicas that stay
apart in a few rows are caught over a run, not at every save.  It is not a
checksum of the data, which the chunk checksums are.
"""
from __future__ import annotations

import google_crc32c
import torch

from .manifest import as_numpy

SAMPLE = 4096   # elements read from a large tensor
WHOLE = 65536   # tensors up to this many elements are read whole


def fingerprint(t: torch.Tensor, salt: int = 0) -> int:
    """crc32c over ``t``'s dtype, shape and a deterministic sample of its
    elements (their bits, so NaNs and -0.0 count as stored).  ``salt`` (the
    step being saved) shifts which elements a large tensor's sample reads,
    so replicas that stay apart in a few elements are caught over a run."""
    t = t.detach()
    n = t.numel()
    if n <= WHOLE:
        sample = t.reshape(-1)
    else:  # SAMPLE evenly spaced elements, in logical (C) order, read where they lie in memory
        shift = (int(salt) * 2654435761) % n  # a multiplicative hash: spreads consecutive steps
        index = (torch.arange(SAMPLE, dtype=torch.int64) * (n - 1) // (SAMPLE - 1) + shift) % n
        offsets = torch.zeros(SAMPLE, dtype=torch.int64)
        for size, stride in zip(reversed(t.shape), reversed(t.stride())):
            offsets += (index % size) * stride
            index //= size
        span = int(offsets.max()) + 1
        memory = t.as_strided((span,), (1,), t.storage_offset())  # inside t's storage: no copy
        sample = memory.index_select(0, offsets.to(t.device))
    crc = google_crc32c.value(f"{t.dtype}{tuple(t.shape)}".encode())
    if sample.numel():
        data = as_numpy(sample.cpu().contiguous()).reshape(-1).view("uint8")
        crc = google_crc32c.extend(crc, data)
    return crc


def check_replicas(key: str, kind: str, holders: list[tuple[int, tuple, int]]) -> None:
    """``holders``: (rank, box, fingerprint) of every rank holding a part of
    ``key``.  Raises ValueError naming the key and ranks when two ranks hold
    the same box with different fingerprints."""
    by_box: dict = {}
    for rank, box, fp in holders:
        by_box.setdefault(box, []).append((rank, fp))
    for box, items in by_box.items():
        if len({fp for _, fp in items}) <= 1:
            continue
        ranks = [r for r, _ in items]
        groups: dict = {}
        for r, fp in items:
            groups.setdefault(fp, []).append(r)
        split = " vs ".join(f"ranks {rs}" if len(rs) > 1 else f"rank {rs[0]}" for rs in groups.values())
        what = "replicated" if kind == "replicated" else \
            f"the same part {_fmt(box)} (a {kind} held by several ranks)"
        raise ValueError(
            f"tensor {key!r} is saved as {what} on ranks {ranks}, but its values differ ({split} hold "
            f"different values): saving it would keep one rank's values as everyone's.  State that "
            f"differs by rank must say how it is split: a parallel layer declares its parameters "
            f"(loom.comms.Sharded via loom.parallel.declare_placements), an optimizer's state follows "
            f"its parameters with loom.checkpoint.optimizer_state_dict(optimizer), other values go in "
            f"Shard / Flat / PerRank")


def _fmt(box) -> str:
    return "[" + ", ".join(f"{lo}:{hi}" for lo, hi in zip(*box)) + "]"
