"""Parallel layers declare which of their parameters differ by rank.

A layer that keeps only its rank's slice of a parameter (an expert-parallel
MoE keeps ``E / P`` of its experts) says so with `declare_placements`: the
parameter carries a `loom.comms.Sharded` placement, and so does its entry in
every ``module.state_dict()`` (a state-dict hook copies it onto the detached
tensors), so a checkpoint of ``model.state_dict()`` saves the slices as parts
of the global tensor instead of mistaking them for replicas.
"""
from __future__ import annotations

import torch.nn as nn

from loom.comms import Sharded, placement_of, set_placement

_DECLARED = "_loom_placements"


def declare_placements(module: nn.Module, placements: dict[str, Sharded]) -> None:
    """Declare how ``module``'s own parameters (or buffers), by attribute
    name, are split across ranks.  A layer calls it after creating them;
    calling it again replaces the declarations.  Raises KeyError for a name
    the module does not hold directly."""
    for name, placement in placements.items():
        tensor = module._parameters.get(name, module._buffers.get(name))
        if tensor is None:
            raise KeyError(f"{type(module).__name__} has no parameter or buffer {name!r}")
        set_placement(tensor, placement)
    first = not hasattr(module, _DECLARED)
    setattr(module, _DECLARED, dict(placements))  # a plain attribute: deepcopy keeps it
    if first:
        module.register_state_dict_post_hook(_carry_placements)


def _carry_placements(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """State-dict hook: the detached tensors get their parameters' placements."""
    for name, placement in getattr(module, _DECLARED, {}).items():
        tensor = state_dict.get(prefix + name)
        if tensor is not None and placement_of(tensor) != placement:
            set_placement(tensor, placement)
