"""Gradient synchronisation for a model with expert-parallel MoE layers.

Every rank computes the loss of its own data-parallel slice.  Dense
parameters are replicated everywhere, so their gradients are averaged over
all ranks.  An expert lives on one rank of each EP group and its gradient there
already sums the contributions of every rank of that group (the dispatch sends
them home), so it is summed over the expert-data-parallel group (the ranks that
hold the same experts) and divided by the world size: both then equal the
gradient of the mean loss over all ranks.
"""
from __future__ import annotations

import math

import torch

from loom import comms

from .data_parallel import GradientSync
from .moe import MoE


def expert_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The expert weights of every MoE layer in ``model``."""
    return [p for m in model.modules() if isinstance(m, MoE) for p in m.expert_parameters()]


def moe_aux_loss(model: torch.nn.Module):
    """The sum of the load-balancing losses of the last forward (0 without MoE)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoE) and m.aux_loss is not None]
    return sum(losses) if losses else 0.0


def _model_ep_group(model: torch.nn.Module):
    """The EP group of ``model``'s expert-parallel MoE layers (None without
    any); ValueError when they use different groups."""
    groups = {id(m.ep_group): m.ep_group for m in model.modules() if isinstance(m, MoE) and m.world > 1}
    if len(groups) > 1:
        raise ValueError("ExpertParallelGradientSync: the model's MoE layers use different ep groups; "
                         "pass ep_group (and edp_group) explicitly")
    return next(iter(groups.values()), None)


def _expert_data_parallel(ranks: list, ep_group, edp_group):
    """(edp_group, alone): the group that holds replicas of this rank's
    experts, checked against ``ep_group``; ``alone`` when no other rank
    holds them (EP over the whole group).  Raises ValueError for an
    edp_group that shares ranks with ep_group, or a missing one."""
    if ep_group is None or len(comms.group_ranks(ep_group)) == 1:
        return edp_group, False  # no expert parallelism: experts are replicated like dense weights
    ep = comms.group_ranks(ep_group)
    if edp_group is None:
        if sorted(ep) == sorted(ranks):
            return None, True
        raise ValueError(f"ExpertParallelGradientSync: ep_group {ep} does not cover the group {ranks}, so "
                         f"other ranks hold replicas of these experts: pass edp_group (the ranks with the "
                         f"same experts, one per EP group: mesh.edp_group)")
    edp = comms.group_ranks(edp_group)
    if len(set(ep) & set(edp)) != 1:
        raise ValueError(f"ExpertParallelGradientSync: edp_group {edp} shares ranks {sorted(set(ep) & set(edp))} "
                         f"with ep_group {ep}; it must join the ranks holding the same experts, one per EP "
                         f"group (mesh.edp_group)")
    return edp_group, False


class ExpertParallelGradientSync:
    """Dense gradients averaged over ``group``; expert gradients summed over
    ``edp_group`` and divided by the size of ``group``.  ``ep_group``
    defaults to the one the model's MoE layers were built with; ``params``
    limits it to those of the model's parameters (the others synchronised
    elsewhere: `loom.parallel.shard_data_parallel`).  With it
    over the whole group no rank shares this rank's experts and
    ``edp_group`` may be None; otherwise it is required (mesh.edp_group),
    and one that shares ranks with ``ep_group``, or whose ranks hold other
    experts than this one (checked at the first sync: the placements of the
    expert weights must match), raises ValueError instead of summing
    different experts' gradients."""

    def __init__(self, model: torch.nn.Module, group=None, *, ep_group=None, edp_group=None,
                 bucket_bytes: int = 25 * 2**20, params=None):
        experts = {id(p) for p in expert_parameters(model)}
        own = list(model.parameters()) if params is None else list(params)
        self.expert = [p for p in own if id(p) in experts and p.requires_grad]
        self.dense = [p for p in own if id(p) not in experts and p.requires_grad]
        ranks = comms.group_ranks(group)
        self.world = len(ranks)
        if ep_group is None:  # the model's own: its MoE layers know their group
            ep_group = _model_ep_group(model)
        self.ep_group = ep_group
        self.dense_sync = GradientSync(self.dense, group, bucket_bytes=bucket_bytes)
        edp_group, alone = _expert_data_parallel(ranks, ep_group, edp_group)
        self.expert_sync = None if alone else GradientSync(self.expert, edp_group, bucket_bytes=bucket_bytes,
                                                            average=False)

    @torch.no_grad()
    def sync(self) -> None:
        self.dense_sync.sync()
        if self.expert_sync is not None:
            self.expert_sync.sync()
        for p in self.expert:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.div_(self.world)

    @torch.no_grad()
    def squared_norm(self) -> float:
        """The squared norm of these parameters' gradients over the whole
        model (dense counted once, every expert of the EP group once), a
        float64 Python float.  Collective over the EP group."""
        dense_sq = squared_sum([p.grad for p in self.dense if p.grad is not None])
        expert_sq = torch.tensor([squared_sum([p.grad for p in self.expert if p.grad is not None])],
                                 dtype=torch.float64)
        if self.ep_group is not None and len(comms.group_ranks(self.ep_group)) > 1:
            comms.all_reduce(expert_sq, "sum", self.ep_group)
        return dense_sq + float(expert_sq)

    @torch.no_grad()
    def scale_(self, factor: float) -> None:
        """Multiply every gradient by ``factor`` in place."""
        for p in self.dense + self.expert:
            if p.grad is not None:
                p.grad.mul_(factor)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip by the norm of the whole model's gradient (dense counted once,
        every expert of the EP group once); returns that norm.  Call after `sync`."""
        norm = math.sqrt(self.squared_norm())
        scale = max_norm / (norm + 1e-6)
        if scale < 1:
            self.scale_(scale)
        return norm


def squared_sum(grads) -> float:
    """The sum of the squares of the tensors' elements, in float64 (a
    Python float).  float32/float64 tensors: one fused per-tensor norm in
    their own dtype (no float64 copy of every gradient), the norms squared
    and summed in float64; half-precision tensors are upcast first."""
    grads = list(grads)
    wide = [g for g in grads if g.dtype in (torch.float32, torch.float64)]
    total = sum(float(g.double().pow(2).sum()) for g in grads if g.dtype not in (torch.float32, torch.float64))
    if wide:
        norms = torch._foreach_norm(wide)  # what torch.nn.utils.clip_grad_norm_ uses
        total += float(torch.stack([n.double() for n in norms]).pow(2).sum())
    return total
