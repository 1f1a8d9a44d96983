"""This rank's part of a global batch, as training and evaluation feed it to the model."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from loom.parallel import shard_batch


def rank_batch(data, step: int, indices, mesh, layout: str, device: torch.device):
    """``(inputs, targets, context)`` on ``device`` for samples ``indices`` of
    ``data`` at ``step``: inputs and targets ``[len(indices), seq]`` (int64),
    cut to this rank's sequence shard in ``layout`` when ``mesh.sp > 1``;
    ``context`` the model's keyword arguments: ``positions`` (the shard's
    global token indices under sequence parallelism, else None: the model's
    own ``0..seq-1``) and, when ``data`` gives document boundaries
    (`loom.data.TokenWindows.cu_seqlens`), ``cu_seqlens`` over the whole
    (unsharded) rows, int64."""
    inputs, targets = data.batch(step, indices)
    documents = getattr(data, "cu_seqlens", None)
    cu_seqlens = documents(step, indices) if documents is not None else None
    positions = None
    if mesh.sp > 1:
        inputs, targets, positions = shard_batch(inputs, targets, mesh.sp_rank, mesh.sp, layout)
    inputs, targets, positions, cu_seqlens = to_device([inputs, targets, positions, cu_seqlens], device)
    context = {"positions": positions}
    if cu_seqlens is not None:
        context["cu_seqlens"] = cu_seqlens
    return inputs, targets, context


def to_device(tensors, device: torch.device) -> list:
    """Integer tensors (None entries kept) on ``device`` in one host-to-device
    copy instead of one each: a step's batch is a few small tensors, whose
    copies cost more in latency than in bytes.  On the CPU they stay as they are."""
    present = [t for t in tensors if t is not None]
    if torch.device(device).type == "cpu" or not present:
        return list(tensors)
    flat = torch.cat([t.reshape(-1).to(torch.int64) for t in present]).to(device)
    out, offset = [], 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        out.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


class StepBatches:
    """This rank's micro-batches of each training step: ``grad_accum`` equal
    parts of its data-parallel share of the global batch, each `rank_batch`.

    When the device is not the CPU, the next step's batches are prepared on a
    background thread while this step computes (the loader's host work and
    copy overlap the device's work, as a DataLoader worker would); the data
    are a pure function of (step, index), so prefetching changes nothing of
    what a step sees.  On the CPU the loader runs inline: a thread there would
    take the core the step itself runs on.  A loader error is raised by the
    step that needs the batch."""

    def __init__(self, data, mesh, layout: str, device: torch.device, *, batch_size: int, grad_accum: int = 1,
                 prefetch: bool | None = None):
        self.data, self.mesh, self.layout, self.device = data, mesh, layout, torch.device(device)
        local = batch_size // mesh.dp
        self.micro = local // grad_accum
        self.starts = [mesh.dp_rank * local + k * self.micro for k in range(grad_accum)]
        if prefetch is None:
            prefetch = self.device.type != "cpu"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loom-batches") if prefetch else None
        self._next = None  # (step, future) of the prefetched step

    def _fetch(self, step: int) -> list:
        return [rank_batch(self.data, step, range(s, s + self.micro), self.mesh, self.layout, self.device)
                for s in self.starts]

    def get(self, step: int, next_step: int | None = None) -> list:
        """``[(inputs, targets, context), ...]`` of ``step``; starts preparing
        ``next_step``'s (when given and prefetching)."""
        if self._next is not None and self._next[0] == step:
            batches = self._next[1].result()
        else:
            batches = self._fetch(step)
        self._next = None
        if self._pool is not None and next_step is not None:
            self._next = (next_step, self._pool.submit(self._fetch, next_step))
        return batches

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._next = None, None
