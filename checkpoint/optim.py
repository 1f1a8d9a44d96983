"""An optimizer's state, laid out like its parameters.

A PyTorch optimizer keeps per-parameter state (Adam's ``exp_avg`` and
``exp_avg_sq``, SGD's ``momentum_buffer``) as tensors shaped like the
parameter.  When the parameter is split across ranks (an expert-parallel
layer's experts: `loom.comms.Sharded`), so is that state; saved as
"replicated" it would keep one rank's part as the whole (the replica guard
refuses that).  `optimizer_state_dict` gives each such tensor its parameter's
placement, so the moments are saved as parts of the global tensors and load
into any other layout.  With FSDP2 the parameters and their moments are
DTensors, saved as their shards (`loom.checkpoint.dtensor`); a loom placement
on such a parameter (re-declared after ``fully_shard``, which replaces the
parameters) is copied onto its moments the same way.
"""
from __future__ import annotations

import torch

from loom.comms import placement_of, set_placement


def optimizer_state_dict(optimizer: torch.optim.Optimizer, *, init: bool = False) -> dict:
    """``optimizer.state_dict()`` whose per-parameter state tensors shaped
    like their parameter carry its placement (as detached aliases: loading
    into them fills the optimizer's own tensors).  Other state (scalar
    ``step``, factored statistics) is left as it is.

    ``init=True`` first creates the state of an optimizer that has none yet
    (one step with zero gradients and a zero learning rate, as PyTorch DCP
    does), so that a load has tensors of this rank's shapes to fill: use it
    for the load target of a resumed run, then ``optimizer.load_state_dict``.
    Parameters are left unchanged by optimizers whose update scales with the
    learning rate (SGD, Adam, AdamW, ...).  Raises TypeError for a
    non-optimizer, RuntimeError when ``init`` finds gradients in place."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer_state_dict needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if init:
        _init_state(optimizer)
    sd = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in sd["param_groups"] for i in group["params"]]
    for param, index in zip(params, ids):
        placement = placement_of(param)
        entry = sd["state"].get(index)
        if placement is None or not isinstance(entry, dict):
            continue
        for name, value in list(entry.items()):
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                entry[name] = set_placement(value.detach(), placement)
    return sd


def _init_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the state of a fresh optimizer without moving any parameter."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if any(p.grad is not None for p in params):
        raise RuntimeError("optimizer_state_dict(init=True): the parameters hold gradients; call it "
                           "before backward (or after zero_grad(set_to_none=True))")
    saved = [(group, group.get("lr")) for group in optimizer.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for group, lr in saved:
            if lr is not None:
                group["lr"] = torch.zeros_like(lr) if isinstance(lr, torch.Tensor) else 0.0
        optimizer.step()  # at lr 0 the update (and decoupled weight decay) is zero
    finally:
        for group, lr in saved:
            if lr is not None:
                group["lr"] = lr
        for p in params:
            p.grad = None
