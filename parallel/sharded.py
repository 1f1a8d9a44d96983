"""Sharded data parallelism: FSDP2 (`fully_shard`) applied to a loom model.

Each rank keeps ``1/N`` of every parameter, its gradient and its optimizer
state (ZeRO-3, FSDP "full shard"; Rajbhandari et al. 2020, Zhao et al.
2023), and gathers a block's parameters just before the block runs, freeing
them after (``level="params"``), or keeps them gathered from the forward to
the end of the backward (``level="grads"``: ZeRO-2, FSDP "shard grad op";
one gather per step instead of two).  PyTorch's FSDP2 does the work; loom
decides what to shard over which ranks and routes its collectives through
`loom.comms`, so the fault monitor sees them like every other message.

What shards over which ranks (torchtitan shards over dp x cp the same way):

- dense parameters over ``group`` (every dp and sp rank: the sp ranks hold
  replicas of the same parameters), gradients averaged over it;
- expert parameters of MoE layers over their expert-data-parallel group (the
  ranks holding the same experts, `loom.comms.Mesh.edp_group`), gradients
  summed over it and divided by the size of ``group`` (what
  `ExpertParallelGradientSync` does unsharded).  When no other rank holds the
  same experts (EP over every rank) they stay whole and that sync handles them;
- the router of an MoE layer is dense.

Units of sharding: each of ``blocks`` (default ``model.blocks``), inside
each the MoE layers' experts and routers, the input embedding
(``model.embed``) and the output head (``model.head``) when the model has
them untied, as torchtitan does, and the root (the rest: the final norm).
The embedding is freed after its forward like a block; the head stays
gathered from its forward to its backward, which follow each other.  Each
unit prefetches the next one's parameters in the forward and the previous
one's in the backward.  Parameters FSDP2 cannot shard stay
whole on every rank and are averaged like DDP's: 0-d ones (a learned gate)
and those two units share (a module used by two blocks).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from loom import comms
from loom.comms.agree import checksum_ints, hash_text

from .expert_sync import ExpertParallelGradientSync, squared_sum
from .moe import MoE

LEVELS = ("none", "grads", "params")
"""``--shard-state`` levels: ``none`` (DDP: everything replicated), ``grads``
(ZeRO-2 / FSDP SHARD_GRAD_OP: gradients and optimizer state sharded,
parameters sharded between steps and whole from forward to backward),
``params`` (ZeRO-3 / FSDP FULL_SHARD: parameters gathered per block)."""


class _TracedAllGather(AllGather):
    """FSDP2's all-gather through `loom.comms` (recorded for the fault
    monitor).  Synchronous: FSDP2 accepts no work handle (None) as done."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        with comms.agreed():  # the units' layouts were agreed once (`_agree_on_units`)
            comms.all_gather_into(output_tensor, input_tensor, group)
        return None


class _TracedReduceScatter(ReduceScatter):
    """FSDP2's reduce-scatter through `loom.comms`: sums only (the units are
    set to divide before/after themselves: ``set_force_sum_reduction_for_comms``)."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op=None, async_op=False):
        if op is not None and op != torch.distributed.ReduceOp.SUM:
            raise ValueError(f"loom's FSDP reduce-scatter sums only, got op {op!r}")
        with comms.agreed():
            comms.reduce_scatter_into(output_tensor, input_tensor, "sum", group)
        return None


def _device_mesh(group, device_type: str) -> DeviceMesh:
    pg = group if group is not None else torch.distributed.group.WORLD
    return DeviceMesh.from_group(pg, device_type)


class ShardedDataParallel:
    """The sharding of one model: the FSDP2 units (``units``, outermost
    last), the sync of the parameters left whole (``rest``: an
    `ExpertParallelGradientSync` over them), and the per-step calls the
    training loop makes.  Built by `shard_data_parallel`."""

    def __init__(self, model, level, units, rest, group, reshard):
        self.model, self.level, self.units, self.rest, self.group = model, level, units, rest, group
        self._reshard = reshard  # unit -> its reshard_after_forward

    @torch.no_grad()
    def sync(self) -> None:
        """After the step's last backward: FSDP2 already reduce-scattered the
        sharded gradients; this synchronises the parameters left whole."""
        self.rest.sync()

    def sharded_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if isinstance(p, DTensor)]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip every gradient by the norm of the whole model's gradient
        (each element counted once: a shard lives on one rank of ``group``);
        returns that norm.  Collective over ``group``.  Call after `sync`."""
        grads = [p.grad for p in self.sharded_parameters() if p.grad is not None]
        local = squared_sum([g.to_local() for g in grads])
        total = torch.tensor([local], dtype=torch.float64)
        comms.all_reduce(total, "sum", self.group)
        norm = math.sqrt(float(total) + self.rest.squared_norm())
        scale = max_norm / (norm + 1e-6)
        if scale < 1:
            for g in grads:
                g.mul_(scale)
            self.rest.scale_(scale)
        return norm

    @contextlib.contextmanager
    def gathered(self):
        """Every unit's parameters gathered once, kept whole and gradients
        kept unreduced inside the ``with`` (ranks may then run different
        numbers of forwards and backwards: hybrid data parallelism's
        micro-batches).  Collective on entry.  After it, every rank must run
        one more forward and backward (`flush_forward`), which reduces the
        accumulated gradients and frees the gathered parameters."""
        for unit in self.units:
            unit.unshard()
        for unit in self.units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.set_reshard_after_backward(False, recurse=False)
            unit.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for unit in self.units:
                unit.set_reshard_after_forward(self._reshard[id(unit)], recurse=False)
                unit.set_reshard_after_backward(True, recurse=False)
                unit.set_requires_gradient_sync(True, recurse=False)


def shard_data_parallel(model: torch.nn.Module, level: str = "params", *, group=None, ep_group=None,
                        edp_group=None, blocks=None,
                        bucket_bytes: int = 25 * 2**20) -> ShardedDataParallel:
    """Shard ``model`` in place with FSDP2 over ``group`` (default: every rank).

    ``level``: ``"params"`` (ZeRO-3) or ``"grads"`` (ZeRO-2), see `LEVELS`.
    ``ep_group`` / ``edp_group``: the model's expert-parallel groups, as for
    `ExpertParallelGradientSync` (``ep_group`` defaults to its MoE layers'
    own).  ``blocks``: the modules to gather one at a time (default
    ``model.blocks`` when it is a list of modules, else the whole model is
    one unit).  Apply after activation checkpointing and before building
    the optimizer: parameters become `DTensor` shards (dim 0, the last
    ranks may hold fewer rows or none), and so do ``model.state_dict()``'s
    tensors, which `loom.checkpoint` saves as their shards.

    Collective over ``group``: every rank calls it with the same model.
    Raises ValueError for an unknown level, ``"none"``, or ranks whose
    models differ (parameter count, shapes, dtypes)."""
    if level not in LEVELS or level == "none":
        raise ValueError(f"shard_data_parallel: level {level!r} must be one of {list(LEVELS[1:])} "
                         f"(\"none\" means: do not call it)")
    already = next((name or "the model" for name, m in model.named_modules() if isinstance(m, FSDPModule)), None)
    if already is not None:
        raise ValueError(f"shard_data_parallel: {already} is already sharded (fully_shard was applied to it); "
                         f"shard a model once, with its whole layout in one call")
    if blocks is None:
        blocks = getattr(model, "blocks", None)
        blocks = list(blocks) if isinstance(blocks, (torch.nn.ModuleList, list, tuple)) else []
    blocks = _checked_blocks(model, blocks)
    embed, head = _edges(model, blocks)
    ranks = comms.group_ranks(group)
    params = list(model.parameters())
    device_type = params[0].device.type if params else "cpu"
    world_mesh = _device_mesh(group, device_type)
    rest = ExpertParallelGradientSync(model, group, ep_group=ep_group, edp_group=edp_group,
                                      bucket_bytes=bucket_bytes)
    edp = rest.expert_sync.group if rest.expert_sync is not None else None
    # experts that no other rank holds (EP over every rank) have nothing to shard over
    shard_experts = bool(rest.expert) and rest.expert_sync is not None and rest.expert_sync.size > 1
    moes = [m for m in model.modules() if isinstance(m, MoE)] if shard_experts else []
    planned = [u for moe in moes for u in (moe.router, moe)] + [*embed, *blocks, *head, model]
    kept_whole = set(() if shard_experts else rest.expert) | _unshardable(planned)
    _check_one_dtype(planned, kept_whole)
    per_block = level == "params"
    units, reshard = [], {}
    # fully_shard replaces the parameters: the new ones take the old ones' placements (expert slices), so
    # the optimizer's moments, which follow their parameter's, are saved as the right slices
    placements = {name: pl for name, p in model.named_parameters() if (pl := comms.placement_of(p)) is not None}
    replaced = dict(model.named_parameters())

    def shard(module, mesh, reshard_after_forward, divide=None):
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward,
                    ignored_params=kept_whole or None)
        module.set_custom_all_gather(_TracedAllGather())
        module.set_custom_reduce_scatter(_TracedReduceScatter())
        module.set_force_sum_reduction_for_comms(True)
        module.set_reduce_scatter_unused_params(True, recurse=False)
        if divide is not None:
            module.set_gradient_divide_factor(divide)
        units.append(module)
        reshard[id(module)] = reshard_after_forward

    if shard_experts:
        # the layer's output is a reshaped view; the block adds it out of place, which FSDP2 warns about needlessly
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPMoE\) returned a view")
        edp_mesh = _device_mesh(edp, device_type)
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            shard(moe.router, world_mesh, per_block)  # dense: its own unit so the MoE unit holds experts only
            # summed over the ranks holding these experts, divided by all ranks (ExpertParallelGradientSync)
            shard(moe, edp_mesh, per_block, divide=float(len(ranks)))
    for block in [*embed, *blocks]:
        shard(block, world_mesh, per_block)
    for last in [*head, model]:
        shard(last, world_mesh, False)  # needed again right at the backward's start
    chain = [*embed, *blocks, *head]
    for before, after in zip(chain, chain[1:]):
        before.set_modules_to_forward_prefetch([after])
        after.set_modules_to_backward_prefetch([before])
    for name, p in model.named_parameters():
        if name in placements:
            comms.set_placement(p, placements[name])
    _retire(replaced, model)
    left = [p for p in model.parameters() if not isinstance(p, DTensor)]
    rest = ExpertParallelGradientSync(model, group, ep_group=ep_group, edp_group=edp_group,
                                      bucket_bytes=bucket_bytes, params=left)
    _agree_on_units(units, group)
    return ShardedDataParallel(model, level, units, rest, group, reshard)


def _agree_on_units(units, group) -> None:
    """Once: every rank holds the same units with the same parameters (global
    shapes and dtypes), so FSDP2's collectives, which follow them, need no
    per-call check (`comms.agreed`)."""
    shapes = [(len(list(u.parameters())), *(d for p in u.parameters() for d in (*p.shape, hash_text(str(p.dtype)))))
              for u in units]
    comms.agree(None, [len(units), checksum_ints(x for row in shapes for x in row)], group=group,
                what="sharded units").same(
        ["units", "unit parameters"],
        "shard_data_parallel: the ranks' models differ (number of sharded units, or their parameters' "
        "shapes and dtypes)", show=["units"])


def _checked_blocks(model: torch.nn.Module, blocks: Iterable) -> list[torch.nn.Module]:
    """``blocks`` as a list; ValueError for one named twice, the model
    itself (always its own unit), or a module that is not part of it."""
    blocks = list(blocks)
    inside = {id(m) for m in model.modules()}
    for i, block in enumerate(blocks):
        if not isinstance(block, torch.nn.Module):
            raise ValueError(f"shard_data_parallel: blocks[{i}] is a {type(block).__name__}, not a module")
        if block is model:
            raise ValueError(f"shard_data_parallel: blocks[{i}] is the model itself, which is always a unit of "
                             f"its own; name its parts (for example model.layers)")
        if id(block) not in inside:
            raise ValueError(f"shard_data_parallel: blocks[{i}] ({type(block).__name__}) is not a submodule of "
                             f"the model")
        if any(block is other for other in blocks[:i]):
            raise ValueError(f"shard_data_parallel: blocks[{i}] ({type(block).__name__}) is named twice")
    return blocks


def _edges(model: torch.nn.Module, blocks: list) -> tuple[list, list]:
    """([model.embed], [model.head]) as units of their own, each [] when the
    model has no such module, it is inside a block, or the two share a
    parameter (tied weights: both then stay in the root unit)."""
    inside = {id(m) for b in blocks for m in b.modules()}
    edges = [[m] if isinstance(m := getattr(model, name, None), torch.nn.Module) and m is not model
             and id(m) not in inside and any(True for _ in m.parameters()) else []
             for name in ("embed", "head")]
    embed, head = edges
    if embed and head and {id(p) for p in embed[0].parameters()} & {id(p) for p in head[0].parameters()}:
        return [], []
    return embed, head


def _managed(unit: torch.nn.Module, units: list) -> Iterable[torch.nn.Module]:
    """The modules whose own parameters ``unit`` shards: its submodules,
    stopping at the other units (FSDP2's rule)."""
    others = {id(u) for u in units if u is not unit}
    stack, seen = [unit], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        yield m
        stack.extend(c for c in m.children() if id(c) not in others)


def _unit_params(unit, units) -> dict:
    return {id(p): p for m in _managed(unit, units) for p in m.parameters(recurse=False)}


def _unshardable(units: list) -> set:
    """The parameters FSDP2 cannot shard, kept whole on every rank: 0-d ones,
    and those that two units would both shard (a module shared by blocks)."""
    owners: dict[int, int] = {}
    found = {}
    for unit in units:
        for key, p in _unit_params(unit, units).items():
            owners[key] = owners.get(key, 0) + 1
            found[key] = p
    return {p for key, p in found.items() if p.dim() == 0 or owners[key] > 1}


def _check_one_dtype(units: list, kept_whole: set) -> None:
    """FSDP2 gathers a unit's parameters as one flat buffer: ValueError for a
    unit whose parameters have several dtypes, naming one of each."""
    names = {}
    for unit in units:
        for name, p in unit.named_parameters():
            names.setdefault(id(p), name)
    for unit in units:
        by_dtype = {}
        for key, p in _unit_params(unit, units).items():
            if p not in kept_whole:
                by_dtype.setdefault(p.dtype, names.get(key, "?"))
        if len(by_dtype) > 1:
            held = ", ".join(f"{str(dtype).removeprefix('torch.')} ({name})" for dtype, name in by_dtype.items())
            raise ValueError(f"shard_data_parallel: the unit {type(unit).__name__} holds parameters of several "
                             f"dtypes: {held}; cast the model to one dtype (mixed precision casts at run time) "
                             f"or pass blocks= so each dtype is in its own unit")


_REPLACED = "_loom_replaced_by_sharding"


def _retire(before: dict, model: torch.nn.Module) -> None:
    """Mark the parameters fully_shard replaced: an optimizer built over them
    would step tensors the model no longer uses (training nothing, silently),
    so a step of one raises (`_refuse_replaced`)."""
    now = {id(p) for p in model.parameters()}
    for name, p in before.items():
        if id(p) not in now:
            setattr(p, _REPLACED, name)
    global _HOOK
    if _HOOK is None:
        _HOOK = register_optimizer_step_pre_hook(_refuse_replaced)


_HOOK = None


def _refuse_replaced(optimizer, args, kwargs) -> None:
    stale = [name for group in optimizer.param_groups for p in group["params"]
             if (name := getattr(p, _REPLACED, None)) is not None]
    if stale:
        raise ValueError(f"{type(optimizer).__name__}: {len(stale)} of its parameters (first: {stale[0]!r}) were "
                         f"replaced by shard_data_parallel; build the optimizer after sharding the model")
