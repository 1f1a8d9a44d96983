"""This rank's part of a global batch, as training and evaluation feed it to the model."""
from __future__ import annotations

import torch

from loom.parallel import shard_batch
from loom.parallel.attention_blocks import copy_to_device


def rank_batch(data, step: int, indices, mesh, layout: str, device: torch.device):
    """``(inputs, targets, context)`` on ``device`` for samples ``indices`` of
    ``data`` at ``step``: inputs and targets ``[len(indices), seq]`` (int64),
    cut to this rank's sequence shard in ``layout`` when ``mesh.sp > 1``;
    ``context`` the model's keyword arguments: ``positions`` (the shard's
    global token indices under sequence parallelism, else None: the model's
    own ``0..seq-1``) and, when ``data`` gives document boundaries
    (`loom.data.TokenWindows.cu_seqlens`), ``cu_seqlens`` over the whole
    (unsharded) rows, int64, on the host (the attention cores read the
    boundaries there and copy them to the device without waiting)."""
    inputs, targets = data.batch(step, indices)
    documents = getattr(data, "cu_seqlens", None)
    cu_seqlens = documents(step, indices) if documents is not None else None
    positions = None
    if mesh.sp > 1:
        inputs, targets, positions = shard_batch(inputs, targets, mesh.sp_rank, mesh.sp, layout)
    inputs, targets, positions = to_device([inputs, targets, positions], device)
    context = {"positions": positions}
    if cu_seqlens is not None:  # stays on the host: attention reads it there, and copies it without waiting
        context["cu_seqlens"] = cu_seqlens
    return inputs, targets, context


def to_device(tensors, device: torch.device) -> list:
    """Integer tensors (None entries kept) on ``device`` in one host-to-device
    copy instead of one each (a step's batch is a few small tensors, whose
    copies cost more in latency than in bytes), through pinned memory without
    making the host wait for the device.  On the CPU they stay as they are."""
    present = [t for t in tensors if t is not None]
    if torch.device(device).type == "cpu" or not present:
        return list(tensors)
    flat = copy_to_device(torch.cat([t.reshape(-1).to(torch.int64) for t in present]), device)
    out, offset = [], 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        out.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


def micro_batches(data, step: int, mesh, layout: str, device: torch.device, *, batch_size: int,
                  grad_accum: int = 1) -> list:
    """This rank's micro-batches of training step ``step``: ``grad_accum``
    equal parts of its data-parallel share of the global batch, each a
    `rank_batch` ``(inputs, targets, context)``.  (Preparing the next step on
    a background thread was measured on an H200 and made the default job's
    step slower, 15% against 6.6% inline: the loader and the kernel launches
    contend for the interpreter lock; benchmarks/data_cuda.py.)"""
    local = batch_size // mesh.dp
    micro = local // grad_accum
    starts = [mesh.dp_rank * local + k * micro for k in range(grad_accum)]
    return [rank_batch(data, step, range(s, s + micro), mesh, layout, device) for s in starts]
