"""Activation checkpointing, applied to a model from outside.

Each chosen block (default: every module of ``model.blocks``, the reference
`Transformer`'s blocks) keeps only its inputs in the forward; its activations
are recomputed in the backward (`torch.utils.checkpoint`, non-reentrant).

Blocks that communicate recompute their communication too: ring attention
re-runs its forward ring, MoE layers their dispatch, linear attention its
state scan.  Every rank of a group runs the same blocks' backward in the same
order, so every rank recomputes the same calls in the same order.  The whole
block is recomputed (early stop off), so a rank never stops a recompute
before a collective its peers enter.  Attention cores that were swapped in for
one forward (`attention_cores`, under hybrid data parallelism) are swapped
back in for its recompute, which runs after the ``with`` block has ended.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

_MARK = "_loom_activation_checkpointed"


def _cores(block: torch.nn.Module) -> list:
    """(module, core) for every swappable attention core inside ``block``."""
    return [(m, m.core) for m in block.modules() if callable(getattr(m, "core", None))]


def _checkpointed_forward(block: torch.nn.Module, forward, *args, **kwargs):
    cores = _cores(block)  # the cores of this forward, for its recompute

    def run(*a, **kw):
        current = [(m, m.core) for m, _ in cores]
        for m, core in cores:
            m.core = core
        try:
            return forward(*a, **kw)
        finally:
            for m, core in current:
                m.core = core

    if not torch.is_grad_enabled():  # nothing to recompute for (evaluation)
        return forward(*args, **kwargs)
    return checkpoint(run, *args, use_reentrant=False, early_stop=False, **kwargs)


def apply_activation_checkpointing(model: torch.nn.Module, blocks=None) -> torch.nn.Module:
    """Checkpoint the activations of each of ``blocks`` (modules of
    ``model``; default: ``model.blocks``), in place: parameters, their names
    and the ``state_dict`` do not change, and losses and gradients are the
    same as without (the recompute runs the same arithmetic).

    Raises ValueError when ``blocks`` is not given and ``model`` has no
    ``blocks`` list, or when a block is already checkpointed.  Returns ``model``."""
    if blocks is None:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, (torch.nn.ModuleList, list, tuple)):
            raise ValueError(f"apply_activation_checkpointing: {type(model).__name__} has no 'blocks' "
                             f"list of modules; pass blocks= (the modules to checkpoint)")
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        if not isinstance(block, torch.nn.Module):
            raise ValueError(f"apply_activation_checkpointing: blocks[{i}] is a {type(block).__name__}, "
                             f"not a torch.nn.Module")
        if getattr(block, _MARK, False):
            raise ValueError(f"apply_activation_checkpointing: blocks[{i}] ({type(block).__name__}) is "
                             f"already checkpointed")
    for block in blocks:
        block.forward = functools.partial(_checkpointed_forward, block, block.forward)
        setattr(block, _MARK, True)
    return model
