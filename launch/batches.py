"""This rank's part of a global batch, as training and evaluation feed it to the model."""
from __future__ import annotations

import torch

from loom.parallel import shard_batch


def rank_batch(data, step: int, indices, mesh, layout: str, device: torch.device):
    """``(inputs, targets, positions)`` on ``device`` for samples ``indices``
    of ``data`` at ``step``: inputs and targets ``[len(indices), seq]``
    (int64), cut to this rank's sequence shard in ``layout`` when ``mesh.sp
    > 1`` (then ``positions`` holds the shard's global token indices; else
    None, the model's own ``0..seq-1``)."""
    inputs, targets = data.batch(step, indices)
    positions = None
    if mesh.sp > 1:
        inputs, targets, positions = shard_batch(inputs, targets, mesh.sp_rank, mesh.sp, layout)
        positions = positions.to(device)
    return inputs.to(device), targets.to(device), positions
