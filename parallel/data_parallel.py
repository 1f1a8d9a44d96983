"""Data-parallel gradient synchronisation through loom.comms."""
from __future__ import annotations

import torch

from loom import comms
from loom.comms.agree import checksum_ints, hash_text


def bucket_parameters(params, bucket_bytes: int) -> list[list[torch.nn.Parameter]]:
    """Group parameters by (dtype, device) into buckets of at most
    ``bucket_bytes`` (a larger parameter gets a bucket of its own), in order."""
    buckets: list[list[torch.nn.Parameter]] = []
    open_buckets: dict = {}
    for p in params:
        key, size = (p.dtype, p.device), p.numel() * p.element_size()
        bucket, nbytes = open_buckets.get(key, ([], 0))
        if bucket and nbytes + size > bucket_bytes:
            buckets.append(bucket)
            bucket, nbytes = [], 0
        bucket.append(p)
        open_buckets[key] = (bucket, nbytes + size)
    buckets.extend(b for b, _ in open_buckets.values() if b)
    return buckets


class GradientSync:
    """Average gradients over a group with bucketed all-reduces.

    Parameters are grouped by dtype and device into flat buckets of at most
    ``bucket_bytes``; a parameter without a gradient contributes zeros, so
    every rank enters the same sequence of collectives whatever the data."""

    def __init__(self, params, group=None, *, bucket_bytes: int = 25 * 2**20, average: bool = True):
        self.params = [p for p in params if p.requires_grad]
        self.group, self.average = group, average
        self.size = len(comms.group_ranks(group))
        self.buckets = bucket_parameters(self.params, bucket_bytes)
        self._agreed = False

    def _agree_on_buckets(self) -> None:
        """Once: every rank holds the same buckets (sizes and dtypes) of the
        same slices of its parameters (`comms.placement_of`: a rank must not
        sum another slice's gradient into its own), so the all-reduces that
        follow need no per-op check (`comms.agreed`)."""
        layout = [(sum(p.numel() for p in b), str(b[0].dtype)) for b in self.buckets]
        slices = [(pl.dim, pl.index, pl.parts) if (pl := comms.placement_of(p)) is not None else (-1,)
                  for p in self.params]
        comms.agree(None, [len(layout), checksum_ints(x for n, d in layout for x in (n, hash_text(d))),
                           checksum_ints(x for sl in slices for x in sl)],
                    group=self.group, what="gradient buckets").same(
            ["buckets", "bucket sizes and dtypes", "parameter slices"],
            "GradientSync: the ranks hold different parameters (or different slices of them: expert weights "
            "sync over the ranks holding the same experts, mesh.edp_group)", show=["buckets"])
        self._agreed = True

    @torch.no_grad()
    def sync(self) -> None:
        if self.size == 1:
            return
        if not self._agreed:
            self._agree_on_buckets()
        with comms.agreed():
            self._sync()

    def _sync(self) -> None:
        for bucket in self.buckets:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in bucket])
            comms.all_reduce(flat, "sum", self.group)
            if self.average:
                flat.div_(self.size)
            offset = 0
            for p in bucket:
                synced = flat[offset:offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = synced.clone()
                else:
                    p.grad.copy_(synced)
                offset += p.numel()
