"""Evaluation on held-out data, in the model's own parallel layout.

Every evaluation reads the same ``eval_batches`` global batches of the
held-out stream (batch ``b`` holds samples ``(b, 0..batch_size-1)`` of it,
never a training sample: windows of the validation split of a real corpus,
`loom.data.TokenWindows`, with their document boundaries; or the synthetic
task's held-out draws, `SyntheticData(..., split="val")`), so successive
evaluations are comparable.  Each rank runs its share under
`torch.no_grad` exactly as training would (its data-parallel slice of each
batch, its sequence shard under sequence parallelism, expert-parallel MoE
layers dispatching as in training); the loss is the sum of the next-token
cross-entropies of all tokens over all ranks divided by their number (one
all-reduce, float64), so it equals a single-process evaluation of the same
tokens.  Under ``--hdp`` the held-out batches are fixed-length
(``--seq-len``) sequences split over the ranks like plain data parallelism
(hdp balances long-tail training batches; evaluation does not need it).
The MoE load-balancing loss is not part of the evaluation loss.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch

from loom import comms
from loom.parallel import next_token_loss

from .batches import rank_batch


def _share(total: int, parts: int, index: int) -> range:
    """Part ``index`` of ``range(total)`` split into ``parts`` contiguous parts."""
    return range(index * total // parts, (index + 1) * total // parts)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, *, batches: int, batch_size: int, mesh, device: torch.device,
             layout: str = "contiguous", autocast=None) -> dict:
    """Held-out loss of ``model`` over ``batches`` global batches of
    ``batch_size`` sequences of ``data`` (a held-out `loom.data.TokenWindows`
    or ``SyntheticData(split="val")``; anything with ``batch(step, indices)``
    and optionally ``cu_seqlens(step, indices)``), sequence shards in ``layout`` when ``mesh.sp > 1``.
    Collective over the whole job (every rank calls it at the same step).
    Returns ``eval_loss`` (mean cross-entropy per token, nats), ``eval_ppl``
    (its exp), ``eval_tokens`` and ``eval_time_s``.
    The model is put in eval mode for the passes and back afterwards.
    ``autocast``: a factory of the context the forward runs in (under mixed
    precision, the training step's `torch.autocast`); default none."""
    t0 = time.monotonic()
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, tokens]
    try:
        for b in range(batches):
            # this rank's data-parallel slice (under --hdp, sp is 1 and the
            # batch need not divide by dp: the slices may differ by one)
            inputs, targets, context = rank_batch(data, b, _share(batch_size, mesh.dp, mesh.dp_rank), mesh,
                                                  layout, device)
            if targets.numel():
                with autocast() if autocast is not None else contextlib.nullcontext():
                    logits = model(inputs, **context)
                total[0] += next_token_loss(logits, targets, reduction="sum").double()
                total[1] += targets.numel()
        comms.all_reduce(total, "sum")
    finally:
        model.train(was_training)
    loss = float(total[0] / total[1])
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = math.inf
    return {"eval_loss": loss, "eval_ppl": ppl, "eval_tokens": int(total[1]),
            "eval_time_s": time.monotonic() - t0}
