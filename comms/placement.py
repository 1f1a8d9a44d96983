"""Where the parts of a tensor live: declared by the code that splits it.

A tensor that differs by rank by design (an expert-parallel layer's slice of
its experts, a sharded optimizer moment) carries a `Sharded` placement, set by
the parallel layer that made it; whoever saves or inspects state reads it
here (`placement_of`) instead of guessing.  A tensor without a placement is
replicated: every rank of the group holds the same values.

The placement lives on the tensor object as a Python attribute, so it
follows the object (a ``Parameter`` keeps it through ``module.to(...)``) and
is copied onto the detached tensors of ``module.state_dict()`` by the layer's
state-dict hook (see `loom.parallel.declare_placements`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_ATTR = "_loom_placement"


@dataclass(frozen=True)
class Sharded:
    """This tensor is slice ``index`` of ``parts`` equal slices along ``dim``
    of a global tensor whose other dims are whole.  Ranks that hold the same
    ``index`` hold replicas of that slice.  ``group`` names the group the
    tensor is split over (for messages only), e.g. ``"ep[0,1]"``.

    Raises ValueError for a negative dim, ``parts < 1`` or an index outside
    ``[0, parts)``."""
    dim: int
    index: int
    parts: int
    group: str = ""

    def __post_init__(self):
        for name in ("dim", "index", "parts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Sharded {name}={value!r} must be an int")
        if self.dim < 0 or self.parts < 1 or not 0 <= self.index < self.parts:
            raise ValueError(f"Sharded(dim={self.dim}, index={self.index}, parts={self.parts}): need "
                             f"dim >= 0, parts >= 1 and 0 <= index < parts")

    def global_shape(self, local_shape) -> tuple[int, ...]:
        """The global tensor's shape, given this slice's shape."""
        shape = list(local_shape)
        if self.dim >= len(shape):
            raise ValueError(f"Sharded dim={self.dim} does not exist in a tensor of shape {tuple(shape)}")
        shape[self.dim] *= self.parts
        return tuple(shape)

    def offsets(self, local_shape) -> tuple[int, ...]:
        """Where this slice starts in the global tensor."""
        return tuple(self.index * n if d == self.dim else 0 for d, n in enumerate(local_shape))


def set_placement(tensor: torch.Tensor, placement: Sharded | None) -> torch.Tensor:
    """Declare how ``tensor`` is split across ranks (None: replicated);
    returns ``tensor``.  Raises TypeError for anything but a Tensor or Sharded."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"set_placement needs a torch.Tensor, got {type(tensor).__name__}")
    if placement is not None and not isinstance(placement, Sharded):
        raise TypeError(f"placement must be a loom.comms.Sharded or None, got {placement!r}")
    if placement is not None:
        placement.global_shape(tensor.shape)  # the dim must exist
    setattr(tensor, _ATTR, placement)
    return tensor


def placement_of(tensor: torch.Tensor) -> Sharded | None:
    """The placement declared on ``tensor`` (None: replicated)."""
    return getattr(tensor, _ATTR, None)
